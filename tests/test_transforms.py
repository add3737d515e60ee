"""Batch transforms against their per-image references (tests/naive/augment.py), bitwise, for
the same generator; the kernel on random shapes, shifts and flips; argument checks."""

import numpy as np
import pytest

from fastcnn import transforms as T
from naive import augment as naive


def batch(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape, size, padding",
    [
        ((7, 3, 32, 32), (32, 32), 4),
        ((5, 1, 28, 28), (24, 24), 0),
        ((3, 2, 9, 11), (5, 13), 2),
        ((4, 3, 6, 6), (10, 10), 2),  # the whole padded image: every border is fill
        ((1, 1, 1, 1), (1, 1), 3),
    ],
)
def test_random_crop_equals_the_per_image_reference(dtype, shape, size, padding):
    x = batch(shape, dtype)
    got = T.RandomCrop(size, padding=padding, fill=0.5)(x.copy(), np.random.default_rng(3))
    want = naive.random_crop(x, np.random.default_rng(3), size, padding, fill=0.5)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape, max_shift", [((9, 1, 28, 28), (2, 2)), ((4, 3, 5, 7), (6, 1))])
def test_random_shift_equals_the_per_image_reference(shape, max_shift):
    x = batch(shape)
    got = T.RandomShift(max_shift)(x.copy(), np.random.default_rng(1))
    np.testing.assert_array_equal(got, naive.random_shift(x, np.random.default_rng(1), max_shift))


def test_random_shift_draws_as_random_crop_of_the_same_size_padded():
    x = batch((16, 1, 12, 12))
    a = T.RandomShift(2)(x.copy(), np.random.default_rng(5))
    b = T.RandomCrop(12, padding=2)(x.copy(), np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, x)  # it moved something


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_random_horizontal_flip_equals_the_per_image_reference(p):
    x = batch((33, 3, 8, 5))
    got = T.RandomHorizontalFlip(p)(x.copy(), np.random.default_rng(2))
    want = naive.random_hflip(x, np.random.default_rng(2), p)
    np.testing.assert_array_equal(got, want)
    flipped = sum(not np.array_equal(g, img) for g, img in zip(got, x, strict=True))
    assert flipped == {0.0: 0, 1.0: 33}.get(p, flipped) and (p != 0.5 or 0 < flipped < 33)


@pytest.mark.parametrize("mean, std", [([0.5], [0.25]), ([0.1, 0.2, 0.3], [0.9, 0.8, 0.7])])
def test_normalize_equals_the_per_image_reference(mean, std):
    x = batch((6, 3, 4, 4))
    got = T.Normalize(mean, std)(x.copy(), np.random.default_rng(0))
    np.testing.assert_array_equal(got, naive.normalize(x, mean, std))
    assert got.dtype == np.float32


def test_compose_applies_in_order_with_one_generator():
    x = batch((10, 3, 16, 16))
    t = T.Compose([T.RandomCrop(16, padding=2), T.RandomHorizontalFlip(), T.Normalize(0.5, 2.0)])
    got = t(x.copy(), np.random.default_rng(7))
    rng = np.random.default_rng(7)
    want = naive.normalize(
        naive.random_hflip(naive.random_crop(x, rng, (16, 16), 2), rng, 0.5), [0.5], [2.0]
    )
    np.testing.assert_array_equal(got, want)


def test_kernel_random_shifts_and_flips_against_the_reference():
    """shift_flip itself: random offsets (also far outside the image) and flips."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        n, c, h, w = rng.integers(1, 6, 4)
        oh, ow = rng.integers(1, 9, 2)
        x = batch((n, c, h, w), seed=int(rng.integers(1000)))
        dy = rng.integers(-10, 10, n)
        dx = rng.integers(-10, 10, n)
        flip = rng.random(n) < 0.5
        got = T.shift_flip(x, dy, dx, flip, (oh, ow), -1.0)
        for k in range(n):
            img = x[k]
            want = np.full((c, oh, ow), -1.0, np.float32)
            for i in range(oh):
                for j in range(ow):
                    jj = ow - 1 - j if flip[k] else j
                    r, col = i + dy[k], jj + dx[k]
                    if 0 <= r < h and 0 <= col < w:
                        want[:, i, j] = img[:, r, col]
            np.testing.assert_array_equal(got[k], want)


def test_the_same_generator_state_gives_the_same_batch_and_another_differs():
    x = batch((32, 3, 32, 32))
    t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    a = t(x.copy(), np.random.default_rng(0))
    b = t(x.copy(), np.random.default_rng(0))
    c = t(x.copy(), np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: T.RandomCrop(0), ValueError, "RandomCrop: expected size"),
        (lambda: T.RandomCrop(4, padding=-1), ValueError, "RandomCrop: expected padding"),
        (lambda: T.RandomCrop((4, 4, 4)), ValueError, "RandomCrop: expected size"),
        (lambda: T.RandomShift(-1), ValueError, "RandomShift: expected max_shift"),
        (lambda: T.RandomHorizontalFlip(1.5), ValueError, r"RandomHorizontalFlip: expected p"),
        (lambda: T.Normalize([0.5], [0.0]), ValueError, "Normalize: expected std > 0"),
        (lambda: T.Normalize([0.5, 0.1], [1, 2, 3]), ValueError, "Normalize: mean has 2"),
        (lambda: T.Normalize("a", 1), ValueError, "Normalize: expected mean"),
        (lambda: T.Compose(T.RandomHorizontalFlip()), TypeError, "Compose: expected a list"),
        (lambda: T.Compose([1]), TypeError, "Compose: expected callables"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_batches_are_refused_by_name():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match=r"RandomCrop: expected a floating-point batch.*uint8"):
        T.RandomCrop(2)(np.zeros((1, 1, 4, 4), np.uint8), rng)
    with pytest.raises(TypeError, match=r"RandomHorizontalFlip: expected a floating-point batch"):
        T.RandomHorizontalFlip()(np.zeros((4, 4), np.float32), rng)
    with pytest.raises(ValueError, match=r"RandomCrop: cannot cut 9x9 out of 4x4"):
        T.RandomCrop(9, padding=2)(np.zeros((1, 1, 4, 4), np.float32), rng)
    with pytest.raises(TypeError, match="RandomShift: expected a numpy Generator"):
        T.RandomShift(1)(np.zeros((1, 1, 4, 4), np.float32), 0)
    with pytest.raises(ValueError, match="Normalize: mean has 3 values, the batch has 1"):
        T.Normalize([1, 2, 3], 1)(np.zeros((1, 1, 4, 4), np.float32))
