"""MTFingerprintSimulator: basis, features, datasets with per-sample CRBs."""

import numpy as np
import pytest
from conftest import TUTORIAL_THETA
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from sklearn_crb import MTFingerprintSimulator, physics
from sklearn_crb.crb import crb_from_jacobian


@pytest.fixture(scope="module")
def sim(short_sequence):
    return MTFingerprintSimulator(short_sequence, n_components=10, n_basis_samples=200, prior="parenchyma",
                                  random_state=0).fit()


def test_basis_is_orthonormal_svd(sim, short_sequence):
    U = sim.basis_
    assert U.shape == (120, 10)
    np.testing.assert_allclose(U.conj().T @ U, np.eye(10), atol=1e-12)
    # fitted on given theta: explained energy is that of the projection
    th = sim.sample_parameters(150, random_state=5)
    s = physics.simulate(short_sequence, th)
    own = MTFingerprintSimulator(short_sequence, n_components=10).fit(th)
    kept = np.linalg.norm(s @ own.basis_.conj()) ** 2 / np.linalg.norm(s) ** 2
    assert own.explained_energy_ == pytest.approx(kept, rel=1e-10)
    # Eckart-Young: no rank-10 basis keeps more; a random one keeps far less
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 10)) + 1j * rng.standard_normal((120, 10)))
    assert np.linalg.norm(s @ Q.conj()) ** 2 / np.linalg.norm(s) ** 2 < 0.5 * kept
    # the prior-fitted basis generalises to new prior draws almost as well
    held = np.linalg.norm(s @ U.conj()) ** 2 / np.linalg.norm(s) ** 2
    assert held > 0.8 * kept


def test_transform_and_feature_names(sim, short_sequence):
    X = sim.transform(TUTORIAL_THETA[None])
    assert X.shape == (1, 20)
    s = physics.simulate(short_sequence, TUTORIAL_THETA[None])
    c = s @ sim.basis_.conj()
    np.testing.assert_allclose(X, np.hstack([c.real, c.imag]), atol=1e-14)
    names = sim.get_feature_names_out()
    assert names[0] == "re_c0" and names[10] == "im_c0" and len(names) == 20


def test_make_dataset_statistics(sim):
    X, y, crb, d = sim.make_dataset(400, random_state=1, return_details=True)
    assert X.shape == (400, 20) and y.shape == (400, 3) and crb.shape == (400, 3)
    np.testing.assert_array_equal(y, d["theta"][:, :3])
    snr = np.abs(d["M0"]) / d["sigma"]
    assert sim.snr == (10.0, 300.0)  # the default: in-vivo values inside the range
    assert snr.min() >= 10 and snr.max() <= 300 and snr.max() > 250 and snr.min() < 20
    # noise: X - M0 * X_clean is white with variance sigma^2 per component
    r = sim.n_components_
    c_clean = d["X_clean"][:, :r] + 1j * d["X_clean"][:, r:]
    noise = (X[:, :r] + 1j * X[:, r:]) - d["M0"][:, None] * c_clean
    assert np.std(noise.real) == pytest.approx(0.01, rel=0.05)
    assert np.std(noise.imag) == pytest.approx(0.01, rel=0.05)
    # CRB at each sample's own |M0| and sigma
    np.testing.assert_allclose(crb, d["crb_unit"] * (0.01**2 / np.abs(d["M0"]) ** 2)[:, None], rtol=1e-12)
    # reproducible
    X2, y2, crb2 = sim.make_dataset(400, random_state=1)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(crb, crb2)


def test_crb_is_of_compressed_coefficients(sim, short_sequence):
    th = sim.sample_parameters(3, random_state=2)
    s, J = physics.jacobian(short_sequence, th)
    full = crb_from_jacobian(s, J, estimate=("m0s", "R1f", "R2f"))
    comp = sim.crb(th, sigma=1.0)
    assert np.all(comp >= full * (1 - 1e-10))
    np.testing.assert_allclose(sim.crb(th, sigma=1.0, compressed=False), full, rtol=1e-12)


