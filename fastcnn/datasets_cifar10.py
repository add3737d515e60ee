"""CIFAR-10 from its official binary version (``cifar-10-binary.tar.gz``, "suitable for C
programs": no pickle is ever read).

    (x_train, y_train), (x_test, y_test) = fastcnn.datasets.cifar10()

x is (N, 3, 32, 32), float32 in [0, 1] (pixel / 255) or, with ``dtype=np.uint8``, the pixels
themselves (a quarter of the memory; fit, evaluate, predict and the DataLoader scale uint8
batches as they go); y is int64 in 0..9 (:data:`CLASSES` names them). 50000 + 10000 images.

Files: ``root/cifar10/`` (root: the argument, else ``$FASTCNN_DATA``, else ``~/.cache/fastcnn``)
holds the archive and, extracted next to it, ``cifar-10-batches-bin/`` with ``data_batch_1.bin``
.. ``data_batch_5.bin``, ``test_batch.bin`` and ``batches.meta.txt``; the .bin files may also sit
directly in ``root/cifar10/`` (copy them there to work offline). Missing files are extracted from
the archive, which is downloaded if absent and ``download=True``: checked against the size and
MD5 the data set's page publishes (it publishes no SHA-256) before it is used.

Each .bin file is records of 1 label byte (0..9) and 3072 pixel bytes (1024 red, 1024 green,
1024 blue, rows top to bottom): a file must hold a whole number of records, at most 10000 (the
official files hold exactly 10000; smaller ones are accepted, for tests and subsets). A file is
never read beyond that bound: no more memory than its real content, whatever its size claims.
Extraction reads only the seven known members of the archive, each checked by its declared size
before a byte of it is read, and writes each file atomically.
"""

from __future__ import annotations

import os
import secrets
import tarfile
import zlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from . import datasets as _ds
from ._types import Array

__all__ = ["cifar10", "read_cifar10_folder", "read_cifar10_batch", "CLASSES", "find_cifar10_files"]

URL = "https://www.cs.toronto.edu/~kriz/"
ARCHIVE = "cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the data set's page
ARCHIVE_SIZE = 170_052_171
FOLDER = "cifar10"
MEMBER_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
META = "batches.meta.txt"
RECORD = 1 + 3 * 32 * 32
MAX_RECORDS = 10_000
_MAX_META = 4096
_MAX_MEMBERS = 64  # the official archive has 8 entries (a folder, 7 files)
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def cifar10(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
    dtype: DTypeLike = np.float32,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """CIFAR-10: ((x_train, y_train), (x_test, y_test)); see the module's docstring.

    ``mirrors``: base URLs to download the archive from (default: the data set's page);
    ``dtype``: np.float32 (scaled to [0, 1]) or np.uint8 (the pixels)."""
    dtype = _check_dtype(dtype, "cifar10")
    root = _ds.default_root() if root is None else os.path.expanduser(os.fspath(root))
    folder = os.path.join(root, FOLDER)
    files = find_cifar10_files(folder)
    if files is None:
        archive = os.path.join(folder, ARCHIVE)
        if not os.path.isfile(archive):
            if not download:
                raise _ds.DatasetNotFoundError(
                    f"fastcnn.datasets: CIFAR-10 files missing in {folder}: neither "
                    f"{MEMBER_DIR}/data_batch_1.bin ... test_batch.bin nor {ARCHIVE}. Call with "
                    "download=True to fetch them, or copy the official archive (or its extracted "
                    f"files) there, or point root= / $FASTCNN_DATA at the folder holding {FOLDER}/."
                )
            os.makedirs(folder, exist_ok=True)
            bases = [mirrors] if isinstance(mirrors, str) else list(mirrors or [URL])
            _ds._download(ARCHIVE, folder, ARCHIVE_MD5, bases, "md5", ARCHIVE_SIZE + 1)
        extract(archive, os.path.join(folder, MEMBER_DIR))
        files = find_cifar10_files(folder)
        assert files is not None  # extract() wrote every file or raised
    return read_cifar10_folder(files, dtype)


def _check_dtype(dtype, what):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError(f"{what}: dtype must be np.float32 or np.uint8, got {dt}")
    return dt


def find_cifar10_files(folder: str | os.PathLike[str]) -> str | None:
    """The folder holding the six .bin files: ``folder/cifar-10-batches-bin`` or ``folder``."""
    folder = os.fspath(folder)
    for candidate in (os.path.join(folder, MEMBER_DIR), folder):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in TRAIN_FILES + TEST_FILES):
            return candidate
    return None


