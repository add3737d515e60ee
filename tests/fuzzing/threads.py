"""Random stacks predicted from two threads at once, and run in forked children after the parent
ran the kernels: the results must be bitwise those of one thread in one process (issue 14: a
forked child of a process whose OpenMP pool had run aborted or hung; two threads in predict
could leave the model in the wrong mode)."""

import multiprocessing
import threading

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.model import Sequential
from fuzzing.common import GOOD, arrays, fuzz, tally
from fuzzing.containers import _run_chain, _twin, stacks


def _valid_model(data):
    """A random stack, its input and its one-thread prediction (None when the draw does not fit
    its input: the error paths are fuzzed in containers.py)."""
    layer_list, shape = data.draw(stacks())
    if shape[0] == 0:
        return None
    x = np.ascontiguousarray(data.draw(arrays(shape, dtypes=GOOD)), dtype=np.float64)
    model = Sequential(layer_list).train(data.draw(st.booleans()))
    if _run_chain(_twin(model).eval().layers, x)[0] != "ok":
        return None
    return model, x, model.predict(x)


@fuzz(0.1)
@given(data=st.data())
def test_predict_from_two_threads(data):
    drawn = _valid_model(data)
    if drawn is None:
        return
    model, x, expected = drawn
    modes = [m.training for m in model.modules()]
    results, start = {}, threading.Barrier(2)

    def run(name):
        start.wait()
        results[name] = model.predict(x)

    workers = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for name in "ab":
        np.testing.assert_array_equal(results[name], expected)
        assert results[name].dtype == expected.dtype
    assert [m.training for m in model.modules()] == modes
    tally("predict from two threads", "valid")


_FORKED = {}  # the model and input the forked children inherit (nothing is pickled to them)


def _predict_in_child(_):
    model, x = _FORKED["model"], _FORKED["x"]
    return model.predict(x)


@fuzz(0.01)
@given(data=st.data())
def test_forked_children(data):
    drawn = _valid_model(data)
    if drawn is None:
        return
    model, x, expected = drawn  # the kernels have run in this process: the children are forks
    _FORKED.update(model=model, x=x)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_predict_in_child, [0, 1]).get(timeout=120)
    for y in got:
        np.testing.assert_array_equal(y, expected)
    tally("forked children", "valid")
