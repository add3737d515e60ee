"""kernels/gemm_tile.py: the register tile every convolution runs on, against the textbook sum."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastcnn.kernels.gemm_tile import FT, R, gemm_tile, tile_shape


def naive_tile(a, abase, aoff, k0, k1, b, b0, bstride, rows=R, cols=FT):
    """tile[r, f] = sum_{k0 <= k < k1} a[abase[r] + aoff[k]] * b[b0 + (k - k0)*bstride + f]."""
    tile = np.zeros((rows, cols))
    for r in range(rows):
        for f in range(cols):
            s = 0.0
            for k in range(k0, k1):
                s += float(a[abase[r] + aoff[k]]) * float(b[b0 + (k - k0) * bstride + f])
            tile[r, f] = s
    return tile


@given(
    st.integers(0, 40), st.integers(0, 5), st.integers(0, 2**32 - 1), st.booleans(), st.booleans()
)
def test_tile_matches_the_textbook_sum(k1, k0, seed, accumulate, narrow):
    """Both tile shapes (3 x 32 and the narrow RN x 16: 6 rows on AVX-512 hosts, 4 on AVX2)
    against the textbook sum; nothing past the tile's rows * cols results is written."""
    rows, cols = tile_shape(narrow)
    k0 = min(k0, k1)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(500)
    abase = rng.integers(0, 200, rows).astype(np.uint64)
    aoff = rng.integers(0, 300, k1).astype(np.uint64)
    bstride = int(rng.integers(cols, cols + 9))
    b0 = int(rng.integers(0, 20))
    b = rng.standard_normal(b0 + max(k1 - k0, 1) * bstride + cols)
    start = rng.standard_normal(rows * cols)
    expected = naive_tile(a, abase, aoff, k0, k1, b, b0, bstride, rows, cols).reshape(-1)
    if accumulate:
        expected = expected + start
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-4)):
        tile = start.astype(dtype) if accumulate else np.full(rows * cols, np.nan, dtype)
        tile = np.concatenate([tile, np.full(8, -7.0, dtype)])  # past the tile: untouched
        gemm_tile(
            a.astype(dtype),
            abase,
            0,
            aoff,
            k0,
            k1,
            b.astype(dtype),
            np.uint64(b0),
            np.uint64(bstride),
            tile,
            0,
            accumulate,
            narrow,
        )
        assert tile.dtype == dtype
        assert (tile[rows * cols :] == -7.0).all()
        tile = tile[: rows * cols]
        scale = max(1.0, np.abs(expected).max())
        assert np.abs(tile - expected).max() <= tol * scale


@given(st.integers(0, 30), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_bias_tile_matches_the_textbook_sum(k1, seed, relu, narrow):
    """gemm_tile_bias: bias + the sum, stored at rows o0 + r*ostride, then the ReLU (NaN kept,
    -0.0 and negatives to +0.0); nothing else of out is touched. Both tile shapes."""
    from fastcnn.kernels.gemm_tile import gemm_tile_bias

    R, FT = tile_shape(narrow)  # noqa: N806 (the module's names, for this test's tile)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(404)  # ashift + abase + aoff <= 4 + 99 + 299 = 402
    a[rng.integers(0, 400)] = np.nan  # reaches a row whenever a tap reads it
    abase = rng.integers(0, 100, R + 2).astype(np.uint64)
    aoff = rng.integers(0, 300, k1).astype(np.uint64)
    ashift = int(rng.integers(0, 5))
    b = rng.standard_normal(max(k1, 1) * FT + 7)
    bias = rng.standard_normal(FT + 3)
    bias[1] = -0.0
    f0 = int(rng.integers(0, 4))
    r0 = int(rng.integers(0, 3))
    ostride = int(rng.integers(FT, FT + 5))
    o0 = int(rng.integers(0, 4))
    expected = naive_tile(a[ashift:], abase[r0:], aoff, 0, k1, b, 0, FT, R, FT) + bias[f0 : f0 + FT]
    if relu:
        expected = np.where(np.isnan(expected) | (expected > 0), expected, 0.0)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-4)):
        out = np.full(o0 + R * ostride + 2, 7.0, dtype)
        gemm_tile_bias(
            a.astype(dtype),
            np.uint64(ashift),
            abase,
            r0,
            aoff,
            0,
            k1,
            b.astype(dtype),
            np.uint64(0),
            np.uint64(FT),
            bias.astype(dtype),
            f0,
            relu,
            out,
            np.uint64(o0),
            np.uint64(ostride),
            narrow,
        )
        got = np.stack([out[o0 + r * ostride : o0 + r * ostride + FT] for r in range(R)])
        assert out.dtype == dtype
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        fin = ~np.isnan(expected)
        scale = max(1.0, np.abs(expected[fin]).max(initial=0))
        assert np.abs(got[fin] - expected[fin]).max(initial=0) <= tol * scale
        if relu:
            assert not np.signbit(got[fin]).any()  # never -0.0
        mask = np.ones(out.size, bool)
        for r in range(R):
            mask[o0 + r * ostride : o0 + r * ostride + FT] = False
        assert (out[mask] == 7).all()


def naive_gather(g, pos, k0, k1, x, offs):
    """tile[r, f] = sum_{k0 <= k < k1} g[k] * x[pos[k] + offs[r] + f]."""
    tile = np.zeros((R, FT))
    for r in range(R):
        for f in range(FT):
            s = 0.0
            for k in range(k0, k1):
                s += float(g[k]) * float(x[pos[k] + offs[r] + f])
            tile[r, f] = s
    return tile


