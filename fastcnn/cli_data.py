"""The data side of the ``fastcnn`` command: which data set ``--dataset`` names (mnist,
fashion-mnist, cifar10, or a folder), loading it, ``--augment``'s transforms, the model that
suits its images, and ``fastcnn predict``.

A folder given to ``--dataset`` is either a CIFAR-10 folder (the six .bin files of the official
binary version, or the ``cifar-10-batches-bin/`` folder holding them) or a folder of images
with one sub-folder per class (``fastcnn.datasets.image_folder``). An image folder holding
``train/`` and ``test/`` (class sub-folders in each) is split that way; otherwise a fixed 20%
of its images (seed 0, the same for every run and for ``fastcnn evaluate``) is the test set.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from ._types import Array

NAMED = ("mnist", "fashion-mnist", "cifar10")
DIGITS = ("mnist", "fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
TEST_FRACTION = 0.2
# --augment: the largest shift of a digit (pixels): 1 beat 2 on Fashion-MNIST in 10 epochs
# (docs/data.md); CIFAR-style sets: padding = size // 8
DIGIT_SHIFT = 1


class DataError(ValueError):
    """A --dataset that is neither a known name nor a usable folder (exit status 2)."""


def is_dataset(value: Any) -> bool:
    """Whether ``value`` (a saved setting, say) names a data set: a known name or a path."""
    return isinstance(value, str) and value != ""


def dataset_arg(text: str) -> str:
    """argparse type of --dataset: a known name, or an existing folder (made absolute)."""
    if text in NAMED:
        return text
    if os.path.isdir(text):
        return os.path.abspath(text)
    raise argparse.ArgumentTypeError(
        f"expected {', '.join(NAMED)} or a folder (of images, a sub-folder per class; or of "
        f"the CIFAR-10 binary files), got {text!r}"
    )


def is_folder(name: str) -> bool:
    return name not in NAMED


def load(
    name: str, data_dir: str | None, download: bool, image_size: int | None = None
) -> tuple[tuple[Array, Array], tuple[Array, Array], list[str]]:
    """((x_train, y_train), (x_test, y_test), class names) of data set ``name``; images of
    cifar10 and folders stay uint8 (fit and evaluate scale them batch by batch)."""
    from . import datasets
    from .datasets_cifar10 import find_cifar10_files, read_cifar10_folder

    if name in DIGITS:
        loader = datasets.mnist if name == "mnist" else datasets.fashion_mnist
        train, test = loader(root=data_dir, download=download)
        classes = [str(i) for i in range(10)] if name == "mnist" else list(FASHION_CLASSES)
        return train, test, classes
    if name == "cifar10":
        train, test = datasets.cifar10(root=data_dir, download=download, dtype=np.uint8)
        return train, test, list(datasets.CIFAR10_CLASSES)
    if not os.path.isdir(name):
        raise DataError(f"--dataset {name}: no such folder")
    files = find_cifar10_files(name)
    if files is not None:
        train, test = read_cifar10_folder(files, dtype=np.uint8)
        return train, test, list(datasets.CIFAR10_CLASSES)
    parts = [os.path.join(name, p) for p in ("train", "test")]
    if all(os.path.isdir(p) for p in parts):
        tr = datasets.image_folder(parts[0], size=image_size)
        te = datasets.image_folder(parts[1], size=tr.x.shape[2:], mode=_mode(tr.x))
        if te.classes != tr.classes:
            raise DataError(
                f"--dataset {name}: test/ has the classes {te.classes}, train/ has {tr.classes}"
            )
        assert tr.y is not None and te.y is not None
        return (tr.x, tr.y), (te.x, te.y), tr.classes
    from .data import random_split

    ds = datasets.image_folder(name, size=image_size)
    if len(ds) < 2:
        raise DataError(f"--dataset {name}: {len(ds)} image, too few to train and test on")
    train_part, test_part = random_split(ds, [1 - TEST_FRACTION, TEST_FRACTION], seed=0)
    assert train_part.y is not None and test_part.y is not None
    return (train_part.x, train_part.y), (test_part.x, test_part.y), ds.classes


def _mode(x):
    return "L" if x.shape[1] == 1 else "RGB"


def default_model(dataset: str) -> str:
    """The reference network for the 28x28 digit sets, ResNet-8 (any image size) otherwise."""
    return "reference" if dataset in DIGITS else "resnet8"


def default_val_split(dataset: str) -> int | float:
    """5000 images for the named sets, a tenth of a folder's."""
    return 0.1 if is_folder(dataset) and dataset != "cifar10" else 5000


def check_model(model: str, dataset: str, shape: tuple[int, ...]) -> None:
    """A model whose layers fix the image size must get that size."""
    from .models import INPUT_SHAPES

    c, h, w = INPUT_SHAPES[model]
    fixed = {"reference": (c, h, w), "lenet5": (None, h, w), "vgg": (None, h, w)}
    fixed["allconv"] = (None, h, w)
    if model not in fixed:
        return
    want = fixed[model]
    if any(a is not None and a != b for a, b in zip(want, shape, strict=True)):
        text = "x".join("C" if a is None else str(a) for a in want)
        raise DataError(
            f"--model {model} takes {text} images, {os.path.basename(dataset) or dataset} has "
            f"{'x'.join(map(str, shape))}: choose --model resnet8 or resnet20 (any size), or "
            "one made for that size (--image-size resizes a folder's images)"
        )


