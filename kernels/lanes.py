"""Operations on 16 consecutive elements of flat arrays, written as LLVM vector code.

An output tile of the Winograd kernels sits in a stack buffer as 16-filter rows; its
epilogue (an evaluation-mode BatchNorm, a residual sum, a ReLU) runs on those rows before
they are stored. Written as Python loops over the 16 lanes, LLVM unrolled the lane loop and
vectorised the loop over the rows instead, with gathers and scatters (slower than a second
pass over the stored rows); these intrinsics are one vector instruction per step, whatever
loops surround them. The direct kernels' pass over their stored rows (conv2d._batch_norm_rows)
takes batch_norm16, all three steps in one: its loops over 16 channels had stayed scalar.
F(4x4, 3x3)'s transforms (winograd4.py) are intrinsics of the same kind (below).
Offsets are uint64 and in bounds: nothing is checked.
"""

from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .batchnorm import BN_FASTMATH

_LANES = 16
#: batchnorm.chunk_affine_inplace's flags on the affine's three operations, so that the
#: multiply-add is fused (or not) exactly as there: bitwise its result
_AFFINE_FLAGS = tuple(sorted(BN_FASTMATH))


def _check_arrays(name, dtype, *arrays):
    for a in arrays:
        if not isinstance(a, types.Array):
            raise TypingError(f"{name}: expected arrays, got {a}")
        if a.dtype != dtype:
            raise TypingError(f"{name}: dtypes differ, {dtype} and {a.dtype}")


def _vector_ptr(context, builder, arrty, arr, offset):
    """Pointer to the 16 elements of ``arr`` from ``offset``, as one vector (alignment: the
    element's)."""
    data = context.make_array(arrty)(context, builder, arr).data
    vty = ir.VectorType(context.get_value_type(arrty.dtype), _LANES)
    return builder.bitcast(builder.gep(data, [offset]), vty.as_pointer()), vty


def _load(context, builder, arrty, arr, offset):
    ptr, vty = _vector_ptr(context, builder, arrty, arr, offset)
    align = context.get_abi_sizeof(vty.element)
    return builder.load(ptr, align=align), ptr, align


@intrinsic
def add16(typingctx, y, p, a, o):
    """y[p + l] = y[p + l] + a[o + l] for l < 16, as numpy adds (a bias, a residual sum)."""
    _check_arrays("add16", getattr(y, "dtype", None), y, a)

    def codegen(context, builder, sig, args):
        yv, pv, av, ov = args
        x, yptr, align = _load(context, builder, sig.args[0], yv, pv)
        v = builder.fadd(x, _load(context, builder, sig.args[2], av, ov)[0])
        builder.store(v, yptr, align=align)
        return context.get_dummy_value()

    return types.none(y, p, a, o), codegen


@intrinsic
def relu16(typingctx, y, p):
    """y[p + l] = 0 where y[p + l] <= 0, else y[p + l], for l < 16 (a NaN stays NaN)."""
    _check_arrays("relu16", getattr(y, "dtype", None), y)

    def codegen(context, builder, sig, args):
        yv, pv = args
        x, yptr, align = _load(context, builder, sig.args[0], yv, pv)
        zero = ir.Constant(x.type, None)
        builder.store(
            builder.select(builder.fcmp_ordered("<=", x, zero), zero, x), yptr, align=align
        )
        return context.get_dummy_value()

    return types.none(y, p), codegen


