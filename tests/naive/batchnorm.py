"""Batch normalisation, the textbook way: plain loops per channel over (N, H, W).

Training mode normalises each channel with the batch mean and the *biased* variance
(divide by M = N*H*W), then scales by gamma and shifts by beta:

    mean_c = sum(x[:, c]) / M
    var_c  = sum((x[:, c] - mean_c)**2) / M
    y      = gamma_c * (x - mean_c) / sqrt(var_c + eps) + beta_c

Evaluation mode uses the running statistics instead. The backward of the training-mode
forward (the loss depends on x also through mean_c and var_c):

    xhat   = (x - mean_c) * invstd_c,  invstd_c = 1 / sqrt(var_c + eps)
    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma_c * invstd_c / M * (M * dy - dbeta - xhat * dgamma)

Every function returns new arrays in the dtype of x; the arithmetic is done in Python floats
(double precision) whatever the input dtype. Tests pass float64 inputs.
"""

import math

import numpy as np


def _channel_stats(x):
    """Per-channel batch mean and biased variance (float64), two passes (mean, then centred
    squares)."""
    n_batch, channels, height, width = x.shape
    count = n_batch * height * width
    mean = np.zeros(channels, dtype=np.float64)
    var = np.zeros(channels, dtype=np.float64)
    xl = x.tolist()  # Python floats: the same values, read without numpy's per-element overhead
    for c in range(channels):
        total = 0.0
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    total += xl[n][c][h][w]
        mu = total / count
        squares = 0.0
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    d = xl[n][c][h][w] - mu
                    squares += d * d
        mean[c] = mu
        var[c] = squares / count
    return mean, var


def batchnorm_forward_train(x, gamma, beta, eps):
    """x (N, C, H, W), gamma and beta (C,) -> (y, mean, var_biased)."""
    n_batch, channels, height, width = x.shape
    mean, var = _channel_stats(x)
    y = np.zeros_like(x)
    xl = x.tolist()
    for c in range(channels):
        invstd = 1.0 / math.sqrt(float(var[c]) + float(eps))
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    xhat = (xl[n][c][h][w] - float(mean[c])) * invstd
                    y[n, c, h, w] = float(gamma[c]) * xhat + float(beta[c])
    return y, mean.astype(x.dtype), var.astype(x.dtype)


def batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, eps):
    """Normalise with the running statistics: y = gamma * (x - rm) / sqrt(rv + eps) + beta."""
    n_batch, channels, height, width = x.shape
    y = np.zeros_like(x)
    xl = x.tolist()
    for c in range(channels):
        invstd = 1.0 / math.sqrt(float(running_var[c]) + float(eps))
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    xhat = (xl[n][c][h][w] - float(running_mean[c])) * invstd
                    y[n, c, h, w] = float(gamma[c]) * xhat + float(beta[c])
    return y


def batchnorm_backward(x, gamma, dy, eps):
    """Gradients of the training-mode forward: -> (dx, dgamma, dbeta)."""
    n_batch, channels, height, width = x.shape
    count = n_batch * height * width
    mean, var = _channel_stats(x)
    dx = np.zeros_like(x)
    dgamma = np.zeros(channels, dtype=x.dtype)
    dbeta = np.zeros(channels, dtype=x.dtype)
    xl, dyl = x.tolist(), dy.tolist()
    for c in range(channels):
        mu = float(mean[c])
        invstd = 1.0 / math.sqrt(float(var[c]) + float(eps))
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    xhat = (xl[n][c][h][w] - mu) * invstd
                    sum_dy += dyl[n][c][h][w]
                    sum_dy_xhat += dyl[n][c][h][w] * xhat
        dbeta[c] = sum_dy
        dgamma[c] = sum_dy_xhat
        scale = float(gamma[c]) * invstd / count
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    xhat = (xl[n][c][h][w] - mu) * invstd
                    dx[n, c, h, w] = scale * (count * dyl[n][c][h][w] - sum_dy - xhat * sum_dy_xhat)
    return dx, dgamma, dbeta