def augmentation(dataset: str, shape: tuple[int, ...]) -> Any:
    """--augment's transform: small shifts for the digit sets (never mirrored), a random crop
    of the image padded by an eighth of its size and a horizontal flip for the others."""
    from . import transforms as T

    if dataset in DIGITS:
        return T.RandomShift(DIGIT_SHIFT)
    h, w = shape[1], shape[2]
    return T.Compose(
        [T.RandomCrop((h, w), padding=max(1, min(h, w) // 8)), T.RandomHorizontalFlip()]
    )


def train_data(x: Array, y: Array, settings: dict[str, Any]) -> tuple[Any, Any]:
    """What `fastcnn train` gives fit: the arrays, or with --augment a DataLoader over them
    (the same order, from the same seed, as fit draws for the arrays)."""
    if not settings.get("augment"):
        return x, y
    from .data import ArrayDataset, DataLoader

    transform = augmentation(settings["dataset"], tuple(x.shape[1:]))
    loader = DataLoader(
        ArrayDataset(x, y),
        batch_size=settings["batch_size"],
        shuffle=True,
        transform=transform,
        seed=settings["seed"],
    )
    return loader, None


# --------------------------------------------------------------------------------------------
# fastcnn predict


def add_predict_parser(sub: Any, epilog: str) -> None:
    p = sub.add_parser(
        "predict",
        epilog=epilog,
        help="classes a checkpoint predicts for images",
        description="Print the class the model in CHECKPOINT predicts for each image of IMAGES: "
        "an IDX image file (gzipped or not), a .npy array (N, C, H, W) or (N, H, W) of uint8 "
        "pixels or floats in [0, 1], or a folder of images (sub-folders included; each image "
        "converted and resized to the checkpoint's input). One line per image: its index or "
        "file, a tab, the class.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("images", metavar="IMAGES")
    p.add_argument(
        "--out", metavar="FILE", help="also write the predictions as CSV (image,label,class)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="[256]")
    p.add_argument("--threads", type=int, help="Numba threads [all: NUMBA_NUM_THREADS]")
    p.set_defaults(func=cmd_predict)


def read_inputs(path: str, input_shape: tuple[int, ...] | None) -> tuple[Array, list[str]]:
    """(images, their names) from an IDX file, a .npy file or a folder of images."""
    from . import datasets

    if os.path.isdir(path):
        from .datasets_folder import list_images, read_images

        paths = []
        for folder, dirs, _ in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += list_images(folder)
        if not paths:
            raise DataError(f"{path}: no images in this folder")
        size: tuple[int, int] | None = None
        mode = None
        if input_shape is not None and len(input_shape) == 3:
            size = (int(input_shape[1]), int(input_shape[2]))
            mode = "L" if input_shape[0] == 1 else "RGB"
        x = read_images(paths, size=size, mode=mode)
        return x, [os.path.relpath(p, path) for p in paths]
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith(".npy"):
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"{path}: expected images (N, C, H, W) or (N, H, W), got {x.shape}")
        x = np.ascontiguousarray(x)
    else:
        x = datasets.read_idx_images(path)[:, None]
    return x, [str(i) for i in range(x.shape[0])]


def cmd_predict(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .cli import CliError, _check_out, _check_threads
    from .threads import compute_threads

    threads = _check_threads(args.threads)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None:
        _check_out(args.out)
    if not os.path.isfile(args.checkpoint):
        raise CliError(f"{args.checkpoint}: no such checkpoint file")
    ckpt = checkpoint.load(args.checkpoint)
    shape = tuple(ckpt.input_shape) if ckpt.input_shape else None
    x, names = read_inputs(args.images, shape)
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise DataError(
            f"{args.images}: images of shape {tuple(x.shape[1:])}, the model in "
            f"{args.checkpoint} takes {shape}"
        )
    saved = ckpt.extra.get("cli") if isinstance(ckpt.extra, dict) else None
    classes = saved.get("classes") if isinstance(saved, dict) else None
    with compute_threads(threads):
        logits = ckpt.model.predict(x, batch_size=args.batch_size)
    labels = np.argmax(logits, axis=1)
    rows = []
    for name, label in zip(names, labels, strict=True):
        label = int(label)
        cls = classes[label] if isinstance(classes, list) and label < len(classes) else str(label)
        rows.append((name, label, str(cls)))
        print(f"{name}\t{cls}")
    if args.out is not None:
        from .checkpoint import _atomic_write

        def quote(text):
            return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text

        lines = ["image,label,class"] + [f"{quote(n)},{lab},{quote(c)}" for n, lab, c in rows]
        _atomic_write(args.out, ("\n".join(lines) + "\n").encode(), what="predictions")
        print(f"predictions: {args.out}", file=sys.stderr)
    return 0
