"""Run the fuzz cases (tests/fuzz_cases.py) in a child interpreter.

A kernel that writes outside an array can kill the interpreter (segfault, abort, heap
corruption) or hang it; run in this process, that would be a dead CI run with no report. Here
the child's death, non-zero exit or timeout is a test failure that shows the child's output
(pytest's faulthandler prints the Python stack of a crash or, after ``faulthandler_timeout``,
of a hang).

Two runs, side by side (each is mostly one core's work):
- the normal build (parallel kernels, cached), every fuzz case, FASTCNN_FUZZ_EXAMPLES examples
  per case (weighted per case; 1000 -> about 25,000 examples);
- the kernels recompiled with ``parallel=False, boundscheck=True`` and tiny tile/chunk sizes
  (tests/fuzz_boundscheck.py), the cases that reach a kernel, fewer examples: an out-of-bounds
  index then raises IndexError, which the fuzz cases do not accept, and the small fuzz shapes
  also run the multi-group / multi-chunk paths of large inputs. (``NUMBA_BOUNDSCHECK=1`` alone
  does not check inside ``prange`` bodies.) Mostly compilation, every kernel serially.

Each run writes its example counts to a JSON file; the test reports them
(``pytest -s tests/test_fuzz.py`` prints them) and checks that the cases really ran.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest


def _fuzz_cases():
    """The names of the example-counting cases fuzz_cases.py gathers (its __all__, read without
    importing it: every one but the bounds-check probe)."""
    import ast

    with open(os.path.join(os.path.dirname(__file__), "fuzz_cases.py")) as f:
        tree = ast.parse(f.read())
    names = next(
        [ast.literal_eval(e) for e in node.value.elts]
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"
    )
    return sorted(n for n in names if n.startswith("test_") and n != "test_boundscheck_is_active")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = int(os.environ.get("FASTCNN_FUZZ_EXAMPLES", "1000"))
BOUNDSCHECK_EXAMPLES = int(os.environ.get("FASTCNN_FUZZ_BOUNDSCHECK_EXAMPLES", "80"))
KERNEL_CASES = "conv2d or pool2d or batchnorm or activations or sequential or boundscheck"


def start_child(cmd, env=None):
    """Start ``cmd`` with its output in a temporary file (a pipe left unread would fill and block
    a child that runs beside this process)."""
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, out


def finish_checked(proc, out, timeout=600):
    """Wait for a child of ``start_child``; a death by signal, a timeout or a non-zero exit fails
    the test with the child's output. Returns that output."""

    def output():
        out.seek(0)
        return out.read()[-12000:]

    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the child hung: no result after {timeout} s\n{output()[-6000:]}")
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"the child interpreter died with {name}\n{output()}")
    if proc.returncode != 0:
        pytest.fail(f"the child failed (exit status {proc.returncode}):\n{output()}")
    return output()


def run_checked(cmd, env=None, timeout=600):
    """``start_child`` and ``finish_checked`` in one; returns the child's output."""
    return finish_checked(*start_child(cmd, env), timeout)


class Child:
    """tests/fuzz_cases.py running in a fresh interpreter; ``report()`` waits for it and returns
    the report it wrote."""

    def __init__(self, report, examples, extra_args=()):
        self.report_path = report
        env = dict(
            os.environ,
            FASTCNN_FUZZ_EXAMPLES=str(examples),
            FASTCNN_FUZZ_REPORT=str(report),
            PYTHONPATH=os.pathsep.join(
                filter(None, [os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])
            ),
        )
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            os.path.join(ROOT, "tests", "fuzz_cases.py"),
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            ROOT,
            "-o",
            "faulthandler_timeout=240",
            "-W",
            "ignore::RuntimeWarning",
            "-W",
            "ignore::DeprecationWarning",
            *extra_args,
        ]
        self.proc, self.out = start_child(cmd, env)

    def report(self, timeout=600):
        output = finish_checked(self.proc, self.out, timeout)
        assert self.report_path.exists(), f"the fuzz run wrote no report:\n{output[-6000:]}"
        return json.loads(self.report_path.read_text())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture(scope="module")
def bounds_checked_child(tmp_path_factory):
    """The bounds-checked run, started with the normal run: its kernels compile serially (minutes
    on a slow CI machine) while the normal run fuzzes on the other core."""
    child = Child(
        tmp_path_factory.mktemp("boundscheck") / "fuzz-report.json",
        BOUNDSCHECK_EXAMPLES,
        ["-p", "fuzz_boundscheck", "-k", KERNEL_CASES],
    )
    yield child
    child.stop()


def test_a_crash_or_hang_of_the_child_is_a_test_failure():
    """The harness itself: a segfaulting or hanging child fails the test, with a reason."""
    with pytest.raises(pytest.fail.Exception, match="died with SIGSEGV"):
        run_checked([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
    with pytest.raises(pytest.fail.Exception, match="hung"):
        run_checked([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    with pytest.raises(pytest.fail.Exception, match="exit status 3"):
        run_checked([sys.executable, "-c", "raise SystemExit(3)"])


def summarize(counts):
    """(examples run, checked calls, {case: examples})."""
    examples = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("examples:")}
    calls = sum(v for k, v in counts.items() if not k.startswith("examples:"))
    return sum(examples.values()), calls, examples


@pytest.mark.slow
def test_fuzz_cases_in_a_child_interpreter(tmp_path, record_property, bounds_checked_child):
    result = Child(tmp_path / "fuzz-report.json", EXAMPLES).report()
    assert result["boundscheck"] is False
    total, calls, per_case = summarize(result["counts"])
    record_property("fuzz_examples", total)
    record_property("fuzz_checked_calls", calls)
    print(
        f"\nfuzz: {total} examples, {calls} checked calls (valid result or named error), "
        f"no crash; per case: {json.dumps(per_case, sort_keys=True)}"
    )
    # every case ran (nearly) its full share: hypothesis may stop a case early only when it
    # has exhausted its search space
    assert sorted(per_case) == _fuzz_cases(), per_case
    assert total >= 10 * EXAMPLES, total
    counts = result["counts"]
    # the thread and fork cases ran on models that fit their input, not only on refusals
    for case in ("predict from two threads", "forked children"):
        assert counts.get(f"{case}:valid", 0) > 0, case
    for name in (
        "Conv2D",
        "MaxPool2D",
        "AvgPool2D",
        "BatchNorm2D",
        "BatchNorm1D",
        "Dense",
        "ReLU",
        "LeakyReLU",
        "Tanh",
        "Sigmoid",
        "Softmax",
        "Flatten",
        "Dropout",
    ):
        for what in ("forward", "backward"):  # each checked with valid and invalid arguments
            assert counts.get(f"{name}.{what}:valid", 0) > 0, (name, what)
            assert counts.get(f"{name}.{what}:invalid", 0) > 0, (name, what)


@pytest.mark.slow
def test_fuzz_kernels_with_bounds_checks(record_property, bounds_checked_child):
    result = bounds_checked_child.report()
    assert result["boundscheck"] is True
    total, calls, per_case = summarize(result["counts"])
    record_property("fuzz_boundscheck_examples", total)
    print(
        f"\nfuzz with bounds-checked serial kernels: {total} examples, {calls} checked calls, "
        f"no IndexError; per case: {json.dumps(per_case, sort_keys=True)}"
    )
    assert total >= 5 * BOUNDSCHECK_EXAMPLES, total
