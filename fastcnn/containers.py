"""Containers: how a tree of modules computes, and how gradients flow back through it.

- ``Sequential(m0, m1, ...)``: each module's output is the next one's input; the backward runs
  in reverse. It runs through a plan (fastcnn/plan.py) that fuses some runs of layers.
- ``Residual(body, shortcut=None)``: ``body(x) + x`` (or ``+ shortcut(x)``); the gradient
  reaching ``x`` through both paths is summed.
- ``Concat(b0, b1, ...)``: the branches' outputs side by side along the channel axis (axis 1);
  the gradient is split by channel ranges and the branches' input gradients summed.

Containers nest to any depth; each module may appear once in a tree (see fastcnn/module.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from . import functional as F
from ._types import Array, Config, Rng, Shape
from .compile_helper import expect_layers
from .layers import ReLU, check_grad
from .module import Module, module_from_config, register_module, state_spec_of, tree_version
from .plan import ConvBatchNorm, ResidualReLU, Step, add_pattern, fusion_enabled, make_plan

if TYPE_CHECKING:
    from typing_extensions import Self

    from .module import Visit

__all__ = ["Sequential", "Residual", "Concat"]

#: (model, callback) while a data-parallel step watches ``model``'s backward: ``callback(plan,
#: i)`` runs as soon as step ``i`` of the model's plan has accumulated its parameters' gradients,
#: so that they can travel while the earlier steps compute (fastcnn/distributed.py)
_backward_watch: tuple[Module, Any] | None = None


def watch_backward(model: Module | None, callback: Any = None) -> None:
    """Call ``callback(plan, i)`` after each step of the top-level Sequential ``model``'s
    backward (None: stop watching). One model at a time."""
    global _backward_watch
    _backward_watch = None if model is None else (model, callback)


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _check_unique(root: Module) -> None:
    """No module twice in the tree under ``root`` (assignments are checked one container at a
    time; this catches a module added to an inner container that an outer one already held)."""
    seen: dict[int, str] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        if id(m) in seen:
            raise ValueError(
                f"{root.name}: the same {m.name} is at {seen[id(m)]!r} and {name!r}; "
                "a module can be used once per model: build another instance"
            )
        seen[id(m)] = name


def _merged_specs(named_configs):
    """The children's state specs under their names, or None if one cannot tell."""
    spec = {}
    for name, config in named_configs:
        child = state_spec_of(config, prefix=name + ".")
        if child is None:
            return None
        spec.update(child)
    return spec


class _Container(Module):
    """What the containers share: shapes and FLOPs by tracing their children."""

    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        return self.trace_shapes(input_shape, lambda *args: {})

    def flops(self, input_shape: Sequence[int]) -> int:
        rows: list[dict[str, Any]] = []

        def new_row(*args: object) -> dict[str, Any]:
            rows.append({})
            return rows[-1]

        self.trace_shapes(input_shape, new_row)
        return sum(row["flops"] for row in rows)


class _ListContainer(_Container):
    """A container of a list of children named "0", "1", ...; its config is
    ``{"class": name, KEY: [child configs]}`` with KEY ``_key``."""

    # the config key, and what a child is called in errors
    _key: str
    _item: str

    def __init__(self, modules: Sequence[Any]) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (list, tuple)):
            modules = modules[0]
        for m in modules:
            self.append(m)  # checks that m is a Module

    def append(self, module: Module) -> Self:
        """Add ``module`` at the end; returns self."""
        if not isinstance(module, Module):
            raise TypeError(
                f"{self.name}: {self._item} {len(self)} is not a fastcnn Module: {module!r:.100}"
            )
        setattr(self, str(len(self)), module)
        return self

    def __len__(self) -> int:
        return len(self._child_names)

    def __getitem__(self, index: int) -> Module:
        return self.children()[index]

    def __iter__(self) -> Iterator[Module]:
        return iter(self.children())

    def get_config(self) -> Config:
        return {"class": self.name, self._key: [m.get_config() for m in self.children()]}

    @classmethod
    def from_config(cls, config: Config, rng: Rng = None) -> Self:
        children = config.get(cls._key)
        if not isinstance(children, list) or set(config) != {"class", cls._key}:
            raise ValueError(
                f"{cls.__name__}: expected a config {{'class': '{cls.__name__}', "
                f"'{cls._key}': [...]}}, got {config!r:.200}"
            )
        return cls([module_from_config(c, rng) for c in children])

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        children = config[cls._key]
        if not isinstance(children, list):
            raise ValueError(f"{cls.__name__}: expected '{cls._key}' to be a list")
        return _merged_specs((str(i), c) for i, c in enumerate(children))


