"""Data-parallel training over MPI: ``mpiexec -n K fastcnn train`` or ``fit`` under ``mpiexec``.

Every rank holds the whole model. Each global batch (the batch a one-process run would draw,
same seed, same size) is split into K contiguous shards, one per rank; each rank computes the
gradient of its shard's mean loss, and the gradients are summed over the ranks weighted by the
shard sizes, ``g = sum_r m_r g_r / M``, which is the one-process gradient of the batch's mean
loss even when the last batch is short. The sum runs in a FIXED order (on one host through
shared memory, every rank adding the K ranks' buffers in rank order; across hosts a ring
reduce-scatter + allgather written here, every chunk added up by one rank in an order that
depends only on K), so every rank holds bitwise the same gradient, hence the same weights after
every step, and a rerun reproduces them. The API follows Horovod's names::

    from fastcnn import distributed as dist
    dist.init()                                  # the world from mpi4py; K=1 without MPI
    dist.broadcast_parameters(model, root=0)     # parameters and buffers (BatchNorm statistics)
    opt = dist.DistributedOptimizer(fastcnn.SGD(model.parameters(), lr=0.05))
    for idx in batches:                          # the GLOBAL batches, the same on every rank
        mine = dist.shard(idx)                   # this rank's contiguous part of it
        opt.zero_grad(); loss_fn(model(x[mine]), y[mine]); model.backward(loss_fn.backward())
        opt.step(count=len(mine))                # gradients summed over the ranks, then the step
    dist.average_buffers(model)                  # e.g. at the end of an epoch

``fit`` does all of this by itself when the process was started by ``mpiexec -n K`` with K > 1
(``fit(..., distributed=False)`` trains each rank alone). Only rank 0 logs, validates, shows the
progress bar and writes checkpoints; every rank returns the same History.

Failure: a rank that ends with an uncaught exception calls ``MPI_Abort`` (:func:`init`
installs a ``sys.excepthook`` for that, as ``python -m mpi4py`` does), so that ``mpiexec``
ends the others rather than leaving them waiting forever; a rank that is killed is cleaned up
by ``mpiexec`` (MPICH's hydra kills the others at once); and a rank that waits longer than
``timeout`` seconds for a training step's message (a rank stopped, or a launcher that does not
clean up) reports which rank it was waiting for and aborts the job. docs/distributed.md has the
measurements and the choices.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._checks import is_int
from ._types import Array

if TYPE_CHECKING:
    from .module import Module, Parameter
    from .optim import Optimizer

__all__ = [
    "DistributedError",
    "World",
    "init",
    "is_initialized",
    "rank",
    "size",
    "launched_rank",
    "launched_size",
    "barrier",
    "allreduce",
    "broadcast",
    "broadcast_object",
    "broadcast_parameters",
    "broadcast_optimizer_state",
    "allreduce_gradients",
    "average_buffers",
    "shard",
    "shard_bounds",
    "DistributedOptimizer",
    "REDUCTIONS",
    "DEFAULT_TIMEOUT",
]

#: How gradients are summed: "auto" (the default: "shared" when every rank runs on this host,
#: else "ring"), "shared" (through memory the ranks of one host share, added in rank order),
#: "ring" (messages, a fixed-order ring), both bitwise equal on every rank, or "mpi"
#: (MPI_Allreduce, whose order MPI does not promise; kept to measure against)
REDUCTIONS = ("auto", "shared", "ring", "mpi")
#: Seconds a rank waits for a training step's message before it declares another rank lost
#: (``$FASTCNN_DIST_TIMEOUT`` overrides it). The first step (kernels compiling) and the
#: end-of-epoch exchange (rank 0 validating, writing a checkpoint) wait without a limit.
DEFAULT_TIMEOUT = 60.0

# the launchers' environment: MPICH/hydra (PMI), Open MPI, PMIx, MVAPICH
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
_TAG = 17


class DistributedError(RuntimeError):
    """A distributed call that cannot go on: MPI missing, or ranks that disagree."""


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return default


def launched_size() -> int:
    """The number of ranks the launcher (``mpiexec``) started, read from its environment without
    initialising MPI; 1 in a process not started by a launcher."""
    return max(1, _env_int(_SIZE_VARS, 1))


def launched_rank() -> int:
    """This process's rank as the launcher's environment says it (0 without a launcher)."""
    return _env_int(_RANK_VARS, 0)


def _timeout_from_env() -> float | None:
    text = os.environ.get("FASTCNN_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise DistributedError(
            f"fastcnn.distributed: FASTCNN_DIST_TIMEOUT must be a number of seconds (0: no "
            f"limit), got {text!r}"
        ) from None
    if not value >= 0:
        raise DistributedError(
            f"fastcnn.distributed: FASTCNN_DIST_TIMEOUT must be >= 0, got {text!r}"
        )
    return value or None


class World:
    """The ranks of one run: ``rank``, ``size``, ``local_size`` (ranks on this host), the
    communicator (None for K=1) and the reduction and timeout in use."""

    def __init__(
        self,
        comm: Any,
        rank: int,
        size: int,
        local_size: int,
        timeout: float | None,
        reduction: str,
        node: Any = None,
    ) -> None:
        self.comm = comm
        self.rank = rank
        self.size = size
        self.local_size = local_size
        self.timeout = timeout
        self._node = node  # the ranks of this host (the communicator "shared" works on)
        self._windows: dict[str, _SharedSlots] = {}  # per dtype
        self._scratch: dict[tuple[str, int], Array] = {}
        self.reduction = "ring"
        self.use_reduction(reduction)
        #: seconds spent in gradient exchanges since the last reset (for measurements)
        self.reduce_seconds = 0.0
        self.reduce_calls = 0
        #: gradient buckets sent while the backward was still running (fit, 2 ranks)
        self.early_sends = 0

    def __repr__(self) -> str:
        return (
            f"World(rank={self.rank}, size={self.size}, local_size={self.local_size}, "
            f"reduction={self.reduction!r}, timeout={self.timeout})"
        )

    def use_reduction(self, reduction: str) -> None:
        """Set :attr:`reduction` ("auto": "shared" if every rank runs on this host)."""
        everyone_here = self.comm is not None and self.local_size == self.size
        if reduction == "auto":
            reduction = "shared" if everyone_here else "ring"
        elif reduction == "shared" and self.comm is not None and not everyone_here:
            raise DistributedError(
                f"fastcnn.distributed.init: reduction='shared' needs every rank on one host; "
                f"{self.local_size} of {self.size} run on this one"
            )
        self.reduction = reduction

    # -- waiting, with a watchdog ---------------------------------------------------------
    def wait(self, requests: list[Any], what: str, peer: int | None, timeout: float | None) -> None:
        """Complete ``requests``, polling: yield the core between polls while the exchange is
        fast, sleep 1 ms between polls once it has taken 50 ms (another rank is busy), and
        abort the job with a message naming ``what`` and ``peer`` after ``timeout`` seconds
        (None: no limit)."""
        from mpi4py import MPI

        if MPI.Request.Testall(requests):
            return
        start = time.monotonic()
        polls = 0
        while not MPI.Request.Testall(requests):
            # give the core away between polls: on a busy machine the rank being waited for may
            # need it (no cost on an idle core: sched_yield returns at once)
            os.sched_yield()
            polls += 1
            if polls % 64:
                continue
            waited = time.monotonic() - start
            if waited > 0.05:
                time.sleep(0.001)
            if timeout is not None and waited > timeout:
                who = f"rank {peer}" if peer is not None else "the other ranks"
                self.abort(
                    f"{what}: no answer from {who} for {waited:.0f} s (timeout {timeout:g} s, "
                    "FASTCNN_DIST_TIMEOUT): another rank died or hangs; stopping the run"
                )

    def abort(self, message: str, status: int = 1) -> None:
        """Print ``message`` (with this rank) on stderr and end every rank of the job."""
        _say(f"rank {self.rank} of {self.size}: {message}")
        if self.comm is None:
            raise DistributedError(message)
        self.comm.Abort(status)

    def scratch(self, dtype: np.dtype[Any], n: int, slot: int = 0) -> Array:
        key = (np.dtype(dtype).str, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < n:
            buf = self._scratch[key] = np.empty(max(n, 1), dtype=dtype)
        return buf[:n]

    # -- the fixed-order sum ---------------------------------------------------------------
    def sum_inplace(
        self, buf: Array, what: str = "allreduce", timeout: float | None = None
    ) -> None:
        """Sum the contiguous 1-D ``buf`` over the ranks, in place, bitwise the same on every
        rank (``reduction="ring"``) or with MPI_Allreduce (``"mpi"``)."""
        if self.size == 1:
            return
        if self.reduction == "mpi":
            from mpi4py import MPI

            req = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            self.wait([req], what, None, timeout)
            return
        if self.reduction == "shared":
            self._shared_sum(buf, what, timeout)
            return
        self._ring_sum(buf, what, timeout)

    def shared_slots(
        self, dtype: np.dtype[Any], n: int, what: str, timeout: float | None
    ) -> tuple[Array, list[Array]] | None:
        """For ``reduction="shared"``: this call's slot of ``n`` values in memory the ranks of
        this host share (an MPI-3 shared window) and every rank's slot in rank order, to be
        filled and then read after :meth:`shared_meet`; None if this MPI has no shared windows
        (the ring is used from then on)."""
        key = np.dtype(dtype).str
        slots = self._windows.get(key)
        if slots is None or slots.capacity < n:
            if slots is not None:
                slots.free()
            try:
                slots = self._windows[key] = _SharedSlots(self, np.dtype(dtype), n, what, timeout)
            except (NotImplementedError, RuntimeError) as e:  # an MPI without shared windows
                _say(f"rank {self.rank}: no shared memory ({e}); summing with the ring")
                self.reduction = "ring"
                return None
        return slots.next_call(n)

    def shared_meet(self, dtype: np.dtype[Any], n: int, what: str, timeout: float | None) -> None:
        """Wait until every rank has filled its slot of this call (from :meth:`shared_slots`)."""
        slots = self._windows[np.dtype(dtype).str]
        slots.win.Sync()  # (the stores visible before the barrier says so)
        self.wait([self._node.Ibarrier()], what, None, timeout)
        slots.win.Sync()
        sizes = slots.sizes()
        if any(k != n for k in sizes):
            self.abort(f"{what}: the ranks' buffers differ in size (rank by rank: {sizes})")

    def _shared_sum(self, buf: Array, what: str, timeout: float | None) -> None:
        """Each rank copies ``buf`` into its shared slot, the ranks meet at a barrier, and each
        adds the K slots in rank order, slot 0 + slot 1 + ...: the same bits on every rank (for
        K = 2 those of the ring), one meeting per call, and no message carries the buffer."""
        got = self.shared_slots(buf.dtype, buf.size, what, timeout)
        if got is None:
            self._ring_sum(buf, what, timeout)
            return
        mine, theirs = got
        mine[:] = buf
        self.shared_meet(buf.dtype, buf.size, what, timeout)
        _add_slots(theirs, buf)

    def _ring_sum(self, buf: Array, what: str, timeout: float | None) -> None:
        """Ring reduce-scatter then allgather (Patarasuk & Yuan's bandwidth-optimal allreduce):
        chunk c is added up along the ring by ranks c, c+1, ..., c-1, in that order, and the
        last of them sends the finished chunk round; every rank thus receives the same bits,
        and the order depends on K only. Each rank sends and receives 2 (K-1)/K of the buffer.
        For K = 2 the two ranks swap whole buffers instead (the same bytes, one round trip
        instead of two: on a busy machine each round trip costs a wait for the other rank)."""
        k, r, comm = self.size, self.rank, self.comm
        n = buf.size
        if k == 2:  # one exchange of the whole buffer instead of two of halves: one meeting
            recv = self.scratch(buf.dtype, n, slot=1)
            other = 1 - r
            reqs = [
                comm.Irecv(recv, source=other, tag=_TAG),
                comm.Isend(buf, dest=other, tag=_TAG),
            ]
            self.wait(reqs, what, other, timeout)
            if r == 0:  # both ranks add rank 0's + rank 1's: the same bits on both
                np.add(buf, recv, out=buf)
            else:
                np.add(recv, buf, out=buf)
            return
        bounds = [i * n // k for i in range(k + 1)]
        right, left = (r + 1) % k, (r - 1) % k
        recv = self.scratch(buf.dtype, bounds[1] - bounds[0] + 1, slot=1)
        for s in range(k - 1):  # reduce-scatter
            send_c, recv_c = (r - s) % k, (r - s - 1) % k
            a, b = bounds[send_c], bounds[send_c + 1]
            c, d = bounds[recv_c], bounds[recv_c + 1]
            reqs = [
                comm.Irecv(recv[: d - c], source=left, tag=_TAG),
                comm.Isend(buf[a:b], dest=right, tag=_TAG),
            ]
            self.wait(reqs, what, left, timeout)
            np.add(recv[: d - c], buf[c:d], out=buf[c:d])
        for s in range(k - 1):  # allgather of the finished chunks
            send_c, recv_c = (r + 1 - s) % k, (r - s) % k
            a, b = bounds[send_c], bounds[send_c + 1]
            c, d = bounds[recv_c], bounds[recv_c + 1]
            reqs = [
                comm.Irecv(buf[c:d], source=left, tag=_TAG),
                comm.Isend(buf[a:b], dest=right, tag=_TAG),
            ]
            self.wait(reqs, what, left, timeout)

    def bcast_inplace(
        self, buf: Array, root: int, what: str = "broadcast", timeout: float | None = None
    ) -> None:
        if self.size == 1:
            return
        req = self.comm.Ibcast(buf, root=root)
        self.wait([req], what, None if self.rank == root else root, timeout)


class _SharedSlots:
    """Two slots per rank in a window of shared memory, taken in turn by successive calls: a
    rank may write the next call's buffer while a slower one still adds up this one's. Each
    slot starts with its length (int64), checked by every rank after the barrier."""

    def __init__(
        self, world: World, dtype: np.dtype[Any], n: int, what: str, timeout: float | None
    ) -> None:
        from mpi4py import MPI

        # every rank allocates the largest size asked for (the allocation is collective)
        ask = np.array([n, -n], dtype=np.int64)
        req = world._node.Iallreduce(MPI.IN_PLACE, ask, op=MPI.MAX)
        world.wait([req], what, None, timeout)
        if ask[0] != -ask[1]:
            world.abort(
                f"{what}: the ranks' buffers differ in size (longest {ask[0]}, shortest {-ask[1]})"
            )
        self.capacity = int(ask[0])
        self.dtype = dtype
        # per slot: 8 bytes of length, then the values (rounded up to 8 bytes)
        self.stride = 8 + -(-self.capacity * dtype.itemsize // 8) * 8
        self.win = MPI.Win.Allocate_shared(2 * self.stride, 1, comm=world._node)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        k = world._node.Get_size()
        self.rank = world._node.Get_rank()
        self.memory = [
            np.frombuffer(
                cast(Any, self.win.Shared_query(q)[0]), dtype=np.uint8, count=2 * self.stride
            )
            for q in range(k)
        ]
        self.calls = 0

    def _slot(self, q: int, half: int, n: int) -> tuple[Array, Array]:
        start = half * self.stride
        raw = self.memory[q][start : start + self.stride]
        return raw[:8].view(np.int64), raw[8 : 8 + n * self.dtype.itemsize].view(self.dtype)

    def next_call(self, n: int) -> tuple[Array, list[Array]]:
        """(this rank's slot for this call, every rank's slot in rank order)."""
        half = self.calls & 1
        self.calls += 1
        self._half = half
        length, mine = self._slot(self.rank, half, n)
        length[0] = n
        return mine, [self._slot(q, half, n)[1] for q in range(len(self.memory))]

    def sizes(self) -> list[int]:
        return [int(self._slot(q, self._half, 0)[0][0]) for q in range(len(self.memory))]

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


_WORLD: World | None = None


def _say(message: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(f"fastcnn.distributed: {message}", file=sys.stderr, flush=True)


def _check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"fastcnn.distributed.init: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    return str(reduction)


def init(
    timeout: float | None | str = "env", reduction: str = "auto", excepthook: bool = True
) -> World:
    """Join the MPI world (once; later calls return the same :class:`World`, with ``timeout``
    and ``reduction`` updated if given).

    In a process not started by ``mpiexec -n K`` with K > 1, the world is this process alone
    (K=1, MPI is not even imported) and everything runs as on one process.

    - ``timeout``: seconds a training step waits for another rank before the job is aborted
      (``"env"``: ``$FASTCNN_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`; None or 0: no limit).
    - ``reduction``: see :data:`REDUCTIONS` ("auto" resolves to "shared" or "ring" here).
    - ``excepthook``: with K > 1, an uncaught exception prints its traceback and aborts the
      job (otherwise the other ranks would wait for this one forever).
    """
    global _WORLD
    reduction = _check_reduction(reduction)
    if _WORLD is not None and timeout == "env" and reduction == "auto":
        return _WORLD  # (a later call with the defaults keeps the settings of the first)
    if timeout == "env":
        timeout = _timeout_from_env()
    elif timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(
                f"fastcnn.distributed.init: timeout must be a number of seconds >= 0 or None, "
                f"got {timeout!r}"
            )
        timeout = float(timeout) or None
    if _WORLD is not None:
        _WORLD.timeout = timeout
        _WORLD.use_reduction(reduction)
        return _WORLD
    launched = launched_size()
    if launched == 1:  # not started by a launcher (or by one with a single rank): no MPI needed
        _WORLD = World(None, 0, 1, 1, timeout, reduction)
        return _WORLD
    try:
        import mpi4py
    except ImportError:
        if launched > 1:
            raise DistributedError(
                f"fastcnn.distributed.init: this process is one of {launched} started by an MPI "
                "launcher, but mpi4py is not installed: pip install 'fastcnn[mpi]'"
            ) from None
        _WORLD = World(None, 0, 1, 1, timeout, reduction)
        return _WORLD
    if "mpi4py.MPI" not in sys.modules:
        # no thread but the main one calls MPI (Numba's workers never do)
        mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    comm = world.Dup() if world.Get_size() > 1 else None  # our messages apart from the user's
    local = max(1, _env_int(_LOCAL_SIZE_VARS, 1))
    node = None
    if comm is not None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.Get_size()
    _WORLD = World(comm, world.Get_rank(), world.Get_size(), local, timeout, reduction, node)
    if comm is not None and excepthook:
        _install_excepthook(_WORLD)
    return _WORLD


def _install_excepthook(world: World) -> None:
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            text = "".join(traceback.format_exception(kind, value, tb))
            _say(f"rank {world.rank} of {world.size}: uncaught exception:\n{text.rstrip()}")
        finally:
            world.comm.Abort(1)
        previous(kind, value, tb)  # pragma: no cover - Abort does not return

    sys.excepthook = hook


def is_initialized() -> bool:
    """True once :func:`init` ran in this process."""
    return _WORLD is not None


def _world() -> World:
    return _WORLD if _WORLD is not None else init()


def rank() -> int:
    """This process's rank, 0 .. size()-1 (initialises the world if needed)."""
    return _world().rank


def size() -> int:
    """The number of ranks K (1 without MPI; initialises the world if needed)."""
    return _world().size


def barrier() -> None:
    """Wait until every rank got here."""
    w = _world()
    if w.size > 1:
        w.wait([w.comm.Ibarrier()], "barrier", None, None)


def _check_root(what: str, root: object, world: World) -> int:
    if not is_int(root, 0) or int(root) >= world.size:
        raise ValueError(f"{what}: root must be a rank 0 .. {world.size - 1}, got {root!r}")
    return int(root)


def _check_array(what: str, array: object) -> Array:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, got {type(array).__name__}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"{what}: expected a C-contiguous writeable array (reduced in place)")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{what}: expected a numeric array, got dtype {array.dtype}")
    return array


def allreduce(array: Array, average: bool = False) -> Array:
    """Sum (or ``average``) ``array`` over the ranks in place, in a fixed order: every rank ends
    with bitwise the same values. Returns ``array``."""
    array = _check_array("fastcnn.distributed.allreduce", array)
    w = _world()
    flat = array.reshape(-1)
    w.sum_inplace(flat, "allreduce", w.timeout)
    if average and w.size > 1:
        if array.dtype.kind != "f":
            raise TypeError(
                f"fastcnn.distributed.allreduce: average needs a floating array, got {array.dtype}"
            )
        flat *= array.dtype.type(1.0 / w.size)
    return array


def broadcast(array: Array, root: int = 0) -> Array:
    """Copy rank ``root``'s ``array`` into every rank's (in place). Returns ``array``."""
    array = _check_array("fastcnn.distributed.broadcast", array)
    w = _world()
    w.bcast_inplace(array.reshape(-1), _check_root("broadcast", root, w), "broadcast", None)
    return array


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Rank ``root``'s ``obj`` (pickled; the peers are this job's own ranks) on every rank."""
    w = _world()
    root = _check_root("fastcnn.distributed.broadcast_object", root, w)
    if w.size == 1:
        return obj
    data = pickle.dumps(obj) if w.rank == root else b""
    length = np.array([len(data)], dtype=np.int64)
    w.bcast_inplace(length, root, "broadcast_object", None)
    payload = (
        np.frombuffer(data, dtype=np.uint8).copy()
        if w.rank == root
        else np.empty(int(length[0]), dtype=np.uint8)
    )
    w.bcast_inplace(payload, root, "broadcast_object", None)
    return obj if w.rank == root else pickle.loads(payload.tobytes())


# --------------------------------------------------------------------------------------------
# models and optimizers


def _model_arrays(what: str, model: object) -> tuple[list[Parameter], list[Array]]:
    from .module import Module

    if not isinstance(model, Module):
        raise TypeError(f"{what}: expected a fastcnn Module, got {type(model).__name__}")
    return model.parameters(), [b for _, b in model.named_buffers()]


def _pack(arrays: Sequence[Array], out: Array, scale: Any = None) -> None:
    i = 0
    for a in arrays:
        j = i + a.size
        if scale is None:
            out[i:j] = a.reshape(-1)
        else:
            np.multiply(a.reshape(-1), scale, out=out[i:j])
        i = j


def _unpack(flat: Array, arrays: Sequence[Array], scale: Any = None) -> None:
    i = 0
    for a in arrays:
        j = i + a.size
        view = a.reshape(-1)
        if scale is None:
            view[...] = flat[i:j]
        else:
            np.multiply(flat[i:j], scale, out=view)
        i = j


def _add_slots(slots: Sequence[Array], out: Array, start: int = 0) -> None:
    """``out`` = slots[0][start:] + slots[1][start:] + ..., added in rank order."""
    stop = start + out.size
    np.add(slots[0][start:stop], slots[1][start:stop], out=out)
    for other in slots[2:]:
        np.add(out, other[start:stop], out=out)


def _by_dtype(arrays: Iterable[Array]) -> dict[np.dtype[Any], list[Array]]:
    groups: dict[np.dtype[Any], list[Array]] = {}
    for a in arrays:
        groups.setdefault(a.dtype, []).append(a)
    return groups


def _broadcast_arrays(w: World, arrays: Sequence[Array], root: int, what: str) -> None:
    for dtype, group in _by_dtype(arrays).items():
        n = sum(a.size for a in group)
        flat = w.scratch(dtype, n)
        if w.rank == root:
            _pack(group, flat)
        w.bcast_inplace(flat, root, what, None)
        if w.rank != root:
            _unpack(flat, group)


def broadcast_parameters(model: Module, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers (BatchNorm's running statistics) into every
    rank's model, in place. Call it once after building (or loading) the model."""
    what = "fastcnn.distributed.broadcast_parameters"
    params, buffers = _model_arrays(what, model)
    w = _world()
    root = _check_root(what, root, w)
    if w.size > 1:
        _check_same_layout(w, what, [p.data for p in params] + buffers)
        _broadcast_arrays(w, [p.data for p in params] + buffers, root, what)


def _check_same_layout(w: World, what: str, arrays: Sequence[Array]) -> None:
    """Every rank must hold the same shapes and dtypes, or the flat buffers would not line up."""
    layout = [(a.shape, a.dtype.str) for a in arrays]
    root_layout = broadcast_object(layout, 0)
    if root_layout != layout:
        w.abort(f"{what}: this rank's model differs from rank 0's ({len(layout)} arrays here)")


def broadcast_optimizer_state(optimizer: Optimizer, root: int = 0) -> None:
    """Copy rank ``root``'s optimizer state (momentum buffers, step counts, hyperparameters)
    into every rank's optimizer."""
    what = "fastcnn.distributed.broadcast_optimizer_state"
    inner = _inner_optimizer(what, optimizer)
    w = _world()
    root = _check_root(what, root, w)
    if w.size > 1:
        state = broadcast_object(inner.state_dict() if w.rank == root else None, root)
        if w.rank != root:
            inner.load_state_dict(state)


def average_buffers(model: Module) -> None:
    """Average every floating buffer (BatchNorm's running mean and variance) over the ranks,
    in place, in a fixed order; integer buffers are copied from rank 0."""
    what = "fastcnn.distributed.average_buffers"
    _, buffers = _model_arrays(what, model)
    w = _world()
    if w.size == 1 or not buffers:
        return
    floats = [b for b in buffers if b.dtype.kind == "f"]
    for dtype, group in _by_dtype(floats).items():
        flat = w.scratch(dtype, sum(a.size for a in group))
        _pack(group, flat)
        w.sum_inplace(flat, what, None)
        _unpack(flat, group, dtype.type(1.0 / w.size))
    others = [b for b in buffers if b.dtype.kind != "f"]
    if others:
        _broadcast_arrays(w, others, 0, what)


def _grad_arrays(what: str, target: object) -> list[Array]:
    from .module import Module

    if isinstance(target, Module):
        params: Iterable[Any] = target.parameters()
    elif isinstance(target, DistributedOptimizer):
        params = target.params
    elif hasattr(target, "params") and hasattr(target, "step"):
        params = target.params  # an Optimizer
    elif isinstance(target, Iterable) and not isinstance(target, np.ndarray):
        params = target
    else:
        raise TypeError(
            f"{what}: expected a Module, an optimizer or a list of parameters, got "
            f"{type(target).__name__}"
        )
    grads = []
    for i, p in enumerate(params):
        g = getattr(p, "grad", None)
        if g is None:
            continue
        if not isinstance(g, np.ndarray) or g.dtype.kind != "f" or not g.flags.c_contiguous:
            raise TypeError(f"{what}: parameter {i}'s gradient is not a contiguous float array")
        grads.append(g)
    return grads


def _check_count(what: str, count: object) -> int | None:
    if count is None:
        return None
    if not is_int(count, 0):
        raise ValueError(f"{what}: count must be an int >= 0 (this rank's samples), got {count!r}")
    return int(count)


def reduce_gradients(
    grads: Sequence[Array], count: int | None, what: str, timeout: float | None, stats: Array
) -> Array:
    """Sum ``count * grad`` over the ranks and divide by the total count (count None: 1 per
    rank, a plain average), in place. ``stats`` (1-D, the last entry this rank's count) is
    summed alongside, in the gradients' dtype, and returned as float64: the counts, losses,
    ... of every rank. Bitwise the same on every rank."""
    w = _world()
    weight = 1 if count is None else count
    stats = np.asarray(stats, dtype=np.float64)
    if w.size == 1:
        if weight == 0:
            raise ValueError(f"{what}: count is 0 on the only rank: there is no gradient")
        return stats
    t0 = time.perf_counter()
    groups = list(_by_dtype(grads).items())
    if groups and w.reduction == "shared" and len(groups) == 1:
        total = _reduce_shared(w, groups[0][1], weight, what, timeout, stats)
        if total is not None:
            w.reduce_seconds += time.perf_counter() - t0
            w.reduce_calls += 1
            return total
    if groups:
        # the stats ride at the end of the first buffer: one exchange per step, not two (each
        # one a meeting of the ranks); counts up to 2**24 are exact even in float32
        dtype, group = groups[0]
        n = sum(g.size for g in group)
        flat = w.scratch(dtype, n + stats.size)
        _pack(group, flat, dtype.type(weight))
        flat[n:] = stats
        w.sum_inplace(flat, what, timeout)
        total = flat[n:].astype(np.float64)
    else:
        total = _sum_stats(w, stats, what, timeout)
    if not total[-1] > 0:
        raise DistributedError(f"{what}: the counts of all ranks add up to {total[-1]:g}")
    for i, (dtype, group) in enumerate(groups):
        n = sum(g.size for g in group)
        if i:  # (a model with parameters of several dtypes)
            flat = w.scratch(dtype, n)
            _pack(group, flat, dtype.type(weight))
            w.sum_inplace(flat, what, timeout)
        else:
            flat = w.scratch(dtype, n + stats.size)
        _unpack(flat[:n], group, dtype.type(1.0 / total[-1]))
    w.reduce_seconds += time.perf_counter() - t0
    w.reduce_calls += 1
    return total


def _reduce_shared(
    w: World, grads: Sequence[Array], weight: int, what: str, timeout: float | None, stats: Array
) -> Array | None:
    """:func:`reduce_gradients` through shared memory, without a buffer of its own: each rank
    writes ``weight * grad`` and its stats straight into its slot, and after the meeting adds
    the slots into the gradients and scales them there. The same operations on the same values
    as packing, summing and unpacking a buffer: the same bits. None: no shared memory here."""
    dtype = grads[0].dtype
    n = sum(g.size for g in grads)
    got = w.shared_slots(dtype, n + stats.size, what, timeout)
    if got is None:
        return None
    mine, theirs = got
    _pack(grads, mine, dtype.type(weight))
    mine[n:] = stats
    w.shared_meet(dtype, n + stats.size, what, timeout)
    summed = np.empty(stats.size, dtype=dtype)
    _add_slots(theirs, summed, n)
    total = summed.astype(np.float64)
    if not total[-1] > 0:
        raise DistributedError(f"{what}: the counts of all ranks add up to {total[-1]:g}")
    scale = dtype.type(1.0 / total[-1])
    i = 0
    for g in grads:
        view = g.reshape(-1)
        _add_slots(theirs, view, i)
        np.multiply(view, scale, out=view)
        i += g.size
    return total


def _sum_stats(w: World, stats: Array, what: str, timeout: float | None) -> Array:
    """Every rank's ``stats`` (a few float64) gathered and added in rank order."""
    everyone = np.empty((w.size, stats.size), dtype=np.float64)
    req = w.comm.Iallgather(np.ascontiguousarray(stats), everyone)
    w.wait([req], what, None, timeout)
    total = everyone[0].copy()
    for row in everyone[1:]:
        total += row
    return total


def allreduce_gradients(target: Any, count: int | None = None) -> int:
    """Replace every gradient of ``target`` (a Module, an optimizer or a list of parameters)
    with its average over the ranks, weighted by ``count`` (this rank's number of samples, so
    that the result is the gradient of the mean loss over all the ranks' samples); count None
    weighs the ranks equally. Returns the total count over the ranks. Same bits on every rank."""
    what = "fastcnn.distributed.allreduce_gradients"
    count = _check_count(what, count)
    grads = _grad_arrays(what, target)
    w = _world()
    stats = np.array([1.0 if count is None else float(count)])
    total = reduce_gradients(grads, count, what, w.timeout, stats)
    return int(total[-1])


def _inner_optimizer(what: str, optimizer: object) -> Optimizer:
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.optimizer
    if not (hasattr(optimizer, "params") and hasattr(optimizer, "step")):
        raise TypeError(f"{what}: expected a fastcnn optimizer, got {type(optimizer).__name__}")
    return cast("Optimizer", optimizer)


class DistributedOptimizer:
    """Wraps an optimizer: ``step(count=None)`` first replaces the gradients with their average
    over the ranks (:func:`allreduce_gradients`, weighted by ``count``, this rank's number of
    samples), then takes the wrapped optimizer's step. Everything else (``lr``,
    ``zero_grad``, ``state_dict``, ...) is the wrapped optimizer's; schedulers accept it."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.__dict__["optimizer"] = _inner_optimizer("DistributedOptimizer", optimizer)

    def step(self, count: int | None = None) -> None:
        allreduce_gradients(self.optimizer, count)
        self.optimizer.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["optimizer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["optimizer"], name, value)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self.optimizer!r})"


# --------------------------------------------------------------------------------------------
# sharding


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous shard of ``total`` samples: the first
    ``total % world_size`` ranks take one sample more; a rank's shard is empty when
    ``total < world_size``."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(batch_indices: Sequence[int] | Array) -> Array:
    """This rank's contiguous part of a GLOBAL batch (the same indices on every rank), as an
    array: rank r of K takes the r-th of K near-equal blocks (:func:`shard_bounds`)."""
    idx = np.asarray(batch_indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(
            f"fastcnn.distributed.shard: expected a 1-D array of sample indices, got shape "
            f"{idx.shape} dtype {idx.dtype}"
        )
    w = _world()
    start, stop = shard_bounds(idx.shape[0], w.size, w.rank)
    return idx[start:stop]


# --------------------------------------------------------------------------------------------
# what fit does on K > 1 ranks


def _overlap_enabled() -> bool:
    return os.environ.get("FASTCNN_DIST_OVERLAP", "1").strip() not in ("0", "false", "no")


class _Overlap:
    """Two ranks, the ring reduction, a Sequential model: the gradients of each step of the
    model's plan leave for the other rank as soon as that step's backward has accumulated them,
    while the earlier steps still compute (DDP's buckets, one per plan step), instead of in one
    buffer after the whole backward. Each element is still rank 0's weighted gradient plus
    rank 1's: the weights are bitwise those of the one-buffer exchange."""

    def __init__(self, world: World, params: list[Any], dtype: np.dtype[Any]) -> None:
        self.world = world
        self.params = params  # the optimizer's parameters that have a gradient
        self.dtype = dtype
        self.plan: Any = None  # the plan the layout below was made for
        self.step_bucket: list[int | None] = []  # plan step -> its bucket
        self.buckets: list[tuple[int, list[Any]]] = []  # (offset in the flat buffer, grads)
        self.sent: list[bool] = []
        self.requests: list[Any] = []
        self.weight: Any = None
        self.shared = False  # a parameter in two steps: one exchange after the backward

    @staticmethod
    def for_fit(world: World, model: Module, optimizer: Optimizer) -> _Overlap | None:
        from .containers import Sequential

        if world.size != 2 or world.reduction != "ring" or not _overlap_enabled():
            return None
        if not isinstance(model, Sequential):
            return None
        params = [p for p in optimizer.params if p.grad is not None]
        dtypes = {p.grad.dtype for p in params}
        if len(dtypes) != 1:
            return None
        return _Overlap(world, params, dtypes.pop())

    def _layout(self, plan: Any) -> bool:
        """One bucket per plan step that holds exchanged parameters, in backward order, and a
        last one for parameters no step holds; False if a parameter is in two steps (shared:
        its gradient is final only after both)."""
        index = {id(p): k for k, p in enumerate(self.params)}
        owner: dict[int, int] = {}
        per_step: list[list[int]] = [[] for _ in plan]
        for i, step in enumerate(plan):
            for m in step.modules:
                for p in m.parameters():
                    k = index.get(id(p))
                    if k is None:
                        continue
                    if owner.setdefault(k, i) != i:
                        return False
                    if k not in per_step[i]:
                        per_step[i].append(k)
        rest = [k for k in range(len(self.params)) if k not in owner]
        self.step_bucket = [None] * len(plan)
        self.buckets = []
        offset = 0
        for i, ks in [(i, per_step[i]) for i in range(len(plan) - 1, -1, -1)] + [(-1, rest)]:
            if not ks:
                continue
            if i >= 0:
                self.step_bucket[i] = len(self.buckets)
            grads = [self.params[k].grad for k in ks]
            self.buckets.append((offset, grads))
            offset += sum(g.size for g in grads)
        w = self.world
        self.flat = np.empty(max(offset, 1), dtype=self.dtype)
        self.recv = np.empty_like(self.flat)
        # the two ranks must cut the buffer alike: compare the bucket sizes once
        sizes = np.array([sum(g.size for g in grads) for _, grads in self.buckets], np.int64)
        theirs = np.empty_like(sizes)
        other = 1 - w.rank
        reqs = [
            w.comm.Irecv(theirs, source=other, tag=_TAG + 1),
            w.comm.Isend(sizes, dest=other, tag=_TAG + 1),
        ]
        w.wait(reqs, "training step", other, None)
        if not np.array_equal(sizes, theirs):
            w.abort(f"fit: the ranks' models differ (gradient buckets {sizes} and {theirs})")
        return True

    def begin(self, model: Module, count: int) -> None:
        from .containers import watch_backward

        plan = model._plan()  # type: ignore[attr-defined]
        if plan is not self.plan and not self.shared:
            self.shared = not self._layout(plan)
            self.plan = None if self.shared else plan
        if self.plan is None:
            return
        self.weight = self.dtype.type(count)
        self.sent = [False] * len(self.buckets)
        self.requests = []
        watch_backward(model, self._step_done)

    def _send(self, b: int) -> None:
        offset, grads = self.buckets[b]
        n = sum(g.size for g in grads)
        _pack(grads, self.flat[offset : offset + n], self.weight)
        other, comm, tag = 1 - self.world.rank, self.world.comm, _TAG + 2 + b
        self.requests.append(comm.Irecv(self.recv[offset : offset + n], source=other, tag=tag))
        self.requests.append(comm.Isend(self.flat[offset : offset + n], dest=other, tag=tag))
        self.sent[b] = True

    def _step_done(self, plan: Any, i: int) -> None:
        t0 = time.perf_counter()
        b = self.step_bucket[i] if plan is self.plan else None
        if b is not None and not self.sent[b]:
            self._send(b)
            self.world.early_sends += 1
        from mpi4py import MPI

        MPI.Request.Testall(self.requests)  # moves the messages already posted along
        self.world.reduce_seconds += time.perf_counter() - t0

    def stop_watching(self) -> None:
        from .containers import watch_backward

        watch_backward(None)

    def finish(self, stats: Array, timeout: float | None) -> Array:
        """The rest of the exchange after this rank's backward; the summed ``stats``."""
        self.stop_watching()
        w = self.world
        t0 = time.perf_counter()
        for b, sent in enumerate(self.sent):
            if not sent:  # (a bucket whose step did not run: an empty shard, or no overlap)
                self._send(b)
        other = 1 - w.rank
        theirs = np.empty_like(stats)
        tag = _TAG + 2 + len(self.buckets)
        self.requests.append(w.comm.Irecv(theirs, source=other, tag=tag))
        self.requests.append(w.comm.Isend(stats, dest=other, tag=tag))
        w.wait(self.requests, "training step", other, timeout)
        self.requests = []
        total = stats + theirs if w.rank == 0 else theirs + stats
        if not total[-1] > 0:
            raise DistributedError(f"fit: the counts of all ranks add up to {total[-1]:g}")
        n = self.buckets[-1][0] + sum(g.size for g in self.buckets[-1][1]) if self.buckets else 0
        flat, recv = self.flat[:n], self.recv[:n]
        if w.rank == 0:  # rank 0's + rank 1's on both ranks
            np.add(flat, recv, out=flat)
        else:
            np.add(recv, flat, out=flat)
        scale = self.dtype.type(1.0 / total[-1])
        for offset, grads in self.buckets:
            size = sum(g.size for g in grads)
            _unpack(flat[offset : offset + size], grads, scale)
        w.reduce_seconds += time.perf_counter() - t0
        w.reduce_calls += 1
        return total


class FitSync:
    """The K > 1 part of :func:`fastcnn.fit`: created by :func:`fit_sync`."""

    def __init__(self, world: World, model: Module, optimizer: Optimizer) -> None:
        self.world = world
        self.root = world.rank == 0
        self.optimizer = optimizer
        self.grads = _grad_arrays("fit", optimizer)
        self.first = True
        self.step_seconds = 0.0
        self.overlap = _Overlap.for_fit(world, model, optimizer)

    def start(self, model: Module) -> None:
        """Every rank from rank 0's weights, buffers and optimizer state; Dropout generators
        moved apart (rank r's jumped r times), so that the ranks' masks are independent."""
        broadcast_parameters(model, 0)
        broadcast_optimizer_state(self.optimizer, 0)
        if self.world.rank:
            for _, m in model.named_modules():
                if m.has_rng_state and hasattr(m, "_rng"):
                    bg = m._rng.bit_generator
                    if hasattr(bg, "jumped"):
                        m._rng = np.random.Generator(bg.jumped(self.world.rank))

    def shard(self, idx: Array) -> Array:
        start, stop = shard_bounds(idx.shape[0], self.world.size, self.world.rank)
        return idx[start:stop]

    def reduce_step(self, count: int, loss: float, correct: int) -> tuple[float, int, int]:
        """Gradients summed over the ranks weighted by shard size; returns the global batch's
        mean loss, its correct predictions and its size (every rank the same)."""
        # the first step compiles the kernels: a rank may wait for the others a long time
        timeout = None if self.first else self.world.timeout
        self.first = False
        stats = np.array([loss * count, correct, count], dtype=np.float64)
        if self.overlap is not None and self.overlap.plan is not None:
            total = self.overlap.finish(stats, timeout)
        else:
            total = reduce_gradients(self.grads, count, "training step", timeout, stats)
        n = int(total[2])
        return float(total[0] / n), int(total[1]), n

    def begin_step(self, model: Module, count: int) -> None:
        """Before this rank's forward of ``count`` samples: the gradients of each step of the
        model's plan will leave for the other rank as soon as its backward is done."""
        if self.overlap is not None:
            self.overlap.begin(model, count)

    def stop_watching(self) -> None:
        if self.overlap is not None:
            self.overlap.stop_watching()

    def end_epoch(self, model: Module) -> None:
        average_buffers(model)

    def share_last(self, history: Any) -> None:
        """Every rank's last History record becomes rank 0's (its validation, its clock)."""
        record = broadcast_object(history.last() if self.root else None, 0)
        for key in history.KEYS:
            getattr(history, key)[-1] = record[key]


def fit_sync(
    distributed: bool | None, model: Module, optimizer: Any, threads: int | None
) -> tuple[FitSync | None, Any, int | None]:
    """(sync, optimizer, threads) for ``fit``: sync None on one process. ``distributed`` None:
    data-parallel iff started by a launcher with more than one rank; True: join the world
    (K may be 1); False: this process alone. A :class:`DistributedOptimizer` is unwrapped (fit
    reduces the gradients itself); ``threads`` None becomes the cores per rank on this host."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"fit: distributed must be None, True or False, got {distributed!r}")
    if distributed is False or (
        distributed is None and launched_size() == 1 and not is_initialized()
    ):
        return None, optimizer, threads
    world = init() if not is_initialized() else _world()
    if world.size == 1:
        return None, optimizer, threads
    inner = _inner_optimizer("fit", optimizer)
    if threads is None:
        from .threads import max_threads

        threads = max(1, max_threads() // world.local_size)
    return FitSync(world, model, inner), inner, threads


# --------------------------------------------------------------------------------------------
# the command line


def describe_world() -> str:
    """', 2 ranks (MPI)' under a launcher with K > 1, else ''."""
    k = launched_size()
    return f" per rank, {k} ranks (MPI)" if k > 1 else ""


def default_threads(threads: int | None) -> int | None:
    """``threads``, or under a launcher with K > 1 the cores per rank on this host."""
    k = launched_size()
    if threads is not None or k == 1:
        return threads
    from .threads import max_threads

    local = max(1, _env_int(_LOCAL_SIZE_VARS, 1))
    return max(1, max_threads() // local)


def is_root() -> bool:
    """True on rank 0 (and on a process started without a launcher)."""
    return (_WORLD.rank if _WORLD is not None else launched_rank()) == 0


class CliSession:
    """Around a command: the stdout of ranks other than 0 is discarded, and a command that
    fails on some rank (status != 0) aborts the job, so the other ranks do not wait for it."""

    def __init__(self) -> None:
        self.active = launched_size() > 1
        self._stdout: Any = None

    def __enter__(self) -> CliSession:
        if self.active and launched_rank() != 0:
            self._stdout = sys.stdout
            sys.stdout = open(os.devnull, "w")  # closed in __exit__
        return self

    def exit(self, status: int) -> int:
        """Return ``status``; if it is not 0 and other ranks run, abort the job with it."""
        if status and self.active and _WORLD is not None and _WORLD.comm is not None:
            _say(f"rank {_WORLD.rank} of {_WORLD.size}: stopping the other ranks (status {status})")
            _WORLD.comm.Abort(status)
        return status

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if self._stdout is not None:
            devnull, sys.stdout = sys.stdout, self._stdout
            devnull.close()
        if kind is SystemExit and self.active:
            code = value.code if isinstance(value.code, int) else 1
            self.exit(code)


#: the gradient exchange's own timing, for the benchmark (bench/bench_distributed.py)
def reduce_timing(reset: bool = False) -> tuple[float, int]:
    """(seconds, calls) of gradient exchanges so far in this process; ``reset`` zeroes them."""
    w = _world()
    out = (w.reduce_seconds, w.reduce_calls)
    if reset:
        w.reduce_seconds, w.reduce_calls = 0.0, 0
    return out
