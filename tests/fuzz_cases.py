"""Property-based fuzz cases for every public entry point (run by tests/test_fuzz.py).

Not collected by a normal ``pytest tests`` run (the name does not start with ``test_``):
tests/test_fuzz.py runs this module in a child interpreter, so that a segfault, an abort or a
hang in a kernel becomes a test failure instead of a dead CI run. Run it directly with

    python -m pytest tests/fuzz_cases.py -q                      # the default example counts
    FASTCNN_FUZZ_EXAMPLES=500 python -m pytest tests/fuzz_cases.py -q   # longer
    python -m pytest -p fuzz_boundscheck tests/fuzz_cases.py -q  # kernels with bounds checks

Every case draws valid and invalid arguments (wrong rank, channel count, sizes, kernel larger
than the padded input, zero/negative/huge sizes, strides, paddings, empty batches, integer,
bool, float16 and complex dtypes, Fortran-ordered, strided, reversed, byte-swapped and read-only
arrays, Python lists, NaN and inf) and an *oracle* decides independently of the code under
test what must happen:

- valid: the result equals the naive reference (tests/naive/) or a float64 recomputation
  (float64 <= 1e-10, float32 <= 1e-4 relative to max(|expected|, 1); NaN and inf at the same
  places), and the inputs are left unchanged;
- invalid: ValueError or TypeError (the one the oracle predicts when there is a single
  problem) whose message names the class (``"Conv2D: ..."``); nothing else (IndexError,
  numpy's own broadcasting errors, a wrong answer) is accepted.

Each example is counted; with ``FASTCNN_FUZZ_REPORT=<file>`` the counts are written there as
JSON at the end of the module (tests/test_fuzz.py reads and reports them).
"""
import collections
import gzip
import json
import math
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastcnn
from fastcnn import checkpoint as ckpt_mod
from fastcnn import datasets, layers, losses, optim
from fastcnn.model import Sequential, from_config
from naive import activations as naive_act
from naive import batchnorm as naive_bn
from naive import conv2d as naive_conv
from naive import dense as naive_dense
from naive import losses as naive_losses
from naive import pool2d as naive_pool

# loaded by `-p fuzz_boundscheck`: the kernels were compiled with bounds checks, no prange
BOUNDSCHECK = "fuzz_boundscheck" in sys.modules

# ---------------------------------------------------------------------------------------------
# counting and settings

EXAMPLES = int(os.environ.get("FASTCNN_FUZZ_EXAMPLES", "60"))
COUNTS = collections.Counter()


def tally(case, outcome):
    """Count one fuzzed case: ``outcome`` is "valid" (result checked) or "invalid" (error checked)."""
    COUNTS[f"{case}:{outcome}"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    path = os.environ.get("FASTCNN_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"counts": dict(COUNTS), "boundscheck": BOUNDSCHECK,
                       "examples_setting": EXAMPLES}, f)


def fuzz(weight=1.0):
    """Hypothesis settings for a fuzz case: ``weight`` x FASTCNN_FUZZ_EXAMPLES examples."""
    return settings(max_examples=max(2, int(EXAMPLES * weight)), deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ---------------------------------------------------------------------------------------------
# arrays

GOOD = ("float32", "float64")
HALF = ("float16",)
BAD = ("int32", "int64", "uint8", "bool", "complex64", "complex128")
LAYOUTS = ("c", "c", "c", "fortran", "strided", "reversed", "swapped", "readonly", "list")


def make_array(shape, dtype, seed, layout="c", special=False, scale=1.0):
    """A deterministic array of ``shape`` and ``dtype`` in the given memory layout; ``special``
    sprinkles NaN / inf / -inf (floating and complex dtypes)."""
    rng = np.random.default_rng(seed)
    v = np.asarray(rng.standard_normal(shape) * scale)
    dt = np.dtype(dtype)
    if special and v.size and dt.kind in "fc":
        k = int(rng.integers(1, 3))
        v.reshape(-1)[rng.integers(0, v.size, k)] = rng.choice([np.nan, np.inf, -np.inf], k)
    if dt.kind in "iu":
        a = np.clip(np.round(v * 2), 0 if dt.kind == "u" else -100, 100).astype(dt)
    elif dt.kind == "b":
        a = v > 0
    elif dt.kind == "c":
        a = (v + 1j * rng.standard_normal(shape)).astype(dt)
    else:
        a = v.astype(dt)
    return relayout(np.asarray(a), layout)


def relayout(a, layout):
    """The same values in another memory layout (or as nested Python lists)."""
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "strided" and a.ndim:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), dtype=a.dtype)
        big[..., 1::2] = a
        return big[..., 1::2]
    if layout == "reversed" and a.ndim:
        return a[::-1].copy()[::-1]
    if layout == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if layout == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if layout == "list" and a.dtype.kind == "f" and a.ndim and a.size:
        return a.astype(np.float64).tolist()  # np.asarray gives float64
    return a


