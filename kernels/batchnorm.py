"""Batch normalisation kernels over NCHW arrays (BatchNorm1D passes (N, C, 1, 1)).

Shape contract (checked by the wrapper in fastcnn/functional.py, never here):
x, dy, out, dx (N, C, H, W), C-contiguous (the kernels take reshaped views; a non-contiguous
array fails in Numba's reshape, it is not silently misread); gamma, beta, mean, invstd,
running_mean, running_var, dgamma, dbeta (C,); all of one floating dtype (float32 or float64);
eps a scalar of that dtype. Every output is overwritten.

Statistics are per channel over M = N*H*W elements: the mean, and the sum of squares centred on
a mean (on the batch mean after a pass of its own here; on each pixel chunk's own mean in the
channels-last kernel, combined as Chan, Golub & LeVeque do), never as E[x^2] - E[x]^2, which
cancels catastrophically when |mean| >> std.

Accumulators are float64 for float32 inputs too, deliberately: a channel of a (64, C, 26, 26)
batch sums 43,264 values, and a plain float32 running sum loses up to ~1e-4 relative accuracy
there (tests/test_batchnorm.py::test_float32_large_channel_accuracy checks mean, invstd, out and
the gradients against a float64 reference on such a channel with mean 1000). The per-element
arithmetic (centre, scale, shift, dx) stays in the array dtype: no float64 work per element
beyond the widening add of a reduction.

Determinism: the work is split over channels only (over channel blocks when H = W = 1, and over
the batch for the elementwise eval), and each channel's sums run in one fixed order inside one
thread, so results are bitwise identical on repeated calls and for any number of threads.
``fastmath`` "reassoc" lets LLVM vectorise those sums (several partial sums per row); the order
is then fixed by the compiled code, not by the scheduling.

Loop shapes: the innermost loops run over contiguous 1-D views (a row of H*W values of one
channel, or a row of C channels when H = W = 1) in small helpers; LLVM vectorises those, where
the same loops indexed through the 4-D array inside a prange body stayed scalar (6-10x slower,
measured). For H = W = 1 (BatchNorm1D) a channel is a column of an (N, C) matrix: channels are
taken in blocks of ``_BLOCK`` and each block walks the rows, keeping memory access contiguous
instead of striding C elements per value.
"""

import numba
import numpy as np
from numba import njit, prange

from .gemm_tile import stack_array

BN_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}
#: The channels-last backward's sums: IEEE arithmetic in the written order. With BN_FASTMATH's
#: flags, or multiply-adds fused alone, LLVM arranged them differently when dy arrived through
#: the ReLU's gate (batchnorm_backward_nhwc's ``relu``) than when it was loaded: up to 8 ulp in
#: float64. In exact order the gated value, the same number, gives the same bits.
BN_GRAD_FASTMATH = False
_BLOCK = 128  # channels per task on the H = W = 1 path (the block size fixes no summation order)


# ---------------------------------------------------------------- helpers over 1-D views
@njit(cache=True, fastmath=BN_FASTMATH)
def _row_sum(v):
    """sum(v) in float64."""
    total = 0.0
    for i in range(v.shape[0]):
        total += v[i]
    return total


@njit(cache=True, fastmath=BN_FASTMATH)
def _row_sq_dev(v, mu):
    """sum((v - mu)**2) in float64; mu is float64."""
    total = 0.0
    for i in range(v.shape[0]):
        d = v[i] - mu
        total += d * d
    return total


@njit(cache=True, fastmath=BN_FASTMATH)
def _row_affine(v, m, s, b, o):
    """o = (v - m) * s + b, scalars m, s, b of the array dtype."""
    for i in range(v.shape[0]):
        o[i] = (v[i] - m) * s + b


@njit(cache=True, fastmath=BN_FASTMATH)
def _row_grad_sums(g, v, m64):
    """(sum(g), sum(g * (v - m64)), sum(v - m64)), all in float64 (v - m64 is exact there)."""
    sum_g = 0.0
    sum_gd = 0.0
    sum_d = 0.0
    for i in range(v.shape[0]):
        gi = np.float64(g[i])
        d = np.float64(v[i]) - m64
        sum_g += gi
        sum_gd += gi * d
        sum_d += d
    return sum_g, sum_gd, sum_d


@njit(cache=True, fastmath=BN_FASTMATH)
def _row_dx(g, v, m, k, a, b, o):
    """o = k * g + a * (v - m) + b, scalars of the array dtype."""
    for i in range(v.shape[0]):
        o[i] = k * g[i] + a * (v[i] - m) + b


