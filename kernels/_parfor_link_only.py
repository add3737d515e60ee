"""Buys about a tenth of a cold compilation's CPU time: while one of fastcnn's own kernels
compiles, numba's two wrapper libraries around a parallel loop (never run) are linked into the
kernel without being optimised or turned into machine code of their own.

For every ``prange`` loop numba 0.68 compiles the loop body into a gufunc, then builds two
wrapper libraries around it (``_GufuncWrapper``, ``parallelgufuncwrapper``) and links the last
into the kernel's own library. Linking copies code: each of the three libraries re-runs LLVM's
full optimisation and machine-code generation over everything it links, the loop body and
every helper it calls. Only the kernel's library is ever executed or cached; the two wrappers
exist to be linked (numba builds them with ``is_parfors=True``: no pointer to them is taken,
no cache entry made). So, while numba builds them, the libraries it creates are marked *link
only*: ``finalize`` still links their dependencies and verifies them, and the kernel's library
then optimises and compiles their code once, as part of its own. The kernels give bitwise the
same results at the same speed (docs/environment.md has the measurement). The loop body's own
library (the gufunc, a function named ``__numba_parfor_gufunc_...``) is link only as well: it
is only ever run as part of the kernel's library, which optimises and compiles it again
anyway (numba takes a pointer to it, never called: 0 here; ``FASTCNN_NUMBA_GUFUNC_LINK_ONLY=0``
compiles it as numba does).

The same scope also makes numba's IR inlining (``inline="always"``: the register tiles of
gemm_tile.py, the pooling's window helpers) copy each inlined function's IR once rather than
once per block: numba 0.68's ``InlineWorker.inline_ir`` deep-copies every block of the callee
separately, and each block's copy drags along a copy of the whole function's variable scope,
so an inline costs blocks x variables (most of a tile's inlining time). Blocks that share a
scope are copied here with one ``deepcopy`` memo, so they share one copy of it, as the blocks
of the original IR do; the inlined IR, and so the kernel, is the same.
(``_SharedScopeCopy``; ``FASTCNN_NUMBA_SHARED_COPY=0`` turns this part off.) And the
compiler's flags compare by their values at once, not option by option (``_flag_methods``;
``FASTCNN_NUMBA_FAST_FLAGS=0`` turns this part off). And numba's error messages, made by the
thousand for overload templates that fail to type and are dropped, are plain text: with
colorama installed numba initialises and tears down colorama's stream wrappers for every
highlighted fragment (``_plain_markup``; ``FASTCNN_NUMBA_PLAIN_ERRORS=0`` turns this part
off).

And on an AVX-512 host, fastcnn's functions built in that scope (its kernels and helpers, their
wrappers and parallel loop bodies; not numba's shared code built meanwhile, which other numba
code links later) ask LLVM for 512-bit vectors (the string attribute
``"prefer-vector-width"="512"``, ``_wide_vector_modules``): LLVM's tuning for
Intel's server cores (Skylake-X to Emerald Rapids) prefers 256-bit vectors, and its vectorisers
then wrote the register tiles of gemm_tile.py in ymm registers, half of what the core's fused
multiply-adds take per instruction. On an AVX2 host nothing changes (AVX2's vectors are 256
bits); ``FASTCNN_NUMBA_WIDE_VECTORS=0`` turns this part off.

And one level down: a serial helper of fastcnn compiled because a kernel being compiled calls it
is only ever run as IR linked into that kernel, so it is built link only too (no machine code,
no CPython wrapper, no cache entry: ``_compile_helper``); a call from Python compiles it again
as numba does, and a version in numba's cache loads whole. (``FASTCNN_NUMBA_HELPER_LINK_ONLY=0``
turns this part off.)

Scope: numba's classes are patched only while a kernel of fastcnn compiles (``patched``, entered
by the ``compile`` method that ``scope`` gives each of fastcnn's dispatchers, under numba's
compiler lock so no other thread compiles meanwhile) and restored as they were right after.
Any other numba code in the process, before, after or between fastcnn's compilations, compiles
as numba does. ``FASTCNN_NUMBA_LINK_ONLY=0`` turns it off; on a numba version it was not tested
on, or whose internals look different, it stays off and says so in a ``RuntimeWarning``.
"""

import contextlib
import copy
import functools
import os
import threading
import warnings

