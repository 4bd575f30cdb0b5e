"""The shipped R2sl table and its one bilinear lookup (numpy, torch and numba).

The linearised super-Lorentzian saturation rate of the generalized Bloch model
(Assländer et al., "Generalized Bloch model: a theory for pulsed magnetization
transfer", MRM 2022;87:2003-2017, Eq. 9) is looked up as
``R2sl = rho(log tau, phi)/T2s`` with ``tau = TRF/T2s`` and ``phi = B1*|alpha|``,
``rho`` the bilinear interpolant of the shipped table
(``sklearn_crb/data/r2sl_table.npz``, built offline by
``python -m sklearn_crb.physics.r2sl.build``). :func:`bilinear` is the one
formula; :func:`r2sl_numpy` and :func:`r2sl` (torch) apply it vectorised, the
numba kernel compiles it (and :func:`cell`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TAU_MIN",
    "TAU_MAX",
    "PHI_MAX",
    "TABLE_PATH",
    "R2slTable",
    "load_r2sl_table",
    "clear_caches",
    "bilinear",
    "cell",
    "r2sl",
    "r2sl_numpy",
]

#: Table domain: ``tau = TRF/T2s`` in [TAU_MIN, TAU_MAX] (log-spaced grid).
TAU_MIN = 1.0
TAU_MAX = 150.0
#: Table domain: ``phi = B1*|alpha|`` in [0, PHI_MAX] rad (linear grid).  The linearisation
#: loses monotonicity at ``tan(phi) = phi`` (phi = 4.4934) and has no solution for phi >~ 4.55.
PHI_MAX = 4.4

#: The shipped table (its provenance is ``r2sl_table.json`` next to it).
TABLE_PATH = Path(__file__).resolve().parents[2] / "data" / "r2sl_table.npz"

# Relative slack for out-of-range checks (absorbs rounding of log/exp at the table edges).
_EDGE_RTOL = 1e-12


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
    Lookup (:func:`bilinear`, shared by :func:`r2sl`, :func:`r2sl_numpy` and the numba
    kernel)::

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
        path = TABLE_PATH
        if not path.exists():
            raise FileNotFoundError(
                f"R2sl table {path} is missing; rebuild it with "
                "`python -m sklearn_crb.physics.r2sl.build`")
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


def bilinear(r00, r01, r10, r11, fu, fv, T2s, aa, dlog_tau, dphi):
    """THE bilinear R2sl formula: value and exact partials from one cell's corners.

    Plain arithmetic, so that the numpy lookup (:func:`r2sl_numpy`), the torch
    lookup (:func:`r2sl`) and the numba kernel (which compiles this very
    function, see :mod:`sklearn_crb.physics._numba.bloch`) share it. The cell
    is selected by :func:`cell` (scalar) or its vectorised equivalent
    ``clip(floor(u), 0, n - 2)``.

    Parameters
    ----------
    r00, r01, r10, r11 : float, ndarray or tensor
        ``rho[i, j], rho[i, j+1], rho[i+1, j], rho[i+1, j+1]``.
    fu, fv : float, ndarray or tensor
        Position in the cell along log tau and phi (0 to 1 inside the table).
    T2s : float, ndarray or tensor
        Semi-solid T2 (s).
    aa : float, ndarray or tensor
        ``|alpha|`` (rad).
    dlog_tau, dphi : float
        Grid spacings of the table.

    Returns
    -------
    R2sl, dR2sl_dT2s, dR2sl_dB1
        In 1/s, 1/s**2 and 1/s.
    """
    cross = r11 - r10 - r01 + r00
    rho = r00 + fu * (r10 - r00) + fv * (r01 - r00) + fu * fv * cross
    rho_u = (r10 - r00) + fv * cross
    rho_v = (r01 - r00) + fu * cross
    R = rho / T2s
    dT2s = -(rho_u / dlog_tau + rho) / (T2s * T2s)
    dB1 = (rho_v / dphi) * aa / T2s
    return R, dT2s, dB1


def cell(u, n):
    """Scalar cell selection: lower-left index (as a float) and the position in the cell.

    ``f = min(max(floor(u), 0), n - 2)``, ``u - f``: points outside the table are
    linearly extrapolated from the edge cells, and the upper edge ``u = n - 1``
    belongs to the last cell. Written in the numba nopython subset (the kernel
    compiles it); :func:`r2sl_numpy` and :func:`r2sl` apply the same rule vectorised.
    """
    f = math.floor(u)
    if f < 0.0:
        f = 0.0
    if f > n - 2:
        f = float(n - 2)
    return f, u - f


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
    return bilinear(r00, r01, r10, r11, fu, fv, T2s, aa, tab.dlog_tau, tab.dphi)


@functools.lru_cache(maxsize=32)
def _torch_corners(table: R2slTable, device):
    """(n_tau*n_phi, 4) float64 tensor of cell corners (r00, r01, r10, r11), cached per device.

    Row ``i*n_phi + j`` holds rho[i, j], rho[i, j+1], rho[i+1, j], rho[i+1, j+1] (zero-padded
    past the last row/column, which are never selected as lower-left corners).
    """
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
    tab = load_r2sl_table() if table is None else table
    n_tau, n_phi = tab.rho.shape
    device = next((x.device for x in (TRF, alpha, B1, T2s) if isinstance(x, torch.Tensor)),
                  torch.device("cpu"))
    # Python floats and numpy arrays go straight to float64 (never through torch's default
    # float32); float32 tensors are cast exactly
    TRF, alpha, B1, T2s = [
        x.to(torch.float64) if isinstance(x, torch.Tensor)
        else torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)
        for x in (TRF, alpha, B1, T2s)]
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
    return bilinear(r00, r01, r10, r11, fu, fv, T2s, aa, tab.dlog_tau, tab.dphi)


def clear_caches():
    """Forget the loaded tables and their torch copies (after a table was rebuilt)."""
    load_r2sl_table.cache_clear()
    _torch_corners.cache_clear()
