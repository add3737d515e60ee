"""2-D convolution kernels over channels-last (NHWC) arrays (cross-correlation, as PyTorch's).

Shapes: x (N, H, W, C), weight (F, C, KH, KW) (PyTorch's layout), bias (F,), out / dy
(N, OH, OW, F). ``fastcnn.functional`` hands the kernels NHWC views of the NCHW arrays users see
(PyTorch's ``channels_last`` memory format): the activations of a network stay NHWC from layer to
layer, and a 1-channel NCHW image already is one. Padding is given as top/left offsets; the
bottom/right padding is whatever the output array's shape implies. Output (oh, ow) and kernel
tap (i, j) read input row ``oh*stride_h - pad_top + i*dil_h`` and column
``ow*stride_w - pad_left + j*dil_w``; positions outside the image are zeros:

    out[n, oh, ow, f] = bias[f] + sum_{i, j, c} weight[f, c, i, j]
                                    * x[n, oh*sh - pt + i*dh, ow*sw - pl + j*dw, c]

Contract: the kernels trust their inputs (validation lives in fastcnn.functional). All arrays
C-contiguous with the shapes above and one floating dtype (float32 or float64, compiled lazily,
float32 never promoted to float64); integers are plain Python ints (stride, dilation >= 1,
padding >= 0), N >= 1. Outputs are overwritten, never accumulated, every element written.

How it is computed. Each kernel is a matrix product over the implicit im2col matrix, computed
tile by tile by ``gemm_tile`` (3 x 32 accumulators in registers), never built. In NHWC every
tap of an output pixel is one offset away from the pixel's window corner: x[pixel offset + tap
offset], with tap offset ``(i*dh*W + j*dw)*C + c``. Padding, if any, is a zero-padded copy of x
holding exactly the rows and columns the windows read, so no tile tests bounds.

- Forward: rows = output pixels, k = taps, columns = filters (weights packed as (tap, filter),
  filters padded to the tile's 32 columns; a last block of at most 16 filters, as 48's, runs
  on the narrow tile); the tile's sums start at the bias and are stored straight from the
  registers (ReLU applied there).
- Backward-input: rows = output pixels, k = filters, columns = taps: the col2im product
  dy @ W, each tile added into the (padded) gradient of its own image at the pixels its taps read.
- Backward-weight: rows = taps, k = pixels, columns = filters (a last block of at most 16
  filters on the narrow tile, as the forward's); the output tiles split among a fixed number
  of units, each summing all pixels in order, block by block.

Parallelism and determinism: forward over chunks of pixel tiles, backward-input over images (a
tile adds only into its own image), backward-weight over a fixed number of units of output
tiles. No two iterations write the same element and no summation order depends on the
thread count or the scheduling: results are bitwise identical on repeated calls and for any
number of threads. Scratch arrays are allocated once per call, outside every prange body.
"""

import numpy as np
from numba import njit, prange

from .batchnorm import chunk_affine_inplace, chunk_affine_relu_inplace
from .gemm_tile import (
    FT,
    FTN,
    LINE,
    RN,
    RT,
    TALL,
    R,
    gemm_tile,
    gemm_tile_bias,
    gemm_tile_bias_tall,
    gemm_tile_tall,
    tile_shape,
)
from .lanes import batch_norm16

#: Pixel tiles per forward work item (48 output pixels).
_TILES_PER_ITEM = 16
# an item's pixels are whole narrow tiles too (_forward_tiles' last filters): else its last
# narrow tile would read the next item's rows, outside the worker's padded buffer
assert _TILES_PER_ITEM * R % RN == 0 and _TILES_PER_ITEM * RT % RN == 0
#: Weight gradient: units of work (fixed numbers, so results do not depend on the thread count)
#: when the output has many tiles, pixels per cache block then (64: 1.55x faster than 128-512
#: at conv2's shape, measured A/B), and pixel chunks when it has few.
_WEIGHT_UNITS = 8
_PIXEL_BLOCK = 64
_WEIGHT_CHUNKS = 16
#: Weight gradient: at most FT filters and at most this many terms per pixel (taps x channels)
#: sum over pixel chunks, however many tap tiles (see _weight_in_pixel_order).
_CHUNKED_MAX_TERMS = 160


# ---- operand preparation, done once per call before the tiles run ----


@njit(cache=True)
def _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w):
    """Rows and columns of the (padded) input that the windows read."""
    return (OH - 1) * stride_h + (KH - 1) * dil_h + 1, (OW - 1) * stride_w + (KW - 1) * dil_w + 1


@njit(cache=True)
def _needs_padding(x, pad_top, pad_left, Hp, Wp):
    """True unless every window lies inside x (then x itself is the operand, no copy)."""
    return pad_top > 0 or pad_left > 0 or Hp > x.shape[1] or Wp > x.shape[2]


@njit(cache=True)
def _pad_row(xf, xpf, d0, s0, ih, H, row, a, b):
    """One row of the zero-padded copy, flat: xpf[d0 : d0 + row] = zeros, then (if input row
    ih lies in the image) xf[s0 : s0 + b - a] at [d0 + a, d0 + b). Flat runs with unsigned
    offsets: a loop over each pixel's channels with its test, or a slice per row (reference
    counting), ran several times slower than numpy's copy."""
    u = np.uint64
    zero = xpf.dtype.type(0)
    d0 = u(d0)
    if ih < 0 or ih >= H:
        a, b = row, row
    for q in range(a):
        xpf[d0 + u(q)] = zero
    dd, ss = d0 + u(a), u(s0)
    for q in range(b - a):
        xpf[dd + u(q)] = xf[ss + u(q)]
    for q in range(b, row):
        xpf[d0 + u(q)] = zero


