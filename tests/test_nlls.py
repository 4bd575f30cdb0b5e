"""NLLSFitter: exact recovery (test/NLLS.jl of MRIgeneralizedBloch.jl), agreement with scipy, bounds,
failure flags, the dask path, and Monte-Carlo efficiency at high SNR."""

import warnings

import numpy as np
import pytest
import torch
from conftest import NLLS_THETA
from scipy.optimize import least_squares
from sklearn.base import BaseEstimator

from sklearn_crb import PARAMETERS, ParameterPrior
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.nlls import STATUS, NLLSFitter, NLLSFitWarning
from sklearn_crb.estimators.nlls.solver import reduced_jacobian, varpro
from sklearn_crb.physics.parameters import INDEX, free_parameters
from sklearn_crb.physics.signal import jacobian, simulate
from sklearn_crb.simulator import MTFingerprintSimulator

M0_TRUE = 0.85


@pytest.fixture(scope="module")
def rank13_basis(v32_sequence):
    return MTFingerprintSimulator(v32_sequence, n_components=13, n_basis_samples=300, random_state=0).fit().basis_


# ------------------------------------------------------------ the reduced Jacobian
def test_reduced_jacobian_matches_finite_differences(short_sequence):
    """The Golub–Pereyra Jacobian of r(theta) = P_perp(theta) y, against central differences."""
    nl = NLLSFitter(short_sequence, estimate=PARAMETERS).fit()
    prob = nl._problem()
    rng = np.random.default_rng(0)
    th = np.vstack([NLLS_THETA, [0.1, 0.8, 10.0, 15.0, 2.0, 15e-6, -200.0, 1.1]])
    x = torch.as_tensor(th[:, list(prob.free_idx)] / prob.scale)
    y = torch.as_tensor(simulate(short_sequence, th) * (0.7 + 0.2j))
    y = y + 0.02 * torch.as_tensor(rng.standard_normal(y.shape) + 1j * rng.standard_normal(y.shape))
    base = torch.as_tensor(th)
    g, dg = prob.model_and_jacobian(x, base)
    a, r, gg = varpro(g, y)
    Jr = reduced_jacobian(g, prob.free_columns(dg), a, r, gg)
    for k in range(x.shape[1]):
        h = 1e-6 * max(1.0, float(x[:, k].abs().max()))
        e = torch.zeros_like(x)
        e[:, k] = h
        rp = varpro(prob.model(x + e, base), y)[1]
        rm = varpro(prob.model(x - e, base), y)[1]
        fd = (rp - rm) / (2 * h)
        np.testing.assert_allclose(Jr[..., k].numpy(), fd.numpy(), rtol=1e-5, atol=1e-7 * float(fd.abs().max()),
                                   err_msg=f"column {prob.free_idx[k]}")


# --------------------------------------------------------------- noiseless recovery
def _check_recovery(details, theta, M0, rtol=1e-3):
    np.testing.assert_allclose(details.theta, theta, rtol=rtol)
    np.testing.assert_allclose(details.M0, M0, rtol=rtol)
    assert details.converged.all() and not details.failed.any()


@pytest.mark.parametrize("model", ["full", "rank13", "tied"])
def test_noiseless_recovery_v32(v32_sequence, rank13_basis, model):
    """test/NLLS.jl: all 8 parameters and M0 from the default start, rtol 1e-3."""
    theta = NLLS_THETA[None].copy()
    tied = model == "tied"
    if tied:
        theta[:, INDEX["R1s"]] = theta[:, INDEX["R1f"]]
    M0 = M0_TRUE * np.exp(0.4j)
    s = M0 * simulate(v32_sequence, theta)
    nl = NLLSFitter(v32_sequence, basis=rank13_basis if model == "rank13" else None,
                    estimate=free_parameters(tied), tied_R1=tied).fit()
    X = s if model != "rank13" else np.hstack([(s @ rank13_basis.conj()).real, (s @ rank13_basis.conj()).imag])
    est, d = nl.predict(X, return_details=True)
    _check_recovery(d, theta, [M0])
    np.testing.assert_allclose(est, theta[:, [INDEX[p] for p in free_parameters(tied)]], rtol=1e-3)
    assert d.residual_norm[0] < 1e-6 * np.linalg.norm(X)


