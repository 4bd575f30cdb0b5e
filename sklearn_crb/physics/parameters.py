"""The canonical parameter set of the generalized-Bloch MT model.

Every module uses the order and SI units defined here::

    m0s     semi-solid spin-pool fraction          (dimensionless, m0f = 1 - m0s)
    R1f     longitudinal relaxation, free pool     (1/s)
    R2f     transverse relaxation, free pool       (1/s)
    Rex     exchange rate                          (1/s)
    R1s     longitudinal relaxation, semi-solid    (1/s)
    T2s     transverse relaxation time, semi-solid (s)
    omega0  off-resonance (B0)                     (rad/s)
    B1      transmit-field scaling                 (dimensionless)

The complex proton density M0 is not part of ``theta``; it is a nuisance
scale handled by the simulator, the CRB and the estimators.

``theta`` always holds rates. Estimation *targets* may also name the
relaxation times of :data:`TIMES` (``T = 1/R`` in s): ``T1f``, ``T2f`` and
``T1s`` (``T2s`` already is a time). With a tied T1 (``R1s = R1f``),
``T1f`` names the single T1. :func:`targets_from_theta`,
:func:`theta_columns_from_targets` and :func:`crb_to_targets` convert between
the two forms; the CRB of a time follows from the delta method,
``CRB(T) = CRB(R) / R**4`` (``dT/dR = -1/R**2``).

Priors (distributions to draw training tissues from) live in :mod:`.priors`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "PARAMETERS",
    "INDEX",
    "UNITS",
    "BOUNDS",
    "SCALE",
    "free_parameters",
    "nuisance_parameters",
    "validate_theta",
    "resolve_estimate",
    "tie_R1",
    "TIMES",
    "rate_name",
    "targets_from_theta",
    "theta_columns_from_targets",
    "crb_to_targets",
]

PARAMETERS: tuple = ("m0s", "R1f", "R2f", "Rex", "R1s", "T2s", "omega0", "B1")
INDEX = {name: i for i, name in enumerate(PARAMETERS)}

UNITS = {
    "m0s": "1",
    "R1f": "1/s",
    "R2f": "1/s",
    "Rex": "1/s",
    "R1s": "1/s",
    "T2s": "s",
    "omega0": "rad/s",
    "B1": "1",
    "T1f": "s",
    "T2f": "s",
    "T1s": "s",
}

#: Time forms of the relaxation rates that may be named as targets (T = 1/R, s).
TIMES = {"T1f": "R1f", "T2f": "R2f", "T1s": "R1s"}

#: Physical bounds (inclusive) used to validate ``theta``. T2s and B1 are
#: further limited by the R2sl table for a given sequence (TRF/T2s and
#: B1*|alpha| must lie inside it).
BOUNDS = {
    "m0s": (0.0, 0.99),
    "R1f": (1e-3, 100.0),
    "R2f": (1e-3, 1e4),
    "Rex": (0.0, 1e4),
    "R1s": (1e-3, 100.0),
    "T2s": (1e-6, 1e-4),
    "omega0": (-1e5, 1e5),
    "B1": (1e-3, 1.4),
}


#: Typical magnitudes (SI units): the scale in which solvers and tangents work
#: (``theta / SCALE`` is of order one for brain tissue).
SCALE = {
    "m0s": 0.1,
    "R1f": 1.0,
    "R2f": 10.0,
    "Rex": 10.0,
    "R1s": 1.0,
    "T2s": 1e-5,
    "omega0": 100.0,
    "B1": 1.0,
}


def free_parameters(tied_R1=False):
    """Names of the independent model parameters (R1s dropped when tied)."""
    return tuple(p for p in PARAMETERS if not (tied_R1 and p == "R1s"))


def rate_name(name):
    """The ``PARAMETERS`` name a target is computed from (``"T1f"`` -> ``"R1f"``).

    Identity for names that are not in :data:`TIMES`; unknown names raise
    ``ValueError``.
    """
    if isinstance(name, str):
        if name in TIMES:
            return TIMES[name]
        if name in INDEX:
            return name
    raise ValueError(f"unknown target name {name!r}; allowed: {PARAMETERS + tuple(TIMES)}")


def resolve_estimate(estimate, tied_R1=False, argname="estimate", times=True):
    """Validate target names and return them in canonical order.

    Parameters
    ----------
    estimate : str or sequence of str
        Names from ``PARAMETERS`` and, if ``times``, from :data:`TIMES`.
    tied_R1 : bool
        R1s = R1f: neither ``R1s`` nor ``T1s`` may be named (``R1f``/``T1f``
        name the single T1).
    argname : str
        Name used in error messages.
    times : bool
        Accept the time forms (``T1f``, ``T2f``, ``T1s``). Code that works in
        rates only (the CRB) passes False.

    Returns
    -------
    tuple of str
        The names as given (time names stay time names), ordered as their
        rates in ``PARAMETERS``.

    Raises
    ------
    TypeError
        If ``estimate`` is not a string or a sequence of strings.
    ValueError
        For unknown names, names of the tied R1s, empty selections and
        duplicates, including a rate named together with its time
        (e.g. ``R1f`` and ``T1f``).
    """
    names = _name_tuple(estimate, argname, "parameter")
    rates = free_parameters(tied_R1)
    allowed = rates + tuple(t for t, r in TIMES.items() if times and r in rates)
    bad = [p for p in names if not isinstance(p, str) or p not in allowed]
    if bad:
        tied = [p for p in bad if tied_R1 and p in ("R1s", "T1s")]
        extra = f" ({', '.join(tied)}: R1s is tied to R1f)" if tied else ""
        raise ValueError(f"{argname} contains unknown names {bad}{extra}; allowed: {allowed}")
    if not names:
        raise ValueError(f"{argname} must name at least one parameter")
    if len(set(names)) != len(names):
        raise ValueError(f"{argname} contains duplicates: {names}")
    under = [rate_name(p) for p in names]
    if len(set(under)) != len(under):
        dup = sorted({r for r in under if under.count(r) > 1}, key=INDEX.get)
        both = [tuple(p for p in names if rate_name(p) == r) for r in dup]
        raise ValueError(f"{argname} contains duplicates of the same rate: {both} (name either the rate or the time)")
    return tuple(sorted(names, key=lambda p: INDEX[rate_name(p)]))


def nuisance_parameters(nuisance, estimate, tied_R1=False, known=()):
    """The nuisance rates of a CRB: unknowns besides ``estimate``, in ``PARAMETERS`` order.

    ``nuisance="all"``: every free parameter that is neither estimated nor
    ``known`` (fixed, or measured by a separate scan); None or an empty
    selection: none; else the named ones (validated), less those.
    """
    skip = {rate_name(p) for p in estimate} | {rate_name(p) for p in known}
    if isinstance(nuisance, str) and nuisance == "all":
        names = free_parameters(tied_R1)
    elif nuisance is None or (not isinstance(nuisance, str) and len(tuple(nuisance)) == 0):
        names = ()
    else:
        names = resolve_estimate(nuisance, tied_R1, "nuisance", times=False)
    return tuple(p for p in names if p not in skip)


def _name_tuple(names, argname, what):
    """A tuple of names from one name or a sequence of them."""
    if isinstance(names, str):
        return (names,)
    try:
        return tuple(names)
    except TypeError:
        raise TypeError(f"{argname} must be a sequence of {what} names, got {names!r}") from None


def _target_indices(names, argname="names"):
    names = _name_tuple(names, argname, "target")
    if not names:
        raise ValueError(f"{argname} must name at least one target")
    try:
        idx = [INDEX[rate_name(p)] for p in names]
    except ValueError as err:
        raise ValueError(f"{argname}: {err}") from None
    return names, idx


def _check_positive(x, names, argname, what):
    """Raise if a column of a time/rate conversion is non-finite or <= 0."""
    for j, p in enumerate(names):
        if p not in TIMES:
            continue
        col = x[:, j]
        bad = ~(col > 0) | ~(col < float("inf"))  # also catches NaN
        bad = bad.cpu().numpy() if hasattr(bad, "cpu") else np.asarray(bad)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{argname}[:, {j}] ({what} for {p}) must be finite and > 0, got {float(col[i])} at sample {i}"
            )


def _time_factor(x, names, f, base=None):
    """Columns ``f(x)`` where the name is a time, ``base`` (default 1) elsewhere.

    ``f`` is evaluated on 1 in the non-time columns (no 1/0 for m0s = 0).
    """
    if hasattr(x, "detach"):
        mask = torch.tensor([p in TIMES for p in names], device=x.device)
        fx = f(torch.where(mask, x, torch.ones_like(x)))
        return torch.where(mask, fx, torch.ones_like(x) if base is None else base)
    mask = np.array([p in TIMES for p in names])
    x = np.asarray(x, dtype=np.float64)
    fx = f(np.where(mask, x, 1.0))
    return np.where(mask, fx, 1.0 if base is None else np.asarray(base, dtype=np.float64))


def _as_2d(x, argname, ncols=None):
    arr = x if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    if arr.ndim == 1 and ncols is None:
        arr = arr[None, :]
    if arr.ndim != 2 or (ncols is not None and arr.shape[1] != ncols):
        want = f"(n_samples, {ncols})" if ncols is not None else "(n_samples, 8)"
        raise ValueError(f"{argname} must have shape {want}, got {tuple(arr.shape)}")
    return arr


def targets_from_theta(theta, names):
    """Target values from ``theta`` (rates): ``1/R`` for the names in :data:`TIMES`.

    Parameters
    ----------
    theta : ndarray or torch.Tensor, shape (n_samples, 8)
        In ``PARAMETERS`` order.
    names : sequence of str
        Target names (rates and/or times).

    Returns
    -------
    ndarray or torch.Tensor, shape (n_samples, len(names))
        Same type as ``theta``.

    Raises
    ------
    ValueError
        For unknown names, a wrong shape, or a non-finite or non-positive
        rate under a time target.
    """
    names, idx = _target_indices(names)
    theta = _as_2d(theta, "theta")
    if theta.shape[1] != len(PARAMETERS):
        raise ValueError(f"theta must have shape (n_samples, {len(PARAMETERS)}), got {tuple(theta.shape)}")
    y = theta[:, idx]
    _check_positive(y, names, "theta", "rate")
    return _time_factor(y, names, lambda r: 1.0 / r, base=y)


def theta_columns_from_targets(y, names):
    """Rates from target values: ``{rate name: (n,) values}`` (``1/T`` for times).

    Parameters
    ----------
    y : ndarray or torch.Tensor, shape (n_samples, len(names))
        Target values, e.g. predictions.
    names : sequence of str
        Target names of the columns of ``y``.

    Returns
    -------
    dict
        Maps ``rate_name(name)`` to a column of the same type as ``y``.

    Raises
    ------
    ValueError
        For unknown names, a wrong shape, duplicate rates, or a non-finite or
        non-positive time.
    """
    names, idx = _target_indices(names)
    if len(set(idx)) != len(idx):
        raise ValueError(f"names contains duplicates of the same rate: {names}")
    y = _as_2d(y, "y", len(names))
    _check_positive(y, names, "y", "time")
    return {rate_name(p): (1.0 / y[:, j] if p in TIMES else y[:, j]) for j, p in enumerate(names)}


def crb_to_targets(crb_rates, theta, names):
    """CRB in target units (delta method): ``CRB(T) = CRB(R) / R**4`` for times.

    Parameters
    ----------
    crb_rates : ndarray or torch.Tensor, shape (n_samples, k) or (n_samples, k, k)
        CRB (variances) or the full CRB matrix of the rates
        ``[rate_name(p) for p in names]``, in the order of ``names``.
    theta : ndarray or torch.Tensor, shape (n_samples, 8)
        The rates at which the CRB was computed (``PARAMETERS`` order).
    names : sequence of str
        Target names.

    Returns
    -------
    Same type and shape as ``crb_rates``
        Identity for rate targets; for a matrix, ``D C D`` with
        ``D = diag(dT/dR)`` (``-1/R**2`` for times, 1 otherwise).

    Raises
    ------
    ValueError
        For unknown names, mismatched shapes, or a non-finite or non-positive
        rate under a time target.
    """
    names, idx = _target_indices(names)
    theta = _as_2d(theta, "theta", len(PARAMETERS))
    is_t = hasattr(crb_rates, "detach")
    c = crb_rates if is_t else np.asarray(crb_rates, dtype=np.float64)
    k = len(names)
    if c.ndim not in (2, 3) or c.shape[0] != theta.shape[0] or tuple(c.shape[1:]) not in ((k,), (k, k)):
        raise ValueError(
            f"crb_rates must have shape ({theta.shape[0]}, {k}) or ({theta.shape[0]}, {k}, {k}) "
            f"for names {names}, got {tuple(c.shape)}"
        )
    R = theta[:, idx]
    if is_t:
        R = torch.as_tensor(R, dtype=c.dtype, device=c.device)
    elif hasattr(R, "detach"):
        R = R.detach().cpu().numpy().astype(np.float64)
    _check_positive(R, names, "theta", "rate")
    d = _time_factor(R, names, lambda r: -1.0 / r**2)
    if c.ndim == 2:
        return c * d * d
    return d[:, :, None] * c * d[:, None, :]


def tie_R1(theta):
    """Return a copy of ``theta`` with R1s set to R1f (numpy or torch)."""
    out = theta.clone() if hasattr(theta, "clone") else np.array(theta, dtype=float, copy=True)
    out[..., INDEX["R1s"]] = out[..., INDEX["R1f"]]
    return out


def validate_theta(theta, argname="theta"):
    """Check shape (n, 8), finiteness and physical bounds; return float64 numpy.

    Raises
    ------
    TypeError, ValueError
        Naming the argument, the parameter and the offending sample.
    """
    expected = f"{argname} must be a real array of shape (n_samples, 8), got {type(theta).__name__}"
    try:
        raw = np.asarray(theta.detach().cpu() if hasattr(theta, "detach") else theta)
        real = not np.iscomplexobj(raw)
        arr = raw.astype(np.float64) if real else None
    except (TypeError, ValueError):
        raise TypeError(expected) from None
    if not real:  # a cast would silently drop the imaginary part
        raise TypeError(f"{argname} must be real, got complex dtype {raw.dtype}")
    if arr.ndim == 1 and arr.shape[0] == len(PARAMETERS):
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(PARAMETERS):
        raise ValueError(
            f"{argname} must have shape (n_samples, {len(PARAMETERS)}) with columns {PARAMETERS}, got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{argname} has no samples")
    for j, name in enumerate(PARAMETERS):
        col = arr[:, j]
        bad = ~np.isfinite(col)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{argname}[:, {j}] ({name}) is not finite at sample {i}: {col[i]}")
        lo, hi = BOUNDS[name]
        out = (col < lo) | (col > hi)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise ValueError(
                f"{argname}[:, {j}] ({name}) = {col[i]:g} {UNITS[name]} at sample {i} is outside "
                f"its physical range [{lo:g}, {hi:g}]"
            )
    return arr
