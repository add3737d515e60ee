"""Kernel benchmarks at the reference network's shapes (batch 64, float32).

    python -m pytest bench/ --benchmark-enable

Implementations: naive (the textbook loops of tests/naive, one round: they take seconds),
numpy (im2col + matmul; reshape + max; bench/numpy_ops.py), fastcnn (the Numba kernels),
torch (if installed). Convolution, max pooling at the reference shapes; ReLU, average pooling and
batch normalisation at the first layer's activation shape (64, 32, 26, 26).
"""

import numba
import numpy as np
import pytest

import numpy_ops
from conftest import torch
from fastcnn.functional import _no_bn
from fastcnn.kernels import activations as kact
from fastcnn.kernels import batchnorm as kbn
from fastcnn.kernels import conv2d as kconv
from fastcnn.kernels import pool2d as kpool
from naive import activations as naive_act
from naive import batchnorm as naive_bn
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


def _nhwc(a):
    """fastcnn's kernels take channels-last arrays: a network's activations are already NHWC
    (fastcnn.functional hands the kernels views, no copy), so the conversion is not timed."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


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
    xh, outh = _nhwc(x), _nhwc(dy)
    fns = {
        "naive": lambda: naive_conv.conv2d_forward(x, weight, bias),
        "numpy": lambda: numpy_ops.conv2d_forward(x, weight, bias),
        "fastcnn": lambda: kconv.conv2d_forward(
            xh, weight, bias, 1, 1, 0, 0, 1, 1, False, outh, _no_bn(xh), numba.get_num_threads()
        ),
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
    dyh, dxh = _nhwc(dy), _nhwc(x)
    fns = {
        # the textbook computes dx, dw and db in one pass: timed under backward-input
        "naive": lambda: naive_conv.conv2d_backward(x, weight, dy),
        "numpy": lambda: numpy_ops.conv2d_backward_input(dy, weight),
        "fastcnn": lambda: kconv.conv2d_backward_input(
            dyh, weight, 1, 1, 0, 0, 1, 1, dxh, numba.get_num_threads()
        ),
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
    xh, dyh = _nhwc(x), _nhwc(dy)
    fns = {
        "numpy": lambda: numpy_ops.conv2d_backward_weight(x, dy),
        "fastcnn": lambda: kconv.conv2d_backward_weight(
            xh, dyh, 1, 1, 0, 0, 1, 1, dweight, dbias, numba.get_num_threads()
        ),
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
    xh = _nhwc(x)
    out = np.empty((BATCH, h // 2, w // 2, c), np.float32)
    argmax = np.empty(out.shape, np.int64)
    fns = {
        "naive": lambda: naive_pool.maxpool2d_forward(x, (2, 2), (2, 2), ((0, 0), (0, 0))),
        "numpy": lambda: numpy_ops.maxpool2x2_forward(x),
        "fastcnn": lambda: kpool.maxpool2d_forward(xh, 2, 2, 2, 2, 0, 0, out, argmax),
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
    yh = np.empty((BATCH, h // 2, w // 2, c), np.float32)
    argmax = np.empty(yh.shape, np.int64)
    kpool.maxpool2d_forward(_nhwc(x), 2, 2, 2, 2, 0, 0, yh, argmax)
    y = np.ascontiguousarray(yh.transpose(0, 3, 1, 2))
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    dyh, dxh = _nhwc(dy), np.empty((BATCH, h, w, c), np.float32)
    fns = {
        "naive": lambda: naive_pool.maxpool2d_backward(x, dy, (2, 2), (2, 2), ((0, 0), (0, 0))),
        "numpy": lambda: numpy_ops.maxpool2x2_backward(x, y, dy),
        "fastcnn": lambda: kpool.maxpool2d_backward(dyh, argmax, dyh, False, 2, 2, 2, 2, 0, 0, dxh),
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


# The other kernels, at the activation shape of the reference network's first layer (they are not
# in the reference network itself, except ReLU): memory-bound passes, so no GFLOP/s column.
ACT_SHAPE = (BATCH, 32, 26, 26)
ACT_NAME = "64x32x26x26"


def _activation():
    return np.random.default_rng(0).standard_normal(ACT_SHAPE, dtype=np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_relu_forward_backward(record, impl):
    _skip_missing(impl)
    x = _activation()
    dy = _activation()
    y, dx = np.empty_like(x), np.empty_like(x)

    def fastcnn_relu():
        kact.relu_forward(x.reshape(-1), y.reshape(-1))
        kact.relu_backward(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))

    fns = {
        "naive": lambda: (naive_act.relu_forward(x), naive_act.relu_backward(x, dy)),
        "numpy": lambda: np.where(np.maximum(x, 0) > 0, dy, np.float32(0)),
        "fastcnn": fastcnn_relu,
    }
    if impl == "torch":
        _torch_threads()
        tx = torch.from_numpy(x).requires_grad_()
        tdy = torch.from_numpy(dy)
        fns["torch"] = lambda: torch.relu(tx).backward(tdy)
    record(
        f"relu {ACT_NAME} forward+backward", impl, fns[impl], 0, 1 if impl == "naive" else ROUNDS
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_avgpool2d_forward_backward(record, impl):
    _skip_missing(impl)
    x = _activation()
    out = np.empty((BATCH, 32, 13, 13), np.float32)
    dy = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    dx = np.empty_like(x)
    pad = ((0, 0), (0, 0))

    xh, dyh = _nhwc(x), _nhwc(dy)
    outh, dxh = _nhwc(out), _nhwc(dx)

    def fastcnn_avg():
        kpool.avgpool2d_forward(xh, 2, 2, 2, 2, 0, 0, outh)
        kpool.avgpool2d_backward(dyh, 2, 2, 2, 2, 0, 0, dxh)

    def numpy_avg():
        numpy_ops.avgpool2x2_forward(x)
        return np.repeat(np.repeat(dy, 2, axis=2), 2, axis=3) * np.float32(0.25)

    fns = {
        "naive": lambda: (
            naive_pool.avgpool2d_forward(x, (2, 2), (2, 2), pad),
            naive_pool.avgpool2d_backward(x.shape, dy, (2, 2), (2, 2), pad),
        ),
        "numpy": numpy_avg,
        "fastcnn": fastcnn_avg,
    }
    if impl == "torch":
        _torch_threads()
        tx = torch.from_numpy(x).requires_grad_()
        tdy = torch.from_numpy(dy)
        fns["torch"] = lambda: torch.nn.functional.avg_pool2d(tx, 2).backward(tdy)
    record(
        f"avgpool 2x2 {ACT_NAME} forward+backward",
        impl,
        fns[impl],
        0,
        1 if impl == "naive" else ROUNDS,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_batchnorm_train_forward_backward(record, impl):
    _skip_missing(impl)
    x = _activation()
    dy = np.random.default_rng(1).standard_normal(ACT_SHAPE, dtype=np.float32)
    c = ACT_SHAPE[1]
    gamma = np.ones(c, np.float32)
    beta = np.zeros(c, np.float32)
    eps = np.float32(1e-5)
    out, dx = np.empty_like(x), np.empty_like(x)
    mean, invstd, dgamma, dbeta = (np.empty(c, np.float32) for _ in range(4))

    def fastcnn_bn():
        kbn.batchnorm_forward_train(x, gamma, beta, eps, out, mean, invstd)
        kbn.batchnorm_backward(dy, x, gamma, mean, invstd, dx, dgamma, dbeta)

    def numpy_bn():
        _, m, s = numpy_ops.batchnorm_forward_train(x, gamma, beta, eps)
        numpy_ops.batchnorm_backward(x, gamma, dy, m, s)

    fns = {
        "naive": lambda: (
            naive_bn.batchnorm_forward_train(x, gamma, beta, 1e-5),
            naive_bn.batchnorm_backward(x, gamma, dy, 1e-5),
        ),
        "numpy": numpy_bn,
        "fastcnn": fastcnn_bn,
    }
    if impl == "torch":
        _torch_threads()
        tx = torch.from_numpy(x).requires_grad_()
        tg = torch.from_numpy(gamma).requires_grad_()
        tb = torch.from_numpy(beta).requires_grad_()
        tdy = torch.from_numpy(dy)
        fns["torch"] = lambda: torch.nn.functional.batch_norm(
            tx, None, None, tg, tb, training=True, eps=1e-5
        ).backward(tdy)
    record(
        f"batchnorm {ACT_NAME} train fwd+bwd", impl, fns[impl], 0, 1 if impl == "naive" else ROUNDS
    )
