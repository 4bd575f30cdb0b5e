"""Fisher information and Cramér–Rao bounds of MT fingerprints.

For complex data ``d = M0 * s(theta) + n`` with white Gaussian noise of
variance ``sigma**2`` per real component, the Fisher information is
``F = Re(J^H J) / sigma**2`` (Zhang et al., MRM 2022, Eq. 3),
with ``J`` the Jacobian of the (optionally compressed, ``U^H s``) signal with
respect to every unknown: the estimated parameters, the nuisance parameters
(kept as columns, i.e. marginalised) and the complex ``M0`` (columns ``s`` and
``i s``). The CRB of parameter p is ``(F^-1)_pp``; it scales as
``sigma**2 / |M0|**2``, so it is computed at ``M0 = 1, sigma = 1`` and rescaled.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sklearn_crb._validation import check_basis
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, nuisance_parameters, resolve_estimate, tie_R1
from sklearn_crb.physics.signal import jacobian

__all__ = ["fisher_information", "fisher_columns", "crb_from_jacobian", "cramer_rao_bound", "project",
           "linearized_bayes_spread", "IllConditionedFisherWarning"]


class IllConditionedFisherWarning(UserWarning):
    """Some samples have a (numerically) singular Fisher information matrix."""


def _as_tensor(x, argname, complex_ok=True):
    if isinstance(x, torch.Tensor):
        return x
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001
        raise TypeError(f"{argname} must be an array, got {type(x).__name__}") from None
    if not (np.issubdtype(arr.dtype, np.number)):
        raise TypeError(f"{argname} must be numeric, got dtype {arr.dtype}")
    return torch.from_numpy(np.array(arr, dtype=np.complex128 if np.iscomplexobj(arr) else np.float64))


def project(basis, x):
    """``U^H x`` along the pulse axis (axis 1) of ``x`` (n, N) or (n, N, P).

    The one home of the compression ``U^H s`` (of signals and of Jacobians).

    Parameters
    ----------
    basis : torch.Tensor, complex, shape (n_pulses, rank)
        Orthonormal basis U (see :func:`sklearn_crb._validation.check_basis`).
    x : torch.Tensor, shape (n, n_pulses) or (n, n_pulses, n_params)

    Returns
    -------
    torch.Tensor, complex128, shape (n, rank) or (n, rank, n_params)
    """
    U = basis.to(device=x.device, dtype=torch.complex128)
    xc = x.to(torch.complex128)
    if xc.ndim == 2:
        return xc @ U.conj()
    return torch.einsum("ntp,tr->nrp", xc, U.conj())


def _check_finite(x, argname):
    """ValueError naming the samples of ``x`` (n, ...) that hold NaN or inf."""
    flat = torch.view_as_real(x).reshape(x.shape[0], -1) if torch.is_complex(x) else x.reshape(x.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).ravel().tolist()
        raise ValueError(f"{argname} contains non-finite values in {len(idx)} sample(s), e.g. {idx[:5]}")


def _check_basis(basis, n_pulses, device):
    """Orthonormal basis as a complex128 tensor on ``device`` (checked as the simulator does)."""
    if isinstance(basis, torch.Tensor):
        basis = basis.detach().cpu().numpy()
    return torch.from_numpy(check_basis(basis, n_pulses)).to(device)


def _noise_scale(sigma, M0, n, device):
    """``sigma**2 / |M0|**2`` (scalar or (n,)), after checking both."""
    sig = _as_tensor(sigma, "sigma").to(device)
    m0 = _as_tensor(M0, "M0").to(device)
    if torch.is_complex(sig):
        raise TypeError("sigma must be real")
    for name, x in (("sigma", sig), ("M0", m0)):
        if x.ndim > 1 or (x.ndim == 1 and x.shape[0] != n):
            raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(x.shape)}")
        if not bool(torch.isfinite(torch.view_as_real(x) if torch.is_complex(x) else x).all()):
            raise ValueError(f"{name} must be finite")
    sig = sig.to(torch.float64)
    if bool((sig <= 0).any()):
        raise ValueError(f"sigma must be positive, got min(sigma) = {float(sig.min()):g}")
    a = m0.abs().to(torch.float64)
    if bool((a == 0).any()):
        raise ValueError("M0 must be non-zero")
    scale = (sig / a) ** 2
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        raise ValueError(
            "sigma/|M0| is so extreme that sigma**2/|M0|**2 over- or underflows float64 "
            f"(sigma in [{float(sig.min()):g}, {float(sig.max()):g}], |M0| in [{float(a.min()):g}, "
            f"{float(a.max()):g}]); rescale the data")
    return scale


def fisher_information(J, sigma=1.0, basis=None):
    """Fisher information ``Re(J^H J) / sigma**2``.

    Parameters
    ----------
    J : array_like, complex, shape (n_samples, n_pulses, n_params)
        Jacobian of the noise-free signal.
    sigma : float
        Noise standard deviation per real component.
    basis : array_like, complex, shape (n_pulses, rank), optional
        Orthonormal compression basis U; the data are then ``U^H s``.

    Returns
    -------
    F : torch.Tensor, float64, shape (n_samples, n_params, n_params)
    """
    Jt = _as_tensor(J, "J").to(torch.complex128)
    if Jt.ndim != 3:
        raise ValueError(f"J must have shape (n_samples, n_pulses, n_params), got {tuple(Jt.shape)}")
    _check_finite(Jt, "J")
    scale = _noise_scale(sigma, 1.0, Jt.shape[0], Jt.device)
    if basis is not None:
        Jt = project(_check_basis(basis, Jt.shape[1], Jt.device), Jt)
    F = (Jt.conj().transpose(-1, -2) @ Jt).real
    F = F / (scale[:, None, None] if scale.ndim == 1 else scale)
    if not bool(torch.isfinite(F).all()):
        raise ValueError("the Fisher information over- or underflows float64 for this J and sigma; rescale them")
    return F


def _scaled_inverse_diag(F, rcond):
    """diag(F^-1) via D F D (unit diagonal), with a per-sample condition number."""
    d = torch.diagonal(F, dim1=-2, dim2=-1)
    zero = ~(d > 0)
    D = torch.where(zero, torch.ones_like(d), d).rsqrt()
    Fs = D[..., :, None] * F * D[..., None, :]
    ev = torch.linalg.eigvalsh(Fs)
    cond = ev[..., -1] / ev[..., 0].clamp_min(1e-300)
    singular = zero.any(-1) | (ev[..., 0] <= ev[..., -1] * rcond) | ~torch.isfinite(cond)
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    Fs_safe = torch.where(singular[..., None, None], eye, Fs)
    inv = torch.linalg.inv(Fs_safe)
    diag = torch.diagonal(inv, dim1=-2, dim2=-1) * D * D
    cond = torch.where(singular, torch.full_like(cond, float("inf")), cond)
    return diag, cond, singular


def _columns(estimate, nuisance, tied_R1):
    """Free parameter names (estimated first, canonical order) and their J columns."""
    est = resolve_estimate(estimate, tied_R1, times=False)  # the CRB is of rates; callers use crb_to_targets
    return est, nuisance_parameters(nuisance, est, tied_R1)  # None or empty: every other parameter is known


def fisher_columns(signal, J, *, estimate=PARAMETERS, nuisance="all", tied_R1=False, complex_M0=True):
    """The unknowns' Jacobian columns: estimated parameters, nuisance parameters, then M0.

    Parameters
    ----------
    signal : torch.Tensor, complex128, shape (n_samples, n_pulses)
        Noise-free signal at M0 = 1 (the M0 columns ``s`` and ``i s``).
    J : torch.Tensor, complex128, shape (n_samples, n_pulses, 8)
        ``d signal / d theta`` in ``PARAMETERS`` order.
    estimate, nuisance, tied_R1, complex_M0
        See :func:`crb_from_jacobian`.

    Returns
    -------
    columns : torch.Tensor, complex128, shape (n_samples, n_pulses, n_unknowns)
    names : tuple of str
        The unknowns, the estimated rates first (``"reM0"``, ``"imM0"`` last).
    n_estimated : int
    """
    est, nuis = _columns(estimate, nuisance, tied_R1)
    cols, names = [], []
    for p in est + nuis:
        c = J[..., INDEX[p]]
        if tied_R1 and p == "R1f":
            c = c + J[..., INDEX["R1s"]]
        cols.append(c)
        names.append(p)
    cols.append(signal)
    names.append("reM0")
    if complex_M0:
        cols.append(1j * signal)
        names.append("imM0")
    return torch.stack(cols, dim=-1), tuple(names), len(est)


def crb_from_jacobian(signal, J, *, estimate=PARAMETERS, nuisance="all", tied_R1=False, M0=1.0,
                      sigma=1.0, basis=None, complex_M0=True, on_singular="raise", rcond=1e-14,
                      return_info=False):
    """CRB of ``estimate`` from a signal and its Jacobian computed at ``M0 = 1``.

    Parameters
    ----------
    signal : array_like, complex, shape (n_samples, n_pulses)
        Noise-free signal at M0 = 1 (gives the M0 columns ``s`` and ``i s``).
    J : array_like, complex, shape (n_samples, n_pulses, 8)
        ``d signal / d theta`` in ``PARAMETERS`` order (from ``physics.jacobian``).
    estimate : sequence of str
        Parameters whose CRB is returned.
    nuisance : "all", None or sequence of str
        Other unknowns, kept as Fisher columns (marginalised). ``"all"``: every
        remaining parameter; ``None``: all other parameters are known.
    tied_R1 : bool
        R1s = R1f is one unknown ("R1f" then names the tied R1).
    M0 : complex or array_like (n_samples,)
        True proton density; the CRB scales as ``1/|M0|**2``.
    sigma : float or array_like (n_samples,)
        Noise standard deviation per real component.
    basis : array_like (n_pulses, rank), optional
        Orthonormal compression basis: the CRB of the coefficients ``U^H s``.
    complex_M0 : bool
        Complex M0 (2 nuisance columns, default) or a real M0 (1 column).
    on_singular : {"raise", "inf"}
        Singular/ill-conditioned samples raise ``ValueError`` naming them, or
        get ``inf`` CRBs with an ``IllConditionedFisherWarning``.
    rcond : float
        A sample is singular if the smallest eigenvalue of the unit-diagonal
        Fisher matrix is below ``rcond`` times the largest.
    return_info : bool
        Also return ``{"condition_number", "singular", "columns"}``.

    Returns
    -------
    crb : torch.Tensor or ndarray, float64, shape (n_samples, len(estimate))
        Variance bounds in squared SI units (numpy unless J is a tensor).
    """
    if on_singular not in ("raise", "inf"):
        raise ValueError(f"on_singular must be 'raise' or 'inf', got {on_singular!r}")
    is_torch = isinstance(J, torch.Tensor)
    Jt = _as_tensor(J, "J").to(torch.complex128)
    st = _as_tensor(signal, "signal").to(torch.complex128).to(Jt.device)
    if Jt.ndim != 3 or Jt.shape[-1] != len(PARAMETERS):
        raise ValueError(f"J must have shape (n_samples, n_pulses, {len(PARAMETERS)}), got {tuple(Jt.shape)}")
    if st.shape != Jt.shape[:2]:
        raise ValueError(f"signal must have shape {tuple(Jt.shape[:2])}, got {tuple(st.shape)}")
    _check_finite(Jt, "J")
    _check_finite(st, "signal")
    n = Jt.shape[0]
    scale = _noise_scale(sigma, M0, n, Jt.device)
    Jf, names, n_est = fisher_columns(st, Jt, estimate=estimate, nuisance=nuisance, tied_R1=tied_R1,
                                      complex_M0=complex_M0)
    est, names = names[:n_est], list(names)
    F = fisher_information(Jf, 1.0, basis)
    diag, cond, singular = _scaled_inverse_diag(F, rcond)
    crb = diag[:, : len(est)] * (scale[:, None] if scale.ndim == 1 else scale)
    ok = singular[:, None] | (torch.isfinite(crb) & (crb > 0))
    if not bool(ok.all()):
        idx = torch.nonzero(~ok.all(dim=1)).ravel().tolist()
        raise ValueError(
            f"the CRB over- or underflows float64 for {len(idx)} sample(s), e.g. {idx[:5]}: "
            "sigma/|M0| is too extreme for this Fisher information; rescale sigma and M0")
    if singular.any():
        idx = torch.nonzero(singular).ravel().tolist()
        msg = (f"Fisher information is singular or ill-conditioned (rcond={rcond:g}) for {len(idx)} of {n} "
               f"samples, e.g. sample(s) {idx[:5]}: the parameters {names} are not jointly identifiable there")
        if on_singular == "raise":
            raise ValueError(msg + "; pass on_singular='inf' to get inf CRBs instead")
        warnings.warn(msg, IllConditionedFisherWarning, stacklevel=2)
        crb = torch.where(singular[:, None], torch.full_like(crb, float("inf")), crb)
    out = crb if is_torch else crb.cpu().numpy()
    if return_info:
        info = {"condition_number": cond if is_torch else cond.cpu().numpy(),
                "singular": singular if is_torch else singular.cpu().numpy(),
                "columns": tuple(names)}
        return out, info
    return out


def cramer_rao_bound(sequence, theta, *, estimate=PARAMETERS, nuisance="all", tied_R1=False, M0=1.0,
                     sigma=1.0, basis=None, complex_M0=True, on_singular="raise", return_info=False,
                     backend="auto"):
    """Cramér–Rao bounds of MT parameters for a sequence (and compression basis).

    Parameters
    ----------
    sequence : Sequence or None
    theta : array_like, shape (n_samples, 8)
        True parameters (``PARAMETERS`` order, SI units). With ``tied_R1``
        the R1s column is ignored and set to R1f.
    estimate, nuisance, tied_R1, M0, sigma, basis, complex_M0, on_singular, return_info
        See :func:`crb_from_jacobian`.
    backend : str
        Physics backend, see :func:`sklearn_crb.physics.jacobian`.

    Returns
    -------
    crb : ndarray or torch.Tensor, shape (n_samples, len(estimate))
        Lower bounds on the variance of unbiased estimators, in squared SI
        units of each parameter.

    Examples
    --------
    >>> from sklearn_crb import Sequence
    >>> from sklearn_crb.crb import cramer_rao_bound
    >>> theta = [[0.15, 0.5, 15, 30, 3, 10e-6, 0, 1]]
    >>> crb = cramer_rao_bound(Sequence.default(), theta, estimate=("m0s", "R1f"), sigma=0.01)
    """
    if tied_R1:
        theta = tie_R1(theta if isinstance(theta, torch.Tensor) else np.asarray(theta, dtype=float))
    s, J = jacobian(sequence, theta, backend=backend)
    return crb_from_jacobian(s, J, estimate=estimate, nuisance=nuisance, tied_R1=tied_R1, M0=M0, sigma=sigma,
                             basis=basis, complex_M0=complex_M0, on_singular=on_singular, return_info=return_info)


def linearized_bayes_spread(signal, J, prior_variance, *, estimate, tied_R1=False, M0=1.0, sigma=1.0, basis=None):
    """How far a Bayes estimator that uses a Gaussian prior spreads over noise draws, in units of sqrt(CRB).

    At fixed ``theta`` and to first order in the noise, the posterior mean
    under a Gaussian prior of variances ``prior_variance`` on the ``estimate``
    parameters (every other parameter known, complex M0 flat) is
    ``(F + L)^-1 (F theta_ML + L mu)``, with ``L = diag(1 / prior_variance)``.
    Its covariance over noise draws is ``(F + L)^-1 F (F + L)^-1``. The
    function returns ``sqrt`` of that diagonal over the CRB ``diag F^-1``.
    It is the shrinkage that leaning on such a prior implies.
    An estimator trained on prior draws with a squared-error loss (the CRB
    loss included) approaches the posterior mean. Its spread below
    ``sqrt(CRB)`` is then expected wherever the prior of a correlated
    parameter still informs the fit, even when ``CRB_p`` is small against the
    prior variance of ``p`` itself. The prior is only matched in variance,
    so the value is a reference, not a bound: on v3.2 at SNR 100 the exact
    posterior mean under the uniform ``brain`` prior spreads more for R1f and
    R2f (``benchmarks/bench_posterior_mean.py``).

    Parameters
    ----------
    signal, J : array_like
        As for :func:`crb_from_jacobian` (at M0 = 1).
    prior_variance : array_like (len(estimate),)
        In squared SI units, in the order of ``estimate``'s canonical order.
    estimate : sequence of str
        The unknown rates (all of them get the prior).
    tied_R1, M0, sigma, basis
        As for :func:`crb_from_jacobian`.

    Returns
    -------
    ratio : ndarray (n_samples, len(estimate)), in (0, 1]
    """
    Jt = _as_tensor(J, "J").to(torch.complex128)
    st = _as_tensor(signal, "signal").to(torch.complex128).to(Jt.device)
    Jf, names, n_est = fisher_columns(st, Jt, estimate=estimate, nuisance=None, tied_R1=tied_R1)
    F = fisher_information(Jf, 1.0, basis) / _noise_scale(sigma, M0, Jt.shape[0], Jt.device).reshape(-1, 1, 1)
    pv = torch.as_tensor(np.asarray(prior_variance, dtype=np.float64), device=F.device)
    if pv.shape != (n_est,) or not bool(torch.all(torch.isfinite(pv) & (pv > 0))):
        raise ValueError(f"prior_variance must hold {n_est} positive finite values (one per estimated parameter), "
                         f"got {np.asarray(prior_variance)!r:.80}")
    lam = torch.cat([1.0 / pv, torch.zeros(F.shape[-1] - n_est, dtype=F.dtype, device=F.device)])
    d = 1.0 / torch.sqrt(torch.diagonal(F, dim1=-2, dim2=-1) + lam)  # unit-diagonal scaling for the inverses
    Fn = F * d[:, :, None] * d[:, None, :]
    A = torch.linalg.inv(Fn + torch.diag_embed(lam * d**2))
    spread = torch.diagonal(A @ Fn @ A, dim1=-2, dim2=-1)[:, :n_est]
    crb = torch.diagonal(torch.linalg.inv(Fn), dim1=-2, dim2=-1)[:, :n_est]
    return torch.sqrt(spread / crb).cpu().numpy()
