"""Compile the kernels of a training step in two processes when the kernel cache is cold.

Numba compiles a kernel the first time it is called with new argument types and caches it on
disk (``cache=True``); later processes load it in milliseconds. The first run on a machine
compiles every kernel of a training step, 30-40 s on one core, almost all of it in numba's and
LLVM's passes, which hold the GIL (the wrappers numba builds around each parallel loop are
linked without being compiled: ``fastcnn.kernels._parfor_link_only``). So on a cold cache
``fastcnn train`` starts a helper process that compiles about half of them
(``compile_backward``) into the cache while this process loads the data and compiles the
others (``compile_forward``), then waits for the helper: those kernels then load from the
cache. With 2 cores the first run takes about half as long; with a
warm cache nothing is started. Kernels are reached through ``fastcnn.functional`` with tiny
inputs (conv2's input gradient directly, as functional calls it: through functional it would
compile conv2's weight gradient a second time, in both processes), so they compile with
exactly the argument types the layers use (shapes do not matter to numba); test_precompile
checks that the two groups leave nothing of a training step to compile.

If the cache cannot be written (a read-only install without ``NUMBA_CACHE_DIR``), the helper's
work is lost and this process compiles what it needs itself: slower, never wrong.

Any other first training step (``fit``, or a loop of one's own) gets a helper of its own on a
cold cache (``fastcnn.compile_helper``), which compiles single kernels on request: ``RECIPES``
below says how to reach each one alone with the layers' argument types.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ._types import Array

__all__ = [
    "start",
    "Precompiling",
    "compile_forward",
    "compile_backward",
    "compile_winograd_backward",
    "cache_is_cold",
    "die_with_parent",
    "RECIPES",
]


def _pool_gradient(dtype: DTypeLike) -> tuple[Array, Array, Array]:
    """A max pool's gradient, argmax and output (2x2 windows over a 4x4 conv output of 4
    filters), as the layers pass them: NCHW views of channels-last arrays."""
    from . import functional as F

    pooled = F._nchw(np.ones((2, 2, 2, 4), dtype))
    return pooled, F._nchw(np.zeros((2, 2, 2, 4), np.int64)), pooled


def _conv_operands(channels: int, dtype: DTypeLike) -> tuple[Array, Array]:
    from . import functional as F

    return F._nchw(np.ones((2, 6, 6, channels), dtype)), np.ones((4, channels, 3, 3), dtype)


def compile_forward(dtype: DTypeLike = np.float32) -> None:
    """Compile (or load) the fused conv + ReLU + pool, ReLU's backward (the dense layers'),
    the SGD update and conv2's weight gradient: about half of the compile time."""
    from . import functional as F
    from .kernels import optim as kernels_optim

    dtype = np.dtype(dtype)
    x = np.ones((2, 1, 6, 6), dtype)
    w = np.ones((4, 1, 3, 3), dtype)
    F.conv2d_relu_max_pool2d_forward(x, w, np.zeros(4, dtype), 1, 0, 1, (2, 2))
    _relu_gradient(dtype)
    p = np.zeros(4, dtype)
    t: Any = dtype.type  # the scalar type, float32 or float64
    kernels_optim.sgd_update(p, p, p, t(0.1), t(0.9), t(1.0), False, t(0.0), False, True)
    _fused_weight_gradient(dtype, 32)  # the sparse one (input_grad=False: no input gradient)


def compile_backward(dtype: DTypeLike = np.float32) -> None:
    """Compile (or load) the rest: conv1's weight gradient (1 channel: the dense product, dy
    rebuilt in cache from the pooled gradient), conv2's input gradient from the pooled
    gradient (the kernel called as functional calls it, with the same argument types),
    conv2's forward (Winograd's F(4x4): its output is past WINOGRAD4_MIN_SIZE; in training
    and evaluation mode alike), its max pool and the Dense layers' kernels (the parallel
    ones: both layers have more than kernels.dense.SMALL_WEIGHTS weights)."""
    from . import functional as F

    dtype = np.dtype(dtype)
    _dense_forward(dtype)
    _fused_weight_gradient(dtype, 1)  # the dense one
    _fused_input_gradient(dtype)
    # conv2 on the Winograd kernel its output's size picks, then its max pool
    size = F.WINOGRAD4_MIN_SIZE + 2
    x32 = F._nchw(np.ones((2, size, size, 32), dtype))
    a = F.conv2d_forward(x32, np.ones((16, 32, 3, 3), dtype), None, 1, 0, relu=True, winograd=True)
    F.max_pool2d_forward(a, 2, 2, 0)
    _dense_backward(dtype)


