"""Callbacks for :func:`fastcnn.fit`, as Keras's: hooks at the begin and end of training, of each
epoch and of each batch, and the four everyone asks for (``EarlyStopping``, ``ModelCheckpoint``,
``ReduceLROnPlateau``, ``CSVLogger``).

    stop = fastcnn.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    fastcnn.fit(model, loss, opt, x, y, epochs=50, val_data=(xv, yv), callbacks=[stop])

The hooks (all optional; ``logs`` is a dict, never None):

- ``on_train_begin(logs)`` / ``on_train_end(logs)``: once per ``fit`` call (on_train_end also
  after a stop, but not after an exception);
- ``on_epoch_begin(epoch, logs)`` / ``on_epoch_end(epoch, logs)``: ``epoch`` is the 0-based index,
  as Keras's (the lines and ``History.epoch`` show ``epoch + 1``); at the end ``logs`` holds the
  epoch's record of the History without its ``epoch`` (``train_loss``, ``train_accuracy``,
  ``val_loss``, ``val_accuracy``, ``seconds``, ``val_seconds``, ``images_per_second``, ``lr``)
  plus Keras's names ``loss`` and ``accuracy`` for the training figures;
- ``on_batch_begin(batch, logs)`` / ``on_batch_end(batch, logs)``: ``batch`` is the 0-based index
  in the epoch; at the end ``logs`` holds ``loss`` (the batch's mean loss), ``accuracy``, ``size``
  (images in the batch), ``lr`` (the lr the step used) and, with ``clip_grad_norm``, ``grad_norm``.

Before ``on_train_begin``, ``fit`` calls ``set_context`` (``self.model``, ``self.optimizer``,
``self.scheduler``, ``self.history``, ``self.params``: ``epochs``, ``start_epoch``,
``batch_size``, ``num_batches``, ``samples``, ``has_validation``, ``input_shape``).

**Stopping**: a callback sets ``self.model.stop_training = True`` (Keras's spelling). At the
end of an epoch, that epoch is recorded and checkpointed as usual and ``fit`` returns. During an
epoch (``on_batch_end``), ``fit`` stops after that batch and the partial epoch is neither
recorded in the History nor checkpointed: the model holds the weights of that batch, the
checkpoint those of the last complete epoch, so a resumed run redoes the whole epoch.

**Resume**: a callback whose ``state_dict()`` is not None has that state saved in ``fit``'s
checkpoint (``extra["fit"]["callbacks"]``, with its class name, in the order of ``callbacks``)
at the end of every epoch; :func:`fastcnn.training.resume_kwargs` returns it as
``callback_states`` and ``fit`` loads it with ``load_state_dict`` after ``on_train_begin``
(which resets a callback for a new run). So EarlyStopping's best value and wait count,
ReduceLROnPlateau's best, wait and cooldown, and ModelCheckpoint's best value continue where
the run stopped. Resuming with other stateful callbacks than the run saved is a ValueError.
EarlyStopping's best *weights* are not in the checkpoint (it holds the last epoch's weights, as
a resumed run needs): if the best epoch came before the resume, ``restore_best_weights`` warns
and keeps the last weights; ``ModelCheckpoint(save_best_only=True)`` keeps them on disk.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import is_int, is_real

if TYPE_CHECKING:
    from .module import Module
    from .optim import LRScheduler, Optimizer
    from .training import History

__all__ = [
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "CSVLogger",
]


class Callback:
    """Base class of fit's callbacks: override the hooks you need (each does nothing here).

    ``state_dict()`` returns None (nothing to save); a callback with state worth keeping across
    a resume returns a JSON-able dict and restores it in ``load_state_dict``.
    """

    model: Any = None
    optimizer: Optimizer | None = None
    scheduler: LRScheduler | None = None
    history: History | None = None
    params: dict[str, Any] = {}

    def set_context(
        self,
        model: Module,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        history: History,
        params: dict[str, Any],
    ) -> None:
        """Called by ``fit`` before ``on_train_begin``."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.history = history
        self.params = params

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        """Before the first epoch of a ``fit`` call."""

    def on_train_end(self, logs: dict[str, Any]) -> None:
        """After the last epoch (or a stop)."""

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        """Before epoch ``epoch`` (0-based); ``logs``: ``lr``."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        """After epoch ``epoch`` (0-based) and its validation; ``logs``: the History record."""

    def on_batch_begin(self, batch: int, logs: dict[str, Any]) -> None:
        """Before batch ``batch`` (0-based, within the epoch); ``logs``: ``size``."""

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        """After the optimizer step of batch ``batch``; ``logs``: loss, accuracy, size, lr."""

    def state_dict(self) -> dict[str, Any] | None:
        """JSON-able state saved in fit's checkpoint, or None (the default) for none."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (called by ``fit`` when resuming)."""

    def _stop(self) -> None:
        self.model.stop_training = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------
