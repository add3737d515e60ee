"""kernels/_parfor_link_only.py: while one of fastcnn's kernels compiles, numba's wrappers around
a parallel loop are linked, never compiled to machine code; what numba runs and caches is
unchanged; and numba's classes are numba's own whenever no kernel of fastcnn is compiling (any
other numba code in the process compiles as numba does). Each check of a compilation runs in a
child interpreter with an empty cache, so it sees the compile, not a cached kernel."""

import copy
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from numba.core import codegen, inline_closurecall, targetconfig
from numba.np.ufunc import parallel

import fastcnn
import fastcnn.kernels  # noqa: F401  (scopes the kernels)
from fastcnn.kernels import _parfor_link_only, activations

_TESTED = _parfor_link_only._version(numba) in _parfor_link_only._TESTED
_needs_tested_numba = pytest.mark.skipif(
    not _TESTED, reason=f"the patch applies to numba {_parfor_link_only._TESTED}"
)

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import numba
    from numba import njit, prange, guvectorize
    from numba.core import codegen
    from numba.np.ufunc import parallel

    from numba.core import inline_closurecall, targetconfig

    def numba_attributes():
        return (
            dict(vars(codegen.CPUCodeLibrary)),
            parallel.build_gufunc_wrapper,
            inline_closurecall.InlineWorker.inline_ir,
            inline_closurecall.copy,
            dict(vars(targetconfig.TargetConfig)),
        )

    libraries = []  # every code library numba creates, and whether it was a fastcnn kernel's
    init = codegen.CPUCodeLibrary.__init__
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        libraries.append(self)
    codegen.CPUCodeLibrary.__init__ = record
    before = numba_attributes()

    import fastcnn
    from fastcnn.kernels import _parfor_link_only, activations
    after_import = numba_attributes()

    def link_only():
        names = [lib.name for lib in libraries if getattr(lib, "_fastcnn_link_only", False)]
        libraries.clear()
        # the loop body's library is named after its function, __numba_parfor_gufunc_0x...
        return sorted(n.split(" ")[0].rsplit(".", 1)[-1].split("_0x")[0] for n in names)

    @njit(parallel=True, cache=True)
    def scaled_sums(x, a):  # a user's parallel kernel: compiled as numba does
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
    print("USER_LINK_ONLY", link_only())

    v = np.linspace(-1, 1, 70000).astype(np.float32)
    out = np.empty_like(v)
    activations.relu_forward(v, out)  # fastcnn's kernel: compiled (or loaded) under the patch
    assert np.array_equal(out, np.maximum(v, 0))
    print("FASTCNN_LINK_ONLY", link_only())
    print("INSTALLED", _parfor_link_only.installed)
    print("CACHE_HITS", sum(activations.relu_forward.stats.cache_hits.values()))
    print("UNCHANGED_BY_IMPORT", after_import == before)
    print("UNCHANGED_AFTER_COMPILING", numba_attributes() == before)
""")


def _child(tmp_path, **env):
    script = tmp_path / "child.py"  # a file: numba caches only functions that have one
    script.write_text(_CHILD)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), **env)
    # the child imports the fastcnn under test (the script's folder comes first on its path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastcnn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def _is_numbas(function):
    """True for numba's own function, not a wrapper (functools.wraps copies names, not code)."""
    return not hasattr(function, "__wrapped__") and function.__code__.co_filename.startswith(
        os.path.dirname(numba.__file__)
    )


def test_numba_untouched_outside_fastcnns_compilations():
    """The done-when of the issue, in this process: fastcnn imported and one of its kernels
    compiled (or loaded) and run, numba's classes hold numba's own methods."""
    v = np.ones(10, np.float32)
    activations.relu_forward(v, np.empty_like(v))
    for name in _parfor_link_only._LIBRARY_METHODS:
        assert _is_numbas(
            vars(codegen.CPUCodeLibrary).get(name, getattr(codegen.CPUCodeLibrary, name))
        ), name
    assert _is_numbas(parallel.build_gufunc_wrapper)
    assert _is_numbas(codegen.CPUCodeLibrary.add_ir_module)
    assert _is_numbas(inline_closurecall.InlineWorker.inline_ir)
    assert inline_closurecall.copy is copy
    for name in ("values", "__hash__", "__eq__"):
        assert _is_numbas(vars(targetconfig.TargetConfig)[name]), name
    assert _parfor_link_only._saved is None and _parfor_link_only._depth == 0