@intrinsic
def batch_norm16(typingctx, y, p, mean, scale, shift, f, add, a, relu):
    """y[p + l] = (y[p + l] - mean[f + l]) * scale[f + l] + shift[f + l] for l < 16 (an
    evaluation-mode BatchNorm on one pixel's 16 channels, with batchnorm.chunk_affine_inplace's
    arithmetic and fastmath flags: bitwise its result), then + add[a + l] where ``add`` is not
    empty (a residual block's sum, as numpy adds), then relu16's select if ``relu`` (a
    boolean): one load and one store of y[p : p + 16] (steps in a row on one address wait for
    each other's stores)."""
    _check_arrays("batch_norm16", getattr(y, "dtype", None), y, mean, scale, shift, add)

    def codegen(context, builder, sig, args):
        yv, pv, mv, sv, bv, fv, av, aov, rv = args
        yt, _, mt, st, bt, _, at, _, rt = sig.args
        x, yptr, align = _load(context, builder, yt, yv, pv)
        m = _load(context, builder, mt, mv, fv)[0]
        s = _load(context, builder, st, sv, fv)[0]
        b = _load(context, builder, bt, bv, fv)[0]
        d = builder.fsub(x, m, flags=_AFFINE_FLAGS)
        v = builder.fadd(builder.fmul(d, s, flags=_AFFINE_FLAGS), b, flags=_AFFINE_FLAGS)
        nitems = context.make_array(at)(context, builder, av).nitems
        summed = builder.icmp_signed(">", nitems, ir.Constant(nitems.type, 0))
        before = builder.basic_block
        with builder.if_then(summed):
            with_add = builder.fadd(v, _load(context, builder, at, av, aov)[0])
            after_add = builder.basic_block
        v2 = builder.phi(v.type)
        v2.add_incoming(v, before)
        v2.add_incoming(with_add, after_add)
        zero = ir.Constant(v.type, None)
        clipped = builder.select(builder.fcmp_ordered("<=", v2, zero), zero, v2)
        relu_bit = context.cast(builder, rv, rt, types.boolean)
        builder.store(builder.select(relu_bit, clipped, v2), yptr, align=align)
        return context.get_dummy_value()

    return types.none(y, p, mean, scale, shift, f, add, a, relu), codegen


# ---- the Winograd transforms, 16 channels (or filters) at a time ----
#
# Each transform combines n vectors of 16 lanes into m: one row or column of B^T d B, A^T M A
# or A dY A^T. Written as loops over the lanes they ran as vector code only between stack
# buffers, so every patch was copied into the stack and every result out of it; as one
# intrinsic each, they read the input and write the transformed planes directly.
_CONTRACT = ("contract",)


class _Lanes:
    """A 16-lane vector while a transform is generated: ``+``, ``-`` and ``number *`` emit
    LLVM vector instructions. They carry the 'contract' flag: the coefficients are powers of
    two, so a multiply fused into an add rounds as the two apart would (no result moves)."""

    __slots__ = ("builder", "value")

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def __add__(self, other):
        return _Lanes(self.builder, self.builder.fadd(self.value, other.value, flags=_CONTRACT))

    def __sub__(self, other):
        return _Lanes(self.builder, self.builder.fsub(self.value, other.value, flags=_CONTRACT))

    def __rmul__(self, number):
        vty = self.value.type
        k = ir.Constant(vty, [ir.Constant(vty.element, float(number))] * _LANES)
        return _Lanes(self.builder, self.builder.fmul(k, self.value, flags=_CONTRACT))


def _check_offsets(name, *offsets):
    """The transforms add their offsets as 64-bit integers (uint64 in the kernels)."""
    for o in offsets:
        if not (isinstance(o, types.Integer) and o.bitwidth == 64):
            raise TypingError(f"{name}: expected 64-bit integer offsets, got {o}")


def _store_all(context, builder, arrty, arr, base, stride, vectors):
    """arr[base + i * stride : + 16] = vectors[i]."""
    offset = base
    for i, v in enumerate(vectors):
        if i:
            offset = builder.add(offset, stride)
        ptr, vty = _vector_ptr(context, builder, arrty, arr, offset)
        builder.store(v.value, ptr, align=context.get_abi_sizeof(vty.element))


def _strided(rule, n_in, n_out):
    """An intrinsic f(src, sbase, sstride, dst, dbase, dstride): dst[dbase + i * dstride : + 16]
    = rule(s)[i] for i < n_out, s[k] = src[sbase + k * sstride : + 16] for k < n_in."""

    def transform(typingctx, src, sbase, sstride, dst, dbase, dstride):
        _check_arrays(rule.__name__, getattr(src, "dtype", None), src, dst)
        _check_offsets(rule.__name__, sbase, sstride, dbase, dstride)

        def codegen(context, builder, sig, args):
            srcv, sb, ss, dstv, db, ds = args
            s, offset = [], sb
            for k in range(n_in):
                if k:
                    offset = builder.add(offset, ss)
                s.append(_Lanes(builder, _load(context, builder, sig.args[0], srcv, offset)[0]))
            out = rule(*s)
            assert len(out) == n_out
            _store_all(context, builder, sig.args[3], dstv, db, ds, out)
            return context.get_dummy_value()

        return types.none(src, sbase, sstride, dst, dbase, dstride), codegen

    transform.__doc__ = f"{rule.__name__} on {n_in} strided vectors of src into {n_out} of dst."
    return intrinsic(transform)