# the monitored quantity


def _check_mode(name, mode, monitor):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{name}: expected mode 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":  # Keras's rule: accuracies are maximised, everything else minimised
        return "max" if "acc" in monitor else "min"
    return mode


def _check_monitor(name, monitor):
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(
            f"{name}: expected monitor to be a name such as 'val_loss', got {monitor!r}"
        )
    return monitor


def _check_number(name, what, value):
    if not is_real(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name}: expected {what} to be a number >= 0, got {value!r}")
    return float(value)


def _check_patience(name, value):
    if not is_int(value, 0):
        raise ValueError(f"{name}: expected patience to be an integer >= 0, got {value!r}")
    return int(value)


#: What a monitored name may be, and the ones that need validation data.
EPOCH_LOG_KEYS = (
    "loss",
    "accuracy",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    "images_per_second",
)


def _require_monitor(cb, monitor):
    """At train begin: the monitored value must be one fit reports (val_* with val_data)."""
    name = type(cb).__name__
    if monitor not in EPOCH_LOG_KEYS:
        raise ValueError(
            f"{name}: cannot monitor {monitor!r}: fit reports {', '.join(EPOCH_LOG_KEYS)}"
        )
    if monitor.startswith("val_") and not cb.params.get("has_validation"):
        raise ValueError(
            f"{name}: monitors {monitor!r}, which needs validation data: "
            "pass fit(..., val_data=(x_val, y_val))"
        )


class _Monitor(Callback):
    """Tracks the best value of ``monitor`` in ``mode`` with a ``min_delta``."""

    monitor: str
    mode: str
    min_delta: float
    best: float

    def _init_monitor(self, monitor, mode, min_delta):
        name = type(self).__name__
        self.monitor = _check_monitor(name, monitor)
        self.mode = _check_mode(name, mode, self.monitor)
        self.min_delta = _check_number(name, "min_delta", min_delta)
        self.best = math.inf if self.mode == "min" else -math.inf

    def _improved(self, current):
        if current is None or not math.isfinite(current):
            return False
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    def _current(self, logs):
        value = logs.get(self.monitor)
        return None if value is None else float(value)

    @staticmethod
    def _best_to_json(best):
        return None if not math.isfinite(best) else float(best)

    def _best_from_json(self, value):
        if value is None:
            return math.inf if self.mode == "min" else -math.inf
        if not is_real(value) or not math.isfinite(value):
            raise ValueError(f"{type(self).__name__}: the saved best is {value!r}, not a number")
        return float(value)


def _check_state(cb, state, keys):
    name = type(cb).__name__
    if not isinstance(state, dict) or set(state) != set(keys):
        raise ValueError(
            f"{name}: expected a saved state with keys {sorted(keys)}, got {state!r:.200}"
        )


def _count(cb, state, key):
    value = state[key]
    if not is_int(value, 0):
        raise ValueError(f"{type(cb).__name__}: the saved {key} is {value!r}, not a count >= 0")
    return int(value)


# --------------------------------------------------------------------------------------------
# EarlyStopping


