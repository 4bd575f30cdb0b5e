"""Canonical parameters: priors, tying, validation, time targets."""

import numpy as np
import pytest
import torch

import sklearn_crb
from sklearn_crb.physics.parameters import (
    BOUNDS,
    INDEX,
    PARAMETERS,
    TIMES,
    UNITS,
    crb_to_targets,
    rate_name,
    resolve_estimate,
    targets_from_theta,
    theta_columns_from_targets,
    validate_theta,
)
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


def test_time_names():
    assert TIMES == {"T1f": "R1f", "T2f": "R2f", "T1s": "R1s"}
    for t, r in TIMES.items():
        assert UNITS[t] == "s" and UNITS[r] == "1/s" and rate_name(t) == r
    for p in PARAMETERS:
        assert rate_name(p) == p
    with pytest.raises(ValueError, match="unknown target name 'T1'"):
        rate_name("T1")


def test_resolve_estimate_times():
    # names kept as given, ordered as their rates in PARAMETERS
    assert resolve_estimate(("T2f", "m0s", "T1f")) == ("m0s", "T1f", "T2f")
    assert resolve_estimate(("T1s", "R1f", "T2s")) == ("R1f", "T1s", "T2s")
    assert resolve_estimate("T1f", tied_R1=True) == ("T1f",)
    assert resolve_estimate(("T1f", "R2f"), tied_R1=True) == ("T1f", "R2f")
    with pytest.raises(ValueError, match="same rate.*R1f.*T1f"):
        resolve_estimate(("R1f", "m0s", "T1f"))
    with pytest.raises(ValueError, match="same rate"):
        resolve_estimate(("T2f", "R2f"))
    for name in ("T1s", "R1s"):
        with pytest.raises(ValueError, match="R1s is tied"):
            resolve_estimate(("m0s", name), tied_R1=True)
    with pytest.raises(ValueError, match=r"^myarg contains unknown names \['T1'\].*allowed:.*'T1f'"):
        resolve_estimate(("m0s", "T1"), argname="myarg")
    with pytest.raises(ValueError, match="unknown names \\['T1f'\\]"):
        resolve_estimate(("T1f",), times=False)
    with pytest.raises(ValueError, match="unknown"):
        resolve_estimate((1,))
    with pytest.raises(ValueError, match="at least one"):
        resolve_estimate(())
    with pytest.raises(TypeError, match="estimate must be a sequence"):
        resolve_estimate(3)


def _theta(n=50, seed=0):
    rng = np.random.default_rng(seed)
    th = np.column_stack([rng.uniform(0, .3, n), rng.uniform(.2, 1.6, n), rng.uniform(.5, 40, n),
                          rng.uniform(2, 40, n), rng.uniform(1, 6, n), rng.uniform(5e-6, 25e-6, n),
                          rng.uniform(-100, 100, n), rng.uniform(.6, 1.3, n)])
    th[0, 0] = 0.0  # m0s = 0 is a valid rate-form target
    return th


@pytest.mark.parametrize("names", [("m0s", "T1f", "T2f"), ("T1s", "Rex", "R2f"), ("T2s", "B1", "omega0", "T1f")])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_targets_round_trip(names, backend):
    th = _theta()
    x = torch.from_numpy(th) if backend == "torch" else th
    y = targets_from_theta(x, names)
    assert type(y) is type(x) and tuple(y.shape) == (th.shape[0], len(names))
    yn = np.asarray(y)
    for j, p in enumerate(names):
        col = th[:, INDEX[rate_name(p)]]
        np.testing.assert_allclose(yn[:, j], 1 / col if p in TIMES else col, rtol=1e-15)
    cols = theta_columns_from_targets(y, names)
    assert list(cols) == [rate_name(p) for p in names]
    for r, v in cols.items():
        assert type(v) is type(x)
        np.testing.assert_allclose(np.asarray(v), th[:, INDEX[r]], rtol=1e-14)


def test_targets_torch_gradient():
    th = torch.from_numpy(_theta(5)).requires_grad_(True)
    targets_from_theta(th, ("m0s", "T1f")).sum().backward()
    g = th.grad.numpy()
    np.testing.assert_allclose(g[:, INDEX["R1f"]], -1 / th.detach().numpy()[:, INDEX["R1f"]] ** 2)
    np.testing.assert_array_equal(g[:, INDEX["m0s"]], 1.0)


