"""Offline builder of the linearised super-Lorentzian R2sl table, with provenance.

Assländer et al., "Generalized Bloch model: a theory for pulsed magnetization
transfer", MRM 2022;87:2003-2017, Eq. 9: :func:`build_r2sl_table` tabulates
``rho = R2sl*T2s`` on ``(log tau, phi)``, ``tau = TRF/T2s``,
``phi = B1*|alpha|``, from the IDE solver of :mod:`sklearn_crb.physics.r2sl.ide`;
:func:`save_r2sl_table` writes the table and its provenance, each atomically.
Rebuild the shipped table with::

    python -m sklearn_crb.physics.r2sl.build

The lookup of the table lives in :mod:`sklearn_crb.physics.r2sl.table`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

import numba
import numpy as np
import scipy

from sklearn_crb._atomic import atomic_path
from sklearn_crb._version import __version__
from sklearn_crb.physics.r2sl.ide import (
    DEFAULT_H0,
    DEFAULT_LEVELS,
    DEFAULT_STENCIL,
    _coefficients_at,
    _n_terms_for,
    _rho_from_coefficients,
)
from sklearn_crb.physics.r2sl.table import (
    PHI_MAX,
    TABLE_PATH,
    TAU_MAX,
    TAU_MIN,
    R2slTable,
    clear_caches,
)

__all__ = ["BUILD_COMMAND", "build_r2sl_table", "save_r2sl_table", "main"]

#: The command that rebuilds the shipped table (recorded in its provenance).
BUILD_COMMAND = "python -m sklearn_crb.physics.r2sl.build"

#: Default shipped-table resolution (rows: log tau, columns: phi).
DEFAULT_N_TAU = 576
DEFAULT_N_PHI = 512


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
    limit.  Not run at import; the shipped table is rebuilt with
    ``python -m sklearn_crb.physics.r2sl.build``.

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



def _write_bytes(path: Path, data: bytes):
    """Write ``data`` to ``path`` whole or not at all (the package's one atomic writer)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    npz_path = Path(npz_path) if npz_path is not None else TABLE_PATH
    json_path = Path(json_path) if json_path is not None else npz_path.with_suffix(".json")
    buf = io.BytesIO()
    np.savez(buf, rho=np.asarray(table.rho, np.float64), log_tau=table.log_tau, phi=table.phi,
             grid=np.array([table.log_tau0, table.dlog_tau, table.phi0, table.dphi]))
    data = buf.getvalue()
    _write_bytes(npz_path, data)
    prov = {
        "file": npz_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "build_command": command or BUILD_COMMAND,
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
    _write_bytes(json_path, (json.dumps(prov, indent=2) + "\n").encode())
    return npz_path, json_path


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def main(argv=None):
    """Rebuild the shipped R2sl table (``python -m sklearn_crb.physics.r2sl.build``)."""
    p = argparse.ArgumentParser(prog=BUILD_COMMAND,
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
    p.add_argument("-o", "--output", type=Path, default=TABLE_PATH,
                   help="output .npz (the .json is written next to it)")
    a = p.parse_args(argv)
    table, info = build_r2sl_table(a.n_tau, a.n_phi, tau_min=a.tau_min, tau_max=a.tau_max,
                                   phi_max=a.phi_max, h0=a.h0, levels=a.levels,
                                   stencil=a.stencil, estimate_error=not a.no_error_estimate,
                                   verbose=True)
    cmd = BUILD_COMMAND + ("" if argv is None and len(sys.argv) <= 1 else
                                          " " + " ".join(sys.argv[1:] if argv is None else argv))
    npz, js = save_r2sl_table(table, info, a.output, a.output.with_suffix(".json"), command=cmd)
    print(f"wrote {npz} and {js}")
    print(json.dumps({k: v for k, v in info.items() if not k.startswith("_")}, indent=2))
    clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
