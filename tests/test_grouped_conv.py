"""Grouped and depthwise convolution (``groups``, as PyTorch's): kernels/depthwise.py and the
group-by-group dense path against the textbook loops (tests/naive/conv2d.py with ``groups``),
forward and backward, both dtypes; the layer's checks, config and fused plans; PyTorch's
conv2d when it is installed. (Finite differences: three grouped layers in test_layers.py's
every-layer list.)"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcnn
from fastcnn import checkpoint
from fastcnn import functional as F
from fastcnn import layers as L
from fastcnn.functional import _no_bn
from fastcnn.kernels import depthwise as K
from gradcheck import relative_error
from naive import conv2d as naive

TOL = {np.float64: 1e-10, np.float32: 1e-4}


@st.composite
def grouped_cases(draw):
    """(x shape, weight shape, stride, padding, dilation, groups): depthwise (one channel per
    group, 1-3 filters each) or groups of several channels."""
    groups = draw(st.integers(1, 4))
    cg = 1 if draw(st.booleans()) else draw(st.integers(1, 3))
    fg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from([0, 1, (1, 0), "same", "valid"]))
    h = draw(st.integers(dilation[0] * (kh - 1) + 1, 8))
    w = draw(st.integers(dilation[1] * (kw - 1) + 1, 8))
    n = draw(st.integers(1, 3))
    return (n, cg * groups, h, w), (fg * groups, cg, kh, kw), stride, padding, dilation, groups


@settings(max_examples=40, deadline=None)
@given(grouped_cases(), st.integers(0, 2**32 - 1))
def test_matches_naive_forward_and_backward(case, seed):
    x_shape, w_shape, stride, padding, dilation, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    _, _, pads, _ = F.conv2d_output_shape(
        x_shape, w_shape, stride, padding, dilation, groups=groups
    )
    padding2 = ((pads[0], pads[1]), (pads[2], pads[3]))
    y_ref = naive.conv2d_forward(x, w, b, stride, padding2, dilation, groups)
    dy = rng.standard_normal(y_ref.shape)
    dx_ref, dw_ref, db_ref = naive.conv2d_backward(x, w, dy, stride, padding2, dilation, groups)
    for dtype, tol in TOL.items():
        args = [a.astype(dtype) for a in (x, w, b)]
        for relu in (False, True):
            y = F.conv2d_forward(*args, stride, padding, dilation, relu=relu, groups=groups)
            assert y.dtype == dtype and y.shape == y_ref.shape
            assert relative_error(y, np.maximum(y_ref, 0) if relu else y_ref) <= tol
        dx, dw, db = F.conv2d_backward(
            args[0], args[1], dy.astype(dtype), stride, padding, dilation, groups=groups
        )
        assert dx.dtype == dw.dtype == db.dtype == dtype
        assert dw.shape == w_shape
        for got, ref in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
            assert relative_error(got, ref) <= tol


@pytest.mark.parametrize("size, evaluation", [(6, False), (16, False), (16, True)])
def test_groups_of_16_channels_on_winograd(size, evaluation):
    """Groups of 16 channels and filters, 3x3, stride 1: each group on the Winograd kernels
    (forward as the layers ask for it: F(2x2) at 6x6, F(4x4) at 16x16; the weight and input
    gradients where they apply)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 32, size, size))
    w = rng.standard_normal((32, 16, 3, 3))
    b = rng.standard_normal(32)
    pads = ((1, 1), (1, 1))
    y_ref = naive.conv2d_forward(x, w, b, (1, 1), pads, (1, 1), 2)
    dy = rng.standard_normal(y_ref.shape)
    refs = naive.conv2d_backward(x, w, dy, (1, 1), pads, (1, 1), 2)
    x32, w32, b32 = (a.astype(np.float32) for a in (x, w, b))
    y = F.conv2d_forward(x32, w32, b32, 1, 1, winograd=True, evaluation=evaluation, groups=2)
    assert relative_error(y, y_ref) <= 2e-5
    grads = F.conv2d_backward(x32, w32, dy.astype(np.float32), 1, 1, groups=2)
    for got, ref in zip(grads, refs, strict=True):
        assert relative_error(got, ref) <= 2e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_kernels_write_every_element(dtype):
    """The kernels called directly on outputs full of NaN: every element is written (an
    unwritten one would stay NaN), forward, input gradient, weight and bias gradients."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6, 5)).astype(dtype)
    wt = rng.standard_normal((3, 3, 5)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    out = np.full((2, 4, 3, 5), np.nan, dtype)
    K.depthwise_forward(x, wt, bias, 2, 2, 1, 1, 1, 1, False, out, _no_bn(x))
    dy = rng.standard_normal(out.shape).astype(dtype)
    dx = np.full(x.shape, np.nan, dtype)
    K.depthwise_backward_input(dy, wt, 2, 2, 1, 1, 1, 1, dx)
    part_w = np.full((2, 3, 3, 5), np.nan, dtype)
    part_b = np.full((2, 5), np.nan, dtype)
    dwt, dbias = np.full(wt.shape, np.nan, dtype), np.full(5, np.nan, dtype)
    K.depthwise_backward_weight(x, dy, 2, 2, 1, 1, 1, 1, part_w, part_b, dwt, dbias)
    for a in (out, dx, dwt, dbias):
        assert not np.isnan(a).any()
    # and the values: the textbook loops, channels first
    w = wt.transpose(2, 0, 1)[:, None].astype(np.float64)
    xn = x.transpose(0, 3, 1, 2).astype(np.float64)
    pads = ((1, 1), (1, 1))
    y_ref = naive.conv2d_forward(xn, w, bias.astype(np.float64), (2, 2), pads, (1, 1), 5)
    dx_ref, dw_ref, db_ref = naive.conv2d_backward(
        xn, w, dy.transpose(0, 3, 1, 2).astype(np.float64), (2, 2), pads, (1, 1), 5
    )
    tol = TOL[dtype]
    assert relative_error(out.transpose(0, 3, 1, 2), y_ref) <= tol
    assert relative_error(dx.transpose(0, 3, 1, 2), dx_ref) <= tol
    assert relative_error(dwt.transpose(2, 0, 1)[:, None], dw_ref) <= tol
    assert relative_error(dbias, db_ref) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "stride, dilation, channels", [(1, 1, 37), (2, 1, 16), (1, 2, 5), (1, 1, 16), (1, 1, 60)]
)
def test_depthwise_forward_same_bits_inside_and_at_the_border(dtype, stride, dilation, channels):
    """A 3x3 depthwise forward sums a pixel whose window lies inside the image in one pass and
    a border pixel a tap at a time: padded by the kernel or by hand (every window inside, the
    missing taps adding exact zeros), the outputs are the same bits."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 9, 11, channels)).astype(dtype)
    wt = rng.standard_normal((3, 3, channels)).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    d = dilation
    xp = np.zeros((2, 9 + 2 * d, 11 + 2 * d, channels), dtype)
    xp[:, d:-d, d:-d] = x
    oh, ow = (9 - 1) // stride + 1, (11 - 1) // stride + 1
    by_kernel, by_hand = np.empty((2, 2, oh, ow, channels), dtype)
    for relu in (False, True):
        K.depthwise_forward(x, wt, bias, stride, stride, d, d, d, d, relu, by_kernel, _no_bn(x))
        K.depthwise_forward(xp, wt, bias, stride, stride, 0, 0, d, d, relu, by_hand, _no_bn(x))
        assert by_kernel.tobytes() == by_hand.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [3, 16, 28, 60])
