"""Transforms of whole batches: ``Normalize``, ``RandomCrop``, ``RandomShift``,
``RandomHorizontalFlip`` and ``Compose``.

A transform is called as ``transform(x, rng)`` on a floating (N, C, H, W) batch and returns the
transformed batch (the same array, changed in place, or a new one). ``rng`` is the
``np.random.Generator`` the :class:`fastcnn.data.DataLoader` owns for the epoch: every random
choice is drawn from it, a fixed number of draws per batch, so an augmented run is bitwise
reproducible from the loader's seed and resumes exactly (docs/data.md). Any callable
``f(x, rng) -> batch`` works as a transform too.

The geometric transforms run one Numba kernel over the batch (``kernels/augment.py``; its
reference is the per-image loop in ``tests/naive/augment.py``); ``Normalize`` is numpy in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._checks import is_int, is_real
from ._types import Array

__all__ = [
    "Transform",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomShift",
    "RandomHorizontalFlip",
    "shift_flip",
]

#: What a transform is: a callable of (batch, generator) returning a batch.
TransformFn = Callable[[Array, np.random.Generator], Array]


def _check_batch(x: Any, what: str) -> Array:
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype.kind != "f":
        shape = getattr(x, "shape", None)
        dtype = getattr(x, "dtype", type(x).__name__)
        raise TypeError(
            f"{what}: expected a floating-point batch of shape (N, C, H, W), got {dtype} of "
            f"shape {shape}"
        )
    return x


def _check_rng(rng: Any, what: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{what}: expected a numpy Generator as rng (the DataLoader passes its own), got "
            f"{type(rng).__name__}"
        )
    return rng


def _size2(value: Any, what: str, name: str, minimum: int) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(is_int(v, minimum) for v in pair):
        raise ValueError(
            f"{what}: expected {name} to be an integer >= {minimum} or a pair of them, "
            f"got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def shift_flip(
    x: Array, dy: Array, dx: Array, flip: Array, out_hw: tuple[int, int], fill: float
) -> Array:
    """A new (N, C, OH, OW) batch: image n of ``x`` shifted by (dy[n], dx[n]) (the pixel at row
    i, column j of the output comes from row i + dy[n], column j + dx[n]), mirrored left-right
    where flip[n], ``fill`` outside ``x``. The one kernel behind the geometric transforms."""
    from .kernels import augment

    x = np.ascontiguousarray(x)
    n = x.shape[0]
    out = np.empty((n, x.shape[1]) + tuple(out_hw), dtype=x.dtype)
    dy = np.ascontiguousarray(dy, dtype=np.int64).reshape(n)
    dx = np.ascontiguousarray(dx, dtype=np.int64).reshape(n)
    flip = np.ascontiguousarray(flip, dtype=np.bool_).reshape(n)
    augment.shift_flip(x, out, dy, dx, flip, x.dtype.type(fill))
    return out


class Transform:
    """Base class of the batch transforms: subclasses implement ``__call__(x, rng)``."""

    def __call__(self, x: Array, rng: np.random.Generator) -> Array:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order, each to the previous one's result, all with the same rng."""

    def __init__(self, transforms: Sequence[TransformFn]) -> None:
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
            raise TypeError(
                f"Compose: expected a list of transforms, got {type(transforms).__name__}"
            )
        for t in transforms:
            if not callable(t):
                raise TypeError(f"Compose: expected callables f(x, rng), got {t!r}")
        self.transforms = list(transforms)

    def __call__(self, x: Array, rng: np.random.Generator) -> Array:
        for t in self.transforms:
            x = t(x, rng)
        return x


