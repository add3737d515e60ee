"""A first training step on a cold kernel cache compiles in two processes: this one compiles
the kernels in the order it reaches them, a helper compiles the ones it will reach later.

Numba compiles a kernel on its first call, holding the GIL, and caches it on disk: on a machine
where nothing is cached yet a training step compiles for 30-40 s on one core. When a forward
kernel first compiles (or loads) here, the kernels that follow it in a training step are
requested from a helper process (``FOLLOWERS``: the average pools' and activations'
gradients, the Dense layers'), a Sequential's first training forward requests its BatchNorm
and Dense layers' kernels (``expect_layers``), a convolution layer's training forward its own
gradients (``expect_convolution_gradients``), and a max pool's training forward its gradient
where its backward runs it (``expect_pool_gradient``). The helper compiles the requests the longest
first (``_SECONDS``; BatchNorm's training forward, which this process needs right after the
first convolution's forward, before them all), each through ``fastcnn.precompile.RECIPES``
(tiny inputs with the layers' argument types), into numba's cache. Whoever starts a kernel
first claims it, by creating a file in a folder the two processes share: when this process
reaches a kernel the helper has claimed, it waits until the helper has finished it and loads it
from the cache; a requested kernel the helper has not started yet, this process claims and
compiles itself, and the helper skips it. While this process waits for the helper, it compiles
requested kernels nobody has started yet (those the helper would reach last first). So neither
process waits on work the other has not begun, and no kernel compiles twice.

One helper per process, started by the first request on a cold cache when a second CPU is free
(``_spare_cpu``); it ends when this process does, or after ``_IDLE`` seconds without a request.
None in the helpers themselves, after ``fastcnn.precompile.start`` (``fastcnn train``'s own
split), or with ``FASTCNN_NO_PRECOMPILE=1``. If the cache cannot be written, the helper's work
is lost and this process compiles what it needs: slower, never wrong.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FOLLOWERS",
    "request",
    "expect_convolution_gradients",
    "expect_layers",
    "expect_pool_gradient",
    "install",
    "disable",
    "spawn",
    "serve",
]

#: Seconds a kernel takes to compile in the helper from an empty cache, rounded (AVX2; the
#: first-step timelines in the commit that added this): the helper takes the longest first
#: (its priority is minus these), since a long one started late decided the step's wall time
#: while this process, out of work of its own, waited for it; this process takes the short
#: ones the helper has not started (``_steal``). Unlisted: 0.
_SECONDS = {
    "conv2d.conv2d_backward_weight": 8,
    "fused.maxpool2d_conv2d_backward_weight_dense": 9,
    "fused.maxpool2d_conv2d_backward_input": 5,
    "winograd4.conv2d_winograd4_backward_weight": 5,
    "winograd.conv2d_winograd_backward_weight": 5,
    "conv2d_phases.conv2d_backward_input_phases": 4,
    "batchnorm.batchnorm_backward_nhwc": 4,
    "conv2d.conv2d_backward_input": 3,
    "fused.maxpool2d_conv2d_backward_weight": 3,
    "dense.dense_product": 2,
    "dense.dense_forward": 2,
    "conv2d_c1.conv2d_c1_backward_weight": 2,
    "pool2d.maxpool2d_backward": 1,
    "pool2d.avgpool2d_backward": 1,
}


def _longest_first(*names: str) -> tuple[tuple[str, int], ...]:
    """(name, priority) pairs: the helper takes the lowest priority first."""
    return tuple((name, -_SECONDS.get(name, 0)) for name in names)


_DENSE = _longest_first("dense.dense_forward", "dense.dense_product")
_DENSE_SMALL = _longest_first("dense.dense_forward_small", "dense.dense_backward_small")
(_RELU,) = _longest_first("activations.relu_backward")
(_MAX_POOL_GRADIENT,) = _longest_first("pool2d.maxpool2d_backward")

#: A forward kernel's name -> the kernels a training step runs after it, (name, priority): the
#: helper takes the lowest priority first, equal priorities in the order requested. A
#: convolution layer requests its own gradients (``expect_convolution_gradients``: they depend
#: on its shape, and through a max pool on the fusion), a max pool its gradient where that runs
#: (``expect_pool_gradient``), a Sequential the kernels of its BatchNorm and Dense layers
#: (``expect_layers``: the Dense layers' depend on their size).
FOLLOWERS: dict[str, tuple[tuple[str, int], ...]] = {
    "dense_forward": (_DENSE[1],),
    "dense_forward_small": (_DENSE_SMALL[1],),
    "avgpool2d_forward": _longest_first("pool2d.avgpool2d_backward"),
    "global_avgpool2d_forward": _longest_first("pool2d.global_avgpool2d_backward"),
    "relu_forward": (_RELU,),
    "add_relu_forward": (_RELU, *_longest_first("activations.add")),
}
#: A priority ahead of every compile time
_FIRST = -(max(_SECONDS.values()) + 1)
#: BatchNorm's training forward, ahead of everything (this process needs it right after the
#: first convolution's forward), and its gradient by its length like the rest
_BATCH_NORM = (
    ("batchnorm.batchnorm_forward_train_nhwc", _FIRST),
    *_longest_first("batchnorm.batchnorm_backward_nhwc"),
)
#: Up to this many input channels a convolution is taken for a network's first layer (an
#: image's channels), whose input gradient no training step computes: not requested.
_IMAGE_CHANNELS = 4

_HELPER_TIMEOUT = 600.0  # seconds this process waits for one kernel before compiling it itself
_IDLE = 30.0  # seconds the helper waits for a request before it ends
_GATHER = 0.05  # seconds the helper waits after the first request for the ones sent with it

_state: dict[str, Any] = {}
_order = itertools.count()  # the order of the requests
_lock = threading.Lock()


def _reset() -> None:
    """This process's state: fresh in a new process and after a fork (nothing started here)."""
    _state.update(
        pid=os.getpid(),
        helper=None,  # the helper's Popen, once started
        tried=False,  # a helper was started or refused: never a second one
        claims=None,  # the folder of claim files shared with the helper
        # (dispatcher, dtype) -> [kernel name, priority, order, claimed by the helper], sent
        # and not yet reached here
        requested={},
        convolutions=set(),  # the convolutions expect_convolution_gradients has seen
        pools=set(),  # the dtypes expect_pool_gradient has seen
        stealing=False,  # compiling a requested kernel while waiting for the helper
    )