@_needs_tested_numba
def test_patched_only_inside_and_restored_even_on_errors():
    lib = codegen.CPUCodeLibrary
    before = dict(vars(lib)), parallel.build_gufunc_wrapper
    inline_ir = inline_closurecall.InlineWorker.inline_ir
    flag_methods = dict(vars(targetconfig.TargetConfig))
    with _parfor_link_only.patched():
        assert not _is_numbas(lib.__init__) and not _is_numbas(parallel.build_gufunc_wrapper)
        assert not _is_numbas(inline_closurecall.InlineWorker.inline_ir)
        for name in ("values", "__hash__", "__eq__"):
            assert not _is_numbas(vars(targetconfig.TargetConfig)[name]), name
        wide = _parfor_link_only._WIDE_VECTORS and _parfor_link_only._compiles_for_avx512()
        assert _is_numbas(lib.add_ir_module) != wide
        with _parfor_link_only.patched():  # nested: a kernel compiling the kernels it calls
            pass
        assert not _is_numbas(lib._finalize_final_module)
    assert (dict(vars(lib)), parallel.build_gufunc_wrapper) == before
    with pytest.raises(KeyError):
        with _parfor_link_only.patched():
            raise KeyError("a compilation error")
    assert (dict(vars(lib)), parallel.build_gufunc_wrapper) == before
    assert inline_closurecall.InlineWorker.inline_ir is inline_ir
    assert dict(vars(targetconfig.TargetConfig)) == flag_methods


def test_wide_vectors_asked_for_in_fastcnns_definitions(monkeypatch):
    """What reaches numba's add_ir_module in fastcnn's compilations on an AVX-512 host: each
    function of a scoped module, its CPython wrapper and a parallel loop's body ask for 512-bit
    vectors; numba's own functions and declarations (LLVM takes no such attribute there) are
    left as they were, and so is the rest of the module."""
    from llvmlite import ir

    monkeypatch.setattr(_parfor_link_only, "_scoped_modules", {"7fastcnn7kernels6conv2d"})
    module = ir.Module(name="probe")
    fnty = ir.FunctionType(ir.VoidType(), [])
    declared = ir.Function(module, fnty, name="_ZN7fastcnn7kernels6conv2d8declaredB2v1E")
    names = {
        "_ZN7fastcnn7kernels6conv2d14conv2d_forwardB2v1E": True,
        "cpython._ZN7fastcnn7kernels6conv2d14conv2d_forwardB2v1E": True,
        "_ZN13_3cdynamic_3e36__numba_parfor_gufunc_0x7f2c5aB2v2E": True,
        "_ZN5numba2np9arraymath9array_sumB2v3E": False,
        "_ZN7fastcnn7kernels7dense_i8forwardB2v4E": False,  # another module, not scoped here
        "NRT_incref": False,
    }
    for name in names:
        builder = ir.IRBuilder(ir.Function(module, fnty, name=name).append_basic_block())
        builder.call(declared, [])
        builder.ret_void()
    before = str(module)
    seen = []
    add = _parfor_link_only._wide_vector_modules(lambda library, m: seen.append(str(m)))
    add(None, module)
    (text,) = seen
    asked = {
        ln.split('@"')[1].split('"')[0]: ln.endswith('"prefer-vector-width"="512"')
        for ln in text.splitlines()
        if ln.startswith("define")
    }
    assert asked == names
    assert 'declare void @"_ZN7fastcnn7kernels6conv2d8declaredB2v1E"()' in text.splitlines()
    assert text.replace(' "prefer-vector-width"="512"', "") == before


