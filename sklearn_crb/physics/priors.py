"""Parameter priors: the tissue distributions training sets are drawn from.

The ``"parenchyma"`` prior is the one of Mao, Flassbeck & Assländer
(arXiv 2312.11468): truncated normals, with ``omega0 ~ U[-pi/TR, pi/TR]``.
The ``"paper2022"`` prior is the tied-T1 test-grid prior of Zhang et al.,
MRM 2022 (uniform m0s, T1 and T2f). The ``"brain"`` prior
(:meth:`ParameterPrior.brain`) widens both to parenchyma, CSF-like and
partial-volume tissue, for the tied and the untied model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from sklearn_crb.physics.parameters import INDEX, PARAMETERS

__all__ = ["ParameterPrior", "TruncatedNormal", "Uniform", "ReciprocalUniform", "LogUniform", "resolve_prior"]


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

    @property
    def support(self):
        """(min, max) of the drawn values."""
        return (self.low, self.high)

    def pdf(self, x):
        """Probability density at ``x``."""
        a, b = (self.low - self.mean) / self.sd, (self.high - self.mean) / self.sd
        return stats.truncnorm.pdf(x, a, b, loc=self.mean, scale=self.sd)


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

    @property
    def support(self):
        """(min, max) of the drawn values."""
        return (self.low, self.high)

    def pdf(self, x):
        """Probability density at ``x``."""
        x = np.asarray(x, dtype=np.float64)
        return np.where((x >= self.low) & (x <= self.high), 1.0 / (self.high - self.low), 0.0)


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

    @property
    def support(self):
        """(min, max) of the drawn values, ``(1/high, 1/low)``."""
        return (1.0 / self.high, 1.0 / self.low)

    def pdf(self, x):
        """Probability density of ``1/X`` at ``x``: ``1 / ((high - low) x**2)``."""
        x = np.asarray(x, dtype=np.float64)
        lo, hi = self.support
        inside = (x >= lo) & (x <= hi)
        return np.where(inside, 1.0 / ((self.high - self.low) * np.where(inside, x, 1.0) ** 2), 0.0)


@dataclass(frozen=True)
class LogUniform:
    """``log X`` uniform on ``[log low, log high]`` (0 < low < high).

    Density ``1 / (x log(high/low))``; the same weight per factor of two, which
    suits T2f spanning parenchyma (tens of ms) and CSF (seconds).
    """

    low: float
    high: float

    def __post_init__(self):
        if not (0 < self.low < self.high < np.inf):
            raise ValueError(f"LogUniform needs 0 < low < high < inf, got low={self.low}, high={self.high}")

    def sample(self, n, rng):
        return np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=n))

    @property
    def center(self):
        """Mean ``(high - low) / log(high / low)``."""
        return float((self.high - self.low) / np.log(self.high / self.low))

    @property
    def support(self):
        """(min, max) of the drawn values."""
        return (self.low, self.high)

    def pdf(self, x):
        """Probability density at ``x``."""
        x = np.asarray(x, dtype=np.float64)
        inside = (x >= self.low) & (x <= self.high)
        return np.where(inside, 1.0 / (np.where(inside, x, 1.0) * np.log(self.high / self.low)), 0.0)


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
    def brain(cls, TR=3.5e-3, tied_R1=False):
        """Whole-brain prior: parenchyma, CSF-like and partial-volume tissue.

        TR in s sets the off-resonance range. Ranges and their sources (3 T):

        ======  ==============================  ==========================================
        name    distribution                    rationale / source
        ======  ==============================  ==========================================
        m0s     U[0, 0.35]                      WM pool-size ratio F ~ 0.15-0.18 (m0s ~
                                                0.13-0.15), GM about half of it, bSSFP
                                                qMT (Gloor et al., MRM 2008); CSF ~ 0;
                                                upper limit as in Mao et al.
                                                (arXiv 2312.11468)
        R1f     U[0.2, 1.6] 1/s                 T1 0.625-5 s: WM T1 0.6-1.1 s in the
                (T1 0.625-5 s)                  literature (Assländer, arXiv 2409.05318),
                                                GM up to ~2 s, CSF ~4.2-4.4 s (Lu et al.,
                                                J Magn Reson Imaging 2005; Rooney et al.,
                                                MRM 2007)
        R2f     LogUniform[0.5, 40] 1/s         T2f 25 ms-2 s: parenchyma tens of ms,
                (T2f 25 ms-2 s)                 CSF of the order of seconds
        Rex     tied: U[5, 60] 1/s              tied-R1 fits of the generalized Bloch
                                                model (Assländer et al., MRM 2022) give
                                                larger exchange rates (~25-30 1/s in
                                                vivo) than untied ones; the range covers
                                                them with margin
                untied: U[2, 40] 1/s            Mao et al.: N(10, 5) on [2, 30] 1/s,
                                                widened
        R1s     tied: = R1f                     single T1 (Zhang et al., MRM 2022)
                untied: U[1, 6] 1/s             range of the Mao et al. prior; not
                                                identifiable where m0s ~ 0 (CSF)
        T2s     TN(14, 4) us on [5, 25] us      Mao et al.; T2 of the semi-solid pool
                                                ~12 us (Gloor et al., MRM 2008)
        omega0  U[-pi/TR, pi/TR] rad/s          one bSSFP period (Mao et al.)
        B1      TN(0.9, 0.2) on [0.6, 1.3]      Mao et al.
        ======  ==============================  ==========================================

        Draws with ``R2f <= R1f`` are rejected (T2f < T1).
        """
        w = np.pi / TR
        R1f = Uniform(0.2, 1.6)
        return cls(
            {
                "m0s": Uniform(0.0, 0.35),
                "R1f": R1f,
                "R2f": LogUniform(0.5, 40.0),
                "Rex": Uniform(5.0, 60.0) if tied_R1 else Uniform(2.0, 40.0),
                "R1s": R1f if tied_R1 else Uniform(1.0, 6.0),
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

    Names: ``"brain"`` (:meth:`ParameterPrior.brain`, tied or untied as
    ``tied_R1``), ``"parenchyma"`` and ``"paper2022"`` (tied only). ``None``
    gives ``"paper2022"`` for the tied-T1 model and ``"parenchyma"``
    otherwise; ``TR`` (s) sets the off-resonance range.
    """
    if isinstance(prior, ParameterPrior):
        return prior
    name = prior or ("paper2022" if tied_R1 else "parenchyma")
    if name == "parenchyma":
        return ParameterPrior.parenchyma(TR, tied_R1=tied_R1)
    if name == "paper2022":
        return ParameterPrior.paper2022(TR)
    if name == "brain":
        return ParameterPrior.brain(TR, tied_R1=tied_R1)
    raise ValueError(f"prior must be a ParameterPrior, 'brain', 'parenchyma' or 'paper2022', got {prior!r}")
