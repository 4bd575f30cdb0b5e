"""Bad inputs to the physics and the CRB give clear errors, never silent garbage (issue 10)."""
import warnings

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sklearn_crb.crb import cramer_rao_bound, crb_from_jacobian
from sklearn_crb.physics.parameters import validate_theta
from sklearn_crb.physics.r2sl.table import PHI_MAX, TAU_MAX, TAU_MIN, load_r2sl_table, r2sl, r2sl_numpy
from sklearn_crb.physics.sequence import TR_MAX, Sequence
from sklearn_crb.physics.signal import jacobian, simulate

THETA = np.array([[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 0.0, 1.0],
                  [0.10, 0.8, 12.0, 20.0, 2.0, 10e-6, 50.0, 0.9]])
SMALL = Sequence(np.array([np.pi, 0.3, 0.5, 0.2, 0.4, 0.6]), np.full(6, 3e-4), 3.5e-3)
_FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- Sequence
@_FAST
@given(TR=st.floats(allow_nan=True, allow_infinity=True))
def test_sequence_TR_outside_physical_range_is_rejected(TR):
    if 0 < TR <= TR_MAX and np.isfinite(TR):
        seq = Sequence([0.3], [min(1e-4, TR)], TR)
        assert seq.TR == TR
    else:
        with pytest.raises(ValueError, match="TR must be"):
            Sequence([0.3], [1e-9], TR)


@_FAST
@given(TRF=st.floats(min_value=-1.0, max_value=1.0), TR=st.floats(min_value=1e-4, max_value=1.0))
def test_sequence_TRF_in_zero_to_TR(TRF, TR):
    if 0 < TRF <= TR:
        assert Sequence([0.3], [TRF], TR).TRF[0] == TRF
    else:
        with pytest.raises(ValueError, match="TRF"):
            Sequence([0.3], [TRF], TR)


def test_huge_TR_no_longer_gives_nan():
    with pytest.raises(ValueError, match="TR must be"):
        Sequence([0.3, 0.3], [3e-4, 3e-4], 1e6)


@pytest.mark.parametrize("shape", [(2, 6), (3, 2, 2)])
def test_sequence_rejects_matrices(shape):
    a = np.full(shape, 0.3)
    with pytest.raises(ValueError, match="1-D"):
        Sequence(a, np.full(shape, 3e-4), 3.5e-3)


@pytest.mark.parametrize("shape", [(1, 6), (6, 1), (6,)])
def test_sequence_accepts_row_and_column_vectors(shape):
    assert Sequence(np.full(shape, 0.3), np.full(shape, 3e-4), 3.5e-3).n_pulses == 6


@pytest.mark.parametrize("name", ["alpha", "TRF"])
def test_sequence_rejects_complex(name):
    args = {"alpha": np.full(4, 0.3), "TRF": np.full(4, 3e-4)}
    args[name] = args[name] + 1e-9j
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way
        with pytest.raises(TypeError, match=rf"{name} must be real"):
            Sequence(args["alpha"], args["TRF"], 3.5e-3)


def test_from_mat_rejects_a_two_row_alpha(tmp_path):
    p = tmp_path / "two_rows.mat"
    scipy.io.savemat(p, {"alpha": np.full((2, 20), 0.3), "TRF": np.full((2, 20), 3e-4)})
    with pytest.raises(ValueError, match=r"alpha must be a non-empty 1-D array, got shape \(2, 20\)"):
        Sequence.from_mat(p)
    q = tmp_path / "row.mat"
    scipy.io.savemat(q, {"alpha": np.full((1, 20), 0.3), "TRF": np.full((20, 1), 3e-4)})
    assert Sequence.from_mat(q).n_pulses == 20


def test_from_mat_rejects_complex_alpha(tmp_path):
    p = tmp_path / "c.mat"
    scipy.io.savemat(p, {"alpha": np.full(20, 0.3) + 0.1j, "TRF": np.full(20, 3e-4)})
    with pytest.raises(TypeError, match="alpha must be real"):
        Sequence.from_mat(p)


