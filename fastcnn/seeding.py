"""The global seed: ``fastcnn.manual_seed(n)``, as ``torch.manual_seed``.

Layers with random initial weights (Conv2D, Dense) and Dropout's masks draw from the generator
they are given (``rng=``, a seed or a ``np.random.Generator``; the model builders pass one
seeded generator to every layer). A layer given nothing used fresh entropy from the operating
system, so two runs differed. After ``manual_seed(n)`` a layer given nothing draws from one
global generator seeded with ``n`` instead: the layers made afterwards get their weights in the
order they are made, reproducibly, exactly as PyTorch's layers after ``torch.manual_seed``.
A Dropout layer given nothing takes an independent child of that generator for its masks.

What it does not touch: an explicit ``rng=``/``seed=`` (always wins), the model builders'
``seed`` argument (``fastcnn.models.reference(seed=0)``; pass ``seed=None`` to draw from the
global generator), ``fit``'s shuffling (its own ``seed`` argument) and loading a checkpoint
(which never consumes the global generator). numpy's own global state is left alone.
"""

from __future__ import annotations

import numpy as np

from ._checks import is_int
from ._types import Rng

__all__ = ["manual_seed", "default_rng", "global_generator"]

_GLOBAL: dict[str, np.random.Generator | None] = {"generator": None}


def manual_seed(seed: int) -> np.random.Generator:
    """Seed the global generator every layer made afterwards without ``rng=`` draws from;
    returns that generator. ``seed`` is an integer >= 0."""
    if not is_int(seed, 0):
        raise ValueError(f"manual_seed: expected an integer >= 0, got {seed!r}")
    generator = np.random.default_rng(int(seed))
    _GLOBAL["generator"] = generator
    return generator


def global_generator() -> np.random.Generator | None:
    """The generator set by :func:`manual_seed`, or None when no global seed was set."""
    return _GLOBAL["generator"]


def default_rng(rng: Rng = None) -> np.random.Generator:
    """``np.random.default_rng(rng)``, except that ``rng=None`` after :func:`manual_seed` means
    the global generator (itself, not a copy: every draw advances it)."""
    if rng is None and _GLOBAL["generator"] is not None:
        return _GLOBAL["generator"]
    return np.random.default_rng(rng)