@njit(cache=True)
def _pad_rows(xf, xpf, t0, t1, x_shape, Hp, Wp, pad_top, pad_left):
    """Rows t0 <= t < t1 of x's zero-padded copy (N, Hp, Wp, C), row t = n*Hp + r, written flat
    from xpf[0] on: the whole copy (t0 = 0, t1 = N*Hp), or the rows one work item reads."""
    N, H, W, C = x_shape
    left = min(pad_left, Wp)  # padded columns before the image, then the image's that fit
    inside = max(0, min(W, Wp - left))
    for t in range(t0, t1):
        n, r = t // Hp, t % Hp
        ih = r - pad_top
        s0 = ((n * H + ih) * W) * C if 0 <= ih < H else 0
        _pad_row(xf, xpf, (t - t0) * Wp * C, s0, ih, H, Wp * C, left * C, (left + inside) * C)


@njit(cache=True)
def _item_rows(pix, koff, item, ntiles, rows, row):
    """(first, count): the rows of the padded input that forward work item ``item``'s windows
    read (corners pix, taps koff, ``row`` values per padded row; pix is non-decreasing)."""
    t0 = item * _TILES_PER_ITEM
    t1 = min(t0 + _TILES_PER_ITEM, ntiles)
    first = pix[t0 * rows] // row
    last = (pix[t1 * rows - 1] + koff[koff.size - 1]) // row
    return np.int64(first), np.int64(last - first) + 1


@njit(cache=True)
def _padded_input(x, pad_top, pad_left, Hp, Wp, pad=True):
    """x itself when every window lies inside it (or ``pad`` is False), else its zero-padded
    copy (N, Hp, Wp, C).

    A function of its own on purpose: written inline in a kernel (``xp = x``, then in a branch
    ``xp = np.empty(...)`` filled by a prange), numba 0.68.1 computed the kernel with the
    unpadded x: wrong results, no error. Serial: a copy, little work next to the product, and
    as a parallel function it cost 2 s of compilation in every kernel's first run (the
    reference network has no padding).
    """
    if not (pad and _needs_padding(x, pad_top, pad_left, Hp, Wp)):
        return x
    N, H, W, C = x.shape
    xp = np.empty((N, Hp, Wp, C), dtype=x.dtype)
    # np.int64(0): a literal 0 would compile _pad_rows a second time (conv2d_forward passes int64)
    _pad_rows(
        x.reshape(x.size),
        xp.reshape(xp.size),
        np.int64(0),
        N * Hp,
        x.shape,
        Hp,
        Wp,
        pad_top,
        pad_left,
    )
    return xp


@njit(cache=True)
def _padded_rows(dy, width):
    """dy (N, OH, OW, F) as flat rows of ``width`` >= F per pixel: itself if width == F, else a
    copy with zero columns (a function of its own, serial: see _padded_input)."""
    F = dy.shape[3]
    if width == F:
        return dy.reshape(dy.size)
    rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
    src = dy.reshape((rows, F))
    out = np.empty(rows * width, dtype=dy.dtype)
    for q in range(rows):
        for f in range(F):
            out[q * width + f] = src[q, f]
        for f in range(F, width):
            out[q * width + f] = 0
    return out


@njit(cache=True)
def _tap_offsets(out, count, KH, KW, C, row_step, col_step):
    """out[k] = i*row_step + j*col_step + c for tap k = (i*KW + j)*C + c < count; entries from
    ``count`` on repeat the last tap (the padding rows of a tile, never stored)."""
    k = 0
    for i in range(KH):
        for j in range(KW):
            for c in range(C):
                out[k] = np.uint64(i * row_step + j * col_step + c)
                k += 1
    for kk in range(count, out.shape[0]):
        out[kk] = out[count - 1]


@njit(cache=True)
def _pixel_offsets(out, N, OH, OW, image_step, row_step, col_step):
    """out[q] = n*image_step + oh*row_step + ow*col_step for pixel q = (n*OH + oh)*OW + ow of
    N images; entries from N*OH*OW on repeat the last pixel (the padding rows of a tile).
    Nested loops, no division per pixel (with one: 0.2 ms for conv1 at batch 64, a fifth of
    its forward)."""
    q = 0
    for n in range(N):
        for oh in range(OH):
            base = n * image_step + oh * row_step
            for ow in range(OW):
                out[q] = np.uint64(base + ow * col_step)
                q += 1
    for qq in range(q, out.shape[0]):
        out[qq] = out[q - 1]


@njit(cache=True)
def _pack_weight(weight, wp, k0, k1):
    """wp[k, f] = weight[f, c, i, j] for taps k = (i*KW + j)*C + c in [k0, k1); 0 for f >= F.
    The (tap, filter) matrix the forward's tiles read 32 filters at a time."""
    F, C, KH, KW = weight.shape
    Fp = wp.shape[1]
    for k in range(k0, k1):
        tap = k // C
        c = k - tap * C
        i = tap // KW
        j = tap - i * KW
        for f in range(F):
            wp[k, f] = weight[f, c, i, j]
        for f in range(F, Fp):
            wp[k, f] = 0


@njit(cache=True)
def _padded_bias(bias, Fp):
    """bias (F,) with zeros up to Fp: every tile reads 32 column biases."""
    out = np.zeros(Fp, dtype=bias.dtype)
    for f in range(bias.shape[0]):  # a loop: slice assignment pulls in seconds of compile
        out[f] = bias[f]
    return out


