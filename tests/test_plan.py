"""fastcnn.plan: every fusion pattern gives bitwise the results of its layers run one by one,
alone and inside any container, and so do random module trees (nesting, residuals, concats,
every layer type), forward and backward."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcnn
from fastcnn import Concat, Residual, Sequential
from fastcnn import layers as L
from fastcnn.models import reference, resnet
from fastcnn.module import module_from_config
from fastcnn.plan import PATTERNS, fusion_enabled, make_plan, set_fusion


def _twin(model):
    """Another tree with the same config, weights, buffers and generator states."""
    twin = module_from_config(model.get_config())
    twin.load_state_dict(model.state_dict())
    twin.set_rng_state(model.get_rng_state())
    return twin.train(model.training)


def _run(model, x, dy, fuse, input_grad=True):
    with fastcnn.fusion(fuse):
        model.zero_grad()
        y = model(x)
        dx = model.backward(dy, input_grad=input_grad)
    return y, dx, [p.grad.copy() for p in model.parameters()], model.state_dict()


def assert_fused_equals_unfused(model, x, dy=None, input_grad=True):
    """Run ``model`` fused and a twin unfused: outputs, input gradients, parameter gradients
    and buffers bitwise equal (NaN where NaN). Returns the fused output."""
    twin = _twin(model)
    if dy is None:
        with fastcnn.fusion(False):
            shape = _twin(model)(x).shape
        dy = (
            np.random.default_rng(5)
            .standard_normal(shape)
            .astype(model.parameters()[0].dtype if model.parameters() else x.dtype)
        )
    fused = _run(model, x, dy, True, input_grad)
    plain = _run(twin, x, dy, False, input_grad)
    np.testing.assert_array_equal(fused[0], plain[0])
    assert fused[0].dtype == plain[0].dtype
    if input_grad:
        np.testing.assert_array_equal(fused[1], plain[1])
        assert fused[1].dtype == plain[1].dtype
    else:
        assert fused[1] is None and plain[1] is None
    for a, b in zip(fused[2], plain[2], strict=True):
        np.testing.assert_array_equal(a, b)
    for key in fused[3]:
        np.testing.assert_array_equal(fused[3][key], plain[3][key], err_msg=key)
    return fused[0]


def _steps(model):
    return [type(s).__name__ for s in model._plan()]


# ---------------------------------------------------------------------------------------------
# each pattern


def _pattern_models(dtype, rng):
    conv = lambda c, f, **kw: L.Conv2D(c, f, 3, dtype=dtype, rng=rng, **kw)  # noqa: E731
    return [
        ("ConvReLUMaxPool", Sequential(conv(32, 32), L.ReLU(), L.MaxPool2D(2)), (2, 32, 9, 8)),
        (
            "ConvReLUMaxPool",
            Sequential(conv(3, 5, padding=1), L.ReLU(), L.MaxPool2D(2)),
            (2, 3, 8, 7),
        ),
        (
            "ConvReLUMaxPool",
            Sequential(conv(3, 4), L.ReLU(), L.MaxPool2D(3, stride=2, padding=1)),
            (2, 3, 9, 9),
        ),  # windows that overlap: the unpooled path
        ("ConvReLU", Sequential(conv(3, 4, stride=2), L.ReLU()), (3, 3, 7, 8)),
        ("DenseReLU", Sequential(L.Dense(6, 5, dtype=dtype, rng=rng), L.ReLU()), (4, 6)),
        ("ReLUMaxPool", Sequential(L.ReLU(), L.MaxPool2D(2)), (2, 3, 6, 6)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index", range(6))
def test_each_pattern_is_bitwise_the_unfused_plan(dtype, index, rng):
    name, model, shape = _pattern_models(dtype, rng)[index]
    assert _steps(model) == [name]
    with fastcnn.fusion(False):
        assert set(_steps(model)) == {"ModuleStep"}
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 0] = -np.abs(x[0, 0])  # a row of windows the ReLU blocks entirely
    for input_grad in (True, False):
        assert_fused_equals_unfused(model, x, input_grad=input_grad)
    # a float64 input to a float32 layer: cast in, the gradient cast back, as the layer does
    assert_fused_equals_unfused(model, x.astype(np.float64))
    # inside containers: a residual body, a concat branch, a nested chain
    if len(shape) == 4 and name != "ConvReLU":
        x = np.abs(x) if name == "ReLUMaxPool" else x
        wrapped = Concat(_twin(model), Sequential(Sequential(*_twin(model).children())))
        assert_fused_equals_unfused(wrapped, x)
        for branch in wrapped.children():
            assert set(_steps(branch)) == {name}


def _conv_bn_models(dtype, rng):
    """Conv2D -> BatchNorm2D [-> ReLU [-> MaxPool2D]], running statistics and affine
    parameters random (a fresh BatchNorm's are 0, 1, 1, 0: too kind to rounding)."""
    models = []
    for tail, (c, f, k, stride, pad, size, groups) in [
        (2, (3, 16, 3, 1, 1, 8, 1)),  # 16 filters: the narrow tile
        (1, (16, 40, 3, 2, 1, 9, 1)),  # a partial filter tile, stride 2
        (0, (8, 64, 1, 1, 0, 5, 1)),
        (1, (4, 8, 3, 1, 0, 3, 1)),  # a 1 x 1 output: BatchNorm's NCHW path when unfused
        (1, (24, 24, 3, 1, 1, 9, 24)),  # depthwise (MobileNet's), 24 channels: not 16 at a time
        (2, (8, 16, 3, 2, 1, 10, 8)),  # depthwise, two filters a channel, stride 2
    ]:
        conv = L.Conv2D(c, f, k, stride, padding=pad, dtype=dtype, rng=rng, groups=groups)
        bn = L.BatchNorm2D(f, dtype=dtype)
        bn.running_mean[...] = rng.standard_normal(f)
        bn.running_var[...] = rng.random(f) + 0.1
        bn.weight.data[...] = rng.standard_normal(f)
        bn.bias.data[...] = rng.standard_normal(f)
        models.append(
            (Sequential(conv, bn, *[L.ReLU(), L.MaxPool2D(2)][:tail]), (3, c, size, size))
        )
    return models


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index", range(6))
def test_conv_batchnorm_is_bitwise_the_unfused_plan(dtype, index, rng):
    """Evaluation mode: the BatchNorm (and ReLU) applied by the convolution's kernel (the
    direct, Winograd or depthwise one); a backward after it recomputes the inner plan.
    Training mode: the inner plan itself."""
    model, shape = _conv_bn_models(dtype, rng)[index]
    assert _steps(model) == ["ConvBatchNorm"]
    x = rng.standard_normal(shape).astype(dtype)
    for training in (False, True):
        model.train(training)
        for input_grad in (True, False):
            assert_fused_equals_unfused(model, x, input_grad=input_grad)
        assert_fused_equals_unfused(model, x.astype(np.float64))
    model.eval()
    wrapped = Residual(Sequential(_twin(model)), shortcut=Sequential(*_twin(model).children()))
    assert_fused_equals_unfused(wrapped.eval(), x)
    # eval forward, then a weight changed: the recomputed backward uses the weights it reads
    step = model._plan()[0]
    model(x)
    assert not step._ran_inner
    model.train()
    model(x)
    assert step._ran_inner


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pool, c", [(False, 6), (True, 6), (False, 16), (False, 33)])
def test_batchnorm_relu_is_bitwise_the_unfused_plan(dtype, pool, c, rng):
    """Training mode: the ReLU applied by the BatchNorm's kernel (on a channels-last input,
    a convolution's output; NCHW takes the layer's path and the ReLU after it), the pool's
    backward with the ReLU's mask, or without a pool the ReLU's backward inside the
    BatchNorm's (16 channels: sums of their own); evaluation mode: the modules one by one."""
    bn = L.BatchNorm2D(c, dtype=dtype)
    bn.running_mean[...] = rng.standard_normal(c)
    bn.running_var[...] = rng.random(c) + 0.1
    bn.weight.data[...] = rng.standard_normal(c)
    bn.bias.data[...] = rng.standard_normal(c)
    model = Sequential(bn, L.ReLU(), *([L.MaxPool2D(2)] if pool else []))
    assert _steps(model) == ["BatchNormReLU"]
    x = rng.standard_normal((3, c, 8, 6)).astype(dtype)
    x[1, 2] = np.nan  # a channel of NaN: the ReLU keeps them
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for training in (True, False):
        model.train(training)
        for inp in (channels_last, x, channels_last.astype(np.float64)):
            for input_grad in (True, False):
                assert_fused_equals_unfused(model, inp, input_grad=input_grad)
    model.train()
    step = model._plan()[0]
    model(channels_last)
    assert not step._ran_inner


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("projection", [False, True])
def test_residual_relu_is_bitwise_the_unfused_plan(dtype, projection, rng):
    """Residual -> ReLU: the sum and the ReLU in one pass, training and evaluation, the
    identity shortcut (the block's input, NCHW or channels-last, beside the body's
    channels-last output) and a projection; a NaN kept."""
    body = Sequential(
        L.Conv2D(4, 4 if not projection else 6, 3, padding=1, bias=False, dtype=dtype),
        L.BatchNorm2D(4 if not projection else 6, dtype=dtype),
        L.ReLU(),
    )
    shortcut = Sequential(L.Conv2D(4, 6, 1, dtype=dtype)) if projection else None
    model = Sequential(Residual(body, shortcut), L.ReLU())
    assert _steps(model) == ["ResidualReLU"]
    x = rng.standard_normal((3, 4, 5, 6)).astype(dtype)
    x[0, 1, 2, 3] = np.nan
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for training in (True, False):
        model.train(training)
        for inp in (x, channels_last):
            for input_grad in (True, False):
                assert_fused_equals_unfused(model, inp, input_grad=input_grad)


def _bn(f, dtype, rng):
    bn = L.BatchNorm2D(f, dtype=dtype)
    bn.running_mean[...] = rng.standard_normal(f)
    bn.running_var[...] = rng.random(f) + 0.1
    bn.weight.data[...] = rng.standard_normal(f)
    bn.bias.data[...] = rng.standard_normal(f)
    return bn


@pytest.fixture
def fused_sums(monkeypatch):
    """A list that gets, for each ConvBatchNorm.forward_add call, whether its kernel summed."""
    from fastcnn import plan

    fused = []
    forward_add = plan.ConvBatchNorm.forward_add

    def spy(step, *args):
        result = forward_add(step, *args)
        fused.append(result[1])
        return result

    monkeypatch.setattr(plan.ConvBatchNorm, "forward_add", spy)
    return fused


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "c, f, stride, relu, winograd",
    [
        (16, 16, 1, True, True),  # identity shortcut, the Winograd kernel, Residual -> ReLU
        (4, 4, 1, False, True),  # the direct kernel, the Residual alone (its sum, no ReLU)
        (1, 6, 1, True, True),  # one channel, few filters: the one-channel kernel
        (8, 20, 2, True, True),  # a projection shortcut (1x1, stride 2, BatchNorm), partial tiles
        # the direct kernel's sum 16 filters at a time (lanes.batch_norm16), over work items
        (16, 32, 2, True, False),
        (16, 32, 1, False, False),
    ],
)
def test_residual_sum_in_the_last_convolution_is_bitwise_the_unfused_plan(
    dtype, c, f, stride, relu, winograd, rng, monkeypatch, fused_sums
):
    """Evaluation mode: the body's last Conv2D -> BatchNorm2D adds the shortcut (and applies
    the block's ReLU) in its kernel: bitwise the sum and the ReLU after it, NaN kept, the
    backward after it too; training mode and a body ending otherwise: the sum after it."""
    if not winograd:
        monkeypatch.setenv("FASTCNN_WINOGRAD", "0")
    fused = fused_sums
    first = L.Conv2D(c, f, 3, stride, padding=1, bias=False, dtype=dtype, rng=rng)
    # the second conv of the one-channel case reads one channel too
    second_in = 1 if c == 1 else f
    second = L.Conv2D(second_in, f, 3, padding=1, bias=c == 1, dtype=dtype, rng=rng)
    body = [first, _bn(f, dtype, rng), L.ReLU(), second, _bn(f, dtype, rng)]
    if c == 1:  # a 1 x 1 convolution down to one channel between them
        body[3:3] = [L.Conv2D(f, 1, 1, dtype=dtype, rng=rng)]
    shortcut = None
    if stride > 1 or c != f:
        shortcut = Sequential(L.Conv2D(c, f, 1, stride, dtype=dtype, rng=rng), _bn(f, dtype, rng))
    model = Sequential(Residual(Sequential(*body), shortcut), *([L.ReLU()] if relu else []))
    x = rng.standard_normal((3, c, 9, 8)).astype(dtype)
    x[0, 0, 2, 3] = np.nan
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    for inp in (x, channels_last):
        model.eval()
        fused.clear()
        for input_grad in (True, False):
            assert_fused_equals_unfused(model, inp, input_grad=input_grad)
        assert fused == [True] * 2  # the fused runs (the unfused twins have no such step)
        model.train()
        fused.clear()
        assert_fused_equals_unfused(model, inp)
        assert fused == []  # training: the BatchNorm's batch statistics, the sum after
    # a float64 input beside a float32 body: the sum after it, and its error
    if dtype == np.float32 and shortcut is None:
        model.eval()
        with pytest.raises(TypeError, match="Residual"):
            model(x.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [12, 16])  # 16: the BatchNorm 16 channels at a time, with the sum
