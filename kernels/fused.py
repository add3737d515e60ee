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

from .conv2d import (
    _bias_block,
    _bias_operands,
    _col2im_operands,
    _crop,
    _forward_tiles,
    _needs_padding,
    _pack_weight,
    _padded_bias,
    _padded_input,
    _read_extent,
    _tap_offsets,
    _weight_block,
    _weight_operands,
    _weight_plan,
    _weight_result,
    _weight_unit_range,
)
from .gemm_tile import FT, FTN, RN, R, gather_tile, tile_shape
from .pool2d import max4

#: Scratch buffers (one per chunk of work items): enough chunks to keep 2 threads balanced.
_CHUNKS = 64
#: Weight gradient from the pooled gradient: groups of filters (a fixed number: the result does
#: not depend on the thread count).
_WEIGHT_UNITS = 8
#: Input gradient from the pooled gradient: chunks of images, each with a scratch of 139 KB at
#: the reference conv2 (64 chunks: 8.9 MB allocated per call, page faults included).
_INPUT_CHUNKS = 8


@njit(cache=True)
def _operands(x, weight, pad_top, pad_left, Hp, Wp, dil_h, dil_w, Fp):
    """The tiles' operands: the (padded) input flat, the weights as (tap, filter) flat, the tap
    offsets, and the padded input's height and width. (Serial on purpose: in the parallel
    kernel this setup cost 2.5 s of numba's array analysis at the first compilation.)"""
    F, C, KH, KW = weight.shape
    K = KH * KW * C
    xp = _padded_input(x, pad_top, pad_left, Hp, Wp, np.bool_(True))  # conv2d's signature
    XH, XW = xp.shape[1], xp.shape[2]
    wp = np.empty((K, Fp), dtype=x.dtype)
    _pack_weight(weight, wp, 0, K)
    koff = np.empty(K, dtype=np.uint64)
    _tap_offsets(koff, K, KH, KW, C, dil_h * XW * C, dil_w * C)
    return xp.reshape(xp.size), wp.reshape(wp.size), koff, XH, XW


# ---- one chunk of work items (serial helpers: a prange body is compiled twice, these once) ----


@njit(cache=True)
def _band_pixels(rows, band, BW, XW, C, stride_h, stride_w):
    """The offset of each band pixel's window corner from the band's first one (rows of whole
    tiles: the padding rows repeat the band's last pixel). The same for every band: an item's
    tiles read x from its band's corner on."""
    px = np.empty(rows, dtype=np.uint64)
    for b in range(rows):
        bb = min(b, band - 1)
        i = bb // BW
        px[b] = np.uint64((i * stride_h * XW + (bb - i * BW) * stride_w) * C)
    return px


@njit(cache=True)
def _pool_bands(conv, i0, i1, PH, PW, rows, BW, pkh, pkw, OW, F, relu, m, a, out, argmax):
    """The pooling of the bands of items [i0, i1), as maxpool2d_forward (row-major cells,
    greater or NaN replaces), on relu(conv) if ``relu``: m, a are scratch (F,)."""
    for item in range(i0, i1):
        n = item // PH
        ph = item - n * PH
        base = (item - i0) * rows
        for pw in range(PW):
            corner = (ph * pkh) * OW + pw * pkw
            if pkh == 2 and pkw == 2:  # the common window: its 4 cells at once, in registers
                q = (base + pw * 2) * F
                r = q + BW * F
                max4(
                    conv[q : q + F],
                    conv[q + F : q + 2 * F],
                    conv[r : r + F],
                    conv[r + F : r + 2 * F],
                    relu,
                    corner,
                    corner + 1,
                    corner + OW,
                    corner + OW + 1,
                    out[n, ph, pw],
                    argmax[n, ph, pw],
                )
                continue
            for i in range(pkh):
                for j in range(pkw):
                    q = (base + i * BW + pw * pkw + j) * F
                    src = conv[q : q + F]
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
            for f in range(F):
                y[f] = m[f]
                am[f] = corner + a[f]


