"""The training data of ``CRBNetRegressor``: one preparation path for arrays in memory and lazy row sources.

A training set is a *row source* (``len``, ``read(keys, idx)``,
``iter_slices(keys, block)``): an HDF5 set larger than memory
(:class:`sklearn_crb.io.h5.H5Rows`, through :class:`SourceRows`) or arrays in
memory (:class:`ArrayRows`, which are one block). :func:`prepare` checks it
block by block, never holding more than one block, computes the target
scaling and the standardisation of the measured inputs (two passes), and
packs it into the dict ``{"X": features, "k": measured inputs, "w": loss
weights, "c": s^2/CRB}`` that the loaders slice together with the
standardised targets: all at once for one block, batch by batch otherwise
(:class:`~sklearn_crb.estimators.net.loaders.PackedRows`). Only ``"X"`` and
``"k"`` reach the module; the rest reaches the loss and the validation CRB
score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.validation import check_array
from skorch.dataset import Dataset

from sklearn_crb.estimators.net.augmentation import augment_batch
from sklearn_crb.estimators.net.loaders import PackedRows
from sklearn_crb.estimators.net.losses import loss_weights
from sklearn_crb.estimators.net.measured import append_measured, conditioning_scale, split_measured

__all__ = ["is_row_source", "ArrayRows", "SourceRows", "TrainingData", "prepare", "check_crb", "check_rows",
           "check_float32_range", "target_scaling", "check_noise_column", "fixed_noise_dataset", "BLOCK"]

#: Rows checked (and, for a lazy set, read) at a time.
BLOCK = 65536

_F32 = np.finfo(np.float32)
#: Largest per-row max |x| whose squared L2 norm stays finite in float32 (checked per feature count).
_F32_SQRT_MAX = float(np.sqrt(_F32.max))
#: Smallest per-row max |x| whose square is a normal float32.
_F32_SQRT_TINY = float(np.sqrt(_F32.tiny))


def is_row_source(X):
    """Whether ``X`` is a lazy training set (``len(X)``, ``X.read(keys, idx)``, ``X.iter_slices(keys, block)``,
    e.g. :class:`sklearn_crb.io.h5.H5Rows`) rather than an array."""
    return all(callable(getattr(X, a, None)) for a in ("read", "iter_slices", "__len__"))


class ArrayRows:
    """Arrays in memory as a row source of one block: ``{"X", "y", "crb", "k"}`` (``"crb"``/``"k"`` optional)."""

    def __init__(self, arrays):
        self.arrays = {k: v for k, v in arrays.items() if v is not None}
        self.keys = tuple(self.arrays)

    def __len__(self):
        return len(self.arrays["y"])

    def read(self, keys, idx):
        return {k: self.arrays[k][idx] for k in keys}

    def iter_slices(self, keys, block):
        yield slice(0, len(self)), {k: self.arrays[k] for k in keys}


class SourceRows:
    """A lazy set's rows under the keys of :class:`ArrayRows`.

    ``"X"`` and ``"crb"`` are the set's ``xkey``/``ckey`` (``X_clean``/``crb_unit``
    with augmentation), ``"k"`` its ``theta`` columns of the ``measured`` parameters.
    """

    def __init__(self, source, xkey, ckey, measured):
        self.source, self.measured = source, tuple(measured)
        self._names = {"X": xkey, "y": "y", "crb": ckey, "theta": "theta"}
        self.keys = ("X", "y", "crb") + (("k",) if self.measured else ())
        missing = [self._names[k] for k in self.keys + (("theta",) if self.measured else ()) if k != "k"
                   and self._names[k] not in getattr(source, "keys", ())]
        if missing:
            raise ValueError(f"the training set lacks the per-sample arrays {missing}")

    def __len__(self):
        return len(self.source)

    def _source_keys(self, keys):
        return tuple(dict.fromkeys(self._names["theta" if k == "k" else k] for k in keys))

    def _rename(self, r, keys):
        out = {k: r[self._names[k]] for k in keys if k != "k"}
        if "k" in keys:
            out["k"] = append_measured(np.zeros((len(r["theta"]), 0)), r["theta"], self.measured)
        return out

    def read(self, keys, idx):
        return self._rename(self.source.read(self._source_keys(keys), idx), keys)

    def iter_slices(self, keys, block):
        for sl, r in self.source.iter_slices(self._source_keys(keys), block):
            yield sl, self._rename(r, keys)


def check_crb(crb, shape):
    """Per-sample CRBs of the shape of ``y``: positive, and finite or +inf (a singular Fisher matrix)."""
    crb = np.asarray(crb, dtype=np.float64)
    if crb.ndim == 1 and shape[1] == 1:
        crb = crb[:, None]
    if crb.shape != shape:
        raise ValueError(f"crb must have the shape of y {shape} (one CRB per sample and target), got {crb.shape}")
    bad = np.isnan(crb) | np.isneginf(crb)
    if bad.any():
        raise ValueError(f"crb contains NaN or -inf values (e.g. row {int(np.flatnonzero(bad.any(axis=1))[0])})")
    if np.any(crb <= 0):
        i = int(np.flatnonzero((crb <= 0).any(axis=1))[0])
        raise ValueError(f"crb must be strictly positive (e.g. row {i}: {crb[i]})")
    if np.all(np.isinf(crb), axis=0).any():
        raise ValueError("crb is infinite for every sample of some target: nothing to train it on")
    return crb


def check_rows(X, mode, action="fit"):
    """Refuse all-zero rows when the input is normalised (``mode`` not None) and rows outside float32's range."""
    zero = ~np.any(X != 0, axis=1)
    if mode is not None and zero.any():
        raise ValueError(f"X has {int(zero.sum())} all-zero rows (e.g. row {int(np.flatnonzero(zero)[0])}: "
                         f"background voxels) that normalization={mode!r} cannot handle; mask them out before "
                         f"{action}")
    check_float32_range(X, mode)



