"""Forked children can run the kernels after the parent has (issue 14 item 2): data-loading
workers, joblib and pytest-xdist fork. Numba's OpenMP thread pool is not fork-safe (a child's
first parallel kernel aborts or hangs); with ``tbb`` installed (a dependency) numba picks its
TBB pool, which is."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

_PROBE = textwrap.dedent("""
    import multiprocessing as mp
    import numba
    import numpy as np
    from fastcnn import functional as F

    def work(i):
        x = np.full((2, 1, 8, 8), i, np.float32)
        return float(F.conv2d_forward(x, np.ones((4, 1, 3, 3), np.float32)).sum())

    if __name__ == "__main__":
        parent = work(1)  # the parent's thread pool is started
        with mp.get_context("fork").Pool(2) as pool:
            children = pool.map_async(work, [1, 2, 3]).get(timeout=60)
        assert children == [parent, 2 * parent, 3 * parent], (children, parent)
        print("LAYER", numba.threading_layer())
""")


def test_forked_children_run_the_kernels(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}  # the default
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=os.getcwd(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LAYER tbb" in done.stdout
