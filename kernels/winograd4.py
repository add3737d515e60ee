"""3x3 stride-1 convolution by Winograd's F(4x4, 3x3) (Lavin & Gray, 2016), over channels-last
(NHWC) arrays: 36 multiplications per 4x4 outputs and input channel and filter where the
direct product takes 144 (4x fewer; F(2x2, 3x3) of winograd.py: 2.25x), and its transforms
cost less per output too (a 6x6 patch per 16 outputs, against 4x4 per 4).

Each 4x4 block of outputs ("tile") reads a 6x6 patch d of every input channel and computes

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, summed over the channels)

    B^T = [[4,  0, -5,  0, 1, 0],     G = [[ 1/4,     0,    0],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],          [-1/6,  -1/6, -1/6],            [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],          [-1/6,   1/6, -1/6],            [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],          [1/24,  1/12,  1/6],            [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],          [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]          [   0,     0,    1]]

so the sum over channels becomes 36 independent matrix products, one per position e of the
6x6 transformed patch: M[e] (tiles x F) = V[e] (tiles x C) @ U[e] (C x F), on the register
tiles of gemm_tile.py (winograd.block_products and, for 32 filters and more,
block_products_wide), a block of tiles at a time (winograd.py's scheme, 36 products where it
has 16).

Shapes, contract, ``relu`` and ``bn`` as winograd.conv2d_winograd_forward (C and F multiples
of 16). The result is the convolution up to rounding: the transforms' larger coefficients
round more than F(2x2, 3x3)'s (tests/test_winograd4.py bounds the error against the textbook
loops). Deterministic: no sum's order depends on the thread count.
"""

import numba
import numpy as np
from numba import njit, prange

from .gemm_tile import FTN, RN, copy16, stack_array
from .lanes import (
    add16,
    batch_norm16,
    f4_gradient16,
    f4_gradient16_masked,
    f4_input16,
    f4_input16_masked,
    f4_output16,
    relu16,
)
from .winograd import (
    _WEIGHT_CHUNKS,
    block_products,
    block_products_wide,
    kernels_by_tap,
    weight_operands,
    weight_products,
)

#: Tiles per block (a multiple of the register tile's RN rows).
_BLOCK_TILES = 12
#: Positions of the transformed 6x6 patch, and floats per tile and 16 channels (or filters).
_E = 36
_S = _E * 16


@njit(cache=True)
def weight_transform(weight, Fp):
    """U (36, C, Fp): U[6*a + b, c, f] = (G weight[f, c] G^T)[a, b], in float64, filters
    f >= F zero (the tile's padding columns). One channel at a time, the filters innermost
    (see winograd.weight_transform). Computed as (24 G) g (24 G)^T / 576: 24 G has small
    integer entries, so the float64 sums are exact for float32 weights of similar magnitude
    and one multiplication rounds, where G's own entries (1/6, 1/12, 1/24) took a float64
    division each (most of the transform's time)."""
    F, C = weight.shape[0], weight.shape[1]
    U = np.zeros((_E, C, Fp), dtype=weight.dtype)
    g = np.empty((9, F), dtype=np.float64)  # one channel's kernels: tap (i, j) in row 3i + j
    gg = np.empty((18, F), dtype=np.float64)  # (24 G) g: (a, j) in row 3a + j
    scale = 1.0 / 576.0
    for c in range(C):
        kernels_by_tap(weight, c, g)
        for j in range(3):  # (24 G) g: the kernel's rows combined
            for f in range(F):
                g0, g1, g2 = g[j, f], g[3 + j, f], g[6 + j, f]
                gg[j, f] = 6.0 * g0
                gg[3 + j, f] = -4.0 * (g0 + g1 + g2)
                gg[6 + j, f] = -4.0 * (g0 - g1 + g2)
                gg[9 + j, f] = g0 + 2.0 * g1 + 4.0 * g2
                gg[12 + j, f] = g0 - 2.0 * g1 + 4.0 * g2
                gg[15 + j, f] = 24.0 * g2
        for a in range(6):  # ((24 G) g) (24 G)^T / 576: its columns combined
            for f in range(F):
                h0, h1, h2 = gg[3 * a, f], gg[3 * a + 1, f], gg[3 * a + 2, f]
                U[6 * a + 0, c, f] = 6.0 * h0 * scale
                U[6 * a + 1, c, f] = -4.0 * (h0 + h1 + h2) * scale
                U[6 * a + 2, c, f] = -4.0 * (h0 - h1 + h2) * scale
                U[6 * a + 3, c, f] = (h0 + 2.0 * h1 + 4.0 * h2) * scale
                U[6 * a + 4, c, f] = (h0 - 2.0 * h1 + 4.0 * h2) * scale
                U[6 * a + 5, c, f] = 24.0 * h2 * scale
    return U