class EarlyStopping(_Monitor):
    """Stop training when ``monitor`` has not improved for ``patience`` epochs (Keras's).

    An epoch improves when its value beats the best so far by more than ``min_delta``
    (``mode`` 'min', 'max', or 'auto': max for accuracies, min otherwise). After ``patience``
    epochs without improvement (0: the first one) training stops at the end of the epoch.
    ``restore_best_weights``: at the end of training (stopped or not) the model gets the
    parameters and buffers of the best epoch back (kept in memory, a copy of ``state_dict()``).
    ``verbose`` prints a line when it stops. After ``fit``: ``stopped_epoch`` (0-based, None if
    it did not stop), ``best``, ``best_epoch`` (0-based).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        restore_best_weights: bool = False,
        verbose: bool = False,
    ) -> None:
        self._init_monitor(monitor, mode, min_delta)
        self.patience = _check_patience("EarlyStopping", patience)
        self.restore_best_weights = bool(restore_best_weights)
        self.verbose = bool(verbose)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_weights: dict[str, Any] | None = None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        _require_monitor(self, self.monitor)
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        current = self._current(logs)
        self.wait += 1
        if self._improved(current):
            assert current is not None
            self.best, self.best_epoch, self.wait = current, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.state_dict()
            return
        if self.wait >= self.patience:  # (wait >= 1 here)
            self.stopped_epoch = epoch
            self._stop()
            if self.verbose:
                best = "" if self.best_epoch is None else f" (best {self.best:.4g} at epoch "
                best += "" if self.best_epoch is None else f"{self.best_epoch + 1})"
                print(
                    f"early stopping after epoch {epoch + 1}: {self.monitor} has not improved "
                    f"for {self.wait} epochs{best}",
                    flush=True,
                )

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if not self.restore_best_weights or self.best_epoch is None:
            return
        if self.best_weights is None:
            warnings.warn(
                f"EarlyStopping: the best weights (epoch {self.best_epoch + 1}) came before "
                "the run was resumed and are not in its checkpoint; the model keeps its last "
                "weights (ModelCheckpoint(save_best_only=True) keeps the best on disk)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.model.load_state_dict(self.best_weights)
        if self.verbose:
            print(f"restored the weights of epoch {self.best_epoch + 1}", flush=True)

    _KEYS = ("best", "best_epoch", "wait", "stopped_epoch")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self._best_to_json(self.best),
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state, self._KEYS)
        best = self._best_from_json(state["best"])
        wait = _count(self, state, "wait")
        epochs = {}
        for key in ("best_epoch", "stopped_epoch"):
            epochs[key] = None if state[key] is None else _count(self, state, key)
        self.best, self.wait = best, wait
        self.best_epoch, self.stopped_epoch = epochs["best_epoch"], epochs["stopped_epoch"]
        self.best_weights = None  # (not saved: see the module's notes on resuming)

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor!r}, min_delta={self.min_delta}, "
            f"patience={self.patience}, mode={self.mode!r}, "
            f"restore_best_weights={self.restore_best_weights})"
        )


# --------------------------------------------------------------------------------------------
# ReduceLROnPlateau


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for
    ``patience`` epochs (Keras's ``ReduceLROnPlateau``, PyTorch's defaults of the same name are
    the same: factor 0.1, patience 10, min_delta 1e-4 as an absolute threshold).

    After a reduction it waits ``cooldown`` epochs before counting again; the lr never goes
    below ``min_lr``. It sets ``optimizer.lr`` itself, so it cannot share a run with a
    scheduler (``fit`` with both is a ValueError: a scheduler would overwrite the reduced lr).
    ``verbose`` prints a line at each reduction.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        min_lr: float = 0.0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        verbose: bool = False,
    ) -> None:
        name = "ReduceLROnPlateau"
        self._init_monitor(monitor, mode, min_delta)
        if not is_real(factor) or not 0 < factor < 1:
            raise ValueError(f"{name}: expected 0 < factor < 1, got {factor!r}")
        self.factor = float(factor)
        self.patience = _check_patience(name, patience)
        self.min_lr = _check_number(name, "min_lr", min_lr)
        if not is_int(cooldown, 0):
            raise ValueError(f"{name}: expected cooldown to be an integer >= 0, got {cooldown!r}")
        self.cooldown = int(cooldown)
        self.verbose = bool(verbose)
        self._reset()

    def _reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        _require_monitor(self, self.monitor)
        if self.scheduler is not None:
            raise ValueError(
                f"ReduceLROnPlateau: fit was also given a scheduler "
                f"({type(self.scheduler).__name__}), which sets the learning rate at every "
                "step and would undo the reductions; use one or the other"
            )
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        current = self._current(logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improved(current):
            assert current is not None
            self.best, self.wait = current, 0
            return
        if self.cooldown_counter > 0:
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        optimizer = self.optimizer
        assert optimizer is not None
        old = float(optimizer.lr)
        if old > self.min_lr:
            new = max(old * self.factor, self.min_lr)
            optimizer.lr = new
            if self.verbose:
                print(
                    f"ReduceLROnPlateau: {self.monitor} has not improved for {self.wait} epochs: "
                    f"lr {old:.4g} -> {new:.4g}",
                    flush=True,
                )
        self.cooldown_counter = self.cooldown
        self.wait = 0

    _KEYS = ("best", "wait", "cooldown_counter")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self._best_to_json(self.best),
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state, self._KEYS)
        best = self._best_from_json(state["best"])
        wait, cooldown = _count(self, state, "wait"), _count(self, state, "cooldown_counter")
        self.best, self.wait, self.cooldown_counter = best, wait, cooldown

    def __repr__(self) -> str:
        return (
            f"ReduceLROnPlateau(monitor={self.monitor!r}, factor={self.factor}, "
            f"patience={self.patience}, min_lr={self.min_lr}, mode={self.mode!r})"
        )


# --------------------------------------------------------------------------------------------
# ModelCheckpoint


class ModelCheckpoint(_Monitor):
    """Save the model at the end of every epoch, or only when ``monitor`` improved
    (``save_best_only``), as Keras's ``ModelCheckpoint``.

    ``path`` may hold Keras's fields, filled from the epoch (1-based) and the epoch's logs:
    ``"run-{epoch:02d}-{val_loss:.3f}.safetensors"``. The file is a ``fastcnn.checkpoint``
    (written atomically: an interrupted save leaves the previous file whole) with the model,
    optimizer, scheduler, the epoch and, in ``extra["model_checkpoint"]``, the monitored name
    and value; load it with ``fastcnn.checkpoint.load``. To resume a run use ``fit``'s own
    ``checkpoint=`` (which also stores the shuffling state and the History).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        monitor: str = "val_loss",
        save_best_only: bool = False,
        mode: str = "auto",
        min_delta: float = 0.0,
        verbose: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
            raise TypeError(f"ModelCheckpoint: expected a file name, got {path!r}")
        self.path = os.fspath(path)
        self._init_monitor(monitor, mode, min_delta)
        self.save_best_only = bool(save_best_only)
        self.verbose = bool(verbose)
        self.last_saved: str | None = None

    def _format(self, epoch, logs):
        fields = {k: (math.nan if v is None else v) for k, v in logs.items()}
        try:
            return self.path.format(epoch=epoch + 1, **fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ModelCheckpoint: cannot fill in the path {self.path!r} ({exc!r}); its fields "
                f"may be epoch and {', '.join(EPOCH_LOG_KEYS)}"
            ) from None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        from .checkpoint import check_destination

        if self.save_best_only:
            _require_monitor(self, self.monitor)
        sample = {k: 0.0 for k in EPOCH_LOG_KEYS}
        sample["val_seconds"] = 0.0
        check_destination(self._format(0, sample))
        self.best = math.inf if self.mode == "min" else -math.inf
        self.last_saved = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        from . import checkpoint

        current = self._current(logs)
        if self.save_best_only:
            if not self._improved(current):
                return
            assert current is not None
            self.best = current
        path = self._format(epoch, logs)
        checkpoint.save(
            path,
            self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=epoch + 1,
            extra={"model_checkpoint": {"monitor": self.monitor, "value": current}},
            input_shape=self.params.get("input_shape"),
        )
        self.last_saved = path
        if self.verbose:
            print(f"saved {path} ({self.monitor} {current})", flush=True)

    def state_dict(self) -> dict[str, Any] | None:
        return {"best": self._best_to_json(self.best)} if self.save_best_only else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state, ("best",))
        self.best = self._best_from_json(state["best"])

    def __repr__(self) -> str:
        return (
            f"ModelCheckpoint({self.path!r}, monitor={self.monitor!r}, "
            f"save_best_only={self.save_best_only})"
        )


