"""kernels/pool2d.py against the naive loops (tests/naive/pool2d.py), finite differences,
PyTorch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.kernels import pool2d as K
from gradcheck import assert_gradient, relative_error
from naive import pool2d as naive
from speedup import speedup

# --- calling the kernels the way fastcnn.functional does -------------------------------------


def out_size(size, k, s, before, after):
    return (size + before + after - k) // s + 1


def out_shape(x_shape, kernel, stride, padding):
    n, c, h, w = x_shape
    (pt, pb), (pl, pr) = padding
    return (
        n,
        c,
        out_size(h, kernel[0], stride[0], pt, pb),
        out_size(w, kernel[1], stride[1], pl, pr),
    )


def nhwc(a):
    """The kernels' layout: (N, C, H, W) -> C-contiguous (N, H, W, C)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def nhwc_full(shape, value, dtype):
    """An (N, H, W, C) array for the NCHW ``shape``, filled with garbage the kernel must
    overwrite."""
    n, c, h, w = shape
    return np.full((n, h, w, c), value, dtype=dtype)


def nchw(a):
    return a.transpose(0, 3, 1, 2)


def maxpool_fwd(x, kernel, stride, padding):
    shape = out_shape(x.shape, kernel, stride, padding)
    y = nhwc_full(shape, 7.0, x.dtype)  # garbage: every element must be written
    argmax = nhwc_full(shape, -7, np.int64)
    K.maxpool2d_forward(
        nhwc(x), kernel[0], kernel[1], stride[0], stride[1], padding[0][0], padding[1][0], y, argmax
    )
    return nchw(y), nchw(argmax)


def maxpool_bwd(dy, argmax, x_shape, kernel=(0, 0), stride=(0, 0), padding=((0, 0), (0, 0))):
    """kernel (0, 0): the geometry unknown to the kernel, which takes its general path."""
    dx = nhwc_full(x_shape, 7.0, dy.dtype)
    dyh = nhwc(dy)
    K.maxpool2d_backward(
        dyh,
        nhwc(argmax),
        dyh,
        False,
        kernel[0],
        kernel[1],
        stride[0],
        stride[1],
        padding[0][0],
        padding[1][0],
        dx,
    )
    return nchw(dx)


def avgpool_fwd(x, kernel, stride, padding):
    y = nhwc_full(out_shape(x.shape, kernel, stride, padding), 7.0, x.dtype)
    K.avgpool2d_forward(
        nhwc(x), kernel[0], kernel[1], stride[0], stride[1], padding[0][0], padding[1][0], y
    )
    return nchw(y)


def avgpool_bwd(dy, x_shape, kernel, stride, padding):
    dx = nhwc_full(x_shape, 7.0, dy.dtype)
    K.avgpool2d_backward(
        nhwc(dy), kernel[0], kernel[1], stride[0], stride[1], padding[0][0], padding[1][0], dx
    )
    return nchw(dx)


def distinct(rng, shape, dtype=np.float64):
    """Values without ties, exact in float32 (multiples of 1/4), in random order."""
    size = int(np.prod(shape))
    return ((rng.permutation(size) - size / 2) * 0.25).reshape(shape).astype(dtype)


