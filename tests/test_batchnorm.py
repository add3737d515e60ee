"""Batch-normalisation kernels (fastcnn.kernels.batchnorm) against the textbook loops
(tests/naive/batchnorm.py), finite differences, PyTorch (when installed), determinism, float32
accuracy and speed."""

import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fastcnn.kernels import batchnorm as K
from gradcheck import assert_gradient, relative_error
from naive import batchnorm as naive
from speedup import speedup

# ---------------------------------------------------------------- calling the kernels
# Two families: the NCHW kernels, and the channels-last ones (``*_nhwc``), which take an
# (N, C, H, W) activation stored NHWC as its (N*H*W, C) matrix of pixels. Every test runs both.
LAYOUTS = ("nchw", "nhwc")


def _pixels(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).reshape(-1, a.shape[1])


def _unpixels(m, shape):
    n, c, h, w = shape
    return m.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def fast_train(x, gamma, beta, eps, layout="nchw"):
    """Kernel forward (train); outputs start as NaN so an unwritten element cannot pass."""
    c = x.shape[1]
    out = np.full_like(x, np.nan)
    mean = np.full(c, np.nan, dtype=x.dtype)
    invstd = np.full(c, np.nan, dtype=x.dtype)
    if layout == "nhwc":
        out = _pixels(out)
        affine = np.empty((2, c), dtype=x.dtype)
        K.batchnorm_forward_train_nhwc(
            _pixels(x), gamma, beta, x.dtype.type(eps), out, mean, invstd, False, affine
        )
        return _unpixels(out, x.shape), mean, invstd
    K.batchnorm_forward_train(x, gamma, beta, x.dtype.type(eps), out, mean, invstd)
    return out, mean, invstd


def fast_eval(x, gamma, beta, running_mean, running_var, eps, layout="nchw"):
    out = np.full_like(x, np.nan)
    if layout == "nhwc":
        out = _pixels(out)
        K.batchnorm_forward_eval_nhwc(
            _pixels(x), gamma, beta, running_mean, running_var, x.dtype.type(eps), out
        )
        return _unpixels(out, x.shape)
    K.batchnorm_forward_eval(x, gamma, beta, running_mean, running_var, x.dtype.type(eps), out)
    return out


def fast_backward(dy, x, gamma, mean, invstd, layout="nchw"):
    c = x.shape[1]
    dx = np.full_like(x, np.nan)
    dgamma = np.full(c, np.nan, dtype=x.dtype)
    dbeta = np.full(c, np.nan, dtype=x.dtype)
    if layout == "nhwc":
        dx = _pixels(dx)
        affine = np.full((2, c), np.nan, dtype=x.dtype)  # read without the ReLU, never used
        K.batchnorm_backward_nhwc(
            _pixels(dy), _pixels(x), gamma, mean, invstd, dx, dgamma, dbeta, False, affine
        )
        return _unpixels(dx, x.shape), dgamma, dbeta
    K.batchnorm_backward(dy, x, gamma, mean, invstd, dx, dgamma, dbeta)
    return dx, dgamma, dbeta


def make_inputs(shape, seed, loc=0.0, scale=1.0):
    """float64 x, gamma, beta, dy, running_mean, running_var."""
    r = np.random.default_rng(seed)
    c = shape[1]
    x = loc + scale * r.standard_normal(shape)
    gamma = r.standard_normal(c)
    beta = r.standard_normal(c)
    dy = r.standard_normal(shape)
    running_mean = loc + r.standard_normal(c)
    running_var = r.uniform(0.1, 5.0, c) * scale**2
    return x, gamma, beta, dy, running_mean, running_var


# ---------------------------------------------------------------- hypothesis cases
CASES = [
    (dtype, tol, layout)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4))
    for layout in LAYOUTS
]


@st.composite
def bn_cases(draw):
    """4-D batches (any N >= 1, H*W > 1) and BatchNorm1D batches (N, C, 1, 1) with N >= 2;
    C up to 300 on the 1x1 path crosses its 128-channel blocks; sometimes planes of up to
    30x30, so that N*H*W spans several of the channels-last kernels' 256-pixel chunks."""
    if draw(st.integers(0, 3)) == 0:
        n = draw(st.integers(1, 2))
        c = draw(st.integers(1, 3))
        h = draw(st.integers(8, 30))
        w = draw(st.integers(8, 30))
    elif draw(st.booleans()):
        n = draw(st.integers(2, 12))
        c = draw(st.integers(1, 300))
        h = w = 1
    else:
        n = draw(st.integers(1, 4))
        c = draw(st.integers(1, 6))
        h = draw(st.integers(1, 7))
        w = draw(st.integers(1, 7))
        assume(h * w > 1)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    # |loc| / scale up to 1000: the kernels correct for the float32 rounding of the stored
    # mean, which xhat would otherwise magnify by |mean| / std
    loc = draw(st.floats(-100.0, 100.0))
    scale = draw(st.floats(0.1, 10.0))
    seed = draw(st.integers(0, 2**32 - 1))
    return (n, c, h, w), eps, loc, scale, seed


