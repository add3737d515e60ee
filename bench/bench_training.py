#!/usr/bin/env python
"""A whole training run, fastcnn against PyTorch side by side: accuracy and images/s per epoch.

    python bench/bench_training.py --model resnet20 --dataset fashion-mnist --epochs 3

Both frameworks train the same network (one of ``fastcnn.models``; PyTorch's copy is built by
tests/torch_twin.py with fastcnn's initial weights) with the recipe ``fastcnn train --model``
uses (for the ResNets: SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle to lr 0.1
stepped per batch, batch 128), on the same split (the last ``--val-split`` training images held
out), in the same order (``np.random.default_rng(seed).permutation`` per epoch, as ``fit``).
Each framework runs in a worker process of its own; the parent alternates them epoch by epoch
(who goes first alternates too), so both see the same machine. fastcnn trains with ``fit``;
PyTorch with the plain loop its users write. After every epoch each reports its training
seconds, images/s, and its validation and test accuracy (eval mode). The table goes to stdout;
``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = "@@bench@@ "


def _data(dataset, val_split):
    sys.path.insert(0, REPO)
    import fastcnn

    loader = {"mnist": fastcnn.datasets.mnist, "fashion-mnist": fastcnn.datasets.fashion_mnist}[
        dataset
    ]
    (x, y), (xt, yt) = loader(download=False)
    n_fit = x.shape[0] - val_split
    return (x[:n_fit], y[:n_fit]), (x[n_fit:], y[n_fit:]), (xt, yt)


def _recipe(model_name, n, epochs):
    """``fastcnn train --model``'s defaults for ``n`` training images and ``epochs``."""
    from fastcnn.cli import DEFAULTS, MODEL_DEFAULTS

    d = {**DEFAULTS}
    for k, v in MODEL_DEFAULTS.get(model_name, {}).items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    batches = -(-n // d["batch_size"])
    return {
        "lr": d["lr"]["sgd"],
        "momentum": d["momentum"],
        "nesterov": d["nesterov"],
        "weight_decay": d["weight_decay"]["sgd"],
        "scheduler": d["scheduler"],
        "batch_size": d["batch_size"],
        "total_steps": epochs * batches,
    }


class FastcnnTrainer:
    def __init__(self, model_name, dataset, val_split, epochs, seed, threads):
        import numpy as np

        import fastcnn

        self.fastcnn, self.np = fastcnn, np
        self.train_data, self.val_data, self.test_data = _data(dataset, val_split)
        self.model = fastcnn.models.BUILDERS[model_name](1, 10, seed)
        r = self.recipe = _recipe(model_name, self.train_data[0].shape[0], epochs)
        self.opt = fastcnn.SGD(
            self.model.parameters(),
            lr=r["lr"],
            momentum=r["momentum"],
            nesterov=r["nesterov"],
            weight_decay=r["weight_decay"],
        )
        if r["scheduler"] == "onecycle":
            self.sched = fastcnn.OneCycleLR(self.opt, r["lr"], r["total_steps"])
        else:
            self.sched = fastcnn.CosineAnnealingLR(self.opt, T_max=epochs)
        self.seed, self.threads = seed, threads
        self.history = fastcnn.History()
        self.loss_fn = fastcnn.CrossEntropyLoss()

    def init_weights(self, path):
        self.np.savez(path, **self.model.state_dict())

    def epoch(self, e):
        h = self.fastcnn.fit(
            self.model,
            self.loss_fn,
            self.opt,
            *self.train_data,
            epochs=e + 1,
            start_epoch=e,
            history=self.history,
            batch_size=self.recipe["batch_size"],
            scheduler=self.sched,
            seed=self.seed,
            progress=False,
            threads=self.threads,
        )
        rec = h.last()
        _, val = self.fastcnn.evaluate(self.model, *self.val_data, threads=self.threads)
        _, test = self.fastcnn.evaluate(self.model, *self.test_data, threads=self.threads)
        return {
            "seconds": rec["seconds"],
            "images_per_second": rec["images_per_second"],
            "train_loss": rec["train_loss"],
            "val_accuracy": val,
            "test_accuracy": test,
        }


class TorchTrainer:
    def __init__(self, model_name, dataset, val_split, epochs, seed, threads, init):
        import numpy as np
        import torch

        import fastcnn

        sys.path.insert(0, os.path.join(REPO, "tests"))
        from torch_twin import twin

        torch.set_num_threads(threads)
        self.torch, self.np = torch, np
        (x, y), (xv, yv), (xt, yt) = _data(dataset, val_split)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.val = (torch.from_numpy(xv), torch.from_numpy(yv))
        self.test = (torch.from_numpy(xt), torch.from_numpy(yt))
        model = fastcnn.models.BUILDERS[model_name](1, 10, seed)
        with np.load(init) as f:
            model.load_state_dict({k: f[k] for k in f.files})
        self.net = twin(model, torch).float()
        r = self.recipe = _recipe(model_name, x.shape[0], epochs)
        self.opt = torch.optim.SGD(
            self.net.parameters(),
            lr=r["lr"],
            momentum=r["momentum"],
            nesterov=r["nesterov"],
            weight_decay=r["weight_decay"],
        )
        if r["scheduler"] == "onecycle":
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, r["lr"], total_steps=r["total_steps"]
            )
            self.per_batch = True
        else:
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=epochs)
            self.per_batch = False
        self.rng = np.random.default_rng(seed)  # fit's shuffling: one permutation per epoch
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def _accuracy(self, x, y):
        torch = self.torch
        self.net.eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, x.shape[0], 256):
                correct += int((self.net(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
        self.net.train()
        return correct / x.shape[0]

    def epoch(self, e):
        torch, batch = self.torch, self.recipe["batch_size"]
        n = self.x.shape[0]
        order = torch.from_numpy(self.rng.permutation(n))
        self.net.train()
        loss_sum = 0.0
        t0 = time.perf_counter()
        for b in range(-(-n // batch)):
            idx = order[b * batch : (b + 1) * batch]
            self.opt.zero_grad()
            loss = self.loss_fn(self.net(self.x[idx]), self.y[idx])
            loss.backward()
            self.opt.step()
            if self.per_batch:
                self.sched.step()
            loss_sum += loss.item() * idx.shape[0]
        seconds = time.perf_counter() - t0
        if not self.per_batch:
            self.sched.step()
        return {
            "seconds": seconds,
            "images_per_second": n / seconds,
            "train_loss": loss_sum / n,
            "val_accuracy": self._accuracy(*self.val),
            "test_accuracy": self._accuracy(*self.test),
        }


def worker(kind, args_json):
    a = json.loads(args_json)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if kind == "fastcnn":
        t = FastcnnTrainer(
            a["model"], a["dataset"], a["val_split"], a["epochs"], a["seed"], a["threads"]
        )
        t.init_weights(a["init"])
    else:
        t = TorchTrainer(
            a["model"],
            a["dataset"],
            a["val_split"],
            a["epochs"],
            a["seed"],
            a["threads"],
            a["init"],
        )
    proto.write(PROTOCOL + json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        proto.write(PROTOCOL + json.dumps(t.epoch(req["epoch"])) + "\n")


class Worker:
    def __init__(self, kind, args):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.read()

    def read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with status {self.proc.wait()}")
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])

    def epoch(self, e):
        self.proc.stdin.write(json.dumps({"op": "epoch", "epoch": e}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="resnet20", choices=("reference", "lenet5", "resnet8", "resnet20")
    )
    p.add_argument("--dataset", default="fashion-mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--val-split", type=int, default=5000, help="as fastcnn train's [5000]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    init = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastcnn-bench-init-{os.getpid()}.npz")
    common = {
        "model": args.model,
        "dataset": args.dataset,
        "val_split": args.val_split,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
        "init": init,
    }
    workers = {"fastcnn": Worker("fastcnn", common)}  # writes the initial weights
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            workers["torch"] = Worker("torch", common)
        except ImportError:
            print("PyTorch not importable (it is optional): fastcnn only", file=sys.stderr)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    started = time.strftime("%Y-%m-%d %H:%M")
    results = {fw: [] for fw in workers}
    for e in range(args.epochs):
        order = list(workers) if e % 2 == 0 else list(workers)[::-1]
        for fw in order:
            results[fw].append(workers[fw].epoch(e))
            r = results[fw][-1]
            print(
                f"  {fw} epoch {e + 1}: {r['seconds']:.1f} s, {r['images_per_second']:.0f} img/s, "
                f"val {100 * r['val_accuracy']:.2f}%, test {100 * r['test_accuracy']:.2f}%",
                file=sys.stderr,
                flush=True,
            )
    for w in workers.values():
        w.close()
    os.unlink(init)
    print(
        f"# {args.model} on {args.dataset}, {args.epochs} epochs, {args.threads} threads "
        f"(git {git}, {started}, {platform.processor() or platform.machine()})"
    )
    print()
    print(f"`python bench/bench_training.py {' '.join(argv)}`")
    print()
    print(
        "| epoch | " + " | ".join(f"{fw} img/s | {fw} val % | {fw} test %" for fw in workers) + " |"
    )
    print("|---:|" + "---:|---:|---:|" * len(workers))
    for e in range(args.epochs):
        cells = [
            f"{results[fw][e]['images_per_second']:,.0f} | "
            f"{100 * results[fw][e]['val_accuracy']:.2f} | "
            f"{100 * results[fw][e]['test_accuracy']:.2f}"
            for fw in workers
        ]
        print(f"| {e + 1} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"git": git, "started": started, "args": vars(args), "results": results},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