# --------------------------------------------------------------------------------------------
# CSVLogger


class CSVLogger(Callback):
    """Write the History to a CSV file at the end of every epoch: a header of History's keys,
    then one row per epoch (an empty field for a missing value, e.g. without validation).

    The whole file is rewritten atomically each epoch from the History, so it is never
    half-written, and a resumed run (whose History comes back from its checkpoint) continues
    the same file without repeating a row. Keras's ``CSVLogger(filename, separator)``.
    """

    def __init__(self, path: str | os.PathLike[str], separator: str = ",") -> None:
        if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
            raise TypeError(f"CSVLogger: expected a file name, got {path!r}")
        if (
            not isinstance(separator, str)
            or len(separator) != 1
            or separator.isalnum()
            or separator in '\r\n".-+'
        ):
            raise ValueError(f"CSVLogger: expected a one-character separator, got {separator!r}")
        self.path = os.fspath(path)
        self.separator = separator

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        from .checkpoint import check_destination

        check_destination(self.path, what="CSV log")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        from .checkpoint import _atomic_write

        assert self.history is not None
        _atomic_write(self.path, history_csv(self.history, self.separator).encode(), what="CSV log")

    def __repr__(self) -> str:
        return f"CSVLogger({self.path!r})"


def history_csv(history: History, separator: str = ",") -> str:
    """The History as CSV text: a header of ``History.KEYS`` and one row per epoch."""
    data = history.as_dict()
    keys = list(type(history).KEYS)
    out = io.StringIO()
    out.write(separator.join(keys) + "\n")
    for i in range(len(history)):
        row = []
        for key in keys:
            value = data[key][i]
            if value is None:
                row.append("")
            elif isinstance(value, (float, np.floating)):
                row.append(repr(float(value)))
            else:
                row.append(str(value))
        out.write(separator.join(row) + "\n")
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# the list fit runs


