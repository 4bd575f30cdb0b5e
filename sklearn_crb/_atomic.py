"""The one commit protocol: every output file or folder appears whole or not at all.

Used by ``fit``, ``train``, ``simulate``, ``demo`` and every writer of the
package. An output goes through named steps (:data:`STEPS`):

* ``lock``: an exclusive ``flock`` on ``.<name>.sklearn-crb.lock`` next to the
  target (:class:`OutputClaim`); a second writer is refused by name
  (:class:`OutputBusy`), and the kernel drops the lock of a killed process.
  The claim records the target's state and rolls back a killed run's
  leftovers. Commands claim their ``--out`` before any work.
* ``stage``: the writer fills a hidden staging path next to the target.
* ``recheck``: at commit, under the lock, whatever the commit replaces or
  removes must be as it was when claimed; else nothing is written.
* ``journal``, ``move-old``, ``move-new``, ``commit``, ``cleanup``: several
  files into one folder (:func:`atomic_files`) move under a journal whose
  removal is the commit point; a failure before it rolls back at once, a
  ``kill -9`` at the next claim. A whole folder (:func:`atomic_dir`) is
  swapped in by one ``renameat2(RENAME_EXCHANGE)`` (else two renames under a
  journal); a file (:func:`atomic_path`) by one ``os.replace``.

So the target holds the old complete output or the new one, nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import weakref
from pathlib import Path

try:  # POSIX; without it (Windows) locking is skipped and the rest of the protocol still holds
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["atomic_path", "atomic_dir", "atomic_files", "claim_output", "recover", "OutputBusy", "OutputClaim",
           "STEPS", "umask"]

#: The named steps of a commit (:func:`_step` is called with each; tests kill the process there).
STEPS = ("lock", "stage", "recheck", "journal", "move-old", "move-new", "commit", "cleanup")
STAGING = ".sklearn-crb-staging"
LOCK = ".sklearn-crb.lock"
_JOURNAL = "journal.json"

#: Called with each step name when set (the kill-at-every-step tests); None in normal use.
_step_hook = None


def _step(name):
    if _step_hook is not None:
        _step_hook(name)


def umask():
    """The process umask (``os.umask`` can only be read by setting it; restored at once)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


def _suffix(name):
    return next((s for s in (".nii.gz", ".tar.gz") if name.endswith(s)), os.path.splitext(name)[1])


def _abspath(path):
    return Path(os.path.abspath(os.fspath(path)))  # "." has no usable name or parent


def _fsync_dir(folder):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hidden(name, kind=STAGING):
    """The hidden name of target ``name``'s staging or lock, bounded in length whatever ``name`` is."""
    return f".{name[:32]}.{hashlib.sha1(name.encode()).hexdigest()[:8]}{kind}"


def _in_staging(path):
    """A path inside another commit's staging area: that commit locks and moves it."""
    return any(STAGING in part for part in path.parent.parts)


# ------------------------------------------------------------------------------------------ state
def _stat_key(path):
    """What identifies a file's content for the re-check: None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)


def _listing(folder):
    """``{name: _stat_key}`` of a folder's entries, without the protocol's own."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return {n: _stat_key(Path(folder) / n) for n in names if STAGING not in n and not n.endswith(LOCK)}


class OutputBusy(ValueError):
    """Another process is writing the same output path."""


def _lock_file(target):
    """The lock file of ``target``: next to it, or inside an existing folder whose parent is read-only."""
    if target.is_dir() and not os.access(target.parent, os.W_OK | os.X_OK):
        return target / LOCK
    return target.parent / _hidden(target.name, LOCK)


def _acquire(lock_path, target, argname):
    """An fd holding ``flock(LOCK_EX)`` on ``lock_path`` (the classic create/lock/re-stat loop)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = ""
            with contextlib.suppress(OSError, ValueError):
                pid = os.read(fd, 32).decode().strip()
            os.close(fd)
            raise OutputBusy(f"{argname}: {target} is being written by another sklearn-crb process "
                             f"(pid {pid or '?'}); wait for it to finish or choose another path") from None
        # the holder before us may have unlinked the file after we opened it: lock the file that is there
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _release(lock_path, fd, made):
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still locked: a waiting process then re-stats and retries
        os.close(fd)
    for folder in reversed(made):  # what a committed output sits in is not empty: it stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _why_not(path, exc):
    """Why a file cannot be made at ``path``, in the user's terms."""
    base = path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"{base} is not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable (permission denied)"
    return exc.strerror or str(exc)


