"""Convolution + ReLU + max pooling forward in one pass, over channels-last (NHWC) arrays.

The reference network's Conv2D -> ReLU -> MaxPool2D(2) written separately stores the whole
convolution output (5.5 MB at batch 64 for its first layer) only for the pooling to read it
back and keep a quarter of it. Here each work item computes the convolution rows of one pooled
row (a *band*: ``pkh`` conv rows, the ``PW * pkw`` columns the pooling reads) into a scratch
that stays in cache, with bias and ReLU, and pools it at once: the convolution output never
reaches memory, and the rows and columns the pooling drops (the 11th of 11) are not computed.

The results are bitwise those of ``conv2d_forward`` then ``maxpool2d_forward``: the same tiles
sum the same terms in the same order, and the pooling visits the band's cells in the same
row-major order with the same rule (greater or NaN replaces; the first of equal maxima wins).

Shapes (checked by fastcnn.functional): x (N, H, W, C), weight (F, C, KH, KW), bias (F,); the
convolution's output would be (N, OH, OW, F); the pooling's windows are pkh x pkw with stride
pkh x pkw, no padding, so out and argmax are (N, OH // pkh, OW // pkw, F); argmax is the flat
index ``oh * OW + ow`` of the selected cell in the convolution's output plane, as the pooling
alone would give.
"""
import numpy as np
from numba import njit, prange

from .conv2d import _pack_weight, _padded_input, _read_extent, _tap_offsets
from .gemm_tile import FT, R, gemm_tile

#: Scratch buffers (one per chunk of work items): enough chunks to keep 2 threads balanced.
_CHUNKS = 64


@njit(cache=True)
def _operands(x, weight, pad_top, pad_left, Hp, Wp, dil_h, dil_w, Fp):
    """The tiles' operands: the (padded) input flat, the weights as (tap, filter) flat, the tap
    offsets, and the padded input's height and width. (Serial on purpose: in the parallel
    kernel this setup cost 2.5 s of numba's array analysis at the first compilation.)"""
    F, C, KH, KW = weight.shape
    K = KH * KW * C
    xp = _padded_input(x, pad_top, pad_left, Hp, Wp)
    XH, XW = xp.shape[1], xp.shape[2]
    wp = np.empty((K, Fp), dtype=x.dtype)
    _pack_weight(weight, wp, 0, K)
    koff = np.empty(K, dtype=np.uint64)
    _tap_offsets(koff, K, KH, KW, C, dil_h * XW * C, dil_w * C)
    return xp.reshape(xp.size), wp.reshape(wp.size), koff, XH, XW


# ---- one chunk of work items (serial helpers: a prange body is compiled twice, these once) ----

@njit(cache=True)
def _band_pixels(px, i0, i1, PH, rows, band, BW, pkh, image, XW, C, stride_h, stride_w):
    """px[(item - i0) * rows + b] = offset in the padded input of band pixel b's window
    corner, for items [i0, i1); a tile's padding rows repeat the band's last pixel."""
    for item in range(i0, i1):
        n = item // PH
        ph = item - n * PH
        q = (item - i0) * rows
        for b in range(rows):
            bb = min(b, band - 1)
            i = bb // BW
            px[q + b] = np.uint64(n * image + ((ph * pkh + i) * stride_h * XW
                                               + (bb - i * BW) * stride_w) * C)


@njit(cache=True)
def _conv_bands(xf, px, koff, K, wf, Fp, bias, ntiles, F, conv, tile):
    """conv[(pixel, f)] = bias[f] + the convolution at each band pixel (ntiles tiles of R)."""
    for f0 in range(0, F, FT):
        nf = min(FT, F - f0)
        for t in range(ntiles):
            gemm_tile(xf, px[t * R:t * R + R], koff, 0, K, wf, np.uint64(f0), np.uint64(Fp),
                      tile, False)
            for r in range(R):
                dst = conv[(t * R + r) * F + f0:(t * R + r) * F + f0 + nf]
                for f in range(nf):
                    dst[f] = tile[r * FT + f] + bias[f0 + f]


@njit(cache=True)
def _pool_bands(conv, i0, i1, PH, PW, rows, BW, pkh, pkw, OW, F, relu, m, a, out, argmax):
    """The pooling of the bands of items [i0, i1), as maxpool2d_forward (row-major cells,
    greater or NaN replaces), on relu(conv) if ``relu``: m, a are scratch (F,)."""
    for item in range(i0, i1):
        n = item // PH
        ph = item - n * PH
        base = (item - i0) * rows
        for pw in range(PW):
            for i in range(pkh):
                for j in range(pkw):
                    q = (base + i * BW + pw * pkw + j) * F
                    src = conv[q:q + F]
                    k = np.int32(i * OW + j)  # the cell, as an offset from the window's corner
                    first = i == 0 and j == 0
                    for f in range(F):
                        v = src[f]
                        # the ReLU here, not in a pass of its own (0.36 ms at conv1);
                        # | not `or`: selects, no branches
                        v = v if (not relu) | (v > 0) | (v != v) else 0
                        take = first | (v > m[f]) | (v != v)
                        m[f] = v if take else m[f]
                        a[f] = k if take else a[f]
            y = out[n, ph, pw]
            am = argmax[n, ph, pw]
            corner = (ph * pkh) * OW + pw * pkw
            for f in range(F):
                y[f] = m[f]
                am[f] = corner + a[f]


@njit(parallel=True, cache=True)
def conv2d_relu_maxpool2d_forward(x, weight, bias, stride_h, stride_w, pad_top, pad_left, dil_h,
                                  dil_w, OH, OW, relu, pkh, pkw, out, argmax):
    """out = maxpool(relu(conv2d(x))) (ReLU only if ``relu``), argmax its indices in the conv
    plane; out, argmax (N, PH, PW, F) overwritten. OH, OW: the convolution's output size."""
    N, H, W, C = x.shape
    F, _, KH, KW = weight.shape
    PH, PW = out.shape[1], out.shape[2]
    BW = PW * pkw  # conv columns the pooling reads
    band = pkh * BW  # conv pixels per pooled row
    ntb = (band + R - 1) // R  # tiles per band
    rows = ntb * R
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    K = KH * KW * C
    nfb = (F + FT - 1) // FT
    Fp = nfb * FT
    nitems = N * PH
    nchunks = min(nitems, _CHUNKS)
    step = (nitems + nchunks - 1) // nchunks
    dt = x.dtype

    xf, wf, koff, XH, XW = _operands(x, weight, pad_top, pad_left, Hp, Wp, dil_h, dil_w, Fp)
    pix = np.empty((nchunks, step * rows), dtype=np.uint64)  # window corner of each pixel
    scratch = np.empty((nchunks, step * rows * F), dtype=dt)  # (item, band pixel, filter)
    best = np.empty((nchunks, F), dtype=dt)  # running maximum of a window
    cell = np.empty((nchunks, F), dtype=np.int32)  # and its cell
    tiles = np.empty((nchunks, R * FT), dtype=dt)
    for chunk in prange(nchunks):
        i0 = chunk * step
        i1 = min(i0 + step, nitems)
        _band_pixels(pix[chunk], i0, i1, PH, rows, band, BW, pkh, XH * XW * C, XW, C,
                     stride_h, stride_w)
        _conv_bands(xf, pix[chunk], koff, K, wf, Fp, bias, (i1 - i0) * ntb, F, scratch[chunk],
                    tiles[chunk])
        _pool_bands(scratch[chunk], i0, i1, PH, PW, rows, BW, pkh, pkw, OW, F, relu,
                    best[chunk], cell[chunk], out, argmax)
