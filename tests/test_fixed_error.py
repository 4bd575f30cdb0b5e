"""Errors of measured (fixed) maps propagated into the estimates and their standard errors
(``estimators/fixed_sensitivity.py``, ``fit_maps(fixed_se=)``)."""

import warnings

import numpy as np
import pytest

from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.fixed_sensitivity import fixed_variance, model_sensitivity
from sklearn_crb.estimators.net.measured import measured_nuisance
from sklearn_crb.estimators.nlls import NLLSFitter, NLLSFitWarning
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.maps import fit_maps
from sklearn_crb.physics.parameters import INDEX, PARAMETERS
from sklearn_crb.physics.signal import jacobian, simulate
from sklearn_crb.simulator import MTFingerprintSimulator

EST = ("m0s", "R1f", "R2f")


def _tissues(n):
    rng = np.random.default_rng(0)
    th = np.tile([0.15, 0.6, 15.0, 30.0, 0.6, 12e-6, 50.0, 0.9], (n, 1))
    th[:, 0] = rng.uniform(0.08, 0.2, n)
    th[:, 6] = rng.uniform(-150, 150, n)
    th[:, 7] = rng.uniform(0.8, 1.1, n)
    th[:, INDEX["R1s"]] = th[:, INDEX["R1f"]]
    return th


def _nlls(seq, th, **kw):
    kw = {**dict(se_tol=0.0, xtol=1e-13, gtol=1e-15, ftol=1e-16, max_iter=300), **kw}
    return NLLSFitter(seq, estimate=EST, tied_R1=True, start=dict(zip(PARAMETERS, th[0])), **kw).fit()


def test_nlls_sensitivity_matches_refits(short_sequence):
    """On noiseless data the implicit-function derivative is exact: it matches central differences of
    refits with the fixed B1 moved up and down."""
    th = _tissues(4)
    y = 0.8 * simulate(short_sequence, th)
    nl = _nlls(short_sequence, th)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        d0 = nl.predict_details(y, fixed={"B1": th[:, 7]})
        h = 1e-4
        up = nl.predict_details(y, fixed={"B1": th[:, 7] + h})
        dn = nl.predict_details(y, fixed={"B1": th[:, 7] - h})
    ok = d0.converged & up.converged & dn.converged
    assert ok.sum() >= 3
    fd = (up.prediction - dn.prediction) / (2 * h)
    assert d0.fixed_names == ("B1",)
    S = d0.fixed_sensitivity[:, :, 0]
    np.testing.assert_allclose(S[ok], fd[ok], rtol=3e-2, atol=1e-3 * np.abs(fd).max())
    assert np.median(np.abs(S[ok] - fd[ok]) / np.abs(fd[ok])) < 2e-3
    assert np.all(np.abs(S[ok, 0]) > 0.05)  # m0s does depend on B1: the check can fail
    # the function on its own (full signal, no basis) agrees with what predict_details returned
    s, J = jacobian(short_sequence, d0.theta)
    S2 = model_sensitivity(s, J, estimate=EST, nuisance=("Rex", "T2s", "omega0"), fixed_names=("B1",), tied_R1=True)
    np.testing.assert_allclose(S2[ok, :, 0], S[ok], rtol=1e-8)


def test_fixed_variance_sums_independent_errors():
    S = np.array([[[1.0, 2.0], [0.0, -3.0]]])
    np.testing.assert_allclose(fixed_variance(S, np.array([[0.1, 0.2]])), [[0.01 + 0.16, 0.36]])


def test_fit_maps_adds_the_map_error_monte_carlo(v32_sequence):
    """With fixed_se the standard-error maps match the spread of NLLS estimates over draws of the noise *and*
    of the B1 map's error (median ratio within 0.8-1.3); the noise-only maps understate it."""
    n, sd_b1, sigma = 6, 0.03, 0.002
    th = _tissues(n)
    U = MTFingerprintSimulator(v32_sequence, n_components=13, n_basis_samples=300, random_state=0).fit().basis_
    clean = 0.8 * simulate(v32_sequence, th) @ U.conj()
    nl = _nlls(v32_sequence, th, se_tol=1e-3, basis=U)
    rng = np.random.default_rng(5)
    known = {"T2s": 12e-6, "omega0": th[:, INDEX["omega0"], None]}  # Rex stays a free nuisance
    est, se_maps = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        for k in range(40):
            y = clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
            b1 = th[:, 7] + sd_b1 * rng.standard_normal(n)
            m = fit_maps(nl, y[:, None, :], np.ones((n, 1), bool), sequence=v32_sequence, sigma=sigma,
                         fixed={"B1": b1[:, None], **known}, fixed_se={"B1": sd_b1})
            est.append([m.arrays[p][:, 0] for p in EST])
            if k == 0:
                se_maps = np.array([m.arrays[p + "_se"][:, 0] for p in EST])
                plain = fit_maps(nl, y[:, None, :], np.ones((n, 1), bool), sequence=v32_sequence, sigma=sigma,
                                 fixed={"B1": b1[:, None], **known})
                se_plain = np.array([plain.arrays[p + "_se"][:, 0] for p in EST])
    spread = np.std(np.array(est), axis=0)  # (3, n)
    assert np.median(se_maps[0] / se_plain[0]) > 1.5  # the B1-map error matters for m0s here
    assert np.median(spread[0] / se_plain[0]) > 1.5  # and the noise-only maps understate the spread
    ratio = spread / se_maps
    assert 0.8 < np.median(ratio) < 1.3, ratio  # 40 draws: ~11 % error of each std
    assert np.all((ratio > 0.5) & (ratio < 3.5)), ratio


