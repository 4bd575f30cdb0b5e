"""A compression basis chosen for the CRB rather than for the signal energy.

The SVD basis of prior fingerprints keeps the most *energy*; what an estimator
can recover from the coefficients ``c = U^H s`` is set by their Fisher
information ``Re(J^H U U^H J)`` instead, with ``J`` the Jacobian of the signal
with respect to every unknown (estimated and nuisance parameters, complex M0).
Following Mao et al., "Cramér–Rao bound optimized subspace reconstruction in
quantitative MRI" (arXiv 2305.00326), :func:`crb_optimized_basis` finds the
rank-r orthonormal ``U`` that minimises the prior-averaged CRB inflation

    f(U) = mean_k mean_p log( CRB_p(U; theta_k) / CRB_p(full; theta_k) ),

over prior draws ``theta_k`` and estimated parameters ``p`` (nuisance
parameters and complex M0 marginalised), starting from the SVD basis.

``f`` depends on ``U`` only through its span (``f(U Q) = f(U)`` for a unitary
``Q``), so it is minimised on the Grassmann manifold: a Riemannian
Polak-Ribière conjugate gradient with Armijo backtracking and the polar
retraction. The Jacobians are computed once per draw; each step only projects
them (``U^H J``), and the Euclidean gradient comes from torch autograd in
float64.
"""

from __future__ import annotations

import numpy as np
import torch

from sklearn_crb._validation import chunk_slices
from sklearn_crb.crb import fisher_columns
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.signal import jacobian, simulate

__all__ = ["prepare_information", "crb_inflation_objective", "objective_and_gradient", "crb_optimized_basis",
           "fit_crb_basis"]

#: Draws whose full-signal Fisher matrix (unit diagonal) has a condition number above this are left out.
_MAX_COND = 1e12


def prepare_information(signal, J, *, estimate, nuisance="all", tied_R1=False, complex_M0=True):
    """Normalised Jacobian columns and the full-signal log-CRBs of prior draws.

    Each draw's columns are scaled to a unit-diagonal full-signal Fisher
    matrix; CRB ratios do not depend on this scaling, and it keeps the small
    matrices well conditioned.

    Parameters
    ----------
    signal : array_like, complex, shape (n_draws, n_pulses)
        Noise-free signals at M0 = 1.
    J : array_like, complex, shape (n_draws, n_pulses, 8)
        Their Jacobians (``sklearn_crb.physics.jacobian``).
    estimate, nuisance, tied_R1, complex_M0
        See :func:`sklearn_crb.crb.crb_from_jacobian`.

    Returns
    -------
    info : dict
        ``"columns"`` (torch complex128, (n_kept, n_pulses, n_unknowns)),
        ``"log_crb_full"`` (torch float64, (n_kept, n_estimated)),
        ``"n_estimated"``, ``"names"`` and ``"kept"`` (bool ndarray, (n_draws,):
        the draws whose full-signal Fisher matrix is invertible).
    """
    st = torch.as_tensor(np.asarray(signal) if not isinstance(signal, torch.Tensor) else signal)
    Jt = torch.as_tensor(np.asarray(J) if not isinstance(J, torch.Tensor) else J)
    st, Jt = st.to(torch.complex128), Jt.to(torch.complex128)
    if Jt.ndim != 3 or st.shape != Jt.shape[:2]:
        raise ValueError(f"signal (n, N) and J (n, N, 8) must match, got {tuple(st.shape)} and {tuple(Jt.shape)}")
    cols, names, n_est = fisher_columns(st, Jt, estimate=estimate, nuisance=nuisance, tied_R1=tied_R1,
                                        complex_M0=complex_M0)
    d = (cols.abs() ** 2).sum(dim=1)  # diag of the full Fisher matrix
    ok = torch.isfinite(d).all(-1) & (d > 0).all(-1)
    cols = cols / torch.where(ok[:, None], d, torch.ones_like(d)).sqrt()[:, None, :]
    F = (cols.conj().transpose(-1, -2) @ cols).real
    ev = torch.linalg.eigvalsh(torch.where(ok[:, None, None], F, torch.eye(F.shape[-1], dtype=F.dtype)))
    ok = ok & (ev[:, 0] > ev[:, -1] / _MAX_COND)
    if not bool(ok.any()):
        raise ValueError("no draw has an invertible full-signal Fisher matrix: the parameters "
                         f"{list(names)} are not jointly identifiable at any of them")
    cols = cols[ok].contiguous()
    return {"columns": cols, "log_crb_full": _log_diag_inverse(cols, n_est), "n_estimated": n_est,
            "names": names, "kept": ok.numpy()}


