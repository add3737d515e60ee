"""Save what a benchmark prints as a dated results file under bench/results/.

    saved = results_file.start("end-to-end-reference")   # from here on stdout also goes to the file
    ...                                                  # the benchmark prints header and tables
    saved.finish()                                       # appends the machine, renames, says where

The file is written as the run goes, under a ``.partial`` name that nothing reads; ``finish``
appends the CPU model with all its flags and the platform, then gives it its final name
``YYYY-MM-DD-HHMM-<name>.md`` (``...-<name>-2.md`` and on when a run of the same minute has
that name: a results file is never overwritten). A run that crashes or is interrupted leaves
only the ``.partial`` file. ``bench/readme_table.py`` reads the latest complete end-to-end file.
"""

from __future__ import annotations

import os
import platform
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class _Tee:
    """A text stream that writes to the terminal and to the results file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.file.write(text)
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


def cpu_description():
    """(model name, every flag) from /proc/cpuinfo; (platform.processor(), []) elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return platform.processor() or "unknown", []
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown"
    )
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model, flags


def _unused(stem):
    """``stem.md``, else ``stem-2.md``, ``stem-3.md``, ...: the first name no file (complete
    or partial) has."""
    path, n = f"{stem}.md", 1
    while os.path.exists(path) or os.path.exists(path + ".partial"):
        n += 1
        path = f"{stem}-{n}.md"
    return path


class Results:
    def __init__(self, name, directory):
        os.makedirs(directory, exist_ok=True)
        self.stem = os.path.join(directory, f"{time.strftime('%Y-%m-%d-%H%M')}-{name}")
        self.path = _unused(self.stem)
        self.partial = self.path + ".partial"
        self.file = open(self.partial, "w", encoding="utf-8")
        self.stdout = sys.stdout
        sys.stdout = _Tee(self.stdout, self.file)

    def finish(self):
        """Stop copying stdout, append the machine, give the file its final name; returns it."""
        sys.stdout.flush()
        sys.stdout = self.stdout
        model, flags = cpu_description()
        self.file.write(
            f"\n## Machine\n\nCPU: {model}\nflags: {' '.join(flags) or '(unknown)'}\n"
            f"platform: {platform.platform()}\n"
        )
        self.file.close()
        if os.path.exists(self.path):  # another run of the same minute finished first
            self.path = _unused(self.stem)
        os.replace(self.partial, self.path)
        print(f"results saved to {os.path.relpath(self.path)}", file=sys.stderr)
        return self.path


def start(name, directory=RESULTS_DIR):
    """Copy everything printed from now on into a new results file (see the module docstring)."""
    return Results(name, directory)
