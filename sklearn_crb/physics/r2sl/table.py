"""Linearised super-Lorentzian saturation rate R2sl of the generalized Bloch model.

Implements docs/gbloch_spec.md §2 (Assländer et al., MRM 2022;87:2003-2017, "Generalized Bloch
model"; reference: MRIgeneralizedBloch.jl, Greens_Functions.jl and Linearized_R2s.jl): the
Green's function, an accurate solver of the semi-solid IDE, the table builder
(``python -m sklearn_crb.r2sl``) and the bilinear lookup ``rho(log tau, phi)``, with
``tau = TRF/T2s``, ``phi = B1*|alpha|`` and ``rho = R2sl*T2s``, in torch (:func:`r2sl`),
numpy (:func:`r2sl_numpy`) and numba-compatible scalar form (:func:`r2sl_scalar`).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TAU_MIN",
    "TAU_MAX",
    "PHI_MAX",
    "greens_superlorentzian",
    "greens_superlorentzian_integral",
    "semisolid_z",
    "z_linear",
    "solve_rho",
    "build_r2sl_table",
    "save_r2sl_table",
    "R2slTable",
    "load_r2sl_table",
    "r2sl",
    "r2sl_numpy",
    "rho_bilinear",
    "r2sl_scalar",
    "numba_r2sl_scalar",
]

#: Table domain: ``tau = TRF/T2s`` in [TAU_MIN, TAU_MAX] (log-spaced grid).
TAU_MIN = 1.0
TAU_MAX = 150.0
#: Table domain: ``phi = B1*|alpha|`` in [0, PHI_MAX] rad (linear grid).  The linearisation
#: loses monotonicity at ``tan(phi) = phi`` (phi = 4.4934) and has no solution for phi >~ 4.55.
PHI_MAX = 4.4

#: Default shipped-table resolution (rows: log tau, columns: phi).
DEFAULT_N_TAU = 576
DEFAULT_N_PHI = 512

#: Default IDE discretisation: coarsest step h0 (units of T2s), Richardson levels
#: (steps h0, h0/2, ..., h0/2**(levels-1)) and Lagrange stencil size for off-grid tau.
DEFAULT_H0 = 1.0 / 16.0
DEFAULT_LEVELS = 4
DEFAULT_STENCIL = 12

_DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # sklearn_crb/data
_TABLE_NPZ = "r2sl_table.npz"
_TABLE_JSON = "r2sl_table.json"

# Relative slack for out-of-range checks (absorbs rounding of log/exp at the table edges).
_EDGE_RTOL = 1e-12

_SQRT_PI = math.sqrt(math.pi)
_ZETA0 = 1.0 / math.sqrt(3.0)  # magic angle: 3*zeta**2 - 1 = 0


# ----------------------------------------------------------------------------------------
# Green's function
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _zeta_rule(d0: float = 1e-7, ratio: float = 2.0, n_gauss: int = 16):
    """Quadrature rule on zeta in [0, 1] clustered geometrically around zeta0 = 1/sqrt(3).

    Each side of the magic angle is split into panels ``[0, d0], [d0, 2 d0], [2 d0, 4 d0], ...``
    in the distance ``d = |zeta - zeta0|``, each with an ``n_gauss``-point Gauss-Legendre rule.
    This resolves the Gaussian of width ~0.82/kappa around zeta0 for any kappa <~ 1e6.

    Returns
    -------
    a : ndarray
        ``(3 zeta**2 - 1)**2 / 8`` at the nodes.
    w : ndarray
        Quadrature weights (sum to 1).
    """
    x, wx = np.polynomial.legendre.leggauss(n_gauss)
    nodes, weights = [], []
    for length, sign in ((_ZETA0, -1.0), (1.0 - _ZETA0, 1.0)):
        edges = [0.0]
        d = d0
        while d < length:
            edges.append(d)
            d *= ratio
        edges.append(length)
        e = np.asarray(edges)
        lo, hi = e[:-1], e[1:]
        half = 0.5 * (hi - lo)
        dist = half[:, None] * x[None, :] + (0.5 * (hi + lo))[:, None]
        nodes.append(_ZETA0 + sign * dist.ravel())
        weights.append((half[:, None] * wx[None, :]).ravel())
    zeta = np.concatenate(nodes)
    w = np.concatenate(weights)
    a = (3.0 * zeta**2 - 1.0) ** 2 / 8.0
    a.setflags(write=False)
    w.setflags(write=False)
    return a, w


def greens_superlorentzian(kappa):
    """Super-Lorentzian Green's function of the generalized Bloch model.

    ``G(kappa) = int_0^1 exp(-kappa**2 (3 zeta**2 - 1)**2 / 8) d zeta``, with ``kappa = t/T2s``
    the dimensionless time.  Evaluated with a composite Gauss-Legendre rule clustered at the
    magic angle ``zeta = 1/sqrt(3)`` (relative accuracy ~1e-15 for |kappa| <~ 1e4).

    Parameters
    ----------
    kappa : array_like
        Dimensionless time (t/T2s).  G is even in kappa.

    Returns
    -------
    ndarray
        G(kappa), same shape as ``kappa``; G(0) = 1 and G(kappa) ~ sqrt(2 pi/3)/|kappa|
        (= 1.4472/|kappa|) for large |kappa|.

    Examples
    --------
    >>> float(greens_superlorentzian(10.0))  # doctest: +ELLIPSIS
    0.147124686809444...
    """
    a, w = _zeta_rule()
    k = np.asarray(kappa, dtype=np.float64)
    out = np.exp(-np.multiply.outer(k * k, a)) @ w
    return out


def greens_superlorentzian_integral(u):
    """Running integral ``K(u) = int_0^u G(kappa) d kappa`` of :func:`greens_superlorentzian`.

    Uses ``int_0^u exp(-a v**2) dv = sqrt(pi) erf(sqrt(a) u) / (2 sqrt(a))`` under the zeta
    quadrature, so K is accurate to ~1e-15 relative.

    Parameters
    ----------
    u : array_like
        Dimensionless time (t/T2s), u >= 0.

    Returns
    -------
    ndarray
        K(u), same shape as ``u``; K(u) ~ u for small u, ~ sqrt(2 pi/3) log(u) for large u.
    """
    from scipy.special import erf

    a, w = _zeta_rule()
    u = np.asarray(u, dtype=np.float64)
    out = np.zeros(u.shape)
    pos = u > 0
    if np.any(pos):
        # erf(x)/x keeps full relative accuracy for small x > 0 (a > 0 at all nodes)
        x = np.multiply.outer(u[pos], np.sqrt(a))
        ratio = erf(x)
        ratio /= x
        out[pos] = u[pos] * (ratio @ w) * (0.5 * _SQRT_PI)
    return out


# ----------------------------------------------------------------------------------------
# IDE of the isolated semi-solid pool
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _neumann_kernel():
    """Compile (lazily) the numba kernel for the discrete Neumann-series coefficients.

    Serial on purpose: the inner products vectorise (SIMD), and a serial kernel is as fast as
    a threaded one on a loaded 2-core machine while compiling no slower.
    """
    import numba

    @numba.njit(cache=False, fastmath=True)
    def dot(a, b, n):  # pragma: no cover - compiled
        s = 0.0
        for j in range(n):
            s += a[j] * b[j]
        return s

    @numba.njit(cache=False, fastmath=True)
    def kernel(kv, n_terms, h):  # pragma: no cover - compiled
        m = kv.shape[0]
        krev = kv[::-1].copy()  # kv[k - j] == krev[m - 1 - k + j]: unit stride in j
        c = np.empty((n_terms + 1, m))
        c[0, :] = 1.0
        for n in range(1, n_terms + 1):
            prev = c[n - 1]
            for k in range(m):
                # trapezoid: h [K(t_k) c(0)/2 + sum_{0<j<k} K(t_k - t_j) c(t_j)], K(0) = 0
                s = dot(krev[m - k:], prev[1:], max(k - 1, 0))
                c[n, k] = h * (s + 0.5 * kv[k] * prev[0])
        return c

    return kernel


def _n_terms_for(phi_max: float, tol: float = 1e-18) -> int:
    """Smallest N with phi_max**(2N+2)/(2N+2)! < tol (bound on the Neumann-series tail)."""
    n = 1
    while True:
        log_term = (2 * n + 2) * math.log(max(phi_max, 1e-300)) - math.lgamma(2 * n + 3)
        if log_term < math.log(tol) or n > 200:
            return max(n, 4)
        n += 1


def _neumann_coefficients(t_max: float, h0: float, levels: int, n_terms: int):
    """Coefficients c_n(t) of the IDE solution ``z(t) = sum_n (-Omega**2)**n c_n(t)``.

    Integrating the IDE once gives the second-kind Volterra equation
    ``z = 1 - Omega**2 (K * z)`` with ``K`` from :func:`greens_superlorentzian_integral`,
    whose Neumann series has ``c_0 = 1``, ``c_{n+1} = K * c_n`` (``*``: convolution on
    [0, t]).  The convolutions are evaluated with the trapezoid rule on steps
    ``h0 / 2**l`` (l < levels) and Richardson-extrapolated in h**2 on the coarse grid
    (all integrands are smooth, so the error expansion is in even powers of h).

    Returns
    -------
    t : ndarray, shape (M,)
        Coarse grid ``k*h0``, covering [0, t_max].
    c : ndarray, shape (n_terms+1, M)
        Extrapolated coefficients (all levels).
    c_lower : ndarray or None
        Extrapolation using one level fewer (for an error estimate); None if levels == 1.
    """
    m0 = int(math.ceil(t_max / h0)) + 1
    kernel = _neumann_kernel()
    fmax = 2 ** (levels - 1)
    # K on the finest grid; the coarser grids are subsets of it
    k_fine = greens_superlorentzian_integral(np.arange((m0 - 1) * fmax + 1) * (h0 / fmax))
    per_level = []
    for lev in range(levels):
        f = 2**lev
        c = kernel(np.ascontiguousarray(k_fine[:: fmax // f]), n_terms, h0 / f)
        per_level.append(np.ascontiguousarray(c[:, ::f]))

    def richardson(vals):
        tab = list(vals)
        for m in range(1, len(tab)):
            fac = 4.0**m
            tab = [(fac * tab[i + 1] - tab[i]) / (fac - 1.0) for i in range(len(tab) - 1)]
        return tab[0]

    c = richardson(per_level)
    c_lower = richardson(per_level[:-1]) if levels > 1 else None
    return np.arange(m0) * h0, c, c_lower


def _lagrange_rows(tq, h0: float, npts: int, m: int):
    """Stencil indices and Lagrange weights to interpolate grid data (step h0) at ``tq``."""
    u = tq / h0
    k0 = np.clip(np.floor(u).astype(np.int64) - npts // 2 + 1, 0, m - npts)
    idx = k0[:, None] + np.arange(npts)[None, :]
    w = np.ones(idx.shape)
    for a in range(npts):
        for b in range(npts):
            if a != b:
                w[:, a] *= (u - idx[:, b]) / (a - b)
    return idx, w


def _coefficients_at(tau, h0, levels, n_terms, npts):
    """c_n(tau) (shape (n_terms+1, P)) at arbitrary tau > 0, plus a lower-order estimate."""
    tau = np.asarray(tau, dtype=np.float64).ravel()
    t_grid, c, c_low = _neumann_coefficients(float(tau.max()) + (npts + 1) * h0, h0, levels,
                                             n_terms)
    idx, w = _lagrange_rows(tau, h0, npts, t_grid.size)
    ct = np.einsum("nij,ij->ni", c[:, idx], w)
    # lower-order estimate: one Richardson level fewer and a 2-point smaller stencil
    if c_low is None:
        c_low = c
    idx2, w2 = _lagrange_rows(tau, h0, npts - 2, t_grid.size)
    ct_low = np.einsum("nij,ij->ni", c_low[:, idx2], w2)
    return ct, ct_low


def _sum_series(ct, tau, phi):
    """z = sum_n (-(phi/tau)**2)**n c_n(tau) by Horner's rule (broadcast over tau, phi)."""
    x = -((phi / tau) ** 2)
    z = np.zeros(np.broadcast(tau, phi).shape)
    for n in range(ct.shape[0] - 1, -1, -1):
        z = z * x + ct[n]
    return z


