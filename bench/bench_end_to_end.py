#!/usr/bin/env python
"""End-to-end benchmark: a network of the suite, fastcnn against PyTorch, in one run.

    python bench/bench_end_to_end.py                       # GEMM/kernel table + throughput table
    python bench/bench_end_to_end.py --batches 64 128 --threads 2 --repeats 7
    python bench/bench_end_to_end.py --epoch --startup --memory --profile --interference

This file holds the options and the order of the sections; the code is split along its jobs:
``e2e_runners.py`` runs inside the worker processes (the frameworks' steps, kernels, epoch,
profile), ``e2e_measure.py`` is the parent's side (workers, the contention monitor, each table
measured and printed), ``e2e_report.py`` the header, the formatting and the targets' summary.

What it measures (bench/README.md explains how to read each table):

- throughput: images/s of a training step (zero_grad, forward, loss, backward, optimizer step)
  and of inference (forward in eval mode) of the reference network (or ``--network``: any name of
  ``fastcnn.models.BUILDERS``, on its input shape), for every batch size and thread count asked
  for, fastcnn and PyTorch (when importable: it is optional, never a dependency) on the same
  random batch. For each (threads, batch, mode), blocks of steps of the
  two frameworks alternate ``--repeats`` times (the one that goes first alternates too) after a
  warm-up (compilation excluded); the table shows the median images/s of each and their ratio.
- GEMM and kernels: a float32 numpy matmul measured in this run with the same threads (the
  square one is the machine's "GEMM rate"), and fastcnn's convolution kernels at the reference
  shapes (forward, backward-input, backward-weight) in GFLOP/s and as a % of that rate and of a
  matmul of the same shape as the kernel's im2col product.
- ``--epoch``: one epoch of real MNIST at batch 64 (fastcnn.fit; a plain PyTorch loop starting
  from the same initial weights and the same shuffling), seconds and test accuracy.
- ``--startup``: from launching ``fastcnn train`` (an instrumented equivalent of
  ``python -m fastcnn train --epochs 1 --limit 64 --batch-size 64 --no-progress``) to the end of
  its first batch: with a warm kernel cache, and cold (NUMBA_CACHE_DIR = a fresh empty folder).
- ``--memory``: peak RSS of a process training N steps, fastcnn vs PyTorch, one process each.
- ``--profile``: time in each step's forward and backward (a step: a layer, or a run of layers
  the model's plan fuses), the loss and the optimizer step.
- ``--interference``: each framework alone in its process against both in one process.
- ``--scaling``: 1 thread against the most threads asked for, blocks alternating in one worker
  per framework, and fastcnn's loop outside ``compute_threads`` (a user's own loop) against it
  inside (as ``fit`` runs).

How the measurement is kept honest on a small shared machine:

- Isolation: every framework runs in a worker process of its own (``--isolation process``, the
  default) that imports only that framework; the parent sends one block at a time and waits, so
  the frameworks never run at the same time. numba's kernels run on its ``omp`` threading layer
  (the system's libgomp), PyTorch on its own libgomp (torch/lib/libgomp.so.1), the Dense layers on
  numpy's OpenBLAS: one process holding both frameworks has two OpenMP pools and a BLAS pool.
  Measured with ``--interference`` (tuned malloc, see below): both in one process cost each
  framework at most a few % (within the noise); separate processes are kept because they also
  keep each framework's allocator history its own. ``--isolation inprocess`` runs both in one.
- Fresh workers for every (threads, batch): glibc malloc returns large freed blocks to the
  system depending on what the process allocated before (its dynamic mmap threshold), and every
  re-faulted page costs time: ~700-1,600 (fastcnn) and up to ~20,000 (PyTorch) page faults per
  training step, 10-35% of the step, varying from run to run. Each configuration is measured in
  processes that ran only it, as a training run. ``--malloc both`` (the default) measures, in the
  same rounds, workers with glibc as installed ("default malloc") and workers with
  MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set so that freed memory is reused ("tuned
  malloc": no page faults, the frameworks' own speed, reproducible); the tables show the faults.
- Contention: on 2 cores, one other busy process makes a 2-thread OpenMP program (numba's pool
  and PyTorch's alike) 10-20x slower. The CPU that other processes use during each timed block
  is measured (/proc/stat minus the worker's own); a block during which they used more than
  ``--max-other-load`` cores (plus the cores the block leaves idle) is retried after waiting for
  a quiet moment; blocks kept busy after ``--attempts`` are marked ``*``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import results_file
from e2e_measure import (
    CONTENTION,
    PEER,
    TENSORFLOW,
    close_workers,
    data_table,
    epoch_table,
    interference_table,
    kernel_tables,
    memory_table,
    profile_table,
    scaling_table,
    start_workers,
    startup_table,
    throughput_table,
    torch_available,
)
from e2e_report import loadavg, print_header, print_targets
from e2e_runners import DATA, MNIST_SHAPE, NETWORKS, TUNED_MALLOC, memory_child, worker_main
from e2e_tensorflow import tensorflow_available

DEFAULT_BATCHES = [32, 64, 128, 256]


# -- main --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=DEFAULT_BATCHES,
        help="batch sizes [32 64 128 256]",
    )
    p.add_argument(
        "--threads", type=int, nargs="+", default=None, help="thread counts [1 2 (up to the cores)]"
    )
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per timed block "
        "[auto: 1024 images per training block, 2048 per inference block]",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed blocks per framework and configuration [5]"
    )
    p.add_argument(
        "--data",
        choices=("random", "mnist"),
        default="random",
        help="input batch of the throughput and profile runs: standard normal values [random], or "
        "the first MNIST training images (real data: PyTorch's max-pool runs faster on it)",
    )
    p.add_argument(
        "--isolation",
        choices=("process", "inprocess"),
        default="process",
        help="each framework in its own worker process [process], or both in one",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="retry a timed block if other processes used more than this many cores during it "
        "[0.25]",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="attempts per timed block (see --max-other-load) [3]",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for an idle machine before retrying a block [10]",
    )
    p.add_argument(
        "--malloc",
        choices=("both", "default", "tuned"),
        default="both",
        help="throughput with glibc malloc as is ('default'), "
        "'tuned' (MALLOC_MMAP_THRESHOLD_=1 GiB and "
        "MALLOC_TRIM_THRESHOLD_=4 GiB in the workers: freed activations are reused without page "
        "faults), or 'both' interleaved [both]; 'tuned' also applies to every other section",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    p.add_argument("--no-kernels", action="store_true", help="skip the GEMM / kernel table")
    p.add_argument("--kernel-calls", type=int, default=20, help="calls per kernel timing [20]")
    p.add_argument(
        "--kernel-repeats", type=int, default=3, help="interleaved rounds of the kernel table [3]"
    )
    p.add_argument(
        "--no-torch", action="store_true", help="fastcnn only, even if PyTorch is importable"
    )
    p.add_argument(
        "--no-tensorflow",
        action="store_true",
        help="leave TensorFlow out of the throughput table, even if it is importable",
    )
    p.add_argument(
        "--network",
        default="reference",
        choices=tuple(NETWORKS),
        help="the network of the throughput table (fastcnn.models; PyTorch's copy is "
        "built by tests/torch_twin.py with the same weights) [reference]",
    )
    p.add_argument(
        "--baseline",
        metavar="PATH",
        help="compare with fastcnn from the checkout at PATH (e.g. a git worktree of an "
        "earlier commit) in PyTorch's place: an interleaved A/B of two commits",
    )
    p.add_argument("--epoch", action="store_true", help="one epoch of real MNIST per framework")
    p.add_argument(
        "--data-pipeline",
        action="store_true",
        help="the DataLoader's cost per batch (with --augment's transform) against a step",
    )
    p.add_argument(
        "--startup", action="store_true", help="time to the first finished batch of `fastcnn train`"
    )
    p.add_argument(
        "--startup-runs", type=int, default=3, help="runs per start-up configuration [3]"
    )
    p.add_argument(
        "--memory", action="store_true", help="peak RSS of a training run, one process per run"
    )
    p.add_argument(
        "--memory-steps", type=int, default=20, help="training steps of a memory run [20]"
    )
    p.add_argument(
        "--memory-runs", type=int, default=2, help="runs per memory configuration (min taken) [2]"
    )
    p.add_argument("--profile", action="store_true", help="per-layer profile of one training step")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument(
        "--interference",
        action="store_true",
        help="compare each framework alone in its process with both in one process",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="1 thread against the most threads, and the loop outside compute_threads, "
        "alternating in one worker per framework",
    )
    p.add_argument(
        "--results-dir",
        default=results_file.RESULTS_DIR,
        help="folder of the dated results file the run saves [bench/results]",
    )
    p.add_argument("--no-save", action="store_true", help="print only, save no results file")
    args = p.parse_args(argv)
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    if args.threads is None:
        args.threads = sorted({1, min(2, cores)})
    for n in args.threads:
        if n < 1:
            p.error("--threads must be >= 1")
    if min(args.batches) < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    if args.data == "mnist" and NETWORKS[args.network] != MNIST_SHAPE:
        p.error(
            f"--data mnist: the network {args.network!r} takes {NETWORKS[args.network]} "
            f"inputs, not MNIST's {MNIST_SHAPE}; use --data random"
        )
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(*argv[1:4])
    if argv[:1] == ["--memory-child"]:
        return memory_child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    args = parse_args(argv)
    DATA["kind"], DATA["network"] = args.data, args.network
    if args.network != "reference" and (
        args.epoch
        or args.profile
        or args.memory
        or args.startup
        or args.interference
        or not args.no_kernels
    ):
        raise SystemExit(
            "--network times the throughput table only: add --no-kernels, and leave "
            "out --epoch, --profile, --memory, --startup and --interference"
        )
    CONTENTION.threshold, CONTENTION.attempts = args.max_other_load, max(1, args.attempts)
    CONTENTION.quiet_timeout = args.quiet_timeout
    env = os.environ.copy()
    if args.malloc == "tuned":  # everything else (kernels, epoch, memory, start-up) too
        env.update(TUNED_MALLOC)
    with_torch = torch_available() and not args.no_torch
    # TensorFlow: a second optional peer of the throughput table (not of an A/B of two commits)
    TENSORFLOW["enabled"] = tensorflow_available() and not args.no_tensorflow and not args.baseline
    if args.baseline:
        with_torch = True  # the peer slot holds the baseline checkout instead
        PEER["baseline"] = os.path.abspath(args.baseline)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=args.baseline,
            capture_output=True,
            text=True,
        ).stdout.strip()
        PEER["name"] = f"baseline {commit or args.baseline}"
        if args.interference or args.epoch or args.profile or not args.no_kernels:
            raise SystemExit(
                "--baseline times the throughput table only: add --no-kernels, and "
                "leave out --epoch, --profile and --interference"
            )
    name = f"end-to-end-{args.network}" + ("-ab" if args.baseline else "")  # an A/B of two commits
    saved = None if args.no_save else results_file.start(name, args.results_dir)
    print_header(args, argv)
    if not with_torch:
        why = "left out (--no-torch)" if args.no_torch else "not importable (it is optional)"
        print(f"PyTorch: {why} -- fastcnn figures only.")
    if not TENSORFLOW["enabled"] and not args.baseline:
        why = "left out (--no-tensorflow)" if args.no_tensorflow else "not importable (optional)"
        print(f"TensorFlow: {why} -- no tensorflow column.")
    tmp = tempfile.mkdtemp(prefix="fastcnn-bench-")
    workers = {}
    throughput = memory = startup = scaling = None
    needs_workers = not args.no_kernels or args.epoch or args.profile or args.data_pipeline
    init = os.path.join(tmp, "init.npz")
    try:
        if needs_workers:
            workers = start_workers(args, env, with_torch, init)
        if not args.no_kernels:
            kernel_tables(args, workers)
        if args.profile:
            profile_table(args, workers)
        if args.epoch:
            epoch_table(args, workers, tmp)
        if args.data_pipeline:
            data_table(args, workers)
        close_workers(workers)
        workers = {}
        if not args.no_throughput:
            throughput = throughput_table(args, env, with_torch, init)
        if args.interference and with_torch:
            interference_table(args, env)
        if args.scaling:
            scaling = scaling_table(args, env, with_torch)
        if args.memory:
            memory = memory_table(args, env)
        if args.startup:
            startup = startup_table(args, env)
        if not PEER["baseline"]:  # the targets are against PyTorch
            print_targets(throughput, memory, startup, scaling, args.network)
        print()
        print(CONTENTION.summary())
        print(f"load average at the end: {loadavg()}")
        if saved:
            saved.finish()
    finally:
        close_workers(workers)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
