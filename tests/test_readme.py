"""The README's Python examples run as written (on a slice of the data set, so that they take
seconds): the front door stays true."""

import re

import numpy as np
import pytest

import fastcnn
from conftest import data_dir

README = __file__.rsplit("/tests/", 1)[0] + "/README.md"


def python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.skipif(data_dir() is None, reason="the data sets are not available (FASTCNN_DATA)")
def test_resnet_example_runs(monkeypatch):
    block = next(b for b in python_blocks() if "Residual(" in b)
    assert len([line for line in block.splitlines() if line.strip()]) < 15  # "under 15 lines"
    real = fastcnn.datasets.fashion_mnist

    def small(*args, **kwargs):
        (x, y), (xt, yt) = real(root=data_dir(), download=False)
        return (x[:256], y[:256]), (xt[:64], yt[:64])

    monkeypatch.setattr(fastcnn.datasets, "fashion_mnist", small)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    model = scope["model"]
    assert model.num_parameters() == fastcnn.models.resnet(8).num_parameters()
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in fastcnn.models.resnet(8).named_parameters()
    ]
    assert np.isfinite(model.predict(scope["x_test"])).all()


@pytest.mark.skipif(data_dir() is None, reason="the data sets are not available (FASTCNN_DATA)")
def test_first_example_runs(monkeypatch, tmp_path):
    block = python_blocks()[0]
    assert "fastcnn.fit(" in block and "checkpoint.load(" in block
    assert len([line for line in block.splitlines() if line.strip()]) <= 12  # "about 10 lines"
    real = fastcnn.datasets.mnist

    def small(*args, **kwargs):
        (x, y), (xt, yt) = real(root=data_dir(), download=False)
        return (x[:256], y[:256]), (xt[:64], yt[:64])

    monkeypatch.setattr(fastcnn.datasets, "mnist", small)
    monkeypatch.chdir(tmp_path)  # the example writes run.safetensors
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert len(scope["history"]) == 3 and scope["history"].val_accuracy[-1] is not None
    np.testing.assert_array_equal(
        scope["restored"].predict(scope["x_test"]), scope["model"].predict(scope["x_test"])
    )


def test_docs_layer_example_runs(monkeypatch, tmp_path):
    """docs/modules.md's own layer: trains in a container and round-trips through a checkpoint."""
    from fastcnn import module

    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))  # a name of its own
    module._REGISTRY.pop("Scale", None)
    with open(README.replace("README.md", "docs/modules.md")) as f:
        block = next(
            b
            for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
            if "class Scale" in b
        )
    scope = {}
    exec(compile(block, "docs/modules.md", "exec"), scope)
    rng = np.random.default_rng(0)
    model = fastcnn.Sequential(
        fastcnn.Conv2D(1, 3, 3, rng=1),
        scope["Scale"](3),
        fastcnn.ReLU(),
        fastcnn.GlobalAvgPool2D(),
        fastcnn.Dense(3, 2, rng=2),
    )
    x, y = rng.random((16, 1, 6, 6), dtype=np.float32), rng.integers(0, 2, 16)
    opt = fastcnn.SGD(model.parameters(), lr=0.1)
    fastcnn.fit(
        model, fastcnn.CrossEntropyLoss(), opt, x, y, epochs=2, batch_size=8, progress=False
    )
    assert model[1].gain.grad.any() and not np.array_equal(model[1].gain.data, np.ones(3))
    fastcnn.checkpoint.save(tmp_path / "s.safetensors", model)
    loaded = fastcnn.checkpoint.load(tmp_path / "s.safetensors").model
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_own_images_example_runs(monkeypatch, tmp_path):
    """The README's own-images example, on a photos/ folder of 2 classes written here."""
    image = pytest.importorskip("PIL.Image")
    block = next(b for b in python_blocks() if "image_folder(" in b)
    assert len([line for line in block.splitlines() if line.strip()]) <= 8  # "a few lines"
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)  # sizes differ
            image.fromarray(pixels, "RGB").save(tmp_path / "photos" / name / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["photos"].classes == ["cats", "dogs"] and scope["photos"].x.shape == (8, 3, 32, 32)
    assert scope["loader"].epoch == 10  # trained its 10 epochs
    fresh = fastcnn.models.resnet(8, in_channels=3, num_classes=2)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            scope["model"].state_dict().values(), fresh.state_dict().values(), strict=True
        )
    )
