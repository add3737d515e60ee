"""The ``fastcnn`` command: ``train``, ``evaluate`` and ``summary``.

    fastcnn train --epochs 3            # reference network, MNIST: "test accuracy: NN.NN%"
    fastcnn train --model resnet20 --dataset fashion-mnist
    fastcnn train --out run.safetensors # checkpoint at the end of every epoch
    fastcnn train --resume run.safetensors --epochs 5
    fastcnn train --dataset cifar10 --augment   # or --dataset FOLDER (a sub-folder per class)
    fastcnn train --early-stopping 3 --plot curves.png
    fastcnn evaluate run.safetensors [--confusion confusion.png]
    mpiexec -n 2 fastcnn train --threads 1   # data-parallel on 2 ranks (docs/distributed.md)
    fastcnn predict run.safetensors images/   # or an IDX / .npy file of images
    fastcnn summary [--model resnet20 | CHECKPOINT]

Exit statuses (also in ``fastcnn --help`` and docs/reliability-errors.md): 0 success; 1 the
training diverged; 2 an error the user can fix (bad option, missing or corrupt data or checkpoint,
unwritable --out, out of memory), reported as ``fastcnn CMD: error: ...`` naming the file or
option; 3 an internal error (a bug), reported in one line; 130 interrupted by Ctrl-C. No
traceback is printed unless FASTCNN_TRACEBACK=1 is set (then any error raises with its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import cli_data
from ._checks import is_int, is_real

DATASETS = cli_data.NAMED  # or a folder: see fastcnn/cli_data.py
MODELS = ("reference", "lenet5", "resnet8", "resnet20", "vgg", "allconv")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle")

# Defaults of `fastcnn train`, chosen by measurement (docs/cli.md shows a run with them):
# SGD with momentum 0.9 at lr 0.05 and cosine annealing reach >= 99.0% test accuracy on MNIST in
# 3 epochs from seed 0.
DEFAULTS: dict[str, Any] = {
    "model": "reference",
    "dataset": "mnist",
    "optimizer": "sgd",
    "lr": {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2},
    "scheduler": "cosine",
    "batch_size": 64,
    "seed": 0,
    "val_split": "5000",
}
# The ResNets' recipe (He et al. for CIFAR, shortened): SGD with Nesterov momentum 0.9, weight
# decay 5e-4, a one-cycle schedule to lr 0.1 stepped per batch, batch 128.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet8": {
        "lr": {"sgd": 0.1},
        "nesterov": True,
        "weight_decay": {"sgd": 5e-4},
        "scheduler": "onecycle",
        "batch_size": 128,
    },
}
MODEL_DEFAULTS["resnet20"] = MODEL_DEFAULTS["resnet8"]
INPUT_SHAPE = (1, 28, 28)  # the digit sets' images
NUM_CLASSES = 10  # and classes (the default of summary)


EPILOG = """\
exit statuses:
  0    success
  1    the training diverged (NaN or infinite loss); the last good checkpoint is kept
  2    an error you can fix: a bad option, missing or corrupt data or checkpoint, an --out that
       cannot be written, out of memory; the message names the file or option
  3    an internal error (a bug in fastcnn): please report it with its traceback
  130  interrupted (Ctrl-C); a checkpoint being written is left as it was before
  143  killed by SIGTERM (the shell's 128+15; no message): the last complete checkpoint is
       intact, a save cut short leaves at most a temporary file that the next save deletes

environment:
  FASTCNN_TRACEBACK=1  print the full Python traceback of any error instead of its message
  FASTCNN_DATA=DIR     the folder holding mnist/, fashion-mnist/ and cifar10/ (as --data-dir)
  FASTCNN_DIST_TIMEOUT=S  under mpiexec: seconds a rank waits for another before aborting
"""


class CliError(Exception):
    """An error reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line: 'fastcnn train: error: ... (see --help)', status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------------------------
# argument types


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _val_split(text):
    """A count of held-out images ('5000', '0') or a fraction of the training set ('0.1')."""
    try:
        if any(c in text for c in ".eE"):
            value = float(text)
            if not 0 <= value < 1:
                raise ValueError
            return value
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected a count of images (e.g. 5000) or a fraction in [0, 1) (e.g. 0.1), got "
            f"{text!r}"
        ) from None