_reset()


def disable() -> None:
    """No helper from this process (``fastcnn.precompile.start`` runs one of its own)."""
    with _lock:
        if _state["pid"] != os.getpid():
            _reset()
        _state["tried"] = True


def _kernel(name: str) -> Any:
    from . import kernels

    module, attr = name.split(".")
    return getattr(getattr(kernels, module), attr)


def _kernel_name(kernel: Any) -> str:
    """The name in RECIPES of a kernel (``_kernel``'s inverse); a KeyError for one without a
    recipe, which the helper could not compile."""
    from .precompile import RECIPES

    for name in RECIPES:
        if _kernel(name) is kernel:
            return name
    raise KeyError(f"no recipe compiles {kernel}")


def _cached(dispatcher: Any) -> bool:
    """Whether numba's cache has an index for the kernel (False if its layout is unknown)."""
    try:
        return os.path.exists(dispatcher._cache._cache_file._index_path)  # numba's private layout
    except AttributeError:
        return False


def _dtype_name(argument_types: Any) -> str | None:
    """The dtype of a kernel's first floating array argument, as numpy names it."""
    for t in argument_types:
        dtype = getattr(t, "dtype", None)
        if dtype is not None and str(dtype) in ("float32", "float64"):
            return str(dtype)
    return None


def _claim_path(claims: str, name: str, dtype: str) -> str:
    return os.path.join(claims, f"{name}-{dtype}")


