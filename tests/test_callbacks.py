"""fit's callbacks: the hooks and their order, stopping, EarlyStopping, ReduceLROnPlateau,
ModelCheckpoint, CSVLogger, and their state across a checkpointed resume."""

import csv
import math

import numpy as np
import pytest

from fastcnn import checkpoint
from fastcnn.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    ReduceLROnPlateau,
)
from fastcnn.losses import CrossEntropyLoss
from fastcnn.optim import SGD, StepLR
from fastcnn.training import fit, resume_kwargs
from test_training import blobs, mlp, weights


class Recording(Callback):
    def __init__(self, stop_at=None):
        self.events = []
        self.stop_at = stop_at  # ("batch"|"epoch", epoch, batch)
        self.epoch = None

    def on_train_begin(self, logs):
        self.events.append(("train_begin",))

    def on_train_end(self, logs):
        self.events.append(("train_end", dict(logs)))

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch
        self.events.append(("epoch_begin", epoch, dict(logs)))

    def on_epoch_end(self, epoch, logs):
        self.events.append(("epoch_end", epoch, dict(logs)))
        if self.stop_at == ("epoch", epoch):
            self.model.stop_training = True

    def on_batch_begin(self, batch, logs):
        self.events.append(("batch_begin", batch, dict(logs)))

    def on_batch_end(self, batch, logs):
        self.events.append(("batch_end", batch, dict(logs)))
        if self.stop_at == ("batch", self.epoch, batch):
            self.model.stop_training = True


def run(model, callbacks, epochs=3, lr=0.1, val=True, **kw):
    x, y = blobs(96)
    opt = kw.pop("opt", None) or SGD(model.parameters(), lr=lr, momentum=0.9)
    return fit(
        model,
        CrossEntropyLoss(),
        opt,
        x,
        y,
        epochs=epochs,
        batch_size=32,
        val_data=(x[:48], y[:48]) if val else None,
        progress=False,
        callbacks=callbacks,
        **kw,
    )


def test_hooks_run_in_order_with_the_logs_of_the_history():
    rec = Recording()
    h = run(mlp(), [rec], epochs=2)
    kinds = [e[0] for e in rec.events]
    per_epoch = ["epoch_begin"] + ["batch_begin", "batch_end"] * 3 + ["epoch_end"]
    assert kinds == ["train_begin"] + per_epoch * 2 + ["train_end"]
    ends = [e for e in rec.events if e[0] == "epoch_end"]
    for (_, epoch, logs), i in zip(ends, range(2), strict=True):
        assert epoch == i  # 0-based, as Keras
        assert logs["loss"] == logs["train_loss"] == h.train_loss[i]
        assert logs["accuracy"] == h.train_accuracy[i]
        assert logs["val_loss"] == h.val_loss[i] and "epoch" not in logs
    batches = [e for e in rec.events if e[0] == "batch_end"]
    assert [b[1] for b in batches] == [0, 1, 2] * 2
    assert sum(b[2]["size"] for b in batches[:3]) == 96
    # the epoch's loss is the size-weighted mean of its batches' losses
    mean = sum(b[2]["loss"] * b[2]["size"] for b in batches[:3]) / 96
    assert math.isclose(mean, h.train_loss[0], rel_tol=1e-12)
    assert all(0 <= b[2]["accuracy"] <= 1 and b[2]["lr"] == 0.1 for b in batches)
    assert rec.params["num_batches"] == 3 and rec.params["has_validation"]
    assert rec.history is h and rec.events[-1][1]["loss"] == h.train_loss[-1]


def test_stop_at_the_end_of_an_epoch_records_that_epoch(tmp_path):
    path = tmp_path / "run.safetensors"
    rec = Recording(stop_at=("epoch", 1))
    h = run(mlp(), [rec], epochs=5, checkpoint=path)
    assert len(h) == 2 and checkpoint.load(path).epoch == 2
    assert rec.events[-1][0] == "train_end"


def test_stop_during_an_epoch_drops_the_partial_epoch(tmp_path):
    path = tmp_path / "run.safetensors"
    rec = Recording(stop_at=("batch", 1, 0))  # the first batch of the second epoch
    model = mlp()
    h = run(model, [rec], epochs=5, checkpoint=path)
    assert len(h) == 1 and checkpoint.load(path).epoch == 1
    kinds = [e[0] for e in rec.events]
    assert kinds[-3:] == ["batch_begin", "batch_end", "train_end"]
    # the model holds the weights after that batch, the checkpoint those of epoch 1
    saved = checkpoint.load(path).model.state_dict()
    assert any(not np.array_equal(saved[k], v) for k, v in model.state_dict().items())


