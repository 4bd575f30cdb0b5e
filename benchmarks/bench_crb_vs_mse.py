"""Honest efficiency benchmark: CRB-loss network vs its MSE twin, a constant and NLLS.

Setting (Zhang et al., MRM 2022; Assländer et al., MRM 2022): the v3.2
sequence, SVD rank 13, the tied-T1 generalized Bloch model, estimating m0s,
R1f (= R1s) and R2f; Rex, T2s, omega0, B1 and complex M0 are nuisance
parameters.

Estimators, all judged on the same held-out draws:

* ``crb-net``: ``CRBNetRegressor(simulator=sim)`` with the package's default
  recipe (only ``--epochs`` overrides ``max_epochs``), trained as
  ``fit_simulated`` does (noise-free features and unit CRBs, fresh M0 and
  noise per batch), on a cached dataset;
* ``mse-net``: the same recipe with ``loss="mse"``;
* ``prior-mean``: the constant prior mean (it ignores the data);
* ``nlls``: the package's tied ``NLLSFitter`` on the first ``--nlls-theta``
  thetas and ``--nlls-draws`` noise draws of each (its rows are over that
  subset; a second table scores every estimator on that subset);
* ``nlls-from-net`` (``--nlls-from-net``): the same NLLS started at the CRB
  net's estimate (``NLLSFitter(init=net)``), on the same subset;
* ``dictionary`` (``--dictionary N``): ``DictionaryMatcher`` with ``N``
  atoms drawn from the prior, on every draw.

Evaluation: ``--n-eval-theta`` held-out prior draws, each with ``--n-draws``
noise draws at every SNR of ``--eval-snr`` (uniform phase of M0,
``|M0| = SNR * sigma``). Per parameter, SNR and identifiability stratum
(``informative``: CRB < 0.1 x prior variance, where the data decide;
``prior-dominated`` otherwise) it reports nMSE (mean over thetas of the
CRB-normalised MSE), median |bias|/sqrt(CRB), median signed bias/sqrt(CRB)
and median std/sqrt(CRB), with counts; never an nMSE alone. An nMSE below 1
with std/sqrt(CRB) well below 1 is shrinkage towards the prior, not
efficiency.

Beside them, a reference for that spread: ``linearised Bayes``, the median
std/sqrt(CRB) over the informative thetas of the posterior mean under a
Gaussian prior with the prior's variances on every estimated parameter
(``crb.linearized_bayes_spread``, first order in the noise). A
squared-error-trained network approaches the posterior mean, so a spread
near this reference (not near 1) is what leaning on the prior as a Bayes
estimator does; much below it is over-smoothing.

Outputs under ``--out`` (default ``benchmarks/results/``): ``crb_vs_mse.json``
and ``crb_vs_mse.png``; datasets are cached in ``<out>/cache/``. torch runs
with ``--threads`` (default 1: the machine is shared, and 2 threads on 2
loaded cores degrade badly). ``--save-nets DIR`` also saves both nets as
model folders (inputs of ``bench_data_following.py`` and
``bench_posterior_mean.py --model``).

Usage::

    python benchmarks/bench_crb_vs_mse.py --estimate m0s R1f R2f Rex T2s omega0 B1 --train-snr 10 100 --jobs 2
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from _harness import cached_dataset, eval_draws, parser, save_npz, sequence, start, table

EST = ("m0s", "R1f", "R2f")
STRATA = ("informative", "prior-dominated", "all")
PRIOR = "brain"


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--n-train", type=int, default=96000, help="training parameter draws (default 96000, the recipe's)")
    p.add_argument("--epochs", type=int, default=None, help="override max_epochs (default: the package default)")
    p.add_argument("--train-snr", type=float, nargs=2, default=(10.0, 100.0), help="training |M0|/sigma range")
    p.add_argument("--eval-snr", type=float, nargs="+", default=(30.0, 100.0, 300.0))
    p.add_argument("--n-eval-theta", type=int, default=100, help="held-out prior draws")
    p.add_argument("--n-draws", type=int, default=100, help="noise draws per theta and SNR")
    p.add_argument("--nlls-theta", type=int, default=20, help="thetas fitted by NLLS (0: skip NLLS)")
    p.add_argument("--nlls-draws", type=int, default=20, help="noise draws per theta and SNR fitted by NLLS")
    p.add_argument("--nlls-from-net", action="store_true",
                   help="also score NLLS started at the CRB net's estimate, on the NLLS subset")
    p.add_argument("--dictionary", type=int, default=0, metavar="N_ATOMS",
                   help="also score dictionary matching with N_ATOMS prior draws as atoms (default 0: skip)")
    p.add_argument("--estimate", nargs="+", default=list(EST),
                   help="targets the networks learn (default m0s R1f R2f; e.g. all free parameters of the tied "
                        "model: m0s R1f R2f Rex T2s omega0 B1); the report is on m0s, R1f, R2f")
    p.add_argument("--save-nets", default=None, metavar="DIR",
                   help="also save the trained nets as model folders DIR/<loss>-net")
    p.add_argument("--jobs", type=int, default=1, help="train the CRB net and its twin in parallel processes")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.epochs, a.n_eval_theta, a.n_draws, a.nlls_theta, a.nlls_draws = 300, 1, 6, 4, 2, 2
    if a.dictionary < 0:
        p.error(f"--dictionary must be 0 (skip) or a number of atoms, got {a.dictionary}")
    if a.nlls_from_net and a.nlls_theta <= 0:
        p.error("--nlls-from-net needs NLLS thetas (--nlls-theta > 0)")
    if not set(EST) <= set(a.estimate):
        p.error(f"--estimate must include {EST}")
    a.nlls_theta = min(a.nlls_theta, a.n_eval_theta)
    a.nlls_draws = max(2, min(a.nlls_draws, a.n_draws))
    return a


# ----------------------------------------------------------- estimators
def train_net(sim, data, loss, args, log):
    from sklearn_crb import CRBNetRegressor

    # the benchmark's thread setting, not the package's automatic one
    kw = {"simulator": sim, "loss": loss, "random_state": args.seed, "n_threads": args.threads or args.torch_threads}
    if args.epochs is not None:
        kw["max_epochs"] = args.epochs
    net = CRBNetRegressor(**kw)
    if net.augment == "auto":  # what fit_simulated resolves it to
        net.set_params(augment=True)
    t = time.perf_counter()
    net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
    sec = time.perf_counter() - t
    last = {k: float(net.history[-1, k]) for k in ("train_loss", "valid_crb") if k in net.history[-1]}
    log(f"{loss}-net: {len(net.history)} epochs in {sec:.0f} s, last {last}")
    recipe = {k: repr(v) for k, v in net.get_params(deep=False).items() if k not in ("simulator", "callbacks")}
    recipe["callbacks"] = repr(net.callbacks)
    recipe["module_"] = repr(net.module_.module)
    return net, {"train_seconds": sec, "epochs_run": len(net.history), "last_epoch": last, "recipe": recipe,
                 "device": str(getattr(net, "device_", net.device))}


def timed_predict(est, X, warm=True):
    if warm:
        est.predict(X[:16])  # time the steady state, not first-call set-up
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = np.asarray(est.predict(X), dtype=float)
    return pred, time.perf_counter() - t


def report(ev_rows, pred, mask, pvar):
    from sklearn_crb.metrics import bias_variance_report

    ok = mask & np.all(np.isfinite(pred), axis=1)
    g, counts = np.unique(ev_rows["group"][ok], return_counts=True)
    ok &= np.isin(ev_rows["group"], g[counts >= 2])
    rep = bias_variance_report(ev_rows["y"][ok], pred[ok], crb=ev_rows["crb"][ok], groups=ev_rows["group"][ok],
                               names=EST, prior_variance=pvar, snr=ev_rows["snr"][ok])
    return rep, int(mask.sum() - ok.sum())


def constant_report(ev_rows, mean, mask, pvar):
    from sklearn_crb.metrics import constant_predictor_report

    first = mask & (np.r_[True, np.diff(ev_rows["group"]) != 0])  # one row per group
    return constant_predictor_report(ev_rows["y"][first], mean, crb=ev_rows["crb"][first], names=EST,
                                     prior_variance=pvar, snr=ev_rows["snr"][first])


# --------------------------------------------------------------- output
def bayes_reference(sim, ev, snrs, p_var, seed):
    """``{snr: {parameter: (median linearised-Bayes std/sqrt(CRB), n informative)}}`` on the held-out thetas."""
    from sklearn_crb.crb import linearized_bayes_spread
    from sklearn_crb.metrics import prior_moments
    from sklearn_crb.physics.signal import jacobian
    from sklearn_crb.simulator import CRB_M0S_FLOOR

    est = tuple(sim.estimate_)
    _, pv_all = prior_moments(sim.prior_, est, random_state=seed + 7)
    th = ev["theta"].copy()
    th[:, 0] = np.maximum(th[:, 0], CRB_M0S_FLOOR)
    s, J = jacobian(sim.sequence_, th)
    out = {}
    for snr in snrs:
        r = linearized_bayes_spread(s, J, pv_all, estimate=est, tied_R1=True, M0=snr * sim.sigma, sigma=sim.sigma,
                                    basis=sim.basis_)
        cell = {}
        for j, p in enumerate(EST):
            k = est.index(p)
            inf = ev["crb_unit"][:, k] * sim.sigma**2 / (snr * sim.sigma) ** 2 < 0.1 * p_var[j]
            cell[p] = (float(np.median(r[inf, k])) if inf.any() else float("nan"), int(inf.sum()))
        out[f"{snr:g}"] = cell
    return out


def _cell(r):
    if r["n_theta"] == 0:
        return "— (n=0)"
    return (f"{r['normalized_mse']:.3g} / {r['median_abs_bias_over_sqrt_crb']:.2f} / "
            f"{r['median_bias_over_sqrt_crb']:+.2f} / {r['median_std_over_sqrt_crb']:.2f} (n={r['n_theta']})")


def strata_table(title, strata_by_est, snrs, ref=None):
    rows = []
    for s in [f"{v:g}" for v in snrs]:
        for st in STRATA:
            for name, strata in strata_by_est.items():
                rec = {r["parameter"]: r for r in strata if r["snr"] == s and r["identifiability"] == st}
                rows.append([s, st, name, *(_cell(rec[p]) for p in EST)])
    for snr, cell in (ref or {}).items():
        rows.append([snr, "informative", "linearised Bayes (std/√CRB)",
                     *(f"{v:.2f} (n={n})" for v, n in (cell[p] for p in EST))])
    return table(title, ["SNR", "stratum", "estimator", *EST], rows,
                 "Cells: nMSE / median |bias|/√CRB / median bias/√CRB / median std/√CRB (n = thetas in the "
                 "stratum). informative: CRB < 0.1 × prior variance.")


def figure(run, strata_by_est, snrs, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = (("normalized_mse", "nMSE"), ("median_bias_over_sqrt_crb", "median bias/√CRB"),
             ("median_std_over_sqrt_crb", "median std/√CRB"))
    fig, axes = plt.subplots(len(stats), len(EST), figsize=(12, 9), constrained_layout=True)
    for name, strata in strata_by_est.items():
        for j, p in enumerate(EST):
            for i, (key, label) in enumerate(stats):
                if name == "prior-mean" and key != "normalized_mse":
                    continue  # std 0, bias tens of sqrt(CRB): off every useful scale
                pts = [(v, r[key]) for v in snrs for r in strata
                       if r["parameter"] == p and r["snr"] == f"{v:g}" and r["identifiability"] == "informative"
                       and r[key] is not None]
                if pts:
                    axes[i, j].plot(*zip(*pts), "o-", label=name)
                axes[i, j].set_xscale("log")
                axes[i, j].set_xticks(list(snrs), [f"{v:g}" for v in snrs])
                axes[i, j].minorticks_off()
                axes[i, j].set_title(f"{p}: {label}", fontsize=9)
                axes[i, j].set_xlabel("SNR")
    for j in range(len(EST)):
        axes[0, j].set_yscale("log")
        axes[0, j].axhline(1, color="k", lw=0.6)
        axes[1, j].axhline(0, color="k", lw=0.6)
        axes[2, j].axhline(1, color="k", lw=0.6)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title + " (informative draws: CRB < 0.1 x prior variance)", fontsize=10)
    run.save_figure(fig, dpi=90)


# ------------------------------------------------------------------ main
def datasets(args, run, seq):
    """The simulator, the prior's moments, the training set and the held-out set (both cached)."""
    from sklearn_crb import MTFingerprintSimulator
    from sklearn_crb.metrics import prior_moments

    cache = Path(args.out) / "cache"
    est = tuple(args.estimate)
    tag = f"{seq.sha256()[:10]}_r13_{PRIOR}_tied"
    dtag = tag if est == EST else f"{tag}_{'-'.join(est)}"
    fb = cache / f"basis_{tag}_seed{args.seed}{'_quick' if args.quick else ''}.npz"  # a quick basis is not shared
    if fb.is_file():
        basis = np.load(fb)["basis"]
    else:
        basis = MTFingerprintSimulator(seq, n_components=13, tied_R1=True, prior=PRIOR,
                                       n_basis_samples=100 if args.quick else 1000, random_state=args.seed).fit().basis_
        save_npz(fb, basis=basis)
    sim = MTFingerprintSimulator(seq, basis=basis, estimate=est, snr=tuple(args.train_snr), tied_R1=True,
                                 prior=PRIOR, random_state=args.seed).fit()
    p_mean, p_var = prior_moments(sim.prior_, EST, random_state=args.seed + 7)
    train = cached_dataset(sim, args.n_train, args.seed, cache, f"train_{dtag}", run.log)
    theta_ev = sim.prior_.sample(args.n_eval_theta, args.seed + 1000)
    ev = cached_dataset(sim, args.n_eval_theta, args.seed + 1000, cache, f"eval_{dtag}", run.log, theta=theta_ev)
    return sim, p_mean, p_var, train, ev


