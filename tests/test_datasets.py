"""fastcnn.datasets: the real MNIST / Fashion-MNIST files, corrupt files, and downloads from a local
server.

No test touches the network except a local http.server on 127.0.0.1 started and stopped here;
every download test passes mirrors= explicitly.
"""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import threading

import numpy as np
import pytest

from conftest import data_dir
from fastcnn import datasets
from fastcnn.datasets import (
    ChecksumError,
    DatasetFileError,
    DatasetNotFoundError,
    DownloadError,
    read_idx_images,
    read_idx_labels,
)

FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def real_root():
    root = data_dir()
    if root is None:
        pytest.skip("real MNIST files absent (set FASTCNN_DATA to the folder holding mnist/)")
    return root


@pytest.fixture(scope="module")
def real_mnist(real_root):
    return datasets.mnist(real_root, download=False)


def _link_real(real_root, dest_root, name="mnist", only=FILES, dest=None):
    """dest_root/<dest or name>/ with symlinks to the real .gz files of `name` listed in `only`."""
    folder = os.path.join(dest_root, dest or name)
    os.makedirs(folder, exist_ok=True)
    for base in only:
        os.symlink(
            os.path.join(os.path.abspath(real_root), name, base + ".gz"),
            os.path.join(folder, base + ".gz"),
        )
    return folder


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith((".part", ".tmp"))]


# ---------------------------------------------------------------------------------------------
# Real data


