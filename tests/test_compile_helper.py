"""fastcnn.compile_helper: on a cold cache a helper process compiles the kernels a training step
reaches later; each kernel compiles once, in one of the two processes, with the argument types
the layers pass (else the step would compile it again)."""

import heapq
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fastcnn import compile_helper, precompile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(precompile.__file__)))


def _child(tmp_path, code, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "FASTCNN_NO_PRECOMPILE"}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


# Networks whose training steps reach every kernel of RECIPES, with their inputs.
_NETWORKS = textwrap.dedent("""
    import numpy as np
    import fastcnn
    from fastcnn import models

    def networks():
        yield models.reference(seed=0), (2, 1, 28, 28)
        yield models.BUILDERS["lenet5"](1, 10, 0), (2, 1, 28, 28)  # one channel, tanh, avg pool
        yield models.BUILDERS["resnet8"](3, 10, 0), (2, 3, 32, 32)  # BN, residual, stride 2
        # F(2x2)'s weight gradient (6x6 outputs; the ResNet's sizes pick F(4x4)'s), max
        # pool, 'valid' col2im
        yield fastcnn.Sequential(
            fastcnn.Conv2D(3, 32, 3, padding=1),
            fastcnn.ReLU(),
            fastcnn.Conv2D(32, 32, 3, padding=1),
            fastcnn.BatchNorm2D(32),
            fastcnn.ReLU(),
            fastcnn.MaxPool2D(2),
            fastcnn.Conv2D(32, 8, 2),
            fastcnn.AvgPool2D(2),
            fastcnn.Flatten(),
            fastcnn.Dense(8, 10),
        ), (2, 3, 6, 6)
        # the smallest step with a Winograd weight gradient (a cold compilation of few kernels)
        yield fastcnn.Sequential(
            fastcnn.Conv2D(32, 32, 3, padding=1),
            fastcnn.AvgPool2D(6),
            fastcnn.Flatten(),
            fastcnn.Dense(32, 10),
        ), (2, 32, 6, 6)

    def record_compilations():
        # the kernels numba compiles from now on, as module.function (a list that grows)
        from numba.core import event

        compiled = []

        class Listener(event.Listener):
            def on_start(self, ev):
                d = ev.data["dispatcher"]
                name = d.py_func.__module__.rsplit(".", 1)[-1] + "." + d.py_func.__name__
                compiled.append(name)

            def on_end(self, ev):
                pass

        event.register("numba:compile", Listener())
        return compiled

    def step(model, shape):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        loss_fn = fastcnn.CrossEntropyLoss()
        loss_fn(model(x), np.arange(shape[0]) % 10)
        model.backward(loss_fn.backward())
""")

_RECIPES_CHILD = _NETWORKS + textwrap.dedent("""
    from fastcnn import precompile

    for recipe in precompile.RECIPES.values():
        recipe(np.dtype("float32"))
    compiled = record_compilations()
    for model, shape in networks():
        step(model, shape)
    print("AGAIN", sorted(set(compiled) & set(precompile.RECIPES)))
""")


@pytest.mark.slow
def test_recipes_compile_the_kernels_with_the_layers_argument_types(tmp_path):
    """Every recipe compiles its kernel as the layers call it: after all recipes, training
    steps of networks that reach every one of those kernels compile none of them again."""
    out = _child(tmp_path, _RECIPES_CHILD, FASTCNN_NO_PRECOMPILE="1")
    assert out["AGAIN"] == "[]", out


_SCHEDULE_CHILD = _NETWORKS + textwrap.dedent("""
    import os
    from fastcnn import compile_helper, precompile

    compile_helper._spare_cpu = lambda: True
    compiled = record_compilations()
    model, shape = list(networks())[{index}]
    step(model, shape)
    state = compile_helper._state
    print("HELPER", state["helper"] is not None)
    claims = os.listdir(state["claims"]) if state["claims"] else []
    done = sorted(n[: -len("-float32.done")] for n in claims if n.endswith(".done"))
    print("HELPER_DID", done)
    print("HERE", sorted(set(compiled) & set(precompile.RECIPES)))
    print("BOTH", sorted(set(compiled) & set(done)))
""")


