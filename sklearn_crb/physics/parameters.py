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

Priors (distributions to draw training tissues from) live in :mod:`.priors`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PARAMETERS",
    "INDEX",
    "UNITS",
    "BOUNDS",
    "SCALE",
    "free_parameters",
    "validate_theta",
    "resolve_estimate",
    "tie_R1",
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
}

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


def resolve_estimate(estimate, tied_R1=False, argname="estimate"):
    """Validate a subset of parameter names and return it in canonical order."""
    if isinstance(estimate, str):
        estimate = (estimate,)
    try:
        names = tuple(estimate)
    except TypeError:
        raise TypeError(f"{argname} must be a sequence of parameter names, got {estimate!r}") from None
    allowed = free_parameters(tied_R1)
    bad = [p for p in names if p not in allowed]
    if bad:
        extra = " (R1s is tied to R1f)" if tied_R1 and "R1s" in bad else ""
        raise ValueError(f"{argname} contains unknown names {bad}{extra}; allowed: {allowed}")
    if len(set(names)) != len(names):
        raise ValueError(f"{argname} contains duplicates: {names}")
    if not names:
        raise ValueError(f"{argname} must name at least one parameter")
    return tuple(p for p in allowed if p in names)


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