@njit(parallel=True, cache=True)
def conv2d_relu_maxpool2d_forward(
    x,
    weight,
    bias,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    OH,
    OW,
    relu,
    pkh,
    pkw,
    out,
    argmax,
):
    """out = maxpool(relu(conv2d(x))) (ReLU only if ``relu``), argmax its indices in the conv
    plane; out, argmax (N, PH, PW, F) overwritten. OH, OW: the convolution's output size."""
    N, H, W, C = x.shape
    F, _, KH, KW = weight.shape
    PH, PW = out.shape[1], out.shape[2]
    BW = PW * pkw  # conv columns the pooling reads
    band = pkh * BW  # conv pixels per pooled row
    narrow = F <= FTN
    trows, cols = tile_shape(narrow)
    ntb = (band + trows - 1) // trows  # tiles per band
    rows = ntb * trows
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    K = KH * KW * C
    nfb = (F + cols - 1) // cols
    Fp = nfb * cols
    nitems = N * PH
    nchunks = min(nitems, _CHUNKS)
    step = (nitems + nchunks - 1) // nchunks
    dt = x.dtype

    xf, wf, koff, XH, XW = _operands(x, weight, pad_top, pad_left, Hp, Wp, dil_h, dil_w, Fp)
    # RN more: _forward_tiles' narrow tiles over the last filters may reach past the band's rows
    pix = _band_pixels(rows + RN, band, BW, XW, C, stride_h, stride_w)
    # one band at a time (6.9 KB at conv1: stays in L1; a chunk's bands at once were 5.7 MB
    # allocated per call, 140 page faults)
    scratch = np.empty((nchunks, rows * F), dtype=dt)  # (band pixel, filter)
    best = np.empty((nchunks, F), dtype=dt)  # running maximum of a window
    cell = np.empty((nchunks, F), dtype=np.int32)  # and its cell
    tiles = np.empty((nchunks, R * FT), dtype=dt)
    biasp = _padded_bias(bias, Fp)
    for chunk in prange(nchunks):
        for item in range(chunk * step, min(chunk * step + step, nitems)):
            n = item // PH
            corner = n * XH * XW * C + (item - n * PH) * pkh * stride_h * XW * C
            # the band's padding rows are stored too: scratch has them
            # the argument types of conv2d_forward's call (no literals, an unsigned shift): a
            # process running both compiles this helper once
            _forward_tiles(
                xf,
                np.uint64(corner),
                pix,
                koff,
                K,
                wf,
                Fp,
                biasp,
                np.bool_(False),
                np.int64(0),
                ntb,
                rows,
                F,
                scratch[chunk],
                tiles[chunk],
                narrow,
                np.bool_(False),  # its conv1-like shapes have short sums: the tall tile never pays
            )
            _pool_bands(
                scratch[chunk],
                item,
                item + 1,
                PH,
                PW,
                rows,
                BW,
                pkh,
                pkw,
                OW,
                F,
                relu,
                best[chunk],
                cell[chunk],
                out,
                argmax,
            )


# ---- the backward through max pool (+ ReLU) into the convolution, from the pooled gradient ----
#
# Below a pooling whose windows tile the conv output, the conv output's gradient dy is zero but
# at one cell per window and channel (the argmax), and also where the ReLU blocked it: 3/4 or
# more of dy is zeros for 2x2 windows. The two kernels below take the pooled gradient gp and
# argmax directly and add only the nonzero terms, one fused multiply-add each, in the order in
# which conv2d_backward_weight / conv2d_backward_input add them over the dense dy (an added
# term 0 * v is exact when v is finite, and no partial sum is -0). So their results are bitwise
# those of maxpool2d_backward followed by the dense kernels, for finite x and weights (the
# caller takes the dense path otherwise: there 0 * inf = NaN terms count), in about half the
# time at the reference network's conv2, without writing dy.
#
# Shapes: x (N, H, W, C); gp, argmax, y (N, PH, PW, F) = the pooled gradient, the forward's
# argmax (h * OW + w in the conv plane) and pooled output (the ReLU mask: y > 0, used if
# ``relu``); windows pkh x pkw with stride pkh x pkw; OH, OW the conv output's size. An argmax
# outside its window gives no gradient (as maxpool2d_backward for windows that tile): the
# kernels index nothing with it.


