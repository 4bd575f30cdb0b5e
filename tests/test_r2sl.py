"""Tests for sklearn_crb.physics.r2sl (the IDE solver, the table builder and the lookup)."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq

from sklearn_crb.physics.r2sl import build
from sklearn_crb.physics.r2sl.build import build_r2sl_table
from sklearn_crb.physics.r2sl.ide import (
    greens_superlorentzian,
    greens_superlorentzian_integral,
    semisolid_z,
    solve_rho,
    z_linear,
)
from sklearn_crb.physics.r2sl.table import (
    TABLE_PATH,
    bilinear,
    cell,
    load_r2sl_table,
    r2sl,
    r2sl_numpy,
)

# (TRF [s], alpha [rad], B1, T2s [s]) -> R2sl [1/s], dR2sl/dT2s [1/s^2], dR2sl/dB1 [1/s]
# from an independent re-implementation of Assländer et al., MRM 2022, Eq. 9.
SPEC = np.array([
    (500e-6, np.pi, 1.0, 10e-6, 16013.65, -1.349e9, -2691.0),
    (400e-6, np.pi / 2, 1.0, 10e-6, 17443.36, -1.460e9, -416.0),
    (100e-6, np.pi / 2, 1.0, 10e-6, 19791.41, -2.098e9, 1160.0),
    (300e-6, np.pi / 4, 1.0, 12e-6, 15677.79, -1.148e9, -37.8),
    (500e-6, np.pi, 1.0, 12e-6, 13743.06, -9.554e8, -2463.0),
])


def _quad_G(k):
    f = lambda z: math.exp(-k * k * (3 * z * z - 1) ** 2 / 8)  # noqa: E731
    z0 = 1 / math.sqrt(3)
    kw = dict(epsabs=0, epsrel=1e-13, limit=500)
    return quad(f, 0, z0, **kw)[0] + quad(f, z0, 1, **kw)[0]


# ----------------------------------------------------------------------------- Green's function
def test_greens_reference_value():
    assert greens_superlorentzian(10.0) == pytest.approx(0.14712468680944424, rel=1e-14, abs=0)
    assert greens_superlorentzian(0.0) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("k", [0.3, 2.0, 7.5, 40.0, 150.0, 1000.0])
def test_greens_vs_quad(k):
    assert greens_superlorentzian(k) == pytest.approx(_quad_G(k), rel=1e-12)


def test_greens_vectorised_and_even():
    k = np.array([[0.0, 1.0], [-1.0, 10.0]])
    g = greens_superlorentzian(k)
    assert g.shape == (2, 2)
    assert g[0, 1] == g[1, 0]


def test_greens_large_kappa_asymptote():
    # near the magic angle 3 zeta^2 - 1 ~ 2 sqrt(3) d -> int exp(-3/2 kappa^2 d^2) dd
    c = math.sqrt(2 * math.pi / 3)
    assert c == pytest.approx(1.447, abs=5e-4)
    for k in (1e3, 1e4):
        assert k * greens_superlorentzian(k) == pytest.approx(c, rel=2e-3 * 1e3 / k)


def test_greens_integral_vs_quad():
    for u in (0.5, 4.0, 30.0):
        ref = quad(lambda x: float(greens_superlorentzian(x)), 0, u, epsabs=0, epsrel=1e-12,
                   limit=200)[0]
        assert greens_superlorentzian_integral(u) == pytest.approx(ref, rel=1e-11)


# ----------------------------------------------------------------------------- IDE and rho
def test_ide_small_omega_first_order():
    # z = 1 - Omega^2 int_0^t (t - x) G(x) dx + O(Omega^4)
    om = 1e-4
    for t in (1.5, 8.0):
        ref = quad(lambda x: (t - x) * float(greens_superlorentzian(x)), 0, t, epsabs=0,
                   epsrel=1e-12)[0]
        z = float(semisolid_z(t, om))
        assert (1 - z) / om**2 == pytest.approx(ref, rel=1e-6)


def _ide_trapezoid(omega, t_end, h):
    """Independent discretisation of z' = y, y = -omega^2 (G * z): trapezoid in both."""
    n = int(round(t_end / h))
    g = greens_superlorentzian(np.arange(n + 1) * h)
    z = np.empty(n + 1)
    z[0], y = 1.0, 0.0
    o2 = omega**2
    for k in range(n):
        a = -o2 * h * (0.5 * g[k + 1] * z[0] + np.dot(g[k:0:-1], z[1:k + 1]))
        z[k + 1] = (z[k] + 0.5 * h * (y + a)) / (1 + o2 * h * h / 4)
        y = a - 0.5 * o2 * h * z[k + 1]
    return z[-1]


