#!/usr/bin/env python
"""End-to-end benchmark: a network of the suite, fastcnn against PyTorch, in one run.

    python bench/bench_end_to_end.py                       # GEMM/kernel table + throughput table
    python bench/bench_end_to_end.py --batches 64 128 --threads 2 --repeats 7
    python bench/bench_end_to_end.py --epoch --startup --memory --profile --interference

What it measures (bench/README.md explains how to read each table):

- throughput: images/s of a training step (zero_grad, forward, loss, backward, optimizer step)
  and of inference (forward in eval mode) of the reference network (or ``--network``: any name of
  ``fastcnn.models.BUILDERS``, on its input shape), for every batch size and thread count asked
  for, fastcnn and PyTorch (when importable: it is optional, never a dependency) on the same
  random batch. For each (threads, batch, mode), blocks of steps of the
  two frameworks alternate ``--repeats`` times (the one that goes first alternates too) after a
  warm-up (compilation excluded); the table shows the median images/s of each and their ratio.
- GEMM and kernels: a float32 numpy matmul measured in this run with the same threads (the
  square one is the machine's "GEMM rate"), and fastcnn's convolution kernels at the reference
  shapes (forward, backward-input, backward-weight) in GFLOP/s and as a % of that rate and of a
  matmul of the same shape as the kernel's im2col product.
- ``--epoch``: one epoch of real MNIST at batch 64 (fastcnn.fit; a plain PyTorch loop starting
  from the same initial weights and the same shuffling), seconds and test accuracy.
- ``--startup``: from launching ``fastcnn train`` (an instrumented equivalent of
  ``python -m fastcnn train --epochs 1 --limit 64 --batch-size 64 --no-progress``) to the end of
  its first batch: with a warm kernel cache, and cold (NUMBA_CACHE_DIR = a fresh empty folder).
- ``--memory``: peak RSS of a process training N steps, fastcnn vs PyTorch, one process each.
- ``--profile``: time in each step's forward and backward (a step: a layer, or a run of layers
  the model's plan fuses), the loss and the optimizer step.
- ``--interference``: each framework alone in its process against both in one process.

How the measurement is kept honest on a small shared machine:

- Isolation: every framework runs in a worker process of its own (``--isolation process``, the
  default) that imports only that framework; the parent sends one block at a time and waits, so
  the frameworks never run at the same time. numba's kernels run on its ``omp`` threading layer
  (the system's libgomp), PyTorch on its own libgomp (torch/lib/libgomp.so.1), the Dense layers on
  numpy's OpenBLAS: one process holding both frameworks has two OpenMP pools and a BLAS pool.
  Measured with ``--interference`` (tuned malloc, see below): both in one process cost each
  framework at most a few % (within the noise); separate processes are kept because they also
  keep each framework's allocator history its own. ``--isolation inprocess`` runs both in one.
- Fresh workers for every (threads, batch): glibc malloc returns large freed blocks to the
  system depending on what the process allocated before (its dynamic mmap threshold), and every
  re-faulted page costs time: ~700-1,600 (fastcnn) and up to ~20,000 (PyTorch) page faults per
  training step, 10-35% of the step, varying from run to run. Each configuration is measured in
  processes that ran only it, as a training run. ``--malloc both`` (the default) measures, in the
  same rounds, workers with glibc as installed ("default malloc") and workers with
  MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set so that freed memory is reused ("tuned
  malloc": no page faults, the frameworks' own speed, reproducible); the tables show the faults.
- Contention: on 2 cores, one other busy process makes a 2-thread OpenMP program (numba's pool
  and PyTorch's alike) 10-20x slower. The CPU that other processes use during each timed block
  is measured (/proc/stat minus the worker's own); a block during which they used more than
  ``--max-other-load`` cores (plus the cores the block leaves idle) is retried after waiting for
  a quiet moment; blocks kept busy after ``--attempts`` are marked ``*``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import results_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROTOCOL = "@@bench "
DEFAULT_BATCHES = [32, 64, 128, 256]
KERNEL_BATCH = 64
# conv layers of the reference network: name -> (C, F, H, W, K) at its input
CONVS = {"conv1 1->32 28x28": (1, 32, 28, 28, 3), "conv2 32->64 13x13": (32, 64, 13, 13, 3)}
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
SQUARE = 1024  # the square GEMM: SQUARE x SQUARE @ SQUARE x SQUARE float32


# =============================================================================================
# helpers shared by both sides
# =============================================================================================

def median(values):
    return statistics.median(values) if values else float("nan")


def conv_gemm_shapes(c, f, h, w, k, n=KERNEL_BATCH):
    """The matmul each conv op amounts to (im2col formulation), (M, K, N) of (MxK) @ (KxN); all
    three have the op's 2*N*OH*OW*F*C*K*K flops."""
    rows = n * (h - k + 1) * (w - k + 1)
    return {
        "forward": (rows, c * k * k, f),            # cols @ W^T
        "backward-input": (rows, f, c * k * k),     # dY @ W, then col2im
        "backward-weight": (f, rows, c * k * k),    # dY^T @ cols
        # the weight gradient as training computes it, below the layer's ReLU + 2x2 max pool:
        # from the pooled gradient (the same product; dY rebuilt, or only its nonzero terms)
        "backward-weight from pool": (f, rows, c * k * k),
    }


def conv_flops(c, f, h, w, k, n=KERNEL_BATCH):
    return 2 * n * (h - k + 1) * (w - k + 1) * f * c * k * k


DATA = {"kind": "random", "network": "reference"}  # set in a worker from --data, --network
MNIST_SHAPE = (1, 28, 28)
# --network's choices and each one's (C, H, W) input: fastcnn.models.BUILDERS and INPUT_SHAPES
# (tests/test_models.py checks they agree; the parent process never imports fastcnn or numba)
NETWORKS = {"reference": MNIST_SHAPE, "lenet5": MNIST_SHAPE, "resnet8": MNIST_SHAPE,
            "resnet20": MNIST_SHAPE, "vgg": (3, 32, 32), "allconv": (3, 32, 32)}


def input_shape():
    """The (C, H, W) input of the benchmark's network."""
    return NETWORKS[DATA["network"]]


