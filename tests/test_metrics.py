"""fastcnn.metrics against naive loops, and evaluate_metrics against evaluate."""

import numpy as np
import pytest

import fastcnn
from fastcnn import metrics
from test_training import blobs, mlp


def naive_confusion(y, p, c):
    m = np.zeros((c, c), np.int64)
    for t, q in zip(y, p, strict=True):
        m[t, q] += 1
    return m


def naive_top_k(y, scores, k):
    hits = 0
    for row, label in zip(scores, y, strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))  # stable, lower index first
        hits += label in order[:k]
    return hits / len(y)


@pytest.mark.parametrize("seed", range(5))
def test_against_naive_loops(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(2, 12))
    y = rng.integers(0, c, n)
    scores = rng.standard_normal((n, c)).astype(np.float32)
    scores[: n // 3, :2] = 0.5  # ties
    p = scores.argmax(axis=1)
    m = metrics.confusion_matrix(y, scores)
    assert m.dtype == np.int64 and np.array_equal(m, naive_confusion(y, p, c))
    assert np.array_equal(metrics.confusion_matrix(y, p, num_classes=c), m)
    for k in (1, 2, 3, c):
        assert metrics.top_k_accuracy(y, scores, k) == naive_top_k(y, scores, k)
    assert metrics.top_k_accuracy(y, scores, 1) == metrics.accuracy(y, scores)
    per_class = metrics.per_class_accuracy(m)
    for j in range(c):
        mine = y == j
        if mine.any():
            assert per_class[j] == np.mean(p[mine] == j)
        else:
            assert np.isnan(per_class[j])
    assert np.array_equal(metrics.per_class_accuracy(y, p), per_class[: len(per_class)], True)


def test_one_hot_labels_and_layout():
    y = np.array([0, 1, 1, 2])
    one_hot = np.eye(3, dtype=np.float32)[y]
    p = np.array([0, 2, 1, 2])
    m = metrics.confusion_matrix(one_hot, p)
    assert m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]  # rows true, columns predicted


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: metrics.confusion_matrix([0, 1], [0]), ValueError, "2 labels"),
        (lambda: metrics.confusion_matrix([0, -1], [0, 1]), ValueError, "negative"),
        (lambda: metrics.confusion_matrix([0, 3], [0, 1], num_classes=2), ValueError, "beyond"),
        (lambda: metrics.confusion_matrix([0.5, 1], [0, 1]), TypeError, "integer"),
        (lambda: metrics.top_k_accuracy([0, 1], np.zeros((2, 3)), k=0), ValueError, "k"),
        (lambda: metrics.top_k_accuracy([0, 5], np.zeros((2, 3))), ValueError, "3 classes"),
        (lambda: metrics.top_k_accuracy([0], np.zeros((2, 3))), ValueError, "shape"),
        (lambda: metrics.per_class_accuracy(np.zeros((2, 3))), ValueError, "square"),
        (lambda: metrics.accuracy([], np.zeros((0, 3))), ValueError, "no samples"),
    ],
)
def test_errors_name_the_function(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_evaluate_metrics_agrees_with_evaluate_and_restores_the_mode():
    x, y = blobs(120)
    model = mlp().eval()
    loss, accuracy = fastcnn.evaluate(model, x, y)
    report = fastcnn.evaluate_metrics(model, x, y, k=2)
    assert report["loss"] == loss and report["accuracy"] == accuracy
    assert report["k"] == 2 and report["top_k_accuracy"] >= accuracy
    m = report["confusion_matrix"]
    assert m.shape == (3, 3) and m.sum() == 120
    logits = model.predict(x)
    assert np.array_equal(m, naive_confusion(y, logits.argmax(1), 3))
    assert report["top_k_accuracy"] == naive_top_k(y, logits, 2)
    assert not model.training
    assert fastcnn.evaluate_metrics(model.train(), x, y, num_classes=5)[
        "confusion_matrix"
    ].shape == (5, 5)
    assert model.training
    with pytest.raises(ValueError, match="evaluate_metrics: .*k"):
        fastcnn.evaluate_metrics(model, x, y, k=0)
    with pytest.raises(TypeError, match="evaluate_metrics"):
        fastcnn.evaluate_metrics(model, list(x), y)


def test_evaluate_metrics_on_a_data_loader():
    x, y = blobs(120)
    model = mlp().eval()
    loader = fastcnn.DataLoader(fastcnn.ArrayDataset(x, y), batch_size=50)
    report = fastcnn.evaluate_metrics(model, loader)
    assert (report["loss"], report["accuracy"]) == fastcnn.evaluate(model, x, y)
    assert report["confusion_matrix"].sum() == 120
    with pytest.raises(TypeError, match="evaluate_metrics: got a DataLoader and y"):
        fastcnn.evaluate_metrics(model, loader, y)