def _input_shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError
        return shape
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected C,H,W (three positive integers, e.g. 1,28,28), got {text!r}"
        ) from None


def resolve_val_split(split: int | float, n: int) -> int:
    """Number of validation images for a --val-split value (count or fraction) and n images."""
    count = int(round(split * n)) if isinstance(split, float) else int(split)
    if count >= n:
        raise CliError(f"--val-split {split} leaves no training images (the training set has {n})")
    return count


# --------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastcnn",
        description="Train convolutional networks fast on the CPU (Numba kernels).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastcnn {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="{train,evaluate,predict,summary}", parser_class=_Parser
    )
    see = "exit statuses, FASTCNN_TRACEBACK=1 and FASTCNN_DATA: see 'fastcnn --help'"
    sub.required = True

    # Options left at None are filled from DEFAULTS, or from the checkpoint when resuming.
    train = sub.add_parser(
        "train",
        epilog=see,
        help="train a network on MNIST, Fashion-MNIST, CIFAR-10 or a folder of images",
        description="Train a network (fastcnn summary --model NAME shows it) and report the test "
        "accuracy. Prints one line per epoch and ends with 'test accuracy: NN.NN%%'. The ResNets "
        "default to their own recipe: sgd lr 0.1 with Nesterov momentum 0.9, weight decay 5e-4, "
        "one-cycle schedule, batch 128.",
    )
    train.add_argument("--model", choices=MODELS, help="[reference]")
    train.add_argument(
        "--epochs",
        type=_nonneg_int,
        default=3,
        help="train up to this epoch (with --resume: the total, not the number added) [3]",
    )
    train.add_argument("--batch-size", type=_positive_int, help="mini-batch size [64; resnets 128]")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="[sgd]")
    train.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate (the peak of --scheduler onecycle) "
        "[0.05 for sgd (resnets 0.1), 0.001 for adam and adamw]",
    )
    train.add_argument("--momentum", type=_nonneg_float, help="SGD momentum [0.9]")
    train.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        help="Nesterov momentum (sgd) [off; resnets on]",
    )
    train.add_argument(
        "--weight-decay",
        type=_nonneg_float,
        help="L2 penalty (sgd, adam) or decoupled decay (adamw) "
        "[0, 0, 0.01; resnets with sgd 5e-4]",
    )
    train.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        help="learning-rate schedule: cosine annealing to 0 over the epochs, "
        "one-cycle to --lr stepped per batch, or constant [cosine; resnets onecycle]",
    )
    train.add_argument(
        "--seed",
        type=_nonneg_int,
        help="seed of the weights and of the shuffling, an integer >= 0 [0]",
    )
    train.add_argument(
        "--dataset",
        type=cli_data.dataset_arg,
        metavar="{mnist,fashion-mnist,cifar10,FOLDER}",
        help="a data set, or a FOLDER of images (a sub-folder per class; train/ and test/ "
        "inside, else 20%% of it is the test set) or of the CIFAR-10 binary files [mnist]",
    )
    train.add_argument(
        "--augment",
        action="store_true",
        default=None,
        help="random shifts of up to 1 pixel (mnist, fashion-mnist), or random crops of the "
        "image padded by 1/8 of its size and horizontal flips (cifar10, folders)",
    )
    train.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="N",
        help="resize a folder's images to NxN [their own size, which must then be one]",
    )
    train.add_argument(
        "--val-split",
        type=_val_split,
        help="validation images held out from the END of the training set: a count "
        "(5000) or a fraction (0.1); 0 = no validation [5000; folders 0.1]",
    )
    train.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="use only the first N training images and the first N test images "
        "(quick trials; the validation images come out of these N)",
    )
    _add_common(train)
    train.add_argument(
        "--out",
        metavar="CHECKPOINT",
        help="write a checkpoint here at the end of every epoch (atomically); "
        "with --resume defaults to the resumed file",
    )
    train.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue the run saved in CHECKPOINT by 'fastcnn train --out' "
        "(same settings, same shuffling: bitwise the run that was not interrupted)",
    )
    train.add_argument(
        "--early-stopping",
        type=_positive_int,
        metavar="N",
        help="stop when the validation loss has not improved for N epochs (needs validation "
        "images; kept by --resume) [off]",
    )
    train.add_argument(
        "--plot",
        metavar="PNG",
        help="draw the loss and accuracy curves (training vs validation) into this PNG "
        "(needs matplotlib: pip install 'fastcnn[plot]')",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "evaluate",
        epilog=see,
        help="test accuracy of a checkpoint",
        description="Evaluate a checkpoint on the test set; ends with 'test accuracy: NN.NN%'.",
    )
    ev.add_argument("checkpoint", metavar="CHECKPOINT")
    ev.add_argument(
        "--dataset",
        type=cli_data.dataset_arg,
        metavar="{mnist,fashion-mnist,cifar10,FOLDER}",
        help="[the one it was trained on, else mnist]",
    )
    ev.add_argument("--batch-size", type=_positive_int, default=256, help="[256]")
    ev.add_argument(
        "--limit", type=_positive_int, metavar="N", help="use only the first N test images"
    )
    ev.add_argument(
        "--confusion",
        metavar="PNG",
        help="draw the confusion matrix of the test set into this PNG "
        "(needs matplotlib: pip install 'fastcnn[plot]')",
    )
    _add_common(ev)
    ev.set_defaults(func=cmd_evaluate)

    cli_data.add_predict_parser(sub, see)

    sm = sub.add_parser(
        "summary",
        epilog=see,
        help="layer table of a network (or of a checkpoint)",
        description="Print the layers, output shapes, parameter counts and FLOPs of a network "
        "(--model, default the reference network), or of the model in CHECKPOINT, for one "
        "image of the shape it was trained on (or --input-shape).",
    )
    sm.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    sm.add_argument("--model", choices=MODELS, help="[reference]")
    sm.add_argument(
        "--input-shape",
        type=_input_shape,
        metavar="C,H,W",
        help="one image's shape [the checkpoint's, else 1,28,28]",
    )
    sm.set_defaults(func=cmd_summary)
    return parser


