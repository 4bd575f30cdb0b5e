"""DictionaryMatcher: exact matches, M0 invariance, flags, validation."""

import numpy as np
import pytest
from conftest import NLLS_THETA

from sklearn_crb import ParameterPrior
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.physics.signal import simulate


@pytest.fixture(scope="module")
def matcher(short_sequence):
    theta = ParameterPrior.parenchyma().sample(300, random_state=0)
    return DictionaryMatcher(short_sequence, estimate=("m0s", "R1f", "R2f", "omega0"), theta=theta).fit()


def test_atom_recovered_exactly_with_complex_M0(matcher, short_sequence):
    idx = [3, 100, 257]
    M0 = np.array([0.5, 2.0 * np.exp(1.0j), 0.1j])
    s = M0[:, None] * simulate(short_sequence, matcher.theta_[idx])
    d = matcher.predict_details(s)
    np.testing.assert_array_equal(d.index, idx)
    np.testing.assert_allclose(d.theta, matcher.theta_[idx])
    np.testing.assert_allclose(d.M0, M0, rtol=1e-10)
    np.testing.assert_allclose(d.correlation, 1.0, rtol=1e-12)
    np.testing.assert_allclose(matcher.predict(s), matcher.theta_[idx][:, [0, 1, 2, 6]])


def test_best_atoms_sorted(matcher, short_sequence):
    s = simulate(short_sequence, matcher.theta_[[5]])
    d = matcher.predict_details(s, n_best=4)
    assert d.theta_best.shape == (1, 4, 8)
    np.testing.assert_allclose(d.theta_best[0, 0], matcher.theta_[5])
    C = np.abs(matcher.atoms_ @ (s[0].conj())) / np.linalg.norm(s[0])
    top = np.sort(C)[::-1][:4]
    got = [C[np.flatnonzero((matcher.theta_ == t).all(1))[0]] for t in d.theta_best[0]]
    np.testing.assert_allclose(got, top)


def test_compressed_matches_full(short_sequence):
    from sklearn_crb.simulator import MTFingerprintSimulator

    basis = MTFingerprintSimulator(short_sequence, n_components=10, n_basis_samples=200, random_state=0).fit().basis_
    theta = ParameterPrior.parenchyma().sample(200, random_state=1)
    dm = DictionaryMatcher(short_sequence, basis=basis, theta=theta).fit()
    s = 0.7 * simulate(short_sequence, np.vstack([theta[[10]], NLLS_THETA[None]]))
    c = s @ basis.conj()
    a = dm.predict_details(s)
    b = dm.predict_details(np.hstack([c.real, c.imag]))
    np.testing.assert_array_equal(a.index, b.index)
    assert a.index[0] == 10
    assert dm.n_features_in_ == 20


def test_bad_rows_flagged(matcher, short_sequence):
    s = simulate(short_sequence, matcher.theta_[:3])
    s[1] = np.nan
    s[2] = 0
    with pytest.warns(UserWarning, match="2 of 3"):
        d = matcher.predict_details(s)
    assert d.failed.tolist() == [False, True, True]
    assert np.isnan(d.prediction[1:]).all() and np.isfinite(d.prediction[0]).all()


def test_fixed_and_tied(short_sequence):
    dm = DictionaryMatcher(short_sequence, tied_R1=True, fixed={"B1": 0.9}, n_atoms=50, random_state=0).fit()
    assert np.all(dm.theta_[:, 7] == 0.9)
    np.testing.assert_array_equal(dm.theta_[:, 4], dm.theta_[:, 1])


def test_validation(short_sequence):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        DictionaryMatcher(short_sequence).predict(np.zeros((1, 240)))
    with pytest.raises(ValueError, match="n_atoms"):
        DictionaryMatcher(short_sequence, n_atoms=0).fit()
    with pytest.raises(ValueError, match="fixed"):
        DictionaryMatcher(short_sequence, fixed={"bogus": 1}).fit()
    with pytest.raises(TypeError, match="sequence"):
        DictionaryMatcher("v32").fit()
    dm = DictionaryMatcher(short_sequence, n_atoms=20, random_state=0).fit()
    with pytest.raises(ValueError, match="features"):
        dm.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="n_best"):
        dm.predict_details(np.ones((1, 240)), n_best=0)
