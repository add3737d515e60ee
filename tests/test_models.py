"""fastcnn.models' VGG-style CIFAR net and all-conv net: their layer lists, parameter counts
(computed by hand here), output shapes, summaries, and forward/backward against PyTorch."""

import numpy as np
import pytest

import fastcnn
from fastcnn import layers as L
from fastcnn.models import BUILDERS, INPUT_SHAPES, allconv, vgg_cifar
from gradcheck import relative_error

F64 = np.float64


def _conv_bn_params(c_in, c_out, k=3):
    """A bias-free k x k convolution and its BatchNorm (gamma, beta)."""
    return c_in * c_out * k * k + 2 * c_out


def _dense_params(n_in, n_out):
    return n_in * n_out + n_out


VGG_PARAMS = (
    _conv_bn_params(3, 32)
    + _conv_bn_params(32, 32)
    + _conv_bn_params(32, 64)
    + _conv_bn_params(64, 64)
    + _conv_bn_params(64, 128)
    + _dense_params(128 * 4 * 4, 256)
    + _dense_params(256, 10)
)
ALLCONV_PARAMS = (
    _conv_bn_params(3, 16)
    + _conv_bn_params(16, 32)
    + _conv_bn_params(32, 64)
    + _dense_params(64, 10)
)


def _describe(model):
    """Each leaf as (class, the settings that define the architecture)."""
    out = []
    for m in model:
        if isinstance(m, L.Conv2D):
            out.append(
                (
                    "Conv2D",
                    m.in_channels,
                    m.out_channels,
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    m.bias is not None,
                )
            )
        elif isinstance(m, L.Dense):
            out.append(("Dense", m.in_features, m.out_features))
        elif isinstance(m, (L.MaxPool2D, L.AvgPool2D)):
            out.append((type(m).__name__, m.kernel_size, m.stride))
        else:
            out.append(type(m).__name__)
    return out


def test_vgg_layer_list():
    conv = [
        ("Conv2D", a, b, (3, 3), (1, 1), (1, 1), False)
        for a, b in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 128))
    ]
    pool = ("MaxPool2D", (2, 2), (2, 2))
    cbr = lambda i: [conv[i], "BatchNorm2D", "ReLU"]  # noqa: E731
    assert _describe(vgg_cifar()) == (
        cbr(0)
        + cbr(1)
        + [pool]
        + cbr(2)
        + cbr(3)
        + [pool]
        + cbr(4)
        + [pool]
        + ["Flatten", ("Dense", 2048, 256), "ReLU", ("Dense", 256, 10)]
    )


def test_allconv_layer_list():
    assert _describe(allconv()) == [
        ("Conv2D", 3, 16, (3, 3), (1, 1), (1, 1), False),
        "BatchNorm2D",
        "ReLU",
        ("Conv2D", 16, 32, (3, 3), (2, 2), (1, 1), False),
        "BatchNorm2D",
        "ReLU",
        ("Conv2D", 32, 64, (3, 3), (2, 2), (1, 1), False),
        "BatchNorm2D",
        "ReLU",
        ("AvgPool2D", (8, 8), (8, 8)),
        "Flatten",
        ("Dense", 64, 10),
    ]


@pytest.mark.parametrize("name, params", [("vgg", VGG_PARAMS), ("allconv", ALLCONV_PARAMS)])
def test_parameters_shapes_and_summary(name, params):
    assert INPUT_SHAPES[name] == (3, 32, 32)
    model = BUILDERS[name](3, 10, 0)
    assert model.num_parameters() == params
    assert model(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    text = model.summary((1, 3, 32, 32), print_fn=None)
    assert f"Total params: {params:,}" in text and text.endswith("Output shape: (1, 10)")
    rows = []
    model.trace_shapes((1, 3, 32, 32), lambda n, m, s: rows.append({"module": m}) or rows[-1])
    flat = [r["output_shape"] for r in rows if isinstance(r["module"], L.Flatten)]
    assert flat == [(1, 2048 if name == "vgg" else 64)]
    # other channel and class counts; the same seed gives the same weights
    assert BUILDERS[name](1, 7, 0)(np.zeros((1, 1, 32, 32), np.float32)).shape == (1, 7)
    a, b = BUILDERS[name](3, 10, 5), BUILDERS[name](3, 10, 5)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data)
    # an input of the wrong size names the layer that does not fit
    error = (
        "^Dense: expected input of shape \\(N, 2048\\)"
        if name == "vgg"
        else "^AvgPool2D: kernel 8 is larger than the padded input"
    )
    with pytest.raises(ValueError, match=error):
        model.summary((1, 3, 28, 28), print_fn=None)