def semisolid_z(tau, omega, *, h0=DEFAULT_H0, levels=DEFAULT_LEVELS, n_terms=None,
                stencil=DEFAULT_STENCIL):
    """Solve the isolated semi-solid IDE on resonance and return z at dimensionless time tau.

    ``z'(t) = -omega**2 int_0^t G(t - x) z(x) dx``, ``z(0) = 1``, time in units of T2s and
    ``omega = B1*omega1*T2s``.  Solved via the Neumann series of the equivalent Volterra
    equation (see :func:`_neumann_coefficients`), accurate to ~1e-12 absolute for
    ``omega*tau <= 4.5`` and tau <= ~200.

    Parameters
    ----------
    tau : array_like
        Dimensionless times t/T2s (> 0), broadcast against ``omega``.
    omega : array_like
        Dimensionless nutation rates B1*omega1*T2s (rad per T2s).
    h0, levels, stencil : float, int, int
        Discretisation (coarse step, Richardson levels, Lagrange stencil); see module defaults.
    n_terms : int, optional
        Neumann-series length; default from max(omega*tau).

    Returns
    -------
    ndarray
        z(tau) (dimensionless longitudinal magnetization, z(0) = 1).
    """
    tau, omega = np.broadcast_arrays(np.asarray(tau, np.float64), np.asarray(omega, np.float64))
    if np.any(~(tau > 0)):
        raise ValueError("semisolid_z: tau must be > 0")
    phi = np.abs(omega * tau)
    if n_terms is None:
        n_terms = _n_terms_for(float(phi.max()) if phi.size else 1.0)
    ct, _ = _coefficients_at(tau, h0, levels, n_terms, stencil)
    return _sum_series(ct, tau.ravel(), phi.ravel()).reshape(tau.shape)


