"""The register tile every convolution kernel runs on.

A convolution is a matrix product in disguise (im2col): out[pixel, filter] = sum over taps
(i, j, c) of x[pixel moved by the tap] * w[tap, filter]. The kernels never build the im2col
matrix. They pack their operands so that one operand's rows are *offsets* into a flat array and
the other's rows are contiguous, and hand this module one tile of the product at a time:

    tile[r, f] = sum_{k0 <= k < k1} a[abase[r] + aoff[k]] * b[b0 + (k - k0) * bstride + f]

for r < R rows and f < FT columns. Forward: rows are output pixels, k runs over taps. Weight
gradient: rows are taps, k runs over pixels. Input gradient: rows are pixels, k over filters.

Why it is fast: the R x FT accumulators live in stack memory (``stack_array``), never escape
this function and are indexed by compile-time constants, so LLVM keeps them in vector registers
for the whole k loop. Per k: R broadcasts of ``a``, FT/8 vector loads of ``b`` (AVX2), R*FT/8
fused multiply-adds. 3 x 32 float32 = 12 of AVX2's 16 registers for accumulators, leaving
room for the 4 ``b`` vectors and one broadcast (with AVX-512's 32 registers, shapes up to
8 x 32 keep theirs too: ``bench/bench_tile_shapes.py`` measures every shape on the host). A heap
tile would be reloaded and stored on every k, several times slower.

Indices are uint64 on purpose: Numba wraps negative *signed* indices (``a[i]`` with ``i < 0``
reads from the end), and that test on every load stopped LLVM from vectorising the ``b`` loads.
Unsigned indices have no such test.

The tiles are inlined into their callers (``inline="always"``, numba's IR inlining): a call
passes every array argument with an atomic reference-count increment and decrement around it,
which cost more than a 9-tap tile's work. They take offsets (r0, t0, f0), not slices, for the
same reason. An inlined tile is compiled with the *caller's* flags: every caller carries
``fastmath={"contract"}``, without which the multiply-adds are not fused (and the tile spills),
and is a serial function called from the parallel kernel: inlined straight into a prange body,
the same products ran at 0.75-0.78x.
"""

import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic


