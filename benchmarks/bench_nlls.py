"""Benchmark NLLSFitter: voxels/s and accuracy on a held-out simulated test set.

Problem: the compressed v3.2 sequence (rank-13 SVD basis), all 8 parameters
plus complex M0 free, parenchyma prior, fixed SNR. Compared:

* ``nlls_cold``       NLLSFitter from the default (Julia) start;
* ``nlls_dictionary`` NLLSFitter from a dictionary-matching start;
* ``nlls_network``    NLLSFitter seeded by ``init=``: a network start is *emulated*
  by the truth perturbed by 5 % (omega0 by 20 rad/s), since no trained
  CRBNetRegressor is shipped with the benchmark;
* ``dictionary``      dictionary matching alone (the classic MRF baseline);
* ``scipy_loop``      a per-voxel ``scipy.optimize.least_squares`` (TRF, bounds) on
  (theta, Re M0, Im M0) with the package's exact Jacobian, from the default start:
  what a user would write by hand.

Accuracy: CRB-normalised MSE and bias/sqrt(CRB) of m0s, R1f, R2f (CRB of the
rank-13 coefficients at each sample's M0 and sigma). Usage::

    python benchmarks/bench_nlls.py [--quick] [--n-test 60] [--snr 50] [--out results/nlls.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator

from sklearn_crb import PARAMETERS, Sequence
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.nlls import DEFAULT_START, NLLSFitter, NLLSFitWarning
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.signal import jacobian, simulate
from sklearn_crb.simulator import MTFingerprintSimulator

EST = ("m0s", "R1f", "R2f")


class PerturbedTruth(BaseEstimator):
    """Stand-in for a fitted network: the truth with multiplicative 5 % noise."""

    def __init__(self, theta, rel=0.05, omega0_sd=20.0, seed=0):
        self.theta, self.rel, self.omega0_sd, self.seed = theta, rel, omega0_sd, seed

    def fit(self, X=None, y=None):
        theta, rel, omega0_sd = self.theta, self.rel, self.omega0_sd
        rng = np.random.default_rng(self.seed)
        t = theta * (1 + rel * rng.standard_normal(theta.shape))
        t[:, INDEX["omega0"]] = theta[:, INDEX["omega0"]] + omega0_sd * rng.standard_normal(theta.shape[0])
        self.pred_ = t
        self.estimate_ = PARAMETERS
        self.fitted_ = True
        return self

    def predict(self, X):
        return self.pred_[: len(X)]


def scipy_fit(seq, basis, y, bounds, start):
    """One voxel: least_squares over (theta_free, Re M0, Im M0) with the exact Jacobian."""
    from scipy.optimize import least_squares

    scale = np.array([0.1, 1, 10, 10, 1, 1e-5, 100, 1, 1, 1])
    lo = np.r_[[bounds[p][0] for p in PARAMETERS], -np.inf, -np.inf] / scale
    hi = np.r_[[bounds[p][1] for p in PARAMETERS], np.inf, np.inf] / scale
    Uc = basis.conj()

    def fun(z):
        zz = z * scale
        g = (zz[8] + 1j * zz[9]) * (simulate(seq, zz[None, :8]) @ Uc)[0]
        r = y - g
        return np.r_[r.real, r.imag]

    def jac(z):
        zz = z * scale
        s, J = jacobian(seq, zz[None, :8])
        g, dg = (s @ Uc)[0], np.einsum("tp,tr->rp", J[0], Uc)
        M0 = zz[8] + 1j * zz[9]
        cols = np.column_stack([M0 * dg, g, 1j * g]) * scale
        return -np.vstack([cols.real, cols.imag])

    # M0 start: linear fit at the start theta (same information NLLSFitter uses)
    g0 = (simulate(seq, start[None]) @ Uc)[0]
    M0 = np.vdot(g0, y) / np.vdot(g0, g0)
    z0 = np.r_[start, M0.real, M0.imag] / scale
    z0 = np.clip(z0, lo, hi)
    res = least_squares(fun, z0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=200)
    return res.x[:8] * scale[:8], res.success


def accuracy(est, y, crb, ok):
    err = est[ok] - y[ok]
    c = crb[ok]
    return {"crb_nmse": (err**2 / c).mean(0).tolist(), "bias_over_sqrt_crb": (err / np.sqrt(c)).mean(0).tolist(),
            "median_abs_rel_err": np.median(np.abs(err) / np.abs(y[ok]), 0).tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small test set (smoke run)")
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--n-scipy", type=int, default=8)
    ap.add_argument("--snr", type=float, default=50.0, help="|M0| / sigma of the test set")
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nlls.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_test, args.n_scipy = 10, 2
    data = Path(os.environ.get("SKLEARN_CRB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    mat = data / "control_MT_v3p2_TR3p5ms_discretized.mat"
    seq = Sequence.from_mat(mat) if mat.is_file() else Sequence.default()
    print(f"sequence: {seq}")
    warnings.simplefilter("ignore", NLLSFitWarning)

    sim = MTFingerprintSimulator(seq, n_components=13, estimate=EST, snr=(args.snr, args.snr), sigma=0.01,
                                 n_basis_samples=1000, random_state=args.seed).fit()
    X, y, crb, det = sim.make_dataset(args.n_test, random_state=args.seed + 1, return_details=True)
    theta = det["theta"]
    common = dict(sequence=seq, basis=sim.basis_, estimate=EST + ("Rex", "R1s", "T2s", "omega0", "B1"),
                  n_jobs=args.n_jobs, chunk_size=64)
    methods = {}

    def run(name, est, **kw):
        t0 = time.perf_counter()
        fitter = est.fit() if isinstance(est, NLLSFitter) else est
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        d = fitter.predict_details(X)
        t = time.perf_counter() - t0
        e = d["prediction"][:, :3]
        ok = ~d["failed"] if "failed" in d else np.ones(len(X), bool)
        methods[name] = {"voxels_per_s": len(X) / t, "seconds": t, "setup_seconds": t_fit,
                         "failed_fraction": float(1 - ok.mean()),
                         "mean_iterations": float(d["n_iter"].mean()) if "n_iter" in d else None,
                         **accuracy(e, y, crb, np.ones(len(X), bool))}

    run("nlls_cold", NLLSFitter(**common))
    run("nlls_dictionary", NLLSFitter(start="dictionary", n_dictionary=3000, random_state=0, **common))
    run("nlls_network", NLLSFitter(init=PerturbedTruth(theta, seed=args.seed).fit(), **common))
    dm = DictionaryMatcher(seq, basis=sim.basis_, estimate=EST, n_atoms=3000, random_state=0)
    t0 = time.perf_counter()
    dm.fit()
    tdm = time.perf_counter() - t0
    run("dictionary", dm)
    methods["dictionary"]["setup_seconds"] = tdm

    nl = NLLSFitter(**common).fit()
    start = nl.starts_[0]
    bounds = {p: nl.bounds_.get(p, (start[INDEX[p]] - 1e-9, start[INDEX[p]] + 1e-9)) for p in PARAMETERS}
    ysc = X[:, :13] + 1j * X[:, 13:]
    ns = min(args.n_scipy, len(X))
    t0 = time.perf_counter()
    est_sp = np.array([scipy_fit(seq, sim.basis_, ysc[i], bounds, start)[0] for i in range(ns)])
    t = time.perf_counter() - t0
    methods["scipy_loop"] = {"voxels_per_s": ns / t, "seconds": t, "n_voxels": ns,
                             **accuracy(est_sp[:, :3], y[:ns], crb[:ns], np.ones(ns, bool))}
    # accuracy of the batched cold NLLS on the same voxels, for a like-for-like comparison
    d_same = NLLSFitter(**common).fit().predict_details(X[:ns])
    methods["nlls_cold_on_scipy_voxels"] = accuracy(d_same["prediction"][:, :3], y[:ns], crb[:ns], np.ones(ns, bool))
    speedup = methods["nlls_cold"]["voxels_per_s"] / methods["scipy_loop"]["voxels_per_s"]

    import torch

    result = {"sequence": seq.name, "n_pulses": seq.n_pulses, "rank": 13, "snr": args.snr, "n_test": len(X),
              "free_parameters": list(PARAMETERS) + ["Re M0", "Im M0"], "estimate": list(EST),
              "network_start": "emulated: truth x (1 + 0.05 N(0,1)), omega0 + 20 N(0,1) rad/s",
              "cpu_threads_torch": torch.get_num_threads(), "n_jobs": args.n_jobs,
              "methods": methods, "speedup_vs_scipy_loop": speedup,
              "targets": {"cold_voxels_per_s": 10, "network_voxels_per_s": 30, "speedup": 20}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)

    print(f"\nSNR {args.snr:g}, rank 13, {len(X)} test voxels, 8 parameters + complex M0 free")
    print(f"{'method':<18}{'vox/s':>8}{'iters':>7}{'fail':>6}   CRB-nMSE (m0s R1f R2f)      bias/sqrtCRB")
    for k, m in methods.items():
        if "voxels_per_s" not in m:
            continue
        it = f"{m['mean_iterations']:.1f}" if m.get("mean_iterations") is not None else "-"
        print(f"{k:<18}{m['voxels_per_s']:>8.2f}{it:>7}{m.get('failed_fraction', 0):>6.2f}   "
              + " ".join(f"{v:7.2f}" for v in m["crb_nmse"]) + "   "
              + " ".join(f"{v:6.2f}" for v in m["bias_over_sqrt_crb"]))
    print(f"nlls_cold on the scipy voxels: CRB-nMSE "
          + " ".join(f"{v:.2f}" for v in methods["nlls_cold_on_scipy_voxels"]["crb_nmse"]))
    print(f"speed-up of batched NLLS (cold) over the scipy loop: {speedup:.1f}x")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [k for k in methods if "voxels_per_s" in methods[k]]
    ax[0].bar(names, [methods[k]["voxels_per_s"] for k in names])
    ax[0].axhline(10, ls="--", c="k", lw=0.8)
    ax[0].set_ylabel("voxels / s")
    ax[0].set_yscale("log")
    ax[0].tick_params(axis="x", rotation=30)
    w = 0.8 / len(names)
    for i, k in enumerate(names):
        ax[1].bar(np.arange(3) + i * w, methods[k]["crb_nmse"], w, label=k)
    ax[1].axhline(1, ls="--", c="k", lw=0.8)
    ax[1].set_xticks(np.arange(3) + 0.4 - w / 2, EST)
    ax[1].set_yscale("log")
    ax[1].set_ylabel("MSE / CRB")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"NLLS on the compressed v3.2 problem, SNR {args.snr:g}")
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