def z_linear(rho, tau, phi):
    """z at the end of a pulse for the linear 2x2 model ``[[-rho, Omega], [-Omega, 0]]``.

    Started from (x, z) = (0, 1) with ``Omega = phi/tau``; in terms of ``r = rho*tau`` and the
    rotation angle ``phi``:
    ``z = exp(-r/2) [cosh(s/2) + (r/s) sinh(s/2)]`` with ``s = sqrt(r**2 - 4 phi**2)``.
    Evaluated in an overflow- and cancellation-free form on each branch.

    Parameters
    ----------
    rho : array_like
        Dimensionless rate R2sl*T2s (>= 0).
    tau : array_like
        Dimensionless pulse duration TRF/T2s (> 0).
    phi : array_like
        Rotation angle B1*|alpha| (rad).

    Returns
    -------
    ndarray
        z_lin, broadcast shape.
    """
    r, phi = np.broadcast_arrays(np.asarray(rho, np.float64) * np.asarray(tau, np.float64),
                                 np.asarray(phi, np.float64))
    return _z_lin_r(r, phi)


def _z_lin_r(r, phi):
    d = r * r - 4.0 * phi * phi
    over = d > 0.0
    # over-damped: z = 1/2 exp(-(r-s)/2) [1 + e^{-s} + r (1 - e^{-s})/s], r - s = 4phi^2/(r+s)
    s = np.sqrt(np.where(over, d, 1.0))
    em = np.where(s > 1e-300, -np.expm1(-s) / s, 1.0)
    z_over = 0.5 * np.exp(-2.0 * phi * phi / (r + s)) * (1.0 + np.exp(-s) + r * em)
    # under-damped: s = i w, z = exp(-r/2) [cos(w/2) + (r/2) sin(w/2)/(w/2)]
    w = np.sqrt(np.where(over, 1.0, -d))
    z_under = np.exp(-0.5 * r) * (np.cos(0.5 * w) + 0.5 * r * np.sinc(0.5 * w / np.pi))
    return np.where(over, z_over, z_under)


def _g_small_phi(r):
    """(r - 1 + exp(-r))/r**2: the O(phi**2) coefficient of 1 - z_lin, divided by tau**2."""
    r = np.asarray(r, np.float64)
    rs = np.where(r > 1e-3, r, 1.0)
    series = 0.5 - r / 6.0 + r * r / 24.0 - r**3 / 120.0
    return np.where(r > 1e-3, (rs + np.expm1(-rs)) / (rs * rs), series)


def _bisect_log(fun, target, shape, lo=1e-8, hi=1e6, iters=56):
    """Vectorised bisection on log r for an increasing function ``fun(r) = target``."""
    a = np.full(shape, math.log(lo))
    b = np.full(shape, math.log(hi))
    ok = (fun(np.exp(a)) <= target) & (fun(np.exp(b)) >= target)
    for _ in range(iters):
        m = 0.5 * (a + b)
        up = fun(np.exp(m)) > target
        b = np.where(up, m, b)
        a = np.where(up, a, m)
    r = np.exp(0.5 * (a + b))
    return np.where(ok, r, np.nan)


def _rho_from_coefficients(ct, tau, phi):
    """Linearised rho at (tau, phi) pairs (1-D arrays) given c_n(tau)."""
    z = _sum_series(ct, tau, phi)
    rho = np.empty(tau.shape)
    zero = phi == 0.0
    nz = ~zero
    if np.any(nz):
        p = phi[nz]
        r = _bisect_log(lambda rr: _z_lin_r(rr, p), z[nz], p.shape)
        rho[nz] = r / tau[nz]
    if np.any(zero):
        # phi -> 0 limit: 1 - z ~ phi^2 c_1/tau^2 (IDE) and phi^2 g(r) (linear model)
        target = ct[1][zero] / tau[zero] ** 2
        r = _bisect_log(lambda rr: -_g_small_phi(rr), -target, target.shape)
        rho[zero] = r / tau[zero]
    return rho


def solve_rho(tau, phi, *, h0=DEFAULT_H0, levels=DEFAULT_LEVELS, n_terms=None,
              stencil=DEFAULT_STENCIL, return_error=False):
    """Exact (non-tabulated) linearised rate ``rho = R2sl*T2s`` at arbitrary points.

    For each pair (tau, phi) solves the semi-solid IDE with ``Omega = phi/tau`` up to ``tau``
    and finds, by bisection on log(rho), the rho for which the 2x2 linear model gives the same
    z(tau) (:func:`z_linear` is increasing in rho for phi < 4.4934).  For ``phi == 0`` the limit
    phi -> 0 is returned (matching the O(phi**2) terms of both models).

    Parameters
    ----------
    tau : array_like
        TRF/T2s (> 0), broadcast against ``phi``.
    phi : array_like
        B1*|alpha| in rad (>= 0).
    h0, levels, n_terms, stencil
        IDE discretisation; see :func:`semisolid_z`.
    return_error : bool
        Also return an error estimate |rho - rho_lower_order| (same shape).

    Returns
    -------
    rho : ndarray
        Dimensionless rate (R2sl*T2s); NaN where the linearisation has no solution.
    err : ndarray, optional
        Absolute error estimate of ``rho`` (only if ``return_error``).

    Notes
    -----
    Relative accuracy ~1e-8 for 0.005 <= phi <= 4.4 and 1 <= tau <= 150 (checked against a
    run with h0/2 and a 16-point stencil).  For 0 < phi << 0.01 rounding of z (~1e-16)
    limits it to ~1e-16/phi**2; phi == 0 itself is exact (limit).
    """
    tau, phi = np.broadcast_arrays(np.asarray(tau, np.float64), np.asarray(phi, np.float64))
    shape = tau.shape
    tf, pf = tau.ravel(), np.abs(phi.ravel())
    if np.any(~(tf > 0)):
        raise ValueError("solve_rho: tau must be > 0")
    if n_terms is None:
        n_terms = _n_terms_for(float(pf.max()) if pf.size else 1.0)
    ct, ct_low = _coefficients_at(tf, h0, levels, n_terms, stencil)
    rho = _rho_from_coefficients(ct, tf, pf).reshape(shape)
    if not return_error:
        return rho
    rho_low = _rho_from_coefficients(ct_low, tf, pf).reshape(shape)
    return rho, np.abs(rho - rho_low)