@njit(cache=True, fastmath=BN_FASTMATH)
def _vec_add(acc, v):
    """acc += v elementwise (acc float64)."""
    for j in range(v.shape[0]):
        acc[j] += v[j]


@njit(cache=True, fastmath=BN_FASTMATH)
def _vec_sq_dev(acc, v, mu):
    """acc += (v - mu)**2 elementwise (acc, mu float64)."""
    for j in range(v.shape[0]):
        d = v[j] - mu[j]
        acc[j] += d * d


@njit(cache=True, fastmath=BN_FASTMATH)
def _vec_affine(v, m, s, b, o):
    """o = (v - m) * s + b elementwise, vectors of the array dtype."""
    for j in range(v.shape[0]):
        o[j] = (v[j] - m[j]) * s[j] + b[j]


@njit(cache=True, fastmath=BN_FASTMATH)
def _vec_grad_sums(acc_g, acc_gd, acc_d, g, v, m):
    """acc_g += g; acc_gd += g * (v - m); acc_d += v - m, elementwise, in float64."""
    for j in range(v.shape[0]):
        gj = np.float64(g[j])
        d = np.float64(v[j]) - np.float64(m[j])
        acc_g[j] += gj
        acc_gd[j] += gj * d
        acc_d[j] += d


@njit(cache=True, fastmath=BN_FASTMATH)
def _vec_dx(g, v, m, k, a, b, o):
    """o = k * g + a * (v - m) + b elementwise, vectors of the array dtype."""
    for j in range(v.shape[0]):
        o[j] = k[j] * g[j] + a[j] * (v[j] - m[j]) + b[j]


@njit(cache=True, fastmath=BN_FASTMATH)
def _stat_coefficients(
    mu64, squares, gamma, beta, inv_count, eps64, c0, c1, mean, invstd, scale, shift
):
    """For channels [c0, c1), from the float64 batch mean mu64 and sums of centred squares:
    mean, invstd, and the forward's scale and shift (the stored mean's rounding compensated)."""
    for c in range(c0, c1):
        mean[c] = mu64[c]
        invstd[c] = 1.0 / np.sqrt(squares[c] * inv_count + eps64)
        scale[c] = gamma[c] * invstd[c]
        shift[c] = beta[c] - (mu64[c] - np.float64(mean[c])) * np.float64(scale[c])


@njit(cache=True, fastmath=BN_FASTMATH)
def _grad_coefficients(
    sum_g, sum_gd, sum_d, gamma, invstd, inv_count, c0, c1, dgamma, dbeta, coef_k, coef_a, coef_b
):
    """For channels [c0, c1), from the float64 sums of dy, dy * (x - mean), x - mean: dgamma,
    dbeta and the coefficients of dx = k * dy + a * (x - mean) + b (see batchnorm_backward)."""
    for c in range(c0, c1):
        istd = np.float64(invstd[c])
        delta = sum_d[c] * inv_count
        sum_gx = (sum_gd[c] - delta * sum_g[c]) * istd
        dbeta[c] = sum_g[c]
        dgamma[c] = sum_gx
        k = np.float64(gamma[c]) * istd
        a = -k * istd * sum_gx * inv_count
        coef_k[c] = k
        coef_a[c] = a
        coef_b[c] = -k * sum_g[c] * inv_count - a * delta


