"""clip_grad_norm_: the total norm and the scaling against numpy's norms, PyTorch's results
when installed, the argument checks, and fit(clip_grad_norm=...)."""

import math

import numpy as np
import pytest

import fastcnn
from fastcnn.callbacks import Callback
from fastcnn.losses import CrossEntropyLoss
from fastcnn.module import Parameter
from fastcnn.optim import SGD
from fastcnn.training import TrainingDiverged, fit
from test_training import blobs, mlp, weights


def params(seed=0, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for shape in [(3, 4), (5,), (2, 3, 3)]:
        p = Parameter(np.zeros(shape, dtype))
        p.grad = (rng.standard_normal(shape) * scale).astype(dtype)
        out.append(p)
    return out


def flat(ps):
    return np.concatenate([p.grad.astype(np.float64).ravel() for p in ps])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_total_norm_and_scaling_match_numpy(norm_type, max_norm):
    ps = params()
    before = flat(ps)
    expected = float(np.linalg.norm(before, norm_type))
    total = fastcnn.clip_grad_norm_(ps, max_norm, norm_type=norm_type)
    assert total == pytest.approx(expected, rel=1e-6)
    after = flat(ps)
    if expected > max_norm:
        np.testing.assert_allclose(after, before * max_norm / (expected + 1e-6), rtol=1e-6)
        assert np.linalg.norm(after, norm_type) <= max_norm * (1 + 1e-6)
    else:
        assert np.array_equal(after, before)  # untouched, not multiplied by ~1


def test_matches_torch():
    torch = pytest.importorskip("torch")
    ps = params(1, scale=3.0)
    tps = [torch.nn.Parameter(torch.zeros(p.shape)) for p in ps]
    for p, t in zip(ps, tps, strict=True):
        t.grad = torch.tensor(p.grad.copy())
    expected = float(torch.nn.utils.clip_grad_norm_(tps, 2.0))
    assert fastcnn.clip_grad_norm_(ps, 2.0) == pytest.approx(expected, rel=1e-6)
    for p, t in zip(ps, tps, strict=True):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_accepts_a_module_and_one_parameter_and_skips_missing_gradients():
    model = mlp()
    for p in model.parameters():
        p.grad[...] = 1.0
    n = sum(p.size for p in model.parameters())
    assert fastcnn.clip_grad_norm_(model, 1.0) == pytest.approx(math.sqrt(n), rel=1e-6)
    assert fastcnn.clip.grad_norm(model) == pytest.approx(1.0, rel=1e-5)
    one = params()[0]
    assert fastcnn.clip_grad_norm_(one, 100.0) == pytest.approx(np.linalg.norm(one.grad))
    ps = params()
    ps[1].grad = None
    assert fastcnn.clip_grad_norm_(ps, 1e9) == pytest.approx(
        math.hypot(np.linalg.norm(ps[0].grad), np.linalg.norm(ps[2].grad)), rel=1e-6
    )
    assert fastcnn.clip_grad_norm_([], 1.0) == 0.0


def test_non_finite_norms():
    ps = params()
    ps[0].grad[0, 0] = np.inf
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        fastcnn.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert fastcnn.clip_grad_norm_(ps, 1.0) == math.inf  # scaled by 0, as PyTorch


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((params(), -1.0), ValueError, "max_norm"),
        ((params(), float("nan")), ValueError, "max_norm"),
        ((params(), 1.0, 0.5), ValueError, "norm_type"),
        ((np.zeros(3), 1.0), TypeError, "parameters"),
        (([np.zeros(3)], 1.0), TypeError, "grad"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=f"clip_grad_norm_: .*{match}"):
        fastcnn.clip_grad_norm_(*args)


class Norms(Callback):
    def __init__(self):
        self.norms = []

    def on_batch_end(self, batch, logs):
        self.norms.append(logs["grad_norm"])


def test_fit_clips_every_step():
    x, y = blobs(64)
    # one batch per epoch, plain SGD lr 1: each step moves the weights by exactly the clipped
    # gradient, whose norm is max_norm
    model = mlp()
    before = weights(model)
    norms = Norms()
    fit(
        model,
        CrossEntropyLoss(),
        SGD(model.parameters(), lr=1.0),
        x,
        y,
        epochs=1,
        batch_size=64,
        progress=False,
        clip_grad_norm=0.01,
        callbacks=[norms],
    )
    moved = math.sqrt(sum(float(np.sum((v - before[k]) ** 2)) for k, v in weights(model).items()))
    assert moved == pytest.approx(0.01, rel=1e-4) and norms.norms[0] > 0.01
    # a bound it never reaches changes nothing, bitwise
    runs = []
    for clip in (None, 1e9):
        model = mlp()
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        fit(model, CrossEntropyLoss(), opt, x, y, epochs=2, progress=False, clip_grad_norm=clip)
        runs.append(weights(model))
    assert all(np.array_equal(v, runs[1][k]) for k, v in runs[0].items())


def test_fit_checks_clip_grad_norm_and_stops_on_an_infinite_norm(monkeypatch):
    x, y = blobs(64)
    model = mlp()
    opt = SGD(model.parameters(), lr=0.1)
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="clip_grad_norm"):
            fit(model, CrossEntropyLoss(), opt, x, y, epochs=1, progress=False, clip_grad_norm=bad)
    import fastcnn.training as training

    monkeypatch.setattr(training, "clip_grad_norm_", lambda params, max_norm: math.inf)
    before = weights(model)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        fit(model, CrossEntropyLoss(), opt, x, y, epochs=1, progress=False, clip_grad_norm=1.0)
    assert all(np.array_equal(v, before[k]) for k, v in weights(model).items())
