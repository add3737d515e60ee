"""MNIST and Fashion-MNIST loaders: the official IDX files, gzipped or not, downloaded on first use.
(CIFAR-10: :func:`cifar10`, in datasets_cifar10.py; your own images: :func:`image_folder`, in
datasets_folder.py.)

    (x_train, y_train), (x_test, y_test) = fastcnn.datasets.mnist()

x is float32 of shape (N, 1, 28, 28) scaled to [0, 1] (pixel / 255, as torchvision's ToTensor),
y is int64 in 0..9. Files live in ``root``, else ``$FASTCNN_DATA``, else ``~/.cache/fastcnn``,
each data set in its own subfolder (``mnist/``, ``fashion-mnist/``), under their official names
(``train-images-idx3-ubyte.gz`` ... or the same names without ``.gz``).

Errors (all name the file and say what to do):
- ``DatasetNotFoundError`` (a ``FileNotFoundError``, so an ``OSError``): files missing and
  ``download=False``.
- ``DatasetFileError`` (a ``ValueError``): a file that is present but truncated, not gzip, of the
  wrong magic, counts or length, with labels outside 0..9, or images and labels that disagree.
- ``ChecksumError`` (a ``DatasetFileError``): a downloaded file whose sha256 is not the published
  one. It has been deleted; it is never used.
- ``DownloadError`` (an ``OSError``): no mirror could deliver a missing file (no network, ...).

Downloads go to a temporary file in the destination folder, are checked against the published
sha256 and only then renamed into place, so an interrupted or corrupted download never leaves a
file that looks valid; a mirror sending more than 64 MB (the largest official file is 26.4 MB)
is cut off and the next one tried. Files already present are not re-hashed: they are checked by
their IDX header and exact length (and, for .gz, by gzip's own CRC32) when they are read.

Reading never takes more memory than the header declares: the header is read and checked first
(magic, image size, and the sample count when the caller knows it, as ``mnist()`` does), an
uncompressed file must then have exactly the declared size on disk (a huge or sparse file is
refused before it is read), and a gzip file is decompressed into an array of the declared size
and refused as soon as it holds more (a few MB of gzipped zeros cannot expand to gigabytes).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import secrets
import threading
import time
import urllib.request
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._types import Array

__all__ = [
    "mnist",
    "fashion_mnist",
    "cifar10",
    "image_folder",
    "load_dataset",
    "default_root",
    "clear_cache",
    "read_idx_images",
    "read_idx_labels",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetFileError",
    "ChecksumError",
    "DownloadError",
    "DATASETS",
    "CIFAR10_CLASSES",
    "ImageFolder",
]

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
ROWS = COLS = 28
NUM_CLASSES = 10


class DatasetError(Exception):
    """Base class of every error raised by fastcnn.datasets."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """Data set files are missing and download=False."""


class DatasetFileError(DatasetError, ValueError):
    """A data set file is present but unreadable: truncated, corrupt, or not the expected IDX
    file."""


class ChecksumError(DatasetFileError):
    """A downloaded file does not have the published sha256 (it has been deleted)."""


class DownloadError(DatasetError, OSError):
    """No mirror could deliver a missing file."""


# Published sha256 of the official .gz files (as torchvision and zalandoresearch list them).
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {
        "folder": "mnist",
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "files": _MNIST_SHA256,
    },
    "fashion-mnist": {
        "folder": "fashion-mnist",
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": _FASHION_MNIST_SHA256,
    },
}
_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

_DOWNLOAD_TIMEOUT = 60.0  # seconds without data before a mirror is given up
# The largest official file is Fashion-MNIST's train-images-idx3-ubyte.gz, 26.4 MB: a mirror that
# sends more (an endless stream, a wrong file) is cut off there instead of filling the disk.
_MAX_DOWNLOAD = 64 * 2**20
_CHUNK = 1 << 20


def default_root() -> str:
    """The data folder used when root=None: $FASTCNN_DATA if set and non-empty, else
    ~/.cache/fastcnn."""
    env = os.environ.get("FASTCNN_DATA")
    return (
        os.path.expanduser(env)
        if env
        else os.path.join(os.path.expanduser("~"), ".cache", "fastcnn")
    )


def mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """MNIST handwritten digits: ((x_train, y_train), (x_test, y_test)), 60000 + 10000 samples.

    x float32 (N, 1, 28, 28) in [0, 1], y int64 in 0..9. ``mirrors``: list of base URLs to
    download missing files from (default: torchvision's mirrors), e.g. "file:///data/mnist/".
    """
    return load_dataset("mnist", root=root, download=download, mirrors=mirrors)


def fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Fashion-MNIST (Zalando): same shapes, dtypes and API as :func:`mnist`."""
    return load_dataset("fashion-mnist", root=root, download=download, mirrors=mirrors)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: str | Sequence[str] | None = None,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Load data set ``name`` ("mnist" or "fashion-mnist"); see :func:`mnist`."""
    if name not in DATASETS:
        raise ValueError(f"fastcnn.datasets: unknown data set {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    root = default_root() if root is None else os.path.expanduser(os.fspath(root))
    folder = os.path.join(root, spec["folder"])
    if mirrors is None:
        mirrors = spec["mirrors"]
    elif isinstance(mirrors, str):
        mirrors = [mirrors]
    paths = _ensure_files(name, folder, spec["files"], download, list(mirrors))
    out: list[tuple[Array, Array]] = []
    for split in ("train", "test"):
        image_name, label_name, count = _SPLITS[split]
        images = read_idx_images(paths[image_name], expected_count=count)
        labels = read_idx_labels(paths[label_name], expected_count=count)
        # Both counts were checked equal to `count`; kept as a separate check for clarity.
        if len(images) != len(labels):  # pragma: no cover - implied by expected_count
            raise DatasetFileError(
                f"fastcnn.datasets: {paths[image_name]} holds {len(images)} images but "
                f"{paths[label_name]} holds {len(labels)} labels"
            )
        x = np.empty((len(images), 1, ROWS, COLS), dtype=np.float32)
        np.divide(images.reshape(x.shape), np.float32(255), out=x, dtype=np.float32)
        out.append((x, labels.astype(np.int64)))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Locating and downloading files


def _existing(folder, base):
    """Path of the file for `base` in `folder`: the uncompressed one if present (faster), else
    .gz."""
    for candidate in (base, base + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _ensure_files(name, folder, files, download, mirrors):
    paths, missing = {}, []
    for base in files:
        path = _existing(folder, base)
        if path is None:
            missing.append(base)
        else:
            paths[base] = path
    if missing and not download:
        listing = ", ".join(f"{b}.gz (or {b})" for b in missing)
        raise DatasetNotFoundError(
            f"fastcnn.datasets: {name} files missing in {folder}: {listing}. "
            f"Call with download=True to fetch them, or copy the official files there, or point "
            f"root= / $FASTCNN_DATA at the folder that holds {DATASETS[name]['folder']}/."
        )
    if missing:
        if not mirrors:
            raise DownloadError(
                f"fastcnn.datasets: {name} files missing in {folder} and no mirror given"
            )
        os.makedirs(folder, exist_ok=True)
        for base in missing:
            paths[base] = _download(base + ".gz", folder, files[base], mirrors)
    return paths


def _download(filename, folder, sha256, mirrors, algorithm="sha256", max_bytes=None):
    """Fetch `filename` from the first mirror that delivers it with the right digest."""
    dest = os.path.join(folder, filename)
    failures, bad_checksum = [], False
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += filename
        try:
            _fetch_verified(url, dest, sha256, algorithm, max_bytes)
            return dest
        except ChecksumError as exc:
            bad_checksum = True
            failures.append(str(exc))
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            failures.append(f"{url}: {exc}")
    detail = "\n  ".join(failures)
    if bad_checksum:
        raise ChecksumError(
            f"fastcnn.datasets: could not download a valid {dest}; the mismatching downloads were "
            f"deleted. Attempts:\n  {detail}"
        )
    raise DownloadError(
        f"fastcnn.datasets: could not download {dest}. Attempts:\n  {detail}\n"
        f"Without internet access, copy the official {filename} into {folder} "
        f"(or pass mirrors= a reachable location, e.g. 'file:///path/to/folder/')."
    )


def _fetch_verified(url, dest, sha256, algorithm="sha256", max_bytes=None):
    max_bytes = _MAX_DOWNLOAD if max_bytes is None else max_bytes
    folder, filename = os.path.split(dest)
    tmp = os.path.join(folder, f".{filename}.{secrets.token_hex(6)}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "fastcnn"})
    digest = hashlib.new(algorithm)
    try:
        with (
            urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT) as response,
            open(tmp, "xb") as f,
        ):
            size = 0
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(
                        f"{url}: sent more than {max_bytes} bytes, more than any official "
                        f"{filename}: stopped, the partial file deleted"
                    )
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(
                f"{url}: downloaded {filename} has {algorithm} {actual}, expected {sha256}; "
                f"the file was deleted, not used"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# Reading IDX files

# (path, size, mtime_ns, ctime_ns, inode, kind) -> read-only uint8 array of the decoded payload
_cache: OrderedDict[tuple[str, int, int, int, int, str], Array] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_ENTRIES = 8


def clear_cache() -> None:
    """Forget the decoded files kept in memory (each load after this re-reads the disk)."""
    with _cache_lock:
        _cache.clear()


def _fix_hint(path):
    return (
        f"Delete {path} and re-run with download=True to fetch it again (or copy a good file "
        "there)."
    )


# A file is cached only if it was last changed at least this long before it was read: a file
# rewritten within one tick of a coarse file-system clock (FAT: 2 s; many kernels: a few ms)
# keeps its size and timestamps, and must not be served from the cache (git's "racy" files).
_RACY_NS = 3_000_000_000


def _cached_idx(path, kind, expected_count):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, kind)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    array = _read_idx(path, kind, expected_count)
    array.flags.writeable = False
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
        return array  # changed just now: may change again with the same timestamps
    with _cache_lock:
        _cache[key] = array
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return array


# Deflate expands at most 1032:1 (zlib's documentation of its "maximum compression factor"): a
# header declaring more decoded bytes than that bound allows is refused before decompressing.
_GZIP_MAX_RATIO = 1032
_IDX = {  # kind: (magic number, number of 4-byte header integers)
    "images": (IMAGE_MAGIC, 4),
    "labels": (LABEL_MAGIC, 2),
}


def _read_into(f, view):
    """Fill `view` from the file object `f` as far as it goes; returns the number of bytes read."""
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


def _read_idx(path, kind, expected_count):
    """Decoded IDX file of `kind` as a uint8 array (images (N, 28, 28), labels (N,)).

    The header is read and checked first; the payload is then read into an array of exactly the
    size the header declares, never more: an uncompressed file must have that size on disk (a huge
    or sparse file is refused by its size), and decompression stops one byte past the declared
    size (a small gzip that expands to gigabytes is refused after at most the declared size).
    """
    magic, n_ints = _IDX[kind]
    header_size = 4 * n_ints
    gz = path.endswith(".gz")
    try:
        file_size = os.stat(path).st_size
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as exc:
        raise DatasetFileError(
            f"fastcnn.datasets: cannot read {path}: {exc}. {_fix_hint(path)}"
        ) from exc
    try:
        with f:
            head = f.read(header_size)
            values = _header(path, head, magic, n_ints, kind)
            count = values[0]
            if kind == "images":
                rows, cols = values[1:]
                if (rows, cols) != (ROWS, COLS):
                    raise DatasetFileError(
                        f"fastcnn.datasets: {path} holds {rows}x{cols} images, expected "
                        f"{ROWS}x{COLS}. {_fix_hint(path)}"
                    )
                expected = header_size + count * rows * cols
                what = f"{header_size}-byte header + {count} images of {rows}x{cols}"
            else:
                expected = header_size + count
                what = f"{header_size}-byte header + {count} labels"
            if expected_count is not None and count != expected_count:
                raise DatasetFileError(
                    f"fastcnn.datasets: {path} holds {count} samples, expected {expected_count} "
                    f"(wrong file in this place?). {_fix_hint(path)}"
                )
            if not gz and file_size != expected:
                raise DatasetFileError(
                    f"fastcnn.datasets: {path} has {file_size} bytes of IDX data, expected "
                    f"{expected} ({what}): truncated or corrupt. {_fix_hint(path)}"
                )
            if gz and expected > _GZIP_MAX_RATIO * file_size + 1024:
                raise DatasetFileError(
                    f"fastcnn.datasets: {path} declares {expected} bytes of IDX data ({what}), "
                    f"more than a gzip file of {file_size} bytes can hold: corrupt. "
                    f"{_fix_hint(path)}"
                )
            try:
                data = np.empty(expected, dtype=np.uint8)
            except MemoryError:
                raise DatasetFileError(
                    f"fastcnn.datasets: {path} declares {expected} bytes of IDX data ({what}): not "
                    f"enough memory to hold them"
                ) from None
            data[:header_size] = np.frombuffer(head, dtype=np.uint8)
            got = header_size + _read_into(f, memoryview(data)[header_size:])  # type: ignore[arg-type]
            if got == expected and f.read(1):
                raise DatasetFileError(
                    f"fastcnn.datasets: {path} holds more than {expected} bytes of IDX data, "
                    f"expected {expected} ({what}): corrupt (reading stopped there). "
                    f"{_fix_hint(path)}"
                )
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        if not gz:
            raise DatasetFileError(
                f"fastcnn.datasets: cannot read {path}: {exc}. {_fix_hint(path)}"
            ) from exc
        raise DatasetFileError(
            f"fastcnn.datasets: {path} is not a valid gzip file (truncated or corrupt: {exc}). "
            f"{_fix_hint(path)}"
        ) from exc
    if got != expected:
        raise DatasetFileError(
            f"fastcnn.datasets: {path} has {got} bytes of IDX data, expected {expected} "
            f"({what}): truncated or corrupt. {_fix_hint(path)}"
        )
    if kind == "images":
        return data[header_size:].reshape(count, ROWS, COLS)
    labels = data[header_size:]
    if count and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DatasetFileError(
            f"fastcnn.datasets: {path} has label {int(labels[bad])} at index {bad}, expected 0..9. "
            f"{_fix_hint(path)}"
        )
    return labels


def _header(path, data, magic, n_ints, kind):
    size = 4 * n_ints
    if len(data) < size:
        raise DatasetFileError(
            f"fastcnn.datasets: {path} is too short ({len(data)} bytes) for an IDX {kind} header "
            f"of {size} bytes. {_fix_hint(path)}"
        )
    values = np.frombuffer(data, dtype=">u4", count=n_ints)
    if int(values[0]) != magic:
        raise DatasetFileError(
            f"fastcnn.datasets: {path} has magic number {int(values[0])}, expected {magic} "
            f"(IDX {kind} file). {_fix_hint(path)}"
        )
    return [int(v) for v in values[1:]]


def _check_count(path, array, expected_count):
    if expected_count is not None and len(array) != expected_count:
        raise DatasetFileError(
            f"fastcnn.datasets: {path} holds {len(array)} samples, expected {expected_count} "
            f"(wrong file in this place?). {_fix_hint(path)}"
        )
    return array


def read_idx_images(path: str | os.PathLike[str], expected_count: int | None = None) -> Array:
    """uint8 array (N, 28, 28) from an IDX image file (gzipped if the name ends in .gz).

    Read-only view shared with the in-process cache: copy it before writing into it.
    """
    path = os.fspath(path)
    return _check_count(path, _cached_idx(path, "images", expected_count), expected_count)


def read_idx_labels(path: str | os.PathLike[str], expected_count: int | None = None) -> Array:
    """uint8 array (N,) of labels 0..9 from an IDX label file (read-only, cached)."""
    path = os.fspath(path)
    return _check_count(path, _cached_idx(path, "labels", expected_count), expected_count)


# The other data sets, in modules of their own (they use the errors and downloads above).
from .datasets_cifar10 import CLASSES as CIFAR10_CLASSES  # noqa: E402
from .datasets_cifar10 import cifar10  # noqa: E402
from .datasets_folder import ImageFolder, image_folder  # noqa: E402
