"""Editing the input batch or the returned logits in place between forward and backward (issue 14,
item 5): the model's gradients are those of the forward that ran.

Prevention, not detection (numpy arrays carry no version counter): ``Module.__call__`` in
training mode runs the forward on a copy of its array input and returns a copy of its output,
so a refilled batch buffer or ``logits *= t`` cannot reach what the backward reads.
"""

import numpy as np
import pytest

from fastcnn import models
from fastcnn.layers import Dense, Sigmoid
from fastcnn.model import Sequential


def gradients(model, x, edit=None):
    out = model(x)
    dy = np.full_like(out, 1.0 / out.size)
    if edit is not None:
        edit(x, out)
    model.backward(dy)
    return [p.grad.copy() for p in model.parameters()]


def refill(x, out):
    x[...] = 0.5  # the next batch written early into the reused buffer


def scale_logits(x, out):
    out *= 3.0


CASES = {
    "reference network, input refilled": (lambda: models.reference(seed=0), (8, 1, 28, 28), refill),
    # a 3-channel NCHW batch: the call's copy is channels-last memory, what the layers keep
    "all-conv net (RGB), input refilled": (
        lambda: models.allconv(3, 10, seed=0),
        (4, 3, 32, 32),
        refill,
    ),
    "dense-sigmoid, input refilled": (
        lambda: Sequential([Dense(6, 5, rng=np.random.default_rng(0)), Sigmoid()]),
        (8, 6),
        refill,
    ),
    "dense-sigmoid, outputs scaled": (
        lambda: Sequential([Dense(6, 5, rng=np.random.default_rng(0)), Sigmoid()]),
        (8, 6),
        scale_logits,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_place_edits_after_forward_do_not_change_the_gradients(case):
    make, shape, edit = CASES[case]
    x = np.random.default_rng(1).random(shape, dtype=np.float32) - 0.3
    expected = gradients(make(), x.copy())
    got = gradients(make(), x.copy(), edit)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_edits_the_gradients_are_reproducible(case):
    """The comparison above is meaningful: two unedited runs agree bitwise."""
    make, shape, _ = CASES[case]
    x = np.random.default_rng(1).random(shape, dtype=np.float32) - 0.3
    for e, g in zip(gradients(make(), x.copy()), gradients(make(), x.copy()), strict=True):
        np.testing.assert_array_equal(g, e)