def _add_common(p):
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding mnist/, fashion-mnist/ and cifar10/ "
        "[$FASTCNN_DATA, else ~/.cache/fastcnn]",
    )
    p.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing data"
    )
    p.add_argument("--threads", type=int, help="Numba threads [all: NUMBA_NUM_THREADS]")


# --------------------------------------------------------------------------------------------
# helpers


def _load_data(name, data_dir, download, image_size=None):
    """((x_train, y_train), (x_test, y_test), class names): cli_data.load."""
    return cli_data.load(name, data_dir, download, image_size)


def _check_threads(n):
    if n is None:
        return None
    from .threads import max_threads

    if not 1 <= n <= max_threads():
        raise CliError(
            f"--threads must be between 1 and {max_threads()} (NUMBA_NUM_THREADS), got {n}"
        )
    return n


def _check_out(path, option="--out"):
    from .checkpoint import check_destination

    if path == "":
        raise CliError(f"{option} '': expected a file name, e.g. {option} run.safetensors")
    try:
        check_destination(path)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(os.path.realpath(path)))
        raise CliError(f"{option} {path}: the folder {folder} does not exist") from None
    except IsADirectoryError:
        raise CliError(f"{option} {path}: is a folder, expected a file name") from None
    except PermissionError:
        folder = os.path.dirname(os.path.abspath(os.path.realpath(path)))
        raise CliError(f"{option} {path}: the folder {folder} is not writable") from None


def _load_checkpoint(path):
    from . import checkpoint

    if not os.path.isfile(path):
        raise CliError(f"{path}: no such checkpoint file")
    return checkpoint.load(path)


def _saved_settings(ckpt):
    """The settings 'fastcnn train --out' stored in the checkpoint's extra["cli"], or None."""
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    return extra.get("cli")


def _is_number(value, low=0.0, low_open=False):
    return is_real(value) and value < float("inf") and (value > low if low_open else value >= low)