def kind(a):
    return np.asarray(a).dtype.kind


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def f64(a):
    """float64, C-ordered (the naive references flatten with reshape)."""
    return np.array(a, dtype=np.float64, order="C")


def snapshot(a):
    """Bytes and metadata to check later that ``a`` was not modified."""
    if isinstance(a, list):
        return ("list", json.dumps(a))
    a = np.asarray(a)
    return (a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes())


def unchanged(a, snap):
    return snapshot(a) == snap


@st.composite
def arrays(draw, shape, dtypes=GOOD * 12 + HALF + BAD, special=None, layouts=LAYOUTS,
           scale=1.0):
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(layouts))
    if special is None:
        special = draw(st.integers(0, 5)) == 0
    return make_array(tuple(shape), dtype, seed, layout, special, scale)


@st.composite
def odd_shapes(draw, max_side=4):
    """A shape of the wrong rank: 0-D to 5-D."""
    rank = draw(st.sampled_from([0, 1, 2, 3, 5]))
    return tuple(draw(st.integers(0, max_side)) for _ in range(rank))


# ---------------------------------------------------------------------------------------------
# oracles for the results

def tolerance(dtype):
    dt = np.dtype(dtype)
    return {8: 1e-10, 4: 1e-4, 2: 2e-3}[dt.itemsize]


def assert_close(actual, expected, dtype, what="result", computed_in=None, loose=False):
    """``actual`` has ``dtype`` and the shape of ``expected``; NaN and +-inf at the same places,
    finite values within the tolerance of ``dtype`` (and of ``computed_in``, the dtype the
    layer computed in, when lower) relative to max(|expected|, 1).

    ``loose``: non-finite values at the same places, but NaN and inf not told apart (reductions
    that a kernel may rearrange algebraically, as batch normalisation's: with an infinite
    input, ``sum(dy * (x - mean))`` is inf where ``sum(dy * x) - mean * sum(dy)`` is NaN)."""
    assert isinstance(actual, np.ndarray), f"{what}: expected an ndarray, got {type(actual)}"
    assert actual.dtype == native(dtype), f"{what}: dtype {actual.dtype}, expected {native(dtype)}"
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.astype(np.float64)
    if loose:
        bad_a, bad_e = ~np.isfinite(a), ~np.isfinite(expected)
        assert np.array_equal(bad_a, bad_e), f"{what}: non-finite at {np.argwhere(bad_a != bad_e)[:5]}"
        a, expected = np.where(bad_e, 0.0, a), np.where(bad_e, 0.0, expected)
    nan_a, nan_e = np.isnan(a), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN at {np.argwhere(nan_a != nan_e)[:5]}"
    inf_e = np.isinf(expected)
    assert np.array_equal(np.isinf(a), inf_e), f"{what}: inf at other places"
    assert np.array_equal(a[inf_e], expected[inf_e]), f"{what}: inf of the other sign"
    finite = ~(nan_e | inf_e)
    if finite.any():
        scale = max(float(np.max(np.abs(expected[finite]))), 1.0)
        err = float(np.max(np.abs(a[finite] - expected[finite]))) / scale
        tol = max(tolerance(dtype), tolerance(computed_in or dtype))
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def expect_error(call, errors, name):
    """``call()`` raises one of ``errors`` (a class or a set of classes) and the message names
    ``name`` (the layer / class). Returns the exception."""
    errors = tuple(errors) if isinstance(errors, (set, list, tuple)) else (errors,)
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    exc = info.value
    assert isinstance(exc, errors), f"expected {errors}, got {type(exc).__name__}: {exc}"
    assert name in str(exc), f"the message does not name {name!r}: {exc}"
    return exc


