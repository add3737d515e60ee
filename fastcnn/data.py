"""Data sets and the ``DataLoader``: mini-batches for ``fit``, ``evaluate`` and ``predict``.

    loader = DataLoader(ArrayDataset(x, y), batch_size=64, shuffle=True, seed=0,
                        transform=transforms.Compose([RandomCrop(32, 4), RandomHorizontalFlip()]))
    for xb, yb in loader: ...            # float (n, C, H, W) batches and their labels

A data set is anything with ``__len__`` and ``__getitem__`` (the :class:`Dataset` protocol):
item ``i`` is an ``(image, label)`` pair or an image alone. Arrays take the fast path:
:class:`ArrayDataset` (or a bare array, or an ``(x, y)`` pair) is batched with one ``np.take``
per batch; other data sets are read item by item. uint8 images are scaled to [0, 1] as
``pixel / 255`` in float32, batch by batch (bitwise what ``fastcnn.datasets.mnist()`` returns).

Determinism: the shuffling order comes from ``np.random.default_rng(seed)``, one permutation per
epoch and nothing else (what ``fit`` has always drawn); the transforms draw from a generator of
their own for each epoch, ``np.random.default_rng(SeedSequence(seed, spawn_key=(epoch,)))``. The
state of a loader is therefore its seed, its epoch count and the shuffling generator's state
(:meth:`DataLoader.state_dict`); ``fit`` stores the last in its checkpoints, so an augmented run
resumes bitwise.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._checks import is_int
from ._types import Array

__all__ = ["Dataset", "ArrayDataset", "DataLoader", "random_split", "check_images", "to_float"]


@runtime_checkable
class Dataset(Protocol):
    """Anything with ``len(ds)`` and ``ds[i]`` -> ``(image, label)`` or an image."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


_SCALE = np.float32(255)


