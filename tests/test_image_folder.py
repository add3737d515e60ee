"""fastcnn.datasets.image_folder: a class per sub-folder, read with Pillow (skipped without it)."""

import numpy as np
import pytest

from fastcnn import data, datasets

Image = pytest.importorskip("PIL.Image")


def write_png(path, pixels, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)


def rgb_folder(root, size=(6, 5), per_class=3, seed=0):
    """root/<class>/<i>.png RGB images; returns {path: (H, W, 3) pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in ("cat", "dog"):
        for i in range(per_class):
            pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
            path = root / name / f"{i}.png"
            write_png(path, pixels, "RGB")
            written[str(path)] = pixels
    return written


def test_classes_labels_and_pixels(tmp_path):
    written = rgb_folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = datasets.image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.x.shape == (6, 3, 6, 5) and ds.x.dtype == np.uint8
    for img, path in zip(ds.x, ds.paths, strict=True):
        np.testing.assert_array_equal(img.transpose(1, 2, 0), written[path])  # NCHW
    xb, yb = next(iter(data.DataLoader(ds, batch_size=6)))
    np.testing.assert_array_equal(xb, ds.x / np.float32(255))


def test_grayscale_folders_give_one_channel_and_size_resizes(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        for i, shape in enumerate([(10, 12), (7, 7)]):
            write_png(tmp_path / name / f"{i}.png", rng.integers(0, 256, shape, np.uint8), "L")
    with pytest.raises(datasets.DatasetFileError, match="pass size="):
        datasets.image_folder(tmp_path)
    ds = datasets.image_folder(tmp_path, size=8)
    assert ds.x.shape == (4, 1, 8, 8)
    assert datasets.image_folder(tmp_path, size=(4, 6), mode="RGB").x.shape == (4, 3, 4, 6)


def test_bad_folders_and_files_are_refused_by_name(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match="is not a folder"):
        datasets.image_folder(tmp_path / "missing")
    with pytest.raises(datasets.DatasetNotFoundError, match="holds no images"):
        datasets.image_folder(tmp_path)
    rgb_folder(tmp_path)
    broken = tmp_path / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(datasets.DatasetFileError, match="cannot read .*broken.png"):
        datasets.image_folder(tmp_path)
    with pytest.raises(ValueError, match="image_folder: expected size"):
        datasets.image_folder(tmp_path, size=0)
