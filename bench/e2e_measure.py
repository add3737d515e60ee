"""The end-to-end benchmark's measurements (``bench/bench_end_to_end.py`` is the entry point),
on the parent's side: the worker processes and their protocol, the monitor of other processes'
CPU load, and the tables -- throughput, kernels, epoch, profile, interference, memory, start-up
-- each measured and printed row by row, so that a long run shows where it is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from e2e_report import describe_tensorflow, describe_workers, fmt_faults, fmt_rate, ratio_range
from e2e_runners import (
    CONVS,
    DATA,
    KERNEL_BATCH,
    PROTOCOL,
    REPO,
    SCRIPT,
    SQUARE,
    TUNED_MALLOC,
    conv_flops,
    conv_gemm_shapes,
    data_root,
    median,
)

# =============================================================================================
# parent side
# =============================================================================================

# -- contention: CPU used by other processes while a block runs --------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_busy_ticks():
    """CPU ticks spent busy (user, nice, system, irq, softirq, steal) by the whole machine."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return None
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def process_ticks(pid):
    """user + system CPU ticks of process ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


class Contention:
    """Measures the CPU the rest of the machine uses during a timed call, and retries calls made
    while other processes were busy: on 2 cores, one other busy process makes a 2-thread OpenMP
    program (numba's pool and PyTorch's alike) 10-20x slower, because every parallel region waits
    at its barrier for a thread that is not running."""

    def __init__(self, threshold, attempts, quiet_timeout):
        self.threshold = threshold
        self.attempts = max(1, attempts)
        self.quiet_timeout = quiet_timeout
        self.enabled = machine_busy_ticks() is not None
        self.calls = self.retried = self.kept_busy = 0

    def other_load(self, pids, fn):
        """Run fn(); return (its result, wall seconds, cores used by processes other than pids)."""
        b0 = machine_busy_ticks()
        p0 = [process_ticks(p) for p in pids]
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        b1 = machine_busy_ticks()
        p1 = [process_ticks(p) for p in pids]
        if b0 is None or None in p0 or None in p1:
            return result, wall, float("nan")
        ours = sum(b - a for a, b in zip(p0, p1, strict=True))
        return result, wall, max(0.0, (b1 - b0 - ours) / CLK_TCK / max(wall, 1e-9))

    def wait_quiet(self):
        """Wait (up to quiet_timeout s) for a 0.25 s window in which the machine is idle."""
        deadline = time.monotonic() + self.quiet_timeout
        while time.monotonic() < deadline:
            b0 = machine_busy_ticks()
            time.sleep(0.25)
            if (machine_busy_ticks() - b0) / CLK_TCK / 0.25 < self.threshold:
                return True
        return False

    def limit(self, threads=None):
        """Other load allowed during a block on ``threads`` threads: the threshold plus the cores
        the block leaves idle (a 1-thread block on 2 cores tolerates one other busy core)."""
        if threads is None:
            return self.threshold
        return self.threshold + max(0, CPUS - threads)

    def run(self, pids, fn, threads=None):
        """fn() retried while other processes used more than ``limit(threads)`` cores during it;
        returns (result, other load of the attempt kept)."""
        self.calls += 1
        for attempt in range(self.attempts):
            result, _, load = self.other_load(pids, fn)
            if not self.enabled or not load > self.limit(threads):
                return result, load
            if attempt + 1 < self.attempts:
                self.retried += 1
                self.wait_quiet()
        self.kept_busy += 1
        return result, load

    def summary(self):
        if not self.enabled:
            return "contention monitor: /proc/stat not readable, no check"
        return (
            f"contention monitor: {self.calls} timed calls, {self.retried} retried because other "
            f"processes used > {self.threshold} cores (+ the cores a block leaves idle) during "
            f"them, {self.kept_busy} kept although busy after {self.attempts} attempts (marked *)"
        )


CONTENTION = Contention(0.25, 3, 10.0)
# What the fastcnn column is compared with: PyTorch, or (--baseline PATH) fastcnn from another
# checkout, in the same worker slot, for an interleaved A/B of two commits.
PEER = {"name": "torch", "baseline": None}
# TensorFlow, the optional second peer of the throughput table (bench/e2e_tensorflow.py)
TENSORFLOW = {"enabled": False}


class Worker:
    """A worker process holding one framework (or both: kind "mixed")."""

    def __init__(self, kind, env=None):
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--worker", kind, DATA["kind"], DATA["network"]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env if env is not None else os.environ.copy(),
        )
        self.ready = self._read()

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.kind} worker exited (status {self.proc.wait()})")
            if line.startswith(PROTOCOL):
                reply = json.loads(line[len(PROTOCOL) :])
                if "error" in reply:
                    raise RuntimeError(f"the {self.kind} worker failed:\n{reply['error']}")
                return reply

    def call(self, op, **kwargs):
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def timed(self, op, **kwargs):
        """call() under the contention monitor: returns (reply, other processes' load in cores)."""
        return CONTENTION.run(
            [self.proc.pid], lambda: self.call(op, **kwargs), kwargs.get("threads")
        )

    def close(self):
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(timeout=30)


def torch_available():
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def auto_steps(args, mode, batch):
    if args.steps:
        return args.steps
    images = 1024 if mode == "train" else 2048
    return max(3, math.ceil(images / batch))


def run_blocks(entries, args, mode, batch, threads):
    """Alternate timed blocks of the entries (label -> (worker, framework), or (worker,
    framework, threads) for an entry on threads of its own) after one warm-up block each;
    returns (label -> list of images/s, steps per block, losses, other loads). The median page
    faults per step of each entry are left in ``run_blocks.faults`` and, per entry, whether
    each block ran on a busy machine in ``run_blocks.busy``."""
    steps = auto_steps(args, mode, batch)
    labels = list(entries)
    entries = {k: (v + (threads,))[:3] for k, v in entries.items()}
    for label in labels:
        worker, fw, t = entries[label]
        worker.call("block", fw=fw, mode=mode, batch=batch, threads=t, steps=min(steps, 3))
    rates = {label: [] for label in labels}
    faults = {label: [] for label in labels}
    busy = {label: [] for label in labels}
    losses, loads = [], []
    for r in range(args.repeats):
        if len(labels) > 2:  # rotate, so that each entry follows each other one in turn
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
        else:
            order = labels if r % 2 == 0 else labels[::-1]
        for label in order:
            worker, fw, t = entries[label]
            res, load = worker.timed("block", fw=fw, mode=mode, batch=batch, threads=t, steps=steps)
            rates[label].append(batch * steps / res["seconds"])
            faults[label].append(res["faults_per_step"])
            busy[label].append(load > CONTENTION.limit(t))
            losses.append(res["loss"])
            loads.append(load)
    run_blocks.faults = {label: median(v) for label, v in faults.items()}
    run_blocks.busy = busy
    return rates, steps, losses, loads


def fmt_load(loads, threads=None):
    limit = CONTENTION.limit(threads)
    busy = [v for v in loads if v > limit]
    return f"{max(loads):.2f}" + ("*" if busy else "") if loads else "-"


def start_workers(args, env, with_torch, init):
    """Worker processes for fastcnn and PyTorch (or one for both, --isolation inprocess), with
    the same initial weights (written to ``init`` by fastcnn)."""
    workers = {}
    if PEER["baseline"]:
        workers["fastcnn"] = Worker("fastcnn", env)
        workers["torch"] = Worker("baseline", dict(env, BENCH_BASELINE=PEER["baseline"]))
    elif args.isolation == "process" or not with_torch:
        workers["fastcnn"] = Worker("fastcnn", env)
        if with_torch:
            workers["torch"] = Worker("torch", env)
    else:
        workers["fastcnn"] = workers["torch"] = Worker("mixed", env)
    if with_torch:
        if not os.path.exists(init):
            workers["fastcnn"].call("save_init", path=init)
        workers["torch"].call("init", path=init)
    describe_workers(list(workers.values()))
    return workers


def close_workers(workers):
    for w in {id(w): w for w in workers.values()}.values():
        w.close()


def malloc_envs(args, env):
    """{label: environment} of the malloc settings asked for (--malloc)."""
    tuned = dict(env, **TUNED_MALLOC)
    return {
        "default": {"default malloc": env},
        "tuned": {"tuned malloc": tuned},
        "both": {"default malloc": env, "tuned malloc": tuned},
    }[args.malloc]


def throughput_table(args, env, with_torch, init):
    """Fresh workers for every (threads, batch): glibc malloc's state (its dynamic mmap threshold)
    depends on what a process allocated before and decides how many page faults a step takes, so
    each configuration is measured in processes that have run only it, as a training run would.
    With --malloc both, the default-malloc and tuned-malloc workers alternate in the same rounds."""
    with_tf = TENSORFLOW["enabled"]
    fws = ["fastcnn"] + (["torch"] if with_torch else []) + (["tensorflow"] if with_tf else [])
    envs = malloc_envs(args, env)
    print()
    print(f"## Throughput (images/s, median of {args.repeats} alternating blocks per framework)")
    print()
    results = {label: [] for label in envs}
    for threads in args.threads:
        for batch in args.batches:
            workers = {label: start_workers(args, e, with_torch, init) for label, e in envs.items()}
            if with_tf:  # TensorFlow's threads are fixed when it starts: a worker per count
                for label, e in envs.items():
                    workers[label]["tensorflow"] = describe_tensorflow(
                        Worker("tensorflow", dict(e, BENCH_TF_THREADS=str(threads)))
                    )
            try:
                # the machine's GEMM rate now, on these threads (numpy float32, the BLAS at
                # ``threads``): each framework's step is also given as a share of it
                fc = workers[next(iter(envs))]["fastcnn"]
                flops = fc.call("flops")["flops"]
                gemm_rate = 2 * SQUARE**3 / fc.timed("gemm", threads=threads, calls=5)[0]["square"]
                for mode in args.modes:
                    entries = {
                        (label, fw): (workers[label][fw], fw) for label in envs for fw in fws
                    }
                    rates, steps, losses, loads = run_blocks(entries, args, mode, batch, threads)
                    for label in envs:
                        f = median(rates[(label, "fastcnn")])
                        t = median(rates[(label, "torch")]) if with_torch else float("nan")
                        ratio = f / t if t == t else float("nan")
                        tf_ = median(rates[(label, "tensorflow")]) if with_tf else float("nan")
                        if with_torch:
                            spread = ratio_range(
                                rates[(label, "fastcnn")],
                                rates[(label, "torch")],
                                run_blocks.busy[(label, "fastcnn")],
                                run_blocks.busy[(label, "torch")],
                            )
                        else:
                            spread = "-"
                        bad = [v for v in losses if mode == "train" and not math.isfinite(v)]
                        note = " (non-finite loss!)" if bad else ""
                        faults = ", ".join(f"{run_blocks.faults[(label, fw)]:.0f}" for fw in fws)
                        step_flops = flops * (3 if mode == "train" else 1)
                        share = ", ".join(
                            f"{100 * v * step_flops / gemm_rate:.0f}%" if v == v else "-"
                            for v in (dict(fastcnn=f, torch=t, tensorflow=tf_)[fw] for fw in fws)
                        )
                        results[label].append(
                            {
                                "threads": threads,
                                "batch": batch,
                                "mode": mode,
                                "fastcnn": f,
                                "torch": t,
                                "ratio": ratio,
                                "tensorflow": tf_,
                                "ratio_tf": f / tf_ if tf_ == tf_ else float("nan"),
                                "steps": steps,
                                "spread": spread + note,
                                "faults": faults,
                                "gemm": f"{share} of {gemm_rate / 1e9:.0f}",
                                "load": fmt_load(loads, threads),
                                "malloc": label,
                            }
                        )
                        print(
                            f"  measured ({label}): {threads} thread(s), batch {batch}, {mode}: "
                            f"fastcnn {f:,.0f}, torch {t:,.0f} img/s, {ratio:.2f}x"
                            + (f", tensorflow {tf_:,.0f} img/s" if with_tf else ""),
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                for w in workers.values():
                    close_workers(w)
    for label, rows in results.items():
        print()
        if label == "tuned malloc":
            print(
                "Tuned malloc ("
                + ", ".join(f"{k}={v}" for k, v in TUNED_MALLOC.items())
                + " in both workers: freed activations are reused, no page faults; "
                "the frameworks' compute):"
            )
        else:
            print(
                "Default malloc (glibc as installed, what a user gets; page faults per step depend "
                "on the allocation history and vary between runs, PyTorch's most):"
            )
        print()
        peer = PEER["name"]
        # with TensorFlow: its img/s after the peer's, fastcnn / tensorflow after the ratio
        tf_head = (
            ("", "", "", "")
            if not with_tf
            else ("tensorflow img/s | ", "fastcnn / tensorflow | ", "---:|---:|", ", tensorflow")
        )
        print(
            f"| threads | batch | mode | steps/block | fastcnn img/s | {peer} img/s | "
            f"{tf_head[0]}ratio | {tf_head[1]}"
            f"ratio range | page faults/step fastcnn, {peer}{tf_head[3]} | "
            f"% of the GEMM rate (GFLOP/s) fastcnn, {peer}{tf_head[3]} | other load |"
        )
        print(f"|---:|---:|---|---:|---:|---:|{tf_head[2]}---:|---|---|---|---:|")
        for r in rows:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] == r["ratio"] else "-"
            tf_rate = tf_ratio = ""
            if with_tf:
                tf_rate = f"{fmt_rate(r['tensorflow'])} | "
                tf_ratio = (
                    f"{r['ratio_tf']:.2f}x" if r["ratio_tf"] == r["ratio_tf"] else "-"
                ) + " | "
            print(
                f"| {r['threads']} | {r['batch']} | {r['mode']} | {r['steps']} | "
                f"{fmt_rate(r['fastcnn'])} | {fmt_rate(r['torch'])} | {tf_rate}{ratio} | "
                f"{tf_ratio}{r['spread']} | {r['faults']} | {r['gemm']} | {r['load']} |"
            )
    sys.stdout.flush()
    return [r for rows in results.values() for r in rows]


def kernel_tables(args, workers):
    calls = args.kernel_calls
    print()
    print(
        f"## GEMM rate and conv kernels (float32, batch {KERNEL_BATCH}, median of {calls} calls, "
        f"{args.kernel_repeats} rounds interleaved)"
    )
    rows = {}
    for threads in args.threads:
        gemm, kern, tkern = [], [], []
        for _ in range(args.kernel_repeats):
            gemm.append(workers["fastcnn"].timed("gemm", threads=threads, calls=calls)[0])
            kern.append(
                workers["fastcnn"].timed("kernels", fw="fastcnn", threads=threads, calls=calls)[0]
            )
            if "torch" in workers:
                tkern.append(
                    workers["torch"].timed("kernels", fw="torch", threads=threads, calls=calls)[0]
                )
        g = {k: median([d[k] for d in gemm]) for k in gemm[0]}
        kf = {k: median([d[k] for d in kern]) for k in kern[0]}
        kt = {k: median([d[k] for d in tkern]) for k in tkern[0]} if tkern else {}
        square_flops = 2 * SQUARE**3
        peak = square_flops / g["square"] / 1e9
        print()
        print(
            f"{threads} thread(s): GEMM rate (numpy float32 matmul {SQUARE}x{SQUARE} @ "
            f"{SQUARE}x{SQUARE}, OpenBLAS at {threads} threads): **{peak:.1f} GFLOP/s**"
        )
        print()
        print(
            "| kernel | fastcnn ms | fastcnn GFLOP/s | % of GEMM rate | same-shape GEMM (MxKxN) | "
            "its GFLOP/s | fastcnn % of it | torch ms | fastcnn / torch speed |"
        )
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for layer, dims in CONVS.items():
            flops = conv_flops(*dims)
            for op, (m, k, n) in conv_gemm_shapes(*dims).items():
                key = f"{layer} {op}"
                fg = flops / kf[key] / 1e9
                gg = flops / g[key] / 1e9
                tms = f"{kt[key] * 1e3:.3f}" if key in kt else "-"
                vs = f"{kt[key] / kf[key]:.2f}x" if key in kt else "-"
                print(
                    f"| {key} | {kf[key] * 1e3:.3f} | {fg:.1f} | {100 * fg / peak:.0f}% | "
                    f"{m}x{k}x{n} | {gg:.1f} | {100 * fg / gg:.0f}% | {tms} | {vs} |"
                )
                rows[(threads, key)] = {
                    "ms": kf[key] * 1e3,
                    "gflops": fg,
                    "pct_peak": 100 * fg / peak,
                }
        sys.stdout.flush()
    print()
    print(
        "(conv1 backward-input is not needed in training, the first layer's input needs no "
        "gradient, but fastcnn's Conv2D.backward computes it; PyTorch skips it. 'backward-weight "
        "from pool' is the weight gradient as a training step computes it, from the gradient of "
        "the ReLU + 2x2 max pool after the layer: conv1's rebuilds dY block by block in cache "
        "(kernels.fused.maxpool2d_conv2d_backward_weight_dense), conv2's sums only dY's nonzero "
        "terms (maxpool2d_conv2d_backward_weight); its GFLOP/s count the dense product's flops "
        "(PyTorch has no such kernel: '-').)"
    )
    return rows


def epoch_table(args, workers, tmp):
    print()
    print(
        "## One epoch of MNIST (60,000 training images, batch 64, SGD lr 0.01 momentum 0.9, "
        "same initial weights and shuffling; test accuracy on 10,000)"
    )
    print()
    print(f"data: {data_root()}")
    print()
    print("| threads | framework | epoch s | images/s | train loss | test accuracy | other load |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    init = os.path.join(tmp, "init.npz")
    out = []
    for threads in args.threads:
        res = {}
        for fw in ["fastcnn"] + (["torch"] if "torch" in workers else []):
            CONTENTION.wait_quiet()
            r, _, load = CONTENTION.other_load(
                [workers[fw].proc.pid],
                lambda: workers[fw].call(
                    "epoch", fw=fw, threads=threads, batch=64, folder=tmp, init=init
                ),
            )
            res[fw] = r
            print(
                f"| {threads} | {fw} | {r['seconds']:.2f} | {r['images'] / r['seconds']:,.0f} | "
                f"{r['train_loss']:.4f} | {100 * r['test_accuracy']:.2f}% | {fmt_load([load])} |",
                flush=True,
            )
        if "torch" in res:
            print(
                f"| {threads} | ratio | | "
                f"{res['torch']['seconds'] / res['fastcnn']['seconds']:.2f}x | | | |"
            )
        out.append(res)
    return out


def data_table(args, workers, batch=64, steps=200):
    """The data pipeline's cost per batch against a training step (issue 16: < 5%)."""
    print()
    print(
        f"## Data pipeline: a DataLoader over uint8 images (fit's reused buffers, scaled to "
        f"float32), with and without `fastcnn train --augment`'s transform, against a training "
        f"step on a prepared batch ({args.network}, batch {batch}, {steps} batches, medians of 3)"
    )
    print()
    print("| threads | loader ms | loader + augment ms | train step ms | loader + augment / step |")
    print("|---:|---:|---:|---:|---:|")
    out = []
    for threads in args.threads:
        runs = []
        for _ in range(3):
            CONTENTION.wait_quiet()
            runs.append(workers["fastcnn"].call("data", threads=threads, batch=batch, steps=steps))
        r = {k: median([run[k] for run in runs]) for k in runs[0]}
        print(
            f"| {threads} | {1e3 * r['loader']:.3f} | {1e3 * r['loader + augment']:.3f} | "
            f"{1e3 * r['train step']:.2f} | {100 * r['loader + augment'] / r['train step']:.1f}% |",
            flush=True,
        )
        out.append(r)
    return out


def profile_table(args, workers):
    threads = max(args.threads)
    batch = args.profile_batch
    print()
    print(
        f"## Per-layer profile of one training step (batch {batch}, {threads} threads, "
        f"median ms over {args.profile_steps} steps)"
    )
    print()
    res = {
        fw: workers[fw].timed(
            "profile", fw=fw, threads=threads, batch=batch, steps=args.profile_steps
        )[0]
        for fw in ["fastcnn"] + (["torch"] if "torch" in workers else [])
    }
    f = res["fastcnn"]
    total = f["step|instrumented"]
    keys = []
    for k in f:
        row = k.split("|")[0]
        if row not in ("step", "optimizer", "faults") and row not in keys:
            keys.append(row)
    print(
        "fastcnn, each step of the model's plan (a layer, or a fused run of layers) timed from "
        "outside (page faults: mean minor faults during the call, i.e. fresh memory touched):"
    )
    print()
    print("| part | forward ms | backward ms | % of step | page faults forward, backward |")
    print("|---|---:|---:|---:|---|")
    for row in keys:
        fw_ = f.get(f"{row}|forward", 0.0)
        bw_ = f.get(f"{row}|backward", 0.0)
        pf = f"{f.get(f'faults|{row}|forward', 0):.0f}, {f.get(f'faults|{row}|backward', 0):.0f}"
        print(
            f"| {row} | {fw_ * 1e3:.3f} | {bw_ * 1e3:.3f} | {100 * (fw_ + bw_) / total:.1f}% | "
            f"{pf} |"
        )
    for what in ("zero_grad", "step"):
        v = f.get(f"optimizer|{what}", 0.0)
        print(
            f"| optimizer {what} | {v * 1e3:.3f} | | {100 * v / total:.1f}% | "
            f"{f.get(f'faults|optimizer|{what}', 0):.0f} |"
        )
    print(
        f"| Python between the calls | {f['step|between'] * 1e3:.3f} | | "
        f"{100 * f['step|between'] / total:.1f}% | |"
    )
    print()
    print(
        f"fastcnn step: {f['step|instrumented'] * 1e3:.2f} ms instrumented (the % column is of "
        f"this), {f['step|plain'] * 1e3:.2f} ms uninstrumented (the two kinds of steps alternated)."
    )
    if "torch" in res:
        t = res["torch"]
        print()
        print(
            f"PyTorch, torch.profiler over {args.profile_steps} steps (step "
            f"{t['step_seconds'] * 1e3:.2f} ms "
            "without the profiler): the ops with the most self CPU time, per step:"
        )
        print()
        print("| aten op | self CPU ms per step | calls per step |")
        print("|---|---:|---:|")
        for name, sec, count in t["ops"]:
            print(f"| {name} | {sec * 1e3:.3f} | {count:g} |")
    return res


def interference_table(args, env):
    """Each framework alone in its process vs both frameworks in one process (alternating)."""
    label, env = list(malloc_envs(args, env).items())[
        -1
    ]  # tuned when asked for: no page-fault noise
    print()
    print(
        "## Thread-pool interference: alone in a process vs both frameworks in one process "
        f"({label})"
    )
    print()
    print(
        "| threads | batch | mode | fastcnn alone | fastcnn + torch in process | ratio | torch "
        "alone | torch + fastcnn in process | ratio | page faults/step (same order) | other load |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    out = []
    for threads in args.threads:
        for batch in args.batches:  # fresh processes per configuration, as in the throughput table
            pure_f, pure_t, mixed = (
                Worker("fastcnn", env),
                Worker("torch", env),
                Worker("mixed", env),
            )
            try:
                for mode in args.modes:
                    entries = {
                        "fa": (pure_f, "fastcnn"),
                        "fm": (mixed, "fastcnn"),
                        "ta": (pure_t, "torch"),
                        "tm": (mixed, "torch"),
                    }
                    rates, _, _, loads = run_blocks(entries, args, mode, batch, threads)
                    m = {k: median(v) for k, v in rates.items()}
                    print(
                        f"| {threads} | {batch} | {mode} | {fmt_rate(m['fa'])} | "
                        f"{fmt_rate(m['fm'])} | {m['fm'] / m['fa']:.2f} | {fmt_rate(m['ta'])} | "
                        f"{fmt_rate(m['tm'])} | {m['tm'] / m['ta']:.2f} | "
                        f"{fmt_faults(run_blocks.faults)} | {fmt_load(loads, threads)} |",
                        flush=True,
                    )
                    out.append(m)
            finally:
                for w in (pure_f, pure_t, mixed):
                    w.close()
    return out


def scaling_table(args, env, with_torch):
    """Each framework at 1 thread and at the most threads asked for, blocks alternating in one
    worker (the throughput table measures thread counts in different workers minutes apart,
    and the machine's speed drifts between them), fastcnn's rounds first, then PyTorch's, and
    fastcnn's loop outside compute_threads (numba's and the BLAS's defaults: a user's own
    loop) against the same loop inside it (as fit runs its steps)."""
    top = max(args.threads)
    label, env = list(malloc_envs(args, env).items())[-1]
    print()
    print(f"## Thread scaling, and the default environment ({label}; blocks alternate in a worker)")
    print()
    print(
        f"| batch | mode | fastcnn 1 thread | fastcnn {top} threads | ratio | ratio range | "
        f"fastcnn, no compute_threads | / {top} threads | torch 1 thread | torch {top} threads | "
        "ratio | other load |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    out = []
    for batch in args.batches:
        workers = [Worker("fastcnn", env)] + ([Worker("torch", env)] if with_torch else [])
        try:
            for mode in args.modes:
                entries = {
                    "f1": (workers[0], "fastcnn", 1),
                    "fN": (workers[0], "fastcnn", top),
                    "fd": (workers[0], "fastcnn", None),
                }
                # each framework's blocks alternate among themselves: with PyTorch's blocks in
                # the same rotation, fastcnn's 2-against-1 ratio came out lower than without
                rates, _, _, loads = run_blocks(entries, args, mode, batch, top)
                busy = dict(run_blocks.busy)
                if with_torch:
                    theirs = {"t1": (workers[1], "torch", 1), "tN": (workers[1], "torch", top)}
                    more, _, _, more_loads = run_blocks(theirs, args, mode, batch, top)
                    rates.update(more)
                    loads += more_loads
                m = {k: median(v) for k, v in rates.items()}
                spread = ratio_range(rates["fN"], rates["f1"], busy["fN"], busy["f1"])
                t1, tn = m.get("t1", float("nan")), m.get("tN", float("nan"))
                print(
                    f"| {batch} | {mode} | {fmt_rate(m['f1'])} | {fmt_rate(m['fN'])} | "
                    f"{m['fN'] / m['f1']:.2f}x | {spread} | "
                    f"{fmt_rate(m['fd'])} | {m['fd'] / m['fN']:.2f} | {fmt_rate(t1)} | "
                    f"{fmt_rate(tn)} | {tn / t1:.2f}x | {fmt_load(loads)} |",
                    flush=True,
                )
                out.append(
                    {
                        "batch": batch,
                        "mode": mode,
                        "threads": top,
                        "scaling": m["fN"] / m["f1"],
                        "default": m["fd"] / m["fN"],
                    }
                )
        finally:
            for w in workers:
                w.close()
    return out


def memory_table(args, env):
    threads = max(args.threads)
    steps = args.memory_steps
    print()
    print(
        f"## Peak memory of a training run ({steps} steps, {threads} threads, one process per run, "
        "MiB; peak RSS = ru_maxrss of the child, min of {} runs; 'peak during the steps' = VmHWM "
        "reset after the first step)".format(args.memory_runs)
    )
    print()
    print(
        "| batch | framework | RSS after import + model + batch | after the first step | peak RSS "
        "of the run | peak during the steps | peak - RSS after import |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    fws = ["fastcnn"] + (["torch"] if torch_available() else [])
    out = {}
    for batch in args.batches:
        for fw in fws:
            runs = []
            for _ in range(args.memory_runs):
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        SCRIPT,
                        "--memory-child",
                        fw,
                        str(batch),
                        str(threads),
                        str(steps),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                    env=env,
                )
                stdout = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = status
                line = next((s for s in stdout.splitlines() if s.startswith(PROTOCOL)), None)
                if status != 0 or line is None:
                    raise RuntimeError(f"memory child {fw} batch {batch} failed (status {status})")
                rep = json.loads(line[len(PROTOCOL) :])
                rep["wait4_kib"] = usage.ru_maxrss
                runs.append(rep)
            best = min(runs, key=lambda r: r["wait4_kib"])
            base = best["after_import_kib"]
            mib = lambda k: "-" if k is None else f"{k / 1024:.0f}"  # noqa: E731
            print(
                f"| {batch} | {fw} | {mib(base)} | {mib(best['after_first_step_kib'])} | "
                f"**{mib(best['wait4_kib'])}** | {mib(best['steps_peak_kib'])} | "
                f"{mib(best['wait4_kib'] - base)} |",
                flush=True,
            )
            out[(batch, fw)] = best
    return out


# -- start-up ----------------------------------------------------------------------------------

STARTUP_CHILD = r"""
import os, sys, time
T0 = float(os.environ["BENCH_T0"])
def mark(what):
    sys.stderr.write("@@mark %s %.4f\n" % (what, time.time() - T0)); sys.stderr.flush()
mark("python")
sys.path.insert(0, os.environ["BENCH_REPO"])
import fastcnn.cli as cli
import fastcnn.optim as optim
mark("import")
_load = cli._load_data
def load(*a, **k):
    r = _load(*a, **k); mark("data"); return r
cli._load_data = load
_step = optim.SGD.step
count = [0]
def step(self):
    _step(self)
    count[0] += 1
    if count[0] == 1:
        mark("first_batch")
optim.SGD.step = step
status = cli.main(sys.argv[1:])
mark("exit")
sys.exit(status)
"""


def startup_args(threads=None):
    """``fastcnn train`` on one batch of 64 MNIST images: every kernel of a training step, as a
    user's first run (``--threads`` only when ``threads`` is given)."""
    return [
        "train",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--batch-size",
        "64",
        "--val-split",
        "0",
        "--no-progress",
        "--data-dir",
        data_root(),
        "--no-download",
    ] + ([] if threads is None else ["--threads", str(threads)])


def run_startup(env, threads, instrumented=True):
    """One launch of the start-up command; returns the child's marks (seconds since launch), its
    wall time, the numba cache messages and the CPU load of other processes meanwhile."""
    import resource

    env = dict(env)
    env["BENCH_REPO"] = REPO
    if instrumented:
        cmd = [sys.executable, "-c", STARTUP_CHILD] + startup_args(threads)
    else:
        cmd = [sys.executable, "-m", "fastcnn"] + startup_args(threads)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0 = machine_busy_ticks()
    env["BENCH_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    b1 = machine_busy_ticks()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"startup run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    marks = {}
    for line in proc.stderr.splitlines():
        if line.startswith("@@mark "):
            _, what, sec = line.split()
            marks[what] = float(sec)
    child_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    marks["wall"] = wall
    marks["other_load"] = (
        max(0.0, ((b1 - b0) / CLK_TCK - child_cpu) / wall) if b0 is not None else float("nan")
    )
    marks["cache_loaded"] = proc.stdout.count("[cache] data loaded from")
    marks["cache_saved"] = proc.stdout.count("[cache] data saved to")
    return marks


def run_startup_quiet(make_env, threads, instrumented=True):
    """run_startup retried (with a fresh environment from make_env()) while the machine was busy."""
    CONTENTION.calls += 1
    for attempt in range(CONTENTION.attempts):
        marks = run_startup(make_env(), threads, instrumented)
        if not marks["other_load"] > CONTENTION.threshold:
            return marks
        if attempt + 1 < CONTENTION.attempts:
            CONTENTION.retried += 1
            CONTENTION.wait_quiet()
    CONTENTION.kept_busy += 1
    return marks


def startup_table(args, env):
    threads = max(args.threads)
    runs = args.startup_runs
    print()
    print("## Start-up: launching `fastcnn train` to its first finished batch")
    print()
    print(
        "command (instrumented equivalent: the same cli.main with timestamps after the imports, "
        "the data and the first optimizer step):"
    )
    print()
    print("    python -m fastcnn " + " ".join(startup_args(threads)))
    print()
    print(
        "| cache | runs | import s | data loaded s | first batch done s | process exit s | "
        "kernels loaded / compiled (numba cache) | other load |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    results = {}
    scratch = tempfile.mkdtemp(prefix="fastcnn-bench-cache-")
    counter = [0]

    def fresh_cache_env():
        counter[0] += 1
        folder = os.path.join(scratch, f"cold{counter[0]}")
        os.makedirs(folder)
        fresh_cache_env.last = folder
        return dict(env, NUMBA_CACHE_DIR=folder, NUMBA_DEBUG_CACHE="1")

    try:
        # the in-tree cache (kernels/__pycache__), as a user of the checkout has it: one run first
        plain = {k: v for k, v in env.items() if k != "NUMBA_CACHE_DIR"}
        run_startup(plain, threads)
        cold, warm, default = (
            "cold: NUMBA_CACHE_DIR = empty temp dir",
            "warm: same NUMBA_CACHE_DIR, 2nd run",
            "warm: default in-tree cache (kernels/__pycache__)",
        )
        # and cold with numba's parallel-loop wrappers compiled as numba does
        # (kernels/_parfor_link_only.py turned off): what that patch saves, side by side
        unpatched = "cold, wrappers compiled (FASTCNN_NUMBA_LINK_ONLY=0)"
        rows = {cold: [], warm: [], default: [], unpatched: []}
        for _ in range(runs):  # interleaved: cold, warm (the cold run's folder), in-tree, unpatched
            rows[cold].append(run_startup_quiet(fresh_cache_env, threads))
            folder = fresh_cache_env.last
            rows[warm].append(
                run_startup_quiet(
                    lambda: dict(env, NUMBA_CACHE_DIR=folder, NUMBA_DEBUG_CACHE="1"), threads
                )
            )
            rows[default].append(
                run_startup_quiet(lambda: dict(plain, NUMBA_DEBUG_CACHE="1"), threads)
            )
            rows[unpatched].append(
                run_startup_quiet(
                    lambda: dict(fresh_cache_env(), FASTCNN_NUMBA_LINK_ONLY="0"), threads
                )
            )
        for label, marks in rows.items():
            med = {
                k: median([m[k] for m in marks if k in m])
                for k in ("import", "data", "first_batch", "exit")
            }
            loaded = sorted({m["cache_loaded"] for m in marks})
            saved = sorted({m["cache_saved"] for m in marks})
            load = fmt_load([m["other_load"] for m in marks])
            print(
                f"| {label} | {len(marks)} | {med['import']:.2f} | {med['data']:.2f} | "
                f"**{med['first_batch']:.2f}** | {med['exit']:.2f} | {loaded} / {saved} | {load} |",
                flush=True,
            )
            results[label] = med
        plain_runs = [
            run_startup_quiet(lambda: plain, threads, instrumented=False)["wall"]
            for _ in range(runs)
        ]
        print()
        print(
            f"`python -m fastcnn {' '.join(startup_args(threads))}` (uninstrumented, warm in-tree "
            f"cache), launch to exit: median {median(plain_runs):.2f} s over {runs} runs."
        )
        print(
            "Times are from the parent's clock before launching (time.time(), shared with the "
            "child). 'kernels loaded / compiled' counts numba's NUMBA_DEBUG_CACHE messages of the "
            "main process per run: a cold run loads only what fastcnn.precompile's helper process "
            "compiled meanwhile (the kernels of its compile_backward)."
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