def _flat(columns):
    """The columns as one (n_pulses, n_draws * n_unknowns) matrix, for a single product ``U^H J``."""
    K, N, P = columns.shape
    return columns.permute(1, 0, 2).reshape(N, K * P).contiguous()


def _log_crb(U, columns, n_est, flat=None):
    """log CRB (n_draws, n_est) of the coefficients ``U^H s``; inf where their Fisher matrix is singular.

    ``diag(F^-1)`` from a QR factorisation of the real-stacked ``[Re; Im](U^H J)`` (column-scaled),
    whose error grows with ``cond(U^H J)`` rather than with ``cond(F) = cond(U^H J)**2``.
    """
    K, N, P = columns.shape
    flat = _flat(columns) if flat is None else flat
    A = (U.conj().T @ flat).reshape(U.shape[1], K, P).permute(1, 0, 2)
    return _log_diag_inverse(A, n_est)


def _log_diag_inverse(A, n_est):
    """log of the first ``n_est`` diagonal entries of ``Re(A^H A)^-1``, A (K, m, P) complex; inf if singular."""
    K, _, P = A.shape
    Ar = torch.cat([A.real, A.imag], dim=1)  # (K, 2m, P)
    if Ar.shape[1] < P:
        return torch.full((K, n_est), float("inf"), dtype=torch.float64)
    norm = torch.linalg.vector_norm(Ar, dim=1)  # (K, P)
    if not bool((norm > 0).all()):
        return torch.full((K, n_est), float("inf"), dtype=torch.float64)
    _, R = torch.linalg.qr(Ar / norm[:, None, :])
    dR = torch.diagonal(R, dim1=-2, dim2=-1).abs()
    if not bool((dR > 1e-14).all()):
        return torch.full((K, n_est), float("inf"), dtype=torch.float64)
    eye = torch.eye(P, dtype=R.dtype).expand(K, P, P)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    return ((Rinv[:, :n_est, :] ** 2).sum(-1)).log() - 2 * norm[:, :n_est].log()


def crb_inflation_objective(U, info, reduce="mean"):
    """Prior-averaged log CRB inflation of the estimated parameters for the basis ``U``.

    Parameters
    ----------
    U : torch.Tensor or array_like, complex, shape (n_pulses, rank)
        Orthonormal basis.
    info : dict
        From :func:`prepare_information`.
    reduce : {"mean", "none"}
        The mean over draws and parameters, or the per-draw log ratios.

    Returns
    -------
    torch.Tensor, float64
        ``mean log(CRB(U) / CRB(full))`` (>= 0 for an orthonormal ``U``), or
        the (n_draws, n_estimated) log ratios; inf where ``U^H J`` loses rank.
    """
    Ut = U if isinstance(U, torch.Tensor) else torch.from_numpy(np.asarray(U, dtype=np.complex128))
    logs = _log_crb(Ut.to(torch.complex128), info["columns"], info["n_estimated"], info.get("flat"))
    logs = logs - info["log_crb_full"]
    return logs.mean() if reduce == "mean" else logs


def objective_and_gradient(U, info):
    """``f(U)`` and its Euclidean gradient ``G`` (torch's convention: ``df = Re tr(G^H dU)``)."""
    Ut = U.detach().clone().requires_grad_(True)
    f = crb_inflation_objective(Ut, info)
    if not bool(torch.isfinite(f)):
        return float("inf"), None
    (G,) = torch.autograd.grad(f, Ut)
    return float(f.detach()), G


def _retract(Y):
    """Polar retraction: the orthonormal factor of ``Y``."""
    W, _, Vh = torch.linalg.svd(Y, full_matrices=False)
    return W @ Vh


def _horizontal(U, X):
    return X - U @ (U.conj().T @ X)


def _inner(X, Y):
    return float(torch.sum(X.conj() * Y).real)


