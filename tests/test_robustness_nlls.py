"""Reliability of NLLSFitter and DictionaryMatcher on bad or extreme input (issue 10),
and the predict_details protocol they share with the network regressor."""

import warnings

import numpy as np
import pytest
from conftest import NLLS_THETA
from sklearn.utils.estimator_checks import check_param_validation

from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.estimators._base import robust_norm
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.nlls import STATUS, NLLSFitter, NLLSFitWarning
from sklearn_crb.physics.parameters import INDEX, PARAMETERS
from sklearn_crb.physics.priors import ParameterPrior
from sklearn_crb.physics.signal import simulate

FIXED = {"Rex": 30.0, "R1s": 3.0, "T2s": 12e-6, "omega0": 100.0, "B1": 0.9}
M0 = 0.85 * np.exp(0.3j)


@pytest.fixture(scope="module")
def nlls(short_sequence):
    return NLLSFitter(short_sequence, fixed={"omega0": 100.0, "B1": 0.9}).fit()


@pytest.fixture(scope="module")
def signal(short_sequence):
    return M0 * simulate(short_sequence, NLLS_THETA[None])


@pytest.fixture(scope="module")
def matcher(short_sequence):
    theta = ParameterPrior.parenchyma().sample(200, random_state=0)
    return DictionaryMatcher(short_sequence, theta=theta).fit()


def _status(d):
    return [STATUS[int(k)] for k in d.status]


# ------------------------------------------------------------------ absurd scales
def test_robust_norm_neither_overflows_nor_underflows():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 50)) + 1j * rng.standard_normal((3, 50))
    ref = np.linalg.norm(y, axis=1)
    for scale in (1e-300, 1e-160, 1.0, 1e160, 1e300):
        norm, unit = robust_norm(y * scale)
        np.testing.assert_allclose(norm / scale, ref, rtol=1e-14)
        np.testing.assert_allclose(unit, y / ref[:, None], rtol=1e-13)


@pytest.mark.parametrize("scale", [1e-160, 1e160])
def test_nlls_fits_absurd_scales_like_unit_scale(nlls, signal, scale):
    """1e160 used to 'converge' after 0 iterations with NaN M0 (the norm overflowed)."""
    ref = nlls.predict_details(signal)
    d = nlls.predict_details(signal * scale)
    assert d.converged.all() and d.n_iter[0] > 0, _status(d)
    np.testing.assert_allclose(d.theta, ref.theta, rtol=1e-10)
    np.testing.assert_allclose(d.M0 / scale, ref.M0, rtol=1e-10)
    np.testing.assert_allclose(d.theta[0], NLLS_THETA, rtol=1e-6)
    assert np.isfinite(d.crb).all() and np.isfinite(d.residual_norm).all()


def test_nlls_never_converged_without_finite_output(nlls, signal):
    """Near the top of the float64 range M0 or the residual norm overflows: flagged, never 'converged'."""
    big = signal / np.abs(signal).max()
    X = np.vstack([signal, big * 1e306, big * 1.5e308])  # the last row's norm exceeds float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        d = nlls.predict_details(X)
    conv = d.converged
    assert conv[0]
    assert np.all(np.isfinite(d.M0[conv]) & np.isfinite(d.residual_norm[conv]))
    assert conv[1] and np.isfinite(d.M0[1]), _status(d)
    assert not conv[2] and _status(d)[2] == "nonfinite_output", _status(d)
    np.testing.assert_allclose(d.theta[2], d.theta[0], rtol=1e-8)  # the fit itself is fine


def test_dictionary_absurd_scales(matcher, short_sequence):
    s = (0.5 - 0.2j) * simulate(short_sequence, matcher.theta_[[7]])
    ref = matcher.predict_details(s)
    for scale in (1e-160, 1e160):
        d = matcher.predict_details(s * scale)
        assert d.converged.all() and d.index[0] == ref.index[0] == 7
        np.testing.assert_allclose(d.M0 / scale, ref.M0, rtol=1e-12)


# -------------------------------------------------------------- non-finite rows
def _bad_rows(X):
    X = np.array(X, dtype=float)
    X[1, 3] = np.nan
    X[2, 0] = np.inf
    X[3, -1] = -np.inf
    return X


