"""fastcnn.module: registration by attribute, dotted names, state, modes, the registry, and the
rule that a module is used once per model."""

import json

import numpy as np
import pytest

import fastcnn
from fastcnn import Concat, Module, Parameter, Residual, Sequential, checkpoint
from fastcnn import layers as L
from fastcnn.models import resnet
from fastcnn.module import MAX_CONFIG_DEPTH, module_from_config, register_module, registered_modules


class Scale(Module):
    """A user's layer: y = x * gain (one parameter per channel), with a buffer."""

    def __init__(self, channels, init=1.0):
        super().__init__()
        self.channels, self.init = channels, init
        self.gain = Parameter(np.full(channels, init, np.float64))
        self.register_buffer("calls", np.zeros(1))

    def forward(self, x):
        self.calls += 1
        self.save_for_backward(x)
        return x * self.gain.data[None, :, None, None]

    def backward(self, dy, input_grad=True):
        (x,) = self.saved_for_backward()
        self.gain.grad += (dy * x).sum(axis=(0, 2, 3))
        return dy * self.gain.data[None, :, None, None]

    def get_config(self):
        return {"class": self.name, "channels": self.channels, "init": self.init}


class Block(Module):
    """A user's container: conv -> Scale -> ReLU, children created in __init__ from its config."""

    def __init__(self, channels, rng=None):
        super().__init__()
        self.channels = channels
        self.conv = L.Conv2D(channels, channels, 3, padding=1, dtype=np.float64, rng=rng)
        self.scale = Scale(channels, 0.5)
        self.act = L.ReLU()

    def forward(self, x):
        return self.act(self.scale(self.conv(x)))

    def backward(self, dy, input_grad=True):
        return self.conv.backward(self.scale.backward(self.act.backward(dy)), input_grad)

    def get_config(self):
        return {"class": self.name, "channels": self.channels}


def _nested(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2D(1, 4, 3, padding=1, dtype=np.float64, rng=rng),
        Sequential(Block(4, rng=rng), L.Dropout(0.3, rng=rng)),
        Residual(
            Sequential(
                L.Conv2D(4, 4, 1, dtype=np.float64, rng=rng), L.BatchNorm2D(4, dtype=np.float64)
            )
        ),
        L.GlobalAvgPool2D(),
        L.Dense(4, 3, dtype=np.float64, rng=rng),
    )


def test_registration_by_attribute_and_dotted_names():
    model = _nested()
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "0.weight",
        "0.bias",
        "1.0.conv.weight",
        "1.0.conv.bias",
        "1.0.scale.gain",
        "2.body.0.weight",
        "2.body.0.bias",
        "2.body.1.weight",
        "2.body.1.bias",
        "4.weight",
        "4.bias",
    ]
    assert [n for n, _ in model.named_buffers()] == [
        "1.0.scale.calls",
        "2.body.1.running_mean",
        "2.body.1.running_var",
    ]
    assert list(model.state_dict()) == [
        "0.weight",
        "0.bias",
        "1.0.conv.weight",
        "1.0.conv.bias",
        "1.0.scale.gain",
        "1.0.scale.calls",
        "2.body.0.weight",
        "2.body.0.bias",
        "2.body.1.weight",
        "2.body.1.bias",
        "2.body.1.running_mean",
        "2.body.1.running_var",
        "4.weight",
        "4.bias",
    ]
    assert [n for n, _ in model.named_modules()][:5] == ["", "0", "1", "1.0", "1.0.conv"]
    block = model[1][0]
    block.extra = L.ReLU()  # a new child is registered; replacing one keeps the order
    block.conv = L.Conv2D(4, 4, 1, dtype=np.float64)
    assert [n for n, _ in block.named_children()] == ["scale", "act", "extra", "conv"]
    del block.extra
    assert [n for n, _ in block.named_children()] == ["scale", "act", "conv"]
    block.act = None  # no longer a child
    assert [n for n, _ in block.named_children()] == ["scale", "conv"]
    # a Parameter shared by two modules (tied weights) is listed once, its gradients summed
    a, b = L.Dense(3, 3), L.Dense(3, 3)
    b.weight = a.weight
    assert len(Sequential(a, b).parameters()) == 3


