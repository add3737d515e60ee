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
import functools
import gzip
import itertools
import json
import math
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    """Count one fuzzed case: ``outcome`` is "valid" (result checked) or "invalid" (error
    checked)."""
    COUNTS[f"{case}:{outcome}"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    path = os.environ.get("FASTCNN_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(
                {"counts": dict(COUNTS), "boundscheck": BOUNDSCHECK, "examples_setting": EXAMPLES},
                f,
            )


def fuzz(weight=1.0):
    """Hypothesis settings for a fuzz case (``weight`` x FASTCNN_FUZZ_EXAMPLES examples), and a
    counter of the examples it runs (hypothesis' documented ``inner_test`` hook)."""

    def decorate(test):
        inner = test.hypothesis.inner_test

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            COUNTS[f"examples:{inner.__name__}"] += 1
            return inner(*args, **kwargs)

        test.hypothesis.inner_test = counted
        return settings(
            max_examples=max(2, int(EXAMPLES * weight)),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )(test)

    return decorate


# ---------------------------------------------------------------------------------------------
# arrays

GOOD = ("float32", "float64")
HALF = ("float16",)
BAD = ("int32", "int64", "uint8", "bool", "complex64", "complex128")
LAYOUTS = (
    "c",
    "c",
    "c",
    "channels_last",
    "fortran",
    "strided",
    "reversed",
    "swapped",
    "readonly",
    "list",
)


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
    if layout == "channels_last" and a.ndim == 4:  # a convolution's output: NHWC memory
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
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
def arrays(draw, shape, dtypes=GOOD * 12 + HALF + BAD, special=None, layouts=LAYOUTS, scale=1.0):
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
        assert np.array_equal(bad_a, bad_e), (
            f"{what}: non-finite at {np.argwhere(bad_a != bad_e)[:5]}"
        )
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
BAD_INT_VALUES = (
    2.0,
    1.5,
    "3",
    None,
    True,
    False,
    (1, 2, 3),
    (1,),
    (),
    (2, None),
    (2.0, 2),
    float("nan"),
    b"2",
    1j,
)
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
def image_input(draw, channels, layouts=LAYOUTS, dtypes=GOOD * 12 + HALF + BAD, max_side=5):
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


# ---------------------------------------------------------------------------------------------
# Sequential: forward, backward, summary, predict and load_state_dict against a twin model whose
# layers are run one by one


@st.composite
def stacks(draw):
    """(layers, input shape): a random stack that mostly fits its input, sometimes not."""
    dtype = draw(st.sampled_from(GOOD + ("float32",)))
    # 32 channels sometimes: a Conv2D -> ReLU -> MaxPool2D block's backward then takes the max
    # pool shortcut (kernels/fused.py), which needs a multiple of 32
    n, c = draw(st.integers(0, 2)), draw(st.sampled_from([1, 2, 1, 2, 32]))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shape = [n, c, h, w]
    out = []
    for _ in range(draw(st.integers(1, 5))):
        off = draw(
            st.sampled_from([0] * 12 + [1, -1])
        )  # a channel / feature count that does not fit
        seed = draw(st.integers(0, 99))
        choice = draw(
            st.sampled_from(
                [
                    "conv",
                    "maxpool",
                    "avgpool",
                    "bn",
                    "act",
                    "dropout",
                    "flatten",
                    "dense",
                    "softmax",
                    "block",
                    "block",
                ]
            )
        )
        if len(shape) == 4 and choice == "block":
            # Conv2D -> ReLU -> MaxPool2D: the run Sequential executes as one fused kernel
            k, p, f = draw(st.integers(1, 3)), draw(st.integers(0, 1)), draw(st.integers(1, 40))
            pool = draw(st.integers(1, 3))
            out += [
                layers.Conv2D(max(1, shape[1] + off), f, k, padding=p, dtype=dtype, rng=seed),
                layers.ReLU(),
                layers.MaxPool2D(pool),
            ]
            shape = [n, f, (shape[2] + 2 * p - k + 1) // pool, (shape[3] + 2 * p - k + 1) // pool]
        elif len(shape) == 4 and choice in ("conv", "maxpool", "avgpool", "bn"):
            if choice == "conv":
                k, p, f = draw(st.integers(1, 3)), draw(st.integers(0, 1)), draw(st.integers(1, 3))
                out.append(
                    layers.Conv2D(max(1, shape[1] + off), f, k, padding=p, dtype=dtype, rng=seed)
                )
                shape = [n, f, shape[2] + 2 * p - k + 1, shape[3] + 2 * p - k + 1]
            elif choice in ("maxpool", "avgpool"):
                k = draw(st.integers(1, 2))
                cls = layers.MaxPool2D if choice == "maxpool" else layers.AvgPool2D
                out.append(cls(k))
                shape = [n, shape[1], shape[2] // k, shape[3] // k]
            else:
                out.append(layers.BatchNorm2D(max(1, shape[1] + off), dtype=dtype))
        elif choice in ("flatten", "dense", "bn") or (choice == "conv" and len(shape) == 2):
            if len(shape) == 4:
                out.append(layers.Flatten())
                shape = [n, shape[1] * shape[2] * shape[3]]
            elif choice == "bn":
                out.append(layers.BatchNorm1D(max(1, shape[1] + off), dtype=dtype))
            else:
                f = draw(st.integers(1, 4))
                out.append(layers.Dense(max(1, shape[1] + off), f, dtype=dtype, rng=seed))
                shape = [n, f]
        elif choice == "act":
            out.append(
                draw(
                    st.sampled_from([layers.ReLU, layers.Tanh, layers.Sigmoid, layers.LeakyReLU])
                )()
            )
        elif choice == "dropout":
            out.append(layers.Dropout(draw(st.sampled_from([0.0, 0.3, 0.5])), seed=seed))
        else:
            out.append(layers.Softmax(1))
    return out, (n, c, h, w)


def _run_chain(layer_list, x):
    """Forward one layer at a time: ("ok", y) or ("error", index, exception)."""
    for i, layer in enumerate(layer_list):
        try:
            x = layer.forward(x)
        except (ValueError, TypeError) as exc:
            return ("error", i, exc)
    return ("ok", x)


def _run_chain_backward(layer_list, dy):
    """Backward one layer at a time (after ``_run_chain``): ("ok", dx) or ("error", index, exc)."""
    for i, layer in reversed(list(enumerate(layer_list))):
        try:
            dy = layer.backward(dy)
        except (ValueError, TypeError) as exc:
            return ("error", i, exc)
    return ("ok", dy)


def _twin(model):
    twin = from_config(model.get_config())
    twin.load_state_dict(model.state_dict())
    twin.set_rng_state(json.loads(json.dumps(model.get_rng_state())))
    return twin.train(model.training)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k], equal_nan=True) for k in sa
    )


