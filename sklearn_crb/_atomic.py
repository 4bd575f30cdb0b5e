"""The one atomic writer: every output file or folder appears whole or not at all.

Used by the image and model writers, the CLI and the R2sl table builder. A
writer gets a temporary path next to its target and the target is replaced by
``os.replace`` only after the writer returned, so an exception or Ctrl-C leaves
an existing output as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir", "umask"]


def umask():
    """The process umask (``os.umask`` can only be read by setting it; restored at once)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


def _split_suffix(name):
    for suf in (".nii.gz", ".tar.gz"):
        if name.endswith(suf):
            return name[: -len(suf)], suf
    stem, suf = os.path.splitext(name)
    return stem, suf


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; move it into place on success.

    The temporary name keeps the suffix of ``path`` (writers such as nibabel
    pick the format from it). On an exception the temporary file is removed
    and ``path`` is left untouched. The result has the permissions of an
    ordinary ``open()`` under the process umask (``mkstemp`` makes 0600).
    """
    path = Path(os.path.abspath(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    stem, suf = _split_suffix(path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suf}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory next to ``path``; it replaces ``path`` on success.

    An existing ``path`` directory is replaced only once the new one is
    complete; on an exception the temporary directory is deleted. Callers
    check first (``io._files.check_output_folder``) that replacing ``path``
    deletes nothing the package did not write. The folder gets the
    permissions of an ordinary ``mkdir()`` under the umask (``mkdtemp``: 0700).
    """
    path = Path(os.path.abspath(os.fspath(path)))  # "." has no usable name or parent
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
