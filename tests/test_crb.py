"""CRB: hand computation, invariants (noise/M0 scaling, compression and
nuisance can only raise it), singular cases reported."""

import numpy as np
import pytest
from conftest import TUTORIAL_THETA

from sklearn_crb import PARAMETERS
from sklearn_crb.crb import IllConditionedFisherWarning, cramer_rao_bound, crb_from_jacobian, fisher_information


@pytest.fixture
def random_problem():
    rng = np.random.default_rng(0)
    n, T = 4, 40
    J = rng.standard_normal((n, T, 8)) + 1j * rng.standard_normal((n, T, 8))
    s = rng.standard_normal((n, T)) + 1j * rng.standard_normal((n, T))
    return s, J


def test_hand_computation(random_problem):
    s, J = random_problem
    est = ("m0s", "R2f")
    M0, sigma = 0.5 * np.exp(1j * 0.3), 0.02
    crb = crb_from_jacobian(s, J, estimate=est, M0=M0, sigma=sigma)
    for n in range(s.shape[0]):
        # unknowns: all 8 theta, Re M0, Im M0; data d = M0 * s(theta)
        A = np.column_stack([M0 * J[n], s[n], 1j * s[n]])
        F = np.real(A.conj().T @ A) / sigma**2
        Finv = np.linalg.inv(F)
        np.testing.assert_allclose(crb[n], Finv[[0, 2], [0, 2]], rtol=1e-10)


def test_fisher_information_real_stacked_equivalence(random_problem):
    s, J = random_problem
    F = fisher_information(J, sigma=0.1).numpy()
    Jr = np.concatenate([J.real, J.imag], axis=1)
    np.testing.assert_allclose(F, np.einsum("ntp,ntq->npq", Jr, Jr) / 0.01, rtol=1e-12)


def test_noise_and_M0_scaling(random_problem):
    s, J = random_problem
    base = crb_from_jacobian(s, J)
    scaled = crb_from_jacobian(s, J, M0=np.array([2.0, 0.5j, 1 + 1j, 3]), sigma=0.1)
    factor = 0.01 / np.abs(np.array([2.0, 0.5j, 1 + 1j, 3])) ** 2
    np.testing.assert_allclose(scaled, base * factor[:, None], rtol=1e-12)


def test_compression_and_nuisance_only_raise(random_problem):
    s, J = random_problem
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((40, 15)) + 1j * rng.standard_normal((40, 15)))
    full = crb_from_jacobian(s, J, estimate=("m0s", "R1f"))
    comp = crb_from_jacobian(s, J, estimate=("m0s", "R1f"), basis=U)
    assert np.all(comp >= full * (1 - 1e-12))
    known = crb_from_jacobian(s, J, estimate=("m0s", "R1f"), nuisance=None)
    some = crb_from_jacobian(s, J, estimate=("m0s", "R1f"), nuisance=("Rex",))
    assert np.all(known <= some * (1 + 1e-12)) and np.all(some <= full * (1 + 1e-12))
    real_m0 = crb_from_jacobian(s, J, estimate=("m0s", "R1f"), complex_M0=False)
    assert np.all(real_m0 <= full * (1 + 1e-12))
    # a complete orthonormal basis loses nothing
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)) + 1j * rng.standard_normal((40, 40)))
    np.testing.assert_allclose(crb_from_jacobian(s, J, basis=Q), crb_from_jacobian(s, J), rtol=1e-9)


def test_tied_R1_column(random_problem):
    s, J = random_problem
    tied = crb_from_jacobian(s, J, estimate=("R1f",), tied_R1=True)
    J2 = J.copy()
    J2[..., 1] += J2[..., 4]
    J2[..., 4] = 0.0  # R1s no longer an unknown: zero column would be singular,
    A = [np.column_stack([J2[n][:, [0, 1, 2, 3, 5, 6, 7]], s[n], 1j * s[n]]) for n in range(4)]
    ref = [np.linalg.inv(np.real(a.conj().T @ a))[1, 1] for a in A]
    np.testing.assert_allclose(tied[:, 0], ref, rtol=1e-10)
    with pytest.raises(ValueError, match="tied"):
        crb_from_jacobian(s, J, estimate=("R1s",), tied_R1=True)


def test_singular_is_reported(random_problem):
    s, J = random_problem
    J = J.copy()
    J[1, :, 3] = 2.0 * J[1, :, 2]  # Rex indistinguishable from R2f in sample 1
    with pytest.raises(ValueError, match=r"singular.*sample\(s\) \[1\]"):
        crb_from_jacobian(s, J)
    with pytest.warns(IllConditionedFisherWarning):
        crb, info = crb_from_jacobian(s, J, on_singular="inf", return_info=True)
    assert np.all(np.isinf(crb[1])) and np.all(np.isfinite(crb[[0, 2, 3]]))
    assert info["singular"].tolist() == [False, True, False, False]
    J[0, :, 5] = 0.0  # a parameter with no effect at all
    with pytest.raises(ValueError, match="singular"):
        crb_from_jacobian(s, J, estimate=("m0s",))


def test_bad_shapes(random_problem):
    s, J = random_problem
    with pytest.raises(ValueError, match="J must have shape"):
        crb_from_jacobian(s, J[..., :7])
    with pytest.raises(ValueError, match="signal must have shape"):
        crb_from_jacobian(s[:, :5], J)
    with pytest.raises(ValueError, match="basis"):
        crb_from_jacobian(s, J, basis=np.eye(30))
    with pytest.raises(ValueError, match="M0"):
        crb_from_jacobian(s, J, M0=0.0)


