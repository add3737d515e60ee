"""fastcnn.layers: every backward by finite differences (float64), every kernel-backed layer
against the naive references, dtypes, initialisation, state dicts, configs, summary hooks and
validation."""

import json
import math

import numpy as np
import pytest

from fastcnn import layers as L
from fastcnn.module import module_from_config, state_spec_of
from gradcheck import assert_gradient, relative_error
from naive import activations as naive_act
from naive import batchnorm as naive_bn
from naive import conv2d as naive_conv
from naive import dense as naive_dense
from naive import pool2d as naive_pool

F64 = np.float64


def _make_layers():
    """One small float64 instance of every layer, with an input shape for it."""
    rng = np.random.default_rng(7)
    return [
        (L.Conv2D(2, 3, 3, dtype=F64, rng=rng), (2, 2, 5, 6)),
        (L.Conv2D(2, 3, (2, 3), stride=(2, 1), padding=1, dtype=F64, rng=rng), (2, 2, 5, 4)),
        (L.Conv2D(1, 2, 4, padding="same", dtype=F64, rng=rng), (2, 1, 5, 5)),
        (L.Conv2D(2, 2, 2, dilation=2, bias=False, dtype=F64, rng=rng), (1, 2, 5, 5)),
        (L.MaxPool2D(2), (2, 2, 5, 4)),
        (L.MaxPool2D(3, stride=2, padding=1), (2, 2, 5, 5)),
        (L.AvgPool2D(2), (2, 2, 4, 5)),
        (L.AvgPool2D((3, 2), stride=1, padding=(1, 0)), (1, 2, 4, 4)),
        (L.BatchNorm2D(3, dtype=F64), (3, 3, 2, 3)),
        (L.BatchNorm1D(4, dtype=F64), (5, 4)),
        (L.BatchNorm1D(2, dtype=F64), (3, 2, 4)),
        (L.Dense(6, 4, dtype=F64, rng=rng), (3, 6)),
        (L.Dense(5, 3, bias=False, dtype=F64, rng=rng), (2, 5)),
        (L.ReLU(), (2, 3, 4)),
        (L.LeakyReLU(0.2), (2, 3, 4)),
        (L.Tanh(), (2, 7)),
        (L.Sigmoid(), (2, 7)),
        (L.Softmax(), (3, 5)),
        (L.Softmax(dim=-1), (2, 2, 2, 3)),
        (L.Flatten(), (2, 3, 2, 2)),
        (L.Dropout(0.4, seed=3), (4, 6)),
        (L.Conv2D(2, 2, 3, stride=2, padding="same", dtype=F64, rng=rng), (1, 2, 6, 5)),
        (L.Conv2D(4, 4, 3, padding=1, groups=4, dtype=F64, rng=rng), (2, 4, 5, 4)),
        (L.Conv2D(3, 6, (2, 3), stride=2, groups=3, dtype=F64, rng=rng), (1, 3, 5, 7)),
        (
            L.Conv2D(4, 6, 3, dilation=(1, 2), groups=2, bias=False, dtype=F64, rng=rng),
            (2, 4, 5, 7),
        ),
    ]


LAYERS = _make_layers()
IDS = [f"{i}-{layer!r}" for i, (layer, _) in enumerate(LAYERS)]


def _set_random_params(layer, rng):
    for _, p in layer.named_parameters():
        p.data[...] = rng.standard_normal(p.shape)


# ---------------------------------------------------------------------------------------------
# gradients by finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_by_finite_differences(layer, shape, mode, rng):
    layer.train(mode == "train")
    _set_random_params(layer, rng)
    if isinstance(layer, L.BatchNorm2D):
        layer.running_mean[...] = rng.standard_normal(layer.num_features)
        layer.running_var[...] = rng.uniform(0.5, 2, layer.num_features)
    x = rng.standard_normal(shape)
    state = layer.get_rng_state() if isinstance(layer, L.Dropout) else None

    def forward(v):
        if state is not None:
            layer.set_rng_state(state)  # the same dropout mask every time
        return layer.forward(v)

    y = forward(x)
    g = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(g)
    assert dx.shape == x.shape and dx.dtype == F64
    assert_gradient(forward, x.copy(), g, dx)
    analytic = {name: p.grad.copy() for name, p in layer.named_parameters()}
    for name, p in layer.named_parameters():
        assert_gradient(lambda _: forward(x), p.data, g, analytic[name])
    layer.train()


