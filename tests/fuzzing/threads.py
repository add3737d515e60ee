"""Random stacks predicted from two threads at once, and run in forked children after the parent
ran the kernels: the results must be bitwise those of one thread in one process (issue 14: a
forked child of a process whose OpenMP pool had run aborted or hung; two threads in predict
could leave the model in the wrong mode)."""

import json
import os
import subprocess
import sys
import tempfile
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


_FORKING_CHILD = """
import json, multiprocessing, sys
import numpy as np
from fastcnn.model import from_config

with open(sys.argv[1]) as fh:
    config, training = json.load(fh)
saved = np.load(sys.argv[2])
model = from_config(config)
model.load_state_dict({k: saved[k] for k in saved.files if k != "__x__"})
model.train(training)
x = saved["__x__"]
first = model.predict(x)  # the kernels run in this process before it forks


def child(_):
    return model.predict(x)


with multiprocessing.get_context("fork").Pool(2) as pool:
    forked = pool.map_async(child, [0, 1]).get(timeout=120)
np.save(sys.argv[3], np.stack([first] + forked))
"""


@fuzz(0.02)
@given(data=st.data())
def test_forked_children(data):
    """In a fresh interpreter (forking this multi-threaded test process could deadlock on a lock
    another thread holds, a hazard of fork itself): the model runs, then its forked children run
    it; all equal this process's result bitwise."""
    drawn = _valid_model(data)
    if drawn is None:
        return
    model, x, expected = drawn
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, n) for n in ("config.json", "state.npz", "out.npy")]
        with open(paths[0], "w") as fh:
            json.dump([model.get_config(), model.training], fh)
        np.savez(paths[1], __x__=x, **model.state_dict())
        subprocess.run(
            [sys.executable, "-c", _FORKING_CHILD, *paths],
            check=True,
            timeout=300,
            capture_output=True,
        )
        got = np.load(paths[2])
    for y in got:
        np.testing.assert_array_equal(y, expected)
    tally("forked children", "valid")
