"""fastcnn.model.Sequential and fastcnn.models.reference.

The key test: a full forward and backward pass of the reference network equals the same network
computed with the naive references of tests/naive/ (conv, ReLU, max pool, dense, softmax
cross-entropy), logits and every gradient, to 1e-10 in float64.
"""

import json

import numpy as np
import pytest

import fastcnn
from fastcnn import layers as L
from fastcnn.model import Sequential, from_config
from fastcnn.models import reference
from gradcheck import relative_error
from naive import activations as naive_act
from naive import conv2d as naive_conv
from naive import dense as naive_dense
from naive import losses as naive_losses
from naive import pool2d as naive_pool

NO_PAD = ((0, 0), (0, 0))
PARAM_NAMES = [
    "0.weight",
    "0.bias",
    "3.weight",
    "3.bias",
    "7.weight",
    "7.bias",
    "9.weight",
    "9.bias",
]


# ---------------------------------------------------------------------------------------------
# the reference network against the naive loops
# ---------------------------------------------------------------------------------------------


def naive_reference(p, x, labels):
    """Forward and backward of the reference network with the naive loops only.
    ``p`` maps "0.weight"... to float64 arrays. Returns (logits, loss, dx, grads)."""
    a0 = naive_conv.conv2d_forward(x, p["0.weight"], p["0.bias"])
    a1 = naive_act.relu_forward(a0)
    a2, _ = naive_pool.maxpool2d_forward(a1, (2, 2), (2, 2), NO_PAD)
    a3 = naive_conv.conv2d_forward(a2, p["3.weight"], p["3.bias"])
    a4 = naive_act.relu_forward(a3)
    a5, _ = naive_pool.maxpool2d_forward(a4, (2, 2), (2, 2), NO_PAD)
    a6 = a5.reshape(a5.shape[0], -1)
    a7 = naive_dense.dense_forward(a6, p["7.weight"], p["7.bias"])
    a8 = naive_act.relu_forward(a7)
    logits = naive_dense.dense_forward(a8, p["9.weight"], p["9.bias"])
    loss, d9 = naive_losses.softmax_cross_entropy(logits, labels)
    g = {}
    d8, g["9.weight"], g["9.bias"] = naive_dense.dense_backward(a8, p["9.weight"], d9)
    d7 = naive_act.relu_backward(a7, d8)
    d6, g["7.weight"], g["7.bias"] = naive_dense.dense_backward(a6, p["7.weight"], d7)
    d5 = d6.reshape(a5.shape)
    d4 = naive_pool.maxpool2d_backward(a4, d5, (2, 2), (2, 2), NO_PAD)
    d3 = naive_act.relu_backward(a3, d4)
    d2, g["3.weight"], g["3.bias"] = naive_conv.conv2d_backward(a2, p["3.weight"], d3)
    d1 = naive_pool.maxpool2d_backward(a1, d2, (2, 2), (2, 2), NO_PAD)
    d0 = naive_act.relu_backward(a0, d1)
    dx, g["0.weight"], g["0.bias"] = naive_conv.conv2d_backward(x, p["0.weight"], d0)
    return logits, loss, dx, g, d9


@pytest.fixture(scope="module")
def key_case():
    """4 images (float32-representable values, so the float32 network sees the same input),
    labels, float32-representable weights, and the naive result (computed once: ~10 s)."""
    rng = np.random.default_rng(2024)
    x = rng.random((4, 1, 28, 28)).astype(np.float32).astype(np.float64)
    labels = np.array([3, 0, 7, 7])
    weights = {k: v.astype(np.float64) for k, v in reference(seed=5).state_dict().items()}
    return x, labels, weights, naive_reference(weights, x, labels)


def test_reference_forward_backward_matches_naive(key_case):
    """THE KEY TEST: float64, relative error <= 1e-10 for logits, input gradient and every
    parameter gradient."""
    x, labels, weights, (logits, loss, dx_naive, grads, dlogits) = key_case
    model = reference(seed=0, dtype=np.float64)
    model.load_state_dict(weights)
    model.train()
    model.zero_grad()
    out = model.forward(x)
    assert out.dtype == np.float64 and out.shape == (4, 10)
    assert relative_error(out, logits) <= 1e-10
    # the loss from the logits, with the naive loss (its gradient checked in tests of losses)
    loss_fast, dlogits_fast = naive_losses.softmax_cross_entropy(out, labels)
    assert abs(loss_fast - loss) <= 1e-10 * abs(loss)
    dx = model.backward(dlogits_fast, input_grad=True)
    assert relative_error(dx, dx_naive) <= 1e-10
    named = dict(model.named_parameters())
    assert sorted(named) == sorted(grads)
    for name, p in named.items():
        assert p.grad.dtype == np.float64
        err = relative_error(p.grad, grads[name])
        assert err <= 1e-10, (name, err)
    # sanity: the gradients are not trivially zero
    assert all(np.abs(g).max() > 0 for g in grads.values())


