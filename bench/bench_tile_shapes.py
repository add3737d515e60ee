#!/usr/bin/env python
"""Register tile shapes on this CPU: GFLOP/s of an R x F tile of the convolutions' kind, one core.

    python bench/bench_tile_shapes.py [--shapes 3x32 6x16 6x32 8x32 4x64 12x32]

Each shape is the inner loop of ``fastcnn.kernels.gemm_tile.gemm_tile`` written out for R rows
and F columns (accumulators in stack memory, one broadcast per row and F/8 vector loads per k,
R*F fused multiply-adds), generated and compiled here, run over k = 512 terms many times; the
figure is the best of 5. It says which tile shapes keep their accumulators in registers on
this machine and how close each comes to the core's peak, e.g. whether a 6 x 16 tile (for
convolutions with 16 or fewer filters, which fill half of the 3 x 32 tile) is as fast as 3 x 32.
"""

import argparse
import platform
import time

import numba
import numpy as np
from numba import njit

from fastcnn.kernels.gemm_tile import stack_array


def make_tile(rows, cols):
    """A compiled ``run(a, abase, aoff, b, out, reps, k1, bstride)`` for an rows x cols tile."""
    n = rows * cols
    src = (
        f"@njit(fastmath={{'contract'}}, inline='always')\n"
        f"def tile(a, abase, aoff, k0, k1, b, b0, bstride, out):\n"
        f"    acc = numba.carray(stack_array({n}, out.dtype), ({n},))\n"
        f"    for q in range({n}):\n        acc[q] = 0\n"
        + "".join(f"    a{r} = abase[{r}]\n" for r in range(rows))
        + "    bb = b0\n    for k in range(k0, k1):\n        ko = aoff[k]\n"
        + "".join(f"        x{r} = a[a{r} + ko]\n" for r in range(rows))
        + f"        for f in range({cols}):\n            w = b[bb + np.uint64(f)]\n"
        + "".join(f"            acc[{r * cols} + f] += x{r} * w\n" for r in range(rows))
        + f"        bb += bstride\n    for q in range({n}):\n        out[q] = acc[q]\n\n"
        "@njit(fastmath={'contract'})\n"
        "def run(a, abase, aoff, b, out, reps, k1, bstride):\n"
        "    for r in range(reps):\n"
        "        tile(a, abase, aoff, 0, k1, b, np.uint64(0), bstride, out)\n"
    )
    scope = {"njit": njit, "numba": numba, "np": np, "stack_array": stack_array}
    exec(compile(src, f"<tile {rows}x{cols}>", "exec"), scope)
    return scope["run"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["3x32", "6x16", "6x32", "8x32", "4x64", "12x32"])
    args = p.parse_args()
    numba.set_num_threads(1)
    k = 512
    rng = np.random.default_rng(0)
    a = rng.random(4096, dtype=np.float32)
    aoff = (np.arange(k, dtype=np.uint64) * np.uint64(5)) % np.uint64(3000)
    print(
        f"# register tiles, float32, one core ({platform.processor() or platform.machine()}, "
        f"llvm cpu {numba.config.CPU_NAME or 'host'})"
    )
    print("| tile | GFLOP/s |\n|---|---:|")
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        run = make_tile(rows, cols)
        abase = np.arange(rows, dtype=np.uint64) * np.uint64(7)
        b = rng.random(k * cols + 64, dtype=np.float32)
        out = np.zeros(rows * cols, np.float32)
        run(a, abase, aoff, b, out, 1, k, np.uint64(cols))  # compile
        reps = max(1, 2_000_000 // (rows * cols))
        best = min(_timed(run, a, abase, aoff, b, out, reps, k, cols) for _ in range(5))
        print(f"| {shape} | {reps * k * 2 * rows * cols / best / 1e9:.1f} |")


def _timed(run, a, abase, aoff, b, out, reps, k, cols):
    t0 = time.perf_counter()
    run(a, abase, aoff, b, out, reps, k, np.uint64(cols))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