def random_batch(batch, shape=MNIST_SHAPE, seed=1234):
    """The benchmark's input batch: float32 (batch, *shape) and int64 labels; standard normal
    values (``--data random``) or the first ``batch`` MNIST training images (``--data mnist``,
    for networks of MNIST's (1, 28, 28) input only)."""
    import numpy as np

    if DATA["kind"] == "mnist":
        if tuple(shape) != MNIST_SHAPE:
            raise ValueError(f"--data mnist: the network {DATA['network']!r} takes {tuple(shape)} "
                             f"inputs, not MNIST's {MNIST_SHAPE}; use --data random")
        import gzip

        folder = os.path.join(data_root(), "mnist")
        with gzip.open(os.path.join(folder, "train-images-idx3-ubyte.gz")) as fh:
            images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        with gzip.open(os.path.join(folder, "train-labels-idx1-ubyte.gz")) as fh:
            labels = np.frombuffer(fh.read(), np.uint8, offset=8)
        reps = -(-batch // images.shape[0])
        x = np.concatenate([images] * reps)[:batch].astype(np.float32) / np.float32(255)
        return np.ascontiguousarray(x), np.concatenate([labels] * reps)[:batch].astype(np.int64)
    rng = np.random.default_rng(seed + batch)
    x = rng.standard_normal((batch,) + tuple(shape), dtype=np.float32)
    y = rng.integers(0, 10, size=batch).astype(np.int64)
    return x, y


def data_root():
    root = os.environ.get("FASTCNN_DATA")
    if root:
        return root
    return os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


# =============================================================================================
# worker side: one process per framework (or both in one for --isolation inprocess)
# =============================================================================================

def _network(fastcnn):
    """The benchmark's network, seed 0 (``models.reference`` by name: a --baseline checkout may
    predate ``models.BUILDERS``)."""
    if DATA["network"] == "reference":
        return fastcnn.models.reference(seed=0)
    return fastcnn.models.BUILDERS[DATA["network"]](input_shape()[0], 10, 0)


class FastcnnRunner:
    name = "fastcnn"

    def __init__(self, repo=REPO):
        sys.path.insert(0, repo)
        import fastcnn
        from fastcnn.threads import compute_threads

        self.fastcnn = fastcnn
        self.compute_threads = compute_threads
        self.model = _network(fastcnn)
        self.input_shape = input_shape()
        self.loss_fn = fastcnn.CrossEntropyLoss()
        self.opt = fastcnn.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.data = {}

    def batch(self, b):
        if b not in self.data:
            self.data[b] = random_batch(b, self.input_shape)
        return self.data[b]

    def block(self, mode, batch, threads, steps):
        import time as _t

        x, y = self.batch(batch)
        model, loss_fn, opt = self.model, self.loss_fn, self.opt
        loss = float("nan")
        with self.compute_threads(threads):  # entered once per block, as fit() does per run
            if mode == "train":
                model.train()
                t0 = _t.perf_counter()
                for _ in range(steps):
                    opt.zero_grad()
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    model.backward(loss_fn.backward(), input_grad=False)  # as fit does
                    opt.step()
                seconds = _t.perf_counter() - t0
            else:
                t0 = _t.perf_counter()
                for _ in range(steps):
                    model.predict(x, batch_size=batch)
                seconds = _t.perf_counter() - t0
        return seconds, float(loss)

    def save_init(self, path):
        import numpy as np

        np.savez(path, **_network(self.fastcnn).state_dict())

    def load_init(self, model, path):
        import numpy as np

        with np.load(path) as f:
            model.load_state_dict({k: f[k] for k in f.files})

    # -- GEMM and kernels ------------------------------------------------------------------
    def gemm(self, threads, calls):
        """Seconds per float32 numpy matmul at each shape, the BLAS at ``threads`` threads."""
        import numpy as np
        from fastcnn.threads import blas_limits

        shapes = {"square": (SQUARE, SQUARE, SQUARE)}
        for layer, dims in CONVS.items():
            for op, mkn in conv_gemm_shapes(*dims).items():
                shapes[f"{layer} {op}"] = mkn
        rng = np.random.default_rng(0)
        out = {}
        with blas_limits(threads):
            for name, (m, k, n) in shapes.items():
                a = rng.standard_normal((m, k), dtype=np.float32)
                b = rng.standard_normal((k, n), dtype=np.float32)
                c = np.empty((m, n), np.float32)
                for _ in range(2):
                    np.matmul(a, b, out=c)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    np.matmul(a, b, out=c)
                    times.append(time.perf_counter() - t0)
                out[name] = median(times)
        if threads > 1:
            time.sleep(0.3)  # let OpenBLAS's workers stop spinning before the next block
        return out

    def kernels(self, threads, calls):
        """Seconds per call of fastcnn's conv kernels at the reference shapes (batch 64)."""
        import numpy as np
        from fastcnn.kernels import conv2d as kconv
        from fastcnn.kernels import fused as kfused
        from fastcnn.kernels import pool2d as kpool

        out = {}
        with self.compute_threads(threads):
            for layer, (c, f, h, w, k) in CONVS.items():
                x, weight, bias, dy = _conv_data(c, f, h, w, k)
                # the kernels' layout: channels-last, as a network's activations are
                x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
                dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
                y = np.empty_like(dy)
                dx = np.empty_like(x)
                dweight, dbias = np.empty_like(weight), np.empty_like(bias)
                # a 2x2 max pool of relu(conv) (its argmax and output) and a pooled gradient
                n, oh, ow = dy.shape[:3]
                kconv.conv2d_forward(x, weight, bias, 1, 1, 0, 0, 1, 1, True, y)
                pooled = np.empty((n, oh // 2, ow // 2, f), np.float32)
                argmax = np.empty(pooled.shape, np.int64)
                kpool.maxpool2d_forward(y, 2, 2, 2, 2, 0, 0, pooled, argmax)
                gp = np.ascontiguousarray(dy[:, : oh // 2, : ow // 2])
                # the kernel functional.max_pool2d_conv2d_backward picks (1 channel: dense)
                from_pool = (kfused.maxpool2d_conv2d_backward_weight if c % 32 == 0
                             else kfused.maxpool2d_conv2d_backward_weight_dense)
                fns = {
                    "forward": lambda: kconv.conv2d_forward(x, weight, bias, 1, 1, 0, 0, 1, 1, False, y),
                    "backward-input": lambda: kconv.conv2d_backward_input(dy, weight, 1, 1, 0, 0, 1, 1, dx),
                    "backward-weight": lambda: kconv.conv2d_backward_weight(
                        x, dy, 1, 1, 0, 0, 1, 1, dweight, dbias),
                    "backward-weight from pool": lambda: from_pool(
                        x, gp, argmax, pooled, True, 2, 2, oh, ow, 1, 1, 0, 0, 1, 1, dweight,
                        dbias),
                }
                for op, fn in fns.items():
                    out[f"{layer} {op}"] = _time_calls(fn, calls)
        return out

    # -- epoch -----------------------------------------------------------------------------
    def epoch(self, threads, batch, folder, init_path):
        import numpy as np

        fc = self.fastcnn
        (x, y), (xt, yt) = fc.datasets.mnist(root=data_root(), download=False)
        for name, arr in (("x", x), ("y", y), ("xt", xt), ("yt", yt)):
            np.save(os.path.join(folder, f"mnist_{name}.npy"), arr)
        # warm-up (compilation excluded): two steps of a throwaway model
        warm = fc.models.reference(seed=1)
        fc.fit(warm, fc.CrossEntropyLoss(), fc.SGD(warm.parameters(), lr=0.01, momentum=0.9),
               x[: 2 * batch], y[: 2 * batch], epochs=1, batch_size=batch, progress=False,
               threads=threads)
        model = fc.models.reference(seed=0)
        np.savez(init_path, **model.state_dict())
        opt = fc.SGD(model.parameters(), lr=0.01, momentum=0.9)
        history = fc.fit(model, fc.CrossEntropyLoss(), opt, x, y, epochs=1, batch_size=batch,
                         progress=False, threads=threads, seed=0)
        t0 = time.perf_counter()
        test_loss, test_acc = fc.evaluate(model, xt, yt, batch_size=256, threads=threads)
        return {"seconds": history.seconds[0], "train_loss": history.train_loss[0],
                "test_accuracy": test_acc, "test_seconds": time.perf_counter() - t0,
                "images": int(x.shape[0])}

    # -- per-layer profile -----------------------------------------------------------------
    def profile(self, threads, batch, steps):
        """Median ms of each layer's forward and backward, the loss, zero_grad and the step."""
        import resource

        fc = self.fastcnn
        x, y = self.batch(batch)
        model = fc.models.reference(seed=0)
        loss_fn = fc.CrossEntropyLoss()
        opt = fc.SGD(model.parameters(), lr=0.01, momentum=0.9)
        # The steps of the model's fusion plan (fastcnn/plan.py), named by the layers they run:
        # "0-2 Conv2D+ReLU+MaxPool2D" for a fused step, "6 Flatten" for one layer.
        model(x[:1])
        steps, rows, first = model._plan(), [], 0
        for st in steps:
            span = f"{first}-{first + len(st.modules) - 1}" if len(st.modules) > 1 else f"{first}"
            rows.append(f"{span} {'+'.join(type(m).__name__ for m in st.modules)}")
            first += len(st.modules)
        times, faults = {}, {}

        def timed(key, fn):
            def wrapper(*args, **kwargs):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                times.setdefault(key, []).append(time.perf_counter() - t0)
                faults.setdefault(key, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                return result
            return wrapper

        def step():
            opt.zero_grad()
            logits = model(x)
            loss_fn(logits, y)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()

        zero_grad = timed(("optimizer", "zero_grad"), opt.zero_grad)
        loss_fw = timed(("loss", "forward"), loss_fn.__call__)
        loss_bw = timed(("loss", "backward"), loss_fn.backward)
        opt_step = timed(("optimizer", "step"), opt.step)

        def instrument(on):
            for row, st in zip(rows, steps):
                for method in ("forward", "backward"):
                    if on:
                        bound = getattr(type(st), method).__get__(st)
                        setattr(st, method, timed((row, method), bound))
                    else:  # back to the class's methods
                        st.__dict__.pop(method, None)

        with self.compute_threads(threads):
            model.train()
            for _ in range(10):  # the allocator settles over the first steps
                step()
            plain, total, gap = [], [], []  # plain (uninstrumented) and instrumented steps alternate
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                plain.append(time.perf_counter() - t0)
                instrument(True)
                mark = {k: len(v) for k, v in times.items()}
                t0 = time.perf_counter()
                zero_grad()
                logits = model(x)
                loss_fw(logits, y)
                model.backward(loss_bw(), input_grad=False)
                opt_step()
                total.append(time.perf_counter() - t0)
                instrument(False)
                parts = sum(sum(v[mark.get(k, 0):]) for k, v in times.items())
                gap.append(total[-1] - parts)
        out = {f"{k[0]}|{k[1]}": median(v) for k, v in times.items()}
        out.update({f"faults|{k[0]}|{k[1]}": sum(v) / len(v) for k, v in faults.items()})  # mean: they come in bursts
        out["step|instrumented"] = median(total)
        out["step|plain"] = median(plain)
        out["step|between"] = median(gap)
        return out


class TorchRunner:
    name = "torch"

    def __init__(self, init_path=None):
        import torch
        from torch import nn

        self.torch = torch
        self.default_threads = torch.get_num_threads()
        torch.manual_seed(0)
        self.input_shape = input_shape()
        if DATA["network"] != "reference":  # fastcnn's network, copied (weights included)
            sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
            import fastcnn
            from torch_twin import twin

            self.model = twin(_network(fastcnn), torch).float()
            init_path = None
        else:
            self.model = nn.Sequential(
                nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(1600, 128), nn.ReLU(),
                nn.Linear(128, 10),
            )
        if init_path:
            self.load_init(self.model, init_path)
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.data = {}

    def load_init(self, model, path):
        """fastcnn's initial weights: its state-dict keys ("0.weight", "7.bias", ...) are the
        same as nn.Sequential's for this network."""
        import numpy as np

        if DATA["network"] != "reference":
            return  # the twin was built from the same weights

        with np.load(path) as saved:
            state = {k: self.torch.from_numpy(saved[k].copy()) for k in saved.files}
        model.load_state_dict(state)

    def batch(self, b):
        if b not in self.data:
            x, y = random_batch(b, self.input_shape)
            self.data[b] = (self.torch.from_numpy(x), self.torch.from_numpy(y))
        return self.data[b]

    def block(self, mode, batch, threads, steps):
        import time as _t

        torch = self.torch
        torch.set_num_threads(threads)
        x, y = self.batch(batch)
        model, loss_fn, opt = self.model, self.loss_fn, self.opt
        loss = float("nan")
        if mode == "train":
            model.train()
            t0 = _t.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                out = model(x)
                lt = loss_fn(out, y)
                lt.backward()
                opt.step()
            seconds = _t.perf_counter() - t0
            loss = lt.item()
        else:
            model.eval()
            with torch.inference_mode():
                t0 = _t.perf_counter()
                for _ in range(steps):
                    model(x)
                seconds = _t.perf_counter() - t0
        return seconds, loss

    def kernels(self, threads, calls):
        torch = self.torch
        torch.set_num_threads(threads)
        out = {}
        with torch.no_grad():
            for layer, (c, f, h, w, k) in CONVS.items():
                x, weight, bias, dy = (torch.from_numpy(a) for a in _conv_data(c, f, h, w, k))
                fns = {
                    "forward": lambda: torch.nn.functional.conv2d(x, weight, bias),
                    "backward-input": lambda: torch.nn.grad.conv2d_input(x.shape, weight, dy),
                    "backward-weight": lambda: torch.nn.grad.conv2d_weight(x, weight.shape, dy),
                }
                for op, fn in fns.items():
                    out[f"{layer} {op}"] = _time_calls(fn, calls)
        return out

    def epoch(self, threads, batch, folder, init_path):
        import numpy as np

        torch = self.torch
        torch.set_num_threads(threads)
        load = lambda name: torch.from_numpy(np.load(os.path.join(folder, f"mnist_{name}.npy")))  # noqa: E731
        x, y, xt, yt = load("x"), load("y"), load("xt"), load("yt")
        n = x.shape[0]
        # warm-up (excluded): two steps of a throwaway model
        warm = TorchRunner()
        warm.block("train", batch, threads, 2)
        model = TorchRunner(init_path)  # fastcnn's initial weights
        net, loss_fn, opt = model.model, model.loss_fn, model.opt
        order = torch.from_numpy(np.random.default_rng(0).permutation(n))  # = fit(seed=0)'s 1st epoch
        net.train()
        loss_sum = 0.0
        t0 = time.perf_counter()
        for b in range(-(-n // batch)):
            idx = order[b * batch:(b + 1) * batch]
            xb, yb = x[idx], y[idx]
            opt.zero_grad()
            lt = loss_fn(net(xb), yb)
            lt.backward()
            opt.step()
            loss_sum += lt.item() * idx.shape[0]
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        net.eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, xt.shape[0], 256):
                correct += int((net(xt[i:i + 256]).argmax(1) == yt[i:i + 256]).sum())
        return {"seconds": seconds, "train_loss": loss_sum / n, "test_accuracy": correct / xt.shape[0],
                "test_seconds": time.perf_counter() - t1, "images": int(n)}

    def profile(self, threads, batch, steps):
        """PyTorch's own profiler over ``steps`` training steps: self CPU ms per step of each
        aten op (module hooks would distort the backward), plus the step time without it."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(threads)
        x, y = self.batch(batch)
        net = TorchRunner().model
        loss_fn = torch.nn.CrossEntropyLoss()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        net.train()

        def step():
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        plain = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        return {"step_seconds": median(plain),
                "ops": [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count / steps) for e in ops[:14]]}


def _conv_data(c, f, h, w, k, n=KERNEL_BATCH):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((f, c, k, k), dtype=np.float32) * np.float32(0.1)
    bias = rng.standard_normal(f, dtype=np.float32)
    dy = rng.standard_normal((n, f, h - k + 1, w - k + 1), dtype=np.float32)
    return x, weight, bias, dy


def _time_calls(fn, calls):
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def worker_info(runners):
    info = {"pid": os.getpid()}
    try:
        import threadpoolctl

        info["threadpools"] = [
            {k: d.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads",
                                   "threading_layer", "filepath")}
            for d in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    if "fastcnn" in runners or isinstance(runners.get("torch"), FastcnnRunner):
        import numba

        try:
            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:
            info["numba_threading_layer"] = "(no parallel kernel has run)"
        info["numba_num_threads"] = int(numba.config.NUMBA_NUM_THREADS)
    if isinstance(runners.get("torch"), TorchRunner):
        torch = runners["torch"].torch
        info["torch_num_threads"] = runners["torch"].default_threads
        info["torch_parallel"] = [line.strip() for line in torch.__config__.parallel_info().splitlines()
                                  if "backend" in line or "Library" in line or "MKL-DNN" in line]
    return info


def worker_main(kind, data="random", network="reference"):
    import resource

    DATA["kind"], DATA["network"] = data, network
    # The protocol gets its own copy of stdout; anything else printed (by a library too) goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    t0 = time.perf_counter()
    runners = {}
    if kind == "baseline":  # --baseline: fastcnn from another checkout, in the peer's place
        runners["torch"] = FastcnnRunner(os.environ["BENCH_BASELINE"])
    for name in ("fastcnn", "torch") if kind == "mixed" else (kind,) if kind != "baseline" else ():
        runners[name] = FastcnnRunner() if name == "fastcnn" else TorchRunner()
    ready = {"import_seconds": time.perf_counter() - t0}
    # first steps: compilation (or cache load) and one-time set-up, reported, never timed
    for name, runner in runners.items():
        t1 = time.perf_counter()
        runner.block("train", 32, 1, 1)
        runner.block("infer", 32, 1, 1)
        ready[f"{name}_first_steps_seconds"] = time.perf_counter() - t1
    proto.write(PROTOCOL + json.dumps(ready) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            if op == "exit":
                break
            if op == "init":
                runners["torch"].load_init(runners["torch"].model, req["path"])
                result = {}
            elif op == "save_init":
                runners["fastcnn"].save_init(req["path"])
                result = {}
            elif op == "info":
                result = worker_info(runners)
            elif op == "block":
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds, loss = runners[req["fw"]].block(req["mode"], req["batch"], req["threads"], req["steps"])
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                result = {"seconds": seconds, "loss": loss, "faults_per_step": faults / req["steps"]}
            elif op == "gemm":
                result = runners["fastcnn"].gemm(req["threads"], req["calls"])
            elif op == "kernels":
                result = runners[req["fw"]].kernels(req["threads"], req["calls"])
            elif op == "epoch":
                result = runners[req["fw"]].epoch(req["threads"], req["batch"], req["folder"], req["init"])
            elif op == "profile":
                result = runners[req["fw"]].profile(req["threads"], req["batch"], req["steps"])
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception:  # reported to the parent, which stops
            result = {"error": traceback.format_exc()}
        proto.write(PROTOCOL + json.dumps(result) + "\n")


# =============================================================================================
# parent side
# =============================================================================================

# -- contention: CPU used by other processes while a block runs --------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_busy_ticks():
    """CPU ticks spent busy (user, nice, system, irq, softirq, steal) by the whole machine."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return None
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def process_ticks(pid):
    """user + system CPU ticks of process ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


class Contention:
    """Measures the CPU the rest of the machine uses during a timed call, and retries calls made
    while other processes were busy: on 2 cores, one other busy process makes a 2-thread OpenMP
    program (numba's pool and PyTorch's alike) 10-20x slower, because every parallel region waits
    at its barrier for a thread that is not running."""

    def __init__(self, threshold, attempts, quiet_timeout):
        self.threshold = threshold
        self.attempts = max(1, attempts)
        self.quiet_timeout = quiet_timeout
        self.enabled = machine_busy_ticks() is not None
        self.calls = self.retried = self.kept_busy = 0

    def other_load(self, pids, fn):
        """Run fn(); return (its result, wall seconds, cores used by processes other than pids)."""
        b0 = machine_busy_ticks()
        p0 = [process_ticks(p) for p in pids]
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        b1 = machine_busy_ticks()
        p1 = [process_ticks(p) for p in pids]
        if b0 is None or None in p0 or None in p1:
            return result, wall, float("nan")
        ours = sum(b - a for a, b in zip(p0, p1))
        return result, wall, max(0.0, (b1 - b0 - ours) / CLK_TCK / max(wall, 1e-9))

    def wait_quiet(self):
        """Wait (up to quiet_timeout s) for a 0.25 s window in which the machine is idle."""
        deadline = time.monotonic() + self.quiet_timeout
        while time.monotonic() < deadline:
            b0 = machine_busy_ticks()
            time.sleep(0.25)
            if (machine_busy_ticks() - b0) / CLK_TCK / 0.25 < self.threshold:
                return True
        return False

    def limit(self, threads=None):
        """Other load allowed during a block on ``threads`` threads: the threshold plus the cores the
        block leaves idle (a 1-thread block on 2 cores tolerates one other busy core)."""
        if threads is None:
            return self.threshold
        return self.threshold + max(0, CPUS - threads)

    def run(self, pids, fn, threads=None):
        """fn() retried while other processes used more than ``limit(threads)`` cores during it;
        returns (result, other load of the attempt kept)."""
        self.calls += 1
        for attempt in range(self.attempts):
            result, _, load = self.other_load(pids, fn)
            if not self.enabled or not load > self.limit(threads):
                return result, load
            if attempt + 1 < self.attempts:
                self.retried += 1
                self.wait_quiet()
        self.kept_busy += 1
        return result, load

    def summary(self):
        if not self.enabled:
            return "contention monitor: /proc/stat not readable, no check"
        return (f"contention monitor: {self.calls} timed calls, {self.retried} retried because other "
                f"processes used > {self.threshold} cores (+ the cores a block leaves idle) during them, "
                f"{self.kept_busy} kept although "
                f"busy after {self.attempts} attempts (marked *)")


CONTENTION = Contention(0.25, 3, 10.0)
# What the fastcnn column is compared with: PyTorch, or (--baseline PATH) fastcnn from another
# checkout, in the same worker slot, for an interleaved A/B of two commits.
PEER = {"name": "torch", "baseline": None}


class Worker:
    """A worker process holding one framework (or both: kind "mixed")."""

    def __init__(self, kind, env=None):
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind, DATA["kind"],
             DATA["network"]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            env=env if env is not None else os.environ.copy())
        self.ready = self._read()

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.kind} worker exited (status {self.proc.wait()})")
            if line.startswith(PROTOCOL):
                reply = json.loads(line[len(PROTOCOL):])
                if "error" in reply:
                    raise RuntimeError(f"the {self.kind} worker failed:\n{reply['error']}")
                return reply

    def call(self, op, **kwargs):
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def timed(self, op, **kwargs):
        """call() under the contention monitor: returns (reply, other processes' load in cores)."""
        return CONTENTION.run([self.proc.pid], lambda: self.call(op, **kwargs), kwargs.get("threads"))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(timeout=30)


def torch_available():
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def package_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model():
    model, flags = results_file.cpu_description()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni") if f in flags]
    return f"{model} ({', '.join(simd) or 'no AVX2'})"


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastcnn", "kernels"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (fastcnn/ or kernels/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg():
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def print_header(args, argv):
    print("# fastcnn end-to-end benchmark")
    print()
    print("command: " + " ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO)] + argv))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}   repo: {REPO} @ {git_revision()}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu_model()}, {cpus} CPUs usable, load average {loadavg()} (1/5/15 min)")
    versions = {n: package_version(n) for n in ("numba", "llvmlite", "numpy", "torch", "threadpoolctl")}
    print(f"python {platform.python_version()}; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMBA_", "FASTCNN_", "MALLOC_"))}
    print("environment: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "(no thread or numba variables)"))
    print(f"threads: {args.threads}; batches: {args.batches}; repeats: {args.repeats}; "
          f"data: {args.data}; isolation: {args.isolation}; malloc: {args.malloc}"
          + (" (tuned = " + ", ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items()) + ")"
             if args.malloc != "default" else ""))


def describe_workers(workers):
    if getattr(describe_workers, "done", False):
        return
    describe_workers.done = True
    print()
    print("## Workers")
    print()
    seen = set()
    for w in workers:
        if id(w) in seen:
            continue
        seen.add(id(w))
        info = w.call("info")
        ready = ", ".join(f"{k.replace('_seconds', '')} {v:.2f} s" for k, v in w.ready.items())
        print(f"- {w.kind} worker (pid {info['pid']}): {ready} (not timed)")
        if "numba_threading_layer" in info:
            print(f"  numba threading layer: {info['numba_threading_layer']}, "
                  f"NUMBA_NUM_THREADS {info['numba_num_threads']}")
        if "torch_num_threads" in info:
            print(f"  torch threads at import {info['torch_num_threads']}; " + "; ".join(info["torch_parallel"]))
        for pool in info.get("threadpools", []):
            extra = f", {pool['threading_layer']}" if pool.get("threading_layer") else ""
            print(f"  pool (threads now): {pool['user_api']}/{pool['internal_api']} {pool['version'] or ''} "
                  f"{pool['num_threads']} threads{extra}: {pool['filepath']}")


def auto_steps(args, mode, batch):
    if args.steps:
        return args.steps
    images = 1024 if mode == "train" else 2048
    return max(3, math.ceil(images / batch))


def run_blocks(entries, args, mode, batch, threads):
    """Alternate timed blocks of the entries (label -> (worker, framework)) after one warm-up
    block each; returns (label -> list of images/s, steps per block, losses, other loads). The
    median page faults per step of each entry are left in ``run_blocks.faults`` and, per entry,
    whether each block ran on a busy machine in ``run_blocks.busy``."""
    steps = auto_steps(args, mode, batch)
    labels = list(entries)
    for label in labels:
        worker, fw = entries[label]
        worker.call("block", fw=fw, mode=mode, batch=batch, threads=threads, steps=min(steps, 3))
    rates = {label: [] for label in labels}
    faults = {label: [] for label in labels}
    busy = {label: [] for label in labels}
    losses, loads = [], []
    for r in range(args.repeats):
        if len(labels) > 2:  # rotate, so that each entry follows each other one in turn
            order = labels[r % len(labels):] + labels[:r % len(labels)]
        else:
            order = labels if r % 2 == 0 else labels[::-1]
        for label in order:
            worker, fw = entries[label]
            res, load = worker.timed("block", fw=fw, mode=mode, batch=batch, threads=threads, steps=steps)
            rates[label].append(batch * steps / res["seconds"])
            faults[label].append(res["faults_per_step"])
            busy[label].append(load > CONTENTION.limit(threads))
            losses.append(res["loss"])
            loads.append(load)
    run_blocks.faults = {label: median(v) for label, v in faults.items()}
    run_blocks.busy = busy
    return rates, steps, losses, loads


def ratio_range(rates_a, rates_b, busy_a, busy_b):
    """min-max of the ratios of the blocks measured in the same round, leaving out rounds in which
    either block ran on a busy machine (then marked ')."""
    pairs = [a / b for a, b, x, y in zip(rates_a, rates_b, busy_a, busy_b) if not (x or y)]
    left_out = len(rates_a) - len(pairs)
    if not pairs:
        return "-"
    return f"{min(pairs):.2f}-{max(pairs):.2f}" + (f" ({left_out} busy round left out)" if left_out else "")


def fmt_faults(faults):
    return ", ".join(f"{v:.0f}" for v in faults.values())


def fmt_load(loads, threads=None):
    limit = CONTENTION.limit(threads)
    busy = [v for v in loads if v > limit]
    return f"{max(loads):.2f}" + ("*" if busy else "") if loads else "-"


def fmt_rate(v):
    return f"{v:,.0f}" if v == v else "-"


def start_workers(args, env, with_torch, init):
    """Worker processes for fastcnn and PyTorch (or one for both, --isolation inprocess), with
    the same initial weights (written to ``init`` by fastcnn)."""
    workers = {}
    if PEER["baseline"]:
        workers["fastcnn"] = Worker("fastcnn", env)
        workers["torch"] = Worker("baseline", dict(env, BENCH_BASELINE=PEER["baseline"]))
    elif args.isolation == "process" or not with_torch:
        workers["fastcnn"] = Worker("fastcnn", env)
        if with_torch:
            workers["torch"] = Worker("torch", env)
    else:
        workers["fastcnn"] = workers["torch"] = Worker("mixed", env)
    if with_torch:
        if not os.path.exists(init):
            workers["fastcnn"].call("save_init", path=init)
        workers["torch"].call("init", path=init)
    describe_workers(list(workers.values()))
    return workers


def close_workers(workers):
    for w in {id(w): w for w in workers.values()}.values():
        w.close()


def malloc_envs(args, env):
    """{label: environment} of the malloc settings asked for (--malloc)."""
    tuned = dict(env, **TUNED_MALLOC)
    return {"default": {"default malloc": env}, "tuned": {"tuned malloc": tuned},
            "both": {"default malloc": env, "tuned malloc": tuned}}[args.malloc]


def throughput_table(args, env, with_torch, init):
    """Fresh workers for every (threads, batch): glibc malloc's state (its dynamic mmap threshold)
    depends on what a process allocated before and decides how many page faults a step takes, so
    each configuration is measured in processes that have run only it, as a training run would.
    With --malloc both, the default-malloc and tuned-malloc workers alternate in the same rounds."""
    fws = ["fastcnn"] + (["torch"] if with_torch else [])
    envs = malloc_envs(args, env)
    print()
    print("## Throughput (images/s, median of {} alternating blocks per framework)".format(args.repeats))
    print()
    results = {label: [] for label in envs}
    for threads in args.threads:
        for batch in args.batches:
            workers = {label: start_workers(args, e, with_torch, init) for label, e in envs.items()}
            try:
                for mode in args.modes:
                    entries = {(label, fw): (workers[label][fw], fw) for label in envs for fw in fws}
                    rates, steps, losses, loads = run_blocks(entries, args, mode, batch, threads)
                    for label in envs:
                        f = median(rates[(label, "fastcnn")])
                        t = median(rates[(label, "torch")]) if with_torch else float("nan")
                        ratio = f / t if t == t else float("nan")
                        if with_torch:
                            spread = ratio_range(rates[(label, "fastcnn")], rates[(label, "torch")],
                                                 run_blocks.busy[(label, "fastcnn")], run_blocks.busy[(label, "torch")])
                        else:
                            spread = "-"
                        bad = [v for v in losses if mode == "train" and not math.isfinite(v)]
                        note = " (non-finite loss!)" if bad else ""
                        faults = ", ".join(f"{run_blocks.faults[(label, fw)]:.0f}" for fw in fws)
                        results[label].append({
                            "threads": threads, "batch": batch, "mode": mode, "fastcnn": f, "torch": t,
                            "ratio": ratio, "steps": steps, "spread": spread + note, "faults": faults,
                            "load": fmt_load(loads, threads), "malloc": label})
                        print(f"  measured ({label}): {threads} thread(s), batch {batch}, {mode}: "
                              f"fastcnn {f:,.0f}, torch {t:,.0f} img/s, {ratio:.2f}x", file=sys.stderr, flush=True)
            finally:
                for w in workers.values():
                    close_workers(w)
    for label, rows in results.items():
        print()
        if label == "tuned malloc":
            print("Tuned malloc (" + ", ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
                  + " in both workers: freed activations are reused, no page faults; the frameworks' compute):")
        else:
            print("Default malloc (glibc as installed, what a user gets; page faults per step depend on "
                  "the allocation history and vary between runs, PyTorch's most):")
        print()
        peer = PEER["name"]
        print(f"| threads | batch | mode | steps/block | fastcnn img/s | {peer} img/s | ratio | ratio range | "
              f"page faults/step fastcnn, {peer} | other load |")
        print("|---:|---:|---|---:|---:|---:|---:|---|---|---:|")
        for r in rows:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] == r["ratio"] else "-"
            print(f"| {r['threads']} | {r['batch']} | {r['mode']} | {r['steps']} | {fmt_rate(r['fastcnn'])} | "
                  f"{fmt_rate(r['torch'])} | {ratio} | {r['spread']} | {r['faults']} | {r['load']} |")
    sys.stdout.flush()
    return [r for rows in results.values() for r in rows]


def kernel_tables(args, workers):
    calls = args.kernel_calls
    print()
    print("## GEMM rate and conv kernels (float32, batch {}, median of {} calls, {} rounds "
          "interleaved)".format(KERNEL_BATCH, calls, args.kernel_repeats))
    rows = {}
    for threads in args.threads:
        gemm, kern, tkern = [], [], []
        for _ in range(args.kernel_repeats):
            gemm.append(workers["fastcnn"].timed("gemm", threads=threads, calls=calls)[0])
            kern.append(workers["fastcnn"].timed("kernels", fw="fastcnn", threads=threads, calls=calls)[0])
            if "torch" in workers:
                tkern.append(workers["torch"].timed("kernels", fw="torch", threads=threads, calls=calls)[0])
        g = {k: median([d[k] for d in gemm]) for k in gemm[0]}
        kf = {k: median([d[k] for d in kern]) for k in kern[0]}
        kt = {k: median([d[k] for d in tkern]) for k in tkern[0]} if tkern else {}
        square_flops = 2 * SQUARE ** 3
        peak = square_flops / g["square"] / 1e9
        print()
        print(f"{threads} thread(s): GEMM rate (numpy float32 matmul {SQUARE}x{SQUARE} @ {SQUARE}x{SQUARE}, "
              f"OpenBLAS at {threads} threads): **{peak:.1f} GFLOP/s**")
        print()
        print("| kernel | fastcnn ms | fastcnn GFLOP/s | % of GEMM rate | same-shape GEMM (MxKxN) | "
              "its GFLOP/s | fastcnn % of it | torch ms | fastcnn / torch speed |")
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for layer, dims in CONVS.items():
            flops = conv_flops(*dims)
            for op, (m, k, n) in conv_gemm_shapes(*dims).items():
                key = f"{layer} {op}"
                fg = flops / kf[key] / 1e9
                gg = flops / g[key] / 1e9
                tms = f"{kt[key] * 1e3:.3f}" if key in kt else "-"
                vs = f"{kt[key] / kf[key]:.2f}x" if key in kt else "-"
                print(f"| {key} | {kf[key] * 1e3:.3f} | {fg:.1f} | {100 * fg / peak:.0f}% | {m}x{k}x{n} | "
                      f"{gg:.1f} | {100 * fg / gg:.0f}% | {tms} | {vs} |")
                rows[(threads, key)] = {"ms": kf[key] * 1e3, "gflops": fg, "pct_peak": 100 * fg / peak}
        sys.stdout.flush()
    print()
    print("(conv1 backward-input is not needed in training, the first layer's input needs no "
          "gradient, but fastcnn's Conv2D.backward computes it; PyTorch skips it. 'backward-weight "
          "from pool' is the weight gradient as a training step computes it, from the gradient of "
          "the ReLU + 2x2 max pool after the layer: conv1's rebuilds dY block by block in cache "
          "(kernels.fused.maxpool2d_conv2d_backward_weight_dense), conv2's sums only dY's nonzero "
          "terms (maxpool2d_conv2d_backward_weight); its GFLOP/s count the dense product's flops "
          "(PyTorch has no such kernel: '-').)")
    return rows


def epoch_table(args, workers, tmp):
    print()
    print("## One epoch of MNIST (60,000 training images, batch 64, SGD lr 0.01 momentum 0.9, "
          "same initial weights and shuffling; test accuracy on 10,000)")
    print()
    print(f"data: {data_root()}")
    print()
    print("| threads | framework | epoch s | images/s | train loss | test accuracy | other load |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    init = os.path.join(tmp, "init.npz")
    out = []
    for threads in args.threads:
        res = {}
        for fw in ["fastcnn"] + (["torch"] if "torch" in workers else []):
            CONTENTION.wait_quiet()
            r, _, load = CONTENTION.other_load(
                [workers[fw].proc.pid], lambda: workers[fw].call("epoch", fw=fw, threads=threads, batch=64,
                                                                 folder=tmp, init=init))
            res[fw] = r
            print(f"| {threads} | {fw} | {r['seconds']:.2f} | {r['images'] / r['seconds']:,.0f} | "
                  f"{r['train_loss']:.4f} | {100 * r['test_accuracy']:.2f}% | {fmt_load([load])} |", flush=True)
        if "torch" in res:
            print(f"| {threads} | ratio | | {res['torch']['seconds'] / res['fastcnn']['seconds']:.2f}x | | | |")
        out.append(res)
    return out


def profile_table(args, workers):
    threads = max(args.threads)
    batch = args.profile_batch
    print()
    print(f"## Per-layer profile of one training step (batch {batch}, {threads} threads, "
          f"median ms over {args.profile_steps} steps)")
    print()
    res = {fw: workers[fw].timed("profile", fw=fw, threads=threads, batch=batch, steps=args.profile_steps)[0]
           for fw in ["fastcnn"] + (["torch"] if "torch" in workers else [])}
    f = res["fastcnn"]
    total = f["step|instrumented"]
    keys = []
    for k in f:
        row = k.split("|")[0]
        if row not in ("step", "optimizer", "faults") and row not in keys:
            keys.append(row)
    print("fastcnn, each step of the model's plan (a layer, or a fused run of layers) timed from outside (page faults: mean minor faults "
          "during the call, i.e. fresh memory touched):")
    print()
    print("| part | forward ms | backward ms | % of step | page faults forward, backward |")
    print("|---|---:|---:|---:|---|")
    for row in keys:
        fw_ = f.get(f"{row}|forward", 0.0)
        bw_ = f.get(f"{row}|backward", 0.0)
        pf = f"{f.get(f'faults|{row}|forward', 0):.0f}, {f.get(f'faults|{row}|backward', 0):.0f}"
        print(f"| {row} | {fw_ * 1e3:.3f} | {bw_ * 1e3:.3f} | {100 * (fw_ + bw_) / total:.1f}% | {pf} |")
    for what in ("zero_grad", "step"):
        v = f.get(f"optimizer|{what}", 0.0)
        print(f"| optimizer {what} | {v * 1e3:.3f} | | {100 * v / total:.1f}% | "
              f"{f.get(f'faults|optimizer|{what}', 0):.0f} |")
    print(f"| Python between the calls | {f['step|between'] * 1e3:.3f} | | "
          f"{100 * f['step|between'] / total:.1f}% | |")
    print()
    print(f"fastcnn step: {f['step|instrumented'] * 1e3:.2f} ms instrumented (the % column is of this), "
          f"{f['step|plain'] * 1e3:.2f} ms uninstrumented (the two kinds of steps alternated).")
    if "torch" in res:
        t = res["torch"]
        print()
        print(f"PyTorch, torch.profiler over {args.profile_steps} steps (step {t['step_seconds'] * 1e3:.2f} ms "
              "without the profiler): the ops with the most self CPU time, per step:")
        print()
        print("| aten op | self CPU ms per step | calls per step |")
        print("|---|---:|---:|")
        for name, sec, count in t["ops"]:
            print(f"| {name} | {sec * 1e3:.3f} | {count:g} |")
    return res


def interference_table(args, env):
    """Each framework alone in its process vs both frameworks in one process (alternating)."""
    label, env = list(malloc_envs(args, env).items())[-1]  # tuned when asked for: no page-fault noise
    print()
    print(f"## Thread-pool interference: alone in a process vs both frameworks in one process ({label})")
    print()
    print("| threads | batch | mode | fastcnn alone | fastcnn + torch in process | ratio | torch alone | "
          "torch + fastcnn in process | ratio | page faults/step (same order) | other load |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    out = []
    for threads in args.threads:
        for batch in args.batches:  # fresh processes per configuration, as in the throughput table
            pure_f, pure_t, mixed = Worker("fastcnn", env), Worker("torch", env), Worker("mixed", env)
            try:
                for mode in args.modes:
                    entries = {"fa": (pure_f, "fastcnn"), "fm": (mixed, "fastcnn"),
                               "ta": (pure_t, "torch"), "tm": (mixed, "torch")}
                    rates, _, _, loads = run_blocks(entries, args, mode, batch, threads)
                    m = {k: median(v) for k, v in rates.items()}
                    print(f"| {threads} | {batch} | {mode} | {fmt_rate(m['fa'])} | {fmt_rate(m['fm'])} | "
                          f"{m['fm'] / m['fa']:.2f} | {fmt_rate(m['ta'])} | {fmt_rate(m['tm'])} | "
                          f"{m['tm'] / m['ta']:.2f} | {fmt_faults(run_blocks.faults)} | {fmt_load(loads, threads)} |",
                          flush=True)
                    out.append(m)
            finally:
                for w in (pure_f, pure_t, mixed):
                    w.close()
    return out


# -- memory ------------------------------------------------------------------------------------

def memory_child(fw, batch, threads, steps):
    """Runs in its own process: train ``steps`` steps, print RSS figures (KiB) as JSON."""
    import resource

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    out = {"start_kib": status("VmRSS")}
    runner = FastcnnRunner() if fw == "fastcnn" else TorchRunner()
    runner.batch(batch)
    out["after_import_kib"] = status("VmRSS")
    runner.block("train", batch, threads, 1)  # loads (or compiles) the kernels, first allocations
    out["after_first_step_kib"] = status("VmRSS")
    try:  # reset the high-water mark (Linux >= 4.0), to see the peak of the steps alone
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    runner.block("train", batch, threads, steps)
    out["steps_peak_kib"] = status("VmHWM") if reset else None
    out["after_training_kib"] = status("VmRSS")
    out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(PROTOCOL + json.dumps(out), flush=True)


def memory_table(args, env):
    threads = max(args.threads)
    steps = args.memory_steps
    print()
    print(f"## Peak memory of a training run ({steps} steps, {threads} threads, one process per run, "
          "MiB; peak RSS = ru_maxrss of the child, min of {} runs; 'peak during the steps' = VmHWM "
          "reset after the first step)".format(args.memory_runs))
    print()
    print("| batch | framework | RSS after import + model + batch | after the first step | peak RSS of the run | "
          "peak during the steps | peak - RSS after import |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    fws = ["fastcnn"] + (["torch"] if torch_available() else [])
    out = {}
    for batch in args.batches:
        for fw in fws:
            runs = []
            for _ in range(args.memory_runs):
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--memory-child", fw, str(batch),
                     str(threads), str(steps)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
                stdout = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = status
                line = next((l for l in stdout.splitlines() if l.startswith(PROTOCOL)), None)
                if status != 0 or line is None:
                    raise RuntimeError(f"memory child {fw} batch {batch} failed (status {status})")
                rep = json.loads(line[len(PROTOCOL):])
                rep["wait4_kib"] = usage.ru_maxrss
                runs.append(rep)
            best = min(runs, key=lambda r: r["wait4_kib"])
            base = best["after_import_kib"]
            mib = lambda k: "-" if k is None else f"{k / 1024:.0f}"  # noqa: E731
            print(f"| {batch} | {fw} | {mib(base)} | {mib(best['after_first_step_kib'])} | "
                  f"**{mib(best['wait4_kib'])}** | {mib(best['steps_peak_kib'])} | "
                  f"{mib(best['wait4_kib'] - base)} |", flush=True)
            out[(batch, fw)] = best
    return out


# -- start-up ----------------------------------------------------------------------------------

STARTUP_CHILD = r"""
import os, sys, time
T0 = float(os.environ["BENCH_T0"])
def mark(what):
    sys.stderr.write("@@mark %s %.4f\n" % (what, time.time() - T0)); sys.stderr.flush()
mark("python")
sys.path.insert(0, os.environ["BENCH_REPO"])
import fastcnn.cli as cli
import fastcnn.optim as optim
mark("import")
_load = cli._load_data
def load(*a, **k):
    r = _load(*a, **k); mark("data"); return r
cli._load_data = load
_step = optim.SGD.step
count = [0]
def step(self):
    _step(self)
    count[0] += 1
    if count[0] == 1:
        mark("first_batch")
optim.SGD.step = step
status = cli.main(sys.argv[1:])
mark("exit")
sys.exit(status)
"""


def startup_args(threads):
    return ["train", "--epochs", "1", "--limit", "64", "--batch-size", "64", "--val-split", "0",
            "--no-progress", "--data-dir", data_root(), "--no-download", "--threads", str(threads)]


def run_startup(env, threads, instrumented=True):
    """One launch of the start-up command; returns the child's marks (seconds since launch), its
    wall time, the numba cache messages and the CPU load of other processes meanwhile."""
    import resource

    env = dict(env)
    env["BENCH_REPO"] = REPO
    if instrumented:
        cmd = [sys.executable, "-c", STARTUP_CHILD] + startup_args(threads)
    else:
        cmd = [sys.executable, "-m", "fastcnn"] + startup_args(threads)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0 = machine_busy_ticks()
    env["BENCH_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    b1 = machine_busy_ticks()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"startup run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    marks = {}
    for line in proc.stderr.splitlines():
        if line.startswith("@@mark "):
            _, what, sec = line.split()
            marks[what] = float(sec)
    child_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    marks["wall"] = wall
    marks["other_load"] = (max(0.0, ((b1 - b0) / CLK_TCK - child_cpu) / wall)
                           if b0 is not None else float("nan"))
    marks["cache_loaded"] = proc.stdout.count("[cache] data loaded from")
    marks["cache_saved"] = proc.stdout.count("[cache] data saved to")
    return marks


def run_startup_quiet(make_env, threads, instrumented=True):
    """run_startup retried (with a fresh environment from make_env()) while the machine was busy."""
    CONTENTION.calls += 1
    for attempt in range(CONTENTION.attempts):
        marks = run_startup(make_env(), threads, instrumented)
        if not marks["other_load"] > CONTENTION.threshold:
            return marks
        if attempt + 1 < CONTENTION.attempts:
            CONTENTION.retried += 1
            CONTENTION.wait_quiet()
    CONTENTION.kept_busy += 1
    return marks


def startup_table(args, env):
    threads = max(args.threads)
    runs = args.startup_runs
    print()
    print("## Start-up: launching `fastcnn train` to its first finished batch")
    print()
    print("command (instrumented equivalent: the same cli.main with timestamps after the imports, "
          "the data and the first optimizer step):")
    print()
    print("    python -m fastcnn " + " ".join(startup_args(threads)))
    print()
    print("| cache | runs | import s | data loaded s | first batch done s | process exit s | "
          "kernels loaded / compiled (numba cache) | other load |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    results = {}
    scratch = tempfile.mkdtemp(prefix="fastcnn-bench-cache-")
    counter = [0]

    def fresh_cache_env():
        counter[0] += 1
        folder = os.path.join(scratch, f"cold{counter[0]}")
        os.makedirs(folder)
        fresh_cache_env.last = folder
        return dict(env, NUMBA_CACHE_DIR=folder, NUMBA_DEBUG_CACHE="1")

    try:
        # the in-tree cache (kernels/__pycache__), as a user of the checkout has it: one run first
        plain = {k: v for k, v in env.items() if k != "NUMBA_CACHE_DIR"}
        run_startup(plain, threads)
        cold, warm, default = ("cold: NUMBA_CACHE_DIR = empty temp dir", "warm: same NUMBA_CACHE_DIR, 2nd run",
                               "warm: default in-tree cache (kernels/__pycache__)")
        # and cold with numba's parallel-loop wrappers compiled as numba does
        # (kernels/_parfor_link_only.py turned off): what that patch saves, side by side
        unpatched = "cold, wrappers compiled (FASTCNN_NUMBA_LINK_ONLY=0)"
        rows = {cold: [], warm: [], default: [], unpatched: []}
        for i in range(runs):  # interleaved: cold, warm (the cold run's folder), in-tree, unpatched
            rows[cold].append(run_startup_quiet(fresh_cache_env, threads))
            folder = fresh_cache_env.last
            rows[warm].append(run_startup_quiet(
                lambda: dict(env, NUMBA_CACHE_DIR=folder, NUMBA_DEBUG_CACHE="1"), threads))
            rows[default].append(run_startup_quiet(lambda: dict(plain, NUMBA_DEBUG_CACHE="1"), threads))
            rows[unpatched].append(run_startup_quiet(
                lambda: dict(fresh_cache_env(), FASTCNN_NUMBA_LINK_ONLY="0"), threads))
        for label, marks in rows.items():
            med = {k: median([m[k] for m in marks if k in m]) for k in ("import", "data", "first_batch", "exit")}
            loaded = sorted({m["cache_loaded"] for m in marks})
            saved = sorted({m["cache_saved"] for m in marks})
            load = fmt_load([m["other_load"] for m in marks])
            print(f"| {label} | {len(marks)} | {med['import']:.2f} | {med['data']:.2f} | "
                  f"**{med['first_batch']:.2f}** | {med['exit']:.2f} | {loaded} / {saved} | {load} |",
                  flush=True)
            results[label] = med
        plain_runs = [run_startup_quiet(lambda: plain, threads, instrumented=False)["wall"] for _ in range(runs)]
        print()
        print(f"`python -m fastcnn {' '.join(startup_args(threads))}` (uninstrumented, warm in-tree "
              f"cache), launch to exit: median {median(plain_runs):.2f} s over {runs} runs.")
        print("Times are from the parent's clock before launching (time.time(), shared with the child). "
              "'kernels loaded / compiled' counts numba's NUMBA_DEBUG_CACHE messages of the main "
              "process per run: a cold run loads only what fastcnn.precompile's helper process "
              "compiled meanwhile (the kernels of its compile_backward).")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# -- targets -----------------------------------------------------------------------------------

def print_targets(throughput, memory, startup):
    print()
    print("## Targets of the performance issue")
    print()
    lines = []
    for r in throughput or []:
        if r["ratio"] != r["ratio"]:
            continue
        if r["mode"] == "train" and r["batch"] in (64, 128):
            need = 2.0 if r["threads"] >= 2 else 1.5
        elif r["mode"] == "infer" and r["batch"] == 128:
            need = 1.5
        else:
            continue
        ok = "met" if r["ratio"] >= need else "NOT met"
        lines.append(f"- {r['mode']} batch {r['batch']}, {r['threads']} thread(s), {r['malloc']}: "
                     f"{r['ratio']:.2f}x PyTorch (target >= {need}x): {ok}")
    for (batch, fw), rep in sorted((memory or {}).items()):
        if fw != "fastcnn" or (batch, "torch") not in memory:
            continue
        f, t = rep["wait4_kib"], memory[(batch, "torch")]["wait4_kib"]
        ok = "met" if f <= t else "NOT met"
        lines.append(f"- peak RSS training batch {batch}: fastcnn {f / 1024:.0f} MiB vs PyTorch {t / 1024:.0f} MiB "
                     f"(target <=): {ok}")
    if startup:
        warm = startup.get("warm: default in-tree cache (kernels/__pycache__)", {}).get("first_batch")
        cold = startup.get("cold: NUMBA_CACHE_DIR = empty temp dir", {}).get("first_batch")
        if warm is not None:
            lines.append(f"- start-up to first batch, warm cache: {warm:.2f} s (target <= 3 s): "
                         f"{'met' if warm <= 3 else 'NOT met'}")
        unpatched = startup.get("cold, wrappers compiled (FASTCNN_NUMBA_LINK_ONLY=0)", {}).get("first_batch")
        if cold is not None:
            lines.append(f"- start-up to first batch, cold compile: {cold:.2f} s (target < 20 s): "
                         f"{'met' if cold < 20 else 'NOT met'}"
                         + (f" ({unpatched:.2f} s with numba's parallel-loop wrappers compiled)"
                            if unpatched is not None else ""))
    print("\n".join(lines) if lines else "(nothing measured that a target applies to)")


# -- main --------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES, help="batch sizes [32 64 128 256]")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts [1 2 (up to the cores)]")
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block [auto: 1024 images per training block, 2048 per inference block]")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per framework and configuration [5]")
    p.add_argument("--data", choices=("random", "mnist"), default="random",
                   help="input batch of the throughput and profile runs: standard normal values [random], or "
                   "the first MNIST training images (real data: PyTorch's max-pool runs faster on it)")
    p.add_argument("--isolation", choices=("process", "inprocess"), default="process",
                   help="each framework in its own worker process [process], or both in one")
    p.add_argument("--max-other-load", type=float, default=0.25,
                   help="retry a timed block if other processes used more than this many cores during it [0.25]")
    p.add_argument("--attempts", type=int, default=3, help="attempts per timed block (see --max-other-load) [3]")
    p.add_argument("--quiet-timeout", type=float, default=10.0,
                   help="seconds to wait for an idle machine before retrying a block [10]")
    p.add_argument("--malloc", choices=("both", "default", "tuned"), default="both",
                   help="throughput with glibc malloc as is ('default'), 'tuned' (MALLOC_MMAP_THRESHOLD_=1 GiB and "
                   "MALLOC_TRIM_THRESHOLD_=4 GiB in the workers: freed activations are reused without page "
                   "faults), or 'both' interleaved [both]; 'tuned' also applies to every other section")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    p.add_argument("--no-kernels", action="store_true", help="skip the GEMM / kernel table")
    p.add_argument("--kernel-calls", type=int, default=20, help="calls per kernel timing [20]")
    p.add_argument("--kernel-repeats", type=int, default=3, help="interleaved rounds of the kernel table [3]")
    p.add_argument("--no-torch", action="store_true", help="fastcnn only, even if PyTorch is importable")
    p.add_argument("--network", default="reference",
                   choices=tuple(NETWORKS),
                   help="the network of the throughput table (fastcnn.models; PyTorch's copy is "
                   "built by tests/torch_twin.py with the same weights) [reference]")
    p.add_argument("--baseline", metavar="PATH",
                   help="compare with fastcnn from the checkout at PATH (e.g. a git worktree of an "
                   "earlier commit) in PyTorch's place: an interleaved A/B of two commits")
    p.add_argument("--epoch", action="store_true", help="one epoch of real MNIST per framework")
    p.add_argument("--startup", action="store_true", help="time to the first finished batch of `fastcnn train`")
    p.add_argument("--startup-runs", type=int, default=3, help="runs per start-up configuration [3]")
    p.add_argument("--memory", action="store_true", help="peak RSS of a training run, one process per run")
    p.add_argument("--memory-steps", type=int, default=20, help="training steps of a memory run [20]")
    p.add_argument("--memory-runs", type=int, default=2, help="runs per memory configuration (min taken) [2]")
    p.add_argument("--profile", action="store_true", help="per-layer profile of one training step")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--interference", action="store_true",
                   help="compare each framework alone in its process with both in one process")
    p.add_argument("--results-dir", default=results_file.RESULTS_DIR,
                   help="folder of the dated results file the run saves [bench/results]")
    p.add_argument("--no-save", action="store_true", help="print only, save no results file")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads is None:
        args.threads = sorted({1, min(2, cores)})
    for n in args.threads:
        if n < 1:
            p.error("--threads must be >= 1")
    if min(args.batches) < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.data == "mnist" and NETWORKS[args.network] != MNIST_SHAPE:
        p.error(f"--data mnist: the network {args.network!r} takes {NETWORKS[args.network]} "
                f"inputs, not MNIST's {MNIST_SHAPE}; use --data random")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(*argv[1:4])
    if argv[:1] == ["--memory-child"]:
        return memory_child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    args = parse_args(argv)
    DATA["kind"], DATA["network"] = args.data, args.network
    if args.network != "reference" and (args.epoch or args.profile or args.memory or args.startup
                                        or args.interference or not args.no_kernels):
        raise SystemExit("--network times the throughput table only: add --no-kernels, and leave "
                         "out --epoch, --profile, --memory, --startup and --interference")
    CONTENTION.threshold, CONTENTION.attempts = args.max_other_load, max(1, args.attempts)
    CONTENTION.quiet_timeout = args.quiet_timeout
    env = os.environ.copy()
    if args.malloc == "tuned":  # everything else (kernels, epoch, memory, start-up) too
        env.update(TUNED_MALLOC)
    with_torch = torch_available() and not args.no_torch
    if args.baseline:
        with_torch = True  # the peer slot holds the baseline checkout instead
        PEER["baseline"] = os.path.abspath(args.baseline)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline,
                                capture_output=True, text=True).stdout.strip()
        PEER["name"] = f"baseline {commit or args.baseline}"
        if args.interference or args.epoch or args.profile or not args.no_kernels:
            raise SystemExit("--baseline times the throughput table only: add --no-kernels, and "
                             "leave out --epoch, --profile and --interference")
    name = f"end-to-end-{args.network}" + ("-ab" if args.baseline else "")  # an A/B of two commits
    saved = None if args.no_save else results_file.start(name, args.results_dir)
    print_header(args, argv)
    if not with_torch:
        why = "left out (--no-torch)" if args.no_torch else "not importable (it is optional)"
        print(f"PyTorch: {why} -- fastcnn figures only.")
    tmp = tempfile.mkdtemp(prefix="fastcnn-bench-")
    workers = {}
    throughput = memory = startup = None
    needs_workers = not args.no_kernels or args.epoch or args.profile
    init = os.path.join(tmp, "init.npz")
    try:
        if needs_workers:
            workers = start_workers(args, env, with_torch, init)
        if not args.no_kernels:
            kernel_tables(args, workers)
        if args.profile:
            profile_table(args, workers)
        if args.epoch:
            epoch_table(args, workers, tmp)
        close_workers(workers)
        workers = {}
        if not args.no_throughput:
            throughput = throughput_table(args, env, with_torch, init)
        if args.interference and with_torch:
            interference_table(args, env)
        if args.memory:
            memory = memory_table(args, env)
        if args.startup:
            startup = startup_table(args, env)
        if not PEER["baseline"]:  # the targets are against PyTorch
            print_targets(throughput, memory, startup)
        print()
        print(CONTENTION.summary())
        print(f"load average at the end: {loadavg()}")
        if saved:
            saved.finish()
    finally:
        close_workers(workers)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
