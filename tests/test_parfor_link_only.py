"""kernels/_parfor_link_only.py: numba's wrappers around a parallel loop are linked, never
compiled to machine code; what numba runs and caches is unchanged. Each check runs in a child
interpreter with an empty cache, so it sees the compile, not a cached kernel."""
import os
import subprocess
import sys
import textwrap

import numba
import pytest

import fastcnn
import fastcnn.kernels  # noqa: F401  (installs the patch)
from fastcnn.kernels import _parfor_link_only

pytestmark = pytest.mark.slow

_TESTED = _parfor_link_only._version(numba) in _parfor_link_only._TESTED

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import numba
    from numba import njit, prange, guvectorize
    from numba.core import codegen
    import fastcnn.kernels
    from fastcnn.kernels import _parfor_link_only

    libraries = []
    init = codegen.CPUCodeLibrary.__init__
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        libraries.append(self)
    codegen.CPUCodeLibrary.__init__ = record

    @njit(parallel=True, cache=True)
    def scaled_sums(x, a):
        out = np.empty(x.shape[0], dtype=x.dtype)
        for i in prange(x.shape[0]):
            s = x.dtype.type(0)
            for j in range(x.shape[1]):
                s += a * x[i, j]
            out[i] = s
        return out

    @guvectorize(["void(float64[:], float64[:])"], "(n)->()", target="parallel")
    def row_sum(x, out):  # a parallel ufunc: its wrapper is run, so it must be compiled
        s = 0.0
        for v in x:
            s += v
        out[0] = s

    x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    got = scaled_sums(x, np.float32(2))
    assert got.dtype == np.float32 and np.array_equal(got, 2 * x.sum(axis=1)), got
    assert np.array_equal(row_sum(x.astype(np.float64)), x.sum(axis=1))
    link_only = [lib.name for lib in libraries if getattr(lib, "_fastcnn_link_only", False)]
    print("INSTALLED", _parfor_link_only.installed)
    print("LINK_ONLY", sorted(n.split(" ")[0].rsplit(".", 1)[-1] for n in link_only))
    print("CACHE_HITS", sum(scaled_sums.stats.cache_hits.values()))
""")


def _child(tmp_path, **env):
    script = tmp_path / "child.py"  # a file: numba caches only functions that have one
    script.write_text(_CHILD)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), **env)
    # the child imports the fastcnn under test (the script's folder comes first on its path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastcnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@pytest.mark.skipif(not _TESTED, reason=f"the patch applies to numba {_parfor_link_only._TESTED}")
def test_installed_on_a_tested_numba():
    assert _parfor_link_only.installed


@pytest.mark.skipif(not _TESTED, reason=f"the patch applies to numba {_parfor_link_only._TESTED}")
def test_parallel_loop_wrappers_link_only_and_results_cached(tmp_path):
    first = _child(tmp_path)
    assert first["INSTALLED"] == "True"
    # the two wrappers of the one prange loop; not the gufunc, not the guvectorize wrappers
    assert first["LINK_ONLY"] == "['_GufuncWrapper', 'parallelgufuncwrapper']", first["LINK_ONLY"]
    assert first["CACHE_HITS"] == "0"
    again = _child(tmp_path)  # the kernel compiled under the patch, loaded from the cache
    assert again["CACHE_HITS"] == "1" and again["LINK_ONLY"] == "[]", again


def test_can_be_turned_off(tmp_path):
    off = _child(tmp_path, FASTCNN_NUMBA_LINK_ONLY="0")
    assert off["INSTALLED"] == "False" and off["LINK_ONLY"] == "[]", off
