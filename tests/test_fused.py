"""kernels/fused.py: convolution + ReLU + max pooling in one pass, against the separate kernels
(bitwise: the same sums in the same order) and against the naive loops (the textbook)."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fastcnn import functional as F
from fastcnn.kernels import conv2d as kconv
from fastcnn.kernels import fused as kfused
from fastcnn.kernels import pool2d as kpool
from gradcheck import relative_error
from naive import activations as naive_act
from naive import conv2d as naive_conv
from naive import pool2d as naive_pool
from speedup import speedup


def _size(size, k, stride, before, after, dilation):
    return (size + before + after - dilation * (k - 1) - 1) // stride + 1


@st.composite
def cases(draw):
    """A convolution (strides, paddings, dilations, up to 40 filters: two column blocks)
    followed by a pooling whose windows tile its output (1x1 to 3x3, leftover rows/columns)."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pt, pb, pl, pr = (draw(st.integers(0, 1)) for _ in range(4))
    pkh, pkw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h_min = max(1, dh * (kh - 1) + 1 - pt - pb)
    w_min = max(1, dw * (kw - 1) + 1 - pl - pr)
    h, w = draw(st.integers(h_min, h_min + 9)), draw(st.integers(w_min, w_min + 9))
    oh, ow = _size(h, kh, sh, pt, pb, dh), _size(w, kw, sw, pl, pr, dw)
    pkh, pkw = min(pkh, oh), min(pkw, ow)
    n, c, f = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 40))
    relu = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(
        n=n,
        c=c,
        f=f,
        h=h,
        w=w,
        k=(kh, kw),
        stride=(sh, sw),
        pads=(pt, pb, pl, pr),
        dil=(dh, dw),
        pool=(pkh, pkw),
        relu=relu,
        seed=seed,
    )


REFERENCE_LAYER = dict(
    n=2,
    c=32,
    f=64,
    h=13,
    w=13,
    k=(3, 3),
    stride=(1, 1),
    pads=(0, 0, 0, 0),
    dil=(1, 1),
    pool=(2, 2),
    relu=True,
    seed=1,
)