@pytest.mark.slow
def test_recovery_from_prior_draws(v32_sequence):
    """Random parenchyma-prior tissues (all 8 parameters free, random complex M0),
    dictionary multi-start: every voxel is recovered or flagged, and most are recovered."""
    theta = ParameterPrior.parenchyma().sample(6, random_state=3)
    rng = np.random.default_rng(1)
    M0 = rng.uniform(0.3, 1.0, 6) * np.exp(2j * np.pi * rng.uniform(size=6))
    s = M0[:, None] * simulate(v32_sequence, theta)
    nl = NLLSFitter(v32_sequence, estimate=PARAMETERS, start="dictionary", n_dictionary=1500, n_starts=3,
                    random_state=0).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        d = nl.predict_details(s)
    rel = np.abs(d.theta / theta - 1).max(1)
    recovered = (rel < 1e-3) & (np.abs(d.M0 / M0 - 1) < 1e-3)
    assert np.all(recovered | d.failed), (rel, d.status)
    assert recovered.sum() >= 5, (rel, d.status)


# ------------------------------------------------------------ agreement with scipy
def test_agrees_with_scipy_least_squares(v32_sequence):
    """Same optimum as scipy's TRF on the full (theta, Re M0, Im M0) problem with the exact Jacobian."""
    est = ("m0s", "R1f", "R2f", "Rex", "R1s")
    fixed = {"T2s": 11e-6, "omega0": 30.0, "B1": 0.95}
    nl = NLLSFitter(v32_sequence, estimate=est, fixed=fixed).fit()
    theta = np.array([[0.12, 0.6, 14.0, 25.0, 2.5, 11e-6, 30.0, 0.95],
                      [0.2, 0.4, 18.0, 15.0, 3.5, 11e-6, 30.0, 0.95],
                      ])
    rng = np.random.default_rng(7)
    s = 0.9 * simulate(v32_sequence, theta)
    s = s + 0.003 * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    d = nl.predict_details(s)
    idx = [INDEX[p] for p in est]
    lo = [nl.bounds_[p][0] for p in est] + [-np.inf, -np.inf]
    hi = [nl.bounds_[p][1] for p in est] + [np.inf, np.inf]
    scale = np.array([0.1, 1, 10, 10, 1, 1, 1])

    def full(z):
        th = np.array([[fixed.get(p, 0.0) for p in PARAMETERS]])
        th[0, idx] = z[:5]
        return th

    for i in range(theta.shape[0]):
        def fun(z):
            g = (z[5] + 1j * z[6]) * simulate(v32_sequence, full(z * scale))[0]
            r = s[i] - g
            return np.concatenate([r.real, r.imag])

        def jac(z):
            zz = z * scale
            sg, J = jacobian(v32_sequence, full(zz))
            M0 = zz[5] + 1j * zz[6]
            cols = np.column_stack([M0 * J[0][:, idx], sg[0], 1j * sg[0]]) * scale
            return -np.vstack([cols.real, cols.imag])

        z0 = np.concatenate([[0.2, 0.3, 15.0, 20.0, 3.0], [1.0, 0.0]]) / scale
        ref = least_squares(fun, z0, jac=jac, bounds=(np.array(lo) / scale, np.array(hi) / scale), method="trf",
                            x_scale=1.0, xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=200)
        z = ref.x * scale
        assert d.residual_norm[i] <= np.linalg.norm(ref.fun) * (1 + 1e-8)
        assert ref.success and d.converged[i]
        np.testing.assert_allclose(d.theta[i, idx], z[:5], rtol=1e-4)
        np.testing.assert_allclose(d.M0[i], z[5] + 1j * z[6], rtol=1e-5)


