"""Pictures of a training run: the loss and accuracy curves of a History, a confusion matrix,
and the filters of a model's first convolution. Needs matplotlib (``pip install
'fastcnn[plot]'``), imported only when a picture is drawn.

Each function returns a matplotlib ``Figure`` and, given ``path``, also writes it as a PNG
(atomically, as checkpoints are: an interrupted write leaves the previous file whole). Figures
are drawn on matplotlib's Agg canvas without ``pyplot``: no window opens, and the backend the
caller chose (a notebook's, say) is left alone; in Jupyter the returned Figure displays itself.

    history = fastcnn.fit(...)
    history.plot("curves.png")                      # = fastcnn.plots.curves(history, path)
    fastcnn.plots.confusion(fastcnn.evaluate_metrics(model, x, y)["confusion_matrix"], "cm.png")
    fastcnn.plots.filters(model, "filters.png")
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .module import Module
    from .training import History

__all__ = ["curves", "confusion", "filters", "save_png", "first_conv"]

INSTALL_HINT = "pip install 'fastcnn[plot]' (or pip install matplotlib)"


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"fastcnn.plots needs matplotlib: {INSTALL_HINT}") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` as a PNG, atomically; returns ``path``."""
    from .checkpoint import _atomic_write, check_destination

    path = check_destination(path, what="picture")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _atomic_write(path, buffer.getvalue(), what="picture")
    return path


def _finish(fig, path):
    if path is not None:
        save_png(fig, path)
    return fig


def curves(
    history: History | dict[str, list[Any]], path: str | os.PathLike[str] | None = None
) -> Figure:
    """Loss (left) and accuracy (right) per epoch, training against validation (when the run
    had validation data). ``history``: a :class:`fastcnn.History` (or its ``as_dict()``)."""
    data = dict(history) if isinstance(history, dict) else history.as_dict()
    if not data.get("epoch"):
        raise ValueError("plots.curves: the history holds no epoch yet: nothing to draw")
    epochs = data["epoch"]
    fig = _figure(9, 3.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy (%)")):
        scale = 100.0 if key == "accuracy" else 1.0
        train = [scale * v for v in data[f"train_{key}"]]
        ax.plot(epochs, train, "o-", label="training", color="tab:blue")
        val = data[f"val_{key}"]
        points = [(e, scale * v) for e, v in zip(epochs, val, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "s-", label="validation", color="tab:orange")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    ax_loss.set_title("loss per epoch")
    ax_acc.set_title("accuracy per epoch")
    return _finish(fig, path)


def confusion(
    matrix: ArrayLike,
    path: str | os.PathLike[str] | None = None,
    class_names: list[str] | None = None,
    normalize: bool = False,
    title: str | None = None,
) -> Figure:
    """A confusion matrix (rows true classes, columns predicted: ``fastcnn.metrics``' layout)
    as a heat map with its counts written in (up to 20 classes; ``normalize``: each row as
    percentages of the class). The title gives the accuracy."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"plots.confusion: expected a square (C, C) matrix, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.number) or (m < 0).any():
        raise ValueError("plots.confusion: expected counts >= 0")
    c = m.shape[0]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"plots.confusion: {len(class_names)} class names for {c} classes")
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    totals = m.sum(axis=1, keepdims=True)
    shown = 100.0 * m / np.maximum(totals, 1) if normalize else m
    size = max(4.0, min(12.0, 0.55 * c + 2))
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues")
    fig.colorbar(image, ax=ax, label="% of the class" if normalize else "images")
    ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0)
    ax.set_yticks(range(c), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = m.sum()
    accuracy = f": accuracy {100.0 * np.trace(m) / total:.2f}%" if total else ""
    ax.set_title(title if title is not None else f"confusion matrix, {total} images{accuracy}")
    if c <= 20:
        high = shown.max() if shown.size else 0
        for i in range(c):
            for j in range(c):
                value = shown[i, j]
                text = f"{value:.0f}" if not normalize else f"{value:.1f}"
                color = "white" if high and value > 0.5 * high else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    return _finish(fig, path)


def first_conv(model: Module) -> Any:
    """The first Conv2D of ``model`` in depth-first order (ValueError if it has none)."""
    from .layers import Conv2D

    for module in model.modules():
        if isinstance(module, Conv2D):
            return module
    raise ValueError(f"plots.filters: the model ({type(model).__name__}) has no Conv2D layer")


def filters(model: Module, path: str | os.PathLike[str] | None = None) -> Figure:
    """The filters of the model's first convolution, one tile each, each scaled to its own
    range (grey for one input channel, colour for three; with another number of input
    channels, the mean over them)."""
    conv = first_conv(model)
    w = np.asarray(conv.weight.data, dtype=np.float64)  # (F, C, KH, KW)
    count, channels = w.shape[0], w.shape[1]
    if channels == 3:
        tiles = w.transpose(0, 2, 3, 1)  # (F, KH, KW, 3)
        kind = "RGB"
    else:
        tiles = w[:, 0] if channels == 1 else w.mean(axis=1)
        kind = "1 channel" if channels == 1 else f"mean of {channels} channels"
    cols = min(count, 8)
    rows = math.ceil(count / cols)
    fig = _figure(1.1 * cols + 0.4, 1.1 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= count:
            continue
        tile = tiles[i]
        low, high = tile.min(), tile.max()
        tile = (tile - low) / (high - low) if high > low else np.zeros_like(tile)
        ax.imshow(
            tile, cmap=None if channels == 3 else "gray", vmin=0, vmax=1, interpolation="nearest"
        )
    kh, kw = w.shape[2], w.shape[3]
    fig.suptitle(f"first convolution: {count} filters {kh}x{kw} ({kind})")
    return _finish(fig, path)
