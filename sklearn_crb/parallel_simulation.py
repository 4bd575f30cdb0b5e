"""Simulated training sets in seeded chunks, computed in parallel through joblib.

A set of ``n_samples`` rows is cut into chunks of ``chunk`` samples; chunk
``i`` is drawn from its own seed ``SeedSequence(random_state).spawn(n)[i]``
and computed by :meth:`MTFingerprintSimulator.make_dataset` through joblib
(so ``joblib.parallel_config(backend="dask")`` puts the chunks on a dask
cluster). The result is bitwise the same for any number of workers and any
backend, and is fixed by ``(random_state, chunk, n_samples)``.

Writing such a set to a file is :mod:`sklearn_crb.io.datasets`' job
(:func:`~sklearn_crb.io.datasets.simulate_to_file`); this module computes.
"""

from __future__ import annotations

import numpy as np
from joblib import Parallel, delayed
from tqdm.auto import tqdm

__all__ = ["iter_dataset_chunks", "simulate_dataset", "row_nbytes", "ROW_ARRAYS"]

#: The per-sample arrays of a simulated set, in the order of :func:`iter_dataset_chunks`.
ROW_ARRAYS = ("X", "y", "crb", "X_clean", "crb_unit", "theta", "M0")


def row_nbytes(rank, n_targets):
    """Bytes of one simulated row: ``X``, ``X_clean`` (2 r floats each), ``y``, ``crb``, ``crb_unit``
    (one float per target each), ``theta`` (8 floats) and the complex ``M0``; all 64-bit.

    What sizes a set before it is simulated (free disk space, available memory).
    """
    return 8 * (2 * 2 * int(rank) + 3 * int(n_targets) + 8) + 16


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
    starts = range(0, n_samples, chunk)  # lazy: no list of every chunk, whatever n_samples
    tasks = (delayed(_simulate_chunk)(simulator, min(chunk, n_samples - s), entropy, i) for i, s in enumerate(starts))
    results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
    with tqdm(total=n_samples, desc="simulate", unit="sample", disable=not progress) as bar:
        for s, part in zip(starts, results):
            sl = slice(s, min(n_samples, s + chunk))
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
