"""LinearWarmup: its closed form alone and in front of per-epoch and per-batch schedulers, its
state across a checkpoint, a bitwise resume inside fit, and its argument checks."""

import json
import math

import numpy as np
import pytest

from fastcnn import checkpoint
from fastcnn.losses import CrossEntropyLoss
from fastcnn.optim import SGD, CosineAnnealingLR, LinearWarmup, OneCycleLR, StepLR
from fastcnn.training import fit, resume_kwargs
from test_training import blobs, mlp, weights


def opt(lr=0.1):
    return SGD(mlp().parameters(), lr=lr, momentum=0.9)


def lrs(sched, steps):
    out = [sched.optimizer.lr]
    for _ in range(steps):
        sched.step()
        out.append(sched.optimizer.lr)
    return out


def factor(t, warmup, start):
    return start + (1 - start) * min(t, warmup) / warmup


def test_warmup_alone_rises_linearly_then_holds():
    o = opt(0.2)
    got = lrs(LinearWarmup(o, warmup_steps=4), 6)
    assert got == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2], abs=1e-15)
    o = opt(0.2)
    got = lrs(LinearWarmup(o, warmup_steps=4, start_factor=0.5), 5)
    assert got == pytest.approx([0.2 * factor(t, 4, 0.5) for t in range(6)], abs=1e-15)


def test_warmup_in_front_of_a_per_epoch_scheduler_counts_epochs_from_the_start():
    o = opt(0.1)
    cosine = CosineAnnealingLR(o, T_max=3)
    sched = LinearWarmup(o, warmup_steps=5, after=cosine, steps_per_epoch=4)
    got = lrs(sched, 12)
    expected = [
        factor(t, 5, 0.0) * (1 + math.cos(math.pi * (t // 4) / 3)) / 2 * 0.1 for t in range(13)
    ]
    assert got == pytest.approx(expected, abs=1e-15)
    assert cosine.last_epoch == 3


def test_warmup_in_front_of_a_per_batch_scheduler_steps_it_every_batch():
    o = opt(0.1)
    one = OneCycleLR(SGD(mlp().parameters(), lr=0.1, momentum=0.9), max_lr=0.1, total_steps=10)
    reference = lrs(one, 9)
    o = opt(0.1)
    sched = LinearWarmup(o, warmup_steps=3, after=OneCycleLR(o, max_lr=0.1, total_steps=10))
    got = lrs(sched, 9)
    assert got == pytest.approx([factor(t, 3, 0) * r for t, r in enumerate(reference)], abs=1e-15)


def test_state_dict_round_trip_continues_the_same_schedule():
    def make():
        o = opt(0.1)
        return LinearWarmup(o, 6, after=StepLR(o, step_size=1, gamma=0.5), steps_per_epoch=3)

    straight = make()
    expected = lrs(straight, 10)
    first = make()
    lrs(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = make()
    second.load_state_dict(state)
    assert lrs(second, 6) == expected[4:]
    assert first.after.last_epoch == 1 and second.after.last_epoch == straight.after.last_epoch
    plain = LinearWarmup(opt(), 3)
    with pytest.raises(ValueError, match="with an after scheduler"):
        plain.load_state_dict(state)


def test_fit_resume_with_warmup_is_bitwise(tmp_path):
    x, y = blobs(96)
    loss = CrossEntropyLoss()

    def run(model, path=None, epochs=3):
        o = SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = LinearWarmup(o, 4, after=CosineAnnealingLR(o, T_max=3), steps_per_epoch=3)
        kw = dict(epochs=epochs, batch_size=32, scheduler=sched, checkpoint=path, progress=False)
        return o, sched, kw

    model = mlp()
    o, _, kw = run(model)
    full = fit(model, loss, o, x, y, **kw)
    expected = weights(model)
    path = tmp_path / "run.safetensors"
    model = mlp()
    o, _, kw = run(model, path, epochs=1)
    fit(model, loss, o, x, y, **kw)
    ck = checkpoint.load(path)
    o, sched, kw = run(ck.model)
    ck.restore_optimizer(o)
    ck.restore_scheduler(sched)
    kw.update(resume_kwargs(ck))
    resumed = fit(ck.model, loss, o, x, y, **kw)
    assert resumed.lr == full.lr and resumed.train_loss == full.train_loss
    assert all(np.array_equal(v, expected[k]) for k, v in weights(ck.model).items())
    assert sched.last_epoch == 9 and sched.after.last_epoch == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"warmup_steps": 0}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, ValueError, "warmup_steps"),
        ({"warmup_steps": 3, "start_factor": 1.5}, ValueError, "start_factor"),
        ({"warmup_steps": 3, "steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
        ({"warmup_steps": 3, "after": "cosine"}, TypeError, "after"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LinearWarmup(opt(), **kwargs)


def test_after_must_share_the_optimizer_and_say_its_cadence():
    o = opt()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        LinearWarmup(o, 3, after=CosineAnnealingLR(o, T_max=2))
    with pytest.raises(ValueError, match="another optimizer"):
        LinearWarmup(o, 3, after=CosineAnnealingLR(opt(), T_max=2), steps_per_epoch=2)
    assert LinearWarmup.per_batch and "LinearWarmup(warmup_steps=3" in repr(LinearWarmup(o, 3))