# What each saved setting may be (a checkpoint's metadata can be edited: checked before use).
_SETTING_CHECKS = {
    "model": lambda v: v in MODELS,
    "dataset": cli_data.is_dataset,
    "optimizer": lambda v: v in OPTIMIZERS,
    "scheduler": lambda v: v in SCHEDULERS,
    "lr": lambda v: _is_number(v, low_open=True),
    "momentum": _is_number,
    "nesterov": lambda v: isinstance(v, bool),
    "weight_decay": _is_number,
    "batch_size": lambda v: is_int(v, 1),
    "seed": lambda v: is_int(v, 0),
    "val_split": lambda v: is_int(v, 0) or (isinstance(v, float) and 0 <= v < 1),
    "limit": lambda v: v is None or is_int(v, 1),
    "schedule_epochs": lambda v: is_int(v, 1),
    "augment": lambda v: isinstance(v, bool),
    "image_size": lambda v: v is None or is_int(v, 1),
    "early_stopping": lambda v: v is None or is_int(v, 1),
}
# absent from older checkpoints
_OPTIONAL_SETTINGS = ("model", "nesterov", "limit", "augment", "image_size", "early_stopping")


def _check_saved_settings(path, saved):
    if not isinstance(saved, dict):
        raise CliError(
            f"{path}: the run settings saved in it are corrupted ({saved!r:.100}); "
            "start a new run instead of resuming"
        )
    for key, check in _SETTING_CHECKS.items():
        if key not in saved:
            if key in _OPTIONAL_SETTINGS:
                continue
            raise CliError(
                f"{path}: the run settings saved in it lack {key!r}; start a new run "
                "instead of resuming"
            )
        if not check(saved[key]):
            raise CliError(
                f"{path}: the run settings saved in it are corrupted: {key} = "
                f"{saved[key]!r:.100}; start a new run instead of resuming"
            )
    return saved


def _make_optimizer(settings, params):
    from . import optim

    kind = settings["optimizer"]
    if kind == "sgd":
        return optim.SGD(
            params,
            lr=settings["lr"],
            momentum=settings["momentum"],
            nesterov=settings.get("nesterov", False),
            weight_decay=settings["weight_decay"],
        )
    cls = optim.Adam if kind == "adam" else optim.AdamW
    return cls(params, lr=settings["lr"], weight_decay=settings["weight_decay"])


def _make_scheduler(settings, optimizer, batches_per_epoch):
    from . import optim

    if settings["scheduler"] == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=settings["schedule_epochs"])
    if settings["scheduler"] == "onecycle":
        return optim.OneCycleLR(
            optimizer,
            max_lr=settings["lr"],
            total_steps=max(1, settings["schedule_epochs"] * batches_per_epoch),
        )
    return None


def _settings(args, saved=None):
    """Training settings from the options, the defaults, and (when resuming) the checkpoint."""
    given = {
        "model": args.model,
        "dataset": args.dataset,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "nesterov": args.nesterov,
        "weight_decay": args.weight_decay,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "val_split": args.val_split,
        "limit": args.limit,
        "augment": args.augment,
        "image_size": args.image_size,
        "early_stopping": args.early_stopping,
    }
    if saved is not None:  # (older checkpoints lack the newer settings)
        saved = {"model": DEFAULTS["model"], "nesterov": False, "augment": False, **saved}
        saved.setdefault("image_size", None)
        for key, value in given.items():
            if value is not None and value != saved.get(key):
                option = "--" + key.replace("_", "-")
                raise CliError(
                    f"{option} {value} differs from the resumed run's {saved.get(key)!r}; "
                    "a resumed run keeps its settings (leave the option out)"
                )
        settings = dict(saved)
        if (
            settings.get("scheduler") in ("cosine", "onecycle")
            and args.epochs != settings["schedule_epochs"]
        ):
            raise CliError(
                f"--epochs {args.epochs}: the resumed run schedules its learning rate over "
                f"{settings['schedule_epochs']} epochs; resume it with --epochs "
                f"{settings['schedule_epochs']}"
            )
        return settings
    settings = {k: v for k, v in given.items()}
    if settings["dataset"] is None:
        settings["dataset"] = DEFAULTS["dataset"]
    if settings["model"] is None:
        settings["model"] = cli_data.default_model(settings["dataset"])
    settings["augment"] = bool(settings["augment"])
    if settings["image_size"] is not None and not cli_data.is_folder(settings["dataset"]):
        raise CliError(f"--image-size applies to a folder of images, not to {settings['dataset']}")
    defaults = {**DEFAULTS}
    for key, value in MODEL_DEFAULTS.get(settings["model"], {}).items():
        defaults[key] = {**defaults[key], **value} if isinstance(value, dict) else value
    for key in ("dataset", "optimizer", "scheduler", "batch_size", "seed"):
        if settings[key] is None:
            settings[key] = defaults[key]
    kind = settings["optimizer"]
    if settings["lr"] is None:
        settings["lr"] = defaults["lr"][kind]
    if settings["weight_decay"] is None:
        settings["weight_decay"] = defaults["weight_decay"][kind]
    if settings["momentum"] is None:
        settings["momentum"] = defaults["momentum"] if kind == "sgd" else 0.0
    elif kind != "sgd":
        raise CliError(f"--momentum applies to --optimizer sgd only (got --optimizer {kind})")
    if settings["nesterov"] is None:
        settings["nesterov"] = defaults["nesterov"] if kind == "sgd" else False
    elif settings["nesterov"] and kind != "sgd":
        raise CliError(f"--nesterov applies to --optimizer sgd only (got --optimizer {kind})")
    if settings["nesterov"] and settings["momentum"] <= 0:
        raise CliError("--nesterov needs --momentum > 0")
    if settings["val_split"] is None:
        settings["val_split"] = cli_data.default_val_split(settings["dataset"])
    settings["schedule_epochs"] = args.epochs
    return settings


