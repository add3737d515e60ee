"""BatchNorm2D/1D, Dense, the activations, Flatten and Dropout."""

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import layers
from fuzzing.common import (
    GOOD,
    LIMIT,
    arrays,
    assert_close,
    errors_of,
    expect_error,
    f64,
    fuzz,
    grad_array,
    image_input,
    kind,
    native,
    odd_shapes,
    predicted,
    snapshot,
    tally,
    unchanged,
)
from naive import activations as naive_act
from naive import batchnorm as naive_bn
from naive import dense as naive_dense

# ---------------------------------------------------------------------------------------------
# batch normalisation

NUMBERS = (0.0, 1e-5, 0.1, 0.5, 1.0, 1.5, -0.1, float("nan"), float("inf"), "0.1", None, True)


@fuzz(1.5)
@given(
    data=st.data(),
    cls=st.sampled_from([layers.BatchNorm2D, layers.BatchNorm1D]),
    training=st.booleans(),
)
def test_batchnorm(data, cls, training):
    d = data.draw
    name = cls.__name__
    dtype = d(st.sampled_from(GOOD))
    c = d(st.integers(1, 3))
    eps = d(st.sampled_from((1e-5, 1e-5, 1e-3) + NUMBERS))
    momentum = d(st.sampled_from((0.1, 0.1, 0.9) + NUMBERS))

    def number_problem(v, low, low_open, high=None):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return TypeError
        if (
            not math.isfinite(v)
            or (v <= low if low_open else v < low)
            or (high is not None and v > high)
        ):
            return ValueError
        return None

    problems = errors_of(number_problem(eps, 0, True), number_problem(momentum, 0, False, 1))
    make = lambda: cls(c, eps=eps, momentum=momentum, dtype=dtype)  # noqa: E731
    if problems:
        expect_error(make, predicted(problems), name)
        return tally(f"{name}.__init__", "invalid")
    layer = make().train(training)
    # non-trivial running statistics and affine parameters
    rng = np.random.default_rng(d(st.integers(0, 99)))
    layer.running_mean[...] = rng.standard_normal(c)
    layer.running_var[...] = rng.random(c) + 0.5
    layer.weight.data[...] = rng.standard_normal(c)
    layer.bias.data[...] = rng.standard_normal(c)
    rm0, rv0 = layer.running_mean.copy(), layer.running_var.copy()
    tally(f"{name}.__init__", "valid")

    if cls is layers.BatchNorm2D:
        x = d(image_input(c, max_side=3))
    else:
        r = d(st.integers(0, 9))
        n = d(st.integers(0, 4))
        shape = (
            d(odd_shapes())
            if r == 0
            else (n, c)
            if r < 5
            else (n, c if r < 9 else c + 1, d(st.integers(0, 3)))
        )
        x = d(arrays(shape))
    snap = snapshot(x)
    xa = np.asarray(x)
    ok_rank = xa.ndim == 4 if cls is layers.BatchNorm2D else xa.ndim in (2, 3)
    problems = []
    if kind(xa) != "f":
        problems = [TypeError]
    elif not ok_rank or xa.shape[1] != c:
        problems = [ValueError]
    x4 = xa.reshape(xa.shape + (1,) * (4 - xa.ndim)) if not problems else None
    if not problems and training and x4.shape[0] * x4.shape[2] * x4.shape[3] < 2:
        problems = [ValueError]
    if problems:
        expect_error(lambda: layer(x), predicted(problems), name)
        assert np.array_equal(layer.running_mean, rm0) and np.array_equal(layer.running_var, rv0)
        return tally(f"{name}.forward", "invalid")
    y = layer(x)
    assert unchanged(x, snap)
    x64 = f64(x4.astype(dtype))
    g64, b64 = f64(layer.weight.data), f64(layer.bias.data)
    eps64 = float(layer.eps)
    if training:
        ey, mean, var = naive_bn.batchnorm_forward_train(x64, g64, b64, eps64)
        count = x64.shape[0] * x64.shape[2] * x64.shape[3]
        m = float(momentum)
        assert_close(layer.running_mean, (1 - m) * f64(rm0) + m * mean, dtype, "running_mean")
        assert_close(
            layer.running_var,
            (1 - m) * f64(rv0) + m * var * count / (count - 1),
            dtype,
            "running_var",
        )
    else:
        ey = naive_bn.batchnorm_forward_eval(x64, g64, b64, f64(rm0), f64(rv0), eps64)
        assert np.array_equal(layer.running_mean, rm0) and np.array_equal(layer.running_var, rv0)
    assert_close(y, ey.reshape(xa.shape), dtype, f"{name} y")
    tally(f"{name}.forward", "valid")

    dy = grad_array(d, y.shape)
    dya = np.asarray(dy)
    if kind(dya) != "f":
        expect_error(lambda: layer.backward(dy), TypeError, name)
        return tally(f"{name}.backward", "invalid")
    if dya.shape != y.shape:
        expect_error(lambda: layer.backward(dy), ValueError, name)
        return tally(f"{name}.backward", "invalid")
    dx = layer.backward(dy)
    dy64 = f64(dya.astype(dtype)).reshape(x64.shape)
    if training:
        ex, eg, eb = naive_bn.batchnorm_backward(x64, g64, dy64, eps64)
    else:
        invstd = 1.0 / np.sqrt(f64(rv0) + eps64)
        xhat = (x64 - f64(rm0)[None, :, None, None]) * invstd[None, :, None, None]
        ex = dy64 * (g64 * invstd)[None, :, None, None]
        eg, eb = np.sum(dy64 * xhat, axis=(0, 2, 3)), np.sum(dy64, axis=(0, 2, 3))
    assert_close(dx, ex.reshape(xa.shape), xa.dtype, f"{name} dx", dtype, loose=True)
    assert_close(layer.weight.grad, eg, dtype, f"{name} dgamma", loose=True)
    assert_close(layer.bias.grad, eb, dtype, f"{name} dbeta", loose=True)
    tally(f"{name}.backward", "valid")