def test_reference_float32_close_to_naive(key_case):
    """The default float32 network on the same weights: <= 1e-4 relative to the float64 naive
    result."""
    x, labels, weights, (logits, _, dx_naive, grads, dlogits) = key_case
    model = reference(seed=0)
    model.load_state_dict({k: v.astype(np.float32) for k, v in weights.items()})
    out = model.forward(x.astype(np.float32))
    assert out.dtype == np.float32
    assert relative_error(out, logits) <= 1e-4
    model.zero_grad()
    dx = model.backward(dlogits.astype(np.float32), input_grad=True)
    assert relative_error(dx, dx_naive) <= 1e-4
    for name, p in model.named_parameters():
        assert p.grad.dtype == np.float32
        assert relative_error(p.grad, grads[name]) <= 1e-4, name


# ---------------------------------------------------------------------------------------------
# the reference network
# ---------------------------------------------------------------------------------------------


def _unfused_pass(model, x, dy):
    """Every layer's forward, then every backward, one by one: no fused pair."""
    for layer in model.layers:
        x = layer.forward(x)
    out = x
    for layer in reversed(model.layers):
        dy = layer.backward(dy)
    return out, dy


def _grads(model):
    return {name: p.grad.copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_pairs_equal_layer_by_layer(dtype, rng):
    """Sequential runs Conv2D+ReLU forward and ReLU+MaxPool2D backward fused; logits, input
    gradient and every parameter gradient are bitwise those of the layers run one by one (random
    data leaves some pooling windows all <= 0, where the fused mask must block the gradient)."""
    model = reference(seed=1, dtype=dtype)
    x = rng.standard_normal((5, 1, 28, 28)).astype(dtype)
    dy = rng.standard_normal((5, 10)).astype(dtype)
    model.zero_grad()
    out, dx = _unfused_pass(model, x, dy)
    expected = _grads(model)
    model.zero_grad()
    fused_out = model(x)
    fused_dx = model.backward(dy, input_grad=True)
    np.testing.assert_array_equal(fused_out, out)
    np.testing.assert_array_equal(fused_dx, dx)
    for name, g in _grads(model).items():
        np.testing.assert_array_equal(g, expected[name], err_msg=name)
    with fastcnn.fusion(False):
        blocked = model[:3](x) <= 0  # pool1 windows whose maximum the ReLU zeroed
    assert blocked.any() and not blocked.all()


def test_fused_relu_pool_backward_blocks_nan_and_zero_maxima():
    """A NaN or a 0 maximum passes no gradient, as ReLU's own backward."""
    pool, relu = L.MaxPool2D(2), L.ReLU()
    x = np.array([[[[np.nan, -1.0, -2.0, -3.0], [0.5, 1.0, -1.0, -4.0]]]], np.float32)
    y = pool.forward(relu.forward(x))
    dy = np.ones_like(y)
    unfused = relu.backward(pool.backward(dy))
    block = Sequential(relu, pool)
    assert [type(s).__name__ for s in block._plan()] == ["ReLUMaxPool"]
    np.testing.assert_array_equal(block(x), y)
    np.testing.assert_array_equal(block.backward(dy, input_grad=True), unfused)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 0
    assert unfused.sum() == 0


def test_backward_without_input_grad(rng):
    """input_grad=False: None returned, parameter gradients unchanged (fit's path)."""
    model = reference(seed=2)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    dy = rng.standard_normal((3, 10)).astype(np.float32)
    model.zero_grad()
    model(x)
    assert model.backward(dy, input_grad=True) is not None
    expected = _grads(model)
    model.zero_grad()
    model(x)
    assert model.backward(dy, input_grad=False) is None
    for name, g in _grads(model).items():
        np.testing.assert_array_equal(g, expected[name], err_msg=name)
    # a container's default, as PyTorch's loss.backward() for images that need no gradient
    model.zero_grad()
    model(x)
    assert model.backward(dy) is None
    for name, g in _grads(model).items():
        np.testing.assert_array_equal(g, expected[name], err_msg=name)


def test_reference_architecture():
    model = reference()
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == [
        "Conv2D",
        "ReLU",
        "MaxPool2D",
        "Conv2D",
        "ReLU",
        "MaxPool2D",
        "Flatten",
        "Dense",
        "ReLU",
        "Dense",
    ]
    assert [n for n, _ in model.named_parameters()] == PARAM_NAMES
    shapes = [p.shape for p in model.parameters()]
    assert shapes == [
        (32, 1, 3, 3),
        (32,),
        (64, 32, 3, 3),
        (64,),
        (128, 1600),
        (128,),
        (10, 128),
        (10,),
    ]
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert all(p.dtype == np.float64 for p in reference(dtype=np.float64).parameters())
    a, b, c = reference(seed=0), reference(seed=0), reference(seed=1)
    for (_, p), (_, q), (_, r) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        np.testing.assert_array_equal(p.data, q.data)
        assert not np.array_equal(p.data, r.data)
    # one generator through all layers: no two layers draw the same numbers
    assert not np.array_equal(a[7].weight.data[0, :10], a[9].weight.data[0, :10])


def test_summary_of_reference(capsys):
    model = reference()
    text = model.summary((2, 1, 28, 28))
    assert capsys.readouterr().out.strip() == text.strip()
    # parameter count by hand: conv weights F*C*KH*KW + F biases, dense out*in + out
    expected = (32 * 1 * 3 * 3 + 32) + (64 * 32 * 3 * 3 + 64) + (128 * 1600 + 128) + (10 * 128 + 10)
    assert expected == 225_034
    assert "Total params: 225,034" in text
    assert sum(p.size for p in model.parameters()) == expected
    for shape in [
        "(2, 32, 26, 26)",
        "(2, 32, 13, 13)",
        "(2, 64, 11, 11)",
        "(2, 64, 5, 5)",
        "(2, 1600)",
        "(2, 128)",
        "(2, 10)",
    ]:
        assert shape in text
    conv_flops = 2 * 2 * 32 * 26 * 26 * 9 + 2 * 2 * 64 * 11 * 11 * 32 * 9
    dense_flops = 2 * 2 * 1600 * 128 + 2 * 2 * 128 * 10
    others = sum(
        layer.flops(s)
        for layer, s in [
            (model[1], (2, 32, 26, 26)),
            (model[2], (2, 32, 26, 26)),
            (model[4], (2, 64, 11, 11)),
            (model[5], (2, 64, 11, 11)),
            (model[8], (2, 128)),
        ]
    )
    assert f"Forward FLOPs: {conv_flops + dense_flops + others:,}" in text
    rows = [line for line in text.splitlines() if line[:1].isdigit() or line.lstrip()[:1].isdigit()]
    assert len(rows) == 10
    assert "204,928" in text and "18,496" in text
    assert model.summary((1, 1, 28, 28), print_fn=None).count("\n") == text.count("\n")


def test_summary_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"^Conv2D: expected input of shape \(N, 1, H, W\)"):
        reference().summary((1, 3, 28, 28), print_fn=None)
    with pytest.raises(
        ValueError, match=r"^Dense: expected input of shape \(N, 1600\), got \(1, 2304\)"
    ):
        reference().summary((1, 1, 32, 32), print_fn=None)


