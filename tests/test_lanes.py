"""kernels/lanes.py: the 16-lane vector steps of the convolutions' epilogues, against the
loops and kernels they replace (bitwise) on random values with NaNs and zeros of both signs."""

import numpy as np
import pytest
from numba import njit

from fastcnn.kernels.batchnorm import chunk_affine_inplace
from fastcnn.kernels.lanes import add16, batch_norm16, relu16


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
