"""The fusion planner: a container's children become a plan of steps, some of them fused.

A container (``Sequential``, and through it every ``Residual`` body or ``Concat`` branch that is
one) does not run its children one by one: :func:`make_plan` reads the list, with nested plain
``Sequential`` containers opened up, and matches :data:`PATTERNS` against it from left to right,
longest pattern first. A run of modules that matches becomes one fused step; any other module
is a step of its own (``ModuleStep``: its own forward and backward; a nested container runs its
own plan). Each step keeps what its backward needs, so the layers themselves know nothing of
fusion: a layer's ``forward`` and ``backward`` are only its own.

Every fused step gives bitwise the results of its modules run one by one (tests/test_plan.py,
per pattern, and the fuzz suite on random trees). :func:`set_fusion` (or ``with
fastcnn.fusion(False):``) runs the unfused plan, one step per leaf, to compare or debug.

The patterns (types matched exactly: a subclass may change what its forward does; a grouped
convolution, ``groups > 1``, matches none but Conv2D -> BatchNorm2D's when it is depthwise: it
runs its own forward, on its own kernels):

- Conv2D -> ReLU -> MaxPool2D: forward with the ReLU applied as the convolution's output is
  stored; when the pool's windows tile (stride = kernel, no padding) the convolution's rows are
  pooled as they are computed and never stored (unless the convolution runs on the Winograd
  kernel, as the layer's own forward would: then the pool runs after it), and the backward
  forms the convolution's gradients straight from the pooled gradient (kernels/fused.py);
  otherwise the pooling's backward applies the ReLU's mask in the same pass;
- Conv2D -> ReLU and Dense -> ReLU: the ReLU applied as the output is stored;
- ReLU -> MaxPool2D: the pooling's backward applies the ReLU's mask (zero where the pooled
  maximum is <= 0 or NaN), after which the ReLU's own backward would change nothing;
- Conv2D -> BatchNorm2D [-> ReLU [-> MaxPool2D]]: in evaluation mode the BatchNorm (running
  statistics) and the ReLU are applied by the convolution's kernel to each block of its output
  while it is in cache (the depthwise kernel's too: MobileNet's blocks); in training mode the
  plan the other patterns make of the same modules;
  a Residual whose body ends in Conv2D -> BatchNorm2D has that kernel add the shortcut's
  output, and apply the ReLU after the block, too (ConvBatchNorm.forward_add, called by
  containers.Sequential.forward_add);
- BatchNorm2D -> ReLU [-> MaxPool2D], in training mode: the ReLU applied by the BatchNorm's
  kernel to each chunk of its output as it is written; the pool's backward applies the ReLU's
  mask (as ReLU -> MaxPool2D).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from . import functional as F
from ._types import Array
from .compile_helper import expect_convolution_gradients, expect_pool_gradient
from .layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    MaxPool2D,
    ReLU,
    _as_dtype,
    cast_grad,
    cast_input,
    check_grad,
)

if TYPE_CHECKING:
    from .module import Module

__all__ = ["set_fusion", "fusion_enabled", "fusion", "make_plan", "Step", "ModuleStep", "PATTERNS"]

_FUSION = {"enabled": True}


def set_fusion(enabled: bool) -> None:
    """Turn fusion on (the default) or off for every container, from its next forward on."""
    _FUSION["enabled"] = bool(enabled)


def fusion_enabled() -> bool:
    return _FUSION["enabled"]


@contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """``with fastcnn.fusion(False): ...``: run a block with fusion on or off, then restore."""
    previous = _FUSION["enabled"]
    _FUSION["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FUSION["enabled"] = previous


# -------------------------------------------------------------------------------------------------
# steps


class Step:
    """One unit of a plan over ``modules``: ``forward(x)`` and ``backward(dy, input_grad)``,
    keeping between the two what the backward needs (once: a second backward is an error; the
    arrays stay until the next forward, as a layer's: see Module.saved_for_backward)."""

    #: whether the step's pattern may match a depthwise Conv2D (groups = in_channels); other
    #: grouped convolutions match no pattern
    depthwise = False

    def __init__(self, modules: Iterable[Module]) -> None:
        # Any: each step reads the attributes of the layer types its pattern names
        self.modules: tuple[Any, ...] = tuple(modules)
        self._saved: tuple[Any, ...] | None = None
        self._used = False

    def _save(self, *values):
        self._saved, self._used = values, False

    def forward(self, x: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}: forward is not implemented")

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}: backward is not implemented")

    def check(self) -> None:
        """Raise if the backward would not pair with this plan's forward (ModuleStep)."""

    def _take(self):
        if self._saved is None or self._used:
            # the same messages as a layer's (Module.saved_for_backward)
            name = self.modules[0].name
            if self._saved is None:
                raise RuntimeError(f"{name}: backward called before forward")
            raise RuntimeError(
                f"{name}: backward called twice after one forward; run forward again first"
            )
        self._used = True
        return self._saved

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(m.name for m in self.modules)})"


