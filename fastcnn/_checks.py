"""Argument checks shared by the API: the one spelling of "an integer, but not a bool"."""

from __future__ import annotations

import numbers
from typing import TypeGuard

import numpy as np


def is_int(value: object, minimum: int | None = None) -> TypeGuard[int]:
    """Whether ``value`` is an integer, Python's or NumPy's, and at least ``minimum`` if given.

    ``bool`` and ``numpy.bool_`` are not integers here: ``True`` passed as a count or a size is a
    mistake to report, not the number 1. (To a type checker a NumPy integer that passes is an
    ``int``: it converts, compares and computes as one.)"""
    if type(value) is int:  # the common case, without the ABC's isinstance (a bool is no int)
        return minimum is None or value >= minimum
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return False
    return minimum is None or int(value) >= minimum


def is_real(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a real number, Python's or NumPy's (integers included), not a bool,
    nor a string that ``float()`` would parse."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
