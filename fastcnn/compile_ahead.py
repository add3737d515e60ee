"""Compile a model's kernels before training: ``fastcnn.warmup(model, input_shape)``, and the
one message the API prints when the kernel cache is cold.

Numba compiles each kernel on its first call and caches it on disk; on a machine where nothing
is cached yet the first training steps take 15-40 s, which looks like a hang and, inside
``fit``, used to make the first epoch's History read a few images per second. ``warmup`` runs
one forward and backward pass on a tiny batch (train mode, then a forward in eval mode, as
validation runs it, and optionally an optimizer step on a copy) and then puts back everything
it touched: parameters, buffers (BatchNorm's running statistics), gradients, Dropout's
generators and the train/eval mode. ``fit`` calls it by itself before its first epoch when the
cache is cold, after saying so once per process (:func:`announce_if_cold`, the check of
``fastcnn.precompile.cache_is_cold`` that ``fastcnn train`` also uses).
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

import numpy as np

from . import compile_helper, precompile
from ._checks import is_int

if TYPE_CHECKING:
    from .module import Module
    from .optim import Optimizer

__all__ = ["warmup", "announce_if_cold", "mark_announced", "MESSAGE"]

MESSAGE = (
    "fastcnn: compiling the kernels (first use on this machine, about 15-40 s; numba caches "
    "them, later runs start at once)"
)
_STATE = {"checked": False}

# On a cold cache a training step's later kernels compile in a helper process while this one
# compiles the ones it reaches first (fastcnn.compile_helper).
compile_helper.install()


def mark_announced() -> None:
    """Record that this process has already said it is compiling (``fastcnn train`` does)."""
    _STATE["checked"] = True


def announce_if_cold(file: IO[str] | None = None, announce: bool = True) -> bool:
    """On the first call in a process: True if the kernel cache is cold (then, with
    ``announce``, :data:`MESSAGE` is printed to ``file``, stderr by default). Every later call,
    and any call after :func:`mark_announced`, returns False without looking."""
    if _STATE["checked"]:
        return False
    _STATE["checked"] = True
    with warnings.catch_warnings():  # an unreadable cache layout counts as warm: nothing to say
        warnings.simplefilter("ignore", RuntimeWarning)
        cold = precompile.cache_is_cold()
    if cold and announce:
        print(MESSAGE, file=sys.stderr if file is None else file, flush=True)
    return cold


def _check_input_shape(input_shape):
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"warmup: expected input_shape to be the shape of one input, e.g. (1, 28, 28), got "
            f"{input_shape!r}"
        )
    if not 1 <= len(input_shape) <= 3 or not all(is_int(d, 1) for d in input_shape):
        raise ValueError(
            "warmup: expected input_shape to be the shape of ONE input without the batch "
            f"dimension, 1 to 3 positive integers such as (1, 28, 28), got {tuple(input_shape)!r}"
        )
    return tuple(int(d) for d in input_shape)


def warmup(
    model: Module,
    input_shape: Sequence[int],
    optimizer: Optimizer | None = None,
    batch_size: int = 2,
    input_grad: bool = False,
) -> float:
    """Compile (or load from numba's cache) every kernel a training step of ``model`` runs on
    inputs of shape ``(N, *input_shape)``; returns the seconds it took.

    Runs a forward and a backward pass in train mode on ``batch_size`` random images (with
    ``input_grad=False``, as ``fit`` does; ``input_grad=True`` for a loop of your own that calls
    ``model.backward(dy)``), a forward pass in eval mode, and, given an ``optimizer``, one step
    of a deep copy of it (its update kernel). Nothing observable changes: the parameters,
    buffers, gradients, Dropout generators and the train/eval mode are restored, and the
    optimizer itself is not touched. The input dtype is that of the model's first parameter
    (float32 for a model without parameters).
    """
    from .module import Module

    if not isinstance(model, Module):
        raise TypeError(f"warmup: expected a fastcnn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    if not is_int(batch_size, 1):
        raise ValueError(f"warmup: expected batch_size to be an integer >= 1, got {batch_size!r}")
    params = model.parameters()
    dtype = params[0].data.dtype if params else np.dtype(np.float32)
    t0 = time.perf_counter()

    was_training = model.training
    state = model.state_dict()  # copies of the parameters and buffers
    grads = [None if p.grad is None else p.grad.copy() for p in params]
    rng_state = copy.deepcopy(model.get_rng_state())
    try:
        x = np.random.default_rng(0).standard_normal((int(batch_size),) + shape).astype(dtype)
        model.train()
        out = model(x)
        dy = np.full(out.shape, 1.0 / out.size, dtype=out.dtype)
        _backward(model, dy, input_grad)
        if optimizer is not None:
            _step_a_copy(model, optimizer)
        model.eval()
        model(x)
    finally:
        model.load_state_dict(state)
        for p, g in zip(params, grads, strict=True):
            if g is None:
                p.grad = None  # type: ignore[assignment]  # (a user's parameter may have none)
            elif p.grad is None or p.grad.shape != g.shape:
                p.grad = g
            else:
                np.copyto(p.grad, g)
        model.set_rng_state(rng_state)
        model.train(was_training)
    return time.perf_counter() - t0


def _backward(model, dy, input_grad):
    import inspect

    parameters = inspect.signature(model.backward).parameters
    if "input_grad" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        model.backward(dy, input_grad=input_grad)
    else:
        model.backward(dy)


def _step_a_copy(model, optimizer):
    """One step of a copy of ``optimizer`` whose parameters are copies (the update kernel
    compiles; the model's weights and the optimizer's state stay as they are)."""
    from .optim import Optimizer

    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"warmup: expected optimizer to be a fastcnn optimizer, got {type(optimizer).__name__}"
        )
    twin = copy.deepcopy(optimizer)
    for p in twin.params:
        if p.grad is None:
            p.grad = np.zeros_like(p.data)
    twin.step()
