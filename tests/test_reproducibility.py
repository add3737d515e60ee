"""Reproducibility on real MNIST: bitwise-identical weights for the same seed, for a resumed run
(optimizer, scheduler, shuffling and dropout RNG states from the checkpoint), and across Numba
thread counts.

Why the thread count does not matter: every kernel splits its work into pieces whose number and
order depend only on the shapes (never on the number of threads), and no reduction is shared
between threads (kernels/conv2d.py, batchnorm.py, pool2d.py); the Dense layers' matrix products
run on OpenBLAS, which is NOT bitwise stable across its own thread counts (nor across batch
sizes), but fastcnn pins it to one thread while training and evaluating
(fastcnn.threads.BLAS_THREADS_DURING_COMPUTE), whatever the Numba thread count.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import data_dir
from fastcnn import checkpoint, datasets, layers, models, threads
from fastcnn.losses import CrossEntropyLoss
from fastcnn.model import Sequential
from fastcnn.optim import SGD, Adam, CosineAnnealingLR
from fastcnn.training import fit, resume_kwargs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(data_dir() is None, reason="MNIST not available (set FASTCNN_DATA)"),
]

N_TRAIN = 2048
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mnist_subset():
    (x, y), _ = datasets.mnist(root=data_dir(), download=False)
    return x[:N_TRAIN].copy(), y[:N_TRAIN].copy()


def weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def differs(a, b):
    return any(not np.array_equal(a[k], b[k]) for k in a)


def optimizer_state(opt):
    return {
        f"{i}.{k}": v
        for i, s in opt.state_dict()["state"].items()
        for k, v in s.items()
        if isinstance(v, np.ndarray)
    }


def train_reference(x, y, seed, nthreads, epochs=1):
    model = models.reference(seed=seed)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=epochs,
        batch_size=64,
        seed=seed,
        progress=False,
        threads=nthreads,
    )
    return weights(model), optimizer_state(opt), history.as_dict()


def digest(state):
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].tobytes())
    return h.hexdigest()


CHILD = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_reproducibility as t
from fastcnn import datasets
(x, y), _ = datasets.mnist(root={data!r}, download=False)
w, o, _ = t.train_reference(x[:t.N_TRAIN].copy(), y[:t.N_TRAIN].copy(), seed=0, nthreads={n})
print(t.digest(w), t.digest(o))
"""


def test_same_seed_same_threads_gives_bitwise_identical_weights(mnist_subset):
    x, y = mnist_subset
    n = threads.max_threads()
    w1, o1, h1 = train_reference(x, y, seed=0, nthreads=n)
    w2, o2, h2 = train_reference(x, y, seed=0, nthreads=n)
    assert_bitwise(w1, w2)
    assert_bitwise(o1, o2)
    assert h1["train_loss"] == h2["train_loss"]
    # the same in two other processes (other memory addresses, a fresh BLAS and thread pool)
    code = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=data_dir(), n=n)
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == [digest(w1), digest(o1)]
    # and the test can fail: another shuffling seed gives other weights
    w3, _, _ = train_reference(x, y, seed=1, nthreads=n)
    assert differs(w1, w3)


@pytest.mark.skipif(threads.max_threads() < 2, reason="needs NUMBA_NUM_THREADS >= 2")
def test_one_and_two_threads_give_bitwise_identical_weights(mnist_subset):
    x, y = mnist_subset
    w1, o1, h1 = train_reference(x, y, seed=0, nthreads=1)
    w2, o2, h2 = train_reference(x, y, seed=0, nthreads=2)
    assert_bitwise(w1, w2)
    assert_bitwise(o1, o2)
    assert h1["train_loss"] == h2["train_loss"]


def dropout_net(seed):
    """A network with every stateful piece: BatchNorm running statistics and two Dropout layers
    drawing from generators spawned from ``seed``."""
    rng = np.random.default_rng(seed)
    return Sequential(
        [
            layers.Conv2D(1, 8, 3, rng=rng),
            layers.BatchNorm2D(8),
            layers.ReLU(),
            layers.MaxPool2D(2),
            layers.Conv2D(8, 16, 3, rng=rng),
            layers.ReLU(),
            layers.MaxPool2D(2),
            layers.Flatten(),
            layers.Dropout(0.3, rng=rng),
            layers.Dense(400, 32, rng=rng),
            layers.ReLU(),
            layers.Dropout(0.5, rng=rng),
            layers.Dense(32, 10, rng=rng),
        ]
    )