class CallbackList:
    """The callbacks of one ``fit`` call, validated, dispatched in order."""

    def __init__(self, callbacks: Any) -> None:
        if callbacks is None:
            callbacks = []
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
            raise TypeError(
                f"fit: expected callbacks to be a list of fastcnn.callbacks.Callback, got "
                f"{type(callbacks).__name__}"
            )
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    "fit: every callback must be a fastcnn.callbacks.Callback (subclass it and "
                    f"override its hooks), got {type(cb).__name__}"
                )
        if len({id(cb) for cb in callbacks}) != len(callbacks):
            raise ValueError("fit: the same callback object appears twice in callbacks")
        self.callbacks = callbacks
        # only the hooks someone overrides are called, per batch in particular
        self._batch_begin = [
            cb for cb in callbacks if type(cb).on_batch_begin is not Callback.on_batch_begin
        ]
        self._batch_end = [
            cb for cb in callbacks if type(cb).on_batch_end is not Callback.on_batch_end
        ]

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    @property
    def wants_batch_logs(self) -> bool:
        """Whether any callback overrides on_batch_end (else fit builds no batch logs)."""
        return bool(self._batch_end)

    def set_context(self, *args: Any) -> None:
        for cb in self.callbacks:
            cb.set_context(*args)

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(logs)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(logs)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def on_batch_begin(self, batch: int, logs: dict[str, Any]) -> None:
        for cb in self._batch_begin:
            cb.on_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        for cb in self._batch_end:
            cb.on_batch_end(batch, logs)

    def states(self) -> list[dict[str, Any]]:
        """[{"class": name, "state": state}] of the callbacks with state, in order."""
        out = []
        for cb in self.callbacks:
            state = cb.state_dict()
            if state is not None:
                out.append({"class": type(cb).__name__, "state": state})
        return out

    def check_states(self, saved: Any) -> None:
        """Raise a ValueError unless ``saved`` (from a checkpoint) fits these callbacks."""
        if not isinstance(saved, list) or not all(
            isinstance(s, dict) and set(s) == {"class", "state"} for s in saved
        ):
            raise ValueError(
                f"fit: callback_states must be a list of {{'class', 'state'}} entries "
                f"(from resume_kwargs), got {saved!r:.200}"
            )
        if not saved:
            return
        have = [s["class"] for s in self.states()]
        want = [s["class"] for s in saved]
        if have != want:
            raise ValueError(
                f"fit: the resumed run saved the state of the callbacks {want}, but callbacks "
                f"with state are now {have}: pass the same callbacks to resume the run"
            )

    def load_states(self, saved: list[dict[str, Any]]) -> None:
        stateful = [cb for cb in self.callbacks if cb.state_dict() is not None]
        for cb, entry in zip(stateful, saved, strict=False):
            cb.load_state_dict(entry["state"])
