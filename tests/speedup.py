"""Speedup of a kernel over its naive reference, both timed in this process on the same input.

Tests assert only a ratio with a wide margin (measured >= 1000x, asserted >= 20x): a ratio
survives a noisy shared machine, an absolute time does not.
"""
import time

import numpy as np


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speedup(fast, naive, fast_repeats=15, naive_repeats=1):
    """Median time of ``naive()`` over median time of ``fast()`` (``fast`` is warmed up first,
    so compilation is excluded)."""
    fast()
    return _median_seconds(naive, naive_repeats) / _median_seconds(fast, fast_repeats)