def test_residual_sum_in_a_depthwise_convolution_is_bitwise_the_unfused_plan(
    dtype, c, rng, fused_sums
):
    """A MobileNet-style block ending in a depthwise Conv2D -> BatchNorm2D: in evaluation mode
    the depthwise kernel adds the shortcut and applies the ReLU, bitwise the sum after it (NaN
    kept); a grouped convolution of more channels a group matches no pattern."""
    fused = fused_sums
    body = [
        L.Conv2D(c, c, 1, dtype=dtype, rng=rng),
        _bn(c, dtype, rng),
        L.ReLU(),
        L.Conv2D(c, c, 3, padding=1, groups=c, dtype=dtype, rng=rng),
        _bn(c, dtype, rng),
    ]
    model = Sequential(Residual(Sequential(*body)), L.ReLU()).eval()
    x = rng.standard_normal((3, c, 7, 9)).astype(dtype)
    x[1, 4, 3, 3] = np.nan
    for input_grad in (True, False):
        assert_fused_equals_unfused(model, x, input_grad=input_grad)
    assert fused == [True] * 2
    grouped = Sequential(L.Conv2D(12, 12, 3, groups=4, dtype=dtype, rng=rng), _bn(12, dtype, rng))
    assert _steps(grouped) == ["ModuleStep", "ModuleStep"]


