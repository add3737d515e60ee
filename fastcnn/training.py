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
from .threads import compute_threads

if TYPE_CHECKING:
    import os

    from .checkpoint import Checkpoint
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
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(
            f"{what}: expected numpy arrays (x, y), got {type(x).__name__}, {type(y).__name__}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what}: expected floating-point images, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{what}: expected images of shape (N, ...), got {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{what}: expected labels of shape ({x.shape[0]},) (or one target row per image), got "
            f"{y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what}: got no samples")


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
    x: Array,
    y: Array,
    batch_size: int = 256,
    loss_fn: Loss | None = None,
    threads: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy (fraction 0..1) of ``model`` on ``(x, y)``, in eval mode.

    ``loss_fn`` defaults to ``CrossEntropyLoss()``. The model's train/eval mode is restored.
    """
    _check_data("evaluate", x, y)
    batch_size = _check_positive_int("evaluate", "batch_size", batch_size)
    loss_fn = _default_loss() if loss_fn is None else loss_fn
    was_training = getattr(model, "training", True)
    try:
        with compute_threads(threads):
            logits = model.predict(x, batch_size=batch_size)
            loss = float(loss_fn(logits, y))
    finally:
        if was_training:
            model.train()
        else:
            model.eval()
    return loss, _correct(logits, y) / x.shape[0]


# --------------------------------------------------------------------------------------------
# fit


def resume_kwargs(ckpt: Checkpoint) -> dict[str, Any]:
    """Arguments for :func:`fit` that continue the run saved in checkpoint ``ckpt``.

    ``ckpt`` is a :func:`fastcnn.checkpoint.load` result written by ``fit``; returns
    ``start_epoch``, ``shuffle_state``, ``history`` (and ``seed``). Restore the optimizer and
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
    return {
        "start_epoch": epoch,
        "shuffle_state": shuffle_state,
        "history": history,
        "seed": seed,
    }


