"""numba's on-disk cache for the kernels, keyed on every source file they compile.

numba's ``cache=True`` stamps a cached kernel with the modification time and
size of the one file that defines it. The kernels of this package compile
functions from several files (the layers of :mod:`sklearn_crb.physics._numba`
and the R2sl lookup of :mod:`sklearn_crb.physics.r2sl.table`), so an edit to
any of the others would keep loading the stale compiled kernel. Here the stamp
is a SHA-256 over the contents of all those files: an edit to any of them
invalidates the cache (the kernel recompiles, once, and the new machine code
is cached again), while an unchanged package in a new process still loads
from the cache. Everything else (cache folder, index and data files,
``NUMBA_CACHE_DIR``) is numba's own machinery.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from numba.core.caching import CompileResultCacheImpl, FunctionCache

__all__ = ["SOURCE_FILES", "source_stamp", "enable_source_cache"]

_PHYSICS = Path(__file__).resolve().parents[1]

#: Every source file whose functions are compiled into the kernels.
SOURCE_FILES = (
    _PHYSICS / "_numba" / "simd.py",
    _PHYSICS / "_numba" / "expm.py",
    _PHYSICS / "_numba" / "bloch.py",
    _PHYSICS / "_numba" / "kernel.py",
    _PHYSICS / "r2sl" / "table.py",
)


def source_stamp(files=SOURCE_FILES):
    """SHA-256 (hex) over the names and contents of ``files``, in order."""
    h = hashlib.sha256()
    for f in files:
        f = Path(f)
        data = f.read_bytes()
        h.update(f.name.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _StampedLocator:
    """numba's cache locator for the function, with the source stamp replaced."""

    def __init__(self, locator, stamp):
        self._locator = locator
        self._stamp = stamp

    def ensure_cache_path(self):
        return self._locator.ensure_cache_path()

    def get_cache_path(self):
        return self._locator.get_cache_path()

    def get_source_stamp(self):
        return ("sklearn_crb-sources-sha256", self._stamp)

    def get_disambiguator(self):
        return self._locator.get_disambiguator()


class _SourceHashCacheImpl(CompileResultCacheImpl):
    def __init__(self, py_func):
        super().__init__(py_func)
        self._locator = _StampedLocator(self._locator, source_stamp())


class _SourceHashCache(FunctionCache):
    _impl_class = _SourceHashCacheImpl


def enable_source_cache(dispatcher):
    """Give a numba dispatcher an on-disk cache stamped with :func:`source_stamp`.

    The same as ``cache=True`` (numba's ``Dispatcher.enable_caching``), except
    for the stamp that decides whether a cached kernel is fresh.
    """
    dispatcher._cache = _SourceHashCache(dispatcher.py_func)
    return dispatcher
