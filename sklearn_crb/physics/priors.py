"""Parameter priors: the tissue distributions training sets are drawn from.

The ``"parenchyma"`` prior is the one of Mao, Flassbeck & Assländer
(arXiv 2312.11468): truncated normals, with ``omega0 ~ U[-pi/TR, pi/TR]``.
The ``"paper2022"`` prior is the tied-T1 test-grid prior of Zhang et al.,
MRM 2022 (uniform m0s, T1 and T2f).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from sklearn_crb.physics.parameters import INDEX, PARAMETERS

__all__ = ["ParameterPrior", "TruncatedNormal", "Uniform", "ReciprocalUniform", "resolve_prior"]


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