# --- random cases ------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    """Shapes, kernels, strides and paddings (0 <= padding <= kernel // 2 on each side, as PyTorch
    requires; bottom/right may differ from top/left), 1x1 up to kernel-as-large-as-padded-input,
    overlapping windows (stride < kernel) and gaps (stride > kernel)."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pt, pb = draw(st.integers(0, kh // 2)), draw(st.integers(0, kh // 2))
    pl, pr = draw(st.integers(0, kw // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - pt - pb), 9))
    w = draw(st.integers(max(1, kw - pl - pr), 9))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    return (n, c, h, w), (kh, kw), (sh, sw), ((pt, pb), (pl, pr)), seed


@st.composite
def fast_cases(draw):
    """The 2x2, stride 2, unpadded pool of the reference network (windows that tile the input:
    the backward's fast path), odd and even sizes (cells no window covers); padding bottom/right
    1 on odd sizes."""
    h, w = draw(st.integers(2, 13)), draw(st.integers(2, 13))
    pb = draw(st.integers(0, h % 2))
    pr = draw(st.integers(0, w % 2))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    return (n, c, h, w), (2, 2), (2, 2), ((0, pb), (0, pr)), seed


def check_maxpool(shape, kernel, stride, padding, seed):
    rng = np.random.default_rng(seed)
    x = distinct(rng, shape)
    y_ref, argmax_ref = naive.maxpool2d_forward(x, kernel, stride, padding)
    dy = rng.standard_normal(y_ref.shape)
    dx_ref = naive.maxpool2d_backward(x, dy, kernel, stride, padding)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        y, argmax = maxpool_fwd(x.astype(dtype), kernel, stride, padding)
        assert y.dtype == dtype
        assert relative_error(y, y_ref) <= tol
        np.testing.assert_array_equal(argmax, argmax_ref)
        for geometry in ((), (kernel, stride, padding)):  # the general path, then any fast one
            dx = maxpool_bwd(dy.astype(dtype), argmax, shape, *geometry)
            assert dx.dtype == dtype
            assert relative_error(dx, dx_ref) <= tol


@given(pool_cases())
def test_maxpool_matches_naive(case):
    check_maxpool(*case)


@given(fast_cases())
def test_maxpool_2x2_matches_naive(case):
    check_maxpool(*case)


@given(st.one_of(pool_cases(), fast_cases()))
def test_avgpool_matches_naive(case):
    shape, kernel, stride, padding, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y_ref = naive.avgpool2d_forward(x, kernel, stride, padding)
    dy = rng.standard_normal(y_ref.shape)
    dx_ref = naive.avgpool2d_backward(shape, dy, kernel, stride, padding)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        y = avgpool_fwd(x.astype(dtype), kernel, stride, padding)
        assert y.dtype == dtype
        assert relative_error(y, y_ref) <= tol
        dx = avgpool_bwd(dy.astype(dtype), shape, kernel, stride, padding)
        assert dx.dtype == dtype
        assert relative_error(dx, dx_ref) <= tol


# --- ties and NaN: PyTorch's rule --------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        ((2, 2), (2, 2), ((0, 0), (0, 0))),  # fast path
        ((2, 2), (2, 2), ((0, 1), (0, 1))),  # odd size, window hanging over the bottom/right
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((3, 2), (2, 1), ((1, 0), (0, 1))),
    ],
)
def test_maxpool_ties_pick_first_in_bounds_cell(kernel, stride, padding):
    x = np.full((2, 3, 7, 7), 1.5, dtype=np.float32)
    y, argmax = maxpool_fwd(x, kernel, stride, padding)
    assert np.all(y == 1.5)
    w = x.shape[3]
    for oh in range(y.shape[2]):
        for ow in range(y.shape[3]):
            h0 = max(oh * stride[0] - padding[0][0], 0)
            w0 = max(ow * stride[1] - padding[1][0], 0)
            assert np.all(argmax[:, :, oh, ow] == h0 * w + w0)


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        ((2, 2), (2, 2), ((0, 0), (0, 0))),
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((3, 3), (2, 2), ((1, 1), (1, 1))),
        ((2, 3), (1, 2), ((1, 0), (1, 1))),
    ],
)
def test_maxpool_ties_nan_and_inf_match_naive(kernel, stride, padding, rng):
    """Many ties (values 0, 1, 2), NaNs and -infs: values and indices exactly as the naive loop
    (first of equal maxima in row-major order, a NaN in the window selected: the last one, as
    PyTorch's CPU kernel, checked in test_matches_torch)."""
    x = rng.integers(0, 3, (3, 4, 8, 9)).astype(np.float64)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[rng.random(x.shape) < 0.1] = -np.inf
    x[0, 0, :5, :5] = -np.inf  # windows holding only -inf: the first cell wins
    y_ref, argmax_ref = naive.maxpool2d_forward(x, kernel, stride, padding)
    assert np.isnan(y_ref).any() and np.isinf(y_ref).any()
    for dtype in (np.float64, np.float32):
        y, argmax = maxpool_fwd(x.astype(dtype), kernel, stride, padding)
        np.testing.assert_array_equal(y, y_ref.astype(dtype))  # NaN == NaN here
        np.testing.assert_array_equal(argmax, argmax_ref)


def test_maxpool_nan_is_selected_and_propagates():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan  # top-left window
    x[0, 0, 3, 3] = np.nan  # bottom-right window, where it is the last cell
    y, argmax = maxpool_fwd(x, (2, 2), (2, 2), ((0, 0), (0, 0)))
    assert np.isnan(y[0, 0, 0, 0]) and argmax[0, 0, 0, 0] == 1
    assert np.isnan(y[0, 0, 1, 1]) and argmax[0, 0, 1, 1] == 15
    assert y[0, 0, 0, 1] == 7 and y[0, 0, 1, 0] == 13
    dx = maxpool_bwd(np.ones_like(y), argmax, x.shape, (2, 2), (2, 2))
    assert dx[0, 0, 0, 1] == 1 and dx[0, 0, 3, 3] == 1 and dx.sum() == 4


# --- backward: overlapping windows, finite differences ----------------------------------------


