"""The fastcnn command on bad checkpoints and options: a clear message and status 2, never a
traceback (issue 14, items 4 and 8)."""

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
    status = main(
        [
            "train",
            "--epochs",
            "1",
            "--limit",
            "256",
            "--val-split",
            "0",
            "--model",
            "lenet5",
            "--data-dir",
            real_root,
            "--no-download",
            "--no-progress",
            "--out",
            str(path),
        ]
    )
    assert status == 0
    return path


def edited_copy(src, dest, mutate):
    """A copy of checkpoint `src` with its metadata changed and both checksums recomputed."""
    data = src.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    mutate(meta)
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    dest.write_bytes(st.save(st.load(data), metadata={"fastcnn": json.dumps(meta)}))
    return dest


def test_evaluate_and_resume_a_checkpoint_whose_extra_is_a_list(capsys, tmp_path, real_root):
    path = tmp_path / "list.safetensors"
    checkpoint.save(path, models.reference(seed=0), extra=[1, 2])
    status, out, err = run_main(
        capsys, "evaluate", path, "--limit", 50, "--data-dir", real_root, "--no-download"
    )
    assert status == 0, err
    assert "test accuracy:" in out
    status, out, err = run_main(
        capsys, "train", "--resume", path, "--data-dir", real_root, "--no-download", "--no-progress"
    )
    assert_error(status, err, str(path), "not a checkpoint written by 'fastcnn train --out'")


def test_evaluate_a_checkpoint_naming_an_unknown_data_set(capsys, tmp_path, real_root):
    path = tmp_path / "imagenet.safetensors"
    checkpoint.save(path, models.reference(seed=0), extra={"cli": {"dataset": "imagenet"}})
    status, _, err = run_main(capsys, "evaluate", path, "--data-dir", real_root, "--no-download")
    assert_error(status, err, str(path), "imagenet", "--dataset")


@pytest.mark.parametrize(
    "key, value",
    [
        ("batch_size", "64"),
        ("model", "vgg16"),
        ("lr", -1),
        ("scheduler", None),
        ("seed", 1.5),
        ("val_split", [1]),
        ("nesterov", "yes"),
    ],
)
def test_resume_with_edited_settings_exits_2_before_loading_data(
    capsys, tmp_path, trained, key, value
):
    path = edited_copy(
        trained,
        tmp_path / "edited.safetensors",
        lambda meta: meta["extra"]["cli"].update({key: value}),
    )
    empty = tmp_path / "no-data"
    empty.mkdir()
    status, _, err = run_main(
        capsys,
        "train",
        "--resume",
        path,
        "--epochs",
        1,
        "--data-dir",
        empty,
        "--no-download",
        "--no-progress",
    )
    assert_error(status, err, str(path), key)


@pytest.mark.parametrize("edit", ["shuffle_state", "history", "seed"])
def test_resume_with_edited_fit_fields_exits_2_before_loading_data(capsys, tmp_path, trained, edit):
    path = edited_copy(
        trained,
        tmp_path / "edited.safetensors",
        lambda meta: meta["extra"]["fit"].update({edit: "edited"}),
    )
    empty = tmp_path / "no-data"
    empty.mkdir()
    status, _, err = run_main(
        capsys,
        "train",
        "--resume",
        path,
        "--epochs",
        1,
        "--data-dir",
        empty,
        "--no-download",
        "--no-progress",
    )
    assert_error(status, err, str(path), "cannot resume")


def test_resume_with_an_optimizer_state_of_wrong_types_exits_2(
    capsys, tmp_path, trained, real_root
):
    path = edited_copy(
        trained,
        tmp_path / "edited.safetensors",
        lambda meta: meta["optimizer"]["hyper"].update(lr="fast"),
    )
    status, _, err = run_main(
        capsys,
        "train",
        "--resume",
        path,
        "--epochs",
        1,
        "--data-dir",
        real_root,
        "--no-download",
        "--no-progress",
    )
    assert_error(status, err, str(path), "SGD state cannot be restored")


def test_unedited_copy_resumes(capsys, tmp_path, trained, real_root):
    """The edits above are what is refused: the same copy without an edit resumes (nothing left
    to train at --epochs 1) and reports the test accuracy."""
    path = edited_copy(trained, tmp_path / "copy.safetensors", lambda meta: None)
    status, out, err = run_main(
        capsys,
        "train",
        "--resume",
        path,
        "--epochs",
        1,
        "--data-dir",
        real_root,
        "--no-download",
        "--no-progress",
    )
    assert status == 0, err
    assert "test accuracy:" in out
    assert os.path.exists(path)


