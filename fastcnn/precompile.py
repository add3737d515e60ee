"""Compile the kernels of a training step in two processes when the kernel cache is cold.

Numba compiles a kernel the first time it is called with new argument types and caches it on
disk (``cache=True``); later processes load it in milliseconds. The first run on a machine
compiles every kernel of a training step, about 28 s on one core, almost all of it in numba's
own passes, which hold the GIL. So on a cold cache ``fastcnn train`` starts a helper process
that compiles the convolution's backward kernels into the cache while this process loads the
data and compiles the rest, then waits for the helper: those kernels then load from the cache. With 2 cores the first run takes about half as long; with a warm cache nothing is
started. Kernels are reached through ``fastcnn.functional`` with tiny inputs, so they compile
with exactly the argument types the layers use (shapes do not matter to numba).

If the cache cannot be written (a read-only install without ``NUMBA_CACHE_DIR``), the helper's
work is lost and this process compiles what it needs itself: slower, never wrong.
"""
import os
import subprocess
import sys

import numpy as np

__all__ = ["start", "compile_forward", "compile_backward", "cache_is_cold"]


def compile_forward(dtype=np.float32):
    """Compile (or load) the fused conv + ReLU + pool, the max pool (+ ReLU) backward, ReLU's
    backward (the dense layers') and the SGD update: about half of the compile time."""
    from . import functional as F
    from .kernels import optim as kernels_optim

    dtype = np.dtype(dtype)
    x = np.ones((2, 1, 6, 6), dtype)
    w = np.ones((4, 1, 3, 3), dtype)
    pooled, argmax, shape = F.conv2d_relu_max_pool2d_forward(x, w, np.zeros(4, dtype), 1, 0, 1,
                                                             (2, 2))
    F.max_pool2d_backward(pooled, argmax, shape, 2, relu_output=pooled)
    dy = np.ones((2, 3), dtype)
    F.relu_backward(dy, dy)
    p = np.zeros(4, dtype)
    t = dtype.type
    kernels_optim.sgd_update(p, p, p, t(0.1), t(0.9), t(1.0), False, t(0.0), False, True)


def compile_backward(dtype=np.float32):
    """Compile (or load) the convolution's weight gradient and its gradients from a max pool's
    gradient: the other half. (The dense input gradient is not part of a training step of the
    reference network: conv1 needs none, conv2's comes from the pooled gradient.) The inputs
    are built with numpy, so no other kernel compiles here."""
    from . import functional as F

    dtype = np.dtype(dtype)
    x = F._nchw(np.ones((2, 6, 6, 1), dtype))  # channels-last, as the layers pass them
    w = np.ones((4, 1, 3, 3), dtype)
    dy = F._nchw(np.ones((2, 4, 4, 4), dtype))
    F.conv2d_backward(x, w, dy, input_grad=False)  # conv1: the weight gradient only
    # the max pool shortcut's kernels (32 input channels: the shortcut applies)
    x = F._nchw(np.ones((2, 6, 6, 32), dtype))
    w = np.ones((4, 32, 3, 3), dtype)
    pooled = F._nchw(np.ones((2, 2, 2, 4), dtype))
    argmax = F._nchw(np.zeros((2, 2, 2, 4), np.int64))
    F.max_pool2d_conv2d_backward(x, w, pooled, argmax, pooled, (2, 4, 4, 4), 2)


def cache_is_cold():
    """True when the convolution's backward kernels have nothing in numba's cache yet."""
    try:
        from .kernels import conv2d, fused

        for kernel in (conv2d.conv2d_backward_weight, fused.maxpool2d_conv2d_backward_input):
            index = kernel._cache._cache_file._index_path  # numba internals: guarded
            if not os.path.exists(index):
                return True
        return False
    except Exception:  # another numba version: do nothing special
        return False


def start(dtype=np.float32):
    """On a cold cache, start the helper process compiling the backward kernels; returns a
    callable that compiles the forward kernels here and then waits for the helper (call it
    before training), or None when the cache is warm."""
    if os.environ.get("FASTCNN_NO_PRECOMPILE") or not cache_is_cold():
        return None
    code = f"from fastcnn.precompile import compile_backward; compile_backward({np.dtype(dtype).name!r})"
    env = dict(os.environ, FASTCNN_NO_PRECOMPILE="1")
    # the folder holding this fastcnn (an install or a source checkout) comes first
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        helper = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    except OSError:
        return None

    def finish():
        try:
            compile_forward(dtype)
        finally:
            helper.wait()

    return finish
