"""The CRB-optimised compression basis (Mao et al., arXiv 2305.00326): objective, gradient, simulator option."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sklearn_crb import MTFingerprintSimulator, Sequence, physics
from sklearn_crb.basis import crb_inflation_objective, crb_optimized_basis, objective_and_gradient, prepare_information
from sklearn_crb.crb import crb_from_jacobian

EST = ("m0s", "R1f", "R2f")
RANK, N_CRB = 8, 32
#: Measured (seeds 0-2, 40 held-out parenchyma draws, this fixture's settings): the held-out geometric-mean
#: inflation of the CRB basis is 0.07-0.09 of the SVD basis's, its per-parameter medians 0.05-0.09 of them.
HELD_OUT_GMEAN_RATIO, HELD_OUT_MEDIAN_RATIO = 0.25, 0.5


@pytest.fixture(scope="module")
def seq200():
    return Sequence.default(n_pulses=200)


@pytest.fixture(scope="module")
def sim_crb(seq200):
    return MTFingerprintSimulator(seq200, n_components=RANK, estimate=EST, tied_R1=True, prior="parenchyma",
                                  n_basis_samples=100, n_crb_samples=N_CRB, basis_max_iter=25, basis_method="crb",
                                  random_state=0).fit()


@pytest.fixture(scope="module")
def info(seq200):
    th = physics.parameters.tie_R1(physics.priors.resolve_prior("parenchyma", seq200.TR, True).sample(6, 3))
    s, J = physics.jacobian(seq200, th)
    return s, J, prepare_information(s, J, estimate=EST, tied_R1=True)


def _random_orthonormal(n, r, seed):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, r)) + 1j * rng.standard_normal((n, r)))
    return Q


def _log_inflation(sim, theta, U):
    """Per-draw log CRB(U)/CRB(full) from crb_from_jacobian (independent of sklearn_crb.basis)."""
    th = physics.parameters.tie_R1(theta)
    s, J = physics.jacobian(sim.sequence_, th)
    kw = dict(estimate=EST, tied_R1=True)
    return np.log(crb_from_jacobian(s, J, basis=U, **kw) / crb_from_jacobian(s, J, **kw))


def test_objective_matches_crb_from_jacobian(info, seq200):
    s, J, inf = info
    assert inf["kept"].all() and inf["names"][:3] == EST and inf["names"][-2:] == ("reM0", "imM0")
    U = _random_orthonormal(seq200.n_pulses, 12, 0)
    logs = crb_inflation_objective(U, inf, reduce="none").numpy()
    kw = dict(estimate=EST, tied_R1=True)
    ref = np.log(crb_from_jacobian(s, J, basis=U, **kw) / crb_from_jacobian(s, J, **kw))
    np.testing.assert_allclose(logs, ref, rtol=1e-7, atol=1e-9)
    assert (logs > -1e-9).all()  # compression never adds information
    # the full (square, unitary) basis loses nothing
    assert abs(float(crb_inflation_objective(np.eye(seq200.n_pulses, dtype=complex), inf))) < 1e-8


def test_gradient_matches_finite_differences_along_a_tangent(info, seq200):
    _, _, inf = info
    U = torch.from_numpy(_random_orthonormal(seq200.n_pulses, RANK, 1))
    f, G = objective_and_gradient(U, inf)
    rng = np.random.default_rng(2)
    X = torch.from_numpy(rng.standard_normal(U.shape) + 1j * rng.standard_normal(U.shape))
    D = X - U @ (U.conj().T @ X)  # horizontal tangent direction
    D = D / torch.linalg.norm(D)
    h = 1e-5
    fd = (float(crb_inflation_objective(U + h * D, inf)) - float(crb_inflation_objective(U - h * D, inf))) / (2 * h)
    analytic = float(torch.sum(G.conj() * D).real)
    assert abs(analytic) > 1e-3  # a direction the objective depends on
    assert analytic == pytest.approx(fd, rel=1e-5)


def test_objective_is_invariant_under_unitary_rotation(info, seq200):
    _, _, inf = info
    U = _random_orthonormal(seq200.n_pulses, RANK, 4)
    Q = _random_orthonormal(RANK, RANK, 5)
    f0, f1 = float(crb_inflation_objective(U, inf)), float(crb_inflation_objective(U @ Q, inf))
    assert f0 > 0.1
    assert f1 == pytest.approx(f0, rel=1e-10)
    # so the gradient has no component along the rotations U -> U exp(t A), A skew-Hermitian
    _, G = objective_and_gradient(torch.from_numpy(U), inf)
    A = torch.from_numpy(Q - Q.conj().T)
    assert abs(float(torch.sum(G.conj() * (torch.from_numpy(U) @ A)).real)) < 1e-8 * float(torch.linalg.norm(G))


def test_optimizer_descends_monotonically(info, seq200):
    _, _, inf = info
    th = physics.parameters.tie_R1(physics.priors.resolve_prior("parenchyma", seq200.TR, True).sample(40, 8))
    _, _, Vh = np.linalg.svd(physics.simulate(seq200, th), full_matrices=False)
    U0 = Vh.T[:, :RANK]
    U, hist = crb_optimized_basis(U0, inf, max_iter=8)
    np.testing.assert_allclose(U.conj().T @ U, np.eye(RANK), atol=1e-10)
    assert np.all(np.diff(hist) <= 1e-12) and hist[-1] < hist[0]
    assert float(crb_inflation_objective(U, inf)) == pytest.approx(hist[-1], rel=1e-10)
    # a start that loses the Fisher rank is refused
    with pytest.raises(ValueError, match="rank deficient"):
        crb_optimized_basis(U0[:, :2], inf)


def test_crb_basis_is_orthonormal_and_beats_svd_on_its_draws(sim_crb, seq200):
    U = sim_crb.basis_
    assert U.shape == (seq200.n_pulses, RANK) and U.dtype == np.complex128
    np.testing.assert_allclose(U.conj().T @ U, np.eye(RANK), atol=1e-10)
    assert sim_crb.basis_method_ == "crb" and sim_crb.n_components_ == RANK
    hist = sim_crb.basis_history_
    assert np.all(np.diff(hist) <= 1e-12)
    train = sim_crb._basis_theta[:N_CRB]
    crb_log = _log_inflation(sim_crb, train, U)
    svd_log = _log_inflation(sim_crb, train, sim_crb._extended_basis[:, :RANK])
    assert crb_log.mean() <= svd_log.mean()
    # the history is the objective: at the SVD start and at the (energy-ordered, rotated) result
    assert svd_log.mean() == pytest.approx(hist[0], rel=1e-8)
    assert crb_log.mean() == pytest.approx(hist[-1], rel=1e-8)
    # columns: the principal directions of the optimisation draws' coefficients, most energy first
    c = physics.simulate(seq200, train) @ U.conj()
    e = np.linalg.norm(c, axis=0) ** 2
    assert np.all(np.diff(e) <= 1e-12 * e[0])
    assert np.abs(c.conj().T @ c - np.diag(e)).max() < 1e-10 * e[0]
    # explained_energy_: the fraction of all basis draws' energy kept
    s = physics.simulate(seq200, sim_crb._basis_theta)
    kept = np.linalg.norm(s @ U.conj()) ** 2 / np.linalg.norm(s) ** 2
    assert sim_crb.explained_energy_ == pytest.approx(kept, rel=1e-10)


def test_crb_basis_beats_svd_on_held_out_draws(sim_crb):
    held = sim_crb.sample_parameters(40, random_state=100)
    out = sim_crb.compression_inflation(held, estimate=EST, methods=("svd", "crb"))
    svd, crb = out["inflation"]["svd"][RANK], out["inflation"]["crb"][RANK]
    assert svd.shape == crb.shape == (40, 3) and (svd >= 1 - 1e-9).all() and (crb >= 1 - 1e-9).all()
    assert np.exp(np.log(crb).mean()) < HELD_OUT_GMEAN_RATIO * np.exp(np.log(svd).mean())
    assert np.all(np.median(crb, 0) < HELD_OUT_MEDIAN_RATIO * np.median(svd, 0))
    # energy: the SVD basis keeps more (Eckart-Young), both fractions in (0, 1]
    e = out["energy"]
    assert 0 < e["crb"][RANK] < e["svd"][RANK] <= 1
    s = physics.simulate(sim_crb.sequence_, physics.parameters.tie_R1(held))
    assert e["crb"][RANK] == pytest.approx(np.linalg.norm(s @ sim_crb.basis_.conj()) ** 2 / np.linalg.norm(s) ** 2)
    # the fitted basis alone, the old call
    np.testing.assert_allclose(sim_crb.compression_inflation(held, estimate=EST)[RANK], crb)


def test_deterministic_for_a_fixed_random_state(seq200):
    kw = dict(n_components=6, estimate=EST, tied_R1=True, prior="parenchyma", n_basis_samples=40, n_crb_samples=12,
              basis_max_iter=4, basis_method="crb")
    a = MTFingerprintSimulator(seq200, random_state=3, **kw).fit().basis_
    b = MTFingerprintSimulator(seq200, random_state=3, **kw).fit().basis_
    c = MTFingerprintSimulator(seq200, random_state=4, **kw).fit().basis_
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.abs(a.conj().T @ c) - np.eye(6)).max() > 1e-6


def test_side_by_side_at_other_ranks_and_default_unchanged(seq200):
    sim = MTFingerprintSimulator(seq200, n_components=8, estimate=EST, tied_R1=True, prior="parenchyma",
                                 n_basis_samples=60, n_crb_samples=12, basis_max_iter=5, random_state=0).fit()
    assert sim.basis_method_ == "svd" and sim.basis_history_ is None
    th = sim.sample_parameters(5, random_state=1)
    old = sim.compression_inflation(th, ranks=[6, 8], estimate=EST)
    new = sim.compression_inflation(th, ranks=[6, 8], estimate=EST, methods=("svd", "crb"))
    assert set(new) == {"inflation", "energy"} and set(new["inflation"]) == {"svd", "crb"}
    for r in (6, 8):
        np.testing.assert_array_equal(old[r], new["inflation"]["svd"][r])
        assert np.exp(np.log(new["inflation"]["crb"][r]).mean()) < np.exp(np.log(old[r]).mean())
    assert new["energy"]["svd"][6] < new["energy"]["svd"][8]
    assert sim.compression_inflation(th, estimate=EST, methods="svd")["inflation"]["svd"][8].shape == (5, 3)


def test_given_basis_wins_and_bad_input(seq200, sim_crb):
    U = _random_orthonormal(seq200.n_pulses, 7, 9)
    sim = MTFingerprintSimulator(seq200, basis=U, basis_method="crb", estimate=EST, tied_R1=True).fit()
    np.testing.assert_array_equal(sim.basis_, U)
    assert sim.basis_method_ == "given" and sim.basis_history_ is None
    with pytest.raises(ValueError, match="given a basis"):
        sim.compression_inflation(methods=("crb",))
    with pytest.raises(ValueError, match="basis_method"):
        MTFingerprintSimulator(seq200, basis_method="pca").fit()
    with pytest.raises(ValueError, match=r"n_components must be in \[1, 200\]"):
        MTFingerprintSimulator(seq200, n_components=201, basis_method="crb").fit()
    with pytest.raises(ValueError, match="n_crb_samples"):
        MTFingerprintSimulator(seq200, n_crb_samples=0, basis_method="crb").fit()
    with pytest.raises(ValueError, match="methods must be"):
        sim_crb.compression_inflation(methods=("pca",))
    with pytest.raises(ValueError, match="optimised for rank 8 only"):
        sim_crb.compression_inflation(ranks=[5])


def test_get_params_and_clone(sim_crb):
    p = sim_crb.get_params()
    assert p["basis_method"] == "crb" and p["n_crb_samples"] == N_CRB and p["basis_max_iter"] == 25
    c = clone(sim_crb)  # a fitted simulator clones with its basis (it defines the features)
    assert c.get_params()["basis_method"] == "crb" and np.array_equal(c.basis_, sim_crb.basis_)
    assert not hasattr(clone(MTFingerprintSimulator(basis_method="crb")), "basis_")
    assert MTFingerprintSimulator().get_params()["basis_method"] == "svd"
    c.set_params(basis_method="svd")
    assert c.basis_method == "svd"


def test_fewer_crb_draws_than_the_rank_are_refused_by_name(seq200):
    """Release 0.1 returned a basis of rank min(n_components, n_crb_samples) without a word."""
    sim = MTFingerprintSimulator(seq200, n_components=6, n_crb_samples=3, basis_method="crb", basis_max_iter=1,
                                 estimate=EST, tied_R1=True, n_basis_samples=50, random_state=0)
    with pytest.raises(ValueError, match=r"n_crb_samples \(--n-crb-samples\).*--rank\) = 6"):
        sim.fit()
