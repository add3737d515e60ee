"""Depthwise convolutions (``Conv2D(C, C, 3, groups=C)``, MobileNet's), forward and backward,
fastcnn against PyTorch's (optional: skipped without it) on the same threads.

    python bench/bench_depthwise.py [--threads 2] [--batch 64] [--repeats 30]

Medians of ``--repeats`` calls, in milliseconds; PyTorch channels-last (its fastest layout here)
with its backward timed as forward + backward minus the forward.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastcnn import functional as F  # noqa: E402
from fastcnn.threads import compute_threads  # noqa: E402

#: (channels, size, stride): MobileNet-style depthwise layers at CIFAR/MNIST sizes
SHAPES = [(32, 28, 1), (64, 28, 2), (128, 14, 1), (256, 7, 1)]


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"batch {args.batch}, {args.threads} threads; ms (median of {args.repeats})")
    print("| channels | size | stride | fastcnn forward | backward | PyTorch forward | backward |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c, h, s in SHAPES:
        print(row(c, h, s, args, torch, rng))


def row(c, h, s, args, torch, rng):
    """The table's row for ``c`` channels at ``h`` x ``h``, stride ``s``."""
    x = rng.standard_normal((args.batch, h, h, c)).astype(np.float32).transpose(0, 3, 1, 2)
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    oh = (h - 1) // s + 1
    dy = rng.standard_normal((args.batch, oh, oh, c)).astype(np.float32).transpose(0, 3, 1, 2)
    with compute_threads(args.threads):
        fwd = median_ms(lambda: F.conv2d_forward(x, w, None, s, 1, groups=c), args.repeats)
        bwd = median_ms(lambda: F.conv2d_backward(x, w, dy, s, 1, groups=c), args.repeats)
    line = f"| {c} | {h} | {s} | {fwd:.3f} | {bwd:.3f} |"
    if torch is not None:
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        tx = tx.permute(0, 3, 1, 2).requires_grad_()
        tw = torch.from_numpy(w).requires_grad_()
        tdy = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
        tdy = tdy.permute(0, 3, 1, 2)

        def forward():
            return torch.nn.functional.conv2d(tx, tw, None, s, 1, groups=c)

        def both():
            torch.autograd.grad(forward(), (tx, tw), tdy)

        with torch.no_grad():
            tf = median_ms(forward, args.repeats)
        tb = median_ms(both, args.repeats) - tf
        line += f" {tf:.3f} | {tb:.3f} |"
    else:
        line += " - | - |"
    return line


if __name__ == "__main__":
    main()