@pytest.fixture(scope="module")
def b1_net(short_sequence):
    sim = MTFingerprintSimulator(short_sequence, n_components=6, estimate=EST, random_state=0, n_basis_samples=200,
                                 nuisance=measured_nuisance(EST, ("B1",))).fit()
    net = CRBNetRegressor(simulator=sim, measured=("B1",), max_epochs=3, random_state=0, module__hidden=(32, 32),
                          device="cpu").fit_simulated(600)
    return sim, net


def test_network_sensitivity_is_its_own_derivative(b1_net):
    """A network's sensitivity to its measured input is the finite difference of its predictions;
    with se="crb" it is the least-squares one."""
    sim, net = b1_net
    X, _, _, det = sim.make_dataset(20, random_state=3, return_details=True)
    b1 = det["theta"][:, INDEX["B1"]]
    d = net.predict_details(X, fixed={"B1": b1})
    S = d.fixed_sensitivity[:, :, 0]
    h = 1e-2
    fd = (net.predict_details(X, fixed={"B1": b1 + h}, compute_crb=False).theta
          - net.predict_details(X, fixed={"B1": b1 - h}, compute_crb=False).theta) / (2 * h)
    fd = fd[:, [INDEX[p] for p in EST]]
    ok = d.converged
    assert ok.sum() >= 15 and np.abs(fd[ok]).max() > 0
    scale = np.abs(fd[ok]).max(axis=0)  # per output
    np.testing.assert_allclose(S[ok] / scale, fd[ok] / scale, rtol=0.05, atol=0.02)
    # a fixed value that the network does not read leaves its estimates alone
    d2 = net.predict_details(X, fixed={"B1": b1, "omega0": 10.0})
    assert np.all(d2.fixed_sensitivity[ok, :, 1] == 0)
    crb = net.predict_details(X, fixed={"B1": b1}, se="crb")
    s, J = jacobian(sim.sequence_, crb.theta)
    ref = model_sensitivity(s, J, estimate=EST, nuisance=("Rex", "R1s", "T2s", "omega0"), fixed_names=("B1",),
                            basis=sim.basis_)
    np.testing.assert_allclose(crb.fixed_sensitivity[ok], ref[ok], rtol=1e-6)


def test_fixed_se_is_validated(short_sequence, b1_net):
    sim, net = b1_net
    X = sim.make_dataset(4, random_state=1)[0]
    c = (X[:, :6] + 1j * X[:, 6:])[:, None, :]
    mask = np.ones((4, 1), bool)
    kw = dict(fixed={"B1": 0.9})
    with pytest.raises(ValueError, match="fixed_se.*not fixed"):
        fit_maps(net, c, mask, fixed_se={"omega0": 1.0}, **kw)
    with pytest.raises(ValueError, match=r"fixed_se\['B1'\] must be >= 0"):
        fit_maps(net, c, mask, fixed_se={"B1": -0.1}, **kw)
    with pytest.raises(ValueError, match=r"fixed_se\['B1'\] has non-finite"):
        fit_maps(net, c, mask, fixed_se={"B1": np.nan}, **kw)
    with pytest.raises(ValueError, match=r"fixed_se\['B1'\] must be a scalar or a map of shape"):
        fit_maps(net, c, mask, fixed_se={"B1": np.ones(3)}, **kw)
    with pytest.raises(TypeError, match="fixed_se must be a dict"):
        fit_maps(net, c, mask, fixed_se=0.1, **kw)
    with pytest.raises(ValueError, match="compute_se=True"):
        fit_maps(net, c, mask, fixed_se={"B1": 0.1}, compute_se=False, **kw)
    # a map error wider than the parameter's physical range is no first-order error (issue 29)
    with pytest.raises(ValueError, match=r"fixed_se\['B1'\] = 1e\+300 .*exceeds the width of B1's physical range"):
        fit_maps(net, c, mask, fixed_se={"B1": 1e300}, **kw)


