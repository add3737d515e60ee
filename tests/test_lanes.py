"""kernels/lanes.py: the 16-lane vector steps of the convolutions' epilogues, against the
loops and kernels they replace (bitwise) on random values with NaNs and zeros of both signs;
the Winograd transforms against the formulas they replaced (bitwise) and the textbook
matrices."""

import numpy as np
import pytest
from numba import njit

from fastcnn.kernels.batchnorm import chunk_affine_inplace
from fastcnn.kernels.lanes import (
    add16,
    batch_norm16,
    f4_gradient16,
    f4_gradient16_masked,
    f4_input16,
    f4_input16_masked,
    f4_output16,
    relu16,
)
from naive.winograd import F4


@njit(cache=False)
def _bias_relu(y, bias, f0):
    for p in range(y.size // 16):
        o = np.uint64(16 * p)
        add16(y, o, bias, np.uint64(f0))
        relu16(y, o)


def _values(rng, n, dtype):
    v = rng.standard_normal(n).astype(dtype)
    v[::7] = 0.0
    v[1::11] = -0.0
    v[2::13] = np.nan
    return v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("f0", [0, 16])
def test_bias_and_relu_are_bitwise_the_loops_they_replace(dtype, f0):
    rng = np.random.default_rng(f0)
    y = _values(rng, 16 * 40, dtype)
    bias = _values(rng, 32, dtype)
    summed = y + np.tile(bias[f0 : f0 + 16], 40)
    with np.errstate(invalid="ignore"):
        expect = np.where(summed <= 0, dtype(0), summed)
    got = y.copy()
    _bias_relu(got, bias, f0)
    assert np.array_equal(got.view(np.uint8), expect.view(np.uint8))  # NaNs and zeros' signs
    assert np.isnan(got).sum() > 0 and (np.signbit(got) & (got == 0)).sum() == 0


@njit(cache=False)
def _fused(y, mean, scale, shift, add, f0, relu):
    for p in range(y.size // 16):
        o = np.uint64(16 * p)
        batch_norm16(y, o, mean, scale, shift, np.uint64(f0), add, o, relu)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm16_is_the_three_steps(dtype, summed, relu):
    rng = np.random.default_rng(int(summed) + 2 * int(relu))
    y = _values(rng, 16 * 40, dtype)
    add = _values(rng, y.size, dtype) if summed else np.empty(0, dtype)
    mean, scale, shift = (rng.standard_normal(32).astype(dtype) for _ in range(3))
    rows = y.reshape(-1, 16).copy()
    chunk_affine_inplace(rows, mean[16:], scale[16:], shift[16:])
    expect = rows.reshape(-1) + add if summed else rows.reshape(-1)
    if relu:
        with np.errstate(invalid="ignore"):
            expect = np.where(expect <= 0, dtype(0), expect)
    got = y.copy()
    _fused(got, mean, scale, shift, add, 16, relu)
    assert np.array_equal(got.view(np.uint8), expect.view(np.uint8))


# ---- the Winograd transforms ----


def _formulas(kind, s):
    """The transforms as the kernels' loops computed them (numpy, operation by operation)."""
    if kind == "input":
        d0, d1, d2, d3, d4, d5 = s
        t0, t1, t2, t3 = d4 - 4 * d2, d3 - 4 * d1, d4 - d2, 2 * (d3 - d1)
        return [4 * (d0 - d2) + t2, t0 + t1, t0 - t1, t2 + t3, t2 - t3, 4 * (d1 - d3) + (d5 - d3)]
    if kind == "output":
        m0, m1, m2, m3, m4, m5 = s
        a, b, c, e = m1 + m2, m1 - m2, m3 + m4, m3 - m4
        return [m0 + a + c, b + 2 * e, a + 4 * c, b + 8 * e + m5]
    g0, g1, g2, g3 = s
    even, odd, even4, odd8 = g0 + g2, g1 + g3, g0 + 4 * g2, 2 * g1 + 8 * g3
    return [g0, even + odd, even - odd, even4 + odd8, even4 - odd8, g3]


_BT4, _, _AT4 = F4
#: kind -> (intrinsic, its masked form, inputs, the textbook matrix)
_TRANSFORMS = {
    "input": (f4_input16, f4_input16_masked, 6, _BT4),
    "output": (f4_output16, None, 6, _AT4),
    "gradient": (f4_gradient16, f4_gradient16_masked, 4, _AT4.T),
}


@njit(cache=False)
def _strided(kind, src, sbase, sstride, dst, dbase, dstride):
    sb, ss, db, ds = np.uint64(sbase), np.uint64(sstride), np.uint64(dbase), np.uint64(dstride)
    if kind == 0:
        f4_input16(src, sb, ss, dst, db, ds)
    elif kind == 1:
        f4_output16(src, sb, ss, dst, db, ds)
    else:
        f4_gradient16(src, sb, ss, dst, db, ds)


@njit(cache=False)
def _masked(kind, src, rows, col, mask, dst, dbase, dstride):
    c, m, db, ds = np.uint64(col), np.uint64(mask), np.uint64(dbase), np.uint64(dstride)
    if kind == 0:
        f4_input16_masked(src, rows, c, m, dst, db, ds)
    else:
        f4_gradient16_masked(src, rows, c, m, dst, db, ds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(_TRANSFORMS))
def test_winograd_transforms_are_the_formulas_and_the_matrices(dtype, kind):
    """Strided reads and writes (offsets and strides as the kernels use them): bitwise the
    loops' formulas, and the textbook matrix product up to rounding; nothing else written."""
    rng = np.random.default_rng(len(kind))
    _, _, n, matrix = _TRANSFORMS[kind]
    sbase, sstride, dbase, dstride = 5, 37, 3, 21
    src = rng.standard_normal(sbase + (n - 1) * sstride + 16 + 7).astype(dtype)
    dst = np.full(dbase + (matrix.shape[0] - 1) * dstride + 16 + 9, np.nan, dtype)
    _strided(list(_TRANSFORMS).index(kind), src, sbase, sstride, dst, dbase, dstride)
    s = [src[sbase + k * sstride :][:16] for k in range(n)]
    got = np.array([dst[dbase + i * dstride :][:16] for i in range(matrix.shape[0])])
    assert np.array_equal(got, np.array(_formulas(kind, s)))
    exact = matrix @ np.array(s, dtype=np.float64)
    tol = 1e-14 if dtype == np.float64 else 2e-6
    assert np.abs(got - exact).max() <= tol * np.abs(exact).max()
    written = np.zeros(dst.size, bool)
    for i in range(matrix.shape[0]):
        written[dbase + i * dstride :][:16] = True
    assert np.isnan(dst[~written]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["input", "gradient"])
@pytest.mark.parametrize("mask", [0, 0b101101, 0b111111, 0b000110])
def test_masked_winograd_transforms_read_zeros_outside(dtype, kind, mask):
    """The edge patches' form: row k from rows[k] + col where bit k of the mask is set, else
    zeros (rows outside still point in bounds, as the kernels clamp them)."""
    rng = np.random.default_rng(mask)
    strided, masked, n, matrix = _TRANSFORMS[kind]
    src = rng.standard_normal(400).astype(dtype)
    rows = rng.permutation(np.arange(0, 360, 40))[:n].astype(np.uint64)
    col = 9
    dst = np.full(6 * 16, np.nan, dtype)
    _masked(list(_TRANSFORMS).index(kind) // 2, src, rows, col, mask, dst, 0, 16)
    s = [src[int(rows[k]) + col :][:16] if mask >> k & 1 else np.zeros(16, dtype) for k in range(n)]
    got = dst.reshape(6, 16)[: matrix.shape[0]]
    assert np.array_equal(got, np.array(_formulas(kind, s)))


def test_winograd_transforms_refuse_offsets_they_would_misread():
    """Offsets and the rows table are added as 64-bit integers in the generated code: anything
    else is a typing error, never a misread."""
    from numba.core.errors import TypingError

    src, dst = np.zeros(200, np.float32), np.zeros(96, np.float32)
    with pytest.raises(TypingError, match="64-bit integer"):
        _masked(0, src, np.zeros(6, np.int32), 0, 1, dst, 0, 16)
    with pytest.raises(TypingError, match="64-bit integer"):
        njit(
            lambda a, b: f4_output16(a, np.uint32(0), np.uint64(16), b, np.uint64(0), np.uint64(16))
        )(src, dst)