class ModuleStep(Step):
    """One module, unfused: its own forward and backward."""

    def __init__(self, module: Module) -> None:
        super().__init__([module])
        self.module = module
        self._token: object = None
        params = inspect.signature(module.backward).parameters
        self._takes_input_grad = "input_grad" in params or any(
            p.kind is p.VAR_KEYWORD for p in params.values()
        )

    def forward(self, x: Array) -> Array:
        y = self.module.forward(x)
        self._token = self.module.forward_token()
        return y

    def check(self) -> None:
        if self.module.forward_token() is not self._token:
            raise RuntimeError(
                f"{self.module.name}: it ran forward again (called alone, or by another model "
                "that shares it) after this model's forward: its backward would use that call's "
                "state; run this model's forward again first"
            )

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        if self._takes_input_grad:
            return self.module.backward(dy, input_grad=input_grad)
        dx = self.module.backward(dy)  # a user's module without the argument
        return dx if input_grad else None


def _bias(layer):
    return None if layer.bias is None else layer.bias.data


def _tiles(pool):
    return pool.stride == pool.kernel_size and pool.padding == (0, 0)


def _expect_gradients(conv, x, pooled=False):
    """In training, the convolution's gradients' kernels requested from the compile helper
    (``pooled``: those of the fused max-pool backward where it applies)."""
    if conv.training:
        expect_convolution_gradients(
            conv.weight.data, conv.stride, conv.padding, conv.dilation, x.shape[2:], pooled
        )


def _conv_relu(conv, x, pooled=False):
    """The convolution with its ReLU (``pooled``: as _expect_gradients's)."""
    _expect_gradients(conv, x, pooled)
    return F.conv2d_forward(
        x,
        conv.weight.data,
        _bias(conv),
        conv.stride,
        conv.padding,
        conv.dilation,
        relu=True,
        layer=conv.name,
        winograd=True,
        evaluation=not conv.training,
    )


def _winograd(conv):
    """The forward of ``conv`` runs on the Winograd kernel (as the layer's own forward
    would): the fused forward kernels then step aside, so that the plan's output stays
    bitwise the layers' one by one."""
    return F.winograd_applies(conv.weight.shape, conv.stride, conv.dilation)


def _conv_backward(conv, x, in_dtype, dy, input_grad):
    """Conv2D's own backward from its saved input: accumulates, returns the input gradient."""
    dx, dw, db = F.conv2d_backward(
        x,
        conv.weight.data,
        cast_grad(dy, conv.dtype, conv.name),
        conv.stride,
        conv.padding,
        conv.dilation,
        layer=conv.name,
        bias=conv.bias is not None,
        input_grad=input_grad,
    )
    conv.accumulate(dw, db)
    return _as_dtype(dx, in_dtype)


def _dense_relu(dense, x):
    return F.dense_forward(x, dense.weight.data, _bias(dense), relu=True, layer=dense.name)