def test_mnist_real(real_mnist):
    (x_train, y_train), (x_test, y_test) = real_mnist
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    for x in (x_train, x_test):
        assert x.flags.c_contiguous and x.flags.writeable
        assert x.min() == 0.0 and x.max() == 1.0
    assert y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert y_test[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert np.bincount(y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    # pixel / 255 exactly, mean as published (33.32 train, 33.79 test on 0..255)
    assert abs(float(x_train.mean(dtype=np.float64)) * 255 - 33.32) < 0.01
    assert abs(float(x_test.mean(dtype=np.float64)) * 255 - 33.79) < 0.01
    levels = np.unique(x_test)
    np.testing.assert_array_equal(
        levels, np.float32(np.unique(levels * 255).round()) / np.float32(255)
    )


def test_fashion_mnist_real(real_root):
    (x_train, y_train), (x_test, y_test) = datasets.fashion_mnist(real_root, download=False)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(y_test, minlength=10).tolist() == [1000] * 10
    assert abs(float(x_train.mean(dtype=np.float64)) * 255 - 72.94) < 0.01


def test_uncompressed_files_give_the_same_arrays(real_root, real_mnist, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for base in FILES:
        with gzip.open(os.path.join(real_root, "mnist", base + ".gz"), "rb") as src:
            (folder / base).write_bytes(src.read())
    assert (folder / "train-images-idx3-ubyte").stat().st_size == 47040016
    (x_train, y_train), (x_test, y_test) = datasets.mnist(tmp_path, download=False)
    (rx_train, ry_train), (rx_test, ry_test) = real_mnist
    np.testing.assert_array_equal(x_train, rx_train)
    np.testing.assert_array_equal(y_train, ry_train)
    np.testing.assert_array_equal(x_test, rx_test)
    np.testing.assert_array_equal(y_test, ry_test)


def test_mixed_gz_and_uncompressed(real_root, real_mnist, tmp_path):
    _link_real(real_root, tmp_path, only=FILES[:3])
    with gzip.open(os.path.join(real_root, "mnist", FILES[3] + ".gz"), "rb") as src:
        (tmp_path / "mnist" / FILES[3]).write_bytes(src.read())
    (_, _), (_, y_test) = datasets.mnist(tmp_path, download=False)
    np.testing.assert_array_equal(y_test, real_mnist[1][1])


def test_returned_arrays_are_fresh_copies(real_root):
    (x1, y1), _ = datasets.mnist(real_root, download=False)
    x1 *= 0
    y1[:] = -1
    (x2, y2), _ = datasets.mnist(real_root, download=False)
    assert x2.max() == 1.0 and y2[:3].tolist() == [5, 0, 4]


def test_fastcnn_data_environment_variable(real_root, real_mnist, tmp_path, monkeypatch):
    _link_real(real_root, tmp_path)
    monkeypatch.setenv("FASTCNN_DATA", str(tmp_path))
    assert datasets.default_root() == str(tmp_path)
    (_, y_train), _ = datasets.mnist(download=False)
    np.testing.assert_array_equal(y_train, real_mnist[0][1])


def test_default_root_without_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTCNN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert datasets.default_root() == os.path.join(str(tmp_path), ".cache", "fastcnn")
    monkeypatch.setenv("FASTCNN_DATA", "")
    assert datasets.default_root() == os.path.join(str(tmp_path), ".cache", "fastcnn")


# ---------------------------------------------------------------------------------------------
# Missing and corrupt files


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.mnist(tmp_path, download=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message
    for base in FILES:
        assert base + ".gz" in message
    assert "download=True" in message
    assert not (tmp_path / "mnist").exists()  # nothing created


def test_one_missing_file_without_download(real_root, tmp_path):
    _link_real(real_root, tmp_path, name="fashion-mnist", only=FILES[:3])
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz") as info:
        datasets.fashion_mnist(tmp_path, download=False)
    assert "train-images" not in str(info.value)


def _images_idx(count, rows=28, cols=28, magic=2051, seed=0):
    header = np.array([magic, count, rows, cols], dtype=">u4").tobytes()
    pixels = np.random.default_rng(seed).integers(0, 256, size=count * rows * cols, dtype=np.uint8)
    return header + pixels.tobytes()


def _labels_idx(labels, magic=2049, count=None):
    labels = np.asarray(labels, dtype=np.uint8)
    header = np.array([magic, len(labels) if count is None else count], dtype=">u4").tobytes()
    return header + labels.tobytes()


def test_read_idx_small_files(tmp_path):
    img = _images_idx(3)
    (tmp_path / "img").write_bytes(img)
    (tmp_path / "img.gz").write_bytes(gzip.compress(img))
    a = read_idx_images(str(tmp_path / "img"))
    b = read_idx_images(str(tmp_path / "img.gz"))
    assert a.shape == (3, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.frombuffer(img[16:], np.uint8).reshape(3, 28, 28))
    np.testing.assert_array_equal(a, b)
    (tmp_path / "lab").write_bytes(_labels_idx([0, 9, 3]))
    assert read_idx_labels(str(tmp_path / "lab")).tolist() == [0, 9, 3]
    with pytest.raises(DatasetFileError, match="holds 3 samples, expected 5"):
        read_idx_labels(str(tmp_path / "lab"), expected_count=5)


CORRUPTIONS = {
    # name: (file name, bytes, phrase expected in the message)
    "empty": ("img", b"", "too short"),
    "short header": ("lab", b"\x00\x00\x08", "too short"),
    "image magic": ("img", _images_idx(2, magic=2049), "magic number 2049, expected 2051"),
    "label magic": ("lab", _labels_idx([1, 2], magic=2051), "magic number 2051, expected 2049"),
    "image size": ("img", _images_idx(2, rows=32, cols=32), "32x32 images, expected 28x28"),
    "images truncated": ("img", _images_idx(2)[:-1], "expected 1584"),
    "images too long": ("img", _images_idx(2) + b"\x00", "expected 1584"),
    "labels truncated": ("lab", _labels_idx([1, 2, 3], count=4), "expected 12"),
    "label out of range": ("lab", _labels_idx([1, 10, 3]), "label 10 at index 1"),
    "not gzip": ("img.gz", b"this is not gzip data at all", "not a valid gzip file"),
    "gzip truncated": ("img.gz", gzip.compress(_images_idx(2))[:-30], "not a valid gzip file"),
    "gzip crc": (
        "img.gz",
        gzip.compress(_images_idx(2))[:-8] + b"\x00\x00\x00\x00\x40\x06\x00\x00",
        "not a valid gzip file",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_small_files(tmp_path, case):
    name, data, phrase = CORRUPTIONS[case]
    path = tmp_path / name
    path.write_bytes(data)
    reader = read_idx_images if name.startswith("img") else read_idx_labels
    with pytest.raises(DatasetFileError) as info:
        reader(str(path))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert phrase in message
    assert str(path) in message and "Delete" in message and "download=True" in message


def test_flipped_byte_in_real_gzip_is_refused(real_root, tmp_path):
    folder = _link_real(real_root, tmp_path, only=FILES[:3])
    good = open(os.path.join(real_root, "mnist", FILES[3] + ".gz"), "rb").read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path = os.path.join(folder, FILES[3] + ".gz")
    with open(path, "wb") as f:
        f.write(bytes(bad))
    with pytest.raises(DatasetFileError, match="not a valid gzip file") as info:
        datasets.mnist(tmp_path, download=False)
    assert path in str(info.value)


def test_truncated_real_gzip_is_refused(real_root, tmp_path):
    folder = _link_real(real_root, tmp_path, only=FILES[1:])
    good = open(os.path.join(real_root, "mnist", FILES[0] + ".gz"), "rb").read()
    path = os.path.join(folder, FILES[0] + ".gz")
    with open(path, "wb") as f:
        f.write(good[: len(good) // 3])
    with pytest.raises(DatasetFileError, match="not a valid gzip file") as info:
        datasets.mnist(tmp_path, download=True, mirrors=["http://127.0.0.1:9/never-used/"])
    assert path in str(info.value) and "Delete" in str(info.value)
    assert os.path.getsize(path) == len(good) // 3  # a present file is reported, not overwritten


def test_swapped_train_and_test_files_are_refused(real_root, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for base in FILES:
        swapped = base.replace("train", "XXX").replace("t10k", "train").replace("XXX", "t10k")
        os.symlink(
            os.path.join(os.path.abspath(real_root), "mnist", swapped + ".gz"),
            folder / (base + ".gz"),
        )
    with pytest.raises(DatasetFileError, match="holds 10000 samples, expected 60000"):
        datasets.mnist(tmp_path, download=False)


# ---------------------------------------------------------------------------------------------
# Downloads (local server only)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder served, base URL) of an http.server on 127.0.0.1, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_from_local_server(real_root, real_mnist, http_root, tmp_path):
    served, url = http_root
    _link_real(real_root, served, dest="good")  # served/good/*.gz
    root = tmp_path / "data"
    # first mirror answers 404 for everything: the loader falls back to the second one
    (_, y_train), (x_test, y_test) = datasets.mnist(root, mirrors=[url + "missing/", url + "good"])
    folder = root / "mnist"
    assert sorted(os.listdir(folder)) == sorted(base + ".gz" for base in FILES)
    for base in FILES:
        digest = hashlib.sha256((folder / (base + ".gz")).read_bytes()).hexdigest()
        assert digest == datasets.DATASETS["mnist"]["files"][base]
    np.testing.assert_array_equal(y_train, real_mnist[0][1])
    np.testing.assert_array_equal(x_test, real_mnist[1][0])
    np.testing.assert_array_equal(y_test, real_mnist[1][1])


def test_download_corrupt_file_is_deleted(real_root, http_root, tmp_path):
    served, url = http_root
    (served / "bad").mkdir()
    good = open(os.path.join(real_root, "mnist", FILES[3] + ".gz"), "rb").read()
    bad = bytearray(good)
    bad[100] ^= 0x01
    (served / "bad" / (FILES[3] + ".gz")).write_bytes(bytes(bad))
    root = tmp_path / "data"
    folder = _link_real(real_root, root, only=FILES[:3])
    expected = datasets.DATASETS["mnist"]["files"][FILES[3]]
    actual = hashlib.sha256(bytes(bad)).hexdigest()
    with pytest.raises(ChecksumError) as info:
        datasets.mnist(root, mirrors=[url + "bad/"])
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert FILES[3] + ".gz" in message and expected in message and actual in message
    assert "deleted" in message
    assert sorted(os.listdir(folder)) == sorted(base + ".gz" for base in FILES[:3])  # nothing kept


def test_download_corrupt_then_good_mirror(real_root, http_root, tmp_path):
    served, url = http_root
    (served / "bad").mkdir()
    (served / "bad" / (FILES[3] + ".gz")).write_bytes(b"garbage")
    _link_real(real_root, served, dest="good", only=FILES[3:])
    root = tmp_path / "data"
    folder = _link_real(real_root, root, only=FILES[:3])
    _, (_, y_test) = datasets.mnist(root, mirrors=[url + "bad/", url + "good/"])
    assert y_test[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert _leftovers(folder) == []


def test_download_from_file_url(real_root, tmp_path):
    root = tmp_path / "data"
    _link_real(real_root, root, name="fashion-mnist", only=FILES[:2])
    mirror = "file://" + os.path.join(os.path.abspath(real_root), "fashion-mnist") + "/"
    _, (x_test, y_test) = datasets.fashion_mnist(root, mirrors=[mirror])
    assert x_test.shape == (10000, 1, 28, 28) and y_test[:3].tolist() == [9, 2, 1]
    assert (root / "fashion-mnist" / (FILES[2] + ".gz")).is_file()


def test_download_unreachable_mirror(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as info:
        datasets.mnist(root, mirrors=[f"http://127.0.0.1:{port}/"])
    assert isinstance(info.value, OSError)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and f"127.0.0.1:{port}" in message
    assert "mirrors=" in message
    assert os.listdir(root / "mnist") == []


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.load_dataset("cifar10")


def test_copy_of_real_folder_loads(real_root, tmp_path):
    """The loader reads a copy of a real data folder (what `cp -r` of it gives)."""
    shutil.copytree(
        os.path.join(real_root, "mnist"),
        tmp_path / "mnist",
        ignore=shutil.ignore_patterns("train-*"),
    )
    _link_real(real_root, tmp_path, only=FILES[:2])
    (_, y_train), _ = datasets.mnist(tmp_path, download=False)
    assert y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