def compiles_for_avx512() -> bool:
    """Whether numba compiles for AVX-512 here: its target's features (NUMBA_CPU_FEATURES if
    set, else the host's) enable AVX-512F, so 32 vector registers of 16 float32 lanes. The
    gemm tile below fits either target; blocks sized for AVX-512 (the Dense forward's) spill
    on AVX2's 16 registers of 8 lanes."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return "+avx512f" in str(features).split(",")


#: Rows and columns of the register tile. The row loop below is written out for R == 3.
R = 3
FT = 32
_RFT = R * FT
#: Whether this host's kernels have AVX-512's 32 vector registers (NUMBA_CPU_FEATURES or the
#: host's): the tall tile, and the narrow tile's 6 rows.
TALL = compiles_for_avx512()
#: The narrow tile, for convolutions of at most FTN filters: RN rows of FTN columns (16 filters
#: padded to 32 would waste half of every multiply-add). 6 rows with AVX-512's 32 registers (the
#: wide tile's 96 accumulators); 4 with AVX2's 16: there 6 rows held 12 accumulator registers
#: and their 6 broadcasts, LLVM moved accumulators to the stack and back on every k, and the
#: products ran at 0.6x the 4-row tile's rate (Winograd's products, bench/bench_tile_shapes.py).
RN = 6 if TALL else 4
FTN = 16
_NFT = RN * FTN
assert _NFT <= _RFT


#: The tall tile, for forwards with long sums on hosts with AVX-512's 32 vector registers: RT
#: rows of FT columns, 12 accumulator registers; per k 6 broadcasts and 2 vector loads feed 12
#: fused multiply-adds, where the wide tile's 3 and 2 feed 6 (AVX2's 16 registers would spill).
RT = 6
_RTFT = RT * FT
#: Elements between two threads' rows of a scratch array (a 64-byte cache line of float32, two
#: of float64): numba starts a small array 32 bytes into a cache line, so rows of whole lines
#: still shared one with the next row, and each store there moved the line between the cores.
LINE = 16


@njit(cache=True, inline="always")
def tile_shape(narrow):
    """(rows, columns) of the tile ``narrow`` selects."""
    return (RN, FTN) if narrow else (R, FT)


@intrinsic
def stack_array(typingctx, size, dtype):
    """A pointer to ``size`` elements of ``dtype`` in the calling function's stack frame.

    ``size`` must be a compile-time constant. View it with ``numba.carray(ptr, (size,))``; the
    memory is only valid inside the function that called this (never return or store the view).
    """
    if not isinstance(size, types.IntegerLiteral):
        raise TypingError(f"stack_array: size must be a compile-time constant, got {size}")
    n = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=n)

    return types.CPointer(dtype.dtype)(size, dtype), codegen


@intrinsic
def copy16(typingctx, dst, d0, src, s0):
    """dst[d0 : d0 + 16] = src[s0 : s0 + 16] for two flat arrays of one dtype (uint64 offsets,
    in bounds: nothing is checked), as one llvm.memcpy of constant length, which LLVM writes
    as vector moves in place. A loop of 16 stores into an array from a stack buffer was left
    as 16 scalar moves when the next stores went elsewhere (Winograd's planes)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        raise TypingError("copy16: expected two arrays")
    if dst.dtype != src.dtype:
        raise TypingError(f"copy16: dtypes differ, {dst.dtype} and {src.dtype}")

    def codegen(context, builder, signature, args):
        dst_v, d0_v, src_v, s0_v = args
        dst_a = context.make_array(signature.args[0])(context, builder, dst_v)
        src_a = context.make_array(signature.args[2])(context, builder, src_v)
        dp = builder.gep(dst_a.data, [d0_v])
        sp = builder.gep(src_a.data, [s0_v])
        size = context.get_abi_sizeof(context.get_value_type(signature.args[0].dtype))
        cgutils.raw_memcpy(builder, dp, sp, context.get_constant(types.intp, 16), size)
        return context.get_dummy_value()

    return types.none(dst, d0, src, s0), codegen


@njit(cache=True, inline="always")
def _start(acc, tile, t0, accumulate):
    """acc = tile[t0:t0 + R*FT] if ``accumulate`` else zeros: a tile's accumulators at start."""
    t0 = np.uint64(t0)
    if accumulate:
        for q in range(_RFT):
            acc[q] = tile[t0 + np.uint64(q)]
    else:
        for q in range(_RFT):
            acc[q] = 0


@njit(cache=True, inline="always")
def _finish(acc, tile, t0):
    """tile[t0:t0 + R*FT] = acc: a tile's accumulators stored."""
    t0 = np.uint64(t0)
    for q in range(_RFT):
        tile[t0 + np.uint64(q)] = acc[q]


@njit(cache=True, inline="always")
def _start_narrow(acc, tile, t0, accumulate):
    """_start for the narrow tile's RN*FTN accumulators (constant trip counts, as _start's)."""
    t0 = np.uint64(t0)
    if accumulate:
        for q in range(_NFT):
            acc[q] = tile[t0 + np.uint64(q)]
    else:
        for q in range(_NFT):
            acc[q] = 0


@njit(cache=True, inline="always")
def _finish_narrow(acc, tile, t0):
    """tile[t0:t0 + RN*FTN] = acc: the narrow tile's accumulators stored."""
    t0 = np.uint64(t0)
    for q in range(_NFT):
        tile[t0 + np.uint64(q)] = acc[q]


@njit(cache=True, fastmath={"contract"}, inline="always")
def _product(acc, a, a0, a1, a2, aoff, k0, k1, b, b0, bstride):
    """acc[r*FT + f] += sum_{k0 <= k < k1} a[a_r + aoff[k]] * b[b0 + (k-k0)*bstride + f] for the
    R = 3 row offsets a0, a1, a2: the tile's inner loop, shared by gemm_tile and gemm_tile_bias
    (inlined into them, so acc stays the caller's registers)."""
    bb = b0
    for k in range(k0, k1):
        ko = aoff[k]
        x0 = a[a0 + ko]
        x1 = a[a1 + ko]
        x2 = a[a2 + ko]
        for f in range(FT):
            w = b[bb + np.uint64(f)]
            acc[f] += x0 * w
            acc[FT + f] += x1 * w
            acc[2 * FT + f] += x2 * w
        bb += bstride


@njit(cache=True, fastmath={"contract"}, inline="always")
def _product_narrow6(acc, a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride):
    """_product for the narrow tile of 6 rows: acc[r*FTN + f] += sum_k a[ashift + abase[r0 + r]
    + aoff[k]] * b[b0 + (k-k0)*bstride + f] for r < 6, f < FTN = 16 (per k: 6 broadcasts, the
    same multiply-adds as the wide tile, half its loads of b)."""
    a0 = ashift + abase[r0]
    a1 = ashift + abase[r0 + 1]
    a2 = ashift + abase[r0 + 2]
    a3 = ashift + abase[r0 + 3]
    a4 = ashift + abase[r0 + 4]
    a5 = ashift + abase[r0 + 5]
    bb = b0
    for k in range(k0, k1):
        ko = aoff[k]
        x0 = a[a0 + ko]
        x1 = a[a1 + ko]
        x2 = a[a2 + ko]
        x3 = a[a3 + ko]
        x4 = a[a4 + ko]
        x5 = a[a5 + ko]
        for f in range(FTN):
            w = b[bb + np.uint64(f)]
            acc[f] += x0 * w
            acc[FTN + f] += x1 * w
            acc[2 * FTN + f] += x2 * w
            acc[3 * FTN + f] += x3 * w
            acc[4 * FTN + f] += x4 * w
            acc[5 * FTN + f] += x5 * w
        bb += bstride


@njit(cache=True, fastmath={"contract"}, inline="always")
def _product_narrow4(acc, a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride):
    """_product_narrow6 for 4 rows (RN on AVX2 hosts)."""
    a0 = ashift + abase[r0]
    a1 = ashift + abase[r0 + 1]
    a2 = ashift + abase[r0 + 2]
    a3 = ashift + abase[r0 + 3]
    bb = b0
    for k in range(k0, k1):
        ko = aoff[k]
        x0 = a[a0 + ko]
        x1 = a[a1 + ko]
        x2 = a[a2 + ko]
        x3 = a[a3 + ko]
        for f in range(FTN):
            w = b[bb + np.uint64(f)]
            acc[f] += x0 * w
            acc[FTN + f] += x1 * w
            acc[2 * FTN + f] += x2 * w
            acc[3 * FTN + f] += x3 * w
        bb += bstride


#: The narrow tile's inner loop for this host's RN rows.
_product_narrow = _product_narrow6 if RN == 6 else _product_narrow4


@njit(cache=True, fastmath={"contract"}, inline="always")
def _product_tall(acc, a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride):
    """_product for the tall tile: acc[r*FT + f] += sum_k a[ashift + abase[r0 + r] + aoff[k]]
    * b[b0 + (k-k0)*bstride + f] for r < RT = 6, f < FT."""
    a0 = ashift + abase[r0]
    a1 = ashift + abase[r0 + 1]
    a2 = ashift + abase[r0 + 2]
    a3 = ashift + abase[r0 + 3]
    a4 = ashift + abase[r0 + 4]
    a5 = ashift + abase[r0 + 5]
    bb = b0
    for k in range(k0, k1):
        ko = aoff[k]
        x0 = a[a0 + ko]
        x1 = a[a1 + ko]
        x2 = a[a2 + ko]
        x3 = a[a3 + ko]
        x4 = a[a4 + ko]
        x5 = a[a5 + ko]
        for f in range(FT):
            w = b[bb + np.uint64(f)]
            acc[f] += x0 * w
            acc[FT + f] += x1 * w
            acc[2 * FT + f] += x2 * w
            acc[3 * FT + f] += x3 * w
            acc[4 * FT + f] += x4 * w
            acc[5 * FT + f] += x5 * w
        bb += bstride


@njit(cache=True, fastmath={"contract"}, inline="always")
def gemm_tile(a, abase, r0, aoff, k0, k1, b, b0, bstride, tile, t0, accumulate, narrow):
    """tile[t0 + r*FT + f] (+)= sum_{k0 <= k < k1} a[abase[r0 + r] + aoff[k]]
                                                  * b[b0 + (k-k0)*bstride + f]
    for r < R, f < FT; if ``narrow``, the same with RN rows and FTN columns (tile_shape).

    a, b: flat (1-d, contiguous) arrays of one floating dtype; abase (>= r0 + rows,) and aoff
    (>= k1,) uint64 offsets into a; b0, bstride uint64; tile flat, R*FT results (RN*FTN if
    ``narrow``) from t0 on, overwritten, or added to when ``accumulate``. Every index must be
    in bounds: nothing is checked here. The sum over k runs in order, one fused multiply-add
    per term: the result depends only on the inputs.

    Offsets (r0, t0), not slices: a slice made per call is a new array view, and numba
    counts its references with atomic increments and decrements around the call (more than
    the 9 taps' work at conv1).
    """
    acc = numba.carray(stack_array(_RFT, tile.dtype), (_RFT,))
    if narrow:
        _start_narrow(acc, tile, t0, accumulate)
        _product_narrow(acc, a, np.uint64(0), abase, r0, aoff, k0, k1, b, b0, bstride)
        _finish_narrow(acc, tile, t0)
    else:
        _start(acc, tile, t0, accumulate)
        _product(acc, a, abase[r0], abase[r0 + 1], abase[r0 + 2], aoff, k0, k1, b, b0, bstride)
        _finish(acc, tile, t0)


@njit(cache=True, fastmath={"contract"}, inline="always")
def gemm_tile_tall(a, abase, r0, aoff, k0, k1, b, b0, bstride, tile, t0, accumulate):
    """gemm_tile (not narrow) on the tall tile: tile[t0 + r*FT + f] (+)= the same sums for
    r < RT, f < FT (RT*FT results from t0 on), each in the same order as the wide tile's.
    (_start and _finish with the size as an argument ran this tile 0.9x in the weight
    gradient: its own loops here.)"""
    acc = numba.carray(stack_array(_RTFT, tile.dtype), (_RTFT,))
    t0 = np.uint64(t0)
    if accumulate:
        for q in range(_RTFT):
            acc[q] = tile[t0 + np.uint64(q)]
    else:
        for q in range(_RTFT):
            acc[q] = 0
    _product_tall(acc, a, np.uint64(0), abase, r0, aoff, k0, k1, b, b0, bstride)
    for q in range(_RTFT):
        tile[t0 + np.uint64(q)] = acc[q]


@njit(cache=True, fastmath={"contract"}, inline="always")
def gemm_tile_bias(
    a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride, bias, f0, relu, out, o0, ostride, narrow
):
    """out[o0 + r*ostride + f] = bias[f0 + f]
        + sum_{k0 <= k < k1} a[ashift + abase[r0 + r] + aoff[k]] * b[b0 + (k-k0)*bstride + f],
    then max(., 0) if ``relu`` (a NaN stays NaN); r < R, f < FT, or RN x FTN if ``narrow``.

    The forward's tile: ``gemm_tile`` with the accumulators started at the bias (bias
    (>= f0 + FT,) padded) and stored straight from the registers into out (flat; uint64
    ashift, o0 and ostride; every index in bounds: a partial tile goes through a scratch).
    Storing through a tile array and adding the bias there ran as scalar code (out and bias
    may alias, so LLVM did not vectorise it): 1.4x the whole tile's time at conv1's 9 taps.
    The ReLU is a select on registers here; as a pass over the stored output LLVM made it
    masked stores of zeros (vmaskmovps), which were slower.
    """
    acc = numba.carray(stack_array(_RFT, out.dtype), (_RFT,))
    f0 = np.uint64(f0)
    if narrow:
        for r in range(RN):
            for f in range(FTN):
                acc[r * FTN + f] = bias[f0 + np.uint64(f)]
        _product_narrow(acc, a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride)
    else:
        for r in range(R):
            for f in range(FT):
                acc[r * FT + f] = bias[f0 + np.uint64(f)]
        _product(
            acc,
            a,
            ashift + abase[r0],
            ashift + abase[r0 + 1],
            ashift + abase[r0 + 2],
            aoff,
            k0,
            k1,
            b,
            b0,
            bstride,
        )
    if relu and narrow:  # in place on the accumulators, before the store: written in the
        # store, as one select, LLVM gave up vectorising the tile's store (2.5x the tile's time)
        for q in range(_NFT):
            v = acc[q]
            u = v if v > 0 else 0
            acc[q] = v if v != v else u
    elif relu:
        for q in range(_RFT):
            v = acc[q]
            u = v if v > 0 else 0
            acc[q] = v if v != v else u
    if narrow:
        for r in range(RN):
            dst = o0 + np.uint64(r) * ostride
            for f in range(FTN):
                out[dst + np.uint64(f)] = acc[r * FTN + f]
    else:
        for r in range(R):
            dst = o0 + np.uint64(r) * ostride
            for f in range(FT):
                out[dst + np.uint64(f)] = acc[r * FT + f]


@njit(cache=True, fastmath={"contract"}, inline="always")
def gemm_tile_bias_tall(
    a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride, bias, f0, relu, out, o0, ostride
):
    """gemm_tile_bias (not narrow) on the tall tile: RT x FT, the same sums in the same order
    (bitwise the wide tile's outputs, row by row)."""
    acc = numba.carray(stack_array(_RTFT, out.dtype), (_RTFT,))
    f0 = np.uint64(f0)
    for r in range(RT):
        for f in range(FT):
            acc[r * FT + f] = bias[f0 + np.uint64(f)]
    _product_tall(acc, a, ashift, abase, r0, aoff, k0, k1, b, b0, bstride)
    if relu:  # gemm_tile_bias's select
        for q in range(_RTFT):
            v = acc[q]
            u = v if v > 0 else 0
            acc[q] = v if v != v else u
    for r in range(RT):
        dst = o0 + np.uint64(r) * ostride
        for f in range(FT):
            out[dst + np.uint64(f)] = acc[r * FT + f]


@njit(cache=True, fastmath={"contract"}, inline="always")
def gather_tile(g, pos, k0, k1, x, offs, r0, tile, t0, accumulate):
    """tile[t0 + r*FT + f] (+)= sum_{k0 <= k < k1} g[k] * x[pos[k] + offs[r0 + r] + f], r < R,
    f < FT.

    The same register tile as ``gemm_tile`` for a sum over a *list* of terms: weights g (>= k1)
    and uint64 row offsets pos (>= k1) into the flat x, uint64 column offsets offs (>= r0 + R).
    The gradients below a max pool use it: 3/4 of the dense product's terms are zeros there,
    and this sums only the others, in list order, one fused multiply-add each.
    """
    acc = numba.carray(stack_array(_RFT, tile.dtype), (_RFT,))
    _start(acc, tile, t0, accumulate)
    o0 = offs[r0]
    o1 = offs[r0 + 1]
    o2 = offs[r0 + 2]
    for k in range(k0, k1):
        gv = g[k]
        p = pos[k]
        for f in range(FT):
            uf = np.uint64(f)
            acc[f] += gv * x[p + o0 + uf]
            acc[FT + f] += gv * x[p + o1 + uf]
            acc[2 * FT + f] += gv * x[p + o2 + uf]
    _finish(acc, tile, t0)
