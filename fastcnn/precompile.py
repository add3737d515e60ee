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

Any other first training step (``fit``, or a loop of one's own) gets the same on a cold cache
from ``install_background`` (registered when fastcnn is imported): the first compilation of a
convolution's forward kernel starts a helper compiling the Dense forward (first: the forward
pass reaches it soon) and the backward kernels (``compile_conv_backward``, or
``compile_backward`` for the fused reference network), and the first call of one of those
waits until the helper has written that kernel to the cache, and loads it. One helper per
process at most; none when ``start`` ran, when the cache is warm, in the helpers themselves,
when no second CPU is free at that moment (``_spare_cpu``), or with ``FASTCNN_NO_PRECOMPILE=1``.
A second helper compiles the Winograd weight gradient, started by the first training-mode
forward of a convolution that will need it (``expect_winograd_weight_gradient``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ._types import Array

__all__ = [
    "start",
    "compile_forward",
    "compile_backward",
    "compile_conv_backward",
    "compile_winograd_backward",
    "expect_winograd_weight_gradient",
    "cache_is_cold",
    "install_background",
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
    dy = np.ones((2, 3), dtype)
    F.relu_backward(dy, dy)
    p = np.zeros(4, dtype)
    t: Any = dtype.type  # the scalar type, float32 or float64
    kernels_optim.sgd_update(p, p, p, t(0.1), t(0.9), t(1.0), False, t(0.0), False, True)
    # 32 channels: the sparse weight gradient (input_grad=False: no input gradient here)
    gp, argmax, y = _pool_gradient(dtype)
    F.max_pool2d_conv2d_backward(
        *_conv_operands(32, dtype), gp, argmax, y, (2, 4, 4, 4), 2, input_grad=False
    )


def compile_backward(dtype: DTypeLike = np.float32) -> None:
    """Compile (or load) the rest: conv1's weight gradient (1 channel: the dense product, dy
    rebuilt in cache from the pooled gradient), conv2's input gradient from the pooled
    gradient (the kernel called as functional calls it, with the same argument types),
    conv2's evaluation-mode forward (Winograd, then the pool) and the Dense gradients."""
    from . import functional as F
    from .kernels import fused

    dtype = np.dtype(dtype)
    _dense_forward(dtype)
    gp, argmax, y = _pool_gradient(dtype)
    F.max_pool2d_conv2d_backward(
        *_conv_operands(1, dtype), gp, argmax, y, (2, 4, 4, 4), 2, input_grad=False
    )
    w = np.ones((4, 32, 3, 3), dtype)
    dx = np.empty((2, 6, 6, 32), dtype)
    fused.maxpool2d_conv2d_backward_input(
        F._nhwc(gp), F._nhwc(argmax), F._nhwc(y), True, 2, 2, w, 1, 1, 0, 0, 1, 1, 4, 4, dx
    )
    # evaluation mode (validation, predict): conv2 on the Winograd kernel, then its max pool
    x32, _ = _conv_operands(32, dtype)
    a = F.conv2d_forward(x32, np.ones((16, 32, 3, 3), dtype), None, 1, 0, relu=True, winograd=True)
    F.max_pool2d_forward(a, 2, 2, 0)
    _dense_backward(dtype)


def compile_conv_backward(dtype: DTypeLike = np.float32) -> None:
    """Compile (or load) the unfused convolution's gradients, as ``functional.conv2d_backward``
    calls them on channels-last activations: the weight gradient and the input gradient by
    col2im (4 channels, stride 1: not computed as a convolution); the Dense gradients."""
    from . import functional as F

    dtype = np.dtype(dtype)
    _dense_forward(dtype)
    x, _ = _conv_operands(4, dtype)
    F.conv2d_backward(x, np.ones((8, 4, 3, 3), dtype), F._nchw(np.ones((2, 4, 4, 8), dtype)))
    _dense_backward(dtype)


def _dense_forward(dtype: np.dtype[Any]) -> None:
    """The Dense forward, first in either helper: the first forward reaches it after its
    convolutions, and waits for this kernel alone (1.7 s of compilation, off this process)."""
    from . import functional as F

    F.dense_forward(np.ones((2, 3), dtype), np.ones((4, 3), dtype), np.zeros(4, dtype), relu=True)


def _dense_backward(dtype: np.dtype[Any]) -> None:
    """The Dense layers' gradients (with a bias; input gradient too), as the layers ask."""
    from . import functional as F

    F.dense_backward(np.ones((2, 3), dtype), np.ones((4, 3), dtype), np.ones((2, 4), dtype))


def compile_winograd_backward(dtype: DTypeLike = np.float32) -> None:
    """Compile (or load) the Winograd weight gradient of a 3x3 'same' convolution with 16
    channels and filters, as ``functional.conv2d_backward`` calls it (its input gradient runs
    on the Winograd forward, which the forward pass compiles)."""
    from . import functional as F

    dtype = np.dtype(dtype)
    x = F._nchw(np.ones((2, 4, 4, 16), dtype))
    w = np.ones((16, 16, 3, 3), dtype)
    F.conv2d_backward(x, w, F._nchw(np.ones((2, 4, 4, 16), dtype)), 1, 1, input_grad=False)


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


# ---- background compilation from a training step's first forward kernel ----
#
# A custom training loop (or ``fit``'s warm-up) compiles each kernel when first called: the
# forward kernels, then the backward ones, one after another on one core. On a cold cache, the
# first compilation of a convolution's forward kernel starts a helper process that compiles
# that convolution's two backward kernels (about 40% of a training step's compilation) into
# the cache meanwhile; when this process reaches one of them it waits for the helper and loads
# it from the cache. Triggers and jobs: the forward kernel's name -> (the function of this
# module the helper runs, the names of the kernels it compiles).
_DENSE = ("dense.dense_forward", "dense.dense_product")
_CONV_JOB = (
    "compile_conv_backward",
    ("conv2d.conv2d_backward_weight", "conv2d.conv2d_backward_input") + _DENSE,
)
_BACKGROUND = {
    # a network's first convolution in training starts it: the direct kernel, or LeNet-5's
    # one-channel one (the lanes kernel runs in evaluation mode only: no backward follows)
    "conv2d_forward": _CONV_JOB,
    "conv2d_c1_forward": _CONV_JOB,
    "conv2d_relu_maxpool2d_forward": (
        "compile_backward",
        ("fused.maxpool2d_conv2d_backward_weight_dense", "fused.maxpool2d_conv2d_backward_input")
        + _DENSE,
    ),
}
#: The second helper's job, started by expect_winograd_weight_gradient (no kernel's compilation
#: tells: the Winograd forward also runs where no such gradient follows).
_WINOGRAD_JOB = ("compile_winograd_backward", ("winograd.conv2d_winograd_backward_weight",))
_HELPER_TIMEOUT = 600.0  # seconds a kernel waits for the helper before compiling it itself
_background: dict[str, Any] = {
    "pid": None,
    "helper": None,
    "waiting": frozenset(),
    "off": False,
    "second": None,  # the second job's helper and the kernels it compiles
}


def _kernel(name: str) -> Any:
    from . import kernels

    module, attr = name.split(".")
    return getattr(getattr(kernels, module), attr)


def _dtype_name(argument_types: Any) -> str | None:
    """The dtype of a kernel's first array argument, as numpy names it (None if it has none)."""
    for t in argument_types:
        dtype = getattr(t, "dtype", None)
        if dtype is not None and str(dtype) in ("float32", "float64"):
            return str(dtype)
    return None


def _spawn_helper(code: str) -> subprocess.Popen[bytes] | None:
    env = dict(os.environ, FASTCNN_NO_PRECOMPILE="1")
    # the folder holding this fastcnn (an install or a source checkout) comes first
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    except OSError:
        return None


def _spare_cpu() -> bool:
    """Whether a second CPU looks free for the helper: at least two usable, and (on Linux) fewer
    tasks running right now than usable CPUs, this process's own included (/proc/loadavg). On a
    machine whose other CPU is busy the helper only adds its start-up and the helpers both
    processes compile (about 2 s of CPU) to the same core."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    if usable < 2:
        return False
    running = _running_tasks()
    if running is None:
        return True
    # this process's own threads count once: Numba's workers, still running for a moment after
    # a parallel kernel, kept LeNet-5's helper from ever starting (its first convolution runs
    # before the second one, the trigger, compiles)
    return running - max(0, _running_threads_here() - 1) < usable


def _running_tasks() -> int | None:
    """Threads running on the machine now (/proc/loadavg's fourth field), None if unknown."""
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _running_threads_here() -> int:
    """Threads of this process in state R (running) now, per /proc/self/task (0 if unknown)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += state == "R"
    return count


def _wait_for(helper: subprocess.Popen[bytes]) -> None:
    try:
        helper.wait(timeout=_HELPER_TIMEOUT)
    except subprocess.TimeoutExpired:  # stuck: this process compiles what it needs itself
        helper.kill()
        helper.wait()


def _wait_for_kernel(dispatcher: Any) -> None:
    """Wait until the helper has written ``dispatcher``'s kernel to the cache (its index file
    appears: numba writes it after the data, each by an atomic rename) or has ended; then
    numba loads it. Kernels a helper compiles early (the Dense forward) are thus ready long
    before the helper's last one."""
    state = _background
    state["waiting"] = state["waiting"] - {dispatcher}
    helper = state["helper"]
    try:
        path = dispatcher._cache._cache_file._index_path  # numba's private layout
    except AttributeError:
        path = None
    start = time.monotonic()
    while helper.poll() is None:
        if path is not None and os.path.exists(path):
            return
        if time.monotonic() - start > _HELPER_TIMEOUT:  # stuck: compile here
            helper.kill()
            helper.wait()
            state["waiting"] = frozenset()
            return
        time.sleep(0.02)


def _start_job(
    job: tuple[str, tuple[str, ...]], dtype: str | None, beside: bool = False
) -> tuple[subprocess.Popen[bytes], Any] | None:
    """The helper running ``job`` (this module's function, the kernels it compiles) for
    ``dtype``, and those kernels; None when the cache is warm for them, or no helper could
    start. ``beside``: our first helper still runs (the CPU it holds counts as spare)."""
    function, names = job
    try:
        kernels = [_kernel(n) for n in names]
        paths = [k._cache._cache_file._index_path for k in kernels]  # numba's private layout
    except AttributeError:
        return None
    if dtype is None or all(os.path.exists(p) for p in paths):
        return None  # warm (or nothing this helper would compile)
    if not (beside or _spare_cpu()):
        return None
    code = (
        f"from fastcnn.precompile import {function}, die_with_parent; "
        f"die_with_parent({os.getpid()}); {function}({dtype!r})"
    )
    helper = _spawn_helper(code)
    return None if helper is None else (helper, frozenset(kernels))


def _on_compile(dispatcher: Any, argument_types: Any) -> None:
    """kernels.compile_hooks' hook: start the helper at the first compilation of a trigger,
    wait for it at a kernel it compiles. Cheap when there is nothing to do (every cache load
    of every kernel calls it)."""
    state = _background
    if state["pid"] != os.getpid():  # a fresh process, or a fork: nothing started here yet
        state.update(pid=os.getpid(), helper=None, waiting=frozenset(), second=None)
    if state["waiting"] and dispatcher in state["waiting"]:
        _wait_for_kernel(dispatcher)
        return
    second = state["second"]
    if second is not None and second[1] and dispatcher in second[1]:
        state["second"] = (second[0], frozenset())
        _wait_for(second[0])
        return
    name = dispatcher.py_func.__name__
    if name not in _BACKGROUND or os.environ.get("FASTCNN_NO_PRECOMPILE"):
        return
    if state["off"] or state["helper"] is not None:
        return
    state["off"] = True  # one such helper per process, started on the first trigger or never
    started = _start_job(_BACKGROUND[name], _dtype_name(argument_types))
    if started is not None:
        state["helper"], state["waiting"] = started


def expect_winograd_weight_gradient(
    weight: Array, stride: Any, padding: Any, dilation: Any
) -> None:
    """Called by a convolution's training-mode forward: if its weight gradient will run on
    the Winograd kernel and that kernel is not in the cache, start a second helper compiling
    it (about 7 s of CPU) while this process goes on with the forward, beside the first
    helper if that still runs (the two share the CPUs; the work is the same). Once per
    process; nothing after the first call but a dictionary lookup."""
    state = _background
    if state["pid"] != os.getpid():
        state.update(pid=os.getpid(), helper=None, waiting=frozenset(), second=None)
    if state["second"] is not None:
        return
    shape = weight.shape
    if shape[2:] != (3, 3) or shape[0] % 16 or shape[1] % 16:
        return
    from . import functional as F

    k, s, d = (
        F.pair(v, n, "Conv2D")
        for v, n in ((shape[2:], "kernel"), (stride, "stride"), (dilation, "dilation"))
    )
    if s != (1, 1):  # (Winograd runs at stride 1 only)
        return
    pads = F.conv2d_padding(padding, k, s, d)
    if not F._weight_gradient_by_winograd(shape, s, pads, d):
        return
    state["second"] = (None, frozenset())  # decided: once per process
    if os.environ.get("FASTCNN_NO_PRECOMPILE"):
        return
    first = state["helper"]
    beside = first is not None and first.poll() is None
    started = _start_job(_WINOGRAD_JOB, str(weight.dtype), beside)
    if started is not None:
        state["second"] = started


def install_background() -> None:
    """Register the background compilation's hook with fastcnn.kernels (idempotent);
    ``FASTCNN_NO_PRECOMPILE=1`` in the environment when a kernel first compiles turns it off."""
    from . import kernels

    if _on_compile not in kernels.compile_hooks:
        kernels.compile_hooks.append(_on_compile)


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


def start(dtype: DTypeLike = np.float32) -> Callable[[], None] | None:
    """On a cold cache, start the helper process running compile_backward; returns a
    callable that runs compile_forward here and then waits for the helper (call it
    before training), or None when the cache is warm."""
    _background["off"] = True  # this helper, or none: not a second one from the first kernel
    _background["pid"] = os.getpid()
    if os.environ.get("FASTCNN_NO_PRECOMPILE") or not cache_is_cold():
        return None
    code = (
        "from fastcnn.precompile import compile_backward, die_with_parent; "
        f"die_with_parent({os.getpid()}); compile_backward({np.dtype(dtype).name!r})"
    )
    helper = _spawn_helper(code)
    if helper is None:
        return None

    def finish() -> None:
        interrupted: list[int] = []

        def on_sigint(signum: int, frame: object) -> None:
            interrupted.append(signum)
            # may be raised inside one of llvmlite's ctypes callbacks, which swallow it: the
            # flag is checked when the compilation returns
            raise KeyboardInterrupt

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            compile_forward(dtype)
            if interrupted:
                raise KeyboardInterrupt
            helper.wait()
        except BaseException:  # Ctrl-C, SIGTERM, an error: the helper's work is not wanted
            helper.kill()
            helper.wait()
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    return finish
