"""Activations stay channels-last through a training step: no layout conversion anywhere.

A convolution returns its output as an (N, C, H, W) view of NHWC memory; every layer after it
(BatchNorm, ReLU, pooling, the residual sum, the next convolution) takes that memory as it is,
forward and backward. A conversion would be a copy made by ``functional._nhwc`` (an input that
is not channels-last) or by the batch norm's NCHW path; this counts both.
"""

import numpy as np
import pytest

import fastcnn
from fastcnn import functional as F


def count_conversions(monkeypatch):
    counts = {"nhwc copies": 0, "batchnorm nchw": 0}
    real_nhwc, real_bn = F._nhwc, F._batchnorm.batchnorm_forward_train

    def nhwc(x):
        if not x.transpose(0, 2, 3, 1).flags.c_contiguous:
            counts["nhwc copies"] += 1
        return real_nhwc(x)

    def bn_nchw(*args):
        counts["batchnorm nchw"] += 1
        return real_bn(*args)

    monkeypatch.setattr(F, "_nhwc", nhwc)
    monkeypatch.setattr(F._batchnorm, "batchnorm_forward_train", bn_nchw)
    return counts


def test_a_resnet_training_step_converts_no_layout(monkeypatch):
    model = fastcnn.models.resnet(8)
    x = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)
    y = np.array([1, 2, 3, 4])
    loss = fastcnn.CrossEntropyLoss()
    counts = count_conversions(monkeypatch)
    for _ in range(2):
        model.zero_grad()
        loss(model(x), y)
        model.backward(loss.backward(), input_grad=False)
    assert counts == {"nhwc copies": 0, "batchnorm nchw": 0}
    # and the count can see one: an NCHW input of 3 channels is converted once
    model = fastcnn.models.resnet(8, in_channels=3)
    model(np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32))
    assert counts["nhwc copies"] == 1


@pytest.mark.parametrize("channels", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("strided", [False, True])
def test_nhwc_copy_is_the_transpose(channels, strided):
    """_nhwc's copy of an NCHW array (channel by channel up to _FEW_CHANNELS, numpy's
    transposing copy above): the transpose's values, C-contiguous, whatever x's strides."""
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((3, 2 * channels, 5, 9)).astype(np.float32)
    x = x[:, ::2, :, 1::2] if strided else x[:, :channels]
    got = F._nhwc(x)
    assert got.flags.c_contiguous and got.shape == (3, 5, x.shape[3], channels)
    assert got.tobytes() == np.ascontiguousarray(x.transpose(0, 2, 3, 1)).tobytes()


def test_an_image_batch_is_converted_once_per_training_step(monkeypatch):
    """An NCHW batch of 3 channels: the model's call copies it channels-last (the copy it makes
    anyway, so that in-place edits cannot reach the backward), and neither the first
    convolution's forward nor its backward converts it again. The gradients are bitwise those
    of the same batch handed over channels-last."""
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = np.array([1, 2, 3, 4])

    def step(batch):
        model = fastcnn.models.allconv(3, 10, seed=0)
        loss = fastcnn.CrossEntropyLoss()
        logits = model(batch)
        loss(logits, y)
        model.backward(loss.backward())
        return [logits] + [p.grad.copy() for p in model.parameters()]

    channels_last = F._nchw(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    expected = step(channels_last)
    counts = count_conversions(monkeypatch)
    got = step(x)
    assert counts == {"nhwc copies": 1, "batchnorm nchw": 0}
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)
    # the caller's array is left as it was, C-ordered
    assert x.flags.c_contiguous


def test_an_image_batch_stays_nchw_where_the_first_module_is_no_convolution():
    """A BatchNorm first: its NCHW and channels-last paths may sum in different orders, so the
    call's copy keeps the caller's layout, and the model's output and gradients are bitwise
    those of its layers called one by one (what the fuzz suite's twin does)."""
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(np.float32)

    def build():
        return fastcnn.Sequential(
            fastcnn.BatchNorm2D(3), fastcnn.ReLU(), fastcnn.Conv2D(3, 4, 3, padding=1)
        )

    model, twin = build(), build()
    twin.load_state_dict(model.state_dict())
    assert not model._reads_channels_last() and twin[2]._reads_channels_last()
    y = model(x)
    dy = np.random.default_rng(4).standard_normal(y.shape).astype(np.float32)
    dx = model.backward(dy, input_grad=True)
    h = x
    for layer in twin.layers:
        h = layer.forward(h)
    g = dy
    for layer in reversed(twin.layers):
        g = layer.backward(g)
    np.testing.assert_array_equal(y, h)
    np.testing.assert_array_equal(dx, g)


def test_a_subclass_keeps_the_callers_layout():
    """A subclass of Conv2D or Sequential may read x itself before the convolution (a mean, a
    sum: numpy reduces in memory order), so the call's copy keeps the caller's layout for it,
    as the planner matches exact types: the model equals its forward on a plain copy, bitwise."""

    class Centered(fastcnn.Sequential):
        def forward(self, x):
            return super().forward(x - x.mean(axis=(0, 2, 3), keepdims=True))

    class Scaled(fastcnn.Conv2D):
        def forward(self, x):
            return super().forward(x / (1 + np.abs(x.sum(axis=(2, 3), keepdims=True))))

    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 3, 31, 29)).astype(np.float32)
    for model in (
        Centered(fastcnn.Conv2D(3, 8, 3, rng=rng), fastcnn.ReLU()),
        fastcnn.Sequential(Scaled(3, 8, 3, rng=rng), fastcnn.ReLU()),
    ):
        assert not model._reads_channels_last()
        np.testing.assert_array_equal(model(x), model.forward(x.copy()))
