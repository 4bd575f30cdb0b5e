"""HDF5 training sets larger than memory: a chunk-by-chunk writer and a lazy row reader.

:func:`write_h5_chunks` writes a training set whose rows arrive chunk by
chunk (from :func:`sklearn_crb.io.datasets.iter_dataset_chunks`) into
datasets pre-sized to ``n_samples`` rows, so the writer holds one chunk at a
time whatever the set's size. It writes into the path it is given: callers
pass the temporary path of :func:`sklearn_crb._atomic.atomic_path`, so an
interrupted run leaves no partial file (see
:func:`sklearn_crb.io.datasets.simulate_to_file`).

:class:`H5Rows` opens such a file lazily and reads only the rows asked for
(:meth:`H5Rows.read`, an index set per training batch), which is what
:class:`sklearn_crb.estimators.net.loaders.PackedRows` needs to train from a set
larger than RAM. The row datasets are contiguous (not chunked, not
compressed): a random batch then costs the bytes of its rows, where a chunked
layout would read a whole chunk per row.

h5py is an optional dependency, imported inside the functions that need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sklearn_crb.io.manifest import RowHasher, make_manifest, verify_dataset

__all__ = ["write_h5_chunks", "H5Rows"]


def write_h5_chunks(path, n_samples, chunks, static):
    """Write ``static`` arrays whole and the row arrays of ``chunks`` chunk by chunk.

    Parameters
    ----------
    path : path-like
        File to write (normally the temporary path of ``atomic_path``).
    n_samples : int
        Total number of rows; every row dataset is created with this length
        when the first chunk arrives.
    chunks : iterable of (slice, dict of ndarray)
        Rows ``slice`` of every row array, in any order, covering
        ``range(n_samples)`` exactly once.
    static : dict of ndarray
        Entries written once (basis, meta). With both ``basis`` and
        ``meta`` the file is a training set and gets its ``manifest``
        (:mod:`sklearn_crb.io.manifest`): the rows are hashed as they arrive
        (read back only if the chunks came out of order).

    Returns
    -------
    int
        Rows written; ``ValueError`` if the chunks did not cover every row.
    """
    import h5py  # optional container; imported only when HDF5 is asked for

    n_samples = int(n_samples)
    with h5py.File(path, "w") as f:
        for k, v in static.items():
            f.create_dataset(k, data=v)
        dsets, hashers, written = _write_chunks(f, n_samples, chunks)
        if written != n_samples:
            raise ValueError(f"the chunks held {written} rows, expected {n_samples}")
        if "basis" in static and "meta" in static:  # a training set: bind its basis and meta to its rows
            f.create_dataset("manifest", data=make_manifest(static["basis"], static["meta"], n_samples,
                                                            _row_hashes(dsets, hashers, n_samples)))
    return written


def _write_chunks(f, n_samples, chunks):
    """Write the chunks into pre-sized datasets, hashing the rows while they arrive in order."""
    dsets, hashers, written = None, {}, 0
    for sl, part in chunks:
        if dsets is None:
            dsets = {k: f.create_dataset(k, shape=(n_samples,) + np.shape(v)[1:], dtype=np.asarray(v).dtype)
                     for k, v in part.items()}
            hashers = {k: RowHasher(d.dtype, d.shape[1:]) for k, d in dsets.items()}
        if set(part) != set(dsets):
            raise ValueError(f"chunk {sl} has the entries {sorted(part)}, expected {sorted(dsets)}")
        for k, v in part.items():
            dsets[k][sl] = v
            h = hashers.get(k)
            if h is not None and h.rows == sl.start:
                h.update(v)
            else:  # out of order: hashed from the file at the end
                hashers.pop(k, None)
        written += sl.stop - sl.start
    return dsets or {}, hashers, written


def _row_hashes(dsets, hashers, n_samples):
    """SHA-256 per row dataset: streamed where the chunks came in order, else read back block by block."""
    out = {}
    for k, d in dsets.items():
        h = hashers.get(k)
        if h is None or h.rows != n_samples:
            h = RowHasher(d.dtype, d.shape[1:])
            for start in range(0, n_samples, 65536):
                h.update(d[start:start + 65536])
        out[k] = h.hexdigest()
    return out


class H5Rows:
    """Lazy row access to the per-sample arrays of an HDF5 training set.

    Parameters
    ----------
    path : path-like
        An HDF5 file with 1-D or 2-D datasets of one common length (the
        per-sample arrays) and possibly others (basis, meta), which are
        ignored here.
    keys : sequence of str, optional
        Row arrays to expose (default: every dataset with the common length
        of ``X``).
    argname : str
        Name used in error messages.
    verify_rows : bool, default False
        For a training set (a file with ``basis`` and ``meta``), also hash
        every row against the manifest (one pass over the file). The basis,
        the meta and the size are always checked against it
        (:func:`sklearn_crb.io.manifest.verify_dataset`), and a set without a
        manifest is refused with a message naming ``sklearn-crb migrate-data``.

    Notes
    -----
    The file is opened on first use and reopened after unpickling (an h5py
    handle cannot be sent to a worker process), read-only. Nothing in the
    file is executed: only numeric datasets are read.
    """

    def __init__(self, path, keys=None, argname="data", verify_rows=False):
        import h5py  # optional container

        self.path = Path(os.path.abspath(os.fspath(path)))
        self.argname = argname
        if not self.path.is_file():
            raise FileNotFoundError(f"{argname}: file not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                if "X" not in f or not isinstance(f["X"], h5py.Dataset) or f["X"].ndim != 2:
                    raise ValueError("it has no 2-D dataset 'X'")
                n = f["X"].shape[0]
                found = [k for k in f.keys() if isinstance(f[k], h5py.Dataset) and f[k].ndim in (1, 2)
                         and f[k].shape[0] == n and f[k].dtype.kind in "fciub"]
                keys = found if keys is None else list(keys)
                missing = [k for k in keys if k not in found]
                if missing:
                    raise ValueError(f"it has no per-sample numeric arrays {missing} (found {found})")
                self.shapes = {k: f[k].shape[1:] for k in keys}
                is_set = "basis" in f and "meta" in f
                self.dtypes = {k: f[k].dtype for k in keys}
        except ValueError as exc:
            raise ValueError(f"{argname}: {self.path}: {exc}") from exc
        except OSError as exc:
            raise ValueError(f"{argname}: {self.path} is truncated or not HDF5 ({exc})") from exc
        if is_set:  # a training set: its basis and meta must be the ones its rows were simulated with
            verify_dataset(self.path, verify_rows=verify_rows, argname=argname)
        self.keys = tuple(keys)
        self.n = int(n)
        self._file = None

    def __len__(self):
        return self.n

    def __repr__(self):
        return f"H5Rows({str(self.path)!r}, n={self.n}, keys={list(self.keys)})"

    def _handle(self):
        if self._file is None or not self._file.id.valid:
            import h5py  # optional container

            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self):
        """Close the file handle (it is reopened on the next read)."""
        if self._file is not None and self._file.id.valid:
            self._file.close()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _check_keys(self, keys):
        keys = self.keys if keys is None else tuple(keys)
        bad = [k for k in keys if k not in self.keys]
        if bad:
            raise KeyError(f"{self.argname}: no per-sample arrays {bad}; available: {list(self.keys)}")
        return keys

    def read(self, keys=None, idx=None):
        """Rows ``idx`` (any order, repeats allowed) of the arrays ``keys``, as a dict of ndarrays.

        The index set is sorted and de-duplicated for HDF5 (which reads
        increasing indices only) and the rows are put back in the order asked
        for, so ``read(keys, idx)[k]`` equals ``in_memory[k][idx]``.
        """
        keys = self._check_keys(keys)
        if idx is None:
            return self.read_slice(keys, 0, self.n)
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"idx must be a 1-D array of row indices, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"row index out of range for {self.n} rows")
        idx = np.where(idx < 0, idx + self.n, idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        f = self._handle()
        out = {}
        for k in keys:
            if uniq.size == 0:
                out[k] = np.empty((0,) + self.shapes[k], self.dtypes[k])
                continue
            lo, hi = int(uniq[0]), int(uniq[-1]) + 1
            if hi - lo <= 2 * uniq.size:  # dense: one contiguous read is faster than a point selection
                rows = f[k][lo:hi][uniq - lo]
            else:
                rows = f[k][uniq]
            out[k] = rows[inverse]
        return out

    def read_slice(self, keys=None, start=0, stop=None):
        """Rows ``start:stop`` of the arrays ``keys`` (one contiguous read each)."""
        keys = self._check_keys(keys)
        stop = self.n if stop is None else stop
        f = self._handle()
        return {k: f[k][start:stop] for k in keys}

    def iter_slices(self, keys=None, block=65536):
        """``(slice, rows)`` over the whole set, ``block`` rows at a time (for chunk-wise statistics)."""
        block = int(block)
        if block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        for start in range(0, self.n, block):
            stop = min(self.n, start + block)
            yield slice(start, stop), self.read_slice(keys, start, stop)