# ---------------------------------------------------------------- kernels
@njit(parallel=True, cache=True, fastmath=BN_FASTMATH)
def batchnorm_forward_train(x, gamma, beta, eps, out, mean, invstd):
    """Training-mode forward with batch statistics.

    x (N, C, H, W), gamma (C,), beta (C,), eps scalar; writes out (N, C, H, W),
    mean (C,) = batch mean, invstd (C,) = 1 / sqrt(biased batch variance + eps).
    out = (x - mean) * (gamma * invstd) + beta, evaluated as (x - m) * s + shift with m the
    stored (rounded) mean and shift = beta - (mean64 - m) * s, so the rounding of the mean to
    the array dtype does not shift the output.
    """
    n_batch, channels, height, width = x.shape
    hw = height * width
    inv_count = 1.0 / (n_batch * hw)  # float64: used with the float64 accumulators only
    eps64 = np.float64(eps)
    typ = x.dtype.type
    if hw == 1:
        x2 = x.reshape((n_batch, channels))
        out2 = out.reshape((n_batch, channels))
        acc = np.empty(channels, dtype=np.float64)
        mu64 = np.empty(channels, dtype=np.float64)
        scale = np.empty(channels, dtype=x.dtype)
        shift = np.empty(channels, dtype=x.dtype)
        n_blocks = (channels + _BLOCK - 1) // _BLOCK
        for blk in prange(n_blocks):
            c0 = blk * _BLOCK
            c1 = min(c0 + _BLOCK, channels)
            a = acc[c0:c1]
            mu = mu64[c0:c1]
            a[:] = 0.0
            for n in range(n_batch):
                _vec_add(a, x2[n, c0:c1])
            for j in range(c1 - c0):
                mu[j] = a[j] * inv_count
                a[j] = 0.0
            for n in range(n_batch):
                _vec_sq_dev(a, x2[n, c0:c1], mu)
            _stat_coefficients(
                mu64, acc, gamma, beta, inv_count, eps64, c0, c1, mean, invstd, scale, shift
            )
            for n in range(n_batch):
                _vec_affine(x2[n, c0:c1], mean[c0:c1], scale[c0:c1], shift[c0:c1], out2[n, c0:c1])
    else:
        x3 = x.reshape((n_batch, channels, hw))
        out3 = out.reshape((n_batch, channels, hw))
        for c in prange(channels):
            total = 0.0
            for n in range(n_batch):
                total += _row_sum(x3[n, c])
            mu = total * inv_count
            squares = 0.0
            for n in range(n_batch):
                squares += _row_sq_dev(x3[n, c], mu)
            mean[c] = mu
            invstd[c] = 1.0 / np.sqrt(squares * inv_count + eps64)
            m = mean[c]  # read back: the array dtype
            s = gamma[c] * invstd[c]
            b = typ(beta[c] - (mu - np.float64(m)) * np.float64(s))
            for n in range(n_batch):
                _row_affine(x3[n, c], m, s, b, out3[n, c])


@njit(parallel=True, cache=True, fastmath=BN_FASTMATH)
def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps, out):
    """Evaluation-mode forward with running statistics.

    x (N, C, H, W), gamma, beta, running_mean, running_var (C,), eps scalar; writes
    out (N, C, H, W) = (x - running_mean) * (gamma / sqrt(running_var + eps)) + beta.
    Elementwise: parallel over the batch.
    """
    n_batch, channels, height, width = x.shape
    hw = height * width
    scale = np.empty(channels, dtype=x.dtype)
    eval_scale(gamma, running_var, eps, scale)
    if hw == 1:
        x2 = x.reshape((n_batch, channels))
        out2 = out.reshape((n_batch, channels))
        for n in prange(n_batch):
            _vec_affine(x2[n], running_mean, scale, beta, out2[n])
    else:
        x3 = x.reshape((n_batch, channels, hw))
        out3 = out.reshape((n_batch, channels, hw))
        for n in prange(n_batch):
            for c in range(channels):
                _row_affine(x3[n, c], running_mean[c], scale[c], beta[c], out3[n, c])