def _z_lin_complex(rho, tau, omega):
    """z_lin exactly as written in the spec (complex sqrt)."""
    s = np.sqrt(complex(rho**2 - 4 * omega**2))
    z = np.exp(-rho * tau / 2) * (np.cosh(s * tau / 2) + rho / s * np.sinh(s * tau / 2))
    return z.real


def test_ide_independent_discretisation_and_rho():
    tau, phi = 10.0, np.pi / 2  # spec row 3: TRF = 100 us, T2s = 10 us, alpha = pi/2
    om = phi / tau
    z1, z2 = _ide_trapezoid(om, tau, 0.02), _ide_trapezoid(om, tau, 0.01)
    z_ind = (4 * z2 - z1) / 3
    assert float(semisolid_z(tau, om)) == pytest.approx(z_ind, abs=2e-8)
    rho = brentq(lambda r: _z_lin_complex(r, tau, om) - z_ind, 0.01, 2.0, xtol=1e-14)
    assert rho / 10e-6 == pytest.approx(19791.41, rel=2e-6)
    assert float(solve_rho(tau, phi)) == pytest.approx(rho, rel=1e-6)


def test_z_linear_forms_and_monotonicity():
    rng = np.random.default_rng(1)
    for _ in range(40):
        tau = math.exp(rng.uniform(0, math.log(150)))
        phi = rng.uniform(0.01, 4.4)
        rho = math.exp(rng.uniform(-4, 1.5))
        ref = _z_lin_complex(rho, tau, phi / tau)
        assert float(z_linear(rho, tau, phi)) == pytest.approx(ref, rel=1e-10, abs=1e-13)
    rr = np.exp(np.linspace(-10, 5, 3001))
    for tau in (1.0, 10.0, 150.0):
        for phi in (0.1, 2.0, np.pi, 4.4):
            assert np.all(np.diff(z_linear(rr, tau, phi)) >= 0)
    # no overflow / NaN for huge rho
    assert np.isfinite(z_linear(1e8, 150.0, 4.0))


def test_solve_rho_spec_values_exact():
    tau = SPEC[:, 0] / SPEC[:, 3]
    phi = SPEC[:, 1] * SPEC[:, 2]
    rho = solve_rho(tau, phi, levels=3)  # 3 Richardson levels: ~1e-8 here, 4x cheaper
    np.testing.assert_allclose(rho / SPEC[:, 3], SPEC[:, 4], rtol=1e-6)


