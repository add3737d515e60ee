"""Checkpoints: a model, its optimizer and scheduler state, the epoch and free-form extras in one
file.

    fastcnn.checkpoint.save("run/epoch3.safetensors", model, optimizer, scheduler, epoch=3,
                            extra={"shuffle_rng": rng.bit_generator.state})
    ckpt = fastcnn.checkpoint.load("run/epoch3.safetensors")
    model = ckpt.model                    # Sequential rebuilt from its config, weights loaded
    ckpt.restore_optimizer(optimizer)     # optimizer built on model.parameters()
    ckpt.restore_scheduler(scheduler)

File format (a plain safetensors file, readable by any safetensors reader, no pickle):
- tensors ``model.<key>`` for every entry of ``model.state_dict()`` ("model.0.weight", ...) and
  ``optimizer.<index>.<name>`` for every array in the optimizer's per-parameter state
  ("optimizer.0.momentum_buffer", "optimizer.3.exp_avg", ...);
- the safetensors metadata entry ``"fastcnn"``: a JSON string holding the format name and
  version, the fastcnn version, the architecture config (``model.get_config()``), the names,
  shapes and dtypes of all tensors, a sha256 over all tensor data, the optimizer class,
  hyper-parameters and per-parameter non-array state (``step``), the scheduler class and state,
  the epoch and ``extra``, and (format 2) ``meta_sha256``, a sha256 of all of that metadata
  (its canonical JSON: sorted keys, no spaces), so that a corrupted number in the metadata (a
  learning rate, an epoch) is refused like corrupted tensor data. Format 1 files (without it)
  are still read.

Writing is atomic: a temporary file in the destination folder (``.<name>.<pid>-<random>.tmp``)
is written, flushed and fsynced, then renamed over the destination (``os.replace``) and the
folder is fsynced. On any error the temporary file is removed and an existing file at ``path`` is
left untouched. A process killed during a save (SIGKILL, power cut) leaves the previous file
intact and, at worst, its temporary file, which the next successful save to the same path
deletes (tests/test_kill_during_save.py kills real saving processes to check all this). The
replaced file's permission bits are kept; a symbolic link at ``path`` is written through (its
target replaced, the link kept); an OSError names the file (docs/reliability-errors.md).

Loading validates everything before building anything: the safetensors header is read first
(never the whole file), the format name and version and the metadata checksum are checked, the
header must account for the file's exact size (a huge or sparse file is refused unread) and agree
with the tensor manifest, and the names, shapes and dtypes the architecture config declares are
compared with the declared tensors (worked out from the config, no layer built: a few bytes of
config cannot make the library allocate gigabytes). Only then is the tensor data read and its
checksum checked, the model rebuilt from its config and every tensor compared with the rebuilt
model again; only then are the weights loaded. Any problem raises ``CheckpointError`` (a
``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import safetensors.numpy as _st

from ._checks import is_int
from ._types import Array

if TYPE_CHECKING:
    from .module import Module
    from .optim import LRScheduler, Optimizer

ModuleT = TypeVar("ModuleT", bound="Module")
OptimizerT = TypeVar("OptimizerT", bound="Optimizer")
SchedulerT = TypeVar("SchedulerT", bound="LRScheduler")

__all__ = [
    "save",
    "load",
    "check_destination",
    "Checkpoint",
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "fastcnn-checkpoint"
FORMAT_VERSION = 2  # 2: metadata checksum "meta_sha256"
_META_KEY = "fastcnn"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# Deepest nesting of lists and objects in the metadata: a model config nested MAX_CONFIG_DEPTH
# (64) containers deep stays below it; json and the checks after it never near Python's recursion
# limit. save() refuses deeper values (extra), load() refuses deeper files.
_MAX_JSON_DEPTH = 200
_MAX_OPTIMIZER_ARRAYS = 8  # per parameter (SGD keeps 1, Adam 2): bounds what a header may declare


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit: the message names the file and the
    problem."""


