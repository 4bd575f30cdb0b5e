"""Benchmark NLLSFitter speed (issue 12): warm-start schedules, the untied cold fit, and a per-voxel scipy loop.

Problem: the v3.2 sequence compressed to a rank-13 SVD basis, SNR ``--snr`` (|M0| / sigma),
parenchyma prior. Measured in one run:

(a) **tied model from a start** (m0s R1f R2f Rex T2s omega0 B1 free). A network start is
    *emulated* by the truth plus an efficient estimator's error: a draw from N(0, C), C the
    full CRB covariance of the free parameters, clipped to the box. For each schedule: voxels/s,
    mean iterations (trial steps), mean exact Jacobians per voxel, and the median and maximum
    |change| / sqrt(CRB) against a fully converged fit (``se_tol=0``) from the same start;
(b) **untied 8-parameter model, cold** (no network): the default start, Broyden updates, and a
    dictionary start (8,000 prior atoms) with a statistical stop and the final step; voxels/s with
    and without the dictionary's build, and how often the cost ends above or below the default fit's;
(c) **per-voxel scipy.optimize.least_squares** (TRF, bounds, the same exact
    Jacobian of the tied model, on (theta, Re M0, Im M0)) from the same starts on
    the first ``--n-scipy`` voxels, and the speed ratio of the batched fit.

The machine is shared, so the run also measures ``physics.jacobian`` and
``physics.simulate`` rates; a projection to an unloaded machine multiplies by
(unloaded rate / measured rate). ``--start-model DIR`` starts (a) and (c) from a
real saved network instead (tied, estimating every free parameter, e.g.
``sklearn-crb train`` on ``simulate --tied-R1``), on data simulated in its
sequence and basis. Writes ``nlls.json`` (``nlls-network.json`` with
``--start-model``) and ``.png`` under ``--out``. Usage::

    python benchmarks/bench_nlls.py [--n 300] [--n-scipy 8] [--start-model DIR] [--schedules TEXT]
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from _harness import GivenStart, crb_covariance, parser, sequence, start, table
from scipy.optimize import least_squares

from sklearn_crb import MTFingerprintSimulator, NLLSFitter, Sequence, load_model
from sklearn_crb.estimators.nlls import NLLSFitWarning
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, SCALE, free_parameters
from sklearn_crb.physics.signal import jacobian, simulate

SCHEDULES = {
    "default (lambda0=1)": dict(),
    "lambda0=1e-3": dict(lambda0=1e-3),
    "lambda0=1e-3 + Broyden(2)": dict(lambda0=1e-3, jacobian_reuse=2),
    "lambda0=1e-3 + geodesic": dict(lambda0=1e-3, geodesic=True),
    "lambda0=1e-3, se_tol=0.05": dict(lambda0=1e-3, se_tol=0.05),
    # the accuracy/speed frontier of the statistical stop (the issue asks < 0.05 sqrt(CRB) median change)
    "lambda0=1e-3, se_tol=0.2": dict(lambda0=1e-3, se_tol=0.2),
    "lambda0=1e-3, se_tol=0.5": dict(lambda0=1e-3, se_tol=0.5),
    "lambda0=1e-3, se_tol=0.7": dict(lambda0=1e-3, se_tol=0.7),
    "lambda0=1e-3, se_tol=1": dict(lambda0=1e-3, se_tol=1.0),
    # NL2SOL's secant second-order term, with the curvature of rejected trials
    "lambda0=1e-3 + secant, se_tol=0.2": dict(lambda0=1e-3, se_tol=0.2, secant=True),
    "lambda0=1e-3 + secant, se_tol=0.5": dict(lambda0=1e-3, se_tol=0.5, secant=True),
    # the stop's remaining Gauss-Newton step taken for one simulation
    "secant + final, se_tol=0.5": dict(lambda0=1e-3, se_tol=0.5, secant=True, final_step=True),
    "secant + final, se_tol=0.7": dict(lambda0=1e-3, se_tol=0.7, secant=True, final_step=True),
    "final, se_tol=0.7": dict(lambda0=1e-3, se_tol=0.7, final_step=True),
    "secant + final, se_tol=1": dict(lambda0=1e-3, se_tol=1.0, secant=True, final_step=True),
    "final, se_tol=1": dict(lambda0=1e-3, se_tol=1.0, final_step=True),
    "final, se_tol=1.5": dict(lambda0=1e-3, se_tol=1.5, final_step=True),
}


#: (b) untied cold fits: no network. "default" must come first (the others' costs are compared with it).
#: The dictionary start matches 8,000 prior atoms (built in ``fit``, once per slice; the row reports the
#: rate with and without that build).
UNTIED = {
    "default": dict(),
    "Broyden(2)": dict(jacobian_reuse=2),
    "dictionary, lambda0=1e-2, se_tol=0.05, final": dict(start="dictionary", n_dictionary=8000, random_state=0,
                                                          lambda0=1e-2, se_tol=0.05, final_step=True),
}


def scipy_tied(seq, basis, y, start, bounds):
    """One voxel, tied model: least_squares on (theta_free, Re M0, Im M0) with the package's exact Jacobian."""
    free = free_parameters(True)
    idx = [INDEX[p] for p in free]
    sc = np.r_[[SCALE[p] for p in free], 1.0, 1.0]
    lo = np.r_[[bounds[p][0] for p in free], -np.inf, -np.inf] / sc
    hi = np.r_[[bounds[p][1] for p in free], np.inf, np.inf] / sc
    Uc = basis.conj()

    def theta(z):
        th = np.zeros((1, 8))
        th[0, idx] = z[:7] * sc[:7]
        th[0, INDEX["R1s"]] = th[0, INDEX["R1f"]]
        return th

    def fun(z):
        r = y - (z[7] + 1j * z[8]) * (simulate(seq, theta(z)) @ Uc)[0]
        return np.r_[r.real, r.imag]

    def jac(z):
        s, J = jacobian(seq, theta(z))
        g, dg = (s @ Uc)[0], np.einsum("tp,tr->rp", J[0], Uc)
        dg[:, INDEX["R1f"]] += dg[:, INDEX["R1s"]]
        cols = np.column_stack([(z[7] + 1j * z[8]) * dg[:, idx], g, 1j * g]) * sc
        return -np.vstack([cols.real, cols.imag])

    g0 = (simulate(seq, theta(np.r_[start / sc[:7], 0, 0])) @ Uc)[0]
    M0 = np.vdot(g0, y) / np.vdot(g0, g0)
    z0 = np.clip(np.r_[start / sc[:7], M0.real, M0.imag], lo, hi)
    res = least_squares(fun, z0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=200)
    return res.x[:7] * sc[:7], res.njev


