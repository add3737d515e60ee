import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first call: no per-example deadline. Example counts are kept small enough
# for the naive loops to finish the whole suite in minutes on 2 cores; raise them locally with
# HYPOTHESIS_PROFILE=thorough.
settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def data_dir():
    """The folder holding mnist/ and fashion-mnist/, or None when the data sets are absent."""
    root = os.environ.get("FASTCNN_DATA")
    if root and os.path.isdir(os.path.join(root, "mnist")):
        return root
    here = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
    return here if os.path.isdir(os.path.join(here, "mnist")) else None


KERNEL_MODULES = ("conv2d", "pool2d", "activations", "batchnorm")


@pytest.fixture
def no_kernels(monkeypatch):
    """Replace every kernel with a function that fails the test if it is ever called."""
    for name in KERNEL_MODULES:
        module = importlib.import_module("fastcnn.kernels." + name)
        for attr in dir(module):
            fn = getattr(module, attr)
            if callable(fn) and hasattr(fn, "py_func"):

                def reached(*args, _name=f"{name}.{attr}", **kwargs):
                    raise AssertionError(f"kernel {_name} reached despite invalid arguments")

                monkeypatch.setattr(module, attr, reached)