def _dictionary_image(seq, n=8):
    """A dictionary matcher, a column image of ``n`` noisy voxels and their true B1."""
    sim = MTFingerprintSimulator(seq, n_components=8, n_basis_samples=200, random_state=0).fit()
    dm = DictionaryMatcher(seq, basis=sim.basis_, estimate=EST, n_atoms=400, random_state=0).fit()
    th = _tissues(n)
    th[:, INDEX["R1s"]] = 3.0
    rng = np.random.default_rng(3)
    c = 0.8 * simulate(seq, th) @ sim.basis_.conj()
    c = c + 2e-3 * (rng.standard_normal(c.shape) + 1j * rng.standard_normal(c.shape))
    return sim, dm, c[:, None, :], th[:, INDEX["B1"], None]


def test_dictionary_reports_the_least_squares_sensitivity(short_sequence):
    """DictionaryMatcher.predict_details(fixed=) reports fixed_sensitivity like NLLS: the implicit-function
    derivative of the least-squares fit at the matched theta."""
    sim, dm, c, b1 = _dictionary_image(short_sequence)
    X = np.hstack([c[:, 0].real, c[:, 0].imag])
    d = dm.predict_details(X, fixed={"B1": b1[:, 0]})
    assert d.fixed_names == ("B1",) and d.fixed_sensitivity.shape == (8, 3, 1)
    s, J = jacobian(short_sequence, d.theta)
    ref = model_sensitivity(s, J, estimate=EST, nuisance=("Rex", "R1s", "T2s", "omega0"), fixed_names=("B1",),
                            basis=sim.basis_)
    np.testing.assert_allclose(d.fixed_sensitivity, ref, rtol=1e-8)
    assert dm.predict_details(X).fixed_sensitivity is None  # nothing fixed: no sensitivity


def test_map_errors_add_in_quadrature(short_sequence):
    """se_total^2 = se^2 + (d m0s / d B1 * sigma_B1)^2 voxel by voxel, on m0s, which depends on B1 strongly;
    sigma_B1 is chosen so that both terms are of one size, where a linear sum se + |S| sigma_B1 is off by ~40 %."""
    sim, dm, c, b1 = _dictionary_image(short_sequence)
    mask, sigma = np.ones(b1.shape, bool), 2e-3
    plain = fit_maps(dm, c, mask, sigma=sigma, fixed={"B1": b1})
    S = dm.predict_details(np.hstack([c[:, 0].real, c[:, 0].imag]), fixed={"B1": b1[:, 0]}).fixed_sensitivity
    S = S[:, 0, 0]  # d m0s / d B1
    se0 = plain.arrays["m0s_se"][:, 0]
    ok = np.isfinite(se0) & np.isfinite(S) & (np.abs(S) > 0)
    assert ok.sum() >= 6
    sd = float(np.median(se0[ok] / np.abs(S[ok])))
    both = fit_maps(dm, c, mask, sigma=sigma, fixed={"B1": b1}, fixed_se={"B1": sd})
    se1 = both.arrays["m0s_se"][:, 0]
    term = np.abs(S) * sd
    assert 0.5 < np.median(term[ok] / se0[ok]) < 2  # the map error's term is about as large as the noise's
    np.testing.assert_allclose(se1[ok], np.sqrt(se0[ok] ** 2 + term[ok] ** 2), rtol=1e-8)


def test_time_targets_get_the_reparametrised_sensitivity(short_sequence):
    """With T1f/T2f targets, se="crb" gives dT/db = -T^2 dR/db; without fixed values there is no sensitivity."""
    est_t = ("m0s", "T1f", "T2f")
    sim = MTFingerprintSimulator(short_sequence, n_components=6, estimate=est_t, random_state=0,
                                 n_basis_samples=200).fit()
    net = CRBNetRegressor(simulator=sim, max_epochs=2, random_state=0, module__hidden=(16,),
                          device="cpu").fit_simulated(300)
    X = sim.make_dataset(8, random_state=2)[0]
    d = net.predict_details(X, fixed={"B1": 0.9}, se="crb")
    ok = d.converged
    assert ok.sum() >= 6
    s, J = jacobian(sim.sequence_, d.theta[ok])
    ref = model_sensitivity(s, J, estimate=EST, nuisance=("Rex", "R1s", "T2s", "omega0"), fixed_names=("B1",),
                            basis=sim.basis_)[:, :, 0]
    R = d.theta[ok][:, [INDEX["R1f"], INDEX["R2f"]]]
    got = d.fixed_sensitivity[ok, :, 0]
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=1e-6)
    np.testing.assert_allclose(got[:, 1:], -ref[:, 1:] / R**2, rtol=1e-6)
    assert net.predict_details(X, se="crb").fixed_sensitivity is None