@njit(cache=True)
def _block_offsets(tapoff, C, count):
    """uint64 x offset of each 32-channel column block (tap t, channels chunk) in tap order,
    padded with copies of the last to a multiple of R blocks (padding rows never stored)."""
    per_tap = C // FT
    nb = tapoff.shape[0] * per_tap
    out = np.empty(count, dtype=np.uint64)
    for b in range(count):
        bb = min(b, nb - 1)
        t = bb // per_tap
        out[b] = tapoff[t] + np.uint64((bb - t * per_tap) * FT)
    return out


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _weight_from_pool(
    xf,
    blockoff,
    K,
    image,
    row_step,
    col_step,
    gpf,
    amf,
    yf,
    relu,
    N,
    PH,
    PW,
    F,
    pkh,
    pkw,
    OW,
    f0,
    f1,
    gl,
    pl,
    acc,
    bsum,
):
    """acc (F, ntriples, R*FT) flat and bsum[f] for filters [f0, f1): image by image (its x
    stays in L1 while every filter of the group uses it; filter by filter over the whole batch,
    x streamed from L3 once per filter), per filter the list of its selected cells (weights gl,
    window corners pl) in pixel order (conv row, conv column), summed by gather_tile into the
    filter's tiles, 3 column blocks of 32 at a time. The sums run in pixel order, as the dense
    weight gradient's (the tiles carry them from image to image)."""
    nblocks = K // FT
    ntriples = (nblocks + R - 1) // R
    for f in range(f0, f1):
        bsum[f] = 0
    for n in range(N):
        for f in range(f0, f1):
            count = 0
            for ph in range(PH):
                for i in range(pkh):  # conv row ph * pkh + i
                    oh = ph * pkh + i
                    for pw in range(PW):
                        w = ((n * PH + ph) * PW + pw) * F + f  # the window's entry, flat
                        j = amf[w] - (oh * OW + pw * pkw)
                        if j < 0 or j >= pkw or (relu and not yf[w] > 0):
                            continue
                        gl[count] = gpf[w]
                        pl[count] = np.uint64(n * image + oh * row_step + (pw * pkw + j) * col_step)
                        count += 1
            s = bsum[f]
            for k in range(count):
                s += gl[k]
            bsum[f] = s
            for t in range(ntriples):
                e = (f * ntriples + t) * R * FT
                gather_tile(gl, pl, 0, count, xf, blockoff, t * R, acc, e, n > 0)


