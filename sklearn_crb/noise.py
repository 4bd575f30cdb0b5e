"""The one M0/noise model of the training data, and the packing of per-sample CRBs with their targets.

Every training sample is ``M0 * c(theta) + noise`` with a complex ``M0``
(``|M0| = sigma * U[snr]``, uniform phase) and complex white noise of standard
deviation ``sigma`` per real component on the compressed coefficients ``c``
(Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022). Its CRB is the unit CRB (``M0 = 1``,
``sigma = 1``) divided by ``|M0|^2 / sigma^2`` (:func:`crb_gain`).
``MTFingerprintSimulator.make_dataset`` and the per-batch augmentation of
``CRBNetRegressor`` both draw from here (:func:`draw_m0_and_noise`,
:func:`apply_m0_and_noise`). :func:`pack_targets` puts each sample's CRB next
to its targets so that cross-validation slices them together.

All names are re-exported by :mod:`sklearn_crb.simulator`.
"""

from __future__ import annotations

import numpy as np
import torch

from sklearn_crb._validation import check_snr_range

#: How ``|M0| / sigma`` is drawn over the SNR range: uniform (Zhang et al. 2022) or uniform in its logarithm
#: (every factor of the range equally often; the noise-aware network's default, ``recipes.make_network``).
SNR_SAMPLINGS = ("uniform", "log-uniform")

__all__ = ["SNR_SAMPLINGS", "draw_m0_and_noise", "apply_m0_and_noise", "crb_gain", "pack_targets", "unpack_targets",
           "check_sigma"]


def draw_m0_and_noise(rng, n_samples, rank, snr, sigma, noise=True, sampling="uniform"):
    """The M0/noise model of the training data (Zhang et al., MRM 2022).

    ``M0 = |M0| exp(i phi)`` with ``|M0| = sigma * U[snr]`` (``sampling="log-uniform"``:
    ``log |M0| / sigma`` uniform on the log of the range) and
    ``phi ~ U[0, 2 pi)``; complex white noise of standard deviation ``sigma``
    per real component on each of the ``rank`` coefficients.

    Parameters
    ----------
    rng : numpy.random.Generator or torch.Generator
        A torch generator draws torch tensors (float64 ``|M0|``-phase pairs as
        complex128) on the generator's device: the per-batch augmentation of
        ``CRBNetRegressor`` draws there without a host round trip.
    n_samples, rank : int
    snr : (float, float)
        Range of ``|M0| / sigma``.
    sigma : float
    noise : bool
        Draw the noise (False: ``noise`` is None and no numbers are drawn for it).
    sampling : {"uniform", "log-uniform"}
        The distribution of ``|M0| / sigma`` on the ``snr`` range (:data:`SNR_SAMPLINGS`).

    Returns
    -------
    M0 : ndarray or tensor, complex128, shape (n_samples,)
    noise : ndarray or tensor, complex128, shape (n_samples, rank), or None
    """
    lo, hi = check_snr_range(snr)
    sigma = check_sigma(sigma)
    if sampling not in SNR_SAMPLINGS:
        raise ValueError(f"snr_sampling must be one of {SNR_SAMPLINGS}, got {sampling!r}")
    log = sampling == "log-uniform"
    a, b = (np.log(lo), np.log(hi)) if log else (lo, hi)
    if isinstance(rng, torch.Generator):
        kw = dict(generator=rng, device=rng.device, dtype=torch.float64)
        u = a + (b - a) * torch.rand(n_samples, **kw)
        M0 = torch.polar(sigma * (torch.exp(u) if log else u), 2 * np.pi * torch.rand(n_samples, **kw))
        if not noise:
            return M0, None
        shape = (n_samples, int(rank))
        return M0, sigma * torch.complex(torch.randn(shape, **kw), torch.randn(shape, **kw))
    u = rng.uniform(a, b, n_samples)
    M0 = sigma * (np.exp(u) if log else u) * np.exp(2j * np.pi * rng.uniform(0, 1, n_samples))
    if not noise:
        return M0, None
    shape = (n_samples, int(rank))
    return M0, sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def apply_m0_and_noise(X_clean, M0, noise=None):
    """Features ``[Re c, Im c]`` of ``M0 * c + noise`` for clean features of ``c``.

    Works on numpy arrays and on torch tensors (then ``M0`` and ``noise`` are
    moved to the tensor's dtype and device), so that the simulator and the
    network's per-batch augmentation share one model.
    """
    r = X_clean.shape[1] // 2
    real, imag = (torch.real, torch.imag) if isinstance(M0, torch.Tensor) else (np.real, np.imag)
    a, b = real(M0), imag(M0)
    nr = ni = None
    if noise is not None:
        nr, ni = real(noise), imag(noise)
    if isinstance(X_clean, torch.Tensor):
        kw = dict(dtype=X_clean.dtype, device=X_clean.device)
        a, b = torch.as_tensor(a, **kw), torch.as_tensor(b, **kw)
        if noise is not None:
            nr, ni = torch.as_tensor(nr, **kw), torch.as_tensor(ni, **kw)
        cat = torch.cat
    else:
        if isinstance(a, torch.Tensor):
            a, b = a.cpu().numpy(), b.cpu().numpy()
            if noise is not None:
                nr, ni = nr.cpu().numpy(), ni.cpu().numpy()
        a, b = a.astype(X_clean.dtype, copy=False), b.astype(X_clean.dtype, copy=False)
        cat = np.concatenate
    re, im = X_clean[:, :r], X_clean[:, r:]
    out_re = a[:, None] * re - b[:, None] * im
    out_im = a[:, None] * im + b[:, None] * re
    if noise is not None:
        out_re, out_im = out_re + nr, out_im + ni
    return cat([out_re, out_im], 1)


def crb_gain(M0, sigma):
    """``|M0|^2 / sigma^2``: the CRB at ``(M0, sigma)`` is the unit CRB divided by it (numpy or torch)."""
    if isinstance(M0, torch.Tensor):
        return M0.abs() ** 2 / float(sigma) ** 2
    return np.abs(M0) ** 2 / float(sigma) ** 2


def pack_targets(y, crb):
    """Pack targets and their per-sample CRBs into one array (n, 2, n_outputs).

    ``packed[:, 0]`` are the targets, ``packed[:, 1]`` the CRBs. Cross-validation
    slices the packed array by samples, so the CRB of every test sample
    reaches ``CRBNetRegressor.fit``/``score`` and ``make_crb_scorer`` without
    metadata routing.
    """
    yt = np.asarray(y, dtype=np.float64)
    c = np.asarray(crb, dtype=np.float64)
    yt = yt[:, None] if yt.ndim == 1 else yt
    c = c[:, None] if c.ndim == 1 else c
    if yt.ndim != 2 or c.shape != yt.shape:
        raise ValueError(f"crb must have the shape of y {yt.shape}, got {c.shape}")
    return np.stack([yt, c], axis=1)


def unpack_targets(y):
    """``(y, crb)`` of an array made by :func:`pack_targets`; ``(y, None)`` for other arrays."""
    if isinstance(y, np.ndarray) and y.ndim == 3 and y.shape[1] == 2:
        return y[:, 0], y[:, 1]
    return y, None


def check_sigma(sigma, argname="sigma"):
    """``float(sigma)``, refusing a non-number (TypeError) or a non-positive, non-finite value (ValueError)."""
    try:
        sig = float(sigma)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a positive finite float, got {sigma!r}") from None
    if not (np.isfinite(sig) and sig > 0):
        raise ValueError(f"{argname} must be positive and finite, got {sigma!r}")
    return sig
