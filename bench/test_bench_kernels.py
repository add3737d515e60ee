"""Kernel benchmarks at the reference network's shapes (batch 64, float32).

    python -m pytest bench/ --benchmark-enable

Implementations: naive (the textbook loops of tests/naive, one round: they take seconds),
numpy (im2col + matmul; reshape + max), fastcnn (the Numba kernels), torch (if installed).
"""
import numba
import numpy as np
import pytest

import numpy_ops
from conftest import torch
from fastcnn.kernels import conv2d as kconv
from fastcnn.kernels import pool2d as kpool
from naive import conv2d as naive_conv
from naive import pool2d as naive_pool

BATCH = 64
ROUNDS = 30
CONVS = {  # name: (C, F, H, W, K)
    "conv1 1->32 28x28": (1, 32, 28, 28, 3),
    "conv2 32->64 13x13": (32, 64, 13, 13, 3),
}
POOLS = {"pool1 2x2 32x26x26": (32, 26, 26), "pool2 2x2 64x11x11": (64, 11, 11)}
IMPLS = ["naive", "numpy", "fastcnn", "torch"]


def _conv_data(c, f, h, w, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((f, c, k, k), dtype=np.float32) * np.float32(0.1)
    bias = rng.standard_normal(f, dtype=np.float32)
    dy = rng.standard_normal((BATCH, f, h - k + 1, w - k + 1), dtype=np.float32)
    return x, weight, bias, dy


def _skip_missing(impl):
    if impl == "torch" and torch is None:
        pytest.skip("PyTorch is not installed (optional)")


def _torch_threads():
    torch.set_num_threads(numba.get_num_threads())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(CONVS))
def test_conv2d_forward(record, shape, impl):
    _skip_missing(impl)
    c, f, h, w, k = CONVS[shape]
    x, weight, bias, dy = _conv_data(c, f, h, w, k)
    flops = 2 * dy.size * c * k * k
    out = np.empty_like(dy)
    fns = {
        "naive": lambda: naive_conv.conv2d_forward(x, weight, bias),
        "numpy": lambda: numpy_ops.conv2d_forward(x, weight, bias),
        "fastcnn": lambda: kconv.conv2d_forward(x, weight, bias, 1, 1, 0, 0, 1, 1, out),
    }
    if impl == "torch":
        _torch_threads()
        tx, tw, tb = (torch.from_numpy(a) for a in (x, weight, bias))
        fns["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, tb)
    record(f"{shape} forward", impl, fns[impl], flops, 1 if impl == "naive" else ROUNDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(CONVS))
def test_conv2d_backward_input(record, shape, impl):
    _skip_missing(impl)
    c, f, h, w, k = CONVS[shape]
    x, weight, bias, dy = _conv_data(c, f, h, w, k)
    flops = 2 * dy.size * c * k * k
    dx = np.empty_like(x)
    fns = {
        # the textbook computes dx, dw and db in one pass: timed under backward-input
        "naive": lambda: naive_conv.conv2d_backward(x, weight, dy),
        "numpy": lambda: numpy_ops.conv2d_backward_input(dy, weight),
        "fastcnn": lambda: kconv.conv2d_backward_input(dy, weight, 1, 1, 0, 0, 1, 1, dx),
    }
    if impl == "torch":
        _torch_threads()
        tdy, tw = torch.from_numpy(dy), torch.from_numpy(weight)
        fns["torch"] = lambda: torch.nn.grad.conv2d_input(x.shape, tw, tdy)
    if impl == "naive":
        flops *= 2  # dx and dw
    record(f"{shape} backward-input", impl, fns[impl], flops, 1 if impl == "naive" else ROUNDS)


@pytest.mark.parametrize("impl", ["numpy", "fastcnn", "torch"])
@pytest.mark.parametrize("shape", list(CONVS))
def test_conv2d_backward_weight(record, shape, impl):
    _skip_missing(impl)
    c, f, h, w, k = CONVS[shape]
    x, weight, bias, dy = _conv_data(c, f, h, w, k)
    flops = 2 * dy.size * c * k * k
    dweight, dbias = np.empty_like(weight), np.empty_like(bias)
    fns = {
        "numpy": lambda: numpy_ops.conv2d_backward_weight(x, dy),
        "fastcnn": lambda: kconv.conv2d_backward_weight(x, dy, 1, 1, 0, 0, 1, 1, dweight, dbias),
    }
    if impl == "torch":
        _torch_threads()
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        fns["torch"] = lambda: torch.nn.grad.conv2d_weight(tx, weight.shape, tdy)
    record(f"{shape} backward-weight", impl, fns[impl], flops, ROUNDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(POOLS))
def test_maxpool2d_forward(record, shape, impl):
    _skip_missing(impl)
    c, h, w = POOLS[shape]
    x = np.random.default_rng(0).standard_normal((BATCH, c, h, w), dtype=np.float32)
    out = np.empty((BATCH, c, h // 2, w // 2), np.float32)
    argmax = np.empty(out.shape, np.int64)
    fns = {
        "naive": lambda: naive_pool.maxpool2d_forward(x, (2, 2), (2, 2), ((0, 0), (0, 0))),
        "numpy": lambda: numpy_ops.maxpool2x2_forward(x),
        "fastcnn": lambda: kpool.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, out, argmax),
    }
    if impl == "torch":
        _torch_threads()
        tx = torch.from_numpy(x)
        fns["torch"] = lambda: torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
    record(f"{shape} forward", impl, fns[impl], 0, 1 if impl == "naive" else ROUNDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(POOLS))
def test_maxpool2d_backward(record, shape, impl):
    _skip_missing(impl)
    c, h, w = POOLS[shape]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, c, h, w), dtype=np.float32)
    y = np.empty((BATCH, c, h // 2, w // 2), np.float32)
    argmax = np.empty(y.shape, np.int64)
    kpool.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, y, argmax)
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    dx = np.empty_like(x)
    fns = {
        "naive": lambda: naive_pool.maxpool2d_backward(x, dy, (2, 2), (2, 2), ((0, 0), (0, 0))),
        "numpy": lambda: numpy_ops.maxpool2x2_backward(x, y, dy),
        "fastcnn": lambda: kpool.maxpool2d_backward(dy, argmax, dx),
    }
    if impl == "torch":
        _torch_threads()
        tx = torch.from_numpy(x)
        ty, tidx = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
        tdy = torch.from_numpy(dy)
        fns["torch"] = lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            tdy, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, tidx
        )
    record(f"{shape} backward", impl, fns[impl], 0, 1 if impl == "naive" else ROUNDS)
