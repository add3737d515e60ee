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

from .conv2d import _batch_norm_rows
from .gemm_tile import TALL


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


@njit(cache=True, inline="always")
def _pixel_by_taps(xr, wt, bias, o, b, n, oh, p, H, W, C, sh, sw, pt, pl, dh, dw):
    """o[b : b + C] = output pixel p of row (n, oh): the bias, then every tap inside the image
    in (i, j) order."""
    KH, KW = wt.shape[0], wt.shape[1]
    for c in range(C):
        cu = np.uint64(c)
        o[b + cu] = bias[cu]
    i0, i1 = _tap_range(oh, sh, pt, dh, KH, H)
    j0, j1 = _tap_range(p, sw, pl, dw, KW, W)
    for i in range(i0, i1):
        xs = xr[n * H + oh * sh - pt + i * dh]
        for j in range(j0, j1):
            ws = wt[i, j]
            a = np.uint64((p * sw - pl + j * dw) * C)
            for c in range(C):
                cu = np.uint64(c)
                o[b + cu] += xs[a + cu] * ws[cu]


#: Elements (whole pixels' channels) per run of the stride-1 forward's interior (below).
_RUN = 128
#: float32 lanes of the target's vectors (float64: half as many). The per-pixel loop over the
#: channels runs scalar below 3 vectors (LLVM's vector loop has a minimum trip count) and its
#: remainder scalar: the forward sums in runs there (measured in float32 with AVX2; the rule at
#: other widths is the same rule, unmeasured).
_VECTOR = 16 if TALL else 8


@njit(cache=True)
def _run_operands(wf, bias, C, run_pixels):
    """The stride-1 forward's repeated operands, (10, run_pixels * C) flat: row 0 the bias,
    row 1 + k tap k's weights (wt's (i, j) order), each repeated run_pixels times."""
    L = run_pixels * C
    rep = np.empty(10 * L, dtype=wf.dtype)
    for t in range(L):
        c = t % C
        rep[t] = bias[c]
        for k in range(9):
            rep[(k + 1) * L + t] = wf[k * C + c]
    return rep


@njit(cache=True, inline="always")
def _window3(a0, dc, rs):
    """The offsets of a 3x3 window's nine taps in (i, j) order, its first at a0: dc apart
    along a row, rs from one row to the next."""
    a1 = a0 + dc
    a2 = a1 + dc
    a3 = a0 + rs
    a4 = a1 + rs
    a5 = a2 + rs
    return a0, a1, a2, a3, a4, a5, a3 + rs, a4 + rs, a5 + rs


@njit(cache=True, inline="always")
def _interior_run(xf, rep, L, o, b, a0, dc, rs, count):
    """o[b : b + count] = the outputs of consecutive stride-1 pixels whose 3x3 windows lie
    inside the image, as one run of (pixel, channel) elements: element t reads its taps at
    a0 + t (+ dc per column, + rs per row), the weights and bias at t mod L of ``rep``
    (_run_operands; runs of L). The same terms in the same order as the per-pixel loop."""
    u = np.uint64
    s = 0
    while s < count:
        n = min(L, count - s)
        su = u(s)
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = _window3(a0 + su, dc, rs)
        ob = b + su
        Lu = u(L)
        for t in range(n):
            tu = u(t)
            acc = rep[tu]
            acc += xf[x0 + tu] * rep[Lu + tu]
            acc += xf[x1 + tu] * rep[u(2) * Lu + tu]
            acc += xf[x2 + tu] * rep[u(3) * Lu + tu]
            acc += xf[x3 + tu] * rep[u(4) * Lu + tu]
            acc += xf[x4 + tu] * rep[u(5) * Lu + tu]
            acc += xf[x5 + tu] * rep[u(6) * Lu + tu]
            acc += xf[x6 + tu] * rep[u(7) * Lu + tu]
            acc += xf[x7 + tu] * rep[u(8) * Lu + tu]
            acc += xf[x8 + tu] * rep[u(9) * Lu + tu]
            o[ob + tu] = acc
        s += L


