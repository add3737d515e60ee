"""Finite-difference gradient checks (central differences, float64), as Chainer's gradient_check.

A backward is checked through a random projection: with ``L(x) = sum(forward(x) * g)`` for a
fixed random ``g``, the analytic gradient is ``backward(g)`` and the numerical one is
``(L(x + eps e_i) - L(x - eps e_i)) / (2 eps)`` for every element ``i``.
"""

import numpy as np


def numerical_gradient(loss, x, eps=1e-6):
    """d loss(x) / dx by central differences; ``loss`` maps the array ``x`` (modified in place
    and restored) to a float."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = loss(x)
        flat[i] = old - eps
        minus = loss(x)
        flat[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def assert_gradient(forward, x, g, analytic, eps=1e-6, rtol=1e-5, atol=1e-7):
    """Assert that ``analytic`` equals the numerical gradient of ``sum(forward(x) * g)``."""
    assert x.dtype == np.float64, "finite differences need float64"
    numeric = numerical_gradient(lambda v: float(np.sum(forward(v) * g)), x, eps)
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


def relative_error(actual, expected):
    """max |actual - expected| / max(|expected|), the tolerance measure used against the naive
    loops."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale
