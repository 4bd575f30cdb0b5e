"""The batched variable-projection Levenberg–Marquardt solver behind ``NLLSFitter`` (no sklearn here).

Nonlinear least squares of the generalized-Bloch model (Assländer et al.,
"Generalized Bloch model: a theory for pulsed magnetization transfer", MRM
2022), as in ``fit_gBloch`` of MRIgeneralizedBloch.jl (LsqFit's
Levenberg–Marquardt), with two changes:

* **Variable projection** (Golub & Pereyra, SIAM J Numer Anal 10:413, 1973).
  The complex ``M0`` enters linearly, so for every ``theta`` it has the closed
  form ``M0(theta) = g^H y / ||g||^2`` (``g = U^H s(theta)``) and the problem
  reduces to ``min_theta ||r(theta)||^2`` with ``r = P_perp(theta) y``,
  ``P_perp = I - g g^H / ||g||^2``. The solver uses the *exact* Jacobian of
  this reduced residual (the full Golub–Pereyra form, not Kaufman's
  simplification, which drops the second term)::

      dr/dtheta_k = -P_perp (M0 dg_k) - g (dg_k^H r) / ||g||^2

  with ``dg_k = U^H ds/dtheta_k`` exact from
  :func:`sklearn_crb.physics.signal.jacobian`.
* **Batched**: every voxel has its own damping ``lambda``, step acceptance
  and convergence test, and its own fixed parameter values (``base``, e.g. a
  measured B1 map); converged voxels leave the active set.

The LM step follows LsqFit: ``(J^T J + lambda diag(D)) delta = -J^T r`` with
``D = max(diag(J^T J), 1e-6)``, accepted if the cost decreases with gain
ratio ``rho > 1e-3``; in the box, the step is the minimiser of that model
over the box (active-set passes, :func:`.steps.box_step`), not the
clipped unconstrained step. ``damping="lsqfit"`` divides
``lambda`` by 10 if ``rho > 0.75`` and multiplies it by 10 on a rejection;
``damping="nielsen"`` is Nielsen's smoother update (IMM-REP-1999-05).
Warm starts (a network's estimates) are served by a convergence test at the
current point, before any trial step (the undamped Gauss–Newton step below a
fraction of a standard error), by a low ``lambda0``, and optionally by
Broyden updates of the Jacobian between exact ones (``jacobian_reuse``),
geodesic acceleration (Transtrum & Sethna, arXiv 1201.5885) and NL2SOL's
secant second-order term with the curvature of rejected trials (``secant``); see
:func:`lm_solve`. Parameters are optimised in units of ``physics.parameters.SCALE`` and each
voxel's data have unit norm, so the tolerances mean the same for every voxel.
No voxel is reported converged unless its cost is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sklearn_crb.crb import project
from sklearn_crb.estimators.nlls.steps import box_step, broyden_update, curvature_update, se_and_gn_step, secant_update
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.physics.signal import jacobian, simulate

__all__ = ["STATUS", "OK", "MAXIT", "NANIN", "ZEROIN", "NANMODEL", "NANOUT", "INVALID_FIXED", "Problem", "varpro",
           "reduced_jacobian", "cost", "lm_solve", "LMState", "fit_chunk"]

_DTYPE = torch.float64

#: Per-voxel status codes (code 2, once "unused", is retired; the others keep their numbers).
STATUS = {0: "converged", 1: "max_iter", 3: "nonfinite_input", 4: "zero_input", 5: "nonfinite_model",
          6: "nonfinite_output", 7: "invalid_fixed"}
OK, MAXIT, NANIN, ZEROIN, NANMODEL, NANOUT, INVALID_FIXED = 0, 1, 3, 4, 5, 6, 7

_LAMBDA_MIN, _LAMBDA_MAX = 1e-16, 1e16
#: the remaining-distance stop uses a tenth of se_tol: its error is the GN step itself, while an
#: accepted step of se_tol standard errors leaves a much smaller (quadratically shrunk) error
_GN_STOP = 0.1
_GEO_ALPHA = 0.75  # largest accepted 2 |a| / |v| (Transtrum & Sethna)


@dataclass
class Problem:
    """Everything a worker needs (picklable: shipped to joblib/dask workers)."""

    sequence: Sequence
    basis: np.ndarray | None  # (N, r) complex
    free_idx: tuple
    tied_R1: bool
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
    jacobian_reuse: int = 0  # consecutive Broyden updates allowed between exact Jacobians
    geodesic: bool = False  # geodesic acceleration of the LM step
    secant: bool = False  # NL2SOL's secant estimate of the second-order term of the Hessian
    final_step: bool = False  # a last (augmented) Gauss-Newton step at the stop, with no new Jacobian

    def theta(self, x, base):
        """Full (n, 8) parameters from scaled free parameters x (n, p) and per-row fixed values base (n, 8)."""
        th = base.clone()
        th[:, list(self.free_idx)] = x * torch.as_tensor(self.scale, dtype=_DTYPE, device=x.device)
        if self.tied_R1:
            th[:, INDEX["R1s"]] = th[:, INDEX["R1f"]]
        return th

    def _project(self, s):
        if self.basis is None:
            return s
        return project(torch.as_tensor(self.basis), s)

    def model(self, x, base):
        """g(theta) (n, K) complex at M0 = 1 (NaN rows where the model is not finite)."""
        return self._project(_rowwise_safe(simulate, self.sequence, self.theta(x, base), self.backend)[0])

    def model_and_jacobian(self, x, base):
        """g (n, K) and dg/dtheta (n, K, 8) in SI units, all 8 columns (NaN rows where not finite)."""
        s, J = _rowwise_safe(jacobian, self.sequence, self.theta(x, base), self.backend)
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


def _rowwise_safe(fn, sequence, th, backend):
    """``fn(sequence, th)`` (simulate or jacobian) as a tuple; NaN rows instead of an error.

    The physics raises on a non-finite model (never silent NaN). One such
    trial point must not abort a chunk of voxels, so on that error (rare: the
    box keeps theta physical) the rows are evaluated one by one and the
    failing ones come back as NaN, which the solver flags ``nonfinite_model``.
    """
    try:
        out = fn(sequence, th, backend=backend)
        return out if isinstance(out, tuple) else (out,)
    except ValueError:
        if th.shape[0] == 1:
            raise
    rows = []
    for i in range(th.shape[0]):  # error path only
        try:
            rows.append(_rowwise_safe(fn, sequence, th[i:i + 1], backend))
        except ValueError:
            rows.append(None)
    N = sequence.n_pulses
    shapes = [(1, N)] if fn is simulate else [(1, N), (1, N, 8)]
    nan = [torch.full(sh, complex("nan+nanj"), dtype=torch.complex128, device=th.device) for sh in shapes]
    return tuple(torch.cat([nan[k] if r is None else r[k] for r in rows]) for k in range(len(shapes)))


def varpro(g, y):
    """Closed-form complex M0 and the projected residual ``y - M0 g``."""
    gg = (g.real**2 + g.imag**2).sum(-1)
    a = (g.conj() * y).sum(-1) / gg
    r = y - a[:, None] * g
    return a, r, gg


def reduced_jacobian(g, dgx, a, r, gg):
    """Exact (Golub–Pereyra) Jacobian of ``r(theta) = P_perp(theta) y``, complex (n, K, p)."""
    Pdg = dgx - g[:, :, None] * ((g.conj()[:, :, None] * dgx).sum(1) / gg[:, None])[:, None, :]
    second = g[:, :, None] * ((dgx.conj() * r[:, :, None]).sum(1) / gg[:, None])[:, None, :]
    return -a[:, None, None] * Pdg - second


def cost(r):
    """Squared residual norm per row."""
    return (r.real**2 + r.imag**2).sum(-1)


def _all_finite(z):
    return torch.isfinite(torch.view_as_real(z)).flatten(1).all(1)


def lm_solve(prob, y, x0, base):
    """Batched bounded LM on the variable-projected problem.

    Parameters
    ----------
    y : complex tensor (n, K), unit norm per row.
    x0 : real tensor (n, p), scaled start inside the box.
    base : real tensor (n, 8), the fixed parameter values of each row.

    Returns
    -------
    dict of tensors: x, a (M0 of the normalised data), cost, n_iter (trial
    steps), n_jac (exact Jacobians), status, g, dg (model and full exact
    Jacobian at x, for the CRB).

    Notes
    -----
    Each iteration first tests convergence at the current point: the
    projected gradient (``gtol``) and, with ``se_tol > 0``, the *undamped*
    Gauss–Newton step, which estimates the distance to the minimum: if it
    moves every parameter by at most ``se_tol / 10`` standard errors the row
    stops without a trial evaluation. Both tests need the exact Jacobian, so
    a row whose Jacobian is a Broyden update gets the exact one first. Then
    an LM step is tried (one model evaluation) and accepted only if the cost
    decreases (gain ratio ``rho > 1e-3``): accepted costs never increase.
    After an accepted step the Jacobian is either evaluated exactly or, with
    ``jacobian_reuse = m > 0``, updated by Broyden's rank-one formula
    ``J += (r_new - r - J dx) dx^T / dx^T dx`` (Dennis & Schnabel 1983,
    ch. 8) for at most ``m`` consecutive steps; a step rejected with a
    Broyden Jacobian triggers an exact one instead of more damping. The step
    (``xtol``) and cost (``ftol``) stops count only on steps from an exact
    Jacobian, and ``g``/``dg`` returned are always exact at ``x``, except
    with ``final_step``: a row that stops then takes its remaining
    (augmented) Gauss–Newton box step where it lowers the cost (one model
    evaluation, see :func:`_final_step`), and ``dg`` is the exact Jacobian
    of the point the stop was decided at, or of the new point where the step
    moved a parameter by more than ``se_tol`` standard errors.
    """
    state = LMState(prob, y, x0, base)
    for _ in range(int(prob.max_iter)):
        if state.active.numel() == 0:
            break
        state.iterate()
    return state.result()


class _Stops:
    """The convergence tests of one iteration on the active rows ``A`` (all tensors indexed like ``A``)."""

    __slots__ = ("A", "J", "r", "cost", "exact", "grad", "x", "keep", "JTJ", "stop", "se", "ok_se", "gn", "ok_gn")


class _Trial:
    """One trial step of the moving rows ``B``: the step, its point and what the model predicted there."""

    __slots__ = ("B", "J", "r", "cost", "x", "keep", "JTJ", "grad", "delta", "ok", "aug", "xt", "pred", "pred_gn",
                 "pred_aug", "gt", "at", "rt", "cost_t", "rho", "accept", "exact")


class LMState:
    """The state of a batched LM solve (one row per voxel and start), advanced by :meth:`iterate`.

    Each iteration runs the named phases in order: :meth:`_test_stops` (convergence at the current
    point), :meth:`_take_stops`, :meth:`_propose` (the damped box step, optionally geodesic),
    :meth:`_evaluate` (one model evaluation and the gain ratio), :meth:`_update_damping`,
    :meth:`_numerical_stops`, :meth:`_move` (accepted points, Broyden updates, exact Jacobians where
    due, NL2SOL's secant update) and :meth:`_mark_converged`. Tensors are indexed by row; ``active``
    holds the rows still iterating.
    """

    def __init__(self, prob, y, x0, base):
        n, p = x0.shape
        dev = x0.device
        self.prob, self.y, self.base = prob, y, base
        self.lo = torch.as_tensor(prob.lo, dtype=_DTYPE, device=dev)
        self.hi = torch.as_tensor(prob.hi, dtype=_DTYPE, device=dev)
        self.x = torch.minimum(torch.maximum(x0.clone(), self.lo), self.hi)
        self.g, self.dg = prob.model_and_jacobian(self.x, base)
        self.a, self.r, gg = varpro(self.g, y)
        self.cst = cost(self.r)
        self.status = torch.full((n,), MAXIT, dtype=torch.int64, device=dev)
        self.n_iter = torch.zeros(n, dtype=torch.int64, device=dev)
        self.n_jac = torch.ones(n, dtype=torch.int64, device=dev)
        self.lam = torch.full((n,), float(prob.lambda0), dtype=_DTYPE, device=dev)
        self.nu = torch.full((n,), 2.0, dtype=_DTYPE, device=dev)
        self.exact = torch.ones(n, dtype=torch.bool, device=dev)  # Jr (and dg) exact at x
        self.n_reuse = torch.zeros(n, dtype=torch.int64, device=dev)
        finite = torch.isfinite(self.cst) & (gg > 0) & _all_finite(self.dg)
        self.status[~finite] = NANMODEL
        self.active = torch.nonzero(finite).ravel()
        self.Jr = torch.zeros((n, self.g.shape[1], p), dtype=self.g.dtype, device=dev)
        A = self.active
        if A.numel():
            self.Jr[A] = reduced_jacobian(self.g[A], prob.free_columns(self.dg[A]), self.a[A], self.r[A], gg[A])
        self.eye = torch.eye(p, dtype=_DTYPE, device=dev)
        self.dof = max(2 * self.g.shape[1] - p - 2, 1)
        self.reuse = int(prob.jacobian_reuse)
        # NL2SOL (Dennis, Gay & Welsch, ACM TOMS 7:348, 1981): S estimates sum_i r_i Hess(r_i), which Gauss-Newton
        # drops; it makes convergence superlinear where the residual is not small against the curvature
        self.S = torch.zeros((n, p, p), dtype=_DTYPE, device=dev) if prob.secant else None
        self.use_S = torch.zeros(n, dtype=torch.bool, device=dev)
        self.finish = torch.zeros(n, dtype=torch.bool, device=dev)  # stopped on a small step: final step pending
        self.n_final = torch.zeros(n, dtype=torch.int64, device=dev)  # final steps taken (0 or 1)

    def refresh(self, idx):
        """Exact model, Jacobian and residual at x[idx]; rows whose model is not finite are flagged."""
        ga, dga = self.prob.model_and_jacobian(self.x[idx], self.base[idx])
        aa, ra, gga = varpro(ga, self.y[idx])
        good = torch.isfinite(cost(ra)) & _all_finite(dga)
        self.g[idx], self.dg[idx], self.a[idx], self.r[idx], self.cst[idx] = ga, dga, aa, ra, cost(ra)
        self.Jr[idx] = reduced_jacobian(ga, self.prob.free_columns(dga), aa, ra, gga)
        self.exact[idx] = True
        self.n_reuse[idx] = 0
        self.n_jac[idx] += 1
        self.status[idx[~good]] = NANMODEL

    def iterate(self):
        """One LM iteration of the active rows."""
        A = self.active
        t = self._test_stops(A)
        move = self._take_stops(t)
        B = A[move]
        if B.numel():
            tr = self._propose(t, move)
            self._evaluate(tr)
            self._update_damping(tr)
            num_stop = self._numerical_stops(tr, t, move)
            self._move(tr, num_stop)
            self._mark_converged(tr.B, num_stop)
        self.active = A[self.status[A] == MAXIT]

    # ---------------------------------------------------------------- phases
    def _test_stops(self, A):
        """The gradient, cost and (``se_tol``) statistical stops at the current point of rows ``A``."""
        prob, t = self.prob, _Stops()
        t.A, t.J, t.r, t.cost, t.exact = A, self.Jr[A], self.r[A], self.cst[A], self.exact[A]
        t.grad = (t.J.conj() * t.r[:, :, None]).sum(1).real
        t.x = self.x[A]
        blocked = ((t.x <= self.lo) & (t.grad > 0)) | ((t.x >= self.hi) & (t.grad < 0))
        t.keep = (~blocked).to(_DTYPE)
        done_grad = (t.grad * t.keep).abs().amax(-1) < prob.gtol
        t.JTJ = (t.J.conj().transpose(1, 2) @ t.J).real
        t.stop = done_grad | (t.cost <= 1e-28) | self.finish[A]
        t.se = t.ok_se = t.gn = t.ok_gn = None
        if prob.se_tol > 0:
            # statistical stop: the Gauss-Newton step, i.e. the estimated distance to the minimum, is below
            # se_tol standard errors in every parameter (noise from the residual; never on noiseless data)
            t.se, _, t.ok_se = se_and_gn_step(t.JTJ, t.grad, t.keep, t.cost / self.dof, self.eye)
            t.gn, t.ok_gn = self._distance_to_minimum(t)
            t.stop = t.stop | (t.ok_se & t.ok_gn & (t.gn.abs() <= _GN_STOP * prob.se_tol * t.se).all(-1))
        return t

    def _distance_to_minimum(self, t):
        """The (augmented) Gauss-Newton box step of rows ``t.A``: the distance to the minimum in the box."""
        S, A = self.S, t.A
        H = t.JTJ + S[A] * self.use_S[A, None, None] if S is not None else t.JTJ
        gn, ok_gn = box_step(H, t.grad, t.keep, t.x, self.lo, self.hi, self.eye)
        if S is not None and bool((~ok_gn).any()):  # augmented model not positive definite: Gauss-Newton
            gn_j, ok_j = box_step(t.JTJ, t.grad, t.keep, t.x, self.lo, self.hi, self.eye)
            gn, ok_gn = torch.where(ok_gn[:, None], gn, gn_j), ok_gn | ok_j
        return gn, ok_gn

    def _take_stops(self, t):
        """Mark the stopped rows converged (a stop on a Broyden Jacobian is re-checked with the exact one);
        returns the mask of the rows of ``t.A`` that move on."""
        prob, A = self.prob, t.A
        stale = A[t.stop & ~t.exact]
        conv = t.stop & t.exact & torch.isfinite(t.cost)
        self.status[A[conv]] = OK
        if prob.final_step and prob.se_tol > 0 and bool(conv.any()):
            far = _final_step(prob, self.y, self.base, A[conv], (t.gn * t.ok_gn[:, None])[conv], t.se[conv], self.x,
                              self.g, self.a, self.r, self.cst, self.lo, self.hi, self.n_final)
            stale = torch.cat([stale, far])  # a final step beyond se_tol standard errors: exact Jacobian there
        if stale.numel():
            self.refresh(stale)
        return ~t.stop

    def _propose(self, t, move):
        """The damped step of the moving rows: the model's minimiser over the box (variables held at a bound
        by the gradient stay), optionally with geodesic acceleration, and its predicted cost."""
        tr, S, lam = _Trial(), self.S, self.lam
        tr.B = B = t.A[move]
        tr.J, tr.r, tr.cost, tr.x, tr.keep = t.J[move], t.r[move], t.cost[move], t.x[move], t.keep[move]
        tr.JTJ, tr.grad = t.JTJ[move], t.grad[move]
        D = torch.clamp(torch.diagonal(tr.JTJ, dim1=1, dim2=2), min=1e-6)
        HB = tr.JTJ + S[B] * self.use_S[B, None, None] if S is not None else tr.JTJ
        M = HB + lam[B, None, None] * torch.diag_embed(D)
        delta, ok = box_step(M, tr.grad, tr.keep, tr.x, self.lo, self.hi, self.eye)
        tr.aug = self.use_S[B] & ok  # rows whose step comes from the augmented model
        if S is not None and bool((~ok).any()):  # augmented model not positive definite: Gauss-Newton
            d_gn, ok_d = box_step(tr.JTJ + lam[B, None, None] * torch.diag_embed(D), tr.grad, tr.keep, tr.x,
                                  self.lo, self.hi, self.eye)
            delta, ok = torch.where(ok[:, None], delta, d_gn), ok | ok_d
        tr.ok = ok
        tr.xt = torch.minimum(torch.maximum(tr.x + delta, self.lo), self.hi)  # exactly inside (the step is rounded)
        tr.delta = delta
        if self.prob.geodesic:
            self._geodesic(tr, M)
        pred = cost(tr.r + (tr.J @ tr.delta.to(tr.J.dtype)[:, :, None])[..., 0])
        tr.pred_gn = tr.pred_aug = pred
        if S is not None:
            tr.pred_aug = pred + torch.einsum("ni,nij,nj->n", tr.delta, S[B], tr.delta)
            pred = torch.where(tr.aug, tr.pred_aug, tr.pred_gn)
        tr.pred = pred
        return tr

    def _geodesic(self, tr, M):
        """Geodesic acceleration (Transtrum & Sethna, arXiv 1201.5885): the second directional derivative of
        r along the step by one extra model evaluation, ``a = -M^-1 J^T r_vv``, step ``v + a / 2``."""
        h, B, delta, eye = 0.1, tr.B, tr.delta, self.eye
        rh = varpro(self.prob.model(tr.x + h * delta, self.base[B]), self.y[B])[1]
        rvv = (2.0 / h) * ((rh - tr.r) / h - (tr.J @ delta.to(tr.J.dtype)[:, :, None])[..., 0])
        gvv = (tr.J.conj() * rvv[:, :, None]).sum(1).real
        kB = tr.keep
        L = torch.linalg.cholesky_ex(M * kB[:, :, None] * kB[:, None, :] + torch.diag_embed(1.0 - kB))[0]
        acc_g = torch.cholesky_solve(-(gvv * kB)[:, :, None], torch.where(tr.ok[:, None, None], L, eye))[..., 0]
        geo_ok = torch.isfinite(acc_g).all(-1) & (2 * acc_g.norm(dim=-1) <= _GEO_ALPHA * delta.norm(dim=-1))
        xg = torch.minimum(torch.maximum(tr.x + delta + 0.5 * torch.nan_to_num(acc_g), self.lo), self.hi)
        tr.xt = torch.where(geo_ok[:, None], xg, tr.xt)
        tr.delta = tr.xt - tr.x

    def _evaluate(self, tr):
        """The model at the trial point (one evaluation), the gain ratio and the acceptance."""
        B = tr.B
        tr.gt = self.prob.model(tr.xt, self.base[B])
        tr.at, tr.rt, ggt = varpro(tr.gt, self.y[B])
        tr.cost_t = cost(tr.rt)
        self.n_iter[B] += 1
        tr.rho = (tr.cost_t - tr.cost) / (tr.pred - tr.cost)
        good_t = torch.isfinite(tr.cost_t) & (ggt > 0)
        tr.accept = tr.ok & good_t & (tr.cost_t < tr.cost) & (tr.rho > 1e-3)
        tr.exact = self.exact[B]
        if self.S is not None:  # a rejected trial measures the cost's curvature along its step: correct S there
            curvature_update(self.S, self.use_S, B, ~tr.accept & tr.ok & good_t & tr.exact, tr.delta, tr.grad,
                             tr.JTJ, tr.cost, tr.cost_t)

    def _update_damping(self, tr):
        """LsqFit's or Nielsen's (1999) update of lambda (a rejection with a Broyden Jacobian says nothing
        about the damping)."""
        B, accept, rho, lam, nu = tr.B, tr.accept, tr.rho, self.lam, self.nu
        damp = accept | tr.exact
        if self.prob.damping == "lsqfit":
            lam_new = torch.where(accept & (rho > 0.75), torch.clamp(lam[B] * 0.1, min=_LAMBDA_MIN), lam[B])
            lam_new = torch.where(~accept & damp, torch.clamp(lam[B] * 10.0, max=_LAMBDA_MAX), lam_new)
        else:  # Nielsen (1999): smooth decrease on success, doubling increase factor on failure
            shrink = torch.clamp(1.0 - (2.0 * rho - 1.0) ** 3, min=1.0 / 3.0)
            shrink = torch.nan_to_num(shrink, nan=1.0 / 3.0)
            lam_new = torch.where(accept, torch.clamp(lam[B] * shrink, min=_LAMBDA_MIN), lam[B])
            lam_new = torch.where(~accept & damp, torch.clamp(lam[B] * nu[B], max=_LAMBDA_MAX), lam_new)
            nu[B] = torch.where(accept, torch.full_like(nu[B], 2.0), torch.where(damp, 2.0 * nu[B], nu[B]))
        lam[B] = lam_new

    def _numerical_stops(self, tr, t, move):
        """Step, cost-decrease and lambda-at-maximum stops (a minimum to machine precision), counted only on a
        step from an exact Jacobian; with ``se_tol``, also an accepted step below se_tol standard errors."""
        prob = self.prob
        dx_small = tr.delta.norm(dim=-1) < prob.xtol * (prob.xtol + tr.xt.norm(dim=-1))
        if prob.se_tol > 0:
            dx_small = dx_small | (t.ok_se[move] & (tr.delta.abs() <= prob.se_tol * t.se[move]).all(-1))
        df_small = (tr.cost - tr.cost_t) <= prob.ftol * tr.cost
        return tr.exact & ((tr.accept & (dx_small | df_small)) | (self.lam[tr.B] >= _LAMBDA_MAX))

    def _move(self, tr, num_stop):
        """Move the accepted rows; Broyden-update their Jacobian or evaluate it exactly, as due."""
        B, accept, reuse = tr.B, tr.accept, self.reuse
        acc = B[accept]
        if acc.numel():
            self.x[acc] = tr.xt[accept]
            if reuse > 0:
                self.Jr[acc] = broyden_update(tr.J[accept], tr.delta[accept], tr.rt[accept], tr.r[accept])
                self.g[acc], self.a[acc], self.r[acc], self.cst[acc] = (tr.gt[accept], tr.at[accept], tr.rt[accept],
                                                                        tr.cost_t[accept])
                self.exact[acc] = False
                self.n_reuse[acc] += 1
        # exact Jacobian: after an accepted step unless Broyden may still be used, after a numerical stop
        # (for g, dg at x), and after a step rejected with a Broyden Jacobian
        need = (accept & ((reuse == 0) | (self.n_reuse[B] > reuse) | num_stop)) | (~accept & ~tr.exact)
        nb = B[need]
        if nb.numel():
            self.refresh(nb)
        if self.S is not None and acc.numel():
            secant_update(self.S, self.use_S, acc, accept, tr.delta, tr.grad, tr.J, self.Jr, self.r, tr.cost_t,
                          tr.pred_aug, tr.pred_gn, self.exact)

    def _mark_converged(self, B, num_stop):
        conv_b = num_stop & torch.isfinite(self.cst[B]) & (self.status[B] == MAXIT)
        if self.prob.final_step and self.prob.se_tol > 0:  # the stop is taken next iteration, with its final step
            self.finish[B[conv_b]] = True
        else:
            self.status[B[conv_b]] = OK

    def result(self):
        """The solve's outcome (see :func:`lm_solve`), with exact ``g``/``dg`` at ``x`` on every row."""
        self.status[self.finish & (self.status == MAXIT)] = OK  # stopped on the last iteration, before the final step
        # rows left with a Broyden Jacobian (max_iter) get the exact one at x, for the CRB
        stale = torch.nonzero(~self.exact & (self.status == MAXIT)).ravel()
        if stale.numel():
            self.refresh(stale)
        return {"x": self.x, "a": self.a, "cost": self.cst, "n_iter": self.n_iter, "n_jac": self.n_jac,
                "status": self.status, "g": self.g, "dg": self.dg, "n_final": self.n_final}