# ----------------------------------------------------------------------------- theta
def test_validate_theta_rejects_complex():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="theta must be real"):
            validate_theta(THETA + 0j)
        with pytest.raises(TypeError, match="theta must be real"):
            validate_theta(torch.tensor(THETA, dtype=torch.complex128))


@_FAST
@given(data=st.data())
def test_simulate_is_finite_or_raises(data):
    """Any theta either gives a finite signal or a clear ValueError (never NaN)."""
    row = [data.draw(st.floats(allow_nan=True, allow_infinity=True, width=64), label=f"p{k}")
           if data.draw(st.booleans(), label=f"wild{k}") else float(THETA[0, k]) for k in range(8)]
    try:
        s = simulate(SMALL, np.array([row]), backend="torch")
    except ValueError as exc:
        assert "theta" in str(exc) or "r2sl" in str(exc) or "not finite" in str(exc)
    else:
        assert np.all(np.isfinite(s))


@_FAST
@given(n=st.integers(1, 8), TR=st.floats(1e-3, 1.0), TRF_frac=st.floats(0.05, 1.0),
       alpha=st.floats(-3.0, 3.0))
def test_simulate_over_sequences_is_finite(n, TR, TRF_frac, alpha):
    TRF = min(TR * TRF_frac, 4e-4)  # TRF/T2s inside the R2sl table for T2s = 12 us
    seq = Sequence(np.full(n, alpha), np.full(n, TRF), TR)
    if TRF / 12e-6 < TAU_MIN:
        return
    s = simulate(seq, THETA[:1], backend="torch")
    assert s.shape == (1, n) and np.all(np.isfinite(s))


def test_simulate_and_jacobian_name_nonfinite_samples(monkeypatch):
    from sklearn_crb.physics import signal

    real = signal._signal_real

    def poisoned(seq, th):
        out = real(seq, th)
        return torch.where((th[:, 0] < 0.12)[:, None, None], torch.full_like(out, float("nan")), out)

    monkeypatch.setattr(signal, "_signal_real", poisoned)
    with pytest.raises(ValueError, match=r"not finite for 1 sample\(s\) \(indices \[1\]"):
        simulate(SMALL, THETA, backend="torch")
    with pytest.raises(ValueError, match=r"not finite for 1 sample\(s\) \(indices \[1\]"):
        jacobian(SMALL, THETA, backend="torch")


# ----------------------------------------------------------------------------- CRB
@pytest.fixture(scope="module")
def sj():
    return jacobian(SMALL, THETA, backend="torch")


def test_crb_basis_must_be_orthonormal(sj):
    s, J = sj
    U = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 3)))[0].astype(complex)
    assert np.all(np.isfinite(crb_from_jacobian(s, J, basis=U, estimate=("m0s",), nuisance=None)))
    with pytest.raises(ValueError, match="orthonormal"):
        crb_from_jacobian(s, J, basis=2 * U)
    with pytest.raises(ValueError, match="orthonormal"):
        cramer_rao_bound(SMALL, THETA, basis=2 * U, backend="torch")
    bad = U.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        crb_from_jacobian(s, J, basis=bad)
    with pytest.raises(ValueError, match="non-finite"):
        cramer_rao_bound(SMALL, THETA, basis=bad, backend="torch")


def test_crb_nan_jacobian_is_a_clear_error(sj):
    s, J = sj
    J = J.copy()
    J[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"J contains non-finite values in 1 sample\(s\), e.g. \[1\]"):
        crb_from_jacobian(s, J)
    s2 = s.copy()
    s2[0, 0] = np.inf
    with pytest.raises(ValueError, match="signal contains non-finite"):
        crb_from_jacobian(s2, sj[1])


@pytest.mark.parametrize("sigma, match", [
    (0.0, "sigma must be positive"), (-1.0, "sigma must be positive"),
    (np.nan, "sigma must be finite"), (np.inf, "sigma must be finite"),
    (1e200, "over- or underflows"), (1e-200, "over- or underflows"),
    (np.array([1.0, -1.0]), "sigma must be positive"),
])
def test_crb_bad_sigma(sj, sigma, match):
    s, J = sj
    with pytest.raises(ValueError, match=match):
        crb_from_jacobian(s, J, sigma=sigma, estimate=("m0s",), on_singular="inf")
    with pytest.raises(ValueError, match=match):
        cramer_rao_bound(SMALL, THETA, sigma=sigma, estimate=("m0s",), on_singular="inf", backend="torch")


