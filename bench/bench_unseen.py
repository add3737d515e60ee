#!/usr/bin/env python
"""Networks outside the suite, fastcnn against PyTorch in one process, as a notebook runs them.

    python bench/bench_unseen.py [--networks five mobile stem7] [--batch 64] [--rounds 5]
                                 [--results-dir DIR] [--no-save]

The end-to-end suite (bench_end_to_end.py) measures six networks the kernels were tuned on.
These three were not: filter counts of 24, 48, 96 and 192, 5x5 and 7x7 kernels, depthwise
convolutions, a 64 x 64 input. Each is built in both frameworks with the same weights (the
PyTorch copy's evaluation output is checked against fastcnn's first), then a training step
(zero_grad, forward, cross-entropy, backward, SGD with momentum) and an inference (``model(x)``
in evaluation mode, PyTorch's under ``no_grad``) are timed in alternating blocks in this one
process, both frameworks on their default threads and environment: PyTorch's OpenMP pool and
fastcnn's side by side, as a user comparing them in one notebook has them. Medians of
``--rounds`` blocks; the ratio's range is over the rounds. PyTorch is optional, never a
dependency: without it only fastcnn's images/s are printed.
"""

import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastcnn  # noqa: E402
from fastcnn import layers as L  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_file  # noqa: E402
from e2e_report import git_revision  # noqa: E402

#: name -> (input (C, H, W), layers): ("conv", in, out, k, stride, groups, batch norm, ReLU),
#: ("pool", k, stride) a max pool (padding 1 for k = 3), ("gap",), ("flat",),
#: ("dense", in, out, ReLU). Convolutions are padded k // 2.
NETWORKS = {
    # 5x5 convolutions at 24 and 48 filters, max pools, Dense 1536-128-10 (a LeNet grown up)
    "five": (
        (3, 32, 32),
        [
            ("conv", 3, 24, 5, 1, 1, False, True),
            ("pool", 2, 2),
            ("conv", 24, 48, 5, 1, 1, False, True),
            ("pool", 2, 2),
            ("conv", 48, 96, 3, 1, 1, False, True),
            ("pool", 2, 2),
            ("flat",),
            ("dense", 96 * 16, 128, True),
            ("dense", 128, 10, False),
        ],
    ),
    # MobileNet-style: a 3x3 stem, five depthwise-separable blocks (3x3 depthwise, 1x1
    # pointwise, each with BatchNorm and ReLU) at 24/48/96/192 channels, two of stride 2
    "mobile": (
        (3, 32, 32),
        [("conv", 3, 24, 3, 1, 1, True, True)]
        + [
            layer
            for cin, cout, s in [(24, 48, 1), (48, 96, 2), (96, 96, 1), (96, 192, 2), (192, 192, 1)]
            for layer in (
                ("conv", cin, cin, 3, s, cin, True, True),
                ("conv", cin, cout, 1, 1, 1, True, True),
            )
        ]
        + [("gap",), ("dense", 192, 10, False)],
    ),
    # a 64 x 64 input, a 7x7 stride-2 stem and a 3x3 stride-2 max pool, 3x3 convolutions at
    # 48/96/128 filters, two of stride 2, BatchNorm
    "stem7": (
        (3, 64, 64),
        [
            ("conv", 3, 32, 7, 2, 1, True, True),
            ("pool", 3, 2),
            ("conv", 32, 48, 3, 1, 1, True, True),
            ("conv", 48, 96, 3, 2, 1, True, True),
            ("conv", 96, 96, 3, 1, 1, True, True),
            ("conv", 96, 128, 3, 2, 1, True, True),
            ("gap",),
            ("dense", 128, 10, False),
        ],
    ),
}