def _fastcnn_version():
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _state_spec(config):
    """{name: (shape, dtype)} of the config's state without building it, or None."""
    from .module import state_spec_of

    return state_spec_of(config)


def _from_config(config):
    """Build a model from its architecture config (indirection so tests can stub the model)."""
    from .module import module_from_config

    # a fixed seed: the fresh weights are overwritten, and loading a checkpoint must not
    # advance the global generator of fastcnn.manual_seed
    return module_from_config(config, rng=0)


# ---------------------------------------------------------------------------------------------
# Saving


def save(
    path: str | os.PathLike[str],
    model: Module,
    optimizer: Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    epoch: int | None = None,
    extra: Any = None,
    input_shape: Sequence[int] | None = None,
) -> str:
    """Write ``model`` (+ optional optimizer and scheduler state, epoch, extra) to ``path``
    atomically.

    ``input_shape``: the shape of one input the model takes, e.g. (1, 28, 28) (``fit`` records
    it), for ``fastcnn summary``; read back as ``Checkpoint.input_shape``.

    ``extra`` must be JSON-able (dicts with str keys, lists, str, int, float, bool, None; numpy
    scalars are converted); e.g. the bit-generator state of the shuffling RNG. Everything is
    serialised in memory and checked before the file system is touched. Returns ``path``.
    """
    path = check_destination(path)
    data = _serialise(path, model, optimizer, scheduler, epoch, extra, input_shape)
    _atomic_write(path, data)
    return path


def check_destination(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes], what: str = "checkpoint"
) -> str:
    """``path`` as a str if :func:`save` can write there, else the error save would raise:
    ValueError for an empty name, FileNotFoundError for a missing folder, IsADirectoryError for
    a folder, PermissionError for a folder that is not writable. ``fit`` calls it before its first
    step so that a bad path does not cost an epoch. (A symbolic link is checked at its target.)
    ``what`` names the kind of file in the messages (the callbacks and plots write others)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{what} path: expected a file name (str or os.PathLike), got {type(path).__name__}"
        )
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path == "":
        raise ValueError(f"{what} path is empty: expected a file name such as 'run.safetensors'")
    target = _destination(path)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write {what} {path}: no such folder {folder}"
        )
    if os.path.isdir(target):
        raise IsADirectoryError(
            errno.EISDIR, f"cannot write {what} {path}: it is a folder, expected a file name"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"cannot write {what} {path}: the folder {folder} is not writable"
        )
    return path


def _destination(path):
    """The file a save to ``path`` replaces: ``path`` itself, or the file a symbolic link at
    ``path`` points to (followed to its end)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _serialise(
    path, model, optimizer=None, scheduler=None, epoch=None, extra=None, input_shape=None
):
    """The bytes :func:`save` writes (everything checked, nothing written)."""
    if epoch is not None:
        if not is_int(epoch):
            raise TypeError(
                f"checkpoint.save: epoch must be an int or None, got {type(epoch).__name__}"
            )
        epoch = int(epoch)
    if input_shape is not None:
        input_shape = [int(s) for s in input_shape]

    tensors = {}
    state = model.state_dict()
    config = model.get_config()
    for key, value in state.items():
        tensors["model." + str(key)] = _tensor(value, f"model state {key!r}")

    # Layers with their own generator (Dropout): their state, so a resumed run draws the same masks.
    rng_state = model.get_rng_state() if hasattr(model, "get_rng_state") else {}

    opt_meta = None
    if optimizer is not None:
        opt_meta, opt_tensors = _split_optimizer_state(optimizer)
        tensors.update(opt_tensors)

    sched_meta = None
    if scheduler is not None:
        sched_meta = {"class": type(scheduler).__name__, "state": scheduler.state_dict()}

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fastcnn_version": _fastcnn_version(),
        "model": {
            "config": config,
            "keys": list(map(str, state.keys())),
            "rng_state": rng_state,
            "input_shape": input_shape,
        },
        "tensors": {
            name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in tensors.items()
        },
        "sha256": _digest(tensors),
        "optimizer": opt_meta,
        "scheduler": sched_meta,
        "epoch": epoch,
        "extra": extra,
    }
    # extra sits one level inside the metadata: it may hold one level less than a file
    for what, value, limit in (
        ("extra", extra, _MAX_JSON_DEPTH - 1),
        ("the metadata", meta, _MAX_JSON_DEPTH),
    ):
        if _json_depth(value, limit) > limit:
            raise ValueError(
                f"checkpoint.save: cannot write {path}: {what} is nested more than "
                f"{limit} levels deep (lists and dicts inside each other), more than "
                f"a checkpoint holds"
            )
    try:
        meta_json = json.dumps(meta, default=_json_default, sort_keys=False)
        meta["meta_sha256"] = _meta_digest(json.loads(meta_json))
        meta_json = json.dumps(meta, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"checkpoint.save: cannot write {path}: a value is not JSON-able ({exc}); "
            f"extra, configs and scheduler state must be JSON-able"
        ) from exc
    return _st.save(tensors, metadata={_META_KEY: meta_json})


