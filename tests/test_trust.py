"""The trust map (``sklearn_crb.maps.trust``, ``fit_maps(trust=)``), checked against independent references.

* model fingerprints at a known sigma: the chi-squared p-values are uniform (KS test) and the flag rate is alpha;
* an estimate offset from the truth by a known number of standard errors (``sqrt`` of the CRB of
  :func:`sklearn_crb.crb.cramer_rao_bound`): the Gauss-Newton step recovers the offset, and the projected
  residual stays chi-squared where the raw one does not;
* a 50 % CSF partial-volume fingerprint at a high SNR is flagged, its pure tissue is not;
* the network's projected residual is the one of its own ``predict_details`` (another implementation).
"""

import warnings

import numpy as np
import pytest
from conftest import small_cli_model, train_small_model
from scipy.stats import chi2, kstest

from sklearn_crb import NLLSFitter, Sequence
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.maps import FLAGS, fit_maps, map_names, resolve_trust
from sklearn_crb.maps.trust import tangent_parameters, tangent_statistics
from sklearn_crb.phantom import TISSUES
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, tie_R1
from sklearn_crb.physics.signal import jacobian, simulate

EST = ("m0s", "R1f", "R2f")


def _tissue(name):
    """A phantom tissue with R1s tied to R1f (so that the tied model holds exactly), on resonance, B1 = 1."""
    v = dict(TISSUES[name], omega0=0.0, B1=1.0)
    return tie_R1(np.array([[v[p] for p in PARAMETERS]]))[0]


@pytest.fixture(scope="module")
def problem():
    """The 1142-pulse built-in sequence, a rank-10 SVD basis, and tied NLLS estimating m0s, R1f, R2f, the other
    parameters fixed at white matter's: 2r - n_free = 20 - 5 = 15 degrees of freedom."""
    seq = Sequence.default()
    wm = _tissue("WM")
    rng = np.random.default_rng(0)
    th = np.tile(wm, (200, 1))
    th[:, [0, 2]] *= rng.uniform(0.8, 1.2, (200, 2))
    _, _, Vh = np.linalg.svd(simulate(seq, th), full_matrices=False)
    U = Vh[:10].conj().T
    fixed = {p: wm[INDEX[p]] for p in ("Rex", "T2s", "omega0", "B1")}
    nlls = NLLSFitter(seq, basis=U, estimate=EST, tied_R1=True, fixed=fixed).fit()
    return seq, U, wm, nlls


def _noisy(seq, U, theta, sigma, rng):
    c = simulate(seq, theta) @ U.conj()
    return c + sigma * (rng.standard_normal(c.shape) + 1j * rng.standard_normal(c.shape))


def _pvalues(maps):
    dof = maps.provenance["trust"]["dof"]
    return chi2.sf(maps.arrays["trust_chi2"][:, 0] * dof, dof)