def _run(model, x, y, path=None, epochs=3, **kwargs):
    opt = Adam(model.parameters(), lr=2e-3)
    sched = CosineAnnealingLR(opt, T_max=3)
    return (
        model,
        opt,
        sched,
        dict(
            epochs=epochs,
            batch_size=32,
            scheduler=sched,
            seed=7,
            progress=False,
            checkpoint=path,
            **kwargs,
        ),
    )


def test_resume_mid_training_is_bitwise_identical_with_dropout(mnist_subset, tmp_path):
    x, y = mnist_subset
    loss = CrossEntropyLoss()

    # uninterrupted: 3 epochs
    model, opt, sched, kw = _run(dropout_net(3), x, y)
    full = fit(model, loss, opt, x, y, **kw)
    expected, expected_opt = weights(model), optimizer_state(opt)

    # stopped after epoch 2 (the checkpoint fit writes at the end of every epoch) ...
    path = tmp_path / "run.safetensors"
    model, opt, sched, kw = _run(dropout_net(3), x, y, path, epochs=2)
    fit(model, loss, opt, x, y, **kw)
    del model, opt, sched

    # ... and continued from the file alone: a model rebuilt from its config (fresh Dropout
    # generators, then the saved generator states), a new optimizer and scheduler
    ck = checkpoint.load(path)
    assert ck.epoch == 2
    model, opt, sched, kw = _run(ck.model, x, y, tmp_path / "resumed.safetensors")
    ck.restore_optimizer(opt)
    ck.restore_scheduler(sched)
    kw.update(resume_kwargs(ck))
    resumed = fit(model, loss, opt, x, y, **kw)
    assert_bitwise(weights(model), expected)  # BatchNorm running statistics included
    assert_bitwise(optimizer_state(opt), expected_opt)
    assert resumed.train_loss == full.train_loss and resumed.lr == full.lr

    assert checkpoint.load(tmp_path / "resumed.safetensors").epoch == 3

    # the dropout generators' states matter: resuming with fresh ones gives other weights
    ck = checkpoint.load(path)
    assert ck.epoch == 2
    model, opt, sched, kw = _run(ck.model, x, y, path=None)
    for layer in model.layers:
        if isinstance(layer, layers.Dropout):
            layer.set_rng_state(np.random.default_rng(12345).bit_generator.state)
    ck.restore_optimizer(opt)
    ck.restore_scheduler(sched)
    kw.update(resume_kwargs(ck))
    fit(model, loss, opt, x, y, **kw)
    assert differs(weights(model), expected)


def test_resume_of_a_resnet_with_a_per_batch_schedule_is_bitwise_identical(mnist_subset, tmp_path):
    """A ResNet-8 (BatchNorm, residuals) trained with SGD + Nesterov and OneCycleLR stepped after
    every batch: stopped after epoch 1 of 2 and resumed from the file, bitwise the straight run
    (weights, running statistics, momentum buffers, learning rate and momentum)."""
    from fastcnn.models import resnet
    from fastcnn.optim import OneCycleLR

    x, y = mnist_subset[0][:256], mnist_subset[1][:256]
    loss = CrossEntropyLoss()

    def run(model, path=None, epochs=2):
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = OneCycleLR(opt, max_lr=0.1, total_steps=2 * 4)
        return (
            model,
            opt,
            sched,
            dict(
                epochs=epochs,
                batch_size=64,
                scheduler=sched,
                seed=3,
                progress=False,
                checkpoint=path,
            ),
        )

    model, opt, sched, kw = run(resnet(8, seed=2))
    full = fit(model, loss, opt, x, y, **kw)
    expected, expected_opt, expected_lr = (
        weights(model),
        optimizer_state(opt),
        (opt.lr, opt.momentum),
    )
    path = tmp_path / "r8.safetensors"
    model, opt, sched, kw = run(resnet(8, seed=2), path, epochs=1)
    fit(model, loss, opt, x, y, **kw)
    ck = checkpoint.load(path)
    model, opt, sched, kw = run(ck.model)
    ck.restore_optimizer(opt)
    ck.restore_scheduler(sched)
    kw.update(resume_kwargs(ck))
    resumed = fit(model, loss, opt, x, y, **kw)
    assert_bitwise(weights(model), expected)
    assert_bitwise(optimizer_state(opt), expected_opt)
    assert (opt.lr, opt.momentum) == expected_lr and sched.last_epoch == 8
    assert resumed.train_loss == full.train_loss and resumed.lr == full.lr