def _dense_operands(dtype: np.dtype[Any], small: bool) -> tuple[Array, Array]:
    """x (2, K) and weight (F, K) of a Dense layer on the serial kernels (``small``: at most
    kernels.dense.SMALL_WEIGHTS weights) or on the parallel ones."""
    from .kernels import dense

    k = 3 if small else dense.SMALL_WEIGHTS // 4 + 1
    return np.ones((2, k), dtype), np.ones((4, k), dtype)


def _dense_forward(dtype: np.dtype[Any], small: bool = False) -> None:
    """The Dense forward (the parallel kernel, or the small layers' serial one)."""
    from . import functional as F

    x, w = _dense_operands(dtype, small)
    F.dense_forward(x, w, np.zeros(4, dtype), relu=True)


def _dense_backward(dtype: np.dtype[Any], small: bool = False) -> None:
    """The Dense layers' gradients (with a bias; input gradient too), as the layers ask."""
    from . import functional as F

    x, w = _dense_operands(dtype, small)
    F.dense_backward(x, w, np.ones((2, 4), dtype))


def compile_winograd_backward(dtype: DTypeLike = np.float32, size: int = 4) -> None:
    """Compile (or load) the Winograd weight gradient of a 3x3 'same' convolution with 16
    channels and filters on ``size`` x ``size`` images, as ``functional.conv2d_backward``
    calls it: F(2x2)'s at the default size, F(4x4)'s where the size picks it
    (``functional._weight_gradient_by_winograd4``). Its input gradient runs on the Winograd
    forward, which the forward pass compiles."""
    from . import functional as F

    dtype = np.dtype(dtype)
    x = F._nchw(np.ones((2, size, size, 16), dtype))
    w = np.ones((16, 16, 3, 3), dtype)
    dy = F._nchw(np.ones((2, size, size, 16), dtype))
    F.conv2d_backward(x, w, dy, 1, 1, input_grad=False)


# ---- one kernel alone, as the layers call it: what fastcnn.compile_helper's helper compiles ----


def _conv_weight_gradient(dtype: np.dtype[Any]) -> None:
    """The direct kernel's weight gradient (4 channels: not by Winograd)."""
    from . import functional as F

    x, w = _conv_operands(4, dtype)
    F.conv2d_backward(x, w, F._nchw(np.ones((2, 4, 4, 4), dtype)), input_grad=False)


def _conv_input_gradient(dtype: np.dtype[Any]) -> None:
    """The input gradient by col2im."""
    from . import functional as F

    x, w = _conv_operands(4, dtype)
    _, strides, pads, dilations = F.conv2d_output_shape(x.shape, w.shape, 1, 0, 1, "Conv2D")
    dy = np.ones((2, 4, 4, 4), dtype)
    kernel = F._conv2d.conv2d_backward_input
    F._input_gradient(kernel, x.shape, w, dy, strides, pads, dilations)


def _conv_forward(dtype: np.dtype[Any]) -> None:
    """The direct kernel's forward (4 channels: not by Winograd), also a stride-1 input
    gradient's (the transposed convolution)."""
    from . import functional as F

    F.conv2d_forward(*_conv_operands(4, dtype), relu=True, winograd=True)


def _conv_phases_input_gradient(dtype: np.dtype[Any]) -> None:
    """The input gradient phase by phase (16 channels, 3x3, stride 2)."""
    from . import functional as F

    x, w = np.ones((2, 16, 8, 8), dtype), np.ones((4, 16, 3, 3), dtype)
    _, strides, pads, dilations = F.conv2d_output_shape(x.shape, w.shape, 2, 1, 1, "Conv2D")
    dy = np.ones((2, 4, 4, 4), dtype)
    kernel = F._conv2d_phases.conv2d_backward_input_phases
    F._input_gradient(kernel, x.shape, w, dy, strides, pads, dilations)