def test_depthwise_forward_runs_of_stride_one(dtype, channels):
    """At stride 1, with few channels or not whole vectors of them, the inside pixels of a row
    are summed as runs of (pixel, channel) elements (several runs a row here: 48 inside
    pixels): against the textbook loops, with and without the ReLU."""
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((2, channels, 6, 50))
    w = rng.standard_normal((channels, 1, 3, 3))
    b = rng.standard_normal(channels)
    y_ref = naive.conv2d_forward(x, w, b, (1, 1), ((1, 1), (1, 1)), (1, 1), channels)
    y = F.conv2d_forward(*(a.astype(dtype) for a in (x, w, b)), 1, 1, groups=channels)
    assert relative_error(y, y_ref) <= TOL[dtype]
    y_relu = F.conv2d_forward(
        *(a.astype(dtype) for a in (x, w, b)), 1, 1, relu=True, groups=channels
    )
    assert relative_error(y_relu, np.maximum(y_ref, 0)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "stride, channels, width", [(1, 3, 50), (1, 16, 11), (1, 60, 9), (2, 5, 9)]
)
def test_depthwise_forward_writes_its_output_only(dtype, stride, channels, width):
    """The output inside a larger buffer (sentinels before and after it), no padding at the
    top and bottom so that the last row is summed in runs too: the runs and their last,
    shorter segment store nothing past the output, and every output is written."""
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((2, 5, width, channels)).astype(dtype)
    wt = rng.standard_normal((3, 3, channels)).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    oh, ow = (5 - 3) // stride + 1, (width - 1) // stride + 1
    size, guard = 2 * oh * ow * channels, 1024
    buf = np.full(size + 2 * guard, 12345.0, dtype)
    out = buf[guard : guard + size].reshape(2, oh, ow, channels)
    out[...] = np.nan
    K.depthwise_forward(x, wt, bias, stride, stride, 0, 1, 1, 1, False, out, _no_bn(x))
    assert (buf[:guard] == 12345.0).all() and (buf[guard + size :] == 12345.0).all()
    assert not np.isnan(out).any()
    w = wt.transpose(2, 0, 1)[:, None]
    ref = naive.conv2d_forward(
        x.transpose(0, 3, 1, 2), w, bias, (stride, stride), ((0, 0), (1, 1)), (1, 1), channels
    )
    assert relative_error(out.transpose(0, 3, 1, 2), ref) <= TOL[dtype]