@given(bn_cases())
def test_forward_train_matches_naive(case):
    shape, eps, loc, scale, seed = case
    x, gamma, beta, _, _, _ = make_inputs(shape, seed, loc, scale)
    y_ref, mean_ref, var_ref = naive.batchnorm_forward_train(x, gamma, beta, eps)
    invstd_ref = 1.0 / np.sqrt(var_ref + eps)
    for dtype, tol, layout in CASES:
        out, mean, invstd = fast_train(*(a.astype(dtype) for a in (x, gamma, beta)), eps, layout)
        assert out.dtype == mean.dtype == invstd.dtype == dtype
        # float32: compared with the float64 result on the same (float32-rounded) inputs
        if dtype == np.float32:
            y_ref32, mean_ref32, var_ref32 = naive.batchnorm_forward_train(
                *(a.astype(np.float32).astype(np.float64) for a in (x, gamma, beta)), eps
            )
            refs = (y_ref32, mean_ref32, 1.0 / np.sqrt(var_ref32 + eps))
        else:
            refs = (y_ref, mean_ref, invstd_ref)
        for got, ref in zip((out, mean, invstd), refs, strict=True):
            assert relative_error(got, ref) <= tol


@given(bn_cases())
def test_forward_eval_matches_naive(case):
    shape, eps, loc, scale, seed = case
    x, gamma, beta, _, rmean, rvar = make_inputs(shape, seed, loc, scale)
    for dtype, tol, layout in CASES:
        args = [a.astype(dtype) for a in (x, gamma, beta, rmean, rvar)]
        ref = naive.batchnorm_forward_eval(*(a.astype(np.float64) for a in args), eps)
        out = fast_eval(*args, eps, layout)
        assert out.dtype == dtype
        assert relative_error(out, ref) <= tol


@given(bn_cases())
def test_backward_matches_naive(case):
    shape, eps, loc, scale, seed = case
    x, gamma, beta, dy, _, _ = make_inputs(shape, seed, loc, scale)
    count = shape[0] * shape[2] * shape[3]
    for dtype, tol, layout in CASES:
        xd, gd, bd, dyd = (a.astype(dtype) for a in (x, gamma, beta, dy))
        _, mean, invstd = fast_train(xd, gd, bd, eps, layout)
        dx, dgamma, dbeta = fast_backward(dyd, xd, gd, mean, invstd, layout)
        assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
        dx_ref, dgamma_ref, dbeta_ref = naive.batchnorm_backward(
            *(a.astype(np.float64) for a in (xd, gd, dyd)), eps
        )
        assert relative_error(dgamma, dgamma_ref) <= tol
        assert relative_error(dbeta, dbeta_ref) <= tol
        if count == 2:
            # Two values per channel: xhat = +-sqrt(var / (var + eps)), and dx = gamma * invstd *
            # (dy - mean(dy) - xhat * mean(dy * xhat)) cancels down to O(eps / var) of its terms
            # (exactly zero for eps = 0), so its size says nothing about the kernel's rounding:
            # measure the error against the size of the terms instead.
            terms = np.abs(gd[None, :, None, None] * invstd[None, :, None, None] * dyd).max()
            assert np.abs(dx - dx_ref).max() <= tol * terms
        else:
            assert relative_error(dx, dx_ref) <= tol


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("shape", [(3, 16, 13, 11), (1, 16, 1, 3), (2, 16, 8, 16)])
def test_sixteen_channels_match_naive(shape):
    """16 channels take their own sums (_chunk_grad_sums16, _chunk_sq_dev16): here with a chunk
    of 256 pixels, a last chunk whose pixels are no multiple of 4, and a lone short chunk."""
    x, gamma, beta, dy, _, _ = make_inputs(shape, 7, loc=50.0, scale=2.0)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        xd, gd, bd, dyd = (a.astype(dtype) for a in (x, gamma, beta, dy))
        x64, g64, b64, dy64 = (a.astype(np.float64) for a in (xd, gd, bd, dyd))
        out, mean, invstd = fast_train(xd, gd, bd, 1e-5, "nhwc")
        y_ref, mean_ref, var_ref = naive.batchnorm_forward_train(x64, g64, b64, 1e-5)
        assert relative_error(out, y_ref) <= tol
        assert relative_error(mean, mean_ref) <= tol
        assert relative_error(invstd, 1.0 / np.sqrt(var_ref + 1e-5)) <= tol
        dx, dgamma, dbeta = fast_backward(dyd, xd, gd, mean, invstd, "nhwc")
        refs = naive.batchnorm_backward(x64, g64, dy64, 1e-5)
        for got, ref in zip((dx, dgamma, dbeta), refs, strict=True):
            assert relative_error(got, ref) <= tol


