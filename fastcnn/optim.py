"""Optimizers (SGD, Adam, AdamW) and learning-rate schedulers (StepLR, CosineAnnealingLR,
OneCycleLR, LinearWarmup).

The update rules are PyTorch's (torch.optim), for one parameter group:

SGD      g = grad + weight_decay * p
         b = g                                   (first step)
         b = momentum * b + (1 - dampening) * g  (later steps)
         g = g + momentum * b  if nesterov  else  b          (when momentum != 0)
         p = p - lr * g
Adam     g = grad + weight_decay * p
         m = beta1 * m + (1 - beta1) * g ;  v = beta2 * v + (1 - beta2) * g * g
         p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
AdamW    p = p * (1 - lr * weight_decay), then Adam with g = grad

Parameters are objects with ``.data`` and ``.grad`` arrays (fastcnn.layers.Parameter); a
parameter whose ``.grad`` is None is skipped. Updates happen in place in the parameter's dtype:
every scalar is cast to that dtype, and the temporaries live in one or two scratch arrays per
parameter allocated on the first step, so a step allocates nothing parameter-sized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import is_int, is_real
from ._types import Array
from .kernels import optim as _kernels

if TYPE_CHECKING:
    from .module import Parameter

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "LRScheduler",
    "StepLR",
    "CosineAnnealingLR",
    "OneCycleLR",
    "LinearWarmup",
]


def _check_nonneg(name, what, value):
    if not is_real(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name}: expected {what} >= 0, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: the parameter list, ``lr``, per-parameter state, ``zero_grad``, ``step`` and
    ``state_dict`` / ``load_state_dict``. Subclasses define ``_update`` (one parameter),
    ``_hyper`` / ``_set_hyper`` (hyperparameters) and ``_buffer_names`` (state arrays)."""

    # defined by the subclasses
    _update: Callable[[int, Array, Array, dict[str, Any], Any], None]
    _hyper: Callable[[], dict[str, Any]]
    _set_hyper: Callable[[dict[str, Any]], None]

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params = self._check_params(params)
        self.lr = lr
        self.state: dict[int, dict[str, Any]] = {}  # index -> {"step": int, buffer name: ndarray}
        self._scratch: dict[int, list[Array]] = {}  # index -> scratch arrays like the parameter

    # -- construction checks ----------------------------------------------------------------
    def _check_params(self, params):
        name = type(self).__name__
        if isinstance(params, np.ndarray) or not hasattr(params, "__iter__"):
            raise TypeError(
                f"{name}: expected an iterable of parameters (objects with .data and .grad), "
                f"got {type(params).__name__}"
            )
        params = list(params)
        if not params:
            raise ValueError(f"{name}: expected a non-empty list of parameters, got an empty one")
        seen = set()
        for i, p in enumerate(params):
            data = getattr(p, "data", None)
            if not isinstance(data, np.ndarray) or not hasattr(p, "grad"):
                raise TypeError(
                    f"{name}: expected parameter {i} to have .data (numpy array) and .grad, "
                    f"got {type(p).__name__}"
                )
            if not np.issubdtype(data.dtype, np.floating):
                raise TypeError(f"{name}: expected floating parameter {i}, got {data.dtype}")
            if not data.flags.writeable:
                raise ValueError(
                    f"{name}: expected parameter {i} to be writeable (updated in "
                    f"place), got a read-only array"
                )
            if id(p) in seen:
                raise ValueError(f"{name}: parameter {i} appears more than once in the list")
            seen.add(id(p))
        return params

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_nonneg(type(self).__name__, "lr", value)

    # -- training step ----------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero (in place; None gradients stay None)."""
        for p in self.params:
            if p.grad is not None:
                p.grad.fill(0)

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        name = type(self).__name__
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            data = p.data
            if not isinstance(grad, np.ndarray):
                raise TypeError(
                    f"{name}: expected parameter {i}'s gradient to be a numpy array, "
                    f"got {type(grad).__name__}"
                )
            if grad.shape != data.shape or grad.dtype != data.dtype:
                raise ValueError(
                    f"{name}: expected parameter {i}'s gradient of shape {data.shape} and dtype "
                    f"{data.dtype}, got {grad.shape} {grad.dtype}"
                )
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = {"step": 0}
            state["step"] += 1
            self._update(i, data, grad, state, data.dtype.type)

    def _scratch_arrays(self, i, data, count):
        bufs = self._scratch.get(i)
        if (
            bufs is None
            or len(bufs) < count
            or bufs[0].shape != data.shape
            or bufs[0].dtype != data.dtype
        ):
            bufs = self._scratch[i] = [np.empty_like(data) for _ in range(count)]
        return bufs

    def _with_weight_decay(self, data, grad, weight_decay, scratch, t):
        """grad + weight_decay * data, written into ``scratch`` (grad itself is left untouched)."""
        if not weight_decay:
            return grad
        np.multiply(data, t(weight_decay), out=scratch)
        scratch += grad
        return scratch

    # -- state --------------------------------------------------------------------------------
    def _buffer_names(self):
        return ()

    def state_dict(self) -> dict[str, Any]:
        """{"hyper": JSON-able hyperparameters,
        "state": {str(index): {name: array copy, "step": int}}}."""
        hyper: dict[str, Any] = {"class": type(self).__name__, "num_params": len(self.params)}
        hyper.update(self._hyper())
        state = {}
        for i, s in sorted(self.state.items()):
            entry: dict[str, Any] = {"step": int(s["step"])}
            for key in self._buffer_names():
                if key in s:
                    entry[key] = s[key].copy()
            state[str(i)] = entry
        return {"hyper": hyper, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and per-parameter state; everything is checked (class,
        parameter count, names, shapes, dtypes, values) before anything is assigned."""
        name = type(self).__name__
        if (
            not isinstance(state_dict, dict)
            or "hyper" not in state_dict
            or "state" not in state_dict
        ):
            raise ValueError(
                f"{name}: expected a state dict with keys 'hyper' and 'state', got "
                f"{state_dict!r:.200}"
            )
        hyper = dict(state_dict["hyper"])
        cls = hyper.pop("class", name)
        if cls != name:
            raise ValueError(f"{name}: expected a state dict saved from {name}, got one from {cls}")
        count = hyper.pop("num_params", len(self.params))
        if count != len(self.params):
            raise ValueError(
                f"{name}: expected a state dict for {len(self.params)} parameters, got one for "
                f"{count}"
            )
        # validate the hyperparameters on a scratch copy of the current ones
        saved = self._hyper()
        unknown = set(hyper) - set(saved)
        if unknown:
            raise ValueError(
                f"{name}: expected hyperparameters {sorted(saved)}, got unexpected hyperparameters "
                f"{sorted(unknown)}"
            )
        try:
            self._set_hyper({**saved, **hyper})
        except (TypeError, ValueError):
            self._set_hyper(saved)
            raise
        new_hyper = self._hyper()
        self._set_hyper(saved)

        # the buffers the loaded hyperparameters need
        expected_names = set(self._buffer_names_for(new_hyper))
        entries = state_dict["state"]
        if not isinstance(entries, dict):
            raise ValueError(f"{name}: expected 'state' to be a dict, got {type(entries).__name__}")
        new_state = {}
        for key, entry in entries.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name}: expected state keys that are parameter indices, got {key!r}"
                ) from None
            if not 0 <= i < len(self.params) or str(i) != str(key):
                raise ValueError(
                    f"{name}: expected state keys '0' to '{len(self.params) - 1}', got {key!r}"
                )
            if not isinstance(entry, dict) or "step" not in entry:
                raise ValueError(f"{name}: expected state entry {key} to be a dict with 'step'")
            step = entry["step"]
            if isinstance(step, np.ndarray) and step.ndim == 0:
                step = step.item()
            if not is_int(step, 0):
                raise ValueError(
                    f"{name}: expected state entry {key} 'step' to be an int >= 0, got {step!r}"
                )
            names = set(entry) - {"step"}
            if names != expected_names:
                raise ValueError(
                    f"{name}: expected state entry {key} to hold {sorted(expected_names)}, "
                    f"got {sorted(names)}"
                )
            data = self.params[i].data
            loaded: dict[str, Any] = {"step": int(step)}
            for buf_name in sorted(names):
                arr = entry[buf_name]
                if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
                    raise TypeError(
                        f"{name}: expected state entry {key} '{buf_name}' to be a floating array, "
                        f"got {getattr(arr, 'dtype', type(arr).__name__)}"
                    )
                if arr.shape != data.shape:
                    raise ValueError(
                        f"{name}: expected state entry {key} '{buf_name}' of parameter {i}'s shape "
                        f"{data.shape}, got {arr.shape}"
                    )
                loaded[buf_name] = np.array(arr, dtype=data.dtype, order="C", copy=True)
            new_state[i] = loaded
        self._set_hyper(new_hyper)
        self.state = new_state

    def _buffer_names_for(self, hyper):
        return self._buffer_names()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and weight decay, as
    ``torch.optim.SGD``."""

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        nesterov: bool = False,
        weight_decay: float = 0,
    ) -> None:
        super().__init__(params, lr)
        self._set_hyper(
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
            )
        )

    def _hyper(self):
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }

    def _set_hyper(self, h):
        name = type(self).__name__
        momentum = _check_nonneg(name, "momentum", h["momentum"])
        dampening = _check_nonneg(name, "dampening", h["dampening"])
        weight_decay = _check_nonneg(name, "weight_decay", h["weight_decay"])
        nesterov = h["nesterov"]
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ValueError(f"{name}: expected nesterov to be True or False, got {nesterov!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"{name}: Nesterov momentum requires momentum > 0 and dampening = 0, "
                f"got momentum={momentum}, dampening={dampening}"
            )
        self.lr = h["lr"]
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = bool(nesterov), weight_decay

    def _buffer_names(self):
        return ("momentum_buffer",)

    def _buffer_names_for(self, hyper):
        return ("momentum_buffer",) if hyper["momentum"] else ()

    def _update(self, i, data, grad, state, t):
        momentum = self.momentum
        if data.flags.c_contiguous and data.flags.writeable and grad.flags.c_contiguous:
            # one pass (kernels/optim.py), bitwise the numpy sequence below
            buf = state.get("momentum_buffer")
            first = buf is None
            if momentum and first:
                buf = state["momentum_buffer"] = np.empty_like(data)
            _kernels.sgd_update(
                data.reshape(-1),
                grad.reshape(-1),
                (buf if momentum else data).reshape(-1),
                t(self.lr),
                t(momentum),
                t(1.0 - self.dampening),
                bool(self.dampening),
                t(self.weight_decay),
                self.nesterov,
                first,
            )
            return
        s1, s2 = self._scratch_arrays(i, data, 2)
        g = self._with_weight_decay(data, grad, self.weight_decay, s1, t)
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= t(momentum)
                if self.dampening:
                    np.multiply(g, t(1.0 - self.dampening), out=s2)
                    buf += s2
                else:
                    buf += g
            if self.nesterov:
                np.multiply(buf, t(momentum), out=s2)
                s2 += g
                g = s2
            else:
                g = buf
        np.multiply(g, t(self.lr), out=s2)
        data -= s2


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as ``torch.optim.Adam``."""

    _decoupled = False

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
    ) -> None:
        super().__init__(params, lr)
        self._set_hyper(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _hyper(self):
        return {
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def _set_hyper(self, h):
        name = type(self).__name__
        betas = h["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}: expected betas as a pair (beta1, beta2), got {betas!r}"
            ) from None
        for k, b in enumerate((beta1, beta2)):
            if not is_real(b) or not 0.0 <= b < 1.0:
                raise ValueError(f"{name}: expected betas[{k}] in [0, 1), got {b!r}")
        eps = _check_nonneg(name, "eps", h["eps"])
        weight_decay = _check_nonneg(name, "weight_decay", h["weight_decay"])
        self.lr = h["lr"]
        self.betas = (float(beta1), float(beta2))
        self.eps, self.weight_decay = eps, weight_decay

    def _buffer_names(self):
        return ("exp_avg", "exp_avg_sq")

    def _update(self, i, data, grad, state, t):
        beta1, beta2 = self.betas
        s1, s2 = self._scratch_arrays(i, data, 2)
        if self._decoupled:
            if self.weight_decay:
                data *= t(1.0 - self.lr * self.weight_decay)
            g = grad
        else:
            g = self._with_weight_decay(data, grad, self.weight_decay, s1, t)
        m = state.get("exp_avg")
        if m is None:
            m = state["exp_avg"] = np.zeros_like(data)
            state["exp_avg_sq"] = np.zeros_like(data)
        v = state["exp_avg_sq"]
        step = state["step"]
        # m = beta1 m + (1 - beta1) g
        m *= t(beta1)
        np.multiply(g, t(1.0 - beta1), out=s2)
        m += s2
        # v = beta2 v + (1 - beta2) g^2
        v *= t(beta2)
        np.multiply(g, g, out=s2)
        s2 *= t(1.0 - beta2)
        v += s2
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        step_size = self.lr / bias_correction1
        # denom = sqrt(v) / sqrt(bias_correction2) + eps ; p -= step_size * m / denom
        np.sqrt(v, out=s2)
        s2 /= t(math.sqrt(bias_correction2))
        s2 += t(self.eps)
        np.divide(m, s2, out=s2)
        s2 *= t(step_size)
        data -= s2


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``."""

    _decoupled = True

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------
# learning-rate schedulers


