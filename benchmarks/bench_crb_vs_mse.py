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

Outputs under ``benchmarks/results/`` (ignored by git): ``crb_vs_mse.json``,
``crb_vs_mse.md`` (the tables), ``crb_vs_mse.png``; datasets are cached in
``benchmarks/results/cache/``. torch runs with ``--threads`` (default 1:
the machine is shared, and 2 threads on 2 loaded cores degrade badly).

Usage::

    python benchmarks/bench_crb_vs_mse.py --quick
    python benchmarks/bench_crb_vs_mse.py --estimate m0s R1f R2f Rex T2s omega0 B1 --train-snr 10 100 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from _results import save_figure, write_text

ROOT = Path(__file__).resolve().parents[1]
SEQ_NAME = "control_MT_v3p2_TR3p5ms_discretized.mat"
EST = ("m0s", "R1f", "R2f")
CHUNK = 2000
STRATA = ("informative", "prior-dominated", "all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
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
    p.add_argument("--prior", default="brain", help="simulator prior name (default 'brain')")
    p.add_argument("--estimate", nargs="+", default=list(EST),
                   help="targets the networks learn (default m0s R1f R2f; e.g. all free parameters of the tied "
                        "model: m0s R1f R2f Rex T2s omega0 B1); the report is on m0s, R1f, R2f")
    p.add_argument("--crb-at", choices=("auto", "truth", "estimate"), default=None,
                   help="the CRB net's crb_at (default: the package default)")
    p.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="hidden widths of both nets' MLP (default: the package default)")
    p.add_argument("--save-nets", default=None, metavar="DIR",
                   help="also save the trained nets as model folders DIR/<loss>-net (for bench_data_following.py)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="whether both nets' MLP standardises its normalised inputs (MLP(standardize=...); "
                        "default: the package default, on)")
    p.add_argument("--train-flat", nargs="+", default=(), metavar="NAME",
                   help="train on a prior whose NAME distributions are uniform on their support (e.g. T2s B1); "
                        "the held-out draws and the strata keep --prior")
    p.add_argument("--twin", choices=("mse", "bias_reduced", "none"), default="mse",
                   help="the loss of the CRB net's twin (default mse; bias_reduced: Mao et al.'s loss after "
                        "--pretrain-epochs CRB-loss epochs; none: the CRB net alone)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="bias_reduced twin: CRB-loss epochs before the bias-reduced ones (default: all but 5 %%)")
    p.add_argument("--jobs", type=int, default=1, help="train the CRB net and its twin in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default=None, help="network device (default: the package default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.environ.get("SKLEARN_CRB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 draws, 5 epochs, 20 thetas x 20 draws, "
                                                        "NLLS on 4 thetas")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.epochs, a.n_eval_theta, a.n_draws, a.nlls_theta, a.nlls_draws = 2000, 5, 20, 20, 4, 10
    if a.dictionary < 0:
        p.error(f"--dictionary must be 0 (skip) or a number of atoms, got {a.dictionary}")
    if a.nlls_from_net and a.nlls_theta <= 0:
        p.error("--nlls-from-net needs NLLS thetas (--nlls-theta > 0)")
    a.nlls_theta = min(a.nlls_theta, a.n_eval_theta)
    a.nlls_draws = max(2, min(a.nlls_draws, a.n_draws))
    return a


# ------------------------------------------------------------------ data
def _save_npz(path, **arrays):
    import numpy as np

    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # never a partly written cache file


def cached_dataset(sim, n, seed, cache, tag, log, theta=None):
    """Noise-free features, targets, unit CRBs and theta of ``n`` draws, cached per chunk."""
    import numpy as np

    parts = []
    for k in range(-(-n // CHUNK)):
        m = min(CHUNK, n - k * CHUNK)
        f = cache / f"{tag}_seed{seed}_n{m}_chunk{k}.npz"
        if f.is_file():
            d = np.load(f)
            parts.append({key: d[key] for key in d.files})
            continue
        t = time.perf_counter()
        th = None if theta is None else theta[k * CHUNK:k * CHUNK + m]
        _, y, _, det = sim.make_dataset(m, [seed, k], theta=th, return_details=True)
        d = {"X_clean": det["X_clean"], "y": y, "crb_unit": det["crb_unit"], "theta": det["theta"]}
        _save_npz(f, **d)
        parts.append(d)
        log(f"  {tag} chunk {k}: {m} Jacobians in {time.perf_counter() - t:.1f} s")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def eval_draws(ev, snrs, n_draws, sigma, seed):
    """Noisy features at exactly each SNR (uniform M0 phase), with groups, SNR and CRB per row."""
    import numpy as np

    from sklearn_crb.simulator import apply_m0_and_noise

    rng = np.random.default_rng(seed)
    n_theta, f = ev["X_clean"].shape
    rows = {k: [] for k in ("X", "y", "crb", "group", "snr", "theta_index", "draw_index")}
    for i, s in enumerate(snrs):
        idx = np.repeat(np.arange(n_theta), n_draws)
        M0 = sigma * s * np.exp(2j * np.pi * rng.uniform(0, 1, idx.size))
        eps = sigma * (rng.standard_normal((idx.size, f // 2)) + 1j * rng.standard_normal((idx.size, f // 2)))
        rows["X"].append(apply_m0_and_noise(ev["X_clean"][idx], M0, eps))
        rows["y"].append(ev["y"][idx])
        rows["crb"].append(ev["crb_unit"][idx] / s**2)  # CRB at |M0| = s * sigma: unit CRB * sigma^2/|M0|^2
        rows["group"].append(idx + i * n_theta)
        rows["snr"].append(np.full(idx.size, float(s)))
        rows["theta_index"].append(idx)
        rows["draw_index"].append(np.tile(np.arange(n_draws), n_theta))
    return {k: np.concatenate(v) for k, v in rows.items()}


# ----------------------------------------------------------- estimators
def train_net(sim, data, loss, args, log):
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    kw = {"simulator": sim, "loss": loss, "random_state": args.seed}
    if args.epochs is not None:
        kw["max_epochs"] = args.epochs
    if args.hidden:
        kw["module__hidden"] = tuple(args.hidden)
    if args.standardize is not None:
        kw["module__standardize"] = args.standardize
    if args.crb_at is not None and loss == "crb":
        kw["crb_at"] = args.crb_at
    if loss == "bias_reduced":
        epochs = kw.get("max_epochs", CRBNetRegressor().max_epochs)
        kw["pretrain_epochs"] = args.pretrain_epochs if args.pretrain_epochs is not None else int(0.95 * epochs)
    if args.device is not None:
        kw["device"] = args.device
    if "n_threads" in CRBNetRegressor().get_params(deep=False):
        kw["n_threads"] = args.threads  # the benchmark's thread setting, not the package's automatic one
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
    import numpy as np

    if warm:
        est.predict(X[:16])  # time the steady state, not first-call set-up
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = np.asarray(est.predict(X), dtype=float)
    return pred, time.perf_counter() - t


def report(ev_rows, pred, mask, pvar):
    import numpy as np

    from sklearn_crb.metrics import bias_variance_report

    ok = mask & np.all(np.isfinite(pred), axis=1)
    g, counts = np.unique(ev_rows["group"][ok], return_counts=True)
    ok &= np.isin(ev_rows["group"], g[counts >= 2])
    rep = bias_variance_report(ev_rows["y"][ok], pred[ok], crb=ev_rows["crb"][ok], groups=ev_rows["group"][ok],
                               names=EST, prior_variance=pvar, snr=ev_rows["snr"][ok])
    return rep, int(mask.sum() - ok.sum())


def constant_report(ev_rows, mean, mask, pvar):
    import numpy as np

    from sklearn_crb.metrics import constant_predictor_report

    first = mask & (np.r_[True, np.diff(ev_rows["group"]) != 0])  # one row per group
    return constant_predictor_report(ev_rows["y"][first], mean, crb=ev_rows["crb"][first], names=EST,
                                     prior_variance=pvar, snr=ev_rows["snr"][first])


# --------------------------------------------------------------- output
def bayes_reference(sim, ev, snrs, p_var, seed):
    """``{snr: {parameter: (median linearised-Bayes std/sqrt(CRB), n informative)}}`` on the held-out thetas."""
    import numpy as np

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


def markdown(strata_by_est, snrs):
    head = ("| SNR | stratum | estimator | " + " | ".join(EST) + " |\n|---|---|---|" + "---|" * len(EST))
    lines = [head]
    for s in [f"{v:g}" for v in snrs]:
        for st in STRATA:
            for name, strata in strata_by_est.items():
                rec = {r["parameter"]: r for r in strata if r["snr"] == s and r["identifiability"] == st}
                lines.append(f"| {s} | {st} | {name} | " + " | ".join(_cell(rec[p]) for p in EST) + " |")
    return "\n".join(lines)


def figure(path, strata_by_est, snrs, title):
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
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def machine(threads):
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "cuda": torch.cuda.is_available()}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()
    return info


# ------------------------------------------------------------------ main
def run_setup(args):
    """(out folder, its cache folder, a timestamped logger, machine facts, the v3.2 sequence, start time)."""
    from sklearn_crb.physics.sequence import Sequence

    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    info = machine(args.threads)
    seq_path = Path(args.data) / SEQ_NAME
    if not seq_path.is_file():
        raise SystemExit(f"{SEQ_NAME} not found in {args.data} (set --data or SKLEARN_CRB_DATA)")
    return out, cache, log, info, Sequence.from_mat(seq_path, TR=3.5e-3), t0


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from sklearn_crb.estimators.nlls import NLLSFitter
    from sklearn_crb.metrics import prior_moments
    from sklearn_crb.simulator import MTFingerprintSimulator

    out, cache, log, info, seq, t0 = run_setup(args)
    est = tuple(args.estimate)
    if not set(EST) <= set(est):
        raise SystemExit(f"--estimate must include {EST}")
    tag = f"{seq.sha256()[:10]}_r13_{args.prior}_tied"
    dtag = tag if est == EST else f"{tag}_{'-'.join(est)}"
    fb = cache / f"basis_{tag}_seed{args.seed}.npz"
    if fb.is_file():
        basis = np.load(fb)["basis"]
    else:
        basis = MTFingerprintSimulator(seq, n_components=13, tied_R1=True, prior=args.prior,
                                       random_state=args.seed).fit().basis_
        _save_npz(fb, basis=basis)
    sim = MTFingerprintSimulator(seq, basis=basis, estimate=est, snr=tuple(args.train_snr), tied_R1=True,
                                 prior=args.prior, random_state=args.seed).fit()
    sigma = float(sim.sigma)
    p_mean, p_var = prior_moments(sim.prior_, EST, random_state=args.seed + 7)
    seconds = {}
    t = time.perf_counter()
    sim_train = sim
    if args.train_flat:  # a flatter training prior: the named distributions uniform on their support
        from sklearn_crb.physics.priors import ParameterPrior, Uniform

        dists = dict(sim.prior_.distributions)
        bad = [name for name in args.train_flat if name not in dists or name == "R1s"]
        if bad:
            raise SystemExit(f"--train-flat {bad}: not a drawn parameter of the tied prior {sorted(set(dists) - {'R1s'})}")
        for name in args.train_flat:
            dists[name] = Uniform(*dists[name].support)
        flat = ParameterPrior(dists, tied_R1=True)
        sim_train = MTFingerprintSimulator(seq, basis=basis, estimate=est, snr=tuple(args.train_snr), tied_R1=True,
                                           prior=flat, random_state=args.seed).fit()
    ftag = f"_flat-{'-'.join(args.train_flat)}" if args.train_flat else ""
    train = cached_dataset(sim_train, args.n_train, args.seed, cache, f"train_{dtag}{ftag}", log)
    theta_ev = sim.prior_.sample(args.n_eval_theta, args.seed + 1000)
    ev = cached_dataset(sim, args.n_eval_theta, args.seed + 1000, cache, f"eval_{dtag}", log, theta=theta_ev)
    seconds["datasets"] = time.perf_counter() - t
    log(f"datasets: {args.n_train} training and {args.n_eval_theta} held-out draws ({seconds['datasets']:.0f} s, "
        "0 when cached)")
    rows = eval_draws(ev, args.eval_snr, args.n_draws, sigma, args.seed + 2000)
    everything = np.ones(rows["y"].shape[0], bool)
    subset = (rows["theta_index"] < args.nlls_theta) & (rows["draw_index"] < args.nlls_draws)

    estimators, results = {}, {}
    from joblib import Parallel, delayed

    losses = ("crb",) if args.twin == "none" else ("crb", args.twin)
    trained = Parallel(n_jobs=args.jobs)(delayed(train_net)(sim_train, train, loss, args, print) for loss in losses)
    for loss, (net, meta) in zip(losses, trained):
        estimators[f"{loss}-net"] = net
        results[f"{loss}-net"] = meta
    cols = [est.index(p) for p in EST]  # the report is on m0s, R1f, R2f whatever else the nets learn
    rows["y"], rows["crb"] = rows["y"][:, cols], rows["crb"][:, cols]
    if args.save_nets:
        from sklearn_crb.io.models import save_model

        for name, net in estimators.items():
            log(f"saved {save_model(net, Path(args.save_nets) / name, simulator=sim_train)}")
    preds = {}
    for name, net in estimators.items():
        pred, sec = timed_predict(net, rows["X"])
        preds[name] = pred[:, cols]
        results[name]["predict_ms_per_voxel"] = 1e3 * sec / rows["X"].shape[0]
    if args.nlls_theta > 0:
        nlls = NLLSFitter(seq, basis=sim.basis_, estimate=EST, tied_R1=True).fit()
        pred = np.full_like(rows["y"], np.nan)
        pred[subset], sec = timed_predict(nlls, rows["X"][subset])
        preds["nlls"] = pred
        results["nlls"] = {"predict_ms_per_voxel": 1e3 * sec / subset.sum(), "predict_seconds": sec}
        log(f"nlls: {subset.sum()} fits in {sec:.0f} s")
        if args.nlls_from_net:
            warm = NLLSFitter(seq, basis=sim.basis_, estimate=EST, tied_R1=True, init=estimators["crb-net"]).fit()
            pred = np.full_like(rows["y"], np.nan)
            pred[subset], sec = timed_predict(warm, rows["X"][subset])
            preds["nlls-from-net"] = pred
            results["nlls-from-net"] = {"predict_ms_per_voxel": 1e3 * sec / subset.sum(), "predict_seconds": sec}
            log(f"nlls-from-net: {subset.sum()} fits in {sec:.0f} s")
    if args.dictionary > 0:
        from sklearn_crb.estimators.dictionary import DictionaryMatcher

        t = time.perf_counter()
        dico = DictionaryMatcher(seq, basis=sim.basis_, estimate=EST, tied_R1=True, prior=sim.prior_,
                                 n_atoms=args.dictionary, random_state=args.seed).fit()
        fit_s = time.perf_counter() - t
        preds["dictionary"], sec = timed_predict(dico, rows["X"])
        results["dictionary"] = {"predict_ms_per_voxel": 1e3 * sec / rows["X"].shape[0], "fit_seconds": fit_s}
        log(f"dictionary: {args.dictionary} atoms in {fit_s:.0f} s, {rows['X'].shape[0]} matches in {sec:.0f} s")

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
    seconds["total"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()

    ref = bayes_reference(sim, ev, args.eval_snr, p_var, args.seed)
    table = markdown(strata_all, args.eval_snr) + "\n" + "\n".join(
        f"| {snr} | informative | linearised Bayes (std/√CRB) | "
        + " | ".join(f"{v:.2f} (n={n})" for v, n in (cell[p] for p in EST)) + " |" for snr, cell in ref.items())
    table_sub = markdown(strata_sub, args.eval_snr) if strata_sub else "(no NLLS subset: --nlls-theta 0)"
    legend = ("Cells: nMSE / median |bias|/√CRB / median bias/√CRB / median std/√CRB (n = thetas in the stratum); "
              f"each theta has {args.n_draws} noise draws per SNR. informative: CRB < 0.1 × prior variance.")
    cmd = "python benchmarks/bench_crb_vs_mse.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = (f"# CRB net vs MSE twin vs prior mean vs NLLS\n\n`{cmd}`\n\n{legend}\n\n"
           f"## All {args.n_eval_theta} held-out thetas (NLLS: first {args.nlls_theta})\n\n{table}\n\n"
           f"## The NLLS subset ({args.nlls_theta} thetas x {args.nlls_draws} draws), every estimator\n\n{table_sub}\n\n"
           "## Timings\n\n" + "\n".join(
               f"- {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, (int, float)))
               for n, r in results.items() if n != "prior-mean") + f"\n- datasets {seconds['datasets']:.0f} s, total "
           f"{seconds['total']:.0f} s\n- machine: {json.dumps(info)}\n")
    res = {"command": cmd, "config": vars(args), "estimate": est, "reported": EST, "sequence": SEQ_NAME, "rank": 13, "tied_R1": True,
           "prior": args.prior, "prior_mean": p_mean.tolist(), "prior_variance": p_var.tolist(),
           "sigma": sigma, "machine": info, "seconds": seconds, "estimators": results,
           "strata": strata_all, "strata_nlls_subset": strata_sub, "linearized_bayes_reference": ref}
    for path, text in ((out / "crb_vs_mse.json", json.dumps(res, indent=1, default=str)),
                       (out / "crb_vs_mse.md", doc)):
        write_text(path, text)
    figure(out / "crb_vs_mse.png", strata_all, args.eval_snr,
           f"n_train={args.n_train}, epochs={results['crb-net']['epochs_run']}, train SNR {args.train_snr}")
    print("\n" + doc)
    log(f"wrote {out / 'crb_vs_mse.json'}, .md and .png")
    return res


if __name__ == "__main__":
    main()
