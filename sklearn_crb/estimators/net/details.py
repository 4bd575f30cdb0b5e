"""``predict_details`` for networks: the model at the network's estimate (a ``PredictionDetails``).

A network predicts only the parameters it estimates. To report M0, the
residual and the CRB, the fingerprint model needs every parameter: the
estimates, the caller's ``fixed`` values, and for the rest the fill values of
the model context, refined per voxel by a few batched VarPro
Levenberg–Marquardt iterations on the nuisance parameters with the network's
estimates held (:func:`polish_nuisance`).

M0 is the variable-projection (linear least-squares) solution of the complex
scale at fixed theta, ``M0 = <u, c> / <u, u>`` with ``u = U^H s(theta)``.

Standard errors (``se=``):

* ``"delta"`` (default): the network's own standard error by the delta
  method, ``se_p = sigma ||d theta_hat_p / d x||`` with the input gradient
  from autograd (white noise of std ``sigma`` per real feature). It is the
  spread of *this estimator* over noise draws to first order, and it is
  smaller than ``sqrt(CRB)`` where the network leans on its prior. Returned as
  ``var_unit`` (the variance at ``sigma = 1``, ``|M0| = 1``). It costs one
  backward pass per output, no physics Jacobian.
* ``"crb"``: the Cramér–Rao bound of the compressed coefficients at the
  estimate, ``M0 = 1``, ``sigma = 1`` (Zhang et al., MRM 2022, Eq. 3), with
  the nuisance parameters and complex M0 marginalised (one Jacobian per voxel).

The noise level: where the network's estimate is not the least-squares
optimum, the residual also holds the model misfit of that offset, and a
sigma pooled from it is biased high (+43 % on the in-vivo phantom). To first
order the offset lies in the tangent space of the model at the estimate, so
the residual is projected onto the orthogonal complement of the columns
``M0 U^H ds/dtheta_j`` of the free parameters and ``u, i u`` (complex M0):
``noise_residual_norm``, a chi-squared variate with ``2r - n_free`` degrees
of freedom at the optimum as off it. With ``se="delta"`` it is computed on at
most ``sigma_rows`` evenly spaced voxels per call (NaN elsewhere), which is
enough for the pooled median of :func:`sklearn_crb.maps.estimate_sigma`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sklearn_crb._validation import check_parameter_dict, complex_from_features
from sklearn_crb.crb import IllConditionedFisherWarning, crb_from_jacobian
from sklearn_crb.estimators._base import fit_box, noise_column
from sklearn_crb.estimators.details import PredictionDetails
from sklearn_crb.estimators.fixed_sensitivity import model_sensitivity
from sklearn_crb.estimators.net.loaders import net_threads, torch_threads
from sklearn_crb.estimators.net.measured import append_measured
from sklearn_crb.estimators.nlls import solver as _lm
from sklearn_crb.physics.parameters import (
    BOUNDS,
    INDEX,
    PARAMETERS,
    SCALE,
    crb_to_targets,
    nuisance_parameters,
    rate_name,
    resolve_estimate,
    theta_columns_from_targets,
    tie_R1,
)
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.physics.signal import jacobian, simulate

__all__ = ["model_context", "polish_nuisance", "network_details", "input_gradient_variance",
           "linearised_residual", "SE_METHODS"]

#: Standard-error methods of :func:`network_details`.
SE_METHODS = ("delta", "crb")

_LO = np.array([BOUNDS[p][0] for p in PARAMETERS])
_HI = np.array([BOUNDS[p][1] for p in PARAMETERS])
# strictly inside, so that every parameter stays identifiable at the bounds (m0s = 0, Rex = 0)
_EPS = np.array([1e-4, 0, 0, 1e-3, 0, 0, 0, 0])


def model_context(net, sequence=None, basis=None):
    """Sequence, basis, estimate, tied_R1, nuisance and fill values of a fitted network.

    From ``net.crb_metadata_`` (set by ``io.models.load_model``: keys
    ``sequence`` (a ``Sequence.to_dict``), ``basis``, ``estimate``,
    ``tied_R1``, ``nuisance``, ``fill_values``) or else ``net.simulator_``
    (``fit_simulated`` or ``simulator=``); ``sequence``/``basis`` override.
    """
    meta = getattr(net, "crb_metadata_", None)
    sim = getattr(net, "simulator_", None)
    if meta is not None:
        ctx = dict(sequence=Sequence.from_dict(meta["sequence"]), basis=meta.get("basis"),
                   estimate=tuple(meta["estimate"]), tied_R1=bool(meta.get("tied_R1", False)),
                   nuisance=meta.get("nuisance", "all"), fill=np.asarray(meta["fill_values"], dtype=np.float64))
    elif sim is not None:
        ctx = dict(sequence=sim.sequence_, basis=sim.basis_, estimate=tuple(sim.estimate_),
                   tied_R1=bool(sim.tied_R1), nuisance=sim.nuisance, fill=np.asarray(sim.prior_.center(), float),
                   support={p: d.support for p, d in sim.prior_.distributions.items() if hasattr(d, "support")})
    else:
        raise ValueError("predict_details needs the network's model (sequence, basis, fill values): train it with "
                         "simulator= or fit_simulated, or load it with sklearn_crb.io.models.load_model")
    if sequence is not None:
        ctx["sequence"] = sequence
    if basis is not None:
        ctx["basis"] = basis
    if ctx["basis"] is None:
        raise ValueError("basis: the network does not carry its compression basis; pass basis=")
    ctx["basis"] = np.asarray(ctx["basis"], dtype=np.complex128)
    if ctx["basis"].ndim != 2 or ctx["basis"].shape[0] != ctx["sequence"].n_pulses:
        raise ValueError(f"basis has shape {ctx['basis'].shape} but the sequence has {ctx['sequence'].n_pulses} "
                         "pulses")
    ctx["estimate"] = resolve_estimate(ctx["estimate"], ctx["tied_R1"])
    if ctx["fill"].shape != (len(PARAMETERS),):
        raise ValueError(f"fill_values must have {len(PARAMETERS)} entries, got shape {ctx['fill'].shape}")
    return ctx


def _nuisance_names(ctx, fixed_names):
    return nuisance_parameters(ctx["nuisance"], ctx["estimate"], ctx["tied_R1"], known=fixed_names)


def polish_nuisance(theta, c, ctx, nuisance, converged, n_iter=5, backend="auto"):
    """Per-voxel nuisance values by ``n_iter`` batched VarPro LM iterations, the estimates held fixed.

    Parameters
    ----------
    theta : ndarray (n, 8)
        Estimates, fixed values and fill values (the start of the nuisance).
    c : ndarray, complex (n, r)
        The coefficients.
    ctx : dict
        The model context (:func:`model_context`).
    nuisance : tuple of str
        Parameters to fit (the others, in ``theta``, are held).
    converged : ndarray of bool (n,)
        Only these rows are polished.
    n_iter : int
        LM iterations (0: ``theta`` unchanged).

    Returns
    -------
    theta : ndarray (n, 8)
        With the polished nuisance columns where the fit gave a finite cost;
        the box is the NLLS fitter's (``_base.fit_box``).
    """
    rows = np.flatnonzero(converged)
    if n_iter <= 0 or not nuisance or rows.size == 0:
        return theta
    seq, U = ctx["sequence"], ctx["basis"]
    box = fit_box(seq, nuisance)
    for q, (a, b) in ctx.get("support", {}).items():  # the prior the network was trained on, where known
        if q in box and max(a, box[q][0]) < min(b, box[q][1]):
            box[q] = (max(a, box[q][0]), min(b, box[q][1]))
    scale = np.array([SCALE[q] for q in nuisance])
    lo = np.array([box[q][0] for q in nuisance])
    hi = np.array([box[q][1] for q in nuisance])
    prob = _lm.Problem(sequence=seq, basis=U, free_idx=tuple(INDEX[q] for q in nuisance), tied_R1=ctx["tied_R1"],
                       scale=scale, lo=lo / scale, hi=hi / scale, max_iter=int(n_iter), gtol=1e-10, xtol=1e-8,
                       ftol=1e-10, se_tol=0.0, lambda0=1.0, damping="nielsen", backend=backend, device="cpu")
    y = c[rows] / np.linalg.norm(c[rows], axis=1, keepdims=True)
    base = theta[rows].copy()
    x0 = np.clip(base[:, [INDEX[q] for q in nuisance]], lo, hi) / scale
    res = _lm.fit_chunk(prob, y, x0[:, None, :], base)
    ok = np.isfinite(res["cost"]) & (res["status"] < _lm.NANIN) & np.all(np.isfinite(res["theta"]), axis=1)
    out = theta.copy()
    out[rows[ok]] = res["theta"][ok]
    return out


def input_gradient_variance(net, X, batch_size=1024, return_measured=False):
    """Delta-method variance of each network output per unit noise: ``||d theta_hat_p / d x||^2``.

    Parameters
    ----------
    net : fitted CRBNetRegressor
    X : ndarray (n, d)
        Features ``[Re c, Im c]``, then the noise column of a noise-aware network and the network's
        ``measured_`` columns (inputs without noise: their gradient does not count).

    return_measured : bool
        Also return ``d theta_hat_p / d b`` for the measured columns ``b``.

    Returns
    -------
    var : ndarray (n, n_outputs), float64
        In the squared units of the outputs (SI, or the time targets' units)
        per unit variance of each real feature.
    sensitivity : ndarray (n, n_outputs, len(measured_)), with ``return_measured``
        Per unit of each measured input (its SI unit).
    """
    mod = net.module_
    mod.eval()
    device, k = net.device_, len(getattr(net, "measured_", ()))
    q = int(bool(getattr(net, "noise_input_", False)))  # the noise column: known, not noisy
    outs, meas = [], []
    with torch_threads(net_threads(net)), torch.enable_grad():
        for i in range(0, X.shape[0], int(batch_size)):
            xb = torch.as_tensor(X[i: i + batch_size], dtype=torch.float32, device=device).requires_grad_(True)
            y = mod.to_physical(mod(xb))  # rows are independent (no batch statistics in eval mode)
            g2, gm = [], []
            for j in range(y.shape[1]):
                (g,) = torch.autograd.grad(y[:, j].sum(), xb, retain_graph=j < y.shape[1] - 1)
                g2.append((g[:, : g.shape[1] - k - q].to(torch.float64) ** 2).sum(dim=1))
                gm.append(g[:, g.shape[1] - k:].to(torch.float64))
            outs.append(torch.stack(g2, dim=1).detach().cpu())
            meas.append(torch.stack(gm, dim=1).detach().cpu())
    n_out = int(mod.mean.shape[0])
    var = torch.cat(outs).numpy() if outs else np.zeros((0, n_out))
    if not return_measured:
        return var
    return var, (torch.cat(meas).numpy() if meas else np.zeros((0, n_out, k)))


def linearised_residual(c, M0, u, Ju, free, tied):
    """Norm of the residual ``c - M0 u`` orthogonal to the model's tangent space at the estimate.

    Parameters
    ----------
    c, u : ndarray, complex (n, r)
        Coefficients and the compressed model fingerprint ``U^H s(theta)``.
    M0 : ndarray, complex (n,)
    Ju : ndarray, complex (n, r, 8)
        ``U^H ds/dtheta`` (``PARAMETERS`` order).
    free : tuple of str
        The free (estimated and nuisance) parameters; with ``tied`` the
        ``R1f`` column is ``d/dR1f + d/dR1s``.

    Returns
    -------
    norm : ndarray (n,)
        ``||(I - Q Q^T) r||`` with ``Q`` an orthonormal basis of the real
        tangent columns (free parameters, Re M0, Im M0).
    """
    cols = []
    for p in free:
        col = Ju[..., INDEX[p]]
        if tied and p == "R1f":
            col = col + Ju[..., INDEX["R1s"]]
        cols.append(M0[:, None] * col)
    cols += [u, 1j * u]
    A = np.stack(cols, axis=-1)  # (n, r, k)
    A = np.concatenate([A.real, A.imag], axis=1)
    A = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-300)  # column scaling for the QR
    Q, _ = np.linalg.qr(A)
    r = c - M0[:, None] * u
    r = np.concatenate([r.real, r.imag], axis=1)
    r_perp = r - np.einsum("nik,nk->ni", Q, np.einsum("nik,ni->nk", Q, r))
    return np.linalg.norm(r_perp, axis=1)


def network_details(net, X, *, fixed=None, compute_crb=True, sequence=None, basis=None, polish_iter=5,
                    backend="auto", se="delta", sigma_rows=64, sigma=None):
    """The ``predict_details`` protocol for a fitted ``CRBNetRegressor`` (see its method).

    Time targets (``T1f``, ...) are mapped to rates for ``theta``; ``crb_unit``
    and ``var_unit`` are in target units (``CRB(T) = CRB(R) / R^4``).
    With ``compute_crb``, ``se="delta"`` returns ``var_unit`` (the network's
    delta-method variance at ``sigma = 1``, ``|M0| = 1``; ``crb_unit`` is
    None) and ``se="crb"`` the CRB as ``crb_unit``; both return
    ``noise_residual_norm`` (see the module docstring). With ``fixed`` and
    ``compute_crb``, ``fixed_sensitivity`` (n, len(estimate), len(fixed_names))
    is ``d estimate / d fixed value``: the network's autograd derivative for
    its measured inputs (0 for a fixed value it does not read) with
    ``se="delta"``, the least-squares one with ``se="crb"``
    (:mod:`sklearn_crb.estimators.fixed_sensitivity`); else None. ``sigma``
    (a float or one per row of ``X``): the noise level a noise-aware network
    (``net.noise_input_``) takes as its noise column; required by it, unused
    by other networks.

    Returns
    -------
    PredictionDetails
    """
    ctx, fixed, X, polish_iter = _check_request(net, X, fixed, sequence, basis, polish_iter, se, sigma_rows)
    noise = _noise_column(net, sigma, X.shape[0])
    est, nuis = ctx["estimate"], _nuisance_names(ctx, tuple(fixed))
    head = {"estimate": est, "n_free": len(est) + len(nuis) + 2, "fixed_names": tuple(fixed)}
    if X.shape[0] == 0:
        return _empty_details(head, len(est), len(fixed), compute_crb, se)
    names = tuple(getattr(net, "target_names_", est))
    if set(names) != set(est):
        raise ValueError(f"the network predicts {names} but its model context estimates {est}")
    theta, pred, converged, Xnet = _network_theta(net, X, fixed, ctx, names, noise)
    c = complex_from_features(X)
    theta = polish_nuisance(theta, c, ctx, nuis, converged, n_iter=polish_iter, backend=backend)
    fit = _model_fit(theta, c, converged, ctx, nuis, compute_crb, se, backend, int(sigma_rows))
    converged = fit["converged"]
    crb_unit = var_unit = gm = None
    if compute_crb and se == "crb":
        crb_unit = _crb_at_estimate(fit, ctx, nuis)
    elif compute_crb:
        var_unit, gm = _delta_variance(net, Xnet, fit, names, est)
    measured = tuple(getattr(net, "measured_", ()))
    sens = _fixed_sensitivity(fit, ctx, nuis, tuple(fixed), gm, measured, se) if compute_crb and fixed else None
    order = [names.index(p) for p in est]  # the network's output order -> the estimate's
    return PredictionDetails(
        **head, prediction=np.where(converged[:, None], pred[:, order], np.nan), theta=theta,
        M0=np.where(converged, fit["M0"], np.nan + 0j).astype(np.complex128),
        residual_norm=np.where(converged, fit["res"], np.nan).astype(np.float64), converged=converged,
        failed=~converged, crb_unit=crb_unit, var_unit=var_unit, noise_residual_norm=fit["noise_res"],
        out_of_range=fit["out_of_range"], fixed_sensitivity=sens)


def _check_request(net, X, fixed, sequence, basis, polish_iter, se, sigma_rows):
    """The model context, the checked ``fixed`` values, ``X`` as float64 and ``polish_iter``; clear errors first."""
    if se not in SE_METHODS:
        raise ValueError(f"se must be one of {SE_METHODS}, got {se!r}")
    if int(sigma_rows) < 1:
        raise ValueError(f"sigma_rows must be a positive integer, got {int(sigma_rows)}")
    ctx = model_context(net, sequence, basis)
    fixed = check_parameter_dict(fixed, "fixed")
    both = sorted(set(fixed) & {rate_name(p) for p in ctx["estimate"]})
    if both:
        raise ValueError(f"fixed: {both} are estimated by the network; fix only parameters it does not estimate")
    X, U = np.asarray(X, dtype=np.float64), ctx["basis"]
    if X.ndim != 2 or X.shape[1] != 2 * U.shape[1]:
        raise ValueError(f"X must have shape (n_samples, {2 * U.shape[1]}) ([Re c, Im c] in the model's rank-"
                         f"{U.shape[1]} basis), got {X.shape}")
    measured = tuple(getattr(net, "measured_", ()))
    missing = [p for p in measured if p not in fixed]
    if missing:
        raise ValueError(f"fixed: the network takes {measured} as measured inputs; pass fixed= values (maps) for "
                         f"{missing}, e.g. fit --b1-map/--b0-map")
    if X.shape[0] and int(polish_iter) < 0:
        raise ValueError(f"polish_iter must be >= 0, got {int(polish_iter)}")
    return ctx, fixed, X, int(polish_iter)


def _noise_column(net, sigma, n):
    """The noise column ``(n, 1)`` of a noise-aware network (None for others); refuses a missing or bad ``sigma``."""
    if not getattr(net, "noise_input_", False):
        return None
    if sigma is None:
        raise ValueError("sigma: the network is noise-aware (noise_input=True) and needs the noise standard deviation "
                         "per real coefficient, a float or one per voxel (fit_maps estimates it from the image when "
                         "not given)")
    return noise_column(sigma, n)


def _empty_details(head, n_est, n_fixed, compute_crb, se):
    """The details of no voxel: every array with zero rows."""
    empty = np.zeros((0, n_est)) if compute_crb else None
    return PredictionDetails(
        **head, prediction=np.zeros((0, n_est)), theta=np.zeros((0, len(PARAMETERS))), M0=np.zeros(0, complex),
        residual_norm=np.zeros(0), converged=np.zeros(0, bool), failed=np.zeros(0, bool),
        crb_unit=empty if se == "crb" else None, var_unit=empty if se == "delta" else None,
        noise_residual_norm=np.zeros(0), out_of_range=np.zeros(0, bool),
        fixed_sensitivity=np.zeros((0, n_est, n_fixed)) if compute_crb and n_fixed else None)


def _network_theta(net, X, fixed, ctx, names, noise=None):
    """``(theta, pred, converged, Xnet)``: the fill values, the fixed values and the network's estimates as rates.

    ``Xnet`` is ``X`` with the noise column (``noise``, of a noise-aware net) and the measured maps
    behind the features; rows with
    non-finite or all-zero input, non-finite outputs or (time targets) a
    non-positive output are not converged and carry NaN estimates.
    """
    n = X.shape[0]
    theta = np.tile(ctx["fill"], (n, 1))
    for p, v in fixed.items():
        col = np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
        if not np.all(np.isfinite(col)):
            raise ValueError(f"fixed[{p!r}] has non-finite values")
        theta[:, INDEX[p]] = col
    finite_in = np.all(np.isfinite(X), axis=1) & np.any(X != 0, axis=1)
    Xnet = append_measured(X if noise is None else np.hstack([X, noise]), theta, tuple(getattr(net, "measured_", ())))
    pred = np.full((n, len(names)), np.nan)
    if finite_in.any():
        pred[finite_in] = np.asarray(net.predict(Xnet[finite_in]), dtype=np.float64).reshape(
            int(finite_in.sum()), -1)
    converged = finite_in & np.all(np.isfinite(pred), axis=1)
    if any(rate_name(p) != p for p in names):  # times -> rates (1/T); failed or non-positive rows flagged
        converged &= np.all(pred > 0, axis=1)
        cols = theta_columns_from_targets(np.where(converged[:, None], pred, 1.0), names)
    else:
        cols = {p: pred[:, j] for j, p in enumerate(names)}
    for p, v in cols.items():
        theta[:, INDEX[p]] = np.where(converged, v, np.nan)
    if ctx["tied_R1"]:
        theta = tie_R1(theta)
    return theta, pred, converged, Xnet


def _model_fit(theta, c, converged, ctx, nuis, compute_crb, se, backend, sigma_rows):
    """The model at the estimate: fingerprint, Jacobian rows, least-squares ``M0``, residuals.

    The model is evaluated strictly inside the bounds, failed rows at the fill
    values (their outputs are NaN). With ``se="crb"`` the Jacobian of every row,
    else of at most ``sigma_rows`` evenly spaced converged rows (for the noise
    level's residual).
    """
    n, tied, seq, U = theta.shape[0], ctx["tied_R1"], ctx["sequence"], ctx["basis"]
    out_of_range = converged & np.any((theta < _LO) | (theta > _HI), axis=1)
    th_model = np.where(converged[:, None], np.clip(theta, _LO + _EPS, _HI), ctx["fill"])
    if tied:
        th_model = tie_R1(th_model)
    if compute_crb and se == "crb":
        s, J = jacobian(seq, th_model, backend=backend)
        jrows = np.arange(n)
    else:
        s, J, jrows = simulate(seq, th_model, backend=backend), None, np.zeros(0, dtype=int)
        ok_rows = np.flatnonzero(converged)
        if compute_crb and ok_rows.size:  # the noise level's residual on a few evenly spaced fitted voxels
            jrows = ok_rows[np.linspace(0, ok_rows.size - 1, min(sigma_rows, ok_rows.size)).astype(int)]
            _, J = jacobian(seq, th_model[jrows], backend=backend)
    u = s @ U.conj()
    M0 = np.einsum("nr,nr->n", u.conj(), c) / np.einsum("nr,nr->n", u.conj(), u).real
    res = np.linalg.norm(c - M0[:, None] * u, axis=1)
    converged = converged & np.isfinite(M0) & np.isfinite(res)
    noise_res = np.full(n, np.nan)
    if compute_crb and jrows.size:
        free = tuple(rate_name(p) for p in ctx["estimate"]) + tuple(nuis)
        Ju = np.einsum("npk,pr->nrk", J, U.conj())
        with np.errstate(invalid="ignore", divide="ignore"):
            noise_res[jrows] = linearised_residual(c[jrows], M0[jrows], u[jrows], Ju, free, tied)
        noise_res[~converged] = np.nan
    return dict(s=s, J=J, th_model=th_model, M0=M0, res=res, converged=converged, noise_res=noise_res,
                out_of_range=out_of_range)


def _crb_at_estimate(fit, ctx, nuis):
    """The CRB at the estimate, ``M0 = 1``, ``sigma = 1``, in target units (NaN where not converged)."""
    est = ctx["estimate"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedFisherWarning)  # reported as inf, flagged by the caller
        crb_unit = crb_from_jacobian(fit["s"], fit["J"], estimate=tuple(rate_name(p) for p in est),
                                     nuisance=nuis or None, tied_R1=ctx["tied_R1"], basis=ctx["basis"],
                                     on_singular="inf")
    crb_unit = np.asarray(crb_unit, dtype=np.float64)
    if any(rate_name(p) != p for p in est):
        crb_unit = crb_to_targets(crb_unit, fit["th_model"], est)
    crb_unit[~fit["converged"]] = np.nan
    return crb_unit


def _delta_variance(net, Xnet, fit, names, est):
    """``(var_unit, d estimate / d measured input)`` of the converged rows by the delta method (NaN elsewhere)."""
    converged = fit["converged"]
    var_unit = np.full((len(converged), len(est)), np.nan)
    rows = np.flatnonzero(converged)
    gm = None
    if rows.size:
        g2, gm = input_gradient_variance(net, Xnet[rows], return_measured=True)
        order = [names.index(p) for p in est]  # the network's output order -> the estimate's
        var_unit[rows] = g2[:, order] * np.abs(fit["M0"][rows, None]) ** 2
        gm = gm[:, order]
    return var_unit, gm


def _fixed_sensitivity(fit, ctx, nuis, fnames, gm, measured, se):
    """``d estimate / d fixed value`` (n, len(estimate), len(fixed)); NaN where not converged.

    ``se="crb"``: the least-squares (efficient estimator's) sensitivity, like the CRB itself; else the
    network's own derivative for its measured inputs (``gm``) and 0 for a fixed value it does not read.
    """
    est, converged = ctx["estimate"], fit["converged"]
    if se == "crb":
        sens = model_sensitivity(fit["s"], fit["J"], estimate=tuple(rate_name(p) for p in est), nuisance=nuis,
                                 fixed_names=fnames, tied_R1=ctx["tied_R1"], basis=ctx["basis"])
        for j, p in enumerate(est):
            if rate_name(p) != p:  # a time target T = 1/R: dT/db = -T^2 dR/db
                sens[:, j] = -sens[:, j] / fit["th_model"][:, INDEX[rate_name(p)], None] ** 2
    else:
        sens = np.zeros((len(converged), len(est), len(fnames)))
        rows = np.flatnonzero(converged)
        if rows.size and gm is not None:
            for b, m in enumerate(fnames):
                if m in measured:
                    sens[rows, :, b] = gm[:, :, measured.index(m)]
    sens[~converged] = np.nan
    return sens