@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (1, 2, 2, 3), (5, 3, 1, 1)])
def test_backward_finite_differences(shape):
    eps = 1e-3
    x, gamma, beta, dy, _, _ = make_inputs(shape, 7, loc=0.5, scale=2.0)
    _, mean, invstd = fast_train(x, gamma, beta, eps)
    dx, dgamma, dbeta = fast_backward(dy, x, gamma, mean, invstd)
    # x moves the batch statistics too: the loss goes through the train-mode forward
    assert_gradient(lambda v: fast_train(v, gamma, beta, eps)[0], x.copy(), dy, dx)
    assert_gradient(lambda v: fast_train(x, v, beta, eps)[0], gamma.copy(), dy, dgamma)
    assert_gradient(lambda v: fast_train(x, gamma, v, eps)[0], beta.copy(), dy, dbeta)


# ---------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (16, 10, 1, 1)])
def test_matches_torch(shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    eps = 1e-5
    x, gamma, beta, dy, rmean, rvar = make_inputs(shape, 11, loc=3.0, scale=2.0)
    # BatchNorm1D data is (N, C) for PyTorch
    tshape = shape if shape[2] * shape[3] > 1 else shape[:2]
    tx = torch.tensor(x.reshape(tshape), requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    ty = F.batch_norm(tx, None, None, tg, tb, training=True, eps=eps)
    tdx, tdg, tdb = torch.autograd.grad(ty, (tx, tg, tb), torch.tensor(dy.reshape(tshape)))
    _, tmean, tinvstd = torch.native_batch_norm(
        tx.detach(), tg.detach(), tb.detach(), None, None, True, 0.1, eps
    )
    tyeval = F.batch_norm(
        tx.detach(),
        torch.tensor(rmean),
        torch.tensor(rvar),
        tg.detach(),
        tb.detach(),
        training=False,
        eps=eps,
    )

    out, mean, invstd = fast_train(x, gamma, beta, eps)
    dx, dgamma, dbeta = fast_backward(dy, x, gamma, mean, invstd)
    out_eval = fast_eval(x, gamma, beta, rmean, rvar, eps)
    pairs = [
        (out, ty),
        (mean, tmean),
        (invstd, tinvstd),
        (out_eval, tyeval),
        (dx, tdx),
        (dgamma, tdg),
        (dbeta, tdb),
    ]
    for got, ref in pairs:
        assert relative_error(got.reshape(ref.shape), ref.detach().numpy()) <= 1e-10


# ---------------------------------------------------------------- float32 accuracy
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_large_channel_accuracy(layout):
    """64x26x26 = 43,264 values per channel with |mean| >> std: a float32 running sum would be
    off by ~3e-3 in the mean (~1e-3 relative in out); the float64 accumulators keep 1e-4."""
    shape = (64, 2, 26, 26)
    r = np.random.default_rng(3)
    x = r.standard_normal(shape)
    x[:, 0] = 1000.0 + x[:, 0]
    x[:, 1] = -300.0 + 0.5 * x[:, 1]
    x32 = x.astype(np.float32)
    x = x32.astype(np.float64)  # the reference sees exactly the float32 inputs
    gamma = np.array([1.5, -0.7])
    beta = np.array([0.2, 0.1])
    dy = r.standard_normal(shape)
    eps = 1e-5
    g32, b32, dy32 = gamma.astype(np.float32), beta.astype(np.float32), dy.astype(np.float32)

    y_ref, mean_ref, var_ref = naive.batchnorm_forward_train(x, gamma, beta, eps)
    out, mean, invstd = fast_train(x32, g32, b32, eps, layout)
    assert relative_error(out, y_ref) <= 1e-4
    assert relative_error(mean, mean_ref) <= 1e-6
    assert relative_error(invstd, 1.0 / np.sqrt(var_ref + eps)) <= 1e-4

    dx_ref, dg_ref, db_ref = naive.batchnorm_backward(x, gamma, dy32.astype(np.float64), eps)
    dx, dgamma, dbeta = fast_backward(dy32, x32, g32, mean, invstd, layout)
    assert relative_error(dx, dx_ref) <= 1e-4
    assert relative_error(dgamma, dg_ref) <= 1e-4
    assert relative_error(dbeta, db_ref) <= 1e-4


# ---------------------------------------------------------------- NaN, determinism
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_propagates_to_its_channel_only(layout):
    x, gamma, beta, dy, _, _ = make_inputs((3, 2, 14, 14), 5)
    x = x.astype(np.float32)
    x[1, 0, 2, 3] = np.nan
    g, b = gamma.astype(np.float32), beta.astype(np.float32)
    out, mean, invstd = fast_train(x, g, b, 1e-5, layout)
    assert np.isnan(mean[0]) and np.isnan(out[:, 0]).all()
    assert np.isfinite(mean[1]) and np.isfinite(out[:, 1]).all()
    dx, dgamma, _ = fast_backward(dy.astype(np.float32), x, g, mean, invstd, layout)
    assert np.isnan(dgamma[0]) and np.isnan(dx[:, 0]).all() and np.isfinite(dx[:, 1]).all()


def _all_outputs(x, gamma, beta, dy, rmean, rvar, layout):
    out, mean, invstd = fast_train(x, gamma, beta, 1e-5, layout)
    grads = fast_backward(dy, x, gamma, mean, invstd, layout)
    return (out, mean, invstd, fast_eval(x, gamma, beta, rmean, rvar, 1e-5, layout)) + grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 16, 12, 12), (64, 300, 1, 1)])