def test_a_module_is_used_once_per_model():
    relu, conv = L.ReLU(), L.Conv2D(1, 1, 1)
    for build in (
        lambda: Sequential(relu, relu),
        lambda: Sequential(Sequential(conv), conv),
        lambda: Residual(conv, shortcut=conv),
        lambda: Concat(Sequential(relu), relu),
    ):
        with pytest.raises(
            ValueError, match="is already in this model .* a module can be used once per model"
        ):
            build()
    seq = Sequential(L.ReLU())
    with pytest.raises(ValueError, match="cannot hold itself"):
        seq.append(seq)
    outer = Sequential(seq)
    with pytest.raises(ValueError, match="already in this model"):
        seq.append(outer)  # a cycle
    # added to an inner container after the outer one was built: refused at the next forward
    inner, last = Sequential(L.ReLU()), L.ReLU()
    outer = Sequential(inner, last)
    inner.append(last)
    with pytest.raises(ValueError, match="the same ReLU is at '0.1' and '1'"):
        outer(np.zeros((1, 2)))
    # a user's module that calls a child twice: its second backward is an error, not a wrong
    # gradient

    class Twice(Module):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2, 2, dtype=np.float64)

        def forward(self, x):
            return self.dense(self.dense(x))

        def backward(self, dy, input_grad=True):
            return self.dense.backward(self.dense.backward(dy))

    twice = Twice()
    twice(np.ones((1, 2)))
    with pytest.raises(RuntimeError, match="^Dense: backward called twice after one forward"):
        twice.backward(np.ones((1, 2)))


def test_backward_twice_after_one_forward_is_an_error(rng):
    for model in (fastcnn.models.reference(), Sequential(L.Dense(4, 2)), L.Tanh()):
        x = rng.random((2, 1, 28, 28) if len(model.children()) > 2 else (2, 4), dtype=np.float32)
        y = model(x)
        model.backward(np.ones_like(y))
        with pytest.raises(RuntimeError, match="backward called twice after one forward"):
            model.backward(np.ones_like(y))
        model(x)
        model.backward(np.ones_like(y))  # a new forward: a new backward


def test_state_round_trip_modes_and_repr(rng):
    model, other = _nested(1), _nested(2)
    x = rng.standard_normal((2, 1, 5, 5))
    model(x)
    other.load_state_dict(model.state_dict())
    other.set_rng_state(json.loads(json.dumps(model.get_rng_state())))
    assert list(model.get_rng_state()) == ["1.1"]
    np.testing.assert_array_equal(other(x), model(x))  # training mode, dropout included
    with pytest.raises(
        ValueError,
        match=r"cannot load state dict: .*'1.0.scale.gain': expected "
        r"shape \(4,\), got \(3,\)",
    ):
        other.load_state_dict({**model.state_dict(), "1.0.scale.gain": np.zeros(3)})
    assert other.eval() is other and not any(m.training for m in other.modules())
    assert other.train() is other and all(m.training for m in other.modules())
    text = repr(model)
    assert "(1): Sequential(\n    (0): Block(\n      (conv): Conv2D(4, 4, kernel_size=3" in text
    assert "(2): Residual(\n    (body): Sequential(" in text
    p = model.predict(x, batch_size=1)
    assert p.shape == (2, 3) and all(m.training for m in model.modules())
    model.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())


def test_registry_and_checkpoints_of_any_tree(tmp_path, rng):
    """A user's registered layer and container inside a nested model round-trip through save ->
    load -> evaluate; an unregistered class is refused by name, nothing is imported."""
    model = _nested(3)
    x = rng.standard_normal((8, 1, 5, 5))
    y = rng.integers(0, 3, 8)
    path = tmp_path / "nested.safetensors"
    for cls in (Scale, Block):
        registered_modules().pop(cls.__name__, None)
    checkpoint.save(path, model, input_shape=(1, 5, 5))
    with pytest.raises(checkpoint.CheckpointError, match="unknown module class 'Block'"):
        checkpoint.load(path)
    register_module(Scale)
    register_module(Block)
    assert register_module(Block) is Block  # again: nothing happens
    ckpt = checkpoint.load(path)
    assert ckpt.input_shape == (1, 5, 5) and ckpt.model.get_config() == model.get_config()
    assert fastcnn.evaluate(ckpt.model, x, y) == fastcnn.evaluate(model, x, y)
    with pytest.raises(ValueError, match="the name 'Block' is taken by"):
        register_module(type("Block", (Module,), {}))
    with pytest.raises(TypeError, match="expected a fastcnn Module subclass"):
        register_module(dict)

    @register_module(name="MyScale")
    class Renamed(Scale):
        pass

    assert registered_modules()["MyScale"] is Renamed


