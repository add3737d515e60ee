"""Run under ``mpiexec -n K python tests/distributed_worker.py MODE OUT_DIR [options]`` by
tests/test_distributed_mpi.py: each rank trains and writes what it ended with to
``OUT_DIR/rank<r>.npz`` (weights and buffers) and ``OUT_DIR/rank<r>.json`` (history, world).

Modes:
- ``fit``: ``fastcnn.fit`` on the first ``--n`` MNIST training images (``$FASTCNN_DATA``), the
  reference network (or ``--model bn``: a small network with BatchNorm and Dropout);
  ``--checkpoint`` / ``--resume`` as fit's.
- ``loop``: the same training written as a user's own loop (``shard`` and
  ``DistributedOptimizer``), to compare with ``fit``.
- ``sizes``: a user's bug, ranks that sum arrays of different lengths (``--n`` on rank 0, one
  more on the others), after an ``allreduce`` of equal ones unless ``--n`` is 0.
- ``die`` / ``raise`` / ``stop``: a user's loop in which rank 1 kills itself (SIGKILL), raises
  an exception, or stops itself (SIGSTOP) at step 3; the others must not wait forever.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

import fastcnn
from fastcnn import distributed as dist


def bn_model(seed):
    from fastcnn import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU

    rng = np.random.default_rng(seed)
    return fastcnn.Sequential(
        Conv2D(1, 8, 3, rng=rng),
        BatchNorm2D(8),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dropout(0.2, seed=seed),
        Dense(8 * 13 * 13, 10, rng=rng),
    )


def shared_model(seed):
    """Two Dense layers sharing one weight: its gradient is final only after both."""
    from fastcnn import Dense, Flatten, ReLU

    rng = np.random.default_rng(seed)
    first, second = Dense(784, 784, rng=rng), Dense(784, 784, rng=rng)
    second.weight = first.weight
    return fastcnn.Sequential(Flatten(), first, ReLU(), second, ReLU(), Dense(784, 10, rng=rng))


def build(args):
    if args.model == "bn":
        return bn_model(args.seed)
    if args.model == "shared":
        return shared_model(args.seed)
    return fastcnn.models.reference(seed=args.seed)


def data(args):
    (x, y), _ = fastcnn.datasets.mnist(download=False)
    return x[: args.n], y[: args.n]


def save(out, model, record):
    w = dist.init()
    np.savez(os.path.join(out, f"rank{w.rank}.npz"), **model.state_dict())
    record.update(rank=w.rank, size=w.size, reduction=w.reduction)
    with open(os.path.join(out, f"rank{w.rank}.json"), "w") as f:
        json.dump(record, f)


def run_fit(args):
    from fastcnn.training import resume_kwargs

    x, y = data(args)
    kwargs = {"seed": args.seed}
    if args.resume:
        ckpt = fastcnn.checkpoint.load(args.resume)
        model = ckpt.model
        opt = fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ckpt.restore_optimizer(opt)
        kwargs = resume_kwargs(ckpt)
    else:
        model = build(args)
        opt = fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fastcnn.fit(
        model,
        fastcnn.CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        progress=False,
        threads=1,
        checkpoint=args.checkpoint,
        val_data=(x[:200], y[:200]) if args.val else None,
        **kwargs,
    )
    record = {"history": history.as_dict(), "early_sends": dist.init().early_sends}
    save(args.out, model, record)


def run_loop(args, failure=None):
    x, y = data(args)
    model = build(args)
    dist.init()
    dist.broadcast_parameters(model)
    loss_fn = fastcnn.CrossEntropyLoss()
    opt = dist.DistributedOptimizer(fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9))
    rng = np.random.default_rng(args.seed)
    step = 0
    with fastcnn.threads.compute_threads(1):
        for _ in range(args.epochs):
            order = rng.permutation(x.shape[0])
            for b in range(0, x.shape[0], args.batch_size):
                mine = dist.shard(order[b : b + args.batch_size])
                step += 1
                if failure is not None and dist.rank() == 1 and step == 3:
                    print(f"rank 1: {failure} at step 3", file=sys.stderr, flush=True)
                    if failure == "die":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif failure == "stop":
                        os.kill(os.getpid(), signal.SIGSTOP)
                    else:
                        raise RuntimeError("a deliberate failure on rank 1")
                opt.zero_grad()
                if len(mine):
                    loss_fn(model(x[mine]), y[mine])
                    model.backward(loss_fn.backward(), input_grad=False)
                opt.step(count=len(mine))
    save(args.out, model, {"steps": step})


def run_sizes(args):
    w = dist.init(reduction=args.reduction)
    if args.n:
        dist.allreduce(np.ones(args.n + 1, np.float32))
    dist.allreduce(np.ones(args.n + (w.rank > 0), np.float32))
    save(args.out, fastcnn.Sequential(), {})


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fit", "loop", "sizes", "die", "raise", "stop"])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="reference")
    p.add_argument("--checkpoint")
    p.add_argument("--resume")
    p.add_argument("--val", action="store_true")
    p.add_argument("--reduction", default="auto", help="dist.init's")
    p.add_argument("--force-warmup", action="store_true", help="fit's cold-cache warm-up")
    args = p.parse_args(argv)
    dist.init(reduction=args.reduction)
    if args.force_warmup:  # as on a cold kernel cache: fit runs a warm-up step before the first
        import fastcnn.compile_ahead

        fastcnn.compile_ahead.announce_if_cold = lambda announce=True: True
    if args.mode == "fit":
        run_fit(args)
    elif args.mode == "loop":
        run_loop(args)
    elif args.mode == "sizes":
        run_sizes(args)
    else:
        run_loop(args, failure=args.mode)


if __name__ == "__main__":
    main()