@pytest.mark.slow
@pytest.mark.parametrize("index", [2, 3])
def test_each_kernel_compiles_once_in_one_of_the_two_processes(tmp_path, index):
    """Cold cache, a spare CPU: the helper starts and compiles some of the step's kernels,
    this process the others; none compiles in both (the claims), and what the helper
    compiled loads here from the cache."""
    out = _child(tmp_path, _SCHEDULE_CHILD.format(index=index))
    assert out["HELPER"] == "True", out
    assert out["HELPER_DID"] != "[]", out
    assert out["BOTH"] == "[]", out
    again = _child(tmp_path, _SCHEDULE_CHILD.format(index=index))  # warm: no helper
    assert again["HELPER"] == "False" and again["HERE"] == "[]", again


@pytest.mark.slow
def test_no_helper_with_the_switch(tmp_path):
    out = _child(tmp_path, _SCHEDULE_CHILD.format(index=4), FASTCNN_NO_PRECOMPILE="1")
    assert out["HELPER"] == "False", out
    assert "winograd.conv2d_winograd_backward_weight" in out["HERE"], out


def test_no_helper_without_a_spare_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert compile_helper._spare_cpu() is False


def test_own_running_threads_count_once(monkeypatch):
    # 2 CPUs, 2 threads running, both this process's (a Numba worker after a kernel)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(compile_helper, "_running_tasks", lambda: 2)
    monkeypatch.setattr(compile_helper, "_running_threads_here", lambda: 2)
    assert compile_helper._spare_cpu() is True
    monkeypatch.setattr(compile_helper, "_running_threads_here", lambda: 1)  # another process
    assert compile_helper._spare_cpu() is False
    assert compile_helper._running_threads_here() >= 0  # the real one reads /proc/self/task


@pytest.mark.parametrize(
    "shape, stride, padding, size, expected",
    [
        # 3x3 'same' at 32 channels: Winograd weight gradient (F(4x4) at 8x8, F(2x2) at 6x8),
        # input gradient by Winograd; priorities: minus the seconds each takes to compile
        ((32, 32, 3, 3), 1, "same", (8, 8), [("winograd4.conv2d_winograd4_backward_weight", -5)]),
        ((32, 32, 3, 3), 1, "same", (6, 8), [("winograd.conv2d_winograd_backward_weight", -5)]),
        # stride 2: the direct kernel's weight gradient, the input gradient phase by phase (16
        # channels), or col2im (24: a partial column block)
        (
            (32, 16, 3, 3),
            2,
            1,
            (8, 8),
            [
                ("conv2d.conv2d_backward_weight", -8),
                ("conv2d_phases.conv2d_backward_input_phases", -4),
            ],
        ),
        (
            (32, 24, 3, 3),
            2,
            1,
            (8, 8),
            [("conv2d.conv2d_backward_weight", -8), ("conv2d.conv2d_backward_input", -3)],
        ),
        # an image's 3 channels: a first layer, whose input gradient no step computes
        ((16, 3, 3, 3), 1, 1, (8, 8), [("conv2d.conv2d_backward_weight", -8)]),
        # one channel, 6 filters of 5x5 (LeNet-5's first)
        (
            (6, 1, 5, 5),
            1,
            0,
            (28, 28),
            [("conv2d_c1.conv2d_c1_backward_weight", -2)],
        ),
        # 16 channels to 8 filters, stride 1: the input gradient is a forward convolution
        # (requested too: in cache by then if the layer's own forward ran on it)
        (
            (8, 16, 3, 3),
            1,
            1,
            (8, 8),
            [("conv2d.conv2d_backward_weight", -8), ("conv2d.conv2d_forward", 0)],
        ),
    ],
)
def test_a_convolution_requests_the_kernels_its_backward_runs(
    shape, stride, padding, size, expected
):
    w = np.ones(shape, np.float32)
    got = compile_helper._convolution_gradients(w, stride, padding, 1, size)
    assert list(got) == expected


