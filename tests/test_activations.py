"""kernels/activations.py against the naive loops (tests/naive/activations.py), finite
differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.kernels import activations as K
from gradcheck import assert_gradient, relative_error
from naive import activations as naive
from speedup import speedup


def relu_fwd(x):
    y = np.full(x.shape, 7.0, dtype=x.dtype)  # garbage: every element must be written
    K.relu_forward(x.reshape(-1), y.reshape(-1))
    return y


def relu_bwd(dy, y):
    dx = np.full(dy.shape, 7.0, dtype=dy.dtype)
    K.relu_backward(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_relu_matches_naive(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.1] = 0.0
    dy = rng.standard_normal(shape)
    y_ref = naive.relu_forward(x)
    dx_ref = naive.relu_backward(x, dy)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        y = relu_fwd(x.astype(dtype))
        assert y.dtype == dtype
        assert relative_error(y, y_ref) <= tol
        dx = relu_bwd(dy.astype(dtype), y)
        assert dx.dtype == dtype
        assert relative_error(dx, dx_ref) <= tol


@pytest.mark.parametrize("size", [1, 2**15 - 1, 2**15, 2**15 + 1, 16 * 2**15 + 5, 2**20 + 3])
def test_relu_every_chunk_written(size, rng):
    """Sizes around the chunk boundaries: every element written, none past the end."""
    x = rng.standard_normal(size + 2).astype(np.float32)
    y = np.full(size + 2, 7.0, dtype=np.float32)
    K.relu_forward(x[:size], y[:size])
    np.testing.assert_array_equal(y[:size], np.maximum(x[:size], 0))
    assert np.all(y[size:] == 7.0)
    dy = rng.standard_normal(size + 2).astype(np.float32)
    dx = np.full(size + 2, 7.0, dtype=np.float32)
    K.relu_backward(dy[:size], y[:size], dx[:size])
    np.testing.assert_array_equal(dx[:size], np.where(x[:size] > 0, dy[:size], 0))
    assert np.all(dx[size:] == 7.0)


@pytest.mark.parametrize("size", [1, 2**15 - 1, 2**15 + 1, 16 * 2**15 + 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["add_relu_forward", "add"])
def test_add_matches_naive_bitwise(name, size, dtype, rng):
    """a + b, and relu(a + b) in one pass: bitwise the textbook sum (then ReLU), NaN and
    infinities as numpy adds them, every element written and none past the end."""
    a = rng.standard_normal(size + 2).astype(dtype)
    b = rng.standard_normal(size + 2).astype(dtype)
    special = min(6, size)
    a[:special] = [np.nan, np.inf, -np.inf, np.inf, 1.0, -2.0][:special]
    b[:special] = [1.0, 1.0, 1.0, -np.inf, -1.0, 2.0][:special]
    out = np.full(size + 2, 7.0, dtype=dtype)
    with np.errstate(invalid="ignore"):
        getattr(K, name)(a[:size], b[:size], out[:size])
        expected = getattr(naive, name)(a[:size], b[:size])
    np.testing.assert_array_equal(out[:size], expected)
    if name == "add":  # (Residual's sums were np.add's: the same bits, sign of zero included)
        assert out[:size].tobytes() == np.add(a[:size], b[:size]).tobytes()
    assert out.dtype == dtype and np.all(out[size:] == 7.0)


def test_relu_nan_propagates():
    x = np.array([np.nan, -1.0, 2.0, 0.0, -np.inf, np.inf], dtype=np.float32)
    y = relu_fwd(x)
    np.testing.assert_array_equal(y, [np.nan, 0, 2, 0, 0, np.inf])
    np.testing.assert_array_equal(y, naive.relu_forward(x))
    dx = relu_bwd(np.ones_like(x), y)
    np.testing.assert_array_equal(dx, [0, 0, 1, 0, 0, 1])


def test_relu_backward_finite_differences(rng):
    x = rng.standard_normal((3, 4, 5))
    x += np.where(x >= 0, 0.1, -0.1)  # away from the kink at 0
    g = rng.standard_normal(x.shape)
    assert_gradient(relu_fwd, x, g, relu_bwd(g, relu_fwd(x)))


def test_speedup_over_naive(rng):
    """ReLU on the reference network's first activation, batch 8: >= 20x the naive loop."""
    x = rng.standard_normal((8, 32, 26, 26)).astype(np.float32)
    y = np.empty_like(x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = np.empty_like(x)
    forward = speedup(
        lambda: K.relu_forward(x.reshape(-1), y.reshape(-1)), lambda: naive.relu_forward(x)
    )
    backward = speedup(
        lambda: K.relu_backward(dy.reshape(-1), y.reshape(-1), dx.reshape(-1)),
        lambda: naive.relu_backward(x, dy),
    )
    assert forward >= 20, forward
    assert backward >= 20, backward


# ---- Tanh's and Sigmoid's backward passes and LeakyReLU: the textbook expressions, bitwise ----


@given(st.integers(0, 3 * (1 << 15) + 5), st.integers(0, 2**32 - 1), st.booleans())
def test_tanh_sigmoid_leaky_kernels_are_the_expressions_bitwise(size, seed, channels_last):
    """Each kernel computes the numpy expression it replaced, in the same order, so bitwise the
    same values (NaN, inf and -0.0 included), every element written, in the input's layout;
    sizes cross the kernels' chunks."""
    from fastcnn import functional as F

    rng = np.random.default_rng(seed)
    for dtype in (np.float32, np.float64):
        c = max(size // 6, 1)
        n = 6 * c
        x = rng.standard_normal(n).astype(dtype) * 3
        dy = rng.standard_normal(n).astype(dtype)
        x[:4] = [np.nan, np.inf, -np.inf, -0.0]
        dy[-1] = np.inf
        if channels_last:  # NCHW views of channels-last memory, as the layers pass them
            x = x.reshape(1, 2, 3, c).transpose(0, 3, 1, 2)
        else:
            x = x.reshape(1, c, 2, 3)
        dy = dy.reshape(1, c, 2, 3)  # C order: the kernels take it in x's layout
        one, slope = dtype(1), dtype(0.1)
        with np.errstate(all="ignore"):
            y_t, y_s = np.tanh(x), 1 / (1 + np.exp(-x.astype(dtype)))
            cases = [
                (F.tanh_backward(dy, y_t), dy * (one - y_t * y_t)),
                (F.sigmoid_backward(dy, y_s), dy * y_s * (one - y_s)),
                (F.leaky_relu_forward(x, 0.1), np.where(x > 0, x, x * slope)),
                (F.leaky_relu_backward(dy, x, 0.1), np.where(x > 0, dy, dy * slope)),
            ]
        for got, expected in cases:
            assert got.dtype == dtype and got.shape == x.shape
            np.testing.assert_array_equal(got, expected)  # NaN where expected has NaN
            np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))