def _tensor(value, what):
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"checkpoint.save: {what} is a {type(value).__name__}, expected a numpy array"
        )
    # safetensors stores little-endian, C-contiguous data
    # np.require keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
    return np.require(value, dtype=value.dtype.newbyteorder("<"), requirements="C")


def _split_optimizer_state(optimizer):
    sd = optimizer.state_dict()
    if not isinstance(sd, dict) or "hyper" not in sd or "state" not in sd:
        raise TypeError(
            "checkpoint.save: optimizer.state_dict() must be a dict with 'hyper' and 'state'"
        )
    tensors: dict[str, Array] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        index = str(index)
        if not index.isdigit():
            raise ValueError(
                f"checkpoint.save: optimizer state key {index!r} is not a parameter index"
            )
        scalars[index] = {}
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                if "." in name:
                    raise ValueError(f"checkpoint.save: optimizer state name {name!r} contains '.'")
                tensors[f"optimizer.{index}.{name}"] = _tensor(
                    value, f"optimizer state {index}.{name}"
                )
            else:
                scalars[index][name] = value
    meta = {"class": type(optimizer).__name__, "hyper": sd["hyper"], "state": scalars}
    return meta, tensors


def _json_depth(value, limit):
    """Nesting depth of the lists, tuples and dicts in `value` (a scalar is 0); stops counting
    past `limit` (so a value that contains itself ends too)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r:.80} is not JSON serializable")


def _meta_digest(meta):
    """sha256 of the metadata as parsed from JSON (without its own "meta_sha256" entry), over its
    canonical JSON: the same for any formatting of the same content."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    ).hexdigest()


def _digest(tensors):
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _write(f, data):
    """Write all of `data` to the open file `f` (a separate function so tests can make it fail)."""
    f.write(data)


