"""Max and average pooling over channels-last (NHWC) arrays, vectorised over the channels.

Shape contract (checked by the caller, fastcnn.functional, never here), all C-contiguous:
x, dx (N, H, W, C); out, dy, argmax (N, OH, OW, C); argmax int64. Padding is given as top/left
offsets; the bottom/right padding is whatever the output shape implies:
``OH = (H + pad_top + pad_bottom - KH) // stride_h + 1``. Every output window must hold at least
one input cell (PyTorch's ``padding <= kernel // 2``); a window that holds none gets ``-inf`` and
argmax ``-1``, which the backward skips.

Max pooling follows PyTorch: window cells are visited in row-major order and replace the current
maximum when greater or NaN, so the first of equal maxima wins and a NaN is selected (the last
one if there are several). Padded cells are never selected. argmax is the flat index
``h * W + w`` of the selected cell in its (unpadded) input plane, PyTorch's ``return_indices``.

Average pooling divides by ``KH * KW`` (PyTorch's ``count_include_pad=True``).

In NHWC one window position covers C adjacent values per cell, so every inner loop runs over
the channels, contiguous, and vectorises (C = 32 or 64 in the reference network). A 2x2
window wholly inside the input (the reference network's) takes its four cells at once
(``max4``): the running maximum stays in registers instead of making a round trip through the
output per cell.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _window(o, stride, pad, kernel, size):
    """[lo, hi) of the input indices of window o, clamped to the input."""
    lo = o * stride - pad
    return max(lo, 0), min(lo + kernel, size)


@njit(cache=True, inline="always")
def _max4_cell(c0, c1, c2, c3, c, k0, k1, k2, k3):
    """(maximum, its cell) of c0[c]..c3[c] in this order, greater or NaN replaces: selects."""
    m = c0[c]
    a = k0
    v = c1[c]
    t = (v > m) | (v != v)
    m = v if t else m
    a = k1 if t else a
    v = c2[c]
    t = (v > m) | (v != v)
    m = v if t else m
    a = k2 if t else a
    v = c3[c]
    t = (v > m) | (v != v)
    return (v if t else m), (k3 if t else a)


@njit(cache=True, inline="always")
def max4(c0, c1, c2, c3, relu, k0, k1, k2, k3, y, am):
    """y[c], am[c] = the maximum over the cells c0..c3 (C,) of a 2x2 window, in row-major order,
    greater or NaN replaces, and its index k0..k3; of relu(cells) if ``relu`` (the same maximum
    and cell, but 0 and the first cell when no cell is > 0).

    Selects, no branches, and ``relu`` tested outside the loop: written with the ReLU inside
    the compares (``(not relu) | ...``), LLVM did not vectorise it (4.7x slower); as a second
    pass over y and am, it would become masked stores. The cells are compared as int32 (a plane
    has < 2**31 cells), stored as am's dtype.
    """
    k0 = np.int32(k0)
    k1 = np.int32(k1)
    k2 = np.int32(k2)
    k3 = np.int32(k3)
    if relu:
        for c in range(y.shape[0]):
            m, a = _max4_cell(c0, c1, c2, c3, c, k0, k1, k2, k3)
            keep = (m > 0) | (m != m)
            y[c] = m if keep else 0
            am[c] = a if keep else k0
    else:
        for c in range(y.shape[0]):
            m, a = _max4_cell(c0, c1, c2, c3, c, k0, k1, k2, k3)
            y[c] = m
            am[c] = a


@njit(cache=True)
def _maxpool_forward_row(t, x, kh, kw, stride_h, stride_w, pad_top, pad_left, out, argmax):
    """maxpool2d_forward for output row t = (n, oh) (serial: the kernel's prange body, a
    function of its own as _maxpool_backward_image is)."""
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    n = t // OH
    oh = t - n * OH
    h0, h1 = _window(oh, stride_h, pad_top, kh, H)
    for ow in range(OW):
        w0, w1 = _window(ow, stride_w, pad_left, kw, W)
        m = out[n, oh, ow]
        a = argmax[n, oh, ow]
        if h1 - h0 == 2 and w1 - w0 == 2 and kh == 2 and kw == 2:
            k = h0 * W + w0
            max4(
                x[n, h0, w0],
                x[n, h0, w0 + 1],
                x[n, h0 + 1, w0],
                x[n, h0 + 1, w0 + 1],
                False,
                k,
                k + 1,
                k + W,
                k + W + 1,
                m,
                a,
            )
            continue
        if h0 >= h1 or w0 >= w1:
            for c in range(C):
                m[c] = -np.inf
                a[c] = -1
            continue
        first = x[n, h0, w0]
        for c in range(C):
            m[c] = first[c]
            a[c] = h0 * W + w0
        for h in range(h0, h1):
            for w in range(w0, w1):
                if h == h0 and w == w0:
                    continue
                v = x[n, h, w]
                k = h * W + w
                for c in range(C):
                    # | not `or`: no branch per channel, the loop vectorises to selects
                    take = (v[c] > m[c]) | (v[c] != v[c])
                    m[c] = v[c] if take else m[c]
                    a[c] = k if take else a[c]


@njit(parallel=True, cache=True)
def maxpool2d_forward(x, kh, kw, stride_h, stride_w, pad_top, pad_left, out, argmax):
    """out[n, oh, ow, c] = max of the window, argmax = its flat index h * W + w in the plane.

    prange over output rows (n, oh); per window the running maximum of all C channels at once.
    """
    N, OH = x.shape[0], out.shape[1]
    for t in prange(N * OH):  # np.int64: one signature of the helper (see conv2d_backward_input)
        _maxpool_forward_row(
            np.int64(t), x, kh, kw, stride_h, stride_w, pad_top, pad_left, out, argmax
        )


@njit(cache=True)
def _maxpool_backward_image(n, dy, argmax, y, relu, kh, kw, tiled, dx):
    """maxpool2d_backward for image n (serial: the kernel's prange body; as a function of its
    own the parallel kernel compiles in half the time)."""
    OH, OW, C = dy.shape[1], dy.shape[2], dy.shape[3]
    H, W = dx.shape[1], dx.shape[2]
    if tiled:
        for oh in range(OH):
            for ow in range(OW):
                g = dy[n, oh, ow]
                a = argmax[n, oh, ow]
                m = y[n, oh, ow]
                for h in range(oh * kh, oh * kh + kh):
                    for w in range(ow * kw, ow * kw + kw):
                        d = dx[n, h, w]
                        k = h * W + w
                        # & not `and`: selects, no branch per channel; relu tested out
                        # here (inside the select, `(not relu) | ...`, it stopped LLVM
                        # from vectorising the loop)
                        if relu:
                            for c in range(C):
                                d[c] = g[c] if (a[c] == k) & (m[c] > 0) else 0
                        else:
                            for c in range(C):
                                d[c] = g[c] if a[c] == k else 0
        for h in range(H):  # the cells past the last window
            w_start = 0 if h >= OH * kh else OW * kw
            for w in range(w_start, W):
                d = dx[n, h, w]
                for c in range(C):
                    d[c] = 0
    else:
        img = dx[n].reshape(H * W * C)
        for e in range(img.size):
            img[e] = 0
        for oh in range(OH):
            for ow in range(OW):
                g = dy[n, oh, ow]
                a = argmax[n, oh, ow]
                m = y[n, oh, ow]
                for c in range(C):
                    k = a[c]
                    if k >= 0 and (not relu or m[c] > 0):
                        img[k * C + c] += g[c]


@njit(parallel=True, cache=True)
def maxpool2d_backward(dy, argmax, y, relu, kh, kw, stride_h, stride_w, pad_top, pad_left, dx):
    """dx[n, h, w, c] = sum of dy over the windows whose argmax (for channel c) is (h, w).

    With ``relu``, also the gradient through a ReLU applied *before* the pooling, fused: y
    (N, OH, OW, C) is the pooling's output, i.e. the ReLU output at the selected cell, so the
    ReLU passes a window's gradient exactly where y > 0 (a NaN or 0 maximum passes nothing, as
    ReLU's own backward). Without ``relu``, y is not read (pass any array of dy's shape).

    Windows that do not overlap and lie inside the input (stride = kernel, no padding: the
    reference network's 2x2 pools) write every cell they cover once, by comparing its index with
    argmax, so dx needs no zeroing pass and no division; the cells no window covers are zeroed.
    Other windows, or kh = kw = 0 (geometry not given): dx zeroed, then each dy added at its
    argmax.
    Parallel over images (windows of one image may share cells).
    """
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    tiled = (
        kh > 0
        and kw > 0
        and kh == stride_h
        and kw == stride_w
        and pad_top == 0
        and pad_left == 0
        and OH * kh <= H
        and OW * kw <= W
    )  # no window hangs over the bottom/right
    for n in prange(N):  # np.int64: one signature of the helper (see conv2d_backward_input)
        _maxpool_backward_image(np.int64(n), dy, argmax, y, relu, kh, kw, tiled, dx)


@njit(cache=True)
def _avg_row(xf, of, n, oh, H, W, C, OH, OW, h0, h1, kw, stride_w, pad_left, divisor):
    """Output row oh of image n: of[(n, oh, ow, c)] = the window's in-bounds cells summed in
    order (rows, then columns) from zero, / divisor. x and out flat, NHWC. The row is summed
    one window cell (h, j) at a time across all its pixels: window by window (a short loop
    over the channels per cell) ran slower."""
    u = np.uint64
    zero = of.dtype.type(0)
    o = u((n * OH + oh) * OW * C)
    for q in range(OW * C):
        of[o + u(q)] = zero
    for h in range(h0, h1):
        base = (n * H + h) * W
        for j in range(kw):
            for ow in range(OW):
                w = ow * stride_w - pad_left + j
                if 0 <= w < W:
                    i = u((base + w) * C)
                    d = o + u(ow * C)
                    for c in range(C):
                        of[d + u(c)] += xf[i + u(c)]
    for q in range(OW * C):
        of[o + u(q)] /= divisor


@njit(parallel=True, cache=True)
def avgpool2d_forward(x, kh, kw, stride_h, stride_w, pad_top, pad_left, out):
    """out[n, oh, ow, c] = sum of the window's in-bounds cells / (kh * kw)."""
    N, H, W, C = x.shape
    OH, OW = out.shape[1], out.shape[2]
    divisor = out.dtype.type(kh * kw)
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for t in prange(N * OH):
        n = t // OH
        oh = t - n * OH
        h0, h1 = _window(oh, stride_h, pad_top, kh, H)
        _avg_row(xf, of, n, oh, H, W, C, OH, OW, h0, h1, kw, stride_w, pad_left, divisor)


@njit(cache=True)
def _avg_image_backward(
    dyf, dxf, n, H, W, C, OH, OW, kh, kw, stride_h, stride_w, pad_top, pad_left, divisor, share
):
    """Image n of dx (flat, NHWC) = 0, then each output adds dy / divisor to its window's
    in-bounds cells, in order of the outputs (rows, then columns): for each output row, one
    window row h at a time across all the row's outputs. share: (OW * C,) scratch."""
    u = np.uint64
    zero = dxf.dtype.type(0)
    img = u(n * H * W * C)
    for e in range(H * W * C):
        dxf[img + u(e)] = zero
    for oh in range(OH):
        h0, h1 = _window(oh, stride_h, pad_top, kh, H)
        g0 = u((n * OH + oh) * OW * C)
        for q in range(OW * C):  # each output's share, divided once (not once per cell)
            share[q] = dyf[g0 + u(q)] / divisor
        for h in range(h0, h1):
            base = (n * H + h) * W
            for ow in range(OW):
                g = u(ow * C)
                for j in range(kw):
                    w = ow * stride_w - pad_left + j
                    if 0 <= w < W:
                        d = u((base + w) * C)
                        for c in range(C):
                            dxf[d + u(c)] += share[g + u(c)]


@njit(parallel=True, cache=True)
def avgpool2d_backward(dy, kh, kw, stride_h, stride_w, pad_top, pad_left, dx):
    """dx = 0, then each output adds dy / (kh * kw) to the in-bounds cells of its window.
    Parallel over images (windows of one image may share cells)."""
    N, OH, OW, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    divisor = dx.dtype.type(kh * kw)
    dyf = dy.reshape(dy.size)
    dxf = dx.reshape(dx.size)
    shares = np.empty((N, OW * C), dtype=dx.dtype)
    for n in prange(N):
        # np.int64(n): n is uint64 in the loop body numba builds (see conv2d.conv2d_backward_input):
        # passed as it is, the helper compiled a second time
        _avg_image_backward(
            dyf,
            dxf,
            np.int64(n),
            H,
            W,
            C,
            OH,
            OW,
            kh,
            kw,
            stride_h,
            stride_w,
            pad_top,
            pad_left,
            divisor,
            shares[n],
        )


@njit(parallel=True, cache=True)
def global_avgpool2d_forward(x, out):
    """out[n, c] = the mean of x[n, :, :, c]: the plane's cells summed in row-major order, then
    divided by H * W. x (N, H, W, C), out (N, C). Parallel over images."""
    N, H, W, C = x.shape
    divisor = out.dtype.type(H * W)
    for n in prange(N):
        s = out[n]
        for c in range(C):
            s[c] = 0
        for h in range(H):
            for w in range(W):
                v = x[n, h, w]
                for c in range(C):
                    s[c] += v[c]
        for c in range(C):
            s[c] /= divisor


@njit(parallel=True, cache=True)
def global_avgpool2d_backward(dy, dx):
    """dx[n, h, w, c] = dy[n, c] / (H * W). dy (N, C), dx (N, H, W, C). Parallel over images."""
    N, H, W, C = dx.shape
    divisor = dx.dtype.type(H * W)
    for n in prange(N):
        g = dy[n]
        for h in range(H):
            for w in range(W):
                d = dx[n, h, w]
                for c in range(C):
                    d[c] = g[c] / divisor
