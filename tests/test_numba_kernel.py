"""The fused numba kernel (sklearn_crb._numba_kernel) against the torch
reference backend and against finite differences of itself."""

import numpy as np
import pytest
from scipy.linalg import expm, expm_frechet

from conftest import NLLS_THETA, TUTORIAL_THETA
from sklearn_crb import Sequence
from sklearn_crb.physics import signal as physics
from sklearn_crb.physics._numba import bloch as B
from sklearn_crb.physics._numba import expm as X
from sklearn_crb.physics._numba.kernel import jacobian_numba, simulate_numba
from sklearn_crb.physics.parameters import PARAMETERS

# (m0s, R1f, R2f, Rex, R1s, T2s, omega0, B1): tutorial, NLLS test tissue
# (omega0 != 0, B1 != 1), and a third one with negative omega0, B1 > 1.
THETAS = np.array([
    TUTORIAL_THETA,
    NLLS_THETA,
    [0.05, 1.1, 9.0, 5.0, 5.0, 7e-6, -300.0, 1.2],
])
#: Typical magnitudes, for finite-difference steps of parameters that may be 0.
SCALES = np.array([0.1, 1.0, 10.0, 10.0, 1.0, 1e-5, 100.0, 1.0])


def _torch(seq, theta):
    s, J = physics.jacobian(seq, theta, backend="torch")
    return np.asarray(s), np.asarray(J)


def _assert_jacobian_close(J, J_ref, rtol, names=PARAMETERS):
    """Each column within rtol of that column's norm (per tissue)."""
    for t in range(J.shape[0]):
        for p, name in enumerate(names):
            err = np.linalg.norm(J[t, :, p] - J_ref[t, :, p])
            scale = np.linalg.norm(J_ref[t, :, p])
            assert err <= rtol * scale, f"tissue {t}, d/d{name}: |err| {err:.3g} vs |col| {scale:.3g}"


def _short(n=40, kind0="crusher", phi=np.pi, mixed=False):
    rng = np.random.default_rng(3)
    alpha = np.pi / 3 * np.sin(4 * np.pi * np.arange(n) / n) + 0.05
    alpha[0] = np.pi
    TRF = rng.uniform(2.2e-4, 5e-4, n)
    TRF[0] = 5e-4
    gm = [kind0] + ["balanced"] * (n - 1)
    if mixed:  # every kind somewhere, including inside the train
        gm[7], gm[15], gm[23] = "spoiler_dual", "crusher", "spoiler_prepulse"
    return Sequence(alpha, TRF, 3.5e-3, grad_moment=gm, rf_phase_increment=phi)


# ------------------------------------------------------------- building blocks
@pytest.mark.parametrize("alpha, TRF, B1, w0, R2s", [
    (np.pi, 5e-4, 1.0, 0.0, 1.6e4),  # inversion, ||H TRF|| ~ 11
    (0.157, 3e-4, 0.9, 250.0, 1.9e4),  # median pulse
    (2.2, 2.2e-4, 1.3, -800.0, 3.0e4),
    (1e-3, 1e-5, 1.0, 0.0, 1e2),  # ||H TRF|| < 1.09: no squaring
])
def test_pulse_exponential_and_frechet_derivatives(alpha, TRF, B1, w0, R2s):
    """expm of the affine 5x6 pulse generator and its 8 directional (Frechet)
    derivatives against scipy."""
    m0s, R1f, R2f, Rex, R1s = 0.15, 0.5, 15.0, 30.0, 3.0
    W = np.zeros((X.NSLOT, 5, 6))
    D = np.zeros((X.NSLOT, 5, 6, 8))
    B._pulse_generator(W, alpha / TRF, TRF, B1, w0, m0s, R1f, R2f, Rex, R1s, R2s)
    B._pulse_generator_tangents(D, alpha / TRF, TRF, m0s, R1f, Rex, R1s, -1.3e9, -2.7e3)
    full = lambda X: np.vstack([X, np.zeros((1, 6))])  # noqa: E731
    A, dA = full(W[0]), [full(D[0, :, :, p]) for p in range(8)]
    X._dexpm(W, D)
    U = expm(A)
    np.testing.assert_allclose(W[X._P], U[:5], rtol=0, atol=1e-14 * np.abs(U).max())
    for p in range(8):
        dU = expm_frechet(A, dA[p], compute_expm=False)
        np.testing.assert_allclose(D[X._P, :, :, p], dU[:5], rtol=0, atol=1e-12 * max(np.abs(dU).max(), 1e-300))
    W2 = np.zeros((X.NSLOT, 5, 6))
    W2[0] = A[:5]
    X._expm(W2)
    np.testing.assert_array_equal(W2[X._P], W[X._P])  # value path == dual path, bit for bit