# ----------------------------------------------------------------------------------------
# Table building
# ----------------------------------------------------------------------------------------
def _grid(n_tau, n_phi, tau_min, tau_max, phi_max):
    log_tau0 = math.log(tau_min)
    dlog_tau = (math.log(tau_max) - log_tau0) / (n_tau - 1)
    dphi = phi_max / (n_phi - 1)
    log_tau = log_tau0 + dlog_tau * np.arange(n_tau)
    phi = dphi * np.arange(n_phi)
    return log_tau0, dlog_tau, dphi, log_tau, phi


def build_r2sl_table(n_tau=DEFAULT_N_TAU, n_phi=DEFAULT_N_PHI, *, tau_min=TAU_MIN,
                     tau_max=TAU_MAX, phi_max=PHI_MAX, h0=DEFAULT_H0, levels=DEFAULT_LEVELS,
                     stencil=DEFAULT_STENCIL, estimate_error=True, verbose=False):
    """Build the R2sl table ``rho(log tau, phi)`` (rho = R2sl*T2s).

    Method (see :func:`solve_rho`): the IDE's Neumann-series coefficients c_n(t) are computed
    once on [0, tau_max] (trapezoid product integration with steps h0/2**l, l < levels,
    Richardson-extrapolated; numba), interpolated to the log-spaced tau nodes with a
    ``stencil``-point Lagrange rule, summed for every phi node (``Omega = phi/tau``), and rho is
    found by vectorised bisection on log(rho).  The phi = 0 column holds the exact phi -> 0
    limit.  Not run at import; the shipped table is rebuilt with ``python -m sklearn_crb.r2sl``.

    Parameters
    ----------
    n_tau, n_phi : int
        Grid sizes: ``log_tau = log(tau_min) + i*dlog_tau`` (i < n_tau) and
        ``phi = j*dphi`` (j < n_phi).
    tau_min, tau_max : float
        Range of tau = TRF/T2s.
    phi_max : float
        Largest rotation angle B1*|alpha| (rad); must be < 4.49.
    h0, levels, stencil
        IDE discretisation (coarse step in units of T2s, Richardson levels, stencil size).
    estimate_error : bool
        Also evaluate the exact rho at all cell centres and edge midpoints and report the
        bilinear interpolation error, and the IDE-solver error estimate (lower-order solve).
    verbose : bool
        Print progress.

    Returns
    -------
    table : R2slTable
        The table.
    info : dict
        Provenance/diagnostics (grids, method, timings, error estimates; with
        ``estimate_error``, ``info["_cell_error"]`` holds the per-cell maximum relative
        bilinear error, shape (n_tau-1, n_phi-1)).
    """
    if not (0 < phi_max < 4.49):
        raise ValueError("phi_max must be in (0, 4.49) rad")
    if not (0 < tau_min < tau_max):
        raise ValueError("need 0 < tau_min < tau_max")
    t_start = time.perf_counter()
    log_tau0, dlog_tau, dphi, log_tau, phi = _grid(n_tau, n_phi, tau_min, tau_max, phi_max)
    tau = np.exp(log_tau)
    # coefficients on a tau set covering nodes and (optionally) midpoints
    tau_mid = np.exp(log_tau[:-1] + 0.5 * dlog_tau)
    tau_all = np.concatenate([tau, tau_mid]) if estimate_error else tau
    n_terms = _n_terms_for(phi_max)
    ct_all, ct_low_all = _coefficients_at(tau_all, h0, levels, n_terms, stencil)
    t_coef = time.perf_counter() - t_start
    if verbose:
        print(f"coefficients: {t_coef:.1f} s", flush=True)

    def rho_on(ct, tau_v, phi_v):
        tt = np.repeat(tau_v, phi_v.size)
        pp = np.tile(phi_v, tau_v.size)
        cc = np.repeat(ct, phi_v.size, axis=1)
        return _rho_from_coefficients(cc, tt, pp).reshape(tau_v.size, phi_v.size)

    rho = rho_on(ct_all[:, :n_tau], tau, phi)
    if not np.all(np.isfinite(rho)):
        raise RuntimeError("R2sl table has non-finite entries; reduce phi_max")
    t_table = time.perf_counter() - t_start
    if verbose:
        print(f"table: {t_table:.1f} s", flush=True)

    info = {
        "n_tau": int(n_tau), "n_phi": int(n_phi),
        "tau_min": float(tau_min), "tau_max": float(tau_max), "phi_max": float(phi_max),
        "log_tau0": log_tau0, "dlog_tau": dlog_tau, "phi0": 0.0, "dphi": dphi,
        "ide_h0": float(h0), "ide_levels": int(levels),
        "ide_finest_step": float(h0) / 2 ** (levels - 1),
        "ide_stencil": int(stencil), "neumann_terms": int(n_terms),
        "rho_min": float(rho.min()), "rho_max": float(rho.max()),
        "time_table_s": round(t_table, 2),
    }
    if estimate_error:
        ct_nodes_low = ct_low_all[:, :n_tau]
        rho_low = rho_on(ct_nodes_low, tau, phi)
        solver_err = np.abs(rho_low / rho - 1.0)
        info["ide_rel_error_estimate_max"] = float(solver_err.max())
        info["ide_rel_error_note"] = (
            "max |rho_low/rho - 1| over the grid nodes, rho_low from a lower-order solve (one "
            "Richardson level fewer, stencil-2): a conservative bound (it is the error of the "
            "lower-order solve)")
        phi_mid = phi[:-1] + 0.5 * dphi
        ct_mid = ct_all[:, n_tau:]
        # exact values at edge midpoints (tau-mid, phi-node), (tau-node, phi-mid), centres
        ex_t = rho_on(ct_mid, tau_mid, phi)
        ex_p = rho_on(ct_all[:, :n_tau], tau, phi_mid)
        ex_c = rho_on(ct_mid, tau_mid, phi_mid)
        bl_t = 0.5 * (rho[:-1] + rho[1:])
        bl_p = 0.5 * (rho[:, :-1] + rho[:, 1:])
        bl_c = 0.25 * (rho[:-1, :-1] + rho[1:, :-1] + rho[:-1, 1:] + rho[1:, 1:])
        e_t = np.abs(bl_t / ex_t - 1.0)
        e_p = np.abs(bl_p / ex_p - 1.0)
        e_c = np.abs(bl_c / ex_c - 1.0)
        # worst error per cell (cells indexed by lower-left node)
        cell = np.maximum(np.maximum(e_c, np.maximum(e_t[:, :-1], e_t[:, 1:])),
                          np.maximum(e_p[:-1], e_p[1:]))
        regions = {}
        for name, pmax, tmin, tmax in [
            ("all", phi_max, tau_min, tau_max),
            ("phi<=pi", math.pi, tau_min, tau_max),
            ("phi<=2.5", 2.5, tau_min, tau_max),
            ("phi<=pi,tau>=4", math.pi, 4.0, tau_max),
            ("phi<=1.4pi,tau>=20", 1.4 * math.pi, 20.0, tau_max),
            ("phi<=1.4pi,tau in[4,100]", 1.4 * math.pi, 4.0, 100.0),
        ]:
            m = (phi[None, 1:] <= pmax + 1e-9) & (tau[:-1, None] >= tmin * (1 - 1e-12)) & (
                tau[1:, None] <= tmax * (1 + 1e-12))
            if np.any(m):
                regions[name] = float(cell[m].max())
        info["bilinear_rel_error_max"] = regions
        info["bilinear_rel_error_note"] = (
            "max over cells of |bilinear/exact - 1| at cell centres and edge midpoints; "
            "keys give the (phi, tau) region")
        info["time_total_s"] = round(time.perf_counter() - t_start, 2)
        info["_cell_error"] = cell  # not serialised
        if verbose:
            print(f"error estimate: {info['time_total_s']:.1f} s", flush=True)

    rho = np.ascontiguousarray(rho)
    rho.setflags(write=False)
    table = R2slTable(log_tau0=log_tau0, dlog_tau=dlog_tau, phi0=0.0, dphi=dphi, rho=rho)
    return table, info


