"""conv2d kernels vs the textbook loops (tests/naive/conv2d.py), finite differences, determinism
of the weight gradient across thread counts, and the speedup over the naive loops."""

from collections import namedtuple

import numba
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastcnn.functional import _no_bn
from fastcnn.kernels.conv2d import (
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
)
from fastcnn.threads import threads
from gradcheck import assert_gradient, relative_error
from naive.conv2d import conv2d_backward as naive_backward
from naive.conv2d import conv2d_forward as naive_forward
from speedup import speedup

F64_TOL = 1e-10
F32_TOL = 1e-4


# ---- helpers: output sizes, allocation, and calls in the naive references' argument style ----


def output_size(size, pad_before, pad_after, kernel, stride, dilation):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_shape(x_shape, w_shape, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
    (N, _, H, W), (F, _, KH, KW) = x_shape, w_shape
    OH = output_size(H, *padding[0], KH, stride[0], dilation[0])
    OW = output_size(W, *padding[1], KW, stride[1], dilation[1])
    return N, F, OH, OW


def _flat(stride, padding, dilation):
    """Kernel integer arguments: stride_h, stride_w, pad_top, pad_left, dil_h, dil_w."""
    return stride[0], stride[1], padding[0][0], padding[1][0], dilation[0], dilation[1]


def nhwc(a):
    """The kernels' layout: (N, C, H, W) -> C-contiguous (N, H, W, C)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def nchw(a):
    return a.transpose(0, 3, 1, 2)


def forward(x, w, b, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), relu=False):
    """The forward kernel called on NCHW arrays (converted to and from its NHWC layout)."""
    N, F, OH, OW = output_shape(x.shape, w.shape, stride, padding, dilation)
    # NaN-filled outputs: a kernel that skips an element fails the comparison.
    out = np.full((N, OH, OW, F), np.nan, dtype=x.dtype)
    conv2d_forward(nhwc(x), w, b, *_flat(stride, padding, dilation), relu, out, _no_bn(x), 2)
    return nchw(out)


def backward(x, w, dy, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
    N, C, H, W = x.shape
    dx = np.full((N, H, W, C), np.nan, dtype=x.dtype)
    dw = np.full(w.shape, np.nan, dtype=x.dtype)
    db = np.full(w.shape[0], np.nan, dtype=x.dtype)
    conv2d_backward_input(nhwc(dy), w, *_flat(stride, padding, dilation), dx, 2)
    conv2d_backward_weight(nhwc(x), nhwc(dy), *_flat(stride, padding, dilation), dw, db, 2)
    return nchw(dx), dw, db


# ---- random cases ----

Case = namedtuple("Case", "N C F H W KH KW stride padding dilation seed")

NAIVE_BUDGET = 50_000  # N*F*C*OH*OW*KH*KW: keeps one naive forward + backward well under 0.1 s


def naive_cost(N, C, F, H, W, KH, KW, stride, padding, dilation):
    _, _, OH, OW = output_shape((N, C, H, W), (F, C, KH, KW), stride, padding, dilation)
    return N * F * C * OH * OW * KH * KW


@st.composite
def conv_cases(draw):
    """Random shapes with at least one output pixel; the smallest H, W drawn make the (dilated)
    kernel exactly as large as the padded input. F up to 40 reaches two 32-filter column blocks
    (the second partial); taps and pixels leave partial 3-row tiles."""
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (
        (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
        (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
    )
    h_min = max(1, dilation[0] * (KH - 1) + 1 - sum(padding[0]))
    w_min = max(1, dilation[1] * (KW - 1) + 1 - sum(padding[1]))
    H, W = draw(st.integers(h_min, h_min + 6)), draw(st.integers(w_min, w_min + 6))
    N, C, F = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 40))
    while naive_cost(N, C, F, H, W, KH, KW, stride, padding, dilation) > NAIVE_BUDGET:
        if N > 1:
            N -= 1
        elif C >= F and C > 1:
            C -= 1
        else:
            F -= 1
    seed = draw(st.integers(0, 2**32 - 1))
    return Case(N, C, F, H, W, KH, KW, stride, padding, dilation, seed)


EDGE_CASES = [
    Case(1, 1, 1, 1, 1, 1, 1, (1, 1), ((0, 0), (0, 0)), (1, 1), 0),  # smallest possible
    Case(1, 1, 3, 3, 2, 4, 5, (1, 1), ((1, 0), (2, 1)), (1, 1), 1),  # kernel = padded input
    Case(2, 2, 2, 4, 3, 3, 2, (2, 3), ((1, 0), (0, 1)), (2, 3), 2),  # dilated kernel = padded input
    Case(
        2, 9, 9, 7, 5, 2, 3, (3, 2), ((0, 2), (1, 0)), (1, 1), 3
    ),  # 4x4 blocks + remainders, strides
    Case(1, 8, 8, 6, 9, 3, 3, (1, 1), ((1, 1), (1, 1)), (1, 1), 4),  # full blocks, 'same' padding
    Case(2, 3, 5, 2, 2, 1, 1, (2, 2), ((3, 3), (3, 2)), (1, 1), 5),  # windows entirely in padding
    Case(
        1, 4, 4, 5, 9, 2, 2, (1, 1), ((0, 1), (1, 0)), (1, 1), 6
    ),  # PyTorch 'same' for an even kernel
    Case(
        2, 32, 33, 3, 4, 1, 2, (1, 1), ((0, 0), (0, 0)), (1, 1), 7
    ),  # 32-channel column blocks, 2 filter blocks
    Case(1, 40, 64, 3, 3, 2, 1, (1, 2), ((1, 0), (0, 1)), (1, 1), 8),  # blocks across taps, padded
    Case(
        17, 2, 3, 3, 3, 3, 3, (1, 1), ((0, 0), (0, 0)), (1, 1), 9
    ),  # several weight-gradient chunks
]


def random_inputs(case):
    """float64 arrays holding float32-representable values, so that one float64 naive result
    serves as the reference for both dtypes."""
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.N, case.C, case.H, case.W)).astype(np.float32)
    w = rng.standard_normal((case.F, case.C, case.KH, case.KW)).astype(np.float32)
    b = rng.standard_normal(case.F).astype(np.float32)
    y_shape = output_shape(x.shape, w.shape, case.stride, case.padding, case.dilation)
    dy = rng.standard_normal(y_shape).astype(np.float32)
    return tuple(a.astype(np.float64) for a in (x, w, b, dy))


def with_examples(test):
    for case in EDGE_CASES:
        test = example(case)(test)
    return test


# ---- kernel vs naive ----


@with_examples
@given(conv_cases())
def test_forward_matches_naive(case):
    x, w, b, _ = random_inputs(case)
    geom = (case.stride, case.padding, case.dilation)
    expected = naive_forward(x, w, b, *geom)
    assert relative_error(forward(x, w, b, *geom), expected) <= F64_TOL
    f32 = [a.astype(np.float32) for a in (x, w, b)]
    actual = forward(*f32, *geom)
    assert actual.dtype == np.float32
    assert relative_error(actual, expected) <= F32_TOL
    # the fused ReLU: exactly max(., 0) of the same sums
    np.testing.assert_array_equal(forward(*f32, *geom, relu=True), np.maximum(actual, 0))


@pytest.mark.parametrize(
    "C, K, F, stride",
    [(32, 3, 33, 1), (32, 3, 48, 2), (32, 3, 64, 2), (3, 3, 32, 1), (16, 1, 40, 2)],
)
def test_forward_of_more_than_16_filters_matches_naive(C, K, F, stride):
    """More than 16 filters, long sums (288 taps) and short ones (27, 16): a last block of at
    most 16 filters on the narrow tile (F = 33, 40, 48), pixels past the work item's end through
    the scratch; on hosts with AVX-512 the tall tile (gemm_tile.TALL) and its partial pixel
    tiles (14 and 8 pixels per image: never a multiple of its 6 rows)."""
    rng = np.random.default_rng(F + C)
    x = rng.standard_normal((2, C, 7, 2 * stride))
    w = rng.standard_normal((F, C, K, K))
    b = rng.standard_normal(F)
    geom = ((stride, stride), ((K // 2, K // 2), (K // 2, K // 2)), (1, 1))
    expected = naive_forward(x, w, b, *geom)
    assert relative_error(forward(x, w, b, *geom), expected) <= F64_TOL
    f32 = [a.astype(np.float32) for a in (x, w, b)]
    actual = forward(*f32, *geom)
    assert relative_error(actual, expected) <= F32_TOL
    np.testing.assert_array_equal(forward(*f32, *geom, relu=True), np.maximum(actual, 0))


@pytest.mark.parametrize(
    "C, K, F, stride",
    [(32, 3, 33, 1), (32, 3, 48, 2), (16, 3, 32, 2), (3, 3, 32, 1), (16, 1, 40, 2), (32, 1, 64, 2)],
)
def test_weight_gradient_of_more_than_16_filters_matches_naive(C, K, F, stride):
    """The weight gradient's tiles for more than 16 filters: tap tiles in groups over every
    pixel (288 and 16 terms a pixel, 33 to 64 filters) and over pixel chunks (at most 32
    filters, at most 160 terms: 144, 27); on AVX-512 hosts the tall tile, its tap tiles padded
    (27, 16 and 32 terms: 30, 18 and 36 rows)."""
    rng = np.random.default_rng(F + C + K)
    x = rng.standard_normal((3, C, 17, 8 * stride))
    w = rng.standard_normal((F, C, K, K))
    geom = ((stride, stride), ((K // 2, K // 2), (K // 2, K // 2)), (1, 1))
    dy = rng.standard_normal(output_shape(x.shape, w.shape, *geom))
    expected = naive_backward(x, w, dy, *geom)
    for dtype, tol in ((np.float64, F64_TOL), (np.float32, F32_TOL)):
        got = backward(x.astype(dtype), w.astype(dtype), dy.astype(dtype), *geom)
        for actual, exp in zip(got[1:], expected[1:], strict=True):
            assert actual.dtype == dtype
            assert relative_error(actual, exp) <= tol


@with_examples
@given(conv_cases())
def test_backward_input_and_weight_match_naive(case):
    x, w, _, dy = random_inputs(case)
    geom = (case.stride, case.padding, case.dilation)
    expected = naive_backward(x, w, dy, *geom)
    for actual, exp in zip(backward(x, w, dy, *geom), expected, strict=True):
        assert relative_error(actual, exp) <= F64_TOL
    f32 = [a.astype(np.float32) for a in (x, w, dy)]
    for actual, exp in zip(backward(*f32, *geom), expected, strict=True):
        assert actual.dtype == np.float32
        assert relative_error(actual, exp) <= F32_TOL


# ---- the input gradient as the transposed convolution (fastcnn.functional) ----


@st.composite
def transposed_cases(draw):
    """Stride-1 convolutions of 16-20 channels and at most 16 filters with padding within the
    kernel's reach ('same' included): conv2d_backward takes their input gradient as the forward
    convolution of dy with the flipped weights."""
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.booleans()):
        padding = "same"
    else:
        padding = (
            draw(st.integers(0, dilation[0] * (KH - 1))),
            draw(st.integers(0, dilation[1] * (KW - 1))),
        )
    h_min, w_min = dilation[0] * (KH - 1) + 1, dilation[1] * (KW - 1) + 1
    H, W = draw(st.integers(h_min, h_min + 4)), draw(st.integers(w_min, w_min + 4))
    N, C, F = draw(st.integers(1, 2)), draw(st.integers(16, 20)), draw(st.integers(1, 16))
    return N, C, F, H, W, KH, KW, padding, dilation, draw(st.integers(0, 2**32 - 1))


@given(transposed_cases())
def test_input_gradient_as_transposed_convolution_matches_naive(case):
    from fastcnn import functional as F_

    N, C, F, H, W, KH, KW, padding, dilation, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32).astype(np.float64)
    w = rng.standard_normal((F, C, KH, KW)).astype(np.float32).astype(np.float64)
    pads = F_.conv2d_padding(padding, (KH, KW), (1, 1), dilation)
    assert F_._input_gradient_as_convolution(w, (1, 1), pads, dilation)
    geom = ((1, 1), ((pads[0], pads[1]), (pads[2], pads[3])), dilation)
    dy = rng.standard_normal(output_shape(x.shape, w.shape, *geom)).astype(np.float32)
    expected = naive_backward(x, w, dy.astype(np.float64), *geom)[0]
    for dtype, tol in ((np.float64, F64_TOL), (np.float32, F32_TOL)):
        dx = F_.conv2d_backward(
            x.astype(dtype), w.astype(dtype), dy.astype(dtype), 1, padding, dilation
        )[0]
        assert dx.dtype == dtype and dx.shape == x.shape
        assert relative_error(dx, expected) <= tol


@pytest.mark.parametrize("C, F", [(24, 48), (8, 40), (48, 8), (3, 96)])
def test_input_gradient_of_a_1x1_convolution_as_the_forward_matches_naive(C, F, rng):
    """An unpadded 1x1 stride-1 convolution's input gradient is the forward convolution of dy
    whatever its channels and filters (MobileNet's pointwise layers); padded, col2im's."""
    from fastcnn import functional as F_

    x = rng.standard_normal((3, C, 7, 5))
    w = rng.standard_normal((F, C, 1, 1))
    assert F_._input_gradient_as_convolution(w, (1, 1), (0, 0, 0, 0), (1, 1))
    assert not F_._input_gradient_as_convolution(w, (1, 1), (1, 1, 1, 1), (1, 1))
    geom = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    dy = rng.standard_normal(output_shape(x.shape, w.shape, *geom))
    expected = naive_backward(x, w, dy, *geom)[0]
    for dtype, tol in ((np.float64, F64_TOL), (np.float32, F32_TOL)):
        dx = F_.conv2d_backward(x.astype(dtype), w.astype(dtype), dy.astype(dtype), 1, 0)[0]
        assert dx.dtype == dtype and dx.shape == x.shape
        assert relative_error(dx, expected) <= tol


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_input_gradient_with_non_finite_weights_takes_col2im(bad, rng):
    """The transposed convolution would multiply the zeros around dy by the non-finite weight
    (0 * inf = NaN in cells no window with it covers): col2im, which has no such terms."""
    from fastcnn import functional as F_

    x = rng.standard_normal((1, 16, 6, 6))
    w = rng.standard_normal((4, 16, 3, 3))
    w[1, 2, 0, 0] = bad
    assert not F_._input_gradient_as_convolution(w, (1, 1), (1, 1, 1, 1), (1, 1))
    dy = rng.standard_normal((1, 4, 6, 6))
    dx = F_.conv2d_backward(x, w, dy, 1, 1)[0]
    expected = naive_backward(x, w, dy, (1, 1), ((1, 1), (1, 1)), (1, 1))[0]
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(expected))
    fin = np.isfinite(expected)
    assert relative_error(dx[fin], expected[fin]) <= F64_TOL


def test_input_gradient_as_transposed_convolution_by_finite_differences(rng):
    from fastcnn import functional as F_

    x = rng.standard_normal((2, 16, 5, 6))
    w = rng.standard_normal((5, 16, 3, 2))
    g = rng.standard_normal((2, 5, 5, 5))
    assert F_._input_gradient_as_convolution(w, (1, 1), (1, 1, 0, 0), (1, 1))
    dx = F_.conv2d_backward(x, w, g, 1, (1, 0))[0]
    with threads(1):
        assert_gradient(lambda v: F_.conv2d_forward(v, w, None, 1, (1, 0)), x, g, dx)


# ---- finite differences (float64) ----

FD_CASES = [
    dict(x=(2, 3, 5, 6), w=(2, 3, 3, 3), stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)),
    dict(x=(2, 5, 7, 6), w=(5, 5, 3, 2), stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(2, 1)),
    dict(x=(1, 4, 6, 5), w=(4, 4, 2, 3), stride=(1, 2), padding=((2, 0), (1, 1)), dilation=(1, 2)),
]


@pytest.mark.parametrize("cfg", FD_CASES, ids=["plain", "stride-pad-dil-blocks", "full-blocks"])
def test_gradients_by_finite_differences(cfg, rng):
    x = rng.standard_normal(cfg["x"])
    w = rng.standard_normal(cfg["w"])
    b = rng.standard_normal(cfg["w"][0])
    geom = (cfg["stride"], cfg["padding"], cfg["dilation"])
    g = rng.standard_normal(output_shape(x.shape, w.shape, *geom))
    dx, dw, db = backward(x, w, g, *geom)
    # Hundreds of tiny calls: on one thread, so that a busy machine (another process on the
    # second core, each parallel region waiting for a descheduled thread) cannot slow them 100x.
    with threads(1):
        assert_gradient(lambda v: forward(v, w, b, *geom), x, g, dx)
        assert_gradient(lambda v: forward(x, v, b, *geom), w, g, dw)
        assert_gradient(lambda v: forward(x, w, v, *geom), b, g, db)


# ---- determinism of the weight gradient ----

DETERMINISM_CASES = [
    dict(
        x=(16, 32, 13, 13),
        w=(64, 32, 3, 3),
        stride=(1, 1),
        padding=((0, 0), (0, 0)),
        dilation=(1, 1),
    ),
    dict(x=(5, 6, 9, 8), w=(7, 6, 3, 2), stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2)),
]


@pytest.mark.parametrize("cfg", DETERMINISM_CASES, ids=["conv2-layer", "partial-blocks"])
def test_weight_gradient_is_bitwise_deterministic_across_calls_and_threads(cfg, rng):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 Numba threads")
    x = rng.standard_normal(cfg["x"]).astype(np.float32)
    w_shape = cfg["w"]
    geom = _flat(cfg["stride"], cfg["padding"], cfg["dilation"])
    dy_shape = output_shape(x.shape, w_shape, cfg["stride"], cfg["padding"], cfg["dilation"])
    dy = rng.standard_normal(dy_shape).astype(np.float32)
    x, dy = nhwc(x), nhwc(dy)

    def grads(groups=2):
        dw = np.full(w_shape, np.nan, np.float32)
        db = np.full(w_shape[0], np.nan, np.float32)
        conv2d_backward_weight(x, dy, *geom, dw, db, groups)
        return dw.tobytes() + db.tobytes()

    saved = numba.get_num_threads()
    with threads(2):
        reference = grads()
        for _ in range(20):
            assert grads() == reference
        for groups in (1, 3, 8, 100):  # how the tap tiles are grouped: never a sum's order
            assert grads(groups) == reference
    with threads(1):
        assert grads() == reference
        assert grads(1) == reference
    assert numba.get_num_threads() == saved


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C, K, stride", [(16, 3, 2), (24, 1, 1), (5, 1, 2)])
def test_weight_gradient_summed_in_blocks_is_bitwise_the_whole_chunk(C, K, stride, dtype, rng):
    """Pixel chunks summed in 64-pixel blocks (the wide tile, stride > 1 or 1x1:
    _chunk_in_blocks) against the same chunks each summed whole (16 filters, the narrow
    tile, not in blocks; the chunks are the wide tile's for both): 17 filters, the 17th's dy
    zero, give the 16 filters' gradients bit for bit. 189-198 pixels: two chunks, each a
    64-pixel block and a partial one. (Where the host has the tall tile, the 17 filters run on
    it, whole chunks: the two tiles' sums are compared.)"""
    x = rng.standard_normal((3, C, 18, 14) if stride == 2 else (2, C, 11, 9))
    padding = ((K // 2, K // 2), (K // 2, K // 2))
    dy_shape = output_shape(x.shape, (16, C, K, K), (stride, stride), padding, (1, 1))
    dy = rng.standard_normal(dy_shape)
    npix = dy_shape[0] * dy_shape[2] * dy_shape[3]
    assert npix % 64 and npix // 64 >= 2
    x, dy = nhwc(x.astype(dtype)), nhwc(dy.astype(dtype))
    dy17 = np.concatenate([dy, np.zeros(dy.shape[:3] + (1,), dtype)], axis=3)
    geom = _flat((stride, stride), padding, (1, 1))
    got = []
    for g in (dy, dy17):
        f = g.shape[3]
        dw, db = np.full((f, C, K, K), np.nan, dtype), np.full(f, np.nan, dtype)
        conv2d_backward_weight(x, g, *geom, dw, db, numba.get_num_threads())
        got.append((dw[:16], db[:16]))
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("C, K, F", [(24, 3, 48), (24, 3, 40), (24, 3, 80), (8, 1, 48)])
def test_weight_gradient_of_a_narrow_last_filter_block_for_any_grouping(C, K, F, rng):
    """A last block of at most 16 filters (48 = 32 + 16, 40, 80) runs on the narrow tile, RN
    taps a tile where the other blocks take 3 (or 6): its tap tiles are split among the same
    groups (216 terms a pixel), or it sums pixel chunks (8 terms: 1x1 over 8 channels). Every
    grouping and thread count gives bitwise one gradient, the textbook's."""
    x = rng.standard_normal((4, C, 9, 9))
    w_shape = (F, C, K, K)
    geom = ((1, 1), ((K // 2, K // 2), (K // 2, K // 2)), (1, 1))
    dy = rng.standard_normal(output_shape(x.shape, w_shape, *geom))
    expected = naive_backward(x, np.zeros(w_shape), dy, *geom)
    flat = _flat(*geom)
    for dtype, tol in ((np.float64, F64_TOL), (np.float32, F32_TOL)):
        xn, dyn = nhwc(x.astype(dtype)), nhwc(dy.astype(dtype))
        results = set()
        for workers in (1, 2, 3, 8, 100):  # the kernel's ``threads``: the groups of tap tiles
            dw = np.full(w_shape, np.nan, dtype)
            db = np.full(F, np.nan, dtype)
            conv2d_backward_weight(xn, dyn, *flat, dw, db, workers)
            assert relative_error(dw, expected[1]) <= tol
            assert relative_error(db, expected[2]) <= tol
            results.add(dw.tobytes() + db.tobytes())
        assert len(results) == 1


# (N, C, F, H, W, KH, KW, stride, (pad top, left, bottom, right), dilation)
STRIDED_PADDED_CASES = [
    (3, 16, 32, 32, 32, 3, 3, (2, 2), (1, 1, 0, 0), (1, 1)),  # the all-conv net's conv2
    (2, 5, 7, 9, 11, 3, 2, (2, 3), (2, 1, 1, 2), (1, 2)),  # partial tiles, both paddings
    (1, 3, 40, 7, 6, 5, 5, (3, 2), (3, 3, 3, 3), (1, 1)),  # windows in the padding only
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", STRIDED_PADDED_CASES)
def test_strided_forward_pads_rows_per_worker_bitwise(case, dtype):
    """A strided convolution's workers each pad the input rows their windows read: bitwise the
    kernel on an input padded by hand (whose windows need no padding), for any number of
    workers (the buffers they fill), with the BatchNorm epilogue too."""
    N, C, F, H, W, KH, KW, stride, (pt, pl, pb, pr), dil = case
    rng = np.random.default_rng(H * W + C)
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    w = rng.standard_normal((F, C, KH, KW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    padded = np.zeros((N, H + pt + pb, W + pl + pr, C), dtype)
    padded[:, pt : pt + H, pl : pl + W] = x
    OH = output_size(H, pt, pb, KH, stride[0], dil[0])
    OW = output_size(W, pl, pr, KW, stride[1], dil[1])
    bn = tuple(rng.standard_normal(F).astype(dtype) for _ in range(3)) + (np.empty(0, dtype),)
    for epilogue in (_no_bn(x), bn):
        by_hand = np.full((N, OH, OW, F), np.nan, dtype)
        conv2d_forward(padded, w, b, *stride, 0, 0, *dil, True, by_hand, epilogue, 1)
        assert not np.isnan(by_hand).any()
        for workers in (1, 2, 3, 64):
            out = np.full_like(by_hand, np.nan)
            conv2d_forward(x, w, b, *stride, pt, pl, *dil, True, out, epilogue, workers)
            assert out.tobytes() == by_hand.tobytes(), workers


@pytest.mark.parametrize("case", STRIDED_PADDED_CASES)
def test_input_gradient_is_bitwise_the_same_for_any_number_of_workers(case):
    """The input gradient's workers each add their images' tiles into a padded scratch image of
    their own: the result does not depend on how many there are (nor on reusing the scratch:
    a worker whose scratch kept the previous image's sums fails with 2 or fewer workers)."""
    N, C, F, H, W, KH, KW, stride, (pt, pl, pb, pr), dil = case
    rng = np.random.default_rng(N + C + F)
    w = rng.standard_normal((F, C, KH, KW)).astype(np.float32)
    OH = output_size(H, pt, pb, KH, stride[0], dil[0])
    OW = output_size(W, pl, pr, KW, stride[1], dil[1])
    dy = rng.standard_normal((N, OH, OW, F)).astype(np.float32)
    results = []
    for workers in (1, 2, 3, 64):
        dx = np.full((N, H, W, C), np.nan, np.float32)
        conv2d_backward_input(dy, w, *stride, pt, pl, *dil, dx, workers)
        results.append(dx.tobytes())
    assert not np.isnan(dx).any()
    assert results[1:] == results[:1] * 3


# ---- speedup over the naive loops ----


def test_speedup_over_naive(rng):
    """The reference network's second conv layer (32 -> 64 channels, 13x13, 3x3) at batch 1
    (the naive loops take tenths of a second there), on one Numba thread:
    the per-core speedup. With 2 threads on a machine where another process keeps a core busy,
    every parallel region waits for a descheduled thread (measured: ~16 ms per call instead of
    ~0.1 ms), which says nothing about the kernels and would make the ratio flaky."""
    x = rng.standard_normal((1, 32, 13, 13)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    dy = rng.standard_normal(output_shape(x.shape, w.shape)).astype(np.float32)
    with threads(1):
        assert speedup(lambda: forward(x, w, b), lambda: naive_forward(x, w, b)) >= 20
        assert speedup(lambda: backward(x, w, dy), lambda: naive_backward(x, w, dy)) >= 20