@pytest.mark.parametrize(
    "shape, padding, size, expected",
    [
        # 32 channels, 'valid': both gradients formed from the pooled ones (the reference
        # network's conv2)
        (
            (64, 32, 3, 3),
            0,
            (13, 13),
            ["fused.maxpool2d_conv2d_backward_weight", "fused.maxpool2d_conv2d_backward_input"],
        ),
        # a first layer of one channel: the dense weight gradient only
        ((32, 1, 3, 3), 0, (28, 28), ["fused.maxpool2d_conv2d_backward_weight_dense"]),
        # 'same': the Winograd weight gradient, the pool's gradient formed first
        (
            (32, 16, 3, 3),
            "same",
            (8, 8),
            ["winograd4.conv2d_winograd4_backward_weight", "pool2d.maxpool2d_backward"],
        ),
        # 16 channels (not whole tiles) with an input gradient: conv2d_backward's kernels on
        # the pool's gradient
        (
            (32, 16, 3, 3),
            0,
            (10, 10),
            [
                "conv2d.conv2d_backward_weight",
                "conv2d.conv2d_backward_input",
                "pool2d.maxpool2d_backward",
            ],
        ),
    ],
)
def test_a_pooled_convolution_requests_the_kernels_its_fused_backward_runs(
    shape, padding, size, expected
):
    """Conv -> ReLU -> MaxPool whose windows tile: the kernels
    functional.max_pool2d_conv2d_backward runs for these shapes (finite inputs)."""
    w = np.ones(shape, np.float32)
    got = compile_helper._convolution_gradients(w, 1, padding, 1, size, pooled=True)
    assert [name for name, _ in got] == expected
    assert all(priority == -compile_helper._SECONDS.get(n, 0) for n, priority in got)


_CONVOLUTION_CASES = [
    # (weight shape, stride, padding, input size, pooled)
    ((32, 32, 3, 3), 1, "same", (8, 8), False),
    ((32, 32, 3, 3), 1, "same", (6, 8), False),
    ((32, 16, 3, 3), 2, 1, (8, 8), False),
    ((32, 24, 3, 3), 2, 1, (8, 8), False),
    ((16, 3, 3, 3), 1, 1, (8, 8), False),
    ((6, 1, 5, 5), 1, 0, (12, 12), False),
    ((8, 16, 3, 3), 1, 1, (8, 8), False),
    ((64, 32, 3, 3), 1, 0, (9, 9), True),
    ((32, 16, 3, 3), 1, "same", (8, 8), True),
    ((32, 16, 3, 3), 1, 0, (10, 10), True),
    # the forward by Winograd, the input gradient by the direct forward kernel
    ((16, 32, 3, 3), 1, 0, (10, 10), True),
    # channels not whole tiles, an input gradient: conv2d_backward's kernels on the pool's
    # gradient (as a first layer, without one: the dense fused weight gradient)
    ((16, 8, 3, 3), 1, 0, (10, 10), True),
    # the rule's other pooled cases, which a network's plan runs on the fused forward and
    # backward (a first layer of one channel; stride 2)
    ((32, 1, 3, 3), 1, 0, (10, 10), True),
    ((16, 32, 3, 3), 2, 1, (8, 8), True),
]


