"""The training loop: ``fit`` (shuffled mini-batches, validation, checkpoints, resume) and
``evaluate``.

Reproducibility: the order of the samples comes from ``np.random.default_rng(seed)``, which
draws one permutation per epoch and nothing else. Each end-of-epoch checkpoint stores the state
of that generator at the start of the next epoch (``extra["fit"]["shuffle_state"]``), so a run
resumed with :func:`resume_kwargs` reshuffles exactly as the uninterrupted run would, and, with
the same thread count, ends with bitwise the same weights.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import is_int
from ._types import Array
from .clip import clip_grad_norm_
from .threads import compute_threads

if TYPE_CHECKING:
    import os

    from .callbacks import Callback
    from .checkpoint import Checkpoint
    from .data import DataLoader
    from .losses import CrossEntropyLoss, MSELoss
    from .module import Module
    from .optim import LRScheduler, Optimizer

    Loss = CrossEntropyLoss | MSELoss

__all__ = ["History", "TrainingDiverged", "fit", "evaluate", "resume_kwargs"]


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite; training stopped before applying the step.

    ``epoch`` and ``batch`` are 1-based, as printed. The last good checkpoint is left untouched.
    """

    def __init__(
        self, epoch: int, batch: int, num_batches: int, loss: float, what: str = "loss"
    ) -> None:
        self.epoch = epoch
        self.batch = batch
        self.num_batches = num_batches
        self.loss = loss
        if what == "loss":
            detail = f"the loss is {loss}"
        else:
            detail = what
        super().__init__(
            f"training diverged at epoch {epoch}, batch {batch} of {num_batches}: {detail} "
            "(try a lower learning rate); the last good checkpoint, if any, was kept"
        )


