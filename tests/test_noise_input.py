"""The noise-aware network (``CRBNetRegressor(noise_input=True)``, issue 27): its input, training, I/O and maps."""

import numpy as np
import pytest
import torch
from scipy import stats

from sklearn_crb import CRBNetRegressor, MTFingerprintSimulator, NLLSFitter, fit_maps, load_model, make_phantom
from sklearn_crb.estimators.net.augmentation import augment_batch
from sklearn_crb.estimators.net.modules import MLP, InputNormalization, ResidualMLP
from sklearn_crb.io.models import save_model
from sklearn_crb.noise import draw_m0_and_noise


@pytest.fixture(scope="module")
def sim(short_sequence):
    return MTFingerprintSimulator(short_sequence, n_components=6, tied_R1=True, snr=(10, 1000), random_state=0,
                                  n_basis_samples=200).fit()


@pytest.fixture(scope="module")
def net(sim, one_torch_thread):
    return CRBNetRegressor(simulator=sim, noise_input=True, snr_sampling="log-uniform", module__hidden=(32, 32),
                           max_epochs=3, random_state=0, device="cpu").fit_simulated(600)


def _features(sim, n, snr, seed):
    """Noisy features of ``n`` prior draws at ``|M0| = snr * sigma`` and their noise level."""
    _, _, _, det = sim.make_dataset(n, seed, return_details=True)
    rng = np.random.default_rng(seed)
    M0, noise = draw_m0_and_noise(rng, n, det["X_clean"].shape[1] // 2, (snr, snr), sim.sigma)
    from sklearn_crb.noise import apply_m0_and_noise

    return apply_m0_and_noise(det["X_clean"], M0, noise), sim.sigma


def test_log_snr_column_is_scale_invariant_and_reads_sigma():
    """Scaling the data and its noise level together changes nothing; sigma alone does (the SNR)."""
    torch.manual_seed(0)
    norm = InputNormalization("phase-l2", noise_input=True).eval()  # eval: the standardisation stays 0, 1
    x = torch.randn(8, 12, dtype=torch.float64)
    sig = torch.full((8, 1), 0.05, dtype=torch.float64)
    z = norm(torch.cat([x, sig], 1))
    assert z.shape == (8, 13)
    np.testing.assert_allclose(z[:, -1], torch.log(torch.linalg.vector_norm(x, dim=1) / 0.05), rtol=1e-12)
    np.testing.assert_allclose(norm(torch.cat([7.0 * x, 7.0 * sig], 1)), z, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(norm(torch.cat([x, 2 * sig], 1))[:, -1], z[:, -1])
    with pytest.raises(ValueError, match="noise column"):
        norm(torch.cat([x, 0 * sig], 1))


@pytest.mark.parametrize("cls", [MLP, ResidualMLP])
def test_modules_take_the_noise_column_before_the_measured_ones(cls):
    m = cls(n_features=12 + 1 + 1, n_outputs=2, hidden=(8, 8), noise_input=True, n_conditioning=1)
    m.eval()
    x = torch.randn(5, 12)
    out = m(torch.cat([x, torch.full((5, 1), 0.1), torch.ones(5, 1)], 1))
    assert out.shape == (5, 2)
    with pytest.raises(ValueError, match="even number"):
        cls(n_features=12 + 1, n_outputs=2, hidden=(8,), noise_input=True, n_conditioning=1,
            normalization="phase-l2")


def test_snr_log_uniform_draws():
    """``sampling="log-uniform"``: log(|M0|/sigma) is uniform on the log of the range (KS test)."""
    M0, _ = draw_m0_and_noise(np.random.default_rng(0), 20000, 3, (10, 1000), 0.01, noise=False,
                              sampling="log-uniform")
    u = (np.log(np.abs(M0) / 0.01) - np.log(10)) / np.log(100)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    Mt, _ = draw_m0_and_noise(torch.Generator().manual_seed(0), 20000, 3, (10, 1000), 0.01, noise=False,
                              sampling="log-uniform")
    ut = (np.log(Mt.abs().numpy() / 0.01) - np.log(10)) / np.log(100)
    assert stats.kstest(ut, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="snr_sampling"):
        draw_m0_and_noise(np.random.default_rng(0), 3, 3, (10, 100), 0.01, sampling="log")


def test_augmentation_gives_every_row_its_noise_level():
    Xd = {"X": np.ones((4, 6)), "w": np.ones((4, 2)), "c": np.ones((4, 2))}
    out = augment_batch(Xd, np.random.default_rng(0), (10, 100), 0.02, "crb", "log-uniform")
    np.testing.assert_array_equal(out["s"], np.full((4, 1), 0.02))


def test_fitted_net_predicts_with_the_noise_column(net, sim):
    X, sigma = _features(sim, 30, 100, 1)
    assert net.noise_input_ and net.n_features_in_ == X.shape[1] + 1
    Xs = np.hstack([X, np.full((30, 1), sigma)])
    p = net.predict(Xs)
    assert np.all(np.isfinite(p))
    # the SNR input matters: the same features told another noise level give other estimates
    assert not np.allclose(net.predict(np.hstack([X, np.full((30, 1), 30 * sigma)])), p)
    det = net.predict_details(X, sigma=sigma)
    np.testing.assert_allclose(det.prediction, p[:, :3] if p.ndim == 2 and p.shape[1] > 3 else p, rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="sigma: the network is noise-aware"):
        net.predict_details(X)
    with pytest.raises(ValueError, match="noise column"):
        net.predict(np.hstack([X, np.full((30, 1), -1.0)]))
    assert net.fitted_model().noise_input and net.fitted_model().typical_snr > 1


def test_noise_input_needs_augmentation(sim):
    X, y, crb = sim.make_dataset(50, 0)
    with pytest.raises(ValueError, match="noise_input=True trains with augmentation"):
        CRBNetRegressor(simulator=sim, noise_input=True, max_epochs=1).fit(X, y, crb=crb)


def test_save_load_keeps_the_noise_input(net, sim, tmp_path):
    X, sigma = _features(sim, 20, 50, 2)
    Xs = np.hstack([X, np.full((20, 1), sigma)])
    save_model(net, tmp_path / "m")
    m = load_model(tmp_path / "m", device="cpu")
    assert m.noise_input_ and m.n_features_in_ == net.n_features_in_
    np.testing.assert_array_equal(m.predict(Xs), net.predict(Xs))


def test_fit_maps_noise_map_and_scalar_sigma_agree(net, sim):
    ph = make_phantom((8, 8), sim.sequence_, basis=sim.basis_, snr=80, tied_R1=True, random_state=0)
    a = fit_maps(net, ph.coefficients, ph.mask, sigma=ph.sigma)
    b = fit_maps(net, ph.coefficients, ph.mask, sigma=np.full(ph.mask.shape, ph.sigma))
    assert (a.sigma_method, b.sigma_method) == ("given", "given_map") and b.sigma == pytest.approx(ph.sigma)
    np.testing.assert_array_equal(a.arrays["m0s"], b.arrays["m0s"])
    # a noise map twice as large in half the image: those voxels' standard errors double
    smap = np.full(ph.mask.shape, ph.sigma)
    smap[:4] *= 2
    c = fit_maps(net, ph.coefficients, ph.mask, sigma=smap)
    with pytest.raises(ValueError, match="spatial shape"):
        fit_maps(net, ph.coefficients, ph.mask, sigma=np.ones((3, 3)))
    with pytest.raises(ValueError, match="not positive and finite"):
        fit_maps(net, ph.coefficients, ph.mask, sigma=np.zeros(ph.mask.shape))
    assert np.isfinite(c.arrays["m0s_se"][4:][ph.mask[4:]]).all()


def test_first_pass_estimates_sigma_for_nlls_from_a_noise_aware_net(net, sim):
    """NLLS started from a noise-aware net needs sigma first: ``fit_maps`` estimates it from a first pass.

    NLLS converges to the least-squares optimum whatever its start, so the first pass (two rounds on the
    image, the network told a guessed sigma) must find the sigma that the plain residual estimate of NLLS
    from its default start finds on the same image.
    """
    ph = make_phantom((8, 8), sim.sequence_, basis=sim.basis_, snr=200, tied_R1=True, fields=False, uniform="WM",
                      random_state=3)
    kw = dict(tied_R1=True, fixed={"B1": 1.0, "omega0": 0.0}, max_iter=200, se_tol=0.0)
    nlls = NLLSFitter(sim.sequence_, basis=sim.basis_, init=net, **kw).fit()
    assert nlls.fitted_model().noise_input
    maps = fit_maps(nlls, ph.coefficients, ph.mask, compute_se=False)
    ref = fit_maps(NLLSFitter(sim.sequence_, basis=sim.basis_, **kw).fit(), ph.coefficients, ph.mask,
                   compute_se=False)
    assert (maps.sigma_method, ref.sigma_method) == ("noise_residuals_first_pass", "residuals")
    assert maps.sigma == pytest.approx(ref.sigma, rel=0.1)
    with pytest.raises(ValueError, match="sigma: init is a noise-aware network"):
        nlls.predict_details(np.ones((2, 12)))


@pytest.mark.slow
def test_noise_aware_spread_follows_the_snr(one_torch_thread):
    """A noise-aware net's relative spread changes with the SNR; an unconditioned net's cannot.

    The input normalisation removes ``|M0|``, so an unconditioned network applies one function at
    every SNR: over noise draws its spread scales as ``1/SNR`` (the linear regime), i.e. its spread
    in units of sqrt(CRB) is the same at SNR 40 and 400, and ``std(40) / std(400)`` is the SNR ratio,
    10. A network told the SNR can lean on the prior more where the data say less, as a posterior
    mean does: its ratio falls below 10. Two small nets, same draws and seed, differ only in
    ``noise_input``. The test fails if the noise column is ignored (both ratios near 10).
    """
    from sklearn_crb import Sequence
    from sklearn_crb.noise import apply_m0_and_noise

    sim = MTFingerprintSimulator(Sequence.default(n_pulses=240), n_components=6, tied_R1=True, snr=(3, 300),
                                 random_state=0, n_basis_samples=300).fit()
    nets = {ni: CRBNetRegressor(simulator=sim, noise_input=ni, snr_sampling="log-uniform", module__hidden=(32, 32),
                                max_epochs=30, random_state=0, device="cpu").fit_simulated(3000)
            for ni in (True, False)}
    _, _, _, det = sim.make_dataset(40, 7, return_details=True)
    cols = [list(sim.estimate_).index(p) for p in ("m0s", "R1f", "R2f")]
    rng, n_draws, std = np.random.default_rng(0), 50, {}
    for snr in (40, 400):
        Xr = np.repeat(det["X_clean"], n_draws, 0)
        r = Xr.shape[1] // 2
        M0 = snr * sim.sigma * np.exp(2j * np.pi * rng.uniform(size=len(Xr)))
        noise = sim.sigma * (rng.standard_normal((len(Xr), r)) + 1j * rng.standard_normal((len(Xr), r)))
        X = apply_m0_and_noise(Xr, M0, noise)
        for ni, net in nets.items():
            Xn = np.hstack([X, np.full((len(X), 1), sim.sigma)]) if ni else X
            std[ni, snr] = net.predict(Xn)[:, cols].reshape(40, n_draws, 3).std(1)
    ratio = {ni: np.median(std[ni, 40] / std[ni, 400], axis=0) for ni in nets}  # per parameter
    np.testing.assert_allclose(ratio[False], 10.0, rtol=0.08)  # one function at every SNR
    assert np.mean(1 - ratio[True] / 10.0) >= 0.08, ratio[True]  # the noise-aware net's gain follows the SNR


def test_cli_noise_map_sigma_and_no_noise_input(tmp_path):
    """``fit --noise-map`` (checked by name), ``--sigma`` or the map, and ``train --no-noise-input``."""
    import json

    import nibabel as nib
    from conftest import small_cli_model

    from sklearn_crb.cli import main

    ph, c = small_cli_model(tmp_path)
    assert load_model(tmp_path / "model", device="cpu").noise_input_  # the CLI's default network
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.concatenate([c.real, c.imag], -1).astype(np.float32), aff), tmp_path / "c.nii.gz")
    smap = np.full(c.shape[:-1], ph.sigma, dtype=np.float32)
    nib.save(nib.Nifti1Image(smap, aff), tmp_path / "noise.nii.gz")
    nib.save(nib.Nifti1Image(smap[:6], aff), tmp_path / "small.nii.gz")
    fit = ["fit", "--model", str(tmp_path / "model"), "--coefficients", str(tmp_path / "c.nii.gz"), "--quiet"]
    assert main([*fit, "--noise-map", str(tmp_path / "small.nii.gz"), "--out", str(tmp_path / "bad")]) == 2
    assert main([*fit, "--noise-map", str(tmp_path / "noise.nii.gz"), "--sigma", "0.1",
                 "--out", str(tmp_path / "both")]) == 2
    assert not (tmp_path / "bad" / "m0s.nii.gz").exists() and not (tmp_path / "both" / "m0s.nii.gz").exists()
    assert main([*fit, "--noise-map", str(tmp_path / "noise.nii.gz"), "--out", str(tmp_path / "map")]) == 0
    summary = json.loads((tmp_path / "map" / "summary.json").read_text())
    assert summary["sigma_method"] == "given_map" and summary["sigma"] == pytest.approx(ph.sigma, rel=1e-6)
    assert main(["train", "--data", str(tmp_path / "train.h5"), "--out", str(tmp_path / "plain"), "--epochs", "2",
                 "--hidden", "16", "--device", "cpu", "--no-noise-input", "--quiet"]) == 0
    plain = load_model(tmp_path / "plain", device="cpu")
    assert not plain.noise_input_ and plain.n_features_in_ == c.shape[-1] * 2