def predicted(problems):
    """The error classes acceptable for a list of problems (each an error class): the one class
    when there is a single problem, any of them when several compete."""
    return set(problems)


# ---------------------------------------------------------------------------------------------
# integer arguments: kernel_size, stride, padding, dilation

HUGE = (2**31, 2**40, 10**20, 2**63, 2**64 + 1)
BAD_INT_VALUES = (2.0, 1.5, "3", None, True, False, (1, 2, 3), (1,), (), (2, None), (2.0, 2),
                  float("nan"), b"2", 1j)
GOOD_INT_VALUES = (np.int64(2), np.int32(1), [2, 1], (np.int16(1), np.uint8(2)), np.array([1, 2]))


@st.composite
def int_args(draw, lo, hi):
    """An int or a pair within [lo, hi] mostly; sometimes too small (lo - 1, negative), of a
    wrong type or huge (about one draw in eight is invalid)."""
    r = draw(st.integers(0, 39))
    if r < 22:
        return draw(st.integers(lo, hi))
    if r < 34:
        return (draw(st.integers(lo, hi)), draw(st.integers(lo, hi)))
    if r < 35:
        return draw(st.sampled_from([lo - 1, -3, (lo, lo - 1), (-1, hi)]))
    if r < 37:
        return draw(st.sampled_from(BAD_INT_VALUES))
    if r < 39:
        return draw(st.sampled_from(GOOD_INT_VALUES))
    return draw(st.sampled_from(HUGE))


LIMIT = 2**31 - 1  # the documented upper bound of a size argument


def oracle_pair(value, minimum):
    """(h, w) or an error class, as the contract says for an int-or-pair argument."""
    def one(v):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return TypeError
        v = int(v)
        if v < minimum or v > LIMIT:
            return ValueError
        return v

    if isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != 2:
            return ValueError
        a, b = one(value[0]), one(value[1])
        for e in (a, b):
            if isinstance(e, type):
                return e
        return (a, b)
    v = one(value)
    return v if isinstance(v, type) else (v, v)


def errors_of(*values):
    return [v for v in values if isinstance(v, type)]


# ---------------------------------------------------------------------------------------------
# Conv2D

@st.composite
def padding_args(draw):
    r = draw(st.integers(0, 19))
    if r < 3:
        return draw(st.sampled_from(["same", "same", "valid", "full", "SAME", ""]))
    return draw(int_args(0, 2))


@st.composite
def image_input(draw, channels, layouts=LAYOUTS, dtypes=GOOD * 12 + HALF + BAD,
                max_side=5):
    """Mostly (N, C, H, W) with N in 0..2, C = channels, H, W in 1..max_side; sometimes another
    channel count, a zero size or another rank."""
    r = draw(st.integers(0, 9))
    if r == 0:
        shape = draw(odd_shapes())
    else:
        n = draw(st.integers(0, 2)) if draw(st.integers(0, 5)) == 0 else draw(st.integers(1, 2))
        c = channels if draw(st.integers(0, 6)) else draw(st.integers(0, 3))
        h = draw(st.integers(1, max_side)) if draw(st.integers(0, 9)) else 0
        w = draw(st.integers(1, max_side)) if draw(st.integers(0, 9)) else 0
        shape = (n, c, h, w)
    return draw(arrays(shape, dtypes=dtypes, layouts=layouts))


def oracle_conv_config(kernel_size, stride, padding, dilation):
    k, s, d = oracle_pair(kernel_size, 1), oracle_pair(stride, 1), oracle_pair(dilation, 1)
    problems = errors_of(k, s, d)
    pads = None
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if not isinstance(s, type) and s != (1, 1):
                problems.append(ValueError)
            elif not problems:
                th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            problems.append(ValueError)
    else:
        p = oracle_pair(padding, 0)
        if isinstance(p, type):
            problems.append(p)
        else:
            pads = (p[0], p[0], p[1], p[1])
    return problems, k, s, d, pads


def out_size(size, before, after, kernel, stride, dilation=1):
    """Output length, or None when the (dilated) kernel does not fit in the padded input."""
    effective = dilation * (kernel - 1) + 1
    if size + before + after < effective:
        return None
    return (size + before + after - effective) // stride + 1


