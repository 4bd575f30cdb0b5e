"""``NLLSFitter``: bounded Levenberg–Marquardt fits of MT fingerprints, batched over voxels.

The reference estimator of the field and the baseline of Zhang et al.
(MRM 2022): nonlinear least squares of the generalized-Bloch model,

    min_{theta, M0}  || y - M0 * g(theta) ||^2,     g(theta) = U^H s(theta)

(``U = I`` for the full signal), with box bounds on ``theta``. It mirrors
``fit_gBloch`` of MRIgeneralizedBloch.jl (LsqFit's Levenberg–Marquardt,
gbloch_spec.md §5) with two changes:

* **Variable projection** (Golub & Pereyra, SIAM J Numer Anal 1973). The
  complex ``M0`` enters linearly, so for every ``theta`` it has the closed
  form ``M0(theta) = g^H y / ||g||^2`` and the problem reduces to
  ``min_theta ||r(theta)||^2`` with ``r = P_perp(theta) y``,
  ``P_perp = I - g g^H / ||g||^2``. The solver uses the *exact* Jacobian of
  this reduced residual (the full Golub–Pereyra form, not Kaufman's
  simplification, which drops the second term)::

      dr/dtheta_k = -P_perp (M0 dg_k) - g (dg_k^H r) / ||g||^2

  where ``dg_k = U^H ds/dtheta_k`` comes exact from
  :func:`sklearn_crb.physics.jacobian`. (In the real-stacked form the two
  M0 columns ``[g, i g]`` are orthogonal with equal norms, which is what
  collapses the pseudo-inverse to ``g^H / ||g||^2``.) This removes two of the
  ten unknowns and the worst-conditioned directions (the M0 phase and scale).
* **Batched**: every voxel has its own damping ``lambda``, its own step
  acceptance and its own convergence test; converged voxels leave the active
  set, so they stop costing physics evaluations.

The LM step follows LsqFit: ``(J^T J + lambda diag(D)) delta = -J^T r`` with
``D = max(diag(J^T J), 1e-6)``, the step is clipped into the box, accepted if
the cost decreases with gain ratio ``rho > 1e-3``. LsqFit then divides ``lambda`` by 10 if ``rho > 0.75``
and multiplies it by 10 on a rejection (``damping="lsqfit"``); the default
is Nielsen's smoother update (``damping="nielsen"``), which needs fewer
iterations. Parameters are
optimised in units of a fixed per-parameter scale and each voxel's data are
normalised to unit norm, so the tolerances mean the same for every voxel.

Voxel chunks run through :mod:`joblib`, so ``with
joblib.parallel_config(backend="dask"):`` on a ``dask.distributed`` cluster
spreads a volume over its workers with no code change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from numbers import Real

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._validation import check_basis
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, SCALE, free_parameters, resolve_estimate, validate_theta
from sklearn_crb.physics.sequence import Sequence

__all__ = ["NLLSFitter", "NLLSFitWarning", "STATUS", "DEFAULT_START", "DEFAULT_BOUNDS"]

_DTYPE = torch.float64

#: Start values of ``fit_gBloch`` (gbloch_spec.md §5); with ``tied_R1`` the
#: tied R1 starts at 0.7 1/s (Julia's ``R1a``).
DEFAULT_START = {"m0s": 0.2, "R1f": 0.3, "R2f": 15.0, "Rex": 20.0, "R1s": 3.0, "T2s": 10e-6,
                 "omega0": 0.0, "B1": 1.0}
_TIED_R1_START = 0.7

#: Default box bounds (SI units). They stay inside ``parameters.BOUNDS`` (the
#: physics validates them) and T2s covers the parenchyma prior, [5, 25] us.
#: ``fit`` further intersects T2s and B1 with the range the R2sl table covers
#: for the sequence (TRF/T2s in [1, 150], B1*max|alpha| <= 4.4 rad, B1 <= 1.4).
DEFAULT_BOUNDS = {"m0s": (0.0, 0.99), "R1f": (1e-3, 100.0), "R2f": (1e-3, 1e4), "Rex": (0.0, 1e4),
                  "R1s": (1e-3, 100.0), "T2s": (5e-6, 25e-6), "omega0": (-1e5, 1e5), "B1": (0.05, 1.4)}


_R2SL_TRF_OVER_T2S = (1.0, 150.0)
_R2SL_MAX_B1_ALPHA = 4.4
_R2SL_MAX_B1 = 1.4

#: Per-voxel status codes of ``predict_details``.
STATUS = {0: "converged", 1: "max_iter", 2: "unused", 3: "nonfinite_input", 4: "zero_input",
          5: "nonfinite_model"}
_OK, _MAXIT, _STALL, _NANIN, _ZEROIN, _NANMODEL = range(6)

_LAMBDA_MIN, _LAMBDA_MAX = 1e-16, 1e16


class NLLSFitWarning(UserWarning):
    """Some voxels did not converge or could not be fitted (see ``predict_details``)."""


# --------------------------------------------------------------------------- the batched solver
@dataclass
class _Problem:
    """Everything a worker needs (picklable: shipped to joblib/dask workers)."""

    sequence: Sequence
    basis: np.ndarray | None  # (N, r) complex
    free_idx: tuple
    tied_R1: bool
    base_theta: np.ndarray  # (8,) fixed values (free entries overwritten)
    scale: np.ndarray  # (p,)
    lo: np.ndarray  # (p,) scaled
    hi: np.ndarray
    max_iter: int
    gtol: float
    xtol: float
    ftol: float
    se_tol: float
    lambda0: float
    damping: str
    backend: str
    device: str

    def theta(self, x):
        """Full (n, 8) parameters from scaled free parameters x (n, p)."""
        th = torch.as_tensor(self.base_theta, dtype=_DTYPE, device=x.device).repeat(x.shape[0], 1)
        th[:, list(self.free_idx)] = x * torch.as_tensor(self.scale, dtype=_DTYPE, device=x.device)
        if self.tied_R1:
            th[:, INDEX["R1s"]] = th[:, INDEX["R1f"]]
        return th

    def _project(self, s):
        if self.basis is None:
            return s
        U = torch.as_tensor(self.basis, device=s.device)
        if s.ndim == 2:
            return s @ U.conj()
        return torch.einsum("ntp,tr->nrp", s, U.conj())

    def model(self, x):
        """g(theta) (n, K) complex at M0 = 1."""
        from sklearn_crb.physics.signal import simulate

        return self._project(simulate(self.sequence, self.theta(x), backend=self.backend))

    def model_and_jacobian(self, x):
        """g (n, K) and dg/dtheta (n, K, 8) in SI units, all 8 columns."""
        from sklearn_crb.physics.signal import jacobian

        s, J = jacobian(self.sequence, self.theta(x), backend=self.backend)
        return self._project(s), self._project(J)

    def free_columns(self, dg):
        """dg/dx (n, K, p): free columns in scaled units (tied R1: R1f + R1s)."""
        cols = []
        for k, j in enumerate(self.free_idx):
            c = dg[..., j]
            if self.tied_R1 and j == INDEX["R1f"]:
                c = c + dg[..., INDEX["R1s"]]
            cols.append(c * float(self.scale[k]))
        return torch.stack(cols, dim=-1)


def _varpro(g, y):
    """Closed-form complex M0 and the projected residual ``y - M0 g``."""
    gg = (g.real**2 + g.imag**2).sum(-1)
    a = (g.conj() * y).sum(-1) / gg
    r = y - a[:, None] * g
    return a, r, gg


def _reduced_jacobian(g, dgx, a, r, gg):
    """Exact (Golub–Pereyra) Jacobian of ``r(theta) = P_perp(theta) y``, complex (n, K, p)."""
    Pdg = dgx - g[:, :, None] * ((g.conj()[:, :, None] * dgx).sum(1) / gg[:, None])[:, None, :]
    second = g[:, :, None] * ((dgx.conj() * r[:, :, None]).sum(1) / gg[:, None])[:, None, :]
    return -a[:, None, None] * Pdg - second


def _cost(r):
    return (r.real**2 + r.imag**2).sum(-1)


def _lm_solve(prob, y, x0):
    """Batched bounded LM on the variable-projected problem.

    Parameters
    ----------
    y : complex tensor (n, K), unit norm per row.
    x0 : real tensor (n, p), scaled start inside the box.

    Returns
    -------
    dict of tensors: x, a (M0 of the normalised data), cost, n_iter, status,
    g, dg (model and full Jacobian at x, for the CRB).
    """
    n, p = x0.shape
    dev = x0.device
    lo = torch.as_tensor(prob.lo, dtype=_DTYPE, device=dev)
    hi = torch.as_tensor(prob.hi, dtype=_DTYPE, device=dev)
    x = torch.minimum(torch.maximum(x0.clone(), lo), hi)
    g, dg = prob.model_and_jacobian(x)
    a, r, gg = _varpro(g, y)
    cost = _cost(r)
    status = torch.full((n,), _MAXIT, dtype=torch.int64, device=dev)
    n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
    lam = torch.full((n,), float(prob.lambda0), dtype=_DTYPE, device=dev)
    nu = torch.full((n,), 2.0, dtype=_DTYPE, device=dev)
    finite = torch.isfinite(cost) & (gg > 0) & torch.isfinite(torch.view_as_real(dg)).flatten(1).all(1)
    status[~finite] = _NANMODEL
    active = torch.nonzero(finite).ravel()
    Jr = torch.zeros((n, g.shape[1], p), dtype=g.dtype, device=dev)
    if active.numel():
        Jr[active] = _reduced_jacobian(g[active], prob.free_columns(dg[active]), a[active], r[active], gg[active])
    eye = torch.eye(p, dtype=_DTYPE, device=dev)

    def projected_gradient(idx):
        grad = (Jr[idx].conj() * r[idx][:, :, None]).sum(1).real
        xi = x[idx]
        blocked = ((xi <= lo) & (grad > 0)) | ((xi >= hi) & (grad < 0))
        return grad, torch.where(blocked, torch.zeros_like(grad), grad)

    for _ in range(int(prob.max_iter)):
        if active.numel() == 0:
            break
        A = active
        JA = Jr[A]
        rA = r[A]
        grad, pg = projected_gradient(A)
        done_grad = pg.abs().amax(-1) < prob.gtol
        JTJ = (JA.conj().transpose(1, 2) @ JA).real
        D = torch.clamp(torch.diagonal(JTJ, dim1=1, dim2=2), min=1e-6)
        M = JTJ + lam[A, None, None] * torch.diag_embed(D)
        # variables held at a bound by the gradient are removed from the step (projected LM)
        blocked = pg != grad
        keep = (~blocked).to(_DTYPE)
        M = M * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(blocked.to(_DTYPE))
        L, info = torch.linalg.cholesky_ex(M)
        ok = info == 0
        delta = torch.cholesky_solve(-(grad * keep)[:, :, None], torch.where(ok[:, None, None], L, eye))[..., 0]
        xA = x[A]
        xt = torch.minimum(torch.maximum(xA + delta, lo), hi)
        delta = xt - xA
        pred = _cost(rA + (JA @ delta.to(JA.dtype)[:, :, None])[..., 0])
        gt = prob.model(xt)
        at, rt, ggt = _varpro(gt, y[A])
        cost_t = _cost(rt)
        cA = cost[A]
        rho = (cost_t - cA) / (pred - cA)
        good_t = torch.isfinite(cost_t) & (ggt > 0)
        accept = ok & good_t & (cost_t < cA) & (rho > 1e-3) & ~done_grad
        if prob.damping == "lsqfit":
            lam_new = torch.where(accept & (rho > 0.75), torch.clamp(lam[A] * 0.1, min=_LAMBDA_MIN), lam[A])
            lam_new = torch.where(~accept & ~done_grad, torch.clamp(lam[A] * 10.0, max=_LAMBDA_MAX), lam_new)
        else:  # Nielsen (1999): smooth decrease on success, doubling increase factor on failure
            shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
            shrink = torch.nan_to_num(shrink, nan=1.0 / 3.0)
            lam_new = torch.where(accept, torch.clamp(lam[A] * shrink, min=_LAMBDA_MIN), lam[A])
            lam_new = torch.where(~accept & ~done_grad, torch.clamp(lam[A] * nu[A], max=_LAMBDA_MAX), lam_new)
            nu[A] = torch.where(accept, torch.full_like(nu[A], 2.0), torch.where(done_grad, nu[A], 2.0 * nu[A]))
        lam[A] = lam_new
        n_iter[A] += (~done_grad).long()
        dx_small = delta.norm(dim=-1) < prob.xtol * (prob.xtol + xt.norm(dim=-1))
        if prob.se_tol > 0:
            # statistical stop: every component of the step is below se_tol standard
            # errors (noise estimated from the residual; never triggers on noiseless data)
            s2 = cA / max(2 * JA.shape[1] - p - 2, 1)
            Dj = torch.diagonal(JTJ, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
            Ls, info_s = torch.linalg.cholesky_ex(Dj[:, :, None] * JTJ * Dj[:, None, :])
            cov_diag = torch.cholesky_inverse(torch.where((info_s == 0)[:, None, None], Ls, eye))
            se = (torch.diagonal(cov_diag, dim1=1, dim2=2).clamp_min(0) * s2[:, None]).sqrt() * Dj
            dx_small = dx_small | ((info_s == 0) & (delta.abs() <= prob.se_tol * se).all(-1))
        df_small = (cA - cost_t) <= prob.ftol * cA
        acc = A[accept]
        if acc.numel():
            x[acc] = xt[accept]
            ga, dga = prob.model_and_jacobian(x[acc])
            aa, ra, gga = _varpro(ga, y[acc])
            good = torch.isfinite(_cost(ra)) & torch.isfinite(torch.view_as_real(dga)).flatten(1).all(1)
            g[acc], dg[acc], a[acc], r[acc], cost[acc] = ga, dga, aa, ra, _cost(ra)
            Jr[acc] = _reduced_jacobian(ga, prob.free_columns(dga), aa, ra, gga)
            bad = acc[~good]
            status[bad] = _NANMODEL
        # lambda at its maximum: even a vanishing gradient step does not lower the cost, i.e. a
        # minimum to machine precision (happens with noisy data below gtol's reach)
        converged = done_grad | (accept & (dx_small | df_small)) | (cost[A] <= 1e-28) | (lam[A] >= _LAMBDA_MAX)
        status[A[converged & (status[A] == _MAXIT)]] = _OK
        active = A[(status[A] == _MAXIT)]
    return {"x": x, "a": a, "cost": cost, "n_iter": n_iter, "status": status, "g": g, "dg": dg}


def _fit_chunk(prob, y, x0):
    """Fit one chunk of voxels (runs in a joblib/dask worker).

    Parameters
    ----------
    y : ndarray complex (n, K), unit-norm rows.
    x0 : ndarray (n, n_starts, p) scaled starts.

    Returns a dict of numpy arrays; for several starts the best (lowest
    cost, failures last) is kept per voxel.
    """
    n, n_starts, p = x0.shape
    dev = torch.device(prob.device)
    yt = torch.as_tensor(y, device=dev)
    yrep = yt.repeat_interleave(n_starts, dim=0)
    res = _lm_solve(prob, yrep, torch.as_tensor(x0.reshape(n * n_starts, p), dtype=_DTYPE, device=dev))
    cost = torch.where(res["status"] >= _NANIN, torch.full_like(res["cost"], float("inf")), res["cost"])
    cost = torch.nan_to_num(cost, nan=float("inf"))
    best = cost.view(n, n_starts).argmin(1) + torch.arange(n, device=dev) * n_starts
    out = {k: v[best].cpu().numpy() for k, v in res.items()}
    out["theta"] = prob.theta(res["x"][best]).cpu().numpy()
    return out


# --------------------------------------------------------------------------- the estimator
def _check_names(d, argname):
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise TypeError(f"{argname} must be a dict mapping parameter names to values, got {type(d).__name__}")
    bad = [k for k in d if k not in PARAMETERS]
    if bad:
        raise ValueError(f"{argname} has unknown parameter names {bad}; allowed: {PARAMETERS}")
    return dict(d)


class NLLSFitter(RegressorMixin, BaseEstimator):
    """Nonlinear least-squares fits of MT fingerprints (bounded LM, variable projection).

    The model (sequence, compression basis, free/fixed parameters, bounds,
    starts) lives in the constructor, as in DIPY models; ``fit`` only
    validates it; ``predict`` fits each voxel.

    Parameters
    ----------
    sequence : Sequence or None
        The pulse train (``None``: ``Sequence.default()``).
    basis : array_like, complex, shape (n_pulses, r), optional
        Orthonormal compression basis ``U``; the data are the coefficients
        ``c = U^H s``. ``None``: fit the full signal.
    estimate : tuple of str
        Parameters that ``predict`` returns (in ``PARAMETERS`` order). All
        parameters that are not ``fixed`` are fitted; the others are nuisance.
    fixed : dict, optional
        ``{name: value}`` (SI units) of parameters held fixed (e.g. a known
        ``B1``). Cannot overlap ``estimate``.
    tied_R1 : bool
        The R1s = R1f model ("R1f" names the single R1).
    bounds : dict, optional
        ``{name: (low, high)}`` overriding ``DEFAULT_BOUNDS`` (SI units).
        Bounds must lie in ``parameters.BOUNDS``; T2s and B1 must keep the
        R2sl lookup inside its table (TRF/T2s in [1, 150], B1 <= 1.4).
    start : None, "default", "grid", "dictionary", dict or array_like
        ``None``/``"default"``: ``DEFAULT_START`` (the Julia defaults); a dict
        overrides some of them; an array (8,) is one start, (n_starts, 8) a
        multi-start (best cost kept); ``"grid"``: 8 starts, m0s, R1f and R2f
        at two levels each; ``"dictionary"``: a :class:`DictionaryMatcher`
        match (built in ``fit`` from ``n_dictionary`` prior draws).
    init : estimator, optional
        A fitted estimator whose ``predict(X)`` seeds the fit (e.g. a
        ``CRBNetRegressor``). Its outputs are taken to be the parameters named
        by its ``estimate_`` attribute (or, failing that, ``estimate``); the
        other parameters start from ``start``. Overrides ``start``.
    prior : ParameterPrior, "parenchyma", "paper2022" or None
        Prior for the dictionary start (``None``: parenchyma, tied if
        ``tied_R1``).
    n_dictionary : int
        Dictionary atoms for ``start="dictionary"``.
    n_starts : int
        With ``start="dictionary"``: fit from the ``n_starts`` best-matching
        atoms and keep the lowest cost (a data-driven multi-start).
    sigma : float, optional
        Noise standard deviation per real component of the data, for the
        standard errors. ``None``: estimated per voxel from the residual,
        ``||r|| / sqrt(2K - p - 2)``.
    max_iter : int
        LM iterations per voxel (LsqFit: 100).
    gtol, xtol, ftol : float
        Convergence on the projected gradient (inf-norm), the step
        (``||dx|| < xtol (xtol + ||x||)``) and the relative cost decrease of
        an accepted step; all in the solver's normalised units.
    se_tol : float
        Also converged when an accepted step moves every parameter by less
        than ``se_tol`` times its standard error (from ``(J^T J)^-1`` and the
        residual variance): further digits are far below the noise. 0
        disables it. On noiseless data the standard errors vanish, so the
        numerical tolerances decide.
    lambda0 : float
        Initial damping (LsqFit uses 10 with ``damping="lsqfit"``).
    damping : {"lsqfit", "nielsen"}
        Damping update: LsqFit's (x0.1 after a step with gain ratio > 0.75,
        x10 after a rejected one) or Nielsen's (1999) smooth update
        ``lambda *= max(1/3, 1 - (2 rho - 1)^3)`` on success and a doubling
        factor ``nu`` on failure (default; 2-4x fewer iterations than LsqFit's
        rule on the v3.2 sequence, same optima).
    backend : {"auto", "numba", "torch"}
        Physics backend (see :func:`sklearn_crb.physics.jacobian`).
    device : str
        Torch device of the solver (``"cpu"`` or ``"cuda"``; CUDA uses the
        torch physics backend).
    chunk_size : int
        Voxels per joblib task (bounds memory; the unit of parallel work).
    n_jobs : int or None
        joblib workers (``None``: the active ``joblib.parallel_config``; use
        ``-1`` with the dask backend).
    progress : bool
        Show a tqdm bar over voxels.
    random_state : int or None
        Seed of the dictionary start.

    Attributes
    ----------
    sequence_ : Sequence
    basis_ : ndarray or None
    estimate_ : tuple of str
    free_parameters_ : tuple of str
        Fitted parameters, in solver order.
    bounds_ : dict
        Effective ``{name: (low, high)}`` of the free parameters.
    starts_ : ndarray (n_starts, 8)
        Start values (ignored where ``init`` or the dictionary seeds).
    dictionary_ : DictionaryMatcher or None
    n_features_in_ : int
        ``2 K`` real features: ``[Re c, Im c]`` (K = rank or n_pulses).

    Notes
    -----
    The solver and the variable projection are described in the module
    docstring. ``predict_details`` returns per-voxel flags; failed voxels
    (non-finite or all-zero input, non-finite model, no convergence within
    ``max_iter`` or stalled damping) are kept, flagged and warned about with
    :class:`NLLSFitWarning`: ``predict`` returns NaN only for voxels whose
    input cannot be fitted, and the last iterate for the others.

    Examples
    --------
    >>> from sklearn_crb import Sequence
    >>> from sklearn_crb.nlls import NLLSFitter
    >>> from sklearn_crb.physics import simulate
    >>> seq = Sequence.default(n_pulses=120)
    >>> theta = [[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 50.0, 0.9]]
    >>> s = 0.8 * simulate(seq, theta)
    >>> nlls = NLLSFitter(seq, fixed={"omega0": 50.0, "B1": 0.9}).fit()
    >>> m0s_R1f_R2f = nlls.predict(s)
    """

    def __init__(self, sequence=None, basis=None, estimate=("m0s", "R1f", "R2f"), fixed=None, tied_R1=False,
                 bounds=None, start=None, init=None, prior=None, n_dictionary=2000, n_starts=1, sigma=None, max_iter=100,
                 gtol=1e-10, xtol=1e-8, ftol=1e-10, se_tol=1e-2, lambda0=1.0, damping="nielsen", backend="auto", device="cpu", chunk_size=256,
                 n_jobs=None, progress=False, random_state=None):
        self.sequence = sequence
        self.basis = basis
        self.estimate = estimate
        self.fixed = fixed
        self.tied_R1 = tied_R1
        self.bounds = bounds
        self.start = start
        self.init = init
        self.prior = prior
        self.n_dictionary = n_dictionary
        self.n_starts = n_starts
        self.sigma = sigma
        self.max_iter = max_iter
        self.gtol = gtol
        self.xtol = xtol
        self.se_tol = se_tol
        self.ftol = ftol
        self.lambda0 = lambda0
        self.damping = damping
        self.backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.n_jobs = n_jobs
        self.progress = progress
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def _check_positive(self, name, integer=False):
        v = getattr(self, name)
        ok = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.integer, np.floating))
        if isinstance(v, bool) or not ok or not np.isfinite(v) or v <= 0:
            kind = "a positive integer" if integer else "a positive finite number"
            raise ValueError(f"{name} must be {kind}, got {v!r}")

    def _effective_bounds(self, seq, free):
        user = _check_names(self.bounds, "bounds")
        TRF = np.asarray(seq.TRF)
        t2s_lo = TRF.max() / _R2SL_TRF_OVER_T2S[1]
        t2s_hi = TRF.min() / _R2SL_TRF_OVER_T2S[0]
        b1_hi = min(_R2SL_MAX_B1, _R2SL_MAX_B1_ALPHA / np.abs(seq.alpha).max())
        out = {}
        for name in free:
            lo, hi = DEFAULT_BOUNDS[name]
            if name == "T2s" and name not in user:
                lo, hi = max(lo, t2s_lo), min(hi, t2s_hi)
            if name == "B1" and name not in user:
                hi = min(hi, b1_hi)
            if name in user:
                try:
                    lo, hi = (float(v) for v in user[name])
                except (TypeError, ValueError):
                    raise TypeError(f"bounds[{name!r}] must be a (low, high) pair, got {user[name]!r}") from None
            plo, phi = BOUNDS[name]
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"bounds[{name!r}] must be finite with low < high, got ({lo}, {hi})")
            if lo < plo or hi > phi:
                raise ValueError(f"bounds[{name!r}] = ({lo:g}, {hi:g}) must lie inside the physical range "
                                 f"[{plo:g}, {phi:g}]")
            if name == "T2s" and (lo < t2s_lo * (1 - 1e-12) or hi > t2s_hi * (1 + 1e-12)):
                raise ValueError(f"bounds['T2s'] = ({lo:g}, {hi:g}) s leaves the R2sl table for this sequence "
                                 f"(TRF/T2s in [1, 150] needs T2s in [{t2s_lo:g}, {t2s_hi:g}] s)")
            if name == "B1" and hi > b1_hi * (1 + 1e-12):
                raise ValueError(f"bounds['B1'] upper bound {hi:g} leaves the R2sl table for this sequence "
                                 f"(B1 <= {b1_hi:g})")
            out[name] = (lo, hi)
        return out

    def _starts(self, free):
        base = dict(DEFAULT_START)
        if self.tied_R1:
            base["R1f"] = _TIED_R1_START
        base.update(self.fixed_)
        start = self.start
        if isinstance(start, str) or start is None:
            key = start or "default"
            if key not in ("default", "grid", "dictionary"):
                raise ValueError(f"start must be None, 'default', 'grid', 'dictionary', a dict or an array, "
                                 f"got {start!r}")
            rows = [np.array([base[p] for p in PARAMETERS])]
            if key == "grid":
                rows = []
                for m0s in (0.05, 0.25):
                    for R1f in (0.4, 1.2):
                        for R2f in (8.0, 25.0):
                            d = dict(base, m0s=m0s, R1f=R1f, R2f=R2f)
                            d.update(self.fixed_)
                            rows.append(np.array([d[p] for p in PARAMETERS]))
            return np.array(rows)
        if isinstance(start, dict):
            base.update(_check_names(start, "start"))
            base.update(self.fixed_)
            return np.array([[base[p] for p in PARAMETERS]], dtype=float)
        arr = np.asarray(start, dtype=float)
        if arr.ndim == 1:
            arr = arr[None]
        arr = validate_theta(arr, "start")
        return arr

    def fit(self, X=None, y=None):
        """Validate the model (cheap; ``start="dictionary"`` also builds the dictionary).

        Parameters
        ----------
        X : array_like, optional
            Data of the shape ``predict`` takes, only checked.
        y : ignored

        Returns
        -------
        self
        """

        seq = Sequence.resolve(self.sequence)
        self.sequence_ = seq
        self.basis_ = None if self.basis is None else check_basis(self.basis, seq.n_pulses)
        K = seq.n_pulses if self.basis_ is None else self.basis_.shape[1]
        self.fixed_ = {k: float(v) for k, v in _check_names(self.fixed, "fixed").items()}
        if self.tied_R1 and "R1s" in self.fixed_:
            raise ValueError("fixed cannot contain 'R1s' when tied_R1=True (R1s = R1f)")
        free = tuple(p for p in free_parameters(self.tied_R1) if p not in self.fixed_)
        if not free:
            raise ValueError("fixed leaves no parameter to fit")
        self.estimate_ = resolve_estimate(self.estimate, self.tied_R1)
        overlap = [p for p in self.estimate_ if p in self.fixed_]
        if overlap:
            raise ValueError(f"estimate and fixed overlap: {overlap}")
        if 2 * K < len(free) + 2:
            raise ValueError(f"the model has {len(free)} parameters plus complex M0 but the data only {2 * K} "
                             f"real values (basis rank {K}); fix parameters or use a larger basis")
        for name in ("max_iter", "chunk_size", "n_dictionary", "n_starts"):
            self._check_positive(name, integer=True)
        for name in ("gtol", "xtol", "ftol", "lambda0"):
            self._check_positive(name)
        if not (isinstance(self.se_tol, Real) and np.isfinite(self.se_tol) and self.se_tol >= 0):
            raise ValueError(f"se_tol must be a finite number >= 0, got {self.se_tol!r}")
        if self.sigma is not None:
            self._check_positive("sigma")
        if self.damping not in ("lsqfit", "nielsen"):
            raise ValueError(f"damping must be 'lsqfit' or 'nielsen', got {self.damping!r}")
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {self.backend!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda', "
                             f"got {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        self.free_parameters_ = free
        self.bounds_ = self._effective_bounds(seq, free)
        for name, v in self.fixed_.items():
            validate_theta(np.array([[v if p == name else DEFAULT_START[p] for p in PARAMETERS]]), "fixed")
        starts = self._starts(free)
        if self.tied_R1:
            starts[:, INDEX["R1s"]] = starts[:, INDEX["R1f"]]
        self.starts_ = starts
        if self.init is not None:
            if not hasattr(self.init, "predict"):
                raise TypeError(f"init must be a fitted estimator with predict, got {type(self.init).__name__}")
            check_is_fitted(self.init)
        self.dictionary_ = None
        if self.init is None and isinstance(self.start, str) and self.start == "dictionary":
            from sklearn_crb.estimators.dictionary import DictionaryMatcher

            self.dictionary_ = DictionaryMatcher(
                seq, basis=self.basis_, estimate=free, tied_R1=self.tied_R1, fixed=self.fixed_,
                prior=self.prior, n_atoms=self.n_dictionary, backend=self.backend,
                random_state=self.random_state).fit()
        self.n_features_in_ = 2 * K
        if X is not None:
            self._as_complex(X, "X")
        return self

    # ------------------------------------------------------------- predict
    def _as_complex(self, X, argname="X"):
        from sklearn_crb.estimators.dictionary import as_complex_data

        return as_complex_data(self, X, self.sequence_.n_pulses, self.basis_, argname)

    def _initial(self, X, y):
        """Scaled starts (n, n_starts, p) for the voxels."""
        free = self.free_parameters_
        n = y.shape[0]
        idx = [INDEX[q] for q in free]
        if self.init is not None or self.dictionary_ is not None:
            th = np.repeat(self.starts_[:1], n, axis=0)
            if self.init is not None:
                pred = np.asarray(self.init.predict(X), dtype=float).reshape(n, -1)
                names = tuple(getattr(self.init, "estimate_", self.estimate_))
                if pred.shape[1] != len(names):
                    raise ValueError(f"init.predict returned {pred.shape[1]} columns but init names {names}")
                for k, q in enumerate(names):
                    if q in free:
                        th[:, INDEX[q]] = np.where(np.isfinite(pred[:, k]), pred[:, k], th[:, INDEX[q]])
                th = th[:, None, :]
            else:
                det = self.dictionary_.predict_details(y, n_best=int(self.n_starts))
                th = det["theta_best"] if self.n_starts > 1 else det["theta"][:, None, :]
        else:
            th = np.broadcast_to(self.starts_[None], (n,) + self.starts_.shape)
        scale = np.array([SCALE[q] for q in free])
        lo = np.array([self.bounds_[q][0] for q in free])
        hi = np.array([self.bounds_[q][1] for q in free])
        return np.clip(th[..., idx], lo, hi) / scale

    def _problem(self):
        free = self.free_parameters_
        base = np.array([self.fixed_.get(p, DEFAULT_START[p]) for p in PARAMETERS])
        scale = np.array([SCALE[q] for q in free])
        return _Problem(
            sequence=self.sequence_, basis=self.basis_, free_idx=tuple(INDEX[q] for q in free),
            tied_R1=bool(self.tied_R1), base_theta=base, scale=scale,
            lo=np.array([self.bounds_[q][0] for q in free]) / scale,
            hi=np.array([self.bounds_[q][1] for q in free]) / scale,
            max_iter=int(self.max_iter), gtol=float(self.gtol), xtol=float(self.xtol), ftol=float(self.ftol),
            se_tol=float(self.se_tol),
            lambda0=float(self.lambda0), damping=self.damping, backend=self.backend, device=str(self.device))

    def predict_details(self, X):
        """Fit every voxel and return all results.

        Parameters
        ----------
        X : array_like
            Real features ``[Re c, Im c]`` (n, 2K), complex coefficients
            (n, K) or complex full signals (n, n_pulses) (projected on
            ``basis`` when one is set). NaN rows are allowed and flagged.

        Returns
        -------
        details : dict of ndarray, one row per voxel
            ``estimate`` (n, len(estimate_)) — what ``predict`` returns;
            ``theta`` (n, 8) all parameters (fixed ones filled in);
            ``M0`` complex (n,) in data units; ``residual_norm`` (n,)
            ``||y - M0 g(theta)||`` in data units; ``n_iter`` (n,);
            ``converged`` (n,) bool; ``status`` (n,) int, see ``STATUS``;
            ``failed`` (n,) bool (``status != 0``); ``at_bound`` (n, p) bool;
            ``sigma`` (n,) noise level used for the errors; ``crb`` (n,
            len(estimate_)) CRB at the estimate (squared SI units);
            ``std_error`` = sqrt(crb); ``free_parameters``, ``status_names``.
        """
        from tqdm.auto import tqdm

        check_is_fitted(self, "free_parameters_")
        y = self._as_complex(X)
        n, K = y.shape
        free = self.free_parameters_
        p = len(free)
        nanin = ~np.isfinite(y.view(np.float64)).reshape(n, -1).all(1)
        ynorm = np.linalg.norm(np.where(nanin[:, None], 0, y), axis=1)
        zeroin = ~nanin & (ynorm == 0)
        valid = np.flatnonzero(~nanin & ~zeroin)
        theta = np.full((n, 8), np.nan)
        M0 = np.full(n, np.nan + 0j)
        resid = np.full(n, np.nan)
        n_iter = np.zeros(n, dtype=np.int64)
        status = np.where(nanin, _NANIN, np.where(zeroin, _ZEROIN, _MAXIT)).astype(np.int64)
        g_all = np.zeros((n, K), dtype=np.complex128)
        dg_all = np.zeros((n, K, 8), dtype=np.complex128)
        x_all = np.full((n, p), np.nan)
        if valid.size:
            yv = y[valid] / ynorm[valid, None]
            x0 = np.ascontiguousarray(self._initial(_rows(X, valid) if self.init is not None else None, yv))
            prob = self._problem()
            cs = int(self.chunk_size)
            n_starts = x0.shape[1]
            step = max(1, cs // n_starts)
            slices = [slice(i, min(i + step, valid.size)) for i in range(0, valid.size, step)]
            par = Parallel(n_jobs=self.n_jobs, return_as="generator")
            gen = par(delayed(_fit_chunk)(prob, yv[sl], x0[sl]) for sl in slices)
            with tqdm(total=valid.size, disable=not self.progress, unit="voxel", desc="NLLS") as bar:
                for sl, res in zip(slices, gen):
                    idx = valid[sl]
                    theta[idx] = res["theta"]
                    M0[idx] = res["a"] * ynorm[idx]
                    resid[idx] = np.sqrt(res["cost"]) * ynorm[idx]
                    n_iter[idx] = res["n_iter"]
                    status[idx] = res["status"]
                    g_all[idx] = res["g"]
                    dg_all[idx] = res["dg"]
                    x_all[idx] = res["x"]
                    bar.update(sl.stop - sl.start)
        # a non-finite model is a failure of the fit, not of the input: theta stays the last iterate
        lo = np.array([self.bounds_[q][0] for q in free])
        hi = np.array([self.bounds_[q][1] for q in free])
        th_free = theta[:, [INDEX[q] for q in free]]
        tol = 1e-9 * (hi - lo)
        at_bound = (th_free <= lo + tol) | (th_free >= hi - tol)
        sigma, crb = self._standard_errors(g_all, dg_all, M0, resid, status, K, p)
        est = theta[:, [INDEX[q] for q in self.estimate_]]
        failed = status != _OK
        if failed.any():
            counts = {STATUS[s]: int((status == s).sum()) for s in np.unique(status[failed])}
            warnings.warn(f"NLLSFitter: {int(failed.sum())} of {n} voxels failed or did not converge {counts}; "
                          f"see predict_details()['status']", NLLSFitWarning, stacklevel=3)
        return {
            "estimate": est, "theta": theta, "M0": M0, "residual_norm": resid, "n_iter": n_iter,
            "converged": status == _OK, "status": status, "failed": failed, "at_bound": at_bound,
            "sigma": sigma, "crb": crb, "std_error": np.sqrt(crb),
            "free_parameters": free, "status_names": dict(STATUS),
        }

    def _standard_errors(self, g, dg, M0, resid, status, K, p):
        """CRB at the estimate, with sigma known or estimated from the residual."""
        from sklearn_crb.crb import IllConditionedFisherWarning, crb_from_jacobian

        n = g.shape[0]
        crb = np.full((n, len(self.estimate_)), np.nan)
        dof = 2 * K - p - 2
        sigma = np.full(n, np.nan) if self.sigma is None else np.full(n, float(self.sigma))
        if self.sigma is None:
            sigma = resid / np.sqrt(dof)
        ok = np.flatnonzero((status < _NANIN) & np.isfinite(M0) & (np.abs(M0) > 0))
        if ok.size:
            nuis = tuple(q for q in self.free_parameters_ if q not in self.estimate_)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedFisherWarning)
                unit = crb_from_jacobian(g[ok], dg[ok], estimate=self.estimate_, nuisance=nuis or None,
                                         tied_R1=self.tied_R1, on_singular="inf")
            crb[ok] = unit * (sigma[ok] ** 2 / np.abs(M0[ok]) ** 2)[:, None]
        return sigma, crb

    def predict(self, X, return_details=False):
        """Estimated parameters ``estimate_`` (n, len(estimate_)), SI units.

        Voxels whose input is non-finite or all zero get NaN; every failed or
        unconverged voxel is reported by an :class:`NLLSFitWarning`. With
        ``return_details=True`` also returns the dict of
        :meth:`predict_details`.
        """
        details = self.predict_details(X)
        if return_details:
            return details["estimate"], details
        return details["estimate"]

    def __sklearn_tags__(self):
        from sklearn_crb.estimators.dictionary import model_estimator_tags

        return model_estimator_tags(super().__sklearn_tags__())


def _rows(X, idx):
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(idx)]
    return np.asarray(X)[idx]