def test_nlls_nonfinite_rows_flagged_alike(nlls, signal):
    """A single inf row used to reject the whole batch while NaN rows were flagged."""
    X = _bad_rows(np.repeat(np.hstack([signal.real, signal.imag]), 5, axis=0))
    Xc = np.empty((5, 120), dtype=complex)
    Xc.real, Xc.imag = X[:, :120], X[:, 120:]
    for data in (X, Xc):
        with pytest.warns(NLLSFitWarning, match="3 of 5"):
            d = nlls.predict_details(data)
        assert _status(d) == ["converged"] + ["nonfinite_input"] * 3 + ["converged"]
        assert np.isnan(d.theta[1:4]).all() and np.isnan(d.M0[1:4]).all()
        np.testing.assert_allclose(d.prediction[[0, 4]], NLLS_THETA[None, :3].repeat(2, 0), rtol=1e-6)


def test_dictionary_nonfinite_rows_flagged_alike(matcher, short_sequence):
    s = simulate(short_sequence, matcher.theta_[:5])
    X = _bad_rows(np.hstack([s.real, s.imag]))
    with pytest.warns(UserWarning, match="3 of 5"):
        d = matcher.predict_details(X)
    assert d.converged.tolist() == [True, False, False, False, True]
    assert np.isnan(d.prediction[1:4]).all() and np.isnan(d.crb_unit[1:4]).all()
    np.testing.assert_array_equal(d.index[[0, 4]], [0, 4])


# ----------------------------------------------------------- predict_details protocol
def _check_protocol(det, n, estimate):
    assert det.theta.shape == (n, 8) and det.theta.dtype == np.float64
    assert det.M0.shape == (n,) and det.M0.dtype == np.complex128
    assert det.residual_norm.shape == (n,) and det.converged.dtype == bool
    assert det.crb_unit.shape == (n, len(estimate))
    assert isinstance(det.n_free, int) and det.estimate == tuple(estimate)


def test_nlls_protocol_crb_unit_is_the_crb_at_theta(nlls, signal, short_sequence):
    rng = np.random.default_rng(3)
    y = signal + 0.002 * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))
    d = nlls.predict_details(y)
    _check_protocol(d, 1, ("m0s", "R1f", "R2f"))
    assert d.n_free == 6 + 2  # m0s R1f R2f Rex R1s T2s, complex M0
    ref = cramer_rao_bound(short_sequence, d.theta, estimate=("m0s", "R1f", "R2f"),
                           nuisance=("Rex", "R1s", "T2s"))
    np.testing.assert_allclose(d.crb_unit, ref, rtol=1e-8)
    np.testing.assert_allclose(d.crb, ref * (d.sigma / np.abs(d.M0))[:, None] ** 2, rtol=1e-8)
    r = y - d.M0[:, None] * simulate(short_sequence, d.theta)
    np.testing.assert_allclose(d.residual_norm, np.linalg.norm(r, axis=1), rtol=1e-8)
    assert nlls.predict_details(y, compute_crb=False).crb_unit is None


def test_dictionary_protocol(matcher, short_sequence):
    s = (0.4 + 0.1j) * simulate(short_sequence, matcher.theta_[[3, 11]])
    d = matcher.predict_details(s)
    _check_protocol(d, 2, ("m0s", "R1f", "R2f"))
    assert d.n_free == 8 + 2
    np.testing.assert_allclose(d.M0, 0.4 + 0.1j, rtol=1e-10)
    assert np.all(d.residual_norm < 1e-10 * np.linalg.norm(s, axis=1))
    ref = cramer_rao_bound(short_sequence, matcher.theta_[[3, 11]], estimate=("m0s", "R1f", "R2f"))
    np.testing.assert_allclose(d.crb_unit, ref, rtol=1e-8)
    assert matcher.predict_details(s, compute_crb=False).crb_unit is None