def test_tiny_build_matches_shipped_table():
    tab = load_r2sl_table()
    i0, i1, j1 = 150, 350, 255
    tiny, info = build_r2sl_table(
        n_tau=3, n_phi=3, tau_min=math.exp(tab.log_tau0 + i0 * tab.dlog_tau),
        tau_max=math.exp(tab.log_tau0 + i1 * tab.dlog_tau), phi_max=2 * j1 * tab.dphi,
        estimate_error=False)
    ref = tab.rho[np.ix_([i0, (i0 + i1) // 2, i1], [0, j1, 2 * j1])]
    np.testing.assert_allclose(tiny.rho, ref, rtol=1e-9)
    assert info["n_tau"] == 3


def test_phi_zero_column_is_limit():
    rho = load_r2sl_table().rho
    # rho is even and smooth in phi: rho(0) ~ (4 rho(d) - rho(2d))/3
    np.testing.assert_allclose(rho[:, 0], (4 * rho[:, 1] - rho[:, 2]) / 3, rtol=1e-6)


# ----------------------------------------------------------------------------- table lookup
def test_table_file_and_provenance():
    tab = load_r2sl_table()
    assert load_r2sl_table() is tab
    assert tab.rho.dtype == np.float64 and not tab.rho.flags.writeable
    assert tab.tau_min == pytest.approx(1.0) and tab.tau_max == pytest.approx(150.0, rel=1e-13)
    assert tab.phi0 == 0.0 and tab.phi_max == pytest.approx(4.4, rel=1e-13)
    assert np.all(np.isfinite(tab.rho)) and tab.rho.min() > 0
    npz = TABLE_PATH
    assert npz.stat().st_size <= 2.6e6
    prov = json.loads(npz.with_suffix(".json").read_text())
    # the shipped table was built before the move to physics/r2sl/build.py
    assert prov["build_command"].split()[:3] in (["python", "-m", "sklearn_crb.r2sl"],
                                                 ["python", "-m", build.BUILD_COMMAND.split()[-1]])
    assert prov["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert prov["n_tau"] == tab.n_tau and prov["n_phi"] == tab.n_phi
    assert prov["dlog_tau"] == tab.dlog_tau and prov["dphi"] == tab.dphi
    assert prov["ide_rel_error_estimate_max"] < 2e-6


def test_table_matches_spec_values():
    R, dT, dB = r2sl_numpy(SPEC[:, 0], SPEC[:, 1], SPEC[:, 2], SPEC[:, 3])
    np.testing.assert_allclose(R, SPEC[:, 4], rtol=1e-5)
    np.testing.assert_allclose(dT, SPEC[:, 5], rtol=0.02)
    np.testing.assert_allclose(dB, SPEC[:, 6], rtol=0.02)


def _random_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    TRF = rng.uniform(100e-6, 500e-6, n)
    T2s = rng.uniform(5e-6, 25e-6, n)
    alpha = rng.uniform(-np.pi, np.pi, n)
    B1 = rng.uniform(0.5, 1.4, n)
    return TRF, alpha, B1, T2s


def test_partials_vs_central_differences():
    tab = load_r2sl_table()
    TRF, alpha, B1, T2s = _random_inputs(200)
    R, dT, dB = r2sl_numpy(TRF, alpha, B1, T2s)
    hT = 1e-6 * T2s  # -> du = 1e-6/dlog_tau ~ 1e-4 cells
    hB = 1e-7 * B1
    fd_T = (r2sl_numpy(TRF, alpha, B1, T2s + hT)[0] - r2sl_numpy(TRF, alpha, B1, T2s - hT)[0]) / (2 * hT)
    fd_B = (r2sl_numpy(TRF, alpha, B1 + hB, T2s)[0] - r2sl_numpy(TRF, alpha, B1 - hB, T2s)[0]) / (2 * hB)
    # keep points whose stencil stays inside one cell
    u = (np.log(TRF / T2s) - tab.log_tau0) / tab.dlog_tau
    v = B1 * np.abs(alpha) / tab.dphi
    inside = ((np.abs(u - np.round(u)) > 1e-3) & (np.abs(v - np.round(v)) > 1e-3))
    assert inside.sum() > 150
    np.testing.assert_allclose(fd_T[inside], dT[inside], rtol=1e-6)
    scale_B = np.abs(R * np.abs(alpha))[inside] * 1e-6  # dB can be ~0
    assert np.all(np.abs(fd_B[inside] - dB[inside]) <= 1e-6 * np.abs(dB[inside]) + scale_B)


def test_torch_matches_numpy_and_autograd():
    TRF, alpha, B1, T2s = _random_inputs(300, seed=3)
    Rn, dTn, dBn = r2sl_numpy(TRF, alpha, B1, T2s)
    tB1 = torch.tensor(B1, requires_grad=True)
    tT2s = torch.tensor(T2s, requires_grad=True)
    R, dT, dB = r2sl(torch.tensor(TRF), torch.tensor(alpha), tB1, tT2s)
    assert R.dtype == torch.float64 and R.shape == (300,)
    np.testing.assert_allclose(R.detach().numpy(), Rn, rtol=1e-14)
    np.testing.assert_allclose(dT.detach().numpy(), dTn, rtol=1e-13)
    # dB sums terms of opposite sign: numpy 1.23's and torch's rounding differ by up to ~2e-12 of it
    np.testing.assert_allclose(dB.detach().numpy(), dBn, rtol=1e-11, atol=1e-12)
    gB, gT = torch.autograd.grad(R.sum(), (tB1, tT2s))
    np.testing.assert_allclose(gT.numpy(), dTn, rtol=1e-12)
    np.testing.assert_allclose(gB.numpy(), dBn, rtol=1e-12, atol=1e-9)


def test_torch_broadcasting_and_scalars():
    R, dT, dB = r2sl(5e-4, torch.tensor([np.pi, -np.pi, np.pi / 2]), 1.0,
                     torch.tensor([[10e-6], [12e-6]], dtype=torch.float32))
    assert R.shape == (2, 3) and R.dtype == torch.float64
    assert R[0, 0] == R[0, 1]  # |alpha|
    assert float(R[0, 0]) == pytest.approx(16013.65, rel=1e-5)
    R0, _, _ = r2sl(5e-4, np.pi, 1.0, 10e-6)
    assert R0.shape == ()


def test_numba_compiled_lookup_matches_numpy():
    """The kernel compiles the very cell rule and formula of the numpy and torch lookups."""
    numba = pytest.importorskip("numba")
    from sklearn_crb.physics._numba import bloch

    tab = load_r2sl_table()
    TRF, alpha, B1, T2s = _random_inputs(50, seed=5)
    # plus the table's edges and corners
    TRF = np.concatenate([TRF, [5e-4, 5e-4, 5e-4, 5e-4]])
    T2s = np.concatenate([T2s, [5e-4, 5e-4 / 150, 5e-4, 5e-4 / 150]])
    alpha = np.concatenate([alpha, [np.pi, np.pi, np.pi, np.pi]])
    B1 = np.concatenate([B1, [0.0, 0.0, 4.4 / np.pi, 4.4 / np.pi]])
    Rn, dTn, dBn = r2sl_numpy(TRF, alpha, B1, T2s)
    for k in range(TRF.size):
        out = bloch._r2sl(math.log(TRF[k]) - math.log(T2s[k]), B1[k] * abs(alpha[k]), T2s[k],
                          abs(alpha[k]), tab.rho, tab.log_tau0, tab.dlog_tau, tab.phi0, tab.dphi)
        np.testing.assert_allclose(out, (Rn[k], dTn[k], dBn[k]), rtol=1e-14, atol=1e-9)
    assert isinstance(bloch._bilinear, numba.core.registry.CPUDispatcher)
    assert bloch._bilinear.py_func is bilinear and bloch._cell.py_func is cell


def test_cell_rule():
    assert cell(-0.5, 5) == (0.0, -0.5)  # extrapolated from the first cell
    assert cell(2.25, 5) == (2.0, 0.25)
    assert cell(4.0, 5) == (3.0, 1.0)  # the upper edge belongs to the last cell
    assert cell(4.5, 5) == (3.0, 1.5)


def test_table_edges_inclusive():
    tab = load_r2sl_table()
    for T2s, B1 in ((5e-4, 4.4 / np.pi), (5e-4 / 150, 0.0)):
        R, dT, dB = r2sl_numpy(5e-4, np.pi, B1, T2s)
        assert np.isfinite(R) and np.isfinite(dT) and np.isfinite(dB)
    R, _, _ = r2sl_numpy(5e-4, np.pi, 0.0, 5e-4)
    assert float(R) == pytest.approx(tab.rho[0, 0] / 5e-4, rel=1e-12)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [r2sl, r2sl_numpy])
def test_out_of_range_T2s(fn):
    with pytest.raises(ValueError, match=r"T2s=3e-06 s with TRF=0\.0005 s gives TRF/T2s=166\.7"):
        fn(5e-4, np.pi, 1.0, np.array([10e-6, 3e-6]))
    with pytest.raises(ValueError, match=r"TRF/T2s=0\.5 outside"):
        fn(5e-6, np.pi, 1.0, 10e-6)


@pytest.mark.parametrize("fn", [r2sl, r2sl_numpy])
def test_out_of_range_B1_alpha(fn):
    with pytest.raises(ValueError, match=r"B1\*\|alpha\| = 4\.807 rad exceeds 4\.4 rad \(B1=1\.53"):
        fn(5e-4, np.pi, np.array([1.0, 1.53]), 10e-6)
    with pytest.raises(ValueError, match=r"B1 must be >= 0"):
        fn(5e-4, np.pi, -0.1, 10e-6)


@pytest.mark.parametrize("fn", [r2sl, r2sl_numpy])
@pytest.mark.parametrize("pos,name", [(0, "TRF"), (1, "alpha"), (2, "B1"), (3, "T2s")])
def test_nan_inputs(fn, pos, name):
    args = [np.array([5e-4, 4e-4]), np.array([np.pi, 1.0]), np.array([1.0, 0.9]),
            np.array([1e-5, 1.2e-5])]
    args[pos] = args[pos].copy()
    args[pos][1] = np.nan
    with pytest.raises(ValueError, match=rf"argument {name} contains NaN"):
        fn(*args)
    args[pos][1] = np.inf
    with pytest.raises(ValueError, match=rf"{name}"):
        fn(*args)


def test_nonpositive_times():
    with pytest.raises(ValueError, match="T2s must be > 0"):
        r2sl(5e-4, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="TRF must be > 0"):
        r2sl_numpy(-5e-4, 1.0, 1.0, 1e-5)


# ----------------------------------------------------------------------------- command line
def test_cli_rebuild_tiny(tmp_path):
    out = tmp_path / "tiny.npz"
    rc = build.main(["--n-tau", "4", "--n-phi", "3", "--tau-min", "2", "--tau-max", "6",
                 "--phi-max", "3", "--levels", "3", "-o", str(out)])
    assert rc == 0
    tab = load_r2sl_table(out)
    prov = json.loads(out.with_suffix(".json").read_text())
    assert tab.rho.shape == (4, 3) and prov["n_tau"] == 4
    assert prov["build_command"].startswith("python -m sklearn_crb.physics.r2sl.build")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.npz"]  # no temporaries
    R, _, _ = r2sl_numpy(6e-5, 1.5, 1.0, 1e-5, table=tab)  # a table node (tau=6, phi=1.5)
    assert float(R) * 1e-5 == pytest.approx(float(solve_rho(6.0, 1.5)), rel=1e-6)
