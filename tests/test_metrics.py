"""Tests of the CRB metrics (sklearn_crb.metrics)."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin

from sklearn_crb.metrics import bias_variance_report, crb_efficiency_score, crb_normalized_mse, make_crb_scorer


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
    with pytest.raises(ValueError, match="crb"):
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