@pytest.mark.parametrize("groups, c, f", [(8, 8, 8), (8, 8, 16), (2, 8, 6)])
def test_same_bits_for_any_thread_count(groups, c, f):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, c, 9, 8)).astype(np.float32)
    w = rng.standard_normal((f, c // groups, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((5, f, 5, 4)).astype(np.float32)
    results = []
    for threads in (1, 2):
        with fastcnn.threads.compute_threads(threads):
            y = F.conv2d_forward(x, w, None, 2, 1, groups=groups)
            grads = F.conv2d_backward(x, w, dy, 2, 1, groups=groups)
        results.append([np.ascontiguousarray(a).tobytes() for a in (y, *grads)])
    assert results[0] == results[1]


def test_nan_stays_in_its_channel():
    """Depthwise: a NaN in channel 1 of the input reaches channel 1's outputs only."""
    x = np.ones((1, 3, 5, 5), np.float32)
    x[0, 1, 2, 2] = np.nan
    w = np.ones((3, 1, 3, 3), np.float32)
    y = F.conv2d_forward(x, w, None, 1, 1, groups=3)
    assert np.isnan(y[0, 1]).sum() == 9
    assert not np.isnan(y[0, [0, 2]]).any()


# ---------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(groups=3), ValueError, r"in_channels \(4\) must be a multiple of groups \(3\)"),
        (dict(groups=2, out=5), ValueError, r"out_channels \(5\) must be a multiple of groups"),
        (dict(groups=0), ValueError, "groups >= 1"),
        (dict(groups=1.5), TypeError, "groups to be an int"),
        (dict(groups=True), TypeError, "groups to be an int"),
    ],
)
def test_layer_rejects_bad_groups(kwargs, error, match):
    out = kwargs.pop("out", 4)
    with pytest.raises(error, match=f"^Conv2D: .*{match}"):
        L.Conv2D(4, out, 3, **kwargs)


def test_pytorch_positional_groups_is_an_error_not_a_bias():
    """nn.Conv2d(in, out, k, stride, padding, dilation, groups): here the 7th argument is
    bias, and a number there must not quietly make a dense convolution."""
    with pytest.raises(
        TypeError, match=r"^Conv2D: expected bias to be True or False, got 4 .*groups"
    ):
        fastcnn.Conv2d(4, 4, 3, 1, 1, 1, 4)
    assert fastcnn.Conv2d(4, 4, 3, 1, 1, 1, groups=4).weight.shape == (4, 1, 3, 3)