@register_module
class Sequential(_ListContainer):
    """Modules applied in order (PyTorch's nn.Sequential): ``Sequential(m0, m1, ...)`` or
    ``Sequential([m0, m1, ...])``; children named "0", "1", ..."""

    _key, _item = "layers", "module"
    _ran: list[Step] | None  # the plan the last forward ran, for its backward

    def __init__(self, *modules: Module | Sequence[Module]) -> None:
        super().__init__(modules)
        self.__dict__["_ran"] = None

    @property
    def layers(self) -> list[Module]:
        """The modules in order (a new list)."""
        return self.children()

    @overload
    def __getitem__(self, index: int) -> Module: ...
    @overload
    def __getitem__(self, index: slice) -> Sequential: ...
    def __getitem__(self, index: int | slice) -> Module | Sequential:
        if isinstance(index, slice):
            return Sequential(self.children()[index])
        return self.children()[index]

    # -- computation ---------------------------------------------------------------------------
    def _reads_channels_last(self) -> bool:
        """Its first module's answer (that module alone reads the input); a subclass's forward
        may read x itself first, so only for this class (the planner's rule)."""
        children = self.children()
        return type(self) is Sequential and bool(children) and children[0]._reads_channels_last()

    def _plan(self):
        """The plan for the current tree and fusion switch, built once and cached."""
        key = (tree_version(), fusion_enabled())
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] != key:
            _check_unique(self)
            cached = self.__dict__["_plan_cache"] = (key, make_plan(self.children(), key[1]))
        return cached[1]

    def forward(self, x: Array) -> Array:
        plan = self._plan()
        if self.training and "_expected" not in self.__dict__:
            self.__dict__["_expected"] = True  # once: kernels a cold cache should compile ahead
            expect_layers(self.children())
        for step in plan:
            x = step.forward(x)
        self.__dict__["_ran"] = plan
        return x

    def forward_add(
        self, x: Array, other: Callable[[], Array], relu: bool, layer: str
    ) -> tuple[Array, Array, bool]:
        """``(y, s, fused)``: every step but the last runs, then ``s = other()``, then the last
        step; where it can (plan.ConvBatchNorm in evaluation mode, ``s`` of its output's shape
        and dtype) it returns ``y = relu(self(x) + s)`` (the sum without ``relu``) from its
        kernel, bitwise the sum and ReLU done after it, and ``fused`` is True; otherwise
        ``y = self(x)`` and the caller sums. A Residual's forward with its body's last
        convolution doing the sum."""
        plan = self._plan()
        for step in plan[:-1]:
            x = step.forward(x)
        s = other()
        last = plan[-1] if plan else None
        fused = False
        if isinstance(last, ConvBatchNorm) and last.can_add():
            x, fused = last.forward_add(x, s, relu, layer)
        elif last is not None:
            x = last.forward(x)
        self.__dict__["_ran"] = plan
        return x, s, fused

    def backward(self, dy: Array, input_grad: bool = False) -> Array | None:
        """Backpropagate ``dy`` (the gradient of the loss with respect to the output) through
        the plan the last forward ran, accumulating parameter gradients. The gradient to the
        input is computed and returned only with ``input_grad=True``: by default the first step
        skips it where it can and None is returned, as PyTorch skips the gradient of an input
        that does not require one (a network's images need none). A container nested in
        another is always asked explicitly; a single layer returns its input's gradient
        unless told not to."""
        plan = self._ran
        if plan is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        for step in plan:  # before any gradient is accumulated
            step.check()
        watch = _backward_watch
        notify = watch[1] if watch is not None and watch[0] is self else None
        for i in range(len(plan) - 1, -1, -1):
            # None only from the first step, and only without input_grad
            dy = plan[i].backward(dy, input_grad or i > 0)  # type: ignore[assignment]
            if notify is not None:
                notify(plan, i)
        return dy if input_grad else None

    def trace_shapes(self, input_shape: Sequence[int], visit: Visit, prefix: str = "") -> Shape:
        row = visit(prefix, self, tuple(input_shape))
        shape = tuple(int(s) for s in input_shape)
        for name, child in self.named_children():
            shape = child.trace_shapes(shape, visit, _join(prefix, name))
        row.update(output_shape=shape, flops=0)
        return shape

    def __repr__(self) -> str:
        if not len(self):
            return "Sequential()"
        return super().__repr__()


