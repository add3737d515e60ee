"""The fastcnn command on bad checkpoints and options: a clear message and status 2, never a traceback
(issue 14, items 4 and 8)."""
import json
import os

import pytest
import safetensors.numpy as st
from conftest import data_dir

from fastcnn import checkpoint, models
from fastcnn.cli import main


def run_main(capsys, *argv):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_error(status, err, *fragments):
    assert status == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def real_root():
    root = data_dir()
    if root is None:
        pytest.skip("real MNIST files absent (set FASTCNN_DATA to the folder holding mnist/)")
    return root


@pytest.fixture(scope="module")
def trained(real_root, tmp_path_factory):
    """A checkpoint written by 'fastcnn train --out' (one short epoch)."""
    path = tmp_path_factory.mktemp("cli") / "run.safetensors"
    status = main(["train", "--epochs", "1", "--limit", "256", "--val-split", "0", "--model", "lenet5",
                   "--data-dir", real_root, "--no-download", "--no-progress", "--out", str(path)])
    assert status == 0
    return path


def edited_copy(src, dest, mutate):
    """A copy of checkpoint `src` with its metadata changed and both checksums recomputed."""
    data = src.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    mutate(meta)
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    dest.write_bytes(st.save(st.load(data), metadata={"fastcnn": json.dumps(meta)}))
    return dest


def test_evaluate_and_resume_a_checkpoint_whose_extra_is_a_list(capsys, tmp_path, real_root):
    path = tmp_path / "list.safetensors"
    checkpoint.save(path, models.reference(seed=0), extra=[1, 2])
    status, out, err = run_main(capsys, "evaluate", path, "--limit", 50, "--data-dir", real_root,
                                "--no-download")
    assert status == 0, err
    assert "test accuracy:" in out
    status, out, err = run_main(capsys, "train", "--resume", path, "--data-dir", real_root,
                                "--no-download", "--no-progress")
    assert_error(status, err, str(path), "not a checkpoint written by 'fastcnn train --out'")


def test_evaluate_a_checkpoint_naming_an_unknown_data_set(capsys, tmp_path, real_root):
    path = tmp_path / "cifar.safetensors"
    checkpoint.save(path, models.reference(seed=0), extra={"cli": {"dataset": "cifar10"}})
    status, _, err = run_main(capsys, "evaluate", path, "--data-dir", real_root, "--no-download")
    assert_error(status, err, str(path), "cifar10", "--dataset")


@pytest.mark.parametrize("key, value", [
    ("batch_size", "64"), ("model", "vgg16"), ("lr", -1), ("scheduler", None), ("seed", 1.5),
    ("val_split", [1]), ("nesterov", "yes"),
])
def test_resume_with_edited_settings_exits_2_before_loading_data(capsys, tmp_path, trained, key, value):
    path = edited_copy(trained, tmp_path / "edited.safetensors",
                       lambda meta: meta["extra"]["cli"].update({key: value}))
    empty = tmp_path / "no-data"
    empty.mkdir()
    status, _, err = run_main(capsys, "train", "--resume", path, "--epochs", 1, "--data-dir", empty,
                              "--no-download", "--no-progress")
    assert_error(status, err, str(path), key)


@pytest.mark.parametrize("edit", ["shuffle_state", "history", "seed"])
def test_resume_with_edited_fit_fields_exits_2_before_loading_data(capsys, tmp_path, trained, edit):
    path = edited_copy(trained, tmp_path / "edited.safetensors",
                       lambda meta: meta["extra"]["fit"].update({edit: "edited"}))
    empty = tmp_path / "no-data"
    empty.mkdir()
    status, _, err = run_main(capsys, "train", "--resume", path, "--epochs", 1, "--data-dir", empty,
                              "--no-download", "--no-progress")
    assert_error(status, err, str(path), "cannot resume")


def test_resume_with_an_optimizer_state_of_wrong_types_exits_2(capsys, tmp_path, trained, real_root):
    path = edited_copy(trained, tmp_path / "edited.safetensors",
                       lambda meta: meta["optimizer"]["hyper"].update(lr="fast"))
    status, _, err = run_main(capsys, "train", "--resume", path, "--epochs", 1, "--data-dir", real_root,
                              "--no-download", "--no-progress")
    assert_error(status, err, str(path), "SGD state cannot be restored")


def test_unedited_copy_resumes(capsys, tmp_path, trained, real_root):
    """The edits above are what is refused: the same copy without an edit resumes (nothing left
    to train at --epochs 1) and reports the test accuracy."""
    path = edited_copy(trained, tmp_path / "copy.safetensors", lambda meta: None)
    status, out, err = run_main(capsys, "train", "--resume", path, "--epochs", 1, "--data-dir",
                                real_root, "--no-download", "--no-progress")
    assert status == 0, err
    assert "test accuracy:" in out
    assert os.path.exists(path)