class History:
    """Per-epoch records of a :func:`fit` run. Each attribute is a list with one entry per epoch.

    ``epoch`` (1-based), ``train_loss``, ``train_accuracy`` (fraction 0..1, measured on the fly in
    training mode), ``val_loss``, ``val_accuracy`` (None without validation data), ``seconds``
    (the training pass of the epoch, validation excluded), ``val_seconds``, ``images_per_second``
    (training images / seconds), ``lr`` (the learning rate during the epoch).
    """

    KEYS = (
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
        "val_seconds",
        "images_per_second",
        "lr",
    )
    # one list per key, set by __init__
    epoch: list[int]
    train_loss: list[float]
    train_accuracy: list[float]
    val_loss: list[float | None]
    val_accuracy: list[float | None]
    seconds: list[float]
    val_seconds: list[float | None]
    images_per_second: list[float]
    lr: list[float]

    def __init__(self) -> None:
        for key in self.KEYS:
            setattr(self, key, [])

    def append(self, **record: Any) -> None:
        missing = set(self.KEYS) - set(record)
        if missing:
            raise ValueError(f"History.append: missing {sorted(missing)}")
        for key in self.KEYS:
            getattr(self, key).append(record[key])

    def __len__(self) -> int:
        return len(self.epoch)

    def last(self) -> dict[str, Any]:
        """The last epoch's record as a dict."""
        return {key: getattr(self, key)[-1] for key in self.KEYS}

    def as_dict(self) -> dict[str, list[Any]]:
        """{key: list} (copies; JSON-able), e.g. ``plt.plot(h["epoch"], h["val_accuracy"])``."""
        return {key: list(getattr(self, key)) for key in self.KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, list[Any]]) -> History:
        history = cls()
        lengths = {len(data.get(key, [])) for key in cls.KEYS}
        if len(lengths) != 1:
            raise ValueError(f"History.from_dict: lists of unequal lengths {sorted(lengths)}")
        for key in cls.KEYS:
            setattr(history, key, list(data[key]))
        return history

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Loss and accuracy per epoch, training vs validation, as a matplotlib Figure, also
        written to ``path`` as a PNG if given (:func:`fastcnn.plots.curves`; needs matplotlib:
        ``pip install 'fastcnn[plot]'``)."""
        from .plots import curves

        return curves(self, path)

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"


# --------------------------------------------------------------------------------------------
# helpers


def _rng_state_to_json(state: dict) -> dict:
    """numpy bit-generator state -> JSON with the (128-bit) integers as decimal strings."""

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (bool, str)) or value is None:
            return value
        if isinstance(value, numbers.Integral):
            return {"int": str(int(value))}
        if isinstance(value, np.ndarray):
            return {"array": [str(int(v)) for v in value.ravel()], "dtype": str(value.dtype)}
        raise TypeError(f"unexpected value in a bit-generator state: {value!r}")

    return convert(state)


def _rng_state_from_json(data: dict) -> dict:
    def convert(value):
        if isinstance(value, dict):
            if set(value) == {"int"}:
                return int(value["int"])
            if set(value) == {"array", "dtype"}:
                return np.array([int(v) for v in value["array"]], dtype=value["dtype"])
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(data)


def _check_data(what, x, y):
    from ._fit_data import check_data

    check_data(what, x, y)


def _shape_of(a):
    """'(N, 1, 28, 28)': the shape of a data set whatever its number of samples."""
    return "(" + ", ".join(["N"] + [str(d) for d in a.shape[1:]]) + ")"


def _check_positive_int(what, name, value, minimum=1):
    if not is_int(value, minimum):
        raise ValueError(f"{what}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _correct(logits: Array, y: Array) -> int:
    predicted = np.argmax(logits, axis=1)
    target = y if y.ndim == 1 else np.argmax(y, axis=1)
    return int(np.count_nonzero(predicted == target))


def _default_loss():
    from .losses import CrossEntropyLoss

    return CrossEntropyLoss()


def _all_finite(model: Module) -> bool:
    return all(np.isfinite(p.data).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    model: Module,
    x: Array | DataLoader,
    y: Array | None = None,
    batch_size: int = 256,
    loss_fn: Loss | None = None,
    threads: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy (fraction 0..1) of ``model`` on ``(x, y)`` or on the batches of a
    DataLoader ``x`` (then ``batch_size`` is the loader's), in eval mode. uint8 images are
    scaled to [0, 1] (pixel / 255).

    ``loss_fn`` defaults to ``CrossEntropyLoss()``. The model's train/eval mode is restored.
    """
    from ._fit_data import predict_with_labels
    from .data import DataLoader

    if isinstance(x, DataLoader):
        if y is not None:
            raise TypeError("evaluate: got a DataLoader and y; the labels come from the loader")
    else:
        _check_data("evaluate", x, y)
    batch_size = _check_positive_int("evaluate", "batch_size", batch_size)
    loss_fn = _default_loss() if loss_fn is None else loss_fn
    was_training = getattr(model, "training", True)
    try:
        with compute_threads(threads):
            if isinstance(x, DataLoader):
                logits, labels = predict_with_labels(model, x)
            else:
                logits, labels = model.predict(x, batch_size=batch_size), np.asarray(y)
            loss = float(loss_fn(logits, labels))
    finally:
        if was_training:
            model.train()
        else:
            model.eval()
    return loss, _correct(logits, labels) / logits.shape[0]


# --------------------------------------------------------------------------------------------
# fit


def resume_kwargs(ckpt: Checkpoint) -> dict[str, Any]:
    """Arguments for :func:`fit` that continue the run saved in checkpoint ``ckpt``.

    ``ckpt`` is a :func:`fastcnn.checkpoint.load` result written by ``fit``; returns
    ``start_epoch``, ``shuffle_state``, ``history``, ``callback_states`` (the callbacks' state,
    see fastcnn.callbacks; pass the same callbacks) and ``seed``. Restore the optimizer and
    scheduler from the checkpoint yourself (``ckpt.restore_optimizer(opt)``), then
    ``fit(ckpt.model, loss, opt, x, y, epochs, **resume_kwargs(ckpt))``.
    """
    from .checkpoint import CheckpointError

    path = getattr(ckpt, "path", "checkpoint")
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    info = extra.get("fit")
    if info is None:  # (a CheckpointError is a ValueError)
        raise CheckpointError(
            f"{path}: not written by fastcnn.training.fit (its extra holds no "
            "'fit' entry): nothing to resume"
        )

    def fail(problem):
        raise CheckpointError(f"{path}: cannot resume the run saved in it: {problem}")

    if not isinstance(info, dict) or not {"shuffle_state", "history", "seed"} <= set(info):
        fail(
            f"extra['fit'] is {info!r:.100}, expected an object with shuffle_state, history and "
            "seed"
        )
    epoch = ckpt.epoch
    if not is_int(epoch, 0):
        fail(f"the epoch is {epoch!r:.50}, expected the number of completed epochs")
    seed = info["seed"]
    if seed is not None and not is_int(seed, 0):
        fail(f"the seed is {seed!r:.50}, expected an integer >= 0")
    shuffle_state = info["shuffle_state"]
    try:
        if not isinstance(shuffle_state, dict):
            raise TypeError(f"expected an object, got {type(shuffle_state).__name__}")
        np.random.default_rng(0).bit_generator.state = _rng_state_from_json(shuffle_state)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        fail(f"the shuffling state {shuffle_state!r:.100} is not a PCG64 state ({exc})")
    data = info["history"]
    try:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in History.KEYS
        ):
            raise ValueError(f"expected an object of lists {list(History.KEYS)}")
        history = History.from_dict(data)
    except ValueError as exc:
        fail(f"the history {data!r:.100} is corrupted ({exc})")
    if len(history) != epoch:
        fail(f"the history holds {len(history)} epochs, the checkpoint says {epoch} were completed")
    callback_states = info.get("callbacks", [])
    if not isinstance(callback_states, list) or not all(
        isinstance(c, dict) and set(c) == {"class", "state"} for c in callback_states
    ):
        fail(f"the callbacks' states {callback_states!r:.100} are corrupted")
    return {
        "start_epoch": epoch,
        "shuffle_state": shuffle_state,
        "history": history,
        "seed": seed,
        "callback_states": callback_states,
    }