def test_deterministic_across_calls_and_threads(shape, layout):
    arrays = [a.astype(np.float32) for a in make_inputs(shape, 9, loc=2.0)] + [layout]
    first = _all_outputs(*arrays)
    again = _all_outputs(*arrays)
    for a, b in zip(first, again, strict=True):
        assert a.tobytes() == b.tobytes()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _all_outputs(*arrays)
        numba.set_num_threads(2)
        two = _all_outputs(*arrays)
    finally:
        numba.set_num_threads(saved)
    assert numba.get_num_threads() == saved
    for a, b, c in zip(one, two, first, strict=True):
        assert a.tobytes() == b.tobytes() == c.tobytes()


# ---------------------------------------------------------------- speed
def test_speedup_over_naive():
    shape = (8, 32, 26, 26)  # the naive loops take seconds at batch 64
    x, gamma, beta, dy, _, _ = (a.astype(np.float32) for a in make_inputs(shape, 2))
    c = shape[1]
    out, mean, invstd = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    dx, dgamma, dbeta = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    eps = np.float32(1e-5)

    def fast():
        K.batchnorm_forward_train(x, gamma, beta, eps, out, mean, invstd)
        K.batchnorm_backward(dy, x, gamma, mean, invstd, dx, dgamma, dbeta)

    def slow():
        naive.batchnorm_forward_train(x, gamma, beta, 1e-5)
        naive.batchnorm_backward(x, gamma, dy, 1e-5)

    assert speedup(fast, slow) >= 20


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_scale_is_the_textbook_factor(dtype, rng):
    """eval_scale: gamma / sqrt(running_var + eps), divided and rooted in float64 (IEEE, no
    fastmath), rounded once to the array dtype: exactly numpy's float64 computation."""
    c = 37
    gamma = rng.standard_normal(c).astype(dtype)
    var = (rng.random(c) * 3).astype(dtype)
    var[0] = 0  # eps alone under the root
    eps = dtype(1e-5)
    scale = np.empty(c, dtype)
    K.eval_scale(gamma, var, eps, scale)
    expected = (
        gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float64(eps))
    ).astype(dtype)
    np.testing.assert_array_equal(scale, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (48, 16), (96, 40), (7, 129)])
