"""Stateless operations: validate the arguments, allocate the outputs, call a kernel.

This module is the one bridge between the API (``fastcnn.layers``) and the loops
(``fastcnn.kernels``). Every function here checks rank, channel counts, dtype and sizes in plain
Python *before* any kernel runs (kernels trust their inputs: a wrong shape there is silent memory
corruption), resolves ``kernel_size`` / ``stride`` / ``padding`` / ``dilation`` given as an int or
an ``(h, w)`` pair (convolution padding also ``'same'`` or ``'valid'``, as PyTorch), makes the
inputs C-contiguous, allocates the outputs with the input's dtype and calls the kernel.

Errors are ``TypeError`` (non-floating data, wrong argument types) or ``ValueError`` (shapes and
values), and their message names the layer (the ``layer=`` argument), what was expected and what
was given, e.g. ``"Conv2D: expected input of shape (N, 32, H, W), got (64, 1, 28, 28)"``.
NaN and inf are values, not errors: they pass through.

Supported dtypes are float32 and float64 (the kernels are compiled lazily for the dtype in use).
Shapes are NCHW, as in PyTorch. Memory is PyTorch's ``channels_last`` where it pays: the
convolution and pooling kernels work on NHWC arrays (every inner loop runs over channels), so
``conv2d_forward`` and the poolings return (N, C, H, W) *views* of NHWC memory, and accept any
layout (an NHWC-backed input is used as it is, any other is copied once into NHWC). A network's
activations therefore stay NHWC from layer to layer with no conversion; a 1-channel NCHW image
already is one. The values are the same whatever the layout (``np.ascontiguousarray`` gives a
C-ordered copy). Padding is resolved to ``(top, bottom, left, right)``; the kernels take only
the top/left offsets, the bottom/right padding being implied by the output's shape.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numba
import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import _pool
from ._checks import is_int
from ._types import Array, Padding, Shape, Size2
from .kernels import activations as _activations
from .kernels import batchnorm as _batchnorm
from .kernels import conv2d as _conv2d
from .kernels import conv2d_c1 as _conv2d_c1
from .kernels import conv2d_phases as _conv2d_phases
from .kernels import dense as _dense
from .kernels import depthwise as _depthwise
from .kernels import fused as _fused
from .kernels import pool2d as _pool2d
from .kernels import winograd as _winograd
from .kernels import winograd4 as _winograd4

__all__ = [
    "check_float",
    "pair",
    "conv2d_padding",
    "pool2d_padding",
    "conv2d_output_shape",
    "conv2d_forward",
    "conv2d_backward",
    "conv2d_relu_max_pool2d_forward",
    "max_pool2d_conv2d_backward",
    "pool2d_output_shape",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
    "global_avg_pool2d_output_shape",
    "global_avg_pool2d_forward",
    "global_avg_pool2d_backward",
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "tanh_forward",
    "tanh_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "softmax_forward",
    "softmax_backward",
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_backward",
    "batch_norm_relu_forward_train",
    "batch_norm_relu_backward",
    "batch_norm_backward_eval",
    "dense_forward",
    "dense_backward",
    "dropout_forward",
    "dropout_backward",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _fmt_shape(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float(x: ArrayLike, layer: str, what: str = "input", contiguous: bool = True) -> Array:
    """``x`` as a float32/float64 ndarray in native byte order, else TypeError; C-contiguous
    unless ``contiguous`` is false (then in whatever layout it came)."""
    if type(x) is np.ndarray and x.dtype in _FLOAT_DTYPES:  # the common case, at once
        if not contiguous or x.flags.c_contiguous:
            return x
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(
            f"{layer}: expected a floating-point {what} (float32 or float64), got dtype {x.dtype}"
        )
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{layer}: expected a float32 or float64 {what}, got dtype {x.dtype}")
    if not contiguous:
        return x
    # np.require, not np.ascontiguousarray: that one turns a 0-d array into a 1-d one
    return np.require(x, requirements="C")


def _nhwc(x):
    """(N, C, H, W) -> C-contiguous (N, H, W, C): a view when x's memory is channels-last (the
    arrays this module returns; any 1-channel C-ordered array), else a copy."""
    v = x.transpose(0, 2, 3, 1)
    if v.flags.c_contiguous:
        return v
    if x.shape[1] <= _FEW_CHANNELS:
        # an image's few channels (a network's input, NCHW): one strided copy per channel
        # beats numpy's transposing copy there
        out = _pool.empty(v.shape, x.dtype)
        for k in range(x.shape[1]):
            out[..., k] = x[:, k]
        return out
    return np.ascontiguousarray(v)


#: Up to this many channels _nhwc copies channel by channel (faster than numpy's transposing
#: copy at 3-8 channels, slower from 16: bench figures in the commit that set it)
_FEW_CHANNELS = 8


def _image_as_given(x):
    """(x, False) if x (N, C, H, W) is C-contiguous, (its (N, H, W, C) view, True) if its
    memory is channels-last, else (a C-contiguous copy, False): the two layouts the lanes
    forward reads without a copy of the batch first. A read-only batch is copied (numba would
    compile the kernel again for read-only arrays)."""
    if not x.flags.writeable:
        return np.array(x, order="C"), False  # one copy, C-contiguous and writeable
    if x.flags.c_contiguous:
        return x, False
    v = x.transpose(0, 2, 3, 1)
    if v.flags.c_contiguous:
        return v, True
    return np.ascontiguousarray(x), False


def _nchw(v):
    """An NHWC kernel result as the (N, C, H, W) array users see (a view, channels-last memory)."""
    return v.transpose(0, 3, 1, 2)


def _flat(a):
    """A 1-D view of ``a`` in memory order if its elements fill one contiguous block (C order,
    channels-last, any axis order), else None. Two arrays with the same strides give flat views
    whose elements correspond one to one."""
    if a.flags.c_contiguous:  # (the two common cases first, without the sort)
        return a.reshape(-1)
    if a.ndim == 4:  # channels-last memory
        v = a.transpose(0, 2, 3, 1)
        if v.flags.c_contiguous:
            return v.reshape(-1)
    order = sorted(range(a.ndim), key=lambda axis: -a.strides[axis])
    v = a.transpose(order)
    return v.reshape(-1) if v.flags.c_contiguous else None


def _one_block(x):
    """``x`` if its memory is one contiguous block in some axis order, else a C-ordered copy."""
    return x if _flat(x) is not None else np.ascontiguousarray(x)


def _layout_like(a, like):
    """``a`` with the memory layout of ``like`` (same shape): itself or a copy."""
    if a.strides == like.strides:
        return a
    b = _pool.empty_like(like)
    b[...] = a
    return b


def _same_dtype(a, x, layer, what):
    if a.dtype != x.dtype:
        raise TypeError(f"{layer}: {what} dtype {a.dtype} does not match input dtype {x.dtype}")


#: Upper bound of every size argument (kernel size, stride, padding, dilation, channel and
#: feature counts): the kernels index with int64 arithmetic, and no real array gets near it.
MAX_SIZE = 2**31 - 1


def _check_int(value, name, layer, minimum):
    if not is_int(value):
        raise TypeError(f"{layer}: expected {name} to be an int or a pair of ints, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{layer}: expected {name} >= {minimum}, got {value}")
    if value > MAX_SIZE:
        raise ValueError(f"{layer}: expected {name} <= {MAX_SIZE}, got {value}")
    return value


def pair(value: Size2, name: str, layer: str, minimum: int = 1) -> tuple[int, int]:
    """An int or an ``(h, w)`` pair of ints, each >= ``minimum``, as a tuple of two Python ints."""
    if type(value) is tuple and len(value) == 2:  # the layers' own pairs, checked at once
        h, w = value
        if (
            type(h) is int
            and type(w) is int
            and minimum <= h <= MAX_SIZE
            and minimum <= w <= MAX_SIZE
        ):
            return value
    if isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != 2:
            raise ValueError(
                f"{layer}: expected {name} to be an int or a pair (h, w), got {tuple(value)!r}"
            )
        return (
            _check_int(value[0], name, layer, minimum),
            _check_int(value[1], name, layer, minimum),
        )
    v = _check_int(value, name, layer, minimum)
    return (v, v)


def _check_input(x, rank_names, channels, layer):
    """Rank and (optionally) channel count of ``x``; ``rank_names`` like ("N", "C", "H", "W")."""
    expected = list(rank_names)
    if channels is not None:
        expected[1] = str(channels)
    if x.ndim != len(rank_names) or (channels is not None and x.shape[1] != channels):
        raise ValueError(
            f"{layer}: expected input of shape ({', '.join(expected)}), got "
            f"{_fmt_shape(x.shape)}{_nhwc_hint(x.shape, channels)}"
        )


def _nhwc_hint(shape, channels):
    """A hint for images passed channels-last (N, H, W, C) where (N, C, H, W) was expected."""
    if len(shape) == 4 and channels is not None and shape[1] != channels == shape[3]:
        return " (channels last? fastcnn takes NCHW: pass x.transpose(0, 3, 1, 2))"
    return ""


def _check_shape_equal(a, shape, layer, what):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(
            f"{layer}: expected {what} of shape {_fmt_shape(shape)}, got {_fmt_shape(a.shape)}"
        )


def _positive_spatial(shape, layer):
    if len(shape) == 4 and (shape[2] < 1 or shape[3] < 1 or shape[1] < 1):
        raise ValueError(f"{layer}: expected an input with C, H, W >= 1, got {_fmt_shape(shape)}")


# ---------------------------------------------------------------------------------------------
# padding and output sizes
# ---------------------------------------------------------------------------------------------


def conv2d_padding(
    padding: Padding,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    layer: str = "Conv2D",
    input_size: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """Resolve a convolution's padding to ``(top, bottom, left, right)``.

    ``padding`` is an int, an ``(h, w)`` pair (symmetric), ``'valid'`` (no padding) or ``'same'``
    as Keras/TensorFlow pad: an output of ceil(size / stride) along each axis, the total padding
    ``max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)``, ``top = total // 2``
    and the rest at the bottom (an even kernel pads one more at the bottom/right). At stride 1
    that is ``dilation * (kernel - 1)`` whatever the size (PyTorch's 'same'); at other strides
    it depends on the input's ``input_size = (H, W)``, which must then be given.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1) and input_size is None:
                raise ValueError(
                    f"{layer}: padding='same' at stride {stride} depends on the input's size: "
                    "pass input_size=(H, W)"
                )
            sizes = (1, 1) if input_size is None else input_size
            pads = []
            for size, k, s, d in zip(sizes, kernel_size, stride, dilation, strict=True):
                out = -(-int(size) // s)
                total = max((out - 1) * s + d * (k - 1) + 1 - int(size), 0)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        raise ValueError(
            f"{layer}: expected padding to be an int, a pair (h, w), 'same' or "
            f"'valid', got {padding!r}"
        )
    ph, pw = pair(padding, "padding", layer, minimum=0)
    return (ph, ph, pw, pw)


def pool2d_padding(
    padding: Padding, kernel_size: tuple[int, int], layer: str = "MaxPool2D"
) -> tuple[int, int, int, int]:
    """A pooling's symmetric padding ``(top, bottom, left, right)``: int or pair, each at most
    half the kernel (as PyTorch)."""
    if isinstance(padding, str):
        raise ValueError(
            f"{layer}: expected padding to be an int or a pair (h, w), got {padding!r}"
        )
    ph, pw = pair(padding, "padding", layer, minimum=0)
    if ph > kernel_size[0] // 2 or pw > kernel_size[1] // 2:
        raise ValueError(
            f"{layer}: padding should be at most half of the kernel size "
            f"{kernel_size}, got padding {(ph, pw)}"
        )
    return (ph, ph, pw, pw)


def _out_size(size, pad_a, pad_b, kernel, stride, dilation, layer, axis):
    effective = dilation * (kernel - 1) + 1
    padded = size + pad_a + pad_b
    if effective > padded:
        extra = f" with dilation {dilation}, effectively {effective}" if dilation != 1 else ""
        raise ValueError(
            f"{layer}: kernel {kernel}{extra} is larger than the padded input "
            f"along {axis}: input {size} + padding {pad_a}+{pad_b} = {padded}"
        )
    return (padded - effective) // stride + 1


def conv2d_output_shape(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Size2 = 1,
    padding: Padding = 0,
    dilation: Size2 = 1,
    layer: str = "Conv2D",
    groups: int = 1,
) -> tuple[Shape, tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
    """Output shape of a convolution, validating every argument; returns
    ``(out_shape, stride, pads, dilation)`` with ``pads = (top, bottom, left, right)``.
    ``groups``: the input's channels are ``groups * weight_shape[1]``, and the filters a
    multiple of ``groups``."""
    input_shape = tuple(int(s) for s in input_shape)
    f, cg, kh, kw = weight_shape
    groups = _check_groups(groups, f, layer)
    c = cg * groups
    if len(input_shape) != 4 or input_shape[1] != c:
        raise ValueError(
            f"{layer}: expected input of shape (N, {c}, H, W), got {_fmt_shape(input_shape)}"
            f"{_nhwc_hint(input_shape, c)}"
        )
    _positive_spatial(input_shape, layer)
    if kh < 1 or kw < 1:
        raise ValueError(f"{layer}: expected kernel_size >= 1, got {(kh, kw)}")
    stride = pair(stride, "stride", layer)
    dilation = pair(dilation, "dilation", layer)
    n, _, h, w = input_shape
    pads = conv2d_padding(padding, (kh, kw), stride, dilation, layer, (h, w))
    oh = _out_size(h, pads[0], pads[1], kh, stride[0], dilation[0], layer, "H")
    ow = _out_size(w, pads[2], pads[3], kw, stride[1], dilation[1], layer, "W")
    return (n, f, oh, ow), stride, pads, dilation


def _check_groups(groups, filters, layer):
    if not is_int(groups):
        raise TypeError(f"{layer}: expected groups to be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{layer}: expected groups >= 1, got {groups}")
    if filters % groups:
        raise ValueError(
            f"{layer}: the filters ({filters}) must be a multiple of groups ({groups}), as the "
            "input channels must"
        )
    return int(groups)


def pool2d_output_shape(
    input_shape: Sequence[int],
    kernel_size: Size2,
    stride: Size2 | None = None,
    padding: Padding = 0,
    layer: str = "MaxPool2D",
) -> tuple[Shape, tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
    """Output shape of a pooling, validating every argument; returns
    ``(out_shape, kernel, stride, pads)``. ``stride=None`` means the kernel size (PyTorch)."""
    input_shape = tuple(int(s) for s in input_shape)
    kernel = pair(kernel_size, "kernel_size", layer)
    stride = kernel if stride is None else pair(stride, "stride", layer)
    pads = pool2d_padding(padding, kernel, layer)
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer}: expected input of shape (N, C, H, W), got {_fmt_shape(input_shape)}"
        )
    _positive_spatial(input_shape, layer)
    n, c, h, w = input_shape
    oh = _out_size(h, pads[0], pads[1], kernel[0], stride[0], 1, layer, "H")
    ow = _out_size(w, pads[2], pads[3], kernel[1], stride[1], 1, layer, "W")
    return (n, c, oh, ow), kernel, stride, pads


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------


def _conv_args(x, weight, bias, layer):
    x = check_float(x, layer, contiguous=False)
    weight = check_float(weight, layer, "weight")
    if weight.ndim != 4:
        raise ValueError(
            f"{layer}: expected weight of shape (F, C, KH, KW), got {_fmt_shape(weight.shape)}"
        )
    _same_dtype(weight, x, layer, "weight")
    if bias is not None:
        bias = check_float(bias, layer, "bias")
        _check_shape_equal(bias, (weight.shape[0],), layer, "bias")
        _same_dtype(bias, x, layer, "bias")
    return x, weight, bias


def winograd_enabled() -> bool:
    """False when ``FASTCNN_WINOGRAD=0``: every convolution then runs the direct kernel."""
    return os.environ.get("FASTCNN_WINOGRAD", "1").strip() not in ("0", "false", "no")


def winograd_applies(weight_shape: Shape, stride: Size2 = 1, dilation: Size2 = 1) -> bool:
    """Whether a convolution of this shape runs on the Winograd kernel when asked (the
    layers' forward): 3x3, stride 1, dilation 1, input channels and filters multiples of 16
    (kernels/winograd.py; at 16 channels the transforms cost about what the products save,
    1.04-1.23x per layer, but the input gradient of 16 filters gains). ``FASTCNN_WINOGRAD=0``
    turns it off."""
    f, c, kh, kw = (int(v) for v in weight_shape)
    return (
        (kh, kw) == (3, 3)
        and pair(stride, "stride", "Conv2D") == (1, 1)
        and pair(dilation, "dilation", "Conv2D") == (1, 1)
        and c % 16 == 0
        and c > 0
        and f % 16 == 0
        and winograd_enabled()
    )


#: Outputs at least this many rows and columns run on F(4x4, 3x3), smaller ones on F(2x2, 3x3):
#: from 7 on, the 4x4 tiles' pixels past the edge (7 -> 8, as 2x2 tiles; 14 -> 16) cost less
#: than their 36 products per 16 outputs (F(2x2): 64) save; at 5 and 6 (-> 8) they cost more.
WINOGRAD4_MIN_SIZE = 7


def _winograd_forward(x, weight, bias, pad_top, pad_left, relu, y, bn, reuse=False):
    """A Winograd kernel (x, y channels-last): F(4x4, 3x3) where both output dimensions are
    >= WINOGRAD4_MIN_SIZE, else F(2x2, 3x3); the weights transformed by
    :func:`_transformed_weight`, reused across calls with ``reuse`` (evaluation mode)."""
    threads = numba.get_num_threads()
    if min(y.shape[1], y.shape[2]) >= WINOGRAD4_MIN_SIZE:
        kernel, module = _winograd4.conv2d_winograd4_forward, _winograd4
    else:
        kernel, module = _winograd.conv2d_winograd_forward, _winograd
    kernel(
        x, _transformed_weight(weight, module, reuse), bias, pad_top, pad_left, relu, y, bn, threads
    )


#: Evaluation mode's transformed weights: (id(weight), kernel module) -> (a weak reference to
#: the weight array, a copy of its values, the transformed weights); an entry goes with its array.
_TRANSFORMED: dict[tuple[int, str], tuple[weakref.ref, Array, Array]] = {}


def _transformed_weight(weight: Array, module: ModuleType, reuse: bool) -> Array:
    """``module.weight_transform(weight, F)`` (module: kernels.winograd or winograd4), the
    transformed weights the Winograd forward multiplies by. With ``reuse`` (evaluation mode:
    the weights stay as they are between calls) the result is kept with a copy of the weights
    and returned again while the array still holds those values, compared in full (an edit
    in place, or an optimizer's step, is seen): inference then transforms each layer's weights
    once, not once per batch (at small batches and 64 channels the transform costs as much as
    the products). A view (a grouped convolution's group of filters) is a new object on every
    call and is never kept."""
    if not reuse or weight.base is not None:
        return module.weight_transform(weight, weight.shape[0])
    key = (id(weight), module.__name__)
    kept = _TRANSFORMED.get(key)
    if kept is not None and kept[0]() is weight and np.array_equal(kept[1], weight):
        return kept[2]
    u = module.weight_transform(weight, weight.shape[0])

    def forget(_: weakref.ref) -> None:
        _TRANSFORMED.pop(key, None)

    _TRANSFORMED[key] = (weakref.ref(weight, forget), weight.copy(), u)
    return u


def _conv_kernel(
    x, weight, bias, strides, pads, dilations, relu, y, bn, winograd, evaluation=False
):
    """Run the direct kernel (or its one-channel variants, bitwise the same), or the Winograd
    one where ``winograd`` and it applies, and the weights are finite (the transformed
    weights meet the zeros around the image: 0 * inf). ``evaluation``: the layers' evaluation
    mode, where the transformed weights are reused and the one-channel lanes kernel may run."""
    if (
        winograd
        and winograd_applies(weight.shape, strides, dilations)
        and bool(np.isfinite(weight).all())
    ):
        _winograd_forward(_nhwc(x), weight, bias, pads[0], pads[2], bool(relu), y, bn, evaluation)
        return
    (sh, sw), (dh, dw) = strides, dilations
    f, c = weight.shape[0], weight.shape[1]
    nt = numba.get_num_threads()
    if c <= _conv2d_c1.LANES_MAX_CHANNELS and (sh, sw, dh, dw) == (1,) * 4:
        # an image's few channels (a network's first layer), bitwise the direct kernel: one
        # channel and few filters (LeNet-5's) on the tile's rows; a multiple of 8 filters (a
        # ResNet stem's, VGG's, a 3 -> 24 stem's) on the lanes in evaluation mode only, which
        # keeps its compilation out of the first training step
        if c == 1 and f <= _conv2d_c1.MAX_FILTERS:
            _conv2d_c1.conv2d_c1_forward(_nhwc(x), weight, bias, pads[0], pads[2], relu, y, bn, nt)
            return
        if evaluation and f % _conv2d_c1.HALF == 0:
            image, channels_last = _image_as_given(x)
            _conv2d_c1.conv2d_c1_lanes_forward(
                image, channels_last, weight, bias, pads[0], pads[2], relu, y, bn, nt
            )
            return
    _conv2d.conv2d_forward(
        _nhwc(x), weight, bias, sh, sw, pads[0], pads[2], dh, dw, relu, y, bn, nt
    )


def conv2d_forward(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Size2 = 1,
    padding: Padding = 0,
    dilation: Size2 = 1,
    relu: bool = False,
    layer: str = "Conv2D",
    winograd: bool = False,
    evaluation: bool = False,
    groups: int = 1,
) -> Array:
    """2-D cross-correlation (PyTorch's conv2d): x (N, C, H, W), weight (F, C, KH, KW),
    bias (F,) or None -> y (N, F, OH, OW), channels-last in memory. ``relu=True`` returns
    ``relu(y)`` from the same pass (the ReLU applied as the kernel stores y).

    ``groups`` (PyTorch's): weight (F, C / groups, KH, KW); group g's F / groups filters see
    its C / groups channels only. groups = C is the depthwise convolution
    (kernels/depthwise.py); other groups run the dense kernels group by group.

    ``winograd=True`` computes it by Winograd's F(4x4, 3x3) where :func:`winograd_applies` and
    the output is at least WINOGRAD4_MIN_SIZE square, else F(2x2, 3x3) (4x and 2.25x fewer
    multiply-adds; equal to the direct kernel up to float rounding, not bitwise,
    kernels/winograd4.py's more than winograd.py's): the layers ask for it, in training too
    (the gradients are the convolution's, as cuDNN's Winograd forward pairs with any
    backward). A NaN or infinity in x may then also reach outputs next to those whose window
    holds it (the transforms mix a 6x6 or 4x4 patch), where the direct kernel gives finite
    values. ``evaluation=True`` (the layers' evaluation mode: the weights stay as they are
    between calls) keeps the Winograd kernels' transformed weights for the next call, and
    lets the one-channel lanes kernel run."""
    x, weight, bias = _conv_args(x, weight, bias, layer)
    out_shape, strides, pads, dilations = conv2d_output_shape(
        x.shape, weight.shape, stride, padding, dilation, layer, groups
    )
    if bias is None:
        bias = np.zeros(weight.shape[0], dtype=x.dtype)
    n, f, oh, ow = out_shape
    y = _pool.empty((n, oh, ow, f), dtype=x.dtype)
    if y.size and groups != 1:
        _grouped_forward(
            x, weight, bias, strides, pads, dilations, bool(relu), y, groups, winograd, evaluation
        )
        return _nchw(y)
    if y.size:  # an empty batch: nothing to compute (PyTorch returns the empty output too)
        no_bn = _no_bn(x)
        _conv_kernel(
            x, weight, bias, strides, pads, dilations, bool(relu), y, no_bn, winograd, evaluation
        )
    return _nchw(y)


def _depthwise_weight(weight):
    """(F, 1, KH, KW) -> (KH, KW, F) C-contiguous: a tap's weights side by side, as the
    depthwise kernels read them."""
    return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0))


