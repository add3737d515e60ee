"""fit on random data, labels and arguments."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import checkpoint as ckpt_mod
from fastcnn import layers, losses, optim
from fastcnn.model import Sequential
from fastcnn.training import TrainingDiverged, fit
from fuzzing.common import GOOD, HALF, arrays, expect_error, f64, fuzz, odd_shapes, tally

_FIT_DIR = tempfile.mkdtemp(prefix="fastcnn-fuzz-fit-")


# ---------------------------------------------------------------------------------------------
# fit: random data, labels and arguments; NaN / inf in the data must stop training with
# TrainingDiverged naming the first batch that holds one, and leave the last checkpoint alone


@fuzz(0.5)
@given(data=st.data())
def test_fit(data):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 99)))
    n = d(st.integers(0, 9)) if d(st.integers(0, 9)) == 0 else d(st.integers(1, 9))
    features = d(st.sampled_from([4] * 12 + [5, 0]))
    x = d(
        arrays(
            (n, features) if d(st.integers(0, 14)) else d(odd_shapes()),
            dtypes=GOOD * 12 + HALF + ("int64", "complex64"),
            layouts=("c", "fortran", "strided", "readonly", "swapped"),
        )
    )
    r = d(st.integers(0, 13))
    y = (
        rng.integers(0, 3, n)
        if r < 10
        else rng.integers(-1, 5, n)
        if r == 10
        else rng.random(n)
        if r == 11
        else rng.integers(0, 3, (n, 3))
        if r == 12
        else rng.integers(0, 3, n + 1)
    )
    if d(st.integers(0, 19)) == 0:
        y = y.tolist()
    epochs = d(st.sampled_from([1] * 6 + [2, 2, 0, -1, 1.5, None]))
    batch_size = d(st.sampled_from([1, 2, 3, 4, 64] * 2 + [0, -2, 2.0]))
    seed = d(st.integers(0, 2**32))
    model = Sequential([layers.Dense(4, 3, rng=0)])
    opt = optim.SGD(model.parameters(), lr=0.1)
    path = os.path.join(_FIT_DIR, "fit.safetensors")
    ckpt_mod.save(path, model, opt, epoch=0)
    with open(path, "rb") as f:
        before = f.read()

    def call():
        return fit(
            model,
            losses.CrossEntropyLoss(),
            opt,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            progress=False,
            checkpoint=path,
        )

    xa, ya = np.asarray(x), np.asarray(y)
    names = ("fit",)
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or xa.dtype.kind != "f":
        problem = TypeError
    elif xa.ndim < 2 or ya.ndim not in (1, 2) or ya.shape[0] != xa.shape[0] or xa.shape[0] == 0:
        problem = ValueError
    elif (
        isinstance(epochs, bool)
        or not isinstance(epochs, int)
        or epochs < 0
        or isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        problem = (ValueError, TypeError)
    elif epochs == 0:
        problem = None
    elif xa.ndim != 2 or xa.shape[1] != 4:
        problem, names = ValueError, ("Dense",)
    elif ya.dtype.kind not in "iu":
        problem, names = TypeError, ("CrossEntropyLoss",)
    elif ya.shape != (n,) or ya.min() < 0 or ya.max() >= 3:
        problem, names = ValueError, ("CrossEntropyLoss",)
    else:
        problem = None
    if problem:
        expect_error(call, problem, names[0])
        tally("fit", "invalid")
    else:
        bad = ~np.isfinite(f64(xa)).all(axis=tuple(range(1, xa.ndim))) if n else np.zeros(0, bool)
        if epochs and bad.any():
            order = np.random.default_rng(seed).permutation(n)
            batches = -(-n // batch_size)
            first = int(np.argmax(bad[order])) // batch_size + 1
            with pytest.raises(TrainingDiverged, match=rf"epoch 1, batch {first} of {batches}:"):
                call()
            tally("fit (diverges)", "valid")
        else:
            history = fit(
                model,
                losses.CrossEntropyLoss(),
                opt,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                progress=False,
                checkpoint=path,
            )
            assert len(history) == epochs
            assert all(np.isfinite(p.data).all() for p in model.parameters())
            tally("fit", "valid")
            if epochs:
                assert ckpt_mod.load(path).epoch == epochs
                return
    with open(path, "rb") as f:
        assert f.read() == before  # the last good checkpoint is untouched