# ---------------------------------------------------------------------------------------------
# Dense


@fuzz(1.0)
@given(data=st.data())
def test_dense(data):
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    fin = d(st.sampled_from([1, 2, 3, 5, 0, -1, 2.0, None, True, 2**31, np.int64(3)]))
    fout = d(st.sampled_from([1, 2, 4, 0, -3, "4", 2**40, np.uint8(2)]))
    bias = d(st.booleans())

    def size_problem(v):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return TypeError
        return ValueError if not 1 <= v <= LIMIT else None

    problems = errors_of(size_problem(fin), size_problem(fout))
    make = lambda: layers.Dense(fin, fout, bias=bias, dtype=dtype)  # noqa: E731
    if problems:
        expect_error(make, predicted(problems), "Dense")
        return tally("Dense.__init__", "invalid")
    layer = make()
    tally("Dense.__init__", "valid")
    r = d(st.integers(0, 9))
    n = d(st.integers(0, 3))
    shape = (
        d(odd_shapes()) if r == 0 else (n, fin) if r < 8 else (n, fin + d(st.sampled_from([-1, 1])))
    )
    x = d(arrays(shape))
    snap = snapshot(x)
    xa = np.asarray(x)
    if kind(xa) != "f":
        expect_error(lambda: layer(x), TypeError, "Dense")
        return tally("Dense.forward", "invalid")
    if xa.ndim != 2 or xa.shape[1] != fin:
        expect_error(lambda: layer(x), ValueError, "Dense")
        return tally("Dense.forward", "invalid")
    y = layer(x)
    assert unchanged(x, snap)
    x64, w64 = f64(xa.astype(dtype)), f64(layer.weight.data)
    b64 = f64(layer.bias.data) if bias else None
    assert_close(y, naive_dense.dense_forward(x64, w64, b64), dtype, "Dense y")
    tally("Dense.forward", "valid")
    dy = grad_array(d, y.shape)
    dya = np.asarray(dy)
    if kind(dya) != "f":
        expect_error(lambda: layer.backward(dy), TypeError, "Dense")
        return tally("Dense.backward", "invalid")
    if dya.shape != y.shape:
        expect_error(lambda: layer.backward(dy), ValueError, "Dense")
        return tally("Dense.backward", "invalid")
    dx = layer.backward(dy)
    ex, ew, eb = naive_dense.dense_backward(x64, w64, f64(dya.astype(dtype)))
    assert_close(dx, ex, xa.dtype, "Dense dx", dtype)
    assert_close(layer.weight.grad, ew, dtype, "Dense dweight")
    if bias:
        assert_close(layer.bias.grad, eb, dtype, "Dense dbias")
    tally("Dense.backward", "valid")


