"""Layers: parameters, the caches backward needs, and each layer's forward and backward side by side.

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
import inspect
import math
import numbers

import numpy as np

from . import functional as F

__all__ = [
    "Parameter", "Layer", "Conv2D", "MaxPool2D", "AvgPool2D", "BatchNorm2D", "BatchNorm1D",
    "Dense", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Dropout", "Flatten", "Softmax",
    "LAYERS", "layer_from_config",
]


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype, zeros at start).

    Optimizers update ``data`` in place and layers accumulate into ``grad`` in place, so the
    arrays keep their identity for the life of the model.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data):
        data = np.array(data, order="C", copy=True)
        if data.dtype.kind != "f":
            raise TypeError(f"Parameter: expected floating-point data, got dtype {data.dtype}")
        self.data = data
        self.grad = np.zeros_like(data)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def zero_grad(self):
        self.grad[...] = 0

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def _resolve_dtype(dtype, layer):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{layer}: expected dtype float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{layer}: expected dtype float32 or float64, got {dt}")
    return dt


def _positive_int(value, name, layer):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{layer}: expected {name} to be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{layer}: expected {name} >= 1, got {value}")
    if value > F.MAX_SIZE:
        raise ValueError(f"{layer}: expected {name} <= {F.MAX_SIZE}, got {value}")
    return int(value)


def _number(value, name, layer, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
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


class Layer:
    """Base class: mode switching, parameters, state dict, config and the summary hooks.

    Subclasses set ``self._params`` (ordered names of their Parameter attributes) and
    ``self._buffers`` (names of non-trainable ndarray attributes saved in the state dict, e.g.
    BatchNorm's running statistics), and implement ``forward``, ``backward``, ``get_config``,
    ``output_shape`` and (when not elementwise) ``flops``.
    """

    _params = ()
    _buffers = ()

    def __init__(self):
        self.training = True

    @property
    def name(self):
        return type(self).__name__

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def _need(self, cached):
        if cached is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        return cached

    def _grad_as(self, dy, shape, dtype):
        """The upstream gradient of a parameter-free layer: a float array of the forward output's
        shape and dtype (float32 or float64), else TypeError/ValueError naming the layer."""
        dy = F.check_float(dy, self.name, "gradient", contiguous=False)
        if dy.dtype != dtype:
            raise TypeError(f"{self.name}: gradient dtype {dy.dtype} does not match the dtype of "
                            f"the forward output {dtype}")
        if dy.shape != tuple(shape):
            raise ValueError(f"{self.name}: expected gradient of shape {F._fmt_shape(shape)}, "
                             f"got {F._fmt_shape(dy.shape)}")
        return dy

    # -- mode -------------------------------------------------------------------------------
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- parameters -------------------------------------------------------------------------
    def named_parameters(self):
        return [(n, getattr(self, n)) for n in self._params if getattr(self, n) is not None]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # -- state ------------------------------------------------------------------------------
    def state_dict(self):
        """name -> a copy of the array: parameters first, then buffers."""
        state = {n: p.data.copy() for n, p in self.named_parameters()}
        for n in self._buffers:
            state[n] = getattr(self, n).copy()
        return state

    def _state_targets(self):
        targets = {n: p.data for n, p in self.named_parameters()}
        for n in self._buffers:
            targets[n] = getattr(self, n)
        return targets

    def check_state_dict(self, state, strict=True, prefix=""):
        """Validate ``state`` against this layer (keys, shapes, dtypes) without assigning;
        returns the list of (target array, value) pairs to copy."""
        return _check_state(self._state_targets(), state, strict, prefix, self.name)

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters and buffers, in place, after validating every key,
        shape and dtype (nothing is assigned if anything is wrong)."""
        for target, value in self.check_state_dict(state, strict):
            np.copyto(target, value)

    # -- config and summary -----------------------------------------------------------------
    def get_config(self):
        return {"class": self.name}

    @classmethod
    def from_config(cls, config, rng=None):
        kwargs = {k: v for k, v in config.items() if k != "class"}
        if "rng" in inspect.signature(cls).parameters:
            kwargs["rng"] = rng
        return cls(**kwargs)

    def output_shape(self, input_shape):
        return tuple(int(s) for s in input_shape)

    def flops(self, input_shape):
        """Forward floating-point operations for an input of this shape (elementwise layers:
        one per element)."""
        return int(np.prod(self.output_shape(input_shape)))

    def extra_repr(self):
        cfg = self.get_config()
        return ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "class")

    def __repr__(self):
        return f"{self.name}({self.extra_repr()})"


