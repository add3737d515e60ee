"""Gradient clipping by global norm: ``clip_grad_norm_``, PyTorch's name and semantics.

    total = ||(||g_1||, ||g_2||, ...)||          (the norm of all gradients as one vector)
    if total > max_norm:  every g *= max_norm / (total + 1e-6)

``fit(..., clip_grad_norm=max_norm)`` calls it between the backward pass and the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from ._checks import is_real

if TYPE_CHECKING:
    from .module import Module, Parameter

__all__ = ["clip_grad_norm_", "grad_norm"]


def _gradients(parameters, what):
    from .module import Module

    if isinstance(parameters, Module):
        parameters = parameters.parameters()
    elif hasattr(parameters, "grad") and hasattr(parameters, "data"):
        parameters = [parameters]  # one parameter, as torch accepts one tensor
    if isinstance(parameters, np.ndarray) or not hasattr(parameters, "__iter__"):
        raise TypeError(
            f"{what}: expected parameters (an iterable of fastcnn.Parameter, or a Module), got "
            f"{type(parameters).__name__}"
        )
    grads = []
    for p in parameters:
        if not hasattr(p, "grad"):
            raise TypeError(
                f"{what}: expected parameters with a .grad array, got {type(p).__name__}"
            )
        if p.grad is not None:
            grads.append(p.grad)
    return grads


def _check_norm_type(norm_type, what):
    if not is_real(norm_type) or not (norm_type >= 1 or norm_type == math.inf):
        raise ValueError(f"{what}: expected norm_type >= 1 or math.inf, got {norm_type!r}")
    return float(norm_type)


def _total_norm(grads, norm_type):
    if not grads:
        return 0.0
    if norm_type == math.inf:
        return max(float(np.max(np.abs(g))) if g.size else 0.0 for g in grads)
    if norm_type == 2.0:
        # one BLAS dot per gradient (in its dtype, no temporary array), summed in float64
        squares = sum(float(np.dot(g.ravel(), g.ravel())) for g in grads)
        return math.sqrt(squares)
    partial = [float(np.linalg.norm(g.ravel(), norm_type)) for g in grads]
    return float(np.linalg.norm(np.asarray(partial), norm_type))


def grad_norm(
    parameters: Iterable[Parameter] | Module | Parameter, norm_type: float = 2.0
) -> float:
    """The norm of all gradients taken together (parameters without a gradient are skipped)."""
    norm_type = _check_norm_type(norm_type, "grad_norm")
    return _total_norm(_gradients(parameters, "grad_norm"), norm_type)


def clip_grad_norm_(
    parameters: Iterable[Parameter] | Module | Parameter,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> float:
    """Scale the gradients in place so that their total norm is at most ``max_norm``; returns
    the total norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` (a float here).

    ``parameters``: an iterable of Parameters, a Module (all its parameters) or one Parameter.
    ``norm_type``: 2 (default), any p >= 1, or ``math.inf`` (the largest absolute value).
    Gradients are scaled by ``max_norm / (total + 1e-6)`` when that is below 1, else left alone.
    A NaN or infinite total norm is a RuntimeError with ``error_if_nonfinite=True``; otherwise
    (PyTorch's default) the gradients are scaled by that factor all the same.
    """
    what = "clip_grad_norm_"
    if not is_real(max_norm) or not max_norm >= 0 or not math.isfinite(max_norm):
        raise ValueError(f"{what}: expected max_norm to be a number >= 0, got {max_norm!r}")
    norm_type = _check_norm_type(norm_type, what)
    grads = _gradients(parameters, what)
    total = _total_norm(grads, norm_type)
    if not math.isfinite(total) and error_if_nonfinite:
        raise RuntimeError(
            f"{what}: the total norm of order {norm_type} of the gradients is {total}; "
            "set error_if_nonfinite=False to clip all the same"
        )
    coef = float(max_norm) / (total + 1e-6)
    if coef >= 1:  # (a NaN factor scales, as PyTorch's clamp(max=1) passes NaN through)
        return total
    with np.errstate(invalid="ignore"):  # an infinite gradient times 0 is NaN, as in PyTorch
        for g in grads:
            g *= g.dtype.type(coef)
    return total