def _run(case, dtype):
    rng = np.random.default_rng(case["seed"])
    (kh, kw), (sh, sw), (dh, dw), (pkh, pkw) = case["k"], case["stride"], case["dil"], case["pool"]
    pt, pb, pl, pr = case["pads"]
    n, c, f = case["n"], case["c"], case["f"]
    x = rng.standard_normal((n, case["h"], case["w"], c)).astype(dtype)
    weight = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    bias = rng.standard_normal(f).astype(dtype)
    oh = _size(case["h"], kh, sh, pt, pb, dh)
    ow = _size(case["w"], kw, sw, pl, pr, dw)
    y = np.empty((n, oh, ow, f), dtype)
    kconv.conv2d_forward(x, weight, bias, sh, sw, pt, pl, dh, dw, case["relu"], y, F._no_bn(x), 2)
    shape = (n, oh // pkh, ow // pkw, f)
    expected, expected_argmax = np.empty(shape, dtype), np.empty(shape, np.int64)
    kpool.maxpool2d_forward(y, pkh, pkw, pkh, pkw, 0, 0, expected, expected_argmax)
    out, argmax = np.full(shape, np.nan, dtype), np.full(shape, -7, np.int64)
    kfused.conv2d_relu_maxpool2d_forward(
        x, weight, bias, sh, sw, pt, pl, dh, dw, oh, ow, case["relu"], pkh, pkw, out, argmax
    )
    return x, weight, bias, out, argmax, expected, expected_argmax


@example(REFERENCE_LAYER)
@given(cases())
def test_fused_equals_conv_then_pool_bitwise(case):
    for dtype in (np.float32, np.float64):
        *_, out, argmax, expected, expected_argmax = _run(case, dtype)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(argmax, expected_argmax)


@example(dict(REFERENCE_LAYER, c=3, f=5))
@given(cases())
def test_fused_matches_naive(case):
    x, weight, bias, out, argmax, *_ = _run(case, np.float64)
    pt, pb, pl, pr = case["pads"]
    xc = x.transpose(0, 3, 1, 2)
    y = naive_conv.conv2d_forward(
        xc, weight, bias, case["stride"], ((pt, pb), (pl, pr)), case["dil"]
    )
    if case["relu"]:
        y = naive_act.relu_forward(y)
    expected, _ = naive_pool.maxpool2d_forward(y, case["pool"], case["pool"], ((0, 0), (0, 0)))
    assert relative_error(out.transpose(0, 3, 1, 2), expected) <= 1e-10


def test_functional_validates_and_matches_the_separate_calls(rng):
    x = rng.standard_normal((3, 4, 9, 8)).astype(np.float32)
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    y, argmax, conv_shape = F.conv2d_relu_max_pool2d_forward(x, weight, bias, 1, 1, 1, (2, 2))
    conv = F.relu_forward(F.conv2d_forward(x, weight, bias, 1, 1, 1))
    expected, expected_argmax = F.max_pool2d_forward(conv, 2)
    assert conv_shape == conv.shape
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(argmax, expected_argmax)
    with pytest.raises(ValueError, match="Conv2D: expected input of shape"):
        F.conv2d_relu_max_pool2d_forward(x[:, :3], weight, bias, 1, 0, 1, (2, 2))
    with pytest.raises(ValueError, match="MaxPool2D: kernel 10 is larger"):
        F.conv2d_relu_max_pool2d_forward(x, weight, bias, 1, 0, 1, (10, 2))


def test_speedup_over_naive(rng):
    """The reference network's conv2 + ReLU + pool at batch 1, one thread: >= 20x the naive
    loops (conv, ReLU and pool)."""
    case = dict(REFERENCE_LAYER, n=1)
    x, weight, bias, *_ = _run(case, np.float32)
    out, argmax = np.empty((1, 5, 5, 64), np.float32), np.empty((1, 5, 5, 64), np.int64)
    xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def naive():
        y = naive_act.relu_forward(naive_conv.conv2d_forward(xc, weight, bias))
        return naive_pool.maxpool2d_forward(y, (2, 2), (2, 2), ((0, 0), (0, 0)))

    ratio = speedup(
        lambda: kfused.conv2d_relu_maxpool2d_forward(
            x, weight, bias, 1, 1, 0, 0, 1, 1, 11, 11, True, 2, 2, out, argmax
        ),
        naive,
    )
    assert ratio >= 20, ratio


# ---- the backward through max pool (+ ReLU) into the convolution ----


@st.composite
def backward_cases(draw):
    """A conv + ReLU + pool whose backward takes the max pool shortcut (32 or 64 channels) or
    the dense weight gradient / the separate calls (3 channels, 1 as conv1); strides, symmetric
    paddings (as the functional API takes them), dilations, 1-40 filters, pools that tile the
    conv output."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    h_min = max(1, dh * (kh - 1) + 1 - 2 * ph)
    w_min = max(1, dw * (kw - 1) + 1 - 2 * pw)
    h, w = draw(st.integers(h_min, h_min + 7)), draw(st.integers(w_min, w_min + 7))
    oh, ow = _size(h, kh, sh, ph, ph, dh), _size(w, kw, sw, pw, pw, dw)
    pool = (min(draw(st.integers(1, 3)), oh), min(draw(st.integers(1, 3)), ow))
    return dict(
        n=draw(st.integers(1, 2)),
        c=draw(st.sampled_from([32, 64, 3, 1])),
        f=draw(st.integers(1, 40)),
        h=h,
        w=w,
        k=(kh, kw),
        stride=(sh, sw),
        pads=(ph, ph, pw, pw),
        dil=(dh, dw),
        pool=pool,
        relu=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _backward_both_ways(case, dtype, x_value=None, input_grad=True):
    rng = np.random.default_rng(case["seed"])
    (kh, kw), pool = case["k"], case["pool"]
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(dtype)
    if x_value is not None:
        x[0, 0, 0, 0] = x_value
    weight = rng.standard_normal((case["f"], case["c"], kh, kw)).astype(dtype)
    bias = rng.standard_normal(case["f"]).astype(dtype)
    geom = dict(
        stride=case["stride"], padding=(case["pads"][0], case["pads"][2]), dilation=case["dil"]
    )
    y, argmax, conv_shape = F.conv2d_relu_max_pool2d_forward(
        x, weight, bias, geom["stride"], geom["padding"], geom["dilation"], pool
    )
    dy = rng.standard_normal(y.shape).astype(dtype)
    fast = F.max_pool2d_conv2d_backward(
        x, weight, dy, argmax, y, conv_shape, pool, relu=case["relu"], input_grad=input_grad, **geom
    )
    dconv = F.max_pool2d_backward(
        dy, argmax, conv_shape, pool, relu_output=y if case["relu"] else None
    )
    slow = F.conv2d_backward(x, weight, dconv, **geom)
    return fast, slow


@example(dict(REFERENCE_LAYER, n=2))
@given(backward_cases())
def test_backward_through_maxpool_equals_the_separate_calls_bitwise(case):
    for dtype in (np.float32, np.float64):
        fast, slow = _backward_both_ways(case, dtype)
        for a, b in zip(fast, slow, strict=True):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


@example(dict(REFERENCE_LAYER, n=2, c=1, f=32, h=28, w=28))  # conv1
@given(backward_cases())
def test_weight_gradient_through_maxpool_equals_the_separate_calls_bitwise(case):
    """input_grad=False, a network's first layer: the weight gradient alone, by the sparse
    kernel (32, 64 channels) or the dense one with dy rebuilt in cache (1, 3 channels)."""
    for dtype in (np.float32, np.float64):
        fast, slow = _backward_both_ways(case, dtype, input_grad=False)
        assert fast[0] is None
        for a, b in zip(fast[1:], slow[1:], strict=True):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_backward_through_maxpool_with_non_finite_input(value):
    """A non-finite x: the dense path (0 * inf = NaN terms count), the same result."""
    for input_grad in (True, False):  # False: the dense weight gradient from the pooled one
        fast, slow = _backward_both_ways(
            dict(REFERENCE_LAYER, n=2, relu=True), np.float32, value, input_grad
        )
        for a, b in zip(fast[1:], slow[1:], strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.isnan(fast[1]).any()
        if input_grad:
            np.testing.assert_array_equal(fast[0], slow[0])


def test_backward_through_maxpool_validates(rng):
    x = rng.standard_normal((2, 32, 6, 6)).astype(np.float32)
    # 20 filters: the sparse input gradient (at most 16 take the transposed convolution)
    weight = rng.standard_normal((20, 32, 3, 3)).astype(np.float32)
    y, argmax, shape = F.conv2d_relu_max_pool2d_forward(x, weight, None, 1, 0, 1, (2, 2))
    dy = np.ones_like(y)
    with pytest.raises(ValueError, match=r"MaxPool2D: expected gradient of shape \(2, 20, 2, 2\)"):
        F.max_pool2d_conv2d_backward(x, weight, dy[:1], argmax, y, shape, 2)
    with pytest.raises(TypeError, match="MaxPool2D: expected int64 argmax"):
        F.max_pool2d_conv2d_backward(x, weight, dy, argmax.astype(np.int32), y, shape, 2)
    with pytest.raises(ValueError, match="Conv2D: expected the pooling's input shape"):
        F.max_pool2d_conv2d_backward(x, weight, dy, argmax, y, (2, 20, 5, 4), 2)
    # argmax outside its window: no gradient from that entry, nothing read or written elsewhere
    bad = np.array(argmax)
    bad[...] = 10**12
    dx, dw, db = F.max_pool2d_conv2d_backward(x, weight, dy, bad, y, shape, 2)
    assert not dx.any() and not dw.any() and not db.any()
    # the dense weight gradient (1 channel): the same, and for an argmax in the band of conv
    # rows but outside its window (the next window's cell)
    x1 = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    w1 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    y1, argmax1, shape1 = F.conv2d_relu_max_pool2d_forward(x1, w1, None, 1, 0, 1, (2, 2))
    y1[...] = 1
    for value in (10**12, -5, 2, 6):  # 2, 6: cells of the window to the right / below-right
        bad = np.full_like(argmax1, value)
        _, dw, db = F.max_pool2d_conv2d_backward(
            x1, w1, np.ones_like(y1), bad, y1, shape1, 2, input_grad=False
        )
        if value not in (2, 6):  # out of the plane (max_pool2d_backward rejects these)
            assert not dw.any() and not db.any()
            continue
        dconv = F.max_pool2d_backward(np.ones_like(y1), bad, shape1, 2, relu_output=y1)
        _, dw_ref, db_ref = F.conv2d_backward(x1, w1, dconv, input_grad=False)
        np.testing.assert_array_equal(dw, dw_ref)
        np.testing.assert_array_equal(db, db_ref)


@given(
    st.integers(1, 2),
    st.sampled_from([32, 64, 1, 3]),
    st.integers(1, 6),
    st.integers(4, 8),
    st.integers(4, 8),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_backward_kernels_from_the_pooled_gradient_match_naive(n, c, f, h, w, relu, seed):
    """kernels.fused.maxpool2d_conv2d_backward_weight (32, 64 channels), _weight_dense (any)
    and _input (32, 64) called directly (NHWC, a 3x3 convolution, 2x2 pool) against the
    textbook: the pool's backward, the ReLU's, then the convolution's, all naive loops, in
    float64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((f, c, 3, 3))
    bias = rng.standard_normal(f)
    conv = naive_conv.conv2d_forward(x, weight, bias)
    act = naive_act.relu_forward(conv) if relu else conv
    pooled, _ = naive_pool.maxpool2d_forward(act, (2, 2), (2, 2), ((0, 0), (0, 0)))
    gp = rng.standard_normal(pooled.shape)
    dact = naive_pool.maxpool2d_backward(act, gp, (2, 2), (2, 2), ((0, 0), (0, 0)))
    dconv = naive_act.relu_backward(conv, dact) if relu else dact
    dx_ref, dw_ref, db_ref = naive_conv.conv2d_backward(x, weight, dconv)

    oh, ow = h - 2, w - 2
    xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = np.empty((n, oh // 2, ow // 2, f))
    argmax = np.empty(y.shape, np.int64)
    kfused.conv2d_relu_maxpool2d_forward(
        xh, weight, bias, 1, 1, 0, 0, 1, 1, oh, ow, relu, 2, 2, y, argmax
    )
    gph = np.ascontiguousarray(gp.transpose(0, 2, 3, 1))
    dw, db = np.full_like(weight, np.nan), np.full_like(bias, np.nan)
    kfused.maxpool2d_conv2d_backward_weight_dense(
        xh, gph, argmax, y, relu, 2, 2, oh, ow, 1, 1, 0, 0, 1, 1, dw, db
    )
    assert relative_error(dw, dw_ref) <= 1e-10
    assert relative_error(db, db_ref) <= 1e-10
    if c % 32:
        return
    dw, db = np.full_like(weight, np.nan), np.full_like(bias, np.nan)
    kfused.maxpool2d_conv2d_backward_weight(
        xh, gph, argmax, y, relu, 2, 2, oh, ow, 1, 1, 0, 0, 1, 1, dw, db
    )
    dx = np.full_like(xh, np.nan)
    kfused.maxpool2d_conv2d_backward_input(
        gph, argmax, y, relu, 2, 2, weight, 1, 1, 0, 0, 1, 1, oh, ow, dx
    )
    assert relative_error(dw, dw_ref) <= 1e-10
    assert relative_error(db, db_ref) <= 1e-10
    assert relative_error(dx.transpose(0, 3, 1, 2), dx_ref) <= 1e-10