# --------------------------------------------------------------------------------------------
# item 8: the smaller ones


def test_help_documents_the_exit_statuses_and_fastcnn_traceback(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    for fragment in (
        "exit statuses:",
        "  0 ",
        "  1 ",
        "  2 ",
        "  3 ",
        "  130 ",
        "  143 ",
        "FASTCNN_TRACEBACK=1",
    ):
        assert fragment in out, fragment
    for command in ("train", "evaluate", "summary"):
        status, out, _ = run_main(capsys, command, "--help")
        assert "FASTCNN_TRACEBACK=1" in out and "fastcnn --help" in out


def test_empty_out_exits_2_before_loading_data(capsys, tmp_path):
    status, _, err = run_main(capsys, "train", "--out", "", "--data-dir", tmp_path, "--no-download")
    assert_error(status, err, "--out ''", "expected a file name")


def test_epochs_0_exits_2_with_its_own_message(capsys, tmp_path):
    status, _, err = run_main(
        capsys, "train", "--epochs", 0, "--data-dir", tmp_path, "--no-download"
    )
    assert_error(status, err, "--epochs 0: nothing to train")
    status, _, err = run_main(
        capsys,
        "train",
        "--epochs",
        0,
        "--scheduler",
        "none",
        "--data-dir",
        tmp_path,
        "--no-download",
    )
    assert_error(status, err, "--epochs 0: nothing to train")


def test_resume_with_fewer_epochs_than_done_exits_2(capsys, tmp_path, trained):
    status, _, err = run_main(
        capsys, "train", "--resume", trained, "--epochs", 0, "--data-dir", tmp_path, "--no-download"
    )
    assert_error(status, err, "--epochs 0", "resume it with --epochs 1")  # (cosine schedule)
    constant = edited_copy(
        trained,
        tmp_path / "constant.safetensors",
        lambda meta: meta["extra"]["cli"].update(scheduler="none"),
    )
    status, _, err = run_main(
        capsys,
        "train",
        "--resume",
        constant,
        "--epochs",
        0,
        "--data-dir",
        tmp_path,
        "--no-download",
    )
    assert_error(status, err, "--epochs 0", "already completed 1 epochs")


def test_no_checkpoint_line_when_nothing_was_written(capsys, tmp_path, trained, real_root):
    other = tmp_path / "other.safetensors"
    status, out, err = run_main(
        capsys,
        "train",
        "--resume",
        trained,
        "--epochs",
        1,
        "--out",
        other,
        "--data-dir",
        real_root,
        "--no-download",
        "--no-progress",
    )
    assert status == 0, err
    assert "checkpoint:" not in out and not other.exists()


def test_a_multi_line_error_is_printed_whole(capsys, monkeypatch, tmp_path):
    from fastcnn import cli, datasets

    def fail(*args):
        raise datasets.DownloadError(
            "fastcnn.datasets: could not download /d/x.gz. Attempts:\n"
            "  https://a/x.gz: timed out\n  https://b/x.gz: HTTP 404\n"
            "Without internet access, copy the official x.gz into /d"
        )

    monkeypatch.setattr(cli, "_load_data", fail)
    status, _, err = run_main(capsys, "train", "--data-dir", tmp_path)
    assert_error(
        status, err, "Attempts:", "https://a/x.gz: timed out", "HTTP 404", "Without internet access"
    )


def test_an_internal_error_is_one_message_with_status_3(capsys, monkeypatch):
    from fastcnn import cli

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_settings", bug)
    monkeypatch.delenv("FASTCNN_TRACEBACK", raising=False)
    status, _, err = run_main(capsys, "train")
    assert status == 3 and "Traceback" not in err, err
    assert "internal error: KeyError: 'oops'" in err and "FASTCNN_TRACEBACK=1" in err
    monkeypatch.setenv("FASTCNN_TRACEBACK", "1")
    with pytest.raises(KeyError):
        main(["train"])


def test_a_diverging_run_prints_one_line_and_no_numpy_warnings(tmp_path, real_root):
    """In a real process (pytest's warning capture would hide them): numpy's overflow warnings
    used to precede the divergence line, two lines each, with fastcnn's file paths."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastcnn",
            "train",
            "--lr",
            "1e6",
            "--epochs",
            "2",
            "--limit",
            "256",
            "--val-split",
            "0",
            "--data-dir",
            real_root,
            "--no-download",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged at epoch" in lines[0], done.stderr
