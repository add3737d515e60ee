"""Fully connected layer kernels: y = x @ W.T + b and its gradients, on the register tile.

Shapes (checked by fastcnn.functional): x (N, IN), weight (OUT, IN) (PyTorch's layout),
bias (OUT,), y / dy (N, OUT), dx (N, IN), dweight (OUT, IN), dbias (OUT,); all C-contiguous,
one floating dtype. Outputs are overwritten.

Why kernels and not numpy's matmul: the BLAS brings its own thread pool, which on 2 cores
competes with Numba's (the two spinning pools made a training step 3-4x slower, see
fastcnn/threads.py), so it ran on one thread; these use both cores through Numba's pool, and
each output element is one sum in a fixed order (deterministic, for any thread count).

- forward: rows = samples, k = input features, columns = outputs (W.T packed per call, its
  columns padded to the tile's 32);
- input gradient: rows = samples, k = outputs, columns = input features (W's own rows);
- weight gradient: rows = outputs, k = samples, columns = input features (x's own rows).
"""
import numpy as np
from numba import njit, prange

from .gemm_tile import FT, R, gemm_tile

#: Forward: work items aimed for, and input features per cache block.
_ITEMS = 8
_K_BLOCK = 256


@njit(cache=True)
def _row_offsets(count, stride, padded):
    """uint64 offsets r * stride for r < count, repeated for the padding rows up to ``padded``."""
    out = np.empty(padded, dtype=np.uint64)
    for r in range(padded):
        out[r] = np.uint64(min(r, count - 1) * stride)
    return out


@njit(cache=True)
def _padded_columns(a, width):
    """``a`` (rows, cols) itself if cols == width, else a copy with zero columns up to width.
    (A function of its own: a branch reassigning a kernel's variable around a parallel loop
    was miscompiled by numba 0.68.1, see conv2d._padded_input.)"""
    if a.shape[1] == width:
        return a
    out = np.zeros((a.shape[0], width), dtype=a.dtype)
    out[:, :a.shape[1]] = a
    return out


@njit(parallel=True, cache=True)
def dense_forward(x, weight, bias, relu, out):
    """out = x @ weight.T + bias, then max(out, 0) if ``relu`` (a NaN stays NaN).

    Work items = (column block of 32 outputs, group of row tiles); each walks the input features
    in blocks of ``_K_BLOCK`` so that the block of W.T (32 KB) stays in L1 while all the group's
    row tiles use it (without: W.T streamed from L3 once per row tile, 1.3x slower).
    """
    N, IN = x.shape
    OUT = weight.shape[0]
    ncb = (OUT + FT - 1) // FT
    OUTp = ncb * FT
    nrt = (N + R - 1) // R
    groups = max(1, min(nrt, _ITEMS // ncb))
    per_group = (nrt + groups - 1) // groups
    dt = x.dtype
    wt = np.empty((IN, OUTp), dtype=dt)  # W.T, columns padded
    for k in prange(IN):
        for o in range(OUT):
            wt[k, o] = weight[o, k]
        for o in range(OUT, OUTp):
            wt[k, o] = 0
    rows = _row_offsets(N, IN, nrt * R)
    kidx = np.arange(IN).astype(np.uint64)
    tiles = np.empty((nrt * ncb, R * FT), dtype=dt)
    xf = x.reshape(x.size)
    wf = wt.reshape(wt.size)
    for item in prange(ncb * groups):
        cb = item // groups
        c0 = cb * FT
        rt0 = (item - cb * groups) * per_group
        rt1 = min(rt0 + per_group, nrt)
        for k0 in range(0, IN, _K_BLOCK):
            k1 = min(k0 + _K_BLOCK, IN)
            for rt in range(rt0, rt1):
                gemm_tile(xf, rows[rt * R:rt * R + R], kidx, k0, k1, wf,
                          np.uint64(k0 * OUTp + c0), np.uint64(OUTp), tiles[rt * ncb + cb], k0 > 0)
        nc = min(FT, OUT - c0)
        for rt in range(rt0, rt1):
            tile = tiles[rt * ncb + cb]
            for r in range(min(R, N - rt * R)):
                dst = out[rt * R + r, c0:c0 + nc]
                for o in range(nc):
                    v = tile[r * FT + o] + bias[c0 + o]
                    dst[o] = 0 if relu and v <= 0 else v


@njit(parallel=True, cache=True)
def dense_backward_input(dy, weight, dx):
    """dx = dy @ weight: dy (N, OUT), weight (OUT, IN), dx (N, IN)."""
    N, OUT = dy.shape
    IN = weight.shape[1]
    ncb = (IN + FT - 1) // FT
    nrt = (N + R - 1) // R
    dt = dx.dtype
    w = _padded_columns(weight, ncb * FT)  # so the last column block reads inside the array
    INp = w.shape[1]
    rows = _row_offsets(N, OUT, nrt * R)
    kidx = np.arange(OUT).astype(np.uint64)
    tiles = np.empty((nrt * ncb, R * FT), dtype=dt)
    dyf = dy.reshape(dy.size)
    wf = w.reshape(w.size)
    for item in prange(nrt * ncb):
        rt = item // ncb
        c0 = (item - rt * ncb) * FT
        tile = tiles[item]
        gemm_tile(dyf, rows[rt * R:rt * R + R], kidx, 0, OUT, wf, np.uint64(c0), np.uint64(INp),
                  tile, False)
        nc = min(FT, IN - c0)
        for r in range(min(R, N - rt * R)):
            dst = dx[rt * R + r, c0:c0 + nc]
            for i in range(nc):
                dst[i] = tile[r * FT + i]


@njit(parallel=True, cache=True)
def dense_backward_weight(x, dy, dweight, dbias):
    """dweight = dy.T @ x (OUT, IN) and dbias = dy summed over the samples (OUT,)."""
    N, IN = x.shape
    OUT = dy.shape[1]
    ncb = (IN + FT - 1) // FT
    nrt = (OUT + R - 1) // R
    dt = x.dtype
    xs = _padded_columns(x, ncb * FT)
    INp = xs.shape[1]
    rows = _row_offsets(OUT, 1, nrt * R)  # a[o + n*OUT] = dy[n, o]
    kidx = _row_offsets(N, OUT, N)
    tiles = np.empty((nrt * ncb, R * FT), dtype=dt)
    dyf = dy.reshape(dy.size)
    xf = xs.reshape(xs.size)
    for item in prange(nrt * ncb):
        rt = item // ncb
        c0 = (item - rt * ncb) * FT
        tile = tiles[item]
        gemm_tile(dyf, rows[rt * R:rt * R + R], kidx, 0, N, xf, np.uint64(c0), np.uint64(INp),
                  tile, False)
        nc = min(FT, IN - c0)
        for r in range(min(R, OUT - rt * R)):
            dst = dweight[rt * R + r, c0:c0 + nc]
            for i in range(nc):
                dst[i] = tile[r * FT + i]
    for o in prange(OUT):
        s = dbias.dtype.type(0)
        for n in range(N):
            s += dy[n, o]
        dbias[o] = s
