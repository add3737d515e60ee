"""Ready-made networks: the reference MNIST network, LeNet-5, the CIFAR-style ResNets, a
VGG-style CIFAR net and an all-convolutional net.

Each takes ``seed`` (one generator initialises the layers in construction order, PyTorch's
default initialisation; ``seed=None``: the global generator of ``fastcnn.manual_seed``, else
fresh entropy) and ``dtype``. ``BUILDERS`` maps a name (those ``fastcnn train --model``
accepts, and the benchmark's networks) to a function of ``(in_channels, num_classes, seed)``;
``INPUT_SHAPES`` gives the (C, H, W) input each of them is built for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import DTypeLike

from ._checks import is_int
from .containers import Residual, Sequential
from .layers import (
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Tanh,
)
from .seeding import default_rng

__all__ = ["reference", "lenet5", "resnet", "vgg_cifar", "allconv", "BUILDERS", "INPUT_SHAPES"]


def reference(seed: int | None = 0, dtype: DTypeLike = np.float32) -> Sequential:
    """The reference MNIST network (225,034 parameters), for (N, 1, 28, 28) inputs:
    Conv2D(1,32,3) ReLU MaxPool2D(2) Conv2D(32,64,3) ReLU MaxPool2D(2) Flatten Dense(1600,128)
    ReLU Dense(128,10). One generator seeded with ``seed`` initialises the layers in order."""
    rng = default_rng(seed)
    return Sequential(
        [
            Conv2D(1, 32, 3, dtype=dtype, rng=rng),
            ReLU(),
            MaxPool2D(2),
            Conv2D(32, 64, 3, dtype=dtype, rng=rng),
            ReLU(),
            MaxPool2D(2),
            Flatten(),
            Dense(1600, 128, dtype=dtype, rng=rng),
            ReLU(),
            Dense(128, 10, dtype=dtype, rng=rng),
        ]
    )


def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    seed: int | None = 0,
    dtype: DTypeLike = np.float32,
) -> Sequential:
    """LeNet-5 (LeCun et al., 1998) for (N, C, 28, 28) inputs (61,706 parameters for MNIST):
    Conv2D(C,6,5,padding=2) Tanh AvgPool2D(2) Conv2D(6,16,5) Tanh AvgPool2D(2) Flatten
    Dense(400,120) Tanh Dense(120,84) Tanh Dense(84,num_classes). The padding of 2 makes a
    28x28 image the 32x32 of the paper."""
    rng = default_rng(seed)
    return Sequential(
        [
            Conv2D(in_channels, 6, 5, padding=2, dtype=dtype, rng=rng),
            Tanh(),
            AvgPool2D(2),
            Conv2D(6, 16, 5, dtype=dtype, rng=rng),
            Tanh(),
            AvgPool2D(2),
            Flatten(),
            Dense(16 * 5 * 5, 120, dtype=dtype, rng=rng),
            Tanh(),
            Dense(120, 84, dtype=dtype, rng=rng),
            Tanh(),
            Dense(84, num_classes, dtype=dtype, rng=rng),
        ]
    )


def _conv_bn(c_in, c_out, kernel, stride, dtype, rng):
    """A convolution without bias (the BatchNorm after it has one) and its BatchNorm."""
    return [
        Conv2D(
            c_in,
            c_out,
            kernel,
            stride=stride,
            padding=kernel // 2,
            bias=False,
            dtype=dtype,
            rng=rng,
        ),
        BatchNorm2D(c_out, dtype=dtype),
    ]


def _basic_block(c_in, c_out, stride, dtype, rng):
    """conv-BN-ReLU-conv-BN, plus the input (a 1x1 convolution with stride + BN where the shape
    changes), then ReLU: returned as the two modules [Residual, ReLU]."""
    body = Sequential(
        _conv_bn(c_in, c_out, 3, stride, dtype, rng)
        + [ReLU()]
        + _conv_bn(c_out, c_out, 3, 1, dtype, rng)
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential(_conv_bn(c_in, c_out, 1, stride, dtype, rng))
    return [Residual(body, shortcut), ReLU()]


def resnet(
    depth: int = 20,
    in_channels: int = 1,
    num_classes: int = 10,
    seed: int | None = 0,
    dtype: DTypeLike = np.float32,
) -> Sequential:
    """The CIFAR-style ResNet of He et al. (2016), depth 6n+2 (8, 14, 20, 32, 44, 56, 110):
    a 3x3 convolution with 16 filters, BatchNorm and ReLU; three stages of n basic blocks at
    16, 32 and 64 channels, the first block of stages 2 and 3 with stride 2 and a projection
    shortcut (1x1 convolution with stride 2 and BatchNorm); global average pooling; Dense(64,
    num_classes). Convolutions followed by BatchNorm have no bias. One flat Sequential:
    [conv, bn, relu, Residual, ReLU, Residual, ReLU, ..., GlobalAvgPool2D, Dense], so the
    first block's body is ``model[3].body`` and its first weight "3.body.0.weight"."""
    if not is_int(depth, 8) or (depth - 2) % 6:
        raise ValueError(f"resnet: expected a depth 6n+2 >= 8 (8, 14, 20, 32, ...), got {depth!r}")
    n = (depth - 2) // 6
    rng = default_rng(seed)
    modules = _conv_bn(in_channels, 16, 3, 1, dtype, rng) + [ReLU()]
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            modules += _basic_block(c_in, width, stride, dtype, rng)
            c_in = width
    modules += [GlobalAvgPool2D(), Dense(64, num_classes, dtype=dtype, rng=rng)]
    return Sequential(modules)


