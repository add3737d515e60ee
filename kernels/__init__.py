"""The loops: ``@njit(parallel=True, cache=True)`` kernels over arrays, and nothing else.

Installed as ``fastcnn.kernels``. Every kernel writes into arrays its caller allocates and
trusts its inputs: shapes and dtypes are checked in ``fastcnn.functional``, never here.

Numba keys each cached kernel on its own source file only (its modification time and size).
The convolution kernels inline the tiles of gemm_tile.py: edit that file alone and conv2d.py's
cached kernels would still load with the old tiles, silently. So on import the sources of this
folder are hashed, and numba's cache files of its modules are dropped when the hash changes
(``FASTCNN_DROP_STALE_CACHE=0`` turns that off; numba's cache folder is found through numba's
private cache locators: if they changed, a ``RuntimeWarning`` says so and nothing is dropped).

Importing the package imports every kernel module, makes their kernels compile without a
cfunc wrapper (``_without_cfunc_wrappers``) and makes them skip, while they compile, the
machine code of a parallel loop's body and of the wrappers numba builds around it (never run
on their own) and part of numba's IR inlining: ``_parfor_link_only``, scoped to fastcnn's own
compilations.
"""

import functools
import hashlib
import importlib
import os
import warnings

#: Called as ``hook(dispatcher, argument_types)`` before each compilation or cache load of a
#: kernel or helper of this package (numba's ``Dispatcher.compile``), outside numba's compiler
#: lock: fastcnn.precompile's background compilation of the backward kernels. A hook must be
#: cheap: it also runs on every cache load.
compile_hooks = []


def drop_stale_cache(source_dir, cache_dir):
    """Remove the numba cache files (``*.nbi``, ``*.nbc``) of the modules in ``source_dir``
    from ``cache_dir`` unless they were compiled from the sources there now; returns the
    number removed. The hash of the sources is kept in ``cache_dir/fastcnn-kernels.sha256``.
    """
    names = sorted(n for n in os.listdir(source_dir) if n.endswith(".py"))
    digest = hashlib.sha256()
    for name in names:
        with open(os.path.join(source_dir, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    digest = digest.hexdigest()
    stamp = os.path.join(cache_dir, "fastcnn-kernels.sha256")
    try:
        with open(stamp) as f:
            if f.read() == digest:
                return 0
    except OSError:
        pass
    modules = {n[:-3] for n in names}
    removed = 0
    for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else ():
        if name.endswith((".nbi", ".nbc")) and name.split(".")[0] in modules:
            try:
                os.remove(os.path.join(cache_dir, name))
                removed += 1
            except OSError:
                pass
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{stamp}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(digest)
    os.replace(tmp, stamp)  # atomic: a concurrent import reads the old hash or the new
    return removed


def _cache_dir():
    """The folder numba caches this package's kernels in (numba's own choice of locator)."""
    from numba.core.caching import CacheImpl

    for locator in CacheImpl._locator_classes:  # numba internals: the caller warns if they moved
        found = locator.from_function(_cache_dir, __file__)
        if found is not None:
            return found.get_cache_path()
    return None


def _drop_stale_cache():
    """Stale kernels never load: what an edit of an inlined helper (gemm_tile.py) needs."""
    if os.environ.get("FASTCNN_DROP_STALE_CACHE", "1") == "0":
        return
    try:
        folder = _cache_dir()
    except (ImportError, AttributeError, TypeError) as e:  # numba's caching internals changed
        warnings.warn(
            f"fastcnn: cannot find numba's cache folder ({e!r}): cached kernels are not "
            "checked against the sources of fastcnn.kernels (after editing "
            "gemm_tile.py, clear the cache by hand); FASTCNN_DROP_STALE_CACHE=0 "
            "silences this warning",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    if folder is None:
        return  # numba caches nothing here (no writable folder): nothing stale can load
    try:
        drop_stale_cache(os.path.dirname(os.path.abspath(__file__)), folder)
    except OSError:
        pass  # best effort: a cache folder we cannot write must never stop the import


_drop_stale_cache()

_KERNEL_MODULES = [
    importlib.import_module(f"{__name__}.{n[:-3]}")
    for n in sorted(os.listdir(os.path.dirname(os.path.abspath(__file__))))
    if n.endswith(".py") and not n.startswith("_")
]


def _without_cfunc_wrappers(modules):
    """Every kernel and helper compiles without numba's cfunc wrapper (the C-callable entry
    point behind ``.address`` and ctypes/cffi, which nothing here uses): one function less to
    build, optimise and turn into machine code per compilation. Python calls are unchanged."""
    from numba.core.dispatcher import Dispatcher

    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                obj.targetoptions["no_cfunc_wrapper"] = True


_without_cfunc_wrappers(_KERNEL_MODULES)


def _with_compile_hooks(modules):
    """Every dispatcher of ``modules`` runs ``compile_hooks`` before it compiles (or loads)."""
    from numba.core.dispatcher import Dispatcher

    for module in modules:
        for obj in list(vars(module).values()):
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__:
                compile_ = obj.compile

                @functools.wraps(compile_)
                def compile(sig, _dispatcher=obj, _compile=compile_):
                    for hook in compile_hooks:
                        hook(_dispatcher, sig)
                    return _compile(sig)

                obj.compile = compile


from . import _parfor_link_only  # noqa: E402

_parfor_link_only.install(_KERNEL_MODULES)
_with_compile_hooks(_KERNEL_MODULES)  # outermost: a hook may wait, never under numba's lock
