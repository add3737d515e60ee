"""fastcnn: train convolutional networks fast on the CPU, with Numba kernels under a PyTorch-like
API.

    import fastcnn
    model = fastcnn.models.reference()
    (x, y), (x_test, y_test) = fastcnn.datasets.mnist()
    opt = fastcnn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = fastcnn.fit(model, fastcnn.CrossEntropyLoss(), opt, x, y, epochs=3)
"""

from __future__ import annotations

import os as _os

from . import _kernels_path

_kernels_path.register(_os.path.dirname(_os.path.abspath(__file__)))

from . import (  # noqa: E402
    checkpoint,
    datasets,
    distributed,
    functional,
    losses,
    models,
    optim,
    plan,
    threads,
    training,
)
from .containers import Concat, Residual, Sequential  # noqa: E402
from .layers import (  # noqa: E402
    AvgPool2D,
    BatchNorm1D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
)
from .losses import CrossEntropyLoss, MSELoss  # noqa: E402
from .model import from_config  # noqa: E402
from .module import Module, Parameter, module_from_config, register_module  # noqa: E402
from .optim import SGD, Adam, AdamW, CosineAnnealingLR, OneCycleLR, StepLR  # noqa: E402
from .plan import fusion, set_fusion  # noqa: E402
from .threads import set_num_threads  # noqa: E402
from .training import History, TrainingDiverged, evaluate, fit  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Module",
    "Parameter",
    "register_module",
    "module_from_config",
    "from_config",
    "Sequential",
    "Residual",
    "Concat",
    "fusion",
    "set_fusion",
    "AvgPool2D",
    "BatchNorm1D",
    "BatchNorm2D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2D",
    "Layer",
    "LeakyReLU",
    "MaxPool2D",
    "ReLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "CrossEntropyLoss",
    "MSELoss",
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "OneCycleLR",
    "StepLR",
    "History",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "set_num_threads",
    "checkpoint",
    "datasets",
    "distributed",
    "functional",
    "losses",
    "models",
    "optim",
    "plan",
    "threads",
    "training",
]
