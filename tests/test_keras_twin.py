"""The Keras twin of every suite network (tests/keras_twin.py, the end-to-end benchmark's
TensorFlow peer): its output shape and trainable parameter count equal fastcnn's (the same
network), and with the weights copied it computes fastcnn's outputs in eval mode. Skipped
without TensorFlow (optional, never a dependency)."""

import os

import numpy as np
import pytest

from fastcnn.models import BUILDERS, INPUT_SHAPES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
pytest.importorskip("tensorflow")

from keras_twin import trainable_count, twin  # noqa: E402


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keras_twin_matches_fastcnn(name):
    shape = INPUT_SHAPES[name]
    model = BUILDERS[name](shape[0], 10, 0)
    model.eval()
    net = twin(model, keras, shape)
    assert trainable_count(net) == sum(p.data.size for p in model.parameters())
    x = np.random.default_rng(0).standard_normal((3, *shape), dtype=np.float32)
    expected = model(x)
    got = np.asarray(net(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), training=False))
    assert got.shape == expected.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride, kernel, size", [(2, 3, (7, 8)), (2, 2, (6, 5)), (3, 4, (10, 9))])
def test_same_padding_at_any_stride_is_keras(stride, kernel, size):
    """fastcnn's padding='same' at stride > 1 pads as Keras's (its odd row and column at the
    bottom and right): the same output for the same weights."""
    import fastcnn

    model = fastcnn.Sequential(
        [fastcnn.Conv2D(3, 4, kernel, stride=stride, padding="same", rng=np.random.default_rng(1))]
    )
    net = twin(model, keras, (3, *size))
    x = np.random.default_rng(2).standard_normal((2, 3, *size), dtype=np.float32)
    expected = model(x)
    got = np.asarray(net(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), training=False))
    assert expected.shape[2:] == tuple(-(-s // stride) for s in size)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)