# ---------------------------------------------------------------------------------------------
# Sequential
# ---------------------------------------------------------------------------------------------


def _bn_model(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2D(1, 4, 3, padding="same", dtype=dtype, rng=rng),
        L.BatchNorm2D(4, dtype=dtype),
        L.ReLU(),
        L.AvgPool2D(2),
        L.Dropout(0.25, seed=seed),
        L.Flatten(),
        L.Dense(64, 8, dtype=dtype, rng=rng),
        L.BatchNorm1D(8, dtype=dtype),
        L.Tanh(),
        L.Dense(8, 3, dtype=dtype, rng=rng),
        L.Softmax(),
    )


def test_construction_forms_and_container():
    layers = [L.Flatten(), L.Dense(4, 2)]
    a, b = Sequential(layers), Sequential(*layers)
    assert a.layers == b.layers == layers and len(a) == 2 and a[1] is layers[1]
    assert list(a) == layers
    assert "(1): Dense(4, 2)" in repr(a)
    with pytest.raises(TypeError, match="^Sequential: module 1 is not a fastcnn Module"):
        Sequential([L.ReLU(), "relu"])


def test_state_dict_keys_and_round_trip(rng):
    model = _bn_model()
    state = model.state_dict()
    assert list(state) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "6.weight",
        "6.bias",
        "7.weight",
        "7.bias",
        "7.running_mean",
        "7.running_var",
        "9.weight",
        "9.bias",
    ]
    x = rng.standard_normal((5, 1, 8, 8))
    model.train()
    model(x)  # moves the running statistics
    other = _bn_model(seed=1)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    np.testing.assert_array_equal(other(x), model(x))