@register_module
class Residual(_Container):
    """``body(x) + x``, or ``body(x) + shortcut(x)`` (a projection where the body changes the
    shape: ResNet's 1x1 convolution with stride 2). Both outputs must have the same shape and
    dtype. The backward sums the gradients reaching ``x`` through the body and the shortcut."""

    def __init__(self, body: Module, shortcut: Module | None = None) -> None:
        super().__init__()
        for what, m in (("body", body), ("shortcut", shortcut)):
            if not isinstance(m, Module) and not (what == "shortcut" and m is None):
                raise TypeError(
                    f"Residual: expected the {what} to be a fastcnn Module, got {m!r:.100}"
                )
        self.body = body
        if shortcut is not None:
            self.shortcut = shortcut
        else:
            self.__dict__["shortcut"] = None

    def forward(self, x: Array) -> Array:
        return self.forward_sum(x)

    def forward_sum(self, x: Array, relu: bool = False) -> Array:
        """The forward; with ``relu``, relu(body(x) + shortcut(x)) in one pass (the plan's
        Residual -> ReLU step: bitwise the two modules). The backward is the same either way
        (the ReLU's is the caller's)."""

        def shortcut() -> Array:
            if self.shortcut is None:
                return F.check_float(x, self.name, contiguous=False)
            return self.shortcut.forward(x)

        # the sum in the body's last convolution, if it can (a body whose forward is its own:
        # as written)
        if isinstance(self.body, Sequential) and type(self.body).forward is Sequential.forward:
            a, s, fused = self.body.forward_add(x, shortcut, relu, self.name)
            if fused:
                self.save_for_backward(a.shape, a.dtype)
                return a
        else:
            a = self.body.forward(x)
            s = shortcut()
        if a.dtype != s.dtype:
            what = "input" if self.shortcut is None else "shortcut's output"
            raise TypeError(
                f"{self.name}: the body's output dtype {a.dtype} differs from the "
                f"{what} dtype {s.dtype}"
            )
        if a.shape != s.shape:
            what = "input" if self.shortcut is None else "shortcut's output"
            raise ValueError(
                f"{self.name}: the body's output shape {F._fmt_shape(a.shape)} "
                f"differs from the {what} shape {F._fmt_shape(s.shape)}"
            )
        y = F.add_relu_forward(a, s, self.name) if relu else F.add(a, s, self.name)
        self.save_for_backward(y.shape, y.dtype)
        return y

    def backward(self, dy: Array, input_grad: bool = False) -> Array | None:
        shape, dtype = self.saved_for_backward()
        dy = check_grad(dy, shape, dtype, self.name)
        d_body = self.body.backward(dy, input_grad=input_grad)
        if self.shortcut is None:
            d_short = dy
        else:
            d_short = self.shortcut.backward(dy, input_grad=input_grad)
        # with input_grad, every backward returns its input's gradient
        return F.add(d_body, d_short, self.name) if input_grad else None  # type: ignore[arg-type]

    def trace_shapes(self, input_shape: Sequence[int], visit: Visit, prefix: str = "") -> Shape:
        row = visit(prefix, self, tuple(input_shape))
        a = self.body.trace_shapes(input_shape, visit, _join(prefix, "body"))
        s = (
            tuple(int(v) for v in input_shape)
            if self.shortcut is None
            else self.shortcut.trace_shapes(input_shape, visit, _join(prefix, "shortcut"))
        )
        if a != s:
            what = "input" if self.shortcut is None else "shortcut's output"
            raise ValueError(
                f"{self.name}: the body's output shape {F._fmt_shape(a)} differs "
                f"from the {what} shape {F._fmt_shape(s)}"
            )
        row.update(output_shape=a, flops=int(np.prod(a)))  # the addition
        return a

    def get_config(self) -> Config:
        return {
            "class": self.name,
            "body": self.body.get_config(),
            "shortcut": None if self.shortcut is None else self.shortcut.get_config(),
        }

    @classmethod
    def from_config(cls, config: Config, rng: Rng = None) -> Self:
        if set(config) != {"class", "body", "shortcut"}:
            raise ValueError(
                f"Residual: expected a config with 'body' and 'shortcut', got {config!r:.200}"
            )
        body = module_from_config(config["body"], rng)
        shortcut = config["shortcut"]
        return cls(body, None if shortcut is None else module_from_config(shortcut, rng))

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        parts = [("body", config["body"])]
        if config["shortcut"] is not None:
            parts.append(("shortcut", config["shortcut"]))
        return _merged_specs(parts)


