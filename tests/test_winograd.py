"""The Winograd F(2x2, 3x3) convolution (kernels/winograd.py) against the textbook loops of the
convolution (tests/naive/conv2d.py) and of the algorithm (tests/naive/winograd.py), its
BatchNorm epilogue bitwise the layers one by one, its independence of the thread count, and
where the layers use it: the forward in both modes, the input gradient (the transposed
convolution, with the flipped weights) and the weight gradient (the algorithm run backwards)
of a training step."""

import numba
import numpy as np
import pytest

import fastcnn
from fastcnn import functional as F
from fastcnn.functional import _no_bn
from fastcnn.kernels import winograd as _wk
from fastcnn.kernels import winograd4 as _wk4
from fastcnn.kernels.batchnorm import chunk_affine_inplace
from fastcnn.kernels.gemm_tile import RN
from fastcnn.kernels.winograd import conv2d_winograd_forward, weight_transform
from fastcnn.threads import threads
from gradcheck import assert_gradient
from naive.conv2d import conv2d_backward as naive_conv_backward
from naive.conv2d import conv2d_forward as naive_conv
from naive.winograd import G
from naive.winograd import winograd_conv2d as naive_winograd
from naive.winograd import winograd_conv2d_backward_weight as naive_winograd_weight

# float32: the transforms round (values up to ~4x the input's); measured errors are
# 1e-7..3e-7 of the largest output, a wrong coefficient gives 1e-1
F32_REL = 2e-6
F64_REL = 1e-12
# F(4x4, 3x3)'s float32: its coefficients (up to 8, and 1/24 in G) round more; measured errors
# are 2e-7..6e-6 of the largest output, a wrong coefficient gives 1e-1
F4_F32_REL = 2e-5


def f32_rel(height, width):
    """The float32 tolerance of the Winograd kernel the layers pick for an output this size."""
    return F4_F32_REL if min(height, width) >= F.WINOGRAD4_MIN_SIZE else F32_REL


SHAPES = [  # N, C, F, H, W, ((top, bottom), (left, right))
    (2, 16, 16, 7, 6, ((1, 1), (1, 1))),
    (1, 16, 32, 8, 8, ((1, 1), (1, 1))),
    (3, 32, 48, 9, 11, ((0, 2), (0, 2))),
    (2, 16, 16, 5, 5, ((2, 0), (2, 0))),
    (1, 48, 16, 4, 3, ((1, 1), (1, 1))),
    (2, 16, 16, 3, 3, ((0, 0), (0, 0))),
    (1, 32, 16, 1, 1, ((1, 1), (1, 1))),
    (2, 64, 32, 16, 16, ((1, 1), (1, 1))),
]


def run(
    x,
    w,
    b,
    padding,
    relu=False,
    bn=None,
    n_threads=None,
    kernel=conv2d_winograd_forward,
    transform=weight_transform,
):
    """The kernel (this F(2x2, 3x3) one, or another of its signature with its weight
    transform: tests/test_winograd4.py's) on NCHW arrays (converted to and from its NHWC
    layout), NaN-filled output."""
    N, C, H, W = x.shape
    (pt, pb), (pl, pr) = padding
    out = np.full((N, H + pt + pb - 2, W + pl + pr - 2, w.shape[0]), np.nan, dtype=x.dtype)
    bn = _no_bn(x) if bn is None else bn
    nt = numba.get_num_threads() if n_threads is None else n_threads
    u = transform(w, w.shape[0])
    kernel(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), u, b, pt, pl, relu, out, bn, nt)
    return out.transpose(0, 3, 1, 2)