def _masked(rule, n_in, n_out):
    """An intrinsic f(src, rows, col, mask, dst, dbase, dstride): as _strided's, with s[k] =
    src[rows[k] + col : + 16] where bit k of ``mask`` is set, else zeros (an edge patch: the
    offsets of the rows outside must still be in bounds, clamped)."""

    def transform(typingctx, src, rows, col, mask, dst, dbase, dstride):
        _check_arrays(rule.__name__, getattr(src, "dtype", None), src, dst)
        _check_offsets(rule.__name__, col, mask, dbase, dstride)
        if not (isinstance(rows, types.Array) and rows.ndim == 1):
            raise TypingError(f"{rule.__name__}: expected a 1-D array of row offsets, got {rows}")
        _check_offsets(rule.__name__, rows.dtype)

        def codegen(context, builder, sig, args):
            srcv, rowsv, colv, maskv, dstv, db, ds = args
            rows_a = context.make_array(sig.args[1])(context, builder, rowsv)
            vty = ir.VectorType(context.get_value_type(sig.args[0].dtype), _LANES)
            zero = ir.Constant(vty, None)
            s = []
            for k in range(n_in):
                row = builder.load(builder.gep(rows_a.data, [ir.Constant(ir.IntType(64), k)]))
                v = _load(context, builder, sig.args[0], srcv, builder.add(row, colv))[0]
                bit = builder.and_(
                    builder.lshr(maskv, ir.Constant(maskv.type, k)), ir.Constant(maskv.type, 1)
                )
                inside = builder.icmp_unsigned("!=", bit, ir.Constant(maskv.type, 0))
                s.append(_Lanes(builder, builder.select(inside, v, zero)))
            out = rule(*s)
            assert len(out) == n_out
            _store_all(context, builder, sig.args[4], dstv, db, ds, out)
            return context.get_dummy_value()

        return types.none(src, rows, col, mask, dst, dbase, dstride), codegen

    transform.__doc__ = f"{rule.__name__} on {n_in} masked vectors of src into {n_out} of dst."
    return intrinsic(transform)


def f4_input(d0, d1, d2, d3, d4, d5):
    """F(4x4, 3x3)'s B^T s (winograd4.py's B^T): rows 1 and 2 are t0 +- t1, rows 3 and 4
    t2 +- t3 (14 operations with the fused multiply-adds, where each row alone took 24)."""
    t0 = d4 - 4 * d2
    t1 = d3 - 4 * d1
    t2 = d4 - d2
    t3 = 2 * (d3 - d1)
    return (4 * (d0 - d2) + t2, t0 + t1, t0 - t1, t2 + t3, t2 - t3, 4 * (d1 - d3) + (d5 - d3))


def f4_output(m0, m1, m2, m3, m4, m5):
    """F(4x4, 3x3)'s A^T s."""
    a, b = m1 + m2, m1 - m2
    c, e = m3 + m4, m3 - m4
    return (m0 + a + c, b + 2 * e, a + 4 * c, b + 8 * e + m5)


def f4_gradient(g0, g1, g2, g3):
    """F(4x4, 3x3)'s A s, A = (A^T)^T (the weight gradient's transform of dY)."""
    even, odd = g0 + g2, g1 + g3
    even4, odd8 = g0 + 4 * g2, 2 * g1 + 8 * g3
    return (g0, even + odd, even - odd, even4 + odd8, even4 - odd8, g3)


f4_input16 = _strided(f4_input, 6, 6)
f4_input16_masked = _masked(f4_input, 6, 6)
f4_output16 = _strided(f4_output, 6, 4)
f4_gradient16 = _strided(f4_gradient, 4, 6)
f4_gradient16_masked = _masked(f4_gradient, 4, 6)
