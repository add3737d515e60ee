"""Naive losses: the textbook, one sample and one class at a time, in Python floats (float64).

softmax cross-entropy of a row x with label y over C classes, with label smoothing eps
(PyTorch's definition: target q_c = (1 - eps) [c == y] + eps / C):
    log p_c = (x_c - m) - log(sum_j exp(x_j - m)),   m = max_j x_j      (log-softmax)
    loss    = -sum_c q_c log p_c                                         (= -log p_y when eps = 0)
    dloss/dx_c = p_c - q_c
mean over the N rows, so the gradient is divided by N.

Two textbook rewritings keep tiny losses accurate (a confidently right row has a loss of
1e-12, and log(1 + 1e-12) in floats keeps only a few digits of it):
    log(sum_j exp(x_j - m)) = log1p(sum over j != argmax of exp(x_j - m))
    p_y - 1                 = expm1(log p_y)
"""

import math

import numpy as np


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,).

    Returns ``(mean_loss, dlogits)``: a Python float and a float64 array (N, C)."""
    logits = np.asarray(logits, dtype=np.float64)
    n, c = logits.shape
    eps = float(label_smoothing)
    total = 0.0
    dlogits = np.zeros((n, c), dtype=np.float64)
    for i in range(n):
        row = [float(v) for v in logits[i]]
        y = int(labels[i])
        # the maximum and the first position holding it
        top = 0
        for k in range(1, c):
            if row[k] > row[top]:
                top = k
        m = row[top]
        rest = 0.0
        for k in range(c):
            if k != top:
                rest += math.exp(row[k] - m)
        log_sum = math.log1p(rest)
        log_p = [(row[k] - m) - log_sum for k in range(c)]
        loss = 0.0
        for k in range(c):
            q = (1.0 - eps) * (1.0 if k == y else 0.0) + eps / c
            if q:  # a class with no target weight adds nothing, even where log p = -inf
                loss -= q * log_p[k]
        total += loss
        for k in range(c):
            if k == y:
                d = math.expm1(log_p[k]) + eps - eps / c  # p_y - (1 - eps) - eps / C
            else:
                d = math.exp(log_p[k]) - eps / c
            dlogits[i, k] = d / n
    return total / n, dlogits


def mse(pred, target):
    """Mean squared error over all elements: ``(mean_loss, dpred)`` with
    dpred = 2 (pred - target) / n."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    flat_p = pred.reshape(-1)
    flat_t = target.reshape(-1)
    n = flat_p.size
    total = 0.0
    grad = np.zeros(n, dtype=np.float64)
    for i in range(n):
        diff = float(flat_p[i]) - float(flat_t[i])
        total += diff * diff
        grad[i] = 2.0 * diff / n
    return total / n, grad.reshape(pred.shape)