# --------------------------------------------------------------------- vs torch
@pytest.mark.slow
def test_v32_signal_and_jacobian_match_torch(v32_sequence):
    s_ref, J_ref = _torch(v32_sequence, THETAS)
    s = simulate_numba(v32_sequence, THETAS)
    s2, J = jacobian_numba(v32_sequence, THETAS)
    scale = np.abs(s_ref).max()
    assert np.abs(s - s_ref).max() <= 1e-10 * scale
    assert np.abs(s2 - s).max() <= 1e-14 * scale  # both kernels compute the same signal
    _assert_jacobian_close(J, J_ref, 1e-9)


def test_v32_tutorial_values(v32_sequence):
    """Spec §6 reference fingerprint (independent table: rtol 2e-5)."""
    s = simulate_numba(v32_sequence, TUTORIAL_THETA[None])[0]
    idx = [0, 1, 2, 9, 99, 199, 499, 999, 1141]
    ref = [-0.35590010, -0.25879671, -0.14199179, -0.01278774, 0.00469189, 0.03658560, 0.01810754,
           0.01297262, 0.37508402]
    np.testing.assert_allclose(s.real[idx], ref, rtol=2e-5, atol=2e-8)
    assert np.abs(s.imag).max() < 1e-12


def test_default_sequence_matches_torch():
    seq = Sequence.default()
    s_ref = physics.simulate(seq, THETAS, backend="torch")
    assert np.abs(simulate_numba(seq, THETAS) - s_ref).max() <= 1e-10 * np.abs(s_ref).max()
    th = THETAS[2:]
    s_ref, J_ref = _torch(seq, th)
    s, J = jacobian_numba(seq, th)
    assert np.abs(s - s_ref).max() <= 1e-10 * np.abs(s_ref).max()
    _assert_jacobian_close(J, J_ref, 1e-9)


@pytest.mark.parametrize("kind0, phi", [("crusher", np.pi), ("balanced", 2.1), ("spoiler_dual", np.pi),
                                         ("spoiler_prepulse", 2.1), ("crusher", -1.3)])
def test_grad_moments_and_phase_increment_match_torch(kind0, phi):
    seq = _short(kind0=kind0, phi=phi)
    s_ref, J_ref = _torch(seq, THETAS)
    s = simulate_numba(seq, THETAS)
    s2, J = jacobian_numba(seq, THETAS)
    scale = np.abs(s_ref).max()
    assert np.abs(s - s_ref).max() <= 1e-11 * scale
    assert np.abs(s2 - s_ref).max() <= 1e-11 * scale
    _assert_jacobian_close(J, J_ref, 1e-9)


def test_mixed_grad_moments_match_torch():
    seq = _short(n=31, mixed=True, phi=-0.7)  # odd length
    s_ref, J_ref = _torch(seq, THETAS)
    s, J = jacobian_numba(seq, THETAS)
    assert np.abs(s - s_ref).max() <= 1e-11 * np.abs(s_ref).max()
    _assert_jacobian_close(J, J_ref, 1e-9)


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_sequences(n):
    seq = Sequence(np.full(n, 0.4), np.full(n, 3e-4), 3.5e-3, grad_moment="balanced")
    s_ref, J_ref = _torch(seq, THETAS)
    s, J = jacobian_numba(seq, THETAS)
    np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-14)
    _assert_jacobian_close(J, J_ref, 1e-10)