class Normalize(Transform):
    """``(x - mean[c]) / std[c]`` per channel, in place (float32 arithmetic for a float32 batch).

    ``mean`` and ``std``: one number for every channel, or one per channel. Draws nothing.
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.mean = self._values(mean, "mean")
        self.std = self._values(std, "std")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(
                f"Normalize: mean has {len(self.mean)} values and std {len(self.std)}; expected "
                "as many (one per channel) or a single one"
            )
        if not all(s > 0 for s in self.std):
            raise ValueError(f"Normalize: expected std > 0, got {self.std}")

    @staticmethod
    def _values(value: Any, name: str) -> list[float]:
        values = list(value) if isinstance(value, (tuple, list, np.ndarray)) else [value]
        if not values or not all(is_real(v) and np.isfinite(v) for v in values):
            raise ValueError(
                f"Normalize: expected {name} to be a finite number or a list of them, got {value!r}"
            )
        return [float(v) for v in values]

    def __call__(self, x: Array, rng: np.random.Generator | None = None) -> Array:
        _check_batch(x, "Normalize")
        channels = x.shape[1]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"Normalize: {name} has {len(values)} values, the batch has {channels} "
                    f"channels (shape {x.shape})"
                )
        shape = (1, -1, 1, 1)
        x -= np.asarray(self.mean, dtype=x.dtype).reshape(shape)
        x /= np.asarray(self.std, dtype=x.dtype).reshape(shape)
        return x


class RandomCrop(Transform):
    """Pad every image by ``padding`` pixels of ``fill`` on each side, then cut a ``size``
    window (an int, or (height, width)) at a random position, drawn per image.

    Draws per batch: ``rng.integers(0, H + 2 * padding - height + 1, N)`` (the rows), then the
    same for the columns. ``RandomCrop(32, padding=4)`` is the usual CIFAR augmentation.
    """

    def __init__(self, size: int | tuple[int, int], padding: int = 0, fill: float = 0.0) -> None:
        self.size = _size2(size, "RandomCrop", "size", 1)
        if not is_int(padding, 0):
            raise ValueError(f"RandomCrop: expected padding to be an integer >= 0, got {padding!r}")
        if not is_real(fill) or not np.isfinite(fill):
            raise ValueError(f"RandomCrop: expected fill to be a finite number, got {fill!r}")
        self.padding = int(padding)
        self.fill = float(fill)

    def __call__(self, x: Array, rng: np.random.Generator) -> Array:
        what = type(self).__name__
        _check_batch(x, what)
        _check_rng(rng, what)
        n, _, h, w = x.shape
        oh, ow = self.size
        p = self.padding
        if oh > h + 2 * p or ow > w + 2 * p:
            raise ValueError(
                f"{what}: cannot cut {oh}x{ow} out of {h}x{w} images padded by {p} "
                f"({h + 2 * p}x{w + 2 * p})"
            )
        dy = rng.integers(0, h + 2 * p - oh + 1, n) - p
        dx = rng.integers(0, w + 2 * p - ow + 1, n) - p
        return shift_flip(x, dy, dx, np.zeros(n, dtype=np.bool_), (oh, ow), self.fill)


class RandomShift(Transform):
    """Move every image by a random whole number of pixels, up to ``max_shift`` (an int, or
    (rows, columns)) in each direction, filling the uncovered border with ``fill``; the size is
    kept. ``RandomShift(2)`` draws as ``RandomCrop(H, padding=2)`` (the same shifts for the same
    rng), a small translation that suits digits, which must not be mirrored."""

    def __init__(self, max_shift: int | tuple[int, int] = 2, fill: float = 0.0) -> None:
        sy, sx = _size2(max_shift, "RandomShift", "max_shift", 0)
        self.max_shift = (sy, sx)
        if not is_real(fill) or not np.isfinite(fill):
            raise ValueError(f"RandomShift: expected fill to be a finite number, got {fill!r}")
        self.fill = float(fill)

    def __call__(self, x: Array, rng: np.random.Generator) -> Array:
        _check_batch(x, "RandomShift")
        _check_rng(rng, "RandomShift")
        n = x.shape[0]
        sy, sx = self.max_shift
        dy = rng.integers(0, 2 * sy + 1, n) - sy
        dx = rng.integers(0, 2 * sx + 1, n) - sx
        return shift_flip(x, dy, dx, np.zeros(n, dtype=np.bool_), x.shape[2:], self.fill)


class RandomHorizontalFlip(Transform):
    """Mirror each image left-right with probability ``p``. Draws ``rng.random(N) < p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not is_real(p) or not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: expected p in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, x: Array, rng: np.random.Generator) -> Array:
        _check_batch(x, "RandomHorizontalFlip")
        _check_rng(rng, "RandomHorizontalFlip")
        n = x.shape[0]
        flip = np.less(rng.random(n), self.p)
        zero = np.zeros(n, dtype=np.int64)
        return shift_flip(x, zero, zero, flip, x.shape[2:], 0.0)
