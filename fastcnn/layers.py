"""Layers: parameters, the caches backward needs, and each layer's forward and backward side by
side.

A layer's ``forward(x)`` computes its output through ``fastcnn.functional`` (which validates and
calls the kernels) and keeps what its backward needs; ``backward(dy)`` returns the gradient with
respect to the input and ACCUMULATES parameter gradients into ``Parameter.grad`` (call
``zero_grad()`` between steps, as in PyTorch).

Dtypes: parameter-free layers keep the input's floating dtype (float32 or float64). Layers with
parameters are float32 unless built with ``dtype=np.float64``; they cast a floating input of
another dtype to their own (and cast the input gradient back); a non-floating input is a
TypeError.

Initialisation follows PyTorch's defaults: Conv2D and Dense draw weight and bias from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)) from the ``rng`` argument
(a ``np.random.Generator``, or a seed); BatchNorm starts with weight (gamma) 1, bias (beta) 0,
running mean 0 and running variance 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import functional as F
from ._checks import is_int, is_real
from ._types import Array, Config, Padding, Rng, Shape, Size2
from .compile_helper import expect_convolution_gradients, expect_pool_gradient
from .module import Module, Parameter, register_module
from .seeding import default_rng, global_generator

if TYPE_CHECKING:
    pass

__all__ = [
    "Parameter",
    "Layer",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "GlobalAvgPool2D",
    "BatchNorm2D",
    "BatchNorm1D",
    "Dense",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Dropout",
    "Flatten",
    "Softmax",
    "Conv2d",
    "Linear",
    "BatchNorm2d",
    "BatchNorm1d",
    "MaxPool2d",
    "AvgPool2d",
    "cast_input",
    "cast_grad",
    "check_grad",
]

#: Former name of the base class, kept so that ``class MyLayer(fastcnn.Layer)`` still works.
Layer = Module


def _resolve_dtype(dtype, layer):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{layer}: expected dtype float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{layer}: expected dtype float32 or float64, got {dt}")
    return dt


def _positive_int(value, name, layer):
    if not is_int(value):
        raise TypeError(f"{layer}: expected {name} to be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{layer}: expected {name} >= 1, got {value}")
    if value > F.MAX_SIZE:
        raise ValueError(f"{layer}: expected {name} <= {F.MAX_SIZE}, got {value}")
    return int(value)


def _number(value, name, layer, low=None, high=None, low_open=False, high_open=False):
    if not is_real(value):
        raise TypeError(f"{layer}: expected {name} to be a number, got {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{layer}: expected {lo}{name}{hi}, got {value}")
    return value


def _uniform_init(rng, shape, fan_in, dtype):
    """PyTorch's default for Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in float64."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _fmt_pair(p):
    return p[0] if p[0] == p[1] else p


# ---------------------------------------------------------------------------------------------
# the dtype and gradient rules every layer follows (also used by the fused steps of plan.py)
# ---------------------------------------------------------------------------------------------


