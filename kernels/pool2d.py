"""Max and average pooling over NCHW arrays, parallel over the (n, c) planes.

Shape contract (checked by the caller, fastcnn.functional, never here):
x (N, C, H, W); out, argmax (N, C, OH, OW); dx (N, C, H, W); dy (N, C, OH, OW); argmax int64.
Padding is given as top/left offsets; the bottom/right padding is whatever the output shape
implies: ``OH = (H + pad_top + pad_bottom - KH) // stride_h + 1``. Every output window must hold
at least one input cell (PyTorch's ``padding <= kernel // 2``); a window that holds none gets
``-inf`` and argmax ``-1``, which the backward skips.

Max pooling follows PyTorch: window cells are visited in row-major order and replace the current
maximum when greater or NaN, so the first of equal maxima wins and a NaN is selected (the last
one if there are several). Padded cells are never selected. argmax is the flat index
``h * W + w`` in the unpadded input plane (PyTorch's ``return_indices``).

Average pooling divides by ``KH * KW`` (PyTorch's ``count_include_pad=True``).
"""
import numpy as np
from numba import njit, prange

_CHUNKS = 64  # planes are split into at most this many chunks, each with its scratch row


@njit(cache=True, inline="always")
def _maxpool_plane_2x2(xp, yf, af, oh_, ow_, w_, sv, si):
    """The reference network's pool: 2x2 windows, stride 2, every window inside the plane.

    Vertical pairs first, into the scratch rows ``sv``/``si`` (values, flat indices; OH x 2*OW,
    contiguous), then horizontal pairs over the whole scratch as one flat loop: both loops
    vectorise, where a loop over the OW outputs of one row (13 or 5 here) would stay scalar.
    Pairing vertically first changes the visiting order, so the last step compares indices to
    keep PyTorch's rule: of equal values the smaller index wins, of two NaNs the larger index.
    The comparisons use ``&``/``|`` on purpose: short-circuit ``and``/``or`` become branches
    that random data mispredicts in the scalar remainders.
    """
    w2 = 2 * ow_
    for oh in range(oh_):
        top = xp[2 * oh, :w2]
        bottom = xp[2 * oh + 1, :w2]
        svr = sv[oh * w2:(oh + 1) * w2]
        sir = si[oh * w2:(oh + 1) * w2]
        base = 2 * oh * w_
        for w in range(w2):
            a = top[w]
            b = bottom[w]
            take = (b > a) | (b != b)
            svr[w] = b if take else a
            sir[w] = (base + w_ + w) if take else (base + w)
    for q in range(oh_ * ow_):
        vl = sv[2 * q]
        vr = sv[2 * q + 1]
        il = si[2 * q]
        ir = si[2 * q + 1]
        left_nan = vl != vl
        right_nan = vr != vr
        take = ((vr > vl) | (right_nan & (vl == vl)) | ((vr == vl) & (ir < il))
                | (right_nan & left_nan & (ir > il)))
        yf[q] = vr if take else vl
        af[q] = ir if take else il


@njit(cache=True, inline="always")
def _maxpool_plane(xp, yp, ap, kh, kw, sh, sw, pt, pl, oh_, ow_, h_, w_):
    """Any window: clamp it to the plane, then scan it row-major."""
    for oh in range(oh_):
        h0 = oh * sh - pt
        h1 = min(h0 + kh, h_)
        h0 = max(h0, 0)
        for ow in range(ow_):
            w0 = ow * sw - pl
            w1 = min(w0 + kw, w_)
            w0 = max(w0, 0)
            if h0 >= h1 or w0 >= w1:
                yp[oh, ow] = -np.inf
                ap[oh, ow] = -1
                continue
            m = xp[h0, w0]
            k = h0 * w_ + w0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    v = xp[h, w]
                    take = (v > m) | (v != v)
                    m = v if take else m
                    k = (h * w_ + w) if take else k
            yp[oh, ow] = m
            ap[oh, ow] = k