def _describe(settings):
    text = f"{settings['optimizer']} lr {settings['lr']:g}"
    if settings["optimizer"] == "sgd":
        text += f" momentum {settings['momentum']:g}"
        if settings.get("nesterov"):
            text += " nesterov"
    if settings["weight_decay"]:
        text += f" weight decay {settings['weight_decay']:g}"
    if settings["scheduler"] == "cosine":
        text += f", cosine schedule over {settings['schedule_epochs']} epochs"
    elif settings["scheduler"] == "onecycle":
        text += f", one-cycle schedule over {settings['schedule_epochs']} epochs"
    return text


# --------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    from . import models
    from .distributed import default_threads, describe_world, is_root
    from .threads import get_num_threads
    from .training import TrainingDiverged, evaluate, fit, resume_kwargs

    threads = default_threads(_check_threads(args.threads))  # under mpiexec: cores per rank
    ckpt = None
    if args.resume is not None:
        ckpt = _load_checkpoint(args.resume)
        saved = _saved_settings(ckpt)
        if saved is None or "fit" not in ckpt.extra:
            raise CliError(f"{args.resume}: not a checkpoint written by 'fastcnn train --out'")
        settings = _settings(args, _check_saved_settings(args.resume, saved))
        resume = resume_kwargs(ckpt)  # its fields checked before the data is loaded
        if args.epochs < resume["start_epoch"]:
            raise CliError(
                f"--epochs {args.epochs}: {args.resume} has already completed "
                f"{resume['start_epoch']} epochs; --epochs is the total to train up to"
            )
    else:
        if args.epochs == 0:
            raise CliError(
                "--epochs 0: nothing to train; give the number of epochs to train, e.g. --epochs 3"
            )
        settings = _settings(args)
    out = args.out if args.out is not None else args.resume
    if out is not None:
        _check_out(out, "--out" if args.out is not None else "--resume")
    if args.plot is not None:
        _check_picture(args.plot, "--plot")

    from . import precompile

    # First run on this machine: the backward kernels compile in a helper process meanwhile.
    precompiled = precompile.start()
    try:
        (x_train, y_train), (x_test, y_test), classes = _load_data(
            settings["dataset"], args.data_dir, not args.no_download, settings.get("image_size")
        )
        if ckpt is None:
            cli_data.check_model(settings["model"], settings["dataset"], x_train.shape[1:])
            settings["classes"] = classes
        if settings.get("limit"):
            x_train, y_train = x_train[: settings["limit"]], y_train[: settings["limit"]]
            x_test, y_test = x_test[: settings["limit"]], y_test[: settings["limit"]]
        n_val = resolve_val_split(settings["val_split"], x_train.shape[0])
        n_fit = x_train.shape[0] - n_val
        val_data = (x_train[n_fit:], y_train[n_fit:]) if n_val else None
        x_fit, y_fit = x_train[:n_fit], y_train[:n_fit]

        if ckpt is not None:
            model = ckpt.model
        else:
            model = models.BUILDERS[settings["model"]](
                x_train.shape[1], len(classes), settings["seed"]
            )
            resume = {"seed": settings["seed"]}
        if settings.get("early_stopping") and not n_val:
            raise CliError(
                "--early-stopping watches the validation loss: it needs validation images "
                "(a --val-split above 0)"
            )
        optimizer = _make_optimizer(settings, model.parameters())
        scheduler = _make_scheduler(settings, optimizer, -(-n_fit // settings["batch_size"]))
        if ckpt is not None:
            ckpt.restore_optimizer(optimizer)
            if scheduler is not None:
                ckpt.restore_scheduler(scheduler)

        from .losses import CrossEntropyLoss

        loss_fn = CrossEntropyLoss()
        nthreads = threads if threads is not None else get_num_threads()
        print(
            f"fastcnn train: {settings.get('model', 'reference')} on {settings['dataset']}"
            f"{' (augmented)' if settings.get('augment') else ''}: "
            f"{n_fit} training, {n_val} validation, {x_test.shape[0]} test images; "
            f"{_describe(settings)}; "
            f"batch {settings['batch_size']}, seed {settings['seed']}, {nthreads} threads"
            f"{describe_world()}",
            flush=True,
        )
        if ckpt is not None:
            print(f"resuming {args.resume} after epoch {ckpt.epoch}", flush=True)
        if precompiled is not None:
            print("compiling the kernels (first run only; numba caches them)", flush=True)
    except BaseException:  # an error before training: the helper's work is not wanted
        if precompiled is not None:
            precompiled.cancel()
        raise
    if precompiled is not None:
        precompiled()
    from .compile_ahead import mark_announced

    mark_announced()  # (fit would say it once more where numba cannot write its cache)
    try:
        history = _fit(
            fit,
            model,
            loss_fn,
            optimizer,
            *cli_data.train_data(x_fit, y_fit, settings),
            epochs=max(args.epochs, resume.get("start_epoch", 0)),
            batch_size=settings["batch_size"],
            val_data=val_data,
            scheduler=scheduler,
            progress=False if args.no_progress else None,  # None: only on a terminal
            checkpoint=out,
            threads=threads,
            verbose=True,
            checkpoint_extra={"cli": settings},
            callbacks=_callbacks(settings),
            **resume,
        )
    except TrainingDiverged as exc:
        print(f"fastcnn train: {exc}", file=sys.stderr)
        return 1
    if out is not None and args.epochs > resume.get("start_epoch", 0):  # (else nothing was written)
        print(f"checkpoint: {out}")
    if args.plot is not None and len(history) and is_root():
        history.plot(args.plot)
        print(f"curves: {args.plot}")
    if is_root():
        _report_test(model, x_test, y_test, 256, threads, evaluate)
    return 0


def _callbacks(settings):
    from .callbacks import EarlyStopping

    patience = settings.get("early_stopping")
    return [EarlyStopping("val_loss", patience=patience, verbose=True)] if patience else []


def _check_picture(path, option):
    """A picture's destination and matplotlib, checked before any work is done."""
    _check_out(path, option)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(
            f"{option} draws with matplotlib, which is not installed: pip install "
            "'fastcnn[plot]' (or pip install matplotlib)"
        ) from None


class InternalError(RuntimeError):
    """A ValueError/TypeError raised once training runs is a bug: shown with its traceback."""


def _fit(fit, *args, **kwargs):
    import numpy as np

    try:
        # numpy's overflow/invalid warnings (two lines each, with file paths) would precede the
        # one line that reports a diverging run: fit detects and reports it itself.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fit(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise InternalError(f"unexpected error while training: {exc}") from exc


def _report_test(model, x, y, batch_size, threads, evaluate):
    loss, accuracy = evaluate(model, x, y, batch_size=batch_size, threads=threads)
    print(f"test loss: {loss:.4f}")
    print(f"test accuracy: {100 * accuracy:.2f}%", flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .training import evaluate

    threads = _check_threads(args.threads)
    if args.confusion is not None:
        _check_picture(args.confusion, "--confusion")
    ckpt = _load_checkpoint(args.checkpoint)
    saved = _saved_settings(ckpt)
    dataset = args.dataset
    if dataset is None:
        dataset = saved.get("dataset") if isinstance(saved, dict) else None
        if dataset is None:
            dataset = DEFAULTS["dataset"]
        elif not (dataset in DATASETS or (cli_data.is_dataset(dataset) and os.path.isdir(dataset))):
            raise CliError(
                f"{args.checkpoint}: names the data set {dataset!r:.50}, which is not one "
                f"of {', '.join(DATASETS)} nor a folder; choose one with --dataset"
            )
    image_size = saved.get("image_size") if isinstance(saved, dict) else None
    _, (x_test, y_test), _ = _load_data(
        dataset, args.data_dir, not args.no_download, image_size if is_int(image_size, 1) else None
    )
    if args.limit:
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    epoch = f" after epoch {ckpt.epoch}" if ckpt.epoch is not None else ""
    print(f"fastcnn evaluate: {args.checkpoint}{epoch} on {dataset}: {x_test.shape[0]} test images")
    if args.confusion is not None:
        _report_confusion(ckpt.model, x_test, y_test, args, threads, f"{dataset}{epoch}")
        return 0
    _report_test(ckpt.model, x_test, y_test, args.batch_size, threads, evaluate)
    return 0


def _report_confusion(model, x, y, args, threads, what):
    """The test loss and accuracy (as _report_test) from one pass that also draws the
    confusion matrix and prints the accuracy of each class."""
    import numpy as np

    from .metrics import evaluate_metrics
    from .plots import confusion

    report = evaluate_metrics(model, x, y, batch_size=args.batch_size, threads=threads)
    m = report["confusion_matrix"]
    confusion(m, args.confusion, title=f"{what}: accuracy {100 * report['accuracy']:.2f}%")
    print(f"confusion matrix: {args.confusion}")
    rates = report["per_class_accuracy"]
    per_class = "  ".join(f"{c}: {100 * a:.1f}%" for c, a in enumerate(rates) if not np.isnan(a))
    print(f"accuracy per class: {per_class}")
    print(f"test loss: {report['loss']:.4f}")
    print(f"test accuracy: {100 * report['accuracy']:.2f}%", flush=True)


def cmd_summary(args: argparse.Namespace) -> int:
    from . import models

    shape = args.input_shape
    if args.checkpoint:
        if args.model is not None:
            raise CliError("give either CHECKPOINT or --model, not both")
        ckpt = _load_checkpoint(args.checkpoint)
        model = ckpt.model
        shape = shape or ckpt.input_shape or INPUT_SHAPE
    else:
        name = args.model or DEFAULTS["model"]
        shape = shape or models.INPUT_SHAPES[name]
        model = models.BUILDERS[name](shape[0], NUM_CLASSES, 0)
    print(model.summary((1,) + tuple(shape), print_fn=None))
    return 0


# --------------------------------------------------------------------------------------------
# entry point


def _expected_errors():
    from . import checkpoint, datasets

    errors: list[type[Exception]] = [
        CliError,
        FileNotFoundError,
        PermissionError,
        ValueError,
        TypeError,
        OSError,
    ]
    errors.append(cli_data.DataError)
    for module, name in ((datasets, "DatasetError"), (checkpoint, "CheckpointError")):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            errors.append(cls)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import CliSession

    # under mpiexec: only rank 0 prints; a rank that fails stops the others
    with CliSession() as session:
        return session.exit(_main(argv))


def _main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"fastcnn {args.command}"
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the message for the errors a user can fix; a bug is reported as one
        if os.environ.get("FASTCNN_TRACEBACK", "") not in ("", "0"):
            raise
        if isinstance(exc, MemoryError):
            print(
                f"{prog}: error: out of memory; try a smaller --batch-size or --limit, or free "
                f"memory",
                file=sys.stderr,
            )
            return 2
        if not isinstance(exc, _expected_errors()) or isinstance(exc, InternalError):
            print(
                f"{prog}: internal error: {type(exc).__name__}: {_message(exc)}\n"
                f"This is a bug in fastcnn; please report it with the traceback that "
                f"FASTCNN_TRACEBACK=1 {prog} ... prints.",
                file=sys.stderr,
            )
            return 3
        print(f"{prog}: error: {_message(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    return status


def _message(exc):
    """The whole message (a download failure lists every mirror's answer on its own line)."""
    return str(exc).strip()


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