# ---- Tanh's float32 forward: Eigen's rational function ----


def test_tanh_forward_float32_within_6_ulp():
    """Against tanh in float64 on every float32 of [-1, 1] spaced 2^-20, a million normal
    values (x 3), the range to +-12 and the special values: at most 6 ulp (numpy's float32 tanh:
    about 1.4), exact at 0, +-1 from +-9 on, a NaN stays NaN, -0 stays -0, tiny x stays x."""
    from fastcnn import functional as F

    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 1e-45, 3e-4, -3.9e-4, 9.0]
    x = np.concatenate(
        [
            np.arange(-(1 << 20), (1 << 20) + 1) / np.float32(1 << 20),
            rng.standard_normal(1_000_000) * 3,
            np.linspace(-12, 12, 400_001),
            specials,
        ]
    ).astype(np.float32)
    y = np.full_like(x, 7.0)
    K.tanh_forward(x, y)
    exact = np.tanh(x.astype(np.float64))
    finite = np.isfinite(exact)
    ulp = np.spacing(np.abs(exact[finite]).astype(np.float32)).astype(np.float64)
    assert (np.abs(y[finite] - exact[finite]) / ulp).max() <= 6
    tail = y[-len(specials) :]
    assert tail[0] == 0 and np.signbit(tail[1]) and tail[1] == 0
    assert tail[2] == 1 and tail[3] == -1 and np.isnan(tail[4]) and tail[10] == 1
    assert list(tail[5:10]) == list(np.float32(specials[5:10]))
    assert (y[np.abs(x) >= 9] == np.sign(x[np.abs(x) >= 9])).all()
    # the layer's path: float32 on the kernel in the input's layout, float64 on numpy
    v = rng.standard_normal((2, 3, 4, 5)).astype(np.float32).transpose(0, 2, 3, 1)
    got = F.tanh_forward(v)
    assert got.strides == v.strides and np.abs(got - np.tanh(v)).max() <= 6e-7
    w = rng.standard_normal((3, 4))
    assert np.array_equal(F.tanh_forward(w), np.tanh(w))
