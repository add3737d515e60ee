"""Error messages name the caller's shapes, not a layer's internal views (issue 14, item 8)."""

import numpy as np
import pytest

from fastcnn.layers import BatchNorm1D, BatchNorm2D


@pytest.mark.parametrize(
    "layer, shape",
    [
        (BatchNorm1D(4), (1, 4)),
        (BatchNorm1D(4), (1, 4, 1)),
        (BatchNorm1D(4), (0, 4)),
        (BatchNorm2D(4), (1, 4, 1, 1)),
    ],
)
def test_batchnorm_with_one_value_per_channel_names_the_input_shape(layer, shape):
    """BatchNorm1D works on a 4-d view of its input; its message showed that view, (1, 4, 1, 1)."""
    written = "(" + ", ".join(map(str, shape)) + ")"
    with pytest.raises(ValueError, match=r"more than 1 value per channel") as info:
        layer(np.zeros(shape, np.float32))
    assert str(info.value).endswith(f"got input of shape {written}"), str(info.value)


def test_batchnorm1d_with_two_values_per_channel_trains():
    assert BatchNorm1D(4)(np.random.default_rng(0).random((2, 4), dtype=np.float32)).shape == (2, 4)
