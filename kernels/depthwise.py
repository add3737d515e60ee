"""Depthwise convolution (``groups`` = channels, one filter per channel: MobileNet's) over
channels-last activations, forward and backward.

Each output channel reads its own input channel only, so there is no product to tile: the
work is a multiply-add per tap and channel, and with channels last the channels of a pixel lie
side by side, the innermost loop of every kernel here (LLVM vectorises it). Padding is tested
per tap (a tap outside the image adds nothing) instead of copying the input into a padded one.

Weights are passed as ``wt`` (KH, KW, C): the layer's (C, 1, KH, KW) with the channels last,
so that a tap's weights are one contiguous row too.

Determinism: every output element is summed by one thread in a fixed order (bias, then the
taps in (i, j) order; the input gradient image by image; the weight gradient image by image
into per-image partial sums added in image order), so the results do not depend on the number
of threads.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _tap_range(o, stride, pad, dil, k, size):
    """The taps i < k whose input row o*stride - pad + i*dil lies in [0, size): [i0, i1)."""
    base = o * stride - pad
    i0 = 0
    while i0 < k and base + i0 * dil < 0:
        i0 += 1
    i1 = k
    while i1 > i0 and base + (i1 - 1) * dil >= size:
        i1 -= 1
    return i0, i1


@njit(cache=True)
def _out_range(offset, stride, count, size):
    """The outputs o < count whose input o*stride + offset lies in [0, size): [o0, o1)."""
    o0 = 0 if offset >= 0 else (-offset + stride - 1) // stride
    o1 = 0 if size - offset <= 0 else min(count, (size - offset + stride - 1) // stride)
    return o0, max(o0, o1)


@njit(parallel=True, cache=True)
def depthwise_forward(x, wt, bias, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, relu, out):
    """out[n, oh, ow, c] = bias[c] + sum_{i,j} wt[i, j, c] * x[n, oh*sh - pt + i*dh,
    ow*sw - pl + j*dw, c] (taps outside the image add nothing; the taps in (i, j) order),
    then max(out, 0) if ``relu`` (a NaN stays NaN).

    x (N, H, W, C), wt (KH, KW, C), bias (C,), out (N, OH, OW, C): C-contiguous, one dtype.
    Work: output rows (n, oh), split over the threads; a row is built one tap at a time, each
    tap a pass over the row's pixels (contiguous runs of C channels).
    """
    N, H, W, C = x.shape
    KH, KW = wt.shape[0], wt.shape[1]
    OH, OW = out.shape[1], out.shape[2]
    xr = x.reshape((N * H, W * C))
    orow = out.reshape((N * OH, OW * C))
    zero = out.dtype.type(0)
    for row in prange(N * OH):
        n = row // OH
        oh = row % OH
        o = orow[row]
        for p in range(OW):
            for c in range(C):
                o[p * C + c] = bias[c]
        i0, i1 = _tap_range(oh, stride_h, pad_top, dil_h, KH, H)
        for i in range(i0, i1):
            xs = xr[n * H + oh * stride_h - pad_top + i * dil_h]
            for j in range(KW):
                ws = wt[i, j]
                shift = j * dil_w - pad_left
                p0, p1 = _out_range(shift, stride_w, OW, W)
                for p in range(p0, p1):
                    # unsigned offsets: a signed index is tested for wrap-around per element,
                    # and that loop stayed scalar
                    a = np.uint64((p * stride_w + shift) * C)
                    b = np.uint64(p * C)
                    for c in range(C):
                        cu = np.uint64(c)
                        o[b + cu] += xs[a + cu] * ws[c]
        if relu:
            for q in range(OW * C):
                v = o[q]
                o[q] = zero if v <= zero else v


@njit(parallel=True, cache=True)
def depthwise_backward_input(dy, wt, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, dx):
    """dx[n, ih, iw, c] = sum over the outputs (oh, ow) and taps (i, j) that read (ih, iw) of
    dy[n, oh, ow, c] * wt[i, j, c]: the transposed depthwise convolution.

    dy (N, OH, OW, C), wt (KH, KW, C), dx (N, H, W, C) overwritten. Work: images, each by one
    thread, added in (oh, i, j, ow) order.
    """
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    gr = dy.reshape((N * OH, OW * C))
    dr = dx.reshape((N * H, W * C))
    for n in prange(N):
        for r in range(H):
            d = dr[n * H + r]
            for q in range(W * C):
                d[q] = 0
        for oh in range(OH):
            gs = gr[n * OH + oh]
            i0, i1 = _tap_range(oh, stride_h, pad_top, dil_h, KH, H)
            for i in range(i0, i1):
                ds = dr[n * H + oh * stride_h - pad_top + i * dil_h]
                for j in range(KW):
                    ws = wt[i, j]
                    shift = j * dil_w - pad_left
                    p0, p1 = _out_range(shift, stride_w, OW, W)
                    for p in range(p0, p1):
                        a = np.uint64((p * stride_w + shift) * C)
                        b = np.uint64(p * C)
                        for c in range(C):
                            cu = np.uint64(c)
                            ds[a + cu] += gs[b + cu] * ws[c]


@njit(parallel=True, cache=True)
def depthwise_backward_weight(
    x, dy, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, part_w, part_b, dwt, dbias
):
    """dwt[i, j, c] = sum_{n, oh, ow} dy[n, oh, ow, c] * x[n, oh*sh - pt + i*dh,
    ow*sw - pl + j*dw, c]; dbias[c] = sum of dy[..., c].

    x (N, H, W, C), dy (N, OH, OW, C); part_w (N, KH, KW, C) and part_b (N, C) scratch: each
    image's sums (one thread each), then added in image order into dwt (KH, KW, C) and dbias.
    """
    N, H, W, C = x.shape
    OH, OW = dy.shape[1], dy.shape[2]
    KH, KW = dwt.shape[0], dwt.shape[1]
    xr = x.reshape((N * H, W * C))
    gr = dy.reshape((N * OH, OW * C))
    for n in prange(N):
        pw = part_w[n]
        pb = part_b[n]
        for i in range(KH):
            for j in range(KW):
                for c in range(C):
                    pw[i, j, c] = 0
        for c in range(C):
            pb[c] = 0
        for oh in range(OH):
            gs = gr[n * OH + oh]
            for p in range(OW):
                b = np.uint64(p * C)
                for c in range(C):
                    pb[c] += gs[b + np.uint64(c)]
            i0, i1 = _tap_range(oh, stride_h, pad_top, dil_h, KH, H)
            for i in range(i0, i1):
                xs = xr[n * H + oh * stride_h - pad_top + i * dil_h]
                for j in range(KW):
                    acc = pw[i, j]
                    shift = j * dil_w - pad_left
                    p0, p1 = _out_range(shift, stride_w, OW, W)
                    for p in range(p0, p1):
                        a = np.uint64((p * stride_w + shift) * C)
                        b = np.uint64(p * C)
                        for c in range(C):
                            cu = np.uint64(c)
                            acc[c] += gs[b + cu] * xs[a + cu]
    for i in range(KH):
        for j in range(KW):
            for c in range(C):
                dwt[i, j, c] = 0
    for c in range(C):
        dbias[c] = 0
    for n in range(N):
        for i in range(KH):
            for j in range(KW):
                for c in range(C):
                    dwt[i, j, c] += part_w[n, i, j, c]
        for c in range(C):
            dbias[c] += part_b[n, c]
