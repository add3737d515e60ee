"""What fit prints (a line per epoch off a terminal, no bar frames in a file), the one message
on a cold kernel cache, and fastcnn.warmup, which compiles without changing anything."""

import io
import re
import subprocess
import sys

import numpy as np
import pytest

import fastcnn
from fastcnn import compile_ahead
from fastcnn.losses import CrossEntropyLoss
from fastcnn.optim import SGD, Adam
from fastcnn.training import fit, format_epoch
from test_training import blobs, mlp, weights

EPOCH_LINE = re.compile(r"^epoch \d+/\d+  loss \d+\.\d{4}  accuracy \d+\.\d\d%")


def train(model=None, **kw):
    x, y = blobs(64)
    model = model or mlp()
    return fit(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1), x, y, epochs=2, **kw)


@pytest.fixture
def warm(monkeypatch):
    """The cache counts as already checked (no message, no warm-up) unless a test says."""
    monkeypatch.setitem(compile_ahead._STATE, "checked", True)


def test_off_a_terminal_fit_prints_one_line_per_epoch_and_no_bar(capsys, warm):
    h = train()  # progress=None, verbose=None; pytest's stderr is not a terminal
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and all(EPOCH_LINE.match(line) for line in lines)
    assert lines[1] == format_epoch(h.last(), 2)  # what fastcnn train prints
    assert err == "" and "\r" not in out


def test_progress_false_is_silent_and_verbose_true_prints(capsys, warm):
    train(progress=False)
    assert capsys.readouterr() == ("", "")
    train(progress=False, verbose=True)
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and err == ""


@pytest.mark.slow
def test_in_a_log_file_from_a_subprocess_there_are_lines_and_no_frames(tmp_path):
    code = (
        "import numpy as np, fastcnn\n"
        "from test_training import blobs, mlp\n"
        "x, y = blobs(64); m = mlp()\n"
        "fastcnn.fit(m, fastcnn.CrossEntropyLoss(), fastcnn.SGD(m.parameters(), lr=0.1), x, y,"
        " epochs=3)\n"
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run(
            [sys.executable, "-c", code],
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
            cwd=str(tmp_path),
            env={**_env(), "FASTCNN_NO_PRECOMPILE": "1"},
            timeout=300,
        )
    text = log.read_text()
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and all(EPOCH_LINE.match(line) for line in epochs)


def _env():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, tests])}


def test_a_cold_cache_is_announced_once_and_changes_no_result(capsys, monkeypatch):
    from fastcnn import precompile

    expected = train(progress=False)  # (the cache state of this machine: whatever it is)
    calls = []
    monkeypatch.setitem(compile_ahead._STATE, "checked", False)
    monkeypatch.setattr(precompile, "cache_is_cold", lambda: True)
    real_warmup = compile_ahead.warmup

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real_warmup(*args, **kwargs)

    monkeypatch.setattr(compile_ahead, "warmup", spy)
    model = mlp()
    first = train(model)
    reference = mlp()
    train(reference, progress=False)
    train()
    out, err = capsys.readouterr()
    assert err.count(compile_ahead.MESSAGE) == 1 and compile_ahead.MESSAGE not in out
    assert calls == [(4,)]  # warmed up once, with the training images' shape
    assert first.train_loss == expected.train_loss  # the warm-up changed nothing
    assert all(np.array_equal(v, weights(reference)[k]) for k, v in weights(model).items())


def test_a_silent_fit_on_a_cold_cache_says_nothing(capsys, monkeypatch):
    from fastcnn import precompile

    monkeypatch.setitem(compile_ahead._STATE, "checked", False)
    monkeypatch.setattr(precompile, "cache_is_cold", lambda: True)
    train(progress=False)
    assert capsys.readouterr() == ("", "")
    assert compile_ahead.announce_if_cold() is False  # once per process, whatever it found


def net():
    rng = np.random.default_rng(0)
    return fastcnn.Sequential(
        fastcnn.Conv2D(1, 4, 3, rng=rng),
        fastcnn.BatchNorm2D(4),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        fastcnn.Flatten(),
        fastcnn.Dropout(0.3, seed=1),
        fastcnn.Dense(36, 3, rng=rng),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_warmup_changes_nothing(mode):
    model = net()
    getattr(model, mode)()
    opt = Adam(model.parameters(), lr=1e-3)
    x = np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)
    model.train()
    model(x)
    model.backward(np.ones((8, 3), np.float32))  # some gradient to keep
    opt.step()
    getattr(model, mode)()
    state = weights(model)
    grads = [p.grad.copy() for p in model.parameters()]
    rng_state = model.get_rng_state()
    opt_state = opt.state_dict()
    seconds = fastcnn.warmup(model, (1, 8, 8), optimizer=opt)
    assert isinstance(seconds, float) and seconds >= 0
    assert model.training == (mode == "train")
    assert all(np.array_equal(v, state[k]) for k, v in weights(model).items())
    assert all(np.array_equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert model.get_rng_state() == rng_state
    assert equal(opt.state_dict(), opt_state)


def equal(a, b):
    """Nested dicts, lists and arrays, compared exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("not a model", (1, 8, 8)), TypeError, "fastcnn.Module"),
        ((None, (8, 1, 8, 8)), ValueError, "ONE input"),
        ((None, "1,8,8"), TypeError, "input_shape"),
        ((None, (1, 0, 8)), ValueError, "positive"),
    ],
)
def test_warmup_checks_its_arguments(args, error, match):
    model, shape = args
    with pytest.raises(error, match=f"warmup: .*{match}"):
        fastcnn.warmup(net() if model is None else model, shape)


def test_warmup_failure_restores_the_model():
    model = net().eval()
    state = weights(model)
    with pytest.raises(ValueError):
        fastcnn.warmup(model, (2, 8, 8))  # the conv wants 1 channel
    assert not model.training
    assert all(np.array_equal(v, state[k]) for k, v in weights(model).items())


def test_announce_writes_to_the_given_file(monkeypatch):
    from fastcnn import precompile

    monkeypatch.setitem(compile_ahead._STATE, "checked", False)
    monkeypatch.setattr(precompile, "cache_is_cold", lambda: True)
    f = io.StringIO()
    assert compile_ahead.announce_if_cold(f) is True
    assert f.getvalue() == compile_ahead.MESSAGE + "\n"
    compile_ahead.mark_announced()
    assert compile_ahead.announce_if_cold(f) is False
