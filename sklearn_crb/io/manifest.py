"""The manifest of a training set: its format version and the hashes that tie its basis and meta to its samples.

A training set (:mod:`sklearn_crb.io.datasets`) holds per-sample arrays (``X``,
``y``, ``crb``...) and, once per set, the compression ``basis`` and a JSON
``meta`` record (sequence, estimated parameters, ``tied_R1``, SNR range...).
A network trained on the set records that basis and meta as its own, so a
set whose basis was swapped, or whose ``meta`` says ``tied_R1`` where the
samples were simulated without it, trains a model that describes itself
wrongly, and ``fit`` then applies it. The manifest, one more entry
``manifest`` (UTF-8 JSON bytes) in the same container, binds them::

    {"format": "sklearn-crb-training-set", "format_version": 1, "n_samples": n,
     "basis_sha256": ..., "meta_sha256": ..., "rows_sha256": {"X": ..., "y": ..., ...}}

``basis_sha256`` is the hash of the basis as little-endian complex128 with
its shape (as :func:`sklearn_crb.io.models.basis_sha256`), ``meta_sha256``
that of the stored ``meta`` bytes, and ``rows_sha256`` that of every
per-sample array (dtype, trailing shape, then its rows in order). The writer
of HDF5 sets (:func:`sklearn_crb.io.h5.write_h5_chunks`) hashes the rows as
they stream in; :func:`with_manifest` adds the manifest to a set held in
memory (``.npz``).

Checks: :func:`check_manifest` (basis, meta and row count; the rows too when
they are given) and :func:`verify_dataset` (a whole file, rows included). A
set written before manifests existed is refused with a message that names
:func:`migrate_dataset` (``sklearn-crb migrate-data``), which a user runs once
on sets they trust; it writes a new file and never changes the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from sklearn_crb._atomic import atomic_path
from sklearn_crb._validation import basis_sha256
from sklearn_crb.io._files import check_output_file

__all__ = ["DATASET_FORMAT", "DATASET_FORMAT_VERSION", "RowHasher", "rows_sha256", "make_manifest", "with_manifest",
           "check_manifest", "verify_dataset", "migrate_dataset", "per_sample_keys"]

DATASET_FORMAT = "sklearn-crb-training-set"
#: 1: the first version with a manifest (sets written before it have neither, and are refused until migrated).
DATASET_FORMAT_VERSION = 1
#: Rows hashed per read when a whole set is verified (bounded memory).
_BLOCK = 65536
_MIGRATE = ("if you trust it, convert it once with `sklearn-crb migrate-data FILE --out NEW_FILE` (Python: "
            "sklearn_crb.io.manifest.migrate_dataset), or simulate it again with `sklearn-crb simulate`")


def _meta_bytes(meta):
    """The stored bytes of ``meta`` (``.npz`` gives a 0-d array, HDF5 ``bytes``)."""
    if isinstance(meta, np.ndarray) and meta.ndim == 0:
        meta = meta.item()
    if isinstance(meta, str):
        return meta.encode("utf-8")
    if isinstance(meta, (bytes, np.bytes_)):
        return bytes(meta)
    raise ValueError(f"'meta' must be one JSON string, got {type(meta).__name__}")


class RowHasher:
    """SHA-256 of one per-sample array, fed its rows in order (chunk by chunk)."""

    def __init__(self, dtype, row_shape):
        self.dtype = np.dtype(dtype)
        self._h = hashlib.sha256(f"{self.dtype.str}{tuple(row_shape)}".encode())
        self.rows = 0

    def update(self, rows):
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self._h.update(rows.tobytes())
        self.rows += len(rows)

    def hexdigest(self):
        return self._h.hexdigest()


def per_sample_keys(data):
    """The per-sample arrays of a set in memory: 1-D or 2-D numeric arrays with one row per row of ``X``."""
    n = len(data["X"])
    return sorted(k for k, v in data.items() if k not in ("basis", "meta", "manifest") and isinstance(v, np.ndarray)
                  and v.ndim in (1, 2) and len(v) == n and v.dtype.kind in "fciub")


def rows_sha256(arrays):
    """``{key: sha256}`` of whole per-sample arrays."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        h = RowHasher(v.dtype, v.shape[1:])
        h.update(v)
        out[k] = h.hexdigest()
    return out


