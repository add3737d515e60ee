"""Thread control: Numba's thread pool and the BLAS behind numpy, set for a block and restored.

fastcnn's kernels run on Numba's thread pool, the Dense layers' products included
(kernels/dense.py). numpy's BLAS has a pool of its own (OpenBLAS here, built with pthreads), and
both pools want every core: an idle pool does not go to sleep at once, its threads keep spinning
for a while in case more work arrives, stealing the cores the other pool is computing on (while
the Dense layers ran on ``numpy.matmul``, a user's own loop ran several times slower with
numpy's default threads).

So no layer calls the BLAS, and ``fit``/``evaluate``/``predict`` hold it at one thread for the
whole run (:data:`BLAS_THREADS_DURING_COMPUTE`; ``clip_grad_norm``'s dot products run on it);
:func:`one_blas_thread` holds it at one thread around a block of one's own. With one thread a
product runs in the calling thread, so no BLAS worker is left spinning against Numba's pool.
Two BLAS threads win only when the pools are told not to spin, which takes a variable read when
the library loads (before numpy is imported), out of reach of a library:

- ``OMP_WAIT_POLICY=PASSIVE`` acts on libgomp, i.e. on *Numba's* workers (the ``omp`` threading
  layer), not on this OpenBLAS. It makes Numba's workers sleep after each kernel, so every kernel
  pays a wake-up, and a training step was slower than with one BLAS thread. Not recommended.
- This OpenBLAS (pthreads) busy-waits (a ``sched_yield`` loop) for ``2**OPENBLAS_THREAD_TIMEOUT``
  cycles after each call (default 2**28, about 0.1 s), competing with Numba's threads.
  ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment stops that; then two BLAS threads can beat
  one: set it and use ``compute_threads(n, blas=n)`` if your own matrix products dominate.

The measurements behind these choices are in docs/threads.md.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numba

from ._checks import is_int

__all__ = [
    "BLAS_THREADS_DURING_COMPUTE",
    "max_threads",
    "get_num_threads",
    "set_num_threads",
    "threads",
    "blas_limits",
    "one_blas_thread",
    "compute_threads",
]

#: Number of BLAS threads used while fastcnn trains or evaluates (see the module docstring).
BLAS_THREADS_DURING_COMPUTE = 1


def max_threads() -> int:
    """The size of Numba's thread pool (``NUMBA_NUM_THREADS``): the most threads a kernel can
    use."""
    return int(numba.config.NUMBA_NUM_THREADS)


def get_num_threads() -> int:
    """The number of threads Numba's parallel kernels currently use (in this thread)."""
    return int(numba.get_num_threads())


def _check_threads(n: object, what: str = "set_num_threads") -> int:
    if not is_int(n):
        raise TypeError(f"{what}: expected an integer number of threads, got {n!r}")
    n = int(n)
    limit = max_threads()
    if not 1 <= n <= limit:
        raise ValueError(
            f"{what}: the number of threads must be between 1 and {limit} "
            f"(NUMBA_NUM_THREADS), got {n}"
        )
    return n


def set_num_threads(n: int) -> None:
    """Set the number of threads of Numba's kernels, 1..``max_threads()``.

    Raises TypeError for a non-integer and ValueError outside the range. The setting stays until
    changed again; prefer :func:`threads` to set it for a block only.
    """
    numba.set_num_threads(_check_threads(n))


@contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run a block with ``n`` Numba threads and restore the previous count afterwards.

    ``n=None`` keeps the current count. The count is restored on every exit, error included::

        with fastcnn.threads.threads(1):
            y = model(x)
    """
    previous = get_num_threads()
    if n is not None:
        n = _check_threads(n, "threads")
    try:
        if n is not None:
            numba.set_num_threads(n)
        yield get_num_threads()
    finally:
        numba.set_num_threads(previous)


@contextmanager
def blas_limits(n: int | None) -> Iterator[None]:
    """Limit the BLAS libraries loaded by numpy (and SciPy) to ``n`` threads for a block.

    Uses threadpoolctl; the previous limits are restored afterwards. ``n=None`` leaves them alone.
    Only the BLAS is limited, never the OpenMP runtime, which is Numba's own pool.
    """
    if n is None:
        yield
        return
    if not is_int(n, 1):
        raise ValueError(f"blas_limits: expected a positive integer number of threads, got {n!r}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


class _OneBlasThread:
    """The BLAS libraries at one thread while any thread is inside ``one_blas_thread()``.

    The libraries are looked up again only when modules were imported since the last search
    (a BLAS comes with an extension module, e.g. SciPy's own OpenBLAS): threadpoolctl's search
    costs ~0.3 ms, setting a count through the controllers it returns microseconds, so this can
    wrap every matrix product. Entries are counted under a lock: the first saves each library's
    count and sets 1, the last restores the counts, so that blocks entered and left by several
    Python threads in any order always restore what the user had.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: list[tuple[Any, int]] = []
        self._libs: list[Any] | None = None
        self._modules = -1  # len(sys.modules) at the last search

    def _blas_libs(self) -> list[Any]:
        if self._libs is None or len(sys.modules) != self._modules:
            self._modules = len(sys.modules)
            try:
                from threadpoolctl import ThreadpoolController

                self._libs = [
                    lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"
                ]
            except Exception:  # no threadpoolctl support here: leave the BLAS alone
                self._libs = []
        return self._libs

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = [(lib, lib.get_num_threads()) for lib in self._blas_libs()]
                for lib, count in self._saved:
                    if count != 1:
                        lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, count in self._saved:
                    if count != 1:
                        lib.set_num_threads(count)
                self._saved = []


_ONE_BLAS_THREAD = _OneBlasThread()


def one_blas_thread() -> AbstractContextManager[None]:
    """A context in which the BLAS behind numpy runs on one thread, the user's setting restored
    on exit. fastcnn's Dense layers run their matrix products in it: a BLAS with idle worker
    threads that spin for ~0.1 s after every call steals the cores Numba's kernels run on (a
    training loop of the user's own ran several times slower, see docs/threads.md), and one thread
    is as fast for these products. Costs a few microseconds."""
    return _ONE_BLAS_THREAD


@contextmanager
def compute_threads(
    n: int | None = None, blas: int | None = BLAS_THREADS_DURING_COMPUTE
) -> Iterator[int]:
    """The context fastcnn trains and evaluates in: ``n`` Numba threads, the BLAS at ``blas``.

    ``n=None`` keeps Numba's current count; ``blas`` defaults to one thread (measured fastest,
    see docs/threads.md). Both are restored on exit.
    """
    if blas == 1:
        with threads(n) as count, one_blas_thread():
            yield count
        return
    with threads(n) as count, blas_limits(blas):
        yield count