def _conv_c1_weight_gradient(dtype: np.dtype[Any]) -> None:
    """The one-channel weight gradient (LeNet-5's first convolution: 6 filters of 5x5)."""
    from . import functional as F

    x = np.ones((2, 1, 8, 8), dtype)
    w = np.ones((6, 1, 5, 5), dtype)
    F.conv2d_backward(x, w, F._nchw(np.ones((2, 4, 4, 6), dtype)), input_grad=False)


def _fused_weight_gradient(dtype: np.dtype[Any], channels: int) -> None:
    """The reference network's weight gradient through a max pool: sparse at 32 channels,
    dense at 1."""
    from . import functional as F

    gp, argmax, y = _pool_gradient(dtype)
    F.max_pool2d_conv2d_backward(
        *_conv_operands(channels, dtype), gp, argmax, y, (2, 4, 4, 4), 2, input_grad=False
    )


def _fused_input_gradient(dtype: np.dtype[Any]) -> None:
    """The input gradient through a max pool, called as functional calls it."""
    from . import functional as F
    from .kernels import fused

    gp, argmax, y = _pool_gradient(dtype)
    w = np.ones((4, 32, 3, 3), dtype)
    dx = np.empty((2, 6, 6, 32), dtype)
    fused.maxpool2d_conv2d_backward_input(
        F._nhwc(gp), F._nhwc(argmax), F._nhwc(y), True, 2, 2, w, 1, 1, 0, 0, 1, 1, 4, 4, dx
    )


def _channels_last(dtype: np.dtype[Any], *shape: int) -> Array:
    """Ones of shape (N, C, H, W) in channels-last memory, as a convolution's output."""
    from . import functional as F

    n, c, h, w = shape
    return F._nchw(np.ones((n, h, w, c), dtype))


def _batch_norm_gradient(dtype: np.dtype[Any]) -> None:
    from . import functional as F

    x = _channels_last(dtype, 2, 4, 3, 3)
    p = np.ones(4, dtype)
    F.batch_norm_backward(_channels_last(dtype, 2, 4, 3, 3), x, p, p, p)


def _batch_norm_training(dtype: np.dtype[Any]) -> None:
    """BatchNorm's training forward on a convolution's channels-last output, ReLU fused."""
    from . import functional as F

    p = np.ones(4, dtype)
    F.batch_norm_forward_train(_channels_last(dtype, 2, 4, 3, 3), p, p, relu=True)


def _max_pool_gradient(dtype: np.dtype[Any]) -> None:
    from . import functional as F

    dy, argmax, _ = _pool_gradient(dtype)
    F.max_pool2d_backward(dy, argmax, (2, 4, 4, 4), 2, 2, 0, relu_output=dy)


def _avg_pool_gradient(dtype: np.dtype[Any]) -> None:
    from . import functional as F

    F.avg_pool2d_backward(_channels_last(dtype, 2, 4, 2, 2), (2, 4, 4, 4), 2)


def _global_avg_pool_gradient(dtype: np.dtype[Any]) -> None:
    from . import functional as F

    F.global_avg_pool2d_backward(np.ones((2, 4), dtype), (2, 4, 3, 3))


def _relu_gradient(dtype: np.dtype[Any]) -> None:
    from . import functional as F

    a = np.ones((2, 3), dtype)
    F.relu_backward(a, a)


def _sum(dtype: np.dtype[Any]) -> None:
    """The residual blocks' gradient sum (fastcnn.functional.add)."""
    from . import functional as F

    a = np.ones((2, 3), dtype)
    F.add(a, a)