@njit(parallel=True, cache=True, fastmath=BN_FASTMATH)
def batchnorm_backward(dy, x, gamma, mean, invstd, dx, dgamma, dbeta):
    """Backward of the training-mode forward.

    dy, x (N, C, H, W); gamma, mean, invstd (C,) as written by batchnorm_forward_train; writes
    dbeta = sum(dy), dgamma = sum(dy * xhat) with xhat = (x - mean) * invstd, and
    dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma), M = N*H*W, computed as
    dx = k * dy + a * (x - mean) + b with per-channel k = gamma * invstd,
    a = -k * invstd * dgamma / M, b = -k * dbeta / M.

    ``mean`` arrives rounded to the array dtype. The one pass of sums also accumulates
    delta = sum(x - mean) / M, the batch mean minus the stored mean (in float64, where
    x - mean is exact), and corrects for it: dgamma uses sum(dy * (x - mean)) - delta * sum(dy)
    and b becomes b - a * delta. Without it a float32 dgamma that nearly cancels (a small
    channel, |mean| >> std) was off by ~1e-4 relative.
    """
    n_batch, channels, height, width = x.shape
    hw = height * width
    inv_count = 1.0 / (n_batch * hw)
    typ = x.dtype.type
    if hw == 1:
        x2 = x.reshape((n_batch, channels))
        dy2 = dy.reshape((n_batch, channels))
        dx2 = dx.reshape((n_batch, channels))
        acc_g = np.empty(channels, dtype=np.float64)
        acc_gd = np.empty(channels, dtype=np.float64)
        acc_d = np.empty(channels, dtype=np.float64)
        coef_k = np.empty(channels, dtype=x.dtype)
        coef_a = np.empty(channels, dtype=x.dtype)
        coef_b = np.empty(channels, dtype=x.dtype)
        n_blocks = (channels + _BLOCK - 1) // _BLOCK
        for blk in prange(n_blocks):
            c0 = blk * _BLOCK
            c1 = min(c0 + _BLOCK, channels)
            ag = acc_g[c0:c1]
            agd = acc_gd[c0:c1]
            ad = acc_d[c0:c1]
            ag[:] = 0.0
            agd[:] = 0.0
            ad[:] = 0.0
            m = mean[c0:c1]
            for n in range(n_batch):
                _vec_grad_sums(ag, agd, ad, dy2[n, c0:c1], x2[n, c0:c1], m)
            _grad_coefficients(
                acc_g,
                acc_gd,
                acc_d,
                gamma,
                invstd,
                inv_count,
                c0,
                c1,
                dgamma,
                dbeta,
                coef_k,
                coef_a,
                coef_b,
            )
            for n in range(n_batch):
                _vec_dx(
                    dy2[n, c0:c1],
                    x2[n, c0:c1],
                    m,
                    coef_k[c0:c1],
                    coef_a[c0:c1],
                    coef_b[c0:c1],
                    dx2[n, c0:c1],
                )
    else:
        x3 = x.reshape((n_batch, channels, hw))
        dy3 = dy.reshape((n_batch, channels, hw))
        dx3 = dx.reshape((n_batch, channels, hw))
        for c in prange(channels):
            m = mean[c]
            m64 = np.float64(m)
            sum_g = 0.0
            sum_gd = 0.0
            sum_d = 0.0
            for n in range(n_batch):
                s_g, s_gd, s_d = _row_grad_sums(dy3[n, c], x3[n, c], m64)
                sum_g += s_g
                sum_gd += s_gd
                sum_d += s_d
            istd = np.float64(invstd[c])
            delta = sum_d * inv_count
            sum_gx = (sum_gd - delta * sum_g) * istd
            dbeta[c] = sum_g
            dgamma[c] = sum_gx
            k64 = np.float64(gamma[c]) * istd
            a64 = -k64 * istd * sum_gx * inv_count
            k = typ(k64)
            a = typ(a64)
            b = typ(-k64 * sum_g * inv_count - a64 * delta)
            for n in range(n_batch):
                _row_dx(dy3[n, c], x3[n, c], m, k, a, b, dx3[n, c])


# ---------------------------------------------------------------- channels-last kernels
# A convolution's output is channels-last (NHWC memory): seen as a (P, C) matrix of P = N*H*W
# pixels by C channels, a channel is a column. The pixels are taken in chunks of _PIXELS; each
# chunk sums its pixels in order into a row of per-channel partial sums of its own, and the
# rows are added in chunk order afterwards: parallel over chunks, and the result does not
# depend on the thread count. The helpers take a chunk as a 2-D view and index it only with
# range() variables, which numba knows are >= 0: an index it must test for wraparound
# (``base + c``) kept the inner loop over channels scalar, 4-7x slower (measured).
_PIXELS = 256  # pixels per chunk: fixes the summation order


@njit(cache=True, fastmath=BN_FASTMATH)
def _chunk_sum(x, acc):
    """acc[c] = sum of x[p, c] over the chunk's pixels p, in float64, four pixels at a time
    (each add into acc is a load and a store: a quarter of them)."""
    for c in range(x.shape[1]):
        acc[c] = 0.0
    quads = x.shape[0] // 4
    for q in range(quads):
        for c in range(x.shape[1]):
            acc[c] += (np.float64(x[4 * q, c]) + np.float64(x[4 * q + 1, c])) + (
                np.float64(x[4 * q + 2, c]) + np.float64(x[4 * q + 3, c])
            )
    for p in range(4 * quads, x.shape[0]):
        for c in range(x.shape[1]):
            acc[c] += x[p, c]