def make_manifest(basis, meta, n_samples, row_hashes):
    """The manifest entry (``np.bytes_`` of JSON) of a set with this basis, meta, size and row hashes."""
    return np.bytes_(json.dumps({
        "format": DATASET_FORMAT, "format_version": DATASET_FORMAT_VERSION, "n_samples": int(n_samples),
        "basis_sha256": basis_sha256(basis), "meta_sha256": hashlib.sha256(_meta_bytes(meta)).hexdigest(),
        "rows_sha256": dict(sorted(row_hashes.items()))}))


def with_manifest(data):
    """``data`` (a set in memory: per-sample arrays, ``basis``, ``meta``) with its ``manifest`` added.

    For writers of whole sets (``io.datasets.save_dataset``); the streamed
    HDF5 writer adds it itself.
    """
    keys = per_sample_keys(data)
    manifest = make_manifest(data["basis"], data["meta"], len(data["X"]), rows_sha256({k: data[k] for k in keys}))
    return {**{k: v for k, v in data.items() if k != "manifest"}, "manifest": manifest}


def _parse(manifest, where):
    if manifest is None:
        raise ValueError(f"{where} has no manifest (it was written before sklearn-crb 0.2): nothing ties its basis "
                         "and meta to its samples; " + _MIGRATE)
    try:
        m = json.loads(_meta_bytes(manifest).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}: its 'manifest' is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(m, dict) or m.get("format") != DATASET_FORMAT:
        raise ValueError(f"{where}: its 'manifest' is not a {DATASET_FORMAT} manifest")
    version = m.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= DATASET_FORMAT_VERSION):
        raise ValueError(f"{where}: training-set format version {version!r:.20} was never written by this "
                         f"package (it writes 1 to {DATASET_FORMAT_VERSION}); upgrade sklearn-crb if it is newer")
    if not (isinstance(m.get("rows_sha256"), dict) and isinstance(m.get("n_samples"), int)):
        raise ValueError(f"{where}: its 'manifest' lacks 'rows_sha256' or 'n_samples'")
    return m


def check_manifest(manifest, basis, meta, *, n_samples, where, rows=None):
    """Refuse a set whose basis, meta, size (or rows, when given) do not match its manifest.

    Parameters
    ----------
    manifest : bytes, 0-d array or None
        The stored ``manifest`` entry (None: the set has none).
    basis, meta
        The stored ``basis`` and ``meta`` (as stored: bytes or a 0-d array).
    n_samples : int
        Rows of the per-sample arrays.
    where : str
        How messages name the set (``"--data: train.h5"``).
    rows : dict of ndarray, optional
        Whole per-sample arrays to check against ``rows_sha256``.

    Returns
    -------
    dict
        The parsed manifest.

    Raises
    ------
    ValueError
        Naming what does not match (``basis``, ``meta`` with ``tied_R1``..., the rows).
    """
    m = _parse(manifest, where)
    if basis_sha256(basis) != m.get("basis_sha256"):
        raise ValueError(f"{where}: its 'basis' does not match the manifest: the basis was replaced after the set "
                         "was simulated; a network trained on it would record the wrong basis")
    if hashlib.sha256(_meta_bytes(meta)).hexdigest() != m.get("meta_sha256"):
        raise ValueError(f"{where}: its 'meta' (estimate, tied_R1, SNR, sequence...) does not match the manifest: it "
                         "was changed after the set was simulated")
    if int(n_samples) != m["n_samples"]:
        raise ValueError(f"{where} has {n_samples} samples but its manifest records {m['n_samples']}")
    for k, v in (rows or {}).items():
        want = m["rows_sha256"].get(k)
        if want is None or rows_sha256({k: v})[k] != want:
            raise ValueError(f"{where}: the per-sample array {k!r} does not match the manifest (changed or from "
                             "another set)")
    return m


def _read_h5(path, where, verify_rows):
    import h5py  # optional container

    with h5py.File(path, "r") as f:
        for key in ("X", "basis", "meta"):
            if key not in f:
                raise ValueError(f"{where} lacks {key!r}; it is not a training set")
        manifest = f["manifest"][()] if "manifest" in f else None
        m = check_manifest(manifest, f["basis"][()], f["meta"][()], n_samples=f["X"].shape[0], where=where)
        if verify_rows:
            _check_h5_rows(f, m, where)
    return m


