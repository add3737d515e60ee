"""fastcnn.manual_seed seeds the layers made afterwards (as torch.manual_seed), and PyTorch's
spellings of the layer names are the same classes."""

import numpy as np
import pytest

import fastcnn
from fastcnn import checkpoint, seeding


@pytest.fixture(autouse=True)
def no_global_seed(monkeypatch):
    monkeypatch.setitem(seeding._GLOBAL, "generator", None)


def build():
    return fastcnn.Sequential(
        fastcnn.Conv2D(1, 4, 3), fastcnn.ReLU(), fastcnn.Flatten(), fastcnn.Dense(16, 3)
    )


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_manual_seed_makes_unseeded_layers_reproducible():
    assert not same(build(), build())  # fresh entropy without a global seed
    fastcnn.manual_seed(7)
    a, b = build(), build()
    assert not same(a, b)  # one generator, drawn in the order the layers are made
    fastcnn.manual_seed(7)
    assert same(build(), a) and same(build(), b)
    fastcnn.manual_seed(8)
    assert not same(build(), a)


def test_the_sequence_is_one_generator_drawn_in_order():
    fastcnn.manual_seed(3)
    conv = fastcnn.Conv2D(1, 2, 3)
    rng = np.random.default_rng(3)
    assert np.array_equal(conv.weight.data, fastcnn.Conv2D(1, 2, 3, rng=rng).weight.data)


def test_explicit_seeds_win_and_builders_follow_the_global_seed_with_seed_none():
    fastcnn.manual_seed(1)
    explicit = fastcnn.Dense(4, 2, rng=5)
    assert np.array_equal(explicit.weight.data, fastcnn.Dense(4, 2, rng=5).weight.data)
    assert same(fastcnn.models.reference(seed=0), fastcnn.models.reference(seed=0))
    fastcnn.manual_seed(2)
    a = fastcnn.models.lenet5(seed=None)
    fastcnn.manual_seed(2)
    assert same(fastcnn.models.lenet5(seed=None), a)


def test_dropout_masks_follow_the_global_seed():
    x = np.ones((4, 50), np.float32)

    def masks():
        fastcnn.manual_seed(4)
        d = fastcnn.Dropout(0.5)
        return d(x), d(x)

    (a1, a2), (b1, b2) = masks(), masks()
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2) and not np.array_equal(a1, a2)


def test_loading_a_checkpoint_does_not_advance_the_global_generator(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, fastcnn.models.reference(seed=0))
    fastcnn.manual_seed(5)
    expected = build()
    fastcnn.manual_seed(5)
    checkpoint.load(path)
    assert same(build(), expected)


def test_manual_seed_checks_its_argument():
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="manual_seed: expected an integer >= 0"):
            fastcnn.manual_seed(bad)
    assert isinstance(fastcnn.manual_seed(0), np.random.Generator)


def test_pytorch_spellings_are_the_same_classes_and_save_canonical_names():
    pairs = {
        "Conv2d": "Conv2D",
        "Linear": "Dense",
        "BatchNorm2d": "BatchNorm2D",
        "BatchNorm1d": "BatchNorm1D",
        "MaxPool2d": "MaxPool2D",
        "AvgPool2d": "AvgPool2D",
    }
    for alias, name in pairs.items():
        assert getattr(fastcnn, alias) is getattr(fastcnn, name)
    model = fastcnn.Sequential(
        fastcnn.Conv2d(1, 2, 3, rng=0),
        fastcnn.BatchNorm2d(2),
        fastcnn.MaxPool2d(2),
        fastcnn.Flatten(),
        fastcnn.Linear(18, 3, rng=0),
    )
    classes = [c["class"] for c in model.get_config()["layers"]]
    assert classes == ["Conv2D", "BatchNorm2D", "MaxPool2D", "Flatten", "Dense"]
