"""A network's first convolution, over an image's few channels, stride 1, dilation 1: ONE
channel and at most 6 filters (LeNet-5's first layer: 1 -> 6 at 5x5) here and its weight
gradient at the end, over channels-last arrays; 1-4 channels and a multiple of 8 filters in
conv2d_c1_lanes_forward below (a ResNet stem on MNIST: 1 -> 16 at 3x3; VGG's: 3 -> 32; 3 -> 24),
which reads the image NCHW as users pass it, or channels-last.

The direct kernel (conv2d.py) puts the filters on the tile's 16 columns: with 6 filters, 10
columns compute nothing, and the 25 taps of a 5x5 window are too few to pay for the tile's
start and store (13% of the GEMM rate, ``bench/bench_conv.py``). Here a tile like gemm_tile.py's
narrow one runs transposed: its 6 rows are the filters and its 16 columns 16 neighbouring
output pixels of one row, which, with one channel, read 16 neighbouring floats of one padded
input row per tap:

    tile[f, l] = bias[f] + sum_{i, j} weight[f, 0, i, j] * xp[n, oh + i, ow0 + l + j]

one tile call per kernel row i (its KW taps one stride apart), the sums carried between calls
in the tile. The taps are added in the direct kernel's order (i, then j), one fused
multiply-add each, from the bias: the output is bitwise the direct kernel's
(tests/test_conv2d_c1.py). Shapes as conv2d.py: x (N, H, W, 1), weight (F, 1, KH, KW) with
F <= 6, bias (F,), out (N, OH, OW, F) overwritten; padding as top/left offsets, the rest implied
by out's shape; ``relu`` and ``bn`` as in conv2d.conv2d_forward.
"""

import numba
import numpy as np
from numba import njit, prange

from .conv2d import _batch_norm_rows
from .gemm_tile import FTN, gemm_tile, stack_array
from .gemm_tile import RN as _NARROW_ROWS

#: The most filters of the one-channel kernels: the rows of this module's own tile (_taps is
#: written out for 6), whatever gemm_tile's narrow tile has on this host.
MAX_FILTERS = 6
_ACC = MAX_FILTERS * FTN
assert _NARROW_ROWS in (4, 6)  # _taps4 is written out for 4 rows, _taps for 6
#: The weight gradient's filter rows: MAX_FILTERS in whole narrow tiles of gemm_tile (6, or 8
#: in two tiles of 4).
_WEIGHT_ROWS = (MAX_FILTERS + _NARROW_ROWS - 1) // _NARROW_ROWS * _NARROW_ROWS
#: The forward's filter rows, likewise: its 6 at once where gemm_tile's narrow tile has 6 rows
#: (AVX-512), else two passes of 4 over the taps (AVX2: 6 rows of 16 lanes spill, as there)
_FORWARD_ROWS = _WEIGHT_ROWS
_ACC4 = 4 * FTN


@njit(cache=True)
def _padded_image(x, pad_top, pad_left, Hp, Wp):
    """x[..., 0] zero-padded into (N, Hp, Wp), wide enough for whole tiles of FTN pixels.
    Serial (as conv2d._padded_input: a parallel copy costs a parallel loop's compilation)."""
    N, H, W = x.shape[0], x.shape[1], x.shape[2]
    xp = np.empty((N, Hp, Wp), dtype=x.dtype)
    for n in range(N):
        for r in range(Hp):
            for s in range(Wp):
                h, w = r - pad_top, s - pad_left
                xp[n, r, s] = x[n, h, w, 0] if 0 <= h < H and 0 <= w < W else 0
    return xp