def train_nets(args, run, sim, train):
    from joblib import Parallel, delayed

    losses = ("crb", "mse")
    trained = Parallel(n_jobs=args.jobs)(delayed(train_net)(sim, train, loss, args, print) for loss in losses)
    nets = {f"{loss}-net": net for loss, (net, _) in zip(losses, trained)}
    results = {f"{loss}-net": meta for loss, (_, meta) in zip(losses, trained)}
    if args.save_nets:
        from sklearn_crb import save_model

        for name, net in nets.items():
            run.log(f"saved {save_model(net, Path(args.save_nets) / name, simulator=sim)}")
    return nets, results


def nlls_predictions(args, run, seq, sim, rows, subset, crb_net):
    """NLLS (and, with --nlls-from-net, NLLS started at the CRB net) on the subset; NaN elsewhere."""
    from sklearn_crb import NLLSFitter

    preds, results = {}, {}
    starts = {"nlls": None, "nlls-from-net": crb_net} if args.nlls_from_net else {"nlls": None}
    for name, init in starts.items():
        fitter = NLLSFitter(seq, basis=sim.basis_, estimate=EST, tied_R1=True, init=init).fit()
        pred = np.full_like(rows["y"], np.nan)
        pred[subset], sec = timed_predict(fitter, rows["X"][subset])
        preds[name] = pred
        results[name] = {"predict_ms_per_voxel": 1e3 * sec / subset.sum(), "predict_seconds": sec}
        run.log(f"{name}: {subset.sum()} fits in {sec:.0f} s")
    return preds, results


