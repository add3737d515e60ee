"""Module: the one base of every layer and container, and the registry that rebuilds them.

A Module registers what is assigned to its attributes, as PyTorch's ``nn.Module`` does: a
:class:`Parameter` becomes one of its parameters, another Module one of its children, and an
array given to :meth:`Module.register_buffer` a buffer (saved, never trained: BatchNorm's running
statistics). Everything else about a tree is derived from those three lists:

- ``named_parameters()``: dotted names, depth-first in construction order, a module's own
  parameters before its children's ("0.weight", "3.body.0.weight"), each Parameter once;
- ``state_dict()`` / ``load_state_dict()``: parameters and buffers under the same names;
- ``train()`` / ``eval()`` / ``zero_grad()`` over the whole tree;
- ``get_config()`` and :func:`module_from_config`: the architecture as JSON-able data, rebuilt
  through the class registry (:func:`register_module`), never by importing a name from a file.

There is no autograd: every module defines ``forward(x)`` and ``backward(dy)``; a leaf keeps what
its own backward needs (:meth:`Module.save_for_backward`), a container runs its children's
backwards in reverse. ``backward`` accumulates into ``Parameter.grad`` (``zero_grad()`` between
steps) and, with ``input_grad=False``, may skip the gradient to its input and return None.

A module may appear only once in a tree: its cached forward state can serve one backward.
Building a tree that holds a module twice is a ValueError, and a leaf's backward called twice
after one forward is a RuntimeError, never a silently wrong gradient.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike

from . import _pool
from . import functional as F
from ._checks import is_int
from ._types import Array, Config, Rng, Shape

if TYPE_CHECKING:
    from typing_extensions import Self

    from .data import DataLoader

M = TypeVar("M", bound="Module")
#: ``visit(name, module, input_shape)`` of :meth:`Module.trace_shapes`: the row to fill in
Visit = Callable[[str, "Module", Shape], dict[str, Any]]

__all__ = [
    "Parameter",
    "Module",
    "register_module",
    "module_from_config",
    "state_spec_of",
    "registered_modules",
    "MAX_CONFIG_DEPTH",
]

#: Deepest nesting of containers a config may describe (a file cannot exhaust the stack).
MAX_CONFIG_DEPTH = 64


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype, zeros at start).

    Optimizers update ``data`` in place and layers accumulate into ``grad`` in place, so the
    arrays keep their identity for the life of the model.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data: ArrayLike) -> None:
        data = np.array(data, order="C", copy=True)
        if data.dtype.kind != "f":
            raise TypeError(f"Parameter: expected floating-point data, got dtype {data.dtype}")
        self.data = data
        self.grad = np.zeros_like(data)

    @property
    def shape(self) -> Shape:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    def zero_grad(self) -> None:
        self.grad[...] = 0

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


_PREDICT_LOCK = threading.RLock()  # Module.predict: see there
_TREE = {"version": 0}  # bumped whenever a module gains or loses a child: plans are rebuilt


def tree_version() -> int:
    """A number that changes whenever any module gains, replaces or loses a child."""
    return _TREE["version"]


def _pooled_copy(a: Array, images: bool = False) -> Array:
    """``a.copy(order="K")`` into a pooled buffer (fastcnn._pool). With ``images`` (the input
    of a model whose first module reads it channels-last), a C-ordered (N, C, H, W) batch of
    2 to F._FEW_CHANNELS channels is copied channels-last instead: one copy, where the first
    convolution would convert it again in the forward and once more in the backward."""
    if (
        images
        and a.size > 0
        and a.ndim == 4
        and 1 < a.shape[1] <= F._FEW_CHANNELS
        and a.shape[2] * a.shape[3] > 1
        and a.dtype in (np.float32, np.float64)
        and a.flags.c_contiguous
    ):
        return F._nchw(F._nhwc(a))
    out = _pool.empty_like(a)
    np.copyto(out, a)
    return out


class Module:
    """Base class of layers and containers (see the module docstring).

    Subclasses call ``super().__init__()`` first, assign parameters and child modules as
    attributes, and implement ``forward(x)`` and ``backward(dy, input_grad=True)``; for
    ``summary()`` also ``output_shape(input_shape)`` (and ``flops``); for checkpoints
    ``get_config()`` returning the constructor's arguments (see :func:`register_module`).
    """

    #: True for modules that draw random numbers (Dropout): their generator state is saved.
    has_rng_state = False

    # set through __dict__ by __init__ and __setattr__
    training: bool
    _param_names: list[str]
    _buffer_names: list[str]
    _child_names: list[str]

    def __init__(self) -> None:
        d = self.__dict__
        d["training"] = True
        d["_param_names"] = []
        d["_buffer_names"] = []
        d["_child_names"] = []
        d["_saved"] = None
        d["_saved_used"] = False

    # -- registration ---------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_param_names" not in d:
            raise AttributeError(
                f"{type(self).__name__}: cannot assign {name!r} before "
                "Module.__init__() ran: call super().__init__() first"
            )
        if isinstance(value, Module):
            self._check_new_child(name, value)
            _drop(d, name)
            d["_child_names"].append(name)
            _TREE["version"] += 1
        elif isinstance(value, Parameter):
            _drop(d, name)
            d["_param_names"].append(name)
        elif name in getattr(type(self), "_buffers", ()) and name not in d["_buffer_names"]:
            # the former Layer API: buffers named in a class attribute ``_buffers``
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"{self.name}: buffer {name!r} must be a numpy array, "
                    f"got {type(value).__name__}"
                )
            _drop(d, name)
            d["_buffer_names"].append(name)
        elif name in d["_buffer_names"]:
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"{self.name}: buffer {name!r} must be a numpy array, "
                    f"got {type(value).__name__}"
                )
        elif value is None and name in d["_param_names"]:
            pass  # a parameter switched off (bias=False): stays a slot of the state, empty
        elif name in d["_param_names"] or name in d["_child_names"]:
            _drop(d, name)
        d[name] = value

    def __delattr__(self, name: str) -> None:
        _drop(self.__dict__, name)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array: Array) -> None:
        """Register ``array`` as a buffer: saved in the state dict, never trained."""
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"{self.name}: buffer {name!r} must be a numpy array, got {type(array).__name__}"
            )
        d = self.__dict__
        _drop(d, name)
        d["_buffer_names"].append(name)
        d[name] = array

    def _check_new_child(self, name, child):
        """A module may appear only once in a tree (its saved forward state serves one
        backward): refuse ``child`` if it, or a module inside it, is already in this one."""
        if child is self:
            raise ValueError(f"{self.name}: cannot hold itself as child {name!r}")
        old = self.__dict__.get(name)
        present = {
            id(m): n
            for n, m in self.named_modules(remove_duplicate=False)
            if not (isinstance(old, Module) and _within(n, name))
        }
        for sub_name, m in child.named_modules(remove_duplicate=False):
            if id(m) in present or m is self:
                where = present.get(id(m), "") or "the container itself"
                what = type(m).__name__ + (f" {sub_name!r} of the new child" if sub_name else "")
                raise ValueError(
                    f"{self.name}: child {name!r}: the same {what} is already in this model "
                    f"(at {where!r}); a module can be used once per model: build another "
                    "instance (fastcnn has no autograd to sum the gradients of two uses)"
                )

    # -- what a tree holds ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def named_children(self) -> list[tuple[str, Module]]:
        d = self.__dict__
        return [(n, d[n]) for n in d["_child_names"]]

    def children(self) -> list[Module]:
        return [m for _, m in self.named_children()]

    def named_modules(
        self, prefix: str = "", remove_duplicate: bool = True
    ) -> list[tuple[str, Module]]:
        """(dotted name, module) for this module ("" or ``prefix``) and every descendant,
        depth-first, in construction order."""
        out: list[tuple[str, Module]] = []
        seen: set[int] = set()

        def walk(module, name):
            if remove_duplicate:
                if id(module) in seen:
                    return
                seen.add(id(module))
            out.append((name, module))
            for child_name, child in module.named_children():
                walk(child, f"{name}.{child_name}" if name else child_name)

        walk(self, prefix)
        return out

    def modules(self) -> list[Module]:
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """(dotted name, Parameter), depth-first in construction order, each Parameter once."""
        out: list[tuple[str, Parameter]] = []
        seen: set[int] = set()
        for mod_name, module in self.named_modules(prefix):
            d = module.__dict__
            for n in d["_param_names"]:
                p = d[n]
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{mod_name}.{n}" if mod_name else n, p))
        return out

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> list[tuple[str, Array]]:
        out: list[tuple[str, Array]] = []
        for mod_name, module in self.named_modules(prefix):
            d = module.__dict__
            out += [(f"{mod_name}.{n}" if mod_name else n, d[n]) for n in d["_buffer_names"]]
        return out

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()

    # -- mode -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Self:
        for m in self.modules():
            m.__dict__["training"] = bool(mode)
        return self

    def eval(self) -> Self:
        return self.train(False)

    # -- computation ------------------------------------------------------------------------------
    def __call__(self, x: Array) -> Array:
        """forward; in training mode on a copy of an array input, returning a copy of an array
        output: the backward then uses the arrays the forward saw and made, whatever the caller
        does to its batch buffer or to the result before calling it (issue: silent wrong
        gradients; numpy arrays have no version counter to detect such edits). Containers run
        their children's ``forward`` directly: only the outermost call copies."""
        if not self.training:
            return self.forward(x)
        # copies from the pool, in the array's own memory layout (channels-last stays so; an
        # NCHW batch of images becomes channels-last where the first module reads it so)
        if isinstance(x, np.ndarray):
            x = _pooled_copy(x, images=self._reads_channels_last())
        y = self.forward(x)
        return _pooled_copy(y) if isinstance(y, np.ndarray) else y

    def _reads_channels_last(self) -> bool:
        """Whether this module's forward reads its input channels-last, converting an NCHW
        array itself (a convolution): then a call may hand it the batch in that layout, which
        changes none of its results. Other modules (BatchNorm's NCHW path, say) may sum in
        another order on another layout."""
        return False

    def forward(self, x: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name}: forward is not implemented")

    def backward(
        self, dy: Array, input_grad: bool = True
    ) -> Array | None:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name}: backward is not implemented")

    def save_for_backward(self, *values: Any) -> None:
        """Keep what this module's backward needs from the forward that just ran."""
        d = self.__dict__
        d["_saved"], d["_saved_used"] = values, False

    def saved_for_backward(self) -> tuple[Any, ...]:
        """What the last forward kept, once: a second backward after one forward is an error
        (the state of the first use of a module called twice would be gone). The arrays stay
        referenced until the next forward replaces them: freed early, glibc's malloc hands
        them back to the system and the next step pays page faults to get them again."""
        d = self.__dict__
        if d["_saved"] is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        if d["_saved_used"]:
            raise RuntimeError(
                f"{self.name}: backward called twice after one forward (a module called twice "
                "per step? each use needs its own instance); run forward again first"
            )
        d["_saved_used"] = True
        return d["_saved"]

    def forward_token(self) -> object:
        """An opaque token of this module's last forward (what it saved for its backward, or
        None): a container compares it before the backward, to refuse the state of another
        call (the same module run meanwhile by another model sharing it)."""
        return self.__dict__["_saved"]

    def predict(self, x: ArrayLike | DataLoader | Iterator[Array], batch_size: int = 256) -> Array:
        """Outputs for ``x`` computed in eval mode in batches of ``batch_size``; the previous
        modes are restored afterwards. Runs with the BLAS limited as in ``fit``/``evaluate``
        (``fastcnn.threads.compute_threads``), so the logits equal ``evaluate``'s.

        ``x``: an array (uint8 pixels are scaled to [0, 1], pixel / 255, batch by batch), a
        :class:`fastcnn.data.DataLoader` (its batches, labels ignored), or an iterator of
        batches."""
        from .data import DataLoader, to_float
        from .threads import compute_threads

        what = f"{self.name}.predict"
        if not is_int(batch_size):
            raise TypeError(f"{what}: expected batch_size to be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"{what}: expected batch_size >= 1, got {batch_size}")
        batches: Iterator[Array] | None = None
        arr = np.empty(0)
        if isinstance(x, DataLoader):
            batches = (xb for xb, _ in x)
        elif isinstance(x, Iterator):
            batches = x
        else:
            arr = np.asarray(x)
            if arr.ndim < 1:
                raise ValueError(
                    f"{what}: expected a batch of inputs (N, ...), got shape {arr.shape}"
                )
            if arr.dtype == np.uint8:
                pixels = arr
                batches = (
                    to_float(pixels[i : i + batch_size])
                    for i in range(0, pixels.shape[0], batch_size)
                )
        # one predict at a time: each saves the train/eval modes and restores them, and a second
        # thread's would save the first one's eval modes and restore those
        with _PREDICT_LOCK:
            modes = [(m, m.training) for m in self.modules()]
            self.eval()
            try:
                with compute_threads():
                    if batches is not None:
                        return np.concatenate([self.forward(b) for b in batches], axis=0)
                    if arr.shape[0] <= batch_size:
                        return self.forward(arr)
                    outs = [
                        self.forward(arr[i : i + batch_size])
                        for i in range(0, arr.shape[0], batch_size)
                    ]
                    return np.concatenate(outs, axis=0)
            finally:
                for m, mode in modes:
                    m.__dict__["training"] = mode

    # -- state ------------------------------------------------------------------------------------
    def _state_targets(self) -> dict[str, Array]:
        """name -> the array itself, parameters then buffers of each module, depth-first."""
        targets: dict[str, Array] = {}
        for mod_name, module in self.named_modules():
            d = module.__dict__
            for n in d["_param_names"]:
                if d[n] is not None:
                    targets[f"{mod_name}.{n}" if mod_name else n] = d[n].data
            for n in d["_buffer_names"]:
                targets[f"{mod_name}.{n}" if mod_name else n] = d[n]
        return targets

    def state_dict(self) -> dict[str, Array]:
        """name -> a copy of every parameter and buffer ("0.weight", "1.running_mean", ...)."""
        return {k: v.copy() for k, v in self._state_targets().items()}

    def check_state_dict(
        self, state: Mapping[str, ArrayLike], strict: bool = True
    ) -> list[tuple[Array, Array]]:
        """Validate ``state`` (keys, shapes, dtypes) without assigning; returns the list of
        (target array, value) pairs to copy."""
        return check_state(self._state_targets(), state, strict, self.name)

    def load_state_dict(self, state: Mapping[str, ArrayLike], strict: bool = True) -> None:
        """Copy ``state`` into the parameters and buffers in place. Every key, shape and dtype is
        validated before anything is assigned; with ``strict``, missing or unexpected keys are a
        ValueError listing them (without, they are skipped)."""
        for target, value in self.check_state_dict(state, strict):
            np.copyto(target, value)

    def get_rng_state(self) -> dict[str, Any]:
        """{dotted name: state} for every module of the tree with its own generator (Dropout)."""
        return {
            n: m.get_rng_state()
            for n, m in self.named_modules()
            if m is not self and m.has_rng_state
        }

    def set_rng_state(self, states: dict[str, Any]) -> None:
        modules = dict(self.named_modules())
        if not isinstance(states, dict):
            raise TypeError(
                f"{self.name}: expected {{module name: generator state}}, "
                f"got {type(states).__name__}"
            )
        for key, state in states.items():
            module = modules.get(key)
            if module is None or module is self or not module.has_rng_state:
                raise ValueError(f"{self.name}: no module with a generator at {key!r}")
            module.set_rng_state(state)

    # -- config -----------------------------------------------------------------------------------
    def get_config(self) -> Config:
        """{"class": registered name, **constructor arguments}: JSON-able, enough with
        :func:`module_from_config` to rebuild this module (with fresh parameters)."""
        return {"class": self.name}

    @classmethod
    def state_spec(cls, config: Config) -> dict[str, tuple[Shape, Any]] | None:
        """{name: (shape, dtype)} of the parameters and buffers a module built from ``config``
        would hold, worked out without building it, or None when the class cannot tell
        (then it has to be built to know). A checkpoint's architecture is checked against its
        tensors this way before anything is allocated: a small file cannot make the library
        allocate the gigabytes its config might declare. Classes that hold no state whatever
        their config say so with ``_stateless = True`` in their own body."""
        return {} if cls.__dict__.get("_stateless") else None

    @classmethod
    def from_config(cls, config: Config, rng: Rng = None) -> Self:
        kwargs = {k: v for k, v in config.items() if k != "class"}
        if "rng" in inspect.signature(cls).parameters:
            kwargs["rng"] = rng
        return cls(**kwargs)

    # -- shapes and summary -----------------------------------------------------------------------
    def output_shape(self, input_shape: Sequence[int]) -> Shape:
        """The output shape for an input of this shape (validated): identity by default."""
        return tuple(int(s) for s in input_shape)

    def flops(self, input_shape: Sequence[int]) -> int:
        """Forward floating-point operations (elementwise modules: one per element)."""
        return int(np.prod(self.output_shape(input_shape)))

    def trace_shapes(self, input_shape: Sequence[int], visit: Visit, prefix: str = "") -> Shape:
        """Walk the tree for an input of this shape, validating it on the way; returns the
        output shape. ``visit(name, module, input_shape)`` is called for every module,
        containers before their children, and returns a dict that is then given the module's
        ``output_shape`` and its own ``flops`` (a container's: only what it adds itself).
        Containers override this to walk their children."""
        row = visit(prefix, self, tuple(int(s) for s in input_shape))
        out = self.output_shape(input_shape)
        row.update(output_shape=out, flops=self.flops(input_shape))
        return out

    def summary(
        self, input_shape: Sequence[int], print_fn: Callable[[str], object] | None = print
    ) -> str:
        """A table of each module's output shape, parameter count and forward FLOPs, with
        totals, for an input of shape ``input_shape`` (batch dimension included, e.g.
        (1, 1, 28, 28)); checks on the way that the modules fit together. Returns the table
        and prints it (``print_fn=None`` to only return it)."""
        from .summary import summary_table

        text = summary_table(self, tuple(int(s) for s in input_shape))
        if print_fn is not None:
            print_fn(text)
        return text

    # -- repr -------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        cfg = self.get_config()
        return ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "class")

    def __repr__(self) -> str:
        children = self.named_children()
        if not children:
            return f"{self.name}({self.extra_repr()})"
        lines = [f"  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in children]
        return f"{self.name}(\n" + "\n".join(lines) + "\n)"


def _drop(d, name):
    for names in ("_param_names", "_buffer_names", "_child_names"):
        if name in d[names]:
            d[names].remove(name)
            if names == "_child_names":
                _TREE["version"] += 1


def _within(dotted, name):
    return dotted == name or dotted.startswith(name + ".")


def check_state(
    targets: dict[str, Array], state: Mapping[str, ArrayLike], strict: bool, owner: str
) -> list[tuple[Array, Array]]:
    """Validate every key, shape and dtype of ``state`` against ``targets`` (name -> array);
    returns the (target, value) pairs to copy, or raises naming every problem."""
    if not hasattr(state, "keys"):
        raise TypeError(
            f"{owner}: expected a state dict (name -> array), got {type(state).__name__}"
        )
    missing = [k for k in targets if k not in state]
    unexpected = [k for k in state if k not in targets]
    problems: list[str] = []
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    pairs: list[tuple[Array, Array]] = []
    for key, target in targets.items():
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


# -------------------------------------------------------------------------------------------------
# the registry

_REGISTRY: dict[str, type] = {}


@overload
def register_module(cls: type[M], *, name: str | None = None) -> type[M]: ...
@overload
def register_module(
    cls: None = None, *, name: str | None = None
) -> Callable[[type[M]], type[M]]: ...
def register_module(cls: type[M] | None = None, *, name: str | None = None) -> Any:
    """Register a Module subclass so that checkpoints holding it can be loaded; usable as a
    decorator (``@fastcnn.register_module``). ``name`` defaults to the class name, the
    ``"class"`` entry of its ``get_config()``. Registering another class under a taken name
    is a ValueError; registering the same class again does nothing.

    The class must rebuild itself from its config: by default ``cls(**config_without_class)``
    (plus ``rng`` when its constructor takes one), so ``get_config()`` returns the constructor's
    arguments; a container whose children are arguments overrides ``from_config`` and builds
    them with :func:`module_from_config`.
    """

    def register(c: type[M]) -> type[M]:
        if not (isinstance(c, type) and issubclass(c, Module)):
            raise TypeError(f"register_module: expected a fastcnn Module subclass, got {c!r}")
        key = c.__name__ if name is None else name
        if not isinstance(key, str) or not key:
            raise TypeError(f"register_module: expected a non-empty str name, got {key!r}")
        known = _REGISTRY.get(key)
        if known is not None and known is not c:
            raise ValueError(
                f"register_module: the name {key!r} is taken by {known.__module__}."
                f"{known.__qualname__}"
            )
        _REGISTRY[key] = c
        return c

    return register if cls is None else register(cls)


def registered_modules() -> dict[str, type]:
    """{name: class} of every registered module class (a copy)."""
    return dict(_REGISTRY)


_nesting = threading.local()  # how deep module_from_config / state_spec_of are, in this thread


def _registered_class(config):
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        raise ValueError(f"expected a module config dict with a 'class' key, got {config!r:.200}")
    cls = _REGISTRY.get(config["class"])
    if cls is None:
        raise ValueError(
            f"unknown module class {config['class']!r:.100}: register it with "
            f"fastcnn.register_module; known: {sorted(_REGISTRY)}"
        )
    return cls


def _nested(call):
    depth = getattr(_nesting, "depth", 0)
    if depth >= MAX_CONFIG_DEPTH:
        raise ValueError(f"module config nested deeper than {MAX_CONFIG_DEPTH} levels")
    _nesting.depth = depth + 1
    try:
        return call()
    finally:
        _nesting.depth = depth


def state_spec_of(
    config: Config, prefix: str = ""
) -> dict[str, tuple[Shape, np.dtype[Any]]] | None:
    """{dotted name: (shape, dtype)} of the state the module tree ``config`` describes, without
    building it (``Module.state_spec``), or None if a class in it cannot tell."""
    cls = _registered_class(config)
    spec = _nested(lambda: cls.state_spec(config))
    if spec is None:
        return None
    return {
        prefix + k: (tuple(int(d) for d in shape), np.dtype(dtype))
        for k, (shape, dtype) in spec.items()
    }


def module_from_config(config: Config, rng: Rng = None) -> Module:
    """Build a module from its ``get_config()`` dict, through the registry only (nothing is
    imported or called by a name that is not registered). Parameters are freshly initialised
    from ``rng`` (a Generator or a seed); load weights with ``load_state_dict``. Containers
    call this for their children: a config nested deeper than :data:`MAX_CONFIG_DEPTH` is a
    ValueError."""
    cls = _registered_class(config)
    if not isinstance(rng, np.random.Generator):
        from .seeding import default_rng  # rng=None: the global generator of manual_seed

        rng = default_rng(rng)
    return _nested(lambda: cls.from_config(config, rng=rng))