def grad_array(draw, shape, dtypes=GOOD * 4 + HALF + ("int64", "complex64")):
    """An upstream gradient: mostly of ``shape``, sometimes one dimension off or another rank."""
    r = draw(st.integers(0, 7))
    if r == 0 and len(shape):
        shape = list(shape)
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1, 2])))
        shape = tuple(shape)
    elif r == 1:
        shape = tuple(shape) + (1,) if draw(st.booleans()) or not len(shape) else tuple(shape)[1:]
    return draw(arrays(shape, dtypes=dtypes))


@fuzz(2.0)
@given(data=st.data())
def test_conv2d(data):
    d = data.draw
    dtype = d(st.sampled_from(GOOD))
    cin, cout = d(st.integers(1, 2)), d(st.integers(1, 3))
    ks, stride, dil, pad = d(int_args(1, 3)), d(int_args(1, 3)), d(int_args(1, 2)), d(padding_args())
    bias = d(st.booleans())
    problems, k, s, dl, pads = oracle_conv_config(ks, stride, pad, dil)
    make = lambda: layers.Conv2D(cin, cout, ks, stride=stride, padding=pad, dilation=dil,  # noqa: E731
                                 bias=bias, dtype=dtype, rng=d(st.integers(0, 99)))
    if problems:
        expect_error(make, predicted(problems), "Conv2D")
        return tally("Conv2D.__init__", "invalid")
    layer = make()
    tally("Conv2D.__init__", "valid")

    x = d(image_input(cin))
    snap = snapshot(x)
    xa = np.asarray(x)
    problems = []
    if kind(xa) != "f":
        problems = [TypeError]
    elif xa.ndim != 4 or xa.shape[1] != cin or xa.shape[2] < 1 or xa.shape[3] < 1:
        problems = [ValueError]
    else:
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


# ---------------------------------------------------------------------------------------------
# pooling

@fuzz(1.5)
@given(data=st.data(), cls=st.sampled_from([layers.MaxPool2D, layers.AvgPool2D]))
def test_pool2d(data, cls):
    d = data.draw
    name = cls.__name__
    ks, pad = d(int_args(1, 3)), d(int_args(0, 1))
    stride = None if d(st.booleans()) else d(int_args(1, 3))
    k = oracle_pair(ks, 1)
    s = k if stride is None else oracle_pair(stride, 1)
    p = oracle_pair(pad, 0)
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
    elif (out_size(xa.shape[2], p[0], p[0], k[0], s[0]) is None
          or out_size(xa.shape[3], p[1], p[1], k[1], s[1]) is None):
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


# ---------------------------------------------------------------------------------------------
# batch normalisation

NUMBERS = (0.0, 1e-5, 0.1, 0.5, 1.0, 1.5, -0.1, float("nan"), float("inf"), "0.1", None, True)


@fuzz(1.5)
@given(data=st.data(), cls=st.sampled_from([layers.BatchNorm2D, layers.BatchNorm1D]),
       training=st.booleans())
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
        if not math.isfinite(v) or (v <= low if low_open else v < low) or (high is not None and v > high):
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
        shape = (d(odd_shapes()) if r == 0 else (n, c) if r < 5
                 else (n, c if r < 9 else c + 1, d(st.integers(0, 3))))
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
        assert_close(layer.running_var, (1 - m) * f64(rv0) + m * var * count / (count - 1), dtype,
                     "running_var")
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
    shape = d(odd_shapes()) if r == 0 else (n, fin) if r < 8 else (n, fin + d(st.sampled_from([-1, 1])))
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
        slope = d(st.sampled_from([0.01, 0.2, 0.0, -0.5, 3, float("nan"), float("inf"), "0.1", None]))
        bad = (TypeError if isinstance(slope, (str, type(None))) else
               ValueError if not math.isfinite(slope) else None)
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
    ey, ex = _reference(name, f64(xa), f64(dya) if dya.shape == xa.shape and kind(dya) == "f"
                        else np.zeros(xa.shape), layer)
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
        ex = {"Tanh": lambda: dy64 * (1 - y64 * y64),
              "Sigmoid": lambda: dy64 * y64 * (1 - y64),
              "Softmax": lambda: y64 * (dy64 - np.sum(dy64 * y64, axis=layer.dim, keepdims=True))}[name]()
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
    bad = (TypeError if isinstance(p, (str, type(None))) else
           ValueError if not 0 <= p <= 1 else None)
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