def test_load_state_dict_validates_everything_first():
    model = reference()
    before = model.state_dict()
    good = reference(seed=1).state_dict()
    cases = [
        ({k: v for k, v in good.items() if k != "3.bias"}, r"missing keys \['3.bias'\]"),
        (
            {**good, "4.weight": np.zeros(1), "x": np.zeros(1)},
            r"unexpected keys \['4.weight', 'x'\]",
        ),
        (
            {**good, "9.bias": np.zeros(11, np.float32)},
            r"'9.bias': expected shape \(10,\), got \(11,\)",
        ),
        (
            {**good, "0.weight": good["0.weight"].astype(np.float64)},
            "'0.weight': expected dtype float32, got float64",
        ),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=f"^Sequential: cannot load state dict: .*{match}"):
            model.load_state_dict(state)
        for key, value in model.state_dict().items():  # nothing assigned, not even valid keys
            np.testing.assert_array_equal(value, before[key])
    with pytest.raises(TypeError, match="^Sequential: expected a state dict"):
        model.load_state_dict([1, 2])
    # non-strict: skips missing and unexpected keys, still checks shapes
    model.load_state_dict({"0.bias": good["0.bias"], "junk": np.zeros(2)}, strict=False)
    np.testing.assert_array_equal(model[0].bias.data, good["0.bias"])
    np.testing.assert_array_equal(model[3].bias.data, before["3.bias"])
    with pytest.raises(ValueError, match="'0.bias': expected shape"):
        model.load_state_dict({"0.bias": np.zeros(3, np.float32)}, strict=False)


def test_config_round_trip(rng):
    for model in (reference(seed=3), _bn_model(seed=3)):
        config = json.loads(json.dumps(model.get_config()))
        assert config["class"] == "Sequential" and len(config["layers"]) == len(model)
        clone = from_config(config, rng=123)
        assert clone.get_config() == model.get_config()
        clone.load_state_dict(model.state_dict())
        clone.set_rng_state(json.loads(json.dumps(model.get_rng_state())))
        x = rng.standard_normal((3, 1, 28, 28) if len(model) == 10 else (3, 1, 8, 8))
        np.testing.assert_array_equal(clone(x), model(x))  # training mode (dropout included)
        np.testing.assert_array_equal(clone.predict(x), model.predict(x))
    assert reference().get_config()["layers"][0] == {
        "class": "Conv2D",
        "in_channels": 1,
        "out_channels": 32,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
        "bias": True,
        "dtype": "float32",
    }
    for bad, match in (
        ({"class": "Model", "layers": []}, "^unknown module class 'Model'"),
        ({"class": "Sequential"}, "^Sequential: expected a config"),
        ([1], "^expected a module config dict"),
    ):
        with pytest.raises(ValueError, match=match):
            from_config(bad)


def test_predict_batches_in_eval_mode_and_restores_mode(rng):
    model = _bn_model()
    x = rng.standard_normal((10, 1, 8, 8))
    model.train()
    model(x)
    model[4].train(True)
    expected = model.eval().forward(x)
    model.train()
    state = model.get_rng_state()
    for batch_size in (1, 3, 10, 256):
        np.testing.assert_allclose(model.predict(x, batch_size=batch_size), expected, rtol=1e-13)
        assert model.training and all(layer.training for layer in model)
    assert model.get_rng_state() == state  # eval mode: dropout drew nothing
    model.eval()
    model.predict(x)
    assert not model.training and not any(layer.training for layer in model)
    assert model.predict(x[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        model.predict(x, batch_size=0)
    with pytest.raises(TypeError, match="batch_size to be an int"):
        model.predict(x, batch_size=2.5)


def test_predict_restores_mode_after_an_error():
    model = reference().train()
    with pytest.raises(ValueError, match="^Conv2D"):
        model.predict(np.zeros((2, 3, 28, 28), np.float32))
    assert model.training and all(layer.training for layer in model)


def test_mode_zero_grad_and_backward(rng):
    model = _bn_model()
    assert model.eval() is model and not any(layer.training for layer in model)
    assert model.train() is model and all(layer.training for layer in model)
    x = rng.standard_normal((4, 1, 8, 8))
    y = model(x)
    dx = model.backward(rng.standard_normal(y.shape), input_grad=True)
    assert dx.shape == x.shape
    assert all(np.abs(p.grad).max() > 0 for p in model.parameters())
    model.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())
    assert model.num_parameters() == sum(p.size for p in model.parameters())


def test_float32_model_casts_float64_input(rng):
    model = reference()
    x = rng.random((2, 1, 28, 28))
    y = model(x)
    assert y.dtype == np.float32
    assert model.backward(np.ones_like(y), input_grad=True).dtype == np.float64  # the input's dtype
    np.testing.assert_array_equal(y, model(x.astype(np.float32)))
    assert model.backward(np.ones_like(y), input_grad=True).dtype == np.float32


def test_validation_before_any_kernel(no_kernels):
    model = reference()
    with pytest.raises(TypeError, match="^Conv2D: expected a floating-point input"):
        model(np.zeros((1, 1, 28, 28), np.uint8))
    with pytest.raises(
        ValueError, match=r"^Conv2D: expected input of shape \(N, 1, H, W\), got \(28, 28\)"
    ):
        model(np.zeros((28, 28), np.float32))