def _check_state(targets, state, strict, prefix, owner):
    """Validate every key, shape and dtype of ``state`` against ``targets`` (name -> array)."""
    if not hasattr(state, "keys"):
        raise TypeError(f"{owner}: expected a state dict (name -> array), got {type(state).__name__}")
    wanted = {prefix + k: v for k, v in targets.items()}
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    pairs = []
    for key, target in wanted.items():
        if key not in state:
            continue
        value = np.asarray(state[key])
        if value.shape != target.shape:
            problems.append(f"{key!r}: expected shape {target.shape}, got {value.shape}")
        elif value.dtype != target.dtype:
            problems.append(f"{key!r}: expected dtype {target.dtype}, got {value.dtype}")
        else:
            pairs.append((target, value))
    if problems:
        raise ValueError(f"{owner}: cannot load state dict: " + "; ".join(problems))
    return pairs


class _ParamLayer(Layer):
    """A layer with parameters of one dtype: casts floating inputs to it."""

    def _input(self, x):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{self.name}: expected a floating-point input (float32 or float64), "
                            f"got dtype {x.dtype}")
        self._in_dtype = x.dtype.newbyteorder("=")  # gradients come back in native byte order
        return x if x.dtype == self.dtype else x.astype(self.dtype)

    def _output_grad(self, dx):
        return dx if dx is None or dx.dtype == self._in_dtype else dx.astype(self._in_dtype)

    def _grad(self, dy, shape=None):
        """The upstream gradient in the layer's dtype (any floating dtype is cast); with
        ``shape``, checked to be of that shape."""
        dy = np.asarray(dy)
        if dy.dtype.kind != "f":
            raise TypeError(f"{self.name}: expected a floating-point gradient (float32 or "
                            f"float64), got dtype {dy.dtype}")
        if shape is not None and dy.shape != tuple(shape):
            raise ValueError(f"{self.name}: expected gradient of shape {F._fmt_shape(shape)}, "
                             f"got {F._fmt_shape(dy.shape)}")
        if dy.dtype != self.dtype:
            dy = dy.astype(self.dtype)
        return dy


# =============================================================================================
# convolution
# =============================================================================================