@njit(cache=True, inline="always")
def _tile(g, TH, TW):
    """(image, tile row, tile column) of tile g, tiles numbered image by image and row by row
    (TH rows of TW per image): a block's first; _next_tile steps on without a division."""
    n, k = divmod(g, TH * TW)
    ty, tx = divmod(k, TW)
    return n, ty, tx


@njit(cache=True, inline="always")
def _output_tile(n, ty, tx, OH, OW, F):
    """(rows, columns, offset of its first pixel in the flat (N, OH, OW, F) output) of output
    tile (n, ty, tx): 4 x 4 but at the output's last rows and columns."""
    oy, ox = 4 * ty, 4 * tx
    return min(4, OH - oy), min(4, OW - ox), np.uint64(((n * OH + oy) * OW + ox) * F)


@njit(cache=True, inline="always")
def _next_tile(n, ty, tx, TH, TW):
    """(image, tile row, tile column) of the tile after (n, ty, tx), tiles numbered image by
    image and row by row."""
    if tx + 1 < TW:
        return n, ty, tx + 1
    if ty + 1 < TH:
        return n, ty + 1, 0
    return n + 1, 0, 0


@njit(cache=True)
def _input_block(xf, H, W, C, TH, TW, g0, nt, pad_top, pad_left, V, TBp, by_element):
    """V[t, c // 16, e, c % 16] = (B^T d B)[e] for the block's tiles t < nt, d the 6x6 input
    patch of tile g0 + t (tiles numbered image by image, row by row: TH rows of TW per image),
    every channel (C a multiple of 16); positions outside the image read as zeros; with
    ``by_element``, V[e, c // 16, t, c % 16] (the weight gradient's layout, TBp tiles per
    plane: winograd._input_block's). xf: x (N, H, W, C) flat; V flat. 16 channels at a time:
    B^T d from x into the stack, then (B^T d) B from the stack into V (lanes.f4_input16)."""
    r = numba.carray(stack_array(_S, V.dtype), (_S,))  # B^T d: 16 * (6 i + j) + lane
    po = numba.carray(stack_array(12, np.uint64), (12,))  # each row's, then column's offset in x
    cols = numba.carray(stack_array(6, np.uint64), (6,))  # all ones: column j inside the image
    rows_inside = np.uint64(0)  # bit i: row i of an edge patch inside the image
    n, ty, tx = _tile(g0, TH, TW)  # tile t: image n, tile row ty, column tx
    row = np.uint64(W * C)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        img = n * H * W * C
        y0 = 4 * ty - pad_top
        x0 = 4 * tx - pad_left
        inner = 0 <= y0 and y0 + 6 <= H and 0 <= x0 and x0 + 6 <= W
        if not inner:  # each row's and column's pixel (clamped) and whether it is inside
            rows_inside = np.uint64(0)
            for i in range(6):
                y = y0 + i
                po[i] = np.uint64(img + min(max(y, 0), H - 1) * W * C)
                if 0 <= y < H:
                    rows_inside |= np.uint64(1) << np.uint64(i)
            for j in range(6):
                xx = x0 + j
                po[6 + j] = np.uint64(min(max(xx, 0), W - 1) * C)
                cols[j] = np.uint64(0b111111 if 0 <= xx < W else 0)
        corner = np.uint64(img + (y0 * W + x0) * C) if inner else np.uint64(0)
        for c0 in range(0, C, 16):
            u0 = np.uint64(c0)
            for j in range(6):  # B^T d: each column's 6 rows combined
                dst = np.uint64(16 * j)
                if inner:  # the whole patch inside: fixed offsets from its corner, no table
                    f4_input16(xf, corner + np.uint64(j * C) + u0, row, r, dst, np.uint64(96))
                else:
                    col, mask = po[6 + j] + u0, rows_inside & cols[j]
                    f4_input16_masked(xf, po, col, mask, r, dst, np.uint64(96))
            for i in range(6):  # (B^T d) B: each row's 6 columns combined, into V
                src = np.uint64(96 * i)
                if by_element:  # e = 6 i + b at V[e, c // 16, t]
                    dst = np.uint64((6 * i * C + c0) * TBp + t * 16)
                    f4_input16(r, src, np.uint64(16), V, dst, np.uint64(C * TBp))
                else:  # V[t, c // 16, e]: one stretch
                    dst = np.uint64((t * C + c0) * _E + 96 * i)
                    f4_input16(r, src, np.uint64(16), V, dst, np.uint64(16))


