"""bench/e2e_report.py's "kernels compiled for" line: the vector registers the register tile
is compiled to follow numba's target (the host's AVX-512 or AVX2, or what NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES say), and the report says which."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import e2e_report  # noqa: E402

sys.path.remove(BENCH)


@pytest.mark.parametrize(
    "features, bits",
    [
        ("+64bit,+avx,+avx2,+avx512f,+avx512bw", 512),
        ("+64bit,+avx,+avx2,-avx512f,-avx512bw", 256),
        ("+sse2,-avx", 128),
        ("-avx512f", 0),
    ],
)
def test_vector_width(features, bits):
    assert e2e_report.vector_width(features) == bits


def _host_flags():
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        return []


def test_host_target_uses_the_hosts_widest_vectors():
    flags = _host_flags()
    if "avx2" not in flags:
        pytest.skip("the tile's vector width is checked on AVX2 and AVX-512 hosts")
    line = e2e_report.kernel_target()
    bits = 512 if "avx512f" in flags else 256
    assert "(the host)" in line or "NUMBA_CPU" in line, line
    if not any(k in os.environ for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")):
        assert f"float32 tile in {bits}-bit registers" in line, line
        block = "4x4" if bits == 512 else "2x3"
        assert line.endswith(f"Dense forward blocks {block} of 16 lanes"), line
        assert ("6x32 for forwards" in line) == (bits == 512), line  # the tall tile


def test_avx2_target_on_any_host():
    """An AVX2 target (haswell, AVX-512 off) compiles the tile without a zmm register, on an
    AVX-512 host too; a CPU name alone would keep the host's AVX-512 features."""
    if "avx2" not in _host_flags():
        pytest.skip("needs an AVX2 host")
    code = "import e2e_report; print(e2e_report.kernel_target())"
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="-avx512f")
    root = os.path.dirname(BENCH)
    env["PYTHONPATH"] = os.pathsep.join([BENCH, root] + [env.get("PYTHONPATH", "")])
    line = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert "float32 tile in 256-bit registers (0 zmm" in line, line
    assert line.rstrip().endswith("Dense forward blocks 2x3 of 16 lanes"), line
    assert "6x32" not in line, line  # no tall tile: AVX2's 16 registers would spill it