_TESTED = ((0, 68),)
_LIBRARY_METHODS = ("__init__", "_optimize_final_module", "_finalize_final_module")
_SHARED_COPY = os.environ.get("FASTCNN_NUMBA_SHARED_COPY", "1") != "0"
_FAST_FLAGS = os.environ.get("FASTCNN_NUMBA_FAST_FLAGS", "1") != "0"
#: The name numba 0.68 gives the function (and so the library) of a parallel loop's body.
_GUFUNC = "__numba_parfor_gufunc_"
_GUFUNC_LINK_ONLY = os.environ.get("FASTCNN_NUMBA_GUFUNC_LINK_ONLY", "1") != "0"
#: A helper (a serial dispatcher of fastcnn) compiled because a kernel being compiled calls it
#: is built link only: no CPython wrapper, no machine code, no cache entry (see _compile_helper).
_HELPER_LINK_ONLY = os.environ.get("FASTCNN_NUMBA_HELPER_LINK_ONLY", "1") != "0"
_PLAIN_ERRORS = os.environ.get("FASTCNN_NUMBA_PLAIN_ERRORS", "1") != "0"
_WIDE_VECTORS = os.environ.get("FASTCNN_NUMBA_WIDE_VECTORS", "1") != "0"
#: LLVM's per-function override of the CPU's preferred vector width (its vectorisers' choice).
_PREFER_512 = '"prefer-vector-width"="512"'
_scoped_modules = set()  # the mangled names of the modules of the dispatchers ``scope`` wraps
_MISSING = object()
_state = threading.local()  # .building: numba is building a parallel loop's wrappers
_saved = None  # numba's own attributes while patched: [(owner, name, value or _MISSING)]
_depth = 0  # nesting of ``patched`` (a kernel's compilation compiles the kernels it calls)
installed = False  # fastcnn's dispatchers compile under ``patched``


def _version(numba):
    try:
        return tuple(int(p) for p in numba.__version__.split(".")[:2])
    except ValueError:
        return None


def _unusable():
    """Why the patch cannot apply to the numba installed (a sentence), or None when it can."""
    try:
        import numba
        from numba.core import codegen
        from numba.core.compiler_lock import global_compiler_lock  # noqa: F401
        from numba.np.ufunc import parallel
    except ImportError as e:
        return f"numba's modules moved ({e})"
    if _version(numba) not in _TESTED:
        tested = ", ".join(".".join(map(str, v)) for v in _TESTED)
        return f"numba {numba.__version__} is not a version it was tested on ({tested})"
    lib = codegen.CPUCodeLibrary
    extra = ("_finalize_dynamic_globals", "add_ir_module")
    missing = [n for n in _LIBRARY_METHODS + extra if not hasattr(lib, n)]
    from numba.core import cpu

    if "get_executable" not in vars(cpu.CPUContext):
        missing.append("numba.core.cpu.CPUContext.get_executable")
    if not hasattr(parallel, "build_gufunc_wrapper"):
        missing.append("numba.np.ufunc.parallel.build_gufunc_wrapper")
    from numba.core import inline_closurecall

    if getattr(inline_closurecall, "copy", None) is not copy or "inline_ir" not in vars(
        getattr(inline_closurecall, "InlineWorker", object)
    ):
        missing.append("numba.core.inline_closurecall's copy and InlineWorker.inline_ir")
    from numba.core import targetconfig

    config = targetconfig.TargetConfig
    if _FAST_FLAGS and ("_values" not in config.__slots__ or "values" not in vars(config)):
        missing.append("numba.core.targetconfig.TargetConfig's _values and values")
    if missing:
        return f"numba {numba.__version__} lacks {', '.join(missing)}"
    return None


class _SharedScopeCopy:
    """Stands in for the ``copy`` module inside numba.core.inline_closurecall during one
    ``InlineWorker.inline_ir`` call: ``deepcopy(block)`` (numba copies an inlined function's
    IR block by block) copies the blocks of one scope with one memo, so they share one copy of
    the scope; everything else is ``copy``'s. A fresh one per call: numba inlines a cached IR
    more than once (``@overload(inline="always")``), and each inline needs its own copy."""

    def __init__(self):
        self._memos = {}  # id(scope) -> (scope, memo): the scope stays alive meanwhile

    def deepcopy(self, x, memo=None):
        from numba.core import ir

        if memo is None and isinstance(x, ir.Block):
            entry = self._memos.get(id(x.scope))
            if entry is None:
                entry = self._memos[id(x.scope)] = (x.scope, {})
            memo = entry[1]
        return copy.deepcopy(x, memo)

    def __getattr__(self, name):
        return getattr(copy, name)