@pytest.mark.parametrize("M0", [2.5, 0.3 - 1.7j, np.array([0.5 + 0.5j, 3.0 - 1.0j])])
def test_crb_scales_as_inverse_abs_M0_squared(sj, M0):
    s, J = sj
    kw = dict(estimate=("m0s", "R1f", "T2s"), nuisance=None)  # identifiable from 6 pulses
    ref = crb_from_jacobian(s, J, **kw)
    assert np.all(np.isfinite(ref)) and np.all(ref > 0)
    scale = 1.0 / np.abs(np.broadcast_to(M0, (2,))) ** 2
    np.testing.assert_allclose(crb_from_jacobian(s, J, M0=M0, **kw), ref * scale[:, None], rtol=1e-12)
    ref2 = cramer_rao_bound(SMALL, THETA, backend="torch", **kw)
    np.testing.assert_allclose(cramer_rao_bound(SMALL, THETA, M0=M0, backend="torch", **kw),
                               ref2 * scale[:, None], rtol=1e-12)


# ----------------------------------------------------------------------------- R2sl lookups
def _edge_points():
    tab = load_r2sl_table()
    TRF = 5e-4
    T2s = [TRF / TAU_MIN, TRF / TAU_MAX, TRF / np.sqrt(TAU_MIN * TAU_MAX)]
    B1 = [0.0, PHI_MAX / np.pi, 0.5 * PHI_MAX / np.pi, (PHI_MAX - 0.5 * tab.dphi) / np.pi]
    return [(TRF, np.pi, b, t) for t in T2s for b in B1]


@pytest.mark.parametrize("point", _edge_points())
def test_torch_and_numpy_lookups_agree_at_edges(point):
    """Value and both partials (d/dT2s, d/dB1) at the table's edges and corners, from
    Python floats (no float32 on the way)."""
    n = r2sl_numpy(*point)
    t = r2sl(*point)
    for a, b in zip(n, t):
        assert b.dtype == torch.float64
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-13, atol=0)


def test_torch_lookup_keeps_float64_scalars():
    TRF, alpha, T2s = 5e-4, np.pi, 1.0000001e-5
    B1 = PHI_MAX / np.pi  # the inclusive edge that numpy accepts
    R, dT, dB = r2sl(TRF, alpha, B1, T2s)
    Rn, dTn, dBn = r2sl_numpy(TRF, alpha, B1, T2s)
    assert float(R) == float(Rn) and float(dT) == float(dTn) and float(dB) == float(dBn)
    # float32 of T2s would change tau by ~1e-8 relative: visible in R
    Rf, _, _ = r2sl_numpy(TRF, alpha, B1, float(np.float32(T2s)))
    assert float(Rf) != float(R)


def test_lookup_partials_match_finite_differences_at_the_phi_edge():
    """dR2sl/dB1 at the phi edge is the slope of the last cell (a lookup clamping the phi
    index one cell short would be off by orders of magnitude)."""
    tab = load_r2sl_table()
    TRF, alpha, T2s = 5e-4, np.pi, 1e-5
    B1 = PHI_MAX / np.pi
    h = 0.25 * tab.dphi / np.pi
    for fn in (r2sl_numpy, lambda *a: [x.numpy() for x in r2sl(*a)]):
        R, _, dB = fn(TRF, alpha, B1, T2s)
        R_lo = fn(TRF, alpha, B1 - h, T2s)[0]
        np.testing.assert_allclose(dB, (R - R_lo) / h, rtol=1e-9)
        R_in = fn(TRF, alpha, B1, T2s * (1 + 1e-7))[0]
        _, dT, _ = fn(TRF, alpha, B1, T2s)
        np.testing.assert_allclose(dT, (R_in - R) / (T2s * 1e-7), rtol=1e-5)