@njit(parallel=True, cache=True)
def maxpool2d_forward(x, kh, kw, stride_h, stride_w, pad_top, pad_left, out, argmax):
    """out[n, c, oh, ow] = max of the window, argmax = its flat index h * W + w in the plane.

    out and argmax C-contiguous (the caller allocates them); x any layout.
    """
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    planes = n_ * c_
    if (kh == 2 and kw == 2 and stride_h == 2 and stride_w == 2 and pad_top == 0
            and pad_left == 0 and 2 * oh_ <= h_ and 2 * ow_ <= w_):
        # Planes in chunks, one scratch row per chunk (allocated here, outside the prange).
        # (numba.get_num_threads() here would stop the caching: a dynamic global.)
        chunks = max(1, min(planes, _CHUNKS))
        step = (planes + chunks - 1) // chunks
        sv = np.empty((chunks, 2 * oh_ * ow_), dtype=out.dtype)
        si = np.empty((chunks, 2 * oh_ * ow_), dtype=argmax.dtype)
        for chunk in prange(chunks):
            for p in range(chunk * step, min(planes, (chunk + 1) * step)):
                n = p // c_
                c = p - n * c_
                _maxpool_plane_2x2(x[n, c], out[n, c].reshape(-1), argmax[n, c].reshape(-1),
                                   oh_, ow_, w_, sv[chunk], si[chunk])
    else:
        for p in prange(planes):
            n = p // c_
            c = p - n * c_
            _maxpool_plane(x[n, c], out[n, c], argmax[n, c], kh, kw, stride_h, stride_w,
                           pad_top, pad_left, oh_, ow_, h_, w_)


@njit(parallel=True, cache=True)
def maxpool2d_backward(dy, argmax, dx):
    """dx = 0, then dx.flat[argmax] += dy within each plane (overlapping windows add up).

    dx C-contiguous (the caller allocates it); dy and argmax any layout.
    """
    n_, c_ = dx.shape[0], dx.shape[1]
    oh_, ow_ = dy.shape[2], dy.shape[3]
    zero = dx.dtype.type(0)
    for p in prange(n_ * c_):
        n = p // c_
        c = p - n * c_
        dxf = dx[n, c].reshape(-1)  # a flat view: the zeroing vectorises, no division below
        for i in range(dxf.size):
            dxf[i] = zero
        dyp = dy[n, c]
        ap = argmax[n, c]
        for oh in range(oh_):
            for ow in range(ow_):
                k = ap[oh, ow]
                if k >= 0:
                    dxf[k] += dyp[oh, ow]


@njit(parallel=True, cache=True)
def avgpool2d_forward(x, kh, kw, stride_h, stride_w, pad_top, pad_left, out):
    """out[n, c, oh, ow] = sum of the window's in-bounds cells / (kh * kw)."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    divisor = out.dtype.type(kh * kw)
    for p in prange(n_ * c_):
        n = p // c_
        c = p - n * c_
        xp = x[n, c]
        yp = out[n, c]
        for oh in range(oh_):
            h0 = oh * stride_h - pad_top
            h1 = min(h0 + kh, h_)
            h0 = max(h0, 0)
            for ow in range(ow_):
                w0 = ow * stride_w - pad_left
                w1 = min(w0 + kw, w_)
                w0 = max(w0, 0)
                total = out.dtype.type(0)
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        total += xp[h, w]
                yp[oh, ow] = total / divisor


@njit(parallel=True, cache=True)
def avgpool2d_backward(dy, kh, kw, stride_h, stride_w, pad_top, pad_left, dx):
    """dx = 0, then each output adds dy / (kh * kw) to the in-bounds cells of its window."""
    n_, c_, h_, w_ = dx.shape
    oh_, ow_ = dy.shape[2], dy.shape[3]
    divisor = dx.dtype.type(kh * kw)
    zero = dx.dtype.type(0)
    for p in prange(n_ * c_):
        n = p // c_
        c = p - n * c_
        dxp = dx[n, c]
        dyp = dy[n, c]
        for h in range(h_):
            for w in range(w_):
                dxp[h, w] = zero
        for oh in range(oh_):
            h0 = oh * stride_h - pad_top
            h1 = min(h0 + kh, h_)
            h0 = max(h0, 0)
            for ow in range(ow_):
                w0 = ow * stride_w - pad_left
                w1 = min(w0 + kw, w_)
                w0 = max(w0, 0)
                share = dyp[oh, ow] / divisor
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        dxp[h, w] += share
