"""Super-Lorentzian Green's function and the semi-solid IDE solver (offline, for the table).

Assländer et al., "Generalized Bloch model: a theory for pulsed magnetization
transfer", MRM 2022;87:2003-2017: the super-Lorentzian Green's function
``G(kappa)`` (Eq. 6), the integro-differential equation of the isolated
semi-solid pool during a rectangular pulse (Eq. 5), and the matching of its
linear approximation (Eq. 9, rate ``R2sl = rho/T2s``) at the end of the pulse
(reference implementation: MRIgeneralizedBloch.jl, ``Greens_Functions.jl`` and
``Linearized_R2s.jl``). Used by :mod:`sklearn_crb.physics.r2sl.build`; never
imported by the signal model at run time.
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from scipy.special import erf

__all__ = [
    "greens_superlorentzian",
    "greens_superlorentzian_integral",
    "semisolid_z",
    "z_linear",
    "solve_rho",
]

#: Default IDE discretisation: coarsest step h0 (units of T2s), Richardson levels
#: (steps h0, h0/2, ..., h0/2**(levels-1)) and Lagrange stencil size for off-grid tau.
DEFAULT_H0 = 1.0 / 16.0
DEFAULT_LEVELS = 4
DEFAULT_STENCIL = 12

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
