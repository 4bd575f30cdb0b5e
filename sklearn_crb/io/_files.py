"""Output policy on top of the one atomic writer (:mod:`sklearn_crb._atomic`).

* Every output appears whole or not at all, with the umask's permissions
  (``atomic_path``/``atomic_dir``).
* Nothing the package did not write is replaced or deleted: an existing
  output is replaced only when asked to (``overwrite=True``) *and* when it is
  recognisably one of the package's own outputs (``owned``).
* Several files written into one folder are staged next to their targets
  and moved into place together, under a journal (``atomic_files``).
* A command claims its output path before any work (``claim_output``): a
  second command into the same path is refused by name, and the commit
  re-checks that nothing it replaces changed meanwhile.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sklearn_crb._atomic import _HELD, atomic_files, atomic_path, claim_output

__all__ = ["atomic_files", "atomic_path", "claim_output", "releases_claims", "check_output_file",
           "check_output_folder", "check_file_name"]


def _first_existing(path):
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_parent(path, argname):
    base = _first_existing(Path(path).parent)
    if not base.is_dir():
        raise ValueError(f"{argname}: cannot create {path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{argname}: cannot write to {base} (permission denied)")


def check_file_name(name, argname):
    """Refuse a file-name part (e.g. a prefix) that could leave its folder."""
    name = str(name)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps) or "\0" in name or name in (".", ".."):
        raise ValueError(f"{argname} must be a plain file-name prefix without path separators, got {name!r}")
    return name


def check_output_file(path, *, overwrite=False, owned=None, argname="out"):
    """Refuse an output file that exists (unless ``overwrite`` and ``owned(path)``).

    ``owned`` is a predicate saying whether an existing file was written by
    the package (for example a readable training set); without it nothing
    existing may be replaced.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if path.is_dir():
        raise ValueError(f"{argname}: {path} is a folder, expected a file path")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise ValueError(f"{argname}: {path} exists; pass --overwrite to replace it")
        if owned is None or not owned(path):
            raise ValueError(f"{argname}: {path} exists and was not written by sklearn-crb; refusing to replace it")
    _check_writable_parent(path, argname)
    return path


def check_output_folder(path, *, overwrite=False, owned_names=(), marker=None, argname="out"):
    """Refuse an output folder that holds anything the package did not write.

    An empty folder may be filled. A non-empty one may be replaced only with
    ``overwrite`` and only if every entry is one of ``owned_names`` and
    ``marker`` (a file name) is among them. The current folder and its
    parents are never replaced.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argname}: {path} exists and is not a folder")
    if path.is_dir():
        cwd = Path.cwd().resolve()
        if path.resolve() == cwd or path.resolve() in cwd.parents:
            raise ValueError(f"{argname}: {path} is the current folder or one of its parents; give a new folder")
        entries = set(os.listdir(path))
        if entries:
            foreign = sorted(entries - set(owned_names))
            if foreign or (marker is not None and marker not in entries):
                raise ValueError(f"{argname}: {path} is not empty and not an sklearn-crb output "
                                 f"(it holds {foreign[:3] or sorted(entries)[:3]}); refusing to replace it")
            if not overwrite:
                raise ValueError(f"{argname}: {path} exists; pass --overwrite to replace it")
    _check_writable_parent(path, argname)
    return path


def releases_claims(fn):
    """Decorator of a command: the claims it makes are released when it returns or raises.

    Not left to garbage collection: an exception's traceback can keep the command's frame, and so its
    claim and lock, alive until the cycle collector runs.
    """
    @functools.wraps(fn)
    def command(*args, **kwargs):
        before = set(_HELD.keys())
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_HELD.keys()) - before:
                claim = _HELD.get(key)
                if claim is not None:
                    claim.release()
    return command