def _atomic_write_bytes(path: Path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_r2sl_table(table: "R2slTable", info: dict | None = None, npz_path=None,
                    json_path=None, command: str | None = None):
    """Write a table to ``.npz`` (and its provenance to ``.json``), each atomically.

    Parameters
    ----------
    table : R2slTable
        Table to write.
    info : dict, optional
        Diagnostics from :func:`build_r2sl_table` (written to the JSON file).
    npz_path, json_path : path-like, optional
        Destinations (default: the shipped ``sklearn_crb/data/r2sl_table.{npz,json}``).
    command : str, optional
        Build command recorded in the provenance.
    """
    import io

    npz_path = Path(npz_path) if npz_path is not None else _DATA_DIR / _TABLE_NPZ
    json_path = Path(json_path) if json_path is not None else npz_path.with_suffix(".json")
    buf = io.BytesIO()
    np.savez(buf, rho=np.asarray(table.rho, np.float64), log_tau=table.log_tau, phi=table.phi,
             grid=np.array([table.log_tau0, table.dlog_tau, table.phi0, table.dphi]))
    data = buf.getvalue()
    _atomic_write_bytes(npz_path, data)
    import numba
    import scipy

    from sklearn_crb._version import __version__

    prov = {
        "file": npz_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "build_command": command or "python -m sklearn_crb.r2sl",
        "build_date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "package": "sklearn-crb", "package_version": __version__,
        "python": sys.version.split()[0], "numpy": np.__version__,
        "scipy": scipy.__version__, "numba": numba.__version__,
        "quantity": "rho = R2sl*T2s (dimensionless); R2sl = rho/T2s",
        "coordinates": {
            "rows": "log_tau = log(TRF/T2s) = log_tau0 + i*dlog_tau, i = 0..n_tau-1",
            "cols": "phi = B1*|alpha| (rad) = phi0 + j*dphi, j = 0..n_phi-1",
            "interpolation": "bilinear in (log_tau, phi)",
        },
        "method": (
            "IDE z' = -Omega^2 int_0^t G(t-x) z(x) dx (t in units of T2s, Omega = phi/tau) "
            "integrated once to the Volterra equation z = 1 - Omega^2 K*z, K(u) = int_0^u G; "
            "solved by its Neumann series z = sum_n (-Omega^2)^n c_n(t), c_{n+1} = K*c_n, "
            "with trapezoid product integration at steps h0/2^l (l < levels), Richardson "
            "extrapolation in h^2, Lagrange interpolation to the tau nodes; rho from "
            "z_lin(rho) = z(tau) by bisection on log(rho). G and K by a composite "
            "Gauss-Legendre rule clustered at the magic angle. phi = 0 column: exact "
            "phi -> 0 limit (matching the O(phi^2) terms)."),
        "references": [
            "Asslaender J, Gultekin C, Flassbeck S, Glaser SJ, Sodickson DK. Generalized Bloch "
            "model: a theory for pulsed magnetization transfer. MRM 2022;87:2003-2017",
            "MRIgeneralizedBloch.jl: src/Linearized_R2s.jl, src/Greens_Functions.jl",
        ],
    }
    if info:
        prov.update({k: v for k, v in info.items() if not k.startswith("_")})
    _atomic_write_bytes(json_path, (json.dumps(prov, indent=2) + "\n").encode())
    return npz_path, json_path


# ----------------------------------------------------------------------------------------
# Table object and lookup
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class R2slTable:
    """Bilinear R2sl table ``rho[i, j] = R2sl*T2s`` at ``(log_tau0 + i*dlog_tau, phi0 + j*dphi)``.

    Attributes
    ----------
    log_tau0 : float
        log(TRF/T2s) of row 0 (log of the smallest tau).
    dlog_tau : float
        Row spacing in log(TRF/T2s).
    phi0 : float
        phi = B1*|alpha| of column 0, in rad (0).
    dphi : float
        Column spacing in rad.
    rho : ndarray, shape (n_tau, n_phi), float64, read-only
        Dimensionless rate R2sl*T2s.

    Notes
    -----
    Lookup (identical in :func:`r2sl`, :func:`r2sl_numpy` and :func:`rho_bilinear`)::

        u = (log(TRF/T2s) - log_tau0)/dlog_tau;  i = min(max(floor(u), 0), n_tau-2);  fu = u-i
        v = (B1*|alpha| - phi0)/dphi;            j = min(max(floor(v), 0), n_phi-2);  fv = v-j
        r00, r10, r01, r11 = rho[i, j], rho[i+1, j], rho[i, j+1], rho[i+1, j+1]
        rho_  = r00 + fu*(r10 - r00) + fv*(r01 - r00) + fu*fv*(r11 - r10 - r01 + r00)
        rho_u = (r10 - r00) + fv*(r11 - r10 - r01 + r00)      # d rho / d u
        rho_v = (r01 - r00) + fu*(r11 - r10 - r01 + r00)      # d rho / d v
        R2sl = rho_/T2s
        dR2sl/dT2s = -(rho_u/dlog_tau + rho_)/T2s**2
        dR2sl/dB1  = (rho_v/dphi)*|alpha|/T2s
    """

    log_tau0: float
    dlog_tau: float
    phi0: float
    dphi: float
    rho: np.ndarray

    @property
    def n_tau(self) -> int:
        """Number of log(tau) rows."""
        return int(self.rho.shape[0])

    @property
    def n_phi(self) -> int:
        """Number of phi columns."""
        return int(self.rho.shape[1])

    @property
    def log_tau(self) -> np.ndarray:
        """Row coordinates log(TRF/T2s)."""
        return self.log_tau0 + self.dlog_tau * np.arange(self.n_tau)

    @property
    def phi(self) -> np.ndarray:
        """Column coordinates B1*|alpha| (rad)."""
        return self.phi0 + self.dphi * np.arange(self.n_phi)

    @property
    def tau_min(self) -> float:
        """Smallest TRF/T2s."""
        return math.exp(self.log_tau0)

    @property
    def tau_max(self) -> float:
        """Largest TRF/T2s."""
        return math.exp(self.log_tau0 + self.dlog_tau * (self.n_tau - 1))

    @property
    def phi_max(self) -> float:
        """Largest B1*|alpha| (rad)."""
        return self.phi0 + self.dphi * (self.n_phi - 1)


def _table_from_npz(path) -> R2slTable:
    with np.load(path) as f:
        rho = np.ascontiguousarray(f["rho"], dtype=np.float64)
        log_tau0, dlog_tau, phi0, dphi = (float(x) for x in f["grid"])
    rho.setflags(write=False)
    return R2slTable(log_tau0=log_tau0, dlog_tau=dlog_tau, phi0=phi0, dphi=dphi, rho=rho)


@functools.lru_cache(maxsize=8)
def load_r2sl_table(path=None) -> R2slTable:
    """Load (and cache) the R2sl table; by default the shipped ``data/r2sl_table.npz``.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` written by :func:`save_r2sl_table`.

    Returns
    -------
    R2slTable
        Read-only table (the same object on repeated calls).
    """
    if path is None:
        path = _DATA_DIR / _TABLE_NPZ
        if not path.exists():
            raise FileNotFoundError(
                f"R2sl table {path} is missing; rebuild it with `python -m sklearn_crb.r2sl`")
    return _table_from_npz(path)


def _fmt(x) -> str:
    return f"{float(x):.6g}"


def _range_error(name_vals, tau, phi, table: R2slTable):
    """Build the ValueError for the first offending element (python floats)."""
    TRF, alpha, B1, T2s = name_vals
    for name, val in zip(("TRF", "alpha", "B1", "T2s"), name_vals):
        if math.isnan(val):
            return ValueError(f"r2sl: argument {name} is NaN")
        if math.isinf(val):
            return ValueError(f"r2sl: argument {name} is infinite ({name}={val})")
    if not TRF > 0:
        return ValueError(f"r2sl: TRF must be > 0 s, got TRF={_fmt(TRF)} s")
    if not T2s > 0:
        return ValueError(f"r2sl: T2s must be > 0 s, got T2s={_fmt(T2s)} s")
    if B1 < 0:
        return ValueError(f"r2sl: B1 must be >= 0, got B1={_fmt(B1)}")
    tmin, tmax = table.tau_min, table.tau_max
    if not (tmin * (1 - _EDGE_RTOL) <= tau <= tmax * (1 + _EDGE_RTOL)):
        return ValueError(
            f"r2sl: T2s={_fmt(T2s)} s with TRF={_fmt(TRF)} s gives TRF/T2s={tau:.4g} outside "
            f"the R2sl table [{tmin:.4g}, {tmax:.4g}] (for this TRF, T2s must lie in "
            f"[{_fmt(TRF / tmax)}, {_fmt(TRF / tmin)}] s)")
    pmax = table.phi_max
    if not (phi <= pmax * (1 + _EDGE_RTOL) + 1e-15):
        bmax = pmax / abs(alpha)
        return ValueError(
            f"r2sl: B1*|alpha| = {phi:.4g} rad exceeds {pmax:.4g} rad (B1={_fmt(B1)} for "
            f"alpha={_fmt(alpha)} rad; the R2sl table allows B1 <= {bmax:.4g} for this alpha)")
    return ValueError("r2sl: invalid input")  # pragma: no cover


def _validate_numpy(TRF, alpha, B1, T2s, table: R2slTable):
    with np.errstate(all="ignore"):
        tau = TRF / T2s
        phi = B1 * np.abs(alpha)
        bad = ~(np.isfinite(TRF) & np.isfinite(alpha) & np.isfinite(B1) & np.isfinite(T2s))
        bad |= ~((TRF > 0) & (T2s > 0) & (B1 >= 0))
        bad |= ~((tau >= table.tau_min * (1 - _EDGE_RTOL)) & (tau <= table.tau_max * (1 + _EDGE_RTOL)))
        bad |= ~(phi <= table.phi_max * (1 + _EDGE_RTOL) + 1e-15)
    if np.any(bad):
        # name NaN arguments first (any element), then the first offending element
        for name, arr in (("TRF", TRF), ("alpha", alpha), ("B1", B1), ("T2s", T2s)):
            if np.any(np.isnan(arr)):
                raise ValueError(f"r2sl: argument {name} contains NaN")
        k = int(np.flatnonzero(bad.ravel())[0])
        vals = tuple(float(np.ravel(a)[k]) for a in (TRF, alpha, B1, T2s))
        raise _range_error(vals, float(np.ravel(tau)[k]), float(np.ravel(phi)[k]), table)


def _combine_corners(r00, r01, r10, r11, fu, fv, T2s, aa, tab):
    """Bilinear value and exact partials from the cell corners (numpy or torch):
    R2sl = rho/T2s, dR2sl/dT2s and dR2sl/dB1 (aa = |alpha|)."""
    cross = r11 - r10 - r01 + r00
    rho = r00 + fu * (r10 - r00) + fv * (r01 - r00) + fu * fv * cross
    rho_u = (r10 - r00) + fv * cross
    rho_v = (r01 - r00) + fu * cross
    R = rho / T2s
    dT2s = -(rho_u / tab.dlog_tau + rho) / (T2s * T2s)
    dB1 = (rho_v / tab.dphi) * aa / T2s
    return R, dT2s, dB1


def r2sl_numpy(TRF, alpha, B1, T2s, table: R2slTable | None = None, *, validate=True):
    """Numpy version of :func:`r2sl` (same formula, same outputs).

    Parameters
    ----------
    TRF : array_like
        Pulse duration (s).
    alpha : array_like
        Nominal flip angle (rad); |alpha| is used.
    B1 : array_like
        Relative B1 (dimensionless, >= 0).
    T2s : array_like
        Semi-solid T2 (s).
    table : R2slTable, optional
        Default: :func:`load_r2sl_table`.
    validate : bool
        Raise ValueError on NaN/inf/out-of-table inputs (default).  With False, out-of-range
        inputs are linearly extrapolated from the edge cells (never NaN unless inputs are).

    Returns
    -------
    R2sl : ndarray
        Linearised rate (1/s), broadcast shape of the inputs.
    dR2sl_dT2s : ndarray
        Partial derivative with respect to T2s (1/s**2).
    dR2sl_dB1 : ndarray
        Partial derivative with respect to B1 (1/s).
    """
    tab = load_r2sl_table() if table is None else table
    TRF, alpha, B1, T2s = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64)
                                                for x in (TRF, alpha, B1, T2s)))
    if validate:
        _validate_numpy(TRF, alpha, B1, T2s, tab)
    aa = np.abs(alpha)
    u = (np.log(TRF) - np.log(T2s) - tab.log_tau0) / tab.dlog_tau
    v = (B1 * aa - tab.phi0) / tab.dphi
    n_tau, n_phi = tab.rho.shape
    i = np.clip(np.floor(u), 0, n_tau - 2).astype(np.int64)
    j = np.clip(np.floor(v), 0, n_phi - 2).astype(np.int64)
    fu = u - i
    fv = v - j
    rf = tab.rho.ravel()
    k = i * n_phi + j
    r00, r01, r10, r11 = rf[k], rf[k + 1], rf[k + n_phi], rf[k + n_phi + 1]
    return _combine_corners(r00, r01, r10, r11, fu, fv, T2s, aa, tab)