def vgg_cifar(
    in_channels: int = 3,
    num_classes: int = 10,
    seed: int | None = 0,
    dtype: DTypeLike = np.float32,
) -> Sequential:
    """A VGG-style net for (N, C, 32, 32) inputs (666,858 parameters for CIFAR-10): five
    Conv2D(3x3, padding 1)-BatchNorm2D-ReLU at 32, 32, 64, 64 and 128 channels with a
    MaxPool2D(2) after the 2nd, 4th and 5th (32x32 -> 16x16 -> 8x8 -> 4x4), Flatten,
    Dense(2048,256) ReLU Dense(256,num_classes). The Flatten takes the (128, 4, 4) feature maps in
    NCHW order (feature c*16 + h*4 + w, as PyTorch's flatten), hence 128*4*4 = 2048 inputs.
    Convolutions have no bias (the BatchNorm after each has one)."""
    rng = default_rng(seed)
    modules, c_in = [], in_channels
    for width, pool in ((32, False), (32, True), (64, False), (64, True), (128, True)):
        modules += _conv_bn(c_in, width, 3, 1, dtype, rng) + [ReLU()]
        if pool:
            modules.append(MaxPool2D(2))
        c_in = width
    modules += [
        Flatten(),
        Dense(128 * 4 * 4, 256, dtype=dtype, rng=rng),
        ReLU(),
        Dense(256, num_classes, dtype=dtype, rng=rng),
    ]
    return Sequential(modules)


def allconv(
    in_channels: int = 3,
    num_classes: int = 10,
    seed: int | None = 0,
    dtype: DTypeLike = np.float32,
) -> Sequential:
    """An all-convolutional net for (N, C, 32, 32) inputs (24,346 parameters for CIFAR-10):
    Conv2D(C,16,3,padding 1)-BatchNorm2D-ReLU at 32x32, Conv2D(16,32,3,stride 2,padding 1)-BN-ReLU
    (-> 16x16), Conv2D(32,64,3,stride 2,padding 1)-BN-ReLU (-> 8x8), AvgPool2D(8) (-> 64x1x1),
    Flatten, Dense(64,num_classes). Convolutions have no bias (the BatchNorm after each has one)."""
    rng = default_rng(seed)
    modules = []
    for c_in, c_out, stride in ((in_channels, 16, 1), (16, 32, 2), (32, 64, 2)):
        modules += _conv_bn(c_in, c_out, 3, stride, dtype, rng) + [ReLU()]
    modules += [AvgPool2D(8), Flatten(), Dense(64, num_classes, dtype=dtype, rng=rng)]
    return Sequential(modules)


#: name -> builder(in_channels, num_classes, seed)
BUILDERS: dict[str, Callable[[int, int, int | None], Sequential]] = {
    "reference": lambda in_channels, num_classes, seed: reference(seed=seed),
    "lenet5": lambda in_channels, num_classes, seed: lenet5(in_channels, num_classes, seed),
    "resnet8": lambda in_channels, num_classes, seed: resnet(8, in_channels, num_classes, seed),
    "resnet20": lambda in_channels, num_classes, seed: resnet(20, in_channels, num_classes, seed),
    "vgg": lambda in_channels, num_classes, seed: vgg_cifar(in_channels, num_classes, seed),
    "allconv": lambda in_channels, num_classes, seed: allconv(in_channels, num_classes, seed),
}

# The (C, H, W) input each network of BUILDERS is built for: the Dense layers of the reference
# network, LeNet-5 and the VGG-style net fix H and W; the ResNets pool globally (any size fits).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "reference": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "resnet8": (1, 28, 28),
    "resnet20": (1, 28, 28),
    "vgg": (3, 32, 32),
    "allconv": (3, 32, 32),
}