# ----------------------------------------------------------- bounds and failures
def test_bounds_respected(v32_sequence):
    theta = NLLS_THETA[None]
    s = simulate(v32_sequence, theta) * 0.85
    bounds = {"m0s": (0.02, 0.1), "R2f": (20.0, 40.0)}  # exclude the truth
    nl = NLLSFitter(v32_sequence, estimate=("m0s", "R2f"), bounds=bounds).fit()
    d = nl.predict_details(s)
    for k, p in enumerate(nl.free_parameters_):
        lo, hi = nl.bounds_[p]
        assert lo <= d.theta[0, INDEX[p]] <= hi, p
    free = list(nl.free_parameters_)
    assert d.at_bound[0, free.index("m0s")] and d.at_bound[0, free.index("R2f")]
    assert not d.failed[0]


def test_bad_voxels_flagged(v32_sequence):
    theta = np.repeat(NLLS_THETA[None], 4, axis=0)
    s = simulate(v32_sequence, theta) * 0.85
    s[1] = np.nan
    s[2] = 0.0
    nl = NLLSFitter(v32_sequence, fixed={"omega0": 100.0, "B1": 0.9}).fit()
    with pytest.warns(NLLSFitWarning, match="2 of 4"):
        est, d = nl.predict(s, return_details=True)
    assert est.shape == (4, 3)
    assert [STATUS[k] for k in d.status] == ["converged", "nonfinite_input", "zero_input", "converged"]
    assert np.isnan(est[[1, 2]]).all() and np.isfinite(est[[0, 3]]).all()
    np.testing.assert_allclose(est[[0, 3]], theta[[0, 3]][:, :3], rtol=1e-6)
    # no convergence within max_iter: flagged, finite last iterate, never NaN
    nl1 = NLLSFitter(v32_sequence, fixed={"omega0": 100.0, "B1": 0.9}, max_iter=2).fit()
    with pytest.warns(NLLSFitWarning, match="max_iter"):
        d1 = nl1.predict_details(s[[0]])
    assert d1.failed[0] and not d1.converged[0] and np.isfinite(d1.prediction).all()


def test_standard_errors_match_crb(v32_sequence):
    theta = NLLS_THETA[None]
    sigma = 0.01
    nl = NLLSFitter(v32_sequence, fixed={"omega0": 100.0, "B1": 0.9}, sigma=sigma).fit()
    d = nl.predict_details(0.85 * simulate(v32_sequence, theta))
    nuis = ("Rex", "R1s", "T2s")
    crb = cramer_rao_bound(v32_sequence, theta, estimate=("m0s", "R1f", "R2f"), nuisance=nuis, M0=0.85,
                           sigma=sigma)
    np.testing.assert_allclose(d.crb, crb, rtol=1e-6)
    np.testing.assert_allclose(d.std_error, np.sqrt(crb), rtol=1e-6)


def test_init_estimator_seeds_the_fit(v32_sequence):
    """A fitted estimator's predictions seed the fit: same optimum, fewer iterations."""
    fixed = {"omega0": 100.0, "B1": 0.9}
    theta = np.array([[0.1, 0.7, 12.0, 20.0, 2.0, 11e-6, 100.0, 0.9], [0.2, 0.4, 20.0, 35.0, 4.0, 13e-6, 100, 0.9]])
    s = 0.6 * simulate(v32_sequence, theta)
    dm = DictionaryMatcher(v32_sequence, estimate=("m0s", "R1f", "R2f", "Rex", "R1s", "T2s"), fixed=fixed,
                           n_atoms=500, random_state=0).fit()
    cold = NLLSFitter(v32_sequence, fixed=fixed).fit().predict_details(s)
    warm = NLLSFitter(v32_sequence, fixed=fixed, init=dm).fit().predict_details(s)
    np.testing.assert_allclose(warm.theta, theta, rtol=1e-6)
    np.testing.assert_allclose(cold.theta, theta, rtol=1e-6)
    assert warm.n_iter.sum() < cold.n_iter.sum()


def test_input_formats_agree(v32_sequence):
    basis = MTFingerprintSimulator(v32_sequence, n_components=13, n_basis_samples=100,
                                   random_state=0).fit().basis_
    nl = NLLSFitter(v32_sequence, basis=basis, fixed={"omega0": 100.0, "B1": 0.9}).fit()
    s = 0.85 * simulate(v32_sequence, NLLS_THETA[None])
    c = s @ basis.conj()
    a = nl.predict(s)
    b = nl.predict(c)
    f = nl.predict(np.hstack([c.real, c.imag]))
    np.testing.assert_allclose(a, b, rtol=1e-10)
    np.testing.assert_allclose(a, f, rtol=1e-10)
    np.testing.assert_allclose(a[0], NLLS_THETA[:3], rtol=1e-6)