def _central_differences(seq, th, p):
    h = 1e-6 * max(abs(th[0, p]), SCALES[p])
    tp, tm = th.copy(), th.copy()
    tp[0, p] += h
    tm[0, p] -= h
    return (simulate_numba(seq, tp)[0] - simulate_numba(seq, tm)[0]) / (2 * h)


def test_extreme_parameters():
    """No semi-solid pool (m0s = 0), large off-resonance, the edges of B1 and
    T2s against torch; no exchange with R1f = R1s (a degenerate 2x2 exchange
    block, where the torch backend's autograd gives NaN) against finite
    differences."""
    seq = _short(n=25, kind0="crusher")
    th = np.array([
        [0.0, 0.6, 12.0, 25.0, 2.0, 10e-6, 0.0, 1.0],
        [0.3, 0.4, 30.0, 60.0, 4.0, 20e-6, 2500.0, 1.4],
        [0.2, 0.3, 5.0, 15.0, 3.0, 5e-6, -900.0, 0.5],
        [0.1, 1.0, 20.0, 0.0, 1.0, 12e-6, 50.0, 0.9],
    ])
    s_ref = physics.simulate(seq, th, backend="torch")
    s, J = jacobian_numba(seq, th)
    assert np.abs(s - s_ref).max() <= 1e-11 * np.abs(s_ref).max()
    _, J_ref = _torch(seq, th[:3])
    for t in range(3):
        for p in range(8):  # d/dT2s, d/dB1 of the semi-solid pool vanish at m0s = 0
            err = np.linalg.norm(J[t, :, p] - J_ref[t, :, p])
            assert err <= 1e-9 * np.linalg.norm(J_ref[t, :, p]) + 1e-12 / SCALES[p]
    assert np.all(np.isfinite(J))
    for p, name in enumerate(PARAMETERS):  # (d/dR1s = 0 without exchange: FD noise only)
        fd = _central_differences(seq, th[3:], p)
        err = np.linalg.norm(J[3, :, p] - fd)
        assert err <= 1e-5 * np.linalg.norm(fd) + 1e-8 / SCALES[p], f"d/d{name}: |error| {err:.2e}"


# ------------------------------------------------------------ finite differences
@pytest.mark.parametrize("seq_name", ["v32", "mixed"])
def test_jacobian_matches_central_differences(seq_name, request):
    seq = request.getfixturevalue("v32_sequence") if seq_name == "v32" else _short(n=31, mixed=True, phi=2.1)
    th = THETAS[1:2]
    _, J = jacobian_numba(seq, th)
    for p, name in enumerate(PARAMETERS):
        fd = _central_differences(seq, th, p)
        err = np.linalg.norm(J[0, :, p] - fd)
        assert err <= 1e-5 * np.linalg.norm(fd), f"d/d{name}: rel. error {err / np.linalg.norm(fd):.2e}"


# ------------------------------------------------------------------ scheduling
def test_results_do_not_depend_on_batch_or_threads(v32_sequence):
    """One tissue is split over pulses, several over tissues: identical bits."""
    import numba

    th = np.repeat(THETAS, 3, axis=0)
    s_batch, J_batch = jacobian_numba(v32_sequence, th)
    s_one, J_one = jacobian_numba(v32_sequence, th[4:5])
    np.testing.assert_array_equal(s_one[0], s_batch[4])
    np.testing.assert_array_equal(J_one[0], J_batch[4])
    np.testing.assert_array_equal(simulate_numba(v32_sequence, th[4:5])[0], simulate_numba(v32_sequence, th)[4])
    nth = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        s_serial = simulate_numba(v32_sequence, th[:5])
    finally:
        numba.set_num_threads(nth)
    np.testing.assert_array_equal(s_serial, s_batch[:5])


def test_physics_dispatches_to_numba(v32_sequence):
    th = THETAS[:2]
    s = physics.simulate(v32_sequence, th, M0=0.5, backend="numba")
    np.testing.assert_array_equal(s, 0.5 * simulate_numba(v32_sequence, th))
    s_auto, J_auto = physics.jacobian(v32_sequence, th)
    s_n, J_n = jacobian_numba(v32_sequence, th)
    np.testing.assert_array_equal(s_auto, s_n)
    np.testing.assert_array_equal(J_auto, J_n)
