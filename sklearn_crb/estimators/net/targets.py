"""The targets of ``CRBNetRegressor``: their names, the bounded output head's range, the range check.

The network's head maps each output with a known support onto it
(:func:`output_bounds`); the support comes from ``target_bounds``, else the
simulator's prior, else the physical ``BOUNDS``. Training targets outside it
are refused (:func:`check_target_range`). The target scaling is a statistic
of the training data (:func:`~sklearn_crb.estimators.net.data.target_scaling`).
"""

from __future__ import annotations

import numpy as np

from sklearn_crb.physics.parameters import BOUNDS, PARAMETERS, TIMES, rate_name

__all__ = ["LOG_TARGETS", "HEADS", "output_bounds", "target_names", "check_target_range"]


#: Targets whose bounded head is log-space under ``head="auto"``: relaxation rates and their times.
LOG_TARGETS = ("R1f", "R2f", "R1s", "T1f", "T2f", "T1s")
HEADS = ("auto", "sigmoid", "linear", None)


def _support(p, user, prior):
    """``(low, high, physical low, physical high)`` of target ``p``, or None for a linear output."""
    if p in user:
        try:
            lo, hi = (float(v) for v in user[p])
        except (TypeError, ValueError):
            raise TypeError(f"target_bounds[{p!r}] must be a (low, high) pair, got {user[p]!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"target_bounds[{p!r}] must be finite with low < high, got ({lo}, {hi})")
        return lo, hi, None, None
    if not (p in PARAMETERS or p in TIMES):
        return None
    rate = rate_name(p)
    dist = getattr(prior, "distributions", {}).get(rate) if prior is not None else None
    lo, hi = getattr(dist, "support", None) or BOUNDS[rate]
    plo, phi = BOUNDS[rate]
    lo, hi = max(float(lo), plo), min(float(hi), phi)
    if p in TIMES:
        lo, hi, plo, phi = 1.0 / hi, 1.0 / max(lo, 1e-12), 1.0 / phi, 1.0 / plo
    return lo, hi, plo, phi


def output_bounds(names, head, prior=None, target_bounds=None, margin=0.05):
    """``(low, high, log)`` arrays of the bounded output head (physical units; +-inf: linear output).

    The support of each target is ``target_bounds[name]`` if given, else the
    prior's support of its rate (inverted for a time target ``T = 1/R``),
    else ``physics.parameters.BOUNDS``; names that are not parameters
    (``y0``, ...) stay linear.

    ``head="auto"``: relaxation targets (:data:`LOG_TARGETS`) with a positive
    support get the log-space head (``log[j]`` True) on exactly that support
    (their log-uniform or decade-wide priors train faster and to a lower loss
    in log space: -13 % final CRB loss and -10 to -30 % CRB-normalised MSE at
    equal budget on the brain prior, v3.2 sequence). Every other bounded
    target, and every target under ``head="sigmoid"``, gets the sigmoid head
    on its support widened by ``margin`` times its width on both sides (a
    sigmoid reaches its ends only as ``z -> +-inf``, and targets drawn at
    the support edge, e.g. ``m0s = 0``, must be reachable), cut to the
    physical bounds (``m0s >= 0``). ``head="linear"`` or None: all linear.
    """
    k = len(names)
    low, high, log = np.full(k, -np.inf), np.full(k, np.inf), np.zeros(k, dtype=bool)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head is None or head == "linear":
        return low, high, log
    user = {} if target_bounds is None else dict(target_bounds)
    unknown = sorted(set(user) - set(names))
    if unknown:
        raise ValueError(f"target_bounds names {unknown} that are not targets {tuple(names)}")
    for j, p in enumerate(names):
        sup = _support(p, user, prior)
        if sup is None:
            continue
        lo, hi, plo, phi = sup
        if head == "auto" and p in LOG_TARGETS and lo > 0:
            low[j], high[j], log[j] = lo, hi, True
        elif plo is None:  # user bounds are taken as given
            low[j], high[j] = lo, hi
        else:
            width = hi - lo
            low[j] = max(lo - margin * width, plo)
            high[j] = min(hi + margin * width, phi)
    return low, high, log


def target_names(names, simulator, n_outputs):
    """Target names: ``names`` (``target_names``), the simulator's ``estimate_`` or ``y0, y1, ...``."""
    if names is None and simulator is not None and hasattr(simulator, "estimate_"):
        names = simulator.estimate_
    if names is None:
        return tuple(f"y{j}" for j in range(n_outputs))
    names = tuple(str(n) for n in ([names] if isinstance(names, str) else names))
    if len(names) != n_outputs:
        raise ValueError(f"target_names has {len(names)} entries for {n_outputs} targets")
    return names


def check_target_range(names, low, high, y_min, y_max):
    """Refuse targets (per-column ``y_min``/``y_max`` of the training set) outside the bounded head's range."""
    out = (y_min < low) | (y_max > high)
    if out.any():
        j = int(np.flatnonzero(out)[0])
        raise ValueError(f"y[:, {j}] ({names[j]}) has values outside the bounded head's range "
                         f"[{low[j]:g}, {high[j]:g}]: widen target_bounds, train with "
                         "the simulator whose prior drew y, or use head=None")
