"""Per-batch noise augmentation of ``CRBNetRegressor`` (Zhang et al., MRM 2022; Mao et al., arXiv 2312.11468).

Every training batch can re-draw ``M0`` and the noise of its noise-free
fingerprints; the CRB then scales by ``sigma^2 / |M0|^2``
(:func:`augment_batch`). The bias-reduced loss draws ``Nr`` noise
realisations per fingerprint (:func:`augment_realizations`). Both put the
noise level of every row under ``"s"`` (``(n, 1)``, all ``sigma``): the
input column of a noise-aware network (``CRBNetRegressor(noise_input=True)``).
"""

from __future__ import annotations

import numpy as np
import torch

from sklearn_crb.estimators.net.losses import CRB_LOSSES
from sklearn_crb.noise import apply_m0_and_noise, crb_gain, draw_m0_and_noise

__all__ = ["augment_batch", "augment_realizations"]


def augment_batch(Xd, rng, snr, sigma, loss, sampling="uniform"):
    """A fresh complex ``M0`` and noise for a packed batch of noise-free features.

    ``Xd`` is the dict packed by the regressor (``"X"``: features at
    ``M0 = 1``, ``"w"``: loss weights, ``"c"``: ``s^2/CRB_unit``), numpy or
    torch; ``rng`` a numpy or a torch generator (a torch generator draws on
    its own device, e.g. the training GPU). The M0/noise model is
    :func:`sklearn_crb.noise.draw_m0_and_noise`;
    ``"c"`` (and ``"w"`` for the losses of :data:`CRB_LOSSES`) are multiplied by
    ``|M0|^2 / sigma^2``, the inverse scaling of each sample's CRB; ``"s"`` is the noise level
    (``sampling``: the SNR distribution, :data:`sklearn_crb.noise.SNR_SAMPLINGS`).
    """
    x = Xd["X"]
    M0, noise = draw_m0_and_noise(rng, x.shape[0], x.shape[1] // 2, snr, sigma, sampling=sampling)
    gain = crb_gain(M0, sigma)
    if isinstance(x, torch.Tensor):
        gain = torch.as_tensor(gain, device=x.device).to(x.dtype)
    elif isinstance(gain, torch.Tensor):
        gain = gain.cpu().numpy().astype(x.dtype)
    else:
        gain = gain.astype(x.dtype)
    out = dict(Xd)
    out["X"] = apply_m0_and_noise(x, M0, noise)
    out["s"] = _noise_column(out["X"], sigma)
    if "c" in Xd:
        out["c"] = Xd["c"] * gain[:, None]
    if loss in CRB_LOSSES:
        out["w"] = Xd["w"] * gain[:, None]
    return out


def augment_realizations(Xd, rng, snr, sigma, n_realizations, sampling="uniform"):
    """``B`` packed noise-free fingerprints (torch) -> ``B * Nr`` rows, grouped by fingerprint.

    Each fingerprint gets one fresh complex ``M0`` (as :func:`augment_batch`) shared by its ``Nr``
    rows and fresh noise in every row: ``Nr`` noise realisations at its own SNR. ``"w"`` and ``"c"``
    (per fingerprint, ``(B, P)``) are rescaled by ``|M0|^2 / sigma^2``.
    """
    x, nr = Xd["X"], int(n_realizations)
    M0, _ = draw_m0_and_noise(rng, x.shape[0], x.shape[1] // 2, snr, sigma, noise=False, sampling=sampling)
    _, noise = draw_m0_and_noise(rng, x.shape[0] * nr, x.shape[1] // 2, snr, sigma)
    gain = torch.as_tensor(crb_gain(M0, sigma), device=x.device).to(x.dtype)[:, None]
    out = {k: v * gain for k, v in Xd.items() if k in ("w", "c")}
    out["X"] = apply_m0_and_noise(x.repeat_interleave(nr, 0), M0.repeat_interleave(nr, 0), noise)
    out["s"] = _noise_column(out["X"], sigma)
    if "k" in Xd:  # measured inputs (no M0, no noise), one copy per realisation
        out["k"] = Xd["k"].repeat_interleave(nr, 0)
    return out


def _noise_column(x, sigma):
    """``(n, 1)`` of ``sigma`` beside the features ``x`` (numpy or torch, their dtype and device)."""
    if isinstance(x, torch.Tensor):
        return torch.full((x.shape[0], 1), float(sigma), dtype=x.dtype, device=x.device)
    return np.full((x.shape[0], 1), float(sigma), dtype=x.dtype)