def _depthwise_input(x, multiplier):
    """x (N, C, H, W) as the (N, H, W, C * multiplier) input of a depthwise kernel: channel c
    repeated ``multiplier`` times side by side (filter c * multiplier + m reads channel c)."""
    xh = _nhwc(x)
    return xh if multiplier == 1 else np.repeat(xh, multiplier, axis=3)


def _grouped_forward(
    x, weight, bias, strides, pads, dilations, relu, y, groups, winograd, evaluation, bn=None
):
    """y (N, OH, OW, F) of a grouped convolution: the depthwise kernel where each group has one
    channel (with ``bn``, conv2d_forward's, applied to its rows), else the dense kernels
    (Winograd's where ``winograd`` and they apply) run on each group's channels and filters in
    turn (no ``bn`` there)."""
    (sh, sw), (dh, dw) = strides, dilations
    f, cg = weight.shape[0], weight.shape[1]
    if cg == 1:
        xd = _depthwise_input(x, f // groups)
        bn = _no_bn(y) if bn is None else bn
        _depthwise.depthwise_forward(
            xd, _depthwise_weight(weight), bias, sh, sw, pads[0], pads[2], dh, dw, relu, y, bn
        )
        return
    if bn is not None:
        raise ValueError("a BatchNorm is applied in the kernel of a depthwise convolution only")
    fg = f // groups
    part = _pool.empty(y.shape[:3] + (fg,), dtype=y.dtype)
    for g in range(groups):
        _conv_kernel(
            x[:, g * cg : (g + 1) * cg],
            np.ascontiguousarray(weight[g * fg : (g + 1) * fg]),
            bias[g * fg : (g + 1) * fg],
            strides,
            pads,
            dilations,
            relu,
            part,
            _no_bn(part),
            winograd,
            evaluation,
        )
        y[..., g * fg : (g + 1) * fg] = part


def _grouped_backward(x, weight, dy, strides, pads, dilations, input_grad, groups):
    """(dx (N, H, W, C) or None, dweight, dbias) of a grouped convolution, dy (N, OH, OW, F)
    channels-last: the depthwise kernels, or the dense gradients group by group."""
    (sh, sw), (dh, dw) = strides, dilations
    f, cg, kh, kw = weight.shape
    n, c, h, w = x.shape
    if cg == 1:
        m = f // groups
        xd = _depthwise_input(x, m)
        dwt = np.empty((kh, kw, f), dtype=x.dtype)
        dbias = _pool.empty(f, dtype=x.dtype)
        part_w = np.empty((n, kh, kw, f), dtype=x.dtype)
        part_b = np.empty((n, f), dtype=x.dtype)
        _depthwise.depthwise_backward_weight(
            xd, dy, sh, sw, pads[0], pads[2], dh, dw, part_w, part_b, dwt, dbias
        )
        dweight = np.ascontiguousarray(dwt.transpose(2, 0, 1))[:, None]
        dx = None
        if input_grad:
            dxd = _pool.empty((n, h, w, f), dtype=x.dtype)
            _depthwise.depthwise_backward_input(
                dy, _depthwise_weight(weight), sh, sw, pads[0], pads[2], dh, dw, dxd
            )
            dx = dxd if m == 1 else dxd.reshape(n, h, w, c, m).sum(axis=4)
        return dx, dweight, dbias
    fg = f // groups
    dweight = _pool.empty_like(weight)
    dbias = _pool.empty(f, dtype=x.dtype)
    dx = _pool.empty((n, h, w, c), dtype=x.dtype) if input_grad else None
    for g in range(groups):
        wg = np.ascontiguousarray(weight[g * fg : (g + 1) * fg])
        dyg = np.ascontiguousarray(dy[..., g * fg : (g + 1) * fg])
        dxg, dweight[g * fg : (g + 1) * fg], dbias[g * fg : (g + 1) * fg] = _dense_backward(
            x[:, g * cg : (g + 1) * cg], wg, dyg, strides, pads, dilations, input_grad
        )
        if dx is not None:
            dx[..., g * cg : (g + 1) * cg] = dxg
    return dx, dweight, dbias


def _no_bn(x):
    """conv2d_forward's ``bn`` argument when no BatchNorm follows: four empty arrays."""
    empty = np.empty(0, x.dtype)
    return (empty, empty, empty, empty)


def conv2d_batch_norm_eval_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    stride: Size2,
    padding: Padding,
    dilation: Size2,
    gamma: Array,
    beta: Array,
    running_mean: Array,
    running_var: Array,
    eps: float,
    relu: bool = False,
    layer: str = "Conv2D",
    bn_layer: str = "BatchNorm2D",
    winograd: bool = False,
    add: Array | None = None,
    add_layer: str = "Residual",
    evaluation: bool = False,
    groups: int = 1,
) -> Array:
    """``batch_norm_forward_eval(conv2d_forward(x, ..., winograd=winograd), ...)``, then
    ``+ add`` if given (a residual block's sum: ``add`` has the output's shape and dtype),
    then the ReLU if ``relu``, in one pass: bitwise the same output (channels-last in memory),
    the BatchNorm and the sum applied to each block of the convolution's output while it is in
    cache. ``groups``: 1, or the input's channels (the depthwise convolution: weight (F, 1,
    KH, KW))."""
    x, weight, bias = _conv_args(x, weight, bias, layer)
    out_shape, strides, pads, dilations = conv2d_output_shape(
        x.shape, weight.shape, stride, padding, dilation, layer, groups
    )
    if groups != 1 and weight.shape[1] != 1:
        raise ValueError(
            f"{layer}: a BatchNorm is applied in the convolution's kernel for groups=1 or the "
            f"depthwise convolution (groups = in_channels), got groups={groups} with "
            f"{weight.shape[1]} channels a group"
        )
    n, f, oh, ow = out_shape
    if add is None:
        add_flat = np.empty(0, x.dtype)
    else:
        add = check_float(add, add_layer, "input", contiguous=False)
        _same_dtype(add, x, add_layer, "input")
        if add.shape != tuple(out_shape):
            raise ValueError(
                f"{add_layer}: expected the sum's other term to have the convolution's output "
                f"shape {_fmt_shape(tuple(out_shape))}, got {_fmt_shape(add.shape)}"
            )
        add_flat = _nhwc(add).reshape(-1)
    params = []
    for name, p in (
        ("weight", gamma),
        ("bias", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        p = check_float(p, bn_layer, name)
        _check_shape_equal(p, (f,), bn_layer, name)
        _same_dtype(p, x, bn_layer, name)
        params.append(p)
    gamma, beta, running_mean, running_var = params
    if bias is None:
        bias = np.zeros(f, dtype=x.dtype)
    y = _pool.empty((n, oh, ow, f), dtype=x.dtype)
    if y.size:
        scale = _pool.empty(f, dtype=x.dtype)
        _batchnorm.eval_scale(gamma, running_var, x.dtype.type(eps), scale)
        bn = (running_mean, scale, beta, add_flat)
        if groups != 1:
            _grouped_forward(
                x, weight, bias, strides, pads, dilations, bool(relu), y, groups, False, False, bn
            )
        else:
            _conv_kernel(
                x, weight, bias, strides, pads, dilations, bool(relu), y, bn, winograd, evaluation
            )
    return _nchw(y)


def conv2d_relu_max_pool2d_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    stride: Size2,
    padding: Padding,
    dilation: Size2,
    pool_kernel: Size2,
    relu: bool = True,
    layer: str = "Conv2D",
    pool_layer: str = "MaxPool2D",
) -> tuple[Array, Array, Shape]:
    """``max_pool2d_forward(relu(conv2d_forward(x, ...)), pool_kernel)`` in one pass, for
    pooling windows that tile the convolution's output (stride = kernel, no padding): returns
    ``(y, argmax, conv_shape)``, y and argmax exactly (bitwise) as the two calls would give, and
    the shape the convolution's output would have had. The convolution's output is never
    stored, and the rows and columns the pooling drops are not computed."""
    x, weight, bias = _conv_args(x, weight, bias, layer)
    conv_shape, (sh, sw), pads, (dh, dw) = conv2d_output_shape(
        x.shape, weight.shape, stride, padding, dilation, layer
    )
    out_shape, (pkh, pkw), _, _ = pool2d_output_shape(conv_shape, pool_kernel, None, 0, pool_layer)
    if bias is None:
        bias = np.zeros(weight.shape[0], dtype=x.dtype)
    n, f, ph, pw = out_shape
    y = _pool.empty((n, ph, pw, f), dtype=x.dtype)
    argmax = _pool.empty((n, ph, pw, f), dtype=np.int64)
    if y.size:
        _fused.conv2d_relu_maxpool2d_forward(
            _nhwc(x),
            weight,
            bias,
            sh,
            sw,
            pads[0],
            pads[2],
            dh,
            dw,
            conv_shape[2],
            conv_shape[3],
            bool(relu),
            pkh,
            pkw,
            y,
            argmax,
        )
    return _nchw(y), _nchw(argmax), conv_shape


def conv2d_backward(
    x: Array,
    weight: Array,
    dy: Array,
    stride: Size2 = 1,
    padding: Padding = 0,
    dilation: Size2 = 1,
    layer: str = "Conv2D",
    bias: bool = True,
    input_grad: bool = True,
    groups: int = 1,
) -> tuple[Array | None, Array, Array | None]:
    """Gradients of ``conv2d_forward``: returns ``(dx, dweight, dbias)``; ``dx`` is None when
    ``input_grad`` is false (first layer of a network), ``dbias`` is None when ``bias`` is
    false. ``groups`` as the forward's."""
    x, weight, _ = _conv_args(x, weight, None, layer)
    out_shape, strides, pads, dilations = conv2d_output_shape(
        x.shape, weight.shape, stride, padding, dilation, layer, groups
    )
    dy = check_float(dy, layer, "gradient", contiguous=False)
    _same_dtype(dy, x, layer, "gradient")
    _check_shape_equal(dy, out_shape, layer, "gradient")
    if x.shape[0] == 0:
        # An empty batch: zero gradients. (The kernels would write nothing into their outputs:
        # their loops run over the images.)
        dx = np.zeros_like(x) if input_grad else None
        return dx, np.zeros_like(weight), (np.zeros(weight.shape[0], x.dtype) if bias else None)
    dy = _nhwc(dy)
    if groups != 1:
        dxh, dweight, dbias = _grouped_backward(
            x, weight, dy, strides, pads, dilations, input_grad, groups
        )
    else:
        dxh, dweight, dbias = _dense_backward(x, weight, dy, strides, pads, dilations, input_grad)
    return (None if dxh is None else _nchw(dxh)), dweight, (dbias if bias else None)


class BackwardKernels(NamedTuple):
    """The kernels of a convolution's backward (one group), as :func:`_backward_kernels`
    picks them for its shapes."""

    #: the weight gradient's kernel
    weight: Callable[..., Any]
    #: the input gradient's: a forward kernel's (the transposed convolution, by
    #: ``_winograd_forward`` or ``conv2d_forward``), the phases', col2im's or, through a max
    #: pool, the fused one; None without an input gradient
    input: Callable[..., Any] | None
    #: through a max pool: max_pool2d_conv2d_backward forms the pool's gradient and hands the
    #: whole backward to conv2d_backward (these kernels are then conv2d_backward's)
    unfused: bool


def _backward_kernels(
    weight: Array,
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilations: tuple[int, int],
    out_size: Sequence[int],
    input_grad: bool,
    pooled: bool = False,
    x: Array | None = None,
) -> BackwardKernels:
    """The kernels :func:`conv2d_backward` runs for a convolution of one group (``pooled``:
    :func:`max_pool2d_conv2d_backward`, for a max pool whose windows tile) with outputs of
    ``out_size`` (rows, columns): the one rule the backward passes follow and the compile
    helper asks (fastcnn/compile_helper.py). ``x``: the input, whose values decide the fused
    kernels' sparse sums (0 * inf would count); None takes it finite."""
    input_kernel = _input_gradient_kernel(weight, strides, pads, dilations) if input_grad else None
    if pooled:
        fused = _fused_backward_kernels(weight, strides, pads, dilations, input_kernel, x)
        if fused is not None:
            return fused
    if _weight_gradient_by_winograd(weight.shape, strides, pads, dilations):
        weight_kernel = (
            _winograd4.conv2d_winograd4_backward_weight
            if _weight_gradient_by_winograd4(out_size)
            else _winograd.conv2d_winograd_backward_weight
        )
    elif _weight_gradient_by_c1(weight.shape, strides, dilations):
        weight_kernel = _conv2d_c1.conv2d_c1_backward_weight
    else:
        weight_kernel = _conv2d.conv2d_backward_weight
    return BackwardKernels(weight_kernel, input_kernel, pooled)


def _fused_backward_kernels(weight, strides, pads, dilations, input_kernel, x):
    """The fused kernels of max_pool2d_conv2d_backward (``input_kernel``: conv2d_backward's
    choice, or None), or None where it runs conv2d_backward on the pool's gradient instead: a
    weight gradient by Winograd, or an input gradient asked for where the sparse sums cannot
    keep the dense kernels' order (channels not whole tiles, a weight gradient summed in
    chunks, x or the weights not finite)."""
    if _weight_gradient_by_winograd(weight.shape, strides, pads, dilations):
        return None
    sparse = (
        weight.shape[1] % _conv2d.FT == 0
        and _weight_gradient_in_pixel_order(weight.shape)
        and bool(np.isfinite(weight).all())
        and (x is None or bool(np.isfinite(x).all()))
    )
    if input_kernel is not None and not sparse:
        return None
    # the sparse input gradient reproduces col2im's order: where conv2d_backward takes the
    # transposed convolution or the phases instead, it is that of the pool's gradient
    if input_kernel is _conv2d.conv2d_backward_input:
        input_kernel = _fused.maxpool2d_conv2d_backward_input
    weight_kernel = (
        _fused.maxpool2d_conv2d_backward_weight
        if sparse
        else _fused.maxpool2d_conv2d_backward_weight_dense
    )
    return BackwardKernels(weight_kernel, input_kernel, False)


def _input_gradient_kernel(weight, strides, pads, dilations):
    """The input gradient's kernel for conv2d_backward: the transposed convolution as a forward
    one where it pays (by Winograd, or the direct kernel's tile), else phase by phase, else
    col2im."""
    if _input_gradient_by_winograd(weight, strides, pads, dilations):
        return _winograd_forward
    if _input_gradient_as_convolution(weight, strides, pads, dilations):
        return _conv2d.conv2d_forward
    if _input_gradient_by_phases(weight, strides, dilations):
        return _conv2d_phases.conv2d_backward_input_phases
    return _conv2d.conv2d_backward_input


def _dense_backward(x, weight, dy, strides, pads, dilations, input_grad):
    """(dx (N, H, W, C) or None, dweight, dbias) of a convolution with one group, dy
    (N, OH, OW, F) channels-last."""
    kernels = _backward_kernels(weight, strides, pads, dilations, dy.shape[1:3], input_grad)
    dweight = _pool.empty_like(weight)
    dbias = _pool.empty(weight.shape[0], dtype=x.dtype)
    _weight_gradient(kernels.weight, x, weight, dy, strides, pads, dilations, dweight, dbias)
    dx = None
    if kernels.input is not None:
        dx = _input_gradient(kernels.input, x.shape, weight, dy, strides, pads, dilations)
    return dx, dweight, dbias


def _weight_gradient(kernel, x, weight, dy, strides, pads, dilations, dweight, dbias):
    """Run ``kernel``, one of _backward_kernels' weight gradients (not the fused ones):
    dweight and dbias from x (N, C, H, W) and dy (N, OH, OW, F) channels-last."""
    (sh, sw), (dh, dw) = strides, dilations
    threads = numba.get_num_threads()
    if kernel is _conv2d.conv2d_backward_weight:
        kernel(_nhwc(x), dy, sh, sw, pads[0], pads[2], dh, dw, dweight, dbias, threads)
    elif kernel is _conv2d_c1.conv2d_c1_backward_weight:
        # one channel, few filters: bitwise the direct kernel, following its pixel chunks
        f, _, kh, kw = weight.shape
        n_pixels = dy.shape[0] * dy.shape[1] * dy.shape[2]
        plan = _conv2d._weight_plan(kh * kw, f, n_pixels, f <= _conv2d.FTN, False, threads)
        kernel(_nhwc(x), dy, pads[0], pads[2], dweight, dbias, plan[3], plan[6])
    elif kernel in (
        _winograd4.conv2d_winograd4_backward_weight,
        _winograd.conv2d_winograd_backward_weight,
    ):
        kernel(_nhwc(x), dy, pads[0], pads[2], dweight, dbias, threads)
    else:
        raise AssertionError(f"not a weight gradient of conv2d_backward: {kernel}")


def _input_gradient(kernel, x_shape, weight, dy, strides, pads, dilations):
    """The input gradient (N, H, W, C) of a convolution from dy (N, OH, OW, F) channels-last by
    ``kernel``, one of _backward_kernels' input gradients (not the fused one)."""
    n, c, h, w = x_shape
    dx = _pool.empty((n, h, w, c), dtype=dy.dtype)
    (sh, sw), (dh, dw) = strides, dilations
    kh, kw = weight.shape[2], weight.shape[3]
    threads = numba.get_num_threads()
    if kernel is _winograd_forward:
        zeros = np.zeros(c, dy.dtype)
        kernel(dy, _flipped_weight(weight), zeros, 2 - pads[0], 2 - pads[2], False, dx, _no_bn(dx))
    elif kernel is _conv2d.conv2d_forward:
        kernel(
            dy,
            _flipped_weight(weight),
            np.zeros(c, dy.dtype),
            1,
            1,
            dh * (kh - 1) - pads[0],
            dw * (kw - 1) - pads[2],
            dh,
            dw,
            False,
            dx,
            _no_bn(dx),
            threads,
        )
    elif kernel is _conv2d_phases.conv2d_backward_input_phases:
        kernel(dy, weight, sh, sw, pads[0], pads[2], dx, threads)
    elif kernel is _conv2d.conv2d_backward_input:
        kernel(dy, weight, sh, sw, pads[0], pads[2], dh, dw, dx, threads)
    else:
        raise AssertionError(f"not an input gradient of conv2d_backward: {kernel}")
    return dx


def _weight_gradient_by_winograd(weight_shape, stride, pads, dilation):
    """Whether a convolution's weight gradient is computed by Winograd's F(2x2, 3x3) run
    backwards (kernels/winograd.py): 3x3, stride 1, dilation 1, padded by 1 on every side
    (as 'same'; the rule of the input gradient), channels and filters multiples of 16
    (1.25-2.3x the direct kernel, 16 channels included). ``FASTCNN_WINOGRAD=0`` turns it
    off."""
    f, c, kh, kw = (int(v) for v in weight_shape)
    return (
        (kh, kw) == (3, 3)
        and stride == (1, 1)
        and dilation == (1, 1)
        and all(p == 1 for p in pads)
        and c % 16 == 0
        and f % 16 == 0
        and winograd_enabled()
    )


def _weight_gradient_by_winograd4(out_size):
    """Whether a Winograd weight gradient (``_weight_gradient_by_winograd``) runs on F(4x4,
    3x3) (kernels/winograd4.py) rather than F(2x2, 3x3), for outputs of ``out_size`` (rows,
    columns): the forward's rule, both at least WINOGRAD4_MIN_SIZE. (Where 4x4 tiles cover
    more past the edge than 2x2 ones, as 14 -> 16 against 14, F(4x4) is 0.9x F(2x2); a
    network with such a stage would otherwise compile both weight gradients.)"""
    return all(n >= WINOGRAD4_MIN_SIZE for n in out_size)


def _weight_gradient_by_c1(weight_shape, stride, dilation):
    """Whether a convolution's weight gradient runs on the one-channel kernel
    (kernels/conv2d_c1.py): one channel, at most its MAX_FILTERS filters and FTN columns, stride and
    dilation 1."""
    f, c, kh, kw = (int(v) for v in weight_shape)
    return (
        c == 1
        and f <= _conv2d_c1.MAX_FILTERS
        and kw <= _conv2d_c1.FTN
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
    )


def _input_gradient_by_winograd(weight, stride, pads, dilation):
    """Whether a 3x3 stride-1 convolution's input gradient is computed by Winograd (the forward
    kernels, F(4x4) or F(2x2) by the size as :func:`_winograd_forward` picks): the transposed
    convolution is the 3x3 stride-1 convolution of dy (F channels) with the flipped weights
    (C filters), padding ``2 - pad``, and runs where
    :func:`winograd_applies` to that shape and the forward pads by 1 on every side, as
    'same' does (1.35-2.3x col2im). Not a 'valid' convolution: its
    transposed one pads by 2, and only gained 1.12x, less than the pooled backward's sparse
    input gradient (max_pool2d_conv2d_backward) that it would replace. Finite weights only,
    as :func:`_input_gradient_as_convolution`."""
    f, c, kh, kw = weight.shape
    return (
        stride == (1, 1)
        and dilation == (1, 1)
        and all(p == 1 for p in pads)
        and winograd_applies((c, f, kh, kw))
        and bool(np.isfinite(weight).all())
    )


def _input_gradient_as_convolution(weight, stride, pads, dilation):
    """Whether a stride-1 convolution's input gradient is computed as the forward convolution
    of dy with the flipped weights (``_flipped_weight``, padding ``dilation * (k - 1) - pad``)
    instead of col2im: with at most 16 filters col2im's products are only 16 terms long, the
    forward's are taps x filters long (``bench/bench_conv.py`` times both), and 16 or more
    channels fill the forward's tile columns. An unpadded 1x1 convolution's too, whatever its
    channels: there col2im's scatter is a copy into a zeroed gradient, the forward stores its
    tiles once (MobileNet's pointwise layers, weight and input gradient together, 2 threads:
    1.01-1.16x). Finite weights only: the forward also multiplies the zeros around dy by every
    weight, and 0 * inf is NaN."""
    f, c, kh, kw = weight.shape
    reach = (
        dilation[0] * (kh - 1),
        dilation[0] * (kh - 1),
        dilation[1] * (kw - 1),
        dilation[1] * (kw - 1),
    )
    return (
        stride == (1, 1)
        and ((f <= _conv2d.FTN and c >= _conv2d.FTN) or kh == kw == 1)
        and all(p <= r for p, r in zip(pads, reach, strict=True))
        and bool(np.isfinite(weight).all())
    )


def _input_gradient_by_phases(weight, stride, dilation):
    """Whether a strided convolution's input gradient is computed phase by phase
    (kernels/conv2d_phases.py) instead of col2im: dilation 1, and 8 to 16 channels (one column
    block of the narrow tile, 8 of them padded) or whole blocks of 16. Against col2im (2
    threads, docs/kernels.md): 3x3 stride 2 with 16-128 channels 1.14-1.97x, 8
    channels 1.52x, 1x1 0.9-1.4x (a ResNet's shortcuts, taken all the same: such a network then
    compiles one of the two kernels, not both); 24 channels (a partial block) 0.93-1.05x and 3
    channels 0.31x stay on col2im. Finite weights only, as
    :func:`_input_gradient_as_convolution` (the zeros around dy meet every weight)."""
    f, c, kh, kw = weight.shape
    return (
        stride != (1, 1)
        and dilation == (1, 1)
        and c >= 8
        and (c <= _conv2d.FTN or c % _conv2d.FTN == 0)
        and bool(np.isfinite(weight).all())
    )


def _flipped_weight(weight):
    """(C, F, KH, KW): weight with filters and channels swapped and the kernel turned by 180
    degrees, the weights of the transposed (input-gradient) convolution."""
    return np.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def _weight_gradient_in_pixel_order(weight_shape):
    """Whether conv2d_backward_weight sums every pixel in order for this weight shape (many
    output tiles: kernels/conv2d.py), the order the max pool shortcut reproduces."""
    f, c, kh, kw = (int(v) for v in weight_shape)
    return bool(_conv2d._weight_in_pixel_order(kh * kw * c, f))


def max_pool2d_conv2d_backward(
    x: Array,
    weight: Array,
    dy: Array,
    argmax: Array,
    pooled: Array,
    conv_shape: Sequence[int],
    pool_kernel: Size2,
    stride: Size2 = 1,
    padding: Padding = 0,
    dilation: Size2 = 1,
    relu: bool = True,
    bias: bool = True,
    input_grad: bool = True,
    layer: str = "Conv2D",
    pool_layer: str = "MaxPool2D",
) -> tuple[Array | None, Array, Array | None]:
    """The convolution's gradients ``(dx, dweight, dbias)`` for the gradient ``dy`` of a max
    pooling (windows that tile: stride = kernel, no padding) of its output, through the ReLU
    between them if ``relu``: bitwise ``conv2d_backward(x, weight, max_pool2d_backward(dy,
    argmax, conv_shape, pool_kernel, relu_output=pooled))``, without forming the pooling's
    gradient. Below a 2x2 pool 3/4 of it are zeros; kernels/fused.py sums only the selected
    cells' terms, in the dense kernels' order. Where that order cannot be kept (channels not a
    multiple of 32, a weight gradient summed in chunks) or 0 * inf terms would count (x or
    weight not finite), the weight gradient is the dense product with the pooling's gradient
    rebuilt block by block in cache (``maxpool2d_conv2d_backward_weight_dense``: the
    reference network's conv1), and an input gradient, if asked for, takes the two calls."""
    x, weight, _ = _conv_args(x, weight, None, layer)
    shape, (sh, sw), pads, (dh, dw) = conv2d_output_shape(
        x.shape, weight.shape, stride, padding, dilation, layer
    )
    conv_shape = tuple(int(s) for s in conv_shape)
    if conv_shape != shape:
        raise ValueError(
            f"{layer}: expected the pooling's input shape {_fmt_shape(shape)}, "
            f"got {_fmt_shape(conv_shape)}"
        )
    out_shape, (pkh, pkw), _, _ = pool2d_output_shape(conv_shape, pool_kernel, None, 0, pool_layer)
    dy = check_float(dy, pool_layer, "gradient", contiguous=False)
    _same_dtype(dy, x, pool_layer, "gradient")
    _check_shape_equal(dy, out_shape, pool_layer, "gradient")
    argmax = np.asarray(argmax)
    if argmax.dtype != np.int64:
        raise TypeError(f"{pool_layer}: expected int64 argmax indices, got dtype {argmax.dtype}")
    _check_shape_equal(argmax, out_shape, pool_layer, "argmax")
    pooled = check_float(pooled, pool_layer, "pooled output", contiguous=False)
    _same_dtype(pooled, x, pool_layer, "pooled output")
    _check_shape_equal(pooled, out_shape, pool_layer, "pooled output")
    n, c = x.shape[0], x.shape[1]
    kernels = _backward_kernels(
        weight, (sh, sw), pads, (dh, dw), shape[2:], input_grad, pooled=True, x=x
    )

    def pool_gradient():  # the convolution's gradient, formed
        return max_pool2d_backward(
            dy,
            argmax,
            conv_shape,
            pool_kernel,
            relu_output=pooled if relu else None,
            layer=pool_layer,
        )

    if n == 0 or kernels.unfused:
        dconv = pool_gradient()
        return conv2d_backward(x, weight, dconv, stride, padding, dilation, layer, bias, input_grad)
    dyh, amh, yh = _nhwc(dy), _nhwc(argmax), _nhwc(pooled)
    oh, ow = conv_shape[2], conv_shape[3]
    dweight = _pool.empty_like(weight)
    dbias = _pool.empty(weight.shape[0], dtype=x.dtype)
    kernels.weight(
        _nhwc(x),
        dyh,
        amh,
        yh,
        bool(relu),
        pkh,
        pkw,
        oh,
        ow,
        sh,
        sw,
        pads[0],
        pads[2],
        dh,
        dw,
        dweight,
        dbias,
    )
    dx = None
    if kernels.input is _fused.maxpool2d_conv2d_backward_input:
        h, w = x.shape[2], x.shape[3]
        dx = _pool.empty((n, h, w, c), dtype=x.dtype)
        kernels.input(
            dyh, amh, yh, bool(relu), pkh, pkw, weight, sh, sw, pads[0], pads[2], dh, dw, oh, ow, dx
        )
        dx = _nchw(dx)
    elif kernels.input is not None:
        dconv = _nhwc(pool_gradient())
        dx = _nchw(_input_gradient(kernels.input, x.shape, weight, dconv, (sh, sw), pads, (dh, dw)))
    return dx, dweight, (dbias if bias else None)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------


def max_pool2d_forward(
    x: Array,
    kernel_size: Size2,
    stride: Size2 | None = None,
    padding: Padding = 0,
    layer: str = "MaxPool2D",
) -> tuple[Array, Array]:
    """Max pooling: x (N, C, H, W) -> ``(y, argmax)``, argmax int64 = flat index ``h * W + w``
    of the selected cell in the unpadded input plane (PyTorch's return_indices); both
    channels-last in memory."""
    x = check_float(x, layer, contiguous=False)
    out_shape, (kh, kw), (sh, sw), pads = pool2d_output_shape(
        x.shape, kernel_size, stride, padding, layer
    )
    n, c, oh, ow = out_shape
    y = _pool.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = _pool.empty((n, oh, ow, c), dtype=np.int64)
    _pool2d.maxpool2d_forward(_nhwc(x), kh, kw, sh, sw, pads[0], pads[2], y, argmax)
    return _nchw(y), _nchw(argmax)


def max_pool2d_backward(
    dy: Array,
    argmax: Array,
    input_shape: Sequence[int],
    kernel_size: Size2 | None = None,
    stride: Size2 | None = None,
    padding: Padding = 0,
    relu_output: Array | None = None,
    layer: str = "MaxPool2D",
) -> Array:
    """Gradient of max pooling: dy added at ``argmax`` in a zero (N, C, H, W) array.

    With the forward's ``kernel_size`` (and ``stride``, ``padding``) given, windows that tile
    the input take the kernel's faster path (no zeroing pass); the result is the same.
    ``relu_output``: the pooling's forward output y, when its input was a ReLU's output; the
    result is then also the gradient through that ReLU (zero where y <= 0), in the same pass.
    """
    dy = check_float(dy, layer, "gradient", contiguous=False)
    argmax = np.asarray(argmax)
    if argmax.dtype.kind not in "iu":
        raise TypeError(f"{layer}: expected integer argmax indices, got dtype {argmax.dtype}")
    if argmax.dtype != np.int64:
        argmax = argmax.astype(np.int64)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 4 or dy.ndim != 4 or dy.shape[:2] != input_shape[:2]:
        raise ValueError(
            f"{layer}: expected gradient of shape "
            f"({', '.join(str(s) for s in input_shape[:2])}, OH, OW), "
            f"got {_fmt_shape(dy.shape)}"
        )
    _check_shape_equal(argmax, dy.shape, layer, "argmax")
    geometry = (0, 0, 0, 0, 0, 0)  # unknown: the kernel's general path
    if kernel_size is not None:
        out_shape, (kh, kw), (sh, sw), pads = pool2d_output_shape(
            input_shape, kernel_size, stride, padding, layer
        )
        _check_shape_equal(dy, out_shape, layer, "gradient")
        geometry = (kh, kw, sh, sw, pads[0], pads[2])
    if argmax.size and (argmax.min() < 0 or argmax.max() >= input_shape[2] * input_shape[3]):
        raise ValueError(f"{layer}: argmax indices out of range for input {input_shape}")
    dy = _nhwc(dy)
    mask = dy  # not read unless relu_output is given
    if relu_output is not None:
        relu_output = check_float(relu_output, layer, "relu_output", contiguous=False)
        _same_dtype(relu_output, dy, layer, "relu_output")
        _check_shape_equal(relu_output, argmax.shape, layer, "relu_output")
        mask = _nhwc(relu_output)
    n, c, h, w = input_shape
    dx = _pool.empty((n, h, w, c), dtype=dy.dtype)
    _pool2d.maxpool2d_backward(dy, _nhwc(argmax), mask, relu_output is not None, *geometry, dx)
    return _nchw(dx)


def avg_pool2d_forward(
    x: Array,
    kernel_size: Size2,
    stride: Size2 | None = None,
    padding: Padding = 0,
    layer: str = "AvgPool2D",
) -> Array:
    """Average pooling, padded cells counting as zeros in the divisor (count_include_pad=True)."""
    x = check_float(x, layer, contiguous=False)
    out_shape, (kh, kw), (sh, sw), pads = pool2d_output_shape(
        x.shape, kernel_size, stride, padding, layer
    )
    n, c, oh, ow = out_shape
    y = _pool.empty((n, oh, ow, c), dtype=x.dtype)
    _pool2d.avgpool2d_forward(_nhwc(x), kh, kw, sh, sw, pads[0], pads[2], y)
    return _nchw(y)


def avg_pool2d_backward(
    dy: Array,
    input_shape: Sequence[int],
    kernel_size: Size2,
    stride: Size2 | None = None,
    padding: Padding = 0,
    layer: str = "AvgPool2D",
) -> Array:
    """Gradient of average pooling with respect to its (N, C, H, W) input."""
    dy = check_float(dy, layer, "gradient", contiguous=False)
    out_shape, (kh, kw), (sh, sw), pads = pool2d_output_shape(
        input_shape, kernel_size, stride, padding, layer
    )
    _check_shape_equal(dy, out_shape, layer, "gradient")
    n, c = out_shape[:2]
    h, w = (int(s) for s in input_shape[2:])
    dx = _pool.empty((n, h, w, c), dtype=dy.dtype)
    _pool2d.avgpool2d_backward(_nhwc(dy), kh, kw, sh, sw, pads[0], pads[2], dx)
    return _nchw(dx)


def global_avg_pool2d_output_shape(
    input_shape: Sequence[int], layer: str = "GlobalAvgPool2D"
) -> Shape:
    """(N, C, H, W) -> (N, C), validated (H, W >= 1)."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 4:
        raise ValueError(
            f"{layer}: expected input of shape (N, C, H, W), got {_fmt_shape(input_shape)}"
        )
    _positive_spatial(input_shape, layer)
    return input_shape[:2]


def global_avg_pool2d_forward(x: Array, layer: str = "GlobalAvgPool2D") -> Array:
    """The mean of each channel over its plane: x (N, C, H, W) -> y (N, C)."""
    x = check_float(x, layer, contiguous=False)
    out_shape = global_avg_pool2d_output_shape(x.shape, layer)
    y = _pool.empty(out_shape, dtype=x.dtype)
    _pool2d.global_avgpool2d_forward(_nhwc(x), y)
    return y


def global_avg_pool2d_backward(
    dy: Array, input_shape: Sequence[int], layer: str = "GlobalAvgPool2D"
) -> Array:
    """Gradient of the global average pooling with respect to its (N, C, H, W) input:
    ``dy[n, c] / (H * W)`` in every cell, channels-last in memory."""
    dy = check_float(dy, layer, "gradient")
    out_shape = global_avg_pool2d_output_shape(input_shape, layer)
    _check_shape_equal(dy, out_shape, layer, "gradient")
    n, c, h, w = (int(s) for s in input_shape)
    dx = _pool.empty((n, h, w, c), dtype=dy.dtype)
    _pool2d.global_avgpool2d_backward(dy, dx)
    return _nchw(dx)


# ---------------------------------------------------------------------------------------------
# activations (ReLU is a kernel; the others are single numpy expressions)
# ---------------------------------------------------------------------------------------------


def _grad_like(dy, y, layer, contiguous=True):
    """dy as a float array of y's dtype and shape (y: the forward's output, or an array of its
    dtype and shape), else TypeError/ValueError naming the layer."""
    dy = check_float(dy, layer, "gradient", contiguous)
    check_grad_dtype(dy, y.dtype, layer)  # dtype first, then shape: as every entry point
    _check_shape_equal(dy, y.shape, layer, "gradient")
    return dy


def check_grad_dtype(dy: Array, dtype: DTypeLike, layer: str) -> None:
    """TypeError unless the gradient dy has the forward output's dtype: one message for a
    layer run alone and inside a fused plan step."""
    if dy.dtype != dtype:
        raise TypeError(
            f"{layer}: gradient dtype {dy.dtype} does not match the dtype of "
            f"the forward output {np.dtype(dtype)}"
        )


def _elementwise(kernel, a, b, layer, b_name, *args):
    """out = kernel(a, b, *args, out) over a and b of one shape, in b's memory layout."""
    b = _one_block(check_float(b, layer, b_name, contiguous=False))
    a = _layout_like(_grad_like(a, b, layer, contiguous=False), b)
    out = _pool.empty_like(b)
    kernel(_flat(a), _flat(b), *args, _flat(out))
    return out