def test_nlls_chi2_is_uniform_and_flags_alpha(problem):
    seq, U, wm, nlls = problem
    rng = np.random.default_rng(1)
    th = np.tile(wm, (300, 1))
    th[:, [0, 2]] *= rng.uniform(0.8, 1.2, (300, 2))
    sigma = np.linalg.norm(simulate(seq, wm[None]) @ U.conj()) / 80  # ||c|| / sigma = 80
    c = _noisy(seq, U, th, sigma, rng)[:, None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fit_maps(nlls, c, np.ones((300, 1), bool), sigma=sigma, trust_alpha=0.05)  # auto: the residual's
    assert m.provenance["trust"]["method"] == "residual" and m.provenance["trust"]["dof"] == 15
    ok = (m.arrays["flags"][:, 0] & FLAGS["estimator_failed"]) == 0
    assert ok.sum() >= 290
    assert kstest(_pvalues(m)[ok], "uniform").pvalue > 1e-3
    n_flag = int(np.sum((m.arrays["flags"][:, 0][ok] & FLAGS["untrusted"]) != 0))
    assert 3 <= n_flag <= 32  # binomial(290, 0.05): 99.9 % interval [4, 28]
    # at the NLLS optimum the tangent-projected residual is the raw one and the Gauss-Newton step vanishes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = fit_maps(nlls, c[:60], np.ones((60, 1), bool), sigma=sigma, trust="tangent", compute_se=False)
    np.testing.assert_allclose(t.arrays["trust_chi2"][ok[:60], 0], m.arrays["trust_chi2"][:60][ok[:60], 0],
                               rtol=1e-3)
    assert np.median(t.arrays["trust_step"][ok[:60], 0]) < 0.05


def _offset_case(seq, U, wm, k_se, sigma):
    """The truth, an estimate ``k_se`` standard errors above it in R2f (the others at the truth) and that SE."""
    M0 = 0.7 * np.exp(0.4j)
    se = np.sqrt(cramer_rao_bound(seq, wm[None], estimate=EST, nuisance=(), tied_R1=True, basis=U,
                                  M0=abs(M0), sigma=sigma))[0]
    est = wm.copy()
    est[INDEX["R2f"]] += k_se * se[2]
    s, J = jacobian(seq, est[None])
    u, Ju = s @ U.conj(), np.einsum("npk,pr->nrk", J, U.conj())
    return M0, se, est, u, Ju


def test_gauss_newton_step_recovers_a_planted_offset_in_standard_errors(problem):
    seq, U, wm, _ = problem
    sigma = 1e-3
    M0, se, est, u, Ju = _offset_case(seq, U, wm, 2.0, sigma)
    c = M0 * (simulate(seq, wm[None]) @ U.conj())  # noise-free data of the truth
    M0_hat = np.sum(u.conj() * c, 1) / np.sum(np.abs(u) ** 2, 1)  # the least-squares scale at the estimate
    perp_sq, step_unit = tangent_statistics(c, M0_hat, u, Ju, EST, True, 3)
    step = step_unit[0] / sigma
    # 2 SE in R2f back, nothing in the others (first order: the offset is small)
    np.testing.assert_allclose(step, [0.0, 0.0, 2.0], atol=0.05)
    raw_sq = np.linalg.norm(c - M0_hat[:, None] * u) ** 2
    assert raw_sq / sigma**2 > 1.0  # the offset shows in the raw residual ...
    assert perp_sq[0] < 1e-3 * raw_sq  # ... but not off the tangent space (second order)


def test_projected_chi2_stays_chi2_at_an_offset_estimate_where_the_raw_one_does_not(problem):
    """A biased "network" (every estimate 2 SE off in R2f): the projected residual is chi2(15), the raw is not."""
    seq, U, wm, _ = problem
    sigma, n = 1e-3, 400
    M0, _, _, u, Ju = _offset_case(seq, U, wm, 2.0, sigma)
    rng = np.random.default_rng(3)
    c = M0 * (simulate(seq, wm[None]) @ U.conj()) + sigma * (
        rng.standard_normal((n, U.shape[1])) + 1j * rng.standard_normal((n, U.shape[1])))
    u, Ju = np.repeat(u, n, 0), np.repeat(Ju, n, 0)
    M0_hat = np.sum(u.conj() * c, 1) / np.sum(np.abs(u) ** 2, 1)
    perp_sq, _ = tangent_statistics(c, M0_hat, u, Ju, EST, True, 3)
    raw_sq = np.linalg.norm(c - M0_hat[:, None] * u, axis=1) ** 2
    assert kstest(chi2.sf(perp_sq / sigma**2, 15), "uniform").pvalue > 1e-3
    assert kstest(chi2.sf(raw_sq / sigma**2, 15), "uniform").pvalue < 1e-6


def test_csf_partial_volume_is_flagged_and_pure_tissue_is_not(problem):
    seq, U, wm, nlls = problem
    rng = np.random.default_rng(4)
    s_wm, s_csf = (simulate(seq, np.stack([_tissue("WM"), _tissue("CSF")])) @ U.conj())
    sigma = np.linalg.norm(s_wm) / 190  # the phantom's white matter at SNR 116 (bench_partial_volume)
    n = 40
    c = np.stack([s_wm] * n + [0.5 * s_wm + 0.5 * s_csf] * n)
    c = c + sigma * (rng.standard_normal(c.shape) + 1j * rng.standard_normal(c.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fit_maps(nlls, c[:, None, :], np.ones((2 * n, 1), bool), sigma=sigma)
    untrusted = (m.arrays["flags"][:, 0] & FLAGS["untrusted"]) != 0
    assert untrusted[:n].mean() <= 0.1
    assert untrusted[n:].mean() >= 0.9


@pytest.fixture(scope="module")
def small_net(short_sequence):
    from sklearn_crb.phantom import make_phantom

    sim, net, _ = train_small_model(short_sequence, n_basis_samples=300, n_train=400, hidden=(32,), max_epochs=3)
    ph = make_phantom((8, 8), short_sequence, basis=sim, snr=50, random_state=2)
    return net, ph


def test_network_tangent_maps_match_its_own_projected_residual_and_flags(small_net):
    from sklearn_crb.estimators.net.details import network_details

    net, ph = small_net
    m = fit_maps(net, ph.coefficients, sigma=ph.sigma, trust="tangent", trust_max_step=2.0)
    assert set(m.arrays) == set(map_names(EST, trust="tangent"))
    assert m.units["trust_chi2"] == "1" and m.units["trust_step"] == "SE"
    sel = m.arrays["mask"]
    X = np.hstack([ph.coefficients[sel].real, ph.coefficients[sel].imag])
    det = network_details(net, X, se="crb")  # its noise_residual_norm: every row with se="crb"
    dof = 2 * ph.coefficients.shape[-1] - det.n_free
    assert m.provenance["trust"]["dof"] == dof
    np.testing.assert_allclose(m.arrays["trust_chi2"][sel], det.noise_residual_norm**2 / ph.sigma**2 / dof,
                               rtol=1e-6)
    p = chi2.sf(m.arrays["trust_chi2"][sel] * dof, dof)
    expect = (p < 0.01) | (m.arrays["trust_step"][sel] > 2.0)
    np.testing.assert_array_equal((m.arrays["flags"][sel] & FLAGS["untrusted"]) != 0, expect)
    assert m.arrays["trust_chi2"][~sel].sum() == 0


def test_trust_choices_names_and_errors(small_net):
    net, ph = small_net
    m = fit_maps(net, ph.coefficients, sigma=ph.sigma, compute_se=False)  # auto: no trust map for a network
    assert resolve_trust("auto", least_squares=False) is None and resolve_trust("auto", True) == "residual"
    assert "trust_chi2" not in m.arrays and m.provenance["trust"] is None
    assert set(m.arrays) == set(map_names(EST, compute_se=False))
    m = fit_maps(net, ph.coefficients, sigma=ph.sigma, compute_se=False, trust="residual")
    assert set(m.arrays) == set(map_names(EST, compute_se=False, trust="residual"))
    for kw, msg in (({"trust": "chi2"}, "trust must be"), ({"trust_alpha": 1.5}, "trust_alpha"),
                    ({"trust_max_step": 0}, "trust_max_step")):
        with pytest.raises(ValueError, match=msg):
            fit_maps(net, ph.coefficients, **kw)


def test_tangent_parameters_follow_n_free():
    assert tangent_parameters(("m0s", "T1f"), 9, tied_R1=True) == ("m0s", "R1f", "R2f", "Rex", "T2s", "omega0",
                                                                    "B1")
    assert tangent_parameters(EST, 5, tied_R1=True, free=("m0s", "R1f", "R2f")) == EST
    assert tangent_parameters(EST, 5, tied_R1=True) is None  # nuisance held at values the estimator keeps


def test_report_and_cli_show_the_trust_map(tmp_path):
    import nibabel as nib

    from sklearn_crb.cli import main
    from sklearn_crb.report import render_report

    _, coef = small_cli_model(tmp_path)
    nib.save(nib.Nifti1Image(np.concatenate([coef.real, coef.imag], -1).astype(np.float32), np.eye(4)),
             tmp_path / "coef.nii.gz")
    out = tmp_path / "fit"
    assert main(["fit", "--coefficients", str(tmp_path / "coef.nii.gz"), "--model", str(tmp_path / "model"),
                 "--out", str(out), "--trust", "tangent", "--quiet"]) == 0
    assert (out / "trust_chi2.nii.gz").is_file() and (out / "trust_step.nii.gz").is_file()
    page = (out / "report.html").read_text()
    assert 'id="trust-table"' in page and "voxels flagged untrusted" in page
    from sklearn_crb import load_model

    m = fit_maps(load_model(tmp_path / "model"), coef, trust=None)
    assert "No trust map was computed" in render_report(m)
