#!/usr/bin/env python
"""Data-parallel training over MPI against one process: images/s and the allreduce's cost.

    python bench/bench_distributed.py     # 5 rounds; saves bench/results/<date>-distributed.md
    python bench/bench_distributed.py --rounds 3 --steps 100 --no-save

Configurations, each a fresh process (or ``mpiexec -n 2``) training the reference network with
``fastcnn.fit`` on real MNIST (``$FASTCNN_DATA``), global batch 64: 1 rank x 1 thread, 1 rank x 2
threads, 2 ranks x 1 thread summing through shared memory (the default on one host), the same
with the fixed-order ring (each plan step's gradients sent as soon as its backward is done),
the ring with one exchange after the whole backward (``FASTCNN_DIST_OVERLAP=0``), 2 ranks x 1
thread with MPI_Allreduce, and the ceiling: two
independent 1-thread processes side by side at batch 32 each, no MPI (their timed epochs start
together at a file barrier; images/s = both epochs' images over the longer one). Each run trains a
warm-up epoch of 20 steps (compiling, caches), then a timed epoch of ``--steps`` steps;
images/s is rank 0's clock over the timed epoch. The rounds run the configurations in
alternating order and the tables show medians, next to the machine's other load (1-minute
load average before each run, and the busiest other processes).

For 2 ranks it also reports the time a rank spends in the gradient exchange per step (waiting
for the slower rank included) and, measured apart after the ranks meet at a barrier, the
exchange alone: shared memory, the ring and MPI_Allreduce on the model's 225,034 float32
gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = "@@bench@@ "
CONFIGS = {  # name: (ranks, threads per rank, reduction, FASTCNN_DIST_OVERLAP)
    "1 rank x 1 thread": (1, 1, "auto", "1"),
    "1 rank x 2 threads": (1, 2, "auto", "1"),
    "2 ranks x 1 thread (shared memory: the default on one host)": (2, 1, "auto", "1"),
    "2 ranks x 1 thread (ring, buckets during the backward)": (2, 1, "ring", "1"),
    "2 ranks x 1 thread (ring, one exchange after the backward)": (2, 1, "ring", "0"),
    "2 ranks x 1 thread (MPI_Allreduce)": (2, 1, "mpi", "1"),
    "2 independent processes x 1 thread, batch 32 each (no exchange: the ceiling)": (
        2,
        1,
        "none",
        "1",
    ),
}
CEILING = list(CONFIGS)[-1]
ALONE = ("shared", "ring", "mpi")  # each timed alone on the model's gradients after a run


def worker(args):
    sys.path.insert(0, REPO)
    import numpy as np

    import fastcnn
    from fastcnn import distributed as dist

    alone = args.reduction == "none"  # one of the ceiling's two independent processes
    world = None if alone else dist.init(reduction=args.reduction)
    (x, y), _ = fastcnn.datasets.mnist(download=False)
    batch = args.batch
    model = fastcnn.models.reference(seed=0)
    opt = fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = fastcnn.CrossEntropyLoss()
    common = dict(batch_size=batch, progress=False, threads=args.threads)
    fastcnn.fit(model, loss, opt, x[: 20 * batch], y[: 20 * batch], epochs=1, **common)
    n = args.steps * batch
    if alone:  # both processes warm: start the timed epochs together
        open(f"{args.barrier}.{args.rank}", "w").close()
        other = f"{args.barrier}.{1 - args.rank}"
        while not os.path.exists(other):
            time.sleep(0.001)
    elif world.size > 1:
        dist.reduce_timing(reset=True)
    xt, yt = x[20 * batch : 20 * batch + n], y[20 * batch : 20 * batch + n]
    h = fastcnn.fit(model, loss, opt, xt, yt, epochs=1, **common)
    if alone:
        print(PROTOCOL + json.dumps([{"rank": args.rank, "seconds": h.seconds[0]}]), flush=True)
        return
    out = {"rank": world.rank, "seconds": h.seconds[0], "images_per_second": n / h.seconds[0]}
    if world.size > 1:
        seconds, calls = dist.reduce_timing()
        out["exchange_ms_per_step"] = 1e3 * seconds / calls
        buf = np.ones(model.num_parameters(), dtype=np.float32)
        for reduction in ALONE:
            world.reduction = reduction
            times = []
            for _ in range(60):
                buf[...] = 1  # (summed again and again it would overflow: inf is slow to add)
                dist.barrier()
                t0 = time.perf_counter()
                world.sum_inplace(buf)
                times.append(time.perf_counter() - t0)
            out[f"alone_{reduction}_ms"] = 1e3 * statistics.median(times[10:])
        world.reduction = args.reduction
    rows = world.comm.gather(out, root=0) if world.size > 1 else [out]
    if world.rank == 0:
        print(PROTOCOL + json.dumps(rows), flush=True)


def other_load():
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    ps = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"], capture_output=True, text=True
    ).stdout.splitlines()[:3]
    return load, "; ".join(" ".join(line.split()) for line in ps)


def _rows(name, proc):
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(PROTOCOL))
    return sorted(json.loads(line[len(PROTOCOL) :]), key=lambda r: r["rank"])


def run(name, steps):
    ranks, threads, reduction, overlap = CONFIGS[name]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads)]
    cmd += ["--steps", str(steps), "--reduction", reduction]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_WAIT_POLICY="PASSIVE")
    env["FASTCNN_DIST_OVERLAP"] = overlap
    if reduction == "none":  # the ceiling: two processes, half the batch each, no MPI
        with tempfile.TemporaryDirectory() as tmp:
            barrier = os.path.join(tmp, "warm")
            procs = [
                subprocess.Popen(
                    cmd + ["--batch", "32", "--rank", str(r), "--barrier", barrier],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=REPO,
                )
                for r in range(ranks)
            ]
            rows = []
            for proc in procs:
                out, err = proc.communicate()
                rows += _rows(
                    name, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
                )
        seconds = max(r["seconds"] for r in rows)
        return [{"rank": 0, "seconds": seconds, "images_per_second": ranks * steps * 32 / seconds}]
    if ranks > 1:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks)] + cmd
    return _rows(name, subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--reduction", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=150, help="timed steps per run [150]")
    p.add_argument("--rounds", type=int, default=5, help="rounds of all configurations [5]")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    saved = None
    if not args.no_save:
        import results_file

        saved = results_file.start("distributed")
    cmdline = "python bench/bench_distributed.py " + " ".join(sys.argv[1:])
    print(f"# Data-parallel training over MPI: `{cmdline.strip()}`\n")
    print(
        f"Reference network, MNIST, global batch 64, {args.steps} timed steps per run after a "
        f"20-step warm-up, {args.rounds} rounds in alternating order; medians.\n"
    )
    names = list(CONFIGS)
    results = {name: [] for name in names}
    loads = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            load, busiest = other_load()
            rows = run(name, args.steps)
            results[name].append(rows)
            loads.append(load)
            print(
                f"- round {r + 1}, {name}: {rows[0]['images_per_second']:,.0f} images/s "
                f"(load average before: {load:.2f}; busiest: {busiest})",
                flush=True,
            )
    base = statistics.median(x[0]["images_per_second"] for x in results[names[0]])
    two = statistics.median(x[0]["images_per_second"] for x in results[names[1]])
    print(
        "\n| configuration | images/s | vs 1 rank x 1 thread | vs 1 rank x 2 threads "
        "| vs 1 rank x 1 thread, round by round |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in names:
        ips = statistics.median(x[0]["images_per_second"] for x in results[name])
        # each round's ratio to the same round's one-rank run: the machine's drift cancels
        paired = statistics.median(
            x[0]["images_per_second"] / b[0]["images_per_second"]
            for x, b in zip(results[name], results[names[0]], strict=True)
        )
        print(f"| {name} | {ips:,.0f} | {ips / base:.2f}x | {ips / two:.2f}x | {paired:.2f}x |")
    print("\nPer step, 2 ranks (median over rounds; rank 0 / rank 1):\n")
    print(
        "| configuration | step ms | in the exchange ms | share | shared memory alone ms "
        "| ring alone ms | MPI_Allreduce alone ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names[2:]:
        if name == CEILING:
            continue
        runs = results[name]
        step = statistics.median(1e3 * x[0]["seconds"] / args.steps for x in runs)
        ex = [statistics.median(x[i]["exchange_ms_per_step"] for x in runs) for i in (0, 1)]
        alone = " | ".join(
            f"{statistics.median(x[0][f'alone_{r}_ms'] for x in runs):.3f}" for r in ALONE
        )
        print(
            f"| {name} | {step:.2f} | {ex[0]:.2f} / {ex[1]:.2f} | "
            f"{100 * ex[0] / step:.0f}% / {100 * ex[1] / step:.0f}% | {alone} |"
        )
    print(
        f"\nOther load: 1-minute load average before the runs {min(loads):.2f} .. "
        f"{max(loads):.2f} (median {statistics.median(loads):.2f}) on "
        f"{os.cpu_count()} CPUs; this benchmark's own runs count in it."
    )
    if saved is not None:
        saved.finish()


if __name__ == "__main__":
    main()