def test_validation_errors(short_sequence):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NLLSFitter(short_sequence).predict(np.zeros((1, 240)))
    with pytest.raises(ValueError, match="T2s"):
        NLLSFitter(short_sequence, bounds={"T2s": (1e-6, 20e-6)}).fit()
    with pytest.raises(ValueError, match="B1"):
        NLLSFitter(short_sequence, bounds={"B1": (0.5, 1.5)}).fit()
    with pytest.raises(ValueError, match="overlap"):
        NLLSFitter(short_sequence, fixed={"m0s": 0.1}).fit()
    with pytest.raises(ValueError, match="fixed"):
        NLLSFitter(short_sequence, fixed={"foo": 1.0}).fit()
    with pytest.raises(ValueError, match="max_iter"):
        NLLSFitter(short_sequence, max_iter=0).fit()
    with pytest.raises(ValueError, match="start"):
        NLLSFitter(short_sequence, start="bogus").fit()
    with pytest.raises(ValueError, match="rank"):
        NLLSFitter(short_sequence, basis=np.eye(120)[:, :4], estimate=PARAMETERS).fit()
    nl = NLLSFitter(short_sequence).fit()
    with pytest.raises(ValueError, match="features"):
        nl.predict(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="X"):
        nl.predict(np.zeros((2, 7), dtype=complex))


# ---------------------------------------------------------------------- dask
def test_dask_matches_serial(short_sequence):
    distributed = pytest.importorskip("dask.distributed")
    import joblib

    fixed = {"omega0": 100.0, "B1": 0.9}
    theta = ParameterPrior.parenchyma().sample(6, random_state=2)
    theta[:, 6:] = [100.0, 0.9]
    rng = np.random.default_rng(0)
    s = 0.8 * simulate(short_sequence, theta)
    s = s + 0.005 * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    nl = NLLSFitter(short_sequence, fixed=fixed, chunk_size=2, n_jobs=-1).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        serial = nl.set_params(n_jobs=1).predict_details(s)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                                      processes=True) as cluster, distributed.Client(cluster) as client:
            with joblib.parallel_config(backend="dask"):
                par = nl.set_params(n_jobs=-1).predict_details(s)
            workers = client.run(lambda: 1)
    assert len(workers) == 2
    for key in ("theta", "M0", "residual_norm", "n_iter", "status", "crb"):
        np.testing.assert_array_equal(getattr(par, key), getattr(serial, key), err_msg=key)


# ---------------------------------------------------------- Monte-Carlo efficiency
#: White-matter-like tissue (Mao et al., arXiv 2312.11468): T1 = 1.92 s tied, T2f = 77.6 ms.
WM_THETA = np.array([0.2, 1 / 1.92, 1 / 0.0776, 16.5, 1 / 1.92, 12.4e-6, 50.0, 0.9])
#: SNR = |M0| / sigma. At 2000, sqrt(CRB)/value is 0.66 % (m0s), 0.34 % (R1f), 0.37 % (R2f) and at
#: most 2.8 % for the nuisance parameters (Rex, T2s, omega0, B1), i.e. well inside the asymptotic regime.
MC_SNR = 2000.0


