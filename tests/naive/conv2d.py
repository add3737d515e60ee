"""2-D convolution (cross-correlation, as PyTorch's conv2d), the textbook loops. NCHW.

With the input zero-padded by ``padding = ((top, bottom), (left, right))`` into ``xp``,

    y[n, f, oh, ow] = b[f] + sum_{c, i, j} w[f, c, i, j] * xp[n, c, oh*sh + i*dh, ow*sw + j*dw]

for x (N, C, H, W), w (F, C, KH, KW), b (F,), stride (sh, sw), dilation (dh, dw), and
``OH = (H + top + bottom - dh*(KH-1) - 1) // sh + 1`` (likewise OW). The backward follows
from the same sum term by term, for the upstream gradient dy (N, F, OH, OW):

    dxp[n, c, oh*sh + i*dh, ow*sw + j*dw] += w[f, c, i, j] * dy[n, f, oh, ow]
    dw[f, c, i, j]                        += xp[n, c, oh*sh + i*dh, ow*sw + j*dw] * dy[n, f, oh, ow]
    db[f]                                 += dy[n, f, oh, ow]

and dx is dxp with the padding cut off. Sums are taken in Python floats (float64); results
have the dtype of the inputs.

With ``groups`` (PyTorch's), w is (F, C / groups, KH, KW) and filter f sees only the channels
of its group: its c-th weight channel multiplies input channel ``(f // (F / groups)) *
(C / groups) + c``.
"""

import numpy as np


def _output_size(size, pad_before, pad_after, kernel, stride, dilation):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_forward(x, w, b, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """y (N, F, OH, OW) of the convolution above."""
    N, _, H, W = x.shape
    F, C, KH, KW = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = _output_size(H, pt, pb, KH, sh, dh)
    OW = _output_size(W, pl, pr, KW, sw, dw)
    y = np.zeros((N, F, OH, OW), dtype=np.result_type(x, w))
    # Python lists of Python floats: the same sums, read without numpy's per-element overhead
    xl, wl, bl = xp.tolist(), w.tolist(), np.asarray(b).tolist()
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    s = float(bl[f])
                    for c in range(C):
                        ci = f // (F // groups) * C + c  # the input channel (groups)
                        for i in range(KH):
                            for j in range(KW):
                                s += wl[f][c][i][j] * xl[n][ci][oh * sh + i * dh][ow * sw + j * dw]
                    y[n, f, oh, ow] = s
    return y


def conv2d_backward(x, w, dy, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """(dx, dw, db): gradients of ``sum(y * dy)`` for y = conv2d_forward(x, w, b, ...)."""
    N, _, H, W = x.shape
    F, C, KH, KW = w.shape
    (sh, sw), (dh, dw_) = stride, dilation
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH, OW = dy.shape[2], dy.shape[3]
    dtype = np.result_type(x, w, dy)
    # Python lists of Python floats: the same sums, without numpy's per-element overhead
    xl, wl, dyl = xp.tolist(), w.tolist(), dy.tolist()
    dxp = np.zeros(xp.shape, dtype=np.float64).tolist()
    dw = np.zeros(w.shape, dtype=np.float64).tolist()
    db = [0.0] * F
    for n in range(N):
        for f in range(F):
            for oh in range(OH):
                for ow in range(OW):
                    g = float(dyl[n][f][oh][ow])
                    db[f] += g
                    for c in range(C):
                        ci = f // (F // groups) * C + c  # the input channel (groups)
                        for i in range(KH):
                            for j in range(KW):
                                r, s = oh * sh + i * dh, ow * sw + j * dw_
                                dxp[n][ci][r][s] += wl[f][c][i][j] * g
                                dw[f][c][i][j] += xl[n][ci][r][s] * g
    dxp = np.array(dxp, dtype=np.float64).reshape(xp.shape)  # (empty axes survive tolist)
    dw = np.array(dw, dtype=np.float64).reshape(w.shape)
    db = np.array(db, dtype=np.float64)
    dx = dxp[:, :, pt : pt + H, pl : pl + W]
    return dx.astype(dtype), dw.astype(dtype), db.astype(dtype)
