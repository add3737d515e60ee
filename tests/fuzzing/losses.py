"""CrossEntropyLoss and MSELoss against the naive loops."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import losses
from fuzzing.common import (
    GOOD,
    HALF,
    arrays,
    assert_close,
    expect_error,
    f64,
    fuzz,
    native,
    odd_shapes,
    relayout,
    snapshot,
    tally,
    unchanged,
)
from naive import losses as naive_losses

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
    # the batch: an odd shape can hold another number of rows than the n drawn first (and the
    # labels then as many, r == 11)
    n = np.asarray(labels).shape[0]
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
