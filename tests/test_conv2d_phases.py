"""The input gradient of a strided convolution phase by phase (kernels/conv2d_phases.py) vs the
textbook loops (tests/naive/conv2d.py), both dtypes; NaN and infinities in dy; the result for any
number of workers; fastcnn.functional's choice of it, and its gradient by finite differences."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import functional as F_
from fastcnn.kernels.conv2d_phases import conv2d_backward_input_phases
from fastcnn.threads import threads
from gradcheck import assert_gradient, relative_error
from naive.conv2d import conv2d_backward as naive_backward

F64_TOL = 1e-10
F32_TOL = 1e-4
NAIVE_BUDGET = 60_000  # N*F*C*OH*OW*KH*KW


def out_size(size, before, after, k, s):
    return (size + before + after - k) // s + 1


def phases_dx(dy, w, stride, pads, x_shape, workers=2):
    """The kernel on NCHW arrays: dy (N, F, OH, OW), w (F, C, KH, KW) -> dx (N, C, H, W)."""
    N, C, H, W = x_shape
    dx = np.full((N, H, W, C), np.nan, dy.dtype)  # an element left unwritten fails
    dyh = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    conv2d_backward_input_phases(dyh, w, *stride, pads[0][0], pads[1][0], dx, workers)
    return dx.transpose(0, 3, 1, 2)


@st.composite
def cases(draw):
    """Strides 1-3 (1: a single phase), kernels 1-5 (phases without taps where the stride is
    larger), paddings 0-3 on each side; channels around the tiles' 16 and 32 columns (blocks
    of 32 and a last one of 16, 8 or 24 on AVX2), filters up to 40. H and W from the smallest
    the kernel fits."""
    KH, KW = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    h_min = max(1, KH - sum(pads[0]))
    w_min = max(1, KW - sum(pads[1]))
    H, W = draw(st.integers(h_min, h_min + 7)), draw(st.integers(w_min, w_min + 7))
    C = draw(st.sampled_from([1, 3, 8, 15, 16, 17, 31, 32, 33, 40, 48, 56, 64]))
    N, F = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    OH, OW = out_size(H, *pads[0], KH, stride[0]), out_size(W, *pads[1], KW, stride[1])
    while N * F * C * OH * OW * KH * KW > NAIVE_BUDGET and (N > 1 or F > 1):
        if N > 1:
            N -= 1
        else:
            F -= 1
    return N, C, F, H, W, KH, KW, stride, pads, draw(st.integers(0, 2**32 - 1))


def random_case(case):
    """float64 arrays of float32-representable values: one naive result for both dtypes."""
    N, C, F, H, W, KH, KW, stride, pads, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((F, C, KH, KW)).astype(np.float32).astype(np.float64)
    OH, OW = out_size(H, *pads[0], KH, stride[0]), out_size(W, *pads[1], KW, stride[1])
    dy = rng.standard_normal((N, F, OH, OW)).astype(np.float32).astype(np.float64)
    return x, w, dy


@given(cases())
def test_matches_naive(case):
    x, w, dy = random_case(case)
    stride, pads = case[7], case[8]
    expected = naive_backward(x, w, dy, stride, pads, (1, 1))[0]
    for dtype, tol in ((np.float64, F64_TOL), (np.float32, F32_TOL)):
        dx = phases_dx(dy.astype(dtype), w.astype(dtype), stride, pads, x.shape)
        assert dx.dtype == dtype
        assert relative_error(dx, expected) <= tol, dtype


# the all-conv net's conv2 (16 channels, one column block), ResNet's 32 -> 64 /2 (two), 'same' at
# stride 2 as Keras pads it (0 before, 1 after), 1x1 /2 (three phases without taps), 5x5 /3 with
# a partial column block
SHAPES = [
    (3, 16, 32, 32, 32, 3, 3, (2, 2), ((1, 0), (1, 0))),
    (2, 32, 64, 14, 14, 3, 3, (2, 2), ((1, 0), (1, 0))),
    (2, 16, 8, 9, 10, 3, 3, (2, 2), ((0, 1), (0, 1))),
    (2, 16, 32, 14, 14, 1, 1, (2, 2), ((0, 0), (0, 0))),
    (1, 40, 5, 13, 11, 5, 5, (3, 3), ((2, 2), (1, 2))),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_network_shapes_match_naive_and_any_number_of_workers_bitwise(shape, dtype):
    """The shapes networks train, against the naive loops; and bitwise the same result for 1,
    2, 3 and 64 workers (each pads its images into a buffer of its own, reused image after
    image: a border left from another image fails)."""
    N, C, F, H, W, KH, KW, stride, pads = shape
    x, w, dy = random_case((N, C, F, H, W, KH, KW, stride, pads, C + F))
    expected = naive_backward(x, w, dy, stride, pads, (1, 1))[0]
    results = []
    for workers in (1, 2, 3, 64):
        dx = phases_dx(dy.astype(dtype), w.astype(dtype), stride, pads, x.shape, workers)
        results.append(dx.tobytes())
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    assert relative_error(dx, expected) <= tol
    assert results[1:] == results[:1] * 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [32, 40, 48, 56, 64, 96])
def test_column_blocks_are_bitwise_the_16_channel_slices(C, dtype):
    """Channels in column blocks (of 32 on the wide tile where the host takes it, a last one
    of 16 or fewer): each dx value is the same sum in the same order as the kernel run on 16
    of the channels at a time (the narrow tile), bitwise; dx inside a NaN-filled buffer, so a
    block that writes past its channels or the array shows."""
    N, F, H, W, stride, pads = 2, 24, 11, 10, (2, 2), ((1, 1), (1, 0))
    x, w, dy = random_case((N, C, F, H, W, 3, 3, stride, pads, C))
    w, dy = w.astype(dtype), dy.astype(dtype)
    buffer = np.full(N * H * W * C + 64, np.nan, dtype)
    dx = buffer[: N * H * W * C].reshape(N, H, W, C)
    dyh = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
    conv2d_backward_input_phases(dyh, w, *stride, 1, 1, dx, 2)
    assert np.isnan(buffer[N * H * W * C :]).all()
    for c0 in range(0, C, 16):
        part = np.ascontiguousarray(w[:, c0 : c0 + 16])
        dx_part = phases_dx(dy, part, stride, pads, (N, part.shape[1], H, W))
        np.testing.assert_array_equal(dx.transpose(0, 3, 1, 2)[:, c0 : c0 + 16], dx_part)
    expected = naive_backward(x, w.astype(np.float64), dy.astype(np.float64), stride, pads, (1, 1))
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    assert relative_error(dx.transpose(0, 3, 1, 2), expected[0]) <= tol


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_dy_reaches_the_cells_its_windows_cover(bad):
    """A NaN or infinity in dy reaches exactly the dx cells the naive loops give it (those its
    output pixel's window covers), no other: the zeros around dy add only finite terms."""
    N, C, F, H, W, KH, KW, stride, pads = 1, 16, 4, 9, 9, 3, 3, (2, 2), ((1, 1), (1, 1))
    x, w, dy = random_case((N, C, F, H, W, KH, KW, stride, pads, 5))
    dy[0, 2, 1, 3] = bad
    expected = naive_backward(x, w, dy, stride, pads, (1, 1))[0]
    for dtype in (np.float32, np.float64):
        dx = phases_dx(dy.astype(dtype), w.astype(dtype), stride, pads, x.shape)
        np.testing.assert_array_equal(np.isnan(dx), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(dx), np.isinf(expected))
        fin = np.isfinite(expected)
        assert relative_error(dx[fin], expected[fin]) <= (
            F32_TOL if dtype == np.float32 else F64_TOL
        )


def test_functional_takes_it_where_it_pays():
    """fastcnn.functional's rule: strided, dilation 1, 8-16 channels or whole blocks of 16,
    finite weights."""

    def takes(c, k=3, stride=(2, 2), dilation=(1, 1), w=None):
        w = np.ones((8, c, k, k)) if w is None else w
        return F_._input_gradient_by_phases(w, stride, dilation)

    assert takes(16) and takes(8) and takes(32) and takes(64) and takes(48)
    assert not takes(3) and not takes(24)  # few channels, a partial column block: col2im
    assert takes(16, k=1)  # a ResNet's shortcut: one phase of one tap, three of none
    assert not takes(16, stride=(1, 1)) and not takes(16, dilation=(2, 2))
    w = np.ones((8, 16, 3, 3))
    w[0, 0, 1, 1] = np.inf  # zeros around dy would meet it: 0 * inf
    assert not takes(16, w=w)


def test_functional_gradient_by_finite_differences(rng):
    x = rng.standard_normal((2, 16, 7, 8))
    w = rng.standard_normal((3, 16, 3, 3))
    g = rng.standard_normal((2, 3, 4, 4))
    assert F_._input_gradient_by_phases(w, (2, 2), (1, 1))
    dx = F_.conv2d_backward(x, w, g, 2, 1)[0]
    expected = naive_backward(x, w, g, (2, 2), ((1, 1), (1, 1)), (1, 1))[0]
    assert relative_error(dx, expected) <= F64_TOL
    with threads(1):
        assert_gradient(lambda v: F_.conv2d_forward(v, w, None, 2, 1), x, g, dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_strided_convolution_takes_it_per_group(dtype, rng, monkeypatch):
    """groups=2 of 16 channels each at stride 2: functional runs the dense kernels group by
    group, each group's input gradient phase by phase; against the naive grouped loops."""
    calls = []
    kernel = F_._conv2d_phases.conv2d_backward_input_phases
    monkeypatch.setattr(
        F_._conv2d_phases,
        "conv2d_backward_input_phases",
        lambda *args: calls.append(1) or kernel(*args),
    )
    x = rng.standard_normal((2, 32, 9, 10)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32).astype(np.float64)
    assert F_._input_gradient_by_phases(w[:4], (2, 2), (1, 1))
    geom = ((2, 2), ((1, 1), (1, 1)), (1, 1))
    dy = rng.standard_normal((2, 8, 5, 5)).astype(np.float32).astype(np.float64)
    expected = naive_backward(x, w, dy, *geom, groups=2)[0]
    dx = F_.conv2d_backward(x.astype(dtype), w.astype(dtype), dy.astype(dtype), 2, 1, groups=2)[0]
    assert dx.dtype == dtype and len(calls) == 2
    assert relative_error(dx, expected) <= (F32_TOL if dtype == np.float32 else F64_TOL)
