"""Numba's threading layers side by side: the manual training loop of the benchmark networks
under each layer, every layer in fresh processes, the layers alternating round by round.

    python bench/bench_threading_layers.py [--layers omp tbb workqueue] [--networks reference
        resnet20 lenet5] [--batch 128] [--rounds 3] [--seconds 5]

Prints the median step time of each process (after 3 warm-up steps) and, per network and
layer, the median over the rounds. A layer that is not installed is reported and skipped.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = """
import sys, time
sys.path.insert(0, {repo!r})
import numba, numpy as np, fastcnn
net, batch, seconds = {net!r}, {batch}, {seconds}
shape = fastcnn.models.INPUT_SHAPES[net]
model = fastcnn.models.BUILDERS[net](shape[0], 10, 0)
x = np.random.default_rng(0).standard_normal((batch,) + shape).astype(np.float32)
y = np.random.default_rng(1).integers(0, 10, batch)
loss_fn = fastcnn.CrossEntropyLoss()
opt = fastcnn.SGD(model.parameters(), lr=0.01, momentum=0.9)

def step():
    opt.zero_grad()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    opt.step()

for _ in range(3):
    step()
times, end = [], time.perf_counter() + seconds
while time.perf_counter() < end or len(times) < 5:
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print("RESULT", numba.threading_layer(), float(np.median(times)))
"""


def run(layer, net, batch, seconds):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    code = _WORKER.format(repo=REPO, net=net, batch=batch, seconds=seconds)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT"):
            _, got, median = line.split()
            return got, float(median)
    return None, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["omp", "tbb", "workqueue"])
    ap.add_argument("--networks", nargs="+", default=["reference", "resnet20", "lenet5"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    print(
        f"`python bench/bench_threading_layers.py {' '.join(sys.argv[1:])}`, "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '(default)')}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    medians = {}
    for r in range(args.rounds):
        for net in args.networks:
            for layer in args.layers:
                got, median = run(layer, net, args.batch, args.seconds)
                if got is None:
                    print(f"round {r + 1} {net} {layer}: not run ({median})")
                    continue
                medians.setdefault((net, layer), []).append(median)
                print(
                    f"round {r + 1} {net} {layer} ({got}): {median * 1e3:.1f} ms per step",
                    flush=True,
                )
    print()
    print(f"| network | batch | {' | '.join(args.layers)} |")
    print("|---|---:|" + "---:|" * len(args.layers))
    for net in args.networks:
        cells = []
        for layer in args.layers:
            t = medians.get((net, layer))
            cells.append(f"{np.median(t) * 1e3:.1f} ms" if t else "n/a")
        print(f"| {net} | {args.batch} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