def fit(
    model: Module,
    loss_fn: Loss,
    optimizer: Optimizer,
    x_train: Array | DataLoader,
    y_train: Array | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    val_data: tuple[Array, Array] | DataLoader | None = None,
    scheduler: LRScheduler | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    start_epoch: int = 0,
    shuffle_state: dict[str, Any] | None = None,
    history: History | None = None,
    threads: int | None = None,
    verbose: bool | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    val_batch_size: int = 256,
    callbacks: list[Callback] | None = None,
    clip_grad_norm: float | None = None,
    callback_states: list[dict[str, Any]] | None = None,
    distributed: bool | None = None,
) -> History:
    """Train ``model`` on shuffled mini-batches of ``(x_train, y_train)`` and return a History.

    - ``epochs`` is the epoch to train up to (as Keras): epochs ``start_epoch+1 .. epochs`` run.
    - Each epoch draws a permutation from ``np.random.default_rng(seed)``; the last partial
      batch is kept (PyTorch's ``drop_last=False``); ``batch_size`` defaults to 64. uint8 images
      are scaled to [0, 1] (pixel / 255) batch by batch.
    - ``x_train`` may be a :class:`fastcnn.data.DataLoader` instead (``y_train`` left out): its
      batches, order, seed and transforms are used, positioned at ``start_epoch``; the arrays
      ``(x, y)`` are the same as ``DataLoader(ArrayDataset(x, y), batch_size, shuffle=True,
      seed=seed)``. ``loss_fn(logits, y)`` returns the mean loss
      of a batch and ``loss_fn.backward()`` its gradient to the logits.
    - ``val_data=(x, y)`` (or a DataLoader) is evaluated (eval mode) after each epoch.
    - ``scheduler.step()`` runs once at the end of each epoch, or after every batch for a
      scheduler with ``per_batch = True`` (``OneCycleLR``).
    - ``checkpoint``: a path written (atomically, via ``fastcnn.checkpoint.save``) at the end of
      every epoch with the model, optimizer, scheduler, the number of completed epochs and, in
      ``extra["fit"]``, the shuffling state, seed and history; ``checkpoint_extra`` is stored
      next to it. Continue a run with ``fit(..., **resume_kwargs(fastcnn.checkpoint.load(path)))``.
    - A NaN or infinite loss stops training with :class:`TrainingDiverged` (epoch and batch named)
      before the step is applied; the last checkpoint is not overwritten.
    - ``progress``: a tqdm bar per epoch (loss, images/s) on stderr; None (default) = only when
      stderr is a terminal. ``verbose``: one summary line per epoch on stdout (what ``fastcnn
      train`` prints, :func:`format_epoch`); None (default) = unless ``progress=False``. So by
      default a terminal shows a bar and a line per epoch, a log file a line per epoch and no
      bar frames; ``progress=False`` is silent.
    - On a cold kernel cache (the first use on a machine) ``fit`` says once per process that it
      is compiling and compiles before the first epoch's clock starts
      (:func:`fastcnn.warmup`, which changes nothing of the model or optimizer).
    - ``callbacks``: :class:`fastcnn.callbacks.Callback` objects (EarlyStopping,
      ModelCheckpoint, ReduceLROnPlateau, CSVLogger, your own); their state is saved in the
      checkpoint and ``resume_kwargs`` gives it back as ``callback_states`` (which ``fit``
      loads into the callbacks after their ``on_train_begin``).
    - ``clip_grad_norm``: scale the gradients of each batch to this total norm at most
      (:func:`fastcnn.clip_grad_norm_`) before the step; a non-finite norm is a TrainingDiverged.
    - ``threads``: Numba threads for the run (restored afterwards); the BLAS is limited to
      ``fastcnn.threads.BLAS_THREADS_DURING_COMPUTE`` meanwhile.
    - Every argument is checked before the first step (no epoch of work is lost to a bad one):
      the data, ``val_data``'s shapes and labels, the checkpoint's folder and the checkpoint
      itself (serialised once in memory, so that a non-JSON-able ``checkpoint_extra`` is refused).
    - ``distributed``: under ``mpiexec -n K`` (K > 1) every rank trains on its shard of each
      global batch and the gradients are averaged (``fastcnn.distributed``; docs/distributed.md);
      only rank 0 shows progress, prints, validates and writes checkpoints; every rank returns
      the same History. None: so iff launched with K > 1; False: each process alone.
    """
    from . import _fit_data

    what = "fit"
    loader, seed = _fit_data.training_loader(what, x_train, y_train, batch_size, seed)
    val_data = _fit_data.validation_data(what, val_data, loader)
    if epochs is None:
        raise TypeError(f"{what}: epochs is required (the epoch to train up to)")
    epochs = _check_positive_int(what, "epochs", epochs, minimum=0)
    start_epoch = _check_positive_int(what, "start_epoch", start_epoch, minimum=0)
    if start_epoch > epochs:
        raise ValueError(f"{what}: start_epoch ({start_epoch}) is beyond epochs ({epochs})")
    val_batch_size = _check_positive_int(what, "val_batch_size", val_batch_size)
    if not callable(loss_fn) or not hasattr(loss_fn, "backward"):
        raise TypeError(
            f"{what}: loss_fn must be callable with a backward() method, got {loss_fn!r}"
        )
    from .callbacks import CallbackList

    cbs = CallbackList(callbacks)
    if clip_grad_norm is not None and (
        not isinstance(clip_grad_norm, numbers.Real)
        or isinstance(clip_grad_norm, bool)
        or not 0 < clip_grad_norm < math.inf
    ):
        raise ValueError(
            f"{what}: clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}"
        )
    if history is None:
        history = History()
    elif len(history) != start_epoch:
        raise ValueError(
            f"{what}: the history holds {len(history)} epochs but start_epoch is {start_epoch}"
        )

    from .distributed import fit_sync, shard_bounds

    # K > 1 ranks: the sync does the distributed part (None on one process); every rank runs
    # the callbacks, on rank 0's records (so they stop together), each writer atomically
    sync, optimizer, threads = fit_sync(distributed, model, optimizer, threads)
    if sync is not None and not sync.root:
        progress, verbose, checkpoint = False, False, None
    n = loader.num_samples
    num_batches = len(loader)
    model.stop_training = False  # a callback sets it to True to stop (Keras's spelling)
    if cbs:
        cbs.set_context(
            model,
            optimizer,
            scheduler,
            history,
            {
                "epochs": epochs,
                "start_epoch": start_epoch,
                "batch_size": loader.batch_size,
                "num_batches": num_batches,
                "samples": n,
                "has_validation": val_data is not None,
                "input_shape": tuple(loader.sample_shape),
            },
        )
        cbs.on_train_begin({})
    if callback_states:  # a resumed run: after on_train_begin, which resets the callbacks
        cbs.check_states(callback_states)
        cbs.load_states(callback_states)
    if shuffle_state is not None:
        loader.set_position(start_epoch, shuffle_state)
    else:
        loader.seek(start_epoch)  # replays the permutations of the epochs already done
    rng = loader.shuffle_generator
    if checkpoint is not None:
        # Everything a checkpoint will hold, checked now rather than after the first epoch: the
        # destination, and the whole file serialised in memory (JSON-able extras and states).
        from .checkpoint import check_destination

        checkpoint = check_destination(checkpoint)
        if checkpoint_extra is not None and not isinstance(checkpoint_extra, dict):
            raise TypeError(
                f"{what}: checkpoint_extra must be a dict, got {type(checkpoint_extra).__name__}"
            )
        if "fit" in (checkpoint_extra or {}):
            raise ValueError(
                f"{what}: checkpoint_extra may not hold the key 'fit' (fit stores its "
                "own resume state there)"
            )
        _save_checkpoint(
            checkpoint,
            model,
            optimizer,
            scheduler,
            start_epoch,
            rng,
            seed,
            history,
            checkpoint_extra,
            loader.sample_shape,
            write=False,
            callback_states=cbs.states(),
        )

    check_targets = _fit_data.target_checker(what, loss_fn, loader, val_data)
    if verbose is None:
        verbose = progress is not False
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm.auto import tqdm

    per_batch = scheduler is not None and getattr(scheduler, "per_batch", False)
    params = inspect.signature(model.backward).parameters
    skip_input_grad = "input_grad" in params or any(
        p.kind is p.VAR_KEYWORD for p in params.values()
    )
    params_list: list[Any] = model.parameters() if clip_grad_norm is not None else []
    batch_logs = cbs.wants_batch_logs
    stopped = False
    from .compile_ahead import announce_if_cold, warmup

    cold = start_epoch < epochs and announce_if_cold(announce=bool(verbose or progress))
    if sync is not None:
        sync.start(model)  # rank 0's weights and optimizer state everywhere
    with compute_threads(threads):
        for epoch in range(start_epoch, epochs):
            model.train()
            batches = loader.batches(reuse=True)  # draws the epoch's order
            lr = float(optimizer.lr)
            if cbs:
                cbs.on_epoch_begin(epoch, {"lr": lr})
            loss_sum = 0.0
            correct = 0
            seen = 0
            bar = None
            if progress:
                bar = tqdm(
                    total=num_batches,
                    desc=f"epoch {epoch + 1}/{epochs}",
                    unit="batch",
                    leave=False,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            t0 = time.perf_counter()
            try:
                for b, (xb, yb) in enumerate(batches):
                    if sync is not None:  # this rank's contiguous part of the global batch
                        lo, hi = shard_bounds(xb.shape[0], sync.world.size, sync.world.rank)
                        xb, yb = xb[lo:hi], (None if yb is None else yb[lo:hi])
                    m = xb.shape[0]
                    if cold:  # the first batch on a cold kernel cache: compile, then time
                        cold = False
                        warmup(model, xb.shape[1:], optimizer)
                        t0 = time.perf_counter()
                    if batch_logs:
                        cbs.on_batch_begin(b, {"size": m})
                    if sync is not None:  # (after the warm-up: its backward must send nothing)
                        sync.begin_step(model, m)
                    optimizer.zero_grad()
                    loss, batch_correct = 0.0, 0
                    if m:  # (empty only for a rank's shard of a batch smaller than the world)
                        logits = model(xb)
                        yb = check_targets(logits, yb)  # every label, once the class count is known
                        loss = float(loss_fn(logits, yb))
                        if not math.isfinite(loss) and sync is None:
                            raise TrainingDiverged(epoch + 1, b + 1, num_batches, loss)
                        if skip_input_grad:
                            model.backward(loss_fn.backward(), input_grad=False)
                        else:  # a user's model whose backward takes no input_grad
                            model.backward(loss_fn.backward())
                        batch_correct = _correct(logits, yb)
                    if sync is not None:  # gradients averaged over the ranks; the global batch
                        loss, batch_correct, m = sync.reduce_step(m, loss, batch_correct)
                        if not math.isfinite(loss):
                            raise TrainingDiverged(epoch + 1, b + 1, num_batches, loss)
                    if clip_grad_norm is not None:  # after the reduction: the averaged gradient
                        norm = clip_grad_norm_(params_list, clip_grad_norm)
                        if not math.isfinite(norm):
                            raise TrainingDiverged(
                                epoch + 1, b + 1, num_batches, loss, f"the gradient norm is {norm}"
                            )
                    step_lr = optimizer.lr
                    optimizer.step()
                    if per_batch and scheduler is not None:  # per_batch implies one
                        scheduler.step()

                    loss_sum += loss * m
                    correct += batch_correct
                    seen += m
                    if batch_logs:
                        logs = {"loss": loss, "accuracy": batch_correct / m, "size": m}
                        logs["lr"] = float(step_lr)
                        if clip_grad_norm is not None:
                            logs["grad_norm"] = norm
                        cbs.on_batch_end(b, logs)
                    if bar is not None:
                        bar.update(1)
                        if b % 10 == 0 or b == num_batches - 1:
                            rate = seen / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix_str(
                                f"loss {loss_sum / seen:.4f}, {rate:.0f} images/s", refresh=False
                            )
                    if b < num_batches - 1 and getattr(model, "stop_training", False):
                        stopped = True  # mid-epoch: the partial epoch is not recorded
                        break
            finally:
                if sync is not None:
                    sync.stop_watching()
                if bar is not None:
                    bar.close()
            if stopped:
                break
            seconds = time.perf_counter() - t0
            if not _all_finite(model):
                raise TrainingDiverged(
                    epoch + 1,
                    num_batches,
                    num_batches,
                    loss,
                    what="a weight became NaN or infinite",
                )

            if sync is not None:
                sync.end_epoch(model)  # BatchNorm's running statistics averaged over the ranks
            val_loss = val_accuracy = None
            val_seconds = 0.0
            if val_data is not None and (sync is None or sync.root):
                t1 = time.perf_counter()
                val_loss, val_accuracy = _evaluate_val(model, val_data, val_batch_size, loss_fn)
                val_seconds = time.perf_counter() - t1
                model.train()

            history.append(
                epoch=epoch + 1,
                train_loss=loss_sum / n,
                train_accuracy=correct / n,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                seconds=seconds,
                val_seconds=val_seconds,
                images_per_second=n / seconds,
                lr=lr,
            )
            if sync is not None:
                sync.share_last(history)  # rank 0's validation and clock on every rank
            if scheduler is not None and not per_batch:
                scheduler.step()
            if verbose:
                print(format_epoch(history.last(), epochs), flush=True)
            if cbs:
                cbs.on_epoch_end(epoch, _epoch_logs(history.last()))
            if checkpoint is not None:
                _save_checkpoint(
                    checkpoint,
                    model,
                    optimizer,
                    scheduler,
                    epoch + 1,
                    rng,
                    seed,
                    history,
                    checkpoint_extra,
                    loader.sample_shape,
                    callback_states=cbs.states(),
                )
            if getattr(model, "stop_training", False):
                break
    if cbs:
        cbs.on_train_end(_epoch_logs(history.last()) if len(history) else {})
    return history


def _epoch_logs(record):
    """The logs of on_epoch_end: a History record without its epoch, plus Keras's names."""
    logs = {k: v for k, v in record.items() if k != "epoch"}
    logs["loss"], logs["accuracy"] = record["train_loss"], record["train_accuracy"]
    return logs


def _evaluate_val(model, val_data, batch_size, loss_fn):
    from .data import DataLoader

    if isinstance(val_data, DataLoader):
        return evaluate(model, val_data, loss_fn=loss_fn)
    return evaluate(model, val_data[0], val_data[1], batch_size, loss_fn)


def _save_checkpoint(
    path,
    model,
    optimizer,
    scheduler,
    epoch,
    rng,
    seed,
    history,
    extra,
    input_shape,
    write=True,
    callback_states=None,
):
    """Save the end-of-epoch checkpoint (``write=False``: only serialise it, as a check)."""
    from . import checkpoint as ckpt

    info = {
        "shuffle_state": _rng_state_to_json(rng.bit_generator.state),
        "seed": None if seed is None else int(seed),
        "history": history.as_dict(),
    }
    if callback_states:
        info["callbacks"] = callback_states
    payload = dict(extra or {})
    payload["fit"] = info
    if not write:
        ckpt._serialise(
            path,
            model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            extra=payload,
            input_shape=input_shape,
        )
        return
    ckpt.save(
        path,
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=epoch,
        extra=payload,
        input_shape=input_shape,
    )


def format_epoch(record: dict, epochs: int | None = None) -> str:
    """One line for an epoch record of a History (as ``History.last()``)."""
    of = f"/{epochs}" if epochs is not None else ""
    line = (
        f"epoch {record['epoch']}{of}  loss {record['train_loss']:.4f}  "
        f"accuracy {100 * record['train_accuracy']:.2f}%"
    )
    if record["val_loss"] is not None:
        line += (
            f"  val_loss {record['val_loss']:.4f}  val_accuracy {100 * record['val_accuracy']:.2f}%"
        )
    line += (
        f"  {record['seconds']:.1f} s  {record['images_per_second']:.0f} images/s"
        f"  lr {record['lr']:.4g}"
    )
    return line
