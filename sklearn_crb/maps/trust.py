"""The trust map: per voxel, do the data contradict the estimate?

An estimator answers in every voxel, also where its model does not hold
(partial volume with CSF, artefacts, tissue outside a network's prior). Two
statistics test, at the noise level ``sigma`` (std per real coefficient
component), whether a voxel's data ``c`` (complex, rank ``r``) are explained
by the estimate ``theta_hat`` with its least-squares complex scale ``M0``,
``u = U^H s(theta_hat)`` and residual ``rho = c - M0 u`` (a real
``2r``-vector):

**Misfit chi-squared.** At the least-squares optimum of a model that holds,
``||rho||^2 / sigma^2`` is chi-squared with ``dof = 2r - n_free`` degrees of
freedom (``n_free`` real unknowns: the free parameters and complex M0; to
first order, the residual is the noise projected off the ``n_free``-dimensional
tangent space). Away from the optimum (a network, a dictionary atom) the
residual also holds the estimate's offset ``A delta`` along the tangent
columns ``A = [M0 U^H ds/dtheta_j, u, i u]`` (real-stacked), so two versions:

* ``"residual"`` (no Jacobian): the raw ``||rho||^2`` against ``dof``. Exact
  for NLLS; for a network it is ``||P_perp rho||^2 + ||P rho||^2``, the
  second term the Fisher-norm length of the step to the optimum (about
  ``chi2(n_free)`` for a network that does not follow the noise, more for a
  biased one), so it flags networks more often than ``alpha``;
* ``"tangent"`` (one physics Jacobian per voxel): the residual projected off
  the tangent space, ``||(I - Q Q^T) rho||^2`` (``Q`` an orthonormal basis of
  ``A``), chi-squared with ``dof`` degrees of freedom at and off the optimum
  (to first order), so the false-flag rate is ``alpha`` for every estimator.

A voxel is flagged when the p-value ``P(chi2_dof > ||rho||^2 / sigma^2)`` is
below ``alpha``.

**Gauss–Newton step in standard errors** (``"tangent"`` only). One
Gauss–Newton step from the estimate, ``delta = (A^T A)^{-1} A^T rho``, gives
per estimated parameter ``p`` how far the data want the estimate to move, in
standard errors ``se_p = sigma sqrt((A^T A)^{-1}_pp)`` (the Cramér–Rao bound
at the estimate with every other free parameter and complex M0 as nuisance;
Zhang et al., MRM 2022, Eq. 3):

    step = max_p |delta_p| / se_p

It is about 0 for NLLS (the gradient vanishes at its optimum) and of order 1
for a network as efficient as the bound; a voxel is flagged where it exceeds
``max_step``. It sees what the chi-squared cannot: a network estimate that
the model explains only after a large move, e.g. tissue outside the prior,
where the network extrapolates but the model still holds.

What neither can see: an estimate off by less than about ``max_step``
standard errors (a network's bias inside the noise), and a model error that
lies in the tangent space (a misfit that another parameter value explains
equally well: such data look like good data of another tissue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from sklearn_crb._validation import chunk_slices
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, free_parameters, rate_name, tie_R1
from sklearn_crb.physics.signal import jacobian

__all__ = ["TRUST_METHODS", "ALPHA", "MAX_STEP", "Trust", "tangent_parameters", "tangent_statistics",
           "misfit_pvalue", "trust_statistics"]

#: ``fit_maps(trust=)`` choices: the raw residual (no Jacobian) or the tangent tests (one Jacobian per voxel).
TRUST_METHODS = ("residual", "tangent")
#: Chi-squared p-value below which a voxel is flagged "untrusted" (1 % false flags where the model holds).
ALPHA = 0.01
#: Gauss–Newton step (in standard errors of the estimated parameter) above which a voxel is flagged.
MAX_STEP = 3.0

_LO = np.array([BOUNDS[p][0] for p in PARAMETERS])
_HI = np.array([BOUNDS[p][1] for p in PARAMETERS])
# strictly inside, as networks' predict_details evaluates its model (m0s = 0 leaves the pool unidentifiable)
_EPS = np.array([1e-4, 0, 0, 1e-3, 0, 0, 0, 0])


@dataclass(frozen=True, eq=False)
class Trust:
    """The trust statistics of the fitted voxels (NaN where the estimator failed).

    Attributes
    ----------
    chi2 : ndarray (n,)
        ``||rho||^2 / sigma^2 / dof``, the reduced chi-squared (1 where the data agree).
    p_value : ndarray (n,)
        ``P(chi2_dof > ||rho||^2 / sigma^2)``.
    step : ndarray (n,) or None
        The Gauss–Newton step in standard errors, largest over the estimated parameters (``"tangent"``).
    untrusted : ndarray of bool (n,)
        ``p_value < alpha`` or ``step > max_step``.
    dof : int
        ``2r - n_free``.
    method, alpha, max_step
        The test's settings.
    """

    chi2: np.ndarray
    p_value: np.ndarray
    step: np.ndarray | None
    untrusted: np.ndarray
    dof: int
    method: str
    alpha: float
    max_step: float

    def summary(self):
        """The settings and the flagged count, JSON-ready."""
        return {"method": self.method, "alpha": self.alpha, "max_step": self.max_step if self.step is not None
                else None, "dof": self.dof, "n_untrusted": int(self.untrusted.sum())}


def tangent_parameters(estimate, n_free, *, tied_R1=False, fixed_names=(), free=None):
    """The free parameters of an estimator's fit, its estimates first (the tangent space's columns).

    ``free`` where the estimator reports them (NLLS's ``free_parameters``);
    else the estimated rates and every other free parameter of the model
    that is not fixed (the nuisance parameters that networks and dictionaries
    fit by default). Returns None when that does not give ``n_free - 2``
    parameters (the estimator holds some nuisance parameters at constants it
    does not report).
    """
    est = tuple(rate_name(p) for p in estimate)
    if free is None:
        known = set(est) | {rate_name(p) for p in fixed_names}
        free = est + tuple(p for p in free_parameters(tied_R1) if p not in known)
    else:
        free = est + tuple(p for p in free if p not in est)
    return free if len(free) + 2 == int(n_free) and set(est) <= set(free) else None


def misfit_pvalue(res_sq, sigma, dof):
    """``(chi2 / dof, p-value)`` of squared residual norms (data units) at noise level ``sigma``."""
    x = np.asarray(res_sq, dtype=float) / np.asarray(sigma, dtype=float) ** 2
    with np.errstate(invalid="ignore"):
        return x / dof, chi2.sf(x, dof)


def tangent_statistics(c, M0, u, Ju, free, tied_R1, n_est):
    """The residual off the tangent space and the Gauss–Newton step, per voxel (batched).

    Parameters
    ----------
    c, u : ndarray, complex (n, r)
        Coefficients and the compressed fingerprint ``U^H s(theta_hat)``.
    M0 : ndarray, complex (n,)
    Ju : ndarray, complex (n, r, 8)
        ``U^H ds/dtheta`` in ``PARAMETERS`` order (per SI unit).
    free : tuple of str
        The free parameters (:func:`tangent_parameters`); tied, the ``R1f``
        column is ``d/dR1f + d/dR1s``.
    n_est : int
        The first ``n_est`` of ``free`` are the estimated ones.

    Returns
    -------
    perp_sq : ndarray (n,)
        ``||(I - Q Q^T) rho||^2`` (data units squared).
    step_unit : ndarray (n, n_est)
        ``|delta_p| / sqrt((A^T A)^{-1}_pp)``: the step in standard errors at ``sigma = 1`` (divide by
        ``sigma``); inf where ``A`` is rank deficient.
    """
    cols = []
    for p in free:
        col = Ju[..., INDEX[p]]
        if tied_R1 and p == "R1f":
            col = col + Ju[..., INDEX["R1s"]]
        cols.append(M0[:, None] * col)
    cols += [u, 1j * u]
    A = np.stack(cols, axis=-1)
    A = np.concatenate([A.real, A.imag], axis=1)  # (n, 2r, k), real
    # column scaling first: the step in standard errors does not depend on it, the QR's accuracy does
    A = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)
    rho = c - M0[:, None] * u
    rho = np.concatenate([rho.real, rho.imag], axis=1)
    Q, R = np.linalg.qr(A)
    qr = np.einsum("nik,ni->nk", Q, rho)
    perp_sq = np.maximum(np.einsum("ni,ni->n", rho, rho) - np.einsum("nk,nk->n", qr, qr), 0.0)
    step = np.full((c.shape[0], n_est), np.inf)
    diag = np.abs(np.diagonal(R, axis1=1, axis2=2))
    ok = np.all(diag > 1e-12 * np.maximum(diag.max(axis=1, keepdims=True), 1e-300), axis=1)
    if ok.any():
        Rinv = np.linalg.inv(R[ok])
        delta = np.einsum("nkj,nj->nk", Rinv, qr[ok])  # (A^T A)^-1 A^T rho in the scaled columns
        # (A^T A)^-1 = R^-1 R^-T: its diagonal is the row sums of R^-1 squared
        step[ok] = np.abs(delta[:, :n_est]) / np.sqrt(np.einsum("nkj,nkj->nk", Rinv, Rinv)[:, :n_est])
    return perp_sq, step


def _tangent_chunk(c, theta, M0, sequence, basis, free, tied_R1, n_est, backend):
    th = np.clip(theta, _LO + _EPS, _HI)  # the model is evaluated strictly inside its bounds
    if tied_R1:
        th = tie_R1(th)
    s, J = jacobian(sequence, th, backend=backend)
    Uc = np.asarray(basis).conj()
    return tangent_statistics(c, M0, s @ Uc, np.einsum("npk,pr->nrk", J, Uc), free, tied_R1, n_est)


def trust_statistics(c, theta, M0, res_sq, sigma, *, dof, method="residual", sequence=None, basis=None,
                     free=None, n_est=0, tied_R1=False, alpha=ALPHA, max_step=MAX_STEP, ok=None, chunk_size=256,
                     backend="auto"):
    """The trust statistics of fitted voxels (see the module docstring).

    Parameters
    ----------
    c : ndarray, complex (n, r)
        The voxels' coefficients.
    theta : ndarray (n, 8)
        Every parameter of the estimate (SI units, ``PARAMETERS`` order).
    M0 : ndarray, complex (n,)
        The least-squares complex scale at ``theta``.
    res_sq : ndarray (n,)
        ``||c - M0 u(theta)||^2`` (data units squared).
    sigma : float or ndarray (n,)
        Noise standard deviation per real coefficient component (data units), one or per voxel.
    dof : int
        ``2r - n_free``, at least 1.
    method : {"residual", "tangent"}
        The raw residual's chi-squared only, or the tangent tests (one Jacobian per voxel; needs
        ``sequence``, ``basis``, ``free``, ``n_est``, ``tied_R1``).
    alpha : float in (0, 1)
        Chi-squared p-value below which a voxel is untrusted.
    max_step : float > 0
        Gauss–Newton step (standard errors) above which a voxel is untrusted.
    ok : ndarray of bool (n,), optional
        Voxels with an estimate; the others get NaN statistics and are not flagged here.

    Returns
    -------
    Trust
    """
    n = c.shape[0]
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (n,))
    ok = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
    res_sq = np.where(ok, np.asarray(res_sq, dtype=float), np.nan)
    step = None
    if method == "tangent":
        if free is None:
            raise ValueError("trust='tangent' needs the estimator's free parameters (tangent_parameters)")
        step = np.full(n, np.nan)
        ok = ok & np.all(np.isfinite(theta), axis=1) & np.isfinite(M0)  # the model needs every parameter
        res_sq = np.where(ok, res_sq, np.nan)
        rows = np.flatnonzero(ok)
        for sl in chunk_slices(rows.size, chunk_size):
            r = rows[sl]
            perp, st = _tangent_chunk(c[r], theta[r], M0[r], sequence, basis, free, tied_R1, n_est, backend)
            res_sq[r] = perp
            step[r] = st.max(axis=1) / sigma[r] if n_est else 0.0
    elif method != "residual":
        raise ValueError(f"trust must be None or one of {TRUST_METHODS}, got {method!r}")
    red, p = misfit_pvalue(res_sq, sigma, dof)
    with np.errstate(invalid="ignore"):
        untrusted = ok & ((p < alpha) | ((step > max_step) if step is not None else False))
    return Trust(chi2=red, p_value=p, step=step, untrusted=untrusted, dof=int(dof), method=method,
                 alpha=float(alpha), max_step=float(max_step))