@_needs_tested_numba
def test_wide_vectors_stay_out_of_numbas_shared_code(monkeypatch):
    """A scoped function's array sum makes numba build its shared sum helper inside the scope;
    a plain @njit function compiled afterwards links that helper, and asks for nothing."""
    monkeypatch.setattr(_parfor_link_only, "_WIDE_VECTORS", True)
    monkeypatch.setattr(_parfor_link_only, "_compiles_for_avx512", lambda: True)

    @numba.njit
    def scoped(a):
        return a.sum() + a.max()

    @numba.njit
    def plain(a):
        return a.sum() + a.max()

    _parfor_link_only.scope(scoped)
    a = np.arange(12.0).reshape(3, 4)[:, ::2]  # a fresh array type: numba's helpers built anew
    assert scoped(a) == plain(a)
    assert '"prefer-vector-width"="512"' in scoped.inspect_llvm(scoped.signatures[0])
    assert "prefer-vector-width" not in plain.inspect_llvm(plain.signatures[0])


@_needs_tested_numba
@pytest.mark.skipif(not _parfor_link_only._PLAIN_ERRORS, reason="FASTCNN_NUMBA_PLAIN_ERRORS=0")
def test_error_messages_plain_only_inside():
    """While fastcnn's kernels compile, numba's error highlighting returns the text as it is
    (no colorama set-up per fragment), through the one scheme numba's modules all format
    with; outside, nested or after an error, numba's own scheme again."""
    from numba.core import compiler_machinery, errors, ir, typeinfer
    from numba.core.types import functions
    from numba.core.typing import typeof

    scheme = errors.termcolor()
    for module in (functions, typeinfer, ir, compiler_machinery, typeof):
        assert module._termcolor is scheme, module.__name__
    outside = scheme.errmsg("typing failed")
    with _parfor_link_only.patched():
        with _parfor_link_only.patched():
            assert functions._termcolor.errmsg("typing failed") == "typing failed"
        assert errors.termcolor().errmsg("typing failed") == "typing failed"
    assert scheme.errmsg("typing failed") == outside and "_markup" not in vars(scheme)
    with pytest.raises(KeyError):
        with _parfor_link_only.patched():
            raise KeyError("a compilation error")
    assert scheme.errmsg("typing failed") == outside and "_markup" not in vars(scheme)
    if hasattr(type(scheme), "_markup"):  # colorama installed: numba's markup is back
        assert outside != "typing failed"


def test_shared_scope_copy_copies_each_scope_once():
    """The blocks of one IR copied one by one (as numba's inline_ir does) share one copy of
    their scope, distinct from the original; another copy of the same blocks is a new one."""
    from numba.core import ir

    loc = ir.Loc("f", 1)
    scope = ir.Scope(None, loc)
    blocks = []
    for name in ("a", "b"):
        block = ir.Block(scope, loc)
        block.append(ir.Assign(ir.Const(1, loc), scope.redefine(name, loc), loc))
        blocks.append(block)
    shared = _parfor_link_only._SharedScopeCopy()
    first = [shared.deepcopy(b) for b in blocks]
    assert first[0].scope is first[1].scope is not scope
    assert first[0].scope == scope and [str(b.body[0]) for b in first] == [
        str(b.body[0]) for b in blocks
    ]
    second = [_parfor_link_only._SharedScopeCopy().deepcopy(b) for b in blocks]
    assert second[0].scope is not first[0].scope and second[0].body[0] is not first[0].body[0]
    assert shared.copy is copy.copy  # everything else is the copy module's