def test_residual_sum_of_mismatched_shapes_is_the_residuals_error(rng):
    """A shortcut whose output does not fit the body's: the same error fused or not."""
    body = Sequential(L.Conv2D(4, 4, 3, padding=1, rng=rng), _bn(4, np.float32, rng))
    model = Residual(body, Sequential(L.Conv2D(4, 4, 3, rng=rng), _bn(4, np.float32, rng)))
    model.eval()
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    for fuse in (True, False):
        with fastcnn.fusion(fuse), pytest.raises(ValueError, match="body's output shape"):
            model(x)


def test_non_finite_values_take_the_same_path_fused_and_unfused(rng):
    model = reference(seed=3)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    x[0, 0, 3, 4], x[1, 0, 10, 10] = np.nan, np.inf
    assert_fused_equals_unfused(model, x)


def test_plans_of_the_ready_made_networks():
    assert _steps(reference()) == [
        "ConvReLUMaxPool",
        "ConvReLUMaxPool",
        "ModuleStep",
        "DenseReLU",
        "ModuleStep",
    ]
    model = resnet(8)
    # the stem's conv-BN-ReLU; each residual block with its ReLU; each block's body two
    # conv-BN(-ReLU) steps
    assert _steps(model) == ["ConvBatchNorm"] + ["ResidualReLU"] * 3 + ["ModuleStep"] * 2
    for block in (model[3], model[5], model[7]):
        assert _steps(block.body) == ["ConvBatchNorm", "ConvBatchNorm"]
        # in training the first runs as Conv2D, then BatchNorm2D with the ReLU in its kernel
        assert [type(s).__name__ for s in block.body._plan()[0].inner] == [
            "ModuleStep",
            "BatchNormReLU",
        ]
    # nested plain Sequentials are opened up: their runs fuse across the boundary
    chain = Sequential(Sequential(L.Conv2D(1, 2, 3), L.ReLU()), Sequential(L.MaxPool2D(2)))
    assert _steps(chain) == ["ConvReLUMaxPool"]

    # a subclass is not matched (its forward may differ), an exact type is
    class MyReLU(L.ReLU):
        pass

    assert _steps(Sequential(L.Conv2D(1, 2, 3), MyReLU())) == ["ModuleStep", "ModuleStep"]
    assert (L.Conv2D, L.ReLU, L.MaxPool2D) in [t for t, _ in PATTERNS]