def _record_kernel_calls(monkeypatch, calls):
    """Every kernel of fastcnn.kernels, called from Python, adds its name to ``calls``."""
    import importlib
    import pkgutil

    from fastcnn import kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fastcnn.kernels.{info.name}")
        for attr, kernel in vars(module).items():
            # the kernels proper (kernels/' helpers called from Python, as _weight_plan, are small)
            public = not attr.startswith("_")
            if public and hasattr(kernel, "py_func") and kernel.__module__ == module.__name__:

                def record(*args, _name=f"{info.name}.{attr}", _kernel=kernel):
                    calls.append(_name)
                    return _kernel(*args)

                monkeypatch.setattr(module, attr, record)


@pytest.mark.parametrize("shape, stride, padding, size, pooled", _CONVOLUTION_CASES)
def test_a_convolution_requests_what_its_backward_then_runs(
    monkeypatch, shape, stride, padding, size, pooled
):
    """Run a layer's forward and backward with every kernel recording its calls: the helper
    is asked for every convolution kernel the backward runs that the forward did not, and
    through a max pool for the pool's gradient where the backward forms it, and for nothing
    else."""
    from fastcnn import functional as F

    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    asked = compile_helper._convolution_gradients(w, stride, padding, 1, size, pooled)
    requested = {name for name, _ in asked}
    x = rng.standard_normal((2, shape[1], *size)).astype(np.float32)
    input_grad = shape[1] > compile_helper._IMAGE_CHANNELS

    def forward():
        y = F.conv2d_forward(x, w, None, stride, padding, relu=pooled, winograd=True)
        p, argmax = F.max_pool2d_forward(y, 2) if pooled else (None, None)
        return y, p, argmax

    def backward(y, p, argmax):
        if pooled:
            dp = np.ones(p.shape, np.float32)
            F.max_pool2d_conv2d_backward(
                x, w, dp, argmax, p, y.shape, 2, stride, padding, input_grad=input_grad
            )
        else:
            F.conv2d_backward(
                x, w, np.ones(y.shape, np.float32), stride, padding, input_grad=input_grad
            )

    # once unrecorded, which compiles what the case runs: a kernel typed while its module's
    # functions are recorders would not find them
    backward(*forward())
    forward_ran, backward_ran = [], []
    _record_kernel_calls(monkeypatch, forward_ran)
    out = forward()
    monkeypatch.undo()
    _record_kernel_calls(monkeypatch, backward_ran)
    backward(*out)
    ran = {n for n in backward_ran if not n.startswith("activations.")}
    assert ran - set(forward_ran) <= requested <= ran
    assert all(n in precompile.RECIPES for n in requested)


