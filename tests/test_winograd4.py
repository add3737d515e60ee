"""The Winograd F(4x4, 3x3) forward (kernels/winograd4.py) against the textbook convolution
(tests/naive/conv2d.py), its weight transform against G g G^T, its BatchNorm / residual / ReLU
epilogue bitwise the steps apart, its independence of the thread count, and where the layers
use it: outputs of at least functional.WINOGRAD4_MIN_SIZE rows and columns, in either mode.
Its weight gradient against the textbook backward and the textbook F(4x4) algorithm
(tests/naive/winograd.py), by finite differences, and where the layers use it."""

import numba
import numpy as np
import pytest

import fastcnn
import test_winograd
from fastcnn import functional as F
from fastcnn.kernels.batchnorm import chunk_affine_inplace
from fastcnn.kernels.winograd4 import (
    conv2d_winograd4_backward_weight,
    conv2d_winograd4_forward,
    weight_transform,
)
from fastcnn.threads import threads
from gradcheck import assert_gradient
from naive.conv2d import conv2d_backward as naive_conv_backward
from naive.conv2d import conv2d_forward as naive_conv
from naive.winograd import F4 as F4_MATRICES
from naive.winograd import winograd_conv2d_backward_weight as naive_winograd_weight

F32_REL = test_winograd.F4_F32_REL
F64_REL = 5e-14

G = np.array(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
)  # fmt: skip

# test_winograd.py's shapes (partial tiles, every padding), the last with outputs past 16
SHAPES = test_winograd.SHAPES[:-1] + [(2, 64, 32, 18, 17, ((1, 1), (1, 1)))]
data = test_winograd.data


