"""Batch augmentation, one image at a time with numpy's own padding, slicing and mirroring:
the specification of kernels/augment.py and of fastcnn.transforms."""

import numpy as np


def crop(image, top, left, height, width, padding, fill):
    """The (height, width) window at (top, left) of ``image`` (C, H, W) padded by ``padding``."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)), constant_values=fill)
    return padded[:, top : top + height, left : left + width].copy()


def hflip(image):
    return image[:, :, ::-1].copy()


def random_crop(x, rng, size, padding, fill=0.0):
    n, _, h, w = x.shape
    tops = rng.integers(0, h + 2 * padding - size[0] + 1, n)
    lefts = rng.integers(0, w + 2 * padding - size[1] + 1, n)
    return np.stack([crop(x[i], tops[i], lefts[i], *size, padding, fill) for i in range(n)])


def random_shift(x, rng, max_shift, fill=0.0):
    """Move each image by (dy, dx) in [-max, max]: out[i, j] = x[i + dy, j + dx]."""
    n, _, h, w = x.shape
    sy, sx = max_shift
    dys = rng.integers(0, 2 * sy + 1, n) - sy
    dxs = rng.integers(0, 2 * sx + 1, n) - sx
    out = np.full_like(x, fill)
    for k in range(n):
        for i in range(h):
            for j in range(w):
                r, c = i + dys[k], j + dxs[k]
                if 0 <= r < h and 0 <= c < w:
                    out[k, :, i, j] = x[k, :, r, c]
    return out


def random_hflip(x, rng, p):
    flips = rng.random(x.shape[0]) < p
    return np.stack([hflip(img) if f else img.copy() for img, f in zip(x, flips, strict=True)])


def normalize(x, mean, std):
    out = np.empty_like(x)
    for k in range(x.shape[0]):
        for c in range(x.shape[1]):
            m = np.asarray(mean[c] if len(mean) > 1 else mean[0], x.dtype)
            s = np.asarray(std[c] if len(std) > 1 else std[0], x.dtype)
            out[k, c] = (x[k, c] - m) / s
    return out
