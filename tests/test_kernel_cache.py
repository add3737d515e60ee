"""kernels/__init__.py: numba's cache files are dropped when any kernel source changes.

Numba checks a cached kernel against its own source file only; the convolution kernels inline
gemm_tile.py's tiles, so an edit there alone would otherwise load stale machine code.
"""

import os

from fastcnn.kernels import drop_stale_cache


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_cache_files_dropped_when_any_source_changes(tmp_path):
    src, cache = tmp_path / "kernels", tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    _write(src / "conv2d.py", "def conv(): pass\n")
    _write(src / "gemm_tile.py", "def tile(): pass\n")
    ours = ["conv2d.conv-12.py311.nbi", "conv2d.conv-12.py311.1.nbc", "gemm_tile.tile-3.py311.nbi"]
    other = "elsewhere.f-1.py311.nbi"  # another module's file in the same folder: kept
    for name in ours + [other]:
        _write(cache / name, "x")

    assert drop_stale_cache(str(src), str(cache)) == 3  # no record of the sources yet
    assert sorted(os.listdir(cache)) == [other, "fastcnn-kernels.sha256"]

    for name in ours:  # recompiled from the same sources: kept from now on
        _write(cache / name, "x")
    assert drop_stale_cache(str(src), str(cache)) == 0
    assert all((cache / name).exists() for name in ours)

    _write(src / "gemm_tile.py", "def tile(): return 1\n")  # only the inlined helper changes
    assert drop_stale_cache(str(src), str(cache)) == 3
    assert not any((cache / name).exists() for name in ours)
    assert (cache / other).exists()


def test_missing_cache_folder_is_created(tmp_path):
    src = tmp_path / "kernels"
    src.mkdir()
    _write(src / "pool2d.py", "")
    assert drop_stale_cache(str(src), str(tmp_path / "new")) == 0
    assert (tmp_path / "new" / "fastcnn-kernels.sha256").exists()


def test_warns_when_numba_cache_internals_changed(monkeypatch):
    """numba's private cache locators gone: a RuntimeWarning, not a silent skip; and the check
    can be switched off (then numba is not asked at all)."""
    import warnings

    import pytest

    from fastcnn import kernels

    def moved():
        raise AttributeError("type object 'CacheImpl' has no attribute '_locator_classes'")

    monkeypatch.setattr(kernels, "_cache_dir", moved)
    monkeypatch.delenv("FASTCNN_DROP_STALE_CACHE", raising=False)
    with pytest.warns(
        RuntimeWarning,
        match="cannot find numba's cache folder.*FASTCNN_DROP_STALE_CACHE=0 silences",
    ):
        kernels._drop_stale_cache()
    monkeypatch.setenv("FASTCNN_DROP_STALE_CACHE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels._drop_stale_cache()


def test_cache_folder_found_with_this_numba():
    from fastcnn import kernels

    folder = kernels._cache_dir()
    assert folder is not None and os.path.isfile(os.path.join(folder, "fastcnn-kernels.sha256"))
