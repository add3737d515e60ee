"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016),
over channels-last (NHWC) arrays: 16 multiplications per 2x2 outputs and input channel and
filter where the direct product takes 36, so 2.25x fewer multiply-adds.

Each 2x2 block of outputs ("tile") reads a 4x4 patch d of every input channel and computes

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, summed over the channels)

    B^T = [[1, 0,-1, 0],    G = [[  1,    0,   0],    A^T = [[1, 1, 1, 0],
           [0, 1, 1, 0],         [1/2,  1/2, 1/2],           [0, 1,-1,-1]]
           [0,-1, 1, 0],         [1/2, -1/2, 1/2],
           [0, 1, 0,-1]]         [  0,    0,   1]]

so the sum over channels becomes 16 independent matrix products, one per position of the 4x4
transformed patch: M[e] (tiles x F) = V[e] (tiles x C) @ U[e] (C x F). They run on the register
tile of gemm_tile.py (rows = tiles, k = channels, columns = filters), a block of tiles at a
time, so the transformed patches V and products M of a block stay in cache.

Shapes and contract as kernels/conv2d.py: x (N, H, W, C), weight (F, C, 3, 3), bias (F,),
out (N, OH, OW, F) overwritten; padding as top/left offsets, the bottom/right padding whatever
OH = H + pad_top + pad_bottom - 2 implies. Float32 or float64; nothing validated here.

