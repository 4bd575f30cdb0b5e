"""The linear algebra of one batched Levenberg–Marquardt step (used by :mod:`.solver`; no model evaluations here).

All functions work on a batch of rows (voxels) with ``p`` scaled free
parameters: ``M`` (n, p, p) is a (damped) normal matrix, ``grad`` (n, p) the
gradient ``J^T r`` and ``keep`` (n, p) is 1 for the variables that may move
and 0 for those held at a bound by the gradient.
"""

from __future__ import annotations

import torch

__all__ = ["box_step", "se_and_gn_step", "broyden_update", "secant_update", "curvature_update"]

_BOX_PASSES = 8


def box_step(M, grad, keep, x, lo, hi, eye):
    """Step ``d`` that minimises ``q(d) = grad.d + d^T M d / 2`` over the box ``lo <= x + d <= hi``.

    A batched primal active-set method (at most eight passes): the minimiser
    over the free variables is solved; the variables it would carry across a
    bound are moved onto it and held, held variables whose multiplier says
    ``q`` decreases inwards are released, and the rest is solved again. A
    row stops when neither happens (the KKT conditions of this convex
    problem: its exact minimiser). Each pass's clipped point is a candidate
    and the one with the lowest ``q`` is returned, so the step is never
    worse than the plain clip of the unconstrained step (pass one). That
    clip is not the model's minimiser once a bound is crossed (the other
    variables were solved for the full move), and with a weakly identified
    parameter near its bound (T2s) such steps are often rejected.

    Returns ``(d, ok)``, ``ok`` (n,) False where ``M`` restricted to the free
    variables is not positive definite (``d`` is then not to be used). The
    solve is Jacobi-scaled, so a nearly flat direction does not spoil it.
    """
    Dj = torch.diagonal(M, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    Ms, gs = Dj[:, :, None] * M * Dj[:, None, :], Dj * grad
    lo_s, hi_s = (lo - x) / Dj, (hi - x) / Dj  # the box of the scaled step
    blocked = keep == 0
    held = blocked.clone()  # held at a bound (or by the gradient: never released)
    fixed = torch.zeros_like(grad)  # the scaled steps of the held variables
    best, best_q = None, None
    ok = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
    for k in range(_BOX_PASSES):
        free = (~held).to(M.dtype)
        L, info = torch.linalg.cholesky_ex(Ms * free[:, :, None] * free[:, None, :] + torch.diag_embed(1.0 - free))
        ok_k = info == 0
        b = -(gs + (Ms @ fixed[:, :, None])[..., 0]) * free
        ds = torch.cholesky_solve(b[:, :, None], torch.where(ok_k[:, None, None], L, eye))[..., 0] * free + fixed
        cand = torch.minimum(torch.maximum(ds, lo_s), hi_s)
        q = (gs * cand).sum(-1) + 0.5 * torch.einsum("ni,nij,nj->n", cand, Ms, cand)
        if k == 0:
            ok, best, best_q = ok_k, cand, q
        else:
            better = ok_k & (q < best_q)
            best, best_q = torch.where(better[:, None], cand, best), torch.where(better, q, best_q)
        over = ((ds > hi_s) | (ds < lo_s)) & ~held & ok_k[:, None]
        mult = gs + (Ms @ ds[:, :, None])[..., 0]  # dq/dd at the face's minimiser
        release = held & ~blocked & (((ds >= hi_s) & (mult > 0)) | ((ds <= lo_s) & (mult < 0))) & ~over.any(-1, True)
        if not bool((over | release).any()):
            break
        fixed = torch.where(over, cand, torch.where(release, torch.zeros_like(fixed), fixed))
        held = (held | over) & ~release
    return torch.minimum(torch.maximum(x + Dj * best, lo), hi) - x, ok


def se_and_gn_step(JTJ, grad, keep, s2, eye):
    """Standard errors (n, p) and the undamped Gauss–Newton step (n, p) of the variables in ``keep``.

    Both from the Jacobi-scaled normal matrix with the blocked variables
    removed; ``ok`` (n,) is False where that matrix is not positive definite.
    """
    Dj = torch.diagonal(JTJ, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    kk = keep[:, :, None] * keep[:, None, :]
    Ms = Dj[:, :, None] * JTJ * Dj[:, None, :] * kk + torch.diag_embed(1.0 - keep)
    L, info = torch.linalg.cholesky_ex(Ms)
    ok = info == 0
    L = torch.where(ok[:, None, None], L, eye)
    cov = torch.cholesky_inverse(L)
    se = (torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0) * s2[:, None]).sqrt() * Dj
    gn = -Dj * (cov @ (Dj * grad * keep)[:, :, None])[..., 0] * keep
    return se, gn, ok


def broyden_update(J, delta, r_new, r_old):
    """Broyden's rank-one update of a Jacobian ``J`` (n, K, p) along accepted steps ``delta`` (n, p).

    ``J + (r_new - r_old - J d) d^T / d^T d`` (Dennis & Schnabel 1983, ch. 8): the least change of ``J``
    that satisfies the secant condition ``J_new d = r_new - r_old`` of the step just taken.
    """
    d = delta.to(J.dtype)
    resid = r_new - r_old - (J @ d[:, :, None])[..., 0]
    dd = (delta**2).sum(-1).clamp_min(1e-300)
    return J + resid[:, :, None] * (d / dd[:, None])[:, None, :]


def secant_update(S, use_S, acc, accept, delta, grad_old, J_old, Jr, r, cost_new, pred_aug, pred_gn, exact):
    """NL2SOL's sized symmetric secant update of ``S`` on the accepted rows, and its model choice.

    With ``s`` the step, ``yv`` the change of the gradient and ``ys = (J_new - J_old)^H r_new``
    (Dennis, Gay & Welsch 1981, eqs. 3.5-3.8): S is first sized by
    ``min(1, |s.ys| / |s S s|)``, then ``S += (w y^T + y w^T) / y.s - (w.s) y y^T / (y.s)^2``,
    ``w = ys - S s``. The next step uses ``J^T J + S`` where that model predicted the
    accepted step's cost better than Gauss-Newton (and S stays zero on rows whose
    Jacobian is a Broyden update).
    """
    ex = exact[acc]
    rows, d = acc[ex], delta[accept][ex]
    if rows.numel() == 0:
        return
    Jn, rn, Jo = Jr[rows], r[rows], J_old[accept][ex]
    g_new = (Jn.conj() * rn[:, :, None]).sum(1).real
    yv = g_new - grad_old[accept][ex]
    ys = g_new - (Jo.conj() * rn[:, :, None]).sum(1).real
    Sr = S[rows]
    Ss = (Sr @ d[:, :, None])[..., 0]
    sSs, sys_ = (d * Ss).sum(-1), (d * ys).sum(-1)
    tau = torch.where(sSs.abs() > 0, (sys_.abs() / sSs.abs().clamp_min(1e-300)).clamp(max=1.0), torch.ones_like(sSs))
    Sr = Sr * tau[:, None, None]
    w = ys - tau[:, None] * Ss
    yd = (yv * d).sum(-1)
    good = yd.abs() > 1e-12 * yv.norm(dim=-1) * d.norm(dim=-1)
    yd = torch.where(good, yd, torch.ones_like(yd))
    upd = (w[:, :, None] * yv[:, None, :] + yv[:, :, None] * w[:, None, :]) / yd[:, None, None]
    upd = upd - ((w * d).sum(-1) / yd**2)[:, None, None] * yv[:, :, None] * yv[:, None, :]
    S[rows] = torch.where(good[:, None, None], Sr + upd, Sr)
    actual = cost_new[accept][ex]
    use_S[rows] = (actual - pred_aug[accept][ex]).abs() < (actual - pred_gn[accept][ex]).abs()


def curvature_update(S, use_S, rows, sel, delta, grad, JTJ, cost_old, cost_new):
    """Rank-one correction of ``S`` along rejected steps, from the cost at the trial point.

    Along a step ``d`` the quadratic model predicts ``cost(x + d) = c + 2 g.d + d^T (J^T J + S) d``;
    the trial's actual cost gives the curvature ``a = cost(x + d) - c - 2 g.d`` along ``d``. Where ``a``
    exceeds the model's (the step overshot: the usual reason for a rejection near a minimum in a
    sloppy direction), ``S += (a - d^T (J^T J + S) d) d d^T / |d|^4`` and the row uses the augmented
    model, so the next trial shortens the step along ``d`` only, instead of damping every direction.
    ``rows`` are the batch's voxel indices and ``sel`` (len(rows),) the rejected trials to use.
    """
    if not bool(sel.any()):
        return
    d, idx = delta[sel], rows[sel]
    Sr = S[idx]
    a = cost_new[sel] - cost_old[sel] - 2.0 * (grad[sel] * d).sum(-1)
    model = torch.einsum("ni,nij,nj->n", d, JTJ[sel] + Sr, d)
    dd = (d * d).sum(-1)
    excess = torch.where(torch.isfinite(a) & (dd > 0), (a - model).clamp_min(0), torch.zeros_like(a))
    S[idx] = Sr + (excess / dd.clamp_min(1e-300) ** 2)[:, None, None] * d[:, :, None] * d[:, None, :]
    use_S[idx] = use_S[idx] | (excess > 0)