def test_chunk_affine_inplace_matches_the_naive_affine_and_its_out_of_place_twin(dtype, shape, rng):
    """In place, x = (x - m) * s + b per channel: the naive eval BatchNorm's arithmetic within
    rounding, and bitwise _chunk_affine's (the unfused BatchNorm kernel's)."""
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    m, s, b = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(3))
    out_of_place = np.empty_like(x)
    K._chunk_affine(x, m, s, b, out_of_place)
    naive_out = (x.astype(np.float64) - m) * s + b
    inplace = x.copy()
    K.chunk_affine_inplace(inplace, m, s, b)
    np.testing.assert_array_equal(inplace, out_of_place)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert relative_error(inplace, naive_out) <= tol
    # the naive eval BatchNorm, channels along axis 1 of an (N, C, 1, 1) batch
    var = (rng.random(shape[1]) + 0.5).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(dtype)
    eps = dtype(1e-5)
    scale = np.empty(shape[1], dtype)
    K.eval_scale(gamma, var, eps, scale)
    y = x.copy()
    K.chunk_affine_inplace(y, m, scale, b)
    expected = naive.batchnorm_forward_eval(
        x.astype(np.float64)[:, :, None, None],
        gamma.astype(np.float64),
        b.astype(np.float64),
        m.astype(np.float64),
        var.astype(np.float64),
        float(eps),
    )[:, :, 0, 0]
    assert relative_error(y, expected) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 32, 5, 7), (5, 5, 9, 9), (2, 130, 5, 5)])