def dictionary_predictions(args, run, seq, sim, rows):
    from sklearn_crb import DictionaryMatcher

    t = time.perf_counter()
    dico = DictionaryMatcher(seq, basis=sim.basis_, estimate=EST, tied_R1=True, prior=sim.prior_,
                             n_atoms=args.dictionary, random_state=args.seed).fit()
    fit_s = time.perf_counter() - t
    pred, sec = timed_predict(dico, rows["X"])
    run.log(f"dictionary: {args.dictionary} atoms in {fit_s:.0f} s, {rows['X'].shape[0]} matches in {sec:.0f} s")
    return pred, {"predict_ms_per_voxel": 1e3 * sec / rows["X"].shape[0], "fit_seconds": fit_s}


def predictions(args, run, seq, sim, rows, subset, nets, results):
    cols = [list(args.estimate).index(p) for p in EST]  # the report is on m0s, R1f, R2f whatever else the nets learn
    rows["y"], rows["crb"] = rows["y"][:, cols], rows["crb"][:, cols]
    preds = {}
    for name, net in nets.items():
        pred, sec = timed_predict(net, rows["X"])
        preds[name] = pred[:, cols]
        results[name]["predict_ms_per_voxel"] = 1e3 * sec / rows["X"].shape[0]
    if args.nlls_theta > 0:
        p, r = nlls_predictions(args, run, seq, sim, rows, subset, nets["crb-net"])
        preds.update(p)
        results.update(r)
    if args.dictionary > 0:
        preds["dictionary"], results["dictionary"] = dictionary_predictions(args, run, seq, sim, rows)
    return preds


