"""bench/e2e_report.py's "kernels compiled for" line: the vector registers the register tile
is compiled to follow numba's target (the host's AVX-512 or AVX2, or what NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES say), and the report says which."""

import os
import subprocess
import sys

import numpy as np
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
    line = _kernel_target_in_subprocess().rstrip()  # fastcnn's and numba's defaults
    bits = 512 if "avx512f" in flags else 256
    assert "(the host)" in line, line
    assert f"float32 tile in {bits}-bit registers" in line, line
    block = "4x4" if bits == 512 else "2x3"
    assert line.endswith(f"Dense forward blocks {block} of 16 lanes"), line
    assert ("6x32 for forwards" in line) == (bits == 512), line  # the tall tile


def test_avx2_target_on_any_host():
    """An AVX2 target (haswell, AVX-512 off) compiles the tile without a zmm register, on an
    AVX-512 host too; a CPU name alone would keep the host's AVX-512 features."""
    if "avx2" not in _host_flags():
        pytest.skip("needs an AVX2 host")
    line = _kernel_target_in_subprocess(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="-avx512f")
    assert "float32 tile in 256-bit registers (0 zmm" in line, line
    assert line.rstrip().endswith("Dense forward blocks 2x3 of 16 lanes"), line
    assert "6x32" not in line, line  # no tall tile: AVX2's 16 registers would spill it


@pytest.mark.parametrize("wide, bits", [("1", 512), ("0", 256)])
def test_intel_avx512_target_keeps_the_tile_in_512_bit_registers(wide, bits):
    """LLVM's tuning for Intel's AVX-512 server cores (skylake-avx512 to emeraldrapids)
    prefers 256-bit vectors; fastcnn's kernels ask for 512 (kernels/_parfor_link_only.py), so
    the tile is in zmm registers there as on AMD's Zen 4. FASTCNN_NUMBA_WIDE_VECTORS=0 shows
    that the request is what does it."""
    if "avx512f" not in _host_flags():
        pytest.skip("needs an AVX-512 host (the probe runs the tile it compiles)")
    line = _kernel_target_in_subprocess(
        NUMBA_CPU_NAME="skylake-avx512", FASTCNN_NUMBA_WIDE_VECTORS=wide
    )
    assert "skylake-avx512" in line and "vectors up to 512 bits" in line, line
    assert f"float32 tile in {bits}-bit registers" in line, line


def _kernel_target_in_subprocess(**variables):
    """bench/e2e_report.py's "kernels compiled for" line from a fresh process with
    ``variables`` set (and none of fastcnn's or numba's target settings inherited)."""
    code = "import e2e_report; print(e2e_report.kernel_target())"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTCNN_NUMBA", "NUMBA_CPU"))}
    env.update(variables)
    root = os.path.dirname(BENCH)
    env["PYTHONPATH"] = os.pathsep.join([BENCH, root] + [env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    ).stdout


_NARROW_TILE_CASES = """
import sys
import numpy as np
from fastcnn import functional as F
from fastcnn.kernels.gemm_tile import RN

rng = np.random.default_rng(7)
out = {"rn": np.array(RN)}
# a Winograd layer of 16 filters (its products on the narrow tile), forward and gradients
x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
y = F.conv2d_forward(x, w, None, 1, 1, winograd=True)
out["winograd_y"] = np.ascontiguousarray(y)
for i, g in enumerate(F.conv2d_backward(x, w, np.ascontiguousarray(y), 1, 1, 1, "c", True, True)):
    out[f"winograd_g{i}"] = np.ascontiguousarray(g)
# 48 filters: one pair of filter blocks on the 32-filter tile (AVX2's 3x32, AVX-512's 6x32)
# and an odd last block; on AVX2 a block of 20 rows, 12 on the wide tile and 8 narrow
w48 = rng.standard_normal((48, 16, 3, 3)).astype(np.float32)
out["winograd48_y"] = np.ascontiguousarray(F.conv2d_forward(x, w48, None, 1, 1, winograd=True))
# a strided layer of 16 channels (the phases input gradient) and LeNet-5's first layer
w2 = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
y2 = F.conv2d_forward(x, w2, None, 2, 1)
for i, g in enumerate(F.conv2d_backward(x, w2, np.ascontiguousarray(y2), 2, 1, 1, "c", True, True)):
    out[f"strided_g{i}"] = np.ascontiguousarray(g)
x1 = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
w1 = rng.standard_normal((6, 1, 5, 5)).astype(np.float32)
y1 = F.conv2d_forward(x1, w1, None, 1, 2)
out["c1_y"] = np.ascontiguousarray(y1)
_, dw1, db1 = F.conv2d_backward(x1, w1, np.ascontiguousarray(y1), 1, 2, 1, "c", True, False)
out["c1_dw"], out["c1_db"] = dw1, db1
np.savez(sys.argv[1], **out)
"""


def test_narrow_tile_gives_the_same_bits_on_avx2(tmp_path):
    """The narrow tile has 6 rows on AVX-512 hosts and 4 on AVX2 (gemm_tile.RN), the Winograd
    products' 32-filter tile 6 and 3: Winograd layers of 16 and 48 filters, a strided input
    gradient and LeNet-5's first layer give the same bits
    compiled for an AVX2 target (a child process) as for this AVX-512 host (another child). On
    an AVX2 host both would run the 4-row tile: skipped there (two cold compilations, about
    2 minutes of CI on such a host, for nothing)."""
    if "avx512f" not in _host_flags():
        pytest.skip("needs an AVX-512 host: its 6-row tile against AVX2's 4 rows")
    root = os.path.dirname(BENCH)
    results = {}
    for name, extra in (("host", {}), ("avx2", {"NUMBA_CPU_NAME": "haswell"})):
        env = dict(os.environ, **extra)
        if extra:
            env["NUMBA_CPU_FEATURES"] = "-avx512f"
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        path = tmp_path / f"{name}.npz"
        proc = subprocess.run(
            [sys.executable, "-c", _NARROW_TILE_CASES, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = dict(np.load(path))
    assert int(results["avx2"]["rn"]) == 4
    assert results["host"].keys() == results["avx2"].keys()
    for key, host in results["host"].items():
        if key != "rn":
            assert host.tobytes() == results["avx2"][key].tobytes(), key
