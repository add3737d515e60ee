"""The fully connected layer's three products, on Numba's threads instead of the BLAS.

    forward          y[n, f]  = bias[f] + sum_k x[n, k] * w[f, k]      (then ReLU if asked)
    input gradient   dx[n, k] = sum_f dy[n, f] * w[f, k]         (dense_product)
    weight gradient  dw[f, k] = sum_n dy[n, f] * x[n, k]         (dense_product)

x (N, K), w (F, K) as PyTorch's nn.Linear, dy (N, F); every array C-contiguous, one float
dtype. numpy's matmul ran these on one BLAS thread (two pools on two cores fight: see
fastcnn/threads.py), whatever the threads.

The forward multiplies rows of x by rows of w, both contiguous along k: a block of RB rows of x
and FB of w keeps RB * FB accumulators of 16 lanes each (lane l sums the k = l mod 16 terms) in
vector registers, and w needs no transposed copy. The block follows the vector registers numba
compiles for (4 x 4 with AVX-512, 2 x 3 with AVX2: see RB, FB). The gradients are matrix
products whose output rows are contiguous along k in one operand: gemm_tile's register tile,
rows broadcast from dy.

Layers of at most SMALL_WEIGHTS weights (a classifier's last layer, 64 -> 10) run on serial
kernels instead (dense_forward_small, dense_backward_small), which sum in the same order
(bitwise the same results): their work is a few microseconds, and they compile in a fraction
of the parallel kernels' time, which a first training step waits for.

Every output element is summed by one tile in a fixed order (the forward: its 16 lanes over k,
then bias + lane 0 + lane 1 + ... + lane 15; the gradients: over f, or over n, in order), so
the results depend only on the inputs, not on the number of threads: ``parts`` (the threads)
only splits the work.
"""

import numba
import numpy as np
from numba import njit, prange

from .gemm_tile import (
    FT,
    LINE,
    R,
    compiles_for_avx512,
    gemm_tile,
    gemm_tile_bias,
    stack_array,
)

#: the forward's block: RB rows of x by FB rows of w, L lanes along k. AVX-512: 4 x 4, 16
#: accumulators of 16 lanes in 16 of its 32 registers. AVX2: each accumulator takes two of its
#: 16 registers, and 4 x 4 spilled; 2 x 3 keeps 12. Only which outputs are
#: computed together changes, never the order of any sum: the results are bitwise the same.
RB, FB = (4, 4) if compiles_for_avx512() else (2, 3)
L = 16
_ACC = RB * FB * L
#: rows of the gradients' register tile (gemm_tile's), to which their row offsets are padded
GR = R
#: bytes of x a row chunk of the forward reads while it stays in L2
_CHUNK_BYTES = 131072
#: Layers of at most this many weights (out x in) run on the serial kernels
SMALL_WEIGHTS = 1024