def crb_optimized_basis(U0, info, max_iter=100, tol=1e-4, patience=5):
    """Minimise :func:`crb_inflation_objective` over rank-r bases, starting from ``U0``.

    Parameters
    ----------
    U0 : array_like, complex, shape (n_pulses, rank)
        Orthonormal starting basis (the SVD basis of prior fingerprints).
    info : dict
        From :func:`prepare_information`.
    max_iter : int
        Conjugate-gradient iterations.
    tol : float
        Stop when the objective decreased by less than ``tol`` (absolute, in
        mean log inflation: 1e-4 is 0.01 % of the geometric-mean inflation)
        in each of ``patience`` consecutive iterations.
    patience : int

    Returns
    -------
    U : ndarray, complex128, shape (n_pulses, rank)
        Orthonormal basis with ``f(U) <= f(U0)`` (monotone descent).
    history : ndarray, float64
        The objective at ``U0`` and after each iteration.
    """
    U = torch.from_numpy(np.ascontiguousarray(U0, dtype=np.complex128))
    info = dict(info, flat=_flat(info["columns"]))  # one layout copy, not one per evaluation
    f, G = objective_and_gradient(U, info)
    if G is None:
        raise ValueError("the starting basis loses the Fisher rank of the prior draws: U^H J is rank deficient; "
                         "use a larger rank or fewer unknowns")
    xi = _horizontal(U, G)
    d = -xi
    step = 0.1 / max(np.sqrt(_inner(d, d)), 1e-300)  # a first move of ~0.1 rad
    history, stalled = [f], 0
    for _ in range(int(max_iter)):
        slope = _inner(xi, d)
        if slope >= 0:  # not a descent direction: restart
            d, slope = -xi, -_inner(xi, xi)
        if slope == 0:
            break
        t = 2.0 * step
        while True:
            Un = _retract(U + t * d)
            fn = float(crb_inflation_objective(Un, info))
            if np.isfinite(fn) and fn <= f + 1e-4 * t * slope:
                break
            t *= 0.5
            if t * np.sqrt(_inner(d, d)) < 1e-10:
                return U.numpy(), np.asarray(history)
        step = t
        fn, Gn = objective_and_gradient(Un, info)
        xin = _horizontal(Un, Gn)
        xi_t, d_t = _horizontal(Un, xi), _horizontal(Un, d)  # transport by projection
        beta = max(0.0, _inner(xin, xin - xi_t) / max(_inner(xi, xi), 1e-300))
        stalled = stalled + 1 if f - fn < tol else 0
        U, f, xi, d = Un, fn, xin, -xin + beta * d_t
        history.append(f)
        if stalled >= patience:
            break
    return U.numpy(), np.asarray(history)


def fit_crb_basis(sequence, theta, U0, *, estimate, nuisance="all", tied_R1=False, max_iter=100, tol=1e-4,
                  m0s_floor=0.0, backend="auto", chunk_size=2048):
    """The CRB-optimised basis for prior draws ``theta``, started from ``U0``.

    Parameters
    ----------
    sequence : Sequence
    theta : ndarray, shape (n_draws, 8)
        Prior draws (with ``tied_R1``, already tied); at least ``rank`` of
        them (fewer are refused: the result would lose rank).
    U0 : ndarray, complex, shape (n_pulses, rank)
        Orthonormal start (the SVD basis).
    estimate, nuisance, tied_R1
        See :func:`sklearn_crb.crb.crb_from_jacobian`.
    max_iter, tol
        See :func:`crb_optimized_basis`.
    m0s_floor : float
        The Jacobians are taken at ``max(m0s, m0s_floor)`` (m0s = 0 is singular).
    backend : str
        Physics backend.
    chunk_size : int
        Draws simulated at once.

    Returns
    -------
    U : ndarray, complex128, shape (n_pulses, rank)
        Orthonormal; its columns are the principal directions of the draws'
        coefficients ``U^H s`` (most energy first), a rotation that leaves the
        objective unchanged.
    history : ndarray
        See :func:`crb_optimized_basis`.
    """
    th = np.array(theta, dtype=float)
    rank = np.shape(U0)[1]
    if th.ndim != 2 or th.shape[0] < rank:
        # the final rotation orders the columns by the draws' coefficient energy: fewer draws than columns
        # would silently return a basis of lower rank than asked for
        raise ValueError(f"theta: a rank-{rank} CRB basis needs at least {rank} prior draws, got "
                         f"{th.shape[0] if th.ndim == 2 else th.shape}; raise n_crb_samples (--n-crb-samples) "
                         f"to at least n_components (--rank) = {rank}")
    th[:, INDEX["m0s"]] = np.maximum(th[:, INDEX["m0s"]], m0s_floor)
    parts = []
    for sl in chunk_slices(th.shape[0], chunk_size):
        s, J = jacobian(sequence, th[sl], backend=backend)
        p = prepare_information(s, J, estimate=estimate, nuisance=nuisance, tied_R1=tied_R1)
        parts.append(p)
    info = dict(parts[0], columns=torch.cat([p["columns"] for p in parts]),
                log_crb_full=torch.cat([p["log_crb_full"] for p in parts]),
                kept=np.concatenate([p["kept"] for p in parts]))
    U, history = crb_optimized_basis(U0, info, max_iter=max_iter, tol=tol)
    c = simulate(sequence, np.asarray(theta, dtype=float), backend=backend) @ U.conj()
    _, _, Wh = np.linalg.svd(c, full_matrices=False)
    return np.ascontiguousarray(U @ Wh.T), history  # c @ Wh^H = A Sigma: energy-ordered coefficients
