"""Robustness of the network path: float32 range, degenerate training, scores, seeds, M0/noise model,
model selection and predict_details (issues 9 and 10)."""

import pickle
import threading

import numpy as np
import pytest
import sklearn
import torch
from conftest import small_crb_net, toy_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import kstest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_validate

from sklearn_crb.crb import crb_from_jacobian
from sklearn_crb.estimators.details import PredictionDetails
from sklearn_crb.estimators.net.augmentation import augment_batch
from sklearn_crb.estimators.net.details import network_details
from sklearn_crb.estimators.network import MLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.metrics import MissingCRBError, crb_efficiency_score, crb_normalized_mse, make_crb_scorer
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.signal import jacobian
from sklearn_crb.simulator import MTFingerprintSimulator, draw_m0_and_noise, pack_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy(n=240, seed=0):
    return toy_problem(n, seed)


def small_net(**kw):
    return small_crb_net(**{"module__hidden": (16, 16), "max_epochs": 3, **kw})


@pytest.fixture(scope="module")
def sim(short_sequence):
    return MTFingerprintSimulator(short_sequence, n_components=6, tied_R1=True, prior="paper2022",
                                  n_basis_samples=100, random_state=0).fit()


# ---------------------------------------------------------------- float32 range (issue 10a)
@pytest.mark.parametrize("factor", [1e21, 1e-25])
def test_inputs_beyond_float32_are_refused(factor):
    X, y, crb = toy()
    net = small_net(module__normalization="l2").fit(X, y, crb=crb)
    with pytest.raises(ValueError, match="float32.*rescale"):
        net.predict(X * factor)
    with pytest.raises(ValueError, match="float32"):
        small_net(module__normalization="l2").fit(X * factor, y, crb=crb)
    # a common factor inside the range gives the same estimates (the net is scale invariant)
    np.testing.assert_allclose(net.predict(X * 1e6), net.predict(X), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- degenerate training (issue 10b)
def test_degenerate_crb_is_refused():
    X, y, crb = toy()
    crb[5] = 1e-300
    with pytest.raises(ValueError, match="degenerate"):
        small_net().fit(X, y, crb=crb)


def test_diverging_training_stops_with_an_error():
    X, y, crb = toy()
    with pytest.raises(FloatingPointError, match="diverged"):
        small_net(lr=1e3, max_epochs=30, module__batch_norm=False, optimizer=torch.optim.SGD).fit(X, y, crb=crb)


# ---------------------------------------------------------------- metrics (issue 10c)
def test_scores_are_finite_at_the_edges():
    yt = np.array([[1.0, 2.0], [2.0, 3.0]])
    yp = yt.copy()
    yp[:, 1] += 0.1
    crb = np.full_like(yt, 0.01)
    eff = crb_efficiency_score(yt, yp, crb=crb)  # the first parameter is perfect
    assert np.isfinite(eff) and eff == pytest.approx(1 / np.mean([0.0, 1.0]))
    assert np.isfinite(crb_efficiency_score(yt, yt, crb=crb))
    with pytest.raises(ValueError, match="subnormal"):
        crb_normalized_mse(yt, yp, crb=np.full_like(yt, 5e-324))
    with pytest.raises(TypeError, match="real"):
        crb_normalized_mse(yt, yp + 1j, crb=crb)
    with pytest.raises(TypeError, match="real"):
        crb_efficiency_score(yt + 0j, yp, crb=crb)
    with pytest.raises(ValueError, match="overflow"):
        crb_normalized_mse(yt, yp * 1e160, crb=crb)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (7, 2), elements=finite), arrays(np.float64, (7, 2), elements=finite),
       arrays(np.float64, (7, 2), elements=st.floats(1e-8, 1e4)), st.floats(1e-3, 1e3))
def test_metric_properties(yt, yp, crb, k):
    nm = crb_normalized_mse(yt, yp, crb=crb, multioutput="raw_values")
    assert np.all(nm >= 0) and np.all(np.isfinite(nm))
    # units: scaling the parameters by k and the CRB by k^2 changes nothing
    np.testing.assert_allclose(crb_normalized_mse(k * yt, k * yp, crb=k**2 * crb, multioutput="raw_values"), nm,
                               rtol=1e-9, atol=1e-300)
    eff = crb_efficiency_score(yt, yp, crb=crb)
    assert np.isfinite(eff) and eff > 0
    if nm.mean() > 0:
        assert eff == pytest.approx(1 / nm.mean(), rel=1e-12)
    # symmetric in prediction and truth
    assert crb_normalized_mse(yp, yt, crb=crb) == pytest.approx(crb_normalized_mse(yt, yp, crb=crb), rel=1e-12)


