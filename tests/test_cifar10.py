"""fastcnn.datasets.cifar10 on small files written in the official binary layout: reading,
extraction from the archive, download from a mirror with its MD5 checked, and refusals of
files that are not CIFAR-10 batches (without reading more than they really hold)."""

import gzip
import hashlib
import os
import tarfile

import numpy as np
import pytest

from cifar_files import expected, write_archive, write_folder
from fastcnn import datasets
from fastcnn import datasets_cifar10 as c10


@pytest.mark.parametrize("layout", ["extracted", "flat"])
def test_reads_the_official_layout(tmp_path, layout):
    folder = tmp_path / "cifar10"
    where = folder / "cifar-10-batches-bin" if layout == "extracted" else folder
    content = write_folder(where)
    (x, y), (xt, yt) = datasets.cifar10(root=tmp_path, download=False, dtype=np.uint8)
    (ex, ey), (ext, eyt) = expected(content)
    assert x.shape == (30, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(xt, ext)
    np.testing.assert_array_equal(yt, eyt)
    # float32: pixel / 255, as mnist()
    (xf, yf), _ = datasets.cifar10(root=tmp_path, download=False)
    assert xf.dtype == np.float32
    np.testing.assert_array_equal(xf, ex / np.float32(255))


def test_record_layout_is_label_then_red_green_blue_planes(tmp_path):
    folder = tmp_path / "cifar10"
    write_folder(folder)
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1 : 1 + 1024] = 10  # red
    record[1 + 1024 : 1 + 2048] = 20  # green
    record[1 + 2048 + 33] = 99  # blue, row 1, column 1
    (folder / "test_batch.bin").write_bytes(record.tobytes())
    _, (xt, yt) = datasets.cifar10(root=tmp_path, download=False, dtype=np.uint8)
    assert yt.tolist() == [7]
    assert (xt[0, 0] == 10).all() and (xt[0, 1] == 20).all()
    assert xt[0, 2, 1, 1] == 99 and xt[0, 2].sum() == 99


def test_the_archive_is_extracted_when_the_files_are_missing(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    content = write_archive(folder / "cifar-10-binary.tar.gz")
    (x, y), (xt, yt) = datasets.cifar10(root=tmp_path, download=False, dtype=np.uint8)
    (ex, ey), (ext, eyt) = expected(content)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(yt, eyt)
    files = sorted(os.listdir(folder / "cifar-10-batches-bin"))
    assert "batches.meta.txt" in files and "readme.html" not in files
    assert not [f for f in files if f.startswith(".")]  # no temporary file left


def test_download_from_a_mirror_checks_the_md5(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "cifar-10-binary.tar.gz"
    content = write_archive(archive)
    data = archive.read_bytes()
    monkeypatch.setattr(c10, "ARCHIVE_SIZE", len(data))
    # a mirror sending another file: refused, deleted
    monkeypatch.setattr(c10, "ARCHIVE_MD5", "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(datasets.ChecksumError, match="md5"):
        datasets.cifar10(root=root, mirrors=served.as_uri() + "/")
    assert os.listdir(root / "cifar10") == []
    monkeypatch.setattr(c10, "ARCHIVE_MD5", hashlib.md5(data).hexdigest())
    (x, _), _ = datasets.cifar10(root=root, mirrors=served.as_uri() + "/", dtype=np.uint8)
    np.testing.assert_array_equal(x, expected(content)[0][0])


def test_missing_files_without_download_say_what_to_do(tmp_path):
    with pytest.raises(datasets.DatasetNotFoundError, match="download=True.*cifar10/"):
        datasets.cifar10(root=tmp_path, download=False)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "whole number of 3073-byte"),
        (lambda p: p.write_bytes(b""), "whole number"),
        (lambda p: p.write_bytes(b"\x0a" + bytes(3072)), "label 10 in record 0"),
    ],
)
def test_bad_batch_files_are_refused_naming_the_file(tmp_path, edit, match):
    folder = tmp_path / "cifar10"
    write_folder(folder)
    edit(folder / "data_batch_3.bin")
    with pytest.raises(datasets.DatasetFileError, match=match) as info:
        datasets.cifar10(root=tmp_path, download=False)
    assert str(folder / "data_batch_3.bin") in str(info.value)


def test_a_huge_sparse_batch_file_is_refused_by_its_size_before_reading(tmp_path):
    folder = tmp_path / "cifar10"
    write_folder(folder)
    with open(folder / "data_batch_1.bin", "r+b") as f:
        f.truncate(3073 * 10**7)  # 30 GB claimed, nothing on disk
    with pytest.raises(datasets.DatasetFileError, match="at most 10000"):
        datasets.cifar10(root=tmp_path, download=False)


def test_hostile_archives_are_refused(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = folder / "cifar-10-binary.tar.gz"
    write_archive(archive, extra_members=[("../escape.bin", b"x")])  # never extracted
    datasets.cifar10(root=tmp_path, download=False)
    assert not (tmp_path / "escape.bin").exists() and not (folder / "escape.bin").exists()
    # a member declaring more than any CIFAR-10 file: refused from its header
    big = tmp_path / "big" / "cifar10"
    big.mkdir(parents=True)
    info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
    info.size = 3073 * 20000
    header_only = info.tobuf() + bytes(1024)  # the content is never there, nor read
    (big / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(header_only))
    with pytest.raises(datasets.DatasetFileError, match="not a CIFAR-10 batch"):
        datasets.cifar10(root=tmp_path / "big", download=False)
    # not an archive at all
    bad = tmp_path / "bad" / "cifar10"
    bad.mkdir(parents=True)
    (bad / "cifar-10-binary.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(datasets.DatasetFileError, match="cannot extract"):
        datasets.cifar10(root=tmp_path / "bad", download=False)


def test_dtype_is_checked():
    with pytest.raises(ValueError, match="cifar10: dtype must be np.float32 or np.uint8"):
        datasets.cifar10(dtype=np.float64)
