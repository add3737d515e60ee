"""The convolution layers of the benchmark networks, one at a time: GFLOP/s of the forward, the
weight gradient and the input gradient (through ``fastcnn.functional``, so each takes the kernel
fastcnn picks for its shape), beside numpy's float32 GEMM on the same number of threads.

    python bench/bench_conv.py [--threads 2] [--batch 128] [--repeats 30] [--out FILE.md]
                               [--networks vgg allconv]

Each figure is the fastest of ``--repeats`` calls (on a shared machine the minimum is what the
kernel can do; the median also measures the neighbours). ``--threads`` sets numba's threads and,
for the GEMM row only, the BLAS's (threadpoolctl, restored afterwards).
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastcnn import functional as F  # noqa: E402
from fastcnn.kernels.gemm_tile import FTN, tile_shape  # noqa: E402
from fastcnn.threads import threads  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_report import git_revision  # noqa: E402

#: (network, layer, C, F, H, kernel, stride, padding): the convolutions of the benchmark networks
#: (ResNet's stride-2 shortcut convolutions aside), at their input size.
LAYERS = [
    ("reference", "conv1", 1, 32, 28, 3, 1, 0),
    ("reference", "conv2", 32, 64, 13, 3, 1, 0),
    ("lenet5", "conv1", 1, 6, 28, 5, 1, 2),
    ("lenet5", "conv2", 6, 16, 14, 5, 1, 0),
    ("resnet", "stem", 1, 16, 28, 3, 1, 1),
    ("resnet", "16->16", 16, 16, 28, 3, 1, 1),
    ("resnet", "16->32 /2", 16, 32, 28, 3, 2, 1),
    ("resnet", "32->32", 32, 32, 14, 3, 1, 1),
    ("resnet", "32->64 /2", 32, 64, 14, 3, 2, 1),
    ("resnet", "64->64", 64, 64, 7, 3, 1, 1),
    ("vgg", "conv1", 3, 32, 32, 3, 1, 1),
    ("vgg", "conv2", 32, 32, 32, 3, 1, 1),
    ("vgg", "conv3", 32, 64, 16, 3, 1, 1),
    ("vgg", "conv4", 64, 64, 16, 3, 1, 1),
    ("vgg", "conv5", 64, 128, 8, 3, 1, 1),
    ("allconv", "conv1", 3, 16, 32, 3, 1, 1),
    ("allconv", "conv2 /2", 16, 32, 32, 3, 2, 1),
    ("allconv", "conv3 /2", 32, 64, 16, 3, 2, 1),
]
NETWORKS = tuple(dict.fromkeys(row[0] for row in LAYERS))


def fastest(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate(nthreads, repeats):
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    with threadpool_limits(limits=nthreads, user_api="blas"):
        return 2 * 1024**3 / fastest(lambda: a @ a, repeats) / 1e9


def vector_flags():
    """The host's vector extensions the tiles' code can use (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "fma", "avx512f") if f in flags]


def tiles(c, f, k, stride, padding):
    """Which register tile a layer's forward and weight gradient run on, and its input
    gradient's method (as fastcnn.functional and kernels/conv2d.py choose them)."""
    rows, cols = tile_shape(f <= FTN)
    weight = np.ones((f, c, k, k), np.float32)
    pads = F.conv2d_padding(padding, (k, k), (stride, stride), (1, 1))
    kernel = F._input_gradient_kernel(weight, (stride, stride), pads, (1, 1))
    if kernel is F._winograd_forward:
        how = "Winograd"
    elif kernel is F._conv2d.conv2d_forward:
        how = f"transposed, {'x'.join(map(str, tile_shape(c <= FTN)))}"
    elif kernel is F._conv2d_phases.conv2d_backward_input_phases:
        how = f"phases, {'x'.join(map(str, tile_shape(True)))}"
    else:
        how = "col2im, 3x32"
    return f"{rows}x{cols}; {how}"


def layer_rates(c, f, h, k, stride, padding, batch, repeats):
    rng = np.random.default_rng(0)
    # activations channels-last in memory, as a network's layers hand them over (an NCHW array
    # would time a layout conversion too)
    x = F._nchw(rng.standard_normal((batch, h, h, c)).astype(np.float32))
    w = rng.standard_normal((f, c, k, k)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    y = F.conv2d_forward(x, w, b, stride, padding)
    n, _, oh, ow = y.shape
    dy = F._nchw(rng.standard_normal((n, oh, ow, f)).astype(np.float32))
    flops = 2 * y.size * c * k * k
    times = {
        "forward": fastest(lambda: F.conv2d_forward(x, w, b, stride, padding), repeats),
        "weight grad": fastest(
            lambda: F.conv2d_backward(x, w, dy, stride, padding, input_grad=False), repeats
        ),
        "both grads": fastest(lambda: F.conv2d_backward(x, w, dy, stride, padding), repeats),
    }
    rates = {
        "forward": flops / times["forward"] / 1e9,
        "weight grad": flops / times["weight grad"] / 1e9,
    }
    # the input gradient's time as a difference of two minima: too small a one is noise
    extra = times["both grads"] - times["weight grad"]
    rates["input grad"] = flops / extra / 1e9 if extra > 0.02 * times["weight grad"] else np.nan
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument(
        "--networks",
        nargs="+",
        choices=NETWORKS,
        default=list(NETWORKS),
        help="only the layers of these networks [all]",
    )
    args = ap.parse_args(argv)
    lines = []
    rev = git_revision()
    with threads(args.threads):
        gemm = gemm_rate(args.threads, args.repeats)
        lines.append(
            f"# Convolution layers, GFLOP/s (fastest of {args.repeats} calls), float32, "
            f"batch {args.batch}, {args.threads} threads"
        )
        lines.append("")
        lines.append(
            f"`python bench/bench_conv.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
            f" at git {rev}, {platform.processor() or platform.machine()} "
            f"({', '.join(vector_flags()) or 'no AVX'}); numpy float32 GEMM 1024^3 on "
            f"the same threads: {gemm:.0f} GFLOP/s. Tiles: the register tile the forward "
            "and weight gradient ran on, and how the input gradient was computed."
        )
        lines.append("")
        lines.append(
            "| network | layer | C -> F, H, k, stride | tiles | forward | weight grad | "
            "input grad |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|")
        for net, name, c, f, h, k, s, p in LAYERS:
            if net not in args.networks:
                continue
            r = layer_rates(c, f, h, k, s, p, args.batch, args.repeats)
            cells = " | ".join(
                f"{r[key]:.0f} ({100 * r[key] / gemm:.0f}%)" if np.isfinite(r[key]) else "-"
                for key in ("forward", "weight grad", "input grad")
            )
            lines.append(
                f"| {net} | {name} | {c} -> {f}, {h}, {k}x{k}, {s} | "
                f"{tiles(c, f, k, s, p)} | {cells} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
