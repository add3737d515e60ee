"""The end-to-end benchmark's runners (``bench/bench_end_to_end.py`` is the entry point): what
runs inside a worker process -- fastcnn's and PyTorch's training and inference steps, kernel
timings, an epoch, a profile, a memory run -- and the helpers both sides share: the constants,
the suite's networks and their input batch, the convolution shapes of the kernel table.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "bench_end_to_end.py")  # the entry point: workers and children run it
REPO = os.path.dirname(HERE)
PROTOCOL = "@@bench "
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
        "forward": (rows, c * k * k, f),  # cols @ W^T
        "backward-input": (rows, f, c * k * k),  # dY @ W, then col2im
        "backward-weight": (f, rows, c * k * k),  # dY^T @ cols
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
NETWORKS = {
    "reference": MNIST_SHAPE,
    "lenet5": MNIST_SHAPE,
    "resnet8": MNIST_SHAPE,
    "resnet20": MNIST_SHAPE,
    "vgg": (3, 32, 32),
    "allconv": (3, 32, 32),
}


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
            raise ValueError(
                f"--data mnist: the network {DATA['network']!r} takes {tuple(shape)} "
                f"inputs, not MNIST's {MNIST_SHAPE}; use --data random"
            )
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
    builders = getattr(fastcnn.models, "BUILDERS", {})
    if DATA["network"] not in builders:  # a --baseline checkout older than the network
        raise ValueError(
            f"--network {DATA['network']}: the fastcnn at {fastcnn.__file__} has no "
            f"such network (its models.BUILDERS: {', '.join(builders) or 'none'})"
        )
    return builders[DATA["network"]](input_shape()[0], 10, 0)


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
        # entered once per block, as fit() does per run; threads None: the process's defaults
        # (numba's threads, the BLAS's), as a user's own loop without compute_threads runs
        pinned = self.compute_threads(threads) if threads else contextlib.nullcontext()
        with pinned:
            if mode == "train":
                model.train()
                t0 = _t.perf_counter()
                for _ in range(steps):
                    opt.zero_grad()
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    model.backward(loss_fn.backward())  # the README's step
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

    def forward_flops(self):
        """Floating-point operations of one image's forward pass through the benchmark's
        network (``fastcnn summary``'s count; a training step counts 3x this)."""
        rows = []

        def visit(name, module, shape):
            rows.append({})
            return rows[-1]

        _network(self.fastcnn).trace_shapes((1,) + input_shape(), visit)
        return sum(r.get("flops", 0) for r in rows)

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

        from fastcnn.functional import _no_bn
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
                kconv.conv2d_forward(x, weight, bias, 1, 1, 0, 0, 1, 1, True, y, _no_bn(x), threads)
                pooled = np.empty((n, oh // 2, ow // 2, f), np.float32)
                argmax = np.empty(pooled.shape, np.int64)
                kpool.maxpool2d_forward(y, 2, 2, 2, 2, 0, 0, pooled, argmax)
                gp = np.ascontiguousarray(dy[:, : oh // 2, : ow // 2])
                # the kernel functional.max_pool2d_conv2d_backward picks (1 channel: dense)
                from_pool = (
                    kfused.maxpool2d_conv2d_backward_weight
                    if c % 32 == 0
                    else kfused.maxpool2d_conv2d_backward_weight_dense
                )
                fns = {
                    "forward": lambda: kconv.conv2d_forward(
                        x, weight, bias, 1, 1, 0, 0, 1, 1, False, y, _no_bn(x), threads
                    ),
                    "backward-input": lambda: kconv.conv2d_backward_input(
                        dy, weight, 1, 1, 0, 0, 1, 1, dx, threads
                    ),
                    "backward-weight": lambda: kconv.conv2d_backward_weight(
                        x, dy, 1, 1, 0, 0, 1, 1, dweight, dbias, threads
                    ),
                    "backward-weight from pool": lambda: from_pool(
                        x, gp, argmax, pooled, True, 2, 2, oh, ow, 1, 1, 0, 0, 1, 1, dweight, dbias
                    ),
                }
                for op, fn in fns.items():
                    out[f"{layer} {op}"] = _time_calls(fn, calls)
        return out

    # -- data pipeline ---------------------------------------------------------------------
    def data_pipeline(self, threads, batch, steps):
        """Seconds per batch of fit's data pipeline (a DataLoader over uint8 images of the
        network's input shape, read as fit reads it: reused buffers, scaled to float32), with
        and without the augmentation of `fastcnn train --augment`, against a training step fed
        by a prepared float32 batch. The images are random pixels; the cost does not depend on
        their values."""
        import numpy as np

        from fastcnn import cli_data, data

        c, h, w = self.input_shape
        n = batch * steps
        x = np.random.default_rng(0).integers(0, 256, (n, c, h, w), dtype=np.uint8)
        y = np.random.default_rng(1).integers(0, 10, n).astype(np.int64)
        kind = "mnist" if c == 1 else "cifar10"
        out = {}
        with self.compute_threads(threads):
            for name, transform in (
                ("loader", None),
                ("loader + augment", cli_data.augmentation(kind, (c, h, w))),
            ):
                loader = data.DataLoader((x, y), batch, shuffle=True, transform=transform, seed=0)
                for _ in loader.batches(reuse=True):  # compile, warm the caches
                    pass
                t0 = time.perf_counter()
                for _ in loader.batches(reuse=True):
                    pass
                out[name] = (time.perf_counter() - t0) / steps
        seconds, _ = self.block("train", batch, threads, steps)
        out["train step"] = seconds / steps
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
        fc.fit(
            warm,
            fc.CrossEntropyLoss(),
            fc.SGD(warm.parameters(), lr=0.01, momentum=0.9),
            x[: 2 * batch],
            y[: 2 * batch],
            epochs=1,
            batch_size=batch,
            progress=False,
            threads=threads,
        )
        model = fc.models.reference(seed=0)
        np.savez(init_path, **model.state_dict())
        opt = fc.SGD(model.parameters(), lr=0.01, momentum=0.9)
        history = fc.fit(
            model,
            fc.CrossEntropyLoss(),
            opt,
            x,
            y,
            epochs=1,
            batch_size=batch,
            progress=False,
            threads=threads,
            seed=0,
        )
        t0 = time.perf_counter()
        test_loss, test_acc = fc.evaluate(model, xt, yt, batch_size=256, threads=threads)
        return {
            "seconds": history.seconds[0],
            "train_loss": history.train_loss[0],
            "test_accuracy": test_acc,
            "test_seconds": time.perf_counter() - t0,
            "images": int(x.shape[0]),
        }

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
        plan, rows, first = model._plan(), [], 0
        for st in plan:
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
                faults.setdefault(key, []).append(
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                )
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
            for row, st in zip(rows, plan, strict=False):
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
            plain, total, gap = (
                [],
                [],
                [],
            )  # plain (uninstrumented) and instrumented steps alternate
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
                parts = sum(sum(v[mark.get(k, 0) :]) for k, v in times.items())
                gap.append(total[-1] - parts)
        out = {f"{k[0]}|{k[1]}": median(v) for k, v in times.items()}
        out.update(
            {f"faults|{k[0]}|{k[1]}": sum(v) / len(v) for k, v in faults.items()}
        )  # mean: they come in bursts
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
                nn.Conv2d(1, 32, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(1600, 128),
                nn.ReLU(),
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
        order = torch.from_numpy(
            np.random.default_rng(0).permutation(n)
        )  # = fit(seed=0)'s 1st epoch
        net.train()
        loss_sum = 0.0
        t0 = time.perf_counter()
        for b in range(-(-n // batch)):
            idx = order[b * batch : (b + 1) * batch]
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
                correct += int((net(xt[i : i + 256]).argmax(1) == yt[i : i + 256]).sum())
        return {
            "seconds": seconds,
            "train_loss": loss_sum / n,
            "test_accuracy": correct / xt.shape[0],
            "test_seconds": time.perf_counter() - t1,
            "images": int(n),
        }

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
        return {
            "step_seconds": median(plain),
            "ops": [
                (e.key, e.self_cpu_time_total / 1e6 / steps, e.count / steps) for e in ops[:14]
            ],
        }


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
            {
                k: d.get(k)
                for k in (
                    "user_api",
                    "internal_api",
                    "prefix",
                    "version",
                    "num_threads",
                    "threading_layer",
                    "filepath",
                )
            }
            for d in threadpoolctl.threadpool_info()
        ]
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
        info["torch_parallel"] = [
            line.strip()
            for line in torch.__config__.parallel_info().splitlines()
            if "backend" in line or "Library" in line or "MKL-DNN" in line
        ]
    if "tensorflow" in runners:
        info.update(runners["tensorflow"].info())
    return info


RUNNERS = ("fastcnn", "torch")  # the worker kinds of one framework built here


def worker_main(kind, data="random", network="reference"):
    import resource

    DATA["kind"], DATA["network"] = data, network
    # The protocol gets its own copy of stdout; anything else printed (by a library too) goes to
    # stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    t0 = time.perf_counter()
    runners = {}
    if kind == "baseline":  # --baseline: fastcnn from another checkout, in the peer's place
        runners["torch"] = FastcnnRunner(os.environ["BENCH_BASELINE"])
    if kind == "tensorflow":  # the optional second peer, one thread count per worker
        from e2e_tensorflow import TensorflowRunner

        runners["tensorflow"] = TensorflowRunner()
    for name in ("fastcnn", "torch") if kind == "mixed" else (kind,) if kind in RUNNERS else ():
        runners[name] = FastcnnRunner() if name == "fastcnn" else TorchRunner()
    ready = {"import_seconds": time.perf_counter() - t0}
    # first steps: compilation (or cache load) and one-time set-up, reported, never timed
    for name, runner in runners.items():
        t1 = time.perf_counter()
        threads = getattr(runner, "threads", 1)  # TensorFlow's are fixed at its start
        runner.block("train", 32, threads, 1)
        runner.block("infer", 32, threads, 1)
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
                seconds, loss = runners[req["fw"]].block(
                    req["mode"], req["batch"], req["threads"], req["steps"]
                )
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                result = {
                    "seconds": seconds,
                    "loss": loss,
                    "faults_per_step": faults / req["steps"],
                }
            elif op == "gemm":
                result = runners["fastcnn"].gemm(req["threads"], req["calls"])
            elif op == "flops":
                result = {"flops": runners["fastcnn"].forward_flops()}
            elif op == "kernels":
                result = runners[req["fw"]].kernels(req["threads"], req["calls"])
            elif op == "epoch":
                result = runners[req["fw"]].epoch(
                    req["threads"], req["batch"], req["folder"], req["init"]
                )
            elif op == "data":
                result = runners["fastcnn"].data_pipeline(
                    req["threads"], req["batch"], req["steps"]
                )
            elif op == "profile":
                result = runners[req["fw"]].profile(req["threads"], req["batch"], req["steps"])
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception:  # reported to the parent, which stops
            result = {"error": traceback.format_exc()}
        proto.write(PROTOCOL + json.dumps(result) + "\n")


# -- the child process of a memory run (bench_end_to_end.py --memory-child) ---------------------


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
