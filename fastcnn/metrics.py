"""Classification metrics beyond accuracy: top-k accuracy, per-class accuracy and the confusion
matrix (scikit-learn's conventions), and :func:`evaluate_metrics`, which computes them all for a
model in one pass over the data.

    report = fastcnn.evaluate_metrics(model, x_test, y_test)
    report["top_k_accuracy"], report["per_class_accuracy"], report["confusion_matrix"]

``fastcnn.evaluate`` keeps returning ``(loss, accuracy)``. Labels are class indices (or one-hot /
probability rows, read through their argmax); scores are logits or probabilities, one row per
sample (their argmax is the prediction; a softmax does not change it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from ._checks import is_int
from ._types import Array

if TYPE_CHECKING:
    from .data import DataLoader
    from .losses import CrossEntropyLoss, MSELoss
    from .module import Module

__all__ = [
    "accuracy",
    "top_k_accuracy",
    "confusion_matrix",
    "per_class_accuracy",
    "evaluate_metrics",
]


def _labels(y, what, name="y_true"):
    y = np.asarray(y)
    if y.ndim == 2:
        y = np.argmax(y, axis=1)
    if y.ndim != 1:
        raise ValueError(f"{what}: expected {name} of shape (N,) (class indices), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(y == np.round(y)):
            raise TypeError(f"{what}: expected integer class indices in {name}, got {y.dtype}")
        y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what}: {name} holds a negative class index {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _scores(scores, what, n):
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != n:
        raise ValueError(
            f"{what}: expected scores of shape ({n}, num_classes) (one row per label), got "
            f"{scores.shape}"
        )
    if not np.issubdtype(scores.dtype, np.floating):
        raise TypeError(f"{what}: expected floating-point scores, got {scores.dtype}")
    return scores


def _num_classes(num_classes, what, *labels):
    seen = max((int(y.max()) + 1 for y in labels if y.size), default=0)
    if num_classes is None:
        return seen
    if not is_int(num_classes, 1):
        raise ValueError(f"{what}: expected num_classes to be an integer >= 1, got {num_classes!r}")
    if seen > num_classes:
        raise ValueError(
            f"{what}: a label is {seen - 1}, beyond num_classes={num_classes} "
            f"(0..{num_classes - 1})"
        )
    return int(num_classes)


def accuracy(y_true: ArrayLike, scores: ArrayLike) -> float:
    """The fraction of samples whose highest score is their label."""
    y = _labels(y_true, "accuracy")
    s = _scores(scores, "accuracy", y.shape[0])
    if y.size == 0:
        raise ValueError("accuracy: got no samples")
    return float(np.count_nonzero(np.argmax(s, axis=1) == y)) / y.shape[0]


def top_k_accuracy(y_true: ArrayLike, scores: ArrayLike, k: int = 5) -> float:
    """The fraction of samples whose label is among their ``k`` highest scores
    (scikit-learn's ``top_k_accuracy_score``; ``k=1`` is the accuracy). Ties at the k-th score
    count in the label's favour only if it ranks within k by a stable sort of descending scores
    (the lower class index first)."""
    what = "top_k_accuracy"
    y = _labels(y_true, what)
    s = _scores(scores, what, y.shape[0])
    if y.size == 0:
        raise ValueError(f"{what}: got no samples")
    classes = s.shape[1]
    if not is_int(k, 1):
        raise ValueError(f"{what}: expected k to be an integer >= 1, got {k!r}")
    if y.max() >= classes:
        raise ValueError(
            f"{what}: a label is {int(y.max())}, but the scores have {classes} classes"
        )
    if k >= classes:
        return 1.0
    # rank of the label: how many classes score higher, or equal with a lower index
    label_score = s[np.arange(y.shape[0]), y][:, None]
    index = np.arange(classes)[None, :]
    ahead = (s > label_score) | ((s == label_score) & (index < y[:, None]))
    return float(np.count_nonzero(ahead.sum(axis=1) < k)) / y.shape[0]


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int | None = None) -> Array:
    """(C, C) int64 counts: row = true class, column = predicted class (scikit-learn's layout).

    ``y_pred``: predicted class indices (N,), or scores (N, C) whose argmax is taken.
    ``num_classes`` defaults to the largest label or prediction + 1 (or the scores' width)."""
    what = "confusion_matrix"
    y = _labels(y_true, what)
    p = np.asarray(y_pred)
    if p.ndim == 2:
        if num_classes is None:
            num_classes = p.shape[1]
        p = _scores(p, what, y.shape[0]).argmax(axis=1)
    p = _labels(p, what, "y_pred")
    if p.shape != y.shape:
        raise ValueError(f"{what}: y_true has {y.shape[0]} labels, y_pred {p.shape[0]}")
    c = _num_classes(num_classes, what, y, p)
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def per_class_accuracy(matrix_or_y_true: ArrayLike, y_pred: ArrayLike | None = None) -> Array:
    """The accuracy on each class's samples (the recall of each class), float64 (C,); NaN for a
    class without samples. Pass a confusion matrix, or ``(y_true, y_pred)``."""
    if y_pred is None:
        m = np.asarray(matrix_or_y_true)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(
                f"per_class_accuracy: expected a square confusion matrix, got shape {m.shape}"
            )
    else:
        m = confusion_matrix(matrix_or_y_true, y_pred)
    totals = m.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(m) / np.where(totals > 0, totals, 1), np.nan)


def evaluate_metrics(
    model: Module,
    x: Array | DataLoader,
    y: Array | None = None,
    k: int = 5,
    batch_size: int = 256,
    loss_fn: CrossEntropyLoss | MSELoss | None = None,
    threads: int | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Everything ``evaluate`` measures and more, in eval mode, in one pass over ``(x, y)`` or
    a DataLoader ``x`` (as ``evaluate``; uint8 images are scaled to [0, 1]):
    ``{"loss", "accuracy", "top_k_accuracy", "k", "per_class_accuracy", "confusion_matrix"}``
    (a Keras user's ``evaluate(return_dict=True)``). ``per_class_accuracy`` is a (C,) array,
    ``confusion_matrix`` a (C, C) int64 array (rows true, columns predicted), C the model's
    number of outputs (or ``num_classes``). The model's train/eval mode is restored."""
    from ._fit_data import predict_with_labels
    from .data import DataLoader
    from .threads import compute_threads
    from .training import _check_data, _check_positive_int, _default_loss

    what = "evaluate_metrics"
    if isinstance(x, DataLoader):
        if y is not None:
            raise TypeError(f"{what}: got a DataLoader and y; the labels come from the loader")
    else:
        _check_data(what, x, y)
    batch_size = _check_positive_int(what, "batch_size", batch_size)
    if not is_int(k, 1):
        raise ValueError(f"{what}: expected k to be an integer >= 1, got {k!r}")
    loss_fn = _default_loss() if loss_fn is None else loss_fn
    was_training = getattr(model, "training", True)
    try:
        with compute_threads(threads):
            if isinstance(x, DataLoader):
                logits, y = predict_with_labels(model, x)
            else:
                logits, y = model.predict(x, batch_size=batch_size), np.asarray(y)
            loss = float(loss_fn(logits, y))
    finally:
        model.train(was_training)
    if logits.ndim != 2:
        raise ValueError(f"{what}: expected the model to output (N, classes), got {logits.shape}")
    labels = _labels(y, what, "y")
    c = logits.shape[1] if num_classes is None else num_classes
    matrix = confusion_matrix(labels, logits.argmax(axis=1), c)
    return {
        "loss": loss,
        "accuracy": float(np.trace(matrix)) / labels.shape[0],
        "top_k_accuracy": top_k_accuracy(labels, logits, k),
        "k": int(k),
        "per_class_accuracy": per_class_accuracy(matrix),
        "confusion_matrix": matrix,
    }