def relu_forward(x: Array, layer: str = "ReLU") -> Array:
    """max(x, 0), any shape; NaN propagates. The result has x's memory layout (a
    channels-last activation stays channels-last)."""
    x = _one_block(check_float(x, layer, contiguous=False))
    y = _pool.empty_like(x)  # the same memory order as x
    # 1-D views in memory order: one compiled signature per dtype whatever the rank.
    _activations.relu_forward(_flat(x), _flat(y))
    return y


def add(a: Array, b: Array, layer: str = "Residual") -> Array:
    """a + b for two arrays of one shape and dtype (bitwise ``np.add``), on every thread; in
    a's memory layout (b copied to it if they differ)."""
    return _add(_activations.add, a, b, layer)


def _add(kernel, a, b, layer):
    a = _one_block(check_float(a, layer, contiguous=False))
    b = check_float(b, layer, "second operand", contiguous=False)
    _same_dtype(b, a, layer, "second operand")
    _check_shape_equal(b, a.shape, layer, "second operand")
    b = _layout_like(b, a)
    y = _pool.empty_like(a)
    kernel(_flat(a), _flat(b), _flat(y))
    return y


def add_relu_forward(a: Array, b: Array, layer: str = "Residual") -> Array:
    """relu(a + b) for two arrays of one shape and dtype, in one pass (bitwise ``np.add``
    then ``relu_forward``); in a's memory layout (b copied to it if they differ)."""
    return _add(_activations.add_relu_forward, a, b, layer)