@njit(parallel=True, cache=True)
def depthwise_forward(
    x, wt, bias, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, relu, out, bn
):
    """out[n, oh, ow, c] = bias[c] + sum_{i,j} wt[i, j, c] * x[n, oh*sh - pt + i*dh,
    ow*sw - pl + j*dw, c] (taps outside the image add nothing; from the bias, the taps in (i, j)
    order), then max(out, 0) if ``relu`` (a NaN stays NaN).

    ``bn``: conv2d.conv2d_forward's (an evaluation-mode BatchNorm, a residual sum, or four
    empty arrays), applied to each output row while it is in cache, before the ReLU: bitwise
    the layers run one by one.

    x (N, H, W, C), wt (KH, KW, C), bias (C,), out (N, OH, OW, C): C-contiguous, one dtype.
    Work: output rows (n, oh), split over the threads. A pixel of a 3x3 convolution whose
    window lies inside the image sums its nine taps over its channels in one pass, nine terms
    written out (one store per output, where a loop over the taps would load and store the
    output once per tap); other pixels, and every pixel of other kernel sizes, a tap at a time.
    Both add the same terms in the same order: the path a pixel takes does not change its bits.
    At a horizontal stride of 1, with few channels or not whole vectors of them (_VECTOR),
    those inside pixels of a row are one run of (pixel, channel) elements, summed in runs of
    about _RUN elements over weights repeated to that length: a pixel's own loop was too
    short to vectorise.
    """
    N, H, W, C = x.shape
    KH, KW = wt.shape[0], wt.shape[1]
    OH, OW = out.shape[1], out.shape[2]
    xr = x.reshape((N * H, W * C))
    xf = x.reshape(x.size)
    wf = wt.reshape(wt.size)
    orow = out.reshape((N * OH, OW * C))
    of = out.reshape(out.size)
    affine = bn[1].size > 0
    zero = out.dtype.type(0)
    Cu = np.uint64(C)
    # flat offsets: numba types int64 * uint64 as float64, so every product here is unsigned
    w1, w2, w3, w4 = Cu, np.uint64(2) * Cu, np.uint64(3) * Cu, np.uint64(4) * Cu
    w5, w6, w7, w8 = np.uint64(5) * Cu, np.uint64(6) * Cu, np.uint64(7) * Cu, np.uint64(8) * Cu
    dc = np.uint64(dil_w * C)
    rs = np.uint64(dil_h * W * C)
    three = KH == 3 and KW == 3
    # the pixels whose three columns of taps lie inside the image: [pa, pb)
    qa, qb = _out_range(-pad_left, stride_w, OW, W)
    ra, rb = _out_range(2 * dil_w - pad_left, stride_w, OW, W)
    pa = max(qa, ra)
    pb = max(pa, min(qb, rb))
    lanes = _VECTOR * 4 // x.itemsize
    few = C < 3 * lanes or (C < 8 * lanes and C % lanes != 0)
    runs = three and stride_w == 1 and pb > pa and few
    run_pixels = max(1, min(pb - pa, _RUN // C)) if runs else 1
    rep = _run_operands(wf, bias, C, run_pixels) if runs else np.empty(0, dtype=wf.dtype)
    for row in prange(N * OH):
        n = row // OH
        oh = row % OH
        o = orow[row]
        i0, i1 = _tap_range(oh, stride_h, pad_top, dil_h, KH, H)
        inside = three and i0 == 0 and i1 == 3
        a_row = np.uint64((n * H + oh * stride_h - pad_top) * W * C) if inside else np.uint64(0)
        run = inside and runs
        if run:  # (stride 1: pa - pad_left >= 0)
            a0 = a_row + np.uint64((pa - pad_left) * C)
            count = (pb - pa) * C
            _interior_run(xf, rep, run_pixels * C, o, np.uint64(pa * C), a0, dc, rs, count)
        for p in range(OW):
            b = np.uint64(p * C)
            if run and pa <= p < pb:
                continue
            if inside and pa <= p < pb:
                a = a_row + np.uint64((p * stride_w - pad_left) * C)
                a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window3(a, dc, rs)
                for c in range(C):
                    cu = np.uint64(c)
                    acc = bias[cu]
                    acc += xf[a0 + cu] * wf[cu]
                    acc += xf[a1 + cu] * wf[w1 + cu]
                    acc += xf[a2 + cu] * wf[w2 + cu]
                    acc += xf[a3 + cu] * wf[w3 + cu]
                    acc += xf[a4 + cu] * wf[w4 + cu]
                    acc += xf[a5 + cu] * wf[w5 + cu]
                    acc += xf[a6 + cu] * wf[w6 + cu]
                    acc += xf[a7 + cu] * wf[w7 + cu]
                    acc += xf[a8 + cu] * wf[w8 + cu]
                    o[b + cu] = acc
            else:
                _pixel_by_taps(
                    xr,
                    wt,
                    bias,
                    o,
                    b,
                    n,
                    oh,
                    p,
                    H,
                    W,
                    C,
                    stride_h,
                    stride_w,
                    pad_top,
                    pad_left,
                    dil_h,
                    dil_w,
                )
        if affine:
            _batch_norm_rows(of[row * OW * C : (row + 1) * OW * C], C, bn, relu, row * OW * C)
        elif relu:
            for q in range(OW * C):
                v = o[np.uint64(q)]
                o[np.uint64(q)] = zero if v <= zero else v


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
