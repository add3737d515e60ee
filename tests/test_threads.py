"""fastcnn.threads.one_blas_thread: the BLAS behind numpy on one thread while fastcnn's own
matrix products run, whoever drives the loop, and the user's setting always restored, also
when several Python threads enter and leave in any order."""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastcnn
from fastcnn import threads


def blas_threads():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """The BLAS at 2 threads during the test (a machine may have fewer cores: set, not read)."""
    with threadpool_limits(limits=2, user_api="blas"):
        yield


def test_one_blas_thread_sets_and_restores(two_blas_threads):
    assert blas_threads() and set(blas_threads()) == {2}
    with threads.one_blas_thread():
        assert set(blas_threads()) == {1}
        with threads.one_blas_thread():  # nested
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}


def test_a_training_step_runs_no_blas_product(two_blas_threads, monkeypatch):
    """The README's own training loop (no fit, no compute_threads): the Dense layers' products
    run on Numba's threads (kernels/dense.py), so no BLAS pool wakes up to fight them, and the
    user's 2 BLAS threads are left as they were."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    real = np.matmul
    monkeypatch.setattr(np, "matmul", spy)
    model = fastcnn.models.reference()
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    y = model(x)
    model.backward(np.ones_like(y))
    assert calls == []
    assert set(blas_threads()) == {2}


def test_entries_from_several_python_threads_restore_the_users_count(monkeypatch):
    """A enters, B enters, A leaves, B leaves: the count is 1 until the last one leaves, then
    the user's (a save/restore per entry would leave 1 behind). Checked on a stand-in library:
    OpenBLAS itself ignores some changes made from threads other than the main one."""

    class FakeBlas:
        count, calls = 3, []

        def get_num_threads(self):
            return self.count

        def set_num_threads(self, n):
            self.calls.append(n)
            self.count = n

    fake = FakeBlas()
    pin = threads._OneBlasThread()
    monkeypatch.setattr(pin, "_blas_libs", lambda: [fake])
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside = {}

    def a():
        with pin:
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with pin:
            b_in.set()
            a_out.wait(10)
            inside["after A left"] = fake.count

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert inside["after A left"] == 1
    assert fake.count == 3 and fake.calls == [1, 3]


def test_predict_from_two_threads_restores_the_blas(two_blas_threads):
    model = fastcnn.models.reference()
    x = np.random.default_rng(1).random((300, 1, 28, 28), dtype=np.float32)
    expected = model.predict(x, batch_size=64)
    results = [None, None]

    def run(i):
        results[i] = model.predict(x, batch_size=64)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert set(blas_threads()) == {2}
    for r in results:
        np.testing.assert_array_equal(r, expected)
