"""Measured parameters as network inputs (``CRBNetRegressor(measured=...)``).

Researchers often measure B1 (and B0, i.e. omega0) in a separate scan. A
network trained with ``measured=("B1",)`` takes the measured value as an
extra input column behind the coefficient features, ``X = [Re c, Im c, B1]``,
so that a measured map conditions its estimate. Its training CRBs must then
be those with B1 *known*: the simulator must not count B1 among its CRB's
unknowns (``MTFingerprintSimulator(nuisance=...)`` without it;
:func:`measured_nuisance` gives that selection).

The measured columns bypass the input normalisation (they are not scaled by
M0 and get no noise in the per-batch augmentation); the network
standardises them with the training set's mean and standard deviation,
kept in its state dict (:class:`~sklearn_crb.estimators.network.InputNormalization`).
"""

from __future__ import annotations

import numpy as np
import torch

from sklearn_crb.physics.parameters import BOUNDS, INDEX, TIMES, free_parameters, nuisance_parameters

__all__ = ["resolve_measured", "measured_nuisance", "split_measured", "measured_columns", "fitted_measured", "set_conditioning", "load_conditioning",
           "restore_conditioning", "simulated_inputs", "check_simulator_measured", "append_measured"]


def resolve_measured(measured, targets=(), tied_R1=False, argname="measured"):
    """The measured parameter names as a tuple (column order as given); ``None`` or ``()``: none.

    Each must be a rate name of ``PARAMETERS`` (B1 relative, omega0 in
    rad/s), not a target (or the rate of a time target), not named twice,
    and not R1s with the tied model.
    """
    if measured is None:
        return ()
    names = (measured,) if isinstance(measured, str) else measured
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"{argname} must be None, a parameter name or a sequence of them, got {measured!r}") from None
    allowed = free_parameters(tied_R1)
    bad = [p for p in names if not isinstance(p, str) or p not in allowed]
    if bad:
        raise ValueError(f"{argname} contains {bad}, which are not model parameters; allowed: {allowed} "
                         "(rates in 1/s, B1 relative, omega0 in rad/s)")
    if len(set(names)) != len(names):
        raise ValueError(f"{argname} names a parameter twice: {names}")
    both = sorted(set(names) & {TIMES.get(p, p) for p in targets})  # names like "y0" match nothing
    if both:
        raise ValueError(f"{argname}: {both} are also estimated; a parameter is either measured (an input) or "
                         "estimated (an output)")
    return names


def measured_nuisance(estimate, measured, tied_R1=False):
    """The simulator's ``nuisance`` for a network that takes ``measured`` as inputs: every other unknown."""
    return nuisance_parameters("all", estimate, tied_R1, known=resolve_measured(measured, estimate, tied_R1))


def check_simulator_measured(sim, measured, argname="simulator"):
    """Refuse a simulator whose CRB counts a measured parameter among its unknowns (its CRBs would be too large)."""
    unknown = set(nuisance_parameters(sim.nuisance, sim.estimate_, sim.tied_R1))
    wrong = [p for p in measured if p in unknown]
    if wrong:
        nuis = measured_nuisance(sim.estimate_, measured, sim.tied_R1)
        raise ValueError(f"{argname}: its CRB treats {wrong} as unknown, but the network takes them as measured "
                         f"inputs; use MTFingerprintSimulator(nuisance={nuis!r})")


def split_measured(net, X, action="fit"):
    """``(coefficient features, measured columns)`` of ``X`` for a net with ``measured_``."""
    k = len(net.measured_)
    if not k:
        return X, None
    if X.shape[1] <= k:
        raise ValueError(f"X has {X.shape[1]} columns; a network with measured={net.measured_} takes the "
                         f"coefficient features followed by {k} measured-parameter column(s)")
    cond = X[:, -k:]
    for j, p in enumerate(net.measured_):
        lo, hi = BOUNDS[p]
        out = (cond[:, j] < lo) | (cond[:, j] > hi)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            unit = " (B1 is relative, not in percent)" if p == "B1" else ""
            raise ValueError(f"X's measured column {p!r} (column {X.shape[1] - k + j}) has {int(out.sum())} values "
                             f"outside the physical range [{lo:g}, {hi:g}] in {action}, e.g. row {i}: "
                             f"{cond[i, j]:g}{unit}")
    return X[:, :-k], cond


def measured_columns(net, X, targets, reset):
    """Split off ``X``'s measured columns (``measured``); set ``measured_`` and, on ``reset``, their scaling."""
    sim = getattr(net, "simulator_", None)
    measured = resolve_measured(net.measured, targets, bool(getattr(sim, "tied_R1", False)))
    if not reset and tuple(getattr(net, "measured_", ())) != measured:
        raise ValueError(f"measured={net.measured!r} differs from the fitted network's {net.measured_}: refit it")
    if measured and sim is not None:
        check_simulator_measured(sim, measured)
    net.measured_ = measured
    feats, cond = split_measured(net, X)
    if reset or not hasattr(net, "measured_loc_"):
        set_conditioning(net, cond)
    return feats, cond


def fitted_measured(net):
    """``measured_`` of a fitted net, else its ``measured`` (e.g. ``initialize()`` before ``load_params``)."""
    return getattr(net, "measured_", None) or resolve_measured(net.measured)


def set_conditioning(net, cond):
    """The standardisation of the measured inputs (``measured_loc_``, ``measured_scale_``) from training data."""
    if cond is None:
        net.measured_loc_, net.measured_scale_ = np.zeros(0), np.ones(0)
        return
    loc, scale = cond.mean(axis=0), cond.std(axis=0)
    net.measured_loc_ = loc
    net.measured_scale_ = np.where(scale > 1e-12 * (1.0 + np.abs(loc)), scale, 1.0)  # constant column: unscaled


def _normalizer(net):
    norm = getattr(getattr(net.module_, "module", None), "normalize", None)
    return norm if getattr(norm, "n_conditioning", 0) else None


def load_conditioning(net):
    """Copy ``measured_loc_``/``measured_scale_`` into the network's buffers (saved in its state dict)."""
    norm = _normalizer(net)
    if norm is not None:
        norm.cond_loc.copy_(torch.as_tensor(net.measured_loc_))
        norm.cond_scale.copy_(torch.as_tensor(net.measured_scale_))


def restore_conditioning(net):
    """``measured_loc_``/``measured_scale_`` of a net whose parameters were loaded, from its buffers."""
    norm = _normalizer(net)
    if norm is not None:
        net.measured_loc_ = norm.cond_loc.detach().cpu().numpy().astype(np.float64)
        net.measured_scale_ = norm.cond_scale.detach().cpu().numpy().astype(np.float64)


def simulated_inputs(net, sim, X, theta):
    """``X`` with the measured parameters of the simulated ``theta`` appended (``fit_simulated``)."""
    measured = resolve_measured(net.measured, sim.estimate_, sim.tied_R1)
    if not measured:
        return X
    check_simulator_measured(sim, measured)
    return append_measured(X, theta, measured)


def append_measured(X, theta, measured):
    """``[X, theta[:, measured]]``: coefficient features followed by the measured parameters (SI units)."""
    if not measured:
        return X
    cols = np.asarray(theta, dtype=np.float64)[:, [INDEX[p] for p in measured]]
    return np.hstack([np.asarray(X), cols.astype(np.asarray(X).dtype, copy=False)])
