"""A fully connected layer, the textbook way: ``y = x @ w.T + b`` written as loops.

x is (N, in), w is (out, in) as PyTorch's nn.Linear, b is (out,) or None.
"""

import numpy as np


def dense_forward(x, w, b):
    n_, in_ = x.shape
    out_ = w.shape[0]
    y = np.zeros((n_, out_), dtype=x.dtype)
    for n in range(n_):
        for o in range(out_):
            total = 0.0 if b is None else b[o]
            for i in range(in_):
                total += x[n, i] * w[o, i]
            y[n, o] = total
    return y


def dense_backward(x, w, dy):
    """Returns (dx, dw, db): dx = dy @ w, dw = dy.T @ x, db = dy summed over the batch."""
    n_, in_ = x.shape
    out_ = w.shape[0]
    dx = np.zeros(x.shape, dtype=dy.dtype)
    dw = np.zeros(w.shape, dtype=dy.dtype)
    db = np.zeros(out_, dtype=dy.dtype)
    for n in range(n_):
        for o in range(out_):
            g = dy[n, o]
            db[o] += g
            for i in range(in_):
                dx[n, i] += g * w[o, i]
                dw[o, i] += g * x[n, i]
    return dx, dw, db
