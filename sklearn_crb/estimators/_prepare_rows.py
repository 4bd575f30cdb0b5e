"""Training from a lazy row source (an HDF5 training set larger than memory), checked block by block.

The counterpart of :func:`sklearn_crb.estimators._prepare.prepare` for sets
read per batch (:class:`sklearn_crb.io.h5.H5Rows`): the same checks, target
scaling, output bounds and loss weights, never holding more than one block.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import validate_data

from sklearn_crb.estimators._batches import PackedRows
from sklearn_crb.estimators._crb_surrogate import resolve_crb_at, setup_crb_at
from sklearn_crb.estimators._measured import (append_measured, check_simulator_measured, resolve_measured,
                                              set_conditioning, split_measured)
from sklearn_crb.estimators._prepare import (check_bias_reduced, check_crb, check_rows, check_target_range,
                                             fitted_simulator, noise_setup, normalization, set_targets,
                                             set_weight_caps)
from sklearn_crb.estimators._training import LOSSES, loss_weights

__all__ = ["is_row_source", "prepare_rows", "SURROGATE_ROWS"]

#: Rows of a lazy set read (at random) to fit the weight surrogate of ``crb_at="estimate"``.
SURROGATE_ROWS = 200_000


def is_row_source(X):
    """Whether ``X`` is a lazy training set (``len(X)``, ``X.read(keys, idx)``, ``X.iter_slices(keys, block)``,
    e.g. :class:`sklearn_crb.io.h5.H5Rows`) rather than an array."""
    return all(callable(getattr(X, a, None)) for a in ("read", "iter_slices", "__len__"))


def prepare_rows(net, rows, augment, reset, block=65536):
    """:func:`prepare` for a lazy training set: checked ``block`` rows at a time, packed per batch.

    Reads ``X``, ``y`` and ``crb`` (``X_clean`` and ``crb_unit`` with
    augmentation) twice, block by block (target mean, then scale), never
    holding more than one block, and returns a :class:`~._batches.PackedRows`
    whose batches :class:`~._batches.RowBatches` reads when they are due.
    """
    if net.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {net.loss!r}")
    xk, ck = ("X_clean", "crb_unit") if augment else ("X", "crb")
    net.simulator_ = fitted_simulator(net)
    measured = resolve_measured(net.measured, (), bool(getattr(net.simulator_, "tied_R1", False)))
    keys = (xk, "y", ck) + (("theta",) if measured else ())
    missing = [k for k in keys if k not in getattr(rows, "keys", keys)]
    if missing:
        raise ValueError(f"the training set lacks the per-sample arrays {missing}")
    n = len(rows)
    if n < 2:
        raise ValueError(f"CRBNetRegressor needs at least 2 samples to fit, got n_samples={n}")
    if measured and net.simulator_ is not None:
        check_simulator_measured(net.simulator_, measured)
    net.measured_ = measured
    total, informative, first, cond_sum, cond_sq = 0.0, None, True, 0.0, 0.0
    for sl, r in rows.iter_slices(keys, block):
        X = validate_data(net, append_measured(r[xk], r.get("theta"), measured), reset=reset and first,
                          dtype=np.float64)
        X, cond = split_measured(net, X)
        if cond is not None:
            cond_sum, cond_sq = cond_sum + cond.sum(axis=0), cond_sq + (cond**2).sum(axis=0)
        Y = np.asarray(r["y"], dtype=np.float64).reshape(len(X), -1)
        if not np.all(np.isfinite(Y)):
            raise ValueError(f"y contains non-finite values (rows {sl.start}-{sl.stop})")
        crb = np.asarray(r[ck], dtype=np.float64)
        crb = np.where(np.isposinf(crb), 1.0, crb)  # all-infinite columns are checked over the whole set below
        check_crb(crb, Y.shape)
        inf = np.isposinf(np.asarray(r[ck], dtype=np.float64).reshape(Y.shape))
        informative = ~inf.all(axis=0) if informative is None else informative | ~inf.all(axis=0)
        if augment and X.shape[1] % 2:
            raise ValueError("augment=True needs [Re c, Im c] features (an even number of columns)")
        check_rows(X, normalization(net), "fit")
        total = total + Y.sum(axis=0)
        first = False
    if not informative.all():
        raise ValueError("crb is infinite for every sample of some target: nothing to train it on")
    if reset or not hasattr(net, "measured_loc_"):
        set_conditioning(net, None)
        if measured:  # mean and std of the measured columns over the whole set
            net.measured_loc_ = cond_sum / n
            sd = np.sqrt(np.maximum(cond_sq / n - net.measured_loc_**2, 0.0))
            net.measured_scale_ = np.where(sd > 1e-12 * (1.0 + np.abs(net.measured_loc_)), sd, 1.0)
    check_bias_reduced(net, augment)
    if reset or not hasattr(net, "y_mean_"):
        mean = total / n
        sq = sum(((np.asarray(r["y"], np.float64).reshape(sl.stop - sl.start, -1) - mean) ** 2).sum(axis=0)
                 for sl, r in rows.iter_slices(("y",), block))
        scale = np.sqrt(sq / n)
        set_targets(net, mean, np.where(scale > 0, scale, np.where(mean != 0, np.abs(mean), 1.0)),
                    np.ndim(rows.read(("y",), [0])["y"]) == 1)
    elif total.shape[0] != net.n_outputs_:
        raise ValueError(f"y has {total.shape[0]} targets, the net was fitted with {net.n_outputs_}")
    resolve_measured(measured, net.target_names_)  # a measured parameter must not also be a target
    set_weight_caps(net)
    for sl, r in rows.iter_slices(("y",), block):
        check_target_range(net, np.asarray(r["y"], np.float64).reshape(sl.stop - sl.start, -1))
    loss, mean, scale = net.loss, net.y_mean_, net.y_scale_

    def pack(r):
        Y = np.asarray(r["y"], np.float64).reshape(len(r["y"]), -1)
        crb = np.asarray(r[ck], np.float64).reshape(Y.shape)
        Xd = {"X": np.asarray(r[xk]).astype(np.float32), "w": loss_weights(loss, Y, crb, scale),
              "c": loss_weights("crb", Y, crb, scale)}
        if measured:
            Xd["k"] = append_measured(np.zeros((len(Y), 0)), r["theta"], measured).astype(np.float32)
        return Xd, ((Y - mean) / scale).astype(np.float32)

    net.augment_ = bool(augment)
    if augment:
        net.noise_ = noise_setup(net)
    if resolve_crb_at(net.crb_at, loss) == "estimate":  # the weight surrogate sees a random subset
        m = min(n, SURROGATE_ROWS)
        idx = np.sort(np.random.default_rng(net._seed(7)).choice(n, m, replace=False))
        Xd, Ys = pack(rows.read(("y", ck) + keys[3:], idx) | {xk: np.zeros((m, 0))})
        setup_crb_at(net, Ys, Xd["c"], reset)
    else:
        setup_crb_at(net, None, None, reset)
    return PackedRows(rows, keys, pack)