def _shared_copy_inline_ir(inline_ir):
    """numba's ``InlineWorker.inline_ir`` with its block copies made by a fresh
    ``_SharedScopeCopy`` (the module's ``copy`` put back afterwards, also when nested)."""
    from numba.core import inline_closurecall

    @functools.wraps(inline_ir)
    def wrapper(self, *args, **kwargs):
        previous = inline_closurecall.copy
        inline_closurecall.copy = _SharedScopeCopy()
        try:
            return inline_ir(self, *args, **kwargs)
        finally:
            inline_closurecall.copy = previous

    return wrapper


def _link_only_get_executable(get_executable):
    """numba's ``CPUContext.get_executable``, which makes the machine code of a compiled
    function and points its environment at it; for a link-only library (a parallel loop's
    body, only ever run inside its kernel) a function object with no code (address 0, never
    called) and no environment set: the kernel's copy of the body's environment is the one
    that runs, and numba leaves it unset there too (and in every kernel loaded from its
    cache)."""
    from numba import _dynfunc

    @functools.wraps(get_executable)
    def wrapper(self, library, fndesc, env):
        if not (
            getattr(library, "_fastcnn_link_only", False)
            or getattr(library, "_fastcnn_no_code", False)
        ):
            return get_executable(self, library, fndesc, env)
        library._ensure_finalized()
        name = fndesc.qualname.split(".")[-1]
        doc = f"link-only function {fndesc.qualname!r} (no machine code of its own)"
        return _dynfunc.make_function(fndesc.lookup_module(), name, doc, 0, env, (library,))

    return wrapper


def _compiles_for_avx512():
    from .gemm_tile import TALL  # numba's target (NUMBA_CPU_FEATURES or the host) has AVX-512F

    return TALL


def _mangled(module_name):
    """How numba's (Itanium) mangling spells a module's dotted name inside a function's name:
    ``fastcnn.kernels.conv2d`` -> ``7fastcnn7kernels6conv2d``."""
    return "".join(f"{len(part)}{part}" for part in module_name.split("."))


def _is_scoped_function(name):
    """Whether the LLVM function ``name`` is code of a scoped dispatcher's module (its own
    functions and their wrappers) or a parallel loop's body (only fastcnn's compile in scope):
    not numba's shared code built meanwhile (the reference counting, internal helpers such as
    an array's ``sum``), which other numba code in the process links later."""
    return _GUFUNC in name or any(m in name for m in _scoped_modules)


def _wide_vector_modules(add_ir_module):
    """numba's ``CPUCodeLibrary.add_ir_module`` with every function of fastcnn's that the
    module defines given LLVM's ``"prefer-vector-width"="512"`` first: the kernel's own
    functions, its loop bodies and its helpers all reach LLVM's vectorisers through here, and
    the register tiles are inlined into them as numba IR, so none is left at 256 bits."""

    @functools.wraps(add_ir_module)
    def wrapper(self, ir_module):
        for function in ir_module.functions:
            # a definition (declarations take no such attribute) of fastcnn's
            if function.blocks and _is_scoped_function(function.name):
                # llvmlite's FunctionAttributes.add accepts only LLVM's enum attributes
                set.add(function.attributes, _PREFER_512)
        return add_ir_module(self, ir_module)

    return wrapper


def _flag_methods():
    """numba's ``TargetConfig.values``, ``__hash__`` and ``__eq__`` (the compiler's flags) with
    the same results, read from the stored values and the options' defaults at once instead of
    option by option through their properties: typing looks every overload up in a cache
    keyed by the flags (``_OverloadFunctionTemplate._get_impl``), so often that numba's took
    a noticeable share of a cold compilation (docs/environment.md has the count)."""
    from numba.core import targetconfig

    tables = {}  # class -> (the options' defaults, numba's hash: that of the sorted names)

    def table(cls):
        entry = tables.get(cls)
        if entry is None:
            defaults = {name: option.default for name, option in cls.options.items()}
            entry = tables[cls] = (defaults, hash(tuple(sorted(defaults))))
        return entry

    def values(self):
        defaults = table(type(self))[0]
        stored = self._values
        if stored.keys() - defaults.keys():  # copied from another kind of config: its options
            return {name: stored.get(name, value) for name, value in defaults.items()}
        out = dict(defaults)
        out.update(stored)
        return out

    def __hash__(self):
        return table(type(self))[1]

    def __eq__(self, other):
        if isinstance(other, targetconfig.TargetConfig):
            return values(self) == values(other)
        return NotImplemented

    return targetconfig.TargetConfig, {"values": values, "__hash__": __hash__, "__eq__": __eq__}


