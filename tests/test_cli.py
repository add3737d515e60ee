"""The fastcnn command: help, summary, one-line errors with status 2, train/resume/evaluate."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import data_dir
from fastcnn import checkpoint
from fastcnn.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCURACY_LINE = re.compile(r"^test accuracy: \d{1,3}\.\d\d%$")


def run_main(capsys, *argv):
    """main(argv) in this process -> (status, stdout, stderr); argparse's SystemExit included."""
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# help and summary


def test_help_lists_the_subcommands(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    for command in ("train", "evaluate", "summary"):
        assert command in out


@pytest.mark.parametrize(
    "command, options",
    [
        (
            "train",
            [
                "--epochs",
                "--batch-size",
                "--lr",
                "--optimizer",
                "--momentum",
                "--seed",
                "--data-dir",
                "--dataset",
                "--threads",
                "--val-split",
                "--out",
                "--resume",
                "--no-progress",
            ],
        ),
        ("evaluate", ["CHECKPOINT", "--dataset", "--data-dir", "--threads"]),
        ("summary", ["CHECKPOINT"]),
    ],
)
def test_subcommand_help(capsys, command, options):
    status, out, _ = run_main(capsys, command, "--help")
    assert status == 0
    assert out.startswith(f"usage: fastcnn {command}")
    for option in options:
        assert option in out


def test_summary_prints_the_reference_network(capsys):
    status, out, err = run_main(capsys, "summary")
    assert status == 0 and err == ""
    for name in (
        "Conv2D(1, 32",
        "Conv2D(32, 64",
        "MaxPool2D",
        "Dense(1600, 128)",
        "Dense(128, 10)",
    ):
        assert name in out
    assert "Total params: 225,034" in out
    assert "(1, 10)" in out


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, status 2, no traceback


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--epochs", "three"], "--epochs"),
        (["train", "--bogus"], "--bogus"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--optimizer", "rmsprop"], "--optimizer"),
        (["train", "--val-split", "1.5"], "--val-split"),
        (["train", "--dataset", "imagenet"], "--dataset"),  # neither a known set nor a folder
        (["train", "--seed", "-1"], "--seed"),  # numpy's generators refuse negative seeds
        (["evaluate"], "CHECKPOINT"),
        (["frobnicate"], "frobnicate"),
        ([], "required"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, argv, fragment):
    status, out, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, fragment)


def test_bad_threads_exit_2(capsys):
    status, _, err = run_main(capsys, "train", "--threads", "999", "--no-progress")
    assert_one_line_error(status, err, "--threads", "999")


def test_momentum_with_adam_exit_2(capsys):
    status, _, err = run_main(capsys, "train", "--optimizer", "adam", "--momentum", "0.5")
    assert_one_line_error(status, err, "--momentum")


def test_missing_data_exits_2(capsys, tmp_path):
    status, out, err = run_main(
        capsys, "train", "--data-dir", str(tmp_path), "--no-download", "--no-progress"
    )
    assert_one_line_error(status, err, str(tmp_path))


def test_missing_or_corrupt_checkpoint_exits_2(capsys, tmp_path):
    status, _, err = run_main(capsys, "evaluate", str(tmp_path / "nope.safetensors"))
    assert_one_line_error(status, err, "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    status, _, err = run_main(capsys, "evaluate", str(bad))
    assert_one_line_error(status, err, "bad.safetensors")
    status, _, err = run_main(capsys, "train", "--resume", str(bad))
    assert_one_line_error(status, err, "bad.safetensors")


def test_out_in_a_missing_folder_exits_2(capsys, tmp_path):
    status, _, err = run_main(capsys, "train", "--out", str(tmp_path / "no" / "such" / "ck"))
    assert_one_line_error(status, err, "--out")


# --------------------------------------------------------------------------------------------
# python -m fastcnn and the real pipeline


@pytest.mark.slow
def test_python_m_fastcnn_runs():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "fastcnn", "summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Total params: 225,034" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "fastcnn", "train", "--epochs", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


needs_mnist = pytest.mark.skipif(
    data_dir() is None, reason="MNIST not available (set FASTCNN_DATA)"
)


@pytest.mark.slow
@needs_mnist
def test_train_resume_evaluate_end_to_end(capsys, tmp_path):
    common = [
        "--limit",
        "800",
        "--val-split",
        "160",
        "--batch-size",
        "32",
        "--scheduler",
        "none",
        "--data-dir",
        data_dir(),
        "--no-download",
        "--no-progress",
    ]
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")

    status, out, err = run_main(capsys, "train", "--epochs", "2", "--out", full, *common)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert ACCURACY_LINE.match(lines[-1]), lines[-1]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert all("val_accuracy" in line and "images/s" in line for line in epoch_lines)
    assert "640 training, 160 validation, 800 test images" in lines[0]

    # interrupted after 1 epoch, resumed to 2: bitwise the same weights
    status, _, err = run_main(capsys, "train", "--epochs", "1", "--out", part, *common)
    assert status == 0, err
    status, out2, err = run_main(
        capsys,
        "train",
        "--resume",
        part,
        "--epochs",
        "2",
        "--no-progress",
        "--data-dir",
        data_dir(),
    )
    assert status == 0, err
    assert "resuming" in out2 and out2.strip().splitlines()[-1] == lines[-1]
    a, b = checkpoint.load(full), checkpoint.load(part)
    assert a.epoch == b.epoch == 2
    for key, value in a.model_state.items():
        assert np.array_equal(value, b.model_state[key]), key

    # a resumed run keeps its settings
    status, _, err = run_main(
        capsys, "train", "--resume", part, "--lr", "0.5", "--data-dir", data_dir()
    )
    assert_one_line_error(status, err, "--lr")

    # evaluate ends with the same line as train
    status, out3, err = run_main(
        capsys, "evaluate", full, "--limit", "800", "--data-dir", data_dir()
    )
    assert status == 0, err
    assert out3.strip().splitlines()[-1] == lines[-1]


@pytest.mark.slow
@needs_mnist
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_exits_1_with_one_line(capsys, tmp_path):
    out = str(tmp_path / "ck.safetensors")
    status, stdout, err = run_main(
        capsys,
        "train",
        "--lr",
        "1e6",
        "--epochs",
        "2",
        "--limit",
        "256",
        "--val-split",
        "0",
        "--out",
        out,
        "--data-dir",
        data_dir(),
        "--no-download",
        "--no-progress",
    )
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"diverged at epoch \d+, batch \d+ of 4", lines[0]), err
    assert "test accuracy" not in stdout


def test_summary_of_each_model_and_input_shape(capsys):
    status, out, err = run_main(capsys, "summary", "--model", "resnet20")
    assert status == 0 and err == ""
    assert "Total params: 272,186" in out and "3.body.0" in out and "Output shape: (1, 10)" in out
    status, out, _ = run_main(capsys, "summary", "--model", "lenet5", "--input-shape", "1,28,28")
    assert status == 0 and "(1, 6, 28, 28)" in out and "Total params: 61,706" in out
    status, _, err = run_main(capsys, "summary", "--model", "reference", "--input-shape", "1,32,32")
    assert_one_line_error(status, err, "Dense: expected input of shape (N, 1600), got (1, 2304)")
    status, _, err = run_main(capsys, "summary", "--input-shape", "1,28")
    assert status == 2 and "C,H,W" in err


@pytest.mark.slow
@needs_mnist
def test_resnet_train_resume_evaluate_summary(capsys, tmp_path):
    """A ResNet with its recipe (Nesterov, one-cycle stepped per batch): its checkpoint
    evaluates to the same line, knows its input shape, and resumes only over its schedule."""
    common = [
        "--model",
        "resnet8",
        "--dataset",
        "fashion-mnist",
        "--limit",
        "320",
        "--val-split",
        "64",
        "--batch-size",
        "64",
        "--data-dir",
        data_dir(),
        "--no-download",
        "--no-progress",
    ]
    full, part = str(tmp_path / "full.safetensors"), str(tmp_path / "part.safetensors")
    status, out, err = run_main(capsys, "train", "--epochs", "2", "--out", full, *common)
    assert status == 0, err
    assert "resnet8 on fashion-mnist" in out and "nesterov" in out and "one-cycle" in out
    last = out.strip().splitlines()[-1]
    ckpt = checkpoint.load(full)
    assert ckpt.scheduler_class == "OneCycleLR" and ckpt.input_shape == (1, 28, 28)
    status, _, err = run_main(
        capsys, "train", "--resume", full, "--epochs", "3", "--out", part, "--data-dir", data_dir()
    )
    assert_one_line_error(status, err, "--epochs 3", "over 2 epochs")
    status, out, err = run_main(
        capsys, "evaluate", full, "--limit", "320", "--data-dir", data_dir()
    )
    assert status == 0, err
    assert out.strip().splitlines()[-1] == last
    status, out, err = run_main(capsys, "summary", full)
    assert status == 0 and "Total params: 77,754" in out and "(1, 16, 28, 28)" in out
