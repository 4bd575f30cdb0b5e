"""Priors: the brain prior (tied and untied), LogUniform, supports and coverage."""

import numpy as np
import pytest
from scipy import integrate, stats

from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, validate_theta
from sklearn_crb.physics.priors import (
    LogUniform,
    ParameterPrior,
    ReciprocalUniform,
    TruncatedNormal,
    Uniform,
    resolve_prior,
)

PRIORS = {
    "brain-tied": lambda: ParameterPrior.brain(tied_R1=True),
    "brain-untied": lambda: ParameterPrior.brain(tied_R1=False),
    "parenchyma": lambda: ParameterPrior.parenchyma(),
    "paper2022": lambda: ParameterPrior.paper2022(),
}

# (m0s, T1 in s, T2f in s): WM and GM m0s/T1 as in the brief, typical parenchyma
# T2f of tens of ms; CSF with m0s ~ 0, long T1 and T2f.
TISSUES = {"WM": (0.14, 1.5, 0.07), "GM": (0.08, 2.0, 0.09), "CSF": (0.01, 4.5, 1.5)}


@pytest.mark.parametrize("name", list(PRIORS))
def test_samples_inside_bounds_and_support(name):
    prior = PRIORS[name]()
    th = prior.sample(20000, random_state=0)
    assert th.shape == (20000, len(PARAMETERS))
    validate_theta(th)  # finite and inside BOUNDS
    for p in PARAMETERS:
        lo, hi = prior.distributions[p].support
        col = th[:, INDEX[p]]
        assert col.min() >= lo and col.max() <= hi, p
        assert col.min() >= BOUNDS[p][0] and col.max() <= BOUNDS[p][1], p
        assert col.max() - col.min() > 0.5 * (hi - lo), p  # the draws spread over the support
    assert np.all(th[:, INDEX["R2f"]] > th[:, INDEX["R1f"]])
    np.testing.assert_array_equal(prior.sample(7, 3), prior.sample(7, 3))


def test_brain_tied_and_untied():
    tied = ParameterPrior.brain(tied_R1=True).sample(5000, 1)
    untied = ParameterPrior.brain(tied_R1=False).sample(5000, 1)
    np.testing.assert_array_equal(tied[:, INDEX["R1s"]], tied[:, INDEX["R1f"]])
    assert not np.allclose(untied[:, INDEX["R1s"]], untied[:, INDEX["R1f"]])
    r1s = untied[:, INDEX["R1s"]]
    assert r1s.min() >= 1.0 and r1s.max() <= 6.0
    # exchange: tied U[5, 60], untied U[2, 40] 1/s
    assert tied[:, INDEX["Rex"]].min() >= 5 and tied[:, INDEX["Rex"]].max() <= 60
    assert untied[:, INDEX["Rex"]].min() >= 2 and untied[:, INDEX["Rex"]].max() <= 40
    assert tied[:, INDEX["Rex"]].max() > 45 and untied[:, INDEX["Rex"]].min() < 4
    # T1 0.625-5 s, T2f 25 ms-2 s, m0s 0-0.35, omega0 within one period
    T1 = 1 / tied[:, INDEX["R1f"]]
    T2f = 1 / tied[:, INDEX["R2f"]]
    assert T1.min() >= 0.625 and T1.max() <= 5.0 and T1.max() > 4.0
    assert T2f.min() >= 0.025 and T2f.max() <= 2.0 and T2f.max() > 1.0
    assert tied[:, INDEX["m0s"]].min() >= 0 and tied[:, INDEX["m0s"]].max() <= 0.35
    w = np.pi / 5e-3
    om = ParameterPrior.brain(TR=5e-3).sample(2000, 2)[:, INDEX["omega0"]]
    assert om.min() >= -w and om.max() <= w and om.max() - om.min() > 1.8 * w


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tissue", list(TISSUES))
def test_brain_covers_tissue(tissue, tied):
    """Each tissue value lies inside the support with a density of at least 5 %
    of the flat density over the support, and draws land near it."""
    m0s, T1, T2f = TISSUES[tissue]
    prior = ParameterPrior.brain(tied_R1=tied)
    point = {"m0s": m0s, "R1f": 1 / T1, "R2f": 1 / T2f}
    for p, v in point.items():
        d = prior.distributions[p]
        lo, hi = d.support
        assert lo <= v <= hi, (tissue, p)
        assert d.pdf(v) * (hi - lo) > 0.05, (tissue, p)
    n = 500_000
    th = prior.sample(n, random_state=4)
    near = ((np.abs(th[:, INDEX["m0s"]] - m0s) < 0.01)
            & (np.abs(th[:, INDEX["R1f"]] * T1 - 1) < 0.1)
            & (np.abs(th[:, INDEX["R2f"]] * T2f - 1) < 0.1))
    # expected count from the marginal densities (box widths 0.02, 0.2 R, 0.2 R);
    # the R2f > R1f rejection only raises it
    expected = n * np.prod([prior.distributions[p].pdf(v) * w
                                  for p, v, w in [("m0s", m0s, 0.02), ("R1f", 1 / T1, 0.2 / T1),
                                                  ("R2f", 1 / T2f, 0.2 / T2f)]])
    assert expected > 20
    assert 0.5 * expected < near.sum() < 2 * expected, (tissue, near.sum(), expected)


