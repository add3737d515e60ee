"""Your own images: a folder with one sub-folder per class (``root/cat/1.png``,
``root/dog/2.jpg``, ...), read with Pillow (``pip install 'fastcnn[images]'``).

    ds = fastcnn.datasets.image_folder("photos/", size=32)   # ds.x uint8 (N, C, 32, 32), ds.y
    loader = fastcnn.data.DataLoader(ds, batch_size=64, shuffle=True)

The classes are the sub-folders' names in sorted order (label 0 is the first); files whose
names end in a known image extension are read, in sorted order, hidden files skipped. Images are
converted to RGB, or to grayscale ("L") when every image of the folder is grayscale (``mode=``
forces one), and must all have the same size unless ``size`` (an int or (height, width)) is
given, to which each is resized (bilinear). The pixels are kept as uint8 in memory; the loader
scales each batch to [0, 1]. An image larger than ``MAX_PIXELS`` is refused from its header,
before it is decoded.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import datasets as _ds
from ._checks import is_int
from ._types import Array
from .data import ArrayDataset

__all__ = ["image_folder", "read_images", "list_images", "ImageFolder", "EXTENSIONS"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 4096 * 4096
_GRAY = {"1", "L", "LA", "I", "I;16", "F", "P;L"}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "fastcnn.datasets.image_folder needs Pillow: pip install 'fastcnn[images]' "
            "(or pip install pillow)"
        ) from None
    return Image


class ImageFolder(ArrayDataset):
    """An :class:`~fastcnn.data.ArrayDataset` read from a folder: ``x`` uint8 (N, C, H, W),
    ``y`` int64 labels, ``classes`` (label -> name) and ``paths`` (one per image)."""

    def __init__(self, x: Array, y: Array, classes: list[str], paths: list[str]) -> None:
        super().__init__(x, y)
        self.classes = classes
        self.paths = paths

    def __repr__(self) -> str:
        return f"ImageFolder({len(self)} images {self.x.shape[1:]}, classes {self.classes})"


def _size2(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(pair) != 2 or not all(is_int(v, 1) for v in pair):
        raise ValueError(
            f"image_folder: expected size to be an integer >= 1 or (height, width), got {size!r}"
        )
    return int(pair[0]), int(pair[1])


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """The image files directly in ``folder``, sorted."""
    folder = os.fspath(folder)
    return [
        os.path.join(folder, n)
        for n in sorted(os.listdir(folder))
        if not n.startswith(".")
        and n.lower().endswith(EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    ]


def image_folder(
    root: str | os.PathLike[str],
    size: int | tuple[int, int] | None = None,
    mode: str | None = None,
) -> ImageFolder:
    """Read every image of ``root``'s class sub-folders; see the module's docstring."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise _ds.DatasetNotFoundError(f"image_folder: {root} is not a folder")
    classes = [
        n
        for n in sorted(os.listdir(root))
        if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
    ]
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(os.path.join(root, name))
        paths += found
        labels += [label] * len(found)
    if not classes or not paths:
        raise _ds.DatasetNotFoundError(
            f"image_folder: {root} holds no images in class sub-folders (expected "
            f"{root}/<class>/<image>{EXTENSIONS[0]}, with extensions {', '.join(EXTENSIONS)})"
        )
    x = read_images(paths, size, mode)
    return ImageFolder(x, np.asarray(labels, dtype=np.int64), classes, paths)


def read_images(
    paths: list[str], size: int | tuple[int, int] | None = None, mode: str | None = None
) -> Array:
    """uint8 (N, C, H, W) pixels of the image files ``paths`` (see the module's docstring)."""
    Image = _pil()
    hw = _size2(size)
    if mode not in (None, "RGB", "L"):
        raise ValueError(f"image_folder: mode must be 'RGB', 'L' or None, got {mode!r}")
    headers = []
    for path in paths:  # headers only: sizes and modes, before anything is decoded
        try:
            with Image.open(path) as im:
                w, h = im.size
                headers.append((w, h, im.mode))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _ds.DatasetFileError(f"image_folder: cannot read {path}: {exc}") from exc
        if w * h > MAX_PIXELS:
            raise _ds.DatasetFileError(
                f"image_folder: {path} is {w}x{h} pixels, more than {MAX_PIXELS}: refused"
            )
    if mode is None:
        mode = "L" if all(m in _GRAY for _, _, m in headers) else "RGB"
    if hw is None:
        w0, h0, _ = headers[0]
        for path, (w, h, _) in zip(paths, headers, strict=True):
            if (w, h) != (w0, h0):
                raise _ds.DatasetFileError(
                    f"image_folder: {path} is {w}x{h} pixels but {paths[0]} is {w0}x{h0}; "
                    "pass size= (e.g. size=32) to resize every image to one size"
                )
        hw = (h0, w0)
    channels = 1 if mode == "L" else 3
    x = np.empty((len(paths), channels) + hw, dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if im.size != (hw[1], hw[0]):
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise _ds.DatasetFileError(f"image_folder: cannot read {path}: {exc}") from exc
        x[i] = pixels.reshape(hw[0], hw[1], channels).transpose(2, 0, 1)
    return x
