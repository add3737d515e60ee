"""Operations on 16 consecutive elements of flat arrays, written as LLVM vector code.

An output tile of the Winograd kernels sits in a stack buffer as 16-filter rows; its
epilogue (an evaluation-mode BatchNorm, a residual sum, a ReLU) runs on those rows before
they are stored. Written as Python loops over the 16 lanes, LLVM unrolled the lane loop and
vectorised the loop over the rows instead, with gathers and scatters (slower than a second
pass over the stored rows); these intrinsics are one vector instruction per step, whatever
loops surround them. The direct kernels' pass over their stored rows (conv2d._batch_norm_rows)
takes batch_norm16, all three steps in one: its loops over 16 channels had stayed scalar.
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