def test_forward_with_the_relu_is_bitwise_the_forward_then_relu_forward(dtype, shape, rng):
    """batchnorm_forward_train_nhwc with ``relu`` (the select in the loop that writes the
    output) against the kernel without it followed by activations.relu_forward: the same bits
    and statistics, with NaN and infinities in x (channels of NaN statistics), outputs of both
    signs and a constant channel (normalised values at or next to zero)."""
    from fastcnn.kernels import activations

    n, c, h, w = shape
    x = (rng.standard_normal((n * h * w, c)) * 2 + 0.3).astype(dtype)
    x[1, 0] = np.nan  # channels 0 and 1 all NaN after the forward
    x[2, 1] = np.inf
    x[3, 1] = -np.inf
    x[:, c - 1] = dtype(0.75)  # var 0
    gamma, beta = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    gamma[c - 1], beta[c - 1] = -1.5, -0.0
    outs = []
    for relu in (False, True):
        y = np.full_like(x, np.nan)
        mean, invstd = np.empty(c, dtype), np.empty(c, dtype)
        affine = np.empty((2, c), dtype)
        K.batchnorm_forward_train_nhwc(x, gamma, beta, dtype(1e-5), y, mean, invstd, relu, affine)
        outs.append((y, mean, invstd, affine))
    (y, *stats), (got, *got_stats) = outs
    expected = np.empty_like(y)
    activations.relu_forward(y.reshape(-1), expected.reshape(-1))
    assert np.array_equal(got.view(f"u{got.itemsize}"), expected.view(f"u{got.itemsize}"))
    for a, b in zip(got_stats, stats, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (expected > 0).any() and (expected == 0).any() and np.isnan(expected).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_relu_chunk_is_bitwise_the_affine_then_the_relu_select(dtype, rng):
    """batchnorm._chunk_affine_relu and chunk_affine_relu_inplace against _chunk_affine
    followed by activations.relu_forward, on values made to hit the select's edges: -0.0
    (x = m, s < 0, b = -0.0; the select must give +0.0), +-infinity, NaN (passes), and random
    values either side of zero."""
    from fastcnn.kernels import activations

    x = rng.standard_normal((37, 6)).astype(dtype)
    m, s, b = (rng.standard_normal(6).astype(dtype) for _ in range(3))
    x[:, 0], m[0], s[0], b[0] = 0.0, 0.0, -1.0, -0.0
    x[::2, 1], x[1::2, 1], m[1], s[1] = np.inf, -np.inf, 0.0, 1.0
    x[::3, 2] = np.nan
    affine = np.empty_like(x)
    K._chunk_affine(x, m, s, b, affine)
    assert np.signbit(affine[:, 0]).all() and np.isinf(affine[:, 1]).all()
    expected = np.empty_like(x)
    activations.relu_forward(affine.reshape(-1), expected.reshape(-1))
    got = np.full_like(x, np.nan)
    K._chunk_affine_relu(x, m, s, b, got)
    in_place = x.copy()
    K.chunk_affine_relu_inplace(in_place, m, s, b)  # the convolutions' epilogue's
    bits = f"u{x.itemsize}"
    for result in (got, in_place):
        assert np.array_equal(result.view(bits), expected.view(bits))
        assert not np.signbit(result[:, 0]).any() and (result[:, 0] == 0).all()


# ---------------------------------------------------------------- the ReLU's backward fused in
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(4, 16, 8, 8), (3, 32, 5, 7), (2, 64, 4, 4), (5, 3, 9, 9), (1, 16, 1, 3), (2, 130, 5, 5)],
)
def test_backward_with_the_relu_is_bitwise_relu_backward_then_batchnorm_backward(dtype, shape, rng):
    """batchnorm_backward_nhwc with ``relu`` (the mask recomputed from x and the forward's
    scale and shift) against activations.relu_backward on the forward's output, then the
    kernel without it: the same bits, for 16 channels (their own sums), other counts, pixels
    in several 256-pixel chunks and a remainder of fewer than 4, NaN and infinities in x (the
    forward keeps a NaN, the ReLU's backward blocks it) and in dy; on 1 thread and on all."""
    from fastcnn.kernels import activations

    n, c, h, w = shape
    x = (rng.standard_normal((n * h * w, c)) * 2 + 0.3).astype(dtype)
    x[1, 0] = np.nan  # channel 0: NaN statistics, NaN everywhere after the forward
    x[2, 0] = np.inf
    x[min(3, len(x) - 1), 0] = -np.inf
    gamma, beta = (rng.standard_normal(c).astype(dtype) for _ in range(2))
    y = np.empty_like(x)
    mean, invstd = np.empty(c, dtype), np.empty(c, dtype)
    affine = np.full((2, c), np.nan, dtype)
    K.batchnorm_forward_train_nhwc(x, gamma, beta, dtype(1e-5), y, mean, invstd, True, affine)
    assert np.isfinite(affine[:, 1:]).all()
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy[min(4, len(x) - 1), 1 % c] = np.inf
    masked = np.empty_like(dy)
    activations.relu_backward(dy.reshape(-1), y.reshape(-1), masked.reshape(-1))
    expected = [np.full_like(x, np.nan), np.full(c, np.nan, dtype), np.full(c, np.nan, dtype)]
    got = [np.full_like(x, np.nan), np.full(c, np.nan, dtype), np.full(c, np.nan, dtype)]
    unused = np.full((2, c), np.nan, dtype)
    K.batchnorm_backward_nhwc(masked, x, gamma, mean, invstd, *expected, False, unused)
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        before = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            K.batchnorm_backward_nhwc(dy, x, gamma, mean, invstd, *got, True, affine)
        finally:
            numba.set_num_threads(before)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    assert (y[:, 1:] > 0).any() and (y[:, 1:] == 0).any()  # both sides of the mask taken


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_relu_backward_is_the_unfused_pair_and_checks_affine(dtype, rng):
    """functional.batch_norm_relu_backward: bitwise relu_backward then batch_norm_backward on
    a channels-last input and on an NCHW one (no affine there: the unfused pair itself); an
    affine of the wrong shape or dtype is an error naming the layer."""
    from fastcnn import functional as F

    xl = (rng.standard_normal((3, 6, 5, 16)) + 0.2).astype(dtype)
    gamma, beta = (rng.standard_normal(16).astype(dtype) for _ in range(2))
    for x in (xl.transpose(0, 3, 1, 2), np.ascontiguousarray(xl.transpose(0, 3, 1, 2))):
        y, mean, invstd, affine = F.batch_norm_relu_forward_train(x, gamma, beta)
        assert (affine is None) == x.flags.c_contiguous
        y2, mean2, invstd2 = F.batch_norm_forward_train(x, gamma, beta, relu=True)
        for a, b in ((y, y2), (mean, mean2), (invstd, invstd2)):
            np.testing.assert_array_equal(a, b)
        dy = rng.standard_normal(y.shape).astype(dtype)
        got = F.batch_norm_relu_backward(dy, x, y, gamma, mean, invstd, affine, layer="bn")
        expected = F.batch_norm_backward(F.relu_backward(dy, y), x, gamma, mean, invstd)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    x = xl.transpose(0, 3, 1, 2)
    y, mean, invstd, affine = F.batch_norm_relu_forward_train(x, gamma, beta)
    with pytest.raises(ValueError, match="bn.*affine"):
        F.batch_norm_relu_backward(y, x, y, gamma, mean, invstd, affine[:, :8], layer="bn")
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match="bn"):
        F.batch_norm_relu_backward(y, x, y, gamma, mean, invstd, affine.astype(other), layer="bn")
