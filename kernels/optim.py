"""Optimizer updates: one pass over a parameter instead of one numpy pass per operation.

Each update is written as ``torch.optim`` orders it, operation by operation, each result
rounded to the parameter's dtype (no fused multiply-add: ``fastmath`` is off), so it gives
bitwise what the numpy expression sequence gives. Arrays are 1-D contiguous views of one
parameter, its gradient and its buffers, one floating dtype; scalars are of that dtype.
"""

from numba import njit


@njit(cache=True)
def sgd_update(data, grad, buf, lr, momentum, keep, dampened, weight_decay, nesterov, first):
    """SGD with momentum, in place: g = grad + weight_decay * data; buf = g (``first``) or
    momentum * buf + keep * g (``keep`` = 1 - dampening, applied when ``dampened``);
    step = g + momentum * buf (nesterov) or buf; data -= lr * step. ``momentum == 0``: no
    buffer (pass any array), step = g."""
    for i in range(data.size):
        g = grad[i]
        if weight_decay != 0:
            g = data[i] * weight_decay + g
        if momentum != 0:
            if first:
                b = g
            elif dampened:
                b = buf[i] * momentum + g * keep
            else:
                b = buf[i] * momentum + g
            buf[i] = b
            g = b * momentum + g if nesterov else b
        data[i] -= g * lr