def check_float32_range(X, normalization, argname="X"):
    """Refuse rows the float32 network cannot represent (instead of silent garbage).

    With an input normalisation (``"l2"``/``"first-coefficient"``) the net
    is invariant to a common scale of a row, so rows whose largest |value|
    leaves ``[sqrt(tiny32), sqrt(max32 / n_features)]`` would underflow or
    overflow in the norm: they are refused with a hint to rescale. Without
    normalisation every value must be a finite float32.
    """
    a = np.abs(X)
    m = a.max(axis=1) if X.shape[1] else np.zeros(X.shape[0])
    if normalization is None:
        bad = m > _F32.max
        reason = "exceed the float32 range"
    else:
        hi = _F32_SQRT_MAX / np.sqrt(max(X.shape[1], 1))
        bad = (m > hi) | ((m < _F32_SQRT_TINY) & (m > 0))
        reason = (f"have a largest |value| outside [{_F32_SQRT_TINY:.2g}, {hi:.2g}], where the float32 network's "
                  f"input normalisation {normalization!r} under- or overflows")
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(f"{argname} has {idx.size} rows that {reason} (e.g. rows {idx[:5].tolist()}, max |value| "
                         f"{m[idx[0]]:.3g}); rescale the data by a common factor (the normalised network is "
                         "invariant to it) or mask those voxels")



def target_scaling(total, sq, n):
    """Mean and scale of the targets from their sum and the sum of squared deviations from the mean over ``n`` rows.

    The scale is the standard deviation, ``|mean|`` or 1 for a constant column
    (for one block the same numbers as ``Y.mean(0)``, ``Y.std(0)``).
    """
    mean, scale = total / n, np.sqrt(sq / n)
    return mean, np.where(scale > 0, scale, np.where(mean != 0, np.abs(mean), 1.0))


@dataclass
class TrainingData:
    """What :func:`prepare` returns: the packed data and the statistics the regressor keeps.

    ``X``/``y``: the packed dict and standardised targets (one block), or a
    :class:`PackedRows` and None (a lazy set). ``y_mean``/``y_scale``: the target
    scaling used; ``y_min``/``y_max``: per-target extremes; ``measured_loc``/``measured_scale``: the measured
    inputs' standardisation (empty without); ``sample``: ``(Ys, w_unit)`` of the rows
    the CRB-weight surrogate is fitted to, or None.
    """

    X: object
    y: object
    n_features: int
    y_1d: bool
    y_mean: np.ndarray
    y_scale: np.ndarray
    y_min: np.ndarray
    y_max: np.ndarray
    measured_loc: np.ndarray
    measured_scale: np.ndarray
    sample: tuple | None = None


