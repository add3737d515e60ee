"""The README's Python examples run as written (on a slice of the data set, so that they take
seconds): the front door stays true."""
import re

import numpy as np
import pytest
from conftest import data_dir

import fastcnn

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
        n for n, _ in fastcnn.models.resnet(8).named_parameters()]
    assert np.isfinite(model.predict(scope["x_test"])).all()