@njit(cache=True)
def _operands(weight, bias):
    """The filters as _FORWARD_ROWS rows of taps (zero rows past F) with their row and tap
    offsets, and the bias padded likewise: wt (rows * K,), abase (rows,), aoff (K,), bias6
    (rows,)."""
    F, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    K = KH * KW
    wt = np.empty(_FORWARD_ROWS * K, dtype=weight.dtype)
    bias6 = np.empty(_FORWARD_ROWS, dtype=weight.dtype)
    abase = np.empty(_FORWARD_ROWS, dtype=np.uint64)
    aoff = np.empty(K, dtype=np.uint64)
    for r in range(_FORWARD_ROWS):
        abase[r] = np.uint64(r * K)
        bias6[r] = bias[r] if r < F else 0
        for i in range(KH):
            for j in range(KW):
                wt[r * K + i * KW + j] = weight[r, 0, i, j] if r < F else 0
    for k in range(K):
        aoff[k] = np.uint64(k)
    return wt, abase, aoff, bias6


@njit(cache=True, fastmath={"contract"}, inline="always")
def _taps(acc, wt, K, xpf, b0, boff):
    """acc[r*FTN + l] += sum over the taps k < K, in order, of wt[r*K + k] * xpf[b0 + boff[k] + l]
    for the 6 filters' rows r and FTN pixels l: the tile of gemm_tile.py's _product_narrow6
    with the pixels' offsets per tap from boff (kernel row i, column j: i*Wp + j), so all the
    taps run on accumulators that stay in registers. uint64 offsets (no wrap-around test)."""
    u = np.uint64
    K_ = u(K)
    for k in range(K):
        kk = u(k)
        bo = b0 + boff[k]
        w0 = wt[kk]
        w1 = wt[K_ + kk]
        w2 = wt[u(2) * K_ + kk]
        w3 = wt[u(3) * K_ + kk]
        w4 = wt[u(4) * K_ + kk]
        w5 = wt[u(5) * K_ + kk]
        for lane in range(FTN):
            v = xpf[bo + u(lane)]
            acc[lane] += w0 * v
            acc[FTN + lane] += w1 * v
            acc[2 * FTN + lane] += w2 * v
            acc[3 * FTN + lane] += w3 * v
            acc[4 * FTN + lane] += w4 * v
            acc[5 * FTN + lane] += w5 * v


@njit(cache=True, fastmath={"contract"}, inline="always")
def _taps4(acc, wt, K, xpf, b0, boff, r0):
    """_taps for the 4 filter rows r0 .. r0 + 3 (acc: their 4 * FTN accumulators)."""
    u = np.uint64
    K_ = u(K)
    w0_ = u(r0) * K_
    for k in range(K):
        kk = w0_ + u(k)
        bo = b0 + boff[k]
        w0 = wt[kk]
        w1 = wt[K_ + kk]
        w2 = wt[u(2) * K_ + kk]
        w3 = wt[u(3) * K_ + kk]
        for lane in range(FTN):
            v = xpf[bo + u(lane)]
            acc[lane] += w0 * v
            acc[FTN + lane] += w1 * v
            acc[2 * FTN + lane] += w2 * v
            acc[3 * FTN + lane] += w3 * v