def _claim(claims: str, name: str, dtype: str) -> bool:
    """Claim the kernel for the calling process: True if no process had (or the folder is
    gone: then compile it anyway)."""
    try:
        os.close(os.open(_claim_path(claims, name, dtype), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


# ---- this process: requests, claims, waits ----


def spawn(code: str, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes] | None:
    """A Python process running ``code`` with this fastcnn first on its path, without a helper
    of its own (None if it cannot start). Two lines run before ``code`` (they put this
    fastcnn's folder first): ``code`` cannot start with a ``from __future__`` import."""
    env = dict(os.environ, FASTCNN_NO_PRECOMPILE="1")
    # the folder holding this fastcnn (an install or a source checkout) comes first
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    # and before the working directory, which ``python -c`` puts ahead of PYTHONPATH: a process
    # started in another checkout's folder had its helper compile that checkout's kernels
    first = f"import sys\nsys.path.insert(0, {root!r})\n"
    try:
        return subprocess.Popen(
            [sys.executable, "-c", first + code],
            stdin=stdin,
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


def _helper() -> subprocess.Popen[bytes] | None:
    """The running helper, started on the first call if allowed (under ``_lock``)."""
    state = _state
    if not state["tried"]:
        state["tried"] = True
        if os.environ.get("FASTCNN_NO_PRECOMPILE") or not _spare_cpu():
            return None
        try:
            claims = tempfile.mkdtemp(prefix="fastcnn-compile-")
        except OSError:  # no writable temporary folder: compile everything here
            return None
        code = f"from fastcnn.compile_helper import serve; serve({os.getpid()}, {claims!r})"
        helper = spawn(code, stdin=subprocess.PIPE)
        if helper is None:
            shutil.rmtree(claims, ignore_errors=True)
            return None
        atexit.register(_stop, helper, claims, os.getpid())
        state["helper"], state["claims"] = helper, claims
    helper = state["helper"]
    return helper if helper is not None and helper.poll() is None else None


def _stop(helper: subprocess.Popen[bytes], claims: str, pid: int) -> None:
    """At exit: end the helper (it may be compiling what nothing will use) and its folder;
    nothing in a forked child that exits through Python (the helper is its parent's)."""
    if os.getpid() != pid:
        return
    if helper.poll() is None:
        helper.kill()
        helper.wait()
    shutil.rmtree(claims, ignore_errors=True)


def request(kernels: Any, dtype: str | None, start: bool = True) -> None:
    """Ask the helper to compile ``kernels`` ((name, priority) pairs, names as in
    ``fastcnn.precompile.RECIPES``) for ``dtype``, those not cached or requested yet; with
    ``start``, starts the helper on the first request. Nothing when no helper runs or can."""
    if dtype is None:
        return
    with _lock:
        state = _state
        if state["pid"] != os.getpid():
            _reset()
        if state["tried"] and state["helper"] is None or not (start or state["tried"]):
            return  # refused, disabled, or not to be started for this
        for name, priority in kernels:
            dispatcher = _kernel(name)
            key = (dispatcher, dtype)
            if key in state["requested"] or _cached(dispatcher):
                continue
            helper = _helper()
            if helper is None or helper.stdin is None:
                return
            try:
                helper.stdin.write(f"{priority} {name} {dtype}\n".encode())
                helper.stdin.flush()
            except OSError:  # it ended (idle, or killed): this process compiles the rest
                return
            state["requested"][key] = [name, priority, next(_order), False]


def _steal() -> bool:
    """While waiting for the helper: compile here the kernel neither process has started that
    the helper would reach last (the shortest, requested last). False if there is none."""
    import numpy as np

    from . import precompile

    with _lock:
        state = _state
        if state["stealing"]:
            return False
        entries = sorted((e[1], e[2], key) for key, e in state["requested"].items() if not e[3])
        for _, _, key in reversed(entries):
            entry = state["requested"][key]
            if _claim(state["claims"], entry[0], key[1]):
                del state["requested"][key]
                name, dtype = entry[0], key[1]
                break
            entry[3] = True  # the helper's: waited for when reached
        else:
            return False
        state["stealing"] = True
    try:
        precompile.RECIPES[name](np.dtype(dtype))
    except Exception:
        pass  # compiled again when the step reaches it, which meets the error if it is one
    finally:
        state["stealing"] = False
    return True


def _wait_for(name: str, dtype: str) -> None:
    """Wait until the helper has finished the kernel it claimed (a file says so), or ended;
    meanwhile compile here what it has not started (``_steal``)."""
    helper, claims = _state["helper"], _state["claims"]
    done = _claim_path(claims, name, dtype) + ".done"
    start = time.monotonic()
    while helper.poll() is None and not os.path.exists(done):
        if time.monotonic() - start > _HELPER_TIMEOUT:  # stuck: compile it here
            helper.kill()
            helper.wait()
            return
        if not _steal():
            time.sleep(0.02)


def _on_compile(dispatcher: Any, argument_types: Any) -> None:
    """fastcnn.kernels.compile_hooks' hook, before each compilation or cache load of a kernel
    here: a requested kernel is claimed (and compiled here) or waited for; a forward kernel
    requests its followers. Cheap when there is nothing to do (every cache load calls it)."""
    state = _state
    if state["pid"] != os.getpid():
        with _lock:
            _reset()
    if state["requested"]:
        dtype = _dtype_name(argument_types)
        with _lock:
            entry = state["requested"].pop((dispatcher, dtype), None)
            wait = entry is not None and not _claim(state["claims"], entry[0], str(dtype))
        if wait:
            _wait_for(entry[0], str(dtype))
    followers = FOLLOWERS.get(dispatcher.py_func.__name__)
    if followers is not None and not (state["tried"] and state["helper"] is None):
        # a helper starts for a kernel that compiles here, never for one loaded from the
        # cache: its followers may be kernels a step never runs (an evaluation's, a fusion's)
        request(followers, _dtype_name(argument_types), start=not _cached(dispatcher))


def expect_convolution_gradients(
    weight: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    input_size: Any,
    pooled: bool = False,
) -> None:
    """Called by a convolution's training-mode forward (one group) before its kernel: request
    the kernels of its weight gradient and, but for a first layer's, of its input gradient
    (``_convolution_gradients``); ``pooled``: a convolution + ReLU whose max pool's windows
    tile, whose backward forms the gradients from the pooled ones where it can. After the
    first call for a convolution, a set lookup."""
    state = _state
    if state["pid"] != os.getpid():
        with _lock:
            _reset()
    try:
        key = (weight.shape, weight.dtype, stride, padding, dilation, tuple(input_size), pooled)
        if key in state["convolutions"]:
            return
        state["convolutions"].add(key)
    except TypeError:  # an unhashable argument (the layer checks them): nothing to request
        return
    if state["tried"] and state["helper"] is None:
        return
    try:
        kernels = _convolution_gradients(weight, stride, padding, dilation, input_size, pooled)
    except (ValueError, TypeError, IndexError):  # bad arguments: the layer's checks say which
        return
    # a helper starts only if the weight gradient, which a training step surely runs, is cold
    request(kernels, weight.dtype.name, start=not _cached(_kernel(kernels[0][0])))


def expect_pool_gradient(dtype: np.dtype[Any]) -> None:
    """Called by a max pool's training forward whose backward runs the pool's gradient (the
    layer's, or a plan step's): request its kernel. Not a follower of the pool's forward
    kernel: a Conv2D -> ReLU -> MaxPool2D whose windows tile forms the convolution's gradients
    from the pooled ones and mostly never runs it (``_convolution_gradients`` asks for it where
    it does). After the first call, a set lookup."""
    state = _state
    if state["pid"] != os.getpid():
        with _lock:
            _reset()
    name = dtype.name
    if name in state["pools"]:
        return
    state["pools"].add(name)
    if state["tried"] and state["helper"] is None:
        return
    request((_MAX_POOL_GRADIENT,), name, start=not _cached(_kernel(_MAX_POOL_GRADIENT[0])))


def expect_layers(layers: Any) -> None:
    """Called by a Sequential's first training forward with its layers: request BatchNorm's
    training forward ahead of everything and its gradient, if one is a BatchNorm2D (this
    process would reach the forward right after the first convolution's, one long
    compilation after another; see _BATCH_NORM); then the kernels of its Dense layers, by
    their size (the parallel ones, or the small layers' serial ones), in the layers' order."""
    from .kernels import dense
    from .layers import BatchNorm2D, Dense

    wanted: list[tuple[str, int]] = []
    dtype = None
    for m in layers:
        if isinstance(m, BatchNorm2D) and _BATCH_NORM[0] not in wanted:
            wanted[:0] = _BATCH_NORM
        elif isinstance(m, Dense):
            small = m.weight.data.size <= dense.SMALL_WEIGHTS
            wanted += [k for k in (_DENSE_SMALL if small else _DENSE) if k not in wanted]
        else:
            continue
        dtype = dtype or m.weight.data.dtype.name
    if wanted:
        request(wanted, dtype, start=not _cached(_kernel(wanted[0][0])))


def _convolution_gradients(
    weight: Any, stride: Any, padding: Any, dilation: Any, input_size: Any, pooled: bool = False
) -> tuple[tuple[str, int], ...]:
    """The (kernel, priority) pairs of a convolution's gradients, as
    ``functional._backward_kernels`` picks them (finite inputs taken), but for an input
    gradient by Winograd: its kernel is the forward's of the same layer, compiled by then
    (both run where 3x3 'same' convolutions have channels and filters in multiples of 16, at
    the same size). Whether the layer is a network's first one, whose input gradient no step
    computes, is guessed from its channels (at most an image's); a wrong guess costs compile
    time, never a result (through a max pool whose channels are not whole tiles, a first
    layer's fused weight gradient differs from a later one's unfused kernels; a first layer
    of more than an image's channels has the unrequested one compiled here). ``pooled``:
    with the max pool's gradient where the backward forms it."""
    from . import functional as F

    x_shape = (1, weight.shape[1], *input_size)
    out_shape, strides, pads, dilations = F.conv2d_output_shape(
        x_shape, weight.shape, stride, padding, dilation, "Conv2D"
    )
    input_grad = weight.shape[1] > _IMAGE_CHANNELS
    kernels = F._backward_kernels(
        weight, strides, pads, dilations, out_shape[2:], input_grad, pooled
    )
    wanted = [k for k in (kernels.weight, kernels.input) if k not in (None, F._winograd_forward)]
    names = [_kernel_name(k) for k in wanted]
    fused_input = kernels.input in (None, F._fused.maxpool2d_conv2d_backward_input)
    if pooled and (kernels.unfused or not fused_input):  # the pool's gradient is formed
        names.append(_MAX_POOL_GRADIENT[0])
    return _longest_first(*names)


def install() -> None:
    """Register the hook with fastcnn.kernels (idempotent)."""
    from . import kernels

    if _on_compile not in kernels.compile_hooks:
        kernels.compile_hooks.append(_on_compile)


# ---- the helper ----


def serve(parent_pid: int, claims: str) -> None:
    """The helper's loop: read ``priority name dtype`` lines from stdin, compile each kernel
    not claimed yet (lowest priority first, then in the order received), mark it done; end at
    the end of stdin or after ``_IDLE`` seconds without work."""
    import numpy as np

    from . import precompile

    precompile.die_with_parent(parent_pid)
    pending: list[tuple[int, int, str, str]] = []
    order = itertools.count()
    arrived = threading.Condition()
    closed = []

    def read() -> None:
        for line in sys.stdin:
            fields = line.split()
            if len(fields) == 3 and fields[1] in precompile.RECIPES:
                with arrived:
                    heapq.heappush(pending, (int(fields[0]), next(order), fields[1], fields[2]))
                    arrived.notify()
        with arrived:
            closed.append(True)
            arrived.notify()

    threading.Thread(target=read, daemon=True).start()
    with arrived:  # the first requests come together: gathered, so that priorities order them
        arrived.wait_for(lambda: pending or closed, timeout=_IDLE)
    time.sleep(_GATHER)
    while True:
        with arrived:
            if not pending and not closed:
                arrived.wait(timeout=_IDLE)
            if not pending:
                return
            _, _, name, dtype = heapq.heappop(pending)
        if not _claim(claims, name, dtype):
            continue  # the parent got there first
        try:
            precompile.RECIPES[name](np.dtype(dtype))
        except Exception:
            pass  # the parent compiles it itself, and meets the error there if it is one
        finally:
            with open(_claim_path(claims, name, dtype) + ".done", "w"):
                pass
