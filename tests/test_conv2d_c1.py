"""The one-channel forward and weight gradient (kernels/conv2d_c1.py: LeNet-5's first layer) are
bitwise the direct kernels (kernels/conv2d.py), and the textbook convolution
(tests/naive/conv2d.py) up to rounding, on random shapes, paddings, ReLU and BatchNorm
epilogues, both dtypes, any thread count."""

import numba
import numpy as np
import pytest

from fastcnn import functional as F
from fastcnn.functional import _no_bn
from fastcnn.kernels.conv2d import FTN, _weight_plan, conv2d_backward_weight, conv2d_forward
from fastcnn.kernels.conv2d_c1 import (
    LANES,
    MAX_FILTERS,
    conv2d_c1_backward_weight,
    conv2d_c1_forward,
    conv2d_c1_lanes_forward,
)
from fastcnn.threads import threads
from naive.conv2d import conv2d_backward as naive_backward
from naive.conv2d import conv2d_forward as naive_conv

SHAPES = [  # N, F, H, W, KH, KW, pad_top, pad_left (bottom/right: the same)
    (4, 6, 28, 28, 5, 5, 2, 2),
    (3, 1, 9, 7, 3, 3, 1, 1),
    (2, 5, 33, 40, 3, 2, 2, 0),
    (1, 6, 1, 1, 5, 5, 2, 2),
    (2, 3, 17, 16, 2, 4, 0, 1),
    (5, 4, 6, 35, 7, 1, 3, 0),
]
# a multiple of 8 filters: conv2d_c1_lanes_forward (a ResNet stem; the reference network's
# first layer, unpadded; a width that leaves 1-3 pixels past the 4-pixel blocks; a last half
# block of 8 filters after none, one or two whole ones)
LANES_SHAPES = [
    (3, 16, 28, 28, 3, 3, 1, 1),
    (2, 32, 26, 26, 3, 3, 0, 0),
    (2, 48, 9, 7, 5, 5, 2, 2),
    (1, 16, 1, 1, 3, 3, 1, 1),
    (3, 16, 6, 35, 7, 1, 3, 0),
    (2, 32, 5, 6, 2, 4, 0, 1),
    (2, 8, 9, 10, 3, 3, 1, 1),
    (2, 24, 11, 13, 3, 3, 1, 1),
    (1, 40, 7, 6, 5, 5, 2, 2),
]


def both(shape, dtype, relu=False, bn=False, seed=0, n_threads=2):
    N, Fn, H, W, KH, KW, pt, pl = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H, W, 1)).astype(dtype)
    w = rng.standard_normal((Fn, 1, KH, KW)).astype(dtype)
    b = rng.standard_normal(Fn).astype(dtype)
    OH, OW = H + 2 * pt - KH + 1, W + 2 * pl - KW + 1
    epi = _no_bn(x)
    if bn:  # BatchNorm's (mean, scale, shift), and with "add" a residual summed after it
        add = rng.standard_normal(N * OH * OW * Fn) if bn == "add" else np.empty(0)
        params = [rng.standard_normal(Fn) for _ in range(3)]
        epi = tuple(a.astype(dtype) for a in (*params, add))
    got = np.full((N, OH, OW, Fn), np.nan, dtype)
    ref = np.full_like(got, np.nan)
    if Fn <= MAX_FILTERS:
        conv2d_c1_forward(x, w, b, pt, pl, relu, got, epi, n_threads)
    else:
        conv2d_c1_lanes_forward(x, True, w, b, pt, pl, relu, got, epi, n_threads)
    conv2d_forward(x, w, b, 1, 1, pt, pl, 1, 1, relu, ref, epi, 2)
    return x, w, b, got, ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + LANES_SHAPES)
def test_bitwise_the_direct_kernel_and_close_to_the_textbook(shape, dtype):
    for relu in (False, True):
        x, w, b, got, ref = both(shape, dtype, relu=relu)
        assert np.array_equal(got, ref)
    x, w, b, got, _ = both(shape, dtype)
    pt, pl = shape[6], shape[7]
    naive = naive_conv(x.transpose(0, 3, 1, 2), w, b, padding=((pt, pt), (pl, pl)))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), naive, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [SHAPES[0], LANES_SHAPES[0], LANES_SHAPES[2], LANES_SHAPES[7]])
def test_batch_norm_epilogue_bitwise_the_direct_kernel(dtype, shape):
    for relu in (False, True):
        for bn in (True, "add"):
            _, _, _, got, ref = both(shape, dtype, relu=relu, bn=bn, seed=1)
            assert np.array_equal(got, ref)


@pytest.mark.parametrize("shape", [SHAPES[0], LANES_SHAPES[1]])
def test_same_bits_for_any_thread_count(shape):
    _, _, _, one, _ = both(shape, np.float32, n_threads=1)
    for n in (2, 3, 8):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            assert np.array_equal(both(shape, np.float32, n_threads=n)[3], one)