def fit(
    model: Module,
    loss_fn: Loss,
    optimizer: Optimizer,
    x_train: Array,
    y_train: Array,
    epochs: int,
    batch_size: int = 64,
    val_data: tuple[Array, Array] | None = None,
    scheduler: LRScheduler | None = None,
    seed: int = 0,
    progress: bool | None = True,
    checkpoint: str | os.PathLike[str] | None = None,
    start_epoch: int = 0,
    shuffle_state: dict[str, Any] | None = None,
    history: History | None = None,
    threads: int | None = None,
    verbose: bool = False,
    checkpoint_extra: dict[str, Any] | None = None,
    val_batch_size: int = 256,
    distributed: bool | None = None,
) -> History:
    """Train ``model`` on shuffled mini-batches of ``(x_train, y_train)`` and return a History.

    - ``epochs`` is the epoch to train up to (as Keras): epochs ``start_epoch+1 .. epochs`` run.
    - Each epoch draws a permutation from ``np.random.default_rng(seed)``; the last partial
      batch is kept (PyTorch's ``drop_last=False``). ``loss_fn(logits, y)`` returns the mean loss
      of a batch and ``loss_fn.backward()`` its gradient to the logits.
    - ``val_data=(x, y)`` is evaluated (eval mode) after each epoch.
    - ``scheduler.step()`` runs once at the end of each epoch, or after every batch for a
      scheduler with ``per_batch = True`` (``OneCycleLR``).
    - ``checkpoint``: a path written (atomically, via ``fastcnn.checkpoint.save``) at the end of
      every epoch with the model, optimizer, scheduler, the number of completed epochs and, in
      ``extra["fit"]``, the shuffling state, seed and history; ``checkpoint_extra`` is stored
      next to it. Continue a run with ``fit(..., **resume_kwargs(fastcnn.checkpoint.load(path)))``.
    - A NaN or infinite loss stops training with :class:`TrainingDiverged` (epoch and batch named)
      before the step is applied; the last checkpoint is not overwritten.
    - ``progress``: a tqdm bar per epoch (loss, images/s) on stderr; None = only on a terminal.
      ``verbose``: print one summary line per epoch on stdout.
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
    what = "fit"
    _check_data(what, x_train, y_train)
    if val_data is not None:
        if not (isinstance(val_data, (tuple, list)) and len(val_data) == 2):
            raise ValueError(
                f"{what}: val_data must be a pair (x_val, y_val), got {type(val_data).__name__}"
            )
        _check_data(f"{what} (val_data)", *val_data)
        x_val, y_val = val_data
        if x_val.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"{what}: val_data images must have the training images' shape "
                f"{_shape_of(x_train)}, got {x_val.shape}"
            )
        if y_val.shape[1:] != y_train.shape[1:]:
            raise ValueError(
                f"{what}: val_data labels must have the training labels' shape "
                f"{_shape_of(y_train)}, got {y_val.shape}"
            )
    epochs = _check_positive_int(what, "epochs", epochs, minimum=0)
    start_epoch = _check_positive_int(what, "start_epoch", start_epoch, minimum=0)
    if start_epoch > epochs:
        raise ValueError(f"{what}: start_epoch ({start_epoch}) is beyond epochs ({epochs})")
    batch_size = _check_positive_int(what, "batch_size", batch_size)
    val_batch_size = _check_positive_int(what, "val_batch_size", val_batch_size)
    if not callable(loss_fn) or not hasattr(loss_fn, "backward"):
        raise TypeError(
            f"{what}: loss_fn must be callable with a backward() method, got {loss_fn!r}"
        )
    if history is None:
        history = History()
    elif len(history) != start_epoch:
        raise ValueError(
            f"{what}: the history holds {len(history)} epochs but start_epoch is {start_epoch}"
        )

    from .distributed import fit_sync

    # K > 1 ranks: the sync does the distributed part (None on one process)
    sync, optimizer, threads = fit_sync(distributed, model, optimizer, threads)
    if sync is not None and not sync.root:
        progress, verbose, checkpoint = False, False, None
    n = x_train.shape[0]
    num_batches = -(-n // batch_size)
    rng = np.random.default_rng(seed)
    if shuffle_state is not None:
        rng.bit_generator.state = _rng_state_from_json(shuffle_state)
    else:
        for _ in range(start_epoch):  # replay the permutations of the epochs already done
            rng.permutation(n)
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
            x_train.shape[1:],
            write=False,
        )

    # Batch buffers, reused by every step (a view of the first m rows for the last batch).
    xb_full = np.empty((min(batch_size, n),) + x_train.shape[1:], dtype=x_train.dtype)
    yb_full = np.empty((min(batch_size, n),) + y_train.shape[1:], dtype=y_train.dtype)

    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm.auto import tqdm

    targets_checked = False
    per_batch = scheduler is not None and getattr(scheduler, "per_batch", False)
    params = inspect.signature(model.backward).parameters
    skip_input_grad = "input_grad" in params or any(
        p.kind is p.VAR_KEYWORD for p in params.values()
    )
    if sync is not None:
        sync.start(model)  # rank 0's weights and optimizer state everywhere
    with compute_threads(threads):
        for epoch in range(start_epoch, epochs):
            model.train()
            order = rng.permutation(n)
            lr = float(optimizer.lr)
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
                for b in range(num_batches):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    if sync is not None:
                        idx = sync.shard(idx)  # this rank's part of the global batch
                    m = idx.shape[0]
                    xb = xb_full[:m]
                    yb = yb_full[:m]
                    np.take(x_train, idx, axis=0, out=xb)
                    np.take(y_train, idx, axis=0, out=yb)

                    optimizer.zero_grad()
                    loss, batch_correct = 0.0, 0
                    if m:  # (empty only for a rank's shard of a batch smaller than the world)
                        logits = model(xb)
                        if not targets_checked:  # every label, once the class count is known
                            check = getattr(loss_fn, "validate_targets", None)
                            if check is not None and logits.ndim == 2:
                                check(y_train, logits.shape[1])
                                if val_data is not None:
                                    try:
                                        check(val_data[1], logits.shape[1])
                                    except (TypeError, ValueError) as exc:
                                        raise type(exc)(f"{what} (val_data): {exc}") from exc
                            targets_checked = True
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
                    optimizer.step()
                    if per_batch and scheduler is not None:  # per_batch implies one
                        scheduler.step()

                    loss_sum += loss * m
                    correct += batch_correct
                    seen += m
                    if bar is not None:
                        bar.update(1)
                        if b % 10 == 0 or b == num_batches - 1:
                            rate = seen / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix_str(
                                f"loss {loss_sum / seen:.4f}, {rate:.0f} images/s", refresh=False
                            )
            finally:
                if bar is not None:
                    bar.close()
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
                val_loss, val_accuracy = evaluate(
                    model, val_data[0], val_data[1], val_batch_size, loss_fn
                )
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
                    x_train.shape[1:],
                )
            if verbose:
                print(format_epoch(history.last(), epochs), flush=True)
    return history


def _save_checkpoint(
    path, model, optimizer, scheduler, epoch, rng, seed, history, extra, input_shape, write=True
):
    """Save the end-of-epoch checkpoint (``write=False``: only serialise it, as a check)."""
    from . import checkpoint as ckpt

    info = {
        "shuffle_state": _rng_state_to_json(rng.bit_generator.state),
        "seed": None if seed is None else int(seed),
        "history": history.as_dict(),
    }
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