def check_images(x: Any, what: str) -> Array:
    """``x`` as images fit/evaluate/predict take: a numpy array (N, ...) of floats or uint8."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array of images, got {type(x).__name__}")
    if x.dtype.kind != "f" and x.dtype != np.uint8:
        if x.dtype.kind in "iu":
            hint = (
                "pixels 0..255 as uint8 are scaled to [0, 1] by fastcnn; other integers: "
                "convert them, e.g. x.astype(np.float32) / 255"
            )
        else:
            hint = "convert them, e.g. x.astype(np.float32)"
        raise TypeError(
            f"{what}: expected floating-point or uint8 images, got dtype {x.dtype} ({hint})"
        )
    if x.ndim < 2:
        raise ValueError(f"{what}: expected images of shape (N, ...), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: got no samples")
    return x


def check_labels(y: Any, n: int, what: str) -> Array:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array of labels, got {type(y).__name__}")
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(
            f"{what}: expected labels of shape ({n},) (or one target row per image), got {y.shape}"
        )
    return y


def to_float(x: Array, out: Array | None = None) -> Array:
    """uint8 pixels -> float32 ``pixel / 255`` (into ``out`` if given); other arrays as they are."""
    if x.dtype != np.uint8:
        return x
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    np.divide(x, _SCALE, out=out, dtype=np.float32)
    return out


class ArrayDataset:
    """Images ``x`` (N, ...) (float, or uint8 pixels scaled by the loader) and optional labels
    ``y`` (N,) or targets (N, K), as PyTorch's ``TensorDataset``. ``ds[i]`` is ``(x[i], y[i])``,
    or ``x[i]`` without labels. The arrays are kept, not copied."""

    def __init__(self, x: Array, y: Array | None = None) -> None:
        self.x = check_images(x, "ArrayDataset")
        self.y = None if y is None else check_labels(y, x.shape[0], "ArrayDataset")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        if self.y is None:
            return self.x[index]
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        labels = "" if self.y is None else f", labels {self.y.dtype} {self.y.shape}"
        return f"ArrayDataset({self.x.dtype} {self.x.shape}{labels})"


def _as_dataset(dataset: Any) -> Any:
    if isinstance(dataset, np.ndarray):
        return ArrayDataset(dataset)
    if (
        isinstance(dataset, tuple)
        and len(dataset) == 2
        and all(isinstance(a, np.ndarray) for a in dataset)
    ):
        return ArrayDataset(*dataset)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            "DataLoader: expected a data set (an object with __len__ and __getitem__, an "
            f"array, or a pair of arrays (x, y)), got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError("DataLoader: the data set is empty")
    return dataset


class DataLoader:
    """Mini-batches of a data set: iterating yields ``(x, y)`` per batch, ``x`` a floating
    (n, C, H, W) array (uint8 pixels scaled to [0, 1] in float32), ``y`` the labels as an array
    (None for a data set without labels).

    - ``shuffle``: a new order every epoch, drawn from ``np.random.default_rng(seed)``;
      ``drop_last``: skip the last, smaller batch.
    - ``transform(x, rng)``: applied to each batch (``fastcnn.transforms``), with the epoch's
      own generator (see the module's docstring); ``seed=None`` picks a random seed, kept in
      ``self.seed`` (and in fit's checkpoints).
    - Each pass (``for ... in loader``) is one epoch; :meth:`seek` positions the loader at the
      start of an epoch as a fresh loader would reach it, :meth:`state_dict` /
      :meth:`load_state_dict` save and restore its position.
    - The batches are new arrays, yours to keep (``fit`` reads them into reused buffers).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        transform: Any = None,
        seed: int | None = 0,
    ) -> None:
        self.dataset = _as_dataset(dataset)
        if not is_int(batch_size, 1):
            raise ValueError(f"DataLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"DataLoader: {name} must be True or False, got {flag!r}")
        if transform is not None and not callable(transform):
            raise TypeError(
                f"DataLoader: transform must be callable as transform(x, rng), got {transform!r}"
            )
        if seed is None:
            seed = secrets.randbits(63)
        if not is_int(seed, 0):
            raise ValueError(f"DataLoader: seed must be an integer >= 0 or None, got {seed!r}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.transform = transform
        self.seed = int(seed)
        n = len(self.dataset)
        if self.drop_last and n < self.batch_size:
            raise ValueError(
                f"DataLoader: drop_last with batch_size {self.batch_size} and {n} samples "
                "leaves no batch"
            )
        self.epoch = 0
        self._rng = np.random.default_rng(self.seed)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples per epoch (the last partial batch left out with drop_last)."""
        n = len(self.dataset)
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.num_samples // self.batch_size)

    @property
    def shuffle_generator(self) -> np.random.Generator:
        """The generator the next epoch's order is drawn from (its state is what fit saves)."""
        return self._rng

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one image (of the first item for a data set read item by item)."""
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return tuple(ds.x.shape[1:])
        item = ds[0]
        image = item[0] if isinstance(item, tuple) and len(item) == 2 else item
        return tuple(np.shape(image))

    @property
    def arrays(self) -> tuple[Array, Array | None] | None:
        """(x, y) of an array-backed data set (the fast path), else None."""
        ds = self.dataset
        return (ds.x, ds.y) if isinstance(ds, ArrayDataset) else None

    # -- position -------------------------------------------------------------------------------
    def seek(self, epoch: int) -> None:
        """Position the loader at the start of epoch ``epoch`` (0-based), as a new loader with
        the same seed reaches it after ``epoch`` passes: replays the shufflings."""
        if not is_int(epoch, 0):
            raise ValueError(f"DataLoader.seek: epoch must be an integer >= 0, got {epoch!r}")
        self._rng = np.random.default_rng(self.seed)
        if self.shuffle:
            n = len(self.dataset)
            for _ in range(int(epoch)):
                self._rng.permutation(n)
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """{"seed", "epoch", "shuffle_state"}: JSON-able (the generator's integers as strings)."""
        from .training import _rng_state_to_json

        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "shuffle_state": _rng_state_to_json(dict(self._rng.bit_generator.state)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of a loader with the same seed and data set size)."""
        if not isinstance(state, dict) or not {"seed", "epoch", "shuffle_state"} <= set(state):
            raise ValueError(
                "DataLoader.load_state_dict: expected a dict with seed, epoch and shuffle_state, "
                f"got {state!r:.100}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"DataLoader.load_state_dict: the state is of a loader with seed {state['seed']!r}"
                f", this one has seed {self.seed}"
            )
        self.set_position(state["epoch"], state["shuffle_state"])

    def set_position(self, epoch: int, shuffle_state: dict[str, Any]) -> None:
        """Start the next pass as epoch ``epoch`` with the shuffling generator in the (JSON)
        state ``shuffle_state``, as stored by fit's checkpoints."""
        from .training import _rng_state_from_json

        if not is_int(epoch, 0):
            raise ValueError(f"DataLoader: epoch must be an integer >= 0, got {epoch!r}")
        rng = np.random.default_rng(0)
        rng.bit_generator.state = _rng_state_from_json(shuffle_state)
        self._rng = rng
        self.epoch = int(epoch)

    def epoch_rng(self, epoch: int) -> np.random.Generator:
        """The generator the transforms draw from in epoch ``epoch`` (0-based)."""
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(epoch),)))

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Array, Array | None]]:
        return self.batches(reuse=False)

    def batches(self, reuse: bool = False) -> Iterator[tuple[Array, Array | None]]:
        """One epoch of batches (starts it now: the order is drawn on this call). ``reuse``:
        read every batch into the same buffers, so each batch is valid only until the next
        (what fit and evaluate use)."""
        n = len(self.dataset)
        order = self._rng.permutation(n) if self.shuffle else None
        rng = self.epoch_rng(self.epoch) if self.transform is not None else None
        self.epoch += 1
        return self._batches(order, rng, reuse)

    def _batches(self, order, rng, reuse):
        size, total = self.batch_size, self.num_samples
        arrays = self.arrays
        x_buf = y_buf = f_buf = None
        for start in range(0, total, size):
            stop = min(start + size, total)
            idx = order[start:stop] if order is not None else None
            if arrays is not None:
                x, y = arrays
                if idx is None:
                    idx = np.arange(start, stop)
                if reuse:
                    if x_buf is None:
                        m = min(size, total)
                        x_buf = np.empty((m,) + x.shape[1:], dtype=x.dtype)
                        y_buf = None if y is None else np.empty((m,) + y.shape[1:], y.dtype)
                        if x.dtype == np.uint8:
                            f_buf = np.empty(x_buf.shape, dtype=np.float32)
                    k = stop - start
                    xb = np.take(x, idx, axis=0, out=x_buf[:k])
                    yb = (
                        None
                        if y is None or y_buf is None
                        else np.take(y, idx, axis=0, out=y_buf[:k])
                    )
                    xb = to_float(xb, None if f_buf is None else f_buf[:k])
                else:
                    xb = to_float(np.take(x, idx, axis=0))
                    yb = None if y is None else np.take(y, idx, axis=0)
            else:
                xb, yb = self._gather(range(start, stop) if idx is None else idx)
            if rng is not None:
                xb = self.transform(xb, rng)
            yield xb, yb

    def _gather(self, indices):
        images, labels = [], []
        for i in indices:
            item = self.dataset[int(i)]
            if isinstance(item, tuple) and len(item) == 2:
                images.append(np.asarray(item[0]))
                labels.append(item[1])
            else:
                images.append(np.asarray(item))
        if labels and len(labels) != len(images):
            raise ValueError("DataLoader: some items have a label and others not")
        first = images[0]
        for i, img in zip(indices, images, strict=True):
            if img.shape != first.shape:
                raise ValueError(
                    f"DataLoader: item {int(i)} has shape {img.shape}, the batch's first item "
                    f"{first.shape}: every image of a batch must have the same shape"
                )
        xb = np.stack(images)
        check_images(xb, "DataLoader")
        xb = to_float(xb)
        yb = np.asarray(labels) if labels else None
        return xb, yb

    def __repr__(self) -> str:
        return (
            f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, "
            f"transform={self.transform!r}, seed={self.seed})"
        )


def random_split(
    dataset: ArrayDataset, fractions: tuple[float, ...] | list[float], seed: int = 0
) -> list[ArrayDataset]:
    """Split an ArrayDataset into disjoint random parts of the given fractions (summing to 1),
    e.g. ``train, val = random_split(ds, [0.9, 0.1])``; the same seed gives the same parts."""
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(f"random_split: expected an ArrayDataset, got {type(dataset).__name__}")
    fr = list(fractions) if isinstance(fractions, (tuple, list)) else None
    if not fr or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fr):
        raise ValueError(f"random_split: expected fractions in (0, 1], got {fractions!r}")
    if abs(sum(fr) - 1) > 1e-9:
        raise ValueError(f"random_split: the fractions must sum to 1, got {sum(fr)}")
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum([0.0] + fr) * n).astype(int)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b <= a:
            raise ValueError(f"random_split: a part of {n} samples at fractions {fr} is empty")
        idx = np.sort(order[a:b])
        y = None if dataset.y is None else dataset.y[idx]
        parts.append(ArrayDataset(dataset.x[idx], y))
    return parts