def test_every_compile_time_names_a_recipe():
    assert set(compile_helper._SECONDS) <= set(precompile.RECIPES)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A clean state with a claims folder and a stand-in helper that reads nothing."""
    saved = dict(compile_helper._state)
    compile_helper._reset()
    sent = []

    class Pipe:
        def write(self, data):
            sent.append(data.decode().split())

        def flush(self):
            pass

    class Helper:
        stdin = Pipe()

        def poll(self):
            return None

    compile_helper._state.update(tried=True, helper=Helper(), claims=str(tmp_path))
    monkeypatch.setattr(compile_helper, "_cached", lambda dispatcher: False)
    yield sent
    compile_helper._state.clear()
    compile_helper._state.update(saved)


def test_a_request_is_sent_once(fresh_state):
    sent = fresh_state
    compile_helper.request([("conv2d.conv2d_backward_input", 0)], "float32")
    compile_helper.request([("conv2d.conv2d_backward_input", 0)], "float32")
    compile_helper.request([("conv2d.conv2d_backward_input", 0)], "float64")
    assert sent == [
        ["0", "conv2d.conv2d_backward_input", "float32"],
        ["0", "conv2d.conv2d_backward_input", "float64"],
    ]


def test_no_helper_starts_for_the_followers_of_a_cached_kernel(monkeypatch):
    """A forward kernel loaded from the cache requests nothing: its followers may be kernels
    a step never runs, which would start a helper on every run."""
    saved = dict(compile_helper._state)
    compile_helper._reset()
    started = []
    monkeypatch.setattr(compile_helper, "_helper", lambda: started.append(1))
    monkeypatch.setattr(compile_helper, "_cached", lambda dispatcher: False)
    try:
        compile_helper.request([("dense.dense_product", 0)], "float32", start=False)
        assert started == [] and compile_helper._state["requested"] == {}
        compile_helper.request([("dense.dense_product", 0)], "float32")
        assert started == [1]
    finally:
        compile_helper._state.clear()
        compile_helper._state.update(saved)


def test_a_pool_asks_for_its_gradient_where_its_backward_runs_it(fresh_state):
    """A MaxPool2D's training forward asks once for the pool's gradient; evaluation asks
    nothing; the reference network, whose fused Conv2D -> ReLU -> MaxPool2D backward forms
    the convolutions' gradients from the pooled ones, asks for the fused kernels only."""
    from numba import types

    import fastcnn
    from fastcnn import models
    from fastcnn.kernels import pool2d

    sent = fresh_state
    # the pool's forward kernel compiling (or loading) asks for nothing itself
    compile_helper._on_compile(pool2d.maxpool2d_forward, (types.float32[:, :, :, ::1],))
    assert sent == []
    x = np.ones((2, 4, 6, 6), np.float32)
    pool = fastcnn.MaxPool2D(2)
    pool.eval()
    pool(x)
    assert sent == []
    pool.train()
    pool(x)
    pool(x)
    assert sent == [["-1", "pool2d.maxpool2d_backward", "float32"]]
    compile_helper._state["pools"].clear()
    compile_helper._state["requested"].clear()
    sent.clear()
    model = models.reference(seed=0)
    model(np.ones((2, 1, 28, 28), np.float32))
    names = {name for _, name, _ in sent}
    assert "pool2d.maxpool2d_backward" not in names
    assert "fused.maxpool2d_conv2d_backward_weight_dense" in names  # conv1's
    assert "fused.maxpool2d_conv2d_backward_weight" in names  # conv2's, through Winograd


@pytest.mark.parametrize(
    "layers",
    [
        # ConvReLUMaxPool on windows that do not tile; BatchNormReLU with a pool, alone and
        # in a ConvBatchNorm's training plan; ReLUMaxPool
        lambda f: [f.Conv2D(8, 8, 3, padding=1), f.ReLU(), f.MaxPool2D(3, stride=2)],
        lambda f: [f.BatchNorm2D(8), f.ReLU(), f.MaxPool2D(2)],
        lambda f: [f.Conv2D(8, 8, 3, padding=1), f.BatchNorm2D(8), f.ReLU(), f.MaxPool2D(2)],
        lambda f: [f.Conv2D(8, 8, 3, padding=1), f.Tanh(), f.ReLU(), f.MaxPool2D(2)],
    ],
)
def test_a_plan_step_that_runs_the_pools_gradient_asks_for_it_in_training(fresh_state, layers):
    import fastcnn

    sent = fresh_state
    model = fastcnn.Sequential(*layers(fastcnn))
    x = np.ones((2, 8, 8, 8), np.float32)
    model.eval()
    model(x)
    assert ["-1", "pool2d.maxpool2d_backward", "float32"] not in sent
    model.train()
    model(x)
    assert ["-1", "pool2d.maxpool2d_backward", "float32"] in sent


def test_the_first_to_claim_a_kernel_compiles_it(tmp_path):
    assert compile_helper._claim(str(tmp_path), "dense.dense_product", "float32")
    assert not compile_helper._claim(str(tmp_path), "dense.dense_product", "float32")
    assert compile_helper._claim(str(tmp_path), "dense.dense_product", "float64")


@pytest.fixture
def recipes_ran(monkeypatch):
    """Every recipe replaced by one that records its name, in the list this returns."""
    ran = []
    monkeypatch.setattr(
        precompile,
        "RECIPES",
        {n: (lambda dtype, n=n: ran.append(n)) for n in precompile.RECIPES},
    )
    return ran