def test_maxpool_backward_overlapping_windows(rng):
    """Stride 1, kernel 3: a cell may be the maximum of up to 9 windows; gradients add up."""
    kernel, stride, padding = (3, 3), (1, 1), ((1, 1), (1, 1))
    x = distinct(rng, (2, 3, 9, 8))
    y_ref, _ = naive.maxpool2d_forward(x, kernel, stride, padding)
    dy = rng.standard_normal(y_ref.shape)
    dx_ref = naive.maxpool2d_backward(x, dy, kernel, stride, padding)
    _, argmax = maxpool_fwd(x, kernel, stride, padding)
    assert np.bincount(argmax.reshape(-1)).max() > 2  # windows really overlap at the maxima
    dx = maxpool_bwd(dy, argmax, x.shape, kernel, stride, padding)
    assert relative_error(dx, dx_ref) <= 1e-10


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        ((2, 2), (2, 2), ((0, 0), (0, 0))),
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((3, 2), (2, 1), ((1, 0), (1, 1))),
    ],
)
def test_maxpool_backward_finite_differences(kernel, stride, padding, rng):
    x = distinct(rng, (2, 2, 5, 6))  # values 0.25 apart: eps = 1e-6 never swaps a maximum
    y, argmax = maxpool_fwd(x, kernel, stride, padding)
    g = rng.standard_normal(y.shape)
    assert_gradient(
        lambda v: maxpool_fwd(v, kernel, stride, padding)[0],
        x,
        g,
        maxpool_bwd(g, argmax, x.shape, kernel, stride, padding),
    )


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        ((2, 2), (2, 2), ((0, 0), (0, 0))),
        ((3, 3), (1, 1), ((1, 1), (1, 1))),
        ((3, 2), (2, 1), ((1, 0), (1, 1))),
    ],
)
def test_avgpool_backward_finite_differences(kernel, stride, padding, rng):
    x = rng.standard_normal((2, 2, 5, 6))
    g = rng.standard_normal(out_shape(x.shape, kernel, stride, padding))
    assert_gradient(
        lambda v: avgpool_fwd(v, kernel, stride, padding),
        x,
        g,
        avgpool_bwd(g, x.shape, kernel, stride, padding),
    )


# --- speed -------------------------------------------------------------------------------------


def test_speedup_over_naive(rng):
    """2x2 max pool of the reference network, batch 8: forward and backward >= 20x the naive
    loops."""
    shape, kernel, stride, padding = (8, 32, 26, 26), (2, 2), (2, 2), ((0, 0), (0, 0))
    x = rng.standard_normal(shape).astype(np.float32)
    y, argmax = maxpool_fwd(x, kernel, stride, padding)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    xh, yh, ah, dyh = nhwc(x), nhwc(y), nhwc(argmax), nhwc(dy)
    dxh = np.empty_like(xh)
    forward = speedup(
        lambda: K.maxpool2d_forward(xh, 2, 2, 2, 2, 0, 0, yh, ah),
        lambda: naive.maxpool2d_forward(x, kernel, stride, padding),
    )
    backward = speedup(
        lambda: K.maxpool2d_backward(dyh, ah, dyh, False, 2, 2, 2, 2, 0, 0, dxh),
        lambda: naive.maxpool2d_backward(x, dy, kernel, stride, padding),
    )
    assert forward >= 20, forward
    assert backward >= 20, backward


# --- PyTorch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        (2, 2, 0),
        (3, 2, 1),
        (3, 1, 1),
        ((2, 3), (1, 2), (1, 0)),
    ],
)
def test_matches_torch(kernel, stride, padding, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s, p = pair(kernel), pair(stride), pair(padding)
    pads = ((p[0], p[0]), (p[1], p[1]))
    x = rng.standard_normal((3, 4, 11, 12)).astype(np.float32)
    ties = rng.integers(0, 3, x.shape).astype(np.float32)
    ties[rng.random(x.shape) < 0.1] = np.nan
    for data in (x, ties):
        y_t, idx_t = F.max_pool2d(torch.from_numpy(data), k, s, p, return_indices=True)
        y, argmax = maxpool_fwd(data, k, s, pads)
        np.testing.assert_array_equal(y, y_t.numpy())
        np.testing.assert_array_equal(argmax, idx_t.numpy())
    a_t = F.avg_pool2d(torch.from_numpy(x), k, s, p, count_include_pad=True)
    np.testing.assert_allclose(avgpool_fwd(x, k, s, pads), a_t.numpy(), rtol=1e-5, atol=1e-6)


@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_max4_matches_the_textbook_window(channels, seed, relu):
    """kernels.pool2d.max4, the 2x2 window on registers: cells in row-major order, greater or
    NaN replaces (the last NaN wins), first of equal maxima; with relu, the maximum of the
    ReLU'd cells (0 and the first cell when none is > 0; NaN passes)."""
    from fastcnn.kernels.pool2d import max4

    rng = np.random.default_rng(seed)
    cells = rng.standard_normal((4, channels))
    cells[rng.random((4, channels)) < 0.2] = np.nan
    cells[rng.random((4, channels)) < 0.2] = -0.0
    cells[:, rng.random(channels) < 0.2] = 1.5  # ties
    ks = (5, 6, 33, 34)
    for dtype in (np.float32, np.float64):
        c = cells.astype(dtype)
        y = np.full(channels, 9, dtype)
        am = np.full(channels, -9, np.int64)
        max4(c[0], c[1], c[2], c[3], relu, *ks, y, am)
        for ch in range(channels):
            best, cell = None, None
            for i in range(4):
                v = float(c[i, ch])
                if relu and not (v > 0 or v != v):
                    v = 0.0
                if i == 0 or v > best or v != v:
                    best, cell = v, ks[i]
            assert am[ch] == cell, (ch, c[:, ch])
            if best != best:
                assert np.isnan(y[ch])
            else:
                assert y[ch] == best and np.signbit(y[ch]) == np.signbit(best)