def test_callbacks_are_checked_before_training():
    model = mlp()
    before = weights(model)
    with pytest.raises(TypeError, match="fastcnn.callbacks.Callback"):
        run(model, [object()])
    with pytest.raises(ValueError, match="needs validation data"):
        run(model, [EarlyStopping("val_loss")], val=False)
    with pytest.raises(ValueError, match="cannot monitor 'val_los'"):
        run(model, [EarlyStopping("val_los")])
    with pytest.raises(ValueError, match="scheduler"):
        opt = SGD(model.parameters(), lr=0.1)
        run(model, [ReduceLROnPlateau()], opt=opt, scheduler=StepLR(opt, 1))
    with pytest.raises(FileNotFoundError, match="CSV log"):
        run(model, [CSVLogger("/nonexistent-folder/log.csv")])
    with pytest.raises(ValueError, match="twice"):
        cb = Recording()
        run(model, [cb, cb])
    assert all(np.array_equal(v, weights(model)[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EarlyStopping(patience=-1), "patience"),
        (lambda: EarlyStopping(mode="up"), "mode"),
        (lambda: EarlyStopping(min_delta=float("nan")), "min_delta"),
        (lambda: EarlyStopping(monitor=3), "monitor"),
        (lambda: ReduceLROnPlateau(factor=1.0), "factor"),
        (lambda: ReduceLROnPlateau(cooldown=1.5), "cooldown"),
        (lambda: ReduceLROnPlateau(min_lr=-1), "min_lr"),
        (lambda: ModelCheckpoint(""), "file name"),
        (lambda: CSVLogger("log.csv", separator="ab"), "separator"),
    ],
)
def test_bad_arguments_name_the_callback(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


# --------------------------------------------------------------------------------------------
# EarlyStopping


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # lr 0: the validation loss never changes, so only the first epoch improves
    stop = EarlyStopping(patience=2)
    h = run(mlp(), [stop], epochs=10, lr=0.0)
    assert len(h) == 3 and stop.stopped_epoch == 2 and stop.best_epoch == 0
    assert stop.best == h.val_loss[0]
    stop0 = EarlyStopping(patience=0)
    assert len(run(mlp(), [stop0], epochs=10, lr=0.0)) == 2


def test_early_stopping_does_not_stop_while_improving():
    stop = EarlyStopping(monitor="train_loss", patience=0)
    h = run(mlp(), [stop], epochs=4, lr=0.05)
    assert all(b < a for a, b in zip(h.train_loss, h.train_loss[1:], strict=False))
    assert len(h) == 4 and stop.stopped_epoch is None


class FakeModel:
    """state_dict / load_state_dict over one array, and the stop flag."""

    def __init__(self):
        self.w = np.zeros(3)
        self.stop_training = False

    def state_dict(self):
        return {"w": self.w.copy()}

    def load_state_dict(self, state):
        self.w[...] = state["w"]


def drive(cb, values, monitor="val_loss", model=None, optimizer=None):
    """Run cb's epoch hooks on a list of monitored values; returns the epochs it ran."""
    model = model or FakeModel()
    cb.set_context(model, optimizer, None, None, {"has_validation": True})
    cb.on_train_begin({})
    ran = 0
    for epoch, value in enumerate(values):
        model.w[...] = epoch  # the "weights" of each epoch
        cb.on_epoch_end(epoch, {monitor: value})
        ran += 1
        if model.stop_training:
            break
    cb.on_train_end({})
    return model, ran


def test_early_stopping_modes_min_delta_and_restore_best_weights():
    model, ran = drive(EarlyStopping(patience=2, restore_best_weights=True), [3, 1, 2, 1.5, 0.5])
    assert ran == 4 and model.w[0] == 1  # best at epoch 1, restored at the end
    # min_delta: 0.95 is not better than 1 by more than 0.1
    _, ran = drive(EarlyStopping(patience=1, min_delta=0.1), [1, 0.95, 0.5])
    assert ran == 2
    # auto mode maximises accuracies
    cb = EarlyStopping(monitor="val_accuracy", patience=1)
    _, ran = drive(cb, [0.5, 0.6, 0.55], monitor="val_accuracy")
    assert ran == 3 and cb.best == 0.6 and cb.mode == "max"
    # a NaN never improves
    _, ran = drive(EarlyStopping(patience=1), [1.0, float("nan")])
    assert ran == 2


def test_early_stopping_state_comes_back_on_resume(tmp_path):
    path = tmp_path / "run.safetensors"
    stop = EarlyStopping(patience=3)
    run(mlp(), [stop], epochs=2, lr=0.0, checkpoint=path)  # epoch 1 best, epoch 2 waits 1
    ck = checkpoint.load(path)
    kw = resume_kwargs(ck)
    assert kw["callback_states"] == [
        {
            "class": "EarlyStopping",
            "state": {"best": stop.best, "best_epoch": 0, "wait": 1, "stopped_epoch": None},
        }
    ]
    model = ck.model
    opt = ck.restore_optimizer(SGD(model.parameters(), lr=0.0, momentum=0.9))
    resumed = EarlyStopping(patience=3)
    h = run(model, [resumed], epochs=10, lr=0.0, opt=opt, **kw)
    assert len(h) == 4  # waits 2 and 3 at epochs 3 and 4: as the run never interrupted
    uninterrupted = run(mlp(), [EarlyStopping(patience=3)], epochs=10, lr=0.0)
    assert len(uninterrupted) == 4
    # resuming without the callback whose state was saved is refused
    with pytest.raises(ValueError, match="same callbacks"):
        run(ck.model, [], epochs=10, lr=0.0, **resume_kwargs(checkpoint.load(path)))


def test_restore_best_weights_after_a_resume_past_the_best_warns(tmp_path):
    path = tmp_path / "run.safetensors"
    run(mlp(), [EarlyStopping(patience=5, restore_best_weights=True)], 2, 0.0, checkpoint=path)
    ck = checkpoint.load(path)
    stop = EarlyStopping(patience=5, restore_best_weights=True)
    with pytest.warns(RuntimeWarning, match="came before the run was resumed"):
        run(ck.model, [stop], epochs=3, lr=0.0, **resume_kwargs(ck))


# --------------------------------------------------------------------------------------------
# ReduceLROnPlateau


def test_reduce_lr_on_plateau_factor_patience_cooldown_min_lr():
    model = mlp()
    opt = SGD(model.parameters(), lr=1.0)
    cb = ReduceLROnPlateau(factor=0.5, patience=2, cooldown=1, min_lr=0.2)
    lrs = []
    cb.set_context(FakeModel(), opt, None, None, {"has_validation": True})
    cb.on_train_begin({})
    for epoch, value in enumerate([1, 1, 1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 1]):
        cb.on_epoch_end(epoch, {"val_loss": value})
        lrs.append(opt.lr)
    # waits 1, 2 -> 0.5 and a cooldown of 1 epoch (which resets the wait); waits 1, 2 -> 0.25;
    # waits 1, 2 -> 0.2 (min_lr, not 0.125); an improvement; waits 1, 2: at min_lr, stays
    assert lrs == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]