def score(rows, preds, subset, p_mean, p_var, results):
    """Strata of every estimator on every draw (NLLS: its subset) and, on the NLLS subset, of every estimator."""
    everything = np.ones(rows["y"].shape[0], bool)
    strata_all, strata_sub = {}, {}
    for name, pred in preds.items():
        mask = subset if name.startswith("nlls") else everything
        rep, dropped = report(rows, pred, mask, p_var)
        strata_all[name] = rep.strata
        results[name]["dropped_non_finite_rows"] = dropped
        if subset.any():  # --nlls-theta 0: no NLLS subset
            strata_sub[name] = report(rows, pred, subset, p_var)[0].strata
    strata_all["prior-mean"] = constant_report(rows, p_mean, everything, p_var).strata
    if subset.any():
        strata_sub["prior-mean"] = constant_report(rows, p_mean, subset, p_var).strata
    results["prior-mean"] = {"constant": dict(zip(EST, map(float, p_mean)))}
    return strata_all, strata_sub


def main(argv=None):
    args = parse_args(argv)
    run = start("crb_vs_mse", "Efficiency: CRB-loss network against its MSE twin, the prior mean and NLLS", args,
                argv)
    seq = sequence(required=True)[0]
    sim, p_mean, p_var, train, ev = datasets(args, run, seq)
    rows = eval_draws(ev, args.eval_snr, args.n_draws, float(sim.sigma), args.seed + 2000)
    subset = (rows["theta_index"] < args.nlls_theta) & (rows["draw_index"] < args.nlls_draws)
    nets, results = train_nets(args, run, sim, train)
    preds = predictions(args, run, seq, sim, rows, subset, nets, results)
    strata_all, strata_sub = score(rows, preds, subset, p_mean, p_var, results)
    ref = bayes_reference(sim, ev, args.eval_snr, p_var, args.seed)
    tables = [strata_table(f"All {args.n_eval_theta} held-out thetas x {args.n_draws} noise draws (NLLS: first "
                           f"{args.nlls_theta})", strata_all, args.eval_snr, ref)]
    if strata_sub:
        tables.append(strata_table(f"The NLLS subset ({args.nlls_theta} thetas x {args.nlls_draws} draws), every "
                                   "estimator", strata_sub, args.eval_snr))
    tables.append(table("Timings", ["estimator", "quantity", "value"],
                        [[n, k, v] for n, r in results.items() if n != "prior-mean" for k, v in r.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)]))
    data = {"config": vars(args), "estimate": args.estimate, "reported": EST, "rank": 13, "tied_R1": True,
            "prior": PRIOR, "prior_mean": p_mean, "prior_variance": p_var, "sigma": float(sim.sigma),
            "estimators": results, "strata": strata_all, "strata_nlls_subset": strata_sub,
            "linearized_bayes_reference": ref}
    doc = run.write(tables, data)
    figure(run, strata_all, args.eval_snr,
           f"n_train={args.n_train}, epochs={results['crb-net']['epochs_run']}, train SNR {args.train_snr}")
    return doc


if __name__ == "__main__":
    main()