@functools.lru_cache(maxsize=32)
def _torch_corners(table: R2slTable, device):
    """(n_tau*n_phi, 4) float64 tensor of cell corners (r00, r01, r10, r11), cached per device.

    Row ``i*n_phi + j`` holds rho[i, j], rho[i, j+1], rho[i+1, j], rho[i+1, j+1] (zero-padded
    past the last row/column, which are never selected as lower-left corners).
    """
    import torch

    r = np.asarray(table.rho, dtype=np.float64)
    p = np.zeros((r.shape[0] + 1, r.shape[1] + 1))
    p[:-1, :-1] = r
    q = np.stack([p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]], axis=-1).reshape(-1, 4)
    return torch.as_tensor(np.ascontiguousarray(q), dtype=torch.float64, device=device)


def r2sl(TRF, alpha, B1, T2s, table: R2slTable | None = None, *, validate=True):
    """Linearised super-Lorentzian rate R2sl and its partials (torch, bilinear table lookup).

    ``R2sl = rho(log(TRF/T2s), B1*|alpha|)/T2s`` with ``rho`` the bilinear interpolant of the
    table (see :class:`R2slTable` for the exact formula).  The returned partials are the exact
    derivatives of this interpolant, and ``R2sl`` is differentiable by torch autograd
    consistently with them (piecewise-constant cell index, linear weights).

    Parameters
    ----------
    TRF : tensor or array_like
        Pulse duration (s).
    alpha : tensor or array_like
        Nominal flip angle (rad); |alpha| is used.
    B1 : tensor or array_like
        Relative B1 (dimensionless, >= 0).
    T2s : tensor or array_like
        Semi-solid T2 (s).
    table : R2slTable, optional
        Default: :func:`load_r2sl_table`.
    validate : bool, keyword-only
        Check for NaN/inf and out-of-table inputs and raise ValueError naming the offending
        quantity (default).  Costs one host synchronisation; with False, out-of-range inputs
        are linearly extrapolated from the edge cells.

    Returns
    -------
    R2sl : torch.Tensor
        float64, broadcast shape, on the inputs' device (1/s).
    dR2sl_dT2s : torch.Tensor
        Partial derivative with respect to T2s (1/s**2).
    dR2sl_dB1 : torch.Tensor
        Partial derivative with respect to B1 (1/s).

    Raises
    ------
    ValueError
        NaN/inf inputs, TRF <= 0, T2s <= 0, B1 < 0, TRF/T2s outside [tau_min, tau_max] or
        B1*|alpha| > phi_max of the table.
    """
    import torch

    tab = load_r2sl_table() if table is None else table
    n_tau, n_phi = tab.rho.shape
    device = next((x.device for x in (TRF, alpha, B1, T2s) if isinstance(x, torch.Tensor)),
                  torch.device("cpu"))
    args = [torch.as_tensor(x, device=device) for x in (TRF, alpha, B1, T2s)]
    TRF, alpha, B1, T2s = [x.to(torch.float64) if x.dtype != torch.float64 else x for x in args]
    # broadcasting happens in the arithmetic (logs etc. on the un-expanded inputs)
    aa = alpha.abs()
    log_tau = torch.log(TRF) - torch.log(T2s)
    phi = B1 * aa
    if validate:
        with torch.no_grad():
            ok = torch.isfinite(TRF).all() & torch.isfinite(alpha).all()
            ok &= torch.isfinite(B1).all() & torch.isfinite(T2s).all()
            ok &= (TRF > 0).all() & (T2s > 0).all() & (B1 >= 0).all()
            lt = log_tau.detach()
            ok &= ((lt >= tab.log_tau0 + math.log1p(-_EDGE_RTOL))
                   & (lt <= tab.log_tau0 + tab.dlog_tau * (n_tau - 1) + math.log1p(_EDGE_RTOL))
                   ).all()
            ok &= (phi.detach() <= tab.phi_max * (1 + _EDGE_RTOL) + 1e-15).all()
            if not bool(ok):  # one host synchronisation
                arrs = np.broadcast_arrays(*(x.detach().cpu().numpy()
                                             for x in (TRF, alpha, B1, T2s)))
                _validate_numpy(*arrs, tab)
                raise ValueError("r2sl: invalid input")  # pragma: no cover
    corners = _torch_corners(tab, device)  # (n_tau*n_phi, 4): r00, r01, r10, r11 per cell
    u = (log_tau - tab.log_tau0) / tab.dlog_tau
    v = (phi - tab.phi0) / tab.dphi
    i = torch.clamp(torch.floor(u.detach()), 0, n_tau - 2)
    j = torch.clamp(torch.floor(v.detach()), 0, n_phi - 2)
    fu = u - i
    fv = v - j
    k = torch.add(j, i, alpha=n_phi)  # exact in float64
    shape = k.shape
    q = corners.index_select(0, k.reshape(-1).to(torch.int64))
    r00, r01, r10, r11 = (q[:, c].reshape(shape) for c in range(4))
    return _combine_corners(r00, r01, r10, r11, fu, fv, T2s, aa, tab)


