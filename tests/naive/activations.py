"""Activations, the textbook way: one loop over the elements.

ReLU: ``y = x`` where ``x > 0``, else 0 (a NaN stays NaN); the gradient passes where ``x > 0``.
"""

import math

import numpy as np


def relu_forward(x):
    # np.zeros, not np.zeros_like: a Fortran-ordered zeros_like would make the reshape below a
    # copy, and the loop would write into the copy
    x = np.require(x, requirements="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
    y = np.zeros(x.shape, dtype=x.dtype)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for i in range(flat_x.size):
        value = flat_x[i]
        flat_y[i] = value if (value > 0 or math.isnan(value)) else 0
    return y


def add(a, b):
    """a + b, element by element (a residual block's sum; the gradients reaching its input)."""
    a, b = np.require(a, requirements="C"), np.require(b, requirements="C")
    total = np.zeros(a.shape, dtype=a.dtype)
    flat_a, flat_b, flat_t = a.reshape(-1), b.reshape(-1), total.reshape(-1)
    for i in range(flat_a.size):
        flat_t[i] = flat_a[i] + flat_b[i]
    return total


def add_relu_forward(a, b):
    """relu(a + b), the sum of each pair of elements first (a residual block and its ReLU)."""
    return relu_forward(add(a, b))


def relu_backward(x, dy):
    x, dy = np.require(x, requirements="C"), np.require(dy, requirements="C")
    dx = np.zeros(dy.shape, dtype=dy.dtype)
    flat_x, flat_dy, flat_dx = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    for i in range(flat_x.size):
        flat_dx[i] = flat_dy[i] if flat_x[i] > 0 else 0
    return dx
