"""Speedup of a kernel over its naive reference, both timed in this process on the same input.

Tests assert only a ratio with a wide margin (measured >= 1000x, asserted >= 20x): a ratio
survives a noisy shared machine, an absolute time does not. Both sides run on one Numba thread,
as the naive loop does: on a busy 2-core machine a 2-thread parallel region can wait a whole
scheduler time slice for its second thread (measured 8-30 ms per call instead of 0.1 ms), which
no median hides; one thread gives a lower bound of the ratio that survives the noise.
"""

import time

import numpy as np

from fastcnn.threads import threads


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speedup(fast, naive, fast_repeats=15, naive_repeats=1):
    """Median time of ``naive()`` over median time of ``fast()``, on one Numba thread (``fast``
    is warmed up first, so compilation is excluded)."""
    with threads(1):
        fast()
        return _median_seconds(naive, naive_repeats) / _median_seconds(fast, fast_repeats)
