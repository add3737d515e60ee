"""Elementwise activations over contiguous 1-D arrays (the caller passes ``x.reshape(-1)``).

The work is split into a few large chunks, one prange iteration each, so that every thread
streams through long contiguous runs that LLVM vectorises.
"""
from numba import njit, prange

_CHUNK = 1 << 15  # elements: smallest chunk worth a thread
_MAX_CHUNKS = 16


@njit(cache=True, inline="always")
def _chunks(size):
    count = min(_MAX_CHUNKS, max(1, (size + _CHUNK - 1) // _CHUNK))
    return count, (size + count - 1) // count


@njit(parallel=True, cache=True)
def relu_forward(x, out):
    """out = x where x > 0, else 0; a NaN stays NaN. x, out: contiguous 1-D, same size."""
    count, step = _chunks(x.size)
    zero = out.dtype.type(0)
    for chunk in prange(count):
        # Slices, and a loop from 0: LLVM then knows the index is never negative (no
        # wraparound select) and vectorises; ``range(chunk * step, stop)`` stayed scalar.
        xs = x[chunk * step:(chunk + 1) * step]
        ys = out[chunk * step:(chunk + 1) * step]
        for i in range(xs.size):
            v = xs[i]
            ys[i] = zero if v <= zero else v


@njit(parallel=True, cache=True)
def relu_backward(dy, y, dx):
    """dx = dy where y > 0 (y is the forward output), else 0. Contiguous 1-D, same size."""
    count, step = _chunks(dy.size)
    zero = dx.dtype.type(0)
    for chunk in prange(count):
        gs = dy[chunk * step:(chunk + 1) * step]
        ys = y[chunk * step:(chunk + 1) * step]
        ds = dx[chunk * step:(chunk + 1) * step]
        for i in range(gs.size):
            ds[i] = gs[i] if ys[i] > zero else zero
