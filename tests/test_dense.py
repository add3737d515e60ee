"""kernels/dense.py against the textbook loops (tests/naive/dense.py): the forward (with and
without ReLU), the input and the weight gradient, both dtypes, shapes that leave every edge of
the blocks partial (rows, filters, the 16 lanes of the forward, the 32 columns of the
gradients' tiles), bitwise the same for any number of threads; the serial kernels of small
layers likewise, bitwise the parallel ones, and which layers take them; the Dense layer's
gradients by finite differences on both."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastcnn
from fastcnn import functional as F
from fastcnn.kernels import dense as kernels_dense
from fastcnn.kernels.gemm_tile import compiles_for_avx512
from gradcheck import assert_gradient, relative_error
from naive import dense as naive_dense

# (N, K, F): whole blocks; every edge partial; K < 16 (no full lane block); one of each;
# VGG's power-of-two row stride (2048: the panels' reason)
SHAPES = [(8, 64, 32), (13, 37, 7), (5, 9, 70), (1, 1, 1), (6, 2048, 5), (3, 100, 33)]


def _gradients(dy, x, w, parts, db=True):
    """dx, dw (and db) through kernels.dense.dense_product, ``parts`` given (functional
    passes Numba's thread count)."""
    (n, f), k = dy.shape, x.shape[1]
    dx, dw = np.empty_like(x), np.empty_like(w)
    u = np.uint64
    rows, terms = F._dense_offsets(n, f), F._dense_offsets(f, 1, pad=False)
    kernels_dense.dense_product(dy.reshape(-1), rows, terms, f, w.reshape(-1), u(k), parts, dx)
    rows, terms = F._dense_offsets(f, 1), F._dense_offsets(n, f, pad=False)
    kernels_dense.dense_product(dy.reshape(-1), rows, terms, n, x.reshape(-1), u(k), parts, dw)
    return dx, dw


def _naive(x, w, b, dy):
    f64 = [a.astype(np.float64) for a in (x, w, b, dy)]
    y = naive_dense.dense_forward(*f64[:3])
    return (y, *naive_dense.dense_backward(f64[0], f64[1], f64[3]))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_the_textbook_loops(rng, dtype, tol, shape):
    n, k, f = shape
    x = rng.standard_normal((n, k)).astype(dtype)
    w = rng.standard_normal((f, k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    dy = rng.standard_normal((n, f)).astype(dtype)
    y_ref, dx_ref, dw_ref, db_ref = _naive(x, w, b, dy)

    y = np.empty((n, f), dtype)
    kernels_dense.dense_forward(x, w, b, False, 2, y)
    relu = np.empty((n, f), dtype)
    kernels_dense.dense_forward(x, w, b, True, 2, relu)
    dx, dw = _gradients(dy, x, w, 2)
    db = F.dense_backward(x, w, dy)[2]

    assert relative_error(y, y_ref) <= tol
    assert np.array_equal(relu, np.maximum(y, 0))  # the same sums, then the ReLU
    assert relative_error(dx, dx_ref) <= tol
    assert relative_error(dw, dw_ref) <= tol
    assert relative_error(db, db_ref) <= tol


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_any_number_of_threads_gives_the_same_bits(rng, shape):
    n, k, f = shape
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((f, k)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    dy = rng.standard_normal((n, f)).astype(np.float32)
    runs = []
    for parts in (1, 2, 3, 7):
        y = np.empty((n, f), np.float32)
        kernels_dense.dense_forward(x, w, b, True, parts, y)
        runs.append((y, *_gradients(dy, x, w, parts)))
    for run in runs[1:]:
        for a, b_ in zip(runs[0], run, strict=True):
            assert np.array_equal(a, b_)


@pytest.mark.parametrize("f", [6, 120])  # the serial kernels, the parallel ones
def test_functional_through_the_threads_and_empty_shapes(rng, f):
    x = rng.standard_normal((9, 40)).astype(np.float32)
    w = rng.standard_normal((f, 40)).astype(np.float32)
    dy = rng.standard_normal((9, f)).astype(np.float32)
    with fastcnn.threads.compute_threads(1):
        one = (F.dense_forward(x, w, None, relu=True), *F.dense_backward(x, w, dy))
    with fastcnn.threads.compute_threads(2):
        two = (F.dense_forward(x, w, None, relu=True), *F.dense_backward(x, w, dy))
    for a, b in zip(one, two, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    # no samples, no inputs, no outputs: what the matrix products give
    for n, k, f in [(0, 4, 3), (2, 0, 3), (2, 4, 0)]:
        x, w = np.ones((n, k), np.float32), np.ones((f, k), np.float32)
        b = np.full(f, 0.5, np.float32)
        assert np.array_equal(F.dense_forward(x, w, b), x @ w.T + b)
        dx, dw, db = F.dense_backward(x, w, np.ones((n, f), np.float32))
        assert np.array_equal(dx, np.ones((n, f)) @ w) and np.array_equal(dw, np.ones((n, f)).T @ x)
        assert np.array_equal(db, np.full(f, n))


# (N, K, F) of the serial kernels (at most SMALL_WEIGHTS weights): a classifier's last layer,
# edges of one, and the largest size they take
SMALL_SHAPES = [(64, 64, 10), (13, 37, 7), (1, 1, 1), (3, 1, 9), (5, 1024, 1), (2, 32, 32)]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_small_kernels_match_the_textbook_loops(rng, dtype, tol, shape):
    n, k, f = shape
    assert f * k <= kernels_dense.SMALL_WEIGHTS
    x = rng.standard_normal((n, k)).astype(dtype)
    w = rng.standard_normal((f, k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    dy = rng.standard_normal((n, f)).astype(dtype)
    y_ref, dx_ref, dw_ref, _ = _naive(x, w, b, dy)
    y, relu = np.full((n, f), np.nan, dtype), np.full((n, f), np.nan, dtype)
    kernels_dense.dense_forward_small(x, w, b, False, y)
    kernels_dense.dense_forward_small(x, w, b, True, relu)
    dx, dw = np.full((n, k), np.nan, dtype), np.full((f, k), np.nan, dtype)
    kernels_dense.dense_backward_small(x, w, dy, dw, True, dx)
    assert relative_error(y, y_ref) <= tol
    assert np.array_equal(relu, np.maximum(y, 0))  # the same sums, then the ReLU
    assert relative_error(dx, dx_ref) <= tol
    assert relative_error(dw, dw_ref) <= tol
    parallel = np.empty((n, f), dtype)
    kernels_dense.dense_forward(x, w, b, True, 2, parallel)
    assert np.array_equal(relu, parallel)  # the parallel kernels' sums, in their order
    for got, ref in zip((dx, dw), _gradients(dy, x, w, 2), strict=True):
        assert np.array_equal(got, ref)
    untouched = np.full((n, k), np.nan, dtype)
    kernels_dense.dense_backward_small(x, w, dy, dw, False, untouched)
    assert np.isnan(untouched).all()  # no input gradient asked: dx not written


def test_small_relu_keeps_nan(rng):
    x = np.array([[np.nan, 1.0], [-1.0, -2.0]], np.float32)
    w, b, y = np.ones((1, 2), np.float32), np.zeros(1, np.float32), np.empty((2, 1), np.float32)
    kernels_dense.dense_forward_small(x, w, b, True, y)
    assert np.isnan(y[0, 0]) and y[1, 0] == 0


def test_the_layers_pick_the_kernels_by_the_weights_count(rng, monkeypatch):
    """Up to SMALL_WEIGHTS weights the serial kernels, above them the parallel ones."""
    called = []
    for name in ("dense_forward", "dense_product", "dense_forward_small", "dense_backward_small"):
        kernel = getattr(kernels_dense, name)
        monkeypatch.setattr(
            kernels_dense, name, lambda *a, _k=kernel, _n=name: called.append(_n) or _k(*a)
        )
    limit = kernels_dense.SMALL_WEIGHTS
    for f, k in ((limit // 64, 64), (limit // 64 + 1, 64)):
        x = rng.standard_normal((3, k)).astype(np.float32)
        w = rng.standard_normal((f, k)).astype(np.float32)
        F.dense_forward(x, w)
        F.dense_backward(x, w, rng.standard_normal((3, f)).astype(np.float32))
    assert called == ["dense_forward_small", "dense_backward_small"] + [
        "dense_forward",
        "dense_product",
        "dense_product",
    ]


@pytest.mark.parametrize("features", [(21, 7), (80, 60)])  # the serial kernels, the parallel
def test_dense_layer_gradients_by_finite_differences(rng, features):
    layer = fastcnn.Dense(*features, dtype=np.float64, rng=rng)
    x = rng.standard_normal((5, features[0]))
    dy = rng.standard_normal((5, features[1]))
    layer.forward(x)
    dx = layer.backward(dy)
    assert_gradient(layer.forward, x.copy(), dy, dx)
    w = layer.weight.data
    wgrad = layer.weight.grad.copy()

    def with_weight(v):
        saved = w.copy()
        w[...] = v
        out = layer.forward(x)
        w[...] = saved
        return out

    assert_gradient(with_weight, w.copy(), dy, wgrad)


_FORWARD_BITS = """
import hashlib, sys
import numpy as np
from fastcnn.kernels import dense
print(dense.RB, dense.FB)
for n, k, f in SHAPES:
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(n * 1000 + k + f)
        x = rng.standard_normal((n, k)).astype(dtype)
        w = rng.standard_normal((f, k)).astype(dtype)
        b = rng.standard_normal(f).astype(dtype)
        y = np.empty((n, f), dtype)
        dense.dense_forward(x, w, b, False, 2, y)
        print(hashlib.sha256(y.tobytes()).hexdigest())
"""


def _forward_bits(env=None):
    """The forward's block shape and a hash of its results on SHAPES, both dtypes, computed in
    a fresh process (``env``: numba's target there)."""
    code = f"SHAPES = {SHAPES!r}\n{_FORWARD_BITS}"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    return tuple(int(v) for v in out[:2]), out[2:]


def _host_flags():
    with open("/proc/cpuinfo") as fh:
        return next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])


def test_the_block_follows_the_target_and_keeps_the_bits():
    """4 x 4 blocks compiled for AVX-512, 2 x 3 for AVX2 (a block for one spills on the other),
    and bitwise the same results: a block decides which outputs are computed together, never
    the order of a sum. On an AVX-512 host the two shapes are compared; on an AVX2 host both
    processes run 2 x 3."""
    if not os.path.exists("/proc/cpuinfo") or "avx2" not in _host_flags():
        pytest.skip("compiles for AVX2 (haswell): needs a host that runs it")
    assert (kernels_dense.RB, kernels_dense.FB) == ((4, 4) if compiles_for_avx512() else (2, 3))
    here, bits_here = _forward_bits()
    avx2, bits_avx2 = _forward_bits({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "-avx512f"})
    assert here == (kernels_dense.RB, kernels_dense.FB)
    assert avx2 == (2, 3)
    assert len(bits_here) == 2 * len(SHAPES)
    assert bits_avx2 == bits_here