@given(st.integers(0, 40), st.integers(0, 5), st.integers(0, 2**32 - 1), st.booleans())
def test_gather_tile_matches_the_textbook_sum(k1, k0, seed, accumulate):
    from fastcnn.kernels.gemm_tile import gather_tile

    k0 = min(k0, k1)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(k1 + 1)
    pos = rng.integers(0, 200, k1 + 1).astype(np.uint64)
    r0 = int(rng.integers(0, 3))
    offs = rng.integers(0, 50, R + 3).astype(np.uint64)
    x = rng.standard_normal(200 + 50 + FT)
    t0 = int(rng.integers(0, 5))
    start = rng.standard_normal(t0 + R * FT + 3)
    expected = naive_gather(g, pos, k0, k1, x, offs[r0:]).reshape(-1)
    if accumulate:
        expected = expected + start[t0 : t0 + R * FT]
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-4)):
        tile = start.astype(dtype)
        gather_tile(g.astype(dtype), pos, k0, k1, x.astype(dtype), offs, r0, tile, t0, accumulate)
        scale = max(1.0, np.abs(expected).max(initial=0))
        assert np.abs(tile[t0 : t0 + R * FT] - expected).max(initial=0) <= tol * scale
        # outside the tile: untouched
        np.testing.assert_array_equal(tile[:t0], start[:t0].astype(dtype))
        np.testing.assert_array_equal(tile[t0 + R * FT :], start[t0 + R * FT :].astype(dtype))


@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_both_tiles_sum_bitwise_alike(k1, seed):
    """One fused multiply-add per term, in k order, in every row of both tiles: the same row
    operands give bitwise the same sums in the 3 x 32 and the RN x 16 tile (a row LLVM left
    unfused would not), so a convolution's result does not depend on which tile its filter
    count picks."""
    rng = np.random.default_rng(seed)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal(300).astype(dtype)
        b = rng.standard_normal(k1 * FT).astype(dtype)
        aoff = rng.integers(0, 300, k1).astype(np.uint64)
        rows_of = {}
        for narrow in (False, True):
            rows, cols = tile_shape(narrow)
            tile = np.empty(R * FT, dtype)
            gemm_tile(
                a,
                np.zeros(rows, np.uint64),
                0,
                aoff,
                0,
                k1,
                b,
                np.uint64(0),
                np.uint64(FT),
                tile,
                0,
                False,
                narrow,
            )
            rows_of[narrow] = tile[: rows * cols].reshape(rows, cols)[:, :16]
        first = rows_of[False][0]
        for narrow, got in rows_of.items():
            for r in range(got.shape[0]):
                np.testing.assert_array_equal(got[r], first, err_msg=f"narrow {narrow}, row {r}")


@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_tall_tile_sums_bitwise_as_the_wide_one(k1, seed, relu):
    """gemm_tile_bias_tall's 6 rows are bitwise the wide tile's sums of the same rows (two
    wide tiles of 3): a forward gives the same bits on either (AVX-512 hosts take the tall
    one for forwards of more than FTN filters)."""
    from fastcnn.kernels.gemm_tile import RT, gemm_tile_bias, gemm_tile_bias_tall

    rng = np.random.default_rng(seed)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal(300).astype(dtype)
        abase = rng.integers(0, 100, RT).astype(np.uint64)
        aoff = rng.integers(0, 200, k1).astype(np.uint64)
        b = rng.standard_normal(k1 * FT + 3).astype(dtype)
        bias = rng.standard_normal(FT).astype(dtype)
        args = (aoff, 0, k1, b, np.uint64(3), np.uint64(FT), bias, 0, relu)
        tall = np.full(RT * FT, np.nan, dtype)
        gemm_tile_bias_tall(a, np.uint64(0), abase, 0, *args, tall, np.uint64(0), np.uint64(FT))
        wide = np.full(RT * FT, np.nan, dtype)
        for r0 in range(0, RT, R):
            o0 = np.uint64(r0 * FT)
            gemm_tile_bias(a, np.uint64(0), abase, r0, *args, wide, o0, np.uint64(FT), False)
        np.testing.assert_array_equal(tall, wide)


@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_tall_gemm_tile_sums_bitwise_as_the_wide_one(k1, seed, accumulate):
    """gemm_tile_tall's 6 rows are bitwise the wide gemm_tile's sums of the same rows (two
    wide tiles of 3), started from zeros or from the tile: a weight gradient gives the same
    bits on either (AVX-512 hosts take the tall one for more than FTN filters)."""
    from fastcnn.kernels.gemm_tile import RT, gemm_tile_tall

    rng = np.random.default_rng(seed)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal(300).astype(dtype)
        abase = rng.integers(0, 100, RT).astype(np.uint64)
        aoff = rng.integers(0, 200, k1).astype(np.uint64)
        b = rng.standard_normal(k1 * FT + 5).astype(dtype)
        start = rng.standard_normal(RT * FT + 7).astype(dtype)
        args = (aoff, 0, k1, b, np.uint64(5), np.uint64(FT))
        tall = start.copy() if accumulate else np.full(RT * FT + 7, np.nan, dtype)
        gemm_tile_tall(a, abase, 0, *args, tall, 7, accumulate)
        wide = start.copy() if accumulate else np.full(RT * FT + 7, np.nan, dtype)
        for r0 in range(0, RT, R):
            gemm_tile(a, abase, r0, *args, wide, 7 + r0 * FT, accumulate, False)
        np.testing.assert_array_equal(tall[7:], wide[7:])
        np.testing.assert_array_equal(tall[:7], wide[:7])  # nothing before t0 written
