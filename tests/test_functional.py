"""fastcnn.functional: argument resolution, validation before any kernel, and the bridge itself
(results against the naive references in tests/naive/ for the padding/stride/dilation forms the
wrappers resolve)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import functional as F
from gradcheck import relative_error
from naive import activations as naive_act
from naive import batchnorm as naive_bn
from naive import conv2d as naive_conv
from naive import dense as naive_dense
from naive import pool2d as naive_pool

# ---------------------------------------------------------------------------------------------
# argument resolution
# ---------------------------------------------------------------------------------------------


def test_pair_forms():
    assert F.pair(3, "kernel_size", "L") == (3, 3)
    assert F.pair((2, 5), "kernel_size", "L") == (2, 5)
    assert F.pair([1, 4], "stride", "L") == (1, 4)
    assert F.pair(np.int64(2), "stride", "L") == (2, 2)
    assert F.pair(0, "padding", "L", minimum=0) == (0, 0)
    assert all(type(v) is int for v in F.pair(np.int32(2), "stride", "L"))


@pytest.mark.parametrize(
    "value, error",
    [
        (0, ValueError),
        (-1, ValueError),
        ((1, 0), ValueError),
        ((1, 2, 3), ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("2", TypeError),
        ((1, 2.0), TypeError),
        (None, TypeError),
    ],
)
def test_pair_rejects(value, error):
    with pytest.raises(error, match="^Lyr: .*stride"):
        F.pair(value, "stride", "Lyr")


def test_conv2d_padding_forms():
    one = (1, 1)
    assert F.conv2d_padding("valid", (3, 3), one, one) == (0, 0, 0, 0)
    assert F.conv2d_padding(2, (3, 3), one, one) == (2, 2, 2, 2)
    assert F.conv2d_padding((1, 0), (3, 3), one, one) == (1, 1, 0, 0)
    assert F.conv2d_padding("same", (3, 3), one, one) == (1, 1, 1, 1)
    # even kernels: PyTorch puts the extra row/column at the bottom/right
    assert F.conv2d_padding("same", (4, 2), one, one) == (1, 2, 0, 1)
    # dilation: total padding dil * (k - 1)
    assert F.conv2d_padding("same", (2, 5), one, (3, 1)) == (1, 2, 2, 2)
    assert F.conv2d_padding("same", (1, 1), one, one) == (0, 0, 0, 0)
    # at stride 1 the input's size changes nothing
    assert F.conv2d_padding("same", (4, 2), one, one, input_size=(9, 2)) == (1, 2, 0, 1)


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (2, 2, 1), (5, 3, 1), (3, 2, 2)])
def test_conv2d_padding_same_at_any_stride_as_keras(size, kernel, stride, dilation):
    """'same' at stride s gives ceil(size / s) outputs, with the least padding that does, its
    odd row at the bottom (TensorFlow's rule, written out here on its own)."""
    top, bottom, left, right = F.conv2d_padding(
        "same", (kernel, 1), (stride, 1), (dilation, 1), input_size=(size, 4)
    )
    reach = dilation * (kernel - 1) + 1
    out = (size + top + bottom - reach) // stride + 1
    assert out == -(-size // stride)
    assert bottom - top in (0, 1) and (left, right) == (0, 0)
    assert top + bottom == max(0, (out - 1) * stride + reach - size)


def test_conv2d_padding_same_at_stride_2_needs_the_size():
    with pytest.raises(ValueError, match="^Conv2D: padding='same' at stride .*input_size"):
        F.conv2d_padding("same", (3, 3), (2, 2), (1, 1), layer="Conv2D")


@pytest.mark.parametrize(
    "padding, stride, error, match",
    [
        ("full", (1, 1), ValueError, "'same' or 'valid'"),
        ("SAME", (1, 1), ValueError, "'same' or 'valid'"),
        (-1, (1, 1), ValueError, "padding >= 0"),
        ((0, -2), (1, 1), ValueError, "padding >= 0"),
        (0.5, (1, 1), TypeError, "padding"),
    ],
)
def test_conv2d_padding_rejects(padding, stride, error, match):
    with pytest.raises(error, match=f"^Conv2D: .*{match}"):
        F.conv2d_padding(padding, (3, 3), stride, (1, 1), layer="Conv2D")


def test_pool2d_padding():
    assert F.pool2d_padding(1, (3, 3)) == (1, 1, 1, 1)
    assert F.pool2d_padding((1, 0), (2, 3)) == (1, 1, 0, 0)
    with pytest.raises(ValueError, match="^MaxPool2D: .*half of the kernel"):
        F.pool2d_padding(2, (3, 3))
    with pytest.raises(ValueError, match="^AvgPool2D: .*padding"):
        F.pool2d_padding("same", (3, 3), layer="AvgPool2D")


def test_output_shapes():
    shape, stride, pads, dil = F.conv2d_output_shape((2, 3, 28, 20), (8, 3, 3, 5), 2, 1, 1)
    assert shape == (2, 8, 14, 9) and stride == (2, 2) and pads == (1, 1, 1, 1)
    assert F.conv2d_output_shape((1, 1, 7, 6), (4, 1, 4, 4), 1, "same", 1)[0] == (1, 4, 7, 6)
    assert F.conv2d_output_shape((1, 1, 7, 7), (4, 1, 3, 3), 1, 0, 3)[0] == (1, 4, 1, 1)
    assert F.pool2d_output_shape((2, 3, 11, 11), 2)[0] == (2, 3, 5, 5)
    assert F.pool2d_output_shape((2, 3, 11, 11), 3, 2, 1)[0] == (2, 3, 6, 6)


# ---------------------------------------------------------------------------------------------
# the bridge against the naive references
# ---------------------------------------------------------------------------------------------


def _naive_pads(pads):
    return ((pads[0], pads[1]), (pads[2], pads[3]))


@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    f=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    stride=st.sampled_from([1, 2, (1, 2), (3, 1)]),
    padding=st.sampled_from([0, 1, (2, 0), "valid", "same"]),
    dilation=st.sampled_from([1, 2, (1, 2)]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_conv2d_matches_naive(n, c, f, h, w, kh, kw, stride, padding, dilation, bias, seed):
    rng = np.random.default_rng(seed)
    if padding == "same":
        stride = 1
    try:
        shape, st_, pads, dil = F.conv2d_output_shape(
            (n, c, h, w), (f, c, kh, kw), stride, padding, dilation
        )
    except ValueError as e:
        assert "larger than the padded input" in str(e)
        return
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((f, c, kh, kw))
    b = rng.standard_normal(f) if bias else None
    y = F.conv2d_forward(x, weight, b, stride, padding, dilation)
    assert y.shape == shape
    expected = naive_conv.conv2d_forward(
        x, weight, b if bias else np.zeros(f), st_, _naive_pads(pads), dil
    )
    assert relative_error(y, expected) <= 1e-10
    dy = rng.standard_normal(shape)
    dx, dw, db = F.conv2d_backward(x, weight, dy, stride, padding, dilation, bias=bias)
    ndx, ndw, ndb = naive_conv.conv2d_backward(x, weight, dy, st_, _naive_pads(pads), dil)
    assert relative_error(dx, ndx) <= 1e-10
    assert relative_error(dw, ndw) <= 1e-10
    if bias:
        assert relative_error(db, ndb) <= 1e-10
    else:
        assert db is None


def test_conv2d_backward_without_input_grad(rng):
    x = rng.standard_normal((2, 2, 5, 5))
    weight = rng.standard_normal((3, 2, 3, 3))
    dy = rng.standard_normal((2, 3, 3, 3))
    dx, dw, db = F.conv2d_backward(x, weight, dy, input_grad=False)
    assert dx is None
    _, ndw, ndb = naive_conv.conv2d_backward(x, weight, dy)
    assert relative_error(dw, ndw) <= 1e-10 and relative_error(db, ndb) <= 1e-10


@given(
    c=st.integers(1, 2),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    kernel=st.sampled_from([1, 2, 3, (2, 3)]),
    stride=st.sampled_from([None, 1, 2, (1, 2)]),
    padding=st.sampled_from([0, 1, (1, 0)]),
    seed=st.integers(0, 2**31),
)
def test_pools_match_naive(c, h, w, kernel, stride, padding, seed):
    rng = np.random.default_rng(seed)
    try:
        shape, k, s, pads = F.pool2d_output_shape((2, c, h, w), kernel, stride, padding)
    except ValueError as e:
        assert "larger than the padded input" in str(e) or "half of the kernel" in str(e)
        return
    x = rng.standard_normal((2, c, h, w))
    dy = rng.standard_normal(shape)
    y, argmax = F.max_pool2d_forward(x, kernel, stride, padding)
    ny, nargmax = naive_pool.maxpool2d_forward(x, k, s, _naive_pads(pads))
    np.testing.assert_array_equal(y, ny)
    np.testing.assert_array_equal(argmax, nargmax)
    dx = F.max_pool2d_backward(dy, argmax, x.shape)
    assert (
        relative_error(dx, naive_pool.maxpool2d_backward(x, dy, k, s, _naive_pads(pads))) <= 1e-10
    )
    y = F.avg_pool2d_forward(x, kernel, stride, padding)
    assert relative_error(y, naive_pool.avgpool2d_forward(x, k, s, _naive_pads(pads))) <= 1e-10
    dx = F.avg_pool2d_backward(dy, x.shape, kernel, stride, padding)
    expected = naive_pool.avgpool2d_backward(x.shape, dy, k, s, _naive_pads(pads))
    assert relative_error(dx, expected) <= 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_dense_batchnorm_match_naive(rng, dtype):
    x64 = rng.standard_normal((3, 4, 5, 2))
    x = x64.astype(dtype)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    ref_x = x.astype(np.float64)
    y = F.relu_forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert relative_error(y, naive_act.relu_forward(ref_x)) == 0
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = F.relu_backward(dy, y)
    assert relative_error(dx, naive_act.relu_backward(ref_x, dy.astype(np.float64))) == 0

    w = rng.standard_normal((6, 40)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    x2 = x.reshape(3, 40)
    y2 = F.dense_forward(x2, w, b)
    assert y2.dtype == dtype
    f64 = [a.astype(np.float64) for a in (x2, w, b)]
    assert relative_error(y2, naive_dense.dense_forward(*f64)) <= tol
    dy2 = rng.standard_normal((3, 6)).astype(dtype)
    for got, want in zip(
        F.dense_backward(x2, w, dy2),
        naive_dense.dense_backward(f64[0], f64[1], dy2.astype(np.float64)),
        strict=True,
    ):
        assert got.dtype == dtype and relative_error(got, want) <= tol

    gamma = rng.standard_normal(4).astype(dtype)
    beta = rng.standard_normal(4).astype(dtype)
    y3, mean, invstd = F.batch_norm_forward_train(x, gamma, beta, 1e-5)
    ny, nmean, nvar = naive_bn.batchnorm_forward_train(
        ref_x, gamma.astype(np.float64), beta.astype(np.float64), 1e-5
    )
    assert y3.dtype == mean.dtype == invstd.dtype == dtype
    assert relative_error(y3, ny) <= tol and relative_error(mean, nmean) <= tol
    assert relative_error(invstd, 1 / np.sqrt(nvar + 1e-5)) <= tol
    got = F.batch_norm_backward(dy, x, gamma, mean, invstd)
    want = naive_bn.batchnorm_backward(ref_x, gamma.astype(np.float64), dy.astype(np.float64), 1e-5)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == dtype and relative_error(g, e) <= tol
    rm = rng.standard_normal(4).astype(dtype)
    rv = rng.uniform(0.5, 2, 4).astype(dtype)
    y4 = F.batch_norm_forward_eval(x, gamma, beta, rm, rv, 1e-5)
    f = [a.astype(np.float64) for a in (gamma, beta, rm, rv)]
    assert relative_error(y4, naive_bn.batchnorm_forward_eval(ref_x, *f, 1e-5)) <= tol


def test_inputs_made_contiguous_and_native(rng):
    x = rng.standard_normal((2, 3, 6, 5))
    weight = rng.standard_normal((4, 3, 3, 3))
    expected = F.conv2d_forward(x, weight)
    view = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(F.conv2d_forward(view, weight), expected)
    np.testing.assert_array_equal(F.conv2d_forward(x.astype(">f8"), weight.astype(">f8")), expected)
    np.testing.assert_array_equal(F.relu_forward(x[:, ::2]), np.maximum(x[:, ::2], 0))


def test_nan_and_inf_pass_through(rng):
    x = rng.standard_normal((1, 1, 6, 6))
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 5, 5] = np.inf
    weight = np.ones((1, 1, 2, 2))
    y = F.conv2d_forward(x, weight)
    assert np.isnan(y[0, 0, 0, 0]) and np.isinf(y[0, 0, 4, 4]) and np.isfinite(y[0, 0, 2, 2])
    assert np.isnan(F.relu_forward(x)[0, 0, 0, 0])
    assert np.isnan(F.max_pool2d_forward(x, 2)[0][0, 0, 0, 0])
    assert np.isnan(F.dense_forward(x.reshape(1, 36), np.ones((2, 36)))).all()
    assert np.isnan(F.sigmoid_forward(x)[0, 0, 0, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_activations(rng, dtype):
    x = (rng.standard_normal((4, 7)) * 3).astype(dtype)
    x[0, :3] = [-1000, 1000, 0]
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        s = F.sigmoid_forward(x)
        sm = F.softmax_forward(x * 100, dim=1)
    assert s.dtype == sm.dtype == dtype
    with np.errstate(over="ignore"):
        expected = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(s, expected, rtol=1e-6)
    np.testing.assert_allclose(sm.sum(axis=1), 1, rtol=1e-6)
    assert F.tanh_forward(x).dtype == dtype
    lr = F.leaky_relu_forward(x, 0.1)
    assert lr.dtype == dtype
    np.testing.assert_array_equal(lr, np.where(x > 0, x, x * dtype(0.1)))


# ---------------------------------------------------------------------------------------------
# validation: the right error, naming the layer, before any kernel
# ---------------------------------------------------------------------------------------------

X4 = np.zeros((2, 3, 8, 8))
W4 = np.zeros((5, 3, 3, 3))


def test_error_message_format(no_kernels):
    with pytest.raises(ValueError) as e:
        F.conv2d_forward(
            np.zeros((64, 1, 28, 28), np.float32), np.zeros((64, 32, 3, 3), np.float32)
        )
    assert str(e.value) == "Conv2D: expected input of shape (N, 32, H, W), got (64, 1, 28, 28)"
    with pytest.raises(ValueError) as e:
        F.dense_forward(np.zeros((4, 1024)), np.zeros((128, 1600)), layer="Dense")
    assert str(e.value) == "Dense: expected input of shape (N, 1600), got (4, 1024)"


@pytest.mark.parametrize(
    "call, error, match",
    [
        # convolution
        (lambda: F.conv2d_forward(X4.astype(np.int64), W4), TypeError, "floating-point input"),
        (
            lambda: F.conv2d_forward(X4.astype(np.float16), W4.astype(np.float16)),
            TypeError,
            "float16",
        ),
        (lambda: F.conv2d_forward(X4.astype(np.complex128), W4), TypeError, "complex128"),
        (lambda: F.conv2d_forward(X4[0], W4), ValueError, r"\(N, 3, H, W\), got \(3, 8, 8\)"),
        (
            lambda: F.conv2d_forward(X4[:, :2], W4),
            ValueError,
            r"\(N, 3, H, W\), got \(2, 2, 8, 8\)",
        ),
        (lambda: F.conv2d_forward(X4, W4[0]), ValueError, "weight of shape"),
        (lambda: F.conv2d_forward(X4, W4.astype(np.float32)), TypeError, "weight dtype float32"),
        (lambda: F.conv2d_forward(X4, W4, np.zeros(4)), ValueError, r"bias of shape \(5,\)"),
        (lambda: F.conv2d_forward(X4, W4, np.zeros(5, np.float32)), TypeError, "bias dtype"),
        (lambda: F.conv2d_forward(X4, W4, stride=0), ValueError, "stride >= 1, got 0"),
        (lambda: F.conv2d_forward(X4, W4, stride=(1, -2)), ValueError, "stride >= 1, got -2"),
        (lambda: F.conv2d_forward(X4, W4, stride=1.0), TypeError, "stride"),
        (lambda: F.conv2d_forward(X4, W4, dilation=0), ValueError, "dilation >= 1"),
        (lambda: F.conv2d_forward(X4, W4, padding=-1), ValueError, "padding >= 0"),
        (lambda: F.conv2d_forward(X4, W4, padding="full"), ValueError, "got 'full'"),
        (lambda: F.conv2d_forward(X4[:, :, :2], W4), ValueError, "larger than the padded input"),
        (lambda: F.conv2d_forward(X4, W4, dilation=4), ValueError, "dilation 4, effectively 9"),
        (
            lambda: F.conv2d_forward(np.zeros((1, 3, 1, 1)), W4, padding=(0, 1)),
            ValueError,
            "larger than the padded input along H",
        ),
        (lambda: F.conv2d_forward(X4, np.zeros((5, 3, 0, 3))), ValueError, "kernel_size >= 1"),
        (lambda: F.conv2d_forward(np.zeros((2, 3, 0, 8)), W4, padding=2), ValueError, "H, W >= 1"),
        (
            lambda: F.conv2d_backward(X4, W4, np.zeros((2, 5, 5, 6))),
            ValueError,
            r"gradient of shape \(2, 5, 6, 6\)",
        ),
        (
            lambda: F.conv2d_backward(X4, W4, np.zeros((2, 5, 6, 6), np.float32)),
            TypeError,
            "gradient dtype",
        ),
        (
            lambda: F.conv2d_backward(X4, W4, np.zeros((2, 5, 6, 6), np.int32)),
            TypeError,
            "floating-point gradient",
        ),
    ],
)
def test_conv2d_validation(no_kernels, call, error, match):
    with pytest.raises(error, match=f"^Conv2D: .*{match}"):
        call()


@pytest.mark.parametrize(
    "name, fn",
    [
        ("MaxPool2D", lambda *a, **k: F.max_pool2d_forward(*a, **k)[0]),
        ("AvgPool2D", F.avg_pool2d_forward),
    ],
)
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((X4.astype(np.int32), 2), {}, TypeError, "floating-point input"),
        ((X4[0], 2), {}, ValueError, r"input of shape \(N, C, H, W\), got \(3, 8, 8\)"),
        ((X4, 0), {}, ValueError, "kernel_size >= 1"),
        ((X4, -2), {}, ValueError, "kernel_size >= 1"),
        ((X4, 2), {"stride": 0}, ValueError, "stride >= 1"),
        ((X4, 2), {"padding": 2}, ValueError, "half of the kernel"),
        ((X4, 2), {"padding": -1}, ValueError, "padding >= 0"),
        ((X4, 2), {"padding": "same"}, ValueError, "got 'same'"),
        ((X4, 9), {}, ValueError, "larger than the padded input"),
        ((X4, (2, 11)), {"padding": (0, 1)}, ValueError, "larger than the padded input along W"),
    ],
)
def test_pool_validation(no_kernels, name, fn, args, kwargs, error, match):
    with pytest.raises(error, match=f"^{name}: .*{match}"):
        fn(*args, layer=name, **kwargs)


def test_pool_backward_validation(no_kernels):
    dy = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match="^MaxPool2D: .*argmax"):
        F.max_pool2d_backward(dy, np.zeros((2, 3, 4, 3), np.int64), (2, 3, 8, 8))
    with pytest.raises(ValueError, match="^MaxPool2D: .*out of range"):
        F.max_pool2d_backward(dy, np.full((2, 3, 4, 4), 64), (2, 3, 8, 8))
    with pytest.raises(ValueError, match="^MaxPool2D: .*gradient of shape"):
        F.max_pool2d_backward(dy, np.zeros((2, 3, 4, 4), np.int64), (2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"^AvgPool2D: .*gradient of shape \(2, 3, 2, 2\)"):
        F.avg_pool2d_backward(dy, (2, 3, 8, 8), 4)


def test_activation_and_dense_validation(no_kernels):
    with pytest.raises(TypeError, match="^ReLU: .*floating-point input.*int64"):
        F.relu_forward(np.arange(4))
    with pytest.raises(TypeError, match="^ReLU: .*float16"):
        F.relu_forward(np.zeros(4, np.float16))
    with pytest.raises(ValueError, match=r"^ReLU: .*gradient of shape \(4,\)"):
        F.relu_backward(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="^ReLU: .*gradient dtype"):
        F.relu_backward(np.zeros(4, np.float32), np.zeros(4))
    with pytest.raises(TypeError, match="^Sigmoid: "):
        F.sigmoid_forward(np.zeros(3, bool))
    with pytest.raises(ValueError, match="^Softmax: dim 2 out of range"):
        F.softmax_forward(np.zeros((2, 3)), dim=2)
    with pytest.raises(
        ValueError, match=r"^Dense: expected input of shape \(N, 4\), got \(2, 2, 2\)"
    ):
        F.dense_forward(np.zeros((2, 2, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="^Dense: expected weight"):
        F.dense_forward(np.zeros((2, 4)), np.zeros(4))
    with pytest.raises(TypeError, match="^Dense: .*int"):
        F.dense_forward(np.zeros((2, 4), int), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"^Dense: expected gradient of shape \(2, 3\)"):
        F.dense_backward(np.zeros((2, 4)), np.zeros((3, 4)), np.zeros((2, 4)))


def test_batchnorm_validation(no_kernels):
    x = np.zeros((2, 3, 4, 4))
    g = np.ones(3)
    with pytest.raises(ValueError, match=r"^BatchNorm2D: expected input of shape \(N, C, H, W\)"):
        F.batch_norm_forward_train(x[0], g, g)
    with pytest.raises(ValueError, match=r"^BatchNorm2D: expected weight of shape \(3,\)"):
        F.batch_norm_forward_train(x, np.ones(4), g)
    with pytest.raises(TypeError, match="^BatchNorm2D: bias dtype float32"):
        F.batch_norm_forward_train(x, g, g.astype(np.float32))
    with pytest.raises(ValueError, match="^BatchNorm2D: expected more than 1 value per channel"):
        F.batch_norm_forward_train(np.zeros((1, 3, 1, 1)), g, g)
    with pytest.raises(ValueError, match=r"^BatchNorm2D: expected running_var of shape"):
        F.batch_norm_forward_eval(x, g, g, g, np.ones(2))
    with pytest.raises(TypeError, match="^BatchNorm2D: .*floating-point input"):
        F.batch_norm_forward_eval(x.astype(int), g, g, g, g)
    with pytest.raises(ValueError, match=r"^BatchNorm2D: expected gradient of shape"):
        F.batch_norm_backward(x[:1], x, g, g, g)


def test_layer_name_in_messages(no_kernels):
    with pytest.raises(ValueError, match="^conv7: "):
        F.conv2d_forward(X4, W4, stride=0, layer="conv7")


def test_no_kernels_fixture_is_effective(no_kernels):
    """The fixture above really intercepts the kernels (so the validation tests mean something)."""
    with pytest.raises(AssertionError, match="kernel conv2d.conv2d_forward reached"):
        F.conv2d_forward(X4, W4)
    with pytest.raises(AssertionError, match="kernel pool2d.maxpool2d_forward reached"):
        F.max_pool2d_forward(X4, 2)
    with pytest.raises(AssertionError, match="kernel activations.relu_forward reached"):
        F.relu_forward(X4)
    with pytest.raises(AssertionError, match="kernel batchnorm.batchnorm_forward_train reached"):
        F.batch_norm_forward_train(X4, np.ones(3), np.ones(3))


def test_conv_batch_norm_sum_checks_its_other_term(no_kernels):
    """conv2d_batch_norm_eval_forward's ``add`` (a residual's other term): the output's shape
    and the input's dtype, else an error naming the layer that sums, before any kernel."""
    p = np.ones(5)
    args = (X4, W4, None, 1, 1, 1, p, p, p, p, 1e-5)
    with pytest.raises(
        ValueError, match=r"^block3: expected .* shape \(2, 5, 8, 8\), got \(2, 5, 6, 6\)"
    ):
        F.conv2d_batch_norm_eval_forward(*args, add=np.zeros((2, 5, 6, 6)), add_layer="block3")
    with pytest.raises(TypeError, match=r"^block3: input dtype float32 does not match"):
        F.conv2d_batch_norm_eval_forward(
            *args, add=np.zeros((2, 5, 8, 8), np.float32), add_layer="block3"
        )
    with pytest.raises(TypeError, match=r"^Residual: expected a floating-point"):
        F.conv2d_batch_norm_eval_forward(*args, add=np.zeros((2, 5, 8, 8), int))
