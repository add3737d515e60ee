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
        xs = x[chunk * step : (chunk + 1) * step]
        ys = out[chunk * step : (chunk + 1) * step]
        for i in range(xs.size):
            v = xs[i]
            ys[i] = zero if v <= zero else v


@njit(parallel=True, cache=True)
def add(a, b, out):
    """out = a + b, as numpy adds it: a residual block's sum (forward) and the sum of the
    gradients reaching its input through the body and the shortcut (backward), on every
    thread. Contiguous 1-D, same size."""
    count, step = _chunks(a.size)
    for chunk in prange(count):
        xs = a[chunk * step : (chunk + 1) * step]
        ss = b[chunk * step : (chunk + 1) * step]
        ys = out[chunk * step : (chunk + 1) * step]
        for i in range(xs.size):
            ys[i] = xs[i] + ss[i]


@njit(parallel=True, cache=True)
def add_relu_forward(a, b, out):
    """out = relu(a + b): the sum as numpy adds it, then relu_forward's select (a NaN stays
    NaN), in one pass: a residual block's sum and the ReLU after it. Contiguous 1-D, same
    size."""
    count, step = _chunks(a.size)
    zero = out.dtype.type(0)
    for chunk in prange(count):
        xs = a[chunk * step : (chunk + 1) * step]
        ss = b[chunk * step : (chunk + 1) * step]
        ys = out[chunk * step : (chunk + 1) * step]
        for i in range(xs.size):
            v = xs[i] + ss[i]
            ys[i] = zero if v <= zero else v


@njit(parallel=True, cache=True)
def relu_backward(dy, y, dx):
    """dx = dy where y > 0 (y is the forward output), else 0. Contiguous 1-D, same size."""
    count, step = _chunks(dy.size)
    zero = dx.dtype.type(0)
    for chunk in prange(count):
        gs = dy[chunk * step : (chunk + 1) * step]
        ys = y[chunk * step : (chunk + 1) * step]
        ds = dx[chunk * step : (chunk + 1) * step]
        for i in range(gs.size):
            ds[i] = gs[i] if ys[i] > zero else zero


# Tanh's float32 forward: Eigen's rational function (TensorFlow's and XLA's float32 tanh on the
# CPU), odd numerator of degree 13 over even denominator of degree 6 in x clamped to [-9, 9]
# (beyond, tanh rounds to +-1 in float32), x itself where |x| < 0.0004. Multiply-adds and one
# division vectorise and run on every thread, where numpy's tanh runs on one.
_TANH_NUMERATOR = (  # x^1, x^3, ..., x^13
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_DENOMINATOR = (  # x^0, x^2, x^4, x^6
    4.89352518554385e-03,
    2.26843463243900e-03,
    1.18534705686654e-04,
    1.19825839466702e-06,
)


@njit(parallel=True, fastmath={"contract"}, cache=True)
def tanh_forward(x, out):
    """out = tanh(x) for float32 x, within 6 ulp of the exact value (tests/test_activations.py
    measures it; numpy's: 1.4); a NaN stays NaN, -0 stays -0, +-inf gives +-1. Contiguous
    1-D, same size."""
    count, step = _chunks(x.size)
    T = x.dtype.type
    hi, tiny = T(9), T(0.0004)
    n, d = _TANH_NUMERATOR, _TANH_DENOMINATOR
    p1, p3, p5, p7, p9, p11, p13 = T(n[0]), T(n[1]), T(n[2]), T(n[3]), T(n[4]), T(n[5]), T(n[6])
    q0, q2, q4, q6 = T(d[0]), T(d[1]), T(d[2]), T(d[3])
    for chunk in prange(count):
        xs = x[chunk * step : (chunk + 1) * step]
        ys = out[chunk * step : (chunk + 1) * step]
        for i in range(xs.size):
            v = xs[i]
            u = hi if v > hi else v  # selects, not min/max: a NaN stays NaN
            u = -hi if u < -hi else u
            u2 = u * u
            p = u2 * (u2 * (u2 * (u2 * (u2 * (u2 * p13 + p11) + p9) + p7) + p5) + p3) + p1
            q = u2 * (u2 * (u2 * q6 + q4) + q2) + q0
            ys[i] = v if abs(v) < tiny else u * p / q


# The backward passes of Tanh and Sigmoid and both passes of LeakyReLU: one pass over memory
# where numpy's expressions made two or three, with their temporaries. Each computes numpy's
# expression in numpy's order, so the results are those of the expressions, bitwise.


@njit(parallel=True, cache=True)
def tanh_backward(dy, y, dx):
    """dx = dy * (1 - y * y), y = tanh(x) the forward output. Contiguous 1-D, same size."""
    count, step = _chunks(dy.size)
    one = dx.dtype.type(1)
    for chunk in prange(count):
        gs = dy[chunk * step : (chunk + 1) * step]
        ys = y[chunk * step : (chunk + 1) * step]
        ds = dx[chunk * step : (chunk + 1) * step]
        for i in range(gs.size):
            v = ys[i]
            ds[i] = gs[i] * (one - v * v)


@njit(parallel=True, cache=True)
def sigmoid_backward(dy, y, dx):
    """dx = dy * y * (1 - y), y = sigmoid(x) the forward output. Contiguous 1-D, same size."""
    count, step = _chunks(dy.size)
    one = dx.dtype.type(1)
    for chunk in prange(count):
        gs = dy[chunk * step : (chunk + 1) * step]
        ys = y[chunk * step : (chunk + 1) * step]
        ds = dx[chunk * step : (chunk + 1) * step]
        for i in range(gs.size):
            v = ys[i]
            ds[i] = gs[i] * v * (one - v)


@njit(parallel=True, cache=True)
def leaky_relu_forward(x, slope, out):
    """out = x where x > 0, else x * slope (a NaN stays NaN). Contiguous 1-D, same size;
    slope a scalar of their dtype."""
    count, step = _chunks(x.size)
    zero = out.dtype.type(0)
    for chunk in prange(count):
        xs = x[chunk * step : (chunk + 1) * step]
        ys = out[chunk * step : (chunk + 1) * step]
        for i in range(xs.size):
            v = xs[i]
            ys[i] = v if v > zero else v * slope


@njit(parallel=True, cache=True)
def leaky_relu_backward(dy, x, slope, dx):
    """dx = dy where the forward input x > 0, else dy * slope. Contiguous 1-D, same size."""
    count, step = _chunks(dy.size)
    zero = dx.dtype.type(0)
    for chunk in prange(count):
        gs = dy[chunk * step : (chunk + 1) * step]
        xs = x[chunk * step : (chunk + 1) * step]
        ds = dx[chunk * step : (chunk + 1) * step]
        for i in range(gs.size):
            g = gs[i]
            ds[i] = g if xs[i] > zero else g * slope