class Conv2D(_ParamLayer):
    """2-D convolution (cross-correlation, as PyTorch's nn.Conv2d): (N, C, H, W) -> (N, F, OH, OW).

    ``kernel_size``, ``stride``, ``dilation``: int or (h, w); ``padding``: int, (h, w), 'same'
    (stride 1 only) or 'valid'. weight (F, C, KH, KW), bias (F,).
    """

    _params = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, dtype=np.float32, rng=None):
        super().__init__()
        name = self.name
        self.in_channels = _positive_int(in_channels, "in_channels", name)
        self.out_channels = _positive_int(out_channels, "out_channels", name)
        self.kernel_size = F.pair(kernel_size, "kernel_size", name)
        self.stride = F.pair(stride, "stride", name)
        self.dilation = F.pair(dilation, "dilation", name)
        if isinstance(padding, str):
            F.conv2d_padding(padding, self.kernel_size, self.stride, self.dilation, name)
            self.padding = padding
        else:
            self.padding = F.pair(padding, "padding", name, minimum=0)
        self.dtype = _resolve_dtype(dtype, name)
        rng = np.random.default_rng(rng)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(_uniform_init(
            rng, (self.out_channels, self.in_channels) + self.kernel_size, fan_in, self.dtype))
        self.bias = (Parameter(_uniform_init(rng, (self.out_channels,), fan_in, self.dtype))
                     if bias else None)
        self._x = None

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """``relu(self.forward(x))`` in one kernel pass (the ReLU applied as the output is
        stored): what Sequential runs for Conv2D followed by ReLU. This layer's state and
        backward are those of ``forward``; the gradient through the ReLU is the ReLU's."""
        return self._forward(x, relu=True)

    def forward_relu_maxpool(self, x, pool):
        """``pool.forward(relu(self.forward(x)))`` in one kernel pass that never stores the
        convolution's output, for a MaxPool2D ``pool`` whose windows tile it (stride = kernel,
        no padding; ``pool.tiles()``): what Sequential runs for Conv2D -> ReLU -> MaxPool2D.
        This layer's and the pooling's state are those of the separate calls; the ReLU's output
        is not kept (its gradient is the pooling's ``backward_relu``)."""
        x = self._input(x)
        y, argmax, conv_shape = F.conv2d_relu_max_pool2d_forward(
            x, self.weight.data, None if self.bias is None else self.bias.data, self.stride,
            self.padding, self.dilation, pool.kernel_size, layer=self.name, pool_layer=pool.name)
        self._x = x
        return pool.adopt_forward(y, argmax, conv_shape)

    def _forward(self, x, relu):
        x = self._input(x)
        y = F.conv2d_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                             self.stride, self.padding, self.dilation, relu=relu,
                             layer=self.name)
        self._x = x
        return y

    def backward(self, dy, input_grad=True):
        """Accumulates the parameter gradients; returns the gradient to the input, or None with
        ``input_grad=False`` (a network's first layer: its input needs none, and the kernel
        that computes it is skipped)."""
        x = self._need(self._x)
        dx, dw, db = F.conv2d_backward(x, self.weight.data, self._grad(dy), self.stride,
                                       self.padding, self.dilation, layer=self.name,
                                       bias=self.bias is not None, input_grad=input_grad)
        return self._accumulate(dx, dw, db)

    def backward_through_maxpool(self, pool, dy, input_grad=True):
        """``self.backward(pool.backward_relu(dy))`` for the ReLU -> MaxPool2D ``pool`` that
        followed this layer (windows that tile, ``pool.tiles()``), bitwise, without forming the
        pooling's gradient: what Sequential runs for Conv2D -> ReLU -> MaxPool2D."""
        x = self._need(self._x)
        pool._need(pool._x_shape)
        dx, dw, db = F.max_pool2d_conv2d_backward(
            x, self.weight.data, pool._grad_as(dy, pool._argmax.shape, pool._dtype),
            pool._argmax, pool._y, pool._x_shape, pool.kernel_size, self.stride, self.padding,
            self.dilation, relu=True, bias=self.bias is not None, input_grad=input_grad,
            layer=self.name, pool_layer=pool.name)
        return self._accumulate(dx, dw, db)

    def _accumulate(self, dx, dw, db):
        self.weight.grad += dw
        if self.bias is not None:
            self.bias.grad += db
        return self._output_grad(dx)

    def get_config(self):
        return {"class": self.name, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None,
                "dtype": self.dtype.name}

    def output_shape(self, input_shape):
        return F.conv2d_output_shape(input_shape, self.weight.shape, self.stride, self.padding,
                                     self.dilation, layer=self.name)[0]

    def flops(self, input_shape):
        n, f, oh, ow = self.output_shape(input_shape)
        return 2 * n * f * oh * ow * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={_fmt_pair(self.kernel_size)}")
        if self.stride != (1, 1):
            s += f", stride={_fmt_pair(self.stride)}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding if isinstance(self.padding, str) else _fmt_pair(self.padding)}"
        if self.dilation != (1, 1):
            s += f", dilation={_fmt_pair(self.dilation)}"
        if self.bias is None:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s


# =============================================================================================
# pooling
# =============================================================================================

class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        name = self.name
        self.kernel_size = F.pair(kernel_size, "kernel_size", name)
        self.stride = self.kernel_size if stride is None else F.pair(stride, "stride", name)
        pads = F.pool2d_padding(padding, self.kernel_size, name)
        self.padding = (pads[0], pads[2])
        self._x_shape = None

    def get_config(self):
        return {"class": self.name, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding)}

    def output_shape(self, input_shape):
        return F.pool2d_output_shape(input_shape, self.kernel_size, self.stride, self.padding,
                                     layer=self.name)[0]

    def flops(self, input_shape):
        return int(np.prod(self.output_shape(input_shape))) * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self):
        s = f"kernel_size={_fmt_pair(self.kernel_size)}"
        if self.stride != self.kernel_size:
            s += f", stride={_fmt_pair(self.stride)}"
        if self.padding != (0, 0):
            s += f", padding={_fmt_pair(self.padding)}"
        return s


