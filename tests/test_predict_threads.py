"""predict from two Python threads at once (issue 14, item 6): the BLAS thread limit the user had is
back afterwards, and each result is bitwise the one-thread result."""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from fastcnn import models


def blas_threads():
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def predict_concurrently(model, x, calls=3, workers=2):
    """Each of `workers` threads calls model.predict(x) `calls` times, all starting together."""
    results, errors = {}, []
    start = threading.Barrier(workers)

    def work(i):
        try:
            start.wait()
            results[i] = [model.predict(x, batch_size=64) for _ in range(calls)]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=600)
    assert not errors, errors
    return [out for i in sorted(results) for out in results[i]]


@pytest.fixture
def batch():
    return np.random.default_rng(1).random((300, 1, 28, 28), dtype=np.float32)


def test_two_threads_predicting_restore_the_blas_limit_and_match_one_thread(batch):
    model = models.reference(seed=0)
    expected = model.predict(batch, batch_size=64)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and set(before) == {2}
        outputs = predict_concurrently(model, batch)
        assert blas_threads() == before  # the user's 2 threads, not the 1 predict runs with
    assert len(outputs) == 6
    for out in outputs:
        assert out.dtype == expected.dtype and np.array_equal(out, expected)


def test_two_threads_predicting_with_an_eval_mode_batchnorm_model_match_one_thread(batch):
    model = models.resnet(8, seed=0)
    model.eval()
    expected = model.predict(batch, batch_size=64)
    for out in predict_concurrently(model, batch):
        assert np.array_equal(out, expected)
    assert not model.training


def test_two_threads_predicting_with_a_training_mode_batchnorm_model(batch):
    """The interleaving that lost before predict was serialised, forced: A predicts; B enters
    predict while A is inside (B saved A's eval modes); A returns (restoring training mode)
    before B's forward runs. Serialised, A's wait for B times out and both run one after the
    other, each in eval mode, and the model is left in training mode."""
    model = models.resnet(8, seed=0)
    model.train()
    x = batch[:64]
    expected = model.predict(x, batch_size=64)
    real_forward = model.forward
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def forward(inputs):
        if threading.current_thread().name == "A":
            a_inside.set()
            b_inside.wait(timeout=2)
        else:
            b_inside.set()
            a_done.wait(timeout=10)
        return real_forward(inputs)

    model.__dict__["forward"] = forward  # an instance attribute: predict calls self.forward
    results = {}

    def run(name):
        results[name] = model.predict(x, batch_size=64)
        if name == "A":
            a_done.set()

    a = threading.Thread(target=run, args=("A",), name="A")
    b = threading.Thread(target=run, args=("B",), name="B")
    a.start()
    assert a_inside.wait(timeout=60)
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)
    del model.__dict__["forward"]
    assert np.array_equal(results["A"], expected)
    assert model.training and all(m.training for m in model.modules())
    assert np.array_equal(results["B"], expected)