def test_reduce_lr_on_plateau_in_fit_and_its_state_on_resume(tmp_path):
    path = tmp_path / "run.safetensors"
    cb = ReduceLROnPlateau(patience=1, factor=0.5)
    h = run(mlp(), [cb], epochs=4, lr=0.0, checkpoint=path)
    assert h.lr == [0.0] * 4  # 0 * 0.5: nothing to reduce, but the counters ran
    ck = checkpoint.load(path)
    assert resume_kwargs(ck)["callback_states"][0]["class"] == "ReduceLROnPlateau"
    x, y = blobs(96)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    cb = ReduceLROnPlateau(monitor="train_loss", mode="max", patience=0, factor=0.5)
    h = fit(model, CrossEntropyLoss(), opt, x, y, epochs=3, progress=False, callbacks=[cb])
    assert h.train_loss[1] < h.train_loss[0]  # which 'max' reads as no improvement:
    assert h.lr == [0.1, 0.1, 0.05]  # reduced at the end of the second epoch


# --------------------------------------------------------------------------------------------
# ModelCheckpoint and CSVLogger


def test_model_checkpoint_every_epoch_with_a_formatted_path(tmp_path):
    model = mlp()
    pattern = str(tmp_path / "run-{epoch:02d}-{train_loss:.3f}.safetensors")
    cb = ModelCheckpoint(pattern, monitor="train_loss")
    h = run(model, [cb], epochs=2)
    for i in range(2):
        path = tmp_path / f"run-{i + 1:02d}-{h.train_loss[i]:.3f}.safetensors"
        ck = checkpoint.load(path)
        assert ck.epoch == i + 1
        assert ck.extra["model_checkpoint"] == {"monitor": "train_loss", "value": h.train_loss[i]}
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in ck.model.state_dict().items())
    with pytest.raises(ValueError, match="cannot fill in"):
        run(mlp(), [ModelCheckpoint(str(tmp_path / "{nope}.safetensors"))])