#: Kernel (module.function of fastcnn.kernels) -> the function compiling it alone for a dtype,
#: with the argument types the layers pass (test_compile_helper checks them).
RECIPES: dict[str, Callable[[np.dtype[Any]], None]] = {
    "dense.dense_forward": _dense_forward,
    "dense.dense_product": _dense_backward,
    "dense.dense_forward_small": lambda dtype: _dense_forward(dtype, small=True),
    "dense.dense_backward_small": lambda dtype: _dense_backward(dtype, small=True),
    "conv2d.conv2d_backward_weight": _conv_weight_gradient,
    "conv2d.conv2d_backward_input": _conv_input_gradient,
    "conv2d.conv2d_forward": _conv_forward,
    "conv2d_phases.conv2d_backward_input_phases": _conv_phases_input_gradient,
    "conv2d_c1.conv2d_c1_backward_weight": _conv_c1_weight_gradient,
    "winograd.conv2d_winograd_backward_weight": compile_winograd_backward,
    "winograd4.conv2d_winograd4_backward_weight": lambda dtype: compile_winograd_backward(
        dtype, size=8
    ),
    "fused.maxpool2d_conv2d_backward_weight": lambda dtype: _fused_weight_gradient(dtype, 32),
    "fused.maxpool2d_conv2d_backward_weight_dense": lambda dtype: _fused_weight_gradient(dtype, 1),
    "fused.maxpool2d_conv2d_backward_input": _fused_input_gradient,
    "batchnorm.batchnorm_forward_train_nhwc": _batch_norm_training,
    "batchnorm.batchnorm_backward_nhwc": _batch_norm_gradient,
    "pool2d.maxpool2d_backward": _max_pool_gradient,
    "pool2d.avgpool2d_backward": _avg_pool_gradient,
    "pool2d.global_avgpool2d_backward": _global_avg_pool_gradient,
    "activations.relu_backward": _relu_gradient,
    "activations.add": _sum,
}


def _index_paths():
    """The files numba's cache keeps the index of compile_backward's kernels in."""
    from .kernels import fused

    kernels = (fused.maxpool2d_conv2d_backward_weight_dense, fused.maxpool2d_conv2d_backward_input)
    return [k._cache._cache_file._index_path for k in kernels]  # numba's private cache layout


def cache_is_cold() -> bool:
    """True when the kernels compile_backward compiles have nothing in numba's cache yet.
    False, with a ``RuntimeWarning``, when numba's cache internals look different: then the
    first run compiles everything in this process (slower, never wrong)."""
    try:
        paths = _index_paths()
    except AttributeError as e:
        warnings.warn(
            f"fastcnn: cannot read numba's kernel cache ({e}): a first run compiles "
            "every kernel in one process; FASTCNN_NO_PRECOMPILE=1 silences this warning",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return not all(os.path.exists(p) for p in paths)


def die_with_parent(parent_pid: int) -> None:
    """In the helper: be killed when the parent process dies (Linux's PR_SET_PDEATHSIG), so a
    SIGTERM or SIGKILL of the parent, which runs no Python cleanup, leaves no helper compiling on.
    Elsewhere, or if prctl is missing, nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


class Precompiling:
    """The helper process compiling the backward kernels (:func:`start`). Calling it compiles
    the forward kernels here and then waits for the helper; :meth:`cancel` stops the helper
    (``fastcnn train`` on an error before training: a process that goes on, a notebook or a
    test calling ``cli.main``, would otherwise keep a helper compiling for a minute per call)."""

    def __init__(self, helper: subprocess.Popen[bytes], dtype: DTypeLike) -> None:
        self.helper = helper
        self.dtype = dtype

    def cancel(self) -> None:
        """Stop the helper and reap it (nothing if it has ended)."""
        self.helper.kill()
        self.helper.wait()

    def __call__(self) -> None:
        interrupted: list[int] = []

        def on_sigint(signum: int, frame: object) -> None:
            interrupted.append(signum)
            # may be raised inside one of llvmlite's ctypes callbacks, which swallow it: the
            # flag is checked when the compilation returns
            raise KeyboardInterrupt

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            compile_forward(self.dtype)
            if interrupted:
                raise KeyboardInterrupt
            self.helper.wait()
        except BaseException:  # Ctrl-C, SIGTERM, an error: the helper's work is not wanted
            self.cancel()
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


def start(dtype: DTypeLike = np.float32) -> Precompiling | None:
    """On a cold cache, start the helper process running compile_backward and return it (a
    :class:`Precompiling`: call it before training, or cancel it), or None when the cache is
    warm."""
    from . import compile_helper

    compile_helper.disable()  # this helper, or none: not a second one from the first kernel
    if os.environ.get("FASTCNN_NO_PRECOMPILE") or not cache_is_cold():
        return None
    code = (
        "from fastcnn.precompile import compile_backward, die_with_parent; "
        f"die_with_parent({os.getpid()}); compile_backward({np.dtype(dtype).name!r})"
    )
    helper = compile_helper.spawn(code)
    if helper is None:
        return None
    return Precompiling(helper, dtype)