@pytest.mark.slow
def test_monte_carlo_efficiency(v32_sequence):
    """NLLS is asymptotically efficient: CRB-normalised MSE of m0s, R1f, R2f in [0.8, 1.3]
    over 300 fixed-seed noise draws (tied-R1 model, full signal, all nuisance parameters free)."""
    n = 300
    sigma = 1.0 / MC_SNR
    est = ("m0s", "R1f", "R2f")
    crb = cramer_rao_bound(v32_sequence, WM_THETA[None], estimate=est, tied_R1=True, M0=1.0, sigma=sigma)[0]
    assert np.all(np.sqrt(crb) < 0.05 * WM_THETA[:3])
    rng = np.random.default_rng(2022)
    M0 = np.exp(2j * np.pi * rng.uniform(size=n))
    s = M0[:, None] * simulate(v32_sequence, WM_THETA[None])
    s = s + sigma * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    start = dict(zip(PARAMETERS, WM_THETA))
    nl = NLLSFitter(v32_sequence, estimate=est, tied_R1=True, start=start, chunk_size=n).fit()
    d = nl.predict_details(s)
    assert d.converged.all()
    nmse = ((d.prediction - WM_THETA[:3]) ** 2).mean(0) / crb
    assert np.all((nmse > 0.8) & (nmse < 1.3)), nmse
    # standard errors at the estimate (sigma from the residual) agree with the CRB
    np.testing.assert_allclose(np.median(d.std_error, 0), np.sqrt(crb), rtol=0.05)


def test_statistical_stop_changes_estimates_by_a_fraction_of_the_noise(v32_sequence, rank13_basis):
    """se_tol stops when steps are < 1 % of a standard error: the estimates
    stay within a small fraction of sqrt(CRB) of the fully converged ones,
    with fewer iterations."""
    rng = np.random.default_rng(7)
    theta = np.tile(NLLS_THETA, (8, 1))
    theta[:, 0] = rng.uniform(0.08, 0.2, 8)
    s = 0.7 * simulate(v32_sequence, theta) @ rank13_basis.conj()
    sigma = 0.7 / 200
    y = s + sigma * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    kw = dict(basis=rank13_basis, estimate=PARAMETERS, start=dict(zip(PARAMETERS, NLLS_THETA)))
    stat = NLLSFitter(v32_sequence, **kw).fit().predict_details(y)
    full = NLLSFitter(v32_sequence, se_tol=0.0, **kw).fit().predict_details(y)
    se = full.std_error
    ok = full.converged & stat.converged
    assert ok.sum() >= 6
    assert np.all(stat.n_iter[ok] <= full.n_iter[ok])
    dev = np.abs(stat.theta[ok] - full.theta[ok]) / se[ok]
    assert np.median(dev) < 0.05 and dev.max() < 0.5


# --------------------------------------------------------- warm-start schedule (issue 12)
class _Start(BaseEstimator):
    """A fitted stand-in for a network: returns the given parameters (all free ones)."""

    def __init__(self, values=None, names=()):
        self.values = values
        self.names = names

    def fit(self, X=None, y=None):
        self.estimate_ = tuple(self.names)
        return self

    def predict(self, X):
        return self.values[: len(X)]


@pytest.fixture(scope="module")
def warm_problem(short_sequence):
    """Noisy 120-pulse fingerprints (m0s, R1f, R2f, Rex free) and their fully converged (se_tol=0) fits."""
    fixed = {"R1s": 3.0, "T2s": 12e-6, "omega0": 100.0, "B1": 0.9}
    theta = ParameterPrior.parenchyma().sample(6, random_state=4)
    for k, v in fixed.items():
        theta[:, INDEX[k]] = v
    rng = np.random.default_rng(3)
    theta[:, INDEX["m0s"]] = rng.uniform(0.08, 0.2, 6)  # away from the singular m0s = 0
    theta[:, INDEX["Rex"]] = rng.uniform(15.0, 40.0, 6)  # an exchange slow enough to identify m0s
    s = 0.8 * simulate(short_sequence, theta)
    s = s + 0.002 * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
    kw = dict(estimate=("m0s", "R1f", "R2f", "Rex"), fixed=fixed)
    start = dict(zip(PARAMETERS, theta.mean(0)))
    full = NLLSFitter(short_sequence, se_tol=0.0, start=start, **kw).fit().predict_details(s)
    assert full.converged.all() and np.isfinite(full.std_error).all()
    assert not full.at_bound.any()
    return s, theta, kw, full