def test_user_basis_and_tied(short_sequence):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((120, 12)) + 1j * rng.standard_normal((120, 12)))
    sim = MTFingerprintSimulator(short_sequence, basis=Q, tied_R1=True, random_state=0).fit()
    assert sim.n_components_ == 12 and sim.prior_.tied_R1
    X, y, crb = sim.make_dataset(20)
    assert X.shape == (20, 24)
    with pytest.raises(ValueError, match="orthonormal"):
        MTFingerprintSimulator(short_sequence, basis=2 * Q).fit()
    # a wider basis with a rank: its first r columns
    wide = MTFingerprintSimulator(short_sequence, basis=Q, n_components=5).fit()
    np.testing.assert_array_equal(wide.basis_, Q[:, :5])
    assert wide.n_components_ == 5 and wide.make_dataset(4, random_state=0)[0].shape == (4, 10)
    c = physics.simulate(short_sequence, TUTORIAL_THETA[None]) @ Q[:, :5].conj()
    np.testing.assert_allclose(wide.transform(TUTORIAL_THETA[None]), np.hstack([c.real, c.imag]), atol=1e-14)
    with pytest.raises(ValueError, match=r"n_components must be in \[1, 12\]"):
        MTFingerprintSimulator(short_sequence, basis=Q, n_components=13).fit()
    with pytest.raises(ValueError, match=r"basis must have shape \(120, rank\)"):
        MTFingerprintSimulator(short_sequence, basis=Q[:100]).fit()


def test_errors_and_clone(short_sequence):
    sim = MTFingerprintSimulator(short_sequence, n_components=5)
    with pytest.raises(NotFittedError):
        sim.transform(TUTORIAL_THETA[None])
    with pytest.raises(ValueError, match="snr"):
        MTFingerprintSimulator(short_sequence, snr=(50, 10)).fit()
    with pytest.raises(ValueError, match="estimate"):
        MTFingerprintSimulator(short_sequence, estimate=("T1",)).fit()
    with pytest.raises(ValueError, match="n_components"):
        MTFingerprintSimulator(short_sequence, n_components=0).fit()
    c = clone(sim)
    assert c.get_params()["n_components"] == 5


def test_chunking_does_not_change_results(sim):
    small = MTFingerprintSimulator(**{**sim.get_params(), "chunk_size": 7}).fit()
    np.testing.assert_allclose(small.basis_, sim.basis_, atol=1e-12)
    a = sim.make_dataset(30, random_state=4)
    b = small.make_dataset(30, random_state=4)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-14)
    th = sim.sample_parameters(9, random_state=1)
    np.testing.assert_allclose(small.transform(th), sim.transform(th), atol=1e-14)
    np.testing.assert_allclose(small.crb(th, M0=0.5), sim.crb(th, M0=0.5), rtol=1e-10)
    with pytest.raises(ValueError, match="chunk_size"):
        MTFingerprintSimulator(**{**sim.get_params(), "chunk_size": 0}).fit().transform(th)


def test_time_targets_and_m0s_zero_crb(short_sequence):
    from sklearn_crb.physics.parameters import INDEX

    kw = dict(n_components=6, tied_R1=True, n_basis_samples=100, random_state=0)
    rates = MTFingerprintSimulator(short_sequence, estimate=("m0s", "R1f", "R2f"), **kw).fit()
    times = MTFingerprintSimulator(short_sequence, estimate=("m0s", "T1f", "T2f"), **kw).fit()
    th = rates.sample_parameters(20, random_state=1)
    th[0, INDEX["m0s"]] = 0.0  # singular exactly at m0s = 0: the CRB of the 0+ limit
    Xr, yr, cr = rates.make_dataset(20, 2, theta=th)
    Xt, yt, ct = times.make_dataset(20, 2, theta=th)
    np.testing.assert_allclose(Xr, Xt)
    np.testing.assert_allclose(yt[:, 1:], 1 / yr[:, 1:])
    np.testing.assert_allclose(ct[:, 1:], cr[:, 1:] / yr[:, 1:] ** 4, rtol=1e-8)  # delta method
    assert np.all(np.isfinite(cr)) and yr[0, 0] == 0.0
    # the signal keeps m0s = 0 (only the CRB uses the floor)
    d = rates.make_dataset(20, 2, theta=th, return_details=True)[3]
    np.testing.assert_allclose(d["X_clean"][0], rates.transform(th[:1])[0], rtol=1e-10, atol=1e-14)


def test_time_targets_from_prior_draws_tied():
    """Default sequence and prior, tied model, time targets: y from targets_from_theta, CRB by the delta method."""
    from sklearn_crb.physics.parameters import INDEX, targets_from_theta

    est = ("m0s", "T1f", "T2f")
    sim = MTFingerprintSimulator(estimate=est, tied_R1=True, random_state=0).fit()
    X, y, crb, d = sim.make_dataset(50, return_details=True)
    th = d["theta"]
    assert X.shape == (50, 2 * sim.n_components_) and y.shape == crb.shape == (50, 3)
    np.testing.assert_array_equal(y, targets_from_theta(th, est))
    np.testing.assert_allclose(y[:, 1], 1 / th[:, INDEX["R1f"]])
    np.testing.assert_allclose(y[:, 2], 1 / th[:, INDEX["R2f"]])
    assert np.all(np.isfinite(crb)) and np.all(crb > 0)
    # CRB(T) = CRB(R) / R^4 at each sample's own M0 (rows away from the m0s floor)
    ok = th[:, INDEX["m0s"]] >= 1e-3
    assert ok.sum() >= 25
    rate_crb = sim.crb(th[ok], M0=d["M0"][ok], estimate=("m0s", "R1f", "R2f"))
    R = th[ok][:, [INDEX["R1f"], INDEX["R2f"]]]
    np.testing.assert_allclose(crb[ok, 0], rate_crb[:, 0], rtol=1e-8)
    np.testing.assert_allclose(crb[ok, 1:], rate_crb[:, 1:] / R**4, rtol=1e-8)


