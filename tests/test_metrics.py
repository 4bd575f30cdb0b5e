"""Tests of the CRB metrics (sklearn_crb.metrics)."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin

from sklearn_crb.metrics import (
    MissingCRBError,
    bias_variance_report,
    constant_predictor_report,
    crb_efficiency_score,
    crb_normalized_mse,
    make_crb_scorer,
    prior_moments,
)


def test_normalized_mse_hand_computation():
    yt = np.array([[1.0, 10.0], [2.0, 20.0]])
    yp = np.array([[1.5, 12.0], [1.0, 20.0]])
    crb = np.array([[0.25, 4.0], [0.5, 1.0]])
    per = np.array([(0.25 / 0.25 + 1.0 / 0.5) / 2, (4.0 / 4.0 + 0.0) / 2])
    np.testing.assert_allclose(crb_normalized_mse(yt, yp, crb=crb, multioutput="raw_values"), per)
    assert crb_normalized_mse(yt, yp, crb=crb) == pytest.approx(per.mean())
    assert crb_normalized_mse(yt, yp, crb=crb, multioutput=[3, 1]) == pytest.approx((3 * per[0] + per[1]) / 4)
    np.testing.assert_allclose(crb_efficiency_score(yt, yp, crb=crb, multioutput="raw_values"), 1 / per)
    # aggregated: the reciprocal of the mean nMSE (harmonic mean of the per-parameter efficiencies)
    assert crb_efficiency_score(yt, yp, crb=crb) == pytest.approx(1 / per.mean())


def test_efficient_unbiased_estimator_scores_one():
    rng = np.random.default_rng(0)
    n = 200_000
    yt = rng.uniform(1, 2, (n, 2))
    crb = rng.uniform(0.01, 0.1, (n, 2))
    yp = yt + rng.standard_normal((n, 2)) * np.sqrt(crb)  # variance exactly the CRB
    assert crb_normalized_mse(yt, yp, crb=crb) == pytest.approx(1.0, abs=0.01)
    assert crb_efficiency_score(yt, yp, crb=crb) == pytest.approx(1.0, abs=0.01)


def test_bias_variance_report_recovers_known_bias_and_variance():
    rng = np.random.default_rng(1)
    n_theta, n_draws = 20, 4000
    theta = rng.uniform(1, 2, (n_theta, 2))
    crb = np.full((n_theta, 2), 0.04)
    bias = np.array([0.1, -0.2])  # 0.5 and -1 in units of sqrt(CRB)
    std = np.array([0.2, 0.4])  # 1 and 2 in units of sqrt(CRB)
    yp = theta[:, None] + bias + rng.standard_normal((n_theta, n_draws, 2)) * std
    rep = bias_variance_report(theta, yp, crb=crb, names=("a", "b"))
    np.testing.assert_allclose(rep.bias_over_sqrt_crb.mean(0), [0.5, -1.0], atol=0.02)
    np.testing.assert_allclose(rep.std_over_sqrt_crb.mean(0), [1.0, 2.0], atol=0.02)
    np.testing.assert_allclose(rep.summary["mean_normalized_mse"], [1.25, 5.0], rtol=0.02)
    np.testing.assert_allclose(rep.summary["median_abs_bias_over_sqrt_crb"], [0.5, 1.0], atol=0.03)
    assert {r["parameter"] for r in rep.table} == {"a", "b"}
    assert "median_abs_bias_over_sqrt_crb" in rep.to_string()
    # the same through the flat layout with groups
    flat = bias_variance_report(np.repeat(theta, n_draws, 0), yp.reshape(-1, 2), crb=np.repeat(crb, n_draws, 0),
                                groups=np.repeat(np.arange(n_theta), n_draws))
    np.testing.assert_allclose(flat.bias, rep.bias)
    np.testing.assert_allclose(flat.variance, rep.variance)


class _Const(RegressorMixin, BaseEstimator):
    def __init__(self, pred=None):
        self.pred = pred

    def predict(self, X):
        return self.pred


def test_scorer_signs_and_errors():
    yt = np.array([[1.0], [2.0]])
    crb = np.array([[0.5], [0.5]])
    est = _Const(np.array([[1.5], [2.5]]))  # nMSE = 0.25 / 0.5 = 0.5
    import sklearn

    # crb reaches a scorer as routed metadata (sklearn refuses extra kwargs otherwise)
    with sklearn.config_context(enable_metadata_routing=True):
        assert make_crb_scorer("normalized_mse")(est, None, yt, crb=crb) == pytest.approx(-0.5)
        assert make_crb_scorer()(est, None, yt, crb=crb) == pytest.approx(2.0)
    with pytest.raises(MissingCRBError, match="no per-sample CRB"):
        make_crb_scorer(request_crb=False)(est, None, yt)
    with pytest.raises(ValueError, match="metric"):
        make_crb_scorer("r2")


def test_bad_inputs():
    y = np.ones((3, 2))
    with pytest.raises(ValueError, match="crb must have the shape"):
        crb_normalized_mse(y, y, crb=np.ones((3, 1)))
    with pytest.raises(ValueError, match="strictly positive"):
        crb_normalized_mse(y, y, crb=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="y_pred"):
        crb_normalized_mse(y, np.ones((2, 2)), crb=y)
    with pytest.raises(ValueError, match="non-finite"):
        crb_normalized_mse(y, np.full((3, 2), np.nan), crb=y)
    with pytest.raises(ValueError, match="multioutput"):
        crb_normalized_mse(y, y, crb=y, multioutput="mean")
    with pytest.raises(ValueError, match="2 noise draws"):
        bias_variance_report(y, np.ones((3, 1, 2)), crb=y)


def test_stratified_report_recovers_bias_std_and_counts():
    rng = np.random.default_rng(3)
    n_theta, n_draws = 40, 3000
    theta = rng.uniform(1, 2, (n_theta, 2))
    snr = np.repeat([30.0, 100.0], n_theta // 2)
    # CRB ~ 1/SNR^2; half of the thetas at each SNR get a 10x larger CRB
    crb = np.outer(1e2 / snr**2, [1.0, 4.0]) * np.where(np.arange(n_theta) % 2 == 0, 1.0, 10.0)[:, None]
    b_rel, s_rel = np.array([0.3, -0.5]), np.array([0.8, 1.2])  # bias and std in units of sqrt(CRB)
    yp = theta[:, None] + np.sqrt(crb)[:, None] * (b_rel + s_rel * rng.standard_normal((n_theta, n_draws, 2)))
    pvar = np.array([0.5, 2.0])
    rep = bias_variance_report(theta, yp, crb=crb, names=("a", "b"), prior_variance=pvar, snr=snr)
    informative = crb < 0.1 * pvar  # computed independently of the report
    np.testing.assert_array_equal(rep.informative, informative)
    seen = set()
    for r in rep.strata:
        j = ("a", "b").index(r["parameter"])
        m = np.ones(n_theta, bool) if r["snr"] == "all" else snr == float(r["snr"])
        if r["identifiability"] != "all":
            m &= informative[:, j] if r["identifiability"] == "informative" else ~informative[:, j]
        assert r["n_theta"] == m.sum() and r["n_samples"] == m.sum() * n_draws
        seen.add((r["parameter"], r["snr"], r["identifiability"]))
        if r["n_theta"] == 0:
            assert r["normalized_mse"] is None and r["median_std_over_sqrt_crb"] is None
            continue
        assert r["median_bias_over_sqrt_crb"] == pytest.approx(b_rel[j], abs=0.06)
        assert r["median_abs_bias_over_sqrt_crb"] == pytest.approx(abs(b_rel[j]), abs=0.06)
        assert r["median_std_over_sqrt_crb"] == pytest.approx(s_rel[j], rel=0.04)
        assert r["normalized_mse"] == pytest.approx(b_rel[j] ** 2 + s_rel[j] ** 2, rel=0.06)
    assert len(seen) == 2 * 3 * 3  # parameters x SNR (all, 30, 100) x identifiability (all, two strata)
    assert "informative" in rep.to_markdown() and "| a | 30 |" in rep.to_markdown()
    np.testing.assert_allclose(rep.summary["median_bias_over_sqrt_crb"], b_rel, atol=0.06)


def test_report_snr_bins_and_group_checks():
    rng = np.random.default_rng(4)
    theta = np.repeat(rng.uniform(1, 2, (6, 1)), 50, 0)
    groups = np.repeat(np.arange(6), 50)
    snr_row = np.repeat([20.0, 40.0, 60.0, 80.0, 150.0, 400.0], 50)
    yp = theta + 0.1 * rng.standard_normal(theta.shape)
    crb = np.full(theta.shape, 0.01)
    rep = bias_variance_report(theta, yp, crb=crb, groups=groups, snr=snr_row, snr_bins=[10, 50, 200])
    counts = {r["snr"]: r["n_theta"] for r in rep.strata}
    assert counts == {"all": 6, "[10, 50)": 2, "[50, 200]": 3}  # SNR 400 lies outside every bin
    np.testing.assert_array_equal(rep.snr, [20, 40, 60, 80, 150, 400])
    bad = snr_row.copy()
    bad[1] = 25.0
    with pytest.raises(ValueError, match="constant within each group"):
        bias_variance_report(theta, yp, crb=crb, groups=groups, snr=bad)
    with pytest.raises(ValueError, match="snr_bins"):
        bias_variance_report(theta, yp, crb=crb, groups=groups, snr=snr_row, snr_bins=[50, 10])
    with pytest.raises(ValueError, match="prior_variance"):
        bias_variance_report(theta, yp, crb=crb, groups=groups, prior_variance=[0.0])


def test_constant_predictor_closed_form():
    rng = np.random.default_rng(5)
    n = 100_000
    theta = np.column_stack([rng.uniform(0, 1, n), rng.normal(5, 2, n)])
    var = np.array([1 / 12, 4.0])
    crb = np.column_stack([np.full(n, 1e-3), np.where(np.arange(n) % 2 == 0, 0.1, 100.0)])
    rep = constant_predictor_report(theta, [0.5, 5.0], crb=crb, names=("u", "g"), prior_variance=var)
    # nMSE = var/CRB in expectation; std 0; bias = (mean - theta)/sqrt(CRB)
    np.testing.assert_allclose(rep.summary["mean_normalized_mse"][0], var[0] / 1e-3, rtol=0.02)
    assert np.all(rep.variance == 0) and np.all(rep.summary["median_std_over_sqrt_crb"] == 0)
    np.testing.assert_allclose(rep.bias_over_sqrt_crb, ([0.5, 5.0] - theta) / np.sqrt(crb))
    strata = {(r["parameter"], r["identifiability"]): r for r in rep.strata}
    assert strata[("g", "informative")]["n_theta"] == n // 2  # CRB 0.1 < 0.1 * 4
    assert strata[("g", "informative")]["normalized_mse"] == pytest.approx(4.0 / 0.1, rel=0.03)
    assert strata[("g", "prior-dominated")]["normalized_mse"] == pytest.approx(4.0 / 100.0, rel=0.03)
    assert strata[("u", "prior-dominated")]["n_theta"] == 0
    with pytest.raises(ValueError, match="constant"):
        constant_predictor_report(theta, [0.5], crb=crb)


def test_prior_moments_uniform_marginal():
    from sklearn_crb.physics.priors import ParameterPrior

    mean, var = prior_moments(ParameterPrior.brain(tied_R1=True), ["m0s", "R1f"], n_samples=200_000)
    # m0s ~ U[0, 0.35] independent of the R2f > R1f rejection
    assert mean[0] == pytest.approx(0.175, rel=0.01)
    assert var[0] == pytest.approx(0.35**2 / 12, rel=0.02)
    assert var[1] > 0
    with pytest.raises(ValueError, match="unknown"):
        prior_moments(ParameterPrior.brain(), ["T1"])


def test_a_search_without_crb_stops_instead_of_scoring_nan():
    """GridSearchCV(scoring=make_crb_scorer()).fit(X, y, crb=crb) without routing: the fit gets the CRB, the
    scorer does not. With sklearn's default error_score=nan an ordinary scorer error became a NaN per candidate
    and the search picked one arbitrarily; the scorer's error stops it instead."""
    from conftest import small_crb_net, toy_problem
    from sklearn.model_selection import GridSearchCV, cross_validate

    X, y, crb = toy_problem(120)
    search = GridSearchCV(small_crb_net(max_epochs=1), {"lr": [1e-2, 1e-3]}, cv=2, scoring=make_crb_scorer())
    with pytest.raises(MissingCRBError, match="pack_targets"):
        search.fit(X, y, crb=crb)
    with pytest.raises(MissingCRBError, match="no per-sample CRB"):
        cross_validate(small_crb_net(max_epochs=1), X, y, cv=2, scoring=make_crb_scorer(), params={"crb": crb})
