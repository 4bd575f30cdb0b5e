"""The simulated training-set format of ``sklearn-crb simulate``/``train``.

A training set holds, per sample, the noisy compressed features ``X``
(``[Re c, Im c]``), the targets ``y``, their CRB ``crb`` at the sample's
SNR, the noise-free features ``X_clean`` and the CRB at ``M0 = 1, sigma =
1`` (``crb_unit``), which is what the noise augmentation of Zhang et al.
(MRM 2022, Sec. 2.3) rescales every epoch; and once per set the basis and a
JSON ``meta`` record (sequence with its SHA-256, estimated parameters, tied
R1, SNR range, noise level, prior).

Two containers hold the same arrays: NumPy ``.npz`` (read with
``allow_pickle=False``) and HDF5 (``.h5``/``.hdf5``). ``meta`` is stored as
UTF-8 bytes in both.

Large sets (:func:`simulate_to_file`, ``sklearn-crb simulate``): the
chunks of :mod:`sklearn_crb.parallel_simulation` (seeded, computed in
parallel) are written as they arrive, in order, through the commit protocol
(:mod:`sklearn_crb._atomic`). HDF5 is streamed, with memory that does not
grow with ``n_samples``; training reads it lazily (:func:`open_dataset`,
:class:`sklearn_crb.io.h5.H5Rows`). ``.npz`` is gathered in memory. Before
anything is simulated the size is checked (:func:`check_dataset_size`):
against the free disk space, and for ``.npz`` against the available memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from sklearn_crb._atomic import atomic_path
from sklearn_crb.io._files import check_output_file
from sklearn_crb.io.manifest import check_manifest, per_sample_keys, with_manifest
from sklearn_crb.io.h5 import H5Rows, write_h5_chunks
from sklearn_crb.estimators.net.measured import resolve_measured
from sklearn_crb.parallel_simulation import _check_chunking, iter_dataset_chunks, row_nbytes, simulate_dataset
from sklearn_crb.physics.parameters import resolve_estimate
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator

__all__ = ["SUFFIXES", "REQUIRED", "save_dataset", "load_dataset", "is_dataset", "simulate_dataset",
           "iter_dataset_chunks", "simulate_to_file", "open_dataset", "dataset_meta", "simulator_from_dataset",
           "dataset_measured", "check_dataset_size", "dataset_nbytes"]

#: File suffixes of the two containers.
SUFFIXES = (".npz", ".h5", ".hdf5")
#: Entries every training set has.
REQUIRED = ("X", "y", "crb", "basis", "meta")
_META_KEYS = {"estimate": list, "tied_R1": bool, "snr": list, "sigma": (int, float), "sequence": dict}


def _check_suffix(path, argname):
    if Path(path).suffix.lower() not in SUFFIXES:
        raise ValueError(f"{argname} must end in .npz, .h5 or .hdf5, got {Path(path).name}")


def save_dataset(path, data, *, overwrite=False, argname="out"):
    """Write a training set atomically (``.npz`` or HDF5 by suffix).

    An existing file is replaced only with ``overwrite=True`` and only if it
    is itself a training set (:func:`is_dataset`).
    """
    _check_suffix(path, argname)
    path = check_output_file(path, overwrite=overwrite, owned=is_dataset, argname=argname)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"data lacks {missing}")
    data = with_manifest(data)  # the format version and the hashes that tie basis and meta to the rows
    with atomic_path(path, argname=argname) as tmp:
        if path.suffix.lower() == ".npz":
            with open(tmp, "wb") as f:  # a file object: savez must not append ".npz" to the temporary name
                np.savez_compressed(f, **data)
        else:
            import h5py  # optional container; imported only when HDF5 is asked for

            with h5py.File(tmp, "w") as f:
                for k, v in data.items():
                    f.create_dataset(k, data=v)
    return path


def _parse_meta(meta, path):
    if isinstance(meta, np.ndarray):  # .npz gives a 0-d bytes/str array
        if meta.ndim != 0:
            raise ValueError(f"data: {path}: 'meta' must be one JSON string, got an array of shape {meta.shape}")
        meta = meta.item()
    if isinstance(meta, bytes):
        meta = meta.decode("utf-8", errors="strict")
    if not isinstance(meta, str):
        raise ValueError(f"data: {path}: 'meta' must be a JSON string, got {type(meta).__name__}")
    try:
        meta = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data: {path}: 'meta' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"data: {path}: 'meta' must be a JSON object, got {type(meta).__name__}")
    for key, typ in _META_KEYS.items():
        if key not in meta:
            raise ValueError(f"data: {path}: 'meta' lacks the key {key!r}")
        if not isinstance(meta[key], typ):
            raise ValueError(f"data: {path}: 'meta'[{key!r}] has the wrong type {type(meta[key]).__name__}")
    return meta


def load_dataset(path, argname="data"):
    """Read a training set written by :func:`save_dataset` (``.npz`` or HDF5).

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and what is wrong with it.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"{argname}: file not found: {path}")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            import h5py  # optional container

            with h5py.File(path, "r") as f:
                data = {k: f[k][()] for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise ValueError(f"{argname}: {path} is truncated or not a training set ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{argname}: {path} lacks {missing}; write it with `sklearn-crb simulate`")
    n_rows = len(data["X"]) if np.ndim(data["X"]) >= 1 else 0
    check_manifest(data.get("manifest"), data["basis"], data["meta"], n_samples=n_rows, where=f"{argname}: {path}",
                   rows={k: data[k] for k in per_sample_keys(data)})
    data["meta"] = _parse_meta(data["meta"], path)
    n = len(data["X"]) if np.ndim(data["X"]) == 2 else -1
    for k in ("X", "y", "crb"):
        arr = data[k]
        if arr.ndim != 2 or len(arr) != n or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{argname}: {path}: {k!r} must be a 2-D float array with one row per sample, "
                             f"got {arr.dtype} {arr.shape}")
    return data