def test_fast_flag_methods_give_numbas_results():
    """The compiler's flags' values, hash and equality as numba computes them, for flags at
    their defaults, set, copied and compared with another kind of object."""
    from numba.core.compiler import Flags
    from numba.core.targetconfig import Option

    class Other(Flags):  # another kind of config, whose own option a copy carries along
        extra = Option(type=int, default=0, doc="an option Flags does not have")

    other = Other()
    other.extra = 3
    other.nrt = True
    owner, fast = _parfor_link_only._flag_methods()
    assert owner is targetconfig.TargetConfig
    plain = Flags()
    changed = Flags()
    changed.nrt = True
    changed.fastmath = {"contract"}
    changed.auto_parallel = True
    copied = Flags(changed)
    back = Flags(changed)
    back.nrt = False
    flags = (plain, changed, copied, back, Flags(plain), other, Flags(other))
    for a in flags:
        assert fast["values"](a) == a.values()
        assert list(fast["values"](a)) == list(a.values())  # the options' order too
        assert fast["__hash__"](a) == hash(a)
        for b in flags:
            assert fast["__eq__"](a, b) == (a == b)
        assert fast["__eq__"](a, 1) is NotImplemented
    assert fast["__eq__"](changed, copied) and not fast["__eq__"](changed, back)


@_needs_tested_numba
def test_every_kernel_is_scoped():
    from numba.core.dispatcher import Dispatcher

    from fastcnn.kernels import conv2d, fused, gemm_tile

    kernels = [
        obj
        for m in (activations, conv2d, fused, gemm_tile)
        for obj in vars(m).values()
        if isinstance(obj, Dispatcher) and obj.py_func.__module__ == m.__name__
    ]
    assert len(kernels) > 10
    assert all(getattr(k.compile, "_fastcnn_link_only", False) for k in kernels)
    assert not hasattr(type(kernels[0]).compile, "_fastcnn_link_only")  # numba's class: its own


@_needs_tested_numba
def test_installed_on_a_tested_numba():
    assert _parfor_link_only.installed


@pytest.mark.slow
@_needs_tested_numba
def test_fastcnn_kernels_link_only_others_as_numba_does(tmp_path):
    first = _child(tmp_path)
    assert first["INSTALLED"] == "True"
    assert first["UNCHANGED_BY_IMPORT"] == "True"
    assert first["UNCHANGED_AFTER_COMPILING"] == "True"
    assert first["USER_LINK_ONLY"] == "[]", first  # nor the guvectorize wrappers
    # relu_forward's one prange loop: its body (the gufunc) and the two wrappers around it
    assert first["FASTCNN_LINK_ONLY"] == (
        "['_GufuncWrapper', '__numba_parfor_gufunc', 'parallelgufuncwrapper']"
    ), first
    assert first["CACHE_HITS"] == "0"
    again = _child(tmp_path)  # the kernel compiled under the patch, loaded from the cache
    assert again["CACHE_HITS"] == "1" and again["FASTCNN_LINK_ONLY"] == "[]", again
    assert again["UNCHANGED_AFTER_COMPILING"] == "True"


@pytest.mark.slow
def test_can_be_turned_off(tmp_path):
    off = _child(tmp_path, FASTCNN_NUMBA_LINK_ONLY="0")
    assert off["INSTALLED"] == "False" and off["FASTCNN_LINK_ONLY"] == "[]", off