@njit(cache=True)
def _output_block(M, TBp, nfb, nt, TH, TW, g0, bias, of, OH, OW, F, relu, bn):
    """out[n, oy:oy+4, ox:ox+4, :] = A^T M A + bias for the block's tiles t < nt, tile g0 + t
    numbered as in _input_block (only the rows and columns inside out), then the BatchNorm
    ``bn`` and its residual sum (see conv2d_winograd4_forward), then max(., 0) if ``relu`` (a
    NaN stays NaN), each tile in the stack before it is stored. M flat (nfb, TBp, 36, 16):
    M[fb, t, e, lane]; of: out (N, OH, OW, F) flat."""
    s = numba.carray(stack_array(384, M.dtype), (384,))  # A^T M: 16 * (6 i + j) + lane, i < 4
    y = numba.carray(stack_array(256, M.dtype), (256,))  # Y: 16 * (4 i + j) + lane
    mean, scale, shift, add = bn
    affine = scale.size > 0
    nothing = add[:0]  # no residual sum (past the output's edge)
    n, ty, tx = _tile(g0, TH, TW)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        rows, cols, o00 = _output_tile(n, ty, tx, OH, OW, F)
        for fb in range(nfb):
            q = np.uint64((fb * TBp + t) * _S)  # M[fb, t, e, lane]: one stretch
            f0 = np.uint64(fb * FTN)
            for j in range(6):  # A^T M: each column's 6 rows combined, from M
                f4_output16(
                    M, q + np.uint64(16 * j), np.uint64(96), s, np.uint64(16 * j), np.uint64(96)
                )
            for i in range(4):  # (A^T M) A: each row's 6 columns combined
                f4_output16(
                    s, np.uint64(96 * i), np.uint64(16), y, np.uint64(64 * i), np.uint64(16)
                )
            # the bias, the BatchNorm, the residual sum (conv2d._batch_norm_rows' steps), the
            # ReLU: all on the tile in the stack, and only then the stores (a store right
            # after a vector op on the same pixel waited on that op)
            for i in range(4):
                for j in range(4):
                    p = np.uint64(16 * (4 * i + j))
                    add16(y, p, bias, f0)
                    if affine:
                        dst = o00 + np.uint64((i * OW + j) * F) + f0
                        inside = i < rows and j < cols
                        batch_norm16(
                            y, p, mean, scale, shift, f0, add if inside else nothing, dst, relu
                        )
                    elif relu:
                        relu16(y, p)
            if rows == 4 and cols == 4:  # a whole tile: constant trip counts, unrolled
                for i in range(4):
                    for j in range(4):
                        dst = o00 + np.uint64((i * OW + j) * F) + f0
                        copy16(of, dst, y, np.uint64(16 * (4 * i + j)))
            else:
                for i in range(rows):
                    for j in range(cols):
                        dst = o00 + np.uint64((i * OW + j) * F) + f0
                        copy16(of, dst, y, np.uint64(16 * (4 * i + j)))


