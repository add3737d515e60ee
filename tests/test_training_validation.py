"""fit refuses bad val_data, checkpoint paths and checkpoint extras before its first step
(issue 14, item 7): before, they failed after the first epoch, whose work was lost."""

import os

import numpy as np
import pytest

from fastcnn.layers import Dense, ReLU
from fastcnn.losses import CrossEntropyLoss
from fastcnn.model import Sequential
from fastcnn.optim import SGD
from fastcnn.training import fit


def blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((3, 4)).astype(np.float32)[y] + rng.standard_normal((n, 4))).astype(
        np.float32
    )
    return x, y.astype(np.int64)


class CountingSGD(SGD):
    steps = 0

    def step(self):
        self.steps += 1
        super().step()


def run(tmp_path, **kwargs):
    """fit on blobs -> the optimizer (whose .steps the tests check); raises what fit raises."""
    x, y = blobs()
    rng = np.random.default_rng(0)
    model = Sequential([Dense(4, 8, rng=rng), ReLU(), Dense(8, 3, rng=rng)])
    opt = CountingSGD(model.parameters(), lr=0.1)
    try:
        fit(model, CrossEntropyLoss(), opt, x, y, epochs=2, batch_size=20, progress=False, **kwargs)
    finally:
        run.steps = opt.steps
    return opt


def refused_before_the_first_step(tmp_path, error, match, **kwargs):
    with pytest.raises(error, match=match):
        run(tmp_path, **kwargs)
    assert run.steps == 0, f"refused only after {run.steps} steps"


def test_the_valid_run_steps_and_saves(tmp_path):
    x, y = blobs(30, seed=1)
    path = tmp_path / "c.safetensors"
    opt = run(tmp_path, val_data=(x, y), checkpoint=str(path), checkpoint_extra={"note": [1, 2]})
    assert opt.steps == 6 and path.exists()


@pytest.mark.parametrize(
    "val, match",
    [
        (lambda x, y: (x[:, :3], y), r"val_data.*\(N, 4\).*\(30, 3\)"),  # other image shape
        (lambda x, y: (x, y + 5), r"labels in \[0, 3\)"),  # labels out of range
        (
            lambda x, y: (x, np.eye(3, dtype=np.float32)[y]),
            r"val_data.*labels",
        ),  # one-hot, train is not
        (lambda x, y: (x.astype(np.int32), y), "floating"),
    ],
)
def test_bad_val_data_is_refused_before_the_first_step(tmp_path, val, match):
    x, y = blobs(30, seed=1)
    refused_before_the_first_step(tmp_path, (ValueError, TypeError), match, val_data=val(x, y))


def test_checkpoint_in_a_missing_folder_is_refused_before_the_first_step(tmp_path):
    refused_before_the_first_step(
        tmp_path,
        FileNotFoundError,
        "no such folder",
        checkpoint=str(tmp_path / "missing" / "c.safetensors"),
    )


def test_checkpoint_path_that_is_a_folder_is_refused_before_the_first_step(tmp_path):
    refused_before_the_first_step(
        tmp_path, IsADirectoryError, "is a folder", checkpoint=str(tmp_path)
    )


def test_empty_checkpoint_path_is_refused_before_the_first_step(tmp_path):
    refused_before_the_first_step(tmp_path, ValueError, "empty", checkpoint="")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_checkpoint_in_a_read_only_folder_is_refused_before_the_first_step(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        refused_before_the_first_step(
            tmp_path, PermissionError, "not writable", checkpoint=str(folder / "c.safetensors")
        )
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"f": object()}, TypeError, "not JSON-able"),
        ({"fit": 1}, ValueError, "'fit'"),
        ([1, 2], TypeError, "dict"),
    ],
)
def test_bad_checkpoint_extra_is_refused_before_the_first_step(tmp_path, extra, error, match):
    refused_before_the_first_step(
        tmp_path, error, match, checkpoint=str(tmp_path / "c.safetensors"), checkpoint_extra=extra
    )
    assert os.listdir(tmp_path) == []
