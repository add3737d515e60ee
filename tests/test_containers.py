"""Residual, Concat, GlobalAvgPool2D and the ResNet: against the textbook loops (tests/naive,
run over the same tree by tests/naive/tree.py) and PyTorch, by finite differences, and their
errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastcnn
from fastcnn import Concat, GlobalAvgPool2D, Residual, Sequential
from fastcnn import layers as L
from fastcnn.models import lenet5, resnet
from gradcheck import assert_gradient, relative_error
from naive import pool2d as naive_pool
from naive import tree as naive_tree

F64 = np.float64


def inception(seed=0, dtype=F64):
    """An Inception-style model: a stem, then four branches side by side (1x1; 1x1 -> 3x3;
    3x3 pool -> 1x1; the identity), global average pooling and a classifier."""
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2D(2, 4, 3, padding=1, dtype=dtype, rng=rng),
        L.ReLU(),
        Concat(
            Sequential(L.Conv2D(4, 3, 1, dtype=dtype, rng=rng), L.ReLU()),
            Sequential(
                L.Conv2D(4, 2, 1, dtype=dtype, rng=rng),
                L.ReLU(),
                L.Conv2D(2, 3, 3, padding=1, dtype=dtype, rng=rng),
                L.ReLU(),
            ),
            Sequential(
                L.MaxPool2D(3, stride=1, padding=1),
                L.Conv2D(4, 2, 1, dtype=dtype, rng=rng),
                L.ReLU(),
            ),
            Sequential(),
        ),
        L.BatchNorm2D(12, dtype=dtype),
        L.ReLU(),
        GlobalAvgPool2D(),
        L.Dense(12, 5, dtype=dtype, rng=rng),
    )


def _randomise(model, rng):
    """Random weights and running statistics (BatchNorm's start at 1 and 0: too special)."""
    for _, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    for name, b in model.named_buffers():
        b[...] = (
            rng.uniform(0.5, 1.5, b.shape) if name.endswith("var") else rng.standard_normal(b.shape)
        )


CASES = {
    "resnet8": (lambda: resnet(8, in_channels=1, num_classes=10, seed=3, dtype=F64), (2, 1, 8, 8)),
    "inception": (lambda: inception(seed=3), (3, 2, 6, 5)),
}


@pytest.fixture(
    scope="module",
    params=[(name, mode) for name in CASES for mode in ("train", "eval")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def tree_case(request):
    """The model, its input, upstream gradient, and the naive result (computed once)."""
    name, mode = request.param
    build, shape = CASES[name]
    rng = np.random.default_rng(11)
    model = build().train(mode == "train")
    _randomise(model, rng)
    x = rng.standard_normal(shape)
    y_naive, backward = naive_tree.forward(model, x)
    dy = rng.standard_normal(y_naive.shape)
    dx_naive, grads_naive = backward(dy)
    return model, x, dy, y_naive, dx_naive, grads_naive


def test_tree_matches_naive_loops(tree_case):
    """THE tree test: float64, relative error <= 1e-10 for the logits, the input gradient and
    every parameter gradient, ResNet-8 and an Inception-style Concat model, in training mode
    (BatchNorm's batch statistics) and eval mode, fusion on and off."""
    model, x, dy, y_naive, dx_naive, grads_naive = tree_case
    for fuse in (True, False):
        with fastcnn.fusion(fuse):
            state = model.state_dict()
            model.zero_grad()
            y = model(x)
            dx = model.backward(dy, input_grad=True)
            model.load_state_dict(state)  # the running statistics as before
        assert y.dtype == F64 and relative_error(y, y_naive) <= 1e-10
        assert relative_error(dx, dx_naive) <= 1e-10
        named = dict(model.named_parameters())
        assert sorted(named) == sorted(grads_naive)
        for name, p in named.items():
            assert relative_error(p.grad, grads_naive[name]) <= 1e-10, name
    assert all(np.abs(g).max() > 0 for g in grads_naive.values())


def test_tree_matches_pytorch(tree_case):
    """The same trees in PyTorch (optional): the same logits, input gradient and parameter
    gradients, under the same dotted parameter names, and the same BatchNorm running
    statistics after the step."""
    torch = pytest.importorskip("torch")
    from torch_twin import twin

    model, x, dy, *_ = tree_case
    net = twin(model, torch)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    model.zero_grad()
    y = model(x)
    dx = model.backward(dy, input_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    yt = net(xt)
    yt.backward(torch.tensor(dy))
    assert relative_error(y, yt.detach().numpy()) <= 1e-10
    assert relative_error(dx, xt.grad.numpy()) <= 1e-10
    for (name, p), (_, q) in zip(model.named_parameters(), net.named_parameters(), strict=True):
        assert relative_error(p.grad, q.grad.numpy()) <= 1e-10, name
    buffers = dict(net.named_buffers())
    for name, b in model.named_buffers():
        assert relative_error(b, buffers[name].numpy()) <= 1e-12, name
    model.load_state_dict(state)


@pytest.mark.parametrize("name", list(CASES))
def test_tree_gradients_by_finite_differences(name, rng):
    """Input and first-layer weight gradients of both trees by central differences (training
    mode: the gradient flows through BatchNorm's batch statistics too)."""
    build, shape = CASES[name]
    model = build()
    _randomise(model, rng)
    x = rng.standard_normal(shape)

    def forward(v):  # (training mode: the running statistics move, but are not used)
        return model(v)

    y = forward(x)
    g = rng.standard_normal(y.shape)
    model.zero_grad()
    dx = model.backward(g, input_grad=True)
    assert_gradient(forward, x.copy(), g, dx)
    first = model.parameters()[0]
    assert_gradient(lambda _: forward(x), first.data, g, first.grad.copy())


def test_resnet_architecture():
    """He et al.'s CIFAR ResNet: 6n+2 layers with weights, 16/32/64 channels, projection
    shortcuts where the shape changes; PyTorch-style dotted names."""
    model = resnet(20)
    convs = [m for m in model.modules() if isinstance(m, L.Conv2D)]
    projections = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) - len(projections) + 1 == 20  # + the Dense layer
    assert [m.stride for m in projections] == [(2, 2), (2, 2)]
    assert all(m.bias is None for m in convs)
    assert model.num_parameters() == 272_186  # 272,474 for 3 input channels, as the paper's
    names = [n for n, _ in model.named_parameters()]
    assert names[:4] == ["0.weight", "1.weight", "1.bias", "3.body.0.weight"]
    assert "15.shortcut.0.weight" in names and names[-1] == "22.bias"
    assert model.summary((1, 1, 28, 28), print_fn=None).endswith("Output shape: (1, 10)")
    assert model(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    assert resnet(8, in_channels=3, num_classes=7)(np.zeros((1, 3, 32, 32), np.float32)).shape == (
        1,
        7,
    )
    for bad in (7, 21, 2, "20", True):
        with pytest.raises(ValueError, match="^resnet: expected a depth 6n\\+2"):
            resnet(bad)
    a, b = resnet(8, seed=1), resnet(8, seed=1)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data)


def test_lenet5_architecture():
    model = lenet5()
    assert model.num_parameters() == 61_706
    assert [type(m).__name__ for m in model] == [
        "Conv2D",
        "Tanh",
        "AvgPool2D",
        "Conv2D",
        "Tanh",
        "AvgPool2D",
        "Flatten",
        "Dense",
        "Tanh",
        "Dense",
        "Tanh",
        "Dense",
    ]
    assert model(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# GlobalAvgPool2D: the kernel against the textbook loops


@given(
    st.integers(0, 3),
    st.integers(1, 40),
    st.integers(1, 7),
    st.integers(1, 7),
    st.sampled_from([np.float32, np.float64]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_global_avg_pool_matches_naive(n, c, h, w, dtype, channels_last, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    if channels_last:  # the layout a convolution returns
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    layer = GlobalAvgPool2D()
    y = layer(x)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert y.dtype == dtype and y.shape == (n, c)
    ref = naive_pool.global_avgpool2d_forward(x.astype(F64))
    # the sum rounds relative to the magnitudes it adds, not to a mean they cancel down to
    # (5 values whose mean was 6e-4 of them missed 1e-5 against the mean itself)
    scale = np.maximum(naive_pool.global_avgpool2d_forward(np.abs(x).astype(F64)), 1e-30)
    assert np.max(np.abs(y - ref) / scale, initial=0.0) <= tol
    dy = rng.standard_normal((n, c)).astype(dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert relative_error(dx, naive_pool.global_avgpool2d_backward(x.shape, dy.astype(F64))) <= tol


def test_global_avg_pool_by_finite_differences(rng):
    layer = GlobalAvgPool2D()
    x = rng.standard_normal((2, 3, 4, 5))
    g = rng.standard_normal((2, 3))
    layer(x)
    assert_gradient(layer.forward, x.copy(), g, layer.backward(g))


def test_global_avg_pool_validates():
    layer = GlobalAvgPool2D()
    with pytest.raises(
        ValueError,
        match=r"^GlobalAvgPool2D: expected input of shape "
        r"\(N, C, H, W\), got \(2, 3\)",
    ):
        layer(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="^GlobalAvgPool2D: expected a floating-point input"):
        layer(np.zeros((1, 1, 2, 2), np.int32))
    layer(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"^GlobalAvgPool2D: expected gradient of shape \(2, 3\)"):
        layer.backward(np.zeros((2, 4), np.float32))
    assert layer.output_shape((5, 6, 7, 8)) == (5, 6)


# ---------------------------------------------------------------------------------------------
# Residual and Concat: their own rules


def test_residual_identity_and_projection(rng):
    conv = L.Conv2D(3, 3, 3, padding=1, dtype=F64, rng=1)
    block = Residual(conv)
    x = rng.standard_normal((2, 3, 5, 5))
    y = block(x)
    np.testing.assert_array_equal(y, conv(x) + x)
    dy = rng.standard_normal(y.shape)
    block.zero_grad()
    dx = block.backward(dy, input_grad=True)
    conv.zero_grad()
    conv(x)
    np.testing.assert_array_equal(dx, conv.backward(dy) + dy)
    proj = Residual(
        L.Conv2D(3, 4, 3, stride=2, padding=1, dtype=F64, rng=2),
        shortcut=L.Conv2D(3, 4, 1, stride=2, dtype=F64, rng=3),
    )
    assert proj(x).shape == (2, 4, 3, 3) and proj.output_shape((2, 3, 5, 5)) == (2, 4, 3, 3)
    assert proj.backward(np.ones((2, 4, 3, 3)), input_grad=False) is None
    assert [n for n, _ in proj.named_parameters()] == [
        "body.weight",
        "body.bias",
        "shortcut.weight",
        "shortcut.bias",
    ]


def test_residual_and_concat_errors(rng):
    x = rng.standard_normal((2, 3, 5, 5))
    bad = Residual(L.Conv2D(3, 4, 3, padding=1, dtype=F64))
    with pytest.raises(
        ValueError,
        match=r"^Residual: the body's output shape \(2, 4, 5, 5\) differs "
        r"from the input shape \(2, 3, 5, 5\)",
    ):
        bad(x)
    with pytest.raises(ValueError, match="^Residual: the body's output shape"):
        bad.summary((1, 3, 5, 5), print_fn=None)
    with pytest.raises(TypeError, match="^Residual: the body's output dtype float32 differs"):
        Residual(L.Conv2D(3, 3, 1))(x)
    with pytest.raises(TypeError, match="^Residual: expected the body to be a fastcnn Module"):
        Residual("conv")
    cat = Concat(L.Conv2D(3, 2, 3, dtype=F64), L.Conv2D(3, 2, 1, dtype=F64))
    with pytest.raises(
        ValueError,
        match=r"^Concat: branch 1's output \(2, 2, 5, 5\) does not match "
        r"branch 0's \(2, 2, 3, 3\) outside axis 1",
    ):
        cat(x)
    with pytest.raises(ValueError, match="^Concat: expected at least one branch"):
        Concat()
    with pytest.raises(TypeError, match="^Concat: branch 1 is not a fastcnn Module"):
        Concat(L.ReLU(), 3)
    for m in (Residual(L.ReLU()), Concat(L.ReLU()), Sequential(L.ReLU())):
        with pytest.raises(RuntimeError, match="backward called before forward"):
            m.backward(np.ones((1, 1)))


def test_concat_of_flat_features_and_channels_last_output(rng):
    x = rng.standard_normal((4, 6))
    cat = Concat(L.Dense(6, 2, dtype=F64, rng=1), L.Dense(6, 3, dtype=F64, rng=2))
    y = cat(x)
    np.testing.assert_array_equal(y, np.concatenate([cat[0](x), cat[1](x)], axis=1))
    conv = Concat(L.Conv2D(1, 2, 1, rng=1), L.Conv2D(1, 3, 1, rng=2))
    y = conv(rng.random((2, 1, 4, 4), dtype=np.float32))
    assert y.shape == (2, 5, 4, 4) and y.transpose(0, 2, 3, 1).flags.c_contiguous
