"""fastcnn.losses against the naive loops (tests/naive/losses.py), finite differences and
PyTorch."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.losses import CrossEntropyLoss, MSELoss
from gradcheck import numerical_gradient, relative_error
from naive.losses import mse, softmax_cross_entropy


def _logits(n, c, scale, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) * scale
    labels = rng.integers(0, c, size=n)
    return x.astype(dtype), labels


ce_cases = st.tuples(
    st.integers(1, 12),  # N
    st.integers(1, 12),  # C
    st.sampled_from(
        [0.01, 1.0, 5.0, 40.0]
    ),  # logit scale: 40 gives confident rows with tiny losses
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),  # label smoothing
    st.integers(0, 2**32 - 1),
)


@given(ce_cases)
def test_cross_entropy_matches_naive_float64(case):
    n, c, scale, smoothing, seed = case
    x, y = _logits(n, c, scale, seed)
    loss_fn = CrossEntropyLoss(label_smoothing=smoothing)
    loss = loss_fn(x, y)
    grad = loss_fn.backward()
    ref_loss, ref_grad = softmax_cross_entropy(x, y, label_smoothing=smoothing)
    assert isinstance(loss, float)
    assert grad.dtype == np.float64 and grad.shape == (n, c)
    assert relative_error(loss, ref_loss) <= 1e-10
    assert relative_error(grad, ref_grad) <= 1e-10


# float32: scale at most 10, as a larger one lets exp(x - max) leave float32's range (below
# 1e-38 after a margin of ~87), where a confident row's loss and gradient flush to 0.
ce_cases_float32 = st.tuples(
    st.integers(1, 12),
    st.integers(1, 12),
    st.sampled_from([0.01, 1.0, 5.0, 10.0]),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    st.integers(0, 2**32 - 1),
)


@given(ce_cases_float32)
def test_cross_entropy_float32_matches_naive(case):
    n, c, scale, smoothing, seed = case
    x, y = _logits(n, c, scale, seed, np.float32)
    loss_fn = CrossEntropyLoss(label_smoothing=smoothing)
    loss = loss_fn(x, y)
    grad = loss_fn.backward()
    ref_loss, ref_grad = softmax_cross_entropy(x.astype(np.float64), y, label_smoothing=smoothing)
    assert grad.dtype == np.float32
    assert relative_error(loss, ref_loss) <= 1e-5
    # p - q cancels where p is close to the smoothed target q (e.g. smoothing 1 and near-uniform
    # p): float32 then keeps its absolute accuracy relative to q's terms, eps / N, not more.
    scale = max(np.max(np.abs(ref_grad)), smoothing / n)
    assert np.max(np.abs(grad - ref_grad)) <= 1e-5 * scale


@given(ce_cases)
def test_cross_entropy_sum_and_none_reductions(case):
    n, c, scale, smoothing, seed = case
    x, y = _logits(n, c, scale, seed)
    ref_loss, ref_grad = softmax_cross_entropy(x, y, label_smoothing=smoothing)
    summed = CrossEntropyLoss(smoothing, reduction="sum")
    assert relative_error(summed(x, y), ref_loss * n) <= 1e-10
    assert relative_error(summed.backward(), ref_grad * n) <= 1e-10
    per_sample = CrossEntropyLoss(smoothing, reduction="none")
    losses = per_sample(x, y)
    assert losses.shape == (n,) and losses.dtype == np.float64
    rows = [softmax_cross_entropy(x[i : i + 1], y[i : i + 1], smoothing)[0] for i in range(n)]
    assert relative_error(losses, rows) <= 1e-10
    assert relative_error(per_sample.backward(), ref_grad * n) <= 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_extreme_logits_stay_finite(dtype):
    x = np.array(
        [[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4], [0.0, -1e4, 1e4]],
        dtype=dtype,
    )
    y = np.array([1, 0, 2, 1, 2])
    for smoothing in (0.0, 0.1):
        loss_fn = CrossEntropyLoss(label_smoothing=smoothing)
        loss = loss_fn(x, y)
        grad = loss_fn.backward()
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        ref_loss, ref_grad = softmax_cross_entropy(x.astype(np.float64), y, smoothing)
        tol = 1e-5 if dtype == np.float32 else 1e-10
        assert relative_error(loss, ref_loss) <= tol
        assert relative_error(grad, ref_grad) <= tol


@pytest.mark.parametrize("dtype, margin", [(np.float64, 30.0), (np.float32, 20.0)])
def test_confident_rows_keep_relative_accuracy(dtype, margin):
    # loss = log(1 + e^-margin) ~ 1e-13 (float64) / 2e-9 (float32): 1 + loss rounds to 1, so
    # only log1p / expm1 keep its digits (and those of the gradient p_label - 1)
    x = np.array([[margin, 0.0, -1.0], [0.5, margin + 0.5, 0.0]], dtype=dtype)
    y = np.array([0, 1])
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(x, y)
    grad = loss_fn.backward()
    ref_loss, ref_grad = softmax_cross_entropy(x.astype(np.float64), y)
    assert 0 < ref_loss < 1e-8
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert relative_error(loss, ref_loss) <= tol
    assert relative_error(grad, ref_grad) <= tol


def test_cross_entropy_nan_propagates():
    x = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]])
    loss_fn = CrossEntropyLoss()
    assert np.isnan(loss_fn(x, np.array([0, 1])))
    assert np.all(np.isnan(loss_fn.backward()[0]))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradient_by_finite_differences(smoothing, reduction):
    x, y = _logits(4, 5, 2.0, 7)
    loss_fn = CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    loss_fn(x, y)
    analytic = loss_fn.backward()
    numeric = numerical_gradient(lambda v: CrossEntropyLoss(smoothing, reduction)(v, y), x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_label_smoothing_known_values():
    # two equal logits: p = 1/2 for both classes, the loss is log 2 whatever the smoothing
    x = np.zeros((1, 2))
    for eps in (0.0, 0.3, 1.0):
        assert abs(CrossEntropyLoss(eps)(x, np.array([0])) - np.log(2)) < 1e-15
    # eps = 1: the target is uniform, the loss no longer depends on the label
    x, _ = _logits(3, 4, 1.0, 3)
    a = CrossEntropyLoss(1.0)(x, np.array([0, 1, 2]))
    b = CrossEntropyLoss(1.0)(x, np.array([3, 3, 3]))
    assert abs(a - b) < 1e-14
    # PyTorch's definition: (1 - eps) * nll + eps * mean over classes of -log p
    x, y = _logits(5, 6, 3.0, 4)
    nll = CrossEntropyLoss()(x, y)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    expected = 0.75 * nll + 0.25 * float(np.mean(-logp.mean(axis=1)))
    assert relative_error(CrossEntropyLoss(0.25)(x, y), expected) <= 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.7])
def test_cross_entropy_matches_torch(smoothing):
    torch = pytest.importorskip("torch")
    x, y = _logits(16, 10, 4.0, 11)
    loss_fn = CrossEntropyLoss(label_smoothing=smoothing)
    loss = loss_fn(x, y)
    grad = loss_fn.backward()
    tx = torch.tensor(x, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tx, torch.tensor(y), label_smoothing=smoothing)
    tloss.backward()
    assert relative_error(loss, tloss.item()) <= 1e-12
    assert relative_error(grad, tx.grad.numpy()) <= 1e-12


def test_cross_entropy_accepts_any_integer_labels():
    x, y = _logits(6, 4, 1.0, 5)
    ref = CrossEntropyLoss()(x, y)
    for dtype in (np.int32, np.uint8, np.int16):
        assert CrossEntropyLoss()(x, y.astype(dtype)) == ref
    assert CrossEntropyLoss()(x, list(y)) == ref


@pytest.mark.parametrize(
    "logits, labels, error, words",
    [
        (np.zeros((3, 4), np.int64), np.zeros(3, np.int64), TypeError, ["floating", "int64"]),
        (np.zeros(4), np.zeros(4, np.int64), ValueError, ["(N, C)", "(4,)"]),
        (np.zeros((2, 3, 4)), np.zeros(2, np.int64), ValueError, ["(N, C)", "(2, 3, 4)"]),
        (np.zeros((0, 4)), np.zeros(0, np.int64), ValueError, ["at least one", "(0, 4)"]),
        (np.zeros((3, 4)), np.zeros(3, np.float32), TypeError, ["integer labels", "float32"]),
        (np.zeros((3, 4)), np.zeros(3, bool), TypeError, ["integer labels", "bool"]),
        (np.zeros((3, 4)), np.zeros(4, np.int64), ValueError, ["(3,)", "(4,)"]),
        (np.zeros((3, 4)), np.zeros((3, 1), np.int64), ValueError, ["(3,)", "(3, 1)"]),
        (np.zeros((3, 4)), np.array([0, 4, 1]), ValueError, ["[0, 4)", "4"]),
        (np.zeros((3, 4)), np.array([0, -1, 1]), ValueError, ["[0, 4)", "-1"]),
        ([[0.0, 1.0]], np.array([0]), TypeError, ["numpy array", "list"]),
    ],
)
def test_cross_entropy_validation(logits, labels, error, words):
    with pytest.raises(error) as info:
        CrossEntropyLoss()(logits, labels)
    message = str(info.value)
    assert message.startswith("CrossEntropyLoss:")
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_smoothing": -0.1},
        {"label_smoothing": 1.5},
        {"label_smoothing": "a"},
        {"reduction": "avg"},
    ],
)
def test_cross_entropy_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="CrossEntropyLoss: expected"):
        CrossEntropyLoss(**kwargs)


@pytest.mark.parametrize("loss_fn", [CrossEntropyLoss(), MSELoss()])
def test_backward_before_forward(loss_fn):
    with pytest.raises(
        RuntimeError, match=f"{type(loss_fn).__name__}: backward\\(\\) called before"
    ):
        loss_fn.backward()


def test_failed_forward_does_not_leave_a_stale_cache_in_use():
    loss_fn = CrossEntropyLoss()
    x, y = _logits(3, 4, 1.0, 0)
    loss_fn(x, y)
    first = loss_fn.backward()
    with pytest.raises(ValueError):
        loss_fn(x, np.array([0, 9, 1]))
    np.testing.assert_array_equal(loss_fn.backward(), first)  # the last valid call's gradient


# ---- MSE -----------------------------------------------------------------------------------

mse_cases = st.tuples(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),  # shape
    st.integers(0, 2**32 - 1),
)


@given(mse_cases)
def test_mse_matches_naive(case):
    shape, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    t = rng.standard_normal(shape)
    ref_loss, ref_grad = mse(x, t)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        xd = x.astype(dtype)
        loss_fn = MSELoss()
        loss = loss_fn(xd, t.astype(dtype))
        grad = loss_fn.backward()
        assert isinstance(loss, float) and grad.dtype == dtype and grad.shape == x.shape
        ref_loss_d, ref_grad_d = mse(xd, t.astype(dtype))
        assert relative_error(loss, ref_loss_d) <= tol
        assert relative_error(grad, ref_grad_d) <= tol
    summed = MSELoss(reduction="sum")
    assert relative_error(summed(x, t), ref_loss * x.size) <= 1e-10
    assert relative_error(summed.backward(), ref_grad * x.size) <= 1e-10


def test_mse_gradient_by_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4))
    t = rng.standard_normal((3, 4))
    loss_fn = MSELoss()
    loss_fn(x, t)
    numeric = numerical_gradient(lambda v: MSELoss()(v, t), x)
    np.testing.assert_allclose(loss_fn.backward(), numeric, rtol=1e-6, atol=1e-9)


def test_mse_float64_target_keeps_float32():
    x = np.ones((2, 3), np.float32)
    t = np.eye(3)[[0, 2]]  # float64 one-hot
    loss_fn = MSELoss(reduction="none")
    per_item = loss_fn(x, t)
    assert per_item.dtype == np.float32 and loss_fn.backward().dtype == np.float32
    np.testing.assert_array_equal(per_item, (x - t.astype(np.float32)) ** 2)


@pytest.mark.parametrize(
    "x, t, error, words",
    [
        (np.zeros((2, 3), np.int32), np.zeros((2, 3)), TypeError, ["floating input", "int32"]),
        (np.zeros((2, 3)), np.zeros((3, 2)), ValueError, ["(2, 3)", "(3, 2)"]),
        (np.zeros((2, 3)), np.zeros((2, 3), bool), TypeError, ["numeric target", "bool"]),
        (np.zeros((0, 3)), np.zeros((0, 3)), ValueError, ["non-empty", "(0, 3)"]),
    ],
)
def test_mse_validation(x, t, error, words):
    with pytest.raises(error) as info:
        MSELoss()(x, t)
    assert str(info.value).startswith("MSELoss:")
    for word in words:
        assert word in str(info.value)
