"""What ``fit`` and ``evaluate`` do with their data: arrays or DataLoaders in, one DataLoader
out (arrays are wrapped in one that shuffles from ``seed``: the order fit has always drawn),
checked before the first step; and the labels checked once the class count is known."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._checks import is_int
from ._types import Array
from .data import ArrayDataset, DataLoader, check_images, check_labels

DEFAULT_BATCH_SIZE = 64


def check_data(what: str, x: Any, y: Any) -> None:
    """(x, y) arrays for fit/evaluate: float or uint8 images (N, ...) and N labels."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(
            f"{what}: expected numpy arrays (x, y), got {type(x).__name__}, {type(y).__name__}"
        )
    check_images(x, what)
    check_labels(y, x.shape[0], what)


def _shape_of(shape):
    """'(N, 1, 28, 28)': the shape of a data set whatever its number of samples."""
    return "(" + ", ".join(["N"] + [str(d) for d in shape]) + ")"


def training_loader(
    what: str, x: Any, y: Any, batch_size: Any, seed: Any
) -> tuple[DataLoader, int | None]:
    """fit's training data as a DataLoader, and the seed to record in its checkpoints."""
    if isinstance(x, DataLoader):
        if is_int(y) and not isinstance(y, np.ndarray):
            raise TypeError(
                f"{what}: with a DataLoader, pass epochs by keyword: "
                f"fit(model, loss_fn, optimizer, loader, epochs={y})"
            )
        if y is not None:
            raise TypeError(
                f"{what}: got a DataLoader and y_train; the labels come from the loader's data "
                "set (DataLoader(ArrayDataset(x, y), ...))"
            )
        if batch_size is not None and batch_size != x.batch_size:
            raise ValueError(
                f"{what}: batch_size={batch_size!r} but the DataLoader's is {x.batch_size}; "
                "the loader's batch_size applies (leave batch_size out)"
            )
        if seed not in (None, 0, x.seed):
            raise ValueError(
                f"{what}: seed={seed!r} but the DataLoader's seed is {x.seed}; the loader's seed "
                "orders and augments the batches (pass seed= to the DataLoader)"
            )
        arrays = x.arrays
        if arrays is not None and arrays[1] is None:
            raise ValueError(f"{what}: the DataLoader's data set has no labels")
        return x, x.seed
    if y is None:
        raise TypeError(
            f"{what}: expected labels y_train with the images x_train (or a DataLoader)"
        )
    check_data(what, x, y)
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    if not is_int(batch_size, 1):
        raise ValueError(f"{what}: batch_size must be an integer >= 1, got {batch_size!r}")
    if seed is not None and not is_int(seed, 0):
        raise ValueError(f"{what}: seed must be an integer >= 0 or None, got {seed!r}")
    loader = DataLoader(ArrayDataset(x, y), batch_size=batch_size, shuffle=True, seed=seed)
    return loader, seed if seed is None else loader.seed


def validation_data(what: str, val_data: Any, loader: DataLoader) -> Any:
    """val_data checked against the training data: None, a DataLoader or a pair (x, y)."""
    if val_data is None or isinstance(val_data, DataLoader):
        return val_data
    if not (isinstance(val_data, (tuple, list)) and len(val_data) == 2):
        raise ValueError(
            f"{what}: val_data must be a pair (x_val, y_val) or a DataLoader, got "
            f"{type(val_data).__name__}"
        )
    check_data(f"{what} (val_data)", *val_data)
    x_val, y_val = val_data
    arrays = loader.arrays
    if arrays is not None:
        x_train, y_train = arrays
        if x_val.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"{what}: val_data images must have the training images' shape "
                f"{_shape_of(x_train.shape[1:])}, got {x_val.shape}"
            )
        if y_train is not None and y_val.shape[1:] != y_train.shape[1:]:
            raise ValueError(
                f"{what}: val_data labels must have the training labels' shape "
                f"{_shape_of(y_train.shape[1:])}, got {y_val.shape}"
            )
    return x_val, y_val


def target_checker(
    what: str, loss_fn: Any, loader: DataLoader, val_data: Any
) -> Callable[[Array, Array | None], Array]:
    """A function of (logits, labels of the batch) -> the labels, called after each forward of
    fit: checks every label of the training and validation arrays once, when the class count is
    known (the labels of a data set read item by item: each batch's)."""
    check = getattr(loss_fn, "validate_targets", None)
    done = False

    def all_labels(data):
        if isinstance(data, DataLoader):
            arrays = data.arrays
            return None if arrays is None else arrays[1]
        return data[1]

    def run(logits: Array, yb: Array | None) -> Array:
        nonlocal done
        if yb is None:
            raise ValueError(f"{what}: the training data set has no labels")
        if done or check is None or logits.ndim != 2:
            return yb
        classes = logits.shape[1]
        y_all = all_labels(loader)
        check(yb if y_all is None else y_all, classes)
        if val_data is not None:
            y_val = all_labels(val_data)
            if y_val is not None:
                try:
                    check(y_val, classes)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{what} (val_data): {exc}") from exc
        done = y_all is not None
        return yb

    return run


def predict_with_labels(model: Any, loader: DataLoader) -> tuple[Array, Array]:
    """The model's outputs for every batch of ``loader`` (in eval mode) and the labels."""
    labels: list[Array] = []

    def images():
        for xb, yb in loader:
            if yb is None:
                raise ValueError("evaluate: the DataLoader's data set has no labels")
            labels.append(yb)
            yield xb

    logits = model.predict(images())
    return logits, np.concatenate(labels, axis=0)
