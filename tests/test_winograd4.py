"""The Winograd F(4x4, 3x3) forward (kernels/winograd4.py) against the textbook convolution
(tests/naive/conv2d.py), its weight transform against G g G^T, its BatchNorm / residual / ReLU
epilogue bitwise the steps apart, its independence of the thread count, and where the layers
use it: outputs of at least functional.WINOGRAD4_MIN_SIZE rows and columns, in either mode."""

import numba
import numpy as np
import pytest

import fastcnn
import test_winograd
from fastcnn import functional as F
from fastcnn.kernels.batchnorm import chunk_affine_inplace
from fastcnn.kernels.winograd4 import conv2d_winograd4_forward, weight_transform
from fastcnn.threads import threads
from naive.conv2d import conv2d_forward as naive_conv

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
