"""Reused memory for the arrays fastcnn's functions return (activations and gradients).

Why: a training step allocates and frees the same large arrays every step. glibc's malloc hands
freed memory at the top of its heap back to the system once more than its trim threshold is
free there, and then every page of the next step's arrays is a page fault, thousands per step
on the benchmark networks (docs/kernels.md has the measurements). Keeping the buffers here
instead makes the next step's arrays reuse them.

How: ``empty(shape, dtype)`` returns a view of a pooled byte buffer. A buffer is free again when
no array refers to it any more, which its reference count tells (every view of a numpy array
keeps a reference to the array that owns the memory), so nothing needs to be released by hand
and an array a caller keeps is never reused. Arrays under ``MIN_BYTES`` come from numpy
directly (malloc serves those without faults). A buffer that no allocation has used in the
last ``_IDLE`` allocations is dropped, so memory for shapes no longer in use goes back to
malloc. ``FASTCNN_POOL=0`` turns the pool off (every array from numpy, as before).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np

from ._types import Array

#: Smaller arrays come from numpy directly.
MIN_BYTES = 1 << 16
#: Allocations after which an unused free buffer is dropped.
_IDLE = 2000
#: Pooled arrays start on a cache line: malloc's large blocks start 16 bytes past a page, and a
#: 64-byte vector load that straddles two lines costs about two.
ALIGN = 64

_ENABLED = os.environ.get("FASTCNN_POOL", "1") != "0"
_LOCK = threading.Lock()
_BUFFERS: dict[int, list[list[Any]]] = {}  # nbytes -> [[raw buffer, last use, offset], ...]
_TICK = [0]


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock would leave it held forever in the child."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _free_refcount() -> int:
    """sys.getrefcount of a pooled buffer no array refers to, seen from _take's loop (the
    entry's list, the loop's name, getrefcount's argument: measured, not assumed)."""
    entry = [np.empty(1, np.uint8), 0]
    for e in [entry]:
        return sys.getrefcount(e[0])
    raise AssertionError  # pragma: no cover


_FREE = _free_refcount()


def _take(nbytes: int) -> tuple[Any, int]:
    """(raw buffer, offset) of a free pooled buffer of ``nbytes`` bytes from an ALIGN-byte
    boundary on, or of a new one. The arrays made over it have the raw buffer as their base
    (numpy points every view at the array owning the memory), so its reference count tells
    whether any array still uses it."""
    with _LOCK:
        _TICK[0] += 1
        tick = _TICK[0]
        if tick % 256 == 0:
            _drop_idle(tick)
        entries = _BUFFERS.setdefault(nbytes, [])
        for e in entries:
            if sys.getrefcount(e[0]) == _FREE:
                e[1] = tick
                return e[0], e[2]
        raw = np.empty(nbytes + ALIGN, np.uint8)
        offset = -raw.ctypes.data % ALIGN
        entries.append([raw, tick, offset])
        return raw, offset


def _drop_idle(tick: int) -> None:
    for nbytes in list(_BUFFERS):
        kept = [
            e for e in _BUFFERS[nbytes] if tick - e[1] < _IDLE or sys.getrefcount(e[0]) != _FREE
        ]
        if kept:
            _BUFFERS[nbytes] = kept
        else:
            del _BUFFERS[nbytes]


def empty(shape: Any, dtype: Any = np.float64) -> Array:
    """``np.empty(shape, dtype)`` (C order), from the pool when large enough."""
    dtype = np.dtype(dtype)
    # (plain Python here: np.ndim and np.prod cost more than the rest of the call)
    if isinstance(shape, (int, np.integer)) or (isinstance(shape, np.ndarray) and shape.ndim == 0):
        shape = (int(shape),)
    else:
        shape = tuple(map(int, shape))
    nbytes = math.prod(shape) * dtype.itemsize
    if not _ENABLED or nbytes < MIN_BYTES or dtype.hasobject:
        return np.empty(shape, dtype)
    raw, offset = _take(nbytes)
    return np.ndarray(shape, dtype, raw, offset)  # (one call: a slice, view, reshape cost 2x)


def empty_like(a: Array, dtype: Any = None) -> Array:
    """``np.empty_like(a, dtype)``: the same shape and the same memory order as ``a`` (a
    channels-last activation gives a channels-last array), from the pool when large enough."""
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.ndim == 0 or a.size == 0:
        return np.empty_like(a, dtype=dtype)
    if a.flags.c_contiguous:
        return empty(a.shape, dtype)
    if a.ndim == 4 and a.transpose(0, 2, 3, 1).flags.c_contiguous:
        # channels-last memory (the activations fastcnn returns), without the general sort
        n, c, h, w = a.shape
        return empty((n, h, w, c), dtype).transpose(0, 3, 1, 2)
    # the axes from the largest stride to the smallest: a's memory order (numpy's order="K")
    order = sorted(range(a.ndim), key=lambda i: (-abs(a.strides[i]), i))
    out = empty(tuple(a.shape[i] for i in order), dtype)
    return out.transpose(np.argsort(order))


def pooled_bytes() -> int:
    """Bytes the pool holds, in use or free (for tests and the benchmarks)."""
    with _LOCK:
        return sum(nbytes * len(entries) for nbytes, entries in _BUFFERS.items())


def clear() -> None:
    """Drop every free buffer (buffers still in use are dropped once their arrays go)."""
    with _LOCK:
        _BUFFERS.clear()