@njit(parallel=True, cache=True, fastmath={"contract"})
def dense_forward(x, w, bias, relu, parts, out):
    """out (N, F) = x (N, K) @ w (F, K).T + bias (F,), then max(., 0) if ``relu`` (a NaN stays
    NaN); ``parts`` >= 1 splits the filters (the threads). K >= 1."""
    N, K = x.shape
    F = w.shape[0]
    u = np.uint64
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    nrb = (N + RB - 1) // RB
    nfb = (F + FB - 1) // FB
    kfull = (K // L) * L
    parts = max(1, min(parts, nfb))
    # row chunks of ~128 KB of x: each part streams them from L2 against its own filters
    rc_blocks = max(1, _CHUNK_BYTES // (RB * K * x.itemsize))
    for part in prange(parts):
        acc = numba.carray(stack_array(_ACC, x.dtype), (_ACC,))
        for rc in range(0, nrb, rc_blocks):
            for fb in range(part * nfb // parts, (part + 1) * nfb // parts):
                # rows past the end repeat the last one (computed, never stored)
                w0 = u(min(fb * FB, F - 1) * K)
                w1 = u(min(fb * FB + 1, F - 1) * K)
                w2 = u(min(fb * FB + 2, F - 1) * K)
                w3 = u(min(fb * FB + 3, F - 1) * K)
                for rb in range(rc, min(nrb, rc + rc_blocks)):
                    x0 = u(min(rb * RB, N - 1) * K)
                    x1 = u(min(rb * RB + 1, N - 1) * K)
                    x2 = u(min(rb * RB + 2, N - 1) * K)
                    x3 = u(min(rb * RB + 3, N - 1) * K)
                    _block_products(acc, xf, x0, x1, x2, x3, wf, w0, w1, w2, w3, kfull)
                    _block_store(acc, xf, wf, bias, relu, rb, fb, N, F, K, kfull, out)


@njit(cache=True, fastmath={"contract"}, inline="always")
def _products_4x4(acc, xf, x0, x1, x2, x3, wf, w0, w1, w2, w3, kfull):
    """acc[(i*FB + j)*L + l] = sum over k < kfull, k = l mod L, of x_i[k] * w_j[k] (offsets x_i,
    w_j of the block's rows), for a 4 x 4 block. uint64 indices: a signed one is tested for
    wrap-around on every load, and the loop is not vectorised."""
    u = np.uint64
    for q in range(_ACC):
        acc[q] = 0
    for kb in range(kfull // L):
        k = u(kb * L)
        for lane in range(L):
            q = u(lane)
            a0 = xf[x0 + k + q]
            a1 = xf[x1 + k + q]
            a2 = xf[x2 + k + q]
            a3 = xf[x3 + k + q]
            b0 = wf[w0 + k + q]
            b1 = wf[w1 + k + q]
            b2 = wf[w2 + k + q]
            b3 = wf[w3 + k + q]
            acc[q] += a0 * b0
            acc[u(16) + q] += a0 * b1
            acc[u(32) + q] += a0 * b2
            acc[u(48) + q] += a0 * b3
            acc[u(64) + q] += a1 * b0
            acc[u(80) + q] += a1 * b1
            acc[u(96) + q] += a1 * b2
            acc[u(112) + q] += a1 * b3
            acc[u(128) + q] += a2 * b0
            acc[u(144) + q] += a2 * b1
            acc[u(160) + q] += a2 * b2
            acc[u(176) + q] += a2 * b3
            acc[u(192) + q] += a3 * b0
            acc[u(208) + q] += a3 * b1
            acc[u(224) + q] += a3 * b2
            acc[u(240) + q] += a3 * b3


@njit(cache=True, fastmath={"contract"}, inline="always")
def _products_2x3(acc, xf, x0, x1, x2, x3, wf, w0, w1, w2, w3, kfull):
    """_products_4x4 for a 2 x 3 block: rows x0, x1 by w0, w1, w2 (x2, x3, w3 unused)."""
    u = np.uint64
    for q in range(_ACC):
        acc[q] = 0
    for kb in range(kfull // L):
        k = u(kb * L)
        for lane in range(L):
            q = u(lane)
            a0 = xf[x0 + k + q]
            a1 = xf[x1 + k + q]
            b0 = wf[w0 + k + q]
            b1 = wf[w1 + k + q]
            b2 = wf[w2 + k + q]
            acc[q] += a0 * b0
            acc[u(16) + q] += a0 * b1
            acc[u(32) + q] += a0 * b2
            acc[u(48) + q] += a1 * b0
            acc[u(64) + q] += a1 * b1
            acc[u(80) + q] += a1 * b2


#: the block shape's products (a global: numba compiles the one chosen, not both)
_block_products = _products_4x4 if (RB, FB) == (4, 4) else _products_2x3


@njit(cache=True, fastmath={"contract"})  # not inlined: less to compile, no slower
def _block_store(acc, xf, wf, bias, relu, rb, fb, N, F, K, kfull, out):
    """The block's outputs: the k >= kfull terms into lanes 0, 1, ..., then bias + the lanes in
    order, the ReLU, stored (rows and filters past the end skipped)."""
    for i in range(RB):
        n = rb * RB + i
        if n >= N:
            break
        for j in range(FB):
            f = fb * FB + j
            if f >= F:
                break
            q = (i * FB + j) * L
            for k in range(kfull, K):
                acc[q + k - kfull] += xf[n * K + k] * wf[f * K + k]
            s = bias[f]
            for lane in range(L):
                s += acc[q + lane]
            out[n, f] = s if (not relu) | (s > 0) | (s != s) else 0


@njit(cache=True, fastmath={"contract"})  # a serial helper: the prange body stays small
def _product_columns(a, arow, aoff, nk, b, bstride, cb, panel, tile, zeros, out):
    """dense_product's columns cb * FT ... (cb + 1) * FT (those below C) of out (M, C): the
    block of b copied into the (nk, FT) panel, zero-padded past C, then every R-row tile of
    out over it (whole tiles stored from the registers; the rest through ``tile``)."""
    M, C = out.shape
    flat = out.reshape(-1)
    u = np.uint64
    c0 = cb * FT
    width = min(FT, C - c0)
    for k in range(nk):
        src = u(k) * bstride + u(c0)
        for c in range(width):
            panel[k * FT + c] = b[src + u(c)]
        for c in range(width, FT):
            panel[k * FT + c] = 0
    for rt in range((M + R - 1) // R):
        r0 = rt * R
        if width == FT and r0 + R <= M:  # a whole tile: stored from the registers
            gemm_tile_bias(
                a,
                u(0),
                arow,
                r0,
                aoff,
                0,
                nk,
                panel,
                u(0),
                u(FT),
                zeros,
                0,
                False,
                flat,
                u(r0 * C + c0),
                u(C),
                False,
            )
            continue
        gemm_tile(a, arow, r0, aoff, 0, nk, panel, u(0), u(FT), tile, 0, False, False)
        for r in range(min(R, M - r0)):
            for c in range(width):
                out[r0 + r, c0 + c] = tile[r * FT + c]


@njit(parallel=True, cache=True, fastmath={"contract"})
def dense_product(a, arow, aoff, nk, b, bstride, parts, out):
    """out (M, C) = sum over k < nk of a[arow[m] + aoff[k]] * b[k * bstride + c], in order of k:
    both gradients (input: a = dy, rows n at n F, terms f at f, b = w; weight: a = dy, rows f
    at f, terms n at n F, b = x; functional.dense_backward makes the offsets). gemm_tile's
    R x FT register tiles, whole ones stored straight from the registers (gemm_tile_bias, a
    zero bias), FT columns of b at a time (C split between the ``parts``). Each
    block of columns is first copied into a contiguous (nk, FT) panel, zero-padded past C: b's
    rows are bstride apart, and at a power-of-two stride (2048 floats: VGG's Dense) every row of
    the block fell into the same L1 sets. arow: M offsets padded to a multiple of GR (copies
    of the last); a, b flat; b holds nk rows of bstride >= C."""
    C = out.shape[1]
    ncb = (C + FT - 1) // FT
    parts = max(1, min(parts, ncb))
    panels = np.empty((parts, nk * FT + LINE), dtype=out.dtype)  # see LINE
    tiles = np.empty((parts, R * FT + LINE), dtype=out.dtype)
    zeros = np.empty(FT, dtype=out.dtype)  # gemm_tile_bias's bias (np.zeros: a parallel loop)
    for c in range(FT):
        zeros[c] = 0
    for part in prange(parts):
        panel = panels[part, : nk * FT]
        tile = tiles[part, : R * FT]
        for cb in range(part * ncb // parts, (part + 1) * ncb // parts):
            _product_columns(a, arow, aoff, nk, b, bstride, cb, panel, tile, zeros, out)


@njit(cache=True, fastmath={"contract"})
def dense_forward_small(x, w, bias, relu, out):
    """out (N, F) = x (N, K) @ w (F, K).T + bias (F,), then max(., 0) if ``relu`` (a NaN stays
    NaN), on the calling thread (layers of at most SMALL_WEIGHTS weights), each output summed
    as dense_forward sums it: lane l of L the k = l mod L terms (the k >= K // L * L ones
    into lanes 0, 1, ...), then bias + lane 0 + ... + lane L-1; bitwise dense_forward's."""
    N, K = x.shape
    F = w.shape[0]
    kfull = (K // L) * L
    lanes = numba.carray(stack_array(L, x.dtype), (L,))  # in registers: no aliasing with x, w
    for n in range(N):
        for f in range(F):
            for lane in range(L):
                lanes[lane] = 0
            for k0 in range(0, kfull, L):
                for lane in range(L):
                    lanes[lane] += x[n, k0 + lane] * w[f, k0 + lane]
            for k in range(kfull, K):
                lanes[k - kfull] += x[n, k] * w[f, k]
            s = bias[f]
            for lane in range(L):
                s += lanes[lane]
            out[n, f] = s if (not relu) | (s > 0) | (s != s) else 0


@njit(cache=True, fastmath={"contract"}, inline="always")
def _weighted_rows(weights, rows, out):
    """out (K,) = the sum over m of weights[m] * rows[m] (rows (M, K)), from zero, in order of
    m: one row of either gradient."""
    for k in range(out.shape[0]):
        out[k] = 0
    for m in range(rows.shape[0]):
        d = weights[m]
        for k in range(out.shape[0]):
            out[k] += d * rows[m, k]


@njit(cache=True, fastmath={"contract"})
def dense_backward_small(x, w, dy, dw, input_grad, dx):
    """The weight gradient dw (F, K) = dy (N, F).T @ x (N, K), the terms in order of n, and
    with ``input_grad`` the input gradient dx (N, K) = dy @ w (F, K), the terms in order of f,
    on the calling thread (layers of at most SMALL_WEIGHTS weights): dense_product's sums, in
    its order, bitwise its results; the innermost loops run along contiguous k. dx is not
    touched without ``input_grad``."""
    for f in range(w.shape[0]):
        _weighted_rows(dy[:, f], x, dw[f])
    if input_grad:
        for n in range(x.shape[0]):
            _weighted_rows(dy[n], w, dx[n])