#: Claims held by this process, by lock file: a commit inside a claimed command reuses its claim.
_HELD = weakref.WeakValueDictionary()


class OutputClaim:
    """An exclusive claim on output ``path`` for a command; ``argname`` (``--out``) is named in messages.

    Holds the lock, recovers a killed run's leftovers and records the target's
    state for the re-check. Released by :meth:`release`, a ``with`` block, or
    garbage collection (a command that fails drops it).
    """

    def __init__(self, path, argname="out"):
        self.path = _abspath(path)
        self.argname = argname
        # folders made for the lock file; removed again at release if still empty
        made = [p for p in self.path.parents if not p.exists()][::-1]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock_path = _lock_file(self.path)
            _step("lock")
            fd = _acquire(self.lock_path, self.path, argname) if fcntl is not None else None
        except BaseException as exc:
            _release(None, None, made)
            if not isinstance(exc, OSError):
                raise
            raise ValueError(f"{argname}: cannot write {self.path}: {_why_not(self.path, exc)}") from None
        self._finalizer = weakref.finalize(self, _release, self.lock_path, fd, made)
        try:
            recover(self.path, _locked=True)
        except BaseException:
            self.release()
            raise
        self.target_state = _stat_key(self.path)
        self.entries = _listing(self.path) if self.path.is_dir() else None
        _HELD[str(self.lock_path)] = self

    def release(self):
        """Drop the lock (idempotent)."""
        if _HELD.get(str(self.lock_path)) is self:
            del _HELD[str(self.lock_path)]
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def changed(self, names=None):
        """Paths that differ from the claim's record: the target itself, or ``names`` inside the folder."""
        if names is not None:
            return [self.path / n for n in names if _stat_key(self.path / n) != (self.entries or {}).get(n)]
        now, then = _stat_key(self.path), self.target_state
        if self.entries is None:  # a file, or nothing: any change of it counts
            return [] if now == then else [self.path]
        same = now is not None and now[:2] == then[:2] and _listing(self.path) == self.entries  # a folder
        return [] if same else [self.path]

    def recheck(self, names=None):
        """Refuse the commit if anything it replaces changed since the claim (``recheck`` step)."""
        _step("recheck")
        changed = self.changed(names)
        if changed:
            raise ValueError(f"{self.argname}: {changed[0]} appeared or changed while this command ran (not "
                             "written by this command); nothing was written, and it was left as it is")


def claim_output(path, argname="out"):
    """Claim ``path`` for this command (see :class:`OutputClaim`); a claim this process holds is reused."""
    held = _HELD.get(str(_lock_file(_abspath(path))))
    return held if held is not None else OutputClaim(path, argname)


def _claimed(path, argname):
    """The command's claim on ``path`` if it made one, else a claim for this block."""
    held = _HELD.get(str(_lock_file(_abspath(path))))
    return contextlib.nullcontext(held) if held is not None else OutputClaim(path, argname)


# ------------------------------------------------------------------------------------------ journal
def _write_journal(folder, record):
    _step("journal")
    tmp = folder / (_JOURNAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / _JOURNAL)
    _fsync_dir(folder)


def _roll_back_files(folder, staging, moves):
    """Undo a multi-file commit: old files back, new ones (those that had no old one) removed."""
    for name, existed in moves:
        backup, target = staging / "old" / name, folder / name
        if backup.exists() or backup.is_symlink():
            os.replace(backup, target)
        elif not existed and not (staging / "new" / name).exists():
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)  # it was moved in: no old file to restore


def recover(path, *, _locked=False):
    """Roll back what a killed commit into ``path`` left (journaled moves undone, staging deleted)."""
    path = _abspath(path)
    if not _locked:
        with OutputClaim(path):
            return
    parent, prefix = path.parent, _hidden(path.name)
    for entry in sorted(os.listdir(parent)) if parent.is_dir() else ():
        if entry.startswith(prefix):
            leftover = parent / entry
            if leftover.is_dir() and (leftover / _JOURNAL).exists():  # a folder swap without RENAME_EXCHANGE
                backup = parent / json.loads((leftover / _JOURNAL).read_text())["backup"]
                if backup.exists() and not os.path.lexists(path):
                    os.rename(backup, path)
            _remove(leftover)
    if path.is_dir() and not path.is_symlink():
        for entry in sorted(os.listdir(path)):
            leftover = path / entry
            if entry.startswith(STAGING) and leftover.is_dir():
                if (leftover / _JOURNAL).exists():
                    record = json.loads((leftover / _JOURNAL).read_text())
                    _roll_back_files(path, leftover, record["moves"])
                _remove(leftover)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ------------------------------------------------------------------------------------------ writers
