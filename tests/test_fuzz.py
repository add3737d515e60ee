"""Run the fuzz cases (tests/fuzz_cases.py) in a child interpreter.

A kernel that writes outside an array can kill the interpreter (segfault, abort, heap
corruption) or hang it; run in this process, that would be a dead CI run with no report. Here
the child's death, non-zero exit or timeout is a test failure that shows the child's output
(pytest's faulthandler prints the Python stack of a crash or, after ``faulthandler_timeout``,
of a hang).

Two runs, side by side: the bounds-checked one starts with the first of the two tests, so that
its serial compilation uses one core while the normal run fuzzes (its kernels run on both):
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
import time

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


class Child:
    """A child interpreter started now, its output in a temporary file (a pipe left unread would
    fill and block a child that runs beside this process), and its deadline ``timeout`` s on."""

    def __init__(self, cmd, env=None, timeout=600):
        self.out = tempfile.TemporaryFile("w+b")
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        # unbuffered: a kill loses none of its output
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.out, stderr=self.out)

    def output(self, chars=12000):
        self.out.seek(0)
        return self.out.read().decode(errors="replace")[-chars:]

    def finish(self):
        """Wait for the child until its deadline; a death by signal, a timeout or a non-zero
        exit fails the test with its output. Returns that output; the child has ended either way
        (a KeyboardInterrupt or failure here kills it) and its file is closed."""
        try:
            try:
                self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(
                    f"the child hung: no result after {self.timeout} s\n{self.output(6000)}"
                )
            if self.proc.returncode < 0:
                name = signal.Signals(-self.proc.returncode).name
                pytest.fail(f"the child interpreter died with {name}\n{self.output()}")
            if self.proc.returncode != 0:
                pytest.fail(
                    f"the child failed (exit status {self.proc.returncode}):\n{self.output()}"
                )
            return self.output()
        finally:
            self.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.stop()
        self.out.close()


def run_checked(cmd, env=None, timeout=600):
    """``Child(...).finish()``: the child's output."""
    return Child(cmd, env, timeout).finish()


def start_fuzz(report, examples, extra_args=(), timeout=600):
    """tests/fuzz_cases.py started in a fresh interpreter (a Child) that writes ``report``."""
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
    return Child(cmd, env, timeout)


def fuzz_report(child, report):
    """Wait for a start_fuzz child; the report it wrote."""
    output = child.finish()
    assert report.exists(), f"the fuzz run wrote no report:\n{output[-6000:]}"
    return json.loads(report.read_text())


_BOUNDS_TEST = "test_fuzz_kernels_with_bounds_checks"


@pytest.fixture(scope="module")
def bounds_checked_child(request, tmp_path_factory):
    """(child, report path) of the bounds-checked run, or None when its test is not selected:
    started with the first fuzz test of this module, so that its kernels compile (serially,
    minutes on a slow CI machine) while the normal run fuzzes."""
    if not any(item.name == _BOUNDS_TEST for item in request.session.items):
        yield None
        return
    report = tmp_path_factory.mktemp("boundscheck") / "fuzz-report.json"
    # 900 s: it shares the machine with the normal run from its start
    child = start_fuzz(
        report, BOUNDSCHECK_EXAMPLES, ["-p", "fuzz_boundscheck", "-k", KERNEL_CASES], timeout=900
    )
    yield child, report
    child.close()


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
@pytest.mark.usefixtures("bounds_checked_child")  # (started beside this run)
def test_fuzz_cases_in_a_child_interpreter(tmp_path, record_property):
    report = tmp_path / "fuzz-report.json"
    result = fuzz_report(start_fuzz(report, EXAMPLES), report)
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
    result = fuzz_report(*bounds_checked_child)
    assert result["boundscheck"] is True
    total, calls, per_case = summarize(result["counts"])
    record_property("fuzz_boundscheck_examples", total)
    print(
        f"\nfuzz with bounds-checked serial kernels: {total} examples, {calls} checked calls, "
        f"no IndexError; per case: {json.dumps(per_case, sort_keys=True)}"
    )
    assert total >= 5 * BOUNDSCHECK_EXAMPLES, total