def data(shape, dtype, seed=0):
    N, C, Fn, H, W, padding = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Fn, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(Fn).astype(dtype)
    return x, w, b, padding


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_transform_is_g_g_gt(dtype):
    w = np.random.default_rng(10).standard_normal((20, 3, 3, 3)).astype(dtype)
    U = weight_transform(w, 32)  # (16, C, Fp), filters past 20 zero
    ref = np.einsum("ai,fcij,bj->abcf", G, w.astype(np.float64), G).reshape(16, 3, 20)
    assert U.shape == (16, 3, 32) and U.dtype == dtype and not U[:, :, 20:].any()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(U[:, :, :20], ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_forward_is_the_textbook_winograd(shape):
    x, w, b, padding = data(shape, np.float64, seed=1)
    ref = naive_winograd(x, w, b, padding)
    np.testing.assert_allclose(run(x, w, b, padding), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_batch_norm_epilogue_bitwise_the_steps_apart(dtype, relu):
    x, w, b, padding = data((2, 32, 48, 9, 7, ((1, 1), (1, 1))), dtype, seed=2)
    rng = np.random.default_rng(3)
    mean, scale, shift = (rng.standard_normal(48).astype(dtype) for _ in range(3))
    plain = run(x, w, b, padding)
    relued = run(x, w, b, padding, relu=True)
    assert np.array_equal(relued, np.where(plain <= 0, 0, plain).astype(dtype))
    # BatchNorm's kernel on the plain output, then the ReLU's select
    rows = np.ascontiguousarray(plain.transpose(0, 2, 3, 1)).reshape(-1, 48)
    chunk_affine_inplace(rows, mean, scale, shift)
    expect = (np.where(rows <= 0, 0, rows) if relu else rows).reshape(
        plain.shape[0], *plain.shape[2:], 48
    )
    got = run(x, w, b, padding, relu=relu, bn=(mean, scale, shift, np.empty(0, dtype)))
    assert np.array_equal(got.transpose(0, 2, 3, 1), expect)
    # a residual's sum between the BatchNorm and the ReLU: numpy's sum, then the select
    add = rng.standard_normal(rows.shape).astype(dtype)
    summed = rows.reshape(-1, 48) + add
    expect = (np.where(summed <= 0, 0, summed) if relu else summed).reshape(expect.shape)
    got = run(x, w, b, padding, relu=relu, bn=(mean, scale, shift, add.reshape(-1)))
    assert np.array_equal(got.transpose(0, 2, 3, 1), expect)


def test_nan_stays_nan_through_the_relu():
    x, w, b, padding = data((1, 16, 16, 4, 4, ((1, 1), (1, 1))), np.float32, seed=4)
    x[0, 3, 1, 1] = np.nan
    got = run(x, w, b, padding, relu=True)
    assert np.isnan(got[0, :, :3, :3]).all()  # every output whose window holds the NaN


def test_non_finite_weights_run_the_direct_kernel():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 32, 6, 6)).astype(np.float32)
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
    w[3, 5, 0, 0] = np.inf
    direct = F.conv2d_forward(x, w, None, 1, 1)
    got = F.conv2d_forward(x, w, None, 1, 1, winograd=True)
    assert np.array_equal(got, direct, equal_nan=True)
    assert np.isfinite(direct[:, :3]).all()  # the other filters' outputs stay finite