@contextlib.contextmanager
def atomic_path(path, argname="path"):
    """Yield a staging path next to ``path``; it replaces ``path`` (one ``os.replace``) on success.

    The staging name keeps the suffix (nibabel picks the format from it); a
    ``path`` that changed since it was claimed is not replaced. Permissions:
    ``open()`` under the umask (``mkstemp`` makes 0600).
    """
    path = _abspath(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = contextlib.nullcontext() if _in_staging(path) else _claimed(path, argname)
    with claim as held:
        _step("stage")
        fd, tmp = tempfile.mkstemp(prefix=_hidden(path.name) + ".", suffix=_suffix(path.name),
                                   dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            if held is not None:
                held.recheck()
            _step("commit")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise


def _renameat2(src, dst, flags):
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _swap_in(staging, target):
    """Put the folder ``staging`` at ``target``; the old ``target`` (if any) ends up at ``staging``."""
    _step("move-new")
    if not os.path.lexists(target):
        if not _renameat2(staging, target, _RENAME_NOREPLACE):
            os.rename(staging, target)  # refused by POSIX if target appeared as a non-empty folder
        return
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return
    # no atomic exchange (e.g. NFS): two renames under a journal that the next claim rolls back
    backup = target.parent / f"{staging.name}.old"
    journal = target.parent / f"{staging.name}.journal"
    journal.mkdir()
    _write_journal(journal, {"backup": backup.name})
    _step("move-old")
    os.rename(target, backup)
    try:
        _step("move-new")
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _step("commit")
    _remove(journal)
    os.rename(backup, staging)


@contextlib.contextmanager
def atomic_dir(path, argname="path"):
    """Yield a staging folder next to ``path``; it replaces ``path`` as a whole on success.

    Only if nothing in ``path`` changed since it was claimed; callers check
    first (``io._files.check_output_folder``) that replacing it deletes
    nothing the package did not write. Permissions: ``mkdir()`` under the umask.
    """
    path = _abspath(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not path.is_dir():
        raise ValueError(f"{argname}: {path} exists and is not a folder")
    with _claimed(path, argname) as held:
        _step("stage")
        tmp = Path(tempfile.mkdtemp(prefix=_hidden(path.name) + ".", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~umask())
            held.recheck()
            _swap_in(tmp, path)
        finally:
            try:
                _step("cleanup")
            finally:
                _remove(tmp)  # the staging folder, or the old folder after the swap


@contextlib.contextmanager
def atomic_files(folder, names, *, remove=(), argname="out"):
    """Write several files into ``folder``: yields ``{name: staging path}``; all appear together.

    ``folder`` is created if needed (removed again on failure); every one of ``names`` must be written.
    ``remove``: files of the previous output that this one does not write again (the caller's ownership
    manifest says the package wrote them); removed in the same commit. ``argname`` is named in messages.
    """
    folder = _abspath(folder)
    names = list(dict.fromkeys(names))
    remove = [n for n in dict.fromkeys(remove) if n not in names]
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _claimed(folder, argname) as held:
            _step("stage")
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}.", dir=folder))
            try:
                (staging / "new").mkdir()
                (staging / "old").mkdir()
                yield {n: staging / "new" / n for n in names}
                missing = [n for n in names if not (staging / "new" / n).exists()]
                if missing:
                    raise RuntimeError(f"{argname}: {missing} were not written; nothing was changed")
                for n in names:
                    os.chmod(staging / "new" / n, 0o666 & ~umask())
                held.recheck(names + remove)
                _commit_files(folder, staging, names, remove)
            finally:
                try:
                    _step("cleanup")
                finally:
                    _remove(staging)
    except BaseException:
        if created:  # leave no empty folder behind either
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _commit_files(folder, staging, names, remove):
    """The journal, the moves and the commit point of :func:`atomic_files` (rolled back on any failure)."""
    moves = [(n, os.path.lexists(folder / n)) for n in names] + [(n, True) for n in remove
                                                                  if os.path.lexists(folder / n)]
    _write_journal(staging, {"moves": moves})
    try:
        for n, existed in moves:
            if existed:
                _step("move-old")
                os.rename(folder / n, staging / "old" / n)
        for n in names:
            _step("move-new")
            os.rename(staging / "new" / n, folder / n)
        _step("commit")
        os.remove(staging / _JOURNAL)
        _fsync_dir(folder)
    except BaseException:
        if (staging / _JOURNAL).exists():
            _roll_back_files(folder, staging, moves)
        raise
