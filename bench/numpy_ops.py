"""Vectorised numpy versions (im2col + matmul, reshape + max): what a user writes without Numba.

The middle rung of the benchmark ladder: naive loops | numpy | fastcnn kernels | PyTorch.
Stride 1, no padding, as at the reference network's shapes.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def im2col(x, kh, kw):
    """(N, C, H, W) -> (N*OH*OW, C*KH*KW)."""
    n, c, h, w = x.shape
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))  # N, C, OH, OW, KH, KW
    oh, ow = windows.shape[2], windows.shape[3]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw), oh, ow


def conv2d_forward(x, weight, bias):
    f, c, kh, kw = weight.shape
    cols, oh, ow = im2col(x, kh, kw)
    y = cols @ weight.reshape(f, -1).T + bias
    return y.reshape(x.shape[0], oh, ow, f).transpose(0, 3, 1, 2)


def conv2d_backward_weight(x, dy):
    n, f, oh, ow = dy.shape
    kh, kw = x.shape[2] - oh + 1, x.shape[3] - ow + 1
    cols, _, _ = im2col(x, kh, kw)
    dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, f)
    return (dy2.T @ cols).reshape(f, x.shape[1], kh, kw), dy2.sum(axis=0)


def conv2d_backward_input(dy, weight):
    """Full correlation of dy with the flipped kernel: im2col on the zero-padded dy."""
    f, c, kh, kw = weight.shape
    padded = np.pad(dy, ((0, 0), (0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1)))
    cols, oh, ow = im2col(padded, kh, kw)
    flipped = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)
    return (cols @ flipped.T).reshape(dy.shape[0], oh, ow, c).transpose(0, 3, 1, 2)


def maxpool2x2_forward(x):
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    blocks = x[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    return blocks.max(axis=(3, 5))


def maxpool2x2_backward(x, y, dy):
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    blocks = x[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    mask = blocks == y[:, :, :, None, :, None]  # ties share the gradient here: fine for timing
    dx = np.zeros_like(x)
    dx[:, :, : 2 * oh, : 2 * ow] = (mask * dy[:, :, :, None, :, None]).reshape(n, c, 2 * oh, 2 * ow)
    return dx


def avgpool2x2_forward(x):
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    return x[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2).mean(axis=(3, 5))


def batchnorm_forward_train(x, gamma, beta, eps):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    invstd = 1 / np.sqrt(var + eps)
    return (
        (x - mean) * invstd * gamma[None, :, None, None] + beta[None, :, None, None],
        mean,
        invstd,
    )


def batchnorm_backward(x, gamma, dy, mean, invstd):
    m = x.shape[0] * x.shape[2] * x.shape[3]
    xhat = (x - mean) * invstd
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    scale = (gamma[None, :, None, None] * invstd) / m
    dx = scale * (m * dy - dbeta[None, :, None, None] - xhat * dgamma[None, :, None, None])
    return dx, dgamma, dbeta