def crb_draw(seq, basis, theta, M0, sigma, rng):
    """One draw per voxel from N(0, C): C the full CRB covariance at ``theta``, i.e. the error of an
    efficient estimator, correlated as the CRB says."""
    cov = crb_covariance(seq, basis, theta, M0, sigma, free_parameters(True))[0]
    w, V = np.linalg.eigh(cov)
    z = rng.standard_normal((len(theta), cov.shape[-1]))
    return np.nan_to_num(np.einsum("nij,nj->ni", V * np.sqrt(np.clip(w, 0, None))[:, None, :], z))


def rates(seq, theta):
    jacobian(seq, theta[:4])
    t0 = time.perf_counter()
    jacobian(seq, theta)
    tj = time.perf_counter() - t0
    t0 = time.perf_counter()
    simulate(seq, theta)
    return len(theta) / tj, len(theta) / (time.perf_counter() - t0)


def parse_args(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--n", type=int, default=300, help="voxels of (a) and (b) (default 300)")
    ap.add_argument("--n-scipy", type=int, default=8, help="voxels of the scipy loop (c) (default 8)")
    ap.add_argument("--snr", type=float, default=100.0, help="|M0|/sigma (default 100)")
    ap.add_argument("--start-model", default=None, metavar="DIR",
                    help="a saved tied network estimating every free parameter: its estimates are the starts of (a) "
                         "and (c), on data in its own sequence and basis (instead of the emulated start)")
    ap.add_argument("--schedules", default="", help="run only the schedules whose names contain this text")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.n_scipy = 12, 1
    return a


def problem(args, free):
    """The simulator, the data and the starts: ``(seq, sim, X, y, crb, theta, start, t_net)``."""
    net = None
    if args.start_model:  # a real network start: the data in the network's own sequence and basis
        net = load_model(args.start_model, device="cpu")
        meta = net.crb_metadata_
        if not meta.get("tied_R1") or tuple(meta["estimate"]) != free or net.measured_:
            raise SystemExit(f"--start-model must be a tied network estimating {free} (no measured inputs)")
        seq = Sequence.from_dict(meta["sequence"])
        sim = MTFingerprintSimulator(seq, basis=meta["basis"], estimate=free, tied_R1=True, sigma=0.01,
                                     snr=(args.snr, args.snr), random_state=args.seed).fit()
    else:
        seq = sequence()[0]
        sim = MTFingerprintSimulator(seq, n_components=13, estimate=free, tied_R1=True, snr=(args.snr, args.snr),
                                     sigma=0.01, n_basis_samples=100 if args.quick else 500,
                                     random_state=args.seed).fit()
    X, y, crb, det = sim.make_dataset(args.n, random_state=args.seed + 1, return_details=True)
    rng = np.random.default_rng(args.seed + 2)
    start_ = y + crb_draw(seq, sim.basis_, det["theta"], det["M0"], det["sigma"], rng)
    t_net = None
    if net is not None:
        t0 = time.perf_counter()
        start_ = np.asarray(net.predict(X), dtype=float)
        t_net = time.perf_counter() - t0
    return seq, sim, X, y, crb, det["theta"], start_, t_net


def tied_schedules(args, common, init, X):
    """(a): every schedule against the fully converged fit from the same start."""
    t0 = time.perf_counter()
    ref = NLLSFitter(init=init, se_tol=0.0, **common).fit().predict_details(X)
    t_ref = time.perf_counter() - t0
    names = [k for k in SCHEDULES if args.schedules in k]
    if args.quick:
        names = names[:2]
    warm = {}
    for name in names:
        kw = SCHEDULES[name]
        t0 = time.perf_counter()
        d = NLLSFitter(init=init, **common, **kw).fit().predict_details(X)
        t = time.perf_counter() - t0
        ok = ref["converged"] & d["converged"]
        dev = np.abs(d["prediction"] - ref["prediction"])[ok] / ref["std_error"][ok]
        dev = dev if dev.size else np.array([np.nan])
        warm[name] = {"options": kw, "voxels_per_s": args.n / t, "seconds": t,
                      "mean_iterations": float(d["n_iter"].mean()), "mean_jacobians": float(d["n_jacobian"].mean()),
                      "converged_fraction": float(d["converged"].mean()),
                      "median_change_over_sqrt_crb": float(np.median(dev)),
                      "p90_change_over_sqrt_crb": float(np.quantile(dev, 0.9)),
                      "max_change_over_sqrt_crb": float(dev.max())}
    return warm, t_ref


def untied_cold(args, seq):
    """(b): the untied model from the default start, Broyden updates and a dictionary start."""
    simu = MTFingerprintSimulator(seq, n_components=13, estimate=PARAMETERS, snr=(args.snr, args.snr), sigma=0.01,
                                  n_basis_samples=100 if args.quick else 500, random_state=args.seed).fit()
    Xu = simu.make_dataset(args.n, random_state=args.seed + 3)[0]
    cold = {}
    for name, kw in (list(UNTIED.items())[:1] if args.quick else UNTIED.items()):
        t0 = time.perf_counter()
        nl = NLLSFitter(sequence=seq, basis=simu.basis_, estimate=PARAMETERS, chunk_size=256, **kw).fit()
        t1 = time.perf_counter()
        du = nl.predict_details(Xu)
        t = time.perf_counter() - t0
        cold[name] = {"options": kw, "voxels_per_s": args.n / t, "fit_seconds": t1 - t0,
                      "voxels_per_s_after_fit": args.n / (t - (t1 - t0)),
                      "mean_iterations": float(du.n_iter.mean()),
                      "mean_jacobians": float(du.n_jacobian.mean()),
                      "converged_fraction": float(du.converged.mean())}
        if name == "default":
            cost_default = du.residual_norm ** 2
        else:  # another local minimum, or a stop short of it: the cost against the default fit's, in sigma^2
            dc = (du.residual_norm ** 2 - cost_default) / du.sigma ** 2
            cold[name].update(higher_cost_than_default=float(np.mean(dc > 1)),
                              lower_cost_than_default=float(np.mean(dc < -1)))
    return cold


def scipy_loop(args, seq, sim, common, init, X, start_, warm, free):
    """(c): the per-voxel scipy loop on the first voxels, against the fastest accurate batched schedule."""
    ns = min(args.n_scipy, args.n)
    nl = NLLSFitter(init=init, **common).fit()
    ysc = X[:ns, :13] + 1j * X[:ns, 13:]
    st = np.clip(start_[:ns], [nl.bounds_[p][0] for p in free], [nl.bounds_[p][1] for p in free])
    t0 = time.perf_counter()
    sp = [scipy_tied(seq, sim.basis_, ysc[i], st[i], nl.bounds_) for i in range(ns)]
    t_sp = time.perf_counter() - t0
    # the fastest schedule that is still accurate (median change < 0.05 sqrt(CRB)): scipy converges fully
    accurate = [k for k in warm if warm[k]["median_change_over_sqrt_crb"] < 0.05] or list(warm)
    best = max(accurate, key=lambda k: warm[k]["voxels_per_s"])
    t0 = time.perf_counter()
    NLLSFitter(init=init, **common, **SCHEDULES[best]).fit().predict_details(X)
    t_b = time.perf_counter() - t0
    return {"n_voxels": ns, "voxels_per_s": ns / t_sp, "mean_jacobians": float(np.mean([s[1] for s in sp])),
            "batched_schedule": best, "batched_voxels_per_s_same_run": args.n / t_b,
            "speed_ratio": (args.n / t_b) / (ns / t_sp)}


def tables(res, start_label):
    warm, cold, sc = res["tied_from_start"], res["untied_cold"], res["scipy_loop"]
    rows = [[k, m["voxels_per_s"], m["mean_iterations"], m["mean_jacobians"], m["converged_fraction"],
             m["median_change_over_sqrt_crb"], m["max_change_over_sqrt_crb"]] for k, m in warm.items()]
    cold_rows = [[k, m["voxels_per_s"], m["voxels_per_s_after_fit"], m["mean_iterations"], m["mean_jacobians"],
                  m["converged_fraction"], m.get("higher_cost_than_default", ""), m.get("lower_cost_than_default", "")]
                 for k, m in cold.items()]
    return [table(f"(a) tied model from a start ({start_label}), {res['n_voxels']} voxels, SNR {res['snr']:g}",
                  ["schedule", "voxels/s", "iterations", "Jacobians", "converged", "median change/√CRB",
                   "max change/√CRB"], rows,
                  f"measured rates: {res['jacobians_per_s_measured']:.0f} Jacobians/s, "
                  f"{res['simulations_per_s_measured']:.0f} simulations/s"),
            table("(b) untied model, cold", ["start", "voxels/s", "voxels/s after fit", "iterations", "Jacobians",
                                             "converged", "cost above default", "cost below default"], cold_rows),
            table("(c) per-voxel scipy least_squares against the batched fit",
                  ["voxels", "scipy voxels/s", "Jacobians/voxel", "batched schedule", "batched voxels/s", "ratio"],
                  [[sc["n_voxels"], sc["voxels_per_s"], sc["mean_jacobians"], sc["batched_schedule"],
                    sc["batched_voxels_per_s_same_run"], sc["speed_ratio"]]])]


def figure(run, res, start_label):
    import matplotlib  # optional: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm, cold, sc = res["tied_from_start"], res["untied_cold"], res["scipy_loop"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = list(warm) + [f"untied cold {k}" for k in cold] + ["scipy loop"]
    vps = [warm[k]["voxels_per_s"] for k in warm] + [cold[k]["voxels_per_s"] for k in cold] + [sc["voxels_per_s"]]
    ax[0].barh(names, vps)
    ax[0].axvline(150, ls="--", c="k", lw=0.8)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("voxels / s")
    ax[1].barh(list(warm), [warm[k]["mean_jacobians"] for k in warm], label="exact Jacobians")
    ax[1].barh(list(warm), [warm[k]["mean_iterations"] for k in warm], alpha=0.4, label="iterations")
    ax[1].set_xlabel("per voxel, tied from a start")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"NLLS, rank 13, SNR {res['snr']:g}, start = {start_label}")
    fig.tight_layout()
    run.save_figure(fig, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    run = start("nlls", "NLLSFitter speed: warm-start schedules, the untied cold fit, a per-voxel scipy loop", args,
                argv, variant="network" if args.start_model else None)
    warnings.simplefilter("ignore", NLLSFitWarning)
    free = free_parameters(True)
    seq, sim, X, y, crb, theta, start_, t_net = problem(args, free)
    jps, sps = rates(seq, theta[:64])
    common = dict(sequence=seq, basis=sim.basis_, estimate=free, tied_R1=True, chunk_size=256)
    init = GivenStart(start_, free).fit()
    warm, t_ref = tied_schedules(args, common, init, X)
    run.log(f"(a) {len(warm)} schedules")
    cold = untied_cold(args, seq)
    run.log(f"(b) {len(cold)} untied starts")
    start_label = (f"the network {args.start_model}" if args.start_model else "truth + a CRB-distributed error")
    res = {"sequence": seq.name, "rank": 13, "snr": args.snr, "n_voxels": args.n, "start": start_label,
           "network_predict_seconds": t_net, "jacobians_per_s_measured": jps, "simulations_per_s_measured": sps,
           "reference_seconds": t_ref, "tied_from_start": warm, "untied_cold": cold,
           "scipy_loop": scipy_loop(args, seq, sim, common, init, X, start_, warm, free),
           "targets": {"tied_start_voxels_per_s": 150, "tied_start_iterations": 5, "median_change": 0.05,
                       "untied_cold_voxels_per_s": 40, "speed_ratio": 20}}
    if t_net is not None:
        res["network_median_abs_error_over_sqrt_crb"] = dict(zip(free, np.median(np.abs(start_ - y) / np.sqrt(crb),
                                                                                axis=0)))
    doc = run.write(tables(res, start_label), res)
    figure(run, res, start_label)
    return doc


if __name__ == "__main__":
    main()