class MaxPool2D(_Pool2D):
    """Max pooling (PyTorch's nn.MaxPool2d, stride defaulting to the kernel size)."""

    def forward(self, x):
        y, self._argmax = F.max_pool2d_forward(x, self.kernel_size, self.stride, self.padding,
                                               layer=self.name)
        self._x_shape, self._dtype, self._y = np.shape(x), y.dtype, y
        return y

    def tiles(self):
        """True when the windows tile the input: stride = kernel, no padding."""
        return self.stride == self.kernel_size and self.padding == (0, 0)

    def adopt_forward(self, y, argmax, input_shape):
        """Record the forward's results computed by the previous layers in a fused pass
        (``Conv2D.forward_relu_maxpool``), as ``forward`` would have; returns y."""
        self._y, self._argmax, self._x_shape, self._dtype = y, argmax, tuple(input_shape), y.dtype
        return y

    def backward(self, dy):
        return self._backward(dy, relu=False)

    def backward_relu(self, dy):
        """The gradient through this pooling *and* the ReLU whose output was its input, in one
        pass: zero where the pooled maximum is <= 0 (or NaN), which is exactly where the ReLU
        blocks the selected cell. What Sequential runs for ReLU followed by MaxPool2D; the
        ReLU's own backward would then change nothing."""
        return self._backward(dy, relu=True)

    def _backward(self, dy, relu):
        shape = self._need(self._x_shape)
        dy = self._grad_as(dy, self._argmax.shape, self._dtype)
        return F.max_pool2d_backward(dy, self._argmax, shape, self.kernel_size, self.stride,
                                     self.padding, relu_output=self._y if relu else None,
                                     layer=self.name)


class AvgPool2D(_Pool2D):
    """Average pooling (PyTorch's nn.AvgPool2d with count_include_pad=True)."""

    def forward(self, x):
        y = F.avg_pool2d_forward(x, self.kernel_size, self.stride, self.padding, layer=self.name)
        self._x_shape, self._y_shape, self._dtype = np.shape(x), y.shape, y.dtype
        return y

    def backward(self, dy):
        shape = self._need(self._x_shape)
        dy = self._grad_as(dy, self._y_shape, self._dtype)
        return F.avg_pool2d_backward(dy, shape, self.kernel_size, self.stride, self.padding,
                                     layer=self.name)


# =============================================================================================
# batch normalisation
# =============================================================================================