The result is the convolution up to rounding (not bitwise the direct kernel's: the terms are
added in another order, and the transforms round): tests/test_winograd.py bounds the error
against the textbook loops. Deterministic: no sum's order depends on the thread count.
"""

import math

import numba
import numpy as np
from numba import njit, prange

from .gemm_tile import (
    FT,
    FTN,
    RN,
    RT,
    TALL,
    R,
    copy16,
    gemm_tile,
    gemm_tile_bias,
    gemm_tile_tall,
    stack_array,
)
from .lanes import batch_norm16

#: Tiles per block, at least: whole rows of tiles of one image are taken until a block holds
#: this many (its outputs are then whole rows of the image: one contiguous stretch of out).
_BLOCK_TILES = 24


# The transforms move 16 channels (or filters) at a time through small stack buffers, in
# loops of constant length: loads into a buffer, arithmetic between buffers, stores out of
# one. Numba tells LLVM nothing about which arrays may overlap, and a loop that reads one
# array and writes another was left as scalar code; a loop between an array and a buffer on
# the stack, or between two buffers, becomes vector code.


@njit(cache=True)
def kernels_by_tap(weight, c, g):
    """g[3*i + j, f] = weight[f, c, i, j] in float64: channel c's 3x3 kernels, a tap per row
    and the filters along it (the weight transforms' loops then run over the filters)."""
    for f in range(weight.shape[0]):
        for i in range(3):
            for j in range(3):
                g[3 * i + j, f] = np.float64(weight[f, c, i, j])


@njit(cache=True)
def weight_transform(weight, Fp):
    """U (16, C, Fp): U[4*a + b, c, f] = (G weight[f, c] G^T)[a, b], computed in float64,
    filters f >= F zero (the tile's padding columns).

    One channel at a time, the filters innermost: each step is a loop over f between rows of
    small buffers, which LLVM vectorises, and U's rows are written in order. (Filter by filter,
    the 16 values of one (f, c) went to 16 rows C * Fp apart, as many streams on as few cache
    sets: 4-7x slower at 32 and 64 channels.)"""
    F, C = weight.shape[0], weight.shape[1]
    U = np.zeros((16, C, Fp), dtype=weight.dtype)
    g = np.empty((9, F), dtype=np.float64)  # one channel's kernels: tap (i, j) in row 3i + j
    gg = np.empty((12, F), dtype=np.float64)  # G g: (a, j) in row 3a + j
    for c in range(C):
        kernels_by_tap(weight, c, g)
        for j in range(3):  # G g: rows of the 3x3 kernel combined
            for f in range(F):
                g0, g1, g2 = g[j, f], g[3 + j, f], g[6 + j, f]
                gg[j, f] = g0
                gg[3 + j, f] = (g0 + g1 + g2) * 0.5
                gg[6 + j, f] = (g0 - g1 + g2) * 0.5
                gg[9 + j, f] = g2
        for a in range(4):  # (G g) G^T: its columns combined
            for f in range(F):
                h0, h1, h2 = gg[3 * a, f], gg[3 * a + 1, f], gg[3 * a + 2, f]
                U[4 * a + 0, c, f] = h0
                U[4 * a + 1, c, f] = (h0 + h1 + h2) * 0.5
                U[4 * a + 2, c, f] = (h0 - h1 + h2) * 0.5
                U[4 * a + 3, c, f] = h2
    return U


@njit(cache=True)
def _input_block(xf, H, W, C, n, ty0, nt, TW, pad_top, pad_left, V, TBp, t0, by_element):
    """V[e, t0 + t, :] = (B^T d B)[e] for the block's tiles t < nt (tile row ty0 + t // TW,
    column t % TW of image n), d the tile's 4x4 input patch, every channel (C a multiple of
    16); positions outside the image read as zeros. xf: x (N, H, W, C) flat; V flat
    (TBp, C // 16, 16, 16): V[t, c // 16, e, c % 16] (the forward's), or with ``by_element``
    (16, C // 16, TBp, 16): V[e, c // 16, t, c % 16] (the weight gradient's: a product's
    operand, one e and 16 channels, then runs over the tiles in one stretch).

    Written out position by position, 16 channels at a time, in three loops: the patch from
    x into a stack buffer, the transform from buffer to buffer, the result from the buffer
    into V. Numba tells LLVM nothing about which arrays may overlap, and one loop reading x
    and writing V stayed scalar; loops with constant offsets between an array and the stack,
    or within the stack, become vector code. No calls inside (even an inlined function adds
    reference-counting calls, which LLVM cannot move loads across)."""
    d = numba.carray(stack_array(256, V.dtype), (256,))  # the patch: 16 * (4 i + j) + lane
    v = numba.carray(stack_array(256, V.dtype), (256,))  # B^T d B: 16 * e + lane
    po = numba.carray(stack_array(16, np.uint64), (16,))  # each position's pixel in x
    ok = numba.carray(stack_array(16, np.uint64), (16,))  # 1 inside the image, 0 outside
    img = n * H * W * C
    zero = V.dtype.type(0)
    for t in range(nt):
        y0 = 2 * (ty0 + t // TW) - pad_top
        x0 = 2 * (t % TW) - pad_left
        for i in range(4):
            for j in range(4):
                y, xx = y0 + i, x0 + j
                inside = 0 <= y < H and 0 <= xx < W
                # outside: read the patch's own corner pixel (clamped) and select a zero
                yc, xc = min(max(y, 0), H - 1), min(max(xx, 0), W - 1)
                po[4 * i + j] = np.uint64(img + (yc * W + xc) * C)
                ok[4 * i + j] = np.uint64(1 if inside else 0)
        p0, p1, p2, p3, p4, p5, p6, p7 = po[0], po[1], po[2], po[3], po[4], po[5], po[6], po[7]
        p8, p9, p10, p11 = po[8], po[9], po[10], po[11]
        p12, p13, p14, p15 = po[12], po[13], po[14], po[15]
        k0, k1, k2, k3, k4, k5, k6, k7 = ok[0], ok[1], ok[2], ok[3], ok[4], ok[5], ok[6], ok[7]
        k8, k9, k10, k11 = ok[8], ok[9], ok[10], ok[11]
        k12, k13, k14, k15 = ok[12], ok[13], ok[14], ok[15]
        for c0 in range(0, C, 16):
            for lane in range(16):
                u = np.uint64(c0 + lane)
                g0, g1, g2, g3 = xf[p0 + u], xf[p1 + u], xf[p2 + u], xf[p3 + u]
                g4, g5, g6, g7 = xf[p4 + u], xf[p5 + u], xf[p6 + u], xf[p7 + u]
                g8, g9, g10, g11 = xf[p8 + u], xf[p9 + u], xf[p10 + u], xf[p11 + u]
                g12, g13, g14, g15 = xf[p12 + u], xf[p13 + u], xf[p14 + u], xf[p15 + u]
                d[lane] = g0 if k0 else zero
                d[16 + lane] = g1 if k1 else zero
                d[32 + lane] = g2 if k2 else zero
                d[48 + lane] = g3 if k3 else zero
                d[64 + lane] = g4 if k4 else zero
                d[80 + lane] = g5 if k5 else zero
                d[96 + lane] = g6 if k6 else zero
                d[112 + lane] = g7 if k7 else zero
                d[128 + lane] = g8 if k8 else zero
                d[144 + lane] = g9 if k9 else zero
                d[160 + lane] = g10 if k10 else zero
                d[176 + lane] = g11 if k11 else zero
                d[192 + lane] = g12 if k12 else zero
                d[208 + lane] = g13 if k13 else zero
                d[224 + lane] = g14 if k14 else zero
                d[240 + lane] = g15 if k15 else zero
            for lane in range(16):
                d00, d01, d02, d03 = d[lane], d[16 + lane], d[32 + lane], d[48 + lane]
                d10, d11, d12, d13 = d[64 + lane], d[80 + lane], d[96 + lane], d[112 + lane]
                d20, d21, d22, d23 = d[128 + lane], d[144 + lane], d[160 + lane], d[176 + lane]
                d30, d31, d32, d33 = d[192 + lane], d[208 + lane], d[224 + lane], d[240 + lane]
                # B^T d: the patch's rows combined; then (B^T d) B: its columns
                a0, a1, a2, a3 = d00 - d20, d01 - d21, d02 - d22, d03 - d23
                b0, b1, b2, b3 = d10 + d20, d11 + d21, d12 + d22, d13 + d23
                e0, e1, e2, e3 = d20 - d10, d21 - d11, d22 - d12, d23 - d13
                h0, h1, h2, h3 = d10 - d30, d11 - d31, d12 - d32, d13 - d33
                v[lane] = a0 - a2
                v[16 + lane] = a1 + a2
                v[32 + lane] = a2 - a1
                v[48 + lane] = a1 - a3
                v[64 + lane] = b0 - b2
                v[80 + lane] = b1 + b2
                v[96 + lane] = b2 - b1
                v[112 + lane] = b1 - b3
                v[128 + lane] = e0 - e2
                v[144 + lane] = e1 + e2
                v[160 + lane] = e2 - e1
                v[176 + lane] = e1 - e3
                v[192 + lane] = h0 - h2
                v[208 + lane] = h1 + h2
                v[224 + lane] = h2 - h1
                v[240 + lane] = h1 - h3
            if by_element:
                for e in range(16):
                    q = np.uint64((e * C + c0) * TBp + (t0 + t) * 16)
                    copy16(V, q, v, np.uint64(16 * e))
            else:
                q = np.uint64(((t0 + t) * C + c0) * 16)  # V[t, c0 // 16, e, lane]: one stretch
                for k in range(256):
                    V[q + np.uint64(k)] = v[k]


@njit(cache=True)
def _output_block(M, TBp, t0, nfb, nt, TW, ty0, bias, of, n, OH, OW, F, relu, bn):
    """out[n, oy:oy+2, ox:ox+2, :] = A^T M A + bias for image n's tiles t < nt, M's rows
    t0 + t (only the rows and columns inside out), then the BatchNorm ``bn`` and its residual
    sum (see conv2d_winograd_forward), then max(., 0) if ``relu`` (a NaN stays NaN). M flat
    (nfb, TBp, 16, 16): M[fb, t, e, lane]; F = 16 nfb; of: out (N, OH, OW, F) flat. Three
    loops per 16 filters, as _input_block: M into the stack, the transform (and the
    BatchNorm's steps, on the tile in the stack), the stack into out."""
    m = numba.carray(stack_array(256, M.dtype), (256,))  # M[e]: 16 * e + lane
    y = numba.carray(stack_array(64, M.dtype), (64,))  # y00, y01, y10, y11: 16 * k + lane
    zero = M.dtype.type(0)
    mean, scale, shift, add = bn
    affine = scale.size > 0
    nothing = add[:0]  # no residual sum (past the output's edge)
    bias_relu = relu and not affine  # else the ReLU comes after the BatchNorm
    for t in range(nt):
        oy, ox = 2 * (ty0 + t // TW), 2 * (t % TW)
        right, below = ox + 1 < OW, oy + 1 < OH
        o00 = np.uint64(((n * OH + oy) * OW + ox) * F)
        for fb in range(nfb):
            q = np.uint64((fb * TBp + t0 + t) * 256)  # M[fb, t, e, lane]: one stretch of 256
            for k in range(256):
                m[k] = M[q + np.uint64(k)]
            f0 = np.uint64(fb * FTN)
            for lane in range(16):
                m0, m1, m2, m3 = m[lane], m[16 + lane], m[32 + lane], m[48 + lane]
                m4, m5, m6, m7 = m[64 + lane], m[80 + lane], m[96 + lane], m[112 + lane]
                m8, m9, m10, m11 = m[128 + lane], m[144 + lane], m[160 + lane], m[176 + lane]
                m12, m13, m14, m15 = m[192 + lane], m[208 + lane], m[224 + lane], m[240 + lane]
                # A^T M: rows combined; then (A^T M) A: columns
                s0, s1, s2, s3 = m0 + m4 + m8, m1 + m5 + m9, m2 + m6 + m10, m3 + m7 + m11
                r0, r1, r2, r3 = m4 - m8 - m12, m5 - m9 - m13, m6 - m10 - m14, m7 - m11 - m15
                b = bias[f0 + np.uint64(lane)]
                y00 = s0 + s1 + s2 + b
                y01 = s1 - s2 - s3 + b
                y10 = r0 + r1 + r2 + b
                y11 = r1 - r2 - r3 + b
                if bias_relu:  # activations.relu_forward's select
                    y00 = zero if y00 <= zero else y00
                    y01 = zero if y01 <= zero else y01
                    y10 = zero if y10 <= zero else y10
                    y11 = zero if y11 <= zero else y11
                y[lane] = y00
                y[16 + lane] = y01
                y[32 + lane] = y10
                y[48 + lane] = y11
            if affine:  # conv2d._batch_norm_rows' steps, all before the stores (see winograd4)
                for k in range(4):
                    dst = o00 + np.uint64((k >> 1) * OW * F + (k & 1) * F) + f0
                    inside = (k & 1 == 0 or right) and (k < 2 or below)
                    batch_norm16(
                        y,
                        np.uint64(16 * k),
                        mean,
                        scale,
                        shift,
                        f0,
                        add if inside else nothing,
                        dst,
                        relu,
                    )
            for k in range(4):
                if (k & 1 and not right) or (k >= 2 and not below):
                    continue
                dst = o00 + np.uint64((k >> 1) * OW * F + (k & 1) * F) + f0
                for lane in range(16):
                    of[dst + np.uint64(lane)] = y[16 * k + lane]


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, fb0, nfb, t0, ntp, E, S):
    """M[fb, t, e, :] = V[t, :, e] @ U[e][:, 16 fb : 16 fb + 16] for the filter blocks
    fb0 <= fb < nfb, the block's rows t0 <= t < ntp (ntp - t0 a multiple of RN) and the E
    positions e of the transformed patch: the forward's products, on the narrow tile with a
    zero bias, M flat (nfb, TBp, E, 16) (a tile's E products in one stretch of S = 16 E), V's
    rows at abase[e * TBp + t] + aoff[c], U flat (E, C, Fp). Serial, called from the forward
    kernels' parallel bodies: inlined there, the tile ran at 0.75-0.78x, with or without
    fastmath on the kernel (without it, also unfused)."""
    for e in range(E):
        for fb in range(fb0, nfb):
            b0 = np.uint64(e * C * Fp + fb * FTN)
            for t in range(t0, ntp, RN):
                gemm_tile_bias(
                    Vf,
                    np.uint64(0),
                    abase,
                    e * TBp + t,
                    aoff,
                    0,
                    C,
                    Uf,
                    b0,
                    np.uint64(Fp),
                    zb,
                    0,
                    False,
                    Mf,
                    np.uint64((fb * TBp + t) * S + 16 * e),
                    np.uint64(S),
                    True,
                )


#: The forward's products take pairs of 16-filter blocks on a tile of FT = 32 filters
#: (block_products_wide): AVX-512's tall RT x FT tile (in float32 12 accumulator registers
#: against the narrow tile's 6), AVX2's wide R x FT (12 against 8).
_WIDE_R = RT if TALL else R
_WIDE_TILE = _WIDE_R * FT  # (a module constant: stack_array's size must be one)
#: Rows the wide tile takes: whole multiples of its rows and RN, so that the rest is whole
#: narrow tiles
_WIDE_ROWS = _WIDE_R * RN // math.gcd(_WIDE_R, RN)


@njit(cache=True, fastmath={"contract"})
def block_products_wide(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, nfb, ntp, E, S):
    """block_products (every filter block, rows t < ntp), bitwise: each M value the same sum
    in the same order from zero, with pairs of filter blocks on the wide tile, _WIDE_R rows
    (the tall tile's RT on AVX-512, R on AVX2) by 32 filters a tile: twice the narrow tile's
    multiply-adds per broadcast of V. A tile lands in a stack scratch and its halves are
    copied to M[fb] and M[fb + 1]. The rows past the last multiple of _WIDE_ROWS (AVX2 only:
    on AVX-512 every block's rows are whole tall tiles), and an odd last filter block, go to
    block_products (the narrow tile is not inlined here a second time: compile time); on
    AVX2 a block of fewer rows runs all narrow (3 wide rows beside 4 narrow ones ran slower
    than the narrow tile alone). A function of its own, as conv2d_phases' tiles."""
    u = np.uint64
    tile = numba.carray(stack_array(_WIDE_TILE, Mf.dtype), (_WIDE_TILE,))
    pairs = nfb // 2
    wide = ntp // _WIDE_ROWS * _WIDE_ROWS  # ntp - wide: a multiple of RN
    i0 = np.int64(0)  # block_products' first filter block and row (a literal: a second compile)
    for e in range(E):
        for fp in range(pairs):
            fb = 2 * fp
            b0 = u(e * C * Fp + fb * FTN)
            for t in range(0, wide, _WIDE_R):
                if TALL:  # numba drops the branch the host does not take
                    gemm_tile_tall(
                        Vf, abase, e * TBp + t, aoff, 0, C, Uf, b0, u(Fp), tile, 0, False
                    )
                else:
                    gemm_tile(
                        Vf, abase, e * TBp + t, aoff, 0, C, Uf, b0, u(Fp), tile, 0, False, False
                    )
                for r in range(_WIDE_R):
                    m = u((fb * TBp + t + r) * S + 16 * e)
                    copy16(Mf, m, tile, u(r * FT))
                    copy16(Mf, m + u(TBp * S), tile, u(r * FT + FTN))
    if wide < ntp:
        block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, i0, 2 * pairs, wide, ntp, E, S)
    if nfb % 2:
        block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, nfb - 1, nfb, i0, ntp, E, S)


