"""fastcnn.precompile: the two groups it compiles in parallel on a first run cover every kernel
of the reference network's training step (else the helper process would work in vain), and no
kernel helper compiles twice for one dtype."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from fastcnn import compile_helper, precompile

pytestmark = pytest.mark.slow

_CHILD = textwrap.dedent("""
    import collections
    import numpy as np
    from numba.core import event
    from numba.parfors import parfor_lowering
    from fastcnn import models, losses, optim, precompile

    loops = collections.Counter()  # the parallel loops numba builds, per kernel
    build = parfor_lowering._create_gufunc_for_parfor_body

    def counted(lowerer, *args, **kwargs):
        loops[lowerer.fndesc.qualname] += 1
        return build(lowerer, *args, **kwargs)

    parfor_lowering._create_gufunc_for_parfor_body = counted
    assert precompile.cache_is_cold()
    precompile.compile_backward()
    assert not precompile.cache_is_cold()
    precompile.compile_forward()
    compiled = []

    class Listener(event.Listener):
        def on_start(self, ev):
            compiled.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Listener())
    model = models.reference(seed=0)
    loss_fn = losses.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    y = np.arange(8) % 10
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    model.predict(x)
    print("COMPILED", compiled)
    print("LOOPS", sorted(loops.items()))

    # the direct kernels' other callers of the shared helpers (the fused ones ran above)
    for name in ("conv2d_backward_weight", "conv2d_forward"):
        precompile.RECIPES["conv2d." + name](np.dtype(np.float32))
    precompile.RECIPES["pool2d.avgpool2d_backward"](np.dtype(np.float32))
    import gc
    from numba.core import types
    from numba.core.registry import CPUDispatcher

    def same_code(a, b):
        # two signatures that differ only by a literal against its plain type, an omitted
        # argument against its value's type, or an integer kind (a prange index's uint64)
        if len(a) != len(b) or a == b:
            return False
        for s, t in zip(a, b):
            if s == t:
                continue
            us, ut = (
                types.unliteral(types.literal(v.value) if isinstance(v, types.Omitted) else v)
                for v in (s, t)
            )
            if isinstance(s, types.Literal) and isinstance(t, types.Literal):
                return False  # two constants: a specialisation on purpose
            plain = us == ut
            ints = isinstance(us, types.Integer) and isinstance(ut, types.Integer)
            if not (plain or ints):
                return False
        return True

    twice = []
    for d in gc.get_objects():
        if isinstance(d, CPUDispatcher) and d.py_func.__module__.startswith("fastcnn.kernels"):
            sigs = list(d.signatures)
            twice += [
                (d.py_func.__qualname__, str(a), str(b))
                for i, a in enumerate(sigs) for b in sigs[i + 1:] if same_code(a, b)
            ]
    print("TWICE", twice)
