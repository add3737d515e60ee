"""The IDX readers and load_dataset on valid, truncated, extended and corrupt files."""

import gzip
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastcnn import datasets
from fuzzing.common import expect_error, fuzz, tally

# ---------------------------------------------------------------------------------------------
# data set readers: valid, truncated, extended, bit-flipped and random IDX files, gzipped or not


_TMP = tempfile.mkdtemp(prefix="fastcnn-fuzz-")


def _idx_bytes(which, count, rng, bad_label=False):
    if which == "images":
        header = np.array([2051, count, 28, 28], ">u4").tobytes()
        return header + rng.integers(0, 256, count * 784, dtype=np.uint8).tobytes()
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    if bad_label and count:
        labels[rng.integers(0, count)] = rng.integers(10, 256)
    return np.array([2049, count], ">u4").tobytes() + labels.tobytes()


def _expected_idx(which, raw):
    """The array the spec says ``raw`` (decompressed) holds, or None when it must be refused."""
    n_ints, magic = (4, 2051) if which == "images" else (2, 2049)
    if len(raw) < 4 * n_ints:
        return None
    head = np.frombuffer(raw, ">u4", count=n_ints)
    if int(head[0]) != magic:
        return None
    if which == "images":
        count, rows, cols = (int(v) for v in head[1:])
        if (rows, cols) != (28, 28) or len(raw) != 16 + count * 784:
            return None
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28)
    count = int(head[1])
    if len(raw) != 8 + count:
        return None
    labels = np.frombuffer(raw, np.uint8, offset=8)
    return None if count and labels.max() >= 10 else labels


def _mutate(raw, how, rng):
    b = bytearray(raw)
    if how == "truncate" and b:
        return bytes(b[: int(rng.integers(0, len(b)))])
    if how == "extend":
        return bytes(b) + rng.integers(0, 256, int(rng.integers(1, 5)), dtype=np.uint8).tobytes()
    if how == "flip" and b:
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(b)
    if how == "random":
        return rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    if how == "header" and len(b) >= 8:
        i = int(rng.integers(0, 8))
        b[i] = int(rng.integers(0, 256))
        return bytes(b)
    return bytes(b)


def _check_idx_read(which, path, payload, expected_count):
    reader = datasets.read_idx_images if which == "images" else datasets.read_idx_labels
    try:
        raw = gzip.decompress(payload) if path.endswith(".gz") else payload
    except (OSError, EOFError, Exception):
        raw = None
    expected = None if raw is None else _expected_idx(which, raw)
    if expected is not None and expected_count is not None and len(expected) != expected_count:
        expected = None
    if expected is None:
        exc = expect_error(lambda: reader(path, expected_count=expected_count), ValueError, path)
        assert isinstance(exc, datasets.DatasetFileError)
        return "invalid"
    got = reader(path, expected_count=expected_count)
    assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
    assert not got.flags.writeable
    return "valid"


@fuzz(1.0)
@given(data=st.data(), which=st.sampled_from(["images", "labels"]), gz=st.booleans())
def test_idx_files(data, which, gz):
    d = data.draw
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    count = d(st.integers(0, 3))
    raw = _idx_bytes(which, count, rng, bad_label=d(st.integers(0, 5)) == 0)
    how = d(st.sampled_from(["none", "none", "truncate", "extend", "flip", "random", "header"]))
    after_gzip = gz and d(st.booleans())  # corrupt the compressed bytes instead of the content
    payload = raw if after_gzip else _mutate(raw, how, rng)
    if gz:
        payload = gzip.compress(payload, mtime=0)
        if after_gzip:
            payload = _mutate(payload, how, rng)
    # the same path for every example: a file replaced by another one must never be served
    # from the reader's in-memory cache
    path = os.path.join(_TMP, f"{which}-idx-ubyte" + (".gz" if gz else ""))
    with open(path, "wb") as f:
        f.write(payload)
    if d(st.booleans()):  # a coarse clock: every write gets the same old timestamp
        os.utime(path, ns=(10**18, 10**18))
    expected_count = d(st.sampled_from([None, None, count, count + 1]))
    tally("datasets.read_idx", _check_idx_read(which, path, payload, expected_count))
    # then replaced in place by a same-size file with one byte changed, at once
    if payload and d(st.booleans()):
        b = bytearray(payload)
        b[int(rng.integers(0, len(b)))] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(b))
        if d(st.booleans()):
            os.utime(path, ns=(10**18, 10**18))
        tally(
            "datasets.read_idx (rewritten)", _check_idx_read(which, path, bytes(b), expected_count)
        )


@fuzz(0.3)
@given(data=st.data())
def test_load_dataset_folder(data):
    """A data folder with some files missing, tiny, empty or random: a clear error every time."""
    d = data.draw
    root = tempfile.mkdtemp(dir=_TMP)
    name = d(st.sampled_from(["mnist", "fashion-mnist"]))
    folder = os.path.join(root, name)
    os.makedirs(folder)
    rng = np.random.default_rng(d(st.integers(0, 99)))
    present = []
    for base in datasets.DATASETS[name]["files"]:
        choice = d(st.sampled_from(["missing", "tiny", "empty", "random", "gz-random"]))
        if choice == "missing":
            continue
        which = "images" if "images" in base else "labels"
        content = {
            "tiny": _idx_bytes(which, 2, rng),
            "empty": b"",
            "random": rng.integers(0, 256, 40, dtype=np.uint8).tobytes(),
        }.get(choice)
        path = os.path.join(folder, base + (".gz" if choice == "gz-random" else ""))
        with open(path, "wb") as f:
            f.write(
                rng.integers(0, 256, 30, dtype=np.uint8).tobytes() if content is None else content
            )
        present.append(base)
    if len(present) < 4:
        with pytest.raises(datasets.DatasetNotFoundError) as info:
            datasets.load_dataset(name, root=root, download=False)
        assert folder in str(info.value)
    else:
        with pytest.raises(datasets.DatasetFileError) as info:
            datasets.load_dataset(name, root=root, download=False)
        assert folder in str(info.value)
    tally("datasets.load_dataset", "invalid")