def test_state_spec_of_a_tree_without_building_it():
    from fastcnn.module import state_spec_of
    from test_containers import inception

    for model in (resnet(8), fastcnn.models.lenet5(), inception(), Sequential()):
        spec = state_spec_of(model.get_config())
        assert spec == {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    register_module(Scale)
    register_module(Block)
    assert state_spec_of(_nested().get_config()) is None  # Block: a user's class, built to know


def test_config_depth_is_bounded():
    config = {"class": "ReLU"}
    for _ in range(MAX_CONFIG_DEPTH + 1):
        config = {"class": "Sequential", "layers": [config]}
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_CONFIG_DEPTH} levels"):
        module_from_config(config)
    for bad, match in (
        ({"class": "Residual", "body": {"class": "ReLU"}}, "'body' and 'shortcut'"),
        ({"class": "Concat", "branches": "x"}, "^Concat: expected a config"),
        ({"class": "os.system"}, "unknown module class 'os.system'"),
    ):
        with pytest.raises(ValueError, match=match):
            module_from_config(bad)


def test_resnet_checkpoint_round_trip(tmp_path, rng):
    model = resnet(8, seed=4)
    x = rng.random((4, 1, 12, 12), dtype=np.float32)
    model(x)  # moves the running statistics
    checkpoint.save(tmp_path / "r8.safetensors", model)
    loaded = checkpoint.load(tmp_path / "r8.safetensors").model
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_subclass_must_call_init_and_layer_alias():
    class Broken(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(2))

    with pytest.raises(AttributeError, match=r"call super\(\).__init__\(\) first"):
        Broken()
    assert fastcnn.Layer is Module


def test_a_module_shared_by_two_models_cannot_mix_their_states(rng):
    """model[:2] shares its layers with model (as PyTorch's slicing): a forward of one between
    the other's forward and backward is refused, not a gradient from the wrong input."""
    model = Sequential(
        L.Dense(4, 4, dtype=np.float64, rng=1), L.Tanh(), L.Dense(4, 2, dtype=np.float64, rng=2)
    )
    head = model[:2]
    x = rng.standard_normal((3, 4))
    y = model(x)
    head(rng.standard_normal((3, 4)))
    model.zero_grad()
    with pytest.raises(RuntimeError, match="^Dense: it ran forward again"):
        model.backward(np.ones_like(y))
    assert not any(p.grad.any() for p in model.parameters())  # checked before anything ran
    model(x)
    assert model.backward(np.ones_like(y), input_grad=True).shape == x.shape


def test_fit_trains_a_users_module_whose_backward_takes_only_dy(rng):
    class Net(Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = L.Dense(4, 8, rng=1), L.Dense(8, 2, rng=2)
            self.act = L.Tanh()

        def forward(self, x):
            return self.b(self.act(self.a(x)))

        def backward(self, dy):
            return self.a.backward(self.act.backward(self.b.backward(dy)))

    net = Net()
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    before = net.a.weight.data.copy()
    history = fastcnn.fit(
        net,
        fastcnn.CrossEntropyLoss(),
        fastcnn.SGD(net.parameters(), lr=0.5),
        x,
        y,
        epochs=3,
        batch_size=8,
        progress=False,
    )
    assert history.train_loss[-1] < history.train_loss[0]
    assert not np.array_equal(net.a.weight.data, before)
    assert Sequential(Net()).backward.__name__ == "backward"  # nests as a step of its own


def test_a_layer_written_for_the_former_layer_api_keeps_its_state():
    """``class L(fastcnn.Layer)`` with ``_params``/``_buffers`` class attributes, as before the
    Module base: parameters and buffers are registered when assigned, so they are saved."""

    class Old(fastcnn.Layer):
        _params = ("w",)
        _buffers = ("count",)

        def __init__(self):
            super().__init__()
            self.w = Parameter(np.ones(2))
            self.count = np.zeros(1)

    layer = Old()
    assert list(layer.state_dict()) == ["w", "count"]