def _grads(model):
    return [p.grad.copy() for p in model.parameters()]


@fuzz(1.5)
@given(data=st.data(), spec=stacks(), training=st.booleans())
def test_sequential(data, spec, training):
    d = data.draw
    layer_list, shape = spec
    model = Sequential(layer_list).train(training)
    twin = _twin(model)
    if d(st.integers(0, 7)) == 0:
        shape = d(odd_shapes())
    x = d(arrays(shape, dtypes=GOOD * 6 + HALF + ("int64", "complex64")))
    snap = snapshot(x)
    expected = _run_chain(twin.layers, x)
    if expected[0] == "error":
        _, i, exc = expected
        name = type(layer_list[i]).__name__
        got = expect_error(lambda: model(x), type(exc), name)
        assert str(got) == str(exc)
        tally("Sequential.forward", "invalid")
        xa = np.asarray(x)
        if (
            kind(xa) == "f"
            and xa.dtype.itemsize in (4, 8)
            and isinstance(exc, ValueError)
            and "more than 1 value per channel" not in str(exc)
        ):
            # summary() checks the same shapes without computing anything
            expect_error(lambda: model.summary(xa.shape, print_fn=None), ValueError, name)
            tally("Sequential.summary", "invalid")
        return
    y = model(x)
    assert unchanged(x, snap)
    assert np.array_equal(y, expected[1], equal_nan=True) and y.dtype == expected[1].dtype
    assert _same_state(model, twin)  # BatchNorm running statistics updated the same way
    tally("Sequential.forward", "valid")
    xa = np.asarray(x)
    if kind(xa) == "f" and xa.dtype.itemsize in (4, 8):
        text = model.summary(xa.shape, print_fn=None)
        assert text.rstrip().endswith(f"Output shape: {tuple(y.shape)}"), text
        tally("Sequential.summary", "valid")

    dy = grad_array(d, y.shape, dtypes=(y.dtype.name,) * 6 + ("float16", "int64"))
    expected = _run_chain_backward(twin.layers, dy)
    if expected[0] == "error":
        _, i, exc = expected
        got = expect_error(lambda: model.backward(dy), type(exc), type(layer_list[i]).__name__)
        assert str(got) == str(exc)
        tally("Sequential.backward", "invalid")
    else:
        # input_grad=False (what fit does): a first Conv2D or Dense computes no input gradient
        # (below a max pool: the weight gradient from the pooled gradient, dy rebuilt in cache)
        input_grad = d(st.booleans())
        dx = model.backward(dy, input_grad=input_grad)
        if input_grad:
            assert np.array_equal(dx, expected[1], equal_nan=True)
            assert dx.dtype == expected[1].dtype
        else:
            assert dx is None
        for g, h in zip(_grads(model), _grads(twin), strict=True):
            assert np.array_equal(g, h, equal_nan=True)
        tally("Sequential.backward", "valid")

    # predict: eval mode, in batches, the mode restored
    bs = d(st.sampled_from([1, 2, 3, 256, 0, -1, 1.5, None]))
    if isinstance(bs, (float, type(None))):
        expect_error(lambda: model.predict(x, bs), TypeError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    if bs < 1:
        expect_error(lambda: model.predict(x, bs), ValueError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    twin.eval()
    xs = np.asarray(x)
    if xs.ndim < 1:
        expect_error(lambda: model.predict(x, bs), ValueError, "Sequential.predict")
        return tally("Sequential.predict", "invalid")
    chunks = [xs] if xs.shape[0] <= bs else [xs[i : i + bs] for i in range(0, xs.shape[0], bs)]
    outs = [_run_chain(twin.layers, chunk) for chunk in chunks]
    if any(o[0] == "error" for o in outs):
        o = next(o for o in outs if o[0] == "error")
        expect_error(lambda: model.predict(x, bs), type(o[2]), type(layer_list[o[1]]).__name__)
        tally("Sequential.predict", "invalid")
    else:
        p = model.predict(x, bs)
        e = outs[0][1] if len(outs) == 1 else np.concatenate([o[1] for o in outs])
        assert np.array_equal(p, e, equal_nan=True)
        tally("Sequential.predict", "valid")
    assert model.training == training and all(la.training == training for la in model.layers)


@fuzz(1.0)
@given(data=st.data(), spec=stacks(), strict=st.booleans())
def test_load_state_dict(data, spec, strict):
    d = data.draw
    model = Sequential(spec[0])
    before = model.state_dict()
    state = {k: v + 1 for k, v in before.items()}  # new values of the right shapes and dtypes
    how = d(
        st.sampled_from(
            ["ok", "ok", "drop", "add", "shape", "dtype", "list", "scalar", "not a dict", "nan"]
        )
    )
    keys = sorted(state)
    key = d(st.sampled_from(keys)) if keys else None
    problem = None
    if how == "drop" and key:
        del state[key]
        problem = ValueError if strict else None
    elif how == "add":
        state["99.weight"] = np.zeros(3, np.float32)
        problem = ValueError if strict else None
    elif how == "shape" and key:
        state[key] = np.zeros(state[key].shape + (1,), state[key].dtype)
        problem = ValueError
    elif how == "dtype" and key:
        state[key] = state[key].astype(np.float16)
        problem = ValueError
    elif how == "list" and key:
        state[key] = state[key].tolist()  # becomes float64 (or a float64 scalar)
        problem = (
            None
            if state
            and np.asarray(state[key]).dtype == before[key].dtype
            and np.asarray(state[key]).shape == before[key].shape
            else ValueError
        )
    elif how == "scalar" and key:
        state[key] = 1.0
        problem = (
            None if before[key].shape == () and before[key].dtype == np.float64 else ValueError
        )
    elif how == "not a dict":
        state = list(state.items())
        problem = TypeError
    elif how == "nan" and key:
        state[key] = np.full_like(state[key], np.nan)
    if problem:
        expect_error(lambda: model.load_state_dict(state, strict=strict), problem, "Sequential")
        after = model.state_dict()
        assert all(np.array_equal(after[k], before[k]) for k in before), "half-loaded"
        return tally("Sequential.load_state_dict", "invalid")
    model.load_state_dict(state, strict=strict)
    after = model.state_dict()
    for k in before:
        want = np.asarray(state[k]) if k in state else before[k]
        assert after[k].dtype == before[k].dtype
        assert np.array_equal(after[k], want.astype(before[k].dtype), equal_nan=True), k
    tally("Sequential.load_state_dict", "valid")


# ---------------------------------------------------------------------------------------------
# losses


def _ce_problem(logits, labels):
    if not isinstance(logits, np.ndarray) or logits.dtype.kind != "f":
        return TypeError
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        return ValueError
    la = np.asarray(labels)
    if la.dtype.kind not in "iu":
        return TypeError
    if la.shape != (logits.shape[0],):
        return ValueError
    if la.min() < 0 or la.max() >= logits.shape[1]:
        return ValueError
    return None


@fuzz(1.5)
@given(data=st.data())
def test_cross_entropy(data):
    d = data.draw
    eps = d(st.sampled_from([0.0, 0.0, 0.1, 1.0, -0.1, 1.5, float("nan"), "0.1", None, True]))
    reduction = d(st.sampled_from(["mean", "mean", "sum", "none", "avg", None]))
    bad_eps = isinstance(eps, (str, type(None), bool)) or not 0 <= eps <= 1
    if bad_eps or reduction not in ("mean", "sum", "none"):
        expect_error(
            lambda: losses.CrossEntropyLoss(eps, reduction=reduction),
            (ValueError, TypeError),
            "CrossEntropyLoss",
        )
        return tally("CrossEntropyLoss.__init__", "invalid")
    loss_fn = losses.CrossEntropyLoss(eps, reduction=reduction)
    tally("CrossEntropyLoss.__init__", "valid")
    n, c = d(st.integers(1, 5)), d(st.integers(1, 6))
    shape = (n, c) if d(st.integers(0, 7)) else d(odd_shapes())
    logits = d(
        arrays(
            shape,
            dtypes=GOOD * 6 + HALF + ("int64", "complex64", "bool"),
            layouts=("c", "c", "fortran", "strided", "readonly", "swapped", "list"),
            scale=d(st.sampled_from([1.0, 1.0, 10.0, 100.0])),
        )
    )
    r = d(st.integers(0, 11))
    rng = np.random.default_rng(d(st.integers(0, 99)))
    if r < 8:  # valid labels in a random integer dtype
        labels = rng.integers(0, c, n).astype(
            d(st.sampled_from(["int64", "int32", "uint8", "int8"]))
        )
    elif r == 8:
        labels = rng.integers(-2, c + 2, n)  # out of range
    elif r == 9:
        labels = rng.integers(0, c, n).astype(d(st.sampled_from(["float32", "bool", "complex64"])))
    elif r == 10:
        labels = rng.integers(0, c, (n, 1))  # wrong shape
    else:
        labels = rng.integers(0, c, n + 1)
    if d(st.booleans()):
        labels = relayout(
            labels, d(st.sampled_from(["strided", "reversed", "readonly", "swapped"]))
        )
    snap, lsnap = snapshot(logits), snapshot(labels)
    problem = _ce_problem(logits, labels)
    if problem:
        expect_error(lambda: loss_fn(logits, labels), problem, "CrossEntropyLoss")
        return tally("CrossEntropyLoss.forward", "invalid")
    loss = loss_fn(logits, labels)
    assert unchanged(logits, snap) and unchanged(labels, lsnap)
    expected, grad = naive_losses.softmax_cross_entropy(
        f64(logits), np.asarray(labels, np.int64), eps
    )
    dtype = native(logits.dtype)
    with np.errstate(all="ignore"):
        if reduction == "none":
            per = np.array(
                [
                    naive_losses.softmax_cross_entropy(
                        f64(logits)[i : i + 1], np.asarray(labels, np.int64)[i : i + 1], eps
                    )[0]
                    for i in range(n)
                ]
            )
            assert_close(loss, per, dtype, "CrossEntropyLoss per-sample loss", loose=True)
            grad = grad * n
        else:
            assert isinstance(loss, float)
            factor = n if reduction == "sum" else 1
            assert_close(
                np.asarray(loss, dtype),
                np.asarray(expected * factor),
                dtype,
                "CrossEntropyLoss loss",
                loose=True,
            )
            grad = grad * factor
        dlogits = loss_fn.backward()
    assert_close(dlogits, grad, dtype, "CrossEntropyLoss gradient", loose=True)
    tally("CrossEntropyLoss.forward", "valid")


@fuzz(1.0)
@given(data=st.data())
def test_mse(data):
    d = data.draw
    loss_fn = losses.MSELoss()
    shape = tuple(d(st.lists(st.integers(0, 4), max_size=3)))
    x = d(
        arrays(
            shape,
            dtypes=GOOD * 6 + HALF + ("int64", "complex64"),
            layouts=("c", "fortran", "strided", "readonly", "swapped", "list"),
        )
    )
    tshape = shape if d(st.integers(0, 5)) else d(st.sampled_from([shape + (1,), (1,), (), (2, 2)]))
    t = d(
        arrays(
            tshape,
            dtypes=GOOD * 4 + ("int64", "uint8", "bool", "complex64"),
            layouts=("c", "strided", "readonly", "list"),
        )
    )
    xa, ta = np.asarray(x), np.asarray(t)
    if not isinstance(x, np.ndarray) or xa.dtype.kind != "f" or ta.dtype.kind not in "fiu":
        problem = TypeError
    elif ta.shape != xa.shape or xa.size == 0:
        problem = ValueError
    else:
        problem = None
    if problem:
        expect_error(lambda: loss_fn(x, t), problem, "MSELoss")
        return tally("MSELoss.forward", "invalid")
    dtype = native(xa.dtype)
    loss = loss_fn(x, t)
    expected, grad = naive_losses.mse(f64(xa), f64(ta.astype(dtype)))
    with np.errstate(all="ignore"):
        assert_close(
            np.asarray(loss, dtype), np.asarray(expected), dtype, "MSELoss loss", loose=True
        )
        assert_close(loss_fn.backward(), grad, dtype, "MSELoss gradient", loose=True)
    tally("MSELoss.forward", "valid")


# ---------------------------------------------------------------------------------------------
# optimizers and schedulers, against a float64 reference of PyTorch's update rules


class _P:
    def __init__(self, data, grad):
        self.data, self.grad = data, grad


def _reference_steps(kind_, hyper, p0, grads):
    """Parameters after len(grads) steps, in float64 (torch.optim's formulas)."""
    p = [f64(a) for a in p0]
    state = [dict() for _ in p]
    for _step, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            if g is None:
                continue
            g = f64(g)
            s = state[i]
            lr, wd = hyper["lr"], hyper["weight_decay"]
            if kind_ == "SGD":
                g = g + wd * p[i]
                if hyper["momentum"]:
                    s["buf"] = (
                        g.copy()
                        if "buf" not in s
                        else (hyper["momentum"] * s["buf"] + (1 - hyper["dampening"]) * g)
                    )
                    g = g + hyper["momentum"] * s["buf"] if hyper["nesterov"] else s["buf"]
                p[i] = p[i] - lr * g
            else:
                b1, b2 = hyper["betas"]
                if kind_ == "AdamW":
                    p[i] = p[i] * (1 - lr * wd)
                else:
                    g = g + wd * p[i]
                s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
                s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
                s["t"] = s.get("t", 0) + 1
                denom = np.sqrt(s["v"]) / math.sqrt(1 - b2 ** s["t"]) + hyper["eps"]
                p[i] = p[i] - lr / (1 - b1 ** s["t"]) * s["m"] / denom
    return p


HYPER_BAD = (-0.1, float("nan"), float("inf"), "0.1", None, True)


@fuzz(1.5)
@given(data=st.data(), kind_=st.sampled_from(["SGD", "Adam", "AdamW"]))
def test_optimizer(data, kind_):
    d = data.draw
    cls = getattr(optim, kind_)

    def val(good):
        return d(
            st.sampled_from(good + list(HYPER_BAD))
            if d(st.integers(0, 19)) == 0
            else st.sampled_from(good)
        )

    if kind_ == "SGD":
        hyper = dict(
            lr=val([0.1, 0.01, 1.0, 0.0]),
            momentum=val([0.0, 0.9, 0.5]),
            dampening=val([0.0, 0.0, 0.1]),
            nesterov=d(st.sampled_from([False, True, 1, None])),
            weight_decay=val([0.0, 0.01]),
        )
    else:
        b = d(
            st.sampled_from(
                [(0.9, 0.999), (0.0, 0.5), (0.5, 0.0), (0.8, 0.99)] * 6
                + [(1.0, 0.9), (0.9, -0.1), (0.9,), "ab", None, (float("nan"), 0.9)]
            )
        )
        hyper = dict(
            lr=val([1e-3, 0.1, 0.0]),
            betas=b,
            eps=val([1e-8, 1e-3, 0.0]),
            weight_decay=val([0.0, 0.01, 0.1]),
        )

    def bad_number(v):
        return isinstance(v, (str, type(None), bool)) or not (math.isfinite(v) and v >= 0)

    problems = [k for k, v in hyper.items() if k not in ("betas", "nesterov") and bad_number(v)]
    if kind_ == "SGD":
        nest = hyper["nesterov"]
        if not isinstance(nest, bool):
            problems.append("nesterov")
        elif nest and not problems and not (hyper["momentum"] > 0 and hyper["dampening"] == 0):
            problems.append("nesterov")
    else:
        b = hyper["betas"]
        if not (
            isinstance(b, tuple)
            and len(b) == 2
            and all(isinstance(v, float) and 0 <= v < 1 for v in b)
        ):
            problems.append("betas")
    dtype = d(st.sampled_from(GOOD))
    shapes = d(st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=1, max_size=3))
    rng = np.random.default_rng(d(st.integers(0, 99)))
    params = [layers.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    what = d(
        st.sampled_from(
            ["ok"] * 24 + ["empty", "duplicate", "ndarray", "int", "readonly", "object"]
        )
    )
    plist = list(params)
    if what == "empty":
        plist, problems = [], problems + ["params"]
    elif what == "duplicate":
        plist, problems = plist + plist[:1], problems + ["params"]
    elif what == "ndarray":
        plist, problems = params[0].data, problems + ["params"]
    elif what == "int":
        plist, problems = plist + [_P(np.arange(3), np.zeros(3, np.int64))], problems + ["params"]
    elif what == "readonly":
        ro = np.ones(3, dtype)
        ro.flags.writeable = False
        plist, problems = plist + [_P(ro, np.zeros(3, dtype))], problems + ["params"]
    elif what == "object":
        plist, problems = plist + ["weight"], problems + ["params"]
    if problems:
        expect_error(lambda: cls(plist, **hyper), (ValueError, TypeError), kind_)
        return tally(f"{kind_}.__init__", "invalid")
    opt = cls(plist, **hyper)
    tally(f"{kind_}.__init__", "valid")
    p0 = [p.data.copy() for p in params]
    steps = d(st.integers(1, 3))
    grads = []
    for _ in range(steps):
        gs = []
        for p in params:
            if d(st.integers(0, 9)) == 0:
                g = None
            else:
                g = rng.standard_normal(p.shape).astype(dtype)
                if g.size and d(st.integers(0, 9)) == 0:
                    g.reshape(-1)[0] = np.nan
            gs.append(g)
        grads.append(gs)
    bad_grad = d(st.sampled_from([None] * 10 + ["shape", "dtype", "list"]))
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.copy()
        if bad_grad is not None:
            p = params[0]
            p.grad = {
                "shape": np.zeros(p.shape + (2,), dtype),
                "list": [0.0] * max(1, p.size),
                "dtype": np.zeros(p.shape, np.float16),
            }[bad_grad]
            before = [q.data.copy() for q in params]
            expect_error(opt.step, (ValueError, TypeError), kind_)
            # (parameters before the bad one may have been updated: the check is per parameter)
            assert all(
                np.array_equal(q.data, b, equal_nan=True)
                for q, b in zip(params[:1], before[:1], strict=True)
            )
            return tally(f"{kind_}.step", "invalid")
        opt.step()
    ref = _reference_steps(
        kind_,
        {k: (float(v) if not isinstance(v, (tuple, bool)) else v) for k, v in hyper.items()},
        p0,
        grads,
    )
    with np.errstate(all="ignore"):
        for p, r in zip(params, ref, strict=True):
            assert_close(p.data, r, dtype, f"{kind_} parameter")
    tally(f"{kind_}.step", "valid")
    # state_dict round trip into a fresh optimizer continues identically
    clone_params = [layers.Parameter(p.data) for p in params]
    clone = cls(clone_params, **hyper)
    clone.load_state_dict(opt.state_dict())
    for p, q in zip(params, clone_params, strict=True):
        g = rng.standard_normal(p.shape).astype(dtype)
        p.grad, q.grad = g.copy(), g.copy()
    opt.step()
    clone.step()
    assert all(
        np.array_equal(p.data, q.data, equal_nan=True)
        for p, q in zip(params, clone_params, strict=True)
    )
    tally(f"{kind_}.load_state_dict", "valid")


@fuzz(0.5)
@given(
    kind_=st.sampled_from(["StepLR", "CosineAnnealingLR"]),
    a=st.sampled_from([1, 3, 10, 0, -1, 2.5, None, True]),
    b=st.sampled_from([0.1, 0.5, 0.0, 1.0, -0.1, float("nan"), "x"]),
    steps=st.integers(0, 12),
)
def test_scheduler(kind_, a, b, steps):
    opt = optim.SGD([layers.Parameter(np.zeros(2))], lr=0.1)
    cls = getattr(optim, kind_)
    bad = (
        isinstance(a, (bool, float, type(None)))
        or a < 1
        or isinstance(b, str)
        or not (math.isfinite(b) and b >= 0)
    )
    if bad:
        expect_error(lambda: cls(opt, a, b), (ValueError, TypeError), kind_)
        return tally(f"{kind_}.__init__", "invalid")
    sched = cls(opt, a, b)
    for _ in range(steps):
        sched.step()
    expected = (
        0.1 * b ** (steps // a)
        if kind_ == "StepLR"
        else b + (0.1 - b) * (1 + math.cos(math.pi * steps / a)) / 2
    )
    assert math.isclose(
        opt.lr, max(expected, 0.0) if kind_ == "StepLR" else expected, rel_tol=1e-12, abs_tol=1e-15
    ) or (expected < 0 and opt.lr >= 0)
    tally(f"{kind_}.step", "valid")


# ---------------------------------------------------------------------------------------------
# data set readers: valid, truncated, extended, bit-flipped and random IDX files, gzipped or not

import tempfile  # noqa: E402

_TMP = tempfile.mkdtemp(prefix="fastcnn-fuzz-")


def _idx_bytes(which, count, rng, bad_label=False):
    if which == "images":
        header = np.array([2051, count, 28, 28], ">u4").tobytes()
        return header + rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes()
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    if bad_label and count:
        labels[rng.integers(0, count)] = rng.integers(10, 256)
    return np.array([2049, count], ">u4").tobytes() + labels.tobytes()


def _expected_idx(which, raw):
    """The array the spec says ``raw`` (decompressed) holds, or None when it must be refused."""
    n_ints, magic = (4, 2051) if which == "images" else (2, 2049)
    if len(raw) < 4 * n_ints:
        return None
    head = np.frombuffer(raw, ">u4", count=n_ints)
    if int(head[0]) != magic:
        return None
    if which == "images":
        count, rows, cols = (int(v) for v in head[1:])
        if (rows, cols) != (28, 28) or len(raw) != 16 + count * 784:
            return None
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28)
    count = int(head[1])
    if len(raw) != 8 + count:
        return None
    labels = np.frombuffer(raw, np.uint8, offset=8)
    return None if count and labels.max() >= 10 else labels


def _mutate(raw, how, rng):
    b = bytearray(raw)
    if how == "truncate" and b:
        return bytes(b[: int(rng.integers(0, len(b)))])
    if how == "extend":
        return bytes(b) + rng.integers(0, 256, int(rng.integers(1, 5)), dtype=np.uint8).tobytes()
    if how == "flip" and b:
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if how == "random":
        return rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    if how == "header" and len(b) >= 8:
        i = int(rng.integers(0, 8))
        b[i] = int(rng.integers(0, 256))
        return bytes(b)
    return bytes(b)


def _check_idx_read(which, path, payload, expected_count):
    reader = datasets.read_idx_images if which == "images" else datasets.read_idx_labels
    try:
        raw = gzip.decompress(payload) if path.endswith(".gz") else payload
    except (OSError, EOFError, Exception):
        raw = None
    expected = None if raw is None else _expected_idx(which, raw)
    if expected is not None and expected_count is not None and len(expected) != expected_count:
        expected = None
    if expected is None:
        exc = expect_error(lambda: reader(path, expected_count=expected_count), ValueError, path)
        assert isinstance(exc, datasets.DatasetFileError)
        return "invalid"
    got = reader(path, expected_count=expected_count)
    assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
    assert not got.flags.writeable
    return "valid"


@fuzz(1.0)
@given(data=st.data(), which=st.sampled_from(["images", "labels"]), gz=st.booleans())
def test_idx_files(data, which, gz):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    count = d(st.integers(0, 3))
    raw = _idx_bytes(which, count, rng, bad_label=d(st.integers(0, 5)) == 0)
    how = d(st.sampled_from(["none", "none", "truncate", "extend", "flip", "random", "header"]))
    after_gzip = gz and d(st.booleans())  # corrupt the compressed bytes instead of the content
    payload = raw if after_gzip else _mutate(raw, how, rng)
    if gz:
        payload = gzip.compress(payload, mtime=0)
        if after_gzip:
            payload = _mutate(payload, how, rng)
    # the same path for every example: a file replaced by another one must never be served
    # from the reader's in-memory cache
    path = os.path.join(_TMP, f"{which}-idx-ubyte" + (".gz" if gz else ""))
    with open(path, "wb") as f:
        f.write(payload)
    if d(st.booleans()):  # a coarse clock: every write gets the same old timestamp
        os.utime(path, ns=(10**18, 10**18))
    expected_count = d(st.sampled_from([None, None, count, count + 1]))
    tally("datasets.read_idx", _check_idx_read(which, path, payload, expected_count))
    # then replaced in place by a same-size file with one byte changed, at once
    if payload and d(st.booleans()):
        b = bytearray(payload)
        b[int(rng.integers(0, len(b)))] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(b))
        if d(st.booleans()):
            os.utime(path, ns=(10**18, 10**18))
        tally(
            "datasets.read_idx (rewritten)", _check_idx_read(which, path, bytes(b), expected_count)
        )


@fuzz(0.3)
@given(data=st.data())
def test_load_dataset_folder(data):
    """A data folder with some files missing, tiny, empty or random: a clear error every time."""
    d = data.draw
    root = tempfile.mkdtemp(dir=_TMP)
    name = d(st.sampled_from(["mnist", "fashion-mnist"]))
    folder = os.path.join(root, name)
    os.makedirs(folder)
    rng = np.random.default_rng(d(st.integers(0, 99)))
    present = []
    for base in datasets.DATASETS[name]["files"]:
        choice = d(st.sampled_from(["missing", "tiny", "empty", "random", "gz-random"]))
        if choice == "missing":
            continue
        which = "images" if "images" in base else "labels"
        content = {
            "tiny": _idx_bytes(which, 2, rng),
            "empty": b"",
            "random": rng.integers(0, 256, 40, dtype=np.uint8).tobytes(),
        }.get(choice)
        path = os.path.join(folder, base + (".gz" if choice == "gz-random" else ""))
        with open(path, "wb") as f:
            f.write(
                rng.integers(0, 256, 30, dtype=np.uint8).tobytes() if content is None else content
            )
        present.append(base)
    if len(present) < 4:
        with pytest.raises(datasets.DatasetNotFoundError) as info:
            datasets.load_dataset(name, root=root, download=False)
        assert folder in str(info.value)
    else:
        with pytest.raises(datasets.DatasetFileError) as info:
            datasets.load_dataset(name, root=root, download=False)
        assert folder in str(info.value)
    tally("datasets.load_dataset", "invalid")


# ---------------------------------------------------------------------------------------------
# the command line: random options, in process; an error is status 2 and one line, never a
# traceback (and nothing trains: the data folder is empty and downloads are off)

import contextlib  # noqa: E402
import io  # noqa: E402

from fastcnn import cli  # noqa: E402

_CLI_DIR = tempfile.mkdtemp(prefix="fastcnn-fuzz-cli-")
_EMPTY_DATA = os.path.join(_CLI_DIR, "data")
os.makedirs(_EMPTY_DATA)
_CORRUPT = os.path.join(_CLI_DIR, "corrupt.safetensors")
with open(_CORRUPT, "wb") as _f:
    _f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
_PLAIN_CKPT = os.path.join(_CLI_DIR, "plain.safetensors")
ckpt_mod.save(_PLAIN_CKPT, Sequential([layers.Flatten(), layers.Dense(784, 10, rng=0)]), epoch=1)

_NUMBERS = [
    "0",
    "1",
    "3",
    "-1",
    "-0",
    "2.5",
    "1e-3",
    "1e400",
    "-1e-3",
    "nan",
    "inf",
    "-inf",
    "",
    " ",
    "0x10",
    "1_000",
    "٣",
    "three",
    "1e",
    "--",
    "-",
    "9" * 30,
    "0.1",
    "1.0",
    "5000",
]
_OPTIONS = {
    "--epochs": _NUMBERS,
    "--batch-size": _NUMBERS,
    "--lr": _NUMBERS,
    "--momentum": _NUMBERS,
    "--weight-decay": _NUMBERS,
    "--seed": _NUMBERS,
    "--val-split": _NUMBERS + ["0.999", "1"],
    "--limit": _NUMBERS,
    "--threads": _NUMBERS + ["2", "1"],
    "--optimizer": ["sgd", "adam", "adamw", "SGD", "rmsprop", ""],
    "--scheduler": ["none", "cosine", "step", ""],
    "--dataset": ["mnist", "fashion-mnist", "cifar"],
    "--out": [
        os.path.join(_CLI_DIR, "run.safetensors"),
        os.path.join(_CLI_DIR, "nope", "x"),
        _CLI_DIR,
        "",
        "\x00",
    ],
    "--resume": [_CORRUPT, _PLAIN_CKPT, os.path.join(_CLI_DIR, "missing"), _CLI_DIR, ""],
    "--data-dir": [_EMPTY_DATA, os.path.join(_CLI_DIR, "missing"), _CORRUPT],
    "--bogus": ["1"],
}
_FLAGS = ["--no-progress", "--no-download", "--help", "--version", "-h"]


@st.composite
def argvs(draw):
    command = draw(
        st.sampled_from(["train"] * 6 + ["evaluate"] * 2 + ["summary", "frobnicate", ""])
    )
    argv = [command] if command else []
    options = draw(st.lists(st.sampled_from(sorted(_OPTIONS)), max_size=5))
    for option in options:
        argv += [option, draw(st.sampled_from(_OPTIONS[option]))]
    if command in ("evaluate", "summary") or draw(st.integers(0, 9)) == 0:
        if draw(st.integers(0, 3)):
            argv.append(
                draw(st.sampled_from([_CORRUPT, _PLAIN_CKPT, os.path.join(_CLI_DIR, "m"), ""]))
            )
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(_FLAGS)))
    # nothing may train or download: an empty data folder, downloads off
    argv += ["--no-download", "--data-dir", _EMPTY_DATA] if command in ("train", "evaluate") else []
    return argv