def read_cifar10_folder(
    folder: str | os.PathLike[str], dtype: DTypeLike = np.float32
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """((x_train, y_train), (x_test, y_test)) from the six .bin files in ``folder``."""
    dt = _check_dtype(dtype, "read_cifar10_folder")
    folder = os.fspath(folder)
    out = []
    for names in (TRAIN_FILES, TEST_FILES):
        parts = [read_cifar10_batch(os.path.join(folder, n)) for n in names]
        pixels = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if dt == np.uint8:
            x = pixels
        else:
            x = np.empty(pixels.shape, dtype=np.float32)
            np.divide(pixels, np.float32(255), out=x, dtype=np.float32)
        out.append((x, y))
    return out[0], out[1]


def read_cifar10_batch(path: str | os.PathLike[str]) -> tuple[Array, Array]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of one CIFAR-10 binary batch file."""
    path = os.fspath(path)
    hint = _ds._fix_hint(path)
    try:
        size = os.stat(path).st_size
        if size == 0 or size % RECORD or size > MAX_RECORDS * RECORD:
            raise _ds.DatasetFileError(
                f"fastcnn.datasets: {path} has {size} bytes, expected a whole number of "
                f"{RECORD}-byte CIFAR-10 records (1 label + 3072 pixels), at most {MAX_RECORDS} "
                f"({MAX_RECORDS * RECORD} bytes): truncated or not a CIFAR-10 batch. {hint}"
            )
        data = np.empty(size, dtype=np.uint8)
        with open(path, "rb") as f:
            got = _ds._read_into(f, memoryview(data))  # type: ignore[arg-type]
            extra = f.read(1)
    except OSError as exc:
        raise _ds.DatasetFileError(f"fastcnn.datasets: cannot read {path}: {exc}. {hint}") from exc
    if got != size or extra:
        raise _ds.DatasetFileError(
            f"fastcnn.datasets: {path} changed size while it was read. {hint}"
        )
    records = data.reshape(-1, RECORD)
    labels = records[:, 0]
    if int(labels.max()) >= len(CLASSES):
        bad = int(np.argmax(labels >= len(CLASSES)))
        raise _ds.DatasetFileError(
            f"fastcnn.datasets: {path} has label {int(labels[bad])} in record {bad}, expected "
            f"0..9: not a CIFAR-10 batch. {hint}"
        )
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Write the .bin files and batches.meta.txt of the official archive into ``dest``."""
    archive, dest = os.fspath(archive), os.fspath(dest)
    hint = _ds._fix_hint(archive)
    wanted = {f"{MEMBER_DIR}/{n}": n for n in TRAIN_FILES + TEST_FILES + (META,)}
    os.makedirs(dest, exist_ok=True)
    found = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for count, member in enumerate(tar):
                if count >= _MAX_MEMBERS:
                    raise _ds.DatasetFileError(
                        f"fastcnn.datasets: {archive} holds more than {_MAX_MEMBERS} entries: "
                        f"not the CIFAR-10 binary archive. {hint}"
                    )
                name = wanted.get(member.name)
                if name is None:
                    if member.size > MAX_RECORDS * RECORD:  # skipping it would inflate it all
                        raise _ds.DatasetFileError(
                            f"fastcnn.datasets: {archive}: {member.name} declares "
                            f"{member.size} bytes, more than any file of the CIFAR-10 binary "
                            f"archive. {hint}"
                        )
                    continue
                limit = _MAX_META if name == META else MAX_RECORDS * RECORD
                ok = member.isfile() and member.size <= limit
                if name != META:
                    ok = ok and member.size > 0 and member.size % RECORD == 0
                if not ok:
                    raise _ds.DatasetFileError(
                        f"fastcnn.datasets: {archive}: {member.name} is not a CIFAR-10 batch "
                        f"file ({member.size} bytes). {hint}"
                    )
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source:
                    content = source.read(member.size)
                if len(content) != member.size:
                    raise _ds.DatasetFileError(
                        f"fastcnn.datasets: {archive} is truncated in {member.name}. {hint}"
                    )
                _write_atomically(os.path.join(dest, name), content)
                found.add(name)
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, _ds.DatasetError):
            raise
        raise _ds.DatasetFileError(
            f"fastcnn.datasets: cannot extract {archive}: {exc}. {hint}"
        ) from exc
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise _ds.DatasetFileError(
            f"fastcnn.datasets: {archive} lacks {', '.join(missing)} (in {MEMBER_DIR}/): not "
            f"the CIFAR-10 binary archive. {hint}"
        )


def _write_atomically(path, content):
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.part")
    try:
        with open(tmp, "xb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