class BatchNorm2D(_ParamLayer):
    """Batch normalisation over (N, H, W) per channel (PyTorch's nn.BatchNorm2d).

    Training: normalise with the batch mean and biased variance, then update
    ``running = (1 - momentum) * running + momentum * batch_stat`` with the UNBIASED batch
    variance (as PyTorch). Eval: normalise with the running statistics.
    """

    _params = ("weight", "bias")
    _buffers = ("running_mean", "running_var")
    _rank = 4

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        name = self.name
        self.num_features = _positive_int(num_features, "num_features", name)
        self.eps = _number(eps, "eps", name, low=0, low_open=True)
        self.momentum = _number(momentum, "momentum", name, low=0, high=1)
        self.dtype = _resolve_dtype(dtype, name)
        c = self.num_features
        self.weight = Parameter(np.ones(c, dtype=self.dtype))
        self.bias = Parameter(np.zeros(c, dtype=self.dtype))
        self.running_mean = np.zeros(c, dtype=self.dtype)
        self.running_var = np.ones(c, dtype=self.dtype)
        self._cache = None

    def _check_shape(self, shape):
        """Rank and channel count of an input shape (BatchNorm2D: 4-D; BatchNorm1D: 2-D or 3-D)."""
        c = self.num_features
        if self._rank == 4:
            ok, expected = len(shape) == 4, f"(N, {c}, H, W)"
        else:
            ok, expected = len(shape) in (2, 3), f"(N, {c}) or (N, {c}, L)"
        if not ok or shape[1] != c:
            raise ValueError(f"{self.name}: expected input of shape {expected}, "
                             f"got {F._fmt_shape(shape)}")

    def _to4d(self, x):
        self._check_shape(x.shape)
        return x.reshape(x.shape + (1,) * (4 - x.ndim))

    def forward(self, x):
        x = self._input(x)
        x4 = self._to4d(x)
        if self.training:
            y, mean, invstd = F.batch_norm_forward_train(
                x4, self.weight.data, self.bias.data, self.eps, layer=self.name)
            count = x4.shape[0] * x4.shape[2] * x4.shape[3]
            # biased variance back from invstd (in float64), then the unbiased one for the update
            var = 1.0 / np.square(invstd.astype(np.float64)) - self.eps
            unbiased = var * (count / (count - 1))
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean.astype(np.float64)
            self.running_var[...] = (1 - m) * self.running_var + m * unbiased
            self._cache = ("train", x4, mean, invstd)
        else:
            y = F.batch_norm_forward_eval(x4, self.weight.data, self.bias.data,
                                          self.running_mean, self.running_var, self.eps,
                                          layer=self.name)
            self._cache = ("eval", x4, self.running_mean.copy(), self.running_var.copy())
        self._x_shape = x.shape
        return y.reshape(x.shape)

    def backward(self, dy):
        mode, x4, a, b = self._need(self._cache)
        dy = self._grad(dy, self._x_shape).reshape(x4.shape)
        if mode == "train":
            dx, dgamma, dbeta = F.batch_norm_backward(dy, x4, self.weight.data, a, b,
                                                      layer=self.name)
        else:
            dx, dgamma, dbeta = F.batch_norm_backward_eval(dy, x4, self.weight.data, a, b,
                                                           self.eps, layer=self.name)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        return self._output_grad(dx.reshape(self._x_shape))

    def get_config(self):
        return {"class": self.name, "num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "dtype": self.dtype.name}

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        self._check_shape(shape)
        return shape

    def flops(self, input_shape):
        # normalise and scale-shift folded: one multiply-add per element
        return 2 * int(np.prod(self.output_shape(input_shape)))


class BatchNorm1D(BatchNorm2D):
    """Batch normalisation of (N, C) or (N, C, L) inputs (PyTorch's nn.BatchNorm1d)."""

    _rank = 2


# =============================================================================================
# dense
# =============================================================================================

class Dense(_ParamLayer):
    """Fully connected layer (PyTorch's nn.Linear): y = x @ weight.T + bias, weight (out, in)."""

    _params = ("weight", "bias")

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        name = self.name
        self.in_features = _positive_int(in_features, "in_features", name)
        self.out_features = _positive_int(out_features, "out_features", name)
        self.dtype = _resolve_dtype(dtype, name)
        rng = np.random.default_rng(rng)
        self.weight = Parameter(_uniform_init(rng, (self.out_features, self.in_features),
                                              self.in_features, self.dtype))
        self.bias = (Parameter(_uniform_init(rng, (self.out_features,), self.in_features,
                                             self.dtype)) if bias else None)
        self._x = None

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """``relu(self.forward(x))`` in one kernel pass: what Sequential runs for Dense followed
        by ReLU (this layer's state and backward are those of ``forward``)."""
        return self._forward(x, relu=True)

    def _forward(self, x, relu):
        x = self._input(x)
        y = F.dense_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                            relu=relu, layer=self.name)
        self._x = x
        return y

    def backward(self, dy, input_grad=True):
        """Accumulates the parameter gradients; returns the gradient to the input, or None with
        ``input_grad=False``."""
        x = self._need(self._x)
        dx, dw, db = F.dense_backward(x, self.weight.data, self._grad(dy), layer=self.name,
                                      bias=self.bias is not None, input_grad=input_grad)
        self.weight.grad += dw
        if self.bias is not None:
            self.bias.grad += db
        return self._output_grad(dx)

    def get_config(self):
        return {"class": self.name, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": self.dtype.name}

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2 or shape[1] != self.in_features:
            raise ValueError(f"{self.name}: expected input of shape (N, {self.in_features}), "
                             f"got {F._fmt_shape(shape)}")
        return (shape[0], self.out_features)

    def flops(self, input_shape):
        n, _ = self.output_shape(input_shape)
        return 2 * n * self.in_features * self.out_features

    def extra_repr(self):
        s = f"{self.in_features}, {self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s


# =============================================================================================
# activations
# =============================================================================================

_NOT_KEPT = object()  # ReLU._y after a fused forward that never stored the ReLU's output


class ReLU(Layer):
    """max(x, 0); the gradient passes where the output is positive."""

    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x):
        self._y = y = F.relu_forward(x, layer=self.name)
        return y

    def adopt_output(self, y):
        """Record ``y``, this layer's output computed by the previous layer in a fused pass
        (``Conv2D.forward_relu``), as ``forward`` would have; returns y. ``y=None``: the output
        was never stored (``Conv2D.forward_relu_maxpool``), so this layer has no backward of
        its own until its next ``forward``."""
        self._y = _NOT_KEPT if y is None else y
        return y

    def backward(self, dy):
        y = self._need(self._y)
        if y is _NOT_KEPT:
            raise RuntimeError(f"{self.name}: the output of the last forward was not kept (it "
                               "ran fused between Conv2D and MaxPool2D in Sequential.forward, "
                               "whose backward covers it); call the Sequential's backward")
        return F.relu_backward(dy, y, layer=self.name)