def test_fusion_switch_and_its_context():
    assert fusion_enabled()
    with fastcnn.fusion(False):
        assert not fusion_enabled()
        with pytest.raises(KeyError):
            with fastcnn.fusion(True):
                raise KeyError
        assert not fusion_enabled()
    assert fusion_enabled()
    set_fusion(False)
    try:
        assert set(_steps(reference())) == {"ModuleStep"}
    finally:
        set_fusion(True)
    assert [type(s).__name__ for s in make_plan(reference().children(), fuse=False)] == [
        "ModuleStep"
    ] * 10


def test_plan_follows_changes_to_the_tree(rng):
    model = Sequential(L.Conv2D(1, 2, 3), L.ReLU())
    assert _steps(model) == ["ConvReLU"]
    model.append(L.MaxPool2D(2))
    assert _steps(model) == ["ConvReLUMaxPool"]
    x = rng.random((1, 1, 6, 6), dtype=np.float32)
    assert model(x).shape == (1, 2, 2, 2)


# ---------------------------------------------------------------------------------------------
# random trees

LEAVES = ("conv", "relu", "block", "maxpool", "avgpool", "bn", "act", "dropout", "convrelu")


@st.composite
def trees(draw, channels, size, depth=0):
    """(module, out_channels, out_size) for an input of (N, channels, size, size): a chain of
    leaves, residual blocks (identity or projection), concats of branches and nested chains."""
    rng_seed = draw(st.integers(0, 999))
    rng = np.random.default_rng(rng_seed)
    dtype = np.float64
    mods = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(LEAVES + (("residual", "concat", "chain") if depth < 2 else ()))
        )
        if kind in ("conv", "convrelu", "block"):
            f = draw(st.sampled_from([1, 2, 3, 32]))
            k = draw(st.integers(1, 3))
            pad = k // 2 if kind != "block" or size < 4 else draw(st.integers(0, k // 2))
            mods.append(
                L.Conv2D(
                    channels, f, k, padding=pad, bias=draw(st.booleans()), dtype=dtype, rng=rng
                )
            )
            channels, size = f, size + 2 * pad - k + 1
            if kind in ("convrelu", "block"):
                mods.append(L.ReLU())
            if kind == "block" and size >= 2:
                mods.append(L.MaxPool2D(2))
                size //= 2
        elif kind == "relu":
            mods.append(L.ReLU())
        elif kind == "maxpool" and size >= 2:
            if draw(st.booleans()):
                mods.append(L.MaxPool2D(2))
                size //= 2
            else:
                mods.append(L.MaxPool2D(3, stride=1, padding=1))
        elif kind == "avgpool" and size >= 2:
            mods.append(L.AvgPool2D(2))
            size //= 2
        elif kind == "bn":
            mods.append(L.BatchNorm2D(channels, dtype=dtype))
        elif kind == "act":
            mods.append(draw(st.sampled_from([L.Tanh, L.Sigmoid, L.LeakyReLU]))())
        elif kind == "dropout":
            mods.append(L.Dropout(0.3, seed=rng_seed))
        elif kind == "residual":
            body, c, s = draw(trees(channels, size, depth + 1))
            shortcut = None
            if (c, s) != (channels, size):
                if s > size:
                    continue
                stride = -(-size // s) if s > 1 else size
                if (size - 1) // stride + 1 != s:
                    continue
                shortcut = L.Conv2D(channels, c, 1, stride=stride, dtype=dtype, rng=rng)
            mods.append(Residual(body, shortcut))
            channels, size = c, s
        elif kind == "concat":
            branches, widths = [], []
            for _ in range(draw(st.integers(1, 3))):
                b, c, s = draw(trees(channels, size, depth + 1))
                if s == size:
                    branches.append(b)
                    widths.append(c)
            if branches:
                mods.append(Concat(*branches))
                channels = sum(widths)
        elif kind == "chain":
            chain, channels, size = draw(trees(channels, size, depth + 1))
            mods.append(chain)
    return Sequential(*mods), channels, size


@settings(max_examples=40)
@given(data=st.data(), training=st.booleans(), input_grad=st.booleans())
def test_random_trees_fused_equal_unfused(data, training, input_grad):
    channels = data.draw(st.sampled_from([1, 3, 32]))
    size = data.draw(st.integers(2, 7))
    body, c, s = data.draw(trees(channels, size))
    head = (
        [L.GlobalAvgPool2D(), L.Dense(c, 3, dtype=np.float64, rng=1)]
        if data.draw(st.booleans())
        else [L.Flatten(), L.Dense(c * s * s, 3, dtype=np.float64, rng=1), L.ReLU()]
    )
    model = Sequential(body, *head).train(training)
    x = np.random.default_rng(data.draw(st.integers(0, 99))).standard_normal(
        (data.draw(st.integers(2, 3)), channels, size, size)
    )
    assert_fused_equals_unfused(model, x, input_grad=input_grad)


@pytest.mark.parametrize("as_list", [False, True])
def test_a_fused_steps_gradient_errors_read_as_the_layers_own(as_list):
    """Conv2D -> BatchNorm2D -> ReLU in training (the fused BatchNorm-ReLU step checks the
    ReLU's gradient): a float64 gradient for a float32 network, as an array or as a list (the
    fuzz suite's case), raises the ReLU's own TypeError, word for word."""
    x = np.array([[[[np.nan, -0.13210486]]]], dtype=np.float32)
    dy = np.array([[[[np.nan, -0.13210485875606537]]]])
    dy = dy.tolist() if as_list else dy
    model = fastcnn.Sequential(
        [fastcnn.Conv2D(1, 1, 1), fastcnn.BatchNorm2D(1), fastcnn.ReLU()]
    ).train()
    model(x)
    relu = fastcnn.ReLU().train()
    relu.forward(np.zeros((1, 1, 1, 2), np.float32))
    with pytest.raises(TypeError) as alone:
        relu.backward(dy)
    with pytest.raises(TypeError) as fused:
        model.backward(dy)
    assert str(fused.value) == str(alone.value)
    assert "does not match the dtype of the forward output float32" in str(alone.value)