@njit(cache=True)
def rows_per_block(TH, TW, least, most):
    """Tile rows per block of a forward (whole tile rows of one image: at least ``least``
    tiles where the image has them, at most ``most`` unless the least is more): the count
    whose blocks leave the fewest product rows computed in vain, each block's tiles rounded up
    to the register tile's RN rows; the smallest such count on a tie. (F(2x2) at 28x28, 6-row
    tiles: 3 rows of 14 tiles fill 7 tiles, where 2 rows of 14 left 2 of every 30 rows idle.)"""
    k0 = min(TH, (least + TW - 1) // TW)
    best, fewest = k0, -1
    for k in range(k0, TH + 1):
        if k > k0 and k * TW > most:
            break
        rest = TH % k * TW
        rows = TH // k * ((k * TW + RN - 1) // RN * RN) + (rest + RN - 1) // RN * RN
        if fewest < 0 or rows < fewest:
            best, fewest = k, rows
    return best


@njit(cache=True)
def _images_per_block(T, whole):
    """Images per forward block: 1, unless a block holds whole images (``whole``) of fewer than
    _BLOCK_TILES tiles (T each); then enough images for _BLOCK_TILES tiles, or up to RN - 1
    more where that makes the block's tiles a multiple of RN (the tile's rows: no product row
    computed in vain; 16-tile images waste 2 of every 18 rows one at a time)."""
    if not whole or T >= _BLOCK_TILES:
        return 1
    m = (_BLOCK_TILES + T - 1) // T
    for extra in range(RN):
        if (m + extra) * T % RN == 0:
            return m + extra
    return m


@njit(parallel=True, cache=True)
def conv2d_winograd_forward(x, U, bias, pad_top, pad_left, relu, out, bn, threads):
    """out[n, oh, ow, f] = bias[f] + sum_{i,j,c} weight[f,c,i,j] * x[n, oh - pt + i, ow - pl + j, c]
    (3x3, stride 1, dilation 1), up to rounding, by F(2x2, 3x3); then max(out, 0) if ``relu``.

    x (N, H, W, C); U (16, C, F) = weight_transform(weight, F), weight (F, C, 3, 3) (the
    caller transforms the weights: evaluation reuses them, functional._transformed_weight);
    bias (F,); out (N, OH, OW, F) overwritten; C and F multiples of 16.
    ``bn = (mean, scale, shift, add)`` or four empty arrays: as conv2d.conv2d_forward's, an
    evaluation-mode BatchNorm applied to each output tile in the stack before it is stored
    (kernels/lanes.py; bitwise this kernel followed by the BatchNorm layer), then ``add`` (a
    residual), then the ReLU.

    Work: blocks of whole tile rows of one image (>= _BLOCK_TILES tiles; or of several whole
    images, where one has fewer: _images_per_block), ``threads`` workers
    each a contiguous range of them (an interleave gave one worker every image's first, larger,
    block), each with its own scratch (patches, V, M). Every output is computed by one block
    alone: the result does not depend on ``threads``.
    """
    N, H, W, C = x.shape
    F = out.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    Fp = U.shape[2]
    nfb = Fp // FTN
    k = rows_per_block(TH, TW, _BLOCK_TILES, 4 * _BLOCK_TILES)  # tile rows per block
    per_image = (TH + k - 1) // k
    m = _images_per_block(TH * TW, k == TH)  # images per block
    nblocks = (N + m - 1) // m * per_image
    TBp = (m * k * TW + RN - 1) // RN * RN
    nthr = max(1, min(threads, nblocks))
    dt = x.dtype
    V = np.empty((nthr, 16 * TBp * C), dtype=dt)
    M = np.empty((nthr, 16 * nfb * TBp * FTN), dtype=dt)
    zb = np.empty(FTN, dtype=dt)  # (np.zeros here would be a parallel loop of its own)
    i0 = np.int64(0)  # block_products' first filter block and row (a literal: a second compile)
    for f in range(FTN):
        zb[f] = 0
    # V[t, c // 16, e, c % 16]: row t of the e-th product starts at abase[e * TBp + t] and
    # its channel c lies aoff[c] further
    abase = np.empty(16 * TBp, dtype=np.uint64)
    for e in range(16):
        for t in range(TBp):
            abase[e * TBp + t] = np.uint64(t * 16 * C + 16 * e)
    aoff = np.empty(C, dtype=np.uint64)
    for c in range(C):
        aoff[c] = np.uint64(c // 16 * 256 + c % 16)
    Uf = U.reshape(U.size)
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for th in prange(nthr):
        Vf = V[th]
        Mf = M[th]
        for blk in range(th * nblocks // nthr, (th + 1) * nblocks // nthr):
            n0 = blk // per_image * m
            ty0 = (blk % per_image) * k
            ty1 = min(ty0 + k, TH)
            per = (ty1 - ty0) * TW  # tiles per image in this block
            images = min(m, N - n0)
            for j in range(images):
                _input_block(
                    xf, H, W, C, n0 + j, ty0, per, TW, pad_top, pad_left, Vf, TBp, j * per, False
                )
            nt = images * per
            ntp = (nt + RN - 1) // RN * RN  # (rows past nt: whatever V held; never stored)
            # M[fb, t, e, :]: row stride 256, so that a tile's 16 products lie in one stretch
            if nfb >= 2:
                block_products_wide(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, nfb, ntp, 16, 256)
            else:
                block_products(Vf, abase, aoff, C, Uf, Fp, zb, Mf, TBp, i0, nfb, i0, ntp, 16, 256)
            for j in range(images):
                n = n0 + j
                _output_block(Mf, TBp, j * per, nfb, per, TW, ty0, bias, of, n, OH, OW, F, relu, bn)


# -------------------------------------------------------------------------------------------------
# the weight gradient: the same algorithm run backwards
#
# The forward is linear in the kernel g: Y = A^T [(G g G^T) * V] A per tile, V = B^T d B. Its
# adjoint gives the weight gradient from the tiles' gradients dY:
#
#     dg = G^T [ sum over tiles (A dY A^T) * V ] G          (* elementwise)
#
# so the sum over the batch's pixels becomes 16 matrix products, one per position e of the 4x4:
# S[e] (F x C) = sum_t Z[t, e, :]^T V[t, e, :], Z = A dY A^T, a product whose k runs over the
# tiles. 16 multiply-adds per tile, filter and channel where the direct gradient takes 36.

#: The tiles' blocks are summed in this many chunks, fixed by the shapes alone, each into its
#: own partial products, which are then added in order: the result does not depend on the
#: thread count (and at most this many threads share the work).
_WEIGHT_CHUNKS = 8

#: Tiles per block of the weight gradient, at least: its products run over a block's tiles
#: (k), their accumulators loaded and stored once per block.
_WEIGHT_BLOCK_TILES = 96


@njit(cache=True)
def _gradient_block(dyf, OH, OW, F, n, ty0, nt, TW, Z, TBp, t0, bsum):
    """Z[e, t0 + t, f] = (A dY A^T)[e] for the block's tiles t < nt, dY the tile's 2x2
    gradient (zero past the output's last row or column), every filter (F a multiple of 16);
    and bsum[f] += the tile's sum of dY. dyf: dy (N, OH, OW, F) flat; Z flat (16, TBp, F).
    A = [[1, 0], [1, 1], [1, -1], [0, -1]]. Three loops per 16 filters, as _input_block."""
    g = numba.carray(stack_array(64, Z.dtype), (64,))  # dY: 16 * (2 i + j) + lane
    z = numba.carray(stack_array(256, Z.dtype), (256,))  # A dY A^T: 16 * e + lane
    zero = Z.dtype.type(0)
    for t in range(nt):
        oy, ox = 2 * (ty0 + t // TW), 2 * (t % TW)
        k1, k2 = ox + 1 < OW, oy + 1 < OH
        k3 = k1 and k2
        p0 = np.uint64(((n * OH + oy) * OW + ox) * F)
        # outside: read the tile's first pixel and select a zero
        p1 = p0 + np.uint64(F if k1 else 0)
        p2 = p0 + np.uint64(OW * F if k2 else 0)
        p3 = p0 + np.uint64((OW + 1) * F if k3 else 0)
        q = np.uint64((t0 + t) * F)
        for f0 in range(0, F, 16):
            if k3:  # a whole tile (selects here became masked scalar loads)
                for lane in range(16):
                    u = np.uint64(f0 + lane)
                    g[lane] = dyf[p0 + u]
                    g[16 + lane] = dyf[p1 + u]
                    g[32 + lane] = dyf[p2 + u]
                    g[48 + lane] = dyf[p3 + u]
            else:
                for lane in range(16):
                    u = np.uint64(f0 + lane)
                    a0, a1, a2, a3 = dyf[p0 + u], dyf[p1 + u], dyf[p2 + u], dyf[p3 + u]
                    g[lane] = a0
                    g[16 + lane] = a1 if k1 else zero
                    g[32 + lane] = a2 if k2 else zero
                    g[48 + lane] = a3 if k3 else zero
            for lane in range(16):
                g00, g01, g10, g11 = g[lane], g[16 + lane], g[32 + lane], g[48 + lane]
                # A dY: rows g0, g0 + g1, g0 - g1, -g1; then (A dY) A^T: the same on columns
                s0, s1 = g00 + g10, g01 + g11
                d0, d1 = g00 - g10, g01 - g11
                z[lane] = g00
                z[16 + lane] = g00 + g01
                z[32 + lane] = g00 - g01
                z[48 + lane] = -g01
                z[64 + lane] = s0
                z[80 + lane] = s0 + s1
                z[96 + lane] = s0 - s1
                z[112 + lane] = -s1
                z[128 + lane] = d0
                z[144 + lane] = d0 + d1
                z[160 + lane] = d0 - d1
                z[176 + lane] = -d1
                z[192 + lane] = -g10
                z[208 + lane] = -g10 - g11
                z[224 + lane] = g11 - g10
                z[240 + lane] = g11
            for lane in range(16):  # z[5] = (g00 + g10) + (g01 + g11): the tile's sum
                bsum[f0 + lane] += z[80 + lane]
            for e in range(16):
                copy16(Z, q + np.uint64(e * TBp * F + f0), z, np.uint64(16 * e))


@njit(cache=True)
def _weight_from_products(S, nrb, ncb, F, C, dweight):
    """dweight[f, c] = G^T s G, s the 4x4 of S[e, f, c] (e = 4 a + b), in float64, for the
    16 channels of one column block at a time (loaded as 16 stretches); S flat
    (16, nrb, ncb, RN, FTN) as the products' tiles."""
    tile = RN * FTN
    s = numba.carray(stack_array(256, np.float64), (256,))  # 16 * e + lane
    h = numba.carray(stack_array(192, np.float64), (192,))  # G^T s: 16 * (4 i + b) + lane
    for rb in range(nrb):
        for r in range(min(RN, F - rb * RN)):
            f = rb * RN + r
            for cb in range(ncb):
                for e in range(16):
                    o = np.uint64(((e * nrb + rb) * ncb + cb) * tile + r * FTN)
                    for lane in range(16):
                        s[16 * e + lane] = np.float64(S[o + np.uint64(lane)])
                for lane in range(16):
                    for b in range(4):  # rows of the 4x4 combined: G^T s
                        s0, s1 = s[16 * b + lane], s[16 * (4 + b) + lane]
                        s2, s3 = s[16 * (8 + b) + lane], s[16 * (12 + b) + lane]
                        h[16 * b + lane] = s0 + (s1 + s2) * 0.5
                        h[16 * (4 + b) + lane] = (s1 - s2) * 0.5
                        h[16 * (8 + b) + lane] = (s1 + s2) * 0.5 + s3
                for i in range(3):  # then its columns: (G^T s) G
                    for lane in range(16):
                        h0, h1 = h[16 * (4 * i) + lane], h[16 * (4 * i + 1) + lane]
                        h2, h3 = h[16 * (4 * i + 2) + lane], h[16 * (4 * i + 3) + lane]
                        c = cb * FTN + lane
                        dweight[f, c, i, 0] = h0 + (h1 + h2) * 0.5
                        dweight[f, c, i, 1] = (h1 - h2) * 0.5
                        dweight[f, c, i, 2] = (h1 + h2) * 0.5 + h3


@njit(cache=True)
def weight_operands(E, nrb, TBp, F):
    """(abase, aoff) of weight_products' Z operand, flat (E, TBp, F): row r (a filter) of the
    e-th product starts at abase[e * nrb * RN + r], its tile t aoff[t] further; the rows past
    F (the last row block's padding) repeat filter 0."""
    abase = np.empty(E * nrb * RN, dtype=np.uint64)
    for e in range(E):
        for r in range(nrb * RN):
            abase[e * nrb * RN + r] = np.uint64(e * TBp * F + (r if r < F else 0))
    aoff = np.empty(TBp, dtype=np.uint64)
    for t in range(TBp):
        aoff[t] = np.uint64(t * F)
    return abase, aoff


@njit(cache=True, fastmath={"contract"})  # the inlined tile's FMAs need the flag here
def weight_products(Zf, abase, aoff, nt, Vf, TBp, Sf, E, nrb, ncb, accumulate):
    """S[e, rb, cb] (+)= Z[e, :nt, rows of rb]^T V[e, cb, :nt] for the E positions e of the
    transformed patch: the weight gradients' products over a block's nt tiles, on the narrow
    tile (rows = filters, RN per row block rb; columns = 16 channels of column block cb). Z flat
    (E, TBp, F), its rows and tiles at weight_operands' offsets; V flat (E, ncb, TBp, 16); S
    flat (E, nrb, ncb, RN, FTN), its sums started at 0 unless ``accumulate``. Serial, called
    from the weight-gradient kernels' parallel bodies (F(2x2)'s and F(4x4)'s), as
    block_products for the forwards."""
    tile = RN * FTN
    for e in range(E):
        for rb in range(nrb):
            for cb in range(ncb):
                gemm_tile(
                    Zf,
                    abase,
                    (e * nrb + rb) * RN,
                    aoff,
                    0,
                    nt,
                    Vf,
                    np.uint64((e * ncb + cb) * TBp * 16),
                    np.uint64(16),
                    Sf,
                    np.uint64(((e * nrb + rb) * ncb + cb) * tile),
                    accumulate,
                    True,
                )


@njit(parallel=True, cache=True)
def conv2d_winograd_backward_weight(x, dy, pad_top, pad_left, dweight, dbias, threads):
    """dweight[f, c, i, j] = sum_{n, oh, ow} dy[n, oh, ow, f] * x[n, oh - pt + i, ow - pl + j, c]
    (3x3, stride 1, dilation 1), up to rounding, by F(2x2, 3x3) run backwards (see above);
    dbias[f] = sum dy[..., f].

    x (N, H, W, C), dy (N, OH, OW, F), C and F multiples of 16; dweight (F, C, 3, 3) and
    dbias (F,) overwritten; padding as conv2d_winograd_forward's.

    Work: blocks of >= _WEIGHT_BLOCK_TILES tiles (tile rows of one image, or whole images),
    in _WEIGHT_CHUNKS contiguous chunks fixed by the shapes, each summing its blocks in order
    into its own S (rows = filters, columns = channels, the narrow tile accumulating over a
    block's tiles); ``threads`` workers each take a contiguous range of chunks with their own
    scratch (a block's V and Z). The chunks' S are then added in chunk order and G^T S G
    taken in float64: deterministic for any thread count.
    """
    N, H, W, C = x.shape
    OH, OW, F = dy.shape[1], dy.shape[2], dy.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    # a block: tile rows ty0 <= ty < ty1 of images n0 <= n < n1 (whole images when an image
    # has fewer tiles than a block should)
    k = min(TH, (_WEIGHT_BLOCK_TILES + TW - 1) // TW)  # tile rows per block
    m = max(1, _WEIGHT_BLOCK_TILES // (TH * TW)) if k == TH else 1  # images per block
    per_image = (TH + k - 1) // k
    nblocks = ((N + m - 1) // m) * per_image
    # tiles per block, rounded up to odd: a plane of V or Z (one e) is then no multiple of
    # 4 KB, and the 16 planes' stores do not fall into one set of the L1 cache (3.3 -> ms)
    TBp = (m * k * TW) | 1
    nchunks = max(1, min(_WEIGHT_CHUNKS, nblocks))
    nthr = max(1, min(threads, nchunks))
    nrb = (F + RN - 1) // RN  # row blocks of filters (the last one's padding rows: filter 0)
    ncb = C // FTN  # column blocks of channels
    dt = x.dtype
    tile = RN * FTN
    ssize = 16 * nrb * ncb * tile
    S = np.empty((nchunks, ssize), dtype=dt)
    B = np.empty((nchunks, F), dtype=dt)
    V = np.empty((nthr, 16 * TBp * C), dtype=dt)
    Z = np.empty((nthr, 16 * TBp * F), dtype=dt)
    abase, aoff = weight_operands(16, nrb, TBp, F)
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
                n0 = blk // per_image * m
                ty0 = (blk % per_image) * k
                ty1 = min(ty0 + k, TH)
                nt, per = 0, (ty1 - ty0) * TW
                for n in range(n0, min(n0 + m, N)):
                    _input_block(xf, H, W, C, n, ty0, per, TW, pad_top, pad_left, Vf, TBp, nt, True)
                    _gradient_block(dyf, OH, OW, F, n, ty0, per, TW, Zf, TBp, nt, bs)
                    nt += per
                # the chunk's first block starts its sums at 0
                weight_products(Zf, abase, aoff, nt, Vf, TBp, Sf, 16, nrb, ncb, blk > b0)
    # the chunks' products added in chunk order (into chunk 0's), a range of S per worker
    for th in prange(nthr):
        i0, i1 = th * ssize // nthr, (th + 1) * ssize // nthr
        S0 = S[0, i0:i1]
        for ch in range(1, nchunks):
            # slices and a loop from 0 (activations.py's reason): range(i0, i1) stayed scalar
            Sc = S[ch, i0:i1]
            for i in range(S0.size):
                S0[i] += Sc[i]
    _weight_from_products(S[0], nrb, ncb, F, C, dweight)
    for f in range(F):
        b = B[0, f]
        for ch in range(1, nchunks):
            b += B[ch, f]
        dbias[f] = b