def build_fastcnn(layers, seed=0):
    rng = np.random.default_rng(seed)
    mods = []
    for spec in layers:
        kind = spec[0]
        if kind == "conv":
            _, cin, cout, k, s, g, bn, relu = spec
            mods.append(L.Conv2D(cin, cout, k, s, padding=k // 2, bias=not bn, groups=g, rng=rng))
            if bn:
                mods.append(L.BatchNorm2D(cout))
            if relu:
                mods.append(L.ReLU())
        elif kind == "pool":
            mods.append(L.MaxPool2D(spec[1], spec[2], padding=1 if spec[1] == 3 else 0))
        elif kind == "gap":
            mods.append(L.GlobalAvgPool2D())
        elif kind == "flat":
            mods.append(L.Flatten())
        else:
            mods.append(L.Dense(spec[1], spec[2], rng=rng))
            if spec[3]:
                mods.append(L.ReLU())
    return fastcnn.Sequential(*mods)


def build_torch(torch, layers, model):
    """The same network in PyTorch, with ``model``'s weights."""
    nn = torch.nn
    mods = []
    for spec in layers:
        kind = spec[0]
        if kind == "conv":
            _, cin, cout, k, s, g, bn, relu = spec
            mods.append(nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=not bn, groups=g))
            if bn:
                mods.append(nn.BatchNorm2d(cout))
            if relu:
                mods.append(nn.ReLU())
        elif kind == "pool":
            mods.append(nn.MaxPool2d(spec[1], spec[2], padding=1 if spec[1] == 3 else 0))
        elif kind == "gap":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif kind == "flat":
            mods.append(nn.Flatten())
        else:
            mods.append(nn.Linear(spec[1], spec[2]))
            if spec[3]:
                mods.append(nn.ReLU())
    net = nn.Sequential(*mods)
    ours = [m for m in model.modules() if isinstance(m, (L.Conv2D, L.Dense, L.BatchNorm2D))]
    theirs = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            b.weight.copy_(torch.from_numpy(np.asarray(a.weight.data)))
            if a.bias is not None:
                b.bias.copy_(torch.from_numpy(np.asarray(a.bias.data)))
    return net


def timed(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t


def measure(name, batch, rounds, torch):
    shape, layers = NETWORKS[name]
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = (np.arange(batch) % 10).astype(np.int64)
    model = build_fastcnn(layers)
    loss_fn = fastcnn.CrossEntropyLoss()
    opt = fastcnn.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def f_train():
        model.train()
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()

    def f_infer():
        model.eval()
        model(x)

    steps = {"fastcnn train": f_train, "fastcnn infer": f_infer}
    if torch is not None:
        net = build_torch(torch, layers, model)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        model.eval()
        net.eval()
        with torch.no_grad():
            diff = np.abs(net(tx).numpy() - model(x)).max()
        assert diff < 1e-3, f"{name}: the PyTorch copy differs from fastcnn's output by {diff}"
        t_loss = torch.nn.CrossEntropyLoss()
        t_opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def t_train():
            net.train()
            t_opt.zero_grad()
            t_loss(net(tx), ty).backward()
            t_opt.step()

        def t_infer():
            net.eval()
            with torch.no_grad():
                net(tx)

        steps.update({"torch train": t_train, "torch infer": t_infer})
    for fn in steps.values():  # compilation, first allocations
        fn()
        fn()
    calls = {k: max(1, (1024 if "train" in k else 2048) // batch) for k in steps}
    rates = {k: [] for k in steps}
    order = list(steps)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            rates[k].append(batch * calls[k] / timed(steps[k], calls[k]))
    return {k: statistics.median(v) for k, v in rates.items()}, rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=list(NETWORKS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results-dir", default=results_file.RESULTS_DIR)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    saved = None if args.no_save else results_file.start("unseen", args.results_dir)
    rev = git_revision()
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    print("# Networks outside the suite: fastcnn and PyTorch in one process\n")
    print(f"`python bench/bench_unseen.py {cmd}` at git {rev}; batch {args.batch}; images/s,")
    print(f"medians of {args.rounds} alternating blocks; both frameworks on their default threads")
    threads = f"numba threads {numba.get_num_threads()}"
    if torch is not None:
        threads += f", torch {torch.__version__} threads {torch.get_num_threads()}"
    print(f"({threads}).\n")
    print(
        "| network | fastcnn train | torch train | ratio (range) "
        "| fastcnn infer | torch infer | ratio (range) |"
    )
    print("|---|---:|---:|---|---:|---:|---|")
    for name in args.networks:
        med, rates = measure(name, args.batch, args.rounds, torch)
        cells = []
        for mode in ("train", "infer"):
            ours = med[f"fastcnn {mode}"]
            if torch is None:
                cells += [f"{ours:,.0f}", "-", "-"]
                continue
            theirs = med[f"torch {mode}"]
            per = [
                a / b for a, b in zip(rates[f"fastcnn {mode}"], rates[f"torch {mode}"], strict=True)
            ]
            span = f"{ours / theirs:.2f}x ({min(per):.2f}-{max(per):.2f})"
            cells += [f"{ours:,.0f}", f"{theirs:,.0f}", span]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if saved is not None:
        saved.finish()


if __name__ == "__main__":
    main()
