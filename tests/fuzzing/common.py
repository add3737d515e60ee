"""Shared by the fuzz areas: the example counter and its report, array strategies
in every dtype and layout, the oracles for results and errors, and the argument strategies."""

import collections
import functools
import json
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

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
            # at stride 1 the pads do not depend on the input (None: see oracle_same_pads)
            if not problems and s == (1, 1):
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


def oracle_same_pads(h, w, k, s, d):
    """'same' as TensorFlow pads an (h, w) input: ceil(size / stride) outputs, the total
    padding the least that gives them, its odd row or column after."""
    pads = []
    for size, kk, ss, dd in ((h, k[0], s[0], d[0]), (w, k[1], s[1], d[1])):
        out = (size + ss - 1) // ss
        total = max(0, (out - 1) * ss + dd * (kk - 1) + 1 - size)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


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