def cast_input(x: ArrayLike, dtype: DTypeLike, layer: str) -> tuple[Array, np.dtype[Any]]:
    """``(x in dtype, x's own dtype)`` for a layer with parameters of ``dtype``: any floating
    input is cast to it (its gradient goes back in the input's dtype), else TypeError."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        hint = ""
        if x.dtype == np.uint8:
            hint = (
                " (pixels 0..255: divide by 255, x.astype(np.float32) / 255, or pass them to "
                "fit/evaluate/predict or a fastcnn.data.DataLoader, which scale them)"
            )
        raise TypeError(
            f"{layer}: expected a floating-point input (float32 or float64), got dtype "
            f"{x.dtype}{hint}"
        )
    in_dtype = x.dtype.newbyteorder("=")  # gradients come back in native byte order
    return (x if x.dtype == dtype else x.astype(dtype)), in_dtype


def cast_grad(
    dy: ArrayLike, dtype: DTypeLike, layer: str, shape: Sequence[int] | None = None
) -> Array:
    """The upstream gradient of a layer with parameters of ``dtype``: any floating dtype is
    cast to it; with ``shape``, checked to be of that shape."""
    dy = np.asarray(dy)
    if dy.dtype.kind != "f":
        raise TypeError(
            f"{layer}: expected a floating-point gradient (float32 or "
            f"float64), got dtype {dy.dtype}"
        )
    if shape is not None and dy.shape != tuple(shape):
        raise ValueError(
            f"{layer}: expected gradient of shape {F._fmt_shape(shape)}, "
            f"got {F._fmt_shape(dy.shape)}"
        )
    return dy if dy.dtype == dtype else dy.astype(dtype)


def check_grad(dy: Array, shape: Sequence[int], dtype: DTypeLike, layer: str) -> Array:
    """The upstream gradient of a parameter-free layer: a float array of the forward output's
    shape and dtype (float32 or float64), else TypeError/ValueError naming the layer."""
    dy = F.check_float(dy, layer, "gradient", contiguous=False)
    F.check_grad_dtype(dy, dtype, layer)
    if dy.shape != tuple(shape):
        raise ValueError(
            f"{layer}: expected gradient of shape {F._fmt_shape(shape)}, "
            f"got {F._fmt_shape(dy.shape)}"
        )
    return dy


def _as_dtype(dx, dtype):
    return dx if dx is None or dx.dtype == dtype else dx.astype(dtype)


# =============================================================================================
# convolution
# =============================================================================================


@register_module
class Conv2D(Module):
    """2-D convolution (cross-correlation, as PyTorch's nn.Conv2d): (N, C, H, W) -> (N, F, OH, OW).

    ``kernel_size``, ``stride``, ``dilation``: int or (h, w); ``padding``: int, (h, w), 'same'
    (at any stride, as Keras pads: ceil(H / stride) x ceil(W / stride) outputs, one more row or
    column of padding at the bottom or right where the total is odd) or 'valid'. weight (F,
    C / groups, KH, KW), bias (F,).

    ``groups`` (PyTorch's): the channels and the filters in ``groups`` groups, each group's
    filters seeing its own channels only; ``groups=in_channels`` is the depthwise convolution
    (MobileNet's), with ``out_channels`` a multiple of it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Padding = 0,
        dilation: Size2 = 1,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
        rng: Rng = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        name = self.name
        self.in_channels = _positive_int(in_channels, "in_channels", name)
        self.out_channels = _positive_int(out_channels, "out_channels", name)
        self.groups = _groups(groups, self.in_channels, self.out_channels, name)
        if not isinstance(bias, (bool, np.bool_)):  # (PyTorch's 7th argument is groups)
            raise TypeError(
                f"{name}: expected bias to be True or False, got {bias!r} (PyTorch's Conv2d "
                "takes groups before bias; here pass groups=... by name)"
            )
        self.kernel_size = F.pair(kernel_size, "kernel_size", name)
        self.stride = F.pair(stride, "stride", name)
        self.dilation = F.pair(dilation, "dilation", name)
        self.padding: str | tuple[int, int]
        if isinstance(padding, str):
            if padding not in ("same", "valid"):  # (the pads of 'same' depend on the input)
                F.conv2d_padding(padding, self.kernel_size, self.stride, self.dilation, name)
            self.padding = padding
        else:
            self.padding = F.pair(padding, "padding", name, minimum=0)
        self.dtype = _resolve_dtype(dtype, name)
        rng = default_rng(rng)  # rng=None: the global generator after fastcnn.manual_seed
        cg = self.in_channels // self.groups
        fan_in = cg * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(
            _uniform_init(rng, (self.out_channels, cg) + self.kernel_size, fan_in, self.dtype)
        )
        self.bias = (
            Parameter(_uniform_init(rng, (self.out_channels,), fan_in, self.dtype))
            if bias
            else None
        )

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        name = cls.__name__
        f = _positive_int(config["out_channels"], "out_channels", name)
        c = _positive_int(config["in_channels"], "in_channels", name)
        c //= _groups(config.get("groups", 1), c, f, name)
        dtype = _resolve_dtype(config.get("dtype", "float32"), name)
        spec: dict[str, tuple[Shape, Any]] = {
            "weight": ((f, c) + F.pair(config["kernel_size"], "kernel_size", name), dtype)
        }
        if config.get("bias", True):
            spec["bias"] = ((f,), dtype)
        return spec

    def _reads_channels_last(self) -> bool:
        # this class's forward only: a subclass may read x itself first (the planner's rule)
        return type(self) is Conv2D

    def forward(self, x: Array) -> Array:
        x, in_dtype = cast_input(x, self.dtype, self.name)
        if self.training and self.groups == 1:
            expect_convolution_gradients(
                self.weight.data, self.stride, self.padding, self.dilation, x.shape[2:]
            )
        y = F.conv2d_forward(
            x,
            self.weight.data,
            None if self.bias is None else self.bias.data,
            self.stride,
            self.padding,
            self.dilation,
            layer=self.name,
            winograd=True,
            evaluation=not self.training,
            groups=self.groups,
        )
        self.save_for_backward(x, in_dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        """Accumulates the parameter gradients; returns the gradient to the input, or None with
        ``input_grad=False`` (a network's first layer: its input needs none, and the kernel
        that computes it is skipped)."""
        x, in_dtype = self.saved_for_backward()
        dx, dw, db = F.conv2d_backward(
            x,
            self.weight.data,
            cast_grad(dy, self.dtype, self.name),
            self.stride,
            self.padding,
            self.dilation,
            layer=self.name,
            bias=self.bias is not None,
            input_grad=input_grad,
            groups=self.groups,
        )
        self.accumulate(dw, db)
        return _as_dtype(dx, in_dtype)

    def accumulate(self, dweight: Array, dbias: Array | None) -> None:
        """Add a weight (and bias) gradient into the parameters' ``grad``."""
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias

    def get_config(self) -> Config:
        config: Config = {
            "class": self.name,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
            "dtype": self.dtype.name,
        }
        if self.groups != 1:  # (configs saved before groups existed read as 1)
            config["groups"] = self.groups
        return config

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        return F.conv2d_output_shape(
            input_shape,
            self.weight.shape,
            self.stride,
            self.padding,
            self.dilation,
            layer=self.name,
            groups=self.groups,
        )[0]

    def flops(self, input_shape: Sequence[int]) -> int:
        n, f, oh, ow = self.output_shape(input_shape)
        cg = self.in_channels // self.groups
        return 2 * n * f * oh * ow * cg * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={_fmt_pair(self.kernel_size)}"
        if self.stride != (1, 1):
            s += f", stride={_fmt_pair(self.stride)}"
        if self.padding not in ((0, 0), "valid"):
            padding = self.padding if isinstance(self.padding, str) else _fmt_pair(self.padding)
            s += f", padding={padding}"
        if self.dilation != (1, 1):
            s += f", dilation={_fmt_pair(self.dilation)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s


def _groups(groups: object, in_channels: int, out_channels: int, layer: str) -> int:
    """``groups`` checked: an int >= 1 dividing both channel counts (PyTorch's rule)."""
    g = _positive_int(groups, "groups", layer)
    for what, n in (("in_channels", in_channels), ("out_channels", out_channels)):
        if n % g:
            raise ValueError(f"{layer}: {what} ({n}) must be a multiple of groups ({g})")
    return g


# =============================================================================================
# pooling
# =============================================================================================


class _Pool2D(Module):
    def __init__(self, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0) -> None:
        super().__init__()
        name = self.name
        self.kernel_size = F.pair(kernel_size, "kernel_size", name)
        self.stride = self.kernel_size if stride is None else F.pair(stride, "stride", name)
        pads = F.pool2d_padding(padding, self.kernel_size, name)
        self.padding = (pads[0], pads[2])

    def get_config(self) -> Config:
        return {
            "class": self.name,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        return F.pool2d_output_shape(
            input_shape, self.kernel_size, self.stride, self.padding, layer=self.name
        )[0]

    def flops(self, input_shape: Sequence[int]) -> int:
        return (
            int(np.prod(self.output_shape(input_shape))) * self.kernel_size[0] * self.kernel_size[1]
        )

    def extra_repr(self) -> str:
        s = f"kernel_size={_fmt_pair(self.kernel_size)}"
        if self.stride != self.kernel_size:
            s += f", stride={_fmt_pair(self.stride)}"
        if self.padding != (0, 0):
            s += f", padding={_fmt_pair(self.padding)}"
        return s


@register_module
class MaxPool2D(_Pool2D):
    """Max pooling (PyTorch's nn.MaxPool2d, stride defaulting to the kernel size)."""

    _stateless = True

    def forward(self, x: Array) -> Array:
        y, argmax = F.max_pool2d_forward(
            x, self.kernel_size, self.stride, self.padding, layer=self.name
        )
        if self.training:
            expect_pool_gradient(y.dtype)
        self.save_for_backward(np.shape(x), argmax, y.dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        shape, argmax, dtype = self.saved_for_backward()
        dy = check_grad(dy, argmax.shape, dtype, self.name)
        return F.max_pool2d_backward(
            dy, argmax, shape, self.kernel_size, self.stride, self.padding, layer=self.name
        )


@register_module
class AvgPool2D(_Pool2D):
    """Average pooling (PyTorch's nn.AvgPool2d with count_include_pad=True)."""

    _stateless = True

    def forward(self, x: Array) -> Array:
        y = F.avg_pool2d_forward(x, self.kernel_size, self.stride, self.padding, layer=self.name)
        self.save_for_backward(np.shape(x), y.shape, y.dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        shape, y_shape, dtype = self.saved_for_backward()
        dy = check_grad(dy, y_shape, dtype, self.name)
        return F.avg_pool2d_backward(
            dy, shape, self.kernel_size, self.stride, self.padding, layer=self.name
        )


@register_module
class GlobalAvgPool2D(Module):
    """The mean of each channel over its plane: (N, C, H, W) -> (N, C) (PyTorch's
    ``nn.AdaptiveAvgPool2d(1)`` followed by ``flatten(1)``)."""

    _stateless = True

    def forward(self, x: Array) -> Array:
        y = F.global_avg_pool2d_forward(x, layer=self.name)
        self.save_for_backward(np.shape(x), y.dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        shape, dtype = self.saved_for_backward()
        dy = check_grad(dy, shape[:2], dtype, self.name)
        return F.global_avg_pool2d_backward(dy, shape, layer=self.name)

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        return F.global_avg_pool2d_output_shape(input_shape, layer=self.name)

    def flops(self, input_shape: Sequence[int]) -> int:
        self.output_shape(input_shape)
        return int(np.prod(input_shape))


# =============================================================================================
# batch normalisation
# =============================================================================================


@register_module
class BatchNorm2D(Module):
    """Batch normalisation over (N, H, W) per channel (PyTorch's nn.BatchNorm2d).

    Training: normalise with the batch mean and biased variance, then update
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the UNBIASED batch
    variance (as PyTorch). Eval: normalise with the running statistics.
    """

    _rank = 4

    running_mean: Array  # buffers, registered in __init__
    running_var: Array

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        name = self.name
        self.num_features = _positive_int(num_features, "num_features", name)
        self.eps = _number(eps, "eps", name, low=0, low_open=True)
        self.momentum = _number(momentum, "momentum", name, low=0, high=1)
        self.dtype = _resolve_dtype(dtype, name)
        c = self.num_features
        self.weight = Parameter(np.ones(c, dtype=self.dtype))
        self.bias = Parameter(np.zeros(c, dtype=self.dtype))
        self.register_buffer("running_mean", np.zeros(c, dtype=self.dtype))
        self.register_buffer("running_var", np.ones(c, dtype=self.dtype))

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        c = (_positive_int(config["num_features"], "num_features", cls.__name__),)
        dtype = _resolve_dtype(config.get("dtype", "float32"), cls.__name__)
        return {k: (c, dtype) for k in ("weight", "bias", "running_mean", "running_var")}

    def _check_shape(self, shape):
        """Rank and channel count of an input shape (BatchNorm2D: 4-D; BatchNorm1D: 2-D or 3-D)."""
        c = self.num_features
        if self._rank == 4:
            ok, expected = len(shape) == 4, f"(N, {c}, H, W)"
        else:
            ok, expected = len(shape) in (2, 3), f"(N, {c}) or (N, {c}, L)"
        if not ok or shape[1] != c:
            raise ValueError(
                f"{self.name}: expected input of shape {expected}, got {F._fmt_shape(shape)}"
            )

    def _to4d(self, x):
        self._check_shape(x.shape)
        return x.reshape(x.shape + (1,) * (4 - x.ndim))

    def _check_train_size(self, x):
        if x.size < 2 * x.shape[1]:  # checked here to name the caller's shape, not x4's
            raise ValueError(
                f"{self.name}: expected more than 1 value per channel when "
                f"training, got input of shape {F._fmt_shape(x.shape)}"
            )

    def update_running(self, x4: Array, mean: Array, invstd: Array) -> None:
        """The running statistics' update after a training-mode forward over x4 (N, C, H, W)."""
        count = x4.shape[0] * x4.shape[2] * x4.shape[3]
        # biased variance back from invstd (in float64), then the unbiased one for the update
        var = 1.0 / np.square(invstd.astype(np.float64)) - self.eps
        unbiased = var * (count / (count - 1))
        m = self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean.astype(np.float64)
        self.running_var[...] = (1 - m) * self.running_var + m * unbiased

    def forward(self, x: Array) -> Array:
        x, in_dtype = cast_input(x, self.dtype, self.name)
        x4 = self._to4d(x)
        if self.training:
            self._check_train_size(x)
            y, mean, invstd = F.batch_norm_forward_train(
                x4, self.weight.data, self.bias.data, self.eps, layer=self.name
            )
            self.update_running(x4, mean, invstd)
            self.save_for_backward("train", x4, mean, invstd, x.shape, in_dtype)
        else:
            y = F.batch_norm_forward_eval(
                x4,
                self.weight.data,
                self.bias.data,
                self.running_mean,
                self.running_var,
                self.eps,
                layer=self.name,
            )
            self.save_for_backward(
                "eval", x4, self.running_mean.copy(), self.running_var.copy(), x.shape, in_dtype
            )
        return y.reshape(x.shape)

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        mode, x4, a, b, x_shape, in_dtype = self.saved_for_backward()
        dy = cast_grad(dy, self.dtype, self.name, x_shape).reshape(x4.shape)
        if mode == "train":
            dx, dgamma, dbeta = F.batch_norm_backward(
                dy, x4, self.weight.data, a, b, layer=self.name
            )
        else:
            dx, dgamma, dbeta = F.batch_norm_backward_eval(
                dy, x4, self.weight.data, a, b, self.eps, layer=self.name
            )
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return _as_dtype(dx.reshape(x_shape), in_dtype)

    def get_config(self) -> Config:
        return {
            "class": self.name,
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "dtype": self.dtype.name,
        }

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        shape = tuple(int(s) for s in input_shape)
        self._check_shape(shape)
        return shape

    def flops(self, input_shape: Sequence[int]) -> int:
        # normalise and scale-shift folded: one multiply-add per element
        return 2 * int(np.prod(self.output_shape(input_shape)))

    def extra_repr(self) -> str:
        s = f"{self.num_features}"
        if self.eps != 1e-5:
            s += f", eps={self.eps:g}"
        if self.momentum != 0.1:
            s += f", momentum={self.momentum:g}"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s


@register_module
class BatchNorm1D(BatchNorm2D):
    """Batch normalisation of (N, C) or (N, C, L) inputs (PyTorch's nn.BatchNorm1d)."""

    _rank = 2


# =============================================================================================
# dense
# =============================================================================================


@register_module
class Dense(Module):
    """Fully connected layer (PyTorch's nn.Linear): y = x @ weight.T + bias, weight (out, in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
        rng: Rng = None,
    ) -> None:
        super().__init__()
        name = self.name
        self.in_features = _positive_int(in_features, "in_features", name)
        self.out_features = _positive_int(out_features, "out_features", name)
        self.dtype = _resolve_dtype(dtype, name)
        rng = default_rng(rng)  # rng=None: the global generator after fastcnn.manual_seed
        self.weight = Parameter(
            _uniform_init(rng, (self.out_features, self.in_features), self.in_features, self.dtype)
        )
        self.bias = (
            Parameter(_uniform_init(rng, (self.out_features,), self.in_features, self.dtype))
            if bias
            else None
        )

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        name = cls.__name__
        out = _positive_int(config["out_features"], "out_features", name)
        dtype = _resolve_dtype(config.get("dtype", "float32"), name)
        spec: dict[str, tuple[Shape, Any]] = {
            "weight": ((out, _positive_int(config["in_features"], "in_features", name)), dtype)
        }
        if config.get("bias", True):
            spec["bias"] = ((out,), dtype)
        return spec

    def forward(self, x: Array) -> Array:
        x, in_dtype = cast_input(x, self.dtype, self.name)
        y = F.dense_forward(
            x, self.weight.data, None if self.bias is None else self.bias.data, layer=self.name
        )
        self.save_for_backward(x, in_dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        """Accumulates the parameter gradients; returns the gradient to the input, or None with
        ``input_grad=False``."""
        x, in_dtype = self.saved_for_backward()
        dx, dw, db = F.dense_backward(
            x,
            self.weight.data,
            cast_grad(dy, self.dtype, self.name),
            layer=self.name,
            bias=self.bias is not None,
            input_grad=input_grad,
        )
        self.accumulate(dw, db)
        return _as_dtype(dx, in_dtype)

    def accumulate(self, dweight: Array, dbias: Array | None) -> None:
        """Add a weight (and bias) gradient into the parameters' ``grad``."""
        self.weight.grad += dweight
        if self.bias is not None:
            self.bias.grad += dbias

    def get_config(self) -> Config:
        return {
            "class": self.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": self.dtype.name,
        }

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2 or shape[1] != self.in_features:
            raise ValueError(
                f"{self.name}: expected input of shape (N, {self.in_features}), "
                f"got {F._fmt_shape(shape)}"
            )
        return (shape[0], self.out_features)

    def flops(self, input_shape: Sequence[int]) -> int:
        n, _ = self.output_shape(input_shape)
        return 2 * n * self.in_features * self.out_features

    def extra_repr(self) -> str:
        s = f"{self.in_features}, {self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s


# =============================================================================================
# activations
# =============================================================================================


@register_module
class ReLU(Module):
    """max(x, 0); the gradient passes where the output is positive."""

    _stateless = True

    def forward(self, x: Array) -> Array:
        y = F.relu_forward(x, layer=self.name)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        (y,) = self.saved_for_backward()
        return F.relu_backward(dy, y, layer=self.name)


@register_module
class LeakyReLU(Module):
    """x where x > 0, else negative_slope * x."""

    _stateless = True

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = _number(negative_slope, "negative_slope", self.name)

    def forward(self, x: Array) -> Array:
        x = F.check_float(x, self.name, contiguous=False)
        self.save_for_backward(x)
        return F.leaky_relu_forward(x, self.negative_slope, layer=self.name)

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        (x,) = self.saved_for_backward()
        return F.leaky_relu_backward(dy, x, self.negative_slope, layer=self.name)

    def get_config(self) -> Config:
        return {"class": self.name, "negative_slope": self.negative_slope}


@register_module
class Tanh(Module):
    _stateless = True

    def forward(self, x: Array) -> Array:
        y = F.tanh_forward(x, layer=self.name)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        (y,) = self.saved_for_backward()
        return F.tanh_backward(dy, y, layer=self.name)


@register_module
class Sigmoid(Module):
    _stateless = True

    def forward(self, x: Array) -> Array:
        y = F.sigmoid_forward(x, layer=self.name)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        (y,) = self.saved_for_backward()
        return F.sigmoid_backward(dy, y, layer=self.name)


@register_module
class Softmax(Module):
    """exp(x) / sum(exp(x)) along ``dim`` (default 1, the class/channel axis)."""

    _stateless = True

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        if not is_int(dim):
            raise TypeError(f"{self.name}: expected dim to be an int, got {dim!r}")
        self.dim = int(dim)

    def forward(self, x: Array) -> Array:
        y = F.softmax_forward(x, self.dim, layer=self.name)
        self.save_for_backward(y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        (y,) = self.saved_for_backward()
        return F.softmax_backward(dy, y, self.dim, layer=self.name)

    def get_config(self) -> Config:
        return {"class": self.name, "dim": self.dim}

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        shape = tuple(int(s) for s in input_shape)
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(
                f"{self.name}: dim {self.dim} out of range for an input of rank "
                f"{len(shape)} (shape {F._fmt_shape(shape)})"
            )
        return shape

    def flops(self, input_shape: Sequence[int]) -> int:
        return 3 * int(np.prod(self.output_shape(input_shape)))


# =============================================================================================
# shape and regularisation
# =============================================================================================


@register_module
class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    _stateless = True

    def forward(self, x: Array) -> Array:
        x = F.check_float(x, self.name)
        self.save_for_backward(x.shape, x.dtype)
        return x.reshape(self.output_shape(x.shape))

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        shape, dtype = self.saved_for_backward()
        dy = check_grad(dy, (shape[0], int(np.prod(shape[1:]))), dtype, self.name)
        return dy.reshape(shape)

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 2:
            raise ValueError(
                f"{self.name}: expected input of shape (N, ...) with rank >= 2, "
                f"got {F._fmt_shape(shape)}"
            )
        return (shape[0], int(np.prod(shape[1:])))

    def flops(self, input_shape: Sequence[int]) -> int:
        self.output_shape(input_shape)
        return 0


@register_module
class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the
    rest by 1 / (1 - p); identity in eval mode.

    The mask comes from the layer's own generator: ``seed`` (an int) or ``rng`` (a Generator,
    from which an independent child generator is spawned). ``get_rng_state()`` /
    ``set_rng_state(state)`` save and restore it for a reproducible resume.
    """

    has_rng_state = True
    _stateless = True

    def __init__(self, p: float = 0.5, seed: int | None = None, rng: Rng = None) -> None:
        super().__init__()
        self.p = _number(p, "p", self.name, low=0, high=1)
        self.seed = None if seed is None else int(seed)
        if rng is not None and seed is None:
            self._rng = np.random.default_rng(rng).spawn(1)[0]
        elif seed is None and global_generator() is not None:  # after fastcnn.manual_seed
            self._rng = default_rng(None).spawn(1)[0]
        else:
            self._rng = np.random.default_rng(self.seed)

    def forward(self, x: Array) -> Array:
        x = F.check_float(x, self.name)
        if not self.training or self.p == 0:
            self.save_for_backward(x.shape, x.dtype, None)
            return x
        y, mask = F.dropout_forward(x, self.p, self._rng, layer=self.name)
        self.save_for_backward(x.shape, x.dtype, mask)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        shape, dtype, mask = self.saved_for_backward()
        dy = check_grad(dy, shape, dtype, self.name)
        if mask is None:
            return dy
        return F.dropout_backward(dy, mask, layer=self.name)

    def get_rng_state(self) -> dict[str, Any]:
        """The generator's state: a JSON-able dict."""
        return self._rng.bit_generator.state  # type: ignore[return-value]  # a dict

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state

    def get_config(self) -> Config:
        return {"class": self.name, "p": self.p, "seed": self.seed}


# PyTorch's spellings: the same classes under a second name (a model saves and prints the
# canonical names above, so checkpoints and configs do not depend on which spelling built it).
Conv2d = Conv2D
Linear = Dense
BatchNorm2d = BatchNorm2D
BatchNorm1d = BatchNorm1D
MaxPool2d = MaxPool2D
AvgPool2d = AvgPool2D