def _check_block(r, sl, measured, mode, augment):
    """Check one block; returns ``(Y, informative targets, features' column count)``."""
    X = check_array(r["X"], dtype=np.float64)
    if "k" in r:
        X = np.hstack([X, np.asarray(r["k"], dtype=np.float64)])
    n_cols = X.shape[1]
    X = split_measured(X, measured)[0]
    Y = np.asarray(r["y"], dtype=np.float64).reshape(len(X), -1)
    if not np.all(np.isfinite(Y)):
        raise ValueError(f"y contains non-finite values (rows {sl.start}-{sl.stop})")
    informative = np.ones(Y.shape[1], dtype=bool)
    if "crb" in r:
        raw = np.asarray(r["crb"], dtype=np.float64)
        check_crb(np.where(np.isposinf(raw), 1.0, raw), Y.shape)  # all-infinite columns: over the whole set
        informative = ~np.isposinf(raw.reshape(Y.shape)).all(axis=0)
    if augment and X.shape[1] % 2:
        raise ValueError("augment=True needs [Re c, Im c] features (an even number of columns)")
    check_rows(X, mode, "fit")
    return Y, informative, n_cols


def _first_pass(rows, keys, measured, mode, augment, block):
    """Checks block by block; per-target sums, extremes and informativeness, the measured inputs' sums."""
    total = y_min = y_max = informative = k_sum = n_cols = None
    for sl, r in rows.iter_slices(keys, block):
        Y, inf_ok, cols = _check_block(r, sl, measured, mode, augment)
        if n_cols is not None and cols != n_cols:
            raise ValueError(f"X has {cols} columns in rows {sl.start}-{sl.stop}, {n_cols} before")
        n_cols = cols
        s = Y.sum(axis=0)
        total = s if total is None else total + s
        y_min = Y.min(axis=0) if y_min is None else np.minimum(y_min, Y.min(axis=0))
        y_max = Y.max(axis=0) if y_max is None else np.maximum(y_max, Y.max(axis=0))
        informative = inf_ok if informative is None else informative | inf_ok
        if measured:
            ks = np.asarray(r["k"], dtype=np.float64).sum(axis=0)
            k_sum = ks if k_sum is None else k_sum + ks
    if not informative.all():
        raise ValueError("crb is infinite for every sample of some target: nothing to train it on")
    return total, y_min, y_max, k_sum, n_cols


def _second_pass(rows, keys, y_mean, k_mean, block):
    """Sums of squared deviations from the means (targets, measured inputs)."""
    y_sq = k_sq = 0.0
    for _, r in rows.iter_slices(keys, block):
        Y = np.asarray(r["y"], np.float64).reshape(len(r["y"]), -1)
        y_sq = y_sq + ((Y - y_mean) ** 2).sum(axis=0)
        if k_mean is not None:
            k_sq = k_sq + ((np.asarray(r["k"], np.float64) - k_mean) ** 2).sum(axis=0)
    return y_sq, k_sq


def _packer(loss, mean, scale, has_crb):
    """The function that packs rows ``{"X", "y", "crb", "k"}`` into ``(X dict, standardised y)``."""

    def pack(r):
        Y = np.asarray(r["y"], np.float64).reshape(len(r["y"]), -1)
        crb = np.asarray(r["crb"], np.float64).reshape(Y.shape) if has_crb else None
        Xd = {"X": np.asarray(r["X"]).astype(np.float32), "w": loss_weights(loss, Y, crb, scale)}
        if "k" in r:  # measured inputs: no M0 scaling, no noise (the module appends them)
            Xd["k"] = np.asarray(r["k"]).astype(np.float32)
        if has_crb:
            Xd["c"] = loss_weights("crb", Y, crb, scale)
        return Xd, ((Y - mean) / scale).astype(np.float32)

    return pack


def _sample(rows, keys, pack, n, sample_rows, seed):
    """``(Ys, w_unit)`` of all rows, or of ``sample_rows`` drawn at random (``seed``) from a larger set."""
    if n > sample_rows:
        idx = np.sort(np.random.default_rng(seed).choice(n, sample_rows, replace=False))
    else:
        idx = np.arange(n)
    Xd, Ys = pack(rows.read(tuple(k for k in keys if k != "X"), idx) | {"X": np.zeros((len(idx), 0))})
    return Ys, Xd["c"]