# ---------------------------------------------------------------------------------------------
# parameter-free elementwise layers, Softmax, Flatten, Dropout


def _softmax(x, dim):
    if x.size == 0:
        return x.copy()
    e = np.exp(x - np.max(x, axis=dim, keepdims=True))
    return e / np.sum(e, axis=dim, keepdims=True)


def _reference(name, x, dy, layer):
    """(y, dx) in float64 for the elementwise layers and Softmax."""
    with np.errstate(all="ignore"):
        if name == "ReLU":
            y = naive_act.relu_forward(x)
            return y, naive_act.relu_backward(y, dy)
        if name == "LeakyReLU":
            s = layer.negative_slope
            return np.where(x > 0, x, x * s), np.where(x > 0, dy, dy * s)
        if name == "Tanh":
            y = np.tanh(x)
            return y, dy * (1 - y * y)
        if name == "Sigmoid":
            y = 1 / (1 + np.exp(-x))
            return y, dy * y * (1 - y)
        if name == "Softmax":
            y = _softmax(x, layer.dim)
            return y, y * (dy - np.sum(dy * y, axis=layer.dim, keepdims=True))
    raise AssertionError(name)


@fuzz(2.0)
@given(data=st.data(), name=st.sampled_from(["ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softmax"]))
def test_activations(data, name):
    d = data.draw
    if name == "LeakyReLU":
        slope = d(
            st.sampled_from([0.01, 0.2, 0.0, -0.5, 3, float("nan"), float("inf"), "0.1", None])
        )
        bad = (
            TypeError
            if isinstance(slope, (str, type(None)))
            else ValueError
            if not math.isfinite(slope)
            else None
        )
        if bad:
            expect_error(lambda: layers.LeakyReLU(slope), bad, name)
            return tally(f"{name}.__init__", "invalid")
        layer = layers.LeakyReLU(slope)
    elif name == "Softmax":
        dim = d(st.sampled_from([1, 1, 0, -1, 2, 3, -3, 1.0, None, "1"]))
        if isinstance(dim, (float, str, type(None))):
            expect_error(lambda: layers.Softmax(dim), TypeError, name)
            return tally(f"{name}.__init__", "invalid")
        layer = layers.Softmax(dim)
    else:
        layer = getattr(layers, name)()
    tally(f"{name}.__init__", "valid")
    shape = tuple(d(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    x = d(arrays(shape, scale=d(st.sampled_from([1.0, 1.0, 30.0, 1000.0]))))
    snap = snapshot(x)
    xa = np.asarray(x)
    if kind(xa) != "f" or xa.dtype.itemsize not in (4, 8):
        expect_error(lambda: layer(x), TypeError, name)
        return tally(f"{name}.forward", "invalid")
    if name == "Softmax" and not -xa.ndim <= layer.dim < xa.ndim:
        expect_error(lambda: layer(x), ValueError, name)
        return tally(f"{name}.forward", "invalid")
    dtype = native(xa.dtype)
    y = layer(x)
    assert unchanged(x, snap)
    dy = grad_array(d, xa.shape)
    dya = np.asarray(dy)
    ey, ex = _reference(
        name,
        f64(xa),
        f64(dya) if dya.shape == xa.shape and kind(dya) == "f" else np.zeros(xa.shape),
        layer,
    )
    assert_close(y, ey, dtype, f"{name} y")
    tally(f"{name}.forward", "valid")
    if kind(dya) != "f" or native(dya.dtype) != dtype:
        expect_error(lambda: layer.backward(dy), TypeError, name)
        return tally(f"{name}.backward", "invalid")
    if dya.shape != xa.shape:
        expect_error(lambda: layer.backward(dy), ValueError, name)
        return tally(f"{name}.backward", "invalid")
    # the float64 reference of the backward from the layer's own (rounded) output
    dx = layer.backward(dy)
    if name in ("Tanh", "Sigmoid", "Softmax"):
        y64, dy64 = f64(y), f64(dya)
        ex = {
            "Tanh": lambda: dy64 * (1 - y64 * y64),
            "Sigmoid": lambda: dy64 * y64 * (1 - y64),
            "Softmax": lambda: y64 * (dy64 - np.sum(dy64 * y64, axis=layer.dim, keepdims=True)),
        }[name]()
    assert_close(dx, ex, dtype, f"{name} dx")
    tally(f"{name}.backward", "valid")


@fuzz(1.0)
@given(data=st.data())
def test_flatten(data):
    d = data.draw
    layer = layers.Flatten()
    shape = tuple(d(st.lists(st.integers(0, 4), min_size=0, max_size=5)))
    x = d(arrays(shape))
    snap = snapshot(x)
    xa = np.asarray(x)
    if kind(xa) != "f" or xa.dtype.itemsize not in (4, 8):
        expect_error(lambda: layer(x), TypeError, "Flatten")
        return tally("Flatten.forward", "invalid")
    if xa.ndim < 2:
        expect_error(lambda: layer(x), ValueError, "Flatten")
        return tally("Flatten.forward", "invalid")
    y = layer(x)
    assert unchanged(x, snap)
    dtype = native(xa.dtype)
    assert_close(y, f64(xa).reshape(xa.shape[0], math.prod(xa.shape[1:])), dtype, "Flatten y")
    tally("Flatten.forward", "valid")
    dy = grad_array(d, y.shape)
    dya = np.asarray(dy)
    if kind(dya) != "f" or native(dya.dtype) != dtype:
        expect_error(lambda: layer.backward(dy), TypeError, "Flatten")
        return tally("Flatten.backward", "invalid")
    if dya.shape != y.shape:
        expect_error(lambda: layer.backward(dy), ValueError, "Flatten")
        return tally("Flatten.backward", "invalid")
    assert_close(layer.backward(dy), f64(dya).reshape(xa.shape), dtype, "Flatten dx")
    tally("Flatten.backward", "valid")


@fuzz(1.0)
@given(data=st.data(), training=st.booleans())
def test_dropout(data, training):
    d = data.draw
    p = d(st.sampled_from([0.5, 0.5, 0.1, 0.0, 1.0, 0.999, -0.1, 1.1, float("nan"), "0.5", None]))
    bad = TypeError if isinstance(p, (str, type(None))) else ValueError if not 0 <= p <= 1 else None
    seed = d(st.integers(0, 2**32))
    if bad:
        expect_error(lambda: layers.Dropout(p, seed=seed), bad, "Dropout")
        return tally("Dropout.__init__", "invalid")
    layer = layers.Dropout(p, seed=seed).train(training)
    tally("Dropout.__init__", "valid")
    shape = tuple(d(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    x = d(arrays(shape))
    snap = snapshot(x)
    xa = np.asarray(x)
    if kind(xa) != "f" or xa.dtype.itemsize not in (4, 8):
        expect_error(lambda: layer(x), TypeError, "Dropout")
        return tally("Dropout.forward", "invalid")
    dtype = native(xa.dtype)
    y = layer(x)
    assert unchanged(x, snap)
    # the mask: a twin with the same seed applied to ones (0 or 1 / (1 - p), in x's dtype)
    if training and p > 0:
        mask = f64(layers.Dropout(p, seed=seed)(np.ones(xa.shape, dtype)))
        assert set(np.unique(mask)) <= {0.0, float(dtype.type(1.0 / (1.0 - p))) if p < 1 else 0.0}
    else:
        mask = np.ones(xa.shape)
    with np.errstate(all="ignore"):
        assert_close(y, f64(xa) * mask, dtype, "Dropout y")
    tally("Dropout.forward", "valid")
    dy = grad_array(d, xa.shape)
    dya = np.asarray(dy)
    if kind(dya) != "f" or native(dya.dtype) != dtype:
        expect_error(lambda: layer.backward(dy), TypeError, "Dropout")
        return tally("Dropout.backward", "invalid")
    if dya.shape != xa.shape:
        expect_error(lambda: layer.backward(dy), ValueError, "Dropout")
        return tally("Dropout.backward", "invalid")
    with np.errstate(all="ignore"):
        assert_close(layer.backward(dy), f64(dya) * mask, dtype, "Dropout dx")
    tally("Dropout.backward", "valid")
