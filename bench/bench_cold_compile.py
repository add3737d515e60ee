#!/usr/bin/env python
"""Cold compilation with and without FASTCNN_NUMBA_LINK_ONLY: what kernels/_parfor_link_only.py
saves.

    python bench/bench_cold_compile.py [--runs 3] [--train]

Each run is a fresh process with an empty numba cache (NUMBA_CACHE_DIR = a new folder) that
compiles ``fastcnn.precompile.compile_backward``'s kernels, or with ``--train`` runs a first
``fastcnn train`` (one batch of 64 MNIST images: every kernel of a training step, in two
processes, as a user's first run); the two settings alternate (the one that goes first
alternates too). CPU seconds (user + system of the processes) are the figure to compare on a
shared machine: wall time also measures the neighbours.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from e2e_measure import startup_args  # the start-up benchmark's first `fastcnn train`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = "from fastcnn.precompile import compile_backward; compile_backward()"


def command(train):
    if not train:
        return [sys.executable, "-c", CODE]
    return [sys.executable, "-m", "fastcnn", *startup_args()]


def cold_run(link_only, train=False):
    """(CPU seconds, wall seconds) of one compile from an empty cache."""
    cache = tempfile.mkdtemp(prefix="fastcnn-cold-")
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=cache,
        FASTCNN_NUMBA_LINK_ONLY=link_only,
        PYTHONPATH=os.pathsep.join(
            [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    )
    try:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(command(train), env=env, check=True, cwd=cache, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per setting [3]")
    ap.add_argument(
        "--train",
        action="store_true",
        help="time a first `fastcnn train` (one batch) instead of compile_backward",
    )
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    results = {"1": [], "0": []}
    for i in range(args.runs):
        for flag in ("1", "0") if i % 2 == 0 else ("0", "1"):
            cpu, wall = cold_run(flag, args.train)
            results[flag].append((cpu, wall))
            print(
                f"FASTCNN_NUMBA_LINK_ONLY={flag}: {cpu:.2f} s CPU, {wall:.2f} s wall "
                f"(load average {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    for flag, runs in results.items():
        print(
            f"FASTCNN_NUMBA_LINK_ONLY={flag}: median {statistics.median(c for c, _ in runs):.2f} s "
            f"CPU, {statistics.median(w for _, w in runs):.2f} s wall over {len(runs)} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