# ---------------------------------------------------------------- seeds in threads (issue 10d)
def test_seeded_nets_fitted_in_threads_are_reproducible():
    X, y, crb = toy(128)
    ref = small_net(max_epochs=1).fit(X, y, crb=crb).predict(X)
    results, errors = [None] * 6, []

    def work(i):
        try:
            results[i] = small_net(max_epochs=1).fit(X, y, crb=crb).predict(X)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def noise():  # unseeded draws from the global RNG at the same time
        for _ in range(200):
            torch.randn(64)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)] + [threading.Thread(target=noise)
                                                                                for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        np.testing.assert_array_equal(r, ref)


# ---------------------------------------------------------------- M0/noise model (issue 10f)
def _phases_are_uniform(phi):
    return kstest(np.mod(phi, 2 * np.pi) / (2 * np.pi), "uniform").pvalue > 1e-3


def test_make_dataset_m0_phases_uniform_and_crb_scaling(sim):
    X, y, crb, d = sim.make_dataset(2000, random_state=3, return_details=True)
    assert _phases_are_uniform(np.angle(d["M0"]))
    # the CRB of every sample is CRB(M0 = 1, sigma) / |M0|^2 through sim.crb
    th = d["theta"][:50]
    np.testing.assert_allclose(crb[:50], sim.crb(th, M0=d["M0"][:50]), rtol=1e-10)
    np.testing.assert_allclose(sim.crb(th, M0=d["M0"][:50]), sim.crb(th) / np.abs(d["M0"][:50, None]) ** 2,
                               rtol=1e-12)
    np.testing.assert_allclose(sim.crb(th, M0=0.5j), 4 * sim.crb(th), rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_augmentation_m0_phase_and_exact_crb_weight_scaling(backend):
    rng = np.random.default_rng(0)
    n, r, sigma, snr = 3000, 4, 0.01, (20.0, 200.0)
    c = rng.standard_normal((n, r)) + 1j * rng.standard_normal((n, r))
    Xc = np.hstack([c.real, c.imag])
    w = rng.uniform(1, 2, (n, 2))
    Xd = {"X": Xc, "w": w, "c": 3 * w}
    if backend == "torch":
        Xd = {k: torch.as_tensor(v) for k, v in Xd.items()}
    out = augment_batch(Xd, np.random.default_rng(5), snr, sigma, "crb")
    M0, _ = draw_m0_and_noise(np.random.default_rng(5), n, r, snr, sigma)  # the same draw
    Xo, wo, co = (np.asarray(out[k]) for k in ("X", "w", "c"))
    gain = np.abs(M0) ** 2 / sigma**2
    np.testing.assert_allclose(wo, w * gain[:, None], rtol=1e-12)
    np.testing.assert_allclose(co, 3 * w * gain[:, None], rtol=1e-12)
    # M0 recovered from the augmented features by least squares: its phase is uniform, its modulus sigma*U[snr]
    co_c = Xo[:, :r] + 1j * Xo[:, r:]
    M0_hat = np.sum(c.conj() * co_c, 1) / np.sum(np.abs(c) ** 2, 1)
    np.testing.assert_allclose(M0_hat, M0, atol=6 * sigma)
    assert _phases_are_uniform(np.angle(M0_hat))
    snr_hat = np.abs(M0_hat) / sigma
    assert snr_hat.min() > 19 and snr_hat.max() < 201
    resid = co_c - M0[:, None] * c
    assert np.std(resid.real) == pytest.approx(sigma, rel=0.05)


# ---------------------------------------------------------------- make_dataset on_singular (issue 10e)
class _PriorWithBadDraws:
    """Returns Rex = 0 (m0s, R1s and T2s not identifiable) for the first call's first rows."""

    def __init__(self, prior, n_bad):
        self.prior, self.n_bad, self.calls = prior, n_bad, 0

    def sample(self, n, rng):
        th = self.prior.sample(n, rng)
        if self.calls == 0:
            th[: self.n_bad, INDEX["Rex"]] = 0.0
        self.calls += 1
        return th

    def __getattr__(self, name):
        return getattr(self.prior, name)


def test_make_dataset_on_singular(short_sequence):
    sim = MTFingerprintSimulator(short_sequence, n_components=6, n_basis_samples=100, random_state=0).fit()
    theta = sim.sample_parameters(6, random_state=1)
    theta[4, INDEX["m0s"]] = 0.0  # singular exactly, but the CRB is that of the finite m0s -> 0+ limit
    _, _, crb0 = sim.make_dataset(6, theta=theta)
    at_floor = theta.copy()
    at_floor[4, INDEX["m0s"]] = 1e-4
    np.testing.assert_allclose(crb0, sim.make_dataset(6, theta=at_floor)[2])
    theta[2, INDEX["Rex"]] = 0.0  # no exchange: the semi-solid is invisible
    with pytest.raises(ValueError, match="singular"):
        sim.make_dataset(6, theta=theta)
    with pytest.warns(UserWarning, match="singular"):
        X, y, crb, d = sim.make_dataset(6, theta=theta, on_singular="inf", return_details=True)
    assert d["singular"].tolist() == [False, False, True, False, False, False]
    assert np.all(np.isinf(crb[2])) and np.all(np.isfinite(np.delete(crb, 2, 0)))
    with pytest.raises(ValueError, match="redraw"):
        sim.make_dataset(6, theta=theta, on_singular="redraw")
    sim.prior_ = _PriorWithBadDraws(sim.prior_, 2)
    with pytest.warns(UserWarning, match="singular"):
        X, y, crb, d = sim.make_dataset(10, random_state=0, on_singular="redraw", return_details=True)
    assert not d["singular"].any() and np.all(np.isfinite(crb)) and np.all(d["theta"][:, INDEX["Rex"]] > 0)
    with pytest.raises(ValueError, match="on_singular"):
        sim.make_dataset(3, on_singular="skip")


# ---------------------------------------------------------------- fallback CRBs removed (issue 9.5)
def test_crb_from_y_fallbacks_are_gone(sim):
    X, y, crb = sim.make_dataset(64, random_state=0)
    with pytest.raises(ValueError, match="pack_targets"):
        CRBNetRegressor(module=MLP, module__hidden=(8,), simulator=sim, max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="removed"):
        make_crb_scorer(simulator=sim)


# ---------------------------------------------------------------- model selection (issue 9.8)
@pytest.mark.parametrize("routing", [False, True])
def test_fold_scores_equal_hand_computed_efficiency(routing):
    X, y, crb = toy(240)
    cv = KFold(3, shuffle=True, random_state=0)
    with sklearn.config_context(enable_metadata_routing=routing):
        net = small_net(max_epochs=2)
        if routing:
            net = net.set_fit_request(crb=True).set_score_request(crb=True)
            res = cross_validate(net, X, y, cv=cv, scoring=make_crb_scorer(), params={"crb": crb},
                                 return_estimator=True, error_score="raise")
        else:
            res = cross_validate(net, X, pack_targets(y, crb), cv=cv, scoring=make_crb_scorer(),
                                 return_estimator=True, error_score="raise")
    for (_, test), est, score in zip(cv.split(X), res["estimator"], res["test_score"]):
        hand = crb_efficiency_score(y[test], est.predict(X[test]), crb=crb[test])
        assert score == pytest.approx(hand, rel=1e-12)
        assert est.score(X[test], y[test], crb=crb[test]) == pytest.approx(hand, rel=1e-12)
        assert est.score(X[test], pack_targets(y[test], crb[test])) == pytest.approx(hand, rel=1e-12)
    # the default score is the CRB efficiency too
    gs = GridSearchCV(small_net(max_epochs=2), {"lr": [1e-2, 3e-3]}, cv=cv, error_score="raise")
    gs.fit(X, pack_targets(y, crb))
    assert np.all(np.isfinite(gs.cv_results_["mean_test_score"]))


def test_model_selection_without_crb_fails_loudly():
    X, y, crb = toy(120)
    with pytest.raises(MissingCRBError, match="pack_targets"):
        GridSearchCV(small_net(max_epochs=1), {"lr": [1e-2]}, cv=2, scoring=make_crb_scorer(request_crb=False),
                     error_score="raise").fit(X, y, crb=crb)
    net = small_net(max_epochs=1).fit(X, y, crb=crb)
    with pytest.raises(ValueError, match="r2_score"):
        net.score(X, y)


# ---------------------------------------------------------------- device parameter
def test_device_auto_is_kept_by_params_clone_and_pickle():
    X, y, crb = toy(64)
    net = small_net(device="auto", max_epochs=1).fit(X, y, crb=crb)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert net.get_params()["device"] == "auto" and net.device_.type == want
    assert clone(net).get_params()["device"] == "auto"
    back = pickle.loads(pickle.dumps(net))
    assert back.get_params()["device"] == "auto"
    np.testing.assert_array_equal(back.predict(X), net.predict(X))
    net.set_params(device="cpu")
    assert net.get_params()["device"] == "cpu" and net.device_.type == "cpu"


# ---------------------------------------------------------------- predict_details protocol
def test_predict_details_protocol(sim):
    net = CRBNetRegressor(module=MLP, module__hidden=(16,), module__normalization="first-coefficient",
                          simulator=sim, max_epochs=2, batch_size=64, random_state=0)
    net.fit_simulated(256)
    X, y, crb, d = sim.make_dataset(20, random_state=4, return_details=True)
    det = net.predict_details(X, fixed={"B1": np.full(20, 0.9)})
    est = ("m0s", "R1f", "R2f")
    assert isinstance(det, PredictionDetails) and det.estimate == est
    free = 7  # tied model: m0s, R1f, R2f, Rex, T2s, omega0, B1
    assert det.n_free == len(est) + (free - len(est) - 1) + 2  # B1 is fixed, not nuisance
    th = det.theta
    assert th.shape == (20, 8) and det.M0.dtype == np.complex128
    np.testing.assert_allclose(th[:, :3], net.predict(X), rtol=1e-12)
    assert np.all(th[:, INDEX["B1"]] == 0.9) and np.all(th[:, INDEX["R1s"]] == th[:, INDEX["R1f"]])
    center = sim.prior_.center()
    # polish_iter=0: the nuisance at the fill values (prior centre); the polish moves them and never
    # increases the residual (LM steps are accepted only when the cost decreases)
    det0 = net.predict_details(X, fixed={"B1": np.full(20, 0.9)}, polish_iter=0)
    np.testing.assert_array_equal(det0.theta[:, INDEX["Rex"]], center[INDEX["Rex"]])
    assert np.any(th[:, INDEX["Rex"]] != center[INDEX["Rex"]])
    assert np.all(det.residual_norm <= det0.residual_norm * (1 + 1e-9))
    np.testing.assert_array_equal(th[:, :3], det0.theta[:, :3])
    assert det.converged.all() and not det.failed.any()
    np.testing.assert_allclose(det.prediction, net.predict(X), rtol=1e-12)
    assert det.crb is None and det.status is None and det.index is None  # fields a network does not produce
    # M0 is the least-squares scale: the residual is orthogonal to the model fingerprint
    ok = ~det.out_of_range
    s, J = jacobian(sim.sequence_, th[ok])
    u = s @ sim.basis_.conj()
    c = X[ok, :6] + 1j * X[ok, 6:]
    r = c - det.M0[ok, None] * u
    assert np.max(np.abs(np.sum(u.conj() * r, 1))) < 1e-10 * np.max(np.linalg.norm(c, axis=1)) ** 2
    np.testing.assert_allclose(det.residual_norm[ok], np.linalg.norm(r, axis=1), rtol=1e-12)
    ref = crb_from_jacobian(s, J, estimate=est, nuisance=("Rex", "T2s", "omega0"), tied_R1=True,
                            basis=sim.basis_, on_singular="inf")
    det_crb = network_details(net, X, fixed={"B1": np.full(20, 0.9)}, se="crb")
    np.testing.assert_allclose(det_crb.crb_unit[ok], ref, rtol=1e-10)
    np.testing.assert_array_equal(det_crb.theta, th)
    # the default standard error is the network's own (delta method): finite, positive, not the CRB
    assert det.crb_unit is None and np.all(det.var_unit[ok] > 0)
    assert np.all(np.isfinite(det.noise_residual_norm[ok]))
    assert np.all(det.noise_residual_norm[ok] <= det.residual_norm[ok] * (1 + 1e-9))
    assert net.predict_details(X, compute_crb=False).crb_unit is None
    # non-finite rows are flagged, not raised; an empty batch answers the names
    Xb = X.copy()
    Xb[3, 0] = np.nan
    detb = net.predict_details(Xb, compute_crb=False)
    assert not detb.converged[3] and detb.converged[np.arange(20) != 3].all()
    np.testing.assert_array_equal(detb.failed, ~detb.converged)
    assert np.isnan(detb.prediction[3]).all() and np.isfinite(detb.prediction[np.arange(20) != 3]).all()
    assert net.predict_details(X[:0]).estimate == est
    # a loaded model's context (crb_metadata_) takes precedence
    net.crb_metadata_ = {"sequence": sim.sequence_.to_dict(), "basis": sim.basis_, "estimate": list(est),
                         "tied_R1": True, "nuisance": "all", "fill_values": list(center)}
    det2 = net.predict_details(X, polish_iter=0)
    np.testing.assert_allclose(det2.theta[:, INDEX["B1"]], center[INDEX["B1"]])
    assert det2.n_free == 7 + 2
    with pytest.raises(ValueError, match="estimated"):
        net.predict_details(X, fixed={"m0s": 0.1})