def _value_ok(option, text):
    """Whether the command line accepts ``text`` for ``option`` (None: not a checked option)."""
    if text.startswith("-") and not re.fullmatch(r"-\d+|-\d*\.\d+", text):
        return False  # argparse takes it for an option: "expected one argument"

    def number(kind, low, low_open=False):
        try:
            v = kind(text)
        except ValueError:
            return False
        return math.isfinite(v) and (v > low if low_open else v >= low)

    if option in ("--epochs", "--seed"):
        return number(int, 0)
    if option in ("--batch-size", "--limit"):
        return number(int, 1)
    if option == "--lr":
        return number(float, 0, low_open=True)
    if option in ("--momentum", "--weight-decay"):
        return number(float, 0)
    if option == "--threads":  # the parser wants an int; the range is checked after parsing
        return number(int, -math.inf)
    if option == "--val-split":
        if any(c in text for c in ".eE"):
            return number(float, 0) and float(text) < 1
        return number(int, 0)
    if option in ("--optimizer", "--scheduler", "--dataset"):
        return (
            text
            in {
                "--optimizer": cli.OPTIMIZERS,
                "--scheduler": cli.SCHEDULERS,
                "--dataset": cli.DATASETS,
            }[option]
        )
    return None


@fuzz(1.0)
@given(argv=argvs())
def test_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("FASTCNN_DATA")
    os.environ["FASTCNN_DATA"] = _EMPTY_DATA
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
    finally:
        if old is None:
            del os.environ["FASTCNN_DATA"]
        else:
            os.environ["FASTCNN_DATA"] = old
    err = err.getvalue()
    assert "Traceback" not in err
    if status == 0:  # --help, --version, summary
        assert any(f in argv for f in ("--help", "-h", "--version")) or argv[:1] == ["summary"], (
            argv
        )
        return tally("cli.main", "valid")
    assert status == 2, (argv, status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], (argv, err)
    # a bad option value is refused by name, before any data is read
    command = argv[0] if argv else ""
    known = (
        set(_OPTIONS) - {"--bogus"}
        if command == "train"
        else {"--batch-size", "--limit", "--threads", "--dataset"}
        if command == "evaluate"
        else set()
    )
    bad = {o for o, v in itertools.pairwise(argv) if o in known and _value_ok(o, v) is False}
    # ("--" ends the options: what follows is positional, reported as unrecognized)
    if bad and not set(argv) & {"--help", "-h", "--version", "--"}:
        assert any(o in lines[0] for o in bad), (argv, lines[0])
    tally("cli.main", "invalid")