def test_noise_model_is_reexported_by_the_simulator():
    import sklearn_crb.noise as noise
    import sklearn_crb.simulator as simulator

    for name in ("draw_m0_and_noise", "apply_m0_and_noise", "crb_gain", "pack_targets", "unpack_targets"):
        assert getattr(simulator, name) is getattr(noise, name), name
    y, c = np.arange(6.0).reshape(3, 2), np.full((3, 2), 0.5)
    yy, cc = simulator.unpack_targets(noise.pack_targets(y, c))
    np.testing.assert_array_equal(yy, y)
    np.testing.assert_array_equal(cc, c)


def test_torch_generator_draws_the_same_model(short_sequence):
    import torch

    from sklearn_crb.noise import apply_m0_and_noise, draw_m0_and_noise

    g = torch.Generator().manual_seed(0)
    M0, noise = draw_m0_and_noise(g, 20000, 3, (10, 100), 0.01)
    assert isinstance(M0, torch.Tensor) and noise.shape == (20000, 3)
    snr = (M0.abs() / 0.01).numpy()
    assert snr.min() >= 10 and snr.max() <= 100 and abs(snr.mean() - 55) < 1
    assert abs(float(noise.real.std()) - 0.01) < 2e-4
    x = torch.ones(20000, 6, dtype=torch.float64)
    out = apply_m0_and_noise(x, M0, noise)
    np.testing.assert_allclose(out[:, 0].numpy(), (M0.real - M0.imag + noise[:, 0].real).numpy())


def test_compression_inflation_svd_default_and_m0s_zero(sim, short_sequence):
    assert sim.basis_method_ == "svd" and sim.get_params()["basis_method"] == "svd" and sim.basis_history_ is None
    th = np.array([TUTORIAL_THETA, [0.0, 0.3, 5.0, 20.0, 3.0, 12e-6, 0.0, 0.9]])
    infl = sim.compression_inflation(th, ranks=[6, 10], estimate=("m0s", "R1f"))
    assert set(infl) == {6, 10}
    # independently: CRB in the first r SVD columns over the full-signal CRB; m0s = 0 at the 1e-4 floor
    tc = th.copy()
    tc[1, 0] = 1e-4
    s, J = physics.jacobian(short_sequence, tc)
    full = crb_from_jacobian(s, J, estimate=("m0s", "R1f"))
    for r in (6, 10):
        ref = crb_from_jacobian(s, J, estimate=("m0s", "R1f"), basis=sim.basis_[:, :r]) / full
        np.testing.assert_allclose(infl[r], ref, rtol=1e-10)
    assert np.all(infl[6] >= infl[10] * (1 - 1e-9)) and np.all(infl[10] >= 1 - 1e-9)  # nested SVD bases


def test_a_fitted_simulator_clones_with_its_basis_so_grid_search_works(short_sequence):
    """clone() of a fitted simulator keeps the fitted basis (it defines the features); GridSearchCV over a
    network built with simulator= then fits every candidate (it used to refuse the unfitted clone)."""
    from sklearn.model_selection import GridSearchCV

    from sklearn_crb.estimators.network import MLP
    from sklearn_crb.estimators.regressor import CRBNetRegressor
    from sklearn_crb.metrics import make_crb_scorer
    from sklearn_crb.simulator import pack_targets

    sim = MTFingerprintSimulator(short_sequence, n_components=6, n_basis_samples=150, random_state=0).fit()
    twin = clone(sim)
    assert twin is not sim and np.array_equal(twin.basis_, sim.basis_)
    assert not hasattr(clone(MTFingerprintSimulator(short_sequence)), "basis_")  # unfitted: a plain clone
    X, y, crb = sim.make_dataset(120, 1)
    net = CRBNetRegressor(MLP, module__hidden=(8,), simulator=sim, max_epochs=1, random_state=0, device="cpu")
    gs = GridSearchCV(net, {"batch_size": [16, 32]}, cv=2, scoring=make_crb_scorer(), error_score="raise")
    gs.fit(X, pack_targets(y, crb))
    assert np.all(np.isfinite(gs.cv_results_["mean_test_score"]))
    assert np.array_equal(gs.best_estimator_.simulator_.basis_, sim.basis_)