def test_vgg_spatial_sizes():
    """32x32 -> 16 -> 8 -> 4 after the three pools; 128 x 4 x 4 = 2048 features, in NCHW order."""
    model = vgg_cifar()
    shapes = {}
    model.trace_shapes((1, 3, 32, 32), lambda n, m, s: shapes.setdefault(n, {}))
    pools = [n for n, m in model.named_modules() if isinstance(m, L.MaxPool2D)]
    assert [shapes[n]["output_shape"] for n in pools] == [
        (1, 32, 16, 16),
        (1, 64, 8, 8),
        (1, 128, 4, 4),
    ]


def test_allconv_spatial_sizes():
    model = allconv()
    shapes = {}
    model.trace_shapes((1, 3, 32, 32), lambda n, m, s: shapes.setdefault(n, {}))
    convs = [n for n, m in model.named_modules() if isinstance(m, L.Conv2D)]
    assert [shapes[n]["output_shape"] for n in convs] == [
        (1, 16, 32, 32),
        (1, 32, 16, 16),
        (1, 64, 8, 8),
    ]


def _randomise(model, rng):
    """Random weights and running statistics (BatchNorm's start at 1 and 0: too special)."""
    for _, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    for name, b in model.named_buffers():
        b[...] = (
            rng.uniform(0.5, 1.5, b.shape) if name.endswith("var") else rng.standard_normal(b.shape)
        )


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("build", [vgg_cifar, allconv], ids=["vgg", "allconv"])
def test_matches_pytorch(build, mode):
    """float64, relative error <= 1e-10 for the logits, the input gradient and every parameter
    gradient (under the same dotted names), fusion on and off, and the same BatchNorm running
    statistics after a training-mode forward."""
    torch = pytest.importorskip("torch")
    from torch_twin import twin

    rng = np.random.default_rng(7)
    model = build(3, 10, seed=1, dtype=F64).train(mode == "train")
    _randomise(model, rng)
    x = rng.standard_normal((3, 3, 32, 32))
    dy = rng.standard_normal((3, 10))
    net = twin(model, torch)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in model.named_parameters()]
    xt = torch.tensor(x, requires_grad=True)
    yt = net(xt)
    yt.backward(torch.tensor(dy))
    torch_buffers = {n: b.numpy() for n, b in net.named_buffers() if "num_batches" not in n}
    for fuse in (True, False):
        with fastcnn.fusion(fuse):
            state = model.state_dict()
            model.zero_grad()
            y = model(x)
            dx = model.backward(dy, input_grad=True)
            buffers = {n: b.copy() for n, b in model.named_buffers()}
            model.load_state_dict(state)  # the running statistics as before, for the next pass
        assert y.dtype == F64 and relative_error(y, yt.detach().numpy()) <= 1e-10
        assert relative_error(dx, xt.grad.numpy()) <= 1e-10
        for (name, p), (_, q) in zip(model.named_parameters(), net.named_parameters(), strict=True):
            assert np.abs(q.grad.numpy()).max() > 0, name
            assert relative_error(p.grad, q.grad.numpy()) <= 1e-10, name
        assert sorted(buffers) == sorted(torch_buffers)
        for name, b in buffers.items():
            assert relative_error(b, torch_buffers[name]) <= 1e-12, name


def test_benchmark_runs_every_network():
    """bench/bench_end_to_end.py --network takes every BUILDERS name, on its INPUT_SHAPES input
    (the benchmark keeps its own copy: its parent process does not import fastcnn)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_end_to_end as bench

    assert bench.NETWORKS == INPUT_SHAPES and sorted(INPUT_SHAPES) == sorted(BUILDERS)
    for name in BUILDERS:
        assert bench.parse_args(["--network", name]).network == name
    with pytest.raises(SystemExit):  # MNIST images do not fit the CIFAR-shaped nets
        bench.parse_args(["--network", "vgg", "--data", "mnist"])
    assert bench.parse_args(["--network", "lenet5", "--data", "mnist"]).data == "mnist"