def test_warns_when_numba_does_not_fit(monkeypatch):
    """A numba version it was not tested on: a RuntimeWarning that says why, nothing scoped."""
    monkeypatch.setattr(_parfor_link_only, "_TESTED", ((0, 1),))
    monkeypatch.setattr(_parfor_link_only, "installed", False)

    @numba.njit
    def f(x):
        return x + 1

    import types

    module = types.ModuleType(f.py_func.__module__)
    module.f = f
    with pytest.warns(
        RuntimeWarning,
        match=r"compile as numba does .*not a version it was "
        r"tested on \(0\.1\); FASTCNN_NUMBA_LINK_ONLY=0 silences",
    ):
        assert _parfor_link_only.install([module]) is False
    assert not hasattr(f.compile, "_fastcnn_link_only") and not _parfor_link_only.installed
    monkeypatch.setenv("FASTCNN_NUMBA_LINK_ONLY", "0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _parfor_link_only.install([module]) is False


_HELPER_CHILD = textwrap.dedent("""
    import numpy as np
    import fastcnn
    from fastcnn.kernels import conv2d

    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((16, 3, 3, 3)).astype(np.float32)
    out = np.empty((2, 6, 6, 16), np.float32)
    e = np.empty(0, np.float32)
    conv2d.conv2d_forward(x, w, np.zeros(16, np.float32), 1, 1, 1, 1, 1, 1, False, out, (e,) * 4, 2)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.einsum("nhwc,fc->nhwf", xp[:, :6, :6], w[:, :, 0, 0])
    for i in range(3):
        for j in range(3):
            if i or j:
                want += np.einsum("nhwc,fc->nhwf", xp[:, i:i + 6, j:j + 6], w[:, :, i, j])
    print("KERNEL_OK", bool(np.allclose(out, want, atol=1e-4)))
    helper = conv2d._padded_input  # compiled for the kernel above: link only
    print("LINK_ONLY", len(helper.__dict__.get("_fastcnn_link_only_sigs", ())))
    got = helper(x, 1, 1, 8, 8, True)  # from Python: compiled again, as numba does
    print("PYTHON_CALL_OK", bool(np.array_equal(got, xp)))
    print("LINK_ONLY_AFTER", len(helper.__dict__.get("_fastcnn_link_only_sigs", ())))
""")


@pytest.mark.slow
@_needs_tested_numba
def test_helper_compiled_for_a_kernel_is_link_only_until_called_from_python(tmp_path):
    """A helper compiled because a kernel calls it has no machine code of its own; called from
    Python afterwards it compiles as numba does, and runs."""
    global _CHILD
    child, _CHILD = _CHILD, _HELPER_CHILD
    try:
        got = _child(tmp_path)
    finally:
        _CHILD = child
    assert got == {
        "KERNEL_OK": "True",
        "LINK_ONLY": "1",
        "PYTHON_CALL_OK": "True",
        "LINK_ONLY_AFTER": "0",
    }, got


_WARM_FIRST = textwrap.dedent("""
    import fastcnn
    from fastcnn.kernels import conv2d

    # from Python: compiled as numba does, and saved to the cache
    print("PLAN", conv2d._weight_in_pixel_order(144, 32))
""")

_WARM_SECOND = textwrap.dedent("""
    import numpy as np
    import fastcnn
    from fastcnn.kernels import conv2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 16)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 5, 32)).astype(np.float32)
    dw, db = np.empty((32, 16, 3, 3), np.float32), np.empty(32, np.float32)
    # the kernel compiles and calls the helper the first process cached
    conv2d.conv2d_backward_weight(x, dy, 2, 2, 1, 1, 1, 1, dw, db, 2)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((32, 16, 3, 3))
    for i in range(3):
        for j in range(3):
            want[:, :, i, j] = np.einsum("nhwf,nhwc->fc", dy, xp[:, i:i + 9:2, j:j + 9:2])
    print("KERNEL_OK", bool(np.allclose(dw, want, atol=1e-3)))
    print("PLAN", conv2d._weight_in_pixel_order(144, 32))  # and from Python again
""")


@pytest.mark.slow
@_needs_tested_numba
def test_a_helper_cached_from_python_loads_whole_inside_a_kernel_compilation(tmp_path):
    """A helper compiled from Python and cached by one process, loaded from the cache by the
    next while a kernel that calls it compiles (depth > 1): it must load with its machine code
    (no crash), the kernel must be right, and the helper callable from Python."""
    global _CHILD
    child = _CHILD
    try:
        _CHILD = _WARM_FIRST
        first = _child(tmp_path)
        _CHILD = _WARM_SECOND
        second = _child(tmp_path)
    finally:
        _CHILD = child
    assert first == {"PLAN": "False"}, first  # 144 terms, 32 filters: pixel chunks
    assert second == {"KERNEL_OK": "True", "PLAN": "False"}, second