def prepare(rows, *, loss, measured, normalization, augment, scaling=None, conditioning=None, sample=None,
            block=BLOCK):
    """Check a training set block by block and pack it.

    Parameters
    ----------
    rows : ArrayRows or SourceRows
    loss : str
        The training loss (its weights, :func:`~sklearn_crb.estimators.net.losses.loss_weights`).
    measured : tuple of str
        The measured inputs (the last columns of ``"X"`` for arrays, ``"k"`` for a lazy set).
    normalization : str or None
        The module's input normalisation (all-zero rows refused unless None).
    augment : bool
        Noise-free features at ``M0 = 1`` (an even number of columns needed).
    scaling, conditioning : (mean, scale) or None
        A previous fit's target scaling and measured-input standardisation
        (``partial_fit``, warm start); None: computed from the set.
    sample : (int, int or None) or None
        ``(rows, seed)`` of the sample returned for the CRB-weight surrogate; None: none.

    Returns
    -------
    TrainingData
    """
    n = len(rows)
    if n < 2:
        raise ValueError(f"CRBNetRegressor needs at least 2 samples to fit, got n_samples={n}")
    keys = rows.keys
    total, y_min, y_max, k_sum, n_cols = _first_pass(rows, keys, measured, normalization, augment, block)
    if scaling is not None and total.shape[0] != np.shape(scaling[0])[0]:
        raise ValueError(f"y has {total.shape[0]} targets, the net was fitted with {np.shape(scaling[0])[0]}")
    k_mean = None if (k_sum is None or conditioning is not None) else k_sum / n
    if scaling is None or k_mean is not None:
        y_sq, k_sq = _second_pass(rows, ("y", "k") if k_mean is not None else ("y",), total / n, k_mean, block)
    if scaling is None:
        scaling = target_scaling(total, y_sq, n)
    if conditioning is None:
        conditioning = (np.zeros(0), np.ones(0)) if k_mean is None else (
            k_mean, conditioning_scale(k_mean, np.sqrt(k_sq / n)))
    pack = _packer(loss, *scaling, "crb" in keys)
    if isinstance(rows, ArrayRows):
        X, y = pack(rows.arrays)
    else:
        X, y = PackedRows(rows, keys, pack), None
    if sample is None:
        smp = None
    elif isinstance(rows, ArrayRows) and n <= sample[0]:
        smp = y, X["c"]  # every row: the packed arrays themselves
    else:
        smp = _sample(rows, keys, pack, n, *sample)
    y_1d = np.ndim(rows.read(("y",), [0])["y"]) == 1
    return TrainingData(X, y, n_cols, y_1d, *scaling, y_min, y_max, *conditioning, smp)


def check_noise_column(X, action="predict"):
    """The coefficient features of ``X`` whose last column is the noise level (positive and finite).

    Raises
    ------
    ValueError
        Naming the rows whose noise column is not a positive finite number.
    """
    if X.shape[1] < 2:
        raise ValueError(f"X has {X.shape[1]} columns; a noise-aware network (noise_input=True) takes the coefficient "
                         "features followed by the noise column sigma")
    sig = np.asarray(X[:, -1], dtype=np.float64)
    bad = ~(np.isfinite(sig) & (sig > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"X's noise column (sigma, column {X.shape[1] - 1}) must be positive and finite in {action}; "
                         f"{int(bad.sum())} rows are not, e.g. row {i}: {sig[i]!r}")
    return X[:, :-1]


def fixed_noise_dataset(subset, seed, noise, loss):
    """One fixed draw of M0 and noise (``noise = ((snr_lo, snr_hi), sigma, sampling)``) for the validation part.

    The validation part of a lazy set (:class:`PackedRows`) is read into
    memory for it (its ``train_split`` fraction only).
    """
    if isinstance(subset, torch.utils.data.Subset) and isinstance(subset.dataset, PackedRows):
        Xd, y = subset.dataset.take(np.asarray(subset.indices))
        subset = torch.utils.data.Subset(Dataset(Xd, y), np.arange(len(y)))
    if not (isinstance(subset, torch.utils.data.Subset) and isinstance(subset.dataset, Dataset)
            and isinstance(subset.dataset.X, Mapping)):
        return subset  # a user-supplied validation set is taken as is
    idx = np.asarray(subset.indices)
    Xd = {k: np.asarray(v)[idx] for k, v in subset.dataset.X.items()}
    snr, sigma, sampling = noise
    Xd = augment_batch(Xd, np.random.default_rng(seed), snr, sigma, loss, sampling)
    return Dataset(Xd, np.asarray(subset.dataset.y)[idx])