@njit(parallel=True, cache=True)
def conv2d_winograd4_forward(x, U, bias, pad_top, pad_left, relu, out, bn, threads):
    """out[n, oh, ow, f] = bias[f] + sum_{i,j,c} weight[f,c,i,j] * x[n, oh - pt + i, ow - pl + j, c]
    (3x3, stride 1, dilation 1), up to rounding, by F(4x4, 3x3); then the BatchNorm ``bn``
    (mean, scale, shift, add: winograd.conv2d_winograd_forward's) and max(out, 0) if ``relu``.

    x (N, H, W, C); U (36, C, F) = weight_transform(weight, F), weight (F, C, 3, 3) (as
    winograd.conv2d_winograd_forward's U); bias (F,), C and F multiples of 16; out (N, OH, OW,
    F) overwritten. Work: the batch's tiles, numbered image by image and row by row, in blocks
    of consecutive tiles (a multiple of the register tile's RN rows, across images and tile
    rows: no product row is computed in vain but in the last block), ``threads`` workers each
    a contiguous range of blocks, each with its own scratch (V, M). Every output is computed
    by one block alone, and each product row sums its terms in the same order whatever block
    holds it: the result depends neither on ``threads`` nor on the blocking.
    """
    N, H, W, C = x.shape
    F = out.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    TH, TW = (OH + 3) // 4, (OW + 3) // 4
    T = TH * TW  # tiles per image
    NT = N * T
    Fp = U.shape[2]
    nfb = Fp // FTN
    # tiles per block: _BLOCK_TILES, or fewer where that leaves a thread without a block
    TBp = max(RN, min(_BLOCK_TILES, ((NT + threads - 1) // threads + RN - 1) // RN * RN))
    nblocks = (NT + TBp - 1) // TBp
    nthr = max(1, min(threads, nblocks))
    dt = x.dtype
    V = np.empty((nthr, TBp * C * _E), dtype=dt)
    M = np.empty((nthr, nfb * TBp * _S), dtype=dt)
    zb = np.empty(FTN, dtype=dt)  # (np.zeros here would be a parallel loop of its own)
    i0 = np.int64(0)  # block_products' first filter block and row (a literal: a second compile)
    for f in range(FTN):
        zb[f] = 0
    # V[t, c // 16, e, c % 16]: row t of the e-th product starts at abase[e * TBp + t] and
    # its channel c lies aoff[c] further
    abase = np.empty(_E * TBp, dtype=np.uint64)
    for e in range(_E):
        for t in range(TBp):
            abase[e * TBp + t] = np.uint64(t * _E * C + 16 * e)
    aoff = np.empty(C, dtype=np.uint64)
    for c in range(C):
        aoff[c] = np.uint64(c // 16 * _S + c % 16)
    Uf = U.reshape(U.size)
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for th in prange(nthr):
        Vf = V[th]
        Mf = M[th]
        for blk in range(th * nblocks // nthr, (th + 1) * nblocks // nthr):
            g0 = blk * TBp
            nt = min(TBp, NT - g0)
            _input_block(xf, H, W, C, TH, TW, g0, nt, pad_top, pad_left, Vf, TBp, False)
            ntp = (nt + RN - 1) // RN * RN  # (rows past nt: whatever V held; never stored)
            # M[fb, t, e, :]: a tile's 36 products in one stretch
            if nfb >= 2:
                block_products_wide(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, nfb, ntp, _E, _S)
            else:
                block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, i0, nfb, i0, ntp, _E, _S)
            _output_block(Mf, TBp, nfb, nt, TH, TW, g0, bias, of, OH, OW, F, relu, bn)


# -------------------------------------------------------------------------------------------------
# the weight gradient: F(4x4, 3x3) run backwards, as winograd.py's F(2x2, 3x3) one
#
#     dg = G^T [ sum over tiles (A dY A^T) * (B^T d B) ] G          (* elementwise)
#
# 36 matrix products, one per position e of the 6x6, S[e] (F x C) = sum_t Z[t, e, :]^T V[t, e, :]
# with Z = A dY A^T: 36 multiply-adds per 16 gradients, filter and channel where F(2x2) takes 64
# and the direct gradient 144.

#: Tiles per block of the weight gradient (odd: see winograd.py's TBp), its products' k.
_WEIGHT_BLOCK_TILES = 47


@njit(cache=True)
def _gradient_block(dyf, OH, OW, F, TH, TW, g0, nt, Z, TBp, bsum):
    """Z[e, t, f] = (A dY A^T)[e] for the block's tiles t < nt (tile g0 + t, numbered as in
    _input_block), dY the tile's 4x4 gradient (zero past the output's last row or column),
    every filter (F a multiple of 16); and bsum[f] += the tile's sum of dY ((A dY A^T)[1, 1]
    is that sum). dyf: dy (N, OH, OW, F) flat; Z flat (36, TBp, F). 16 filters at a time: A dY
    from dy into the stack, then (A dY) A^T from the stack into Z (lanes.f4_gradient16)."""
    s = numba.carray(stack_array(384, Z.dtype), (384,))  # A dY: 16 * (4 a + j) + lane
    po = numba.carray(stack_array(4, np.uint64), (4,))  # an edge tile's rows in dy (clamped)
    row = np.uint64(OW * F)
    n, ty, tx = _tile(g0, TH, TW)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        rows, cols, o00 = _output_tile(n, ty, tx, OH, OW, F)
        whole = rows == 4 and cols == 4
        for i in range(4):
            po[i] = o00 + np.uint64(min(i, rows - 1)) * row
        rows_inside = np.uint64((1 << rows) - 1)
        for f0 in range(0, F, 16):
            u0 = np.uint64(f0)
            for j in range(4):  # A dY: each column's 4 rows combined
                dst = np.uint64(16 * j)
                if whole:
                    f4_gradient16(dyf, o00 + np.uint64(j * F) + u0, row, s, dst, np.uint64(64))
                else:
                    col = np.uint64(min(j, cols - 1) * F) + u0
                    mask = rows_inside if j < cols else np.uint64(0)
                    f4_gradient16_masked(dyf, po, col, mask, s, dst, np.uint64(64))
            for a in range(6):  # (A dY) A^T: each row's 4 columns combined, into Z
                dst = np.uint64((6 * a * TBp + t) * F + f0)
                f4_gradient16(s, np.uint64(64 * a), np.uint64(16), Z, dst, np.uint64(TBp * F))
            add16(bsum, u0, Z, np.uint64((7 * TBp + t) * F) + u0)


@njit(cache=True)
def _weight_from_products(S, nrb, ncb, F, C, dweight):
    """dweight[f, c] = G^T s G, s the 6x6 of S[e, f, c] (e = 6 a + b), in float64, as
    (24 G)^T s (24 G) / 576 (weight_transform's reason), 16 channels of one column block at a
    time; S flat (36, nrb, ncb, RN, FTN) as the products' tiles."""
    tile = RN * FTN
    s = numba.carray(stack_array(_S, np.float64), (_S,))  # 16 * e + lane
    h = numba.carray(stack_array(288, np.float64), (288,))  # (24 G)^T s: 16 * (6 i + b) + lane
    scale = 1.0 / 576.0
    for rb in range(nrb):
        for r in range(min(RN, F - rb * RN)):
            f = rb * RN + r
            for cb in range(ncb):
                for e in range(_E):
                    o = np.uint64(((e * nrb + rb) * ncb + cb) * tile + r * FTN)
                    for lane in range(16):
                        s[16 * e + lane] = np.float64(S[o + np.uint64(lane)])
                for b in range(6):  # (24 G)^T s: each column's 6 rows combined
                    for lane in range(16):
                        s0, s1 = s[16 * b + lane], s[16 * (6 + b) + lane]
                        s2, s3 = s[16 * (12 + b) + lane], s[16 * (18 + b) + lane]
                        s4, s5 = s[16 * (24 + b) + lane], s[16 * (30 + b) + lane]
                        h[16 * b + lane] = 6.0 * s0 - 4.0 * (s1 + s2) + s3 + s4
                        h[16 * (6 + b) + lane] = 4.0 * (s2 - s1) + 2.0 * (s3 - s4)
                        h[16 * (12 + b) + lane] = 4.0 * (s3 + s4 - s1 - s2) + 24.0 * s5
                for i in range(3):  # then its rows: ((24 G)^T s) (24 G) / 576
                    for lane in range(16):
                        h0, h1 = h[16 * (6 * i) + lane], h[16 * (6 * i + 1) + lane]
                        h2, h3 = h[16 * (6 * i + 2) + lane], h[16 * (6 * i + 3) + lane]
                        h4, h5 = h[16 * (6 * i + 4) + lane], h[16 * (6 * i + 5) + lane]
                        c = cb * FTN + lane
                        dweight[f, c, i, 0] = (6.0 * h0 - 4.0 * (h1 + h2) + h3 + h4) * scale
                        dweight[f, c, i, 1] = (4.0 * (h2 - h1) + 2.0 * (h3 - h4)) * scale
                        dweight[f, c, i, 2] = (4.0 * (h3 + h4 - h1 - h2) + 24.0 * h5) * scale


@njit(parallel=True, cache=True)
def conv2d_winograd4_backward_weight(x, dy, pad_top, pad_left, dweight, dbias, threads):
    """dweight[f, c, i, j] = sum_{n, oh, ow} dy[n, oh, ow, f] * x[n, oh - pt + i, ow - pl + j, c]
    (3x3, stride 1, dilation 1), up to rounding, by F(4x4, 3x3) run backwards (see above);
    dbias[f] = sum dy[..., f]. Shapes, contract and padding as
    winograd.conv2d_winograd_backward_weight's.

    Work: the batch's tiles, numbered as the forward's, in blocks of _WEIGHT_BLOCK_TILES
    consecutive ones, in _WEIGHT_CHUNKS contiguous chunks fixed by the shapes, each summing
    its tiles in order into its own S (rows = filters, columns = channels); ``threads``
    workers each take a contiguous range of chunks with their own scratch (a block's V and
    Z). The chunks' S are then added in chunk order and G^T S G taken in float64:
    deterministic for any thread count.
    """
    N, H, W, C = x.shape
    OH, OW, F = dy.shape[1], dy.shape[2], dy.shape[3]
    TH, TW = (OH + 3) // 4, (OW + 3) // 4
    NT = N * TH * TW
    TBp = _WEIGHT_BLOCK_TILES
    nblocks = (NT + TBp - 1) // TBp
    nchunks = max(1, min(_WEIGHT_CHUNKS, nblocks))
    nthr = max(1, min(threads, nchunks))
    nrb = (F + RN - 1) // RN  # row blocks of filters (the last one's padding rows: filter 0)
    ncb = C // FTN  # column blocks of channels
    dt = x.dtype
    tile = RN * FTN
    ssize = _E * nrb * ncb * tile
    S = np.empty((nchunks, ssize), dtype=dt)
    B = np.empty((nchunks, F), dtype=dt)
    V = np.empty((nthr, _E * TBp * C), dtype=dt)
    Z = np.empty((nthr, _E * TBp * F), dtype=dt)
    abase, aoff = weight_operands(_E, nrb, TBp, F)
    xf = x.reshape(x.size)
    dyf = dy.reshape(dy.size)
    for th in prange(nthr):
        Vf = V[th]
        Zf = Z[th]
        for ch in range(th * nchunks // nthr, (th + 1) * nchunks // nthr):
            Sf = S[ch]
            bs = B[ch]
            for f in range(F):
                bs[f] = 0
            b0 = ch * nblocks // nchunks
            for blk in range(b0, (ch + 1) * nblocks // nchunks):
                g0 = blk * TBp
                nt = min(TBp, NT - g0)
                _input_block(xf, H, W, C, TH, TW, g0, nt, pad_top, pad_left, Vf, TBp, True)
                _gradient_block(dyf, OH, OW, F, TH, TW, g0, nt, Zf, TBp, bs)
                # the chunk's first block starts its sums at 0
                weight_products(Zf, abase, aoff, nt, Vf, TBp, Sf, _E, nrb, ncb, blk > b0)
    # the chunks' products added in chunk order (into chunk 0's), a range of S per worker
    for th in prange(nthr):
        i0, i1 = th * ssize // nthr, (th + 1) * ssize // nthr
        S0 = S[0, i0:i1]
        for ch in range(1, nchunks):
            Sc = S[ch, i0:i1]  # slices and a loop from 0: winograd.py's reason
            for i in range(S0.size):
                S0[i] += Sc[i]
    _weight_from_products(S[0], nrb, ncb, F, C, dweight)
    for f in range(F):
        b = B[0, f]
        for ch in range(1, nchunks):
            b += B[ch, f]
        dbias[f] = b
