"""Losses: a forward call returns the loss, ``backward()`` the gradient to the input.

    loss_fn = CrossEntropyLoss()
    loss = loss_fn(logits, labels)       # Python float (reduction "mean" or "sum")
    dlogits = loss_fn.backward()         # same shape and dtype as logits

Computation stays in the input's dtype (float32 in, float32 out); these are small arrays
(N x C), so plain vectorised numpy is used, no kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._checks import is_real
from ._types import Array

__all__ = ["CrossEntropyLoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(name, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: expected reduction in {_REDUCTIONS}, got {reduction!r}")


def _check_floating(name, what, x):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected {what} as a numpy array, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected floating {what} (float32 or float64), got {x.dtype}")


class _Loss:
    """Common part: the reduction and the cache that ``backward`` reads."""

    forward: Callable[..., float | Array]  # defined by the subclasses

    def __init__(self, reduction: str = "mean") -> None:
        _check_reduction(type(self).__name__, reduction)
        self.reduction = reduction
        self._cache: Any = None

    def __call__(self, *args: Any) -> float | Array:
        return self.forward(*args)

    def _reduce(self, per_item: Array) -> float | Array:
        if self.reduction == "mean":
            return float(np.mean(per_item))
        if self.reduction == "sum":
            return float(np.sum(per_item))
        return per_item

    def _cached(self):
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}: backward() called before a forward call "
                f"(call loss_fn(input, target) first)"
            )
        return self._cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class CrossEntropyLoss(_Loss):
    """Softmax + cross-entropy on logits (N, C) and integer labels (N,), as PyTorch's
    ``nn.CrossEntropyLoss`` (class indices; no weights, no ignore_index).

    With label smoothing eps the target of a row is (1 - eps) * onehot(label) + eps / C.
    reduction: "mean" (default) or "sum" return a Python float; "none" returns the per-sample
    losses (N,) in the logits' dtype, and ``backward()`` is then the gradient of their sum.

    Stability: the log-sum-exp is taken relative to the row maximum as
    log1p(sum of the other exp(x - max)), and p_label - 1 as expm1(log p_label), so that
    extreme logits stay finite and tiny losses of confident rows keep their relative accuracy.
    """

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        # a number, not a string float() would parse ("0.1") nor a bool
        ok = is_real(label_smoothing) and 0.0 <= float(label_smoothing) <= 1.0
        if not ok:
            raise ValueError(
                f"CrossEntropyLoss: expected label_smoothing in [0, 1], got {label_smoothing!r}"
            )
        self.label_smoothing = float(label_smoothing)

    def _validate(self, logits, labels):
        name = "CrossEntropyLoss"
        _check_floating(name, "logits", logits)
        if logits.ndim != 2:
            raise ValueError(f"{name}: expected logits of shape (N, C), got {logits.shape}")
        n, c = logits.shape
        if n < 1 or c < 1:
            raise ValueError(
                f"{name}: expected logits with at least one sample and one class, got "
                f"{logits.shape}"
            )
        labels = np.asarray(labels)
        if labels.shape != (n,) and np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{name}: expected labels of shape ({n},) to match logits {logits.shape}, "
                f"got {labels.shape}"
            )
        return self.validate_targets(labels, c)

    def validate_targets(self, labels: ArrayLike, num_classes: int) -> Array:
        """``labels`` as an integer array of class indices in [0, num_classes), else TypeError /
        ValueError naming the loss. ``fit`` checks a whole data set's labels with it before the
        first step, so that a bad label is reported at once, not after training up to it."""
        name = "CrossEntropyLoss"
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name}: expected integer labels (class indices), got {labels.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"{name}: expected labels of shape (N,), got {labels.shape}")
        if labels.size:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{name}: expected labels in [0, {num_classes}) for {num_classes} classes, "
                    f"got values from {lo} to {hi}"
                )
        return labels

    def forward(self, logits: Array, labels: ArrayLike) -> float | Array:
        labels = self._validate(logits, labels)
        t = logits.dtype.type
        n, c = logits.shape
        rows = np.arange(n)
        top = np.argmax(logits, axis=1)  # first maximum; a NaN row picks its NaN and stays NaN
        shifted = logits - logits[rows, top][:, None]  # <= 0
        e = np.exp(shifted)
        e[rows, top] = 0
        lse = np.log1p(e.sum(axis=1))  # log(sum exp(shifted)) without rounding 1 + tiny
        shifted_label = shifted[rows, labels]
        per_sample = lse - shifted_label  # -log p_label >= 0
        eps = self.label_smoothing
        if eps:
            # -(1 - eps) log p_label - eps/C sum_c log p_c, both terms >= 0
            per_sample *= t(1.0 - eps)
            per_sample += t(eps) * (lse - shifted.mean(axis=1))
        self._cache = (shifted, lse, labels)
        return self._reduce(per_sample)

    def backward(self) -> Array:
        shifted, lse, labels = self._cached()
        n, c = shifted.shape
        t = shifted.dtype.type
        eps = self.label_smoothing
        rows = np.arange(n)
        d = shifted - lse[:, None]  # log p
        log_p_label = d[rows, labels]
        np.exp(d, out=d)  # p
        if eps:
            d -= t(eps / c)
        d[rows, labels] = np.expm1(log_p_label) + t(eps - eps / c)  # p_l - (1 - eps) - eps/C
        if self.reduction == "mean":
            d /= t(n)
        return d

    def __repr__(self) -> str:
        return (
            f"CrossEntropyLoss(label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r})"
        )


class MSELoss(_Loss):
    """Mean squared error, as PyTorch's ``nn.MSELoss``: input and target of the same shape.

    The target is cast to the input's dtype (a float64 one-hot target does not promote a
    float32 network's gradient)."""

    def forward(self, input: Array, target: ArrayLike) -> float | Array:
        name = "MSELoss"
        _check_floating(name, "input", input)
        target = np.asarray(target)
        if not (
            np.issubdtype(target.dtype, np.floating) or np.issubdtype(target.dtype, np.integer)
        ):
            raise TypeError(f"{name}: expected a numeric target, got {target.dtype}")
        if target.shape != input.shape:
            raise ValueError(
                f"{name}: expected target of the input's shape {input.shape}, got {target.shape}"
            )
        if input.size == 0:
            raise ValueError(f"{name}: expected a non-empty input, got shape {input.shape}")
        diff = input - target.astype(input.dtype, copy=False)
        self._cache = diff
        return self._reduce(np.square(diff))

    def backward(self) -> Array:
        diff = self._cached()
        d = np.asarray(diff * diff.dtype.type(2))  # (a 0-d input gives a numpy scalar)
        if self.reduction == "mean":
            d /= diff.dtype.type(diff.size)
        return d