@njit(cache=True, inline="always")
def _kernel_tile_shape(narrow, tall):
    """(rows, columns) of a kernel's tile: the tall one, else tile_shape(narrow)."""
    return (RT, FT) if tall else tile_shape(narrow)


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _forward_tiles(
    xf, shift, pix, koff, K, wf, Fp, biasp, relu, t0, t1, npix, F, out, tile, narrow, tall
):
    """out[p*F + f] = biasp[f] + the convolution at pixel p (then max(., 0) if ``relu``), for
    the pixels of tiles [t0, t1) (tile_shape(narrow) rows, window corners shift + pix[p] in xf;
    rows from npix on are not stored). A last block of at most FTN filters (48 = 32 + 16) runs
    on the narrow tile over the same pixels, RN rows at a time (pix holds RN entries past the
    last tile's rows): the wide tile there would spend half its multiply-adds on zero columns.
    Whole tiles go straight from the registers into out, a partial one (the last filters or
    pixels) through the scratch ``tile`` (R*FT,). Serial: called from the parallel kernels'
    bodies."""
    rows, cols = _kernel_tile_shape(narrow, tall)
    p_end = min(t1 * rows, npix)
    for f0 in range(0, F, cols):
        nf = min(cols, F - f0)
        thin = narrow or nf <= FTN  # the narrow tile for these filters
        trows, tcols = tile_shape(True) if thin else (rows, cols)
        for p0 in range(t0 * rows, p_end, trows):
            whole = nf == tcols and p0 + trows <= p_end
            # one call site per tile shape: the tile is inlined, and every call site would be
            # a copy of it
            dst = out if whole else tile
            o0 = p0 * F + f0 if whole else 0
            if TALL and tall and not thin:  # TALL: numba drops the tile where it is False
                gemm_tile_bias_tall(
                    xf,
                    np.uint64(shift),
                    pix,
                    p0,
                    koff,
                    0,
                    K,
                    wf,
                    np.uint64(f0),
                    np.uint64(Fp),
                    biasp,
                    f0,
                    relu,
                    dst,
                    np.uint64(o0),
                    np.uint64(F if whole else cols),
                )
            else:
                gemm_tile_bias(
                    xf,
                    np.uint64(shift),
                    pix,
                    p0,
                    koff,
                    0,
                    K,
                    wf,
                    np.uint64(f0),
                    np.uint64(Fp),
                    biasp,
                    f0,
                    relu,
                    dst,
                    np.uint64(o0),
                    np.uint64(F if whole else tcols),
                    thin,
                )
            if not whole:
                for r in range(min(trows, p_end - p0)):
                    row = out[(p0 + r) * F + f0 : (p0 + r) * F + f0 + nf]
                    for f in range(nf):
                        row[f] = tile[r * tcols + f]