@pytest.mark.parametrize(
    "layer, shape", [LAYERS[0], LAYERS[8], LAYERS[11]], ids=[IDS[0], IDS[8], IDS[11]]
)
def test_backward_accumulates(layer, shape, rng):
    layer.train()
    x = rng.standard_normal(shape)
    g = rng.standard_normal(layer.output_shape(shape))
    layer.zero_grad()
    layer.forward(x)
    layer.backward(g)
    once = [p.grad.copy() for p in layer.parameters()]
    layer.forward(x)
    layer.backward(g)
    for p, first in zip(layer.parameters(), once, strict=True):
        np.testing.assert_allclose(p.grad, 2 * first, rtol=1e-12)
    layer.zero_grad()
    assert all(not p.grad.any() for p in layer.parameters())


def test_backward_before_forward():
    for layer in (
        L.Conv2D(1, 1, 1),
        L.ReLU(),
        L.MaxPool2D(2),
        L.Dense(2, 2),
        L.Flatten(),
        L.BatchNorm2D(1),
        L.Dropout(),
        L.Softmax(),
        L.Tanh(),
    ):
        with pytest.raises(RuntimeError, match=f"^{layer.name}: backward called before forward"):
            layer.backward(np.zeros((1, 1)))


# ---------------------------------------------------------------------------------------------
# against the naive references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_conv2d_layer_matches_naive(rng, dtype, tol):
    for kwargs, shape, pads in [
        (dict(kernel_size=3), (2, 3, 7, 6), ((0, 0), (0, 0))),
        (dict(kernel_size=(4, 2), padding="same"), (1, 3, 5, 6), ((1, 2), (0, 1))),
        # 'same' at stride 2, as Keras pads: ceil(7 / 2) = 4 rows need (4-1)*2 + 3 - 7 = 2 rows
        # of padding (1 + 1); ceil(8 / 2) = 4 columns need 1 (0 left, 1 right)
        (dict(kernel_size=3, stride=2, padding="same"), (2, 3, 7, 8), ((1, 1), (0, 1))),
        # stride 3, an even kernel, dilation 2: H 10 -> 4 outputs, total 3*3 + 2*3 + 1 - 10 = 6
        # (3 + 3); W 5 -> 2 outputs, total 3 + 2 + 1 - 5 = 1 (0 + 1)
        (
            dict(kernel_size=(4, 2), stride=3, padding="same", dilation=(2, 2)),
            (1, 3, 10, 5),
            ((3, 3), (0, 1)),
        ),
        (
            dict(kernel_size=3, stride=2, padding=(1, 2), dilation=(1, 2)),
            (2, 3, 7, 8),
            ((1, 1), (2, 2)),
        ),
    ]:
        layer = L.Conv2D(3, 4, dtype=dtype, rng=rng, **kwargs)
        x = rng.standard_normal(shape)
        y = layer(x)
        assert y.dtype == dtype
        w64, b64 = layer.weight.data.astype(F64), layer.bias.data.astype(F64)
        x64 = x.astype(dtype).astype(F64)
        stride, dil = (
            L.F.pair(kwargs.get("stride", 1), "", ""),
            L.F.pair(kwargs.get("dilation", 1), "", ""),
        )
        assert relative_error(y, naive_conv.conv2d_forward(x64, w64, b64, stride, pads, dil)) <= tol
        dy = rng.standard_normal(y.shape)
        layer.zero_grad()
        dx = layer.backward(dy)
        assert dx.dtype == F64  # the input's dtype
        ndx, ndw, ndb = naive_conv.conv2d_backward(
            x64, w64, dy.astype(dtype).astype(F64), stride, pads, dil
        )
        assert relative_error(dx, ndx) <= tol
        assert relative_error(layer.weight.grad, ndw) <= tol
        assert relative_error(layer.bias.grad, ndb) <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_pool_relu_dense_layers_match_naive(rng, dtype, tol):
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    x64 = x.astype(F64)
    pool = L.MaxPool2D(3, stride=2, padding=1)
    y = pool(x)
    ny, _ = naive_pool.maxpool2d_forward(x64, (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert y.dtype == dtype and relative_error(y, ny) == 0
    dy = rng.standard_normal(y.shape).astype(dtype)
    nd = naive_pool.maxpool2d_backward(x64, dy.astype(F64), (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert relative_error(pool.backward(dy), nd) <= tol

    pool = L.AvgPool2D(2, padding=1)
    y = pool(x)
    assert (
        relative_error(y, naive_pool.avgpool2d_forward(x64, (2, 2), (2, 2), ((1, 1), (1, 1))))
        <= tol
    )
    dy = rng.standard_normal(y.shape).astype(dtype)
    nd = naive_pool.avgpool2d_backward(x.shape, dy.astype(F64), (2, 2), (2, 2), ((1, 1), (1, 1)))
    assert relative_error(pool.backward(dy), nd) <= tol

    relu = L.ReLU()
    y = relu(x)
    assert y.dtype == dtype and relative_error(y, naive_act.relu_forward(x64)) == 0
    dy = rng.standard_normal(x.shape).astype(dtype)
    assert relative_error(relu.backward(dy), naive_act.relu_backward(x64, dy.astype(F64))) == 0

    dense = L.Dense(42, 5, dtype=dtype, rng=rng)
    x2 = x.reshape(2, -1)[:, :42]
    w64, b64 = dense.weight.data.astype(F64), dense.bias.data.astype(F64)
    y = dense(x2)
    assert y.dtype == dtype
    assert relative_error(y, naive_dense.dense_forward(x2.astype(F64), w64, b64)) <= tol
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = dense.backward(dy)
    ndx, ndw, ndb = naive_dense.dense_backward(x2.astype(F64), w64, dy.astype(F64))
    assert relative_error(dx, ndx) <= tol
    assert relative_error(dense.weight.grad, ndw) <= tol
    assert relative_error(dense.bias.grad, ndb) <= tol


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_batchnorm_layer_matches_naive(rng, dtype, tol):
    bn = L.BatchNorm2D(3, eps=1e-3, momentum=0.3, dtype=dtype)
    bn.weight.data[...] = rng.standard_normal(3)
    bn.bias.data[...] = rng.standard_normal(3)
    g64, b64 = bn.weight.data.astype(F64), bn.bias.data.astype(F64)
    expected_rm, expected_rv = np.zeros(3), np.ones(3)
    for _step in range(2):
        x = (rng.standard_normal((4, 3, 3, 2)) * 2 + 1).astype(dtype)
        x64 = x.astype(F64)
        y = bn(x)
        ny, nmean, nvar = naive_bn.batchnorm_forward_train(x64, g64, b64, 1e-3)
        assert y.dtype == dtype and relative_error(y, ny) <= tol
        # running statistics: PyTorch's momentum update with the unbiased variance
        m = 24
        expected_rm = 0.7 * expected_rm + 0.3 * nmean
        expected_rv = 0.7 * expected_rv + 0.3 * nvar * m / (m - 1)
        assert relative_error(bn.running_mean, expected_rm) <= tol
        assert relative_error(bn.running_var, expected_rv) <= tol
        dy = rng.standard_normal(x.shape).astype(dtype)
        bn.zero_grad()
        dx = bn.backward(dy)
        ndx, ndg, ndb = naive_bn.batchnorm_backward(x64, g64, dy.astype(F64), 1e-3)
        assert relative_error(dx, ndx) <= tol
        assert relative_error(bn.weight.grad, ndg) <= tol
        assert relative_error(bn.bias.grad, ndb) <= tol
    bn.eval()
    y = bn(x)
    ny = naive_bn.batchnorm_forward_eval(
        x64, g64, b64, bn.running_mean.astype(F64), bn.running_var.astype(F64), 1e-3
    )
    assert relative_error(y, ny) <= tol


def test_batchnorm1d_is_batchnorm2d_on_reshaped_input(rng):
    x = rng.standard_normal((6, 4))
    bn1, bn2 = L.BatchNorm1D(4, dtype=F64), L.BatchNorm2D(4, dtype=F64)
    np.testing.assert_array_equal(bn1(x), bn2(x[:, :, None, None])[:, :, 0, 0])
    np.testing.assert_array_equal(bn1.running_var, bn2.running_var)
    with pytest.raises(ValueError, match="^BatchNorm1D: expected more than 1 value per channel"):
        bn1(x[:1])
    bn1.eval()
    assert bn1(x[:1]).shape == (1, 4)  # eval mode: one sample is fine


# ---------------------------------------------------------------------------------------------
# dtypes and initialisation
# ---------------------------------------------------------------------------------------------


def test_parameter():
    p = L.Parameter(np.ones((2, 3), np.float32))
    assert p.grad.dtype == np.float32 and p.grad.shape == (2, 3) and not p.grad.any()
    with pytest.raises(TypeError, match="floating-point"):
        L.Parameter(np.ones(3, int))


def test_dtypes(rng):
    x64 = rng.standard_normal((2, 1, 6, 6))
    conv = L.Conv2D(1, 2, 3)
    assert conv.weight.dtype == conv.bias.dtype == np.float32
    y = conv(x64)
    assert y.dtype == np.float32  # cast to the layer's dtype
    assert conv.backward(np.ones_like(y)).dtype == np.float64  # gradient in the input's dtype
    assert L.Conv2D(1, 2, 3, dtype=np.float64).weight.dtype == np.float64
    assert L.Conv2D(1, 2, 3, dtype="float64")(x64.astype(np.float16)).dtype == np.float64
    dense = L.Dense(3, 2)
    assert dense(np.ones((1, 3))).dtype == np.float32
    for layer in (
        L.ReLU(),
        L.MaxPool2D(2),
        L.AvgPool2D(2),
        L.Tanh(),
        L.Sigmoid(),
        L.Flatten(),
        L.LeakyReLU(),
        L.Softmax(),
        L.Dropout(0.5, seed=0),
    ):
        for dtype in (np.float32, np.float64):
            y = layer(x64.astype(dtype))
            assert y.dtype == dtype, layer
            assert layer.backward(np.ones_like(y)).dtype == dtype, layer
    for bad in (np.int32, np.float16, "complex64"):
        with pytest.raises(TypeError, match="^Conv2D: expected dtype float32 or float64"):
            L.Conv2D(1, 1, 1, dtype=bad)


def test_default_initialisation():
    conv = L.Conv2D(8, 16, 3, rng=0)
    bound = 1 / math.sqrt(8 * 9)
    for p in (conv.weight.data, conv.bias.data):
        assert np.abs(p).max() <= bound
    w = conv.weight.data
    assert np.abs(w).max() > 0.95 * bound and abs(w.mean()) < 0.05 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # uniform's standard deviation
    dense = L.Dense(100, 50, rng=1)
    assert np.abs(dense.weight.data).max() <= 0.1 and np.abs(dense.bias.data).max() <= 0.1
    assert np.abs(dense.weight.data).max() > 0.095
    # seedable and dtype-independent draws
    np.testing.assert_array_equal(L.Conv2D(8, 16, 3, rng=0).weight.data, w)
    assert not np.array_equal(L.Conv2D(8, 16, 3, rng=1).weight.data, w)
    np.testing.assert_array_equal(
        L.Conv2D(8, 16, 3, rng=0, dtype=F64).weight.data.astype(np.float32), w
    )
    g = np.random.default_rng(5)
    a, b = L.Dense(4, 4, rng=g), L.Dense(4, 4, rng=g)  # one generator passed through
    assert not np.array_equal(a.weight.data, b.weight.data)
    bn = L.BatchNorm2D(3)
    assert (bn.weight.data == 1).all() and (bn.bias.data == 0).all()
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    assert bn.running_mean.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


def test_dropout():
    x = np.ones((200, 500))
    d = L.Dropout(0.3, seed=11)
    y = d(x)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.7)
    dy = np.full_like(x, 2.0)
    np.testing.assert_allclose(d.backward(dy), np.where(kept, 2 / 0.7, 0))
    # reproducible resume: the generator state round-trips through JSON
    state = json.loads(json.dumps(d.get_rng_state()))
    first = d(x)
    d.set_rng_state(state)
    np.testing.assert_array_equal(d(x), first)
    assert not np.array_equal(first, y)
    np.testing.assert_array_equal(L.Dropout(0.3, seed=11)(x), y)  # seeded
    d.eval()
    np.testing.assert_array_equal(d(x), x)
    np.testing.assert_array_equal(d.backward(dy), dy)
    np.testing.assert_array_equal(L.Dropout(0.0, seed=1)(x), x)
    assert not L.Dropout(1.0, seed=1)(x).any()
    a, b = L.Dropout(rng=np.random.default_rng(3)), L.Dropout(rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a(x), b(x))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="^Dropout: expected 0 <= p <= 1"):
            L.Dropout(bad)


def test_softmax_rows_and_backward(rng):
    s = L.Softmax()
    x = rng.standard_normal((3, 4, 2))
    y = s(x)
    np.testing.assert_allclose(y.sum(axis=1), 1)
    # the gradient of sum(y[:, k]) over x is zero (rows always sum to 1)
    np.testing.assert_allclose(s.backward(np.ones_like(y)), 0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# state dicts, configs, shapes, FLOPs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, shape", LAYERS, ids=IDS)
def test_config_and_state_round_trip(layer, shape, rng):
    config = json.loads(json.dumps(layer.get_config()))
    assert config["class"] == layer.name
    clone = module_from_config(config, rng=np.random.default_rng(99))
    assert type(clone) is type(layer) and clone.get_config() == layer.get_config()
    assert repr(clone) == repr(layer)
    _set_random_params(layer, rng)
    state = layer.state_dict()
    assert sorted(state) == sorted(
        [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    )
    # what a checkpoint's config is checked against before anything is built
    assert state_spec_of(config) == {k: (v.shape, v.dtype) for k, v in state.items()}
    clone.load_state_dict(state)
    for key, value in clone.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
        assert value.dtype == state[key].dtype
    # the state dict holds copies
    for p in layer.parameters():
        p.data += 1
    for key, value in clone.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    layer.load_state_dict(state)
    if isinstance(layer, L.Dropout):
        clone.set_rng_state(layer.get_rng_state())
    layer.eval(), clone.eval()
    x = rng.standard_normal(shape)
    y = layer(x)
    np.testing.assert_array_equal(clone(x), y)
    assert layer.output_shape(shape) == y.shape
    assert layer.flops(shape) >= 0
    layer.train()


def test_state_dict_validation():
    conv = L.Conv2D(2, 3, 3, rng=0)
    before = conv.state_dict()
    good = L.Conv2D(2, 3, 3, rng=1).state_dict()
    bad_cases = [
        ({"weight": good["weight"]}, r"missing keys \['bias'\]"),
        ({**good, "extra": np.zeros(1)}, r"unexpected keys \['extra'\]"),
        ({**good, "bias": np.zeros(4, np.float32)}, r"'bias': expected shape \(3,\), got \(4,\)"),
        ({**good, "bias": np.zeros(3, np.float64)}, "'bias': expected dtype float32, got float64"),
    ]
    for state, match in bad_cases:
        with pytest.raises(ValueError, match=f"^Conv2D: cannot load state dict: .*{match}"):
            conv.load_state_dict(state)
        for key, value in conv.state_dict().items():  # nothing was assigned
            np.testing.assert_array_equal(value, before[key])
    conv.load_state_dict({"weight": good["weight"]}, strict=False)
    np.testing.assert_array_equal(conv.weight.data, good["weight"])
    np.testing.assert_array_equal(conv.bias.data, before["bias"])
    weight = conv.weight.data
    conv.load_state_dict(good)
    assert conv.weight.data is weight  # loaded in place: optimizers keep their references
    bn = L.BatchNorm2D(2)
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_flops_and_output_shapes():
    conv = L.Conv2D(3, 8, (3, 5), stride=2, padding=1)
    assert conv.output_shape((4, 3, 28, 28)) == (4, 8, 14, 13)
    assert conv.flops((4, 3, 28, 28)) == 2 * 4 * 8 * 14 * 13 * 3 * 3 * 5
    dense = L.Dense(20, 7)
    assert dense.output_shape((5, 20)) == (5, 7) and dense.flops((5, 20)) == 2 * 5 * 20 * 7
    assert L.MaxPool2D(2).output_shape((1, 2, 11, 11)) == (1, 2, 5, 5)
    assert L.Flatten().output_shape((3, 2, 4, 5)) == (3, 40)
    assert L.BatchNorm1D(4).output_shape((2, 4, 3)) == (2, 4, 3)
    assert L.MaxPool2D(3, 1).flops((1, 1, 5, 5)) == 9 * 9


def test_train_eval_flags():
    layer = L.Dropout()
    assert layer.training
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    layer.train(False)
    assert not layer.training


# ---------------------------------------------------------------------------------------------
# validation: every layer, the right error type, the layer's name, before any kernel
# ---------------------------------------------------------------------------------------------

X = np.zeros((2, 3, 8, 8), np.float32)

FORWARD_ERRORS = [
    # (layer factory, input, error, message fragment)
    (
        lambda: L.Conv2D(3, 4, 3),
        X[0],
        ValueError,
        r"expected input of shape \(N, 3, H, W\), got \(3, 8, 8\)",
    ),
    (
        lambda: L.Conv2D(3, 4, 3),
        X[:, :1],
        ValueError,
        r"expected input of shape \(N, 3, H, W\), got \(2, 1, 8, 8\)",
    ),
    (lambda: L.Conv2D(3, 4, 3), X.astype(np.int64), TypeError, "floating-point input.*int64"),
    (lambda: L.Conv2D(3, 4, 3), X.astype(bool), TypeError, "floating-point input.*bool"),
    (lambda: L.Conv2D(3, 4, 9), X, ValueError, "larger than the padded input"),
    (
        lambda: L.Conv2D(3, 4, 9, padding=(1, 0)),
        X,
        ValueError,
        "larger than the padded input along W",
    ),
    (lambda: L.Conv2D(3, 4, 3, dilation=4), X, ValueError, "larger than the padded input"),
    (
        lambda: L.MaxPool2D(2),
        X[0],
        ValueError,
        r"expected input of shape \(N, C, H, W\), got \(3, 8, 8\)",
    ),
    (lambda: L.MaxPool2D(2), X.astype(np.uint8), TypeError, "floating-point input.*uint8"),
    (lambda: L.MaxPool2D(9), X, ValueError, "larger than the padded input"),
    (lambda: L.AvgPool2D((2, 11), padding=(0, 1)), X, ValueError, "larger than the padded input"),
    (lambda: L.AvgPool2D(2), X[0, 0], ValueError, r"expected input of shape \(N, C, H, W\)"),
    (lambda: L.AvgPool2D(2), X.astype(np.int32), TypeError, "floating-point input"),
    (
        lambda: L.BatchNorm2D(3),
        X[0],
        ValueError,
        r"expected input of shape \(N, 3, H, W\), got \(3, 8, 8\)",
    ),
    (
        lambda: L.BatchNorm2D(4),
        X,
        ValueError,
        r"expected input of shape \(N, 4, H, W\), got \(2, 3, 8, 8\)",
    ),
    (lambda: L.BatchNorm2D(3), X.astype(np.int16), TypeError, "floating-point input"),
    (lambda: L.BatchNorm1D(3), X, ValueError, r"expected input of shape \(N, 3\) or \(N, 3, L\)"),
    (lambda: L.BatchNorm1D(5), X[:, :, 0], ValueError, r"expected input of shape \(N, 5\)"),
    (
        lambda: L.Dense(192, 4),
        X,
        ValueError,
        r"expected input of shape \(N, 192\), got \(2, 3, 8, 8\)",
    ),
    (
        lambda: L.Dense(100, 4),
        X.reshape(2, -1),
        ValueError,
        r"expected input of shape \(N, 100\), got \(2, 192\)",
    ),
    (lambda: L.Dense(192, 4), X.reshape(2, -1).astype(int), TypeError, "floating-point input"),
    (lambda: L.ReLU(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.LeakyReLU(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.Tanh(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.Sigmoid(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.Softmax(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.Softmax(dim=4), X, ValueError, "dim 4 out of range"),
    (lambda: L.Flatten(), X.astype(int), TypeError, "floating-point input"),
    (lambda: L.Flatten(), X[0, 0, 0], ValueError, r"rank >= 2, got \(8,\)"),
    (lambda: L.Dropout(), X.astype(int), TypeError, "floating-point input"),
]


@pytest.mark.parametrize("factory, x, error, match", FORWARD_ERRORS)
def test_forward_validation(no_kernels, factory, x, error, match):
    layer = factory()
    with pytest.raises(error, match=f"^{layer.name}: .*{match}"):
        layer.forward(x)
    # the same check guards output_shape (summary) for shape errors
    if error is ValueError:
        with pytest.raises(ValueError, match=f"^{layer.name}: "):
            layer.output_shape(x.shape)


CONSTRUCTOR_ERRORS = [
    (lambda: L.Conv2D(3, 4, 0), ValueError, "Conv2D", "kernel_size >= 1, got 0"),
    (lambda: L.Conv2D(3, 4, (3, -1)), ValueError, "Conv2D", "kernel_size >= 1, got -1"),
    (lambda: L.Conv2D(3, 4, 3, stride=0), ValueError, "Conv2D", "stride >= 1, got 0"),
    (lambda: L.Conv2D(3, 4, 3, stride=-2), ValueError, "Conv2D", "stride >= 1, got -2"),
    (lambda: L.Conv2D(3, 4, 3, dilation=0), ValueError, "Conv2D", "dilation >= 1"),
    (lambda: L.Conv2D(3, 4, 3, padding=-1), ValueError, "Conv2D", "padding >= 0"),
    (lambda: L.Conv2D(3, 4, 3, padding="full"), ValueError, "Conv2D", "got 'full'"),
    (lambda: L.Conv2D(3, 4, 2.5), TypeError, "Conv2D", "kernel_size"),
    (lambda: L.Conv2D(0, 4, 3), ValueError, "Conv2D", "in_channels >= 1"),
    (lambda: L.Conv2D(3, -4, 3), ValueError, "Conv2D", "out_channels >= 1"),
    (lambda: L.Conv2D(3.0, 4, 3), TypeError, "Conv2D", "in_channels to be an int"),
    (lambda: L.MaxPool2D(0), ValueError, "MaxPool2D", "kernel_size >= 1"),
    (lambda: L.MaxPool2D(-2), ValueError, "MaxPool2D", "kernel_size >= 1"),
    (lambda: L.MaxPool2D(2, stride=0), ValueError, "MaxPool2D", "stride >= 1"),
    (lambda: L.MaxPool2D(2, stride=-1), ValueError, "MaxPool2D", "stride >= 1"),
    (lambda: L.MaxPool2D(2, padding=2), ValueError, "MaxPool2D", "half of the kernel"),
    (lambda: L.MaxPool2D(3, padding="same"), ValueError, "MaxPool2D", "padding"),
    (lambda: L.AvgPool2D(0), ValueError, "AvgPool2D", "kernel_size >= 1"),
    (lambda: L.AvgPool2D(2, stride=(1, 0)), ValueError, "AvgPool2D", "stride >= 1"),
    (lambda: L.AvgPool2D(2, padding="valid"), ValueError, "AvgPool2D", "padding"),
    (lambda: L.AvgPool2D(2, padding=-1), ValueError, "AvgPool2D", "padding >= 0"),
    (lambda: L.BatchNorm2D(0), ValueError, "BatchNorm2D", "num_features >= 1"),
    (lambda: L.BatchNorm2D(3, eps=0), ValueError, "BatchNorm2D", "eps"),
    (lambda: L.BatchNorm2D(3, momentum=1.5), ValueError, "BatchNorm2D", "momentum"),
    (lambda: L.BatchNorm1D(-1), ValueError, "BatchNorm1D", "num_features >= 1"),
    (lambda: L.Dense(0, 3), ValueError, "Dense", "in_features >= 1"),
    (lambda: L.Dense(3, 0), ValueError, "Dense", "out_features >= 1"),
    (lambda: L.Dense(3, 2, dtype=np.int64), TypeError, "Dense", "dtype"),
    (lambda: L.LeakyReLU("a"), TypeError, "LeakyReLU", "negative_slope"),
    (lambda: L.Softmax(dim=1.0), TypeError, "Softmax", "dim"),
    (lambda: L.Dropout(2), ValueError, "Dropout", "p"),
]


@pytest.mark.parametrize("factory, error, name, match", CONSTRUCTOR_ERRORS)
def test_constructor_validation(factory, error, name, match):
    with pytest.raises(error, match=f"^{name}: .*{match}"):
        factory()


def test_unknown_layer_config():
    with pytest.raises(ValueError, match="unknown module class 'Conv3D'"):
        module_from_config({"class": "Conv3D"})
    with pytest.raises(ValueError, match="'class' key"):
        module_from_config({"in_channels": 1})
