"""fastcnn train on a CIFAR-10-format folder and on a folder of images, --augment (resumed
bitwise), and fastcnn predict on a folder, a .npy and an IDX file; the errors of --dataset and
--model that suit no data."""

import numpy as np
import pytest

from cifar_files import write_folder
from fastcnn import checkpoint, cli_data, models
from fastcnn import transforms as T
from fastcnn.cli import main


def run_main(capsys, *argv):
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def weights(path):
    return checkpoint.load(path).model.state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture
def cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_folder(folder, per_file=8)
    return folder


TRAIN = ["--model", "allconv", "--batch-size", "8", "--val-split", "8", "--no-progress"]


def test_a_cifar10_format_folder_trains_from_the_cli(capsys, tmp_path, cifar_folder):
    out_path = tmp_path / "run.safetensors"
    status, out, err = run_main(
        capsys, "train", "--dataset", cifar_folder, "--epochs", 1, "--out", out_path, *TRAIN
    )
    assert status == 0, err
    assert "32 training, 8 validation, 8 test images" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    ckpt = checkpoint.load(out_path)
    assert ckpt.input_shape == (3, 32, 32) and ckpt.extra["cli"]["classes"][0] == "airplane"
    status, out, err = run_main(capsys, "evaluate", out_path)
    assert status == 0 and "test accuracy: " in out, err


def test_augmented_cli_run_resumes_bitwise(capsys, tmp_path, cifar_folder):
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    args = ["--dataset", cifar_folder, "--augment", "--scheduler", "none", *TRAIN]
    status, out, err = run_main(capsys, "train", "--epochs", 2, "--out", whole, *args)
    assert status == 0 and "(augmented)" in out, err
    status, _, err = run_main(capsys, "train", "--epochs", 1, "--out", part, *args)
    assert status == 0, err
    # the first epoch's checkpoint holds the augmentation's position: the resumed run continues it
    status, _, err = run_main(capsys, "train", "--resume", part, "--epochs", 2, "--no-progress")
    assert status == 0, err
    assert_same(weights(whole), weights(part))
    plain = tmp_path / "plain.safetensors"
    status, _, err = run_main(
        capsys, "train", "--epochs", 2, "--out", plain, *[a for a in args if a != "--augment"]
    )
    assert status == 0, err
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(weights(whole).values(), weights(plain).values(), strict=True)
    )


def image_folder(root, seed=0, per_class=6, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
            pixels[..., label] = 255  # a colour per class
            Image.fromarray(pixels, "RGB").save(root / name / f"{i}.png")


def test_a_folder_of_images_trains_and_predicts(capsys, tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "shapes"
    image_folder(root)
    out_path = tmp_path / "run.safetensors"
    status, out, err = run_main(
        capsys,
        "train",
        "--dataset",
        root,
        "--image-size",
        8,
        "--epochs",
        1,
        "--batch-size",
        4,
        "--augment",
        "--out",
        out_path,
        "--no-progress",
    )
    assert status == 0, err
    assert "resnet8 on" in out and "test accuracy: " in out  # the default model for folders
    assert checkpoint.load(out_path).input_shape == (3, 8, 8)
    csv = tmp_path / "predictions.csv"
    status, out, err = run_main(capsys, "predict", out_path, root, "--out", csv)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 12 and lines[0].startswith("circle/0.png\t")
    assert {line.split("\t")[1] for line in lines} <= {"circle", "square"}
    rows = csv.read_text().strip().splitlines()
    assert rows[0] == "image,label,class" and len(rows) == 13


def test_predict_reads_npy_and_idx_files(capsys, tmp_path):
    model = models.reference(seed=3)
    path = tmp_path / "ref.safetensors"
    checkpoint.save(path, model, input_shape=(1, 28, 28))
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    want = np.argmax(model.predict(x[:, None] / np.float32(255)), axis=1).tolist()
    np.save(tmp_path / "x.npy", x)
    idx = tmp_path / "x-idx3-ubyte"
    idx.write_bytes(np.array([2051, 5, 28, 28], ">u4").tobytes() + x.tobytes())
    for source in (tmp_path / "x.npy", idx):
        status, out, err = run_main(capsys, "predict", path, source)
        assert status == 0, err
        got = [int(line.split("\t")[1]) for line in out.strip().splitlines()]
        assert got == want
    np.save(tmp_path / "bad.npy", np.zeros((5, 3, 32, 32), np.float32))
    status, _, err = run_main(capsys, "predict", path, tmp_path / "bad.npy")
    assert status == 2 and "takes (1, 28, 28)" in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--dataset", "/no/such/folder"], "--dataset"),
        (["train", "--image-size", "8"], "--image-size applies to a folder"),
        (["train", "--model", "reference", "--dataset", "CIFAR"], "takes 1x28x28 images"),
        (["predict", "missing.safetensors", "x.npy"], "no such checkpoint"),
    ],
)
def test_errors_exit_2_naming_the_option(capsys, tmp_path, cifar_folder, argv, fragment):
    argv = [str(cifar_folder) if a == "CIFAR" else a for a in argv]
    status, _, err = run_main(capsys, *argv, *(["--no-progress"] if argv[0] == "train" else []))
    assert status == 2 and fragment in err, err
    assert len(err.strip().splitlines()) == 1


def test_augment_suits_the_data_set():
    digits = cli_data.augmentation("mnist", (1, 28, 28))
    assert isinstance(digits, T.RandomShift)  # never mirrored: a mirrored 2 is no digit
    rgb = cli_data.augmentation("/data/photos", (3, 32, 32))
    assert isinstance(rgb, T.Compose)
    crop, flip = rgb.transforms
    assert crop.size == (32, 32) and crop.padding == 4 and isinstance(flip, T.RandomHorizontalFlip)