def relu_backward(dy: Array, y: Array, layer: str = "ReLU") -> Array:
    """dy where the forward output y > 0, else 0; in y's memory layout."""
    return _elementwise(_activations.relu_backward, dy, y, layer, "forward output")


# Tanh's and Sigmoid's forward passes are numpy's (its vectorised tanh and exp); their backward
# passes and LeakyReLU are kernels. All keep the input's memory layout (a channels-last
# activation stays channels-last: a C-ordered copy per call was 8% of a LeNet-5 step).


def leaky_relu_forward(x: Array, negative_slope: float = 0.01, layer: str = "LeakyReLU") -> Array:
    x = _one_block(check_float(x, layer, contiguous=False))
    y = _pool.empty_like(x)
    _activations.leaky_relu_forward(_flat(x), x.dtype.type(negative_slope), _flat(y))
    return y


def leaky_relu_backward(
    dy: Array, x: Array, negative_slope: float = 0.01, layer: str = "LeakyReLU"
) -> Array:
    """Gradient with respect to the forward *input* x (slope where x <= 0, as PyTorch)."""
    x = check_float(x, layer, "forward input", contiguous=False)
    return _elementwise(
        _activations.leaky_relu_backward,
        dy,
        x,
        layer,
        "forward input",
        x.dtype.type(negative_slope),
    )