def test_same_bits_for_any_thread_count():
    x, w, b, padding = data((5, 32, 32, 12, 10, ((1, 1), (1, 1))), np.float32, seed=5)
    one = run(x, w, b, padding, n_threads=1)
    for n in (2, 3, 7):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            assert np.array_equal(run(x, w, b, padding, n_threads=n), one)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [  # images of 16, 9, 4 and 1 tiles: blocks of 3, 4, 6 and 24 images, the last one short
        (7, 64, 16, 7, 7, ((1, 1), (1, 1))),
        (5, 16, 32, 6, 5, ((1, 1), (1, 1))),
        (8, 16, 16, 3, 4, ((1, 1), (1, 1))),
        (25, 16, 16, 2, 2, ((1, 1), (1, 1))),
    ],
)
def test_blocks_of_several_small_images_are_bitwise_image_by_image(shape, dtype):
    """Small images share a block (_images_per_block): a tile's products and transforms never
    depend on its neighbours, so the batch is bitwise the images run one at a time, with the
    BatchNorm + residual + ReLU epilogue too."""
    x, w, b, padding = data(shape, dtype, seed=7)
    (pt, pb), (pl, pr) = padding
    OH, OW = x.shape[2] + pt + pb - 2, x.shape[3] + pl + pr - 2
    assert _wk._images_per_block(((OH + 1) // 2) * ((OW + 1) // 2), True) > 1
    rng = np.random.default_rng(3)
    add = rng.standard_normal((x.shape[0], OH, OW, w.shape[0])).astype(dtype)
    params = [rng.standard_normal(w.shape[0]).astype(dtype) for _ in range(3)]
    batch = run(x, w, b, padding, True, tuple(params) + (add.reshape(-1),), n_threads=2)
    assert not np.isnan(batch).any()
    for n in range(x.shape[0]):
        one = run(x[n : n + 1], w, b, padding, True, tuple(params) + (add[n].reshape(-1),), 1)
        assert one.tobytes() == np.ascontiguousarray(batch[n : n + 1]).tobytes(), n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_by_tap_is_a_channels_kernels_transposed(dtype):
    """The weight transforms' gather: row 3i + j holds tap (i, j) of every filter, in float64."""
    w = np.random.default_rng(1).standard_normal((5, 3, 3, 3)).astype(dtype)
    for c in range(3):
        g = np.full((9, 5), np.nan)
        _wk.kernels_by_tap(w, c, g)
        assert np.array_equal(g, w[:, c].reshape(5, 9).T.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positions", [16, 36])  # F(2x2)'s patch, F(4x4)'s
@pytest.mark.parametrize("channels, filters", [(16, 16), (32, 48)])
def test_block_products_are_the_matrix_products(positions, channels, filters, dtype):
    """The forwards' products over one block, V and U laid out as the kernels lay them out:
    M[fb, t, e, f] = sum_c V[t, c // 16, e, c % 16] U[e, c, 16 fb + f], against numpy in
    float64; only the block's first ntp rows are written."""
    rng = np.random.default_rng(positions + channels)
    E, C, Fp, TBp, ntp = positions, channels, filters, 3 * RN, 2 * RN
    S = 16 * E
    nfb = Fp // 16
    V = rng.standard_normal((TBp, C // 16, E, 16)).astype(dtype)
    U = rng.standard_normal((E, C, Fp)).astype(dtype)
    abase = np.array([t * E * C + 16 * e for e in range(E) for t in range(TBp)], np.uint64)
    aoff = np.array([c // 16 * S + c % 16 for c in range(C)], np.uint64)
    M = np.full(nfb * TBp * S, np.nan, dtype)
    zb = np.zeros(16, dtype)
    _wk.block_products(
        V.reshape(-1), abase, aoff, C, U.reshape(-1), Fp, zb, M, TBp, 0, nfb, 0, ntp, E, S
    )
    M = M.reshape(nfb, TBp, E, 16)
    v = V.transpose(0, 2, 1, 3).reshape(TBp, E, C).astype(np.float64)  # [t, e, c]
    ref = np.einsum("tec,ecf->tef", v, U.astype(np.float64))  # [t, e, f]
    ref = ref.reshape(TBp, E, nfb, 16).transpose(2, 0, 1, 3)
    tol = F64_REL if dtype == np.float64 else F32_REL
    scale = np.abs(ref[:, :ntp]).max()
    assert np.abs(M[:, :ntp] - ref[:, :ntp]).max() <= tol * scale
    assert np.isnan(M[:, ntp:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("positions", [16, 36])
@pytest.mark.parametrize("filters", [32, 48, 80])  # pairs of 16-filter blocks, and an odd last
# (block rows, rows computed) in narrow tiles (RN): on AVX2 all narrow (under 12), all wide, both
@pytest.mark.parametrize("blocks", [(1, 1), (2, 2), (3, 1), (3, 2), (3, 3), (6, 4), (6, 5), (6, 6)])
def test_block_products_wide_is_bitwise_block_products(positions, filters, blocks, dtype):
    """block_products_wide (the forward's products on a 32-filter tile: AVX-512's tall 6x32,
    AVX2's wide 3x32) against block_products: the same bits in every written row, rows past
    ntp untouched (NaN), with values that make the order of the sums show (magnitudes from
    1e-6 to 1e6); blocks of RN rows to 6 RN, computed to their end or not."""
    rng = np.random.default_rng(positions + filters + 10 * blocks[0] + blocks[1])
    E, C, Fp, TBp, ntp = positions, 48, filters, blocks[0] * RN, blocks[1] * RN
    S = 16 * E
    nfb = Fp // 16
    V = rng.standard_normal((TBp, C // 16, E, 16)) * 10.0 ** rng.integers(-6, 7, (1, 1, E, 16))
    V = V.astype(dtype)
    U = rng.standard_normal((E, C, Fp)).astype(dtype)
    abase = np.array([t * E * C + 16 * e for e in range(E) for t in range(TBp)], np.uint64)
    aoff = np.array([c // 16 * S + c % 16 for c in range(C)], np.uint64)
    zb = np.zeros(16, dtype)
    narrow = np.full(nfb * TBp * S, np.nan, dtype)
    wide = np.full(nfb * TBp * S, np.nan, dtype)
    _wk.block_products(
        V.reshape(-1), abase, aoff, C, U.reshape(-1), Fp, zb, narrow, TBp, 0, nfb, 0, ntp, E, S
    )
    _wk.block_products_wide(
        V.reshape(-1), abase, aoff, C, U.reshape(-1), Fp, zb, wide, TBp, nfb, ntp, E, S
    )
    narrow, wide = narrow.reshape(nfb, TBp, E, 16), wide.reshape(nfb, TBp, E, 16)
    assert not np.isnan(wide[:, :ntp]).any()
    assert np.array_equal(wide[:, :ntp], narrow[:, :ntp])
    assert np.isnan(wide[:, ntp:]).all()


@pytest.mark.parametrize("kernel", ["winograd", "winograd4"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, size", [(1, 5), (1, 8), (2, 7), (3, 13)])
@pytest.mark.parametrize("filters", [32, 48, 80])
def test_forward_is_bitwise_its_16_filter_slices(kernel, dtype, batch, size, filters):
    """A forward of 32 or more filters (its products on a 32-filter tile) gives the bits of its
    16-filter slices run one by one (the narrow tile's): small batches, whose blocks are short
    (on AVX2 4 or 8 rows: the narrow tile alone), odd counts of filter blocks, 1 and 2
    threads."""
    mod = _wk if kernel == "winograd" else _wk4
    forward = _wk.conv2d_winograd_forward if kernel == "winograd" else _wk4.conv2d_winograd4_forward
    rng = np.random.default_rng(batch * 100 + size + filters)
    x = rng.standard_normal((batch, size, size, 32)).astype(dtype)
    w = rng.standard_normal((filters, 32, 3, 3)).astype(dtype)
    b = rng.standard_normal(filters).astype(dtype)
    none = np.empty(0, dtype)

    def run(wf, bf, workers):
        out = np.full((batch, size, size, wf.shape[0]), np.nan, dtype)
        bn = (none, none, none, none)
        forward(x, mod.weight_transform(wf, wf.shape[0]), bf, 1, 1, False, out, bn, workers)
        return out

    for workers in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        whole = run(w, b, workers)
        slices = [run(w[f : f + 16], b[f : f + 16], workers) for f in range(0, filters, 16)]
        assert not np.isnan(whole).any()
        assert whole.tobytes() == np.concatenate(slices, axis=3).tobytes()


def test_rows_per_block_wastes_the_fewest_rows():
    """Against every allowed block height, counted by hand: the blocks' tiles rounded up to the
    register tile's rows, the fewest such rows, the lowest height on a tie."""

    def wasted(TH, TW, k):
        blocks = [min(k, TH - r) * TW for r in range(0, TH, k)]
        return sum(-(-t // RN) * RN for t in blocks)

    for least in (12, 24):
        for TH in range(1, 20):
            for TW in range(1, 20):
                k = _wk.rows_per_block(TH, TW, least, 4 * least)
                k0 = min(TH, -(-least // TW))
                allowed = [h for h in range(k0, TH + 1) if h == k0 or h * TW <= 4 * least]
                best = min(wasted(TH, TW, h) for h in allowed)
                assert k in allowed and wasted(TH, TW, k) == best, (TH, TW, least, k)
                assert k == min(h for h in allowed if wasted(TH, TW, h) == best)
    # 28x28 outputs (14 tiles a row) and 32x32 (16): 42 and 48 tiles, 7 and 8 register tiles of
    # 6 rows (AVX-512); 28 and 32 tiles, 7 and 8 register tiles of 4 (AVX2)
    rows = {6: 3, 4: 2}[RN]
    assert _wk.rows_per_block(14, 14, 24, 96) == rows
    assert _wk.rows_per_block(16, 16, 24, 96) == rows


def test_where_it_applies():
    assert F.winograd_applies((64, 32, 3, 3))
    assert F.winograd_applies((16, 48, 3, 3), stride=(1, 1))
    assert F.winograd_applies((64, 16, 3, 3))
    assert not F.winograd_applies((64, 8, 3, 3))
    assert not F.winograd_applies((64, 24, 3, 3))  # channels not a multiple of 16
    assert not F.winograd_applies((40, 32, 3, 3))
    assert not F.winograd_applies((64, 32, 5, 5))
    assert not F.winograd_applies((64, 32, 3, 3), stride=2)
    assert not F.winograd_applies((64, 32, 3, 3), dilation=2)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FASTCNN_WINOGRAD", "0")
    assert not F.winograd_applies((64, 32, 3, 3))


def _conv(seed=6):
    return fastcnn.Conv2D(32, 48, 3, padding=1, rng=np.random.default_rng(seed))


def test_a_layer_uses_it_in_both_modes(monkeypatch):
    conv = _conv()
    x = np.random.default_rng(7).standard_normal((3, 32, 6, 5)).astype(np.float32)  # F(2x2)
    train = conv(x)
    conv.eval()
    assert np.array_equal(conv(x), train)
    monkeypatch.setenv("FASTCNN_WINOGRAD", "0")
    direct = conv(x)
    assert not np.array_equal(direct, train)  # another summation order
    np.testing.assert_allclose(train, direct, rtol=0, atol=F32_REL * np.abs(direct).max())


IG_SHAPES = [  # N, C, F, H, W: the forward pads by 1
    (2, 16, 32, 7, 6),
    (3, 32, 48, 9, 11),
    (2, 48, 32, 6, 5),
    (1, 32, 64, 4, 4),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", IG_SHAPES)
def test_input_gradient_matches_the_textbook_backward(shape, dtype):
    N, C, Fn, H, W = shape
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Fn, C, 3, 3)).astype(dtype)
    dy = rng.standard_normal((N, Fn, H, W)).astype(dtype)
    assert F._input_gradient_by_winograd(w, (1, 1), (1, 1, 1, 1), (1, 1))
    dx, _, _ = F.conv2d_backward(x, w, dy, 1, 1)
    ref_dx, _, _ = naive_conv_backward(
        x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64), padding=((1, 1), (1, 1))
    )
    assert dx.dtype == dtype
    tol = (f32_rel(H, W) if dtype == np.float32 else F64_REL) * float(np.abs(ref_dx).max())
    assert float(np.abs(dx - ref_dx).max()) <= tol


def test_a_layer_takes_its_input_gradient_by_it(monkeypatch):
    conv = _conv()
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 32, 10, 9)).astype(np.float32)
    dy = rng.standard_normal((3, 48, 10, 9)).astype(np.float32)
    conv(x)
    dx = conv.backward(dy)
    monkeypatch.setenv("FASTCNN_WINOGRAD", "0")
    conv(x)
    direct = conv.backward(dy)
    assert not np.array_equal(dx, direct)
    np.testing.assert_allclose(dx, direct, rtol=0, atol=f32_rel(10, 9) * np.abs(direct).max())


def test_input_gradient_where_it_applies():
    pads = (1, 1, 1, 1)
    w = np.ones((48, 32, 3, 3), np.float32)  # 48 filters: dy's channels
    assert F._input_gradient_by_winograd(w, (1, 1), pads, (1, 1))
    assert not F._input_gradient_by_winograd(w[:8], (1, 1), pads, (1, 1))  # 8 in dy
    assert not F._input_gradient_by_winograd(w[:, :24], (1, 1), pads, (1, 1))  # 24 out
    assert not F._input_gradient_by_winograd(w, (2, 2), pads, (1, 1))
    assert not F._input_gradient_by_winograd(w, (1, 1), (0, 0, 0, 0), (1, 1))  # 'valid'
    assert not F._input_gradient_by_winograd(w, (1, 1), (2, 2, 2, 2), (1, 1))
    w[1, 2, 0, 0] = np.nan
    assert not F._input_gradient_by_winograd(w, (1, 1), pads, (1, 1))


def _tree(rng, dtype):
    def conv(c, f, padding=1):
        return fastcnn.Conv2D(c, f, 3, padding=padding, dtype=dtype, rng=rng)

    return fastcnn.Sequential(
        conv(32, 32),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),  # 'same': the pooled backward's input gradient by Winograd
        conv(32, 32, padding=0),  # 'valid': the pooled backward's sparse input gradient
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        conv(32, 48),
        fastcnn.BatchNorm2D(48, dtype=dtype),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        conv(48, 32),
        fastcnn.ReLU(),
        conv(32, 16),
        fastcnn.BatchNorm2D(16, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_training_plans_stay_bitwise_the_layers_one_by_one(dtype):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 32, 20, 20)).astype(dtype)
    results = []
    for fuse in (True, False):
        model = _tree(np.random.default_rng(13), dtype)
        model.train()
        with fastcnn.plan.fusion(fuse):
            y = model(x)
            dx = model.backward(np.cos(np.asarray(y)), input_grad=True)
        results.append([y, dx] + [p.grad.copy() for p in model.parameters()])
    for fused, unfused in zip(*results, strict=True):
        assert np.array_equal(fused, unfused)


def test_fused_evaluation_plans_stay_bitwise_the_layers_one_by_one():
    rng = np.random.default_rng(8)
    model = fastcnn.Sequential(
        fastcnn.Conv2D(16, 32, 3, padding=1, rng=rng),
        fastcnn.ReLU(),
        fastcnn.Conv2D(32, 32, 3, padding=1, rng=rng),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        fastcnn.Conv2D(32, 48, 3, padding=1, rng=rng),
        fastcnn.BatchNorm2D(48),
        fastcnn.ReLU(),
        fastcnn.MaxPool2D(2),
        fastcnn.Conv2D(48, 16, 3, padding=1, rng=rng),
        fastcnn.BatchNorm2D(16),
    )
    x = rng.standard_normal((4, 16, 12, 12)).astype(np.float32)
    model.train()
    model(x)  # running statistics away from 0 and 1
    model.eval()
    fused = model(x)
    with fastcnn.plan.fusion(False):
        unfused = model(x)
    assert np.array_equal(fused, unfused)


# ---- the weight gradient ----

WG_SHAPES = [  # N, C, F, H, W, ((top, bottom), (left, right))
    (2, 16, 16, 7, 6, ((1, 1), (1, 1))),  # odd rows: the last tiles half outside
    (3, 32, 48, 9, 11, ((1, 1), (1, 1))),
    (2, 16, 32, 5, 5, ((2, 0), (0, 2))),
    (9, 16, 16, 4, 4, ((1, 1), (1, 1))),  # whole images per block, chunks of unequal size
    (1, 48, 16, 40, 36, ((0, 0), (0, 0))),  # tile rows of one image per block
    (1, 16, 16, 1, 1, ((1, 1), (1, 1))),
]


def run_weight(x, dy, padding, n_threads=None, kernel=None):
    """The weight gradient kernel (this F(2x2, 3x3) one, or ``kernel`` of its signature:
    tests/test_winograd4.py's) on NCHW arrays, NaN-filled outputs."""
    (pt, _), (pl, _) = padding
    F = dy.shape[1]
    dw = np.full((F, x.shape[1], 3, 3), np.nan, dtype=x.dtype)
    db = np.full(F, np.nan, dtype=x.dtype)
    nt = numba.get_num_threads() if n_threads is None else n_threads
    kernel = _wk.conv2d_winograd_backward_weight if kernel is None else kernel
    kernel(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        np.ascontiguousarray(dy.transpose(0, 2, 3, 1)),
        pt,
        pl,
        dw,
        db,
        nt,
    )
    return dw, db


def weight_data(shape, dtype, seed=20):
    N, C, Fn, H, W, padding = shape
    (pt, pb), (pl, pr) = padding
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    dy = rng.standard_normal((N, Fn, H + pt + pb - 2, W + pl + pr - 2)).astype(dtype)
    return x, dy, padding


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("E, F, C, nt", [(16, 16, 16, 1), (36, 20, 32, 47), (16, 48, 16, 9)])
def test_weight_products_are_the_textbook_sums(E, F, C, nt, accumulate):
    """winograd.weight_products (both weight gradients' products): S[e, f, c] (+)= sum over the
    block's nt tiles t of Z[e, t, f] * V[e, c, t], in the narrow tile's layout, for filter
    counts that leave padding rows (20: 4 of 24); weight_operands' offsets."""
    TBp = nt + 2  # planes longer than the tiles used
    nrb, ncb = (F + RN - 1) // RN, C // 16
    rng = np.random.default_rng(F + nt)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        Z = rng.standard_normal((E, TBp, F)).astype(dtype)
        V = rng.standard_normal((E, ncb, TBp, 16)).astype(dtype)
        start = rng.standard_normal((E, nrb, ncb, RN, 16)).astype(dtype)
        S = start.copy() if accumulate else np.full_like(start, np.nan)
        abase, aoff = _wk.weight_operands(E, nrb, TBp, F)
        _wk.weight_products(
            Z.reshape(-1), abase, aoff, nt, V.reshape(-1), TBp, S.reshape(-1), E, nrb, ncb,
            accumulate,
        )  # fmt: skip
        zp = np.concatenate([Z, np.repeat(Z[:, :, :1], nrb * RN - F, axis=2)], axis=2)
        ref = np.einsum("etf,ectl->efcl", zp[:, :nt].astype(np.float64), V[:, :, :nt])
        ref = ref.reshape(E, nrb, RN, ncb, 16).transpose(0, 1, 3, 2, 4)
        if accumulate:
            ref = ref + start
        assert np.abs(S - ref).max() <= tol * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", WG_SHAPES)
def test_weight_gradient_matches_the_textbook_backward(shape, dtype):
    x, dy, padding = weight_data(shape, dtype)
    dw, db = run_weight(x, dy, padding)
    assert dw.dtype == dtype and not np.isnan(dw).any() and not np.isnan(db).any()
    _, ref_dw, ref_db = naive_conv_backward(
        x.astype(np.float64),
        np.zeros(dw.shape),
        dy.astype(np.float64),
        padding=padding,
    )
    # float32: every S entry sums 4x-transformed terms over all tiles (measured 2e-6..1e-5
    # of the largest gradient; a wrong coefficient gives 1e-1)
    rel = 5e-5 if dtype == np.float32 else 1e-12
    assert float(np.abs(dw - ref_dw).max()) <= rel * float(np.abs(ref_dw).max())
    assert float(np.abs(db - ref_db).max()) <= rel * max(1.0, float(np.abs(ref_db).max()))


@pytest.mark.parametrize("shape", WG_SHAPES[:3])
def test_weight_gradient_is_the_textbook_winograd(shape):
    x, dy, padding = weight_data(shape, np.float64, seed=21)
    ref = naive_winograd_weight(x, dy, padding)
    dw, _ = run_weight(x, dy, padding)
    np.testing.assert_allclose(dw, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_weight_gradient_same_bits_for_any_thread_count():
    x, dy, padding = weight_data((11, 16, 32, 6, 6, ((1, 1), (1, 1))), np.float32, seed=22)
    one = run_weight(x, dy, padding, n_threads=1)
    for n in (2, 3, 7):
        with threads(min(n, numba.config.NUMBA_NUM_THREADS)):
            got = run_weight(x, dy, padding, n_threads=n)
            assert np.array_equal(got[0], one[0]) and np.array_equal(got[1], one[1])


def test_weight_gradient_by_finite_differences():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 16, 5, 4))
    w = rng.standard_normal((16, 16, 3, 3))
    g = rng.standard_normal((2, 16, 5, 4))
    assert F._weight_gradient_by_winograd(w.shape, (1, 1), (1, 1, 1, 1), (1, 1))
    _, dw, db = F.conv2d_backward(x, w, g, 1, 1)
    with threads(1):
        assert_gradient(lambda v: F.conv2d_forward(x, v, None, 1, 1), w, g, dw)
        bias = np.zeros(16)
        assert_gradient(lambda v: F.conv2d_forward(x, w, v, 1, 1), bias, g, db)


def test_weight_gradient_where_it_applies(monkeypatch):
    ok = (1, 1), (1, 1, 1, 1), (1, 1)
    assert F._weight_gradient_by_winograd((16, 16, 3, 3), *ok)
    assert F._weight_gradient_by_winograd((48, 32, 3, 3), *ok)
    assert not F._weight_gradient_by_winograd((16, 8, 3, 3), *ok)
    assert not F._weight_gradient_by_winograd((24, 16, 3, 3), *ok)
    assert not F._weight_gradient_by_winograd((16, 16, 5, 5), *ok)
    assert not F._weight_gradient_by_winograd((16, 16, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    assert not F._weight_gradient_by_winograd((16, 16, 3, 3), (1, 1), (0, 0, 0, 0), (1, 1))
    monkeypatch.setenv("FASTCNN_WINOGRAD", "0")
    assert not F._weight_gradient_by_winograd((16, 16, 3, 3), *ok)


def test_a_layer_takes_its_weight_gradient_by_it(monkeypatch):
    conv = fastcnn.Conv2D(16, 32, 3, padding=1, rng=np.random.default_rng(24))
    rng = np.random.default_rng(25)
    x = rng.standard_normal((3, 16, 10, 9)).astype(np.float32)
    dy = rng.standard_normal((3, 32, 10, 9)).astype(np.float32)
    grads = []
    for env in ("1", "0"):
        monkeypatch.setenv("FASTCNN_WINOGRAD", env)
        conv.zero_grad()
        conv(x)
        conv.backward(dy)
        grads.append((conv.weight.grad.copy(), conv.bias.grad.copy()))
    (dw, db), (direct_dw, direct_db) = grads
    assert not np.array_equal(dw, direct_dw)
    np.testing.assert_allclose(dw, direct_dw, rtol=0, atol=5e-5 * np.abs(direct_dw).max())
    np.testing.assert_allclose(db, direct_db, rtol=0, atol=5e-5 * np.abs(direct_db).max())


@pytest.mark.parametrize("size", [6, 20])  # F(2x2, 3x3) and F(4x4, 3x3)
def test_evaluation_reuses_the_transformed_weights_until_they_change(size):
    """Evaluation mode transforms a layer's weights once (functional._transformed_weight) and
    sees every change to them: an edit in place, an optimizer's step, a new array; the output
    is always the freshly transformed weights' (the kernel run here with its own transform)."""
    conv = fastcnn.Conv2D(16, 32, 3, padding=1, rng=np.random.default_rng(11)).eval()
    x = np.random.default_rng(12).standard_normal((2, 16, size, size)).astype(np.float32)
    four = size >= F.WINOGRAD4_MIN_SIZE
    module = _wk4 if four else _wk
    kernel = _wk4.conv2d_winograd4_forward if four else conv2d_winograd_forward
    key = (id(conv.weight.data), module.__name__)

    def fresh():
        w = conv.weight.data
        return run(
            x, w, conv.bias.data, ((1, 1), (1, 1)), kernel=kernel, transform=module.weight_transform
        )

    first = conv(x)
    assert np.array_equal(first, fresh())
    kept = F._TRANSFORMED[key][2]
    assert np.array_equal(conv(x), first) and F._TRANSFORMED[key][2] is kept  # reused
    conv.weight.data[3, 5, 1, 2] += 0.5  # in place
    edited = conv(x)
    assert not np.array_equal(edited, first) and np.array_equal(edited, fresh())
    assert F._TRANSFORMED[key][2] is not kept
    opt = fastcnn.SGD(conv.parameters(), lr=0.1)
    conv.weight.grad[...] = 1.0
    opt.step()
    stepped = conv(x)
    assert not np.array_equal(stepped, edited) and np.array_equal(stepped, fresh())
    conv.weight.data = conv.weight.data * 2  # a new array: the old one's entry goes with it
    doubled = conv(x)
    assert np.array_equal(doubled, fresh())
    assert key not in F._TRANSFORMED or F._TRANSFORMED[key][0]() is conv.weight.data
    conv.train()  # training transforms on every call and keeps nothing
    F._TRANSFORMED.clear()
    assert np.array_equal(conv(x), fresh())
    assert not F._TRANSFORMED


def test_a_grouped_convolution_keeps_no_transformed_weights(monkeypatch):
    """Its groups' weights are views made anew on every call: transformed, never kept (a copy
    per group and call, gone with the view, would be work for nothing)."""
    kept = []

    class Recording(dict):
        def __setitem__(self, key, value):
            kept.append(key)
            super().__setitem__(key, value)

    monkeypatch.setattr(F, "_TRANSFORMED", Recording())
    conv = fastcnn.Conv2D(32, 32, 3, padding=1, groups=2, rng=np.random.default_rng(13)).eval()
    x = np.random.default_rng(14).standard_normal((2, 32, 8, 8)).astype(np.float32)
    first = conv(x)
    assert np.array_equal(conv(x), first)
    assert kept == []
    plain = fastcnn.Conv2D(32, 32, 3, padding=1, rng=np.random.default_rng(13)).eval()
    plain(x)
    assert len(kept) == 1  # a layer's own weight array is kept