def _temp_pattern(basename):
    """The temporary files of saves to ``basename``: ``.<basename>.<pid>-<12 hex>.tmp``."""
    return re.compile(r"\." + re.escape(basename) + r"\.(\d+)-[0-9a-f]{12}\.tmp\Z")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _remove_stale_temps(folder, basename):
    """Delete the temporary files left by saves to the same file whose process died (a save
    killed with SIGKILL, a power cut): they are never read, only disk space. A temp file of a
    live process (another save in progress) is left alone. POSIX only: on Windows ``os.kill``
    would terminate the process, so nothing is removed there. (Processes of other machines or
    PID namespaces saving to the same shared folder look dead from here: such a save would then
    fail with FileNotFoundError at its rename, leaving the previous file intact.)"""
    if os.name != "posix":
        return
    pattern = _temp_pattern(basename)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM while a file is opened and handed to its owner: a Ctrl-C then
    arrives once the handle is held by code that closes and deletes it, never in between. (Python
    runs signal handlers in the main thread only, whichever thread the signal hit; a signal mask
    would not do, the kernels' threads would take it. Elsewhere than the main thread: no hold.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held: dict[signal.Signals, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not None:  # None: installed outside Python, left alone
                held[signum] = signal.signal(signum, lambda s, frame: pending.append(s))
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for number in pending:
            signal.raise_signal(number)  # now, to the handler that was in place


def _atomic_write(path, data, what="checkpoint"):
    """Write ``data`` to ``path`` through a temporary file and a rename. A symbolic link at
    ``path`` is written through (its target is replaced, the link kept, as ``open(path, "w")``
    would do; replacing the link by a plain file would silently detach it from the file the user
    pointed it at). An existing file's permission bits are kept. OSErrors name the file."""
    target = _destination(path)
    folder = os.path.dirname(os.path.abspath(target))
    basename = os.path.basename(target)
    tmp = os.path.join(folder, f".{basename}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None  # a new file: 0o666 & ~umask, the permissions of a plain open()
    f = None
    try:
        with _signals_deferred():
            # O_EXCL: never clobber someone else's file.
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
            f = os.fdopen(fd, "wb")
        with f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if f is not None:
            f.close()
        if not (f is None and isinstance(exc, FileExistsError)):  # (else: not our file)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            where = path if target == path else f"{path} (a link to {target})"
            raise OSError(
                exc.errno,
                f"cannot write {what} {where}: "
                f"{exc.strerror or exc}; an existing file there is unchanged",
            ) from exc
        raise
    _fsync_dir(folder)
    _remove_stale_temps(folder, basename)


def _fsync_dir(folder):
    """Make the rename durable. Not possible on every platform (Windows): best effort there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Checkpoint:
    """What :func:`load` returns. ``model`` is ready to use; the rest restores a training run."""

    path: str
    model: Module
    model_state: dict[str, Array]
    config: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    optimizer_class: str | None
    scheduler_state: dict[str, Any] | None
    scheduler_class: str | None
    epoch: int | None
    extra: Any
    metadata: dict[str, Any] = field(repr=False)
    input_shape: tuple[int, ...] | None = None

    def restore_model(self, model: ModuleT) -> ModuleT:
        """Load the saved weights into an existing ``model`` of the same architecture.

        Refused (CheckpointError, nothing loaded) when ``model.get_config()`` differs from the
        saved config.
        """
        config = model.get_config()
        if _canonical(config) != _canonical(self.config):
            raise CheckpointError(
                f"{self.path}: the model's architecture differs from the checkpoint's "
                f"({_first_difference(self.config, config)}); nothing was loaded"
            )
        try:
            model.load_state_dict({k: v.copy() for k, v in self.model_state.items()})
            rng_state = self.metadata["model"].get("rng_state")
            if rng_state:
                model.set_rng_state(rng_state)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{self.path}: the saved model state does not fit the model "
                f"({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        return model

    def restore_optimizer(self, optimizer: OptimizerT) -> OptimizerT:
        """Load the saved optimizer state into ``optimizer`` (built on
        ``self.model.parameters()``)."""
        if self.optimizer_state is None:
            raise CheckpointError(f"{self.path}: the checkpoint holds no optimizer state")
        if type(optimizer).__name__ != self.optimizer_class:
            raise CheckpointError(
                f"{self.path}: the checkpoint holds {self.optimizer_class} state, cannot restore a "
                f"{type(optimizer).__name__}"
            )
        state = {
            "hyper": json.loads(json.dumps(self.optimizer_state["hyper"])),
            "state": {
                i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in e.items()}
                for i, e in self.optimizer_state["state"].items()
            },
        }
        try:
            optimizer.load_state_dict(state)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{self.path}: the saved {self.optimizer_class} state cannot be "
                f"restored ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        return optimizer

    def restore_scheduler(self, scheduler: SchedulerT) -> SchedulerT:
        """Load the saved scheduler state into ``scheduler``."""
        if self.scheduler_state is None:
            raise CheckpointError(f"{self.path}: the checkpoint holds no scheduler state")
        if type(scheduler).__name__ != self.scheduler_class:
            raise CheckpointError(
                f"{self.path}: the checkpoint holds {self.scheduler_class} state, cannot restore a "
                f"{type(scheduler).__name__}"
            )
        try:
            scheduler.load_state_dict(json.loads(json.dumps(self.scheduler_state)))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{self.path}: the saved {self.scheduler_class} state cannot be "
                f"restored ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        return scheduler


def _canonical(obj):
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _first_difference(expected, got, where="config"):
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in list(expected) + [k for k in got if k not in expected]:
            if key not in got:
                return f"{where}[{key!r}] missing in the model"
            if key not in expected:
                return f"{where}[{key!r}] not in the checkpoint"
            if _canonical(expected[key]) != _canonical(got[key]):
                return _first_difference(expected[key], got[key], f"{where}[{key!r}]")
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return f"{where}: {len(expected)} entries in the checkpoint, {len(got)} in the model"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            if _canonical(e) != _canonical(g):
                return _first_difference(e, g, f"{where}[{i}]")
    return (
        f"{where}: checkpoint has {_canonical(expected)[:200]}, model has {_canonical(got)[:200]}"
    )


# safetensors dtype -> numpy dtype string (the types safetensors.numpy reads)
_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "|i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "|u1",
    "BOOL": "|b1",
}


def _check_layout(fail, header, manifest, file_size, header_len):
    """Before any tensor data is read: the safetensors header's entries must have known dtypes,
    offsets that tile the data section exactly (its length is the file's size minus the header),
    byte lengths that match their shapes, and the names, dtypes and shapes of the manifest. So the
    file's size is accounted for by the declared shapes, which the caller can check first."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not isinstance(manifest, dict) or set(manifest) != set(entries):
        missing = sorted(set(manifest) - set(entries)) if isinstance(manifest, dict) else []
        unexpected = sorted(set(entries) - set(manifest)) if isinstance(manifest, dict) else []
        fail(
            f"tensors do not match the manifest (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]})"
        )
    spans = []
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            fail(f"corrupted safetensors header: entry {name!r:.100} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            fail(
                f"corrupted safetensors header: tensor {name!r:.100} has dtype {dtype!r:.50}, "
                f"expected one of {sorted(_DTYPES)}"
            )
        if not (isinstance(shape, list) and len(shape) <= 32 and all(is_int(d, 0) for d in shape)):
            fail(f"corrupted safetensors header: tensor {name!r:.100} has shape {shape!r:.100}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o, 0) for o in offsets)
        ):
            fail(f"corrupted safetensors header: tensor {name!r:.100} has offsets {offsets!r:.100}")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            fail(
                f"corrupted safetensors header: tensor {name!r:.100} of shape {shape} takes "
                f"{nbytes} bytes, its offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        spec = manifest[name]
        if (
            not isinstance(spec, dict)
            or shape != spec.get("shape")
            or _DTYPES[dtype] != spec.get("dtype")
        ):
            fail(f"tensor {name!r} is {_DTYPES[dtype]} {shape}, the manifest says {spec!r:.200}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            fail(
                f"corrupted safetensors header: tensor {name!r:.100} starts at byte {a} of the "
                f"data, expected {end} (overlapping or with a gap)"
            )
        end = b
    if 8 + header_len + end != file_size:
        fail(
            f"truncated or corrupted: the file has {file_size} bytes, its header accounts for "
            f"{8 + header_len + end} ({end} bytes of tensor data)"
        )


def _parse_json(fail, text, what):
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
    except (UnicodeDecodeError, TypeError, ValueError) as exc:
        fail(f"corrupted {what} (not valid JSON: {exc})")
    else:
        if _json_depth(value, _MAX_JSON_DEPTH) <= _MAX_JSON_DEPTH:
            return value
    fail(f"corrupted {what} (JSON nested more than {_MAX_JSON_DEPTH} levels deep)")


def read_file(
    path: str | os.PathLike[str],
    before_data: Callable[[dict[str, Any]], object] | None = None,
) -> tuple[dict[str, Array], dict[str, Any]]:
    """Read and validate a checkpoint file's container: (tensors, metadata). No model is built.

    Checks: safetensors header, fastcnn metadata, format name/version, tensor manifest (names,
    shapes, dtypes) and the data checksum. Raises CheckpointError naming the file. Only the
    header is read before these checks: the tensor data is read after the header has accounted
    for the file's whole size (a huge or sparse file is refused by its size) and after
    ``before_data(metadata)``, if given, has accepted the declared shapes.
    """
    path = os.fspath(path)

    def fail(problem):
        raise CheckpointError(f"{path}: {problem}")

    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                fail(
                    f"not a checkpoint: {len(prefix)} bytes, too short for a safetensors header "
                    f"(truncated?)"
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len > _MAX_HEADER or 8 + header_len > size:
                fail(
                    f"truncated or not a safetensors file: header length {header_len}, file length "
                    f"{size}"
                )
            raw_header = f.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
        try:
            text = raw_header.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(f"corrupted safetensors header (not valid JSON: {exc})")
        header = _parse_json(fail, text, "safetensors header")
        if not isinstance(header, dict):
            fail("corrupted safetensors header (not a JSON object)")
        meta = _check_metadata(fail, header)
        _check_layout(fail, header, meta["tensors"], size, header_len)
        if before_data is not None:
            before_data(meta)
        try:
            f.seek(0)
            data = f.read(size + 1)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    if len(data) != size:
        fail(f"the file changed while it was read ({size} bytes, then {len(data)})")

    try:
        tensors = _st.load(data)
    except Exception as exc:  # SafetensorError and friends: offsets out of range, bad dtype, ...
        fail(f"corrupted or truncated tensor data ({type(exc).__name__}: {exc})")
    del data

    manifest = meta["tensors"]
    if set(manifest) != set(tensors):  # (checked on the header already; safetensors agrees)
        fail("tensors do not match the manifest")
    for name, spec in manifest.items():
        a = tensors[name]
        if list(a.shape) != spec.get("shape") or a.dtype.str != spec.get("dtype"):
            fail(f"tensor {name!r} is {a.dtype.str} {list(a.shape)}, the manifest says {spec}")
    if _digest(tensors) != meta["sha256"]:
        fail("tensor data checksum mismatch: the file is corrupted")
    return tensors, meta


def _check_metadata(fail, header):
    """The fastcnn metadata of a parsed safetensors header, its format, version and checksum."""
    raw_meta = header.get("__metadata__")
    if not isinstance(raw_meta, dict) or _META_KEY not in raw_meta:
        fail("a safetensors file, but not a fastcnn checkpoint (no 'fastcnn' metadata)")
    if not isinstance(raw_meta[_META_KEY], str):
        fail("corrupted fastcnn metadata (not a string)")
    meta = _parse_json(fail, raw_meta[_META_KEY], "fastcnn metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        fail(
            "not a fastcnn checkpoint (format "
            f"{meta.get('format') if isinstance(meta, dict) else meta!r:.100})"
        )
    version = meta.get("format_version")
    if not is_int(version):
        fail(f"corrupted metadata: format_version {version!r:.100}")
    if version > FORMAT_VERSION:
        fail(
            f"written with checkpoint format {version} by fastcnn "
            f"{meta.get('fastcnn_version')!r:.50}; this fastcnn ({_fastcnn_version()}) reads "
            f"formats up to {FORMAT_VERSION}: upgrade fastcnn"
        )
    if version < 1:
        fail(f"unknown checkpoint format version {version}")
    if version >= 2 or "meta_sha256" in meta:
        if meta.get("meta_sha256") != _meta_digest(meta):
            fail("metadata checksum mismatch: the file is corrupted")
    for key in ("model", "tensors", "sha256"):
        if key not in meta:
            fail(f"corrupted metadata: no {key!r} entry")
    if not isinstance(meta["tensors"], dict):
        fail(
            f"corrupted metadata: 'tensors' is a {type(meta['tensors']).__name__}, expected an "
            "object"
        )
    return meta


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save` and rebuild its model. Returns a
    :class:`Checkpoint`.

    Everything is validated before the weights are loaded; any problem raises CheckpointError
    (a ValueError) naming the file and the problem.
    """
    path = os.fspath(path)

    def fail(problem):
        raise CheckpointError(f"{path}: {problem}")

    tensors, meta = read_file(path, before_data=lambda meta: _check_declared(fail, meta))
    model_meta = meta["model"]
    config, keys = model_meta["config"], model_meta["keys"]
    model_state = {key: tensors["model." + key] for key in keys}

    # Build a fresh model from the config and compare its state with the file before loading.
    try:
        model = _from_config(config)
    except Exception as exc:
        fail(
            f"incompatible architecture config, this fastcnn cannot build it "
            f"({type(exc).__name__}: {exc})"
        )
    expected = model.state_dict()
    if set(expected) != set(model_state):
        fail(
            f"the architecture's parameters {sorted(set(expected) - set(model_state))[:5]} are "
            f"missing and {sorted(set(model_state) - set(expected))[:5]} unexpected"
        )
    for key, value in expected.items():
        got = model_state[key]
        if got.shape != value.shape or got.dtype != value.dtype:
            fail(
                f"tensor 'model.{key}' is {got.dtype} {got.shape}, the architecture expects "
                f"{value.dtype} {value.shape}"
            )

    optimizer_state, optimizer_class = None, None
    if meta.get("optimizer") is not None:
        optimizer_state, optimizer_class = _join_optimizer_state(
            fail, meta["optimizer"], tensors, model
        )
    elif any(n.startswith("optimizer.") for n in tensors):
        fail("optimizer tensors present but no optimizer metadata")

    scheduler_state, scheduler_class = None, None
    if meta.get("scheduler") is not None:
        sched = meta["scheduler"]
        if not isinstance(sched, dict) or "class" not in sched or "state" not in sched:
            fail("corrupted metadata: scheduler entry without class/state")
        if not isinstance(sched["class"], str) or not isinstance(sched["state"], dict):
            fail(
                f"corrupted metadata: scheduler class {sched['class']!r:.100} and state "
                f"{sched['state']!r:.100}, expected a name and an object"
            )
        scheduler_state, scheduler_class = sched["state"], sched["class"]

    epoch = meta.get("epoch")
    if epoch is not None and not is_int(epoch, 0):
        fail(f"corrupted metadata: epoch {epoch!r:.100}, expected an integer >= 0")

    try:
        model.load_state_dict(model_state)
        if model_meta.get("rng_state"):
            model.set_rng_state(model_meta["rng_state"])
    except Exception as exc:
        fail(f"the saved state does not fit the rebuilt model ({type(exc).__name__}: {exc})")
    input_shape = model_meta.get("input_shape")
    if input_shape is not None:
        if not (
            isinstance(input_shape, list)
            and 1 <= len(input_shape) <= 8
            and all(is_int(v, 1) and v <= 2**31 - 1 for v in input_shape)
        ):
            fail(f"corrupted metadata: input_shape {input_shape!r:.100}")
        input_shape = tuple(input_shape)
    return Checkpoint(
        path=path,
        model=model,
        model_state=model_state,
        config=config,
        optimizer_state=optimizer_state,
        optimizer_class=optimizer_class,
        scheduler_state=scheduler_state,
        scheduler_class=scheduler_class,
        epoch=epoch,
        extra=meta.get("extra"),
        metadata=meta,
        input_shape=input_shape,
    )


def _check_declared(fail, meta):
    """The metadata's model entry, checked before any tensor data is read: its types, its keys
    against the manifest, and the architecture's state (worked out from the config without
    building it, for every class that can tell) against the declared shapes, so that a small file
    declaring huge layers, or a huge file declaring huge tensors, is refused before it costs
    memory. Optimizer tensors must each have the shape of a model tensor (a parameter)."""
    model_meta = meta["model"]
    if not isinstance(model_meta, dict) or "config" not in model_meta or "keys" not in model_meta:
        fail("corrupted metadata: model entry without config/keys")
    config, keys = model_meta["config"], model_meta["keys"]
    if not isinstance(config, dict):
        fail(
            f"corrupted metadata: the model config is a {type(config).__name__}, expected an object"
        )
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(
        set(keys)
    ) != len(keys):
        fail(f"corrupted metadata: the model keys {keys!r:.100} are not a list of distinct names")
    if not isinstance(model_meta.get("rng_state") or {}, dict):
        fail(
            f"corrupted metadata: rng_state {model_meta.get('rng_state')!r:.100}, expected an "
            "object"
        )
    manifest = meta["tensors"]
    declared = {}
    for key in keys:
        name = "model." + key
        if name not in manifest:
            fail(f"model tensor {name!r} missing")
        declared[key] = (tuple(manifest[name]["shape"]), np.dtype(manifest[name]["dtype"]))
    stray = sorted(n for n in manifest if n.startswith("model.") and n[6:] not in declared)
    if stray:
        fail(f"unexpected model tensors {stray[:5]}")
    try:
        spec = _state_spec(config)
    except Exception as exc:  # RecursionError included
        fail(
            f"incompatible architecture config, this fastcnn cannot build it "
            f"({type(exc).__name__}: {str(exc)[:300]})"
        )
    if spec is not None:
        if set(spec) != set(declared):
            fail(
                f"the architecture's parameters {sorted(set(spec) - set(declared))[:5]} are "
                f"missing and {sorted(set(declared) - set(spec))[:5]} unexpected"
            )
        for key, (shape, dtype) in spec.items():
            if declared[key] != (shape, dtype):
                fail(
                    f"tensor 'model.{key}' is {declared[key][1]} {declared[key][0]}, the "
                    f"architecture expects {dtype} {shape}"
                )
    shapes = {shape for shape, _ in declared.values()}
    per_index: dict[str, Any] = {}
    for name, entry in manifest.items():
        if not name.startswith("optimizer."):
            continue
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(declared):
            fail(f"unexpected tensor name {name!r:.100}")
        per_index[parts[1]] = per_index.get(parts[1], 0) + 1
        if tuple(entry["shape"]) not in shapes or per_index[parts[1]] > _MAX_OPTIMIZER_ARRAYS:
            fail(
                f"tensor {name!r:.100} has shape {tuple(entry['shape'])}, which fits no parameter "
                "of the model"
            )


def _join_optimizer_state(fail, opt_meta, tensors, model):
    """Rebuild {"hyper", "state"} from the metadata and the optimizer.* tensors, checking shapes."""
    if not isinstance(opt_meta, dict) or not {"class", "hyper", "state"} <= set(opt_meta):
        fail("corrupted metadata: optimizer entry without class/hyper/state")
    entries = opt_meta["state"]
    if not (
        isinstance(opt_meta["class"], str)
        and isinstance(opt_meta["hyper"], dict)
        and isinstance(entries, dict)
        and all(
            isinstance(i, str) and i.isdigit() and isinstance(e, dict) for i, e in entries.items()
        )
    ):
        fail(
            f"corrupted metadata: optimizer entry {opt_meta!r:.200}, expected a class name, "
            f"hyper-parameters and {{parameter index: state}} objects"
        )
    params = [p.data for p in model.parameters()]
    state = {str(i): dict(scalars) for i, scalars in opt_meta["state"].items()}
    for name, array in tensors.items():
        if not name.startswith("optimizer."):
            continue
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            fail(f"unexpected tensor name {name!r}")
        index, key = parts[1], parts[2]
        if index not in state:
            fail(f"tensor {name!r} for parameter {index}, which has no optimizer state entry")
        i = int(index)
        if i >= len(params):
            fail(f"tensor {name!r} refers to parameter {i}, the model has {len(params)} parameters")
        if array.shape != params[i].shape:
            fail(
                f"tensor {name!r} has shape {array.shape}, parameter {i} of the model has "
                f"shape {params[i].shape}"
            )
        state[index][key] = array
    return {"hyper": opt_meta["hyper"], "state": state}, opt_meta["class"]