@register_module
class Concat(_ListContainer):
    """The branches' outputs concatenated along axis 1, the channels (Inception-style): each
    branch gets the same input; their outputs must agree on every other axis and on dtype.
    Four-dimensional outputs are stored channels-last, as a convolution's."""

    _key, _item = "branches", "branch"

    def __init__(self, *branches: Module | Sequence[Module]) -> None:
        if not branches or branches == ([],) or branches == ((),):
            raise ValueError("Concat: expected at least one branch")
        super().__init__(branches)

    def _check(self, shapes, dtypes=None):
        first = shapes[0]
        for i, s in enumerate(shapes):
            if len(s) < 2:
                raise ValueError(
                    f"{self.name}: branch {i}'s output {F._fmt_shape(s)} has no channel axis"
                )
            if len(s) != len(first) or s[:1] + s[2:] != first[:1] + first[2:]:
                raise ValueError(
                    f"{self.name}: branch {i}'s output {F._fmt_shape(s)} does not "
                    f"match branch 0's {F._fmt_shape(first)} outside axis 1"
                )
            if dtypes is not None and dtypes[i] != dtypes[0]:
                raise TypeError(
                    f"{self.name}: branch {i}'s output dtype {dtypes[i]} differs "
                    f"from branch 0's {dtypes[0]}"
                )
        return first[:1] + (sum(s[1] for s in shapes),) + first[2:]

    def forward(self, x: Array) -> Array:
        outs = [b.forward(x) for b in self.children()]
        shape = self._check([o.shape for o in outs], [o.dtype for o in outs])
        if len(shape) == 4:  # channels-last, as the convolutions and poolings return
            n, c, h, w = shape
            y = np.empty((n, h, w, c), dtype=outs[0].dtype)
            start = 0
            for o in outs:
                y[..., start : start + o.shape[1]] = o.transpose(0, 2, 3, 1)
                start += o.shape[1]
            y = y.transpose(0, 3, 1, 2)
        else:
            y = np.concatenate(outs, axis=1)
        self.save_for_backward(y.shape, y.dtype, [o.shape[1] for o in outs])
        return y

    def backward(self, dy: Array, input_grad: bool = False) -> Array | None:
        shape, dtype, widths = self.saved_for_backward()
        dy = check_grad(dy, shape, dtype, self.name)
        dx: Array | None = None
        start = 0
        # the branches the forward ran (strict=False: one appended since then gets nothing)
        for b, width in zip(self.children(), widths, strict=False):
            d = b.backward(dy[:, start : start + width], input_grad=input_grad)
            start += width
            if input_grad:
                dx = d if dx is None else F.add(dx, d, self.name)  # type: ignore[arg-type]
        return dx

    def trace_shapes(self, input_shape: Sequence[int], visit: Visit, prefix: str = "") -> Shape:
        row = visit(prefix, self, tuple(input_shape))
        shapes = [
            b.trace_shapes(input_shape, visit, _join(prefix, n)) for n, b in self.named_children()
        ]
        out = self._check(shapes)
        row.update(output_shape=out, flops=0)
        return out


add_pattern((Residual, ReLU), ResidualReLU)
