"""Conv2D and the poolings: results against the naive loops, errors for every bad argument."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import layers
from fuzzing.common import (
    GOOD,
    arrays,
    assert_close,
    errors_of,
    expect_error,
    f64,
    fuzz,
    grad_array,
    image_input,
    int_args,
    kind,
    native,
    oracle_conv_config,
    oracle_pair,
    oracle_same_pads,
    out_size,
    padding_args,
    predicted,
    snapshot,
    tally,
    unchanged,
)
from naive import conv2d as naive_conv
from naive import pool2d as naive_pool


@fuzz(2.0)
@given(data=st.data())
def test_conv2d(data):
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    # few filters and channels: partial register tiles (3 pixels x 32 filters) and their remainders
    cin, cout = d(st.sampled_from([1, 1, 2, 2, 3, 5])), d(st.sampled_from([1, 2, 3, 3, 4, 5, 6]))
    ks, stride, dil, pad = (
        d(int_args(1, 3)),
        d(int_args(1, 3)),
        d(int_args(1, 2)),
        d(padding_args()),
    )
    bias = d(st.booleans())
    problems, k, s, dl, pads = oracle_conv_config(ks, stride, pad, dil)

    def make():
        return layers.Conv2D(
            cin,
            cout,
            ks,
            stride=stride,
            padding=pad,
            dilation=dil,
            bias=bias,
            dtype=dtype,
            rng=d(st.integers(0, 99)),
        )

    if problems:
        expect_error(make, predicted(problems), "Conv2D")
        return tally("Conv2D.__init__", "invalid")
    layer = make()
    tally("Conv2D.__init__", "valid")

    x = d(image_input(cin, max_side=5 if cin * cout <= 6 else 3))  # (the naive loops are slow)
    snap = snapshot(x)
    xa = np.asarray(x)
    problems = []
    if kind(xa) != "f":
        problems = [TypeError]
    elif xa.ndim != 4 or xa.shape[1] != cin or xa.shape[2] < 1 or xa.shape[3] < 1:
        problems = [ValueError]
    else:
        if pads is None:  # 'same' at a stride > 1: the pads follow the input's size
            pads = oracle_same_pads(xa.shape[2], xa.shape[3], k, s, dl)
        oh = out_size(xa.shape[2], pads[0], pads[1], k[0], s[0], dl[0])
        ow = out_size(xa.shape[3], pads[2], pads[3], k[1], s[1], dl[1])
        if oh is None or ow is None:
            problems = [ValueError]
    if problems:
        expect_error(lambda: layer(x), predicted(problems), "Conv2D")
        assert unchanged(x, snap)
        return tally("Conv2D.forward", "invalid")
    y = layer(x)
    assert unchanged(x, snap), "Conv2D.forward modified its input"
    x64 = f64(xa.astype(dtype))  # the layer computes in its own dtype
    w64 = f64(layer.weight.data)
    b64 = f64(layer.bias.data) if bias else np.zeros(cout)
    padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    assert_close(y, naive_conv.conv2d_forward(x64, w64, b64, s, padding, dl), dtype, "Conv2D y")
    tally("Conv2D.forward", "valid")

    dy = grad_array(d, y.shape)
    dsnap = snapshot(dy)
    dya = np.asarray(dy)
    if kind(dya) != "f":
        expect_error(lambda: layer.backward(dy), TypeError, "Conv2D")
        return tally("Conv2D.backward", "invalid")
    if dya.shape != y.shape:
        expect_error(lambda: layer.backward(dy), ValueError, "Conv2D")
        return tally("Conv2D.backward", "invalid")
    dx = layer.backward(dy)
    assert unchanged(dy, dsnap) and unchanged(x, snap)
    ex, ew, eb = naive_conv.conv2d_backward(x64, w64, f64(dya.astype(dtype)), s, padding, dl)
    assert_close(dx, ex, xa.dtype, "Conv2D dx", dtype)
    assert_close(layer.weight.grad, ew, dtype, "Conv2D dweight")
    if bias:
        assert_close(layer.bias.grad, eb, dtype, "Conv2D dbias")
    tally("Conv2D.backward", "valid")


@fuzz(0.5)
@given(data=st.data())
def test_conv2d_winograd(data):
    """3x3 stride-1 convolutions of 16k channels and filters, which run on the Winograd kernels
    (forward, input and weight gradients): odd and tiny sizes, every padding up to 'same'."""
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    cin, cout = d(st.sampled_from([16, 32])), d(st.sampled_from([16, 32, 48]))
    pad = d(st.sampled_from([0, 1, "same", (1, 1)]))
    bias = d(st.booleans())
    layer = layers.Conv2D(
        cin, cout, 3, padding=pad, bias=bias, dtype=dtype, rng=d(st.integers(0, 99))
    )
    p = 0 if pad == 0 else 1
    n, h, w = (
        d(st.integers(1, 2)),
        d(st.integers(max(1, 3 - 2 * p), 4)),
        d(st.integers(max(1, 3 - 2 * p), 4)),
    )
    # finite values: a NaN or inf reaches a Winograd tile's neighbours (functional.conv2d_forward)
    x = d(arrays((n, cin, h, w), dtypes=[dtype], special=False))
    xa = np.asarray(x)
    y = layer(x)
    x64, w64 = f64(xa.astype(dtype)), f64(layer.weight.data)
    b64 = f64(layer.bias.data) if bias else np.zeros(cout)
    padding = ((p, p), (p, p))
    assert_close(y, naive_conv.conv2d_forward(x64, w64, b64, (1, 1), padding), dtype, "Conv2D y")
    dy = d(arrays(y.shape, dtypes=[dtype], special=False))
    dx = layer.backward(dy)
    ex, ew, eb = naive_conv.conv2d_backward(x64, w64, f64(np.asarray(dy)), (1, 1), padding)
    assert_close(dx, ex, xa.dtype, "Conv2D dx", dtype)  # in the input's dtype (a list: float64)
    assert_close(layer.weight.grad, ew, dtype, "Conv2D dweight")
    if bias:
        assert_close(layer.bias.grad, eb, dtype, "Conv2D dbias")
    tally("Conv2D (Winograd shapes)", "valid")


# ---------------------------------------------------------------------------------------------
# pooling


@fuzz(0.5)
@given(data=st.data())
def test_conv2d_strided_gradients(data):
    """Strided convolutions of 8-16 or whole blocks of 16 input channels, whose input gradient
    runs phase by phase (kernels/conv2d_phases.py; 48: a wide block and a narrow one on AVX2):
    kernels 1-3, strides 2-3, any padding, tiny sizes."""
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    cin, cout = d(st.sampled_from([8, 12, 16, 32, 48, 64])), d(st.sampled_from([1, 5, 16]))
    k, stride = d(st.integers(1, 3)), d(st.sampled_from([2, 3, (2, 3)]))
    pad = d(st.sampled_from([0, 1, (1, 0), "same"]))
    bias = d(st.booleans())
    layer = layers.Conv2D(
        cin, cout, k, stride=stride, padding=pad, bias=bias, dtype=dtype, rng=d(st.integers(0, 99))
    )
    n, h, w = d(st.integers(1, 2)), d(st.integers(k, 7)), d(st.integers(k, 7))
    x = d(arrays((n, cin, h, w), dtypes=[dtype], special=False))
    xa = np.asarray(x)
    s = oracle_pair(stride, 1)
    pads = oracle_same_pads(h, w, (k, k), s, (1, 1)) if pad == "same" else None
    if pads is None:
        p = oracle_pair(pad, 0)
        pads = (p[0], p[0], p[1], p[1])
    padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    y = layer(x)
    x64, w64 = f64(xa.astype(dtype)), f64(layer.weight.data)
    b64 = f64(layer.bias.data) if bias else np.zeros(cout)
    assert_close(y, naive_conv.conv2d_forward(x64, w64, b64, s, padding), dtype, "Conv2D y")
    # dy may hold NaN and inf: the phases kernel meets them as col2im does
    dy = d(arrays(y.shape, dtypes=[dtype], layouts=["c"]))
    dx = layer.backward(dy)
    ex, ew, eb = naive_conv.conv2d_backward(x64, w64, f64(np.asarray(dy)), s, padding)
    assert_close(dx, ex, xa.dtype, "Conv2D dx", dtype, loose=True)
    assert_close(layer.weight.grad, ew, dtype, "Conv2D dweight", loose=True)
    tally("Conv2D strided backward", "valid")


@fuzz(0.5)
@given(data=st.data())
def test_conv2d_first_layer_evaluation(data):
    """An image's few channels and whole vectors of filters in evaluation mode, the lanes
    forward (kernels/conv2d_c1.py), which reads the batch in the layout it comes in: C order,
    Fortran, strided, reversed; NaN and inf included."""
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    cin, cout = d(st.integers(1, 4)), d(st.sampled_from([16, 32]))
    k = (d(st.integers(1, 3)), d(st.integers(1, 3)))
    pad = d(st.sampled_from([0, 1, (0, 2), "same"]))
    bias = d(st.booleans())
    layer = layers.Conv2D(
        cin, cout, k, padding=pad, bias=bias, dtype=dtype, rng=d(st.integers(0, 99))
    )
    layer.eval()
    n, h, w = d(st.integers(1, 2)), d(st.integers(k[0], 6)), d(st.integers(k[1], 6))
    x = d(arrays((n, cin, h, w), dtypes=[dtype]))
    snap = snapshot(x)
    xa = np.asarray(x)
    if pad == "same":
        th, tw = k[0] - 1, k[1] - 1
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        p = oracle_pair(pad, 0)
        pads = (p[0], p[0], p[1], p[1])
    y = layer(x)
    assert unchanged(x, snap), "Conv2D.forward modified its input"
    b64 = f64(layer.bias.data) if bias else np.zeros(cout)
    padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    x64, w64 = f64(xa.astype(dtype)), f64(layer.weight.data)
    expected = naive_conv.conv2d_forward(x64, w64, b64, (1, 1), padding)
    assert_close(y, expected, dtype, "Conv2D y (evaluation)")
    tally("Conv2D evaluation forward", "valid")


@fuzz(1.5)
@given(data=st.data(), cls=st.sampled_from([layers.MaxPool2D, layers.AvgPool2D]))
def test_pool2d(data, cls):
    d = data.draw
    name = cls.__name__
    ks, pad = d(int_args(1, 3)), d(int_args(0, 1))
    stride = None if d(st.booleans()) else d(int_args(1, 3))
    k = oracle_pair(ks, 1)
    s = k if stride is None else oracle_pair(stride, 1)
    # a string padding ('same', as a convolution's) is a value pools do not support: ValueError
    p = ValueError if isinstance(pad, str) else oracle_pair(pad, 0)
    problems = errors_of(k, s, p)
    if not problems and (p[0] > k[0] // 2 or p[1] > k[1] // 2):
        problems = [ValueError]
    if problems:
        expect_error(lambda: cls(ks, stride, pad), predicted(problems), name)
        return tally(f"{name}.__init__", "invalid")
    layer = cls(ks, stride, pad)
    tally(f"{name}.__init__", "valid")

    c = d(st.integers(1, 2))
    x = d(image_input(c))
    snap = snapshot(x)
    xa = np.asarray(x)
    problems = []
    if kind(xa) != "f" or xa.dtype.itemsize not in (4, 8):
        problems = [TypeError]
    elif xa.ndim != 4 or min(xa.shape[1:]) < 1:
        problems = [ValueError]
    elif (
        out_size(xa.shape[2], p[0], p[0], k[0], s[0]) is None
        or out_size(xa.shape[3], p[1], p[1], k[1], s[1]) is None
    ):
        problems = [ValueError]
    if problems:
        expect_error(lambda: layer(x), predicted(problems), name)
        return tally(f"{name}.forward", "invalid")
    y = layer(x)
    assert unchanged(x, snap)
    dtype = native(xa.dtype)
    x64 = f64(xa)
    padding = ((p[0], p[0]), (p[1], p[1]))
    if cls is layers.MaxPool2D:
        ey, _ = naive_pool.maxpool2d_forward(x64, k, s, padding)
    else:
        ey = naive_pool.avgpool2d_forward(x64, k, s, padding)
    assert_close(y, ey, dtype, f"{name} y")
    tally(f"{name}.forward", "valid")

    dy = grad_array(d, y.shape)
    dya = np.asarray(dy)
    if kind(dya) != "f" or native(dya.dtype) != dtype:
        expect_error(lambda: layer.backward(dy), TypeError, name)
        return tally(f"{name}.backward", "invalid")
    if dya.shape != y.shape:
        expect_error(lambda: layer.backward(dy), ValueError, name)
        return tally(f"{name}.backward", "invalid")
    dx = layer.backward(dy)
    if cls is layers.MaxPool2D:
        ex = naive_pool.maxpool2d_backward(x64, f64(dya), k, s, padding)
    else:
        ex = naive_pool.avgpool2d_backward(x64.shape, f64(dya), k, s, padding)
    assert_close(dx, ex, dtype, f"{name} dx")
    tally(f"{name}.backward", "valid")