@njit(cache=True, fastmath={"contract"})
def _output_row(xpf, Hp, Wp, n, oh, wt, boff, bias6, K, relu, of, OH, OW, F):
    """Row oh of image n's output (of: out flat), FTN pixels at a time: the 6 filters' rows
    of FTN pixels in registers from the bias through every tap, then stored pixel by pixel."""
    acc = numba.carray(stack_array(_ACC, of.dtype), (_ACC,))
    # acc is read only at constant indices (so it stays in registers); the stores, at indices
    # known at run time, read this copy
    tile = numba.carray(stack_array(_ACC, of.dtype), (_ACC,))
    orow = (n * OH + oh) * OW * F
    zero = of.dtype.type(0)
    acc4 = numba.carray(stack_array(_ACC4, of.dtype), (_ACC4,))
    for ow0 in range(0, OW, FTN):
        b0 = np.uint64((n * Hp + oh) * Wp + ow0)
        if _FORWARD_ROWS == MAX_FILTERS:
            for r in range(MAX_FILTERS):
                for lane in range(FTN):
                    acc[r * FTN + lane] = bias6[r]
            _taps(acc, wt, K, xpf, b0, boff)
            for q in range(_ACC):
                tile[q] = acc[q]
        else:  # two passes of 4 rows, the second's last two (zero filters) not kept
            for r0 in range(0, _FORWARD_ROWS, 4):
                for r in range(4):
                    for lane in range(FTN):
                        acc4[r * FTN + lane] = bias6[r0 + r]
                _taps4(acc4, wt, K, xpf, b0, boff, r0)
                for q in range(min(4, MAX_FILTERS - r0) * FTN):
                    tile[r0 * FTN + q] = acc4[q]
        nl = min(FTN, OW - ow0)
        if F == MAX_FILTERS:  # pixels of 6 filters: one stretch of out, constant indices
            dst = np.uint64(orow + ow0 * F)
            for lane in range(FTN):
                if lane >= nl:
                    break
                for f in range(MAX_FILTERS):
                    v = tile[f * FTN + lane]
                    if relu:  # the direct kernel's select
                        w = v if v > 0 else zero
                        v = v if v != v else w
                    of[dst + np.uint64(lane * MAX_FILTERS + f)] = v
            continue
        for lane in range(nl):
            dst = orow + (ow0 + lane) * F
            for f in range(F):
                v = tile[f * FTN + lane]
                if relu:  # the direct kernel's select
                    w = v if v > 0 else zero
                    v = v if v != v else w
                of[dst + f] = v


