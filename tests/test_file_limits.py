"""Hostile files cost no more memory than they declare (issue 14, item 3).

Each case runs the reader in a child process under an address-space limit (RLIMIT_AS), so a
regression fails the test (MemoryError, or a peak over 500 MB) instead of the machine: a few MB of
gzip that expand to gigabytes behind a valid IDX header, a header declaring more than a gzip file
can hold, and huge sparse files passed as an IDX file or as a checkpoint.
"""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20,) * 2)  # a regression fails, not the machine
kind, path = sys.argv[1], sys.argv[2]
expected_count = int(sys.argv[3]) if len(sys.argv) > 3 else None
if kind == "checkpoint":
    from fastcnn import checkpoint
    try:
        checkpoint.load(path)
        print("LOADED")
    except checkpoint.CheckpointError as exc:
        print("REFUSED", exc)
else:
    from fastcnn import datasets
    reader = datasets.read_idx_images if kind == "images" else datasets.read_idx_labels
    try:
        reader(path, expected_count=expected_count)
        print("LOADED")
    except datasets.DatasetFileError as exc:
        print("REFUSED", exc)
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's, a big pytest)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print("PEAK_MIB", int(hwm.split()[1]) // 1024)
"""


def run_child(kind, path, *args):
    """-> (message of the refusal, peak RSS in MiB); fails the test if the file was loaded."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(path), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert "REFUSED" in out.stdout, out.stdout + out.stderr[-3000:]
    message = out.stdout.split("REFUSED", 1)[1].split("PEAK_MIB")[0].strip()
    peak = int(out.stdout.split("PEAK_MIB")[1])
    assert str(path) in message, message
    return message, peak


def gzip_of_zeros(header, mib):
    """A gzip file: `header` then `mib` MiB of zeros, in about 1 KB per MiB (its CRC is wrong: a
    reader that reaches the end has already decompressed everything)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    prefix = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes every MiB
    return prefix + block * mib + c.flush()


def idx_header(magic, *values):
    return np.array([magic, *values], dtype=">u4").tobytes()


def test_gzip_bomb_behind_a_valid_mnist_header_is_refused(tmp_path):
    """60000 images declared (47 MB); 4 GiB of zeros follow in a 4 MB file: decompression stops
    just past the declared size."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_of_zeros(idx_header(2051, 60000, 28, 28), 4096))
    assert path.stat().st_size < 5 * 2**20
    message, peak = run_child("images", path, 60000)
    assert "more than 47040016 bytes" in message and "Delete" in message, message
    assert peak < 500, peak


def test_gzip_bomb_of_labels_is_refused(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip_of_zeros(idx_header(2049, 60000), 2048))
    message, peak = run_child("labels", path, 60000)
    assert "more than 60008 bytes" in message, message
    assert peak < 500, peak


def test_header_declaring_more_than_the_expected_count_is_refused_before_decompressing(tmp_path):
    """A header declaring 5 million images (3.9 GB) behind 1 GiB of zeros: mnist() knows the
    official count and refuses by the header."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_of_zeros(idx_header(2051, 5_000_000, 28, 28), 1024))
    message, peak = run_child("images", path, 60000)
    assert "holds 5000000 samples, expected 60000" in message, message
    assert peak < 500, peak


def test_header_declaring_more_than_gzip_can_hold_is_refused(tmp_path):
    """No expected count: 3.9 GB declared in a 1 MB file is more than deflate can expand to."""
    path = tmp_path / "images.gz"
    path.write_bytes(gzip_of_zeros(idx_header(2051, 5_000_000, 28, 28), 1024))
    message, peak = run_child("images", path)
    assert "more than a gzip file of" in message and "3920000016 bytes" in message, message
    assert peak < 500, peak


@pytest.mark.parametrize(
    "kind, header",
    [
        ("images", idx_header(2051, 60000, 28, 28)),
        ("labels", idx_header(2049, 60000)),
    ],
    ids=["images", "labels"],
)
def test_huge_sparse_idx_file_is_refused_by_its_size(tmp_path, kind, header):
    path = tmp_path / f"{kind}-idx-ubyte"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(100 * 2**30)  # 100 GiB, sparse: no disk used
    message, peak = run_child(kind, path)
    assert f"has {100 * 2**30} bytes of IDX data, expected" in message, message
    assert peak < 500, peak


def _checkpoint_header_bytes(tmp_path):
    from fastcnn import checkpoint, models

    path = tmp_path / "small.safetensors"
    checkpoint.save(path, models.lenet5(seed=0))
    return path.read_bytes()


def test_huge_sparse_checkpoint_is_refused_by_its_size(tmp_path):
    """A valid checkpoint's bytes, then 100 GiB of sparse zeros: refused by the file size the
    safetensors header accounts for, without reading the data."""
    data = _checkpoint_header_bytes(tmp_path)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(100 * 2**30)
    message, peak = run_child("checkpoint", path)
    assert "bytes" in message and str(100 * 2**30) in message, message
    assert peak < 500, peak


def test_all_zero_sparse_checkpoint_is_refused(tmp_path):
    path = tmp_path / "zeros.safetensors"
    with open(path, "wb") as f:
        f.truncate(100 * 2**30)
    message, peak = run_child("checkpoint", path)
    assert "not a safetensors file" in message or "header" in message, message
    assert peak < 500, peak


def test_checkpoint_header_declaring_huge_tensors_is_refused_before_reading_them(tmp_path):
    """A header whose tensor offsets claim 100 GiB in a file of that (sparse) size: the declared
    shapes are checked against the architecture before any tensor data is read."""
    from fastcnn import checkpoint

    data = _checkpoint_header_bytes(tmp_path)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["fastcnn"])
    name = "model.0.weight"
    big = [2**35 // 4]  # 32 GiB of float32 for the first convolution's weight
    old_end = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    shift = big[0] * 4 - old_end
    start = header[name]["data_offsets"][0]
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        a, b = entry["data_offsets"]
        if key == name:
            entry["data_offsets"] = [a, a + big[0] * 4]
            entry["shape"] = big
        elif a > start:
            entry["data_offsets"] = [a + shift, b + shift]
    meta["tensors"][name]["shape"] = big
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    header["__metadata__"]["fastcnn"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    total = (
        8 + len(raw) + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    )
    path = tmp_path / "big-tensor.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(total)
    message, peak = run_child("checkpoint", path)
    assert "model.0.weight" in message and "architecture expects" in message, message
    assert peak < 500, peak


def test_a_mirror_sending_more_than_any_official_file_is_cut_off(tmp_path, monkeypatch):
    """A download is stopped past the size cap (the largest official file is 26 MB; the cap is
    lowered to 1 MiB here) and its partial file deleted; the next mirror is tried."""
    import functools
    import http.server
    import threading

    from fastcnn import datasets

    served = tmp_path / "served"
    served.mkdir()
    with open(served / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.truncate(5 * 2**20)  # sparse: an endless stream, as far as the cap is concerned
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    monkeypatch.setattr(datasets, "_MAX_DOWNLOAD", 2**20)
    folder = tmp_path / "data"
    folder.mkdir()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with pytest.raises(datasets.DownloadError) as info:
            datasets._download(
                "t10k-labels-idx1-ubyte.gz",
                str(folder),
                datasets.DATASETS["mnist"]["files"]["t10k-labels-idx1-ubyte"],
                [url, url],
            )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    message = str(info.value)
    assert message.count(f"sent more than {2**20} bytes") == 2, message  # both mirrors tried
    assert os.listdir(folder) == []