def tanh_forward(x: Array, layer: str = "Tanh") -> Array:
    """tanh(x), any shape, in x's memory layout. float32 on every thread by Eigen's rational
    function (kernels/activations.py: within 6 ulp, as TensorFlow's); float64 by numpy."""
    x = check_float(x, layer, contiguous=False)
    if x.dtype != np.float32 or x.ndim == 0:
        # np.asarray: a ufunc returns a numpy scalar, not a 0-d array, for a 0-d input
        return np.asarray(np.tanh(x))
    x = _one_block(x)
    y = _pool.empty_like(x)  # the same memory order as x
    _activations.tanh_forward(_flat(x), _flat(y))
    return y


def tanh_backward(dy: Array, y: Array, layer: str = "Tanh") -> Array:
    """dy * (1 - y * y), y the forward output."""
    return _elementwise(_activations.tanh_backward, dy, y, layer, "forward output")


def sigmoid_forward(x: Array, layer: str = "Sigmoid") -> Array:
    """1 / (1 + exp(-x)) without overflow: exp is only taken of -|x|."""
    x = check_float(x, layer, contiguous=False)
    e = np.exp(-np.abs(x))
    one = x.dtype.type(1)
    return np.asarray(np.where(x >= 0, one / (one + e), e / (one + e)))


