"""fit / evaluate / thread control: learning, reproducible shuffling, bitwise resume, divergence."""

import hashlib
import time

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from conftest import data_dir
from fastcnn import checkpoint, threads
from fastcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from fastcnn.losses import CrossEntropyLoss
from fastcnn.model import Sequential
from fastcnn.optim import SGD, Adam, CosineAnnealingLR, StepLR
from fastcnn.training import History, TrainingDiverged, evaluate, fit, resume_kwargs

# --------------------------------------------------------------------------------------------
# tiny problems


def blobs(n=240, seed=0):
    """Three Gaussian clusters in 4-D: a problem a small MLP solves in a few epochs."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 4)).astype(np.float32) * 3
    y = rng.integers(0, 3, n)
    x = (centers[y] + rng.standard_normal((n, 4))).astype(np.float32)
    return x, y.astype(np.int64)


def mlp(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Dense(4, 16, rng=rng), ReLU(), Dense(16, 3, rng=rng)])


def images(n=100, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.5
    for k in range(3):  # class k: a bright row band
        x[y == k, 0, 2 * k + 1 : 2 * k + 3, :] += 1.0
    return x, y.astype(np.int64)


def small_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        [
            Conv2D(1, 4, 3, rng=rng),
            ReLU(),
            MaxPool2D(2),
            Flatten(),
            Dense(36, 3, rng=rng),
        ]
    )


class Recorder:
    """A CrossEntropyLoss that records the labels of every batch (and can inject a NaN)."""

    def __init__(self, nan_at=None):
        self.inner = CrossEntropyLoss()
        self.batches = []
        self.nan_at = nan_at

    def __call__(self, logits, y):
        self.batches.append(y.copy())
        loss = self.inner(logits, y)
        return float("nan") if len(self.batches) == self.nan_at else loss

    def backward(self):
        return self.inner.backward()


def weights(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------------------------
# learning


def test_fit_decreases_loss_and_reaches_high_accuracy():
    x, y = blobs()
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = evaluate(model, x, y)
    h = fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=5,
        batch_size=32,
        val_data=(x[:60], y[:60]),
        progress=False,
    )
    assert isinstance(h, History) and len(h) == 5
    assert h.train_loss[-1] < 0.5 * h.train_loss[0]
    assert h.train_loss[-1] < 0.5 * before[0]
    loss, acc = evaluate(model, x, y)
    assert acc > 0.9 and acc > before[1]
    d = h.as_dict()
    assert d["epoch"] == [1, 2, 3, 4, 5]
    assert set(d) == set(History.KEYS)
    assert all(0 <= a <= 1 for a in d["train_accuracy"] + d["val_accuracy"])
    assert all(s > 0 for s in d["seconds"]) and all(r > 0 for r in d["images_per_second"])
    assert d["lr"] == [0.1] * 5
    # as_dict returns copies
    d["epoch"].append(99)
    assert h.epoch == [1, 2, 3, 4, 5]
    assert History.from_dict(h.as_dict()).as_dict() == h.as_dict()


def test_fit_records_scheduled_lr_and_no_val():
    x, y = blobs(64)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    h = fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=3,
        scheduler=StepLR(opt, 1, gamma=0.5),
        progress=False,
    )
    assert h.lr == pytest.approx([0.1, 0.05, 0.025])
    assert h.val_loss == [None] * 3 and h.val_accuracy == [None] * 3


def test_evaluate_matches_direct_computation_and_restores_mode():
    x, y = blobs(300)
    model = mlp()
    model.train()
    loss, acc = evaluate(model, x, y, batch_size=64)
    assert model.training
    logits = model.predict(x)
    assert loss == pytest.approx(CrossEntropyLoss()(logits, y), rel=1e-6)
    assert acc == np.mean(np.argmax(logits, 1) == y)
    model.eval()
    evaluate(model, x, y)
    assert not model.training


# --------------------------------------------------------------------------------------------
# shuffling


class SpyMLP(Sequential):
    """The MLP, recording every training batch it is given."""

    def __init__(self):
        super().__init__(mlp().layers)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.copy())
        return super().forward(x)

    def __call__(self, x):
        return self.forward(x)


def shuffled_batches(seed, epochs=3, n=10, batch_size=4):
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)  # row i holds 4i..4i+3: identifiable
    y = np.arange(n, dtype=np.int64) % 3
    model = SpyMLP()
    fit(
        model,
        CrossEntropyLoss(),
        SGD(model.parameters(), lr=0.0),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    return [(b[:, 0] // 4).astype(int) for b in model.seen]


def test_shuffling_follows_the_seed_and_keeps_the_last_partial_batch():
    batches = shuffled_batches(7)
    assert [len(b) for b in batches] == [4, 4, 2] * 3  # drop_last=False
    rng = np.random.default_rng(7)
    for e in range(3):
        np.testing.assert_array_equal(
            np.concatenate(batches[3 * e : 3 * e + 3]), rng.permutation(10)
        )
    again, other = shuffled_batches(7), shuffled_batches(8)
    assert all(np.array_equal(p, q) for p, q in zip(batches, again, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(batches, other, strict=True))
    # every epoch is a different order
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:6]))


# --------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resume_is_bitwise_identical_to_the_uninterrupted_run(tmp_path, kind):
    x, y = images(100)
    xv, yv = images(30, seed=1)

    def make(model=None):
        model = small_cnn() if model is None else model
        if kind == "sgd":
            opt = SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
            sched = CosineAnnealingLR(opt, T_max=4)
        else:
            opt = Adam(model.parameters(), lr=3e-3)
            sched = StepLR(opt, 2, gamma=0.5)
        return model, opt, sched

    # uninterrupted: 4 epochs
    model, opt, sched = make()
    full = fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=4,
        batch_size=16,
        val_data=(xv, yv),
        scheduler=sched,
        seed=3,
        progress=False,
    )
    expected = weights(model)

    # interrupted after 2 epochs, then resumed from the checkpoint in a fresh model/optimizer
    path = tmp_path / "run.safetensors"
    model, opt, sched = make()
    fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=2,
        batch_size=16,
        val_data=(xv, yv),
        scheduler=sched,
        seed=3,
        progress=False,
        checkpoint=path,
    )
    ck = checkpoint.load(path)
    assert ck.epoch == 2
    kwargs = resume_kwargs(ck)
    assert kwargs["start_epoch"] == 2 and len(kwargs["history"]) == 2
    # the stored shuffling state is the one replaying two epochs from the seed gives
    rng = np.random.default_rng(3)
    rng.permutation(100), rng.permutation(100)
    from fastcnn.training import _rng_state_from_json

    assert _rng_state_from_json(kwargs["shuffle_state"]) == rng.bit_generator.state

    model2, opt2, sched2 = make(ck.model)
    ck.restore_optimizer(opt2)
    ck.restore_scheduler(sched2)
    resumed = fit(
        model2,
        CrossEntropyLoss(),
        opt2,
        x,
        y,
        epochs=4,
        batch_size=16,
        val_data=(xv, yv),
        scheduler=sched2,
        progress=False,
        checkpoint=path,
        **kwargs,
    )
    got = weights(model2)
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(got[k], expected[k]), k  # bitwise
    a, b = full.as_dict(), resumed.as_dict()
    for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        assert a[key] == b[key], key
    assert checkpoint.load(path).epoch == 4

    # without the stored state, start_epoch alone replays the shuffling from the seed
    model3 = checkpoint.load(path).model  # weights irrelevant here: compare the batch order
    rec_a, rec_b = Recorder(), Recorder()
    m = small_cnn()
    fit(
        m, rec_a, SGD(m.parameters(), lr=0.0), x, y, epochs=3, batch_size=16, seed=3, progress=False
    )
    fit(
        model3,
        rec_b,
        SGD(model3.parameters(), lr=0.0),
        x,
        y,
        epochs=3,
        batch_size=16,
        seed=3,
        start_epoch=2,
        history=History.from_dict({k: v[:2] for k, v in a.items()}),
        progress=False,
    )
    tail = rec_a.batches[-len(rec_b.batches) :]
    assert all(np.array_equal(p, q) for p, q in zip(tail, rec_b.batches, strict=True))


# --------------------------------------------------------------------------------------------
# divergence


def test_injected_nan_names_epoch_and_batch_and_keeps_the_checkpoint(tmp_path):
    x, y = blobs(100)  # batch 32 -> 4 batches per epoch (the last of 4)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.05)
    path = tmp_path / "ck.safetensors"
    fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=1,
        batch_size=32,
        checkpoint=path,
        progress=False,
    )
    good = sha(path)
    before = weights(model)
    rec = Recorder(nan_at=6)  # calls 1-4 are epoch 2, call 5 is epoch 3 batch 1, call 6 batch 2
    with pytest.raises(TrainingDiverged, match=r"epoch 3, batch 2 of 4") as info:
        fit(
            model,
            rec,
            opt,
            x,
            y,
            epochs=5,
            batch_size=32,
            checkpoint=path,
            progress=False,
            start_epoch=1,
            history=resume_kwargs(checkpoint.load(path))["history"],
        )
    assert isinstance(info.value, RuntimeError)
    assert (info.value.epoch, info.value.batch) == (3, 2)
    assert "nan" in str(info.value).lower()
    # the checkpoint of epoch 2 was written, then nothing more; the NaN step was never applied
    ck = checkpoint.load(path)
    assert ck.epoch == 2 and sha(path) != good
    assert all(np.isfinite(v).all() for v in weights(model).values())
    assert any(not np.array_equal(before[k], v) for k, v in weights(model).items())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_bad_label_anywhere_is_refused_before_the_first_step():
    """The last label out of range and an inf in the first batch: the labels are refused at
    once (naming the loss), not after training up to them or reporting a divergence."""
    x, y = blobs(100)
    y = y.copy()
    y[-1] = 7
    x = x.copy()
    x[:, 0] = np.inf
    model = mlp()
    before = weights(model)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: expected labels in \[0, 3\)"):
        fit(
            model,
            CrossEntropyLoss(),
            SGD(model.parameters(), lr=0.05),
            x,
            y,
            epochs=1,
            batch_size=32,
            progress=False,
        )
    assert all(np.array_equal(before[k], v) for k, v in weights(model).items())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_diverges_without_overwriting_the_last_good_checkpoint(tmp_path):
    x, y = blobs(200)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.05)
    path = tmp_path / "ck.safetensors"
    fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=1,
        batch_size=20,
        checkpoint=path,
        progress=False,
    )
    good = sha(path)
    opt.lr = 1e6
    with pytest.raises(
        TrainingDiverged, match=r"training diverged at epoch \d+, batch \d+ of 10"
    ) as info:
        fit(
            model,
            CrossEntropyLoss(),
            opt,
            x,
            y,
            epochs=50,
            batch_size=20,
            checkpoint=path,
            progress=False,
            start_epoch=1,
            history=resume_kwargs(checkpoint.load(path))["history"],
        )
    e = info.value
    assert e.epoch >= 2 and 1 <= e.batch <= 10
    if e.epoch == 2:  # diverged within the first epoch at lr 1e6: the epoch-1 file is untouched
        assert sha(path) == good
    assert checkpoint.load(path).epoch == e.epoch - 1


# --------------------------------------------------------------------------------------------
# validation of arguments


def test_fit_rejects_bad_arguments():
    x, y = blobs(20)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    loss = CrossEntropyLoss()
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, loss, opt, x, y, epochs=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="labels of shape"):
        fit(model, loss, opt, x, y[:10], epochs=1, progress=False)
    with pytest.raises(TypeError, match="floating"):
        fit(model, loss, opt, x.astype(np.int32), y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="start_epoch"):
        fit(model, loss, opt, x, y, epochs=1, start_epoch=2, progress=False)
    with pytest.raises(ValueError, match="val_data"):
        fit(model, loss, opt, x, y, epochs=1, val_data=x, progress=False)


# --------------------------------------------------------------------------------------------
# threads


def _blas_threads():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_threads_context_sets_and_restores_the_count():
    start = numba.get_num_threads()
    with threads.threads(1) as n:
        assert n == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == start
    with pytest.raises(KeyError):
        with threads.threads(1):
            raise KeyError("boom")
    assert numba.get_num_threads() == start
    with threads.threads(None):
        assert numba.get_num_threads() == start


def test_set_num_threads_validates():
    start = numba.get_num_threads()
    try:
        threads.set_num_threads(1)
        assert numba.get_num_threads() == 1
        for bad in (0, -1, numba.config.NUMBA_NUM_THREADS + 1):
            with pytest.raises(
                ValueError, match=rf"between 1 and {numba.config.NUMBA_NUM_THREADS}"
            ):
                threads.set_num_threads(bad)
        for bad in (1.5, "2", True):
            with pytest.raises(TypeError):
                threads.set_num_threads(bad)
        with pytest.raises(ValueError):
            with threads.threads(0):
                pass
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(start)


def test_blas_is_limited_while_fitting_and_restored_afterwards():
    before = _blas_threads()
    assert before  # numpy's OpenBLAS is visible to threadpoolctl
    seen = []

    class Spy(CrossEntropyLoss):
        def __call__(self, logits, y):
            seen.append((numba.get_num_threads(), _blas_threads()))
            return super().__call__(logits, y)

    x, y = blobs(20)
    model = mlp()
    fit(
        model,
        Spy(),
        SGD(model.parameters(), lr=0.1),
        x,
        y,
        epochs=1,
        batch_size=10,
        threads=1,
        progress=False,
    )
    assert seen and all(n == 1 for n, _ in seen)
    assert all(b == [threads.BLAS_THREADS_DURING_COMPUTE] * len(b) for _, b in seen)
    assert _blas_threads() == before
    with threads.blas_limits(1):
        assert _blas_threads() == [1] * len(before)
    assert _blas_threads() == before


def test_progress_bar_runs(capsys):
    x, y = blobs(50)
    model = mlp()
    fit(
        model,
        CrossEntropyLoss(),
        SGD(model.parameters(), lr=0.1),
        x,
        y,
        epochs=2,
        batch_size=8,
        progress=True,
        verbose=True,
    )
    out, err = capsys.readouterr()
    assert out.count("images/s") == 2 and "epoch 2/2" in out
    assert "epoch 1/2" in err  # the tqdm bar


# --------------------------------------------------------------------------------------------
# THE CI ACCURACY TEST: the reference network learns real MNIST


@pytest.mark.slow
@pytest.mark.skipif(data_dir() is None, reason="MNIST not available (set FASTCNN_DATA)")
def test_reference_network_learns_mnist():
    """One epoch of SGD (lr 0.05, momentum 0.9, batch 64) on the first 12,000 MNIST training
    images, evaluated on the first 2,000 test images.

    Measured (seed 0, 2 threads, ~3 s): every layer trained
    95.05% (loss 0.156). The same run training only some layers, the others left at their random
    initialisation, i.e. what a backward pass that fails to reach them could learn at best:
    conv1 frozen 92.20% (loss 0.231), both convolutions frozen 87.25% (0.396); earlier, only the
    last Dense layer 57.50% (2.004), only the biases 11.70% (2.288). The bar (>= 93% and loss
    <= 0.20) needs gradients through every layer.
    """
    from fastcnn import datasets, models

    (x_train, y_train), (x_test, y_test) = datasets.mnist(root=data_dir(), download=False)
    model = models.reference(seed=0)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    t = time.perf_counter()
    h = fit(
        model,
        CrossEntropyLoss(),
        opt,
        x_train[:12000],
        y_train[:12000],
        epochs=1,
        batch_size=64,
        seed=0,
        progress=False,
    )
    loss, acc = evaluate(model, x_test[:2000], y_test[:2000])
    seconds = time.perf_counter() - t
    assert h.train_loss[0] < 1.0
    assert acc >= 0.93 and loss <= 0.20, (acc, loss, seconds)