def _dense_backward(dense, x, in_dtype, dy, input_grad):
    dx, dw, db = F.dense_backward(
        x,
        dense.weight.data,
        cast_grad(dy, dense.dtype, dense.name),
        layer=dense.name,
        bias=dense.bias is not None,
        input_grad=input_grad,
    )
    dense.accumulate(dw, db)
    return _as_dtype(dx, in_dtype)


class ConvReLUMaxPool(Step):
    """Conv2D -> ReLU -> MaxPool2D (see the module docstring)."""

    def forward(self, x: Array) -> Array:
        conv, relu, pool = self.modules
        x, in_dtype = cast_input(x, conv.dtype, conv.name)
        if _tiles(pool) and not _winograd(conv):
            _expect_gradients(conv, x, pooled=True)
            y, argmax, conv_shape = F.conv2d_relu_max_pool2d_forward(
                x,
                conv.weight.data,
                _bias(conv),
                conv.stride,
                conv.padding,
                conv.dilation,
                pool.kernel_size,
                layer=conv.name,
                pool_layer=pool.name,
            )
            self._save(x, in_dtype, None, y, argmax, conv_shape)
            return y
        a = _conv_relu(conv, x, pooled=_tiles(pool))
        y, argmax = F.max_pool2d_forward(
            a, pool.kernel_size, pool.stride, pool.padding, layer=pool.name
        )
        if pool.training and not _tiles(pool):  # (tiling: _conv_relu asked where it runs)
            expect_pool_gradient(y.dtype)
        # windows that tile: the backward forms the gradients from the pooled ones all the same
        self._save(x, in_dtype, None if _tiles(pool) else a, y, argmax, a.shape)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        conv, relu, pool = self.modules
        x, in_dtype, a, y, argmax, conv_shape = self._take()
        dy = check_grad(dy, argmax.shape, y.dtype, pool.name)
        if a is not None:  # windows that do not tile: the pool's backward, the ReLU's mask in it
            da = F.max_pool2d_backward(
                dy,
                argmax,
                conv_shape,
                pool.kernel_size,
                pool.stride,
                pool.padding,
                relu_output=y,
                layer=pool.name,
            )
            return _conv_backward(conv, x, in_dtype, da, input_grad)
        dx, dw, db = F.max_pool2d_conv2d_backward(
            x,
            conv.weight.data,
            dy,
            argmax,
            y,
            conv_shape,
            pool.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            relu=True,
            bias=conv.bias is not None,
            input_grad=input_grad,
            layer=conv.name,
            pool_layer=pool.name,
        )
        conv.accumulate(dw, db)
        return _as_dtype(dx, in_dtype)