def _final_step(prob, y, base, idx, step, se, x, g, a, r, cst, lo, hi, n_final):
    """Take the last (augmented) Gauss-Newton box step of the stopped rows ``idx`` where it lowers the cost.

    One model evaluation: ``x``, ``g``, ``a``, ``r`` and the cost move to the new point (in place). ``dg``
    stays the exact Jacobian of the point the stop was decided at where the step moved every parameter
    by at most ``se_tol`` of its standard errors ``se`` (there the CRB is a fraction of a standard error
    away); the rows returned moved farther, and the caller evaluates their exact Jacobian at the new
    point (one more Jacobian there). The stop's remaining distance is thus removed for the price of a
    simulation in most voxels.
    """
    xt = torch.minimum(torch.maximum(x[idx] + step, lo), hi)
    gt = prob.model(xt, base[idx])
    at, rt, ggt = varpro(gt, y[idx])
    ct = cost(rt)
    better = torch.isfinite(ct) & (ggt > 0) & (ct < cst[idx]) & (step.abs().amax(-1) > 0)
    k = idx[better]
    x[k], g[k], a[k], r[k], cst[k] = xt[better], gt[better], at[better], rt[better], ct[better]
    n_final[k] = 1
    return k[((step[better].abs() > prob.se_tol * se[better]).any(-1))]