def sigmoid_backward(dy: Array, y: Array, layer: str = "Sigmoid") -> Array:
    """dy * y * (1 - y), y the forward output."""
    return _elementwise(_activations.sigmoid_backward, dy, y, layer, "forward output")


def softmax_forward(x: Array, dim: int = 1, layer: str = "Softmax") -> Array:
    x = check_float(x, layer)
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(
            f"{layer}: dim {dim} out of range for an input of rank {x.ndim} "
            f"(shape {_fmt_shape(x.shape)})"
        )
    if x.size == 0:  # nothing to normalise (np.max would refuse an empty axis)
        return x.copy()
    e = np.exp(x - np.max(x, axis=dim, keepdims=True))
    return np.asarray(e / np.sum(e, axis=dim, keepdims=True))


def softmax_backward(dy: Array, y: Array, dim: int = 1, layer: str = "Softmax") -> Array:
    """dx = y * (dy - sum(dy * y, dim))."""
    dy = _grad_like(dy, y, layer)
    return np.asarray(y * (dy - np.sum(dy * y, axis=dim, keepdims=True)))


# ---------------------------------------------------------------------------------------------
# batch normalisation (x is (N, C, H, W); BatchNorm1D passes (N, C, L, 1))
# ---------------------------------------------------------------------------------------------


