"""Compile time: numba's two wrapper libraries around a parallel loop are never run, so they
are neither optimised nor turned into machine code.

For every ``prange`` loop numba 0.68 compiles the loop body into a gufunc, then builds two
wrapper libraries around it (``_GufuncWrapper``, ``parallelgufuncwrapper``) and links the last
into the kernel's own library. Linking copies code: each of the three libraries re-runs LLVM's
full optimisation and machine-code generation over everything it links, the loop body and
every helper it calls. Only the kernel's library is ever executed or cached; the two wrappers
exist to be linked (numba builds them with ``is_parfors=True``: no pointer to them is taken,
no cache entry made). So, while numba builds them, the libraries it creates are marked *link
only*: ``finalize`` still links their dependencies and verifies them, and the kernel's library
then optimises and compiles their code once, as part of its own.

The kernels give bitwise the same results at the same speed, and compile faster (the
measurement is in docs/environment.md). Skipping the optimisation of the gufunc library too
made a kernel slower: not done.

Applied only where it was tested (numba 0.68) and where numba's internals look as expected;
anything else leaves numba untouched. ``FASTCNN_NUMBA_LINK_ONLY=0`` turns it off.
"""
import functools
import os
import threading

_TESTED = ((0, 68),)
_state = threading.local()
installed = False


def _version(numba):
    try:
        return tuple(int(p) for p in numba.__version__.split(".")[:2])
    except ValueError:
        return None


def install():
    """Patch numba (once, idempotent); returns True when the patch is active."""
    global installed
    if installed:
        return True
    if os.environ.get("FASTCNN_NUMBA_LINK_ONLY", "1") == "0":
        return False
    try:
        import numba
        from numba.core import codegen
        from numba.np.ufunc import parallel
    except ImportError:
        return False
    lib = codegen.CPUCodeLibrary
    needed = ("__init__", "_optimize_final_module", "_finalize_final_module",
              "_finalize_dynamic_globals")
    if (_version(numba) not in _TESTED or not all(hasattr(lib, n) for n in needed)
            or not hasattr(parallel, "build_gufunc_wrapper")):
        return False

    init, optimize, finalize = lib.__init__, lib._optimize_final_module, lib._finalize_final_module
    build = parallel.build_gufunc_wrapper

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._fastcnn_link_only = getattr(_state, "building", False)

    @functools.wraps(optimize)
    def _optimize_final_module(self):
        if not getattr(self, "_fastcnn_link_only", False):
            optimize(self)

    @functools.wraps(finalize)
    def _finalize_final_module(self):
        if getattr(self, "_fastcnn_link_only", False):
            self._finalize_dynamic_globals()  # what the kernel's library inherits on linking
            self._finalized = True
        else:
            finalize(self)

    @functools.wraps(build)
    def build_gufunc_wrapper(py_func, cres, sin, sout, cache, is_parfors):
        # only the wrappers of a parallel loop; a @guvectorize(target="parallel") runs its own
        _state.building = bool(is_parfors)
        try:
            return build(py_func, cres, sin, sout, cache, is_parfors)
        finally:
            _state.building = False

    lib.__init__ = __init__
    lib._optimize_final_module = _optimize_final_module
    lib._finalize_final_module = _finalize_final_module
    parallel.build_gufunc_wrapper = build_gufunc_wrapper
    installed = True
    return True
