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

The default prior is the parenchyma prior of Mao, Flassbeck & Assländer
(arXiv 2312.11468): truncated normals, with ``omega0 ~ U[-pi/TR, pi/TR]``.
The ``"paper2022"`` prior is the tied-T1 test-grid prior of Zhang et al.,
MRM 2022 (uniform m0s, T1 and T2f).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats

__all__ = [
    "PARAMETERS",
    "UNITS",
    "BOUNDS",
    "ParameterPrior",
    "TruncatedNormal",
    "Uniform",
    "free_parameters",
    "resolve_prior",
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


@dataclass(frozen=True)
class TruncatedNormal:
    """Normal(mean, sd) truncated to [low, high]."""

    mean: float
    sd: float
    low: float
    high: float

    def sample(self, n, rng):
        a, b = (self.low - self.mean) / self.sd, (self.high - self.mean) / self.sd
        return stats.truncnorm.rvs(a, b, loc=self.mean, scale=self.sd, size=n, random_state=rng)

    @property
    def center(self):
        a, b = (self.low - self.mean) / self.sd, (self.high - self.mean) / self.sd
        return float(stats.truncnorm.mean(a, b, loc=self.mean, scale=self.sd))


@dataclass(frozen=True)
class Uniform:
    """Uniform on [low, high]."""

    low: float
    high: float

    def sample(self, n, rng):
        return rng.uniform(self.low, self.high, size=n)

    @property
    def center(self):
        return 0.5 * (self.low + self.high)


@dataclass(frozen=True)
class ReciprocalUniform:
    """``1/X`` with ``X ~ U[low, high]`` (e.g. R1 = 1/T1 with T1 uniform)."""

    low: float
    high: float

    def sample(self, n, rng):
        return 1.0 / rng.uniform(self.low, self.high, size=n)

    @property
    def center(self):
        return float(np.log(self.high / self.low) / (self.high - self.low))


class ParameterPrior:
    """Independent per-parameter distributions over ``PARAMETERS``.

    Parameters
    ----------
    distributions : dict
        Maps every name in ``PARAMETERS`` to an object with ``sample(n, rng)``
        and ``center`` (``TruncatedNormal``, ``Uniform``, ...).
    tied_R1 : bool
        If True, ``R1s`` is set equal to ``R1f`` (the paper's single T1).
    R2f_gt_R1f : bool
        Reject draws with ``R2f <= R1f`` (T2 < T1 physically).
    """

    def __init__(self, distributions, tied_R1=False, R2f_gt_R1f=True):
        missing = set(PARAMETERS) - set(distributions)
        if missing:
            raise ValueError(f"distributions is missing {sorted(missing)}")
        self.distributions = dict(distributions)
        self.tied_R1 = bool(tied_R1)
        self.R2f_gt_R1f = bool(R2f_gt_R1f)

    @classmethod
    def parenchyma(cls, TR=3.5e-3, tied_R1=False):
        """Brain-parenchyma prior of Mao et al. (arXiv 2312.11468), TR in s."""
        w = np.pi / TR
        return cls(
            {
                "m0s": TruncatedNormal(0.15, 0.15, 0.0, 0.35),
                "R1f": TruncatedNormal(0.45, 0.2, 0.1, 1.0),
                "R2f": TruncatedNormal(12.5, 4.0, 1.0, 20.0),
                "Rex": TruncatedNormal(10.0, 5.0, 2.0, 30.0),
                "R1s": TruncatedNormal(3.0, 0.75, 1.0, 6.0),
                "T2s": TruncatedNormal(14e-6, 4e-6, 5e-6, 25e-6),
                "omega0": Uniform(-w, w),
                "B1": TruncatedNormal(0.9, 0.2, 0.6, 1.3),
            },
            tied_R1=tied_R1,
        )

    @classmethod
    def paper2022(cls, TR=3.5e-3):
        """Tied-T1 prior of Zhang et al. 2022: m0s ~ U[0, .25], T1 ~ U[.65, 2] s,
        T2f ~ U[30, 150] ms; Rex, T2s, omega0 and B1 as in ``parenchyma``."""
        base = cls.parenchyma(TR).distributions
        base.update(
            m0s=Uniform(0.0, 0.25),
            R1f=ReciprocalUniform(0.65, 2.0),
            R2f=ReciprocalUniform(0.030, 0.150),
        )
        base["R1s"] = base["R1f"]
        return cls(base, tied_R1=True)

    def sample(self, n_samples, random_state=None):
        """Draw ``theta`` of shape (n_samples, 8) in ``PARAMETERS`` order."""
        rng = np.random.default_rng(random_state)
        n = int(n_samples)
        if n < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        out = np.empty((0, len(PARAMETERS)))
        while out.shape[0] < n:
            m = max(2 * (n - out.shape[0]), 16)
            draw = np.column_stack([self.distributions[p].sample(m, rng) for p in PARAMETERS])
            if self.tied_R1:
                draw[:, INDEX["R1s"]] = draw[:, INDEX["R1f"]]
            if self.R2f_gt_R1f:
                draw = draw[draw[:, INDEX["R2f"]] > draw[:, INDEX["R1f"]]]
            out = np.vstack([out, draw])
        return out[:n]

    def center(self):
        """Prior means (the trivial predictor), shape (8,)."""
        c = np.array([self.distributions[p].center for p in PARAMETERS])
        if self.tied_R1:
            c[INDEX["R1s"]] = c[INDEX["R1f"]]
        return c


def resolve_prior(prior, TR=3.5e-3, tied_R1=False):
    """A ``ParameterPrior`` from an instance, a name or None.

    ``None`` gives ``"paper2022"`` for the tied-T1 model and ``"parenchyma"``
    otherwise; ``TR`` (s) sets the off-resonance range.
    """
    if isinstance(prior, ParameterPrior):
        return prior
    name = prior or ("paper2022" if tied_R1 else "parenchyma")
    if name == "parenchyma":
        return ParameterPrior.parenchyma(TR, tied_R1=tied_R1)
    if name == "paper2022":
        return ParameterPrior.paper2022(TR)
    raise ValueError(f"prior must be a ParameterPrior, 'parenchyma' or 'paper2022', got {prior!r}")


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
    try:
        arr = np.asarray(theta.detach().cpu() if hasattr(theta, "detach") else theta, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a real array of shape (n_samples, 8), got {type(theta).__name__}") from None
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


def column_indices(names: Iterable[str]) -> list:
    """Indices of ``names`` in ``PARAMETERS``."""
    return [INDEX[n] for n in names]