# --------------------------------------------------------- per-voxel fixed values
def test_nlls_per_voxel_fixed_map_equals_scalar_fits(short_sequence):
    """A B1 map held fixed per voxel gives the same fits as one scalar-fixed fitter per voxel."""
    theta = np.repeat(NLLS_THETA[None], 3, axis=0)
    theta[:, INDEX["B1"]] = [0.8, 0.95, 1.1]
    s = M0 * simulate(short_sequence, theta)
    nl = NLLSFitter(short_sequence, fixed={"omega0": 100.0}).fit()  # B1 is a free nuisance here
    d = nl.predict_details(s, fixed={"B1": theta[:, INDEX["B1"]]})
    assert d.converged.all() and d.n_free == len(nl.free_parameters_) - 1 + 2
    assert "B1" not in d.free_parameters
    np.testing.assert_array_equal(d.theta[:, INDEX["B1"]], theta[:, INDEX["B1"]])
    np.testing.assert_allclose(d.theta, theta, rtol=1e-4)
    for i in range(3):
        one = NLLSFitter(short_sequence, fixed={"omega0": 100.0, "B1": theta[i, INDEX["B1"]]}).fit()
        di = one.predict_details(s[[i]])
        np.testing.assert_allclose(d.theta[i], di.theta[0], rtol=1e-9)
        np.testing.assert_allclose(d.crb_unit[i], di.crb_unit[0], rtol=1e-8)


def test_nlls_invalid_fixed_values_flag_voxels(nlls, signal):
    X = np.repeat(signal, 4, axis=0)
    with pytest.warns(NLLSFitWarning, match="3 of 4"):
        d = nlls.predict_details(X, fixed={"B1": [0.9, np.nan, 0.0, 9.0]})
    assert _status(d) == ["converged"] + ["invalid_fixed"] * 3
    with pytest.raises(ValueError, match="estimated"):
        nlls.predict_details(X, fixed={"m0s": 0.1})
    with pytest.raises(ValueError, match="shape"):
        nlls.predict_details(X, fixed={"B1": [0.9, 0.9]})
    with pytest.raises(ValueError, match="unknown"):
        nlls.predict_details(X, fixed={"b1": 0.9})


def test_dictionary_fixed_values_enter_theta_M0_and_crb(matcher, short_sequence):
    theta = matcher.theta_[[4, 9]].copy()
    theta[:, INDEX["B1"]] = [0.85, 1.05]
    s = 0.7 * simulate(short_sequence, theta)
    d = matcher.predict_details(s, fixed={"B1": theta[:, INDEX["B1"]]})
    np.testing.assert_array_equal(d.theta[:, INDEX["B1"]], theta[:, INDEX["B1"]])
    assert d.n_free == 7 + 2
    g = simulate(short_sequence, d.theta)
    M0 = np.einsum("ij,ij->i", g.conj(), s) / np.einsum("ij,ij->i", g.conj(), g)
    np.testing.assert_allclose(d.M0, M0, rtol=1e-10)
    np.testing.assert_allclose(d.residual_norm, np.linalg.norm(s - M0[:, None] * g, axis=1), rtol=1e-8,
                               atol=1e-12)
    nuis = tuple(p for p in PARAMETERS if p not in ("m0s", "R1f", "R2f", "B1"))
    ref = cramer_rao_bound(short_sequence, d.theta, estimate=("m0s", "R1f", "R2f"), nuisance=nuis)
    np.testing.assert_allclose(d.crb_unit, ref, rtol=1e-8)


# ----------------------------------------------------------------- declared validation
@pytest.mark.parametrize("make", [lambda s: NLLSFitter(s, max_iter=3),
                                  lambda s: DictionaryMatcher(s, n_atoms=20, random_state=0)])
def test_declared_parameter_validation(make, short_sequence):
    """Every constructor argument is declared in _parameter_constraints and checked by fit."""
    est = make(short_sequence)
    check_param_validation(type(est).__name__, est)


@pytest.mark.parametrize("kw, match", [({"sigma": float("nan")}, "sigma"), ({"gtol": float("inf")}, "gtol"),
                                       ({"se_tol": -1.0}, "se_tol"), ({"damping": "x"}, "damping"),
                                       ({"n_starts": True}, "n_starts"), ({"init": object()}, "init")])
def test_nlls_bad_parameters_raise_naming_them(short_sequence, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NLLSFitter(short_sequence, **kw).fit()