class LRScheduler:
    """Base: sets ``optimizer.lr`` from a closed form of the epoch counter ``last_epoch``.

    As PyTorch, construction counts as the first step (``last_epoch`` = 0, lr = the optimizer's
    lr at construction, ``base_lr``); call ``step()`` once per epoch after the optimizer steps
    (once per batch for a scheduler with ``per_batch = True``, such as OneCycleLR)."""

    #: Whether ``fit`` steps this scheduler after every batch (else after every epoch).
    per_batch = False

    # defined by the subclasses: validate and set their own parameters
    _set_params: Callable[[dict[str, Any]], None]

    def __init__(self, optimizer: Optimizer) -> None:
        name = type(self).__name__
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{name}: expected a fastcnn.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self._last_lr = optimizer.lr  # as PyTorch: the initial step leaves the lr unchanged

    def _closed_form(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        self._last_lr = self.optimizer.lr = self._closed_form(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        """The learning rate set by the last step, as a one-element list (PyTorch's convention:
        one entry per parameter group)."""
        return [self._last_lr]

    def _params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "base_lr": self.base_lr,
            "last_epoch": self.last_epoch,
            "last_lr": self._last_lr,
            **self._params(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scheduler (validated first) and set the optimizer's lr to its last lr."""
        name = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(f"{name}: expected a state dict, got {type(state).__name__}")
        cls = state.get("class", name)
        if cls != name:
            raise ValueError(f"{name}: expected a state dict saved from {name}, got one from {cls}")
        expected = set(self.state_dict())
        if set(state) - {"class"} != expected - {"class"}:
            raise ValueError(
                f"{name}: expected state dict keys {sorted(expected)}, got {sorted(state)}"
            )
        epoch = state["last_epoch"]
        if not is_int(epoch, 0):
            raise ValueError(f"{name}: expected last_epoch to be an int >= 0, got {epoch!r}")
        base_lr = _check_nonneg(name, "base_lr", state["base_lr"])
        last_lr = _check_nonneg(name, "last_lr", state["last_lr"])
        saved = self._params()
        try:
            self._set_params({k: state[k] for k in saved})
        except (TypeError, ValueError):
            self._set_params(saved)
            raise
        self.base_lr, self.last_epoch = base_lr, int(epoch)
        self._last_lr = self.optimizer.lr = last_lr

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args}, last_epoch={self.last_epoch})"


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size), as ``torch.optim.lr_scheduler.StepLR``."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        self._set_params({"step_size": step_size, "gamma": gamma})
        super().__init__(optimizer)

    def _params(self):
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _set_params(self, p):
        step_size, gamma = p["step_size"], p["gamma"]
        if not is_int(step_size, 1):
            raise ValueError(f"StepLR: expected step_size to be an int >= 1, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _check_nonneg("StepLR", "gamma", gamma)

    def _closed_form(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2, PyTorch's closed
    form of ``torch.optim.lr_scheduler.CosineAnnealingLR`` (periodic past T_max, as PyTorch's)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0) -> None:
        self._set_params({"T_max": T_max, "eta_min": eta_min})
        super().__init__(optimizer)

    def _params(self):
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def _set_params(self, p):
        T_max, eta_min = p["T_max"], p["eta_min"]
        if not is_int(T_max, 1):
            raise ValueError(f"CosineAnnealingLR: expected T_max to be an int >= 1, got {T_max!r}")
        self.T_max = int(T_max)
        self.eta_min = _check_nonneg("CosineAnnealingLR", "eta_min", eta_min)

    def _closed_form(self, epoch):
        return (
            self.eta_min
            + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        )


class OneCycleLR(LRScheduler):
    """The one-cycle policy (Smith and Topal, 2018), as ``torch.optim.lr_scheduler.OneCycleLR``
    with its defaults: the lr rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of ``total_steps``, then anneals to ``max_lr / div_factor / final_div_factor``
    (cosine, or linear with ``anneal_strategy='linear'``); with ``cycle_momentum`` the momentum
    (SGD's, or Adam's beta1) moves the opposite way between ``max_momentum`` and
    ``base_momentum``. Stepped once per BATCH (``per_batch``: ``fit`` does so); stepping past
    ``total_steps`` is a ValueError, as in PyTorch."""

    per_batch = True

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> None:
        self._set_params(
            {
                "max_lr": max_lr,
                "total_steps": total_steps,
                "pct_start": pct_start,
                "anneal_strategy": anneal_strategy,
                "cycle_momentum": cycle_momentum,
                "base_momentum": base_momentum,
                "max_momentum": max_momentum,
                "div_factor": div_factor,
                "final_div_factor": final_div_factor,
            }
        )
        if cycle_momentum and not (hasattr(optimizer, "momentum") or hasattr(optimizer, "betas")):
            raise ValueError("OneCycleLR: cycle_momentum needs an optimizer with momentum or betas")
        super().__init__(optimizer)
        self.base_lr = self.max_lr / self.div_factor
        self._apply(0)

    def _params(self):
        return {
            k: getattr(self, k)
            for k in (
                "max_lr",
                "total_steps",
                "pct_start",
                "anneal_strategy",
                "cycle_momentum",
                "base_momentum",
                "max_momentum",
                "div_factor",
                "final_div_factor",
            )
        }

    def _set_params(self, p):
        name = "OneCycleLR"
        total = p["total_steps"]
        if not is_int(total, 1):
            raise ValueError(f"{name}: expected total_steps to be an int >= 1, got {total!r}")
        pct = p["pct_start"]
        if not is_real(pct) or not 0 <= pct <= 1:
            raise ValueError(f"{name}: expected 0 <= pct_start <= 1, got {pct!r}")
        if p["anneal_strategy"] not in ("cos", "linear"):
            raise ValueError(
                f"{name}: expected anneal_strategy 'cos' or 'linear', got {p['anneal_strategy']!r}"
            )
        if not isinstance(p["cycle_momentum"], (bool, np.bool_)):
            raise ValueError(
                f"{name}: expected cycle_momentum to be True or False, got {p['cycle_momentum']!r}"
            )
        for key in ("max_lr", "div_factor", "final_div_factor"):
            if not is_real(p[key]) or not math.isfinite(p[key]) or p[key] <= 0:
                raise ValueError(f"{name}: expected {key} > 0, got {p[key]!r}")
        self.max_lr = float(p["max_lr"])
        self.total_steps = int(total)
        self.pct_start = float(pct)
        self.anneal_strategy = p["anneal_strategy"]
        self.cycle_momentum = bool(p["cycle_momentum"])
        self.base_momentum = _check_nonneg(name, "base_momentum", p["base_momentum"])
        self.max_momentum = _check_nonneg(name, "max_momentum", p["max_momentum"])
        self.div_factor = float(p["div_factor"])
        self.final_div_factor = float(p["final_div_factor"])

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "linear":
            return (end - start) * pct + start
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def _schedule(self, step):
        """(lr, momentum) at ``step``, PyTorch's phases: warm-up to step
        ``pct_start * total_steps - 1``, then the annealing to step ``total_steps - 1``."""
        initial = self.max_lr / self.div_factor
        phases = (
            (
                float(self.pct_start * self.total_steps) - 1,
                initial,
                self.max_lr,
                self.max_momentum,
                self.base_momentum,
            ),
            (
                self.total_steps - 1,
                self.max_lr,
                initial / self.final_div_factor,
                self.base_momentum,
                self.max_momentum,
            ),
        )
        start: float = 0
        for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
            if step <= end or i == len(phases) - 1:
                pct = (step - start) / (end - start)
                return self._anneal(lr0, lr1, pct), self._anneal(m0, m1, pct)
            start = end

    def _apply(self, step):
        lr, momentum = self._schedule(step)
        self._last_lr = self.optimizer.lr = lr
        if self.cycle_momentum:
            if hasattr(self.optimizer, "momentum"):
                self.optimizer.momentum = momentum
            else:
                opt: Any = self.optimizer  # Adam, AdamW: checked at construction
                opt.betas = (momentum, opt.betas[1])

    def step(self) -> None:
        if self.last_epoch + 1 >= self.total_steps + 1:
            raise ValueError(
                f"OneCycleLR: tried to step {self.last_epoch + 1} times; the "
                f"schedule has {self.total_steps} steps (total_steps)"
            )
        self.last_epoch += 1
        self._apply(self.last_epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._apply(self.last_epoch)


class LinearWarmup(LRScheduler):
    """Linear warm-up over the first ``warmup_steps`` batches, optionally in front of another
    scheduler ``after``; stepped once per BATCH (``per_batch``: ``fit`` does so).

    The lr of step t is ``factor(t) * lr_after(t)`` with ``factor(t) = start_factor + (1 -
    start_factor) * min(t, warmup_steps) / warmup_steps``: from ``start_factor`` times the
    target to the target itself at step ``warmup_steps``, then the target alone. The target is
    the optimizer's lr at construction (``after=None``: constant after the warm-up), or the lr
    of ``after``, stepped by this scheduler at its own cadence from the first batch on: every
    step for a per-batch scheduler, every ``steps_per_epoch`` steps for a per-epoch one (so a
    ``StepLR``'s milestones still count epochs from the start of training). This is the
    warm-up of Goyal et al. (2017) as timm's schedulers, Hugging Face's
    ``get_linear_schedule_with_warmup`` (``start_factor=0``, their default) and Keras 3's
    ``CosineDecay(warmup_steps=...)`` give it; PyTorch spells it
    ``SequentialLR([LinearLR(...), ...])`` with every part stepped at one cadence, which a
    warm-up in batches before a schedule in epochs cannot use. ``after`` must drive the same
    optimizer; its state is saved inside this one's ``state_dict``. ::

        cosine = fastcnn.CosineAnnealingLR(opt, T_max=epochs)
        sched = fastcnn.LinearWarmup(opt, warmup_steps=500, after=cosine,
                                     steps_per_epoch=-(-len(x) // batch_size))
    """

    per_batch = True

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        after: LRScheduler | None = None,
        start_factor: float = 0.0,
        steps_per_epoch: int | None = None,
    ) -> None:
        name = "LinearWarmup"
        self.after = None
        self._set_params(
            {
                "warmup_steps": warmup_steps,
                "start_factor": start_factor,
                "steps_per_epoch": steps_per_epoch,
            }
        )
        if after is not None:
            if not isinstance(after, LRScheduler):
                raise TypeError(
                    f"{name}: expected after to be a fastcnn.optim scheduler or None, got "
                    f"{type(after).__name__}"
                )
            if after.optimizer is not optimizer:
                raise ValueError(f"{name}: after drives another optimizer than this warm-up")
            if not after.per_batch and self.steps_per_epoch is None:
                raise ValueError(
                    f"{name}: after ({type(after).__name__}) is stepped once per epoch: give "
                    "steps_per_epoch (the number of batches in an epoch)"
                )
        super().__init__(optimizer)
        self.after = after
        self._apply()

    def _params(self):
        return {
            "warmup_steps": self.warmup_steps,
            "start_factor": self.start_factor,
            "steps_per_epoch": self.steps_per_epoch,
            "after": None if self.after is None else self.after.state_dict(),
        }

    def _set_params(self, p):
        name = "LinearWarmup"
        steps = p["warmup_steps"]
        if not is_int(steps, 1):
            raise ValueError(f"{name}: expected warmup_steps to be an int >= 1, got {steps!r}")
        factor = p["start_factor"]
        if not is_real(factor) or not 0 <= factor <= 1:
            raise ValueError(f"{name}: expected 0 <= start_factor <= 1, got {factor!r}")
        per_epoch = p["steps_per_epoch"]
        if per_epoch is not None and not is_int(per_epoch, 1):
            raise ValueError(
                f"{name}: expected steps_per_epoch to be None or an int >= 1, got {per_epoch!r}"
            )
        if "after" in p:  # loading a state: after's own, validated by after
            if (p["after"] is None) != (self.after is None):
                raise ValueError(
                    f"{name}: the state was saved "
                    f"{'without' if p['after'] is None else 'with'} an after scheduler, this "
                    f"warm-up has {'none' if self.after is None else type(self.after).__name__}"
                )
            if self.after is not None:
                self.after.load_state_dict(p["after"])
        self.warmup_steps = int(steps)
        self.start_factor = float(factor)
        self.steps_per_epoch = None if per_epoch is None else int(per_epoch)

    def _apply(self):
        target = self.base_lr if self.after is None else self.after.get_last_lr()[0]
        done = min(self.last_epoch, self.warmup_steps) / self.warmup_steps
        factor = self.start_factor + (1.0 - self.start_factor) * done
        self._last_lr = self.optimizer.lr = factor * target

    def step(self) -> None:
        self.last_epoch += 1
        after = self.after
        if after is not None and (
            after.per_batch or self.last_epoch % (self.steps_per_epoch or 1) == 0
        ):
            after.step()
        self._apply()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._apply()

    def __repr__(self) -> str:
        return (
            f"LinearWarmup(warmup_steps={self.warmup_steps}, start_factor={self.start_factor}, "
            f"after={self.after!r}, steps_per_epoch={self.steps_per_epoch}, "
            f"last_epoch={self.last_epoch})"
        )
