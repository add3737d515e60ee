"""Max and average pooling, the textbook way: one loop per output element and window cell.

NCHW. ``kernel`` and ``stride`` are (h, w) pairs, ``padding`` is ((top, bottom), (left, right)).
Output size: ``OH = (H + top + bottom - KH) // SH + 1``, likewise OW.

Max pooling follows PyTorch: padded cells are never selected; the window's cells are visited
in row-major order and a cell replaces the current maximum when it is greater or when it is
NaN (so the first of equal maxima wins, and a NaN in the window is selected -- the last NaN if
there are several). ``argmax`` is the flat index ``h * W + w`` in the unpadded input plane.
Average pooling divides by ``KH * KW`` whatever the number of padded cells in the window
(PyTorch's ``count_include_pad=True``).
"""

import math

import numpy as np


def _output_size(size, k, s, before, after):
    return (size + before + after - k) // s + 1


def maxpool2d_forward(x, kernel, stride, padding):
    n_, c_, h_, w_ = x.shape
    kh, kw = kernel
    sh, sw = stride
    (pt, pb), (pl, pr) = padding
    oh_ = _output_size(h_, kh, sh, pt, pb)
    ow_ = _output_size(w_, kw, sw, pl, pr)
    y = np.zeros((n_, c_, oh_, ow_), dtype=x.dtype)
    argmax = np.zeros((n_, c_, oh_, ow_), dtype=np.int64)
    for n in range(n_):
        for c in range(c_):
            for oh in range(oh_):
                for ow in range(ow_):
                    best = -math.inf
                    best_index = -1
                    for i in range(kh):
                        for j in range(kw):
                            h = oh * sh - pt + i
                            w = ow * sw - pl + j
                            if h < 0 or h >= h_ or w < 0 or w >= w_:
                                continue  # a padded cell: never selected
                            value = x[n, c, h, w]
                            if best_index < 0 or value > best or math.isnan(value):
                                best = value
                                best_index = h * w_ + w
                    y[n, c, oh, ow] = best
                    argmax[n, c, oh, ow] = best_index
    return y, argmax


def maxpool2d_backward(x, dy, kernel, stride, padding):
    """The gradient flows to the selected cell of each window (summed where windows overlap)."""
    _, argmax = maxpool2d_forward(x, kernel, stride, padding)
    n_, c_, h_, w_ = x.shape
    dx = np.zeros(x.shape, dtype=dy.dtype)
    for n in range(n_):
        for c in range(c_):
            for oh in range(dy.shape[2]):
                for ow in range(dy.shape[3]):
                    index = argmax[n, c, oh, ow]
                    dx[n, c, index // w_, index % w_] += dy[n, c, oh, ow]
    return dx


def avgpool2d_forward(x, kernel, stride, padding):
    n_, c_, h_, w_ = x.shape
    kh, kw = kernel
    sh, sw = stride
    (pt, pb), (pl, pr) = padding
    oh_ = _output_size(h_, kh, sh, pt, pb)
    ow_ = _output_size(w_, kw, sw, pl, pr)
    y = np.zeros((n_, c_, oh_, ow_), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for oh in range(oh_):
                for ow in range(ow_):
                    total = 0.0
                    for i in range(kh):
                        for j in range(kw):
                            h = oh * sh - pt + i
                            w = ow * sw - pl + j
                            if 0 <= h < h_ and 0 <= w < w_:
                                total += x[n, c, h, w]  # a padded cell adds zero
                    y[n, c, oh, ow] = total / (kh * kw)
    return y


def avgpool2d_backward(x_shape, dy, kernel, stride, padding):
    """Each output spreads dy / (KH * KW) over the in-bounds cells of its window."""
    n_, c_, h_, w_ = x_shape
    kh, kw = kernel
    sh, sw = stride
    (pt, _), (pl, _) = padding
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_):
        for c in range(c_):
            for oh in range(dy.shape[2]):
                for ow in range(dy.shape[3]):
                    share = dy[n, c, oh, ow] / (kh * kw)
                    for i in range(kh):
                        for j in range(kw):
                            h = oh * sh - pt + i
                            w = ow * sw - pl + j
                            if 0 <= h < h_ and 0 <= w < w_:
                                dx[n, c, h, w] += share
    return dx


def global_avgpool2d_forward(x):
    """(N, C, H, W) -> (N, C): the mean of each plane."""
    n_, c_, h_, w_ = x.shape
    y = np.zeros((n_, c_), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            total = 0.0
            for h in range(h_):
                for w in range(w_):
                    total += x[n, c, h, w]
            y[n, c] = total / (h_ * w_)
    return y


def global_avgpool2d_backward(x_shape, dy):
    """Each plane's cells get dy / (H * W)."""
    n_, c_, h_, w_ = x_shape
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for w in range(w_):
                    dx[n, c, h, w] = dy[n, c] / (h_ * w_)
    return dx