def _check_h5_rows(f, m, where):
    """Every hashed per-sample array of an open HDF5 set against the manifest, ``_BLOCK`` rows at a time."""
    for k, want in m["rows_sha256"].items():
        if k not in f:
            raise ValueError(f"{where}: the per-sample array {k!r} of the manifest is missing")
        d = f[k]
        h = RowHasher(d.dtype, d.shape[1:])
        for start in range(0, d.shape[0], _BLOCK):
            h.update(d[start:start + _BLOCK])
        if h.hexdigest() != want:
            raise ValueError(f"{where}: the per-sample array {k!r} does not match the manifest (changed or from "
                             "another set)")


def verify_dataset(path, *, verify_rows=True, argname="data"):
    """Check a training-set file (``.npz`` or HDF5) against its manifest; return the manifest.

    HDF5 sets are read block by block (bounded memory); ``verify_rows=False``
    checks only the basis, the meta and the size (no pass over the samples).
    """
    path = Path(os.fspath(path))
    where = f"{argname}: {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{argname}: file not found: {path}")
    if path.suffix.lower() in (".h5", ".hdf5"):
        return _read_h5(path, where, verify_rows)
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    for key in ("X", "basis", "meta"):
        if key not in data:
            raise ValueError(f"{where} lacks {key!r}; it is not a training set")
    rows = {k: data[k] for k in per_sample_keys(data)} if verify_rows else None
    return check_manifest(data.get("manifest"), data["basis"], data["meta"], n_samples=len(data["X"]), where=where,
                          rows=rows)


def _has_valid_manifest(path):
    try:
        verify_dataset(path, verify_rows=False)
    except (OSError, ValueError):
        return False
    return True


def migrate_dataset(path, out, *, overwrite=False, argname="out"):
    """Write a copy of a training set written before manifests, with its manifest (a new file).

    Only for sets you trust: the manifest records the basis, meta and
    samples as they are now. HDF5 sets are copied and hashed block by block
    (memory does not grow with the set); ``.npz`` sets are read whole.
    ``path`` is never changed; ``out`` must have the same suffix, and an
    existing ``out`` is replaced only with ``overwrite=True`` and only if it
    is itself a training set with a manifest.

    Returns
    -------
    pathlib.Path
    """
    path, out = Path(os.fspath(path)), Path(os.fspath(out))
    if path.suffix.lower() != out.suffix.lower():
        raise ValueError(f"{argname} must have the suffix of the set ({path.suffix}), got {out.name}")
    if os.path.abspath(out) == os.path.abspath(path):
        raise ValueError(f"{argname}: the migrated set goes to a new file, not to the old one")
    try:
        verify_dataset(path, verify_rows=False)
    except ValueError as exc:
        if "has no manifest" not in str(exc):
            raise
    else:
        raise ValueError(f"data: {path} already has a manifest; there is nothing to migrate")
    out = check_output_file(out, overwrite=overwrite, owned=_has_valid_manifest, argname=argname)
    with atomic_path(out) as tmp:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            with open(tmp, "wb") as f:  # a file object: savez must not append ".npz" to the temporary name
                np.savez_compressed(f, **with_manifest(data))
        else:
            _migrate_h5(path, tmp)
    return out


def _migrate_h5(path, tmp):
    import h5py  # optional container

    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "r+") as f:
        n = f["X"].shape[0]
        keys = sorted(k for k in f.keys() if k not in ("basis", "meta") and isinstance(f[k], h5py.Dataset)
                      and f[k].ndim in (1, 2) and f[k].shape[0] == n and f[k].dtype.kind in "fciub")
        hashes = {}
        for k in keys:
            h = RowHasher(f[k].dtype, f[k].shape[1:])
            for start in range(0, n, _BLOCK):
                h.update(f[k][start:start + _BLOCK])
            hashes[k] = h.hexdigest()
        f.create_dataset("manifest", data=make_manifest(f["basis"][()], f["meta"][()], n, hashes))