def _apply():
    """Replace numba's methods by the link-only ones, keeping numba's own to restore."""
    global _saved
    from numba.core import codegen, cpu, inline_closurecall
    from numba.np.ufunc import parallel

    lib = codegen.CPUCodeLibrary
    _saved = [(lib, n, vars(lib).get(n, _MISSING)) for n in _LIBRARY_METHODS]
    if _WIDE_VECTORS and _compiles_for_avx512():  # AVX2 code is the same either way
        _saved.append((lib, "add_ir_module", vars(lib).get("add_ir_module", _MISSING)))
        lib.add_ir_module = _wide_vector_modules(lib.add_ir_module)
    _saved.append((parallel, "build_gufunc_wrapper", vars(parallel)["build_gufunc_wrapper"]))
    if _GUFUNC_LINK_ONLY or _HELPER_LINK_ONLY:
        _saved.append((cpu.CPUContext, "get_executable", vars(cpu.CPUContext)["get_executable"]))
        cpu.CPUContext.get_executable = _link_only_get_executable(cpu.CPUContext.get_executable)
    if _FAST_FLAGS:
        owner, methods = _flag_methods()
        for name, method in methods.items():
            _saved.append((owner, name, vars(owner).get(name, _MISSING)))
            setattr(owner, name, method)
    if _SHARED_COPY:
        worker = inline_closurecall.InlineWorker
        _saved.append((worker, "inline_ir", vars(worker)["inline_ir"]))
        worker.inline_ir = _shared_copy_inline_ir(worker.inline_ir)
    scheme = _highlighting_scheme()
    if scheme is not None:  # the instance numba's modules (types.functions first) format with
        _saved.append((scheme, "_markup", vars(scheme).get("_markup", _MISSING)))
        scheme._markup = _plain_markup
    init, optimize, finalize = (getattr(lib, n) for n in _LIBRARY_METHODS)
    build = parallel.build_gufunc_wrapper

    @functools.wraps(init)
    def __init__(self, codegen, name, *args, **kwargs):
        init(self, codegen, name, *args, **kwargs)
        self._fastcnn_link_only = getattr(_state, "building", False) or (
            _GUFUNC_LINK_ONLY and _GUFUNC in name
        )
        helpers = getattr(_state, "helpers", None)
        # a helper's own library (numba names it after the function): optimised as numba does
        # (the same IR is linked into its callers), no machine code of its own
        self._fastcnn_no_code = bool(helpers) and name == helpers[-1]

    @functools.wraps(optimize)
    def _optimize_final_module(self):
        if not getattr(self, "_fastcnn_link_only", False):
            optimize(self)

    @functools.wraps(finalize)
    def _finalize_final_module(self):
        if getattr(self, "_fastcnn_link_only", False) or getattr(self, "_fastcnn_no_code", False):
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


def _plain_markup(msg, color=None, style=None):
    """The message as it is (numba's highlighting colour scheme's ``_markup`` wraps it in
    colorama's escape codes, setting colorama up and tearing it down each time)."""
    return msg


def _highlighting_scheme():
    """numba's colour scheme instance if it highlights through colorama (``_markup``), else
    None (colorama absent, or NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING set: already plain)."""
    if not _PLAIN_ERRORS:
        return None
    from numba.core import errors

    termcolor = getattr(errors, "termcolor", None)  # (a cosmetic part: absent, it is skipped)
    scheme = termcolor() if callable(termcolor) else None
    return scheme if hasattr(type(scheme), "_markup") else None


def _restore():
    global _saved
    for owner, name, value in reversed(_saved):
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _saved = None


@contextlib.contextmanager
def patched():
    """numba patched for the duration (reentrant), under numba's compiler lock: no other
    thread compiles while it is; numba's attributes are put back as they were on exit."""
    global _depth
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        if _depth == 0:
            try:
                _apply()
            except BaseException:  # numba's own put back, not left half patched
                if _saved is not None:
                    _restore()
                raise
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                _restore()


