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

Large sets (:func:`simulate_to_file`, ``sklearn-crb simulate``): the set is
cut into chunks of ``chunk`` samples, each drawn from its own seed
``SeedSequence(random_state).spawn(n_chunks)[i]`` and computed through joblib
(so ``joblib.parallel_config(backend="dask")`` puts them on a dask cluster);
the result is bitwise the same for any number of workers and any backend,
and is fixed by ``(random_state, chunk, n_samples)``. HDF5 outputs are
written chunk by chunk as the results arrive, in order, through the atomic
writer, with memory that does not grow with ``n_samples``; training reads
them lazily (:func:`open_dataset`, :class:`sklearn_crb.io.h5.H5Rows`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from sklearn_crb._atomic import atomic_path
from sklearn_crb.io._files import check_output_file
from sklearn_crb.io.h5 import H5Rows, write_h5_chunks
from sklearn_crb.estimators.net.measured import resolve_measured
from sklearn_crb.physics.parameters import resolve_estimate
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator

__all__ = ["SUFFIXES", "REQUIRED", "save_dataset", "load_dataset", "is_dataset", "simulate_dataset",
           "iter_dataset_chunks", "simulate_to_file", "open_dataset", "dataset_meta", "simulator_from_dataset",
           "dataset_measured"]

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
    with atomic_path(path) as tmp:
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


def _entropy(random_state):
    """The root entropy of the per-chunk seeds: an int >= 0, or fresh OS entropy for None."""
    if random_state is None:
        return np.random.SeedSequence().entropy
    if isinstance(random_state, (bool, np.bool_)) or not isinstance(random_state, (int, np.integer)) \
            or random_state < 0:
        raise TypeError(f"random_state must be a non-negative int or None (the root of the per-chunk seeds), "
                        f"got {random_state!r}")
    return int(random_state)


def _check_chunking(n_samples, chunk):
    for name, v, low in (("n_samples", n_samples, 1), ("chunk", chunk, 1)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(n_samples), int(chunk)


def _simulate_chunk(simulator, n, entropy, index):
    """Chunk ``index`` of a set: ``n`` samples from the seed ``SeedSequence(entropy, spawn_key=(index,))``.

    That seed is ``SeedSequence(entropy).spawn(k)[index]``: the chunk depends
    on (entropy, index, n) only, not on the process or worker computing it.
    """
    rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(int(index),)))
    X, y, crb, det = simulator.make_dataset(int(n), rng, return_details=True)
    return {"X": X, "y": y, "crb": crb, "X_clean": det["X_clean"], "crb_unit": det["crb_unit"],
            "theta": det["theta"], "M0": det["M0"]}


def iter_dataset_chunks(simulator, n_samples, random_state=0, chunk=500, n_jobs=None, progress=False):
    """``(rows, arrays)`` of a simulated set, chunk by chunk in row order, computed through joblib.

    Chunk ``i`` holds rows ``i*chunk : (i+1)*chunk`` and is drawn from its
    own seed ``SeedSequence(random_state).spawn(n_chunks)[i]``. The set is
    therefore bitwise the same for any ``n_jobs`` and any joblib backend
    (loky, threads, or a dask cluster inside
    ``joblib.parallel_config(backend="dask")``), while ``(random_state,
    chunk)`` together determine it: another ``chunk`` gives another (equally
    valid) set. Results are gathered in order as a generator
    (``return_as="generator"``), so only the chunks in flight are held in
    memory.

    Parameters
    ----------
    simulator : MTFingerprintSimulator
        Fitted; sent to every worker (pickled once per task by loky,
        scattered once by dask).
    n_samples : int
    random_state : int >= 0 or None
        Root of the per-chunk seeds (None: fresh entropy, not reproducible).
    chunk : int
        Samples per task (default 500); part of the determinism contract.
    n_jobs : int or None
        joblib's ``n_jobs`` (None: joblib's default, 1 outside a
        ``parallel_config``; every worker of the cluster with dask).
    progress : bool
        A tqdm bar over the samples.

    Yields
    ------
    rows : slice
    arrays : dict of ndarray
        ``X``, ``y``, ``crb``, ``X_clean``, ``crb_unit``, ``theta``, ``M0``.
    """
    n_samples, chunk = _check_chunking(n_samples, chunk)
    entropy = _entropy(random_state)
    slices = [slice(s, min(n_samples, s + chunk)) for s in range(0, n_samples, chunk)]
    tasks = (delayed(_simulate_chunk)(simulator, sl.stop - sl.start, entropy, i) for i, sl in enumerate(slices))
    results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
    with tqdm(total=n_samples, desc="simulate", unit="sample", disable=not progress) as bar:
        for sl, part in zip(slices, results):
            bar.update(sl.stop - sl.start)
            yield sl, part


def simulate_dataset(simulator, n_samples, random_state=0, chunk=500, progress=True, n_jobs=None):
    """A simulated training set in memory (dict of arrays), chunks computed through joblib.

    See :func:`iter_dataset_chunks` for the seeding: the result depends on
    ``(random_state, chunk)`` only, bitwise, not on ``n_jobs`` or the joblib
    backend. For sets larger than memory use :func:`simulate_to_file` with
    an HDF5 path.
    """
    parts = [p for _, p in iter_dataset_chunks(simulator, n_samples, random_state, chunk, n_jobs, progress)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def simulate_to_file(path, simulator, n_samples, random_state=0, *, chunk=500, n_jobs=None, prior=None,
                     overwrite=False, progress=True, argname="out", measured=()):
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

    Returns
    -------
    pathlib.Path
    """
    _check_suffix(path, argname)
    _check_chunking(n_samples, chunk)
    path = check_output_file(path, overwrite=overwrite, owned=is_dataset, argname=argname)
    static = {"basis": simulator.basis_, "meta": dataset_meta(simulator, prior=prior, measured=measured)}
    if path.suffix.lower() == ".npz":
        data = simulate_dataset(simulator, n_samples, random_state, chunk, progress, n_jobs)
        return save_dataset(path, {**data, **static}, overwrite=overwrite, argname=argname)
    chunks = iter_dataset_chunks(simulator, n_samples, random_state, chunk, n_jobs, progress)
    with atomic_path(path) as tmp:
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
        raise ValueError(f"data: 'meta'['nuisance'] must be \"all\", null or a list of parameter names, got {nuis!r:.80}")
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
