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
kept in its state dict (:class:`~sklearn_crb.estimators.net.modules.InputNormalization`).

Public: the CLI, the model folders and the maps use :func:`resolve_measured`,
:func:`measured_nuisance` and :func:`append_measured`.
"""

from __future__ import annotations

import numpy as np

from sklearn_crb.physics.parameters import BOUNDS, INDEX, TIMES, free_parameters, nuisance_parameters

__all__ = ["resolve_measured", "measured_nuisance", "check_simulator_measured", "split_measured", "append_measured",
           "conditioning_scale"]


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


def split_measured(X, measured, action="fit"):
    """``(coefficient features, measured columns or None)`` of ``X`` whose last columns are ``measured``.

    The measured values must lie in their physical range (``BOUNDS``).
    """
    k = len(measured)
    if not k:
        return X, None
    if X.shape[1] <= k:
        raise ValueError(f"X has {X.shape[1]} columns; a network with measured={measured} takes the "
                         f"coefficient features followed by {k} measured-parameter column(s)")
    cond = X[:, -k:]
    for j, p in enumerate(measured):
        lo, hi = BOUNDS[p]
        out = (cond[:, j] < lo) | (cond[:, j] > hi)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            unit = " (B1 is relative, not in percent)" if p == "B1" else ""
            raise ValueError(f"X's measured column {p!r} (column {X.shape[1] - k + j}) has {int(out.sum())} values "
                             f"outside the physical range [{lo:g}, {hi:g}] in {action}, e.g. row {i}: "
                             f"{cond[i, j]:g}{unit}")
    return X[:, :-k], cond


def conditioning_scale(loc, sd):
    """The standard deviation of a measured column as its scale; 1 for a constant column (left unscaled)."""
    return np.where(sd > 1e-12 * (1.0 + np.abs(loc)), sd, 1.0)


def append_measured(X, theta, measured):
    """``[X, theta[:, measured]]``: coefficient features followed by the measured parameters (SI units)."""
    if not measured:
        return X
    cols = np.asarray(theta, dtype=np.float64)[:, [INDEX[p] for p in measured]]
    return np.hstack([np.asarray(X), cols.astype(np.asarray(X).dtype, copy=False)])