class _NoSaveCache:
    """A dispatcher's cache that loads as numba's does and saves nothing (``loaded`` records
    whether the last load found the function)."""

    def __init__(self, cache):
        self._cache = cache
        self.loaded = False

    def load_overload(self, *args, **kwargs):
        # a cached version is whole (its machine code and wrapper): the libraries its load
        # rebuilds must not be taken for the link-only helper's (they bear its name)
        helpers = _state.__dict__.get("helpers")
        saved = list(helpers) if helpers else None
        if helpers:
            helpers.clear()
        try:
            cres = self._cache.load_overload(*args, **kwargs)
        finally:
            if saved is not None:
                helpers.extend(saved)
        self.loaded = cres is not None
        return cres

    def save_overload(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _compile_helper(dispatcher, compile_, sig):
    """Compile ``dispatcher`` for ``sig`` *link only*: it is being compiled because a kernel
    that calls it is (``_depth`` > 1), and only its LLVM IR, linked into that kernel, is ever
    run. So no CPython wrapper (numba's ``no_cpython_wrapper``), no machine code of its own
    (``_fastcnn_no_code``: its module is optimised as numba's, then only linked), no cache entry,
    and no entry in the dispatcher's table of Python calls (the entry point's address is 0). A
    later call from Python, or a compilation outside a kernel's, compiles it again as numba
    does (``_forget_link_only``). A version in numba's cache loads whole, as numba loads it
    (its libraries are not marked while they load: tests/test_parfor_link_only.py, a helper
    cached from Python by one process and loaded inside a kernel's compilation by the next)."""
    from numba.core import sigutils

    args = tuple(sigutils.normalize_signature(sig)[0])
    if args in dispatcher.overloads:
        return compile_(sig)  # numba returns the existing entry point
    options = dispatcher.targetoptions
    wrapper = options.get("no_cpython_wrapper", _MISSING)
    cache = _NoSaveCache(dispatcher._cache)
    insert = dispatcher._insert
    own = vars(dispatcher).get("_insert", _MISSING)  # set by an outer compilation of this one

    def _insert(*a, **k):
        if cache.loaded:  # a cached version has its wrapper and machine code
            insert(*a, **k)

    helpers = _state.__dict__.setdefault("helpers", [])
    helpers.append(dispatcher.py_func.__qualname__)
    dispatcher._cache, dispatcher._insert = cache, _insert
    options["no_cpython_wrapper"] = True
    try:
        entry = compile_(sig)
    finally:
        helpers.pop()
        dispatcher._cache = cache._cache
        if own is _MISSING:
            del dispatcher._insert
        else:
            dispatcher._insert = own
        if wrapper is _MISSING:
            del options["no_cpython_wrapper"]
        else:
            options["no_cpython_wrapper"] = wrapper
    if not cache.loaded:
        dispatcher.__dict__.setdefault("_fastcnn_link_only_sigs", set()).add(args)
    return entry


def _forget_link_only(dispatcher, sig):
    """Drop ``dispatcher``'s link-only version for ``sig`` (if any): it is to compile as numba
    does (a call from Python, or an explicit ``compile``)."""
    sigs = dispatcher.__dict__.get("_fastcnn_link_only_sigs")
    if not sigs:
        return
    from numba.core import sigutils

    args = tuple(sigutils.normalize_signature(sig)[0])
    if args in sigs:
        sigs.discard(args)
        dispatcher.overloads.pop(args, None)


def scope(dispatcher):
    """Make ``dispatcher`` (a numba ``@njit`` function) compile under ``patched``: its own
    ``compile`` attribute wraps its class's, which every compilation and cache load of it goes
    through (numba's ``_compile_for_args`` and the typing of calls from other kernels). numba's
    classes are not touched. Idempotent; returns ``dispatcher``."""
    compile_ = dispatcher.compile
    if getattr(compile_, "_fastcnn_link_only", False):
        return dispatcher

    @functools.wraps(compile_)
    def compile(sig):
        with patched():
            if _HELPER_LINK_ONLY and _depth > 1 and not dispatcher.targetoptions.get("parallel"):
                return _compile_helper(dispatcher, compile_, sig)
            _forget_link_only(dispatcher, sig)
            return compile_(sig)

    compile._fastcnn_link_only = True
    _scoped_modules.add(_mangled(dispatcher.py_func.__module__))
    dispatcher.compile = compile
    return dispatcher


def install(modules):
    """Scope every numba dispatcher defined in ``modules`` (fastcnn's kernels); returns True
    when they compile link-only. ``FASTCNN_NUMBA_LINK_ONLY=0``: nothing done, False; a numba
    that does not fit: a ``RuntimeWarning`` that says why, nothing done, False."""
    global installed
    if os.environ.get("FASTCNN_NUMBA_LINK_ONLY", "1") == "0":
        return False
    why = _unusable()
    if why is not None:
        warnings.warn(
            f"fastcnn: kernels compile as numba does (slower to start): {why}; "
            "FASTCNN_NUMBA_LINK_ONLY=0 silences this warning",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    from numba.core.dispatcher import Dispatcher

    for module in modules:
        for obj in list(vars(module).values()):
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                scope(obj)
    installed = True
    return True
