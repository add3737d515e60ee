"""The loops: ``@njit(parallel=True, cache=True)`` kernels over arrays, and nothing else.

Installed as ``fastcnn.kernels``. Every kernel writes into arrays its caller allocates and
trusts its inputs: shapes and dtypes are checked in ``fastcnn.functional``, never here.

Numba keys each cached kernel on its own source file only (its modification time and size).
The convolution kernels inline the tiles of gemm_tile.py: edit that file alone and conv2d.py's
cached kernels would still load with the old tiles, silently. So on import the sources of this
folder are hashed, and numba's cache files of its modules are dropped when the hash changes.

Importing the package also makes numba skip the wrappers it builds around a parallel loop
(optimised and compiled, never run): ``_parfor_link_only``.
"""
import hashlib
import os


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

    for locator in CacheImpl._locator_classes:  # numba internals: the caller guards
        found = locator.from_function(_cache_dir, __file__)
        if found is not None:
            return found.get_cache_path()
    return None


try:
    _dir = _cache_dir()
    if _dir is not None:
        drop_stale_cache(os.path.dirname(os.path.abspath(__file__)), _dir)
except Exception:  # best effort: a read-only or unusual cache must never stop the import
    pass

try:
    from . import _parfor_link_only

    _parfor_link_only.install()
except Exception:  # numba's internals changed: compile as numba does
    pass
