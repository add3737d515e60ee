"""The fastcnn command on random options, in process."""

import contextlib
import io
import itertools
import math
import os
import re
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from fastcnn import checkpoint as ckpt_mod
from fastcnn import cli, layers
from fastcnn.model import Sequential
from fuzzing.common import fuzz, tally

# ---------------------------------------------------------------------------------------------
# the command line: random options, in process; an error is status 2 and one line, never a
# traceback (and nothing trains: the data folder is empty and downloads are off)


_CLI_DIR = tempfile.mkdtemp(prefix="fastcnn-fuzz-cli-")
_EMPTY_DATA = os.path.join(_CLI_DIR, "data")
os.makedirs(_EMPTY_DATA)
_CORRUPT = os.path.join(_CLI_DIR, "corrupt.safetensors")
with open(_CORRUPT, "wb") as _f:
    _f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
_PLAIN_CKPT = os.path.join(_CLI_DIR, "plain.safetensors")
ckpt_mod.save(_PLAIN_CKPT, Sequential([layers.Flatten(), layers.Dense(784, 10, rng=0)]), epoch=1)

_NUMBERS = [
    "0",
    "1",
    "3",
    "-1",
    "-0",
    "2.5",
    "1e-3",
    "1e400",
    "-1e-3",
    "nan",
    "inf",
    "-inf",
    "",
    " ",
    "0x10",
    "1_000",
    "٣",
    "three",
    "1e",
    "--",
    "-",
    "9" * 30,
    "0.1",
    "1.0",
    "5000",
]
_OPTIONS = {
    "--epochs": _NUMBERS,
    "--batch-size": _NUMBERS,
    "--lr": _NUMBERS,
    "--momentum": _NUMBERS,
    "--weight-decay": _NUMBERS,
    "--seed": _NUMBERS,
    "--val-split": _NUMBERS + ["0.999", "1"],
    "--limit": _NUMBERS,
    "--threads": _NUMBERS + ["2", "1"],
    "--optimizer": ["sgd", "adam", "adamw", "SGD", "rmsprop", ""],
    "--scheduler": ["none", "cosine", "step", ""],
    "--dataset": ["mnist", "fashion-mnist", "cifar"],
    "--out": [
        os.path.join(_CLI_DIR, "run.safetensors"),
        os.path.join(_CLI_DIR, "nope", "x"),
        _CLI_DIR,
        "",
        "\x00",
    ],
    "--resume": [_CORRUPT, _PLAIN_CKPT, os.path.join(_CLI_DIR, "missing"), _CLI_DIR, ""],
    "--data-dir": [_EMPTY_DATA, os.path.join(_CLI_DIR, "missing"), _CORRUPT],
    "--bogus": ["1"],
}
_FLAGS = ["--no-progress", "--no-download", "--help", "--version", "-h"]


@st.composite
def argvs(draw):
    command = draw(
        st.sampled_from(["train"] * 6 + ["evaluate"] * 2 + ["summary", "frobnicate", ""])
    )
    argv = [command] if command else []
    options = draw(st.lists(st.sampled_from(sorted(_OPTIONS)), max_size=5))
    for option in options:
        argv += [option, draw(st.sampled_from(_OPTIONS[option]))]
    if command in ("evaluate", "summary") or draw(st.integers(0, 9)) == 0:
        if draw(st.integers(0, 3)):
            argv.append(
                draw(st.sampled_from([_CORRUPT, _PLAIN_CKPT, os.path.join(_CLI_DIR, "m"), ""]))
            )
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(_FLAGS)))
    # nothing may train or download: an empty data folder, downloads off
    argv += ["--no-download", "--data-dir", _EMPTY_DATA] if command in ("train", "evaluate") else []
    return argv


def _value_ok(option, text):
    """Whether the command line accepts ``text`` for ``option`` (None: not a checked option)."""
    if text.startswith("-") and not re.fullmatch(r"-\d+|-\d*\.\d+", text):
        return False  # argparse takes it for an option: "expected one argument"

    def number(kind, low, low_open=False):
        try:
            v = kind(text)
        except ValueError:
            return False
        return math.isfinite(v) and (v > low if low_open else v >= low)

    if option in ("--epochs", "--seed"):
        return number(int, 0)
    if option in ("--batch-size", "--limit"):
        return number(int, 1)
    if option == "--lr":
        return number(float, 0, low_open=True)
    if option in ("--momentum", "--weight-decay"):
        return number(float, 0)
    if option == "--threads":  # the parser wants an int; the range is checked after parsing
        return number(int, -math.inf)
    if option == "--val-split":
        if any(c in text for c in ".eE"):
            return number(float, 0) and float(text) < 1
        return number(int, 0)
    if option in ("--optimizer", "--scheduler", "--dataset"):
        return (
            text
            in {
                "--optimizer": cli.OPTIMIZERS,
                "--scheduler": cli.SCHEDULERS,
                "--dataset": cli.DATASETS,
            }[option]
        )
    return None


@fuzz(1.0)
@given(argv=argvs())
def test_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("FASTCNN_DATA")
    os.environ["FASTCNN_DATA"] = _EMPTY_DATA
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
    finally:
        if old is None:
            del os.environ["FASTCNN_DATA"]
        else:
            os.environ["FASTCNN_DATA"] = old
    err = err.getvalue()
    assert "Traceback" not in err
    if status == 0:  # --help, --version, summary
        assert any(f in argv for f in ("--help", "-h", "--version")) or argv[:1] == ["summary"], (
            argv
        )
        return tally("cli.main", "valid")
    assert status == 2, (argv, status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], (argv, err)
    # a bad option value is refused by name, before any data is read
    command = argv[0] if argv else ""
    known = (
        set(_OPTIONS) - {"--bogus"}
        if command == "train"
        else {"--batch-size", "--limit", "--threads", "--dataset"}
        if command == "evaluate"
        else set()
    )
    bad = {o for o, v in itertools.pairwise(argv) if o in known and _value_ok(o, v) is False}
    # ("--" ends the options: what follows is positional, reported as unrecognized)
    if bad and not set(argv) & {"--help", "-h", "--version", "--"}:
        assert any(o in lines[0] for o in bad), (argv, lines[0])
    tally("cli.main", "invalid")
