"""Canonical parameters: priors, tying, validation."""

import numpy as np
import pytest

import sklearn_crb
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, resolve_estimate, validate_theta
from sklearn_crb.physics.priors import ParameterPrior


def test_public_names():
    assert sklearn_crb.PARAMETERS == ("m0s", "R1f", "R2f", "Rex", "R1s", "T2s", "omega0", "B1")


@pytest.mark.parametrize("prior", [ParameterPrior.parenchyma(), ParameterPrior.paper2022()])
def test_prior_samples_inside_support(prior):
    th = prior.sample(5000, random_state=0)
    assert th.shape == (5000, 8)
    for p, d in prior.distributions.items():
        col = th[:, INDEX[p]]
        lo, hi = (1 / d.high, 1 / d.low) if type(d).__name__ == "ReciprocalUniform" else (d.low, d.high)
        assert col.min() >= lo - 1e-12 and col.max() <= hi + 1e-12, p
    assert np.all(th[:, INDEX["R2f"]] > th[:, INDEX["R1f"]])
    validate_theta(th)  # inside physical bounds
    np.testing.assert_array_equal(prior.sample(10, 1), prior.sample(10, 1))


def test_parenchyma_prior_moments():
    th = ParameterPrior.parenchyma().sample(20000, random_state=1)
    # truncated normal N(14, 4) us on [5, 25] us has mean ~14.0 us
    assert th[:, INDEX["T2s"]].mean() == pytest.approx(14e-6, rel=0.02)
    w = np.pi / 3.5e-3
    assert th[:, INDEX["omega0"]].min() >= -w and th[:, INDEX["omega0"]].max() <= w


def test_tied_prior():
    th = ParameterPrior.paper2022().sample(100, 0)
    np.testing.assert_array_equal(th[:, INDEX["R1s"]], th[:, INDEX["R1f"]])
    T1 = 1 / th[:, INDEX["R1f"]]
    assert T1.min() >= 0.65 and T1.max() <= 2.0


def test_resolve_estimate():
    assert resolve_estimate(("R2f", "m0s")) == ("m0s", "R2f")
    with pytest.raises(ValueError, match="R1s is tied"):
        resolve_estimate(("R1s",), tied_R1=True)
    with pytest.raises(ValueError, match="unknown"):
        resolve_estimate(("T1",))
    with pytest.raises(ValueError, match="duplicates"):
        resolve_estimate(("m0s", "m0s"))


def test_validate_theta_errors():
    good = np.array([[0.15, 0.5, 15, 30, 3, 10e-6, 0, 1]])
    with pytest.raises(ValueError, match="shape"):
        validate_theta(good[:, :7])
    bad = good.copy()
    bad[0, 5] = np.nan
    with pytest.raises(ValueError, match="T2s.*not finite"):
        validate_theta(bad)
    bad = good.copy()
    bad[0, 0] = 1.5
    with pytest.raises(ValueError, match=r"m0s.*outside"):
        validate_theta(bad)
    with pytest.raises(TypeError):
        validate_theta(object())
    assert set(BOUNDS) == set(PARAMETERS)
