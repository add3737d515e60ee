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
    callbacks,
    checkpoint,
    datasets,
    distributed,
    functional,
    losses,
    metrics,
    models,
    optim,
    plan,
    plots,
    threads,
    training,
)
from . import data as data  # noqa: E402
from . import transforms as transforms  # noqa: E402
from .callbacks import (  # noqa: E402
    Callback,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    ReduceLROnPlateau,
)
from .clip import clip_grad_norm_  # noqa: E402
from .compile_ahead import warmup  # noqa: E402
from .containers import Concat, Residual, Sequential  # noqa: E402
from .data import ArrayDataset, DataLoader  # noqa: E402
from .layers import (  # noqa: E402
    AvgPool2D,
    AvgPool2d,
    BatchNorm1D,
    BatchNorm1d,
    BatchNorm2D,
    BatchNorm2d,
    Conv2D,
    Conv2d,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool2D,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Softmax,
    Tanh,
)
from .losses import CrossEntropyLoss, MSELoss  # noqa: E402
from .metrics import evaluate_metrics  # noqa: E402
from .model import from_config  # noqa: E402
from .module import Module, Parameter, module_from_config, register_module  # noqa: E402
from .optim import SGD, Adam, AdamW, CosineAnnealingLR, LinearWarmup, OneCycleLR, StepLR  # noqa: E402
from .plan import fusion, set_fusion  # noqa: E402
from .seeding import manual_seed  # noqa: E402
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
    "Conv2d",
    "Linear",
    "BatchNorm2d",
    "BatchNorm1d",
    "MaxPool2d",
    "AvgPool2d",
    "CrossEntropyLoss",
    "MSELoss",
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "OneCycleLR",
    "StepLR",
    "LinearWarmup",
    "Callback",
    "CSVLogger",
    "EarlyStopping",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "clip_grad_norm_",
    "evaluate_metrics",
    "manual_seed",
    "warmup",
    "History",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "set_num_threads",
    "callbacks",
    "checkpoint",
    "data",
    "transforms",
    "ArrayDataset",
    "DataLoader",
    "datasets",
    "distributed",
    "functional",
    "losses",
    "metrics",
    "models",
    "optim",
    "plan",
    "plots",
    "threads",
    "training",
]