SCHEDULES = [dict(), dict(lambda0=1e-3), dict(lambda0=1e-3, jacobian_reuse=2), dict(lambda0=1e-3, geodesic=True),
             dict(lambda0=1e-3, jacobian_reuse=3, geodesic=True), dict(lambda0=1e-3, secant=True)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_start_at_the_optimum_stops_at_once(short_sequence, warm_problem, schedule):
    """From the converged optimum, the Gauss-Newton step is far below se_tol standard errors: <= 2 iterations,
    one or two exact Jacobians, and the estimates do not move."""
    s, _, kw, full = warm_problem
    names = kw["estimate"]
    init = _Start(full.prediction, names).fit()
    d = NLLSFitter(short_sequence, init=init, **schedule, **kw).fit().predict_details(s)
    assert d.converged.all()
    assert np.all(d.n_iter <= 2), d.n_iter
    assert np.all(d.n_jacobian <= 2), d.n_jacobian
    dev = np.abs(d.prediction - full.prediction) / full.std_error
    assert dev.max() < 0.02, dev


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_good_start_reaches_the_cold_optimum(short_sequence, warm_problem, schedule):
    """From the truth perturbed by half a standard error, every schedule reaches the fully converged cold
    optimum within a small fraction of sqrt(CRB), and the CRB is computed at the final point."""
    s, theta, kw, full = warm_problem
    names = kw["estimate"]
    rng = np.random.default_rng(11)
    idx = [INDEX[p] for p in names]
    start = theta[:, idx] + 0.5 * full.std_error * rng.standard_normal(full.std_error.shape)
    warm = NLLSFitter(short_sequence, init=_Start(start, names).fit(), **schedule, **kw).fit().predict_details(s)
    assert warm.converged.all()
    dev = np.abs(warm.prediction - full.prediction) / full.std_error
    assert np.median(dev) < 0.05 and dev.max() < 0.3, dev
    assert np.all(warm.residual_norm <= full.residual_norm * (1 + 1e-4))
    # the returned CRB is the one at the returned theta (exact Jacobian there, even with Broyden updates)
    crb = cramer_rao_bound(short_sequence, warm.theta, estimate=names, nuisance=None, M0=warm.M0,
                           sigma=warm.sigma)
    np.testing.assert_allclose(warm.crb, crb, rtol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES[2:])
def test_accepted_steps_never_increase_the_cost(short_sequence, warm_problem, schedule):
    """The k-th iterate (max_iter=k) has a cost that never increases with k, from a poor start."""
    s, _, kw, _ = warm_problem
    costs = []
    for k in range(1, 7):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NLLSFitWarning)
            d = NLLSFitter(short_sequence, max_iter=k, se_tol=0.0, **schedule, **kw).fit().predict_details(s)
        costs.append(d.residual_norm)
    costs = np.array(costs)
    assert np.all(np.diff(costs, axis=0) <= 1e-12 * costs[:-1]), costs
    assert np.any(costs[-1] < costs[0])


@pytest.mark.parametrize("kw, match", [(dict(jacobian_reuse=-1), "jacobian_reuse"),
                                        (dict(jacobian_reuse=1.5), "jacobian_reuse"),
                                        (dict(jacobian_reuse=True), "jacobian_reuse"),
                                        (dict(geodesic="yes"), "geodesic"), (dict(secant="yes"), "secant"),
                                        (dict(final_step=1), "final_step"),
                                        (dict(lambda0=0.0), "lambda0")])
def test_schedule_options_validated(short_sequence, kw, match):
    with pytest.raises(ValueError, match=match):
        NLLSFitter(short_sequence, **kw).fit()