def test_functional_rejects_mismatched_shapes():
    x = np.zeros((1, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"^Conv2D: expected input of shape \(N, 6, H, W\)"):
        F.conv2d_forward(x, np.zeros((6, 3, 3, 3), np.float32), groups=2)
    with pytest.raises(ValueError, match=r"^Conv2D: the filters \(5\) must be a multiple"):
        F.conv2d_forward(x, np.zeros((5, 2, 3, 3), np.float32), groups=2)


def test_layer_shapes_config_and_summary():
    layer = L.Conv2D(6, 12, 3, padding=1, groups=3, rng=np.random.default_rng(0))
    assert layer.weight.shape == (12, 2, 3, 3)
    assert "groups=3" in repr(layer)
    assert layer.output_shape((2, 6, 7, 7)) == (2, 12, 7, 7)
    assert layer.flops((2, 6, 7, 7)) == 2 * 2 * 12 * 7 * 7 * 2 * 9
    config = layer.get_config()
    assert config["groups"] == 3
    twin = L.Conv2D.from_config(config)
    assert twin.weight.shape == layer.weight.shape
    assert L.Conv2D.state_spec(config)["weight"][0] == (12, 2, 3, 3)
    assert "groups" not in L.Conv2D(6, 12, 3).get_config()  # (older configs read as 1)


def test_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    model = fastcnn.Sequential(
        [L.Conv2D(4, 8, 3, padding=1, groups=4, rng=rng), L.ReLU(), L.Conv2D(8, 4, 1, groups=2)]
    )
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    path = tmp_path / "grouped.fcnn"
    checkpoint.save(path, model)
    again = checkpoint.load(path).model
    assert np.array_equal(again(x), model(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_plans_of_grouped_convolutions_are_bitwise_the_unfused(mode):
    """A depthwise Conv2D (two filters a channel) -> BatchNorm2D -> ReLU -> MaxPool2D: one
    ConvBatchNorm step (the depthwise kernel applies the BatchNorm and the ReLU in evaluation
    mode); a grouped Conv2D of 4 channels a group -> ReLU: no pattern (the dense convolution's
    kernels know no groups). With fusion on or off, the same bits, forward and backward."""
    rng = np.random.default_rng(2)

    def build():
        r = np.random.default_rng(4)
        return fastcnn.Sequential(
            [
                L.Conv2D(4, 8, 3, padding=1, groups=4, rng=r),
                L.BatchNorm2D(8),
                L.ReLU(),
                L.MaxPool2D(2),
                L.Conv2D(8, 8, 3, padding=1, groups=2, rng=r),
                L.ReLU(),
            ]
        )

    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    outs = []
    for fuse in (True, False):
        model = build()
        model.train(mode == "train")
        with fastcnn.fusion(fuse):
            y = model(x)
            dx = model.backward(np.ones_like(y), input_grad=True)
            steps = [type(s).__name__ for s in model._plan()]
        expected = ["ConvBatchNorm", "ModuleStep", "ModuleStep"] if fuse else ["ModuleStep"] * 6
        assert steps == expected
        outs.append([y.tobytes(), dx.tobytes()] + [p.grad.tobytes() for p in model.parameters()])
    assert outs[0] == outs[1]


def test_matches_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    for c, f, groups, stride, padding in [(8, 8, 8, 1, 1), (8, 16, 8, 2, 1), (6, 9, 3, 1, 0)]:
        x = rng.standard_normal((2, c, 9, 9)).astype(np.float32)
        w = rng.standard_normal((f, c // groups, 3, 3)).astype(np.float32)
        b = rng.standard_normal(f).astype(np.float32)
        tx = torch.from_numpy(x).requires_grad_()
        tw = torch.from_numpy(w).requires_grad_()
        tb = torch.from_numpy(b).requires_grad_()
        ty = torch.nn.functional.conv2d(tx, tw, tb, stride, padding, groups=groups)
        dy = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        ty.backward(torch.from_numpy(dy))
        y = F.conv2d_forward(x, w, b, stride, padding, groups=groups)
        dx, dw, db = F.conv2d_backward(x, w, dy, stride, padding, groups=groups)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-4)
        for got, ref in ((dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)