@njit(parallel=True, cache=True)
def conv2d_c1_forward(x, weight, bias, pad_top, pad_left, relu, out, bn, threads):
    """out[n, oh, ow, f] = bias[f] + sum_{i,j} weight[f,0,i,j] * x[n, oh - pt + i, ow - pl + j, 0],
    then the BatchNorm (``bn`` = (mean, scale, shift, add), or four empty arrays) and the ReLU if
    ``relu``: bitwise conv2d.conv2d_forward. x (N, H, W, 1), weight (F, 1, KH, KW), F <= 6.
    Work: output rows, ``threads`` workers a contiguous range of them each, each with its own
    tile scratch (every output comes from one row alone: the result does not depend on it)."""
    N = x.shape[0]
    F, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    Hp = OH + KH - 1
    Wp = (OW + FTN - 1) // FTN * FTN + KW - 1
    xp = _padded_image(x, pad_top, pad_left, Hp, Wp)
    wt, _, _, bias6 = _operands(weight, bias)
    boff = np.empty(KH * KW, dtype=np.uint64)  # tap (i, j): i rows and j columns further
    for i in range(KH):
        for j in range(KW):
            boff[i * KW + j] = np.uint64(i * Wp + j)
    rows = N * OH
    nthr = max(1, min(threads, rows))
    xpf = xp.reshape(xp.size)
    of = out.reshape(out.size)
    affine = bn[1].size > 0
    for th in prange(nthr):
        # a contiguous range of rows each: rows dealt in turn shared the cache line where one
        # row's output ends and the next begins, written by both workers
        for row in range(th * rows // nthr, (th + 1) * rows // nthr):
            n, oh = row // OH, row % OH
            _output_row(
                xpf, Hp, Wp, n, oh, wt, boff, bias6, KH * KW, relu and not affine, of, OH, OW, F
            )
            if affine:  # the direct kernel's epilogue, on the row
                _batch_norm_rows(of[row * OW * F : (row + 1) * OW * F], F, bn, relu, row * OW * F)


# ---- the forward for a multiple of 8 filters (a ResNet stem: 1 -> 16 at 3x3; VGG's 3 -> 32) ----

#: Filters per block of the lanes forward (one 512-bit vector of float32; F may end in a
#: half one), and its pixels per register block.
LANES = 16
HALF = LANES // 2
_PIX = 4
_LACC = _PIX * LANES
#: The most input channels it takes: an image's (RGB, RGBA).
LANES_MAX_CHANNELS = 4
#: Output rows per BatchNorm epilogue call: a few rows, still in cache, per call.
_EPILOGUE_ROWS = 8


@njit(cache=True, fastmath={"contract"})
def _lanes_row(xpf, rb, boff, K, wl, bias, Fp, of, o0, OW, F, relu):
    """One output row (flat at of[o0:], F filters per pixel) of the lanes forward: for each
    block of LANES filters, _PIX pixels at a time, their accumulators in registers from the
    bias through every tap (each tap: _PIX broadcasts of the input, the block's weight vector,
    _PIX fused multiply-adds), then the ReLU select and the stores of the pixels < OW (the
    padded image is wide enough for a whole last block). Neighbouring pixels lie 1 apart. The
    weights and bias come padded to Fp filters (whole blocks): a last half block computes a
    whole one and stores its HALF filters (a block written for 8 lanes stayed scalar)."""
    acc = numba.carray(stack_array(_LACC, of.dtype), (_LACC,))
    u = np.uint64
    Fu, Fpu = u(F), u(Fp)
    for fb in range(0, Fp, LANES):
        fbu = u(fb)
        whole = fb + LANES <= F
        for ow0 in range(0, OW, _PIX):
            for p in range(_PIX):
                for f in range(LANES):
                    acc[p * LANES + f] = bias[fbu + u(f)]
            b0 = rb + u(ow0)
            for k in range(K):
                bo = b0 + boff[k]
                x0 = xpf[bo]
                x1 = xpf[bo + u(1)]
                x2 = xpf[bo + u(2)]
                x3 = xpf[bo + u(3)]
                kk = u(k) * Fpu + fbu
                for f in range(LANES):
                    w = wl[kk + u(f)]
                    acc[f] += x0 * w
                    acc[LANES + f] += x1 * w
                    acc[2 * LANES + f] += x2 * w
                    acc[3 * LANES + f] += x3 * w
            if relu:  # the direct kernel's select
                for q in range(_LACC):
                    v = acc[q]
                    z = v if v > 0 else 0
                    acc[q] = v if v != v else z
            for p in range(_PIX):
                if ow0 + p < OW:
                    d = o0 + u(ow0 + p) * Fu + fbu
                    if whole:
                        for f in range(LANES):
                            of[d + u(f)] = acc[p * LANES + f]
                    else:
                        for f in range(HALF):
                            of[d + u(f)] = acc[p * LANES + f]


@njit(cache=True)
def _planar_image(x, channels_last, n, pad_top, pad_left, XH, XW, buf):
    """Image n of x into buf (C, XH, XW) flat at the same places every time: its zeros around
    the image (written once, by the caller) stay. x as conv2d_c1_lanes_forward takes it; the
    rows are copied with uint64 indices, so that an NCHW row is one vectorised copy."""
    u = np.uint64
    if channels_last:
        H, W, C = x.shape[1], x.shape[2], x.shape[3]
        sc, sh, sw = 1, W * C, C
    else:
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        sc, sh, sw = H * W, W, 1
    xf = x.reshape(x.size)
    base = n * C * H * W
    for c in range(C):
        for h in range(min(H, XH - pad_top)):
            src = u(base + c * sc + h * sh)
            dst = u((c * XH + h + pad_top) * XW + pad_left)
            if sw == 1:
                for w in range(min(W, XW - pad_left)):
                    buf[dst + u(w)] = xf[src + u(w)]
            else:
                for w in range(min(W, XW - pad_left)):
                    buf[dst + u(w)] = xf[src + u(w) * u(sw)]


@njit(parallel=True, cache=True)
def conv2d_c1_lanes_forward(
    x, channels_last, weight, bias, pad_top, pad_left, relu, out, bn, threads
):
    """conv2d.conv2d_forward, bitwise, for a few channels (an image's: 1 to LANES_MAX_CHANNELS)
    and F a multiple of HALF filters, stride 1 and dilation 1. The direct kernel's tile holds
    4-6 pixels x 16 filters and reads each pixel's taps through a table of offsets: with 1-3
    channels a tile has 9-27 taps of work for its start and store. Here the filters lie on the
    vector lanes and 4 neighbouring pixels of one row are the tile's rows, the taps (i, j, c)
    in the direct kernel's order. The image comes as the user gave it: each worker copies the
    image it is at into a zero-padded planar buffer of its own (C, padded rows, padded
    columns), so neither a channels-last copy of the batch nor a serial padded one comes first.
    x C-contiguous, (N, H, W, C) if ``channels_last`` else (N, C, H, W); weight (F, C, KH, KW),
    bias (F,), out (N, OH, OW, F)."""
    if weight.shape[0] % HALF != 0:  # the stores of a last half block would pass out's end
        raise ValueError("conv2d_c1_lanes_forward: the filters must be a multiple of HALF")
    if channels_last:
        N, C = x.shape[0], x.shape[3]
    else:
        N, C = x.shape[0], x.shape[1]
    F, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    OH, OW = out.shape[1], out.shape[2]
    XH, XW = OH + KH - 1, (OW + _PIX - 1) // _PIX * _PIX + KW - 1
    K = KH * KW * C
    Fp = (F + LANES - 1) // LANES * LANES
    wl = np.empty(K * Fp, dtype=out.dtype)  # (tap, filter), filters past F zero
    bp = np.empty(Fp, dtype=out.dtype)
    for f in range(Fp):
        bp[f] = bias[f] if f < F else 0
    boff = np.empty(K, dtype=np.uint64)  # tap (i, j, c): plane c, i rows and j columns on
    for i in range(KH):
        for j in range(KW):
            for c in range(C):
                k = (i * KW + j) * C + c
                boff[k] = np.uint64((c * XH + i) * XW + j)
                for f in range(Fp):
                    wl[k * Fp + f] = weight[f, c, i, j] if f < F else 0
    rows = N * OH
    nthr = max(1, min(threads, rows))
    # a worker's planar image; rows a whole number of cache lines apart (the workers' stores)
    stride = (C * XH * XW + 15) // 16 * 16
    images = np.empty((nthr, stride), dtype=out.dtype)  # (np.zeros: a parallel loop of its own)
    of = out.reshape(out.size)
    affine = bn[1].size > 0
    for th in prange(nthr):
        xpf = images[th]
        for q in range(stride):  # the zeros around the image, written once
            xpf[q] = 0
        at = -1  # the image in xpf
        r1 = (th + 1) * rows // nthr
        for r0 in range(th * rows // nthr, r1, _EPILOGUE_ROWS):
            r2 = min(r0 + _EPILOGUE_ROWS, r1)
            for row in range(r0, r2):
                n, oh = row // OH, row % OH
                if n != at:
                    _planar_image(x, channels_last, n, pad_top, pad_left, XH, XW, xpf)
                    at = n
                rb, o0 = np.uint64(oh * XW), np.uint64(row * OW * F)
                _lanes_row(xpf, rb, boff, K, wl, bp, Fp, of, o0, OW, F, relu and not affine)
            if affine:  # the direct kernel's epilogue, on rows still in cache
                _batch_norm_rows(of[r0 * OW * F : r2 * OW * F], F, bn, relu, r0 * OW * F)


# ---- the weight gradient ----


@njit(cache=True, fastmath={"contract"})
def _weight_unit(dyf, xpf, Hp, Wp, OH, OW, F, i, p0, p1, aoff, ab, tile):
    """Kernel row i's tile (rows: the filters, columns: the taps j) summed over the pixels
    [p0, p1) in order, one output row's stretch per tile call: tile[f, j] = sum_p dy[p, f] *
    xp[n, oh + i, ow + j]. ab (_WEIGHT_ROWS,) scratch for the rows' offsets into dy; tile
    (_WEIGHT_ROWS * FTN,), the narrow tiles' rows one after the other."""
    first = True
    p = p0
    while p < p1:
        n = p // (OH * OW)
        rem = p - n * OH * OW
        oh = rem // OW
        ow = rem - oh * OW
        seg = min(OW - ow, p1 - p)
        for r in range(_WEIGHT_ROWS):  # (rows past F repeat the last filter: never read)
            ab[r] = np.uint64(p * F + min(r, F - 1))
        b0 = np.uint64((n * Hp + oh + i) * Wp + ow)
        for r0 in range(0, _WEIGHT_ROWS, _NARROW_ROWS):
            t0 = r0 * FTN
            gemm_tile(dyf, ab, r0, aoff, 0, seg, xpf, b0, np.uint64(1), tile, t0, not first, True)
        first = False
        p += seg


@njit(cache=True)
def _bias_sums(dyf, F, p0, p1, out):
    """out[f] = sum of dy[p, f] over the pixels [p0, p1), in order, from zero: the filters'
    chains side by side in registers (F <= MAX_FILTERS = 6)."""
    z = dyf.dtype.type(0)
    s0, s1, s2, s3, s4, s5 = z, z, z, z, z, z
    for p in range(p0, p1):
        q = p * F
        s0 += dyf[q]
        if F > 1:
            s1 += dyf[q + 1]
        if F > 2:
            s2 += dyf[q + 2]
        if F > 3:
            s3 += dyf[q + 3]
        if F > 4:
            s4 += dyf[q + 4]
        if F > 5:
            s5 += dyf[q + 5]
    sums = (s0, s1, s2, s3, s4, s5)
    for f in range(F):
        out[f] = sums[f]


@njit(parallel=True, cache=True)
def conv2d_c1_backward_weight(x, dy, pad_top, pad_left, dweight, dbias, chunks, per_chunk):
    """dweight[f, 0, i, j] = sum_{n,oh,ow} dy[n,oh,ow,f] * x[n, oh - pt + i, ow - pl + j, 0],
    dbias[f] = sum dy[..., f]: bitwise conv2d.conv2d_backward_weight, whose pixel chunks
    (``chunks`` of ``per_chunk`` pixels: conv2d._weight_plan's) this follows: each chunk's sums
    run over its pixels in order from zero, one fused multiply-add per term, and the chunks
    are added in order. x (N, H, W, 1), dy (N, OH, OW, F) with F <= 6, KW <= 16; dweight
    (F, 1, KH, KW) and dbias (F,) overwritten. Units: (chunk, kernel row), each its own tile."""
    N, OH, OW, F = dy.shape
    KH, KW = dweight.shape[2], dweight.shape[3]
    Hp, Wp = OH + KH - 1, OW + FTN
    xp = _padded_image(x, pad_top, pad_left, Hp, Wp)
    NP = N * OH * OW
    units = chunks * KH
    acc = np.empty((units, _WEIGHT_ROWS * FTN), dtype=x.dtype)
    bsum = np.empty((chunks, F), dtype=x.dtype)
    ab = np.empty((units, _WEIGHT_ROWS), dtype=np.uint64)
    aoff = np.empty(OW, dtype=np.uint64)
    for k in range(OW):
        aoff[k] = np.uint64(k * F)
    xpf = xp.reshape(xp.size)
    dyf = dy.reshape(dy.size)
    for unit in prange(units):
        chunk, i = unit // KH, unit % KH
        p0 = chunk * per_chunk
        p1 = min(p0 + per_chunk, NP)
        _weight_unit(dyf, xpf, Hp, Wp, OH, OW, F, i, p0, p1, aoff, ab[unit], acc[unit])
        if i == 0:  # the chunk's bias sums, in order (s + d: the direct kernel's fma(1, d, s))
            _bias_sums(dyf, F, p0, p1, bsum[chunk])
    for f in range(F):
        for i in range(KH):
            for j in range(KW):
                v = acc[i, f * FTN + j]
                for chunk in range(1, chunks):
                    v += acc[chunk * KH + i, f * FTN + j]
                dweight[f, 0, i, j] = v
        v = bsum[0, f]
        for chunk in range(1, chunks):
            v += bsum[chunk, f]
        dbias[f] = v