def test_crb_to_targets_monte_carlo():
    """Transform Gaussian samples of the rates with a small covariance: the sample
    covariance of the targets must match crb_to_targets (delta method)."""
    rng = np.random.default_rng(3)
    names = ("m0s", "T1f", "T2f")
    th = _theta(1, seed=4)
    th[0, 0] = 0.15
    R = th[0, [INDEX[rate_name(p)] for p in names]]
    A = rng.normal(size=(3, 3)) * (1e-3 * R)[:, None]  # correlated, sd ~ 0.1 % of each rate
    C = A @ A.T
    n = 400_000
    draws = np.tile(th, (n, 1))
    draws[:, [INDEX[rate_name(p)] for p in names]] = R + rng.multivariate_normal(np.zeros(3), C, size=n)
    emp = np.cov(targets_from_theta(draws, names), rowvar=False)
    full = crb_to_targets(C[None], th, names)[0]
    np.testing.assert_allclose(full, emp, rtol=0.02, atol=0.02 * np.sqrt(np.outer(np.diag(emp), np.diag(emp))).max())
    diag = crb_to_targets(np.diag(C)[None], th, names)[0]
    np.testing.assert_allclose(diag, np.diag(emp), rtol=0.02)
    np.testing.assert_allclose(diag, np.diag(full), rtol=1e-14)
    # rates pass unchanged; torch gives the same numbers
    np.testing.assert_array_equal(crb_to_targets(C[None], th, ("m0s", "R1f", "R2f"))[0], C)
    t = crb_to_targets(torch.from_numpy(C[None]), torch.from_numpy(th), names)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy()[0], full, rtol=1e-14)


def test_crb_to_targets_finite_difference():
    """Delta method with a finite-difference derivative of T(R) = 1/R."""
    th = _theta(20, seed=5)
    names = ("T2f", "m0s", "T1s")
    crb = np.random.default_rng(6).uniform(0.5, 2, size=(20, 3))
    out = crb_to_targets(crb, th, names)
    for j, p in enumerate(names):
        r = th[:, INDEX[rate_name(p)]]
        h = 1e-6 * r + 1e-9  # m0s = 0 at sample 0
        fd = (targets_from_theta(np.where(np.arange(8) == INDEX[rate_name(p)], th + h[:, None], th), [p])[:, 0]
              - targets_from_theta(np.where(np.arange(8) == INDEX[rate_name(p)], th - h[:, None], th), [p])[:, 0]
              ) / (2 * h)
        np.testing.assert_allclose(out[:, j], crb[:, j] * fd**2, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_time_targets_reject_bad_rates(bad):
    th = _theta(4)
    th[2, INDEX["R1f"]] = bad
    with pytest.raises(ValueError, match=r"theta\[:, 1\].*T1f.*finite and > 0.*sample 2"):
        targets_from_theta(th, ("m0s", "T1f"))
    with pytest.raises(ValueError, match="T1f.*finite and > 0"):
        crb_to_targets(np.ones((4, 2)), th, ("m0s", "T1f"))
    with pytest.raises(ValueError, match="T1f.*finite and > 0"):
        targets_from_theta(torch.from_numpy(th), ("T1f",))
    assert np.all(np.isfinite(targets_from_theta(np.nan_to_num(th), ("m0s",))))  # rate form: no transform
    y = np.ones((4, 2))
    y[1, 1] = bad
    with pytest.raises(ValueError, match=r"y\[:, 1\].*T2f.*finite and > 0.*sample 1"):
        theta_columns_from_targets(y, ("m0s", "T2f"))


def test_target_conversion_argument_errors():
    th = _theta(3)
    with pytest.raises(ValueError, match="unknown target name 'T1'"):
        targets_from_theta(th, ("m0s", "T1"))
    with pytest.raises(ValueError, match="shape"):
        targets_from_theta(th[:, :7], ("m0s",))
    with pytest.raises(ValueError, match="y must have shape"):
        theta_columns_from_targets(np.ones((3, 3)), ("m0s", "T1f"))
    with pytest.raises(ValueError, match="same rate"):
        theta_columns_from_targets(np.ones((3, 2)), ("R1f", "T1f"))
    with pytest.raises(ValueError, match="crb_rates must have shape"):
        crb_to_targets(np.ones((3, 3)), th, ("m0s", "T1f"))
    with pytest.raises(ValueError, match="crb_rates must have shape"):
        crb_to_targets(np.ones((2, 2)), th, ("m0s", "T1f"))


def test_nuisance_parameters_selection():
    from sklearn_crb.physics.parameters import nuisance_parameters

    assert nuisance_parameters("all", ("m0s", "T1f", "R2f"), tied_R1=True) == ("Rex", "T2s", "omega0", "B1")
    assert nuisance_parameters("all", ("m0s",), tied_R1=True, known=("B1", "omega0")) == ("R1f", "R2f", "Rex", "T2s")
    assert nuisance_parameters(None, ("m0s",)) == () and nuisance_parameters((), ("m0s",)) == ()
    assert nuisance_parameters(("B1", "m0s"), ("m0s",)) == ("B1",)  # an estimated name is not a nuisance
    with pytest.raises(ValueError, match="nuisance"):
        nuisance_parameters(("B0",), ("m0s",))
    with pytest.raises(ValueError, match="nuisance"):
        nuisance_parameters(("R1s",), ("m0s",), tied_R1=True)
