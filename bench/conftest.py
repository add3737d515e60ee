"""Benchmark harness: every op at the reference network's shapes, implementations side by side.

Each benchmark records (group, implementation, median seconds, FLOPs); the summary at the end
prints one table with GFLOP/s and the speedup of each implementation over the naive loops and
over numpy, all measured in this one run.
"""

import os
import sys

# Spinning OpenMP/BLAS workers steal the two cores from Numba's pool between calls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import numba  # noqa: E402
import pytest  # noqa: E402

RESULTS = []

try:
    import torch  # noqa: F401  (optional: never a dependency)
except ImportError:
    torch = None


@pytest.fixture
def record(benchmark):
    """Run ``fn`` under pytest-benchmark and keep its median for the summary table."""

    def run(group, impl, fn, flops, rounds):
        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        warmup = 0 if impl == "naive" else 2
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
        RESULTS.append((group, impl, benchmark.stats.stats.median, flops))

    return run


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"fastcnn kernel benchmark: float32, {numba.get_num_threads()} threads, medians")
    header = (
        f"| {'op':<40} | {'impl':<7} | {'ms':>10} | {'GFLOP/s':>8} | {'vs naive':>9} "
        f"| {'vs numpy':>8} |"
    )
    write(header)
    write("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    groups = []
    for group, *_ in RESULTS:
        if group not in groups:
            groups.append(group)
    for group in groups:
        rows = {impl: (sec, flops) for g, impl, sec, flops in RESULTS if g == group}
        naive = rows.get("naive", (None,))[0]
        numpy_sec = rows.get("numpy", (None,))[0]
        for impl in ("naive", "numpy", "fastcnn", "torch"):
            if impl not in rows:
                continue
            sec, flops = rows[impl]
            gflops = f"{flops / sec / 1e9:8.2f}" if flops else f"{'-':>8}"
            vs_naive = f"{naive / sec:8.0f}x" if naive else f"{'-':>9}"
            vs_numpy = f"{numpy_sec / sec:7.1f}x" if numpy_sec else f"{'-':>8}"
            write(
                f"| {group:<40} | {impl:<7} | {sec * 1e3:10.3f} | {gflops} | {vs_naive} | "
                f"{vs_numpy} |"
            )