def test_final_step_takes_the_remaining_distance(short_sequence, warm_problem):
    """With a loose statistical stop, the final Gauss-Newton step (one simulation) brings the estimates
    closer to the fully converged optimum, never raises the cost, and costs one more Jacobian only where it
    moved a parameter beyond se_tol standard errors: there the CRB is the returned point's own, elsewhere
    the stop point's, within a few per cent in the median voxel."""
    s, theta, kw, full = warm_problem
    names = kw["estimate"]
    rng = np.random.default_rng(12)
    start = theta[:, [INDEX[p] for p in names]] + full.std_error * rng.standard_normal(full.std_error.shape)
    fits = {f: NLLSFitter(short_sequence, init=_Start(start, names).fit(), lambda0=1e-3, se_tol=1.0, final_step=f,
                          **kw).fit().predict_details(s) for f in (False, True)}
    plain, final = fits[False], fits[True]
    assert final.converged.all()
    # one more Jacobian exactly where the final step moved a parameter beyond se_tol standard errors
    extra = final.n_jacobian - plain.n_jacobian
    assert set(np.unique(extra)) <= {0, 1} and 1 <= extra.sum() <= len(extra) // 2, extra
    dev = {f: np.abs(d.prediction - full.prediction) / full.std_error for f, d in fits.items()}
    assert np.median(dev[True]) < 0.85 * np.median(dev[False]), dev
    assert np.all(final.residual_norm <= plain.residual_norm * (1 + 1e-12))
    crb = cramer_rao_bound(short_sequence, final.theta, estimate=names, nuisance=None, M0=final.M0,
                           sigma=final.sigma)
    # elsewhere the CRB is the stop point's: close to the returned point's in the median voxel
    assert np.median(np.abs(final.crb / crb - 1)) < 0.05
    # where the step went farther, the CRB is the returned point's own
    np.testing.assert_allclose(final.crb[extra == 1], crb[extra == 1], rtol=1e-6)
    # and nowhere off by much: without that Jacobian one m0s entry here was off 4x (measured 0.11 at most)
    assert np.abs(final.crb / crb - 1).max() < 0.25


def test_init_start_values_names_times_and_generic_outputs():
    """A network's target_names_ name its columns (times in s start their rates); generic names (y0, ...) fall
    back to the fitter's estimate, by position; a column count that does not match is refused."""
    from types import SimpleNamespace

    from sklearn_crb.estimators._base import init_start_values

    X = np.zeros((3, 4))
    vals = np.array([[0.1, 1.25, 0.08]] * 3)
    net = SimpleNamespace(target_names_=("m0s", "T1f", "T2f"), predict=lambda X: vals)
    got = init_start_values(net, X, ("m0s", "R1f", "R2f"))
    assert set(got) == {"m0s", "R1f", "R2f"}
    np.testing.assert_allclose(got["R1f"], 0.8)
    np.testing.assert_allclose(got["R2f"], 12.5)
    generic = SimpleNamespace(target_names_=("y0", "y1", "y2"), predict=lambda X: vals)
    np.testing.assert_allclose(init_start_values(generic, X, ("m0s", "R1f", "R2f"))["R1f"], 1.25)
    with pytest.raises(ValueError, match="init.predict returned 3 columns"):
        init_start_values(SimpleNamespace(estimate_=("m0s", "R1f"), predict=lambda X: vals), X, ("m0s",))
    with pytest.raises(ValueError, match="not model parameters"):
        init_start_values(SimpleNamespace(estimate_=("m0s", "R1f", "bogus"), predict=lambda X: vals), X, ())


def test_init_of_another_acquisition_is_refused(short_sequence):
    """NLLSFitter(init=net) refuses, at fit, a network trained in another basis or for another sequence, as
    ``fit --nlls-init`` does (issue 29: the Python API accepted it); the same basis and sequence pass."""
    from conftest import train_small_model

    from sklearn_crb.physics.sequence import Sequence

    sim, net, _ = train_small_model(short_sequence)
    U = sim.basis_
    NLLSFitter(short_sequence, basis=U, init=net).fit()  # the network's own acquisition
    Q, _ = np.linalg.qr(U[:, ::-1])  # another orthonormal basis of the same rank
    with pytest.raises(ValueError, match="init: basis mismatch"):
        NLLSFitter(short_sequence, basis=Q, init=net).fit()
    other = Sequence.default(n_pulses=short_sequence.n_pulses + 10)
    with pytest.raises(ValueError, match="init: sequence mismatch"):
        NLLSFitter(other, init=net).fit()
    with pytest.raises(ValueError, match="init: basis mismatch, one works on full signals"):
        NLLSFitter(short_sequence, init=net).fit()
    dm = DictionaryMatcher(other, n_atoms=20).fit()  # any estimator that declares its model is checked
    with pytest.raises(ValueError, match="init: sequence mismatch"):
        NLLSFitter(short_sequence, basis=U, init=dm).fit()