# ----------------------------------------------------------------------------------------
# numba-compatible scalar lookup
# ----------------------------------------------------------------------------------------
def rho_bilinear(log_tau, phi, log_tau0, dlog_tau, phi0, dphi, rho):
    """Scalar bilinear lookup ``(rho, d rho/d log_tau, d rho/d phi)``; numba-nopython compatible.

    Written in the numba nopython subset (``math`` and array indexing only) so that numba
    kernels can ``numba.njit`` it (or use :func:`numba_r2sl_scalar`).  Pass the fields of an
    :class:`R2slTable`; no range check (out-of-range points are linearly extrapolated).

    Parameters
    ----------
    log_tau : float
        log(TRF/T2s).
    phi : float
        B1*|alpha| (rad).
    log_tau0, dlog_tau, phi0, dphi : float
        Table grid (see :class:`R2slTable`).
    rho : ndarray, shape (n_tau, n_phi)
        Table values.

    Returns
    -------
    tuple of float
        rho, d rho/d log_tau, d rho/d phi (dimensionless, per unit log tau, per rad).
    """
    n_tau = rho.shape[0]
    n_phi = rho.shape[1]
    u = (log_tau - log_tau0) / dlog_tau
    v = (phi - phi0) / dphi
    fi = math.floor(u)
    fj = math.floor(v)
    if fi < 0.0:
        fi = 0.0
    if fi > n_tau - 2:
        fi = float(n_tau - 2)
    if fj < 0.0:
        fj = 0.0
    if fj > n_phi - 2:
        fj = float(n_phi - 2)
    i = int(fi)
    j = int(fj)
    fu = u - fi
    fv = v - fj
    r00 = rho[i, j]
    r01 = rho[i, j + 1]
    r10 = rho[i + 1, j]
    r11 = rho[i + 1, j + 1]
    cross = r11 - r10 - r01 + r00
    val = r00 + fu * (r10 - r00) + fv * (r01 - r00) + fu * fv * cross
    d_u = (r10 - r00) + fv * cross
    d_v = (r01 - r00) + fu * cross
    return val, d_u / dlog_tau, d_v / dphi