def test_waiting_compiles_the_last_needed_request_nobody_started(fresh_state, recipes_ran):
    """While the helper compiles a kernel this process waits for, this process takes, among
    equal priorities, the request sent last (the helper would reach it last), skipping what
    the helper claimed."""
    ran = recipes_ran
    compile_helper.request(
        [
            ("dense.dense_product", 0),
            ("pool2d.maxpool2d_backward", 0),
            ("activations.add", 0),
        ],
        "float32",
    )
    claims = compile_helper._state["claims"]
    compile_helper._claim(claims, "activations.add", "float32")  # the helper's
    assert compile_helper._steal() and ran == ["pool2d.maxpool2d_backward"]
    assert compile_helper._steal() and ran[-1] == "dense.dense_product"
    assert not compile_helper._steal() and len(ran) == 2
    assert [e[0] for e in compile_helper._state["requested"].values()] == ["activations.add"]


def test_waiting_compiles_what_the_helper_would_reach_last(fresh_state, recipes_ran):
    """The helper takes the longest compilations first (the lowest priority), so this process,
    waiting, takes the shortest (the highest priority), whatever the order they came in."""
    ran = recipes_ran
    requests = [
        ("activations.add", 0),
        ("conv2d.conv2d_backward_weight", -8),
        ("pool2d.maxpool2d_backward", -1),
        ("dense.dense_product", -2),
        ("activations.relu_backward", 0),
    ]
    compile_helper.request(requests, "float32")
    while compile_helper._steal():
        pass
    # the helper's own order: serve's heap of (priority, order received)
    heap = [(priority, order, name) for order, (name, priority) in enumerate(requests)]
    heapq.heapify(heap)
    helper_order = [heapq.heappop(heap)[2] for _ in requests]
    assert ran == helper_order[::-1]
    assert ran[0] == "activations.relu_backward" and ran[-1] == "conv2d.conv2d_backward_weight"


@pytest.mark.slow
def test_the_helper_compiles_requests_and_ends_with_its_input(tmp_path):
    """The helper's loop: a request it can claim is compiled and marked done; one already
    claimed is skipped; the end of its input ends it."""
    claims = tmp_path / "claims"
    claims.mkdir()
    compile_helper._claim(str(claims), "activations.relu_backward", "float32")  # taken
    code = f"from fastcnn.compile_helper import serve; serve({os.getpid()}, {str(claims)!r})"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [env.get("PYTHONPATH", "")])
    helper = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, env=env, cwd=tmp_path
    )
    assert helper.stdin is not None
    helper.stdin.write(
        b"0 activations.add float32\n0 no.such_kernel float32\n"
        b"0 activations.relu_backward float32\n"
    )
    helper.stdin.flush()
    deadline = time.monotonic() + 120
    while not (claims / "activations.add-float32.done").exists():
        assert time.monotonic() < deadline and helper.poll() is None
        time.sleep(0.05)
    helper.stdin.close()
    assert helper.wait(timeout=60) == 0
    assert sorted(os.listdir(claims)) == [
        "activations.add-float32",
        "activations.add-float32.done",
        "activations.relu_backward-float32",
    ]


def test_only_the_process_that_started_the_helper_stops_it(tmp_path):
    """At exit the helper is killed and its folder removed, but not by a forked child that
    exits through Python: the helper and the folder are its parent's."""
    killed = []

    class Helper:
        def poll(self):
            return None

        def kill(self):
            killed.append(True)

        def wait(self):
            return -9

    compile_helper._stop(Helper(), str(tmp_path), os.getpid() + 1)
    assert killed == [] and tmp_path.exists()
    compile_helper._stop(Helper(), str(tmp_path), os.getpid())
    assert killed == [True] and not tmp_path.exists()