class _ProductReLU(Step):
    """A layer with parameters -> ReLU: the ReLU applied as the product is stored; backward:
    the ReLU's mask, then the layer's own backward. Subclasses name the two functions."""

    product: Callable[..., Array]
    backward_of: Callable[..., Array | None]

    def forward(self, x: Array) -> Array:
        layer, relu = self.modules
        x, in_dtype = cast_input(x, layer.dtype, layer.name)
        y = type(self).product(layer, x)
        self._save(x, in_dtype, y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        layer, relu = self.modules
        x, in_dtype, y = self._take()
        da = F.relu_backward(dy, y, layer=relu.name)
        return type(self).backward_of(layer, x, in_dtype, da, input_grad)


class ConvReLU(_ProductReLU):
    """Conv2D -> ReLU."""

    product, backward_of = _conv_relu, _conv_backward


class DenseReLU(_ProductReLU):
    """Dense -> ReLU."""

    product, backward_of = _dense_relu, _dense_backward


class ReLUMaxPool(Step):
    """ReLU -> MaxPool2D: the pooling's backward applies the ReLU's mask."""

    def forward(self, x: Array) -> Array:
        relu, pool = self.modules
        a = F.relu_forward(x, layer=relu.name)
        y, argmax = F.max_pool2d_forward(
            a, pool.kernel_size, pool.stride, pool.padding, layer=pool.name
        )
        if pool.training:
            expect_pool_gradient(y.dtype)
        self._save(a.shape, y, argmax)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        relu, pool = self.modules
        shape, y, argmax = self._take()
        dy = check_grad(dy, argmax.shape, y.dtype, pool.name)
        return F.max_pool2d_backward(
            dy,
            argmax,
            shape,
            pool.kernel_size,
            pool.stride,
            pool.padding,
            relu_output=y,
            layer=pool.name,
        )


class ResidualReLU(Step):
    """Residual -> ReLU: the block's sum and the ReLU in one pass over the activation
    (Residual.forward_sum(relu=True)), bitwise the two modules; the backward is the ReLU's
    mask, then the Residual's backward."""

    def forward(self, x: Array) -> Array:
        residual, _ = self.modules
        y = residual.forward_sum(x, relu=True)
        self._save(y)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        residual, relu = self.modules
        (y,) = self._take()
        return residual.backward(F.relu_backward(dy, y, layer=relu.name), input_grad=input_grad)


class _WithInnerPlan(Step):
    """A fused step that runs, where it cannot fuse, the plan the patterns ``patterns`` make
    of its modules (``self.inner``)."""

    def __init__(self, modules: Iterable[Module], patterns: Sequence[Any]) -> None:
        super().__init__(modules)
        self.inner = _match(self.modules, patterns)
        self._ran_inner = False

    def _forward_inner(self, x: Array) -> Array:
        self._ran_inner = True
        for step in self.inner:
            x = step.forward(x)
        return x

    def _backward_inner(self, dy: Array, input_grad: bool) -> Array:
        for i in range(len(self.inner) - 1, -1, -1):
            dy = self.inner[i].backward(dy, input_grad or i > 0)  # type: ignore[assignment]
        return dy

    def check(self) -> None:
        if self._ran_inner:
            for step in self.inner:
                step.check()


class BatchNormReLU(_WithInnerPlan):
    """BatchNorm2D -> ReLU [-> MaxPool2D] in training mode: the ReLU applied to each chunk of
    the normalised output as the BatchNorm's kernel writes it, while it is in cache
    (functional.batch_norm_forward_train with ``relu``), then the pool; backward: the pool's
    with the ReLU's mask in it (as ReLUMaxPool) then the BatchNorm's, or without a pool the
    BatchNorm's with the ReLU's mask recomputed in it (functional.batch_norm_relu_backward). In
    evaluation mode (the BatchNorm's flag) the plan without this pattern runs (``self.inner``)."""

    def __init__(self, modules: Iterable[Module]) -> None:
        super().__init__(modules, _PATTERNS[2:])  # the patterns after this one's

    def forward(self, x: Array) -> Array:
        bn = self.modules[0]
        if not bn.training:
            return self._forward_inner(x)
        self._ran_inner = False
        xc, in_dtype = cast_input(x, bn.dtype, bn.name)
        x4 = bn._to4d(xc)
        bn._check_train_size(xc)
        a, mean, invstd, affine = F.batch_norm_relu_forward_train(
            x4, bn.weight.data, bn.bias.data, bn.eps, layer=bn.name
        )
        bn.update_running(x4, mean, invstd)
        y, argmax = a, None
        if len(self.modules) == 3:
            pool = self.modules[2]
            y, argmax = F.max_pool2d_forward(
                a, pool.kernel_size, pool.stride, pool.padding, layer=pool.name
            )
            if pool.training:  # (the BatchNorm is: this step's backward runs the pool's)
                expect_pool_gradient(y.dtype)
        self._save(x4, mean, invstd, affine, a, y, argmax, xc.shape, in_dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        if self._ran_inner:
            return self._backward_inner(dy, input_grad)
        bn, relu = self.modules[:2]
        x4, mean, invstd, affine, a, y, argmax, x_shape, in_dtype = self._take()
        if argmax is None:  # the ReLU's backward inside the BatchNorm's
            dy = check_grad(dy, a.shape, a.dtype, relu.name)  # a: x4's shape, the layer's dtype
            dx, dgamma, dbeta = F.batch_norm_relu_backward(
                dy, x4, a, bn.weight.data, mean, invstd, affine, layer=bn.name
            )
        else:
            pool = self.modules[2]
            dy = check_grad(dy, argmax.shape, y.dtype, pool.name)
            g = F.max_pool2d_backward(
                dy,
                argmax,
                a.shape,
                pool.kernel_size,
                pool.stride,
                pool.padding,
                relu_output=y,
                layer=pool.name,
            )
            g = cast_grad(g, bn.dtype, bn.name, x_shape).reshape(x4.shape)
            dx, dgamma, dbeta = F.batch_norm_backward(
                g, x4, bn.weight.data, mean, invstd, layer=bn.name
            )
        bn.weight.grad += dgamma
        bn.bias.grad += dbeta
        return _as_dtype(dx.reshape(x_shape), in_dtype)


class ConvBatchNorm(_WithInnerPlan):
    """Conv2D -> BatchNorm2D [-> ReLU [-> MaxPool2D]].

    In training mode (the BatchNorm's flag) the modules run as the plan without this pattern
    would run them (``self.inner``: the ReLU -> MaxPool2D fused there). In evaluation mode the
    BatchNorm, with its running statistics, and the ReLU are applied by the convolution's
    kernel to each block of its output while it is in cache (functional
    .conv2d_batch_norm_eval_forward): bitwise the inner plan's output, without two passes
    over it. A backward after such a forward (rare: gradients of a frozen network) runs the
    inner plan's forward again from the saved input, then its backward."""

    #: its convolution may be depthwise (groups = in_channels): the depthwise kernel applies the
    #: BatchNorm and the ReLU to its rows as conv2d_forward does to its blocks
    depthwise = True

    def __init__(self, modules: Iterable[Module]) -> None:
        super().__init__(modules, _PATTERNS)

    def _fusable(self) -> bool:
        conv, bn = self.modules[:2]
        # otherwise the inner plan runs, and raises what the layers raise
        return not bn.training and bn.dtype == conv.dtype and bn.num_features == conv.out_channels

    def forward(self, x: Array) -> Array:
        return self._forward(x)

    def can_add(self) -> bool:
        """Whether :meth:`forward_add` may sum in the kernel: Conv2D -> BatchNorm2D alone, in
        evaluation mode."""
        return len(self.modules) == 2 and self._fusable()

    def forward_add(self, x: Array, add: Array, relu: bool, layer: str) -> tuple[Array, bool]:
        """``(relu(forward(x) + add), True)`` (without ``relu``: the sum), the sum and the ReLU
        applied by the convolution's kernel to each block of its output (bitwise the
        BatchNorm's output summed as numpy adds, then the ReLU's select), where :meth:`can_add`
        and ``add`` has the output's shape and dtype; else ``(forward(x), False)``. The
        backward is :meth:`backward`'s; the sum's and the ReLU's are the caller's."""
        conv = self.modules[0]
        ok = self.can_add() and isinstance(add, np.ndarray) and add.dtype == conv.dtype
        if ok:  # raises what the forward would raise for a bad x
            out_shape = F.conv2d_output_shape(
                np.shape(x),
                conv.weight.data.shape,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.name,
                conv.groups,
            )[0]
            ok = tuple(add.shape) == tuple(out_shape)
        if not ok:
            return self._forward(x), False
        return self._forward(x, add, relu, layer), True

    def _forward(
        self, x: Array, add: Array | None = None, relu: bool = False, add_layer: str = ""
    ) -> Array:
        if not self._fusable():
            return self._forward_inner(x)
        self._ran_inner = False
        conv, bn = self.modules[:2]
        xc, in_dtype = cast_input(x, conv.dtype, conv.name)
        y = F.conv2d_batch_norm_eval_forward(
            xc,
            conv.weight.data,
            _bias(conv),
            conv.stride,
            conv.padding,
            conv.dilation,
            bn.weight.data,
            bn.bias.data,
            bn.running_mean,
            bn.running_var,
            bn.eps,
            relu=len(self.modules) > 2 or relu,
            layer=conv.name,
            bn_layer=bn.name,
            winograd=True,
            add=add,
            add_layer=add_layer,
            evaluation=not conv.training,
            groups=conv.groups,
        )
        if len(self.modules) == 4:
            pool = self.modules[3]
            y, _ = F.max_pool2d_forward(
                y, pool.kernel_size, pool.stride, pool.padding, layer=pool.name
            )
        self._save(x)
        return y

    def backward(self, dy: Array, input_grad: bool = True) -> Array | None:
        if not self._ran_inner:  # the inner plan's forward again, from the saved input
            (x,) = self._take()
            for step in self.inner:
                x = step.forward(x)
        dy = self._backward_inner(dy, input_grad)
        return dy if input_grad else None


#: (module types, step class), tried in this order at each position: longest first.
_PATTERNS = (
    ((BatchNorm2D, ReLU, MaxPool2D), BatchNormReLU),
    ((BatchNorm2D, ReLU), BatchNormReLU),
    ((Conv2D, ReLU, MaxPool2D), ConvReLUMaxPool),
    ((Conv2D, ReLU), ConvReLU),
    ((Dense, ReLU), DenseReLU),
    ((ReLU, MaxPool2D), ReLUMaxPool),
)
PATTERNS: tuple[tuple[tuple[type, ...], Any], ...] = (
    ((Conv2D, BatchNorm2D, ReLU, MaxPool2D), ConvBatchNorm),
    ((Conv2D, BatchNorm2D, ReLU), ConvBatchNorm),
    ((Conv2D, BatchNorm2D), ConvBatchNorm),
) + _PATTERNS


def add_pattern(types: tuple[type, ...], step: type[Step]) -> None:
    """Add a pattern to PATTERNS: how containers.py adds (Residual, ReLU) -> ResidualReLU
    (this module cannot import the containers, which import it)."""
    global PATTERNS
    if (types, step) not in PATTERNS:
        PATTERNS = PATTERNS + ((types, step),)


# -------------------------------------------------------------------------------------------------
# planning


def leaves_of(modules: Iterable[Module]) -> list[Module]:
    """``modules`` with every nested plain Sequential opened up (a chain of chains is a chain)."""
    from .containers import Sequential

    out: list[Module] = []
    for m in modules:
        if type(m) is Sequential:
            out += leaves_of(m.children())
        else:
            out.append(m)
    return out


def make_plan(modules: Iterable[Module], fuse: bool | None = None) -> list[Step]:
    """The steps that run ``modules`` in order: fused where a pattern matches (``fuse``, by
    default the global switch), else one ``ModuleStep`` per module."""
    fuse = fusion_enabled() if fuse is None else fuse
    return _match(leaves_of(modules), PATTERNS if fuse else ())


def _depthwise(m: Module) -> bool:
    """Whether ``m`` is a depthwise convolution (one input channel per group)."""
    return getattr(m, "groups", 1) == getattr(m, "in_channels", None)


def _match(chain: Sequence[Module], patterns: Sequence[Any]) -> list[Step]:
    """``chain`` as steps: each run matching one of ``patterns`` (left to right, the first
    pattern that matches at a position wins) one fused step, every other module its own."""
    steps: list[Step] = []
    i = 0
    while i < len(chain):
        for types, step in patterns:
            run = chain[i : i + len(types)]
            if len(run) == len(types) and all(
                type(m) is t
                and (
                    getattr(m, "groups", 1) == 1
                    or (getattr(step, "depthwise", False) and _depthwise(m))
                )
                for m, t in zip(run, types, strict=True)
            ):
                steps.append(step(run))
                i += len(types)
                break
        else:
            steps.append(ModuleStep(chain[i]))
            i += 1
    return steps