""")


def test_groups_cover_a_training_step(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), FASTCNN_NO_PRECOMPILE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COMPILED")][-1]
    assert line == "COMPILED []", line  # nothing left to compile after the two groups
    # one prange per kernel, nothing else parallel: numba turns np.zeros, np.ones, np.arange
    # and array expressions in a parallel kernel into parallel loops of their own, each
    # compiled as a gufunc with its wrappers (conv1's weight gradient had two: 1-2 s)
    loops = eval([ln for ln in proc.stdout.splitlines() if ln.startswith("LOOPS")][-1][6:])
    # (2: predict's; 2: the Dense forward's and its gradients' shared product)
    assert len(loops) == 9 and all(n == 1 for _, n in loops), loops
    # every helper compiled once per dtype: a literal argument or a prange index passed as it
    # is compiles a helper again (docs/kernels.md, one compilation per helper)
    twice = [ln for ln in proc.stdout.splitlines() if ln.startswith("TWICE")][-1]
    assert twice == "TWICE []", twice


def test_start_does_nothing_when_disabled(monkeypatch):
    monkeypatch.setenv("FASTCNN_NO_PRECOMPILE", "1")
    assert precompile.start() is None


@pytest.fixture
def sleeping_helpers(monkeypatch):
    """A cold cache, and every helper precompile.start() spawns a process that would run for a
    minute: the list of them, killed at the end (a failed assert leaves no sleeper behind)."""
    monkeypatch.delenv("FASTCNN_NO_PRECOMPILE", raising=False)
    monkeypatch.setattr(precompile, "cache_is_cold", lambda: True)
    started = []
    real_popen = subprocess.Popen

    def popen(args, **kwargs):
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    monkeypatch.setattr(compile_helper.subprocess, "Popen", popen)
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_an_interrupt_while_compiling_kills_the_helper(monkeypatch, sleeping_helpers):
    """Ctrl-C (or SIGTERM, or an error) during the parent's half of the compilation stops the
    helper process at once instead of waiting for its half to finish (about 18 s on a cold
    cache), and the interrupt goes on to the caller."""

    def interrupted(dtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompile, "compile_forward", interrupted)
    finish = precompile.start()
    assert finish is not None and len(sleeping_helpers) == 1
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        finish()
    assert time.monotonic() - t0 < 30  # not the helper's 60 s
    assert sleeping_helpers[0].poll() is not None  # killed and reaped, not left running


def test_train_that_fails_before_training_stops_the_helper(sleeping_helpers, tmp_path, capsys):
    """``fastcnn train`` starts the helper before it loads the data; an error there (here: no
    data, downloads off) stops it. Called in one process again and again (a notebook, the CLI
    fuzz test on a cold cache), each call used to leave a helper compiling for a minute."""
    from fastcnn import cli

    status = cli.main(["train", "--data-dir", str(tmp_path), "--no-download"])
    assert status != 0 and "mnist files missing" in capsys.readouterr().err
    assert len(sleeping_helpers) == 1
    assert sleeping_helpers[0].poll() is not None  # killed and reaped, not left running


@pytest.mark.parametrize("cold", [True, False])
def test_cache_is_cold_reads_the_index_files(monkeypatch, tmp_path, cold):
    index = tmp_path / "kernel.nbi"
    if not cold:
        index.write_text("x")
    monkeypatch.setattr(precompile, "_index_paths", lambda: [str(index)])
    assert precompile.cache_is_cold() is cold


def test_cache_is_cold_warns_when_numba_changed(monkeypatch):
    """numba's private cache layout gone: a RuntimeWarning and False (no helper process)."""

    def moved():
        raise AttributeError("'Dispatcher' object has no attribute '_cache'")

    monkeypatch.setattr(precompile, "_index_paths", moved)
    with pytest.warns(
        RuntimeWarning, match="cannot read numba's kernel cache.*FASTCNN_NO_PRECOMPILE=1 silences"
    ):
        assert precompile.cache_is_cold() is False
    monkeypatch.setenv("FASTCNN_NO_PRECOMPILE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precompile.start() is None  # the switch: numba's cache is not even read


def test_index_paths_found_with_this_numba():
    paths = precompile._index_paths()
    assert len(paths) == 2 and all(p.endswith(".nbi") for p in paths)


def _alive(pid):
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_helper_dies_with_its_parent(tmp_path):
    """SIGTERM or SIGKILL of the parent runs no Python cleanup: the helper must not compile on
    for its remaining ~18 s (it sets PR_SET_PDEATHSIG first)."""
    pidfile = tmp_path / "helper.pid"
    helper = (
        "import os, time; from fastcnn.precompile import die_with_parent; "
        "die_with_parent({parent}); "
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent_code = (
        "import os, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {helper!r}.format(parent=os.getpid())]); "
        "time.sleep(60)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=root)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the helper did not start"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the helper outlived its parent"
        time.sleep(0.05)


def test_a_ctrl_c_swallowed_while_compiling_still_interrupts(monkeypatch):
    """A SIGINT that lands in one of llvmlite's ctypes callbacks during compilation raises
    KeyboardInterrupt there, and ctypes swallows it ("Exception ignored on calling ctypes
    callback function"): a cold `fastcnn train` then trained on. The interrupt is remembered and
    raised when the compilation returns, and the helper is stopped."""
    monkeypatch.delenv("FASTCNN_NO_PRECOMPILE", raising=False)
    monkeypatch.setattr(precompile, "cache_is_cold", lambda: True)
    started = []
    real_popen = subprocess.Popen

    def popen(args, **kwargs):
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    def compile_swallowing_the_interrupt(dtype):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what ctypes does with an exception raised in a callback

    monkeypatch.setattr(compile_helper.subprocess, "Popen", popen)
    monkeypatch.setattr(precompile, "compile_forward", compile_swallowing_the_interrupt)
    finish = precompile.start()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        finish()
    assert started[0].poll() is not None
    assert signal.getsignal(signal.SIGINT) is previous