def r2sl_scalar(TRF, alpha, B1, T2s, log_tau0, dlog_tau, phi0, dphi, rho):
    """Scalar ``(R2sl, dR2sl/dT2s, dR2sl/dB1)``; numba-nopython compatible.

    Same formula as :func:`r2sl` (units s, rad, 1, s -> 1/s, 1/s**2, 1/s).  Raises ValueError
    (constant message) for invalid or out-of-table inputs.  Use :func:`numba_r2sl_scalar` for
    a compiled version callable from numba kernels.
    """
    if not (TRF > 0.0 and T2s > 0.0 and B1 >= 0.0 and abs(alpha) < math.inf
            and B1 < math.inf and TRF < math.inf):
        raise ValueError("r2sl_scalar: need finite TRF > 0, T2s > 0, B1 >= 0 and alpha")
    n_tau = rho.shape[0]
    n_phi = rho.shape[1]
    log_tau = math.log(TRF) - math.log(T2s)
    aa = abs(alpha)
    phi = B1 * aa
    slack = 1e-12
    if (log_tau < log_tau0 - slack or log_tau > log_tau0 + dlog_tau * (n_tau - 1) + slack):
        raise ValueError("r2sl_scalar: TRF/T2s outside the R2sl table")
    if phi > (phi0 + dphi * (n_phi - 1)) * (1.0 + slack) + 1e-15:
        raise ValueError("r2sl_scalar: B1*|alpha| outside the R2sl table")
    val, d_lt, d_phi = rho_bilinear(log_tau, phi, log_tau0, dlog_tau, phi0, dphi, rho)
    R = val / T2s
    dT2s = -(d_lt + val) / (T2s * T2s)
    dB1 = d_phi * aa / T2s
    return R, dT2s, dB1


@functools.lru_cache(maxsize=None)
def numba_r2sl_scalar():
    """Return numba-compiled ``(r2sl_scalar, rho_bilinear)`` for use inside numba kernels.

    Examples
    --------
    >>> f, _ = numba_r2sl_scalar()                       # doctest: +SKIP
    >>> t = load_r2sl_table()                            # doctest: +SKIP
    >>> f(5e-4, np.pi, 1.0, 1e-5, t.log_tau0, t.dlog_tau, t.phi0, t.dphi, t.rho)  # doctest: +SKIP
    """
    import numba

    rb = numba.njit(cache=False)(rho_bilinear)
    g = dict(globals())
    g["rho_bilinear"] = rb
    import types

    fn = types.FunctionType(r2sl_scalar.__code__, g, "r2sl_scalar")
    return numba.njit(cache=False)(fn), rb


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def main(argv=None):
    """Rebuild the shipped R2sl table (``python -m sklearn_crb.r2sl``)."""
    p = argparse.ArgumentParser(prog="python -m sklearn_crb.r2sl",
                                description="Rebuild the linearised R2sl table "
                                            "(sklearn_crb/data/r2sl_table.npz + .json).")
    p.add_argument("--n-tau", type=int, default=DEFAULT_N_TAU, help="rows (log TRF/T2s)")
    p.add_argument("--n-phi", type=int, default=DEFAULT_N_PHI, help="columns (B1*|alpha|)")
    p.add_argument("--tau-min", type=float, default=TAU_MIN)
    p.add_argument("--tau-max", type=float, default=TAU_MAX)
    p.add_argument("--phi-max", type=float, default=PHI_MAX, help="rad, < 4.49")
    p.add_argument("--h0", type=float, default=DEFAULT_H0, help="coarsest IDE step (T2s units)")
    p.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="Richardson levels")
    p.add_argument("--stencil", type=int, default=DEFAULT_STENCIL)
    p.add_argument("--no-error-estimate", action="store_true",
                   help="skip the exact evaluation at cell centres/edge midpoints")
    p.add_argument("-o", "--output", type=Path, default=_DATA_DIR / _TABLE_NPZ,
                   help="output .npz (the .json is written next to it)")
    a = p.parse_args(argv)
    table, info = build_r2sl_table(a.n_tau, a.n_phi, tau_min=a.tau_min, tau_max=a.tau_max,
                                   phi_max=a.phi_max, h0=a.h0, levels=a.levels,
                                   stencil=a.stencil, estimate_error=not a.no_error_estimate,
                                   verbose=True)
    cmd = "python -m sklearn_crb.r2sl" + ("" if argv is None and len(sys.argv) <= 1 else
                                          " " + " ".join(sys.argv[1:] if argv is None else argv))
    npz, js = save_r2sl_table(table, info, a.output, a.output.with_suffix(".json"), command=cmd)
    print(f"wrote {npz} and {js}")
    print(json.dumps({k: v for k, v in info.items() if not k.startswith("_")}, indent=2))
    load_r2sl_table.cache_clear()
    _torch_corners.cache_clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
