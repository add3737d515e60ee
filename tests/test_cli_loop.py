"""fastcnn train --early-stopping / --plot and fastcnn evaluate --confusion."""

import sys

import pytest

from conftest import data_dir
from fastcnn import checkpoint
from test_cli import ACCURACY_LINE, assert_one_line_error, run_main
from test_plots import check_png

needs_mnist = pytest.mark.skipif(data_dir() is None, reason="MNIST not found ($FASTCNN_DATA)")


def common():
    return [
        "--limit",
        "400",
        "--val-split",
        "100",
        "--scheduler",
        "none",
        "--data-dir",
        data_dir(),
        "--no-download",
        "--no-progress",
    ]


# An lr so small that no weight changes (the updates vanish below float32's resolution): the
# validation loss stays exactly the same, so only the first epoch improves on it.
FROZEN = ["--lr", "1e-30", "--momentum", "0"]


@pytest.mark.slow
@needs_mnist
def test_early_stopping_stops_and_survives_a_resume(capsys, tmp_path):
    status, out, err = run_main(
        capsys, "train", "--epochs", "6", "--early-stopping", "2", *FROZEN, *common()
    )
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len([line for line in lines if line.startswith("epoch ")]) == 3
    assert any(line.startswith("early stopping after epoch 3") for line in lines)
    assert ACCURACY_LINE.match(lines[-1])

    # 2 epochs (waiting 1), then resumed: stops after epoch 3 as the straight run did
    path = str(tmp_path / "run.safetensors")
    argv = ["train", "--early-stopping", "2", "--out", path, *FROZEN, *common()]
    status, _, err = run_main(capsys, *argv[:1], "--epochs", "2", *argv[1:])
    assert status == 0, err
    assert checkpoint.load(path).extra["fit"]["callbacks"][0]["state"]["wait"] == 1
    status, out, err = run_main(
        capsys,
        "train",
        "--resume",
        path,
        "--epochs",
        "6",
        "--no-progress",
        "--data-dir",
        data_dir(),
    )
    assert status == 0, err
    assert "early stopping after epoch 3" in out and checkpoint.load(path).epoch == 3

    # a resumed run keeps its patience
    status, _, err = run_main(
        capsys, "train", "--resume", path, "--epochs", "6", "--early-stopping", "3"
    )
    assert_one_line_error(status, err, "--early-stopping 3 differs")


@pytest.mark.slow
@needs_mnist
def test_plot_and_confusion_pictures(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    curves, run = tmp_path / "curves.png", str(tmp_path / "run.safetensors")
    status, out, err = run_main(
        capsys, "train", "--epochs", "2", "--plot", str(curves), "--out", run, *common()
    )
    assert status == 0, err
    assert f"curves: {curves}" in out
    check_png(curves, 600, 300)

    confusion = tmp_path / "confusion.png"
    status, out, err = run_main(
        capsys,
        "evaluate",
        run,
        "--confusion",
        str(confusion),
        "--limit",
        "300",
        "--data-dir",
        data_dir(),
    )
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[1] == f"confusion matrix: {confusion}"
    assert lines[2].startswith("accuracy per class: 0: ") and ACCURACY_LINE.match(lines[-1])
    check_png(confusion)
    # the same figures as a plain evaluate
    status, plain, err = run_main(
        capsys, "evaluate", run, "--limit", "300", "--data-dir", data_dir()
    )
    assert plain.strip().splitlines()[-2:] == lines[-2:]


def test_option_errors_come_before_any_work(capsys, tmp_path, monkeypatch):
    missing = str(tmp_path / "no" / "curves.png")
    status, _, err = run_main(capsys, "train", "--plot", missing)
    assert_one_line_error(status, err, "--plot", "does not exist")
    status, _, err = run_main(capsys, "train", "--early-stopping", "0")
    assert status == 2 and "expected a positive integer" in err
    status, _, err = run_main(capsys, "evaluate", "x.safetensors", "--confusion", missing)
    assert_one_line_error(status, err, "--confusion", "does not exist")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, err = run_main(capsys, "train", "--plot", str(tmp_path / "c.png"))
    assert_one_line_error(status, err, "--plot", "pip install 'fastcnn[plot]'")


@pytest.mark.slow
@needs_mnist
def test_early_stopping_needs_validation_images(capsys):
    status, _, err = run_main(
        capsys,
        "train",
        "--early-stopping",
        "2",
        *common()[:2],
        "--val-split",
        "0",
        "--data-dir",
        data_dir(),
        "--no-download",
    )
    assert_one_line_error(status, err, "--early-stopping", "--val-split")
