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
6x6 transformed patch: M[e] (tiles x F) = V[e] (tiles x C) @ U[e] (C x F), on the narrow
register tile of gemm_tile.py, a block of tiles at a time (winograd.py's scheme, 36 products
where it has 16).

Shapes, contract, ``relu`` and ``bn`` as winograd.conv2d_winograd_forward (C and F multiples
of 16). The result is the convolution up to rounding: the transforms' larger coefficients
round more than F(2x2, 3x3)'s (tests/test_winograd4.py bounds the error against the textbook
loops). Deterministic: no sum's order depends on the thread count.
"""

import numba
import numpy as np
from numba import njit, prange

from .gemm_tile import FTN, RN, copy16, stack_array
from .lanes import add16, batch_norm16, relu16
from .winograd import (
    _WEIGHT_CHUNKS,
    block_products,
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
def _bt(src, dst, base, stride, lane):
    """dst[base + e * stride + lane] = (B^T s)[e] for the 6 values s[k] = src[base + k * stride
    + lane]: one row or column of the input transform (inlined with constant offsets)."""
    d0 = src[base + lane]
    d1 = src[base + stride + lane]
    d2 = src[base + 2 * stride + lane]
    d3 = src[base + 3 * stride + lane]
    d4 = src[base + 4 * stride + lane]
    d5 = src[base + 5 * stride + lane]
    # constants of the arrays' dtype: an int literal makes float32 arithmetic float64
    two, four = src.dtype.type(2), src.dtype.type(4)
    # B^T's rows share terms: rows 1 and 2 are t0 +- t1, rows 3 and 4 t2 +- t3 (14 operations
    # with the caller's fused multiply-adds, where each row on its own took 24)
    t0 = d4 - four * d2
    t1 = d3 - four * d1
    t2 = d4 - d2
    t3 = two * (d3 - d1)
    dst[base + lane] = four * (d0 - d2) + t2
    dst[base + stride + lane] = t0 + t1
    dst[base + 2 * stride + lane] = t0 - t1
    dst[base + 3 * stride + lane] = t2 + t3
    dst[base + 4 * stride + lane] = t2 - t3
    dst[base + 5 * stride + lane] = four * (d1 - d3) + (d5 - d3)


@njit(cache=True, inline="always")
def _at(src, dst, sbase, sstride, dbase, dstride, lane):
    """dst[dbase + i * dstride + lane] = (A^T s)[i], i < 4, for the 6 values s[k] =
    src[sbase + k * sstride + lane]: one row or column of the output transform."""
    m0 = src[sbase + lane]
    m1 = src[sbase + sstride + lane]
    m2 = src[sbase + 2 * sstride + lane]
    m3 = src[sbase + 3 * sstride + lane]
    m4 = src[sbase + 4 * sstride + lane]
    m5 = src[sbase + 5 * sstride + lane]
    a, b = m1 + m2, m1 - m2
    c, e = m3 + m4, m3 - m4
    two, four, eight = src.dtype.type(2), src.dtype.type(4), src.dtype.type(8)
    dst[dbase + lane] = m0 + a + c
    dst[dbase + dstride + lane] = b + two * e
    dst[dbase + 2 * dstride + lane] = a + four * c
    dst[dbase + 3 * dstride + lane] = b + eight * e + m5


@njit(cache=True, inline="always")
def _next_tile(n, ty, tx, TH, TW):
    """(image, tile row, tile column) of the tile after (n, ty, tx), tiles numbered image by
    image and row by row."""
    if tx + 1 < TW:
        return n, ty, tx + 1
    if ty + 1 < TH:
        return n, ty + 1, 0
    return n + 1, 0, 0


@njit(cache=True, fastmath={"contract"})  # _bt's multiply-adds fused
def _input_block(xf, H, W, C, TH, TW, g0, nt, pad_top, pad_left, V, TBp, by_element):
    """V[t, c // 16, e, c % 16] = (B^T d B)[e] for the block's tiles t < nt, d the 6x6 input
    patch of tile g0 + t (tiles numbered image by image, row by row: TH rows of TW per image),
    every channel (C a multiple of 16); positions outside the image read as zeros; with
    ``by_element``, V[e, c // 16, t, c % 16] (the weight gradient's layout, TBp tiles per
    plane: winograd._input_block's). xf: x (N, H, W, C) flat; V flat. As winograd.py: loops
    between one array and the stack, or within the stack, 16 channels at a time (LLVM makes
    those vector code; one loop from x to V stayed scalar)."""
    d = numba.carray(stack_array(_S, V.dtype), (_S,))  # the patch: 16 * (6 i + j) + lane
    r = numba.carray(stack_array(_S, V.dtype), (_S,))  # B^T d: 16 * (6 i + j) + lane
    v = numba.carray(stack_array(_S, V.dtype), (_S,))  # B^T d B: 16 * e + lane
    po = numba.carray(stack_array(12, np.uint64), (12,))  # each row's, then column's offset in x
    ok = numba.carray(stack_array(12, np.uint64), (12,))  # 1 inside the image, 0 outside
    zeros = numba.carray(stack_array(16, V.dtype), (16,))
    for lane in range(16):
        zeros[lane] = 0
    n, k = divmod(g0, TH * TW)  # tile t: image n, tile row ty, column tx (no division per tile)
    ty, tx = divmod(k, TW)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        img = n * H * W * C
        y0 = 4 * ty - pad_top
        x0 = 4 * tx - pad_left
        inner = 0 <= y0 and y0 + 6 <= H and 0 <= x0 and x0 + 6 <= W
        if not inner:  # each row's and column's pixel (clamped) and whether it is inside
            for i in range(6):
                y = y0 + i
                po[i] = np.uint64(img + min(max(y, 0), H - 1) * W * C)
                ok[i] = np.uint64(1 if 0 <= y < H else 0)
            for j in range(6):
                xx = x0 + j
                po[6 + j] = np.uint64(min(max(xx, 0), W - 1) * C)
                ok[6 + j] = np.uint64(1 if 0 <= xx < W else 0)
        corner = np.uint64(img + (y0 * W + x0) * C) if inner else np.uint64(0)
        for c0 in range(0, C, 16):
            u0 = np.uint64(c0)
            if inner:  # the whole patch inside: its pixels at fixed offsets from the corner,
                # no table (filling one cost as much as the transform)
                for i in range(6):
                    for j in range(6):
                        src = corner + np.uint64((i * W + j) * C) + u0
                        copy16(d, np.uint64(16 * (6 * i + j)), xf, src)
            else:
                for i in range(6):
                    for j in range(6):
                        # copy16: one vector move (a loop of 16 with its select ran scalar:
                        # too few iterations for the vectorised loop's unrolling)
                        p = np.uint64(16 * (6 * i + j))
                        if ok[i] & ok[6 + j]:
                            copy16(d, p, xf, po[i] + po[6 + j] + u0)
                        else:
                            copy16(d, p, zeros, np.uint64(0))
            for j in range(6):  # B^T d: each column's 6 rows combined
                for lane in range(16):
                    _bt(d, r, 16 * j, 96, lane)
            for i in range(6):  # (B^T d) B: each row's 6 columns combined
                for lane in range(16):
                    _bt(r, v, 96 * i, 16, lane)
            if by_element:
                for e in range(_E):
                    copy16(V, np.uint64((e * C + c0) * TBp + t * 16), v, np.uint64(16 * e))
            else:
                q = np.uint64((t * C + c0) * _E)  # V[t, c0 // 16, e, lane]: one stretch
                for k in range(_S):
                    V[q + np.uint64(k)] = v[k]


@njit(cache=True)
def _output_block(M, TBp, nfb, nt, TH, TW, g0, bias, of, OH, OW, F, relu, bn):
    """out[n, oy:oy+4, ox:ox+4, :] = A^T M A + bias for the block's tiles t < nt, tile g0 + t
    numbered as in _input_block (only the rows and columns inside out), then the BatchNorm
    ``bn`` and its residual sum (see conv2d_winograd4_forward), then max(., 0) if ``relu`` (a
    NaN stays NaN), each tile in the stack before it is stored. M flat (nfb, TBp, 36, 16):
    M[fb, t, e, lane]; of: out (N, OH, OW, F) flat."""
    m = numba.carray(stack_array(_S, M.dtype), (_S,))  # M[e]: 16 * e + lane
    s = numba.carray(stack_array(384, M.dtype), (384,))  # A^T M: 16 * (6 i + j) + lane, i < 4
    y = numba.carray(stack_array(256, M.dtype), (256,))  # Y: 16 * (4 i + j) + lane
    mean, scale, shift, add = bn
    affine = scale.size > 0
    nothing = add[:0]  # no residual sum (past the output's edge)
    n, k = divmod(g0, TH * TW)  # as in _input_block
    ty, tx = divmod(k, TW)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        oy, ox = 4 * ty, 4 * tx
        rows, cols = min(4, OH - oy), min(4, OW - ox)
        o00 = np.uint64(((n * OH + oy) * OW + ox) * F)
        for fb in range(nfb):
            q = np.uint64((fb * TBp + t) * _S)  # M[fb, t, e, lane]: one stretch
            for k in range(_S):
                m[k] = M[q + np.uint64(k)]
            f0 = np.uint64(fb * FTN)
            for j in range(6):  # A^T M: each column's 6 rows combined
                for lane in range(16):
                    _at(m, s, 16 * j, 96, 16 * j, 96, lane)
            for i in range(4):  # (A^T M) A: each row's 6 columns combined
                for lane in range(16):
                    _at(s, y, 96 * i, 16, 64 * i, 16, lane)
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
            block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, nfb, ntp, _E, _S)
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


@njit(cache=True, inline="always")
def _a(src, dst, sbase, sstride, dbase, dstride, lane):
    """dst[dbase + e * dstride + lane] = (A s)[e], e < 6, for the 4 values s[i] = src[sbase +
    i * sstride + lane], A = (A^T)^T: one row or column of the gradient's transform."""
    g0 = src[sbase + lane]
    g1 = src[sbase + sstride + lane]
    g2 = src[sbase + 2 * sstride + lane]
    g3 = src[sbase + 3 * sstride + lane]
    two, four, eight = src.dtype.type(2), src.dtype.type(4), src.dtype.type(8)
    even, odd = g0 + g2, g1 + g3
    even4, odd8 = g0 + four * g2, two * g1 + eight * g3
    dst[dbase + lane] = g0
    dst[dbase + dstride + lane] = even + odd
    dst[dbase + 2 * dstride + lane] = even - odd
    dst[dbase + 3 * dstride + lane] = even4 + odd8
    dst[dbase + 4 * dstride + lane] = even4 - odd8
    dst[dbase + 5 * dstride + lane] = g3


@njit(cache=True)
def _gradient_block(dyf, OH, OW, F, TH, TW, g0, nt, Z, TBp, bsum):
    """Z[e, t, f] = (A dY A^T)[e] for the block's tiles t < nt (tile g0 + t, numbered as in
    _input_block), dY the tile's 4x4 gradient (zero past the output's last row or column),
    every filter (F a multiple of 16); and bsum[f] += the tile's sum of dY ((A dY A^T)[1, 1]
    is that sum). dyf: dy (N, OH, OW, F) flat; Z flat (36, TBp, F)."""
    g = numba.carray(stack_array(256, Z.dtype), (256,))  # dY: 16 * (4 i + j) + lane
    s = numba.carray(stack_array(384, Z.dtype), (384,))  # A dY: 16 * (4 a + j) + lane
    z = numba.carray(stack_array(_S, Z.dtype), (_S,))  # A dY A^T: 16 * e + lane
    zeros = numba.carray(stack_array(16, Z.dtype), (16,))
    for lane in range(16):
        zeros[lane] = 0
    n, k = divmod(g0, TH * TW)  # as in _input_block
    ty, tx = divmod(k, TW)
    for t in range(nt):
        if t > 0:
            n, ty, tx = _next_tile(n, ty, tx, TH, TW)
        oy, ox = 4 * ty, 4 * tx
        rows, cols = min(4, OH - oy), min(4, OW - ox)
        o00 = np.uint64(((n * OH + oy) * OW + ox) * F)
        for f0 in range(0, F, 16):
            u0 = np.uint64(f0)
            if rows == 4 and cols == 4:  # a whole tile: constant trip counts, unrolled
                for i in range(4):
                    for j in range(4):
                        src = o00 + np.uint64((i * OW + j) * F) + u0
                        copy16(g, np.uint64(16 * (4 * i + j)), dyf, src)
            else:
                for i in range(4):
                    for j in range(4):
                        p = np.uint64(16 * (4 * i + j))
                        if i < rows and j < cols:
                            copy16(g, p, dyf, o00 + np.uint64((i * OW + j) * F) + u0)
                        else:
                            copy16(g, p, zeros, np.uint64(0))
            for j in range(4):  # A dY: each column's 4 rows combined
                for lane in range(16):
                    _a(g, s, 16 * j, 64, 16 * j, 64, lane)
            for a in range(6):  # (A dY) A^T: each row's 4 columns combined
                for lane in range(16):
                    _a(s, z, 64 * a, 16, 96 * a, 16, lane)
            for lane in range(16):
                bsum[f0 + lane] += z[16 * 7 + lane]
            for e in range(_E):
                copy16(Z, np.uint64((e * TBp + t) * F + f0), z, np.uint64(16 * e))


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
