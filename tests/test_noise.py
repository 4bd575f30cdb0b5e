"""The one M0/noise model (sklearn_crb.noise), on both of its paths: numpy
generators (make_dataset) and seeded torch generators (the per-batch
augmentation during training)."""

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from sklearn_crb.estimators.net.augmentation import augment_batch
from sklearn_crb.noise import crb_gain, draw_m0_and_noise


def _rng(kind, seed):
    return np.random.default_rng(seed) if kind == "numpy" else torch.Generator().manual_seed(seed)


def _np(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_m0_has_uniform_phase_and_modulus_in_the_snr_range(kind):
    sigma, snr = 0.02, (10.0, 300.0)
    M0, noise = draw_m0_and_noise(_rng(kind, 1), 20000, 5, snr, sigma)
    M0, noise = _np(M0), _np(noise)
    phase = np.mod(np.angle(M0), 2 * np.pi) / (2 * np.pi)
    assert kstest(phase, "uniform").pvalue > 1e-3  # a phase forced to 0 (or any constant) fails
    amp = (np.abs(M0) / sigma - snr[0]) / (snr[1] - snr[0])
    assert amp.min() >= 0 and amp.max() <= 1 and kstest(amp, "uniform").pvalue > 1e-3
    # complex white noise, sigma per real component, independent real and imaginary parts
    assert np.std(noise.real) == pytest.approx(sigma, rel=0.02)
    assert np.std(noise.imag) == pytest.approx(sigma, rel=0.02)
    assert abs(np.corrcoef(noise.real.ravel(), noise.imag.ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_crb_gain_is_exactly_abs_m0_squared_over_sigma_squared(kind):
    M0 = np.array([0.5 + 0.5j, -2.0, 3j, 1e-3])
    sigma = 0.01
    m = torch.as_tensor(M0) if kind == "torch" else M0
    np.testing.assert_allclose(_np(crb_gain(m, sigma)), np.abs(M0) ** 2 / sigma**2, rtol=1e-14)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_augmented_batch_weights_scale_with_the_drawn_m0(kind):
    """Every augmented sample's loss weight (1/CRB) is its unit weight times |M0|^2/sigma^2 of ITS draw,
    and its features are M0 * c + noise, with the phase of that draw."""
    rng = np.random.default_rng(0)
    n, r, sigma, snr = 4000, 4, 0.01, (20.0, 200.0)
    c = rng.standard_normal((n, r)) + 1j * rng.standard_normal((n, r))
    w = rng.uniform(1, 2, (n, 2))
    Xd = {"X": np.hstack([c.real, c.imag]), "w": w, "c": 3 * w}
    if kind == "torch":
        Xd = {k: torch.as_tensor(v) for k, v in Xd.items()}
    out = augment_batch(Xd, _rng(kind, 5), snr, sigma, "crb")
    M0, _ = draw_m0_and_noise(_rng(kind, 5), n, r, snr, sigma)  # the same draw
    M0 = _np(M0)
    gain = np.abs(M0) ** 2 / sigma**2
    np.testing.assert_allclose(_np(out["w"]), w * gain[:, None], rtol=1e-12)
    np.testing.assert_allclose(_np(out["c"]), 3 * w * gain[:, None], rtol=1e-12)
    Xo = _np(out["X"])
    co = Xo[:, :r] + 1j * Xo[:, r:]
    M0_hat = np.sum(c.conj() * co, 1) / np.sum(np.abs(c) ** 2, 1)
    np.testing.assert_allclose(M0_hat, M0, atol=6 * sigma)
    assert kstest(np.mod(np.angle(M0_hat), 2 * np.pi) / (2 * np.pi), "uniform").pvalue > 1e-3