def test_physical_crb_scaling_and_snr(short_sequence):
    """Real model: CRB at sigma/|M0| equals the unit CRB times (sigma/|M0|)^2,
    and every parameter is identifiable from the full signal."""
    th = TUTORIAL_THETA[None]
    unit = cramer_rao_bound(short_sequence, th)
    assert unit.shape == (1, 8) and np.all(np.isfinite(unit)) and np.all(unit > 0)
    np.testing.assert_allclose(cramer_rao_bound(short_sequence, th, M0=0.5, sigma=0.01), unit * 4e-4, rtol=1e-12)
    th_tied = th.copy()
    th_tied[:, 4] = th_tied[:, 1]  # R1s = R1f: the same tissue in both models
    tied = cramer_rao_bound(short_sequence, th_tied, tied_R1=True, estimate=("m0s", "R1f", "R2f"))
    untied = cramer_rao_bound(short_sequence, th_tied, estimate=("m0s", "R1f", "R2f"))
    # a constraint (R1s = R1f known to hold) can only lower the bound
    assert np.all(tied <= untied * (1 + 1e-9))


@pytest.mark.slow
def test_v32_compression_inflation(v32_sequence):
    """Rank-13 compression of the v3.2 fingerprints costs information, most for
    m0s/R1f/R1s; it falls towards 1 with the rank (issue 2: 15-35 at rank 13,
    ~2 at rank 30, ~1.05 at rank 100, for an SVD basis of prior fingerprints)."""
    from sklearn_crb import MTFingerprintSimulator

    sim = MTFingerprintSimulator(v32_sequence, n_components=13, prior="parenchyma", n_basis_samples=400,
                                 random_state=0).fit()
    infl = sim.compression_inflation(ranks=[13, 30, 100])
    for r in (13, 30, 100):
        assert np.all(infl[r] >= 1 - 1e-9)
    assert np.all(infl[13] >= infl[30] - 1e-9) and np.all(infl[30] >= infl[100] - 1e-9)
    names = list(PARAMETERS)
    worst13 = max(infl[13][0, names.index(p)] for p in ("m0s", "R1f", "R1s"))
    assert 5 < worst13 < 100
    # at rank 100 the biophysical parameters lose < 30 %; omega0 (whose
    # derivative is imaginary at omega0 = 0) converges more slowly
    assert infl[100][0, : names.index("omega0")].max() < 1.3
    assert infl[100][0, names.index("omega0")] < 3.0


def test_empty_nuisance_selection_means_none(short_sequence):
    """A model that estimates every free parameter has no nuisance left: () and None agree."""
    from sklearn_crb.physics.parameters import free_parameters

    th = TUTORIAL_THETA[None]
    free = free_parameters(tied_R1=True)
    a = cramer_rao_bound(short_sequence, th, estimate=free, nuisance=None, tied_R1=True)
    b = cramer_rao_bound(short_sequence, th, estimate=free, nuisance=(), tied_R1=True)
    c = cramer_rao_bound(short_sequence, th, estimate=free, nuisance="all", tied_R1=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-12)  # nothing left to marginalise


def test_linearized_bayes_spread_scalar_closed_form_and_limits():
    """One parameter orthogonal to M0's columns: the spread is F / (F + 1/v) exactly; v -> inf gives 1."""
    from sklearn_crb.crb import linearized_bayes_spread

    s = np.zeros((3, 3), complex)
    s[:, 0] = 1.0
    J = np.zeros((3, 3, len(PARAMETERS)), complex)
    a = np.array([0.5, 2.0, 7.0])
    J[:, 1, PARAMETERS.index("m0s")] = a  # orthogonal to s and i s
    for v in (1e-3, 0.1, 1.0):
        F = a**2 / 0.1**2
        r = linearized_bayes_spread(s, J, [v], estimate=("m0s",), sigma=0.1)
        np.testing.assert_allclose(r[:, 0], F / (F + 1 / v), rtol=1e-10)
    np.testing.assert_allclose(linearized_bayes_spread(s, J, [1e12], estimate=("m0s",)), 1.0, rtol=1e-8)
    with pytest.raises(ValueError, match="prior_variance"):
        linearized_bayes_spread(s, J, [0.0], estimate=("m0s",))
    with pytest.raises(ValueError, match="prior_variance"):
        linearized_bayes_spread(s, J, [1.0, 1.0], estimate=("m0s",))


def test_linearized_bayes_spread_shrinks_with_the_prior_and_grows_with_snr():
    """On the MT model: in (0, 1], smaller for a tighter prior, larger at higher SNR (three parameters)."""
    from sklearn_crb.crb import linearized_bayes_spread
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.physics.signal import jacobian

    seq = Sequence.default(n_pulses=120)
    th = np.array([[0.15, 0.5, 15.0, 30.0, 3.0, 10e-6, 0.0, 1.0], [0.08, 0.6, 12.0, 20.0, 3.0, 12e-6, 50.0, 0.9]])
    s, J = jacobian(seq, th)
    est = ("m0s", "R1f", "R2f")
    pv = np.array([0.01, 0.05, 20.0])
    r = linearized_bayes_spread(s, J, pv, estimate=est, M0=100.0)
    assert np.all((r > 0) & (r <= 1))
    assert np.all(linearized_bayes_spread(s, J, pv / 10, estimate=est, M0=100.0) < r)
    assert np.all(linearized_bayes_spread(s, J, pv, estimate=est, M0=1000.0) > r)
