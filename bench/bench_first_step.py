"""Time to the first training step of each network of the suite: from an empty kernel cache
(cold: everything compiles) and from a filled one (warm: the kernels load from numba's cache).

    python bench/bench_first_step.py [--networks reference lenet5 ...] [--runs 3] [--batch 64]
                                     [--no-background]

Each run is a fresh Python process (``NUMBA_CACHE_DIR`` a new folder for a cold run, a folder
filled by a previous run for a warm one) that imports fastcnn, builds the network and runs one
training step (zero_grad, forward, loss, backward, SGD step) and one inference in eval mode;
the figures are the wall times from the process's start to the end of the step (the performance
issue's "first training step") and to the end of the inference (evaluation mode compiles kernels
of its own: F(4x4, 3x3) for large outputs), medians of ``--runs``.
The load average is printed with each run: wall time on a shared machine also measures the
neighbours, and so is the CPU time of the cold run (user + system, the helper's included).
On a cold cache fastcnn compiles the backward convolution kernels in a helper
process while the forward ones compile (fastcnn.precompile's background compilation: the
process's wall time covers both); ``--no-background`` sets FASTCNN_NO_PRECOMPILE=1, everything
compiles in the one process, one core.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEP = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np, fastcnn
net = {net!r}
shape = fastcnn.models.INPUT_SHAPES[net]
model = fastcnn.models.BUILDERS[net](shape[0], 10, 0)
x = np.random.default_rng(0).standard_normal(({batch},) + shape).astype(np.float32)
y = np.arange({batch}) % 10
loss_fn = fastcnn.CrossEntropyLoss()
opt = fastcnn.SGD(model.parameters(), lr=0.01, momentum=0.9)
opt.zero_grad()
loss_fn(model(x), y)
model.backward(loss_fn.backward())
opt.step()
import time
print("STEP", time.time())
model.eval()
model(x)
"""


def run(net, batch, cache, background=True):
    env = {k: v for k, v in os.environ.items() if k != "FASTCNN_NO_PRECOMPILE"}
    env["NUMBA_CACHE_DIR"] = cache
    if not background:
        env["FASTCNN_NO_PRECOMPILE"] = "1"
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, start_clock = time.perf_counter(), time.time()
    done = subprocess.run(
        [sys.executable, "-c", _STEP.format(repo=REPO, net=net, batch=batch)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{net}: {done.stderr.strip().splitlines()[-1]}")
    # the process's CPU and its helper's (reaped by it, so counted in its children's usage)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    marks = [ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("STEP ")]
    step = float(marks[-1]) - start_clock  # the wall clock: two processes
    return wall, cpu, step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--networks",
        nargs="+",
        default=["reference", "lenet5", "resnet8", "resnet20", "vgg", "allconv"],
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--no-background",
        action="store_true",
        help="FASTCNN_NO_PRECOMPILE=1: no helper process, everything compiles in one",
    )
    args = ap.parse_args(argv)
    print(f"`python bench/bench_first_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    sys.path.insert(0, REPO)
    from e2e_report import git_revision, kernel_target

    print(f"git {git_revision()}; kernels compiled for: {kernel_target()}")
    rows = []
    for net in args.networks:
        cold, steps, warm = [], [], []
        for _ in range(args.runs):
            cache = tempfile.mkdtemp(prefix="fastcnn-cold-")
            try:
                load = os.getloadavg()[0]
                wall, cpu, step = run(net, args.batch, cache, not args.no_background)
                cold.append(wall)
                steps.append(step)
                warm.append(run(net, args.batch, cache, not args.no_background)[0])
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            print(
                f"{net}: cold {steps[-1]:.1f} s to the step, {cold[-1]:.1f} s with the inference "
                f"({cpu:.1f} s CPU), warm {warm[-1]:.1f} s "
                f"(load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)",
                flush=True,
            )
        rows.append((net, *(statistics.median(v) for v in (steps, cold, warm))))
    print()
    print(
        "| network | first training step, empty cache | and a first inference | both, warm cache |"
    )
    print("|---|---:|---:|---:|")
    for net, st, c, w in rows:
        print(f"| {net} | {st:.1f} s | {c:.1f} s | {w:.1f} s |")


if __name__ == "__main__":
    main()