def test_model_checkpoint_save_best_only(tmp_path):
    path = tmp_path / "best.safetensors"
    cb = ModelCheckpoint(path, save_best_only=True)
    model = mlp()
    h = run(model, [cb], epochs=3, lr=0.0)  # the validation loss never improves after epoch 1
    assert checkpoint.load(path).epoch == 1 and cb.best == h.val_loss[0]
    cb = ModelCheckpoint(path, monitor="val_accuracy", save_best_only=True)
    cb.set_context(mlp(), None, None, None, {"has_validation": True})
    cb.on_train_begin({})
    for epoch, value in enumerate([0.5, 0.7, 0.6]):
        cb.on_epoch_end(epoch, {"val_accuracy": value})
    saved = checkpoint.load(path)
    assert saved.epoch == 2 and saved.extra["model_checkpoint"]["value"] == 0.7


def test_csv_logger_writes_the_history_and_continues_on_resume(tmp_path):
    log = tmp_path / "log.csv"
    path = tmp_path / "run.safetensors"
    run(mlp(), [CSVLogger(log)], epochs=2, checkpoint=path)
    ck = checkpoint.load(path)
    opt = ck.restore_optimizer(SGD(ck.model.parameters(), lr=0.1, momentum=0.9))
    h = run(ck.model, [CSVLogger(log)], epochs=3, opt=opt, **resume_kwargs(ck))
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in rows] == h.train_loss
    assert [float(r["val_accuracy"]) for r in rows] == h.val_accuracy
    no_val = tmp_path / "noval.csv"
    run(mlp(), [CSVLogger(no_val, separator=";")], epochs=1, val=False)
    header, row = no_val.read_text().splitlines()
    assert header.split(";")[3] == "val_loss" and row.split(";")[3] == ""


def test_model_checkpoint_best_survives_a_resume(tmp_path):
    best, path = tmp_path / "best.safetensors", tmp_path / "run.safetensors"
    run(mlp(), [ModelCheckpoint(best, save_best_only=True)], 2, 0.0, checkpoint=path)
    saved_best = best.read_bytes()
    ck = checkpoint.load(path)
    kw = resume_kwargs(ck)
    assert kw["callback_states"][0]["class"] == "ModelCheckpoint"
    cb = ModelCheckpoint(best, save_best_only=True)
    run(ck.model, [cb], epochs=3, lr=0.0, **kw)  # epoch 3 is no better than epoch 1
    assert best.read_bytes() == saved_best and cb.best == kw["callback_states"][0]["state"]["best"]


def test_callbacks_with_a_data_loader(tmp_path):
    import fastcnn

    x, y = blobs(96)
    loader = fastcnn.DataLoader(fastcnn.ArrayDataset(x, y), batch_size=32, shuffle=True, seed=0)
    rec, stop = Recording(), EarlyStopping(monitor="train_loss", mode="max", patience=1)
    model = mlp()
    h = fit(
        model,
        CrossEntropyLoss(),
        SGD(model.parameters(), lr=0.1),
        loader,
        epochs=6,
        progress=False,
        callbacks=[rec, stop],
    )
    assert len(h) == 2 and stop.stopped_epoch == 1  # the loss falls: 'max' sees no improvement
    assert rec.params["batch_size"] == 32 and rec.params["input_shape"] == (4,)
    assert sum(e[2]["size"] for e in rec.events if e[0] == "batch_end") == 2 * 96