def is_dataset(path):
    """Whether ``path`` is a readable training set (so the package wrote it)."""
    try:
        load_dataset(path)
    except (OSError, ValueError):
        return False
    return True


def _available_memory():
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to tell: do not refuse
        return None


def _gb(nbytes):
    return f"{nbytes / 1e9:.3g} GB"


def dataset_nbytes(n_samples, rank, n_targets):
    """Bytes of the per-sample arrays of a simulated set (``n_samples`` rows, basis ``rank``, ``n_targets``)."""
    return int(n_samples) * row_nbytes(rank, n_targets)


def _first_existing(path):
    p = Path(os.path.abspath(os.fspath(path)))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_dataset_size(path, n_samples, rank, n_targets, *, argname="out", n_samples_arg="n_samples"):
    """Refuse a set that cannot fit before anything is simulated or allocated.

    HDF5 needs the free disk space of its folder (its datasets are pre-sized
    to ``n_samples`` rows); ``.npz`` is gathered in memory (about twice its
    size while its chunks are joined) and then compressed to disk.

    Raises
    ------
    ValueError
        Naming ``n_samples_arg`` (``--n-samples`` from the CLI), the bytes
        needed and the bytes there are.
    """
    need = dataset_nbytes(n_samples, rank, n_targets)
    free = shutil.disk_usage(_first_existing(Path(path).parent)).free
    if need > free:
        raise ValueError(f"{n_samples_arg} {n_samples}: the training set needs {_gb(need)} on disk but "
                         f"{_first_existing(Path(path).parent)} has {_gb(free)} free; use fewer samples or write "
                         f"{argname} on a larger disk")
    if Path(path).suffix.lower() == ".npz":
        avail = _available_memory()
        if avail is not None and 2 * need > avail:
            raise ValueError(f"{n_samples_arg} {n_samples}: a .npz training set is held in memory (about "
                             f"{_gb(2 * need)} for this one) but {_gb(avail)} is available; write {argname} as .h5 "
                             "(streamed to disk) or use fewer samples")
    return need


def simulate_to_file(path, simulator, n_samples, random_state=0, *, chunk=500, n_jobs=None, prior=None,
                     overwrite=False, progress=True, argname="out", measured=(), n_samples_arg="n_samples"):
    """Simulate a training set straight into ``path`` (``.npz`` in memory, HDF5 streamed).

    ``measured``: recorded in the set's ``meta`` (:func:`dataset_meta`); the simulator's CRBs must hold them
    known (``nuisance`` without them).

    HDF5 (``.h5``/``.hdf5``): the chunks of :func:`iter_dataset_chunks` are
    written as they arrive into pre-sized datasets, so the memory of this
    process does not grow with ``n_samples``. Both containers go through the
    atomic writer: the file appears whole at the end, and an exception or
    Ctrl-C leaves no partial file and an existing ``path`` untouched. An
    existing file is replaced only with ``overwrite=True`` and only if it is
    itself a training set. ``.npz`` gathers the whole set first (small sets).
    The size is checked first (:func:`check_dataset_size`; ``n_samples_arg``
    is the name its message gives ``n_samples``).

    Returns
    -------
    pathlib.Path
    """
    _check_suffix(path, argname)
    _check_chunking(n_samples, chunk)
    path = check_output_file(path, overwrite=overwrite, owned=is_dataset, argname=argname)
    check_dataset_size(path, n_samples, simulator.basis_.shape[1], len(simulator.estimate_), argname=argname,
                       n_samples_arg=n_samples_arg)
    static = {"basis": simulator.basis_, "meta": dataset_meta(simulator, prior=prior, measured=measured)}
    if path.suffix.lower() == ".npz":
        data = simulate_dataset(simulator, n_samples, random_state, chunk, progress, n_jobs)
        return save_dataset(path, {**data, **static}, overwrite=overwrite, argname=argname)
    chunks = iter_dataset_chunks(simulator, n_samples, random_state, chunk, n_jobs, progress)
    with atomic_path(path, argname=argname) as tmp:
        write_h5_chunks(tmp, n_samples, chunks, static)
    return path