def fit_chunk(prob, y, x0, base):
    """Fit one chunk of voxels (runs in a joblib/dask worker).

    Parameters
    ----------
    y : ndarray complex (n, K), unit-norm rows.
    x0 : ndarray (n, n_starts, p) scaled starts.
    base : ndarray (n, 8) fixed parameter values per voxel.

    Returns a dict of numpy arrays; for several starts the best (lowest
    cost, failures last) is kept per voxel.
    """
    n, n_starts, p = x0.shape
    dev = torch.device(prob.device)
    yt = torch.as_tensor(y, device=dev)
    yrep = yt.repeat_interleave(n_starts, dim=0)
    brep = torch.as_tensor(base, dtype=_DTYPE, device=dev).repeat_interleave(n_starts, dim=0)
    res = lm_solve(prob, yrep, torch.as_tensor(x0.reshape(n * n_starts, p), dtype=_DTYPE, device=dev), brep)
    c = torch.where(res["status"] >= NANIN, torch.full_like(res["cost"], float("inf")), res["cost"])
    c = torch.nan_to_num(c, nan=float("inf"))
    best = c.view(n, n_starts).argmin(1) + torch.arange(n, device=dev) * n_starts
    out = {k: v[best].cpu().numpy() for k, v in res.items()}
    out["theta"] = prob.theta(res["x"][best], brep[best]).cpu().numpy()
    return out
