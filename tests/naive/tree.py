"""A module tree run with the textbook loops: the reference the containers are checked against.

``forward(model, x)`` walks a fastcnn model's structure (its classes and hyper-parameters, read
from ``get_config()``, and its current weights) and computes the output with the naive loops of
this folder only; it returns the output and a function ``backward(dy)`` that returns the input's
gradient and a dict of every parameter's gradient under the model's dotted names. The rules are
the textbook ones: a chain backward in reverse, a residual sum's gradient given to both
operands, a concatenation's gradient split by channels, branch gradients summed. Float64.
"""

import numpy as np

from . import activations, batchnorm, conv2d, dense, pool2d


def _pads(padding, kernel, dilation):
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":  # PyTorch: total dilation * (k - 1), the extra one at the bottom/right
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
    return ((padding[0], padding[0]), (padding[1], padding[1]))


def _leaf(module, cfg, x, name, grads):
    """(y, backward) for one layer; backward(dy) adds into ``grads`` and returns dx."""
    kind = cfg["class"]
    training = module.training

    def put(key, value):
        full = f"{name}.{key}" if name else key
        grads[full] = grads.get(full, 0) + value

    if kind == "Conv2D":
        w = module.weight.data.astype(np.float64)
        b = np.zeros(w.shape[0]) if module.bias is None else module.bias.data.astype(np.float64)
        geom = (
            tuple(cfg["stride"]),
            _pads(
                cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"]),
                w.shape[2:],
                tuple(cfg["dilation"]),
            ),
            tuple(cfg["dilation"]),
        )
        y = conv2d.conv2d_forward(x, w, b, *geom)

        def back(dy):
            dx, dw, db = conv2d.conv2d_backward(x, w, dy, *geom)
            put("weight", dw)
            if module.bias is not None:
                put("bias", db)
            return dx

        return y, back
    if kind in ("BatchNorm2D", "BatchNorm1D"):
        x4 = x.reshape(x.shape + (1,) * (4 - x.ndim))
        g, beta = module.weight.data.astype(np.float64), module.bias.data.astype(np.float64)
        eps = cfg["eps"]
        if training:
            y, _, _ = batchnorm.batchnorm_forward_train(x4, g, beta, eps)

            def back(dy):
                dx, dg, db = batchnorm.batchnorm_backward(x4, g, dy.reshape(x4.shape), eps)
                put("weight", dg)
                put("bias", db)
                return dx.reshape(x.shape)
        else:
            rm, rv = module.running_mean.astype(np.float64), module.running_var.astype(np.float64)
            y = batchnorm.batchnorm_forward_eval(x4, g, beta, rm, rv, eps)
            inv = 1 / np.sqrt(rv + eps)

            def back(dy):  # the statistics are constants: y = g * inv * (x - rm) + beta
                d4 = dy.reshape(x4.shape)
                xhat = (x4 - rm[None, :, None, None]) * inv[None, :, None, None]
                put("weight", (d4 * xhat).sum(axis=(0, 2, 3)))
                put("bias", d4.sum(axis=(0, 2, 3)))
                return (d4 * (g * inv)[None, :, None, None]).reshape(x.shape)

        return y.reshape(x.shape), back
    if kind == "Dense":
        w = module.weight.data.astype(np.float64)
        b = None if module.bias is None else module.bias.data.astype(np.float64)
        y = dense.dense_forward(x, w, b)

        def back(dy):
            dx, dw, db = dense.dense_backward(x, w, dy)
            put("weight", dw)
            if b is not None:
                put("bias", db)
            return dx

        return y, back
    if kind == "ReLU":
        return activations.relu_forward(x), lambda dy: activations.relu_backward(x, dy)
    if kind == "Tanh":
        y = np.tanh(x)
        return y, lambda dy: dy * (1 - y * y)
    if kind == "Flatten":
        return x.reshape(x.shape[0], -1), lambda dy: dy.reshape(x.shape)
    if kind == "GlobalAvgPool2D":
        return (
            pool2d.global_avgpool2d_forward(x),
            lambda dy: pool2d.global_avgpool2d_backward(x.shape, dy),
        )
    if kind in ("MaxPool2D", "AvgPool2D"):
        k, s, p = tuple(cfg["kernel_size"]), tuple(cfg["stride"]), cfg["padding"]
        pads = ((p[0], p[0]), (p[1], p[1]))
        if kind == "MaxPool2D":
            y, _ = pool2d.maxpool2d_forward(x, k, s, pads)
            return y, lambda dy: pool2d.maxpool2d_backward(x, dy, k, s, pads)
        return (
            pool2d.avgpool2d_forward(x, k, s, pads),
            lambda dy: pool2d.avgpool2d_backward(x.shape, dy, k, s, pads),
        )
    raise NotImplementedError(f"no naive reference for {kind}")


def _run(module, x, name, grads):
    cfg = module.get_config()
    kind = cfg["class"]

    def join(child):
        return f"{name}.{child}" if name else child

    if kind == "Sequential":
        backs = []
        for i, child in enumerate(module.children()):
            x, back = _run(child, x, join(str(i)), grads)
            backs.append(back)

        def back(dy):
            for b in reversed(backs):
                dy = b(dy)
            return dy

        return x, back
    if kind == "Residual":
        a, back_body = _run(module.body, x, join("body"), grads)
        if module.shortcut is None:
            s, back_short = x, (lambda dy: dy)
        else:
            s, back_short = _run(module.shortcut, x, join("shortcut"), grads)
        return a + s, (lambda dy: back_body(dy) + back_short(dy))
    if kind == "Concat":
        outs = [_run(b, x, join(str(i)), grads) for i, b in enumerate(module.children())]
        widths = [o.shape[1] for o, _ in outs]

        def back(dy):
            total, start = 0, 0
            for (_o, b), w in zip(outs, widths, strict=True):
                total = total + b(dy[:, start : start + w])
                start += w
            return total

        return np.concatenate([o for o, _ in outs], axis=1), back
    return _leaf(module, cfg, x, name, grads)


def forward(model, x):
    """(output, backward) of ``model`` on ``x`` (float64), textbook loops only;
    ``backward(dy)`` -> (dx, {dotted parameter name: gradient})."""
    grads = {}
    y, back = _run(model, np.asarray(x, dtype=np.float64), "", grads)

    def backward(dy):
        grads.clear()
        dx = back(np.asarray(dy, dtype=np.float64))
        return dx, dict(grads)

    return y, backward