@njit(cache=True, fastmath=BN_FASTMATH)
def _chunk_sq_dev(x, mu, acc):
    """acc[c] = sum of (x[p, c] - mu[c])**2 over the chunk's pixels, in float64, four pixels
    at a time."""
    if x.shape[1] == 16:
        _chunk_sq_dev16(x, mu, acc)
        return
    for c in range(x.shape[1]):
        acc[c] = 0.0
    quads = x.shape[0] // 4
    for q in range(quads):
        for c in range(x.shape[1]):
            d0 = x[4 * q, c] - mu[c]
            d1 = x[4 * q + 1, c] - mu[c]
            d2 = x[4 * q + 2, c] - mu[c]
            d3 = x[4 * q + 3, c] - mu[c]
            acc[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for p in range(4 * quads, x.shape[0]):
        for c in range(x.shape[1]):
            d = x[p, c] - mu[c]
            acc[c] += d * d


@njit(cache=True, fastmath=BN_FASTMATH)
def _chunk_sq_dev16(x, mu, acc):
    """_chunk_sq_dev for 16 channels, the sums and the mean in stack memory (as
    _chunk_grad_sums16, and for its reason: 1.4x here)."""
    s = numba.carray(stack_array(16, np.float64), (16,))
    mm = numba.carray(stack_array(16, np.float64), (16,))
    for c in range(16):
        s[c] = 0.0
        mm[c] = mu[c]
    quads = x.shape[0] // 4
    for q in range(quads):
        for c in range(16):
            d0 = x[4 * q, c] - mm[c]
            d1 = x[4 * q + 1, c] - mm[c]
            d2 = x[4 * q + 2, c] - mm[c]
            d3 = x[4 * q + 3, c] - mm[c]
            s[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for p in range(4 * quads, x.shape[0]):
        for c in range(16):
            d = x[p, c] - mm[c]
            s[c] += d * d
    for c in range(16):
        acc[c] = s[c]


@njit(cache=True)
def eval_scale(gamma, running_var, eps, scale):
    """scale[c] = gamma[c] / sqrt(running_var[c] + eps), in float64, stored in scale's dtype:
    the evaluation-mode forward's per-channel factor (fused.conv2d_forward's BatchNorm epilogue
    takes the same, so the two give bitwise the same output)."""
    for c in range(scale.shape[0]):
        scale[c] = gamma[c] / np.sqrt(np.float64(running_var[c]) + np.float64(eps))


@njit(cache=True, fastmath=BN_FASTMATH)
def chunk_affine_inplace(x, m, s, b):
    """x[p, c] = (x[p, c] - m[c]) * s[c] + b[c]: _chunk_affine's arithmetic in place (with
    out = x there, LLVM's runtime overlap check fails and the loop runs scalar)."""
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[p, c] = (x[p, c] - m[c]) * s[c] + b[c]


@njit(cache=True, fastmath=BN_FASTMATH)
def chunk_affine_relu_inplace(x, m, s, b):
    """x[p, c] = relu((x[p, c] - m[c]) * s[c] + b[c]) in place: chunk_affine_inplace's values
    through _relu_select in the same loop (bitwise the two; a select pass of its own over the
    rows stayed scalar: the convolutions' evaluation-mode epilogue at filter counts that are not
    multiples of 16 cost markedly more with the ReLU than without)."""
    zero = x.dtype.type(0)
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[p, c] = _relu_select((x[p, c] - m[c]) * s[c] + b[c], zero)


@njit(cache=True, fastmath=BN_FASTMATH)
def _chunk_affine(x, m, s, b, out):
    """out[p, c] = (x[p, c] - m[c]) * s[c] + b[c] over the chunk's pixels."""
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[p, c] = (x[p, c] - m[c]) * s[c] + b[c]


@njit(cache=True)
def _relu_select(v, zero):
    """activations.relu_forward's select: v where v > 0, else 0 (a NaN stays NaN). Compiled
    without fastmath, so a fastmath caller that LLVM inlines it into keeps its IEEE compare."""
    return zero if v <= zero else v


@njit(cache=True, fastmath=BN_FASTMATH)
def _chunk_affine_relu(x, m, s, b, out):
    """out[p, c] = relu((x[p, c] - m[c]) * s[c] + b[c]): _chunk_affine's values through the
    ReLU's select in the same loop (bitwise the two one after the other; a pass of its own over
    the chunk, even in cache, stayed scalar and cost more than the affine itself)."""
    zero = out.dtype.type(0)
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[p, c] = _relu_select((x[p, c] - m[c]) * s[c] + b[c], zero)


@njit(cache=True, fastmath=BN_FASTMATH)
def _relu_passed(x, m, s, b):
    """Whether the forward's ReLU passed this value: its output recomputed from x as
    _chunk_affine_relu computed it, the same expression under the same flags (a function of its
    own, so the backward's flags do not apply to it), tested as _relu_select tests it."""
    return (x - m) * s + b > 0


@njit(cache=True, inline="always", fastmath=BN_GRAD_FASTMATH)
def _gate(g, x, m, s, b, relu, zero):
    """g, or with ``relu`` ``zero`` where the forward's ReLU zeroed its output
    (activations.relu_backward's mask y > 0, without reading y)."""
    if relu and not _relu_passed(x, m, s, b):
        return zero
    return g


@njit(cache=True, fastmath=BN_GRAD_FASTMATH)
def _chunk_grad_sums(g, x, m, acc_g, acc_gd, acc_d, relu, affine):
    """Per channel over the chunk's pixels, in float64: sum(dy), sum(dy * (x - m)), sum(x - m);
    with ``relu`` dy gated by the forward's ReLU (affine: see batchnorm_backward_nhwc)."""
    if x.shape[1] == 16:
        _chunk_grad_sums16(g, x, m, acc_g, acc_gd, acc_d, relu, affine)
        return
    s, b = affine[0], affine[1]
    zero = g.dtype.type(0)
    for c in range(x.shape[1]):
        acc_g[c] = 0.0
        acc_gd[c] = 0.0
        acc_d[c] = 0.0
    quads = x.shape[0] // 4
    for q in range(quads):  # four pixels at a time, as _chunk_sum
        for c in range(x.shape[1]):
            m64 = np.float64(m[c])
            mc, sc, bc = m[c], s[c], b[c]
            g0 = np.float64(_gate(g[4 * q, c], x[4 * q, c], mc, sc, bc, relu, zero))
            g1 = np.float64(_gate(g[4 * q + 1, c], x[4 * q + 1, c], mc, sc, bc, relu, zero))
            g2 = np.float64(_gate(g[4 * q + 2, c], x[4 * q + 2, c], mc, sc, bc, relu, zero))
            g3 = np.float64(_gate(g[4 * q + 3, c], x[4 * q + 3, c], mc, sc, bc, relu, zero))
            d0, d1 = np.float64(x[4 * q, c]) - m64, np.float64(x[4 * q + 1, c]) - m64
            d2, d3 = np.float64(x[4 * q + 2, c]) - m64, np.float64(x[4 * q + 3, c]) - m64
            acc_g[c] += (g0 + g1) + (g2 + g3)
            acc_gd[c] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
            acc_d[c] += (d0 + d1) + (d2 + d3)
    for p in range(4 * quads, x.shape[0]):
        for c in range(x.shape[1]):
            gv = np.float64(_gate(g[p, c], x[p, c], m[c], s[c], b[c], relu, zero))
            d = np.float64(x[p, c]) - np.float64(m[c])
            acc_g[c] += gv
            acc_gd[c] += gv * d
            acc_d[c] += d


@njit(cache=True, fastmath=BN_GRAD_FASTMATH)
def _chunk_grad_sums16(g, x, m, acc_g, acc_gd, acc_d, relu, affine):
    """_chunk_grad_sums for 16 channels, the same sums in the same order with the sums and
    the mean in stack memory: with them in the arrays, this width ran 4x slower per value
    than 32 or 64 channels."""
    sg = numba.carray(stack_array(16, np.float64), (16,))
    sgd = numba.carray(stack_array(16, np.float64), (16,))
    sd = numba.carray(stack_array(16, np.float64), (16,))
    mm = numba.carray(stack_array(16, np.float64), (16,))
    s, b = affine[0], affine[1]
    zero = g.dtype.type(0)
    for c in range(16):
        sg[c] = 0.0
        sgd[c] = 0.0
        sd[c] = 0.0
        mm[c] = np.float64(m[c])
    quads = x.shape[0] // 4
    for q in range(quads):
        for c in range(16):
            m64 = mm[c]
            mc, sc, bc = m[c], s[c], b[c]
            g0 = np.float64(_gate(g[4 * q, c], x[4 * q, c], mc, sc, bc, relu, zero))
            g1 = np.float64(_gate(g[4 * q + 1, c], x[4 * q + 1, c], mc, sc, bc, relu, zero))
            g2 = np.float64(_gate(g[4 * q + 2, c], x[4 * q + 2, c], mc, sc, bc, relu, zero))
            g3 = np.float64(_gate(g[4 * q + 3, c], x[4 * q + 3, c], mc, sc, bc, relu, zero))
            d0, d1 = np.float64(x[4 * q, c]) - m64, np.float64(x[4 * q + 1, c]) - m64
            d2, d3 = np.float64(x[4 * q + 2, c]) - m64, np.float64(x[4 * q + 3, c]) - m64
            sg[c] += (g0 + g1) + (g2 + g3)
            sgd[c] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
            sd[c] += (d0 + d1) + (d2 + d3)
    for p in range(4 * quads, x.shape[0]):
        for c in range(16):
            gv = np.float64(_gate(g[p, c], x[p, c], m[c], s[c], b[c], relu, zero))
            d = np.float64(x[p, c]) - mm[c]
            sg[c] += gv
            sgd[c] += gv * d
            sd[c] += d
    for c in range(16):
        acc_g[c] = sg[c]
        acc_gd[c] = sgd[c]
        acc_d[c] = sd[c]


@njit(cache=True, fastmath={"contract"})
def _chunk_dx(g, x, m, k, a, b, out, relu, affine):
    """dx[p, c] = k[c] * dy[p, c] + a[c] * (x[p, c] - m[c]) + b[c] over the chunk's pixels; with
    ``relu`` dy gated by the forward's ReLU (affine: see batchnorm_backward_nhwc)."""
    rs, rb = affine[0], affine[1]
    zero = g.dtype.type(0)
    for p in range(x.shape[0]):
        for c in range(x.shape[1]):
            gv = _gate(g[p, c], x[p, c], m[c], rs[c], rb[c], relu, zero)
            # bracketed, each add has one product to fuse with: the same multiply-adds whether
            # dy was loaded or gated (left to LLVM, k * dy + a * (x - m) fused either way, 1 ulp)
            out[p, c] = k[c] * gv + (a[c] * (x[p, c] - m[c]) + b[c])


@njit(cache=True)
def _scaled(v, factor, out):
    """out = v * factor (float64)."""
    for c in range(v.shape[0]):
        out[c] = v[c] * factor


@njit(cache=True)
def _combine_squares(chunk_squares, chunk_mean, mu, pixels, out):
    """out[c] = the sum over all pixels of (x - mu[c])**2, from each chunk's sum of squares
    about its own mean: sum over chunks k of chunk_squares[k, c] + n_k (chunk_mean[k, c] -
    mu[c])**2, n_k the chunk's pixels (Chan, Golub & LeVeque's combination; chunks in order)."""
    for c in range(out.shape[0]):
        out[c] = 0.0
    for k in range(chunk_squares.shape[0]):
        n_k = np.float64(min(_PIXELS, pixels - k * _PIXELS))
        for c in range(out.shape[0]):
            d = chunk_mean[k, c] - mu[c]
            out[c] += chunk_squares[k, c] + n_k * (d * d)


@njit(cache=True)
def _add_rows(part, out):
    """out[c] = sum over k of part[k, c], rows added in order (float64)."""
    for c in range(part.shape[1]):
        out[c] = 0.0
    for k in range(part.shape[0]):
        for c in range(part.shape[1]):
            out[c] += part[k, c]


@njit(parallel=True, cache=True, fastmath=BN_FASTMATH)
def batchnorm_forward_train_nhwc(x, gamma, beta, eps, out, mean, invstd, relu, affine):
    """Training-mode forward over a channels-last activation seen as pixels x channels.

    x, out (P, C) C-contiguous, P = N*H*W; gamma, beta, mean, invstd (C,); the formulas of
    batchnorm_forward_train (the rounded mean compensated in the shift), the sums in pixel
    chunks added in chunk order; each chunk's squared deviations about its own mean, in the
    pass that sums it (_combine_squares): two passes over x where centring on the batch mean
    takes three. ``relu``: then max(out, 0),
    in the loop that writes out (bitwise the ReLU layer's kernel after this one).
    affine (2, C) receives the scale and shift of out = (x - mean) * scale + shift, from which
    batchnorm_backward_nhwc recomputes the ReLU's mask.
    """
    pixels, channels = x.shape
    chunks = (pixels + _PIXELS - 1) // _PIXELS
    inv_count = 1.0 / pixels
    eps64 = np.float64(eps)
    part = np.empty((chunks, channels), dtype=np.float64)
    chunk_mean = np.empty((chunks, channels), dtype=np.float64)
    chunk_squares = np.empty((chunks, channels), dtype=np.float64)
    for k in prange(chunks):
        xk = x[k * _PIXELS : (k + 1) * _PIXELS]
        _chunk_sum(xk, part[k])
        _scaled(part[k], 1.0 / xk.shape[0], chunk_mean[k])
        # centred on the chunk's own mean, while the chunk is still in cache
        _chunk_sq_dev(xk, chunk_mean[k], chunk_squares[k])
    mu64 = np.empty(channels, dtype=np.float64)
    _add_rows(part, mu64)
    for c in range(channels):
        mu64[c] *= inv_count
    squares = np.empty(channels, dtype=np.float64)
    _combine_squares(chunk_squares, chunk_mean, mu64, pixels, squares)
    scale = affine[0]
    shift = affine[1]
    _stat_coefficients(
        mu64, squares, gamma, beta, inv_count, eps64, 0, channels, mean, invstd, scale, shift
    )
    for k in prange(chunks):
        xk = x[k * _PIXELS : (k + 1) * _PIXELS]
        outk = out[k * _PIXELS : (k + 1) * _PIXELS]
        if relu:
            _chunk_affine_relu(xk, mean, scale, shift, outk)
        else:
            _chunk_affine(xk, mean, scale, shift, outk)


@njit(parallel=True, cache=True, fastmath=BN_FASTMATH)
def batchnorm_forward_eval_nhwc(x, gamma, beta, running_mean, running_var, eps, out):
    """Evaluation-mode forward over a channels-last activation: x, out (P, C) C-contiguous;
    out = (x - running_mean) * (gamma / sqrt(running_var + eps)) + beta."""
    pixels, channels = x.shape
    chunks = (pixels + _PIXELS - 1) // _PIXELS
    scale = np.empty(channels, dtype=x.dtype)
    eval_scale(gamma, running_var, eps, scale)
    for k in prange(chunks):
        _chunk_affine(
            x[k * _PIXELS : (k + 1) * _PIXELS],
            running_mean,
            scale,
            beta,
            out[k * _PIXELS : (k + 1) * _PIXELS],
        )


@njit(parallel=True, cache=True, fastmath=BN_GRAD_FASTMATH)
def batchnorm_backward_nhwc(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, relu, affine):
    """Backward of the training-mode forward over channels-last activations: dy, x, dx (P, C)
    C-contiguous; the formulas of batchnorm_backward (the stored mean's rounding corrected), the
    sums in pixel chunks added in chunk order.

    ``relu``: dy is the gradient of the ReLU after the forward (batchnorm_forward_train_nhwc
    with ``relu``, which wrote ``affine``), gated by the ReLU's mask as it is read: bitwise
    activations.relu_backward first, without its pass over memory (the mask is recomputed
    from x and the forward's scale and shift). Without ``relu`` affine (2, C) is read, not
    used."""
    pixels, channels = x.shape
    chunks = (pixels + _PIXELS - 1) // _PIXELS
    inv_count = 1.0 / pixels
    part_g = np.empty((chunks, channels), dtype=np.float64)
    part_gd = np.empty((chunks, channels), dtype=np.float64)
    part_d = np.empty((chunks, channels), dtype=np.float64)
    for k in prange(chunks):
        _chunk_grad_sums(
            dy[k * _PIXELS : (k + 1) * _PIXELS],
            x[k * _PIXELS : (k + 1) * _PIXELS],
            mean,
            part_g[k],
            part_gd[k],
            part_d[k],
            relu,
            affine,
        )
    sum_g = np.empty(channels, dtype=np.float64)
    sum_gd = np.empty(channels, dtype=np.float64)
    sum_d = np.empty(channels, dtype=np.float64)
    _add_rows(part_g, sum_g)
    _add_rows(part_gd, sum_gd)
    _add_rows(part_d, sum_d)
    coef_k = np.empty(channels, dtype=x.dtype)
    coef_a = np.empty(channels, dtype=x.dtype)
    coef_b = np.empty(channels, dtype=x.dtype)
    _grad_coefficients(
        sum_g,
        sum_gd,
        sum_d,
        gamma,
        invstd,
        inv_count,
        0,
        channels,
        dgamma,
        dbeta,
        coef_k,
        coef_a,
        coef_b,
    )
    for k in prange(chunks):
        _chunk_dx(
            dy[k * _PIXELS : (k + 1) * _PIXELS],
            x[k * _PIXELS : (k + 1) * _PIXELS],
            mean,
            coef_k,
            coef_a,
            coef_b,
            dx[k * _PIXELS : (k + 1) * _PIXELS],
            relu,
            affine,
        )