def test_functional_uses_it_for_one_channel_and_few_filters():
    assert MAX_FILTERS == 6 and LANES == 16
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 1, 12, 12)).astype(np.float32)
    for filters in (1, 6, 7, 16, 24, 32):  # 7: the direct kernel
        w = rng.standard_normal((filters, 1, 5, 5)).astype(np.float32)
        y = F.conv2d_forward(x, w, None, 1, 2)
        ref = naive_conv(x, w, np.zeros(filters, np.float32), padding=((2, 2), (2, 2)))
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        # evaluation mode (the lanes kernel for 16, 24 and 32 filters): the same bits
        y_eval = F.conv2d_forward(x, w, None, 1, 2, winograd=True, evaluation=True)
        assert y_eval.tobytes() == y.tobytes()


def test_functional_lanes_forward_takes_the_image_in_any_layout():
    """An RGB batch in evaluation mode as users pass it (NCHW), channels-last in memory, or
    strided (a slice): the same bits as the direct kernel in training mode."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 3, 13, 22)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    ref = F.conv2d_forward(base[:, :, :, ::2], w, None, 1, 1)
    images = {
        "nchw": np.ascontiguousarray(base[:, :, :, ::2]),
        "channels-last": np.ascontiguousarray(base[:, :, :, ::2].transpose(0, 2, 3, 1)).transpose(
            0, 3, 1, 2
        ),
        "strided": base[:, :, :, ::2],
    }
    for name, x in images.items():
        y = F.conv2d_forward(x, w, None, 1, 1, evaluation=True)
        assert y.tobytes() == ref.tobytes(), name


@pytest.mark.parametrize("filters", [16, 24])
def test_the_lanes_kernel_runs_in_evaluation_mode_only(monkeypatch, filters):
    """Its compilation stays out of the first training step: a training-mode layer runs the
    direct kernel, an evaluation-mode one the lanes kernel (16 filters, or 24: a half block)."""
    import fastcnn
    from fastcnn.kernels import conv2d_c1

    calls = []
    lanes = conv2d_c1.conv2d_c1_lanes_forward
    monkeypatch.setattr(
        conv2d_c1, "conv2d_c1_lanes_forward", lambda *a: calls.append(1) or lanes(*a)
    )
    layer = fastcnn.Conv2D(1, filters, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((2, 1, 9, 9)).astype(np.float32)
    y_train = layer(x)
    assert not calls
    layer.eval()
    assert layer(x).tobytes() == y_train.tobytes() and calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "channels, shape",
    [
        (3, (2, 16, 32, 32, 3, 3, 1, 1)),
        (2, (3, 32, 9, 7, 5, 5, 2, 2)),
        (4, (1, 48, 6, 13, 1, 3, 0, 1)),
        (3, (2, 24, 10, 9, 3, 3, 1, 1)),
        (2, (1, 40, 7, 5, 3, 3, 1, 1)),
    ],
)
def test_lanes_kernel_with_a_few_channels_bitwise_the_direct_kernel(channels, shape, dtype):
    """An RGB image's first layer (VGG's, the all-conv net's) on the lanes: the taps (i, j, c)
    in the direct kernel's order, with and without the epilogues, any thread count, the image
    NCHW or channels-last."""
    N, Fn, H, W, KH, KW, pt, pl = shape
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((N, H, W, channels)).astype(dtype)
    w = rng.standard_normal((Fn, channels, KH, KW)).astype(dtype)
    b = rng.standard_normal(Fn).astype(dtype)
    OH, OW = H + 2 * pt - KH + 1, W + 2 * pl - KW + 1
    add = rng.standard_normal(N * OH * OW * Fn).astype(dtype)
    bn = tuple(rng.standard_normal(Fn).astype(dtype) for _ in range(3))
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    for relu in (False, True):
        for epi in (_no_bn(x), (*bn, np.empty(0, dtype)), (*bn, add)):
            ref = np.full((N, OH, OW, Fn), np.nan, dtype)
            conv2d_forward(x, w, b, 1, 1, pt, pl, 1, 1, relu, ref, epi, 2)
            for n_threads in (1, 2, 3):
                # the image as users pass it (NCHW) and channels-last
                for image, channels_last in ((x_nchw, False), (x, True)):
                    got = np.full_like(ref, np.nan)
                    conv2d_c1_lanes_forward(
                        image, channels_last, w, b, pt, pl, relu, got, epi, n_threads
                    )
                    assert got.tobytes() == ref.tobytes()
    naive = naive_conv(x.transpose(0, 3, 1, 2), w, b, padding=((pt, pt), (pl, pl)))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    got = np.empty((N, OH, OW, Fn), dtype)
    conv2d_c1_lanes_forward(x, True, w, b, pt, pl, False, got, _no_bn(x), 2)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), naive, rtol=tol, atol=tol)


@pytest.mark.parametrize("filters", [8, 24, 40])
def test_lanes_kernel_writes_its_output_only(filters):
    """The output inside a larger buffer (sentinels before and after it): a last half block,
    computed whole, stores its 8 filters only; every output is written. Filters not a multiple
    of 8 are refused."""
    rng = np.random.default_rng(filters)
    x = rng.standard_normal((2, 3, 9, 10)).astype(np.float32)
    w = rng.standard_normal((filters, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(filters).astype(np.float32)
    size, guard = 2 * 9 * 10 * filters, 1024
    buf = np.full(size + 2 * guard, 12345.0, np.float32)
    out = buf[guard : guard + size].reshape(2, 9, 10, filters)
    out[...] = np.nan
    conv2d_c1_lanes_forward(x, False, w, b, 1, 1, True, out, _no_bn(x), 2)
    assert (buf[:guard] == 12345.0).all() and (buf[guard + size :] == 12345.0).all()
    assert not np.isnan(out).any()
    ref = np.empty_like(out)
    conv2d_forward(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        w,
        b,
        1,
        1,
        1,
        1,
        1,
        1,
        True,
        ref,
        _no_bn(x),
        2,
    )
    assert out.tobytes() == ref.tobytes()
    with pytest.raises(ValueError, match="multiple of HALF"):
        conv2d_c1_lanes_forward(
            x, False, w[:4], b[:4], 1, 1, True, out[..., :4].copy(), _no_bn(x), 2
        )


def weight_grads(shape, dtype, seed=0, threads_=2):
    N, Fn, H, W, KH, KW, pt, pl = shape
    rng = np.random.default_rng(seed)
    OH, OW = H + 2 * pt - KH + 1, W + 2 * pl - KW + 1
    x = rng.standard_normal((N, H, W, 1)).astype(dtype)
    dy = rng.standard_normal((N, OH, OW, Fn)).astype(dtype)
    plan = _weight_plan(KH * KW, Fn, N * OH * OW, Fn <= FTN, False, threads_)
    got = (np.full((Fn, 1, KH, KW), np.nan, dtype), np.full(Fn, np.nan, dtype))
    ref = (np.full_like(got[0], np.nan), np.full_like(got[1], np.nan))
    conv2d_c1_backward_weight(x, dy, pt, pl, *got, plan[3], plan[6])
    conv2d_backward_weight(x, dy, 1, 1, pt, pl, 1, 1, *ref, threads_)
    return x, dy, got, ref, plan[3]


#: 11 x 15 taps: more terms than conv2d._CHUNKED_MAX_TERMS, so one sum over every pixel
LONG_SUMS = (2, 3, 20, 24, 11, 15, 5, 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + [(7, 4, 12, 11, 3, 3, 1, 1), LONG_SUMS])
def test_weight_gradient_bitwise_the_direct_kernel(shape, dtype):
    x, dy, (dw, db), (rw, rb), _ = weight_grads(shape, dtype)
    assert np.array_equal(dw, rw) and np.array_equal(db, rb)
    pt, pl = shape[6], shape[7]
    _, naive_dw, naive_db = naive_backward(
        x.transpose(0, 3, 1, 2),
        np.zeros(dw.shape, dtype),
        dy.transpose(0, 3, 1, 2),
        padding=((pt, pt), (pl, pl)),
    )
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(dw, naive_dw, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, naive_db, rtol=tol, atol=tol)


def test_weight_gradient_follows_the_pixel_chunks():
    # 3x3 taps: the direct kernel sums 14 chunks of pixels apart, then adds them in order
    *_, (dw, db), (rw, rb), chunks = weight_grads((7, 4, 12, 11, 3, 3, 1, 1), np.float32)
    assert chunks > 1 and np.array_equal(dw, rw) and np.array_equal(db, rb)
    # 5x5 taps (LeNet-5's first layer): chunks too
    *_, (dw, db), (rw, rb), chunks = weight_grads(SHAPES[0], np.float32)
    assert chunks > 1 and np.array_equal(dw, rw) and np.array_equal(db, rb)
    # 11x15 taps: one sum over every pixel
    *_, (dw, db), (rw, rb), chunks = weight_grads(LONG_SUMS, np.float32)
    assert chunks == 1 and np.array_equal(dw, rw) and np.array_equal(db, rb)


def test_weight_gradient_same_bits_for_any_thread_count():
    one = weight_grads(SHAPES[0], np.float32, threads_=1)[2]
    for n in (2, 3):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            got = weight_grads(SHAPES[0], np.float32, threads_=n)[2]
            assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])