@njit(cache=True)
def _batch_norm_rows(block, F, bn, relu, start):
    """block (rows * F,), flat rows of F channels, out[start:start + block.size]: BatchNorm's
    evaluation-mode affine in place, then, if bn's fourth array is not empty, its elements
    [start, start + block.size) added (a residual block's sum, as numpy adds), then the ReLU
    (activations.relu_forward's select) if ``relu``."""
    mean, scale, shift, add = bn
    if F % 16 == 0:  # 16 channels at a time, one vector each (a loop over 16 ran scalar)
        npix = block.size // F
        a0 = np.uint64(start)
        for p in range(npix):
            for c0 in range(0, F, 16):
                o = np.uint64(p * F + c0)
                batch_norm16(block, o, mean, scale, shift, np.uint64(c0), add, a0 + o, relu)
        return
    rows2d = block.reshape((block.size // F, F))
    if relu and add.size == 0:  # the ReLU's select in the affine's loop
        chunk_affine_relu_inplace(rows2d, mean, scale, shift)
        return
    chunk_affine_inplace(rows2d, mean, scale, shift)
    zero = block.dtype.type(0)
    if add.size > 0:  # a slice: an index start + i is tested for wrap-around, not vectorised
        # (with the sum in it this loop vectorises, select included; the select alone did not)
        other = add[start : start + block.size]
        if relu:
            for i in range(block.size):
                v = block[i] + other[i]
                block[i] = zero if v <= zero else v
        else:
            for i in range(block.size):
                block[i] = block[i] + other[i]


# ---- the kernels ----


@njit(parallel=True, cache=True)
def conv2d_forward(
    x, weight, bias, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, relu, out, bn, threads
):
    """out[n, oh, ow, f] = bias[f] + sum_{i,j,c} weight[f,c,i,j] * x[n, window + (i, j), c],
    then max(out, 0) if ``relu`` (a ReLU fused into the store: a NaN stays NaN).

    x (N, H, W, C), weight (F, C, KH, KW), bias (F,); out (N, OH, OW, F) overwritten.

    ``bn = (mean, scale, shift, add)``, each (F,) but ``add`` (out.size,) or empty, or four
    empty arrays: an evaluation-mode BatchNorm applied to each block of output pixels while it
    is still in cache, ``out = (out - mean) * scale + shift`` (batchnorm.chunk_affine_inplace:
    the BatchNorm kernel's arithmetic), then ``add`` added (a residual block's sum, flat in
    out's order) if not empty, then the ReLU if ``relu``: bitwise the layers run one by one,
    without more passes over the output. (Empty arrays, not None: one compiled kernel serves
    every case, where None would compile another.)

    ``threads``: the workers that pad a strided convolution's input rows, each into a buffer of
    its own (numba.get_num_threads() in the caller: read in here it would keep numba from
    caching the kernel); the result does not depend on it.
    """
    N, H, W, C = x.shape
    F, _, KH, KW = weight.shape
    OH, OW = out.shape[1], out.shape[2]
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    K = KH * KW * C
    narrow = F <= FTN
    tall = TALL and not narrow  # more than FTN filters: the tall tile where the host has it
    rows, cols = _kernel_tile_shape(narrow, tall)
    nfb = (F + cols - 1) // cols
    Fp = nfb * cols
    NP = N * OH * OW
    ntiles = (NP + rows - 1) // rows
    nitems = (ntiles + _TILES_PER_ITEM - 1) // _TILES_PER_ITEM
    dt = x.dtype

    # a strided convolution's padded rows are copied by each worker, item by item, into a
    # buffer of its own (in parallel, and in cache when its tiles read them); otherwise the
    # windows read x itself, or its padded copy made here
    by_item = stride_h > 1 and _needs_padding(x, pad_top, pad_left, Hp, Wp)
    xp = _padded_input(x, pad_top, pad_left, Hp, Wp, not by_item)
    XH, XW = (Hp, Wp) if by_item else (xp.shape[1], xp.shape[2])
    wp = np.empty((K, Fp), dtype=dt)
    _pack_weight(weight, wp, 0, K)
    koff = np.empty(K, dtype=np.uint64)
    _tap_offsets(koff, K, KH, KW, C, dil_h * XW * C, dil_w * C)
    pix = np.empty(ntiles * rows + RN, dtype=np.uint64)  # + RN: _forward_tiles' narrow tiles
    _pixel_offsets(pix, N, OH, OW, XH * XW * C, stride_h * XW * C, stride_w * C)
    tiles = np.empty((nitems, RT * FT), dtype=dt)
    biasp = _padded_bias(bias, Fp)
    row = np.uint64(XW * C)
    parts = max(1, min(threads, nitems)) if by_item else nitems
    most = 0  # the most padded rows an item reads
    for item in range(nitems if by_item else 0):
        first, count = _item_rows(pix, koff, item, ntiles, rows, row)
        most = max(most, count)
    buffers = np.empty((parts if by_item else 0, most * XW * C), dtype=dt)

    xf = xp.reshape(xp.size)
    wf = wp.reshape(wp.size)
    of = out.reshape(out.size)
    affine = bn[1].size > 0
    for part in prange(parts):
        for item in range(part * nitems // parts, (part + 1) * nitems // parts):
            t0 = item * _TILES_PER_ITEM
            t1 = min(t0 + _TILES_PER_ITEM, ntiles)
            src, shift = xf, np.uint64(0)
            if by_item:
                first, count = _item_rows(pix, koff, item, ntiles, rows, row)
                src = buffers[part]
                _pad_rows(xf, src, first, first + count, x.shape, Hp, Wp, pad_top, pad_left)
                shift = np.uint64(0) - np.uint64(first) * row  # wraps: pix - first row's start
            _forward_tiles(
                src,
                shift,
                pix,
                koff,
                K,
                wf,
                Fp,
                biasp,
                relu and not affine,
                t0,
                t1,
                NP,
                F,
                of,
                tiles[item],
                narrow,
                np.bool_(tall),  # not Literal[bool] where TALL is False: fused.py's types
            )
            if affine:
                p1 = min(t1 * rows, NP)
                _batch_norm_rows(of[t0 * rows * F : p1 * F], F, bn, relu, t0 * rows * F)


@njit(cache=True)
def _col2im_operands(weight, OH, OW, XW, stride_h, stride_w, dil_h, dil_w):
    """What the input gradient's tiles and their scatter need, shared by conv2d_backward_input
    and fused.maxpool2d_conv2d_backward_input: wt (F, ncp) = weight as (filter, tap) with
    columns padded to whole tiles; coloff (ncp,) the offset of each column's cell from the
    pixel's window corner in the (padded) NHWC image of row width XW; contiguous (ncb,) whether
    a column block is 32 adjacent cells; pixoff (OH*OW,) each output pixel's window corner."""
    F, C, KH, KW = weight.shape
    ncol = KH * KW * C
    ncb = (ncol + FT - 1) // FT
    ncp = ncb * FT
    wt = np.empty((F, ncp), dtype=weight.dtype)  # wt[f, (i*KW + j)*C + c] = weight[f, c, i, j]
    for f in range(F):
        for col in range(ncol):
            tap = col // C
            c = col - tap * C
            i = tap // KW
            wt[f, col] = weight[f, c, i, tap - i * KW]
        for col in range(ncol, ncp):
            wt[f, col] = 0
    coloff = np.empty(ncp, dtype=np.uint64)
    _tap_offsets(coloff, ncol, KH, KW, C, dil_h * XW * C, dil_w * C)
    contiguous = np.empty(ncb, dtype=np.bool_)
    for cb in range(ncb):
        c0 = cb * FT
        run = c0 + FT <= ncol
        for f in range(1, FT):
            if run and coloff[c0 + f] != coloff[c0] + np.uint64(f):
                run = False
        contiguous[cb] = run
    pixoff = np.empty(OH * OW, dtype=np.uint64)
    # the constants as int64 values: literal 1 and 0 would compile a specialisation of their own
    _pixel_offsets(pixoff, np.int64(1), OH, OW, np.int64(0), stride_h * XW * C, stride_w * C)
    return wt, coloff, contiguous, pixoff


@njit(cache=True)
def _crop(img, XH, XW, pad_top, pad_left, dx, n):
    """dx[n, ih, iw] = img[ih + pad_top, iw + pad_left] (img a padded NHWC image, flat); 0 where
    the forward never read."""
    H, W, C = dx.shape[1], dx.shape[2], dx.shape[3]
    src = img.reshape((XH, XW, C))
    for ih in range(H):
        for iw in range(W):
            r = ih + pad_top
            s = iw + pad_left
            inside = r < XH and s < XW
            for c in range(C):
                dx[n, ih, iw, c] = src[r, s, c] if inside else 0


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _col2im_image(
    n, dyf, rows, kidx, F, wtf, ncp, ncol, ntl, P, pixoff, coloff, contiguous, img, tile
):
    """img (the flat, padded gradient of image n) = zeros, then every tile of dcol = dy @ W^T
    of the image added at the cells its taps read (col2im). Serial: the body of
    conv2d_backward_input's prange."""
    for e in range(img.size):
        img[e] = 0
    for cb in range(ncp // FT):
        c0 = cb * FT
        for t in range(ntl):
            gemm_tile(
                dyf,
                rows,
                (n * ntl + t) * R,
                kidx,
                0,
                F,
                wtf,
                np.uint64(c0),
                np.uint64(ncp),
                tile,
                0,
                False,
                False,
            )
            for r in range(min(R, P - t * R)):
                base = pixoff[t * R + r]
                if contiguous[cb]:
                    d0 = base + coloff[c0]
                    for f in range(min(FT, ncol - c0)):  # = FT, a runtime bound: vectorised
                        img[d0 + np.uint64(f)] += tile[r * FT + f]
                else:
                    for f in range(min(FT, ncol - c0)):
                        img[base + coloff[c0 + f]] += tile[r * FT + f]


@njit(parallel=True, cache=True)
def conv2d_backward_input(
    dy, weight, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, dx, threads
):
    """dx = gradient of sum(out * dy) with respect to x; dx (N, H, W, C) overwritten.

    dy (N, OH, OW, F), weight (F, C, KH, KW). Per image, dcol = dy @ W^T in tiles (rows = output
    pixels, columns = taps (i, j, c)); each tile is added into the image's gradient at the
    pixels its taps read in the forward (col2im): directly into dx when the forward read x
    itself, else into a padded scratch image that is then cropped into dx. ``threads``
    workers each take a contiguous range of images, with one scratch image of their own
    (it stays in cache from image to image); the result does not depend on it.
    """
    N, OH, OW, F = dy.shape
    _, C, KH, KW = weight.shape
    H, W = dx.shape[1], dx.shape[2]
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    ncol = KH * KW * C
    ncb = (ncol + FT - 1) // FT
    ncp = ncb * FT
    P = OH * OW
    ntl = (P + R - 1) // R  # tiles per image: a tile never spans two images
    dt = dx.dtype

    padded = _needs_padding(dx, pad_top, pad_left, Hp, Wp)
    XH, XW = (Hp, Wp) if padded else (H, W)
    image = XH * XW * C
    workers = max(1, min(threads, N))
    gx = np.empty(workers * image, dtype=dt) if padded else dx.reshape(dx.size)
    wt, coloff, contiguous, pixoff = _col2im_operands(
        weight, OH, OW, XW, stride_h, stride_w, dil_h, dil_w
    )
    rows = np.empty(N * ntl * R, dtype=np.uint64)  # dy offset of each tile row
    for n in range(N):
        for t in range(ntl):
            for r in range(R):
                rows[(n * ntl + t) * R + r] = np.uint64((n * P + min(t * R + r, P - 1)) * F)
    kidx = np.empty(F, dtype=np.uint64)  # a loop: np.arange here would be a parallel loop
    for f in range(F):
        kidx[f] = f
    tiles = np.empty((workers, R * FT + LINE), dtype=dt)  # see LINE

    dyf = dy.reshape(dy.size)
    wtf = wt.reshape(wt.size)
    for part in prange(workers):
        # np.int64: the prange index is int64 when numba types the loop and uint64 in the
        # parallel body it builds from it; passed as it is, each helper compiled twice
        w = np.int64(part)
        for n in range(w * N // workers, (w + 1) * N // workers):
            slot = w if padded else n
            img = gx[slot * image : (slot + 1) * image]
            _col2im_image(
                n,
                dyf,
                rows,
                kidx,
                F,
                wtf,
                ncp,
                ncol,
                ntl,
                P,
                pixoff,
                coloff,
                contiguous,
                img,
                tiles[w, : R * FT],
            )
            if padded:
                _crop(img, XH, XW, pad_top, pad_left, dx, n)


@njit(cache=True)
def _weight_in_pixel_order(K, F):
    """Whether the weight gradient of K terms per pixel (taps x channels) and F filters sums
    every pixel in order (groups of tap tiles, each over all pixels in L1-sized blocks), else
    over pixel chunks added afterwards (all tiles over one chunk, its data in L2). The groups
    pay where a filter block has many tap tiles, each block in L1 serving them all; not with at
    most FT filters and short sums, where every group's pass over all of x and dy (one group
    per thread, one filter block) costs more than the blocks save. Shapes alone decide."""
    per_fb = max(1, _WEIGHT_UNITS // ((F + FT - 1) // FT))  # units per filter block
    return (K + R - 1) // R >= per_fb and not (F <= FT and K <= _CHUNKED_MAX_TERMS)


@njit(cache=True)
def _weight_plan(K, F, NP, narrow, tall, threads):
    """How the weight gradient splits its work into units (see conv2d_backward_weight): tap
    tiles nkt, filter blocks nfb, tap-tile groups and pixel chunks (groups * chunks * nfb
    units), the pixels per block, tiles per group, pixels per chunk. Shapes alone decide the
    pixel chunks (the only choice that changes a sum's order), those of the wide tile whatever
    ``narrow`` and ``tall``, so every tile gives bitwise the same gradient; ``threads`` (the
    caller's thread count) only how many groups share the tap tiles."""
    rows, cols = _kernel_tile_shape(narrow, tall)
    nkt = (K + rows - 1) // rows
    nfb = (F + cols - 1) // cols
    if _weight_in_pixel_order(K, F):  # groups of tap tiles, each over all pixels, block by block
        # Each group streams all of x and dy, so as few as keep the threads busy; a tile's sum
        # runs over every pixel in order whatever the grouping: the result is the same.
        busy = max(1, min(_WEIGHT_UNITS, threads))
        groups, chunks = min(max(1, busy // nfb), nkt), 1
        block = _PIXEL_BLOCK
    else:  # all tiles together, over chunks of pixels (each chunk's data stays in L2)
        groups = 1
        chunks = max(1, min(_WEIGHT_CHUNKS, NP // _PIXEL_BLOCK))
        block = NP
    per_group = (nkt + groups - 1) // groups
    return nkt, nfb, groups, chunks, block, per_group, (NP + chunks - 1) // chunks


@njit(cache=True)
def _chunk_in_blocks(chunks, narrow, tall, stride_area, taps):
    """Whether the pixel chunks of a weight gradient (_weight_plan's ``chunks`` > 1) are summed
    in blocks of _PIXEL_BLOCK pixels, each block's x and dy in L1 for all the tap tiles, rather
    than each tap tile streaming the whole chunk from L2 (conv2d_backward_weight then overrides
    _weight_plan's block): for more than FTN filters off the tall tile (a thin last block
    included), where neighbouring windows share little of x (stride > 1, or 1x1), so that the
    chunk's x is about as large as its dy. The sums run over the pixels in the same order
    either way (bitwise the same gradient). Stride 1 over few channels (x stays in L1 anyway)
    and the narrow tile gained nothing; the tall tile is unmeasured (docs/kernels.md)."""
    return chunks > 1 and not narrow and not tall and (stride_area > 1 or taps == 1)


@njit(cache=True)
def _weight_operands(
    x, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, ntaps, pad
):
    """The weight gradient's tile operands: the (padded) input flat, the offsets of ``ntaps``
    taps (whole tap tiles, the padding rows repeating the last tap) and every pixel's window
    corner. With ``pad`` False, x itself even where the windows need padding, the offsets those
    of its padded layout: each pixel chunk's rows are then padded by its unit."""
    N, C = x.shape[0], x.shape[3]
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    xp = _padded_input(x, pad_top, pad_left, Hp, Wp, pad)
    padded = _needs_padding(x, pad_top, pad_left, Hp, Wp)
    XH, XW = (Hp, Wp) if padded else (x.shape[1], x.shape[2])
    koff = np.empty(ntaps, dtype=np.uint64)
    _tap_offsets(koff, KH * KW * C, KH, KW, C, dil_h * XW * C, dil_w * C)
    pix = np.empty(N * OH * OW, dtype=np.uint64)
    _pixel_offsets(pix, N, OH, OW, XH * XW * C, stride_h * XW * C, stride_w * C)
    return xp.reshape(xp.size), koff, pix


@njit(cache=True)
def _chunk_rows(pix, koff, K, p0, p1, row):
    """(first, count): the rows of the padded input that pixels [p0, p1) read (window corners
    pix, the last of the K taps at koff[K - 1], ``row`` values per padded row)."""
    if p1 <= p0:
        return np.int64(0), np.int64(0)
    first = pix[p0] // row
    last = (pix[p1 - 1] + koff[K - 1]) // row
    return np.int64(first), np.int64(last - first) + 1


@njit(cache=True)
def _weight_unit_range(unit, nfb, groups, per_group, nkt, per_chunk, NP, cols):
    """Unit ``unit``'s pixel chunk, its pixels [p0, p1), filter block f0 (of ``cols`` filters),
    tap tiles [kt0, kt1)."""
    chunk = unit // (nfb * groups)
    rest = unit - chunk * nfb * groups
    fb = rest // groups
    kt0 = (rest - fb * groups) * per_group
    p0 = chunk * per_chunk
    return chunk, p0, min(p0 + per_chunk, NP), fb * cols, kt0, min(kt0 + per_group, nkt)


@njit(cache=True, inline="always")
def _weight_block(xf, koff, kt0, kt1, pix, q0, q1, b, b0, bstride, accf, tile0, accumulate, narrow):
    """Tap tiles [kt0, kt1) (tile kt at accf[(tile0 + kt) * R*FT]) (+)= the pixels [q0, q1)
    of one block: dy's rows at b[b0 + (q - q0) * bstride], a tile's columns of filters each."""
    rows = RN if narrow else R
    for kt in range(kt0, kt1):
        gemm_tile(
            xf,
            koff,
            kt * rows,
            pix,
            q0,
            q1,
            b,
            b0,
            bstride,
            accf,
            (tile0 + kt) * R * FT,
            accumulate,
            narrow,
        )


@njit(cache=True, inline="always")
def _weight_block_tall(xf, koff, kt0, kt1, pix, q0, q1, b, b0, bstride, accf, tile0, accumulate):
    """_weight_block on the tall tile (tile kt at accf[(tile0 + kt) * RT*FT])."""
    for kt in range(kt0, kt1):
        t0 = (tile0 + kt) * RT * FT
        gemm_tile_tall(xf, koff, kt * RT, pix, q0, q1, b, b0, bstride, accf, t0, accumulate)


@njit(cache=True)
def _bias_operands(x, count):
    """_bias_block's constant operands: a one of x's dtype and ``count`` zero offsets. (Made
    here, serially: in a parallel kernel numba turns np.ones and np.zeros into parallel loops of
    their own, each a gufunc compiled with its wrappers.)"""
    return np.ones(1, dtype=x.dtype), np.zeros(count, dtype=np.uint64)


@njit(cache=True, fastmath={"contract"}, inline="always")
def _bias_block(b, b0, bstride, count, bsum, ones, zoff, tile, narrow):
    """bsum (cols,) += the count rows of dy at b[b0 + q * bstride], in order: a register tile
    over a column of ones (ones[0] = 1, zoff >= max(count, RN) zeros; tile (R*FT,) scratch): its
    rows are the same sums, fma(1, d, s) = s + d exactly, and the sums stay in registers (as a
    loop over bsum in memory they cost a fifth of conv1's weight gradient)."""
    rows, cols = tile_shape(narrow)
    for r in range(rows):
        for f in range(cols):
            tile[r * cols + f] = bsum[f]
    gemm_tile(
        ones, zoff, 0, zoff, 0, count, b, np.uint64(b0), np.uint64(bstride), tile, 0, True, narrow
    )
    for f in range(cols):
        bsum[f] = tile[f]


@njit(cache=True, fastmath={"contract"}, inline="always")
def _bias_block_tall(b, b0, bstride, count, bsum, ones, zoff, tile):
    """_bias_block on the tall tile (zoff >= max(count, RT) zeros; tile (RT*FT,) scratch)."""
    for r in range(RT):
        for f in range(FT):
            tile[r * FT + f] = bsum[f]
    u = np.uint64
    gemm_tile_tall(ones, zoff, 0, zoff, 0, count, b, u(b0), u(bstride), tile, 0, True)
    for f in range(FT):
        bsum[f] = tile[f]


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _weight_unit(operands, kt0, kt1, p0, p1, f0, tile0, bsum, with_bias, btile, narrow):
    """One unit of conv2d_backward_weight: tap tiles [kt0, kt1) of filter block f0 (tile kt
    at accf[(tile0 + kt) * R*FT]) summed over pixels [p0, p1), ``block`` pixels at a time (a
    block's x and dy stay in L1 for all the tiles), and the bias sums bsum (cols,) if
    ``with_bias``; ``operands`` = (xf, koff, pix, block, dyf, Fp, accf, ones, zoff), the
    kernel's. Serial: the body of the kernel's prange."""
    xf, koff, pix, block, dyf, Fp, accf, ones, zoff = operands
    if with_bias:
        for f in range(bsum.size):
            bsum[f] = 0
    for q0 in range(p0, p1, block):
        q1 = min(q0 + block, p1)
        b0, step = np.uint64(q0 * Fp + f0), np.uint64(Fp)
        acc = q0 > p0
        _weight_block(xf, koff, kt0, kt1, pix, q0, q1, dyf, b0, step, accf, tile0, acc, narrow)
        if with_bias:
            _bias_block(dyf, q0 * Fp + f0, Fp, q1 - q0, bsum, ones, zoff, btile, narrow)


@njit(cache=True, fastmath={"contract"})
def _weight_unit_tall(operands, kt0, kt1, p0, p1, f0, tile0, bsum, with_bias, btile):
    """_weight_unit on the tall tile (tile kt at accf[(tile0 + kt) * RT*FT]). A function of
    its own, no other tile's code beside it: in one function with the others, the tall tile ran
    0.9x, the wide and narrow ones 0.85-0.9x, and the kernel took 2-4 s longer to compile."""
    xf, koff, pix, block, dyf, Fp, accf, ones, zoff = operands
    if with_bias:
        for f in range(bsum.size):
            bsum[f] = 0
    for q0 in range(p0, p1, block):
        q1 = min(q0 + block, p1)
        b0, step = np.uint64(q0 * Fp + f0), np.uint64(Fp)
        acc = q0 > p0
        _weight_block_tall(xf, koff, kt0, kt1, pix, q0, q1, dyf, b0, step, accf, tile0, acc)
        if with_bias:
            _bias_block_tall(dyf, q0 * Fp + f0, Fp, q1 - q0, bsum, ones, zoff, btile)


@njit(cache=True)
def _weight_result(acc, bsum, chunks, nfb, nkt, narrow, tall, thin, dweight, dbias):
    """dweight (F, C, KH, KW) and dbias from the units' tiles acc (chunks, nfb * nkt, slot >=
    rows*cols) and bias sums bsum (chunks, >= F): the chunks added in order (little work).
    With ``thin``, the last filter block ran on the narrow tile (conv2d_backward_weight): its
    tile kt at R*FT * kt from the block's first slot, RN taps x FTN filters."""
    F, C, KH, KW = dweight.shape
    rows, cols = _kernel_tile_shape(narrow, tall)
    slot = acc.shape[2]
    flat = acc.reshape((chunks, acc.shape[1] * slot))
    for f in range(F):
        fb = f // cols
        col = f - fb * cols
        last = thin and fb == nfb - 1
        trows, tcols = tile_shape(True) if last else (rows, cols)
        step = R * FT if last else slot
        for i in range(KH):
            for j in range(KW):
                for c in range(C):
                    k = (i * KW + j) * C + c
                    kt = k // trows
                    e = fb * nkt * slot + kt * step + (k - kt * trows) * tcols + col
                    v = flat[0, e]
                    for chunk in range(1, chunks):
                        v += flat[chunk, e]
                    dweight[f, c, i, j] = v
        v = bsum[0, f]
        for chunk in range(1, chunks):
            v += bsum[chunk, f]
        dbias[f] = v


@njit(parallel=True, cache=True)
def conv2d_backward_weight(
    x, dy, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, dweight, dbias, threads
):
    """dweight[f,c,i,j] = sum_{n,oh,ow} dy[n,oh,ow,f] * x[n, window + (i, j), c],
    dbias[f] = sum dy[..., f].

    x (N, H, W, C), dy (N, OH, OW, F); dweight (F, C, KH, KW) and dbias (F,) overwritten.

    A blocked matrix product over units of work. With many output tiles (3 taps x 32 filters;
    conv2 of the reference network has 192) each unit owns a group of them and sums every pixel
    into them, in blocks of ``_PIXEL_BLOCK`` pixels whose x and dy stay in L1 while all the
    group's tiles use them; there are as many groups per filter block as ``threads`` (at most
    ``_WEIGHT_UNITS``), since each group streams all of x and dy (more groups than threads
    only read them more often). With few (conv1 has 3) each of ``_WEIGHT_CHUNKS`` units takes all
    tiles over a fixed range of pixels, and the partial sums are added in order afterwards.
    Every sum runs in an order fixed by the shapes alone: the result is bitwise identical on
    repeated calls and for any ``threads`` and number of threads.
    """
    N, OH, OW, F = dy.shape
    KH, KW = dweight.shape[2], dweight.shape[3]
    NP = N * OH * OW
    K = KH * KW * x.shape[3]
    narrow = F <= FTN
    tall = TALL and not narrow  # more than FTN filters: the tall tile where the host has it
    rows, cols = _kernel_tile_shape(narrow, tall)
    # np.bool_(tall): not Literal[bool] where TALL is False (fused.py's types, one compilation)
    nkt, nfb, groups, chunks, block, per_group, per_chunk = _weight_plan(
        K, F, NP, narrow, np.bool_(tall), threads
    )
    if _chunk_in_blocks(chunks, narrow, tall, stride_h * stride_w, KH * KW):
        block = _PIXEL_BLOCK
    # a last block of at most FTN filters (48 = 32 + 16) on the narrow tile: RN taps per tile,
    # nkt_thin tiles (they fit in the block's nkt slots), dy's rows read FTN columns there
    thin = not narrow and F - (nfb - 1) * cols <= FTN
    nkt_thin = (K + RN - 1) // RN if thin else 0
    per_group_thin = (nkt_thin + groups - 1) // groups
    Fp = (nfb - 1) * cols + FTN if thin else nfb * cols
    units = chunks * nfb * groups
    # pixel chunks of one filter block each pad the rows they read into a buffer of their own
    # (in parallel, and in cache when its tiles read them), not all of x first, serially
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    by_chunk = chunks > 1 and nfb == 1 and _needs_padding(x, pad_top, pad_left, Hp, Wp)
    xf, koff, pix = _weight_operands(
        x,
        OH,
        OW,
        KH,
        KW,
        stride_h,
        stride_w,
        pad_top,
        pad_left,
        dil_h,
        dil_w,
        max(nkt * rows, nkt_thin * RN),
        not by_chunk,
    )
    row = np.uint64(Wp * x.shape[3])
    most = 0  # the most padded rows a chunk reads
    for unit in range(units if by_chunk else 0):
        _, p0, p1, _, _, _ = _weight_unit_range(
            unit, nfb, groups, per_group, nkt, per_chunk, NP, cols
        )
        most = max(most, _chunk_rows(pix, koff, K, p0, p1, row)[1])
    buffers = np.empty((units if by_chunk else 0, most * Wp * x.shape[3]), dtype=x.dtype)
    koffs = np.empty((units if by_chunk else 0, koff.size), dtype=np.uint64)
    dyf = _padded_rows(dy, Fp)
    # per pixel chunk, tile (fb, kt): rows = taps, columns = filters; and the bias sums
    # (a narrow tile's accumulators at a wide tile's places, as _weight_block puts them)
    slot = max(rows * cols, R * FT)
    acc = np.empty((chunks, nfb * nkt, slot), dtype=x.dtype)
    bsum = np.empty((chunks, Fp), dtype=x.dtype)
    accf = acc.reshape(acc.size)
    ones, zoff = _bias_operands(x, max(min(block, per_chunk), RN, RT))
    btile = np.empty((units, rows * cols), dtype=x.dtype)
    for unit in prange(units):
        # np.int64(unit): the index is uint64 in the loop body numba builds (see
        # conv2d_backward_input): passed as it is, the helper compiled a second time
        chunk, p0, p1, f0, kt0, kt1 = _weight_unit_range(
            np.int64(unit), nfb, groups, per_group, nkt, per_chunk, NP, cols
        )
        fb = f0 // cols
        tile0 = (chunk * nfb + fb) * nkt
        last = thin and fb == nfb - 1
        if last:  # the narrow tiles from the block's first slot on, R*FT apart
            tile0 = tile0 * (slot // (R * FT))
            g = kt0 // per_group
            kt0 = g * per_group_thin
            kt1 = min(kt0 + per_group_thin, nkt_thin)
        sums = bsum[chunk, f0 : f0 + (FTN if last else cols)]
        src, kof = xf, koff
        if by_chunk:
            first, count = _chunk_rows(pix, koff, K, p0, p1, row)
            src, kof = buffers[unit], koffs[unit]
            _pad_rows(xf, src, first, first + count, x.shape, Hp, Wp, pad_top, pad_left)
            shift = np.uint64(0) - np.uint64(first) * row  # wraps: pix - the first row's start
            for t in range(kof.size):
                kof[t] = koff[t] + shift
        operands = (src, kof, pix, block, dyf, Fp, accf, ones, zoff)
        if tall and not last:
            _weight_unit_tall(operands, kt0, kt1, p0, p1, f0, tile0, sums, kt0 == 0, btile[unit])
        else:
            _weight_unit(
                operands, kt0, kt1, p0, p1, f0, tile0, sums, kt0 == 0, btile[unit], narrow or last
            )
    _weight_result(acc, bsum, chunks, nfb, nkt, narrow, np.bool_(tall), thin, dweight, dbias)