class LeakyReLU(Layer):
    """x where x > 0, else negative_slope * x."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = _number(negative_slope, "negative_slope", self.name)
        self._x = None

    def forward(self, x):
        x = F.check_float(x, self.name)
        self._x = x
        return F.leaky_relu_forward(x, self.negative_slope, layer=self.name)

    def backward(self, dy):
        return F.leaky_relu_backward(dy, self._need(self._x), self.negative_slope,
                                     layer=self.name)

    def get_config(self):
        return {"class": self.name, "negative_slope": self.negative_slope}


class Tanh(Layer):
    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x):
        self._y = y = F.tanh_forward(x, layer=self.name)
        return y

    def backward(self, dy):
        return F.tanh_backward(dy, self._need(self._y), layer=self.name)


class Sigmoid(Layer):
    def __init__(self):
        super().__init__()
        self._y = None

    def forward(self, x):
        self._y = y = F.sigmoid_forward(x, layer=self.name)
        return y

    def backward(self, dy):
        return F.sigmoid_backward(dy, self._need(self._y), layer=self.name)


class Softmax(Layer):
    """exp(x) / sum(exp(x)) along ``dim`` (default 1, the class/channel axis)."""

    def __init__(self, dim=1):
        super().__init__()
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"{self.name}: expected dim to be an int, got {dim!r}")
        self.dim = int(dim)
        self._y = None

    def forward(self, x):
        self._y = y = F.softmax_forward(x, self.dim, layer=self.name)
        return y

    def backward(self, dy):
        return F.softmax_backward(dy, self._need(self._y), self.dim, layer=self.name)

    def get_config(self):
        return {"class": self.name, "dim": self.dim}

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"{self.name}: dim {self.dim} out of range for an input of rank "
                             f"{len(shape)} (shape {F._fmt_shape(shape)})")
        return shape

    def flops(self, input_shape):
        return 3 * int(np.prod(self.output_shape(input_shape)))


# =============================================================================================
# shape and regularisation
# =============================================================================================

class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def forward(self, x):
        x = F.check_float(x, self.name)
        self._x_shape, self._dtype = x.shape, x.dtype
        return x.reshape(self.output_shape(x.shape))

    def backward(self, dy):
        shape = self._need(self._x_shape)
        dy = self._grad_as(dy, (shape[0], int(np.prod(shape[1:]))), self._dtype)
        return dy.reshape(shape)

    def output_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 2:
            raise ValueError(f"{self.name}: expected input of shape (N, ...) with rank >= 2, "
                             f"got {F._fmt_shape(shape)}")
        return (shape[0], int(np.prod(shape[1:])))

    def flops(self, input_shape):
        self.output_shape(input_shape)
        return 0


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the
    rest by 1 / (1 - p); identity in eval mode.

    The mask comes from the layer's own generator: ``seed`` (an int) or ``rng`` (a Generator,
    from which an independent child generator is spawned). ``get_rng_state()`` /
    ``set_rng_state(state)`` save and restore it for a reproducible resume.
    """

    def __init__(self, p=0.5, seed=None, rng=None):
        super().__init__()
        self.p = _number(p, "p", self.name, low=0, high=1)
        self.seed = None if seed is None else int(seed)
        if rng is not None and seed is None:
            self._rng = np.random.default_rng(rng).spawn(1)[0]
        else:
            self._rng = np.random.default_rng(self.seed)
        self._mask = None

    def forward(self, x):
        x = F.check_float(x, self.name)
        self._x_shape, self._dtype = x.shape, x.dtype
        if not self.training or self.p == 0:
            self._mask = False
            return x
        y, self._mask = F.dropout_forward(x, self.p, self._rng, layer=self.name)
        return y

    def backward(self, dy):
        mask = self._need(self._mask)
        dy = self._grad_as(dy, self._x_shape, self._dtype)
        if mask is False:
            return dy
        return F.dropout_backward(dy, mask, layer=self.name)

    def get_rng_state(self):
        """The generator's state: a JSON-able dict."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state):
        self._rng.bit_generator.state = state

    def get_config(self):
        return {"class": self.name, "p": self.p, "seed": self.seed}


LAYERS = {cls.__name__: cls for cls in (
    Conv2D, MaxPool2D, AvgPool2D, BatchNorm2D, BatchNorm1D, Dense, ReLU, LeakyReLU, Tanh,
    Sigmoid, Dropout, Flatten, Softmax)}


def layer_from_config(config, rng=None):
    """Build a layer from its ``get_config()`` dict (parameters freshly initialised from ``rng``)."""
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"expected a layer config dict with a 'class' key, got {config!r}")
    cls = LAYERS.get(config["class"])
    if cls is None:
        raise ValueError(f"unknown layer class {config['class']!r}; known: {sorted(LAYERS)}")
    return cls.from_config(config, rng=rng)
