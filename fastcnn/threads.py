"""Thread control: Numba's thread pool and the BLAS behind numpy, set for a block and restored.

fastcnn's kernels run on Numba's thread pool; the Dense layers call ``numpy.matmul``, which runs
on the BLAS's own pool (OpenBLAS here, built with pthreads). Both pools want every core, and an
idle pool does not go to sleep at once: its threads keep spinning for a while in case more work
arrives, stealing the cores the other pool is computing on.

Measured (2-core Xeon, numba 0.68.1 with its ``omp`` threading layer = libgomp, numpy 2.4 with
OpenBLAS 0.3.31 pthreads; Dense layers of the reference network at batch 64, forward + backward,
between two parallel Numba kernels of 2.45 ms each, median of 300 steps; bench script in the
report of the commit that added this file):

=================================================  ==============  ============
setting                                            Dense alone     whole step
=================================================  ==============  ============
BLAS 2 threads (default)                           0.84 ms         17.0 ms
BLAS 2 threads, ``OMP_WAIT_POLICY=PASSIVE``        1.02 ms         11.3 ms
BLAS 2 threads, ``OPENBLAS_THREAD_TIMEOUT=4``      0.92 ms          6.7 ms
BLAS 2 threads, both variables                     0.93 ms          6.0 ms
**BLAS 1 thread** (any of the above)               **0.70 ms**      **5.7-5.8 ms**
=================================================  ==============  ============

So the BLAS is limited to ONE thread while training (:data:`BLAS_THREADS_DURING_COMPUTE`): the
Dense products of a batch of 64 are too small to gain from a second BLAS thread (0.70 ms on one
thread vs 0.84 ms on two even with nothing else running), and with one thread the product runs
in the calling thread, so no BLAS worker is left spinning against Numba's pool.

``OMP_WAIT_POLICY=PASSIVE`` acts on libgomp only, i.e. on *Numba's* workers (the ``omp``
threading layer), not on this OpenBLAS, whose pthreads workers busy-wait (``sched_yield`` loop)
for ``2**OPENBLAS_THREAD_TIMEOUT`` cycles (default 2**28, about 0.1 s) after each call. Both
variables are read once, when the library loads, so they cannot be changed from here at run time;
with the BLAS limited to one thread neither is needed (5.7-5.8 ms with or without them).
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager

import numba

__all__ = [
    "BLAS_THREADS_DURING_COMPUTE",
    "max_threads",
    "get_num_threads",
    "set_num_threads",
    "threads",
    "blas_limits",
    "compute_threads",
]

#: Number of BLAS threads used while fastcnn trains or evaluates (see the module docstring).
BLAS_THREADS_DURING_COMPUTE = 1


def max_threads() -> int:
    """The size of Numba's thread pool (``NUMBA_NUM_THREADS``): the most threads a kernel can use."""
    return int(numba.config.NUMBA_NUM_THREADS)


def get_num_threads() -> int:
    """The number of threads Numba's parallel kernels currently use (in this thread)."""
    return int(numba.get_num_threads())


def _check_threads(n, what="set_num_threads") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
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
def threads(n: int | None):
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
def blas_limits(n: int | None):
    """Limit the BLAS libraries loaded by numpy (and SciPy) to ``n`` threads for a block.

    Uses threadpoolctl; the previous limits are restored afterwards. ``n=None`` leaves them alone.
    Only the BLAS is limited, never the OpenMP runtime, which is Numba's own pool.
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"blas_limits: expected a positive integer number of threads, got {n!r}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


@contextmanager
def compute_threads(n: int | None = None, blas: int | None = BLAS_THREADS_DURING_COMPUTE):
    """The context fastcnn trains and evaluates in: ``n`` Numba threads, the BLAS at ``blas``.

    ``n=None`` keeps Numba's current count; ``blas`` defaults to one thread (measured fastest,
    see the module docstring). Both are restored on exit.
    """
    with threads(n) as count, blas_limits(blas):
        yield count