def _channels_last(x):
    """Whether a 4-D array's memory is channels-last and not also NCHW-contiguous (a
    convolution's or pooling's output): the batch norm then runs on it as it is."""
    return not x.flags.c_contiguous and x.transpose(0, 2, 3, 1).flags.c_contiguous


def _bn_args(x, layer, *params):
    """x checked (4-D, floating) and, unless channels-last, made C-contiguous; the per-channel
    parameters checked against it."""
    x = check_float(x, layer, contiguous=False)
    if x.ndim != 4:
        raise ValueError(
            f"{layer}: expected input of shape (N, C, H, W), got {_fmt_shape(x.shape)}"
        )
    if not _channels_last(x):
        x = np.require(x, requirements="C")
    c = x.shape[1]
    out = []
    for name, p in params:
        p = check_float(p, layer, name)
        _check_shape_equal(p, (c,), layer, name)
        _same_dtype(p, x, layer, name)
        out.append(p)
    return x, out


def _pixels(a):
    """A channels-last (N, C, H, W) array as the (N*H*W, C) matrix the _nhwc kernels take."""
    return _nhwc(a).reshape(-1, a.shape[1])


def batch_norm_forward_train(
    x: Array,
    gamma: Array,
    beta: Array,
    eps: float = 1e-5,
    layer: str = "BatchNorm2D",
    relu: bool = False,
) -> tuple[Array, Array, Array]:
    """Normalise with the batch statistics over (N, H, W): returns ``(y, mean, invstd)`` with
    ``invstd = 1 / sqrt(biased_var + eps)``; ``relu=True`` returns ``relu(y)`` instead, bitwise
    ``relu_forward(y)`` (on a convolution's channels-last output, in the same pass)."""
    return _batch_norm_forward_train(x, gamma, beta, eps, layer, relu)[:3]


def _batch_norm_forward_train(x, gamma, beta, eps, layer, relu):
    x, (gamma, beta) = _bn_args(x, layer, ("weight", gamma), ("bias", beta))
    n, c, h, w = x.shape
    if n * h * w < 2:
        raise ValueError(
            f"{layer}: expected more than 1 value per channel when training, "
            f"got input of shape {_fmt_shape(x.shape)}"
        )
    mean = _pool.empty(c, dtype=x.dtype)
    invstd = _pool.empty(c, dtype=x.dtype)
    if _channels_last(x):  # a convolution's output: no layout conversion
        y = _pool.empty((n, h, w, c), dtype=x.dtype)
        affine = np.empty((2, c), dtype=x.dtype)
        _batchnorm.batchnorm_forward_train_nhwc(
            _pixels(x), gamma, beta, x.dtype.type(eps), y.reshape(-1, c), mean, invstd, relu, affine
        )
        return _nchw(y), mean, invstd, affine
    y = _pool.empty_like(x)
    _batchnorm.batchnorm_forward_train(x, gamma, beta, x.dtype.type(eps), y, mean, invstd)
    if relu:
        y = relu_forward(y, layer)
    return y, mean, invstd, None


def batch_norm_relu_forward_train(
    x: Array, gamma: Array, beta: Array, eps: float = 1e-5, layer: str = "BatchNorm2D"
) -> tuple[Array, Array, Array, Array | None]:
    """``batch_norm_forward_train(x, ..., relu=True)`` and what :func:`batch_norm_relu_backward`
    needs besides: returns ``(y, mean, invstd, affine)``, ``affine`` the normalisation's (2, C)
    scale and shift (None unless x is channels-last, as a convolution's output)."""
    return _batch_norm_forward_train(x, gamma, beta, eps, layer, True)


