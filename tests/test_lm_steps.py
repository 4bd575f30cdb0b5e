"""The linear algebra of one LM step (estimators/nlls/steps.py): the box-constrained step against an exact
bounded least-squares solver, and the curvature correction of rejected steps."""

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear

from sklearn_crb.estimators.nlls.steps import box_step, curvature_update


def _q(M, g, d):
    return g @ d + 0.5 * d @ M @ d


def _problems(n, p, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, p, p))
    C = np.eye(p) + 0.95 * (np.ones((p, p)) - np.eye(p))  # strongly correlated, like T2s/Rex/B1
    M = np.einsum("nij,nkj->nik", A, A) * 0.2 + C
    g = rng.standard_normal((n, p)) * 3
    x = rng.uniform(-1, 1, (n, p))
    lo, hi = -np.ones(p), np.ones(p)
    return M, g, x, lo, hi


def _box(M, g, x, lo, hi, keep=None):
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    keep = np.ones_like(g) if keep is None else keep
    d, ok = box_step(t(M), t(g), t(keep), t(x), t(lo), t(hi), torch.eye(M.shape[-1], dtype=torch.float64))
    return d.numpy(), ok.numpy()


def test_interior_step_is_the_newton_step():
    M, g, x, lo, hi = _problems(50, 5, 0)
    d, ok = _box(M, g * 1e-4, x * 0, lo, hi)  # tiny gradient from the centre: no bound is reached
    assert ok.all()
    np.testing.assert_allclose(d, -np.linalg.solve(M, g[:, :, None] * 1e-4)[..., 0], rtol=1e-9, atol=1e-15)


def test_correlated_step_across_a_bound_is_resolved():
    """A plain clip keeps the other variable's move, solved for the full one; the box step re-solves it."""
    M = np.array([[[1.0, 0.9], [0.9, 1.0]]])
    g = np.array([[-2.0, 0.0]])
    d, ok = _box(M, g, np.zeros((1, 2)), np.array([-10.0, -10.0]), np.array([1.0, 10.0]))
    unconstrained = -np.linalg.solve(M[0], g[0])
    assert unconstrained[0] > 1 and unconstrained[1] < -9  # the clip would be (1, -9.5)
    np.testing.assert_allclose(d[0], [1.0, -0.9], atol=1e-12)  # the minimiser on the face d1 = 1
    assert ok.all()


def test_box_step_against_bounded_least_squares():
    """Over random correlated problems the step is feasible, never worse than the clipped Newton step,
    and equal to the exact box minimiser (scipy's BVLS) in nearly all of them (eight active-set passes)."""
    n, p = 300, 6
    M, g, x, lo, hi = _problems(n, p, 1)
    d, ok = _box(M, g, x, lo, hi)
    assert ok.all()
    xt = x + d
    assert np.all(xt >= lo - 1e-12) and np.all(xt <= hi + 1e-12)
    exact, better = 0, 0
    for i in range(n):
        L = np.linalg.cholesky(M[i])  # q(d) = |L^T d + L^-1 g|^2 / 2 + const
        ref = lsq_linear(L.T, -np.linalg.solve(L, g[i]), bounds=(lo - x[i], hi - x[i]), method="bvls", tol=1e-12).x
        clip = np.clip(x[i] - np.linalg.solve(M[i], g[i]), lo, hi) - x[i]
        q_box, q_ref, q_clip = _q(M[i], g[i], d[i]), _q(M[i], g[i], ref), _q(M[i], g[i], clip)
        assert q_box >= q_ref - 1e-9 * (1 + abs(q_ref))  # the exact minimiser is the floor
        better += q_box <= q_clip + 1e-12
        exact += np.allclose(d[i], ref, atol=1e-7)
    assert better >= 0.99 * n, better
    assert exact >= 0.95 * n, exact


def test_held_variables_do_not_move():
    M, g, x, lo, hi = _problems(40, 4, 2)
    keep = np.ones_like(g)
    keep[:, 1] = 0.0
    d, ok = _box(M, g, x, lo, hi, keep)
    assert ok.all() and np.all(d[:, 1] == 0.0)


def test_not_positive_definite_is_flagged():
    M = np.array([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 1.0]]])
    _, ok = _box(M, np.ones((2, 2)), np.zeros((2, 2)), -np.ones(2) * 9, np.ones(2) * 9)
    assert ok.tolist() == [False, True]


@pytest.mark.parametrize("excess", [0.7, -0.3])
def test_curvature_update_matches_the_measured_curvature(excess):
    """After a rejected trial the model's curvature along the step equals the measured one where the model
    underestimated it; S is not changed where the model overestimated it (it stays a correction upwards)."""
    rng = np.random.default_rng(4)
    p = 5
    A = rng.standard_normal((3, p, p))
    JTJ = torch.as_tensor(np.einsum("nij,nkj->nik", A, A))
    S = torch.zeros((3, p, p), dtype=torch.float64)
    use_S = torch.zeros(3, dtype=torch.bool)
    d = torch.as_tensor(rng.standard_normal((3, p)))
    g = torch.as_tensor(rng.standard_normal((3, p)))
    c0 = torch.ones(3, dtype=torch.float64)
    model = torch.einsum("ni,nij,nj->n", d, JTJ, d)
    a_true = model * (1 + excess)
    c1 = c0 + 2 * (g * d).sum(-1) + a_true
    sel = torch.tensor([True, True, False])
    curvature_update(S, use_S, torch.arange(3), sel, d, g, JTJ, c0, c1)
    after = torch.einsum("ni,nij,nj->n", d, JTJ + S, d)
    assert torch.allclose(S, S.transpose(1, 2))
    assert torch.all(S[2] == 0) and not bool(use_S[2])  # not selected
    if excess > 0:
        torch.testing.assert_close(after[:2], a_true[:2], rtol=1e-10, atol=0)
        assert bool(use_S[:2].all())
    else:
        assert torch.all(S == 0) and not bool(use_S.any())