@njit(parallel=True, cache=True)
def maxpool2d_conv2d_backward_weight(
    x,
    gp,
    argmax,
    y,
    relu,
    pkh,
    pkw,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    dweight,
    dbias,
):
    """dweight (F, C, KH, KW) and dbias (F,) of the convolution, for the gradient that the
    max pool (and ReLU) backward would give for gp; needs C % 32 == 0. Bitwise
    conv2d_backward_weight's result when that kernel sums in pixel order (many output tiles,
    see its docstring) and x is finite. Parallel over fixed groups of filters."""
    N, H, W, C = x.shape
    PH, PW, F = gp.shape[1], gp.shape[2], gp.shape[3]
    KH, KW = dweight.shape[2], dweight.shape[3]
    K = KH * KW * C
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    xp = _padded_input(x, pad_top, pad_left, Hp, Wp, np.bool_(True))  # conv2d's signature
    XH, XW = xp.shape[1], xp.shape[2]
    tapoff = np.empty(KH * KW, dtype=np.uint64)
    _tap_offsets(tapoff, KH * KW, KH, KW, np.int64(1), dil_h * XW * C, dil_w * C)
    nblocks = K // FT
    blockoff = _block_offsets(tapoff, C, (nblocks + R - 1) // R * R)
    units = min(F, _WEIGHT_UNITS)
    per = (F + units - 1) // units
    ntriples = (nblocks + R - 1) // R
    acc = np.empty(F * ntriples * R * FT, dtype=x.dtype)  # per filter: its column tiles
    bsum = np.empty(F, dtype=x.dtype)
    gl = np.empty((units, PH * PW), dtype=x.dtype)
    pl = np.empty((units, PH * PW), dtype=np.uint64)
    xf = xp.reshape(xp.size)
    gpf, amf, yf = gp.reshape(gp.size), argmax.reshape(argmax.size), y.reshape(y.size)
    for u in prange(units):
        _weight_from_pool(
            xf,
            blockoff,
            K,
            XH * XW * C,
            stride_h * XW * C,
            stride_w * C,
            gpf,
            amf,
            yf,
            relu,
            N,
            PH,
            PW,
            F,
            pkh,
            pkw,
            OW,
            u * per,
            min(u * per + per, F),
            gl[u],
            pl[u],
            acc,
            bsum,
        )
    for f in range(F):  # column col = (i*KW + j)*C + c of filter f's tiles
        for i in range(KH):
            for j in range(KW):
                for c in range(C):
                    dweight[f, c, i, j] = acc[f * ntriples * R * FT + (i * KW + j) * C + c]
        dbias[f] = bsum[f]


@njit(cache=True)
def _pooled_band(
    gpf, amf, yf, relu, w0, PW, F, f0, pkh, pkw, OW, corner0, lo, hi, rows, gsel, code
):
    """rows[(q - lo) * FT + f] for the pixels q in [lo, hi) of one band of conv rows (the pkh
    rows of a row of windows, pkh * OW pixels, q = i * OW + column), f < FT: the gradient
    maxpool2d_backward (through the ReLU if ``relu``) gives the conv output there for filter
    f0 + f: gp where the pixel is its window's argmax (and y > 0), else 0; 0 from F on and in
    the columns no window covers. w0: the band's first window's entry in gp (flat), corner0
    its corner's index in the conv plane. gsel (FT,), code (FT,) int32: scratch.

    Window by window: gp and argmax are read once per window (not once per cell), and the
    argmax becomes a small int32 cell code (i * OW + j, -1 for none), so each of the window's
    cells is one 32-bit compare and select per filter. (The same select per cell on the int64
    argmax ran at 56 cycles per pixel: 64-bit compares, masks repacked to 32 bits.)"""
    nf = min(FT, F - f0)
    span = pkh * OW
    for i in range(pkh):  # the columns past the last window
        for col in range(PW * pkw, OW):
            q = i * OW + col
            if lo <= q < hi:
                for f in range(FT):
                    rows[(q - lo) * FT + f] = 0
    for pw in range(PW):
        first = pw * pkw
        if first + (pkh - 1) * OW + pkw <= lo or first >= hi:
            continue  # none of its cells in [lo, hi)
        w = np.uint64(w0 + pw * F + f0)
        corner = corner0 + first
        for f in range(nf):
            e = w + np.uint64(f)
            rel = amf[e] - corner
            inside = (rel >= 0) & (rel < span)
            if relu:
                inside = inside & (yf[e] > 0)
            code[f] = np.int32(rel) if inside else np.int32(-1)
            gsel[f] = gpf[e]
        for i in range(pkh):
            for j in range(pkw):
                q = i * OW + first + j
                if q < lo or q >= hi:
                    continue
                c = np.int32(i * OW + j)
                d0 = np.uint64((q - lo) * FT)
                for f in range(nf):
                    g = gsel[f]
                    rows[d0 + np.uint64(f)] = g if code[f] == c else 0
                for f in range(nf, FT):
                    rows[d0 + np.uint64(f)] = 0


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _weight_unit_pooled(
    xf,
    koff,
    kt0,
    kt1,
    pix,
    p0,
    p1,
    gpf,
    amf,
    yf,
    relu,
    F,
    OH,
    OW,
    PH,
    PW,
    pkh,
    pkw,
    f0,
    rows,
    gsel,
    code,
    accf,
    tile0,
    bsum,
    with_bias,
    ones,
    zoff,
    btile,
):
    """conv2d_backward_weight's unit (conv2d._weight_unit) over pixels [p0, p1), with dy's
    rows rebuilt from the pooled gradient one band of conv rows at a time (its part in
    [p0, p1)) into ``rows`` ((pkh * OW) * FT,), an L1 scratch the band's tiles then read. The
    rows below the last row of windows are zeros."""
    if with_bias:
        for f in range(bsum.size):
            bsum[f] = 0
    P = OH * OW
    q0 = p0
    while q0 < p1:
        n = q0 // P
        oh = (q0 - n * P) // OW
        ph = oh // pkh
        if ph < PH:
            band0 = n * P + ph * pkh * OW
            q1 = min(p1, band0 + pkh * OW)
            _pooled_band(
                gpf,
                amf,
                yf,
                relu,
                (n * PH + ph) * PW * F,
                PW,
                F,
                f0,
                pkh,
                pkw,
                OW,
                ph * pkh * OW,
                q0 - band0,
                q1 - band0,
                rows,
                gsel,
                code,
            )
        else:
            q1 = min(p1, q0 + pkh * OW, (n + 1) * P)
            for e in range((q1 - q0) * FT):
                rows[e] = 0
        _weight_block(
            xf,
            koff,
            kt0,
            kt1,
            pix,
            q0,
            q1,
            rows,
            np.uint64(0),
            np.uint64(FT),
            accf,
            tile0,
            q0 > p0,
            False,
        )
        if with_bias:
            _bias_block(rows, 0, FT, q1 - q0, bsum, ones, zoff, btile, False)
        q0 = q1


@njit(parallel=True, cache=True)
def maxpool2d_conv2d_backward_weight_dense(
    x,
    gp,
    argmax,
    y,
    relu,
    pkh,
    pkw,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    dweight,
    dbias,
):
    """dweight (F, C, KH, KW) and dbias (F,) of the convolution, for the gradient that the max
    pool (and ReLU) backward would give for gp: conv2d_backward_weight's units, tiles and
    summation order, with each band of dy's rows rebuilt from gp, argmax and y in an L1
    scratch just before its tiles read it (a band's pixels are summed in order, so the blocks
    do not change a sum). Bitwise conv2d_backward_weight(x,
    maxpool2d_backward(...)) for any shapes and values (0 * inf terms included), without dy
    ever in memory (5.5 MB at the reference conv1, batch 64): where the sparse
    maxpool2d_conv2d_backward_weight does not apply (C % 32 != 0, as conv1's 1 channel; a
    weight gradient summed in pixel chunks; x not finite)."""
    N, C = x.shape[0], x.shape[3]
    PH, PW, F = gp.shape[1], gp.shape[2], gp.shape[3]
    KH, KW = dweight.shape[2], dweight.shape[3]
    NP = N * OH * OW
    # the dense kernel's units (its pixel blocks aside: here a band of conv rows at a time)
    # (np.bool_ and np.int64, not literals: conv2d_backward_weight's types, one compilation;
    # see docs/kernels.md, one compilation per helper)
    no, yes = np.bool_(False), np.bool_(True)
    nkt, nfb, groups, chunks, _, per_group, per_chunk = _weight_plan(
        KH * KW * C, F, NP, no, no, np.int64(_WEIGHT_UNITS)
    )
    units = chunks * nfb * groups
    xf, koff, pix = _weight_operands(
        x, OH, OW, KH, KW, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, nkt * R, yes
    )
    acc = np.empty((chunks, nfb * nkt, R * FT), dtype=x.dtype)
    bsum = np.empty((chunks, nfb * FT), dtype=x.dtype)
    rows = np.empty((units, pkh * OW * FT), dtype=x.dtype)
    gsel = np.empty((units, FT), dtype=x.dtype)
    code = np.empty((units, FT), dtype=np.int32)
    accf = acc.reshape(acc.size)
    ones, zoff = _bias_operands(x, max(pkh * OW, R))
    btile = np.empty((units, R * FT), dtype=x.dtype)
    gpf, amf, yf = gp.reshape(gp.size), argmax.reshape(argmax.size), y.reshape(y.size)
    for unit in prange(units):
        # np.int64(unit): the index is uint64 in the loop body numba builds (see
        # conv2d_backward_input): passed as it is, the helper compiled a second time
        chunk, p0, p1, f0, kt0, kt1 = _weight_unit_range(
            np.int64(unit), nfb, groups, per_group, nkt, per_chunk, NP, np.int64(FT)
        )
        _weight_unit_pooled(
            xf,
            koff,
            kt0,
            kt1,
            pix,
            p0,
            p1,
            gpf,
            amf,
            yf,
            relu,
            F,
            OH,
            OW,
            PH,
            PW,
            pkh,
            pkw,
            f0,
            rows[unit],
            gsel[unit],
            code[unit],
            accf,
            (chunk * nfb + f0 // FT) * nkt,
            bsum[chunk, f0 : f0 + FT],
            kt0 == 0,
            ones,
            zoff,
            btile[unit],
        )
    _weight_result(acc, bsum, chunks, nfb, nkt, no, no, no, dweight, dbias)


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def _input_from_pool(
    n,
    gpf,
    amf,
    yf,
    relu,
    PH,
    PW,
    F,
    pkh,
    pkw,
    OW,
    wtf,
    ncp,
    ncol,
    coloff,
    contiguous,
    pixoff,
    colblocks,
    gl,
    pl,
    counts,
    tile,
    dcol,
    touched,
    img,
):
    """One image's input gradient into ``img`` (its padded NHWC gradient, zeroed here): per
    window, each cell's selected filters in filter order (weights gl, rows f * ncp of wt in pl,
    one list of up to F per cell), dcol[p] = gather_tile over the cell's list, 3 column blocks
    at a time; then the rows added into the taps' cells in conv2d_backward_input's order
    (column block, pixel)."""
    P = touched.shape[0]
    ncb = ncp // FT
    for e in range(img.size):
        img[e] = 0
    for p in range(P):
        touched[p] = False
    cells = pkh * pkw
    for ph in range(PH):
        for pw in range(PW):
            w0 = ((n * PH + ph) * PW + pw) * F
            corner = ph * pkh * OW + pw * pkw
            for cell in range(cells):
                counts[cell] = 0
            for f in range(F):  # each selected filter into its cell's list, in filter order
                if relu and not yf[w0 + f] > 0:
                    continue
                rel = amf[w0 + f] - corner
                i = 0
                while rel >= OW and i < pkh:  # bounded: argmax comes from the caller
                    rel -= OW
                    i += 1
                if rel < 0 or rel >= pkw or i >= pkh:  # not in its window: no gradient (as
                    continue  # maxpool2d_backward's path for windows that tile)
                cell = i * pkw + rel
                q = cell * F + counts[cell]
                gl[q] = gpf[w0 + f]
                pl[q] = np.uint64(f * ncp)
                counts[cell] += 1
            for cell in range(cells):
                count = counts[cell]
                if count == 0:
                    continue
                p = corner + (cell // pkw) * OW + cell % pkw
                touched[p] = True
                for b0 in range(0, ncb, R):
                    gather_tile(
                        gl, pl, cell * F, cell * F + count, wtf, colblocks, b0, tile, 0, False
                    )
                    for r in range(min(R, ncb - b0)):
                        dst = dcol[p * ncp + (b0 + r) * FT : p * ncp + (b0 + r + 1) * FT]
                        for c in range(min(FT, ncp)):  # = FT, a runtime bound: vectorised
                            dst[c] = tile[r * FT + c]
    for cb in range(ncb):
        c0 = cb * FT
        for p in range(P):
            if not touched[p]:
                continue
            base = pixoff[p]
            src = np.uint64(p * ncp + c0)
            if contiguous[cb]:
                nb = min(FT, ncol - c0)  # = FT; a constant trip count unrolled to scalar code
                dst = base + coloff[c0]
                for f in range(np.uint64(nb)):
                    img[dst + f] += dcol[src + f]
            else:
                for f in range(min(FT, ncol - c0)):
                    img[base + coloff[c0 + f]] += dcol[src + np.uint64(f)]


@njit(parallel=True, cache=True)
def maxpool2d_conv2d_backward_input(
    gp,
    argmax,
    y,
    relu,
    pkh,
    pkw,
    weight,
    stride_h,
    stride_w,
    pad_top,
    pad_left,
    dil_h,
    dil_w,
    OH,
    OW,
    dx,
):
    """dx (N, H, W, C) of the convolution, for the gradient that the max pool (and ReLU)
    backward would give for gp: bitwise conv2d_backward_input's result for a finite weight.
    Parallel over chunks of images (a chunk adds only into its own images)."""
    N, H, W, C = dx.shape
    PH, PW, F = gp.shape[1], gp.shape[2], gp.shape[3]
    KH, KW = weight.shape[2], weight.shape[3]
    Hp, Wp = _read_extent(OH, OW, KH, KW, stride_h, stride_w, dil_h, dil_w)
    padded = _needs_padding(dx, pad_top, pad_left, Hp, Wp)
    XH, XW = (Hp, Wp) if padded else (H, W)
    image = XH * XW * C
    wt, coloff, contiguous, pixoff = _col2im_operands(
        weight, OH, OW, XW, stride_h, stride_w, dil_h, dil_w
    )
    ncol = KH * KW * C
    ncp = wt.shape[1]
    ncb = ncp // FT
    colblocks = np.empty((ncb + R - 1) // R * R, dtype=np.uint64)
    for b in range(colblocks.size):
        colblocks[b] = np.uint64(min(b, ncb - 1) * FT)
    nchunks = min(N, _INPUT_CHUNKS)  # each with a (pixel, column) scratch of an image
    step = (N + nchunks - 1) // nchunks
    gx = np.empty(N * image, dtype=dx.dtype) if padded else dx.reshape(dx.size)
    dcol = np.empty((nchunks, OH * OW * ncp), dtype=dx.dtype)
    touched = np.empty((nchunks, OH * OW), dtype=np.bool_)
    gl = np.empty((nchunks, pkh * pkw * F), dtype=dx.dtype)
    pl = np.empty((nchunks, pkh * pkw * F), dtype=np.uint64)
    counts = np.empty((nchunks, pkh * pkw), dtype=np.int64)
    tiles = np.empty((nchunks, R * FT), dtype=dx.dtype)
    wtf = wt.reshape(wt.size)
    gpf, amf, yf = gp.reshape(gp.size), argmax.reshape(argmax.size), y.reshape(y.size)
    for chunk in prange(nchunks):
        for n in range(chunk * step, min(chunk * step + step, N)):
            img = gx[n * image : (n + 1) * image]
            _input_from_pool(
                n,
                gpf,
                amf,
                yf,
                relu,
                PH,
                PW,
                F,
                pkh,
                pkw,
                OW,
                wtf,
                ncp,
                ncol,
                coloff,
                contiguous,
                pixoff,
                colblocks,
                gl[chunk],
                pl[chunk],
                counts[chunk],
                tiles[chunk],
                dcol[chunk],
                touched[chunk],
                img,
            )
            if padded:
                _crop(img, XH, XW, pad_top, pad_left, dx, n)