def open_dataset(path, keys=None, argname="data"):
    """A lazy HDF5 training set: ``(rows, static)`` without reading the per-sample arrays.

    ``rows`` is an :class:`~sklearn_crb.io.h5.H5Rows` (``len(rows)``,
    ``rows.read(keys, idx)``); ``static`` holds ``basis`` and the parsed
    ``meta`` (what :func:`simulator_from_dataset` needs). ``.npz`` sets are
    refused: load them with :func:`load_dataset`.
    """
    path = Path(os.fspath(path))
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ValueError(f"{argname}: a lazy training set must be HDF5 (.h5/.hdf5), got {path.name}; "
                         "load .npz sets with load_dataset")
    rows = H5Rows(path, keys=keys, argname=argname)
    missing = [k for k in ("y", "crb") if k not in rows.keys]
    if missing:
        raise ValueError(f"{argname}: {path} lacks the per-sample arrays {missing}; write it with "
                         "`sklearn-crb simulate`")
    try:
        import h5py  # optional container

        with h5py.File(path, "r") as f:
            static = {"basis": f["basis"][()], "meta": f["meta"][()]}
    except (OSError, KeyError) as exc:
        raise ValueError(f"{argname}: {path} lacks 'basis'/'meta' or is unreadable ({exc})") from exc
    static["meta"] = _parse_meta(static["meta"], path)
    return rows, static


def dataset_meta(simulator, prior=None, measured=()):
    """The ``meta`` record of a training set simulated by a fitted ``simulator``, as bytes.

    ``measured``: parameters a network trained on the set takes as inputs (its CRBs hold them known).
    """
    seq = simulator.sequence_
    return np.bytes_(json.dumps({
        "estimate": list(simulator.estimate_), "tied_R1": bool(simulator.tied_R1), "snr": list(simulator.snr),
        "sigma": simulator.sigma, "prior": prior, "sequence": seq.to_dict(),
        "nuisance": simulator.nuisance if isinstance(simulator.nuisance, str) or simulator.nuisance is None
        else list(simulator.nuisance), "measured": list(measured),
        "sequence_sha256": seq.sha256(), "fill_values": simulator.prior_.center().tolist(),
        "basis_method": getattr(simulator, "basis_method_", "svd")}))


def simulator_from_dataset(data):
    """The fitted simulator a training set was made with (its sequence, basis, SNR and prior)."""
    meta = data["meta"]
    seq = Sequence.from_dict(meta["sequence"])
    if "sequence_sha256" in meta and seq.sha256() != meta["sequence_sha256"]:
        raise ValueError("data: the sequence in 'meta' does not match its SHA-256 (corrupt training set)")
    nuis = meta.get("nuisance", "all")
    if not (nuis is None or nuis == "all" or (isinstance(nuis, list) and all(isinstance(p, str) for p in nuis))):
        raise ValueError(f"data: 'meta'['nuisance'] must be \"all\", null or a list of parameter names, "
                         f"got {nuis!r:.80}")
    if isinstance(nuis, list):
        nuis = resolve_estimate(tuple(nuis), bool(meta["tied_R1"]), "data: 'meta'['nuisance']", times=False) \
            if nuis else ()
    return MTFingerprintSimulator(seq, basis=data["basis"], estimate=tuple(meta["estimate"]),
                                  snr=tuple(meta["snr"]), sigma=meta["sigma"], tied_R1=meta["tied_R1"],
                                  prior=meta.get("prior"), nuisance=nuis).fit()


def dataset_measured(data):
    """The parameters a training set's networks take as measured inputs (``meta``'s ``"measured"``; checked)."""
    meta = data["meta"]
    measured = meta.get("measured", [])
    if not (isinstance(measured, list) and all(isinstance(p, str) for p in measured)):
        raise ValueError(f"data: 'meta'['measured'] must be a list of parameter names, got {measured!r:.80}")
    return resolve_measured(tuple(measured), tuple(meta["estimate"]), bool(meta["tied_R1"]),
                            argname="data: 'meta'['measured']")