# ---------------------------------------------------------------------------------------------
# checkpoints: bit flips, truncation, garbage: refused with CheckpointError naming the file, or
# (when the change is immaterial, e.g. JSON whitespace) the same content

_CK_DIR = tempfile.mkdtemp(prefix="fastcnn-fuzz-ckpt-")


def _small_run():
    rng = np.random.default_rng(0)
    model = Sequential(
        [
            layers.Conv2D(1, 2, 3, rng=1),
            layers.BatchNorm2D(2),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dropout(0.5, seed=3),
            layers.Dense(8, 3, rng=2),
        ]
    )
    opt = optim.Adam(model.parameters(), lr=0.01)
    sched = optim.StepLR(opt, 2)
    model(rng.standard_normal((2, 1, 4, 4)).astype(np.float32))
    model.backward(np.ones((2, 3), np.float32))
    opt.step()
    sched.step()
    return model, opt, sched


_MODEL, _OPT, _SCHED = _small_run()
_CK_PATH = os.path.join(_CK_DIR, "good.safetensors")
ckpt_mod.save(_CK_PATH, _MODEL, _OPT, _SCHED, epoch=7, extra={"note": "fuzz", "x": [1.5, 2]})
with open(_CK_PATH, "rb") as _f:
    _CK_BYTES = _f.read()