def run(*args, **kwargs):
    """test_winograd.run on this kernel."""
    return test_winograd.run(
        *args, **kwargs, kernel=conv2d_winograd4_forward, transform=weight_transform
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_the_textbook_convolution(shape, dtype):
    x, w, b, padding = data(shape, dtype)
    got = run(x, w, b, padding)
    assert got.dtype == dtype and not np.isnan(got).any()
    ref = naive_conv(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=padding
    )
    tol = (F32_REL if dtype == np.float32 else F64_REL) * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= tol
    relu = run(x, w, b, padding, relu=True)
    assert np.array_equal(relu, np.where(got <= 0, 0, got).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_transform_is_g_g_gt(dtype):
    w = np.random.default_rng(10).standard_normal((20, 3, 3, 3)).astype(dtype)
    U = weight_transform(w, 32)  # (36, C, Fp), filters past 20 zero
    ref = np.einsum("ai,fcij,bj->abcf", G, w.astype(np.float64), G).reshape(36, 3, 20)
    assert U.shape == (36, 3, 32) and U.dtype == dtype and not U[:, :, 20:].any()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(U[:, :, :20], ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_residual_and_relu_epilogue_bitwise_the_steps_apart(dtype, relu):
    x, w, b, padding = data((2, 32, 48, 17, 19, ((1, 1), (1, 1))), dtype, seed=2)
    rng = np.random.default_rng(3)
    mean, scale, shift = (rng.standard_normal(48).astype(dtype) for _ in range(3))
    plain = run(x, w, b, padding)
    rows = np.ascontiguousarray(plain.transpose(0, 2, 3, 1)).reshape(-1, 48)
    chunk_affine_inplace(rows, mean, scale, shift)
    expect = (np.where(rows <= 0, 0, rows) if relu else rows).reshape(
        plain.shape[0], *plain.shape[2:], 48
    )
    got = run(x, w, b, padding, relu=relu, bn=(mean, scale, shift, np.empty(0, dtype)))
    assert np.array_equal(got.transpose(0, 2, 3, 1), expect)
    add = rng.standard_normal(rows.shape).astype(dtype)
    summed = rows + add
    expect = (np.where(summed <= 0, 0, summed) if relu else summed).reshape(expect.shape)
    got = run(x, w, b, padding, relu=relu, bn=(mean, scale, shift, add.reshape(-1)))
    assert np.array_equal(got.transpose(0, 2, 3, 1), expect)


def test_nan_stays_nan_through_the_relu():
    x, w, b, padding = data((1, 16, 16, 8, 8, ((1, 1), (1, 1))), np.float32, seed=4)
    x[0, 3, 1, 1] = np.nan
    got = run(x, w, b, padding, relu=True)
    assert np.isnan(got[0, :, :3, :3]).all()  # every output whose window holds the NaN


def test_same_bits_for_any_thread_count():
    x, w, b, padding = data((5, 32, 32, 18, 16, ((1, 1), (1, 1))), np.float32, seed=5)
    one = run(x, w, b, padding, n_threads=1)
    for n in (2, 3, 7):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            assert np.array_equal(run(x, w, b, padding, n_threads=n), one)


@pytest.mark.parametrize("size", [7, 9, 17])
def test_an_image_gets_the_same_bits_alone_as_in_a_batch(size):
    """Blocks of tiles run across images and tile rows: an image's outputs must not depend on
    which block holds its tiles, nor on the images beside it."""
    x, w, b, padding = data((7, 16, 32, size, size, ((1, 1), (1, 1))), np.float32, seed=6)
    batch = run(x, w, b, padding, n_threads=2)
    for n in range(x.shape[0]):
        assert np.array_equal(run(x[n : n + 1], w, b, padding, n_threads=1), batch[n : n + 1])


def test_a_layer_uses_it_on_outputs_from_the_threshold_on():
    """Outputs of at least WINOGRAD4_MIN_SIZE rows and columns: F(4x4, 3x3), in training and
    evaluation mode alike; smaller outputs: F(2x2, 3x3) (which rounds otherwise: the two
    differ), in both modes too."""
    conv = fastcnn.Conv2D(16, 32, 3, padding=1, rng=np.random.default_rng(6))
    rng = np.random.default_rng(7)
    size = F.WINOGRAD4_MIN_SIZE
    big = rng.standard_normal((2, 16, size, size + 1)).astype(np.float32)
    small = rng.standard_normal((2, 16, size - 1, size + 4)).astype(np.float32)
    w, bias, pads = conv.weight.data, conv.bias.data, ((1, 1), (1, 1))
    f4 = run(big, w, bias, pads)
    assert np.array_equal(conv(big), f4)
    small_f2 = test_winograd.run(small, w, bias, pads)
    assert np.array_equal(conv(small), small_f2)
    assert not np.array_equal(run(small, w, bias, pads), small_f2)
    conv.eval()
    assert np.array_equal(conv(big), f4)
    assert np.array_equal(conv(small), small_f2)


def test_fused_evaluation_plans_stay_bitwise_the_layers_one_by_one():
    """Conv2D -> BatchNorm2D -> ReLU and a residual block, evaluation mode, on outputs large
    enough for F(4x4, 3x3): the fused plan's kernels and the layers one by one agree."""
    rng = np.random.default_rng(8)

    def conv_bn(c, f):
        bn = fastcnn.BatchNorm2D(f)
        bn.running_mean[...] = rng.standard_normal(f)
        bn.running_var[...] = rng.random(f) + 0.1
        return [fastcnn.Conv2D(c, f, 3, padding=1, bias=False, rng=rng), bn]

    body = fastcnn.Sequential(*conv_bn(16, 16), fastcnn.ReLU(), *conv_bn(16, 16))
    model = fastcnn.Sequential(
        *conv_bn(16, 16), fastcnn.ReLU(), fastcnn.Residual(body), fastcnn.ReLU()
    ).eval()
    x = rng.standard_normal((2, 16, 20, 18)).astype(np.float32)
    fused = model(x)
    with fastcnn.fusion(False):
        plain = model(x)
    assert np.array_equal(fused, plain)


# ---- the weight gradient ----

WG_SHAPES = [  # N, C, F, H, W, ((top, bottom), (left, right))
    (2, 16, 16, 7, 8, ((1, 1), (1, 1))),  # 7 rows: the last tiles partly outside
    (3, 32, 48, 9, 11, ((1, 1), (1, 1))),
    (2, 16, 32, 5, 5, ((2, 0), (0, 2))),
    (100, 16, 16, 4, 4, ((1, 1), (1, 1))),  # blocks across images, chunks of unequal size
    (1, 48, 16, 30, 26, ((0, 0), (0, 0))),
    (1, 16, 16, 1, 1, ((1, 1), (1, 1))),
]


def run_weight(x, dy, padding, n_threads=None):
    """test_winograd.run_weight on this kernel."""
    return test_winograd.run_weight(
        x, dy, padding, n_threads, kernel=conv2d_winograd4_backward_weight
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", WG_SHAPES)
def test_weight_gradient_matches_the_textbook_backward(shape, dtype):
    x, dy, padding = test_winograd.weight_data(shape, dtype)
    dw, db = run_weight(x, dy, padding)
    assert dw.dtype == dtype and not np.isnan(dw).any() and not np.isnan(db).any()
    _, ref_dw, ref_db = naive_conv_backward(
        x.astype(np.float64), np.zeros(dw.shape), dy.astype(np.float64), padding=padding
    )
    # float32: every S entry sums transformed terms up to 100x larger over all tiles
    # (measured 1e-6..8e-6 of the largest gradient, F(2x2) 1e-7..1e-6; a wrong coefficient
    # gives 1e-1)
    rel = 5e-5 if dtype == np.float32 else 1e-12
    assert float(np.abs(dw - ref_dw).max()) <= rel * float(np.abs(ref_dw).max())
    assert float(np.abs(db - ref_db).max()) <= rel * max(1.0, float(np.abs(ref_db).max()))


@pytest.mark.parametrize("shape", WG_SHAPES[:3])
def test_weight_gradient_is_the_textbook_winograd(shape):
    x, dy, padding = test_winograd.weight_data(shape, np.float64, seed=21)
    ref = naive_winograd_weight(x, dy, padding, matrices=F4_MATRICES)
    dw, _ = run_weight(x, dy, padding)
    np.testing.assert_allclose(dw, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_weight_gradient_same_bits_for_any_thread_count():
    x, dy, padding = test_winograd.weight_data(
        (61, 16, 32, 6, 7, ((1, 1), (1, 1))), np.float32, seed=22
    )
    one = run_weight(x, dy, padding, n_threads=1)
    for n in (2, 3, 7):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            got = run_weight(x, dy, padding, n_threads=n)
            assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])


def test_weight_gradient_by_finite_differences():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 16, 8, 7))
    w = rng.standard_normal((16, 16, 3, 3))
    g = rng.standard_normal((2, 16, 8, 7))
    assert F._weight_gradient_by_winograd4(g.shape[2:])
    _, dw, db = F.conv2d_backward(x, w, g, 1, 1)
    with threads(1):
        assert_gradient(lambda v: F.conv2d_forward(x, v, None, 1, 1), w, g, dw)
        assert_gradient(lambda v: F.conv2d_forward(x, w, v, 1, 1), np.zeros(16), g, db)


def test_a_layer_takes_its_weight_gradient_by_the_output_size():
    """F(4x4, 3x3) on outputs of at least WINOGRAD4_MIN_SIZE rows and columns, else F(2x2,
    3x3): each layer's gradient is bitwise its kernel's."""
    size = F.WINOGRAD4_MIN_SIZE
    assert F._weight_gradient_by_winograd4((size, size))
    assert not F._weight_gradient_by_winograd4((size, size - 1))
    conv = fastcnn.Conv2D(16, 32, 3, padding=1, bias=True, rng=np.random.default_rng(26))
    rng = np.random.default_rng(27)
    for shape, four in (((size, size + 7), True), ((size - 1, size + 1), False)):
        x = rng.standard_normal((3, 16, *shape)).astype(np.float32)
        dy = rng.standard_normal((3, 32, *shape)).astype(np.float32)
        conv.zero_grad()
        conv(x)
        conv.backward(dy)
        pads = ((1, 1), (1, 1))
        f4 = run_weight(x, dy, pads)
        f2 = test_winograd.run_weight(x, dy, pads)
        assert not np.array_equal(f4[0], f2[0])
        dw, db = f4 if four else f2
        assert np.array_equal(conv.weight.grad, dw) and np.array_equal(conv.bias.grad, db)