def batch_norm_relu_backward(
    dy: Array,
    x: Array,
    y: Array,
    gamma: Array,
    mean: Array,
    invstd: Array,
    affine: Array | None,
    layer: str = "BatchNorm2D",
) -> tuple[Array, Array, Array]:
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`batch_norm_relu_forward_train` from dy, the
    gradient of its output y: bitwise ``batch_norm_backward(relu_backward(dy, y), ...)``. With
    ``affine`` (a channels-last x) the BatchNorm's kernel recomputes the ReLU's mask from x as
    it reads it, and the ReLU's own pass over memory (read dy and y, write its gradient) is
    saved."""
    if affine is None or not _channels_last(x):
        return batch_norm_backward(relu_backward(dy, y, layer), x, gamma, mean, invstd, layer)
    return _batch_norm_backward(dy, x, gamma, mean, invstd, layer, affine)


def batch_norm_forward_eval(
    x: Array,
    gamma: Array,
    beta: Array,
    running_mean: Array,
    running_var: Array,
    eps: float = 1e-5,
    layer: str = "BatchNorm2D",
) -> Array:
    """Normalise with the running statistics."""
    x, (gamma, beta, running_mean, running_var) = _bn_args(
        x,
        layer,
        ("weight", gamma),
        ("bias", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    if _channels_last(x):
        n, c, h, w = x.shape
        y = _pool.empty((n, h, w, c), dtype=x.dtype)
        _batchnorm.batchnorm_forward_eval_nhwc(
            _pixels(x), gamma, beta, running_mean, running_var, x.dtype.type(eps), y.reshape(-1, c)
        )
        return _nchw(y)
    y = _pool.empty_like(x)
    _batchnorm.batchnorm_forward_eval(
        x, gamma, beta, running_mean, running_var, x.dtype.type(eps), y
    )
    return y


def batch_norm_backward(
    dy: Array,
    x: Array,
    gamma: Array,
    mean: Array,
    invstd: Array,
    layer: str = "BatchNorm2D",
) -> tuple[Array, Array, Array]:
    """Gradients of the training-mode forward: ``(dx, dgamma, dbeta)``."""
    return _batch_norm_backward(dy, x, gamma, mean, invstd, layer, None)


def _checked_affine(affine, x, layer):
    """batch_norm_relu_forward_train's (2, C) affine for x (N, C, H, W): C-contiguous, in x's
    dtype, else TypeError/ValueError naming the layer."""
    affine = check_float(affine, layer, "affine")
    _same_dtype(affine, x, layer, "affine")
    _check_shape_equal(affine, (2, x.shape[1]), layer, "affine")
    return affine


def _batch_norm_backward(dy, x, gamma, mean, invstd, layer, relu_affine):
    """batch_norm_backward; with ``relu_affine`` (channels-last x only) dy is the gradient of
    relu(forward), the ReLU's mask recomputed from x (batchnorm_backward_nhwc)."""
    x, (gamma, mean, invstd) = _bn_args(
        x, layer, ("weight", gamma), ("mean", mean), ("invstd", invstd)
    )
    dgamma = _pool.empty_like(gamma)
    dbeta = _pool.empty_like(gamma)
    if _channels_last(x):  # the forward's input: dy (the next layer's gradient) follows it
        dy = _grad_like(dy, x, layer, contiguous=False)
        n, c, h, w = x.shape
        dx = _pool.empty((n, h, w, c), dtype=x.dtype)
        relu = relu_affine is not None
        # without the ReLU the kernel reads (2, C) values and does not use them
        affine = _checked_affine(relu_affine, x, layer) if relu else np.zeros((2, c), x.dtype)
        _batchnorm.batchnorm_backward_nhwc(
            _pixels(dy),
            _pixels(x),
            gamma,
            mean,
            invstd,
            dx.reshape(-1, c),
            dgamma,
            dbeta,
            relu,
            affine,
        )
        return _nchw(dx), dgamma, dbeta
    dy = _grad_like(dy, x, layer)
    dx = _pool.empty_like(x)
    _batchnorm.batchnorm_backward(dy, x, gamma, mean, invstd, dx, dgamma, dbeta)
    return dx, dgamma, dbeta


def batch_norm_backward_eval(
    dy: Array,
    x: Array,
    gamma: Array,
    running_mean: Array,
    running_var: Array,
    eps: float = 1e-5,
    layer: str = "BatchNorm2D",
) -> tuple[Array, Array, Array]:
    """Gradients of the eval-mode forward (statistics are constants): ``(dx, dgamma, dbeta)``."""
    x, (gamma, running_mean, running_var) = _bn_args(
        x, layer, ("weight", gamma), ("running_mean", running_mean), ("running_var", running_var)
    )
    dy = _grad_like(dy, x, layer)
    invstd = (x.dtype.type(1) / np.sqrt(running_var + x.dtype.type(eps)))[None, :, None, None]
    xhat = (x - running_mean[None, :, None, None]) * invstd
    dx = dy * (gamma[None, :, None, None] * invstd)
    return dx, np.sum(dy * xhat, axis=(0, 2, 3)), np.sum(dy, axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# dense (kernels/dense.py, on Numba's threads: numpy's matmul ran on one BLAS thread, 63-68
# GFLOP/s at the reference network's Dense(1600, 128), whatever the threads)
# ---------------------------------------------------------------------------------------------


def _dense_args(x, weight, bias, layer):
    x = check_float(x, layer)
    weight = check_float(weight, layer, "weight")
    if weight.ndim != 2:
        raise ValueError(
            f"{layer}: expected weight of shape (out_features, in_features), "
            f"got {_fmt_shape(weight.shape)}"
        )
    _same_dtype(weight, x, layer, "weight")
    _check_input(x, ("N", "in_features"), weight.shape[1], layer)
    if bias is not None:
        bias = check_float(bias, layer, "bias")
        _check_shape_equal(bias, (weight.shape[0],), layer, "bias")
        _same_dtype(bias, x, layer, "bias")
    return x, weight, bias


def dense_forward(
    x: Array, weight: Array, bias: Array | None = None, relu: bool = False, layer: str = "Dense"
) -> Array:
    """y = x @ weight.T + bias: x (N, in), weight (out, in), bias (out,) or None; ``relu=True``
    returns relu(y), applied in place (a NaN stays NaN, as ReLU)."""
    x, weight, bias = _dense_args(x, weight, bias, layer)
    n, (f, k) = x.shape[0], weight.shape
    y = _pool.empty((n, f), x.dtype)
    if y.size and k == 0:  # (no inputs: the bias alone)
        y[...] = 0 if bias is None else bias
        if relu:
            np.maximum(y, 0, out=y, where=~np.isnan(y))
    elif y.size:
        if bias is None:
            bias = np.zeros(f, x.dtype)
        if weight.size <= _dense.SMALL_WEIGHTS:
            _dense.dense_forward_small(np.ascontiguousarray(x), weight, bias, bool(relu), y)
        else:
            _dense.dense_forward(
                np.ascontiguousarray(x), weight, bias, bool(relu), numba.get_num_threads(), y
            )
    return y


def _dense_offsets(count: int, step: int, pad: bool = True) -> Array:
    """uint64 offsets [0, step, 2 step, ...] of ``count`` rows (or terms) for
    kernels.dense.dense_product, padded with copies of the last to whole register tiles."""
    size = -(-count // _dense.GR) * _dense.GR if pad else count
    return np.minimum(np.arange(size, dtype=np.uint64), count - 1) * np.uint64(step)


def dense_backward(
    x: Array,
    weight: Array,
    dy: Array,
    layer: str = "Dense",
    bias: bool = True,
    input_grad: bool = True,
) -> tuple[Array | None, Array, Array | None]:
    """Gradients of ``dense_forward``: ``(dx, dweight, dbias)`` (dx None unless ``input_grad``,
    dbias None unless ``bias``)."""
    x, weight, _ = _dense_args(x, weight, None, layer)
    dy = check_float(dy, layer, "gradient")
    _same_dtype(dy, x, layer, "gradient")
    _check_shape_equal(dy, (x.shape[0], weight.shape[0]), layer, "gradient")
    x, dy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    parts = numba.get_num_threads()
    (n, f), k = dy.shape, np.uint64(x.shape[1])
    g = dy.reshape(-1)
    dweight = _pool.empty(weight.shape, x.dtype)
    dbias = dy.sum(axis=0) if bias else None
    dx = _pool.empty(x.shape, x.dtype) if input_grad else None
    if weight.size <= _dense.SMALL_WEIGHTS:
        _dense.dense_backward_small(x, weight, dy, dweight, input_grad, x if dx is None else dx)
        return dx, dweight, dbias
    if dweight.size:  # dw = dy^T x: rows f of dy (offset f), terms n (offset n F)
        if n == 0:
            dweight[...] = 0
        else:
            rows, terms = _dense_offsets(f, 1), _dense_offsets(n, f, pad=False)
            _dense.dense_product(g, rows, terms, n, x.reshape(-1), k, parts, dweight)
    if dx is not None and dx.size:  # dx = dy w: rows n of dy (offset n F), terms f (offset f)
        if f == 0:
            dx[...] = 0
        else:
            rows, terms = _dense_offsets(n, f), _dense_offsets(f, 1, pad=False)
            _dense.dense_product(g, rows, terms, f, weight.reshape(-1), k, parts, dx)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


def dropout_forward(
    x: Array, p: float, rng: np.random.Generator, layer: str = "Dropout"
) -> tuple[Array, Array]:
    """Inverted dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p).
    Returns ``(y, mask)``, mask holding 0 or 1 / (1 - p) in x's dtype."""
    x = check_float(x, layer)
    if p >= 1:
        mask = np.zeros_like(x)
    else:
        keep = np.asarray(rng.random(x.shape, dtype=x.dtype) >= x.dtype.type(p))
        mask = keep.astype(x.dtype)
        mask *= x.dtype.type(1.0 / (1.0 - p))
    return np.asarray(x * mask), mask


def dropout_backward(dy: Array, mask: Array, layer: str = "Dropout") -> Array:
    dy = _grad_like(dy, mask, layer)
    return np.asarray(dy * mask)
