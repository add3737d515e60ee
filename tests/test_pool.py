"""fastcnn._pool: the buffers the functions' results come from are reused only when no array
refers to them, keep the layout asked for, and spare a training step malloc's page faults."""

import resource
import subprocess
import sys
import threading
from itertools import permutations

import numpy as np
import pytest

import fastcnn
from fastcnn import _pool

BIG = (64, 16, 16, 32)  # 2 MB of float32: pooled


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setattr(_pool, "_ENABLED", True)


def test_a_released_buffer_is_reused_and_a_kept_one_is_not():
    a = _pool.empty(BIG, np.float32)
    assert a.shape == BIG and a.dtype == np.float32 and a.flags.c_contiguous
    where = _address(a)
    b = _pool.empty(BIG, np.float32)
    assert _address(b) != where  # a is alive
    a[...] = 7
    c = _pool.empty(BIG, np.float32)
    c[...] = -1
    assert (a == 7).all()  # never handed out again while kept
    view = a[1:, ::2]
    del a
    d = _pool.empty(BIG, np.float32)
    assert _address(d) != where  # a view still refers to the buffer
    del view, d
    e = _pool.empty(BIG, np.float32)
    f = _pool.empty(BIG, np.float32)
    assert where in (_address(e), _address(f))  # free again: reused
    del b, c, e, f


def test_pooled_arrays_start_on_a_cache_line_and_views_keep_them_in_use():
    kept = [_pool.empty(shape, np.float32) for shape in (BIG, (3, 5, 7, 331), (64, 28, 28, 16))]
    kept += [_pool.empty_like(np.empty((4, 8, 8, 100), np.float64))]
    assert all(_address(a) % _pool.ALIGN == 0 for a in kept)
    # only a view survives: its buffer must not be handed out again
    view = kept[0][1:]
    where = _address(kept[0])
    del kept
    again = _pool.empty(BIG, np.float32)
    assert _address(again) != where and _address(again) % _pool.ALIGN == 0
    del view, again


def test_small_arrays_and_object_dtypes_come_from_numpy():
    small = _pool.empty((3, 4), np.float32)
    assert small.flags.owndata and small.shape == (3, 4)
    objects = _pool.empty(BIG, object)
    assert objects.flags.owndata and objects.dtype == object


def test_empty_like_keeps_the_memory_order():
    nhwc = np.zeros((8, 12, 12, 64), np.float32)
    x = nhwc.transpose(0, 3, 1, 2)  # an (N, C, H, W) activation, channels-last in memory
    y = _pool.empty_like(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    z = _pool.empty_like(np.zeros((64, 100, 40), np.float64), np.float32)
    assert z.dtype == np.float32 and z.flags.c_contiguous


def test_a_pooled_array_refers_to_its_raw_buffer():
    """What tells a buffer is in use: the array's base is the pool's raw buffer itself."""
    a = _pool.empty(BIG, np.float32)
    raws = [e[0] for entries in _pool._BUFFERS.values() for e in entries]
    assert any(a.base is raw for raw in raws)


@pytest.mark.parametrize(
    "make",
    [
        lambda z: z((8, 12, 12, 64)).transpose(0, 3, 1, 2),  # channels-last
        lambda z: z((8, 1, 12, 64)).transpose(0, 3, 1, 2),  # channels-last, H = 1
        lambda z: z((1, 12, 12, 64)).transpose(0, 3, 1, 2),  # channels-last, N = 1
        lambda z: z((8, 12, 1, 64)).transpose(0, 3, 1, 2),  # channels-last, W = 1
        lambda z: z((8, 64, 12, 12)).transpose(0, 1, 3, 2),  # another axis order
        lambda z: z((8, 12, 12, 64)).transpose(0, 3, 1, 2)[:, :, ::-1],  # a reversed axis
        lambda z: z((8, 12, 12, 64)).transpose(0, 3, 1, 2)[:, :32],  # not one block
    ],
)
def test_empty_like_and_flat_views_pair_element_by_element(make):
    """For every layout: empty_like gives numpy's order "K", and where x's memory is one block
    the flat views of x and of its empty_like pair the same elements (the elementwise kernels'
    contract); other layouts give no flat view."""
    from fastcnn.functional import _flat

    rng = np.random.default_rng(0)
    x = make(lambda shape: rng.standard_normal(shape).astype(np.float32))
    y = _pool.empty_like(x)
    assert y.shape == x.shape and y.strides == np.empty_like(x, order="K").strides
    fx, fy = _flat(x), _flat(y)
    if fx is None:  # only where no axis order makes x's memory one block
        assert not any(x.transpose(p).flags.c_contiguous for p in permutations(range(4)))
        return
    y[...] = np.nan
    fy[...] = fx
    assert np.array_equal(y, x)


def test_buffers_of_shapes_no_longer_used_are_dropped():
    _pool.clear()
    a = _pool.empty((1 << 20,), np.float32)  # 4 MB
    del a
    held = _pool.pooled_bytes()
    assert held >= 4 << 20
    for _ in range(_pool._IDLE + 300):  # idle buffers are looked for every 256 allocations
        _pool.empty((1 << 15,), np.float32)  # another size, allocated and released
    assert _pool.pooled_bytes() < held


def test_threads_never_share_a_live_buffer():
    live, lock, errors = [], threading.Lock(), []

    def work():
        mine = []
        for i in range(200):
            a = _pool.empty(BIG, np.float32)
            a[...] = i
            mine.append((a, i))
            if len(mine) > 3:
                b, j = mine.pop(0)
                if not (b == j).all():
                    errors.append("a live array was overwritten")
        with lock:
            live.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    addresses = [_address(a) for a, _ in live]
    assert len(set(addresses)) == len(addresses)


def test_fastcnn_pool_0_turns_it_off():
    code = (
        "import numpy as np; from fastcnn import _pool; "
        f"a = _pool.empty({BIG}, np.float32); assert a.flags.owndata; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "FASTCNN_POOL": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "ok"


def test_a_steady_training_step_takes_almost_no_page_faults(rng):
    """The all-conv net at batch 64: without the pool glibc's malloc returns freed activations
    to the system and each step faults them back in by the thousand (docs/kernels.md)."""
    model = fastcnn.models.allconv(3, 10, 0)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = np.arange(64) % 10
    loss_fn = fastcnn.CrossEntropyLoss()
    opt = fastcnn.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 200, f"{faults:.0f} page faults per step"


def test_a_fork_while_another_thread_allocates_leaves_the_child_a_usable_pool():
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    with _pool._LOCK:  # as if another thread were inside _take when the process forks
        pid = os.fork()
        if pid == 0:  # the child: its pool must not be locked
            try:
                _pool.empty(BIG, np.float32)
            finally:
                os._exit(0)
    import signal
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child's first allocation waited on a lock held at the fork")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