_CK_REF = ckpt_mod.load(_CK_PATH)


def _same_checkpoint(a, b):
    assert json.dumps(a.config, sort_keys=True) == json.dumps(b.config, sort_keys=True)
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert a.model_state[k].dtype == b.model_state[k].dtype
        assert np.array_equal(a.model_state[k], b.model_state[k], equal_nan=True)
    assert a.epoch == b.epoch and a.optimizer_class == b.optimizer_class
    assert a.scheduler_class == b.scheduler_class
    canon = lambda v: json.dumps(v, sort_keys=True, default=lambda o: o.tolist())  # noqa: E731
    assert canon(a.extra) == canon(b.extra)
    assert canon(a.scheduler_state) == canon(b.scheduler_state)
    assert canon(a.optimizer_state) == canon(b.optimizer_state)
    assert canon(a.metadata["model"].get("rng_state")) == canon(
        b.metadata["model"].get("rng_state")
    )


@fuzz(1.5)
@given(data=st.data())
def test_checkpoint_corruption(data):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    b = bytearray(_CK_BYTES)
    header_end = 8 + int.from_bytes(_CK_BYTES[:8], "little")
    how = d(
        st.sampled_from(
            [
                "flip",
                "flip",
                "flip-header",
                "flip-header",
                "byte-header",
                "truncate",
                "extend",
                "insert",
            ]
        )
    )
    if how == "flip":
        for _ in range(d(st.integers(1, 3))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif how == "flip-header":
        i = int(rng.integers(0, header_end))
        b[i] ^= 1 << int(rng.integers(0, 8))
    elif how == "byte-header":  # a printable character anywhere in the JSON header
        i = int(rng.integers(8, header_end))
        b[i] = int(rng.choice(list(b'0123456789 ,:{}[]"eE.-+ntfalsru')))
    elif how == "truncate":
        b = b[: int(rng.integers(0, len(b)))]
    elif how == "extend":
        b += rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    else:
        i = int(rng.integers(0, len(b)))
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
    path = os.path.join(_CK_DIR, "fuzzed.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(b))
    if bytes(b) == _CK_BYTES:
        return
    try:
        loaded = ckpt_mod.load(path)
    except ckpt_mod.CheckpointError as exc:
        assert path in str(exc)
        return tally("checkpoint.load", "invalid")
    _same_checkpoint(loaded, _CK_REF)  # accepted: then nothing that matters changed
    tally("checkpoint.load (immaterial change)", "valid")


# ---------------------------------------------------------------------------------------------
# the bounds-checked build really checks (only in the `-p fuzz_boundscheck` run)


@pytest.mark.skipif(not BOUNDSCHECK, reason="only with -p fuzz_boundscheck")
def test_boundscheck_is_active():
    """A kernel called directly with an index past the end raises IndexError in this build
    (in the normal build it would write outside the array)."""
    from fastcnn.kernels import pool2d

    dy = np.ones((1, 2, 2, 1), np.float32)  # NHWC
    argmax = np.array([[[[0], [1]], [[2], [99]]]], np.int64)  # 99 is outside a 2x2 plane
    with pytest.raises(IndexError):  # geometry 0: the general path, which indexes by argmax
        pool2d.maxpool2d_backward(
            dy, argmax, dy, False, 0, 0, 0, 0, 0, 0, np.empty((1, 2, 2, 1), np.float32)
        )
    # and the work sizes were shrunk before compilation (multi-item / multi-chunk paths)
    from fastcnn.kernels import activations, conv2d

    assert conv2d._TILES_PER_ITEM == 1 and conv2d._PIXEL_BLOCK == 2
    assert activations._chunks(10) == (3, 4)  # three chunks of at most 4 elements
    tally("boundscheck self-test", "valid")


# ---------------------------------------------------------------------------------------------
# fit: random data, labels and arguments; NaN / inf in the data must stop training with
# TrainingDiverged naming the first batch that holds one, and leave the last checkpoint alone

from fastcnn.training import TrainingDiverged, fit  # noqa: E402


@fuzz(0.5)
@given(data=st.data())
def test_fit(data):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 99)))
    n = d(st.integers(0, 9)) if d(st.integers(0, 9)) == 0 else d(st.integers(1, 9))
    features = d(st.sampled_from([4] * 12 + [5, 0]))
    x = d(
        arrays(
            (n, features) if d(st.integers(0, 14)) else d(odd_shapes()),
            dtypes=GOOD * 12 + HALF + ("int64", "complex64"),
            layouts=("c", "fortran", "strided", "readonly", "swapped"),
        )
    )
    r = d(st.integers(0, 13))
    y = (
        rng.integers(0, 3, n)
        if r < 10
        else rng.integers(-1, 5, n)
        if r == 10
        else rng.random(n)
        if r == 11
        else rng.integers(0, 3, (n, 3))
        if r == 12
        else rng.integers(0, 3, n + 1)
    )
    if d(st.integers(0, 19)) == 0:
        y = y.tolist()
    epochs = d(st.sampled_from([1] * 6 + [2, 2, 0, -1, 1.5, None]))
    batch_size = d(st.sampled_from([1, 2, 3, 4, 64] * 2 + [0, -2, 2.0]))
    seed = d(st.integers(0, 2**32))
    model = Sequential([layers.Dense(4, 3, rng=0)])
    opt = optim.SGD(model.parameters(), lr=0.1)
    path = os.path.join(_CK_DIR, "fit.safetensors")
    ckpt_mod.save(path, model, opt, epoch=0)
    with open(path, "rb") as f:
        before = f.read()

    def call():
        return fit(
            model,
            losses.CrossEntropyLoss(),
            opt,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            progress=False,
            checkpoint=path,
        )

    xa, ya = np.asarray(x), np.asarray(y)
    names = ("fit",)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or xa.dtype.kind != "f":
        problem = TypeError
    elif xa.ndim < 2 or ya.ndim not in (1, 2) or ya.shape[0] != xa.shape[0] or xa.shape[0] == 0:
        problem = ValueError
    elif (
        isinstance(epochs, bool)
        or not isinstance(epochs, int)
        or epochs < 0
        or isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        problem = (ValueError, TypeError)
    elif epochs == 0:
        problem = None
    elif xa.ndim != 2 or xa.shape[1] != 4:
        problem, names = ValueError, ("Dense",)
    elif ya.dtype.kind not in "iu":
        problem, names = TypeError, ("CrossEntropyLoss",)
    elif ya.shape != (n,) or ya.min() < 0 or ya.max() >= 3:
        problem, names = ValueError, ("CrossEntropyLoss",)
    else:
        problem = None
    if problem:
        expect_error(call, problem, names[0])
        tally("fit", "invalid")
    else:
        bad = ~np.isfinite(f64(xa)).all(axis=tuple(range(1, xa.ndim))) if n else np.zeros(0, bool)
        if epochs and bad.any():
            order = np.random.default_rng(seed).permutation(n)
            batches = -(-n // batch_size)
            first = int(np.argmax(bad[order])) // batch_size + 1
            with pytest.raises(TrainingDiverged, match=rf"epoch 1, batch {first} of {batches}:"):
                call()
            tally("fit (diverges)", "valid")
        else:
            history = fit(
                model,
                losses.CrossEntropyLoss(),
                opt,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                progress=False,
                checkpoint=path,
            )
            assert len(history) == epochs
            assert all(np.isfinite(p.data).all() for p in model.parameters())
            tally("fit", "valid")
            if epochs:
                assert ckpt_mod.load(path).epoch == epochs
                return
    with open(path, "rb") as f:
        assert f.read() == before  # the last good checkpoint is untouched