def test_loguniform_center_and_distribution():
    d = LogUniform(0.5, 40.0)
    x = d.sample(400_000, np.random.default_rng(5))
    assert x.min() >= 0.5 and x.max() <= 40.0
    assert d.center == pytest.approx((40 - 0.5) / np.log(80))
    assert x.mean() == pytest.approx(d.center, rel=0.01)
    # log X is uniform on [log low, log high]
    ks = stats.kstest(np.log(x[:20000]), stats.uniform(np.log(0.5), np.log(80)).cdf)
    assert ks.pvalue > 1e-3
    for bad in [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0), (1.0, np.inf)]:
        with pytest.raises(ValueError, match="LogUniform needs"):
            LogUniform(*bad)


@pytest.mark.parametrize("d", [LogUniform(0.5, 40.0), Uniform(2.0, 40.0), ReciprocalUniform(0.65, 2.0),
                               TruncatedNormal(0.9, 0.2, 0.6, 1.3)])
def test_pdf_normalised_and_center(d):
    lo, hi = d.support
    total, _ = integrate.quad(lambda v: float(d.pdf(v)), lo, hi, limit=200)
    assert total == pytest.approx(1.0, rel=1e-6)
    mean, _ = integrate.quad(lambda v: v * float(d.pdf(v)), lo, hi, limit=200)
    assert d.center == pytest.approx(mean, rel=1e-6)
    assert float(d.pdf(lo - 1e-3 * (hi - lo))) == 0.0 and float(d.pdf(hi + 1e-3 * (hi - lo))) == 0.0


def test_resolve_prior_names():
    for tied in (True, False):
        p = resolve_prior("brain", TR=4e-3, tied_R1=tied)
        assert isinstance(p, ParameterPrior) and p.tied_R1 is tied
        assert p.distributions["R2f"] == LogUniform(0.5, 40.0)
        assert p.distributions["omega0"] == Uniform(-np.pi / 4e-3, np.pi / 4e-3)
    assert resolve_prior("parenchyma").distributions["R2f"] == TruncatedNormal(12.5, 4.0, 1.0, 20.0)
    assert resolve_prior("paper2022").tied_R1
    prior = ParameterPrior.brain()
    assert resolve_prior(prior) is prior
    with pytest.raises(ValueError, match="'brain', 'parenchyma' or 'paper2022'"):
        resolve_prior("wm")


def test_brain_center():
    for tied in (True, False):
        prior = ParameterPrior.brain(tied_R1=tied)
        c = prior.center()
        assert c.shape == (len(PARAMETERS),)
        th = prior.sample(100_000, 6)
        for p in ("m0s", "Rex", "T2s", "B1"):  # not affected by the R2f > R1f rejection
            assert th[:, INDEX[p]].mean() == pytest.approx(c[INDEX[p]], rel=0.01), p
        assert bool(c[INDEX["R1s"]] == c[INDEX["R1f"]]) is tied
