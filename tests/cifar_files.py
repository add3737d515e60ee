"""Small synthetic CIFAR-10 files in the official binary layout (the real set cannot be fetched
here): records of 1 label byte + 3072 pixel bytes (the red plane, the green, the blue), in
data_batch_1.bin .. data_batch_5.bin and test_batch.bin, with batches.meta.txt; and the
archive cifar-10-binary.tar.gz holding them under cifar-10-batches-bin/."""

import io
import os
import tarfile

import numpy as np

CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def records(count, seed):
    """(bytes of `count` records, the images (count, 3, 32, 32) uint8, the labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    pixels = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    raw = np.concatenate([labels[:, None], pixels.reshape(count, -1)], axis=1)
    return raw.tobytes(), pixels, labels.astype(np.int64)


def write_folder(folder, per_file=6, seed=0):
    """The six .bin files and batches.meta.txt in `folder`; returns {file name: (x, y)}."""
    os.makedirs(folder, exist_ok=True)
    content = {}
    for i, name in enumerate(FILES):
        raw, x, y = records(per_file, seed + i)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
        content[name] = (x, y)
    with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n\n")
    return content


def write_archive(path, per_file=6, seed=0, extra_members=()):
    """cifar-10-binary.tar.gz with the files under cifar-10-batches-bin/; returns the content."""
    content = {}
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-bin")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        members = []
        for i, name in enumerate(FILES):
            raw, x, y = records(per_file, seed + i)
            content[name] = (x, y)
            members.append((name, raw))
        members.append(("batches.meta.txt", ("\n".join(CLASSES) + "\n").encode()))
        members.append(("readme.html", b"<html></html>"))
        members += list(extra_members)
        for name, raw in members:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return content


def expected(content):
    """((x_train, y_train), (x_test, y_test)) as uint8 pixels from write_folder's content."""
    train = [content[n] for n in FILES[:5]]
    return (
        (np.concatenate([c[0] for c in train]), np.concatenate([c[1] for c in train])),
        content["test_batch.bin"],
    )