def test_no_helper_without_a_temporary_folder(monkeypatch):
    saved = dict(compile_helper._state)
    compile_helper._reset()
    monkeypatch.setattr(compile_helper, "_spare_cpu", lambda: True)
    monkeypatch.delenv("FASTCNN_NO_PRECOMPILE", raising=False)

    def unwritable(prefix):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(compile_helper.tempfile, "mkdtemp", unwritable)
    try:
        assert compile_helper._helper() is None
        assert compile_helper._state["tried"] and compile_helper._state["helper"] is None
    finally:
        compile_helper._state.clear()
        compile_helper._state.update(saved)


def test_a_sequential_asks_for_its_batch_norm_and_dense_kernels(fresh_state):
    """A Sequential's first training forward requests BatchNorm's training forward ahead of
    everything (priority _FIRST) when it holds a BatchNorm2D, and its gradient by its compile
    time like the rest (whoever is free first takes it), then the kernels of its Dense layers
    by their size (the serial ones up to SMALL_WEIGHTS weights), each once; one without
    either asks for nothing."""
    import fastcnn
    from fastcnn.kernels import dense

    sent = fresh_state
    plain = fastcnn.Sequential(fastcnn.Conv2D(1, 4, 3), fastcnn.ReLU(), fastcnn.Flatten())
    compile_helper.expect_layers(plain.children())
    assert sent == []
    big = dense.SMALL_WEIGHTS // 64 + 1
    model = fastcnn.Sequential(
        fastcnn.Conv2D(3, 16, 3),
        fastcnn.ReLU(),
        fastcnn.Flatten(),
        fastcnn.Dense(64, 10),
        fastcnn.BatchNorm2D(16),
        fastcnn.Dense(64, big),
        fastcnn.Dense(64, 10),
    )
    compile_helper.expect_layers(model.children())

    def seconds(name):
        return str(-compile_helper._SECONDS[name])

    assert sent == [
        [str(compile_helper._FIRST), "batchnorm.batchnorm_forward_train_nhwc", "float32"],
        [
            seconds("batchnorm.batchnorm_backward_nhwc"),
            "batchnorm.batchnorm_backward_nhwc",
            "float32",
        ],
        ["0", "dense.dense_forward_small", "float32"],
        ["0", "dense.dense_backward_small", "float32"],
        [seconds("dense.dense_forward"), "dense.dense_forward", "float32"],
        [seconds("dense.dense_product"), "dense.dense_product", "float32"],
    ]


def test_a_sequential_asks_once_and_only_in_training(monkeypatch):
    import fastcnn
    from fastcnn import containers

    calls = []
    monkeypatch.setattr(containers, "expect_layers", lambda layers: calls.append(layers))
    model = fastcnn.Sequential(fastcnn.Conv2D(3, 16, 3), fastcnn.BatchNorm2D(16), fastcnn.ReLU())
    x = np.ones((2, 3, 6, 6), np.float32)
    model.eval()
    model(x)
    assert calls == []
    model.train()
    model(x)
    model(x)
    assert len(calls) == 1 and [type(m).__name__ for m in calls[0]] == [
        "Conv2D",
        "BatchNorm2D",
        "ReLU",
    ]


@pytest.mark.slow
def test_a_helper_imports_this_fastcnn_from_another_checkouts_folder(tmp_path, monkeypatch):
    """``python -c`` puts the working directory ahead of PYTHONPATH: started in a folder that
    holds another fastcnn (a checkout), a helper imported that one and compiled its kernels,
    which this process cannot use. It imports this process's fastcnn."""
    import fastcnn

    decoy = tmp_path / "fastcnn"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the fastcnn of the working folder')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "imported.txt"
    code = f"import fastcnn\nopen({str(out)!r}, 'w').write(fastcnn.__file__)\n"
    child = compile_helper.spawn(code)
    assert child is not None
    try:
        assert child.wait(timeout=120) == 0  # the decoy raises ImportError: exit status 1
    finally:
        child.kill()
    assert out.read_text() == fastcnn.__file__
