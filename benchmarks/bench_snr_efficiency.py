"""Efficiency at SNR 30-300 of the CLI's default network, of NLLS started from it and of its twins, against the CRB.

The measurements that issue 27 asks for ("What it must show"). Setting (Zhang et al., MRM 2022; Assländer et
al., MRM 2022): the v3.2 sequence (``SKLEARN_CRB_DATA``), the tied-T1 generalized Bloch model, SVD rank 13; the
report is on m0s, R1f (= R1s) and R2f, with Rex, T2s, omega0, B1 and complex M0 as nuisance parameters of the CRB.

1. **The user's path, timed.** ``sklearn-crb simulate --sequence <v3.2> --tied-R1 --out train.h5`` with every
   other option at its default, then ``sklearn-crb train --data train.h5 --out net`` with every default, as
   subprocesses with ``OMP_NUM_THREADS`` (and numba's threads) from ``--threads``. Their wall times are the
   issue's budget (simulate + train at most 15 min on 2 cores).
2. **Twins on the same set**: ``train --no-noise-input`` (the unconditioned network) and
   ``train --loss bias_reduced`` (its options at the CLI's defaults), timed too.
   The set and the models are cached in ``<out>/cache/snr_efficiency/`` under a key of the parsed CLI options
   (defaults included), the package version and the sequence file's SHA-256, so a rerun only evaluates (after a
   change to the training code under the same version, give another ``--out`` or remove that cache);
   ``--n-samples`` and ``--epochs`` (default: the CLI's; ``--twin-epochs``: the twins' only) give a smaller
   budget under another key.
3. **Evaluation.** ``--n-theta`` prior draws of the set's own simulator (its sequence, basis, prior and tied
   model; seeded from ``--seed``, apart from the training seeds) x ``--n-draws`` noise draws at each SNR of
   ``--snr`` (``|M0| = SNR * sigma``, uniform phase, complex noise of std sigma per real component). A
   parameter's draw is *informative* where its CRB < 0.1 x its prior variance. Per SNR and parameter, over the
   informative draws: their number, nMSE (mean over draws of the CRB-normalised MSE), median |bias|/sqrt(CRB)
   and median std/sqrt(CRB) (std over the noise draws, ddof 1), for the noise-aware default network given the
   exact sigma; NLLS started from it (``NLLSFitter(init=net)`` as ``sklearn-crb fit --nlls --nlls-init``
   builds it, with its converged schedule and ``--fast``'s); the unconditioned network; the bias-reduced
   network; and the constant prior mean. NLLS runs on the largest subset of draws that its time budget
   ``--nlls-budget`` allows (the rate is measured first); the networks are also scored on that subset.
   A table gives the issue's pass/fail per cell.
4. **sigma-error robustness**: the default network given 0.8 x and 1.2 x the true sigma, and with sigma
   estimated by ``fit_maps(net, image, sigma=None)`` on each SNR's draws laid out as an image (the
   estimated/true ratio is reported).
5. **Bias-reduced comparison**: the issue's goal (the bias-reduced network halves the CRB network's median
   |bias|/sqrt(CRB) wherever that is above 0.2, with median std/sqrt(CRB) at most 1.2), per SNR and parameter.

Outputs under ``--out`` (default ``benchmarks/results/``): ``snr_efficiency.json``.

Usage::

    python benchmarks/bench_snr_efficiency.py --threads 2 --out /tmp/bench27
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _harness import eval_draws, parser, start, table, v32_path

from sklearn_crb._atomic import atomic_path

EST = ("m0s", "R1f", "R2f")
#: The issue's targets on informative draws.
NMSE_MAX, NMSE_STRETCH, BIAS_MAX, STD_RANGE = 1.3, 1.1, 0.3, (0.7, 1.2)
#: The bias-reduced goal: halve the CRB network's median |bias|/sqrt(CRB) where it exceeds BR_APPLIES.
BR_APPLIES, BR_STD_MAX = 0.2, 1.2
#: ``sklearn-crb fit --nlls --nlls-init DIR --fast``'s schedule (``cli/fit.py``, ``_nlls_schedule``).
FAST = {"lambda0": 1e-3, "se_tol": 0.7, "final_step": True}
#: The trained networks: name -> ``train`` options beyond ``--data``/``--out``.
NETS = {"net": [], "net-unconditioned": ["--no-noise-input"], "net-bias-reduced": ["--loss", "bias_reduced"]}
#: CLI options that do not change what is written (left out of the cache keys).
NOT_KEYED = {"func", "out", "data", "quiet", "overwrite", "command"}
SIGMA_FACTORS = (0.8, 1.2)


def parse_args(argv=None):
    p = parser(__doc__, seed=0)
    p.add_argument("--n-samples", type=int, default=None,
                   help="simulate --n-samples (default: not given, the CLI's default)")
    p.add_argument("--epochs", type=int, default=None, help="train --epochs (default: not given, the CLI's default)")
    p.add_argument("--twin-epochs", type=int, default=None,
                   help="train --epochs of the unconditioned and bias-reduced twins only (default: --epochs)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="train --pretrain-epochs of the bias-reduced twin: CRB-loss epochs before the bias-reduced "
                        "fine-tuning, within its --epochs (default: not given, the CLI's default)")
    p.add_argument("--snr", type=float, nargs="+", default=(30.0, 100.0, 300.0), help="evaluation SNRs")
    p.add_argument("--n-theta", type=int, default=150, help="held-out prior draws (default 150)")
    p.add_argument("--n-draws", type=int, default=40, help="noise draws per draw and SNR (default 40)")
    p.add_argument("--nlls-budget", type=float, default=900.0, metavar="SECONDS",
                   help="NLLS seconds for both schedules together (default 900): the subset is the largest that fits")
    p.add_argument("--no-fast", action="store_true", help="skip NLLS with --fast's schedule")
    a = p.parse_args(argv)
    a.simulate_extra = []
    if a.quick:
        a.n_samples, a.epochs, a.n_theta, a.n_draws, a.nlls_budget = 1000, 3, 10, 5, 4.0
        a.simulate_extra = ["--n-basis-samples", "200"]  # a smoke run: the default basis takes 1000 Jacobians
    for name in ("n_theta", "n_draws"):
        if getattr(a, name) < (2 if name == "n_draws" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'n_draws' else 1}")
    if a.nlls_budget < 0:
        p.error(f"--nlls-budget must be >= 0 seconds, got {a.nlls_budget}")
    return a


# ------------------------------------------------------------ the user's path, cached
def _key(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cli_key(command, argv):
    """The parsed options of ``sklearn-crb <command> argv`` (defaults included), as a dict for the cache key."""
    from sklearn_crb import __version__
    from sklearn_crb.cli import build_parser

    parsed = vars(build_parser().parse_args([command, *argv, "--out", "x"]))
    return {**{k: v for k, v in parsed.items() if k not in NOT_KEYED}, "sklearn_crb": __version__}


def run_cli(argv, threads, log):
    """Run ``sklearn-crb argv`` as a user does, in a subprocess; its wall seconds."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["NUMBA_NUM_THREADS"] = str(min(threads, os.cpu_count() or threads))
    cmd = [sys.executable, "-m", "sklearn_crb.cli", *argv, "--quiet"]
    log("$ sklearn-crb " + " ".join(argv))
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sec = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"sklearn-crb {argv[0]} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    log(f"  {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'done'} ({sec:.0f} s)")
    return sec


def cached_cli(path, argv, record, threads, log):
    """``path`` made by ``sklearn-crb argv`` unless its record (``<path>.json``) says it already was; the record."""
    rec_path = Path(f"{path}.json")
    if rec_path.is_file() and Path(path).exists():
        done = json.loads(rec_path.read_text())
        log(f"cached: {path} ({done['seconds']:.0f} s when made)")
        return {**done, "cached": True}
    # a set or model folder without its record was interrupted before the record: the CLI replaces what it wrote
    argv = [*argv, "--overwrite"] if Path(path).exists() else argv
    sec = run_cli(argv, threads, log)
    done = {**record, "seconds": sec, "threads": threads or os.environ.get("OMP_NUM_THREADS", "default"),
            "command": "sklearn-crb " + " ".join(argv)}
    with atomic_path(rec_path) as tmp:
        Path(tmp).write_text(json.dumps(done, indent=1, default=str) + "\n")
    return {**done, "cached": False}


def user_path(args, run):
    """Simulate the set and train the three networks (cached); ``(set path, {name: model folder}, timings)``."""
    seq_file = v32_path()
    if not seq_file.is_file():
        raise SystemExit(f"{seq_file.name} not found in SKLEARN_CRB_DATA={seq_file.parent}: this benchmark is "
                         "defined on v3.2")
    sim_argv = ["--sequence", str(seq_file), "--tied-R1", *args.simulate_extra]
    if args.n_samples is not None:
        sim_argv += ["--n-samples", str(args.n_samples)]
    sim_opts = cli_key("simulate", sim_argv)
    sim_opts["sequence"] = hashlib.sha256(seq_file.read_bytes()).hexdigest()  # the file's content, not its path
    folder = Path(args.out) / "cache" / "snr_efficiency" / f"set-{_key(sim_opts)}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.h5"
    timings = {"simulate": cached_cli(data, ["simulate", *sim_argv, "--out", str(data)], {"options": sim_opts},
                                      args.threads, run.log)}
    models = {}
    for name, extra in NETS.items():
        epochs = args.epochs if name == "net" or args.twin_epochs is None else args.twin_epochs
        train_argv = [*extra] + (["--epochs", str(epochs)] if epochs is not None else [])
        if name == "net-bias-reduced" and args.pretrain_epochs is not None:
            train_argv += ["--pretrain-epochs", str(args.pretrain_epochs)]
        opts = cli_key("train", ["--data", str(data), *train_argv])
        models[name] = folder / f"{name}-{_key(opts)}"
        timings[name] = cached_cli(models[name], ["train", "--data", str(data), "--out", str(models[name]),
                                                  *train_argv], {"options": opts}, args.threads, run.log)
    return data, models, timings


# ---------------------------------------------------------------- evaluation set
def evaluation(data, args, run):
    """The set's simulator, the prior's moments and the noisy evaluation rows (y and CRB of EST only)."""
    from sklearn_crb.io.datasets import open_dataset, simulator_from_dataset
    from sklearn_crb.metrics import prior_moments

    _, static = open_dataset(data, argname="--data")
    sim = simulator_from_dataset(static)
    cols = [list(sim.estimate_).index(p) for p in EST]
    p_mean, p_var = prior_moments(sim.prior_, EST, random_state=args.seed + 7)
    theta = sim.prior_.sample(args.n_theta, args.seed + 1000)  # training draws used seeds [seed, chunk]
    t = time.perf_counter()
    _, y, _, det = sim.make_dataset(args.n_theta, [args.seed, 1000], theta=theta, return_details=True)
    ev = {"X_clean": det["X_clean"], "y": y[:, cols], "crb_unit": det["crb_unit"][:, cols]}
    run.log(f"evaluation: {args.n_theta} draws' Jacobians in {time.perf_counter() - t:.1f} s")
    rows = eval_draws(ev, args.snr, args.n_draws, float(sim.sigma), args.seed + 2000)
    rows["informative"] = rows["crb"] < 0.1 * p_var
    return sim, p_mean, p_var, rows


# ------------------------------------------------------------------ estimators
def noise_aware(net):
    return bool(getattr(net, "noise_input_", False))


def net_predict(net, X, sigma):
    """The network's EST columns for features ``X`` told the noise level ``sigma`` (n,) when it takes one."""
    cols = [list(net.target_names_).index(p) for p in EST]
    if noise_aware(net):
        X = np.hstack([X, np.reshape(sigma, (-1, 1))])
    return np.asarray(net.predict(X), dtype=float)[:, cols]


def nlls_predict(fitter, X, sigma):
    """NLLS estimates (EST); a noise-aware start network is told ``sigma`` (as ``fit_maps`` does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged voxels warn; they are scored as they are
        details = fitter.predict_details(X, sigma=sigma, compute_crb=False)
    return np.asarray(details.prediction, dtype=float)


def nlls_fitters(sim, net, args):
    from sklearn_crb import NLLSFitter

    schedules = {"nlls-from-net": {}} if args.no_fast else {"nlls-from-net": {}, "nlls-from-net-fast": FAST}
    return {name: NLLSFitter(sim.sequence_, basis=sim.basis_, estimate=EST, tied_R1=True, init=net, device="cpu",
                             **kw).fit() for name, kw in schedules.items()}


def nlls_subset(rows, args):
    """Per SNR, the draws that are informative for some parameter, in order: NLLS fits their first ones."""
    order = {}
    for s in args.snr:
        at = rows["snr"] == s
        inf = np.zeros(args.n_theta, bool)
        inf[rows["theta_index"][at]] = rows["informative"][at].any(axis=1)
        order[s] = np.flatnonzero(inf)
    return order


def rows_of(rows, order, k):
    """Rows of the first ``k`` draws of ``order[snr]`` at every SNR."""
    keep = np.zeros(rows["y"].shape[0], bool)
    for s, th in order.items():
        keep |= (rows["snr"] == s) & np.isin(rows["theta_index"], th[:k])
    return keep


def run_nlls(fitters, rows, sigma, args, run):
    """Both schedules on the largest subset the budget allows (rate measured on the first draw of each SNR)."""
    order = nlls_subset(rows, args)
    n_max = max((len(v) for v in order.values()), default=0)
    preds = {name: np.full_like(rows["y"], np.nan) for name in fitters}
    timing = {}
    if n_max == 0:
        return preds, np.zeros(rows["y"].shape[0], bool), {"k": 0}
    pilot = rows_of(rows, order, 1)
    per_draw = 0.0
    for name, f in fitters.items():
        nlls_predict(f, rows["X"][pilot][:2], sigma[pilot][:2])  # first-call set-up is not the rate
        t = time.perf_counter()
        preds[name][pilot] = nlls_predict(f, rows["X"][pilot], sigma[pilot])
        sec = time.perf_counter() - t
        timing[name] = {"pilot_voxels": int(pilot.sum()), "pilot_seconds": sec,
                        "voxels_per_second": pilot.sum() / sec}
        per_draw += sec  # seconds per draw (at every SNR) of all schedules together
    k = int(np.clip(args.nlls_budget // max(per_draw, 1e-9), 1, n_max))
    keep = rows_of(rows, order, k)
    rest = keep & ~pilot
    for name, f in fitters.items():
        t = time.perf_counter()
        if rest.any():
            preds[name][rest] = nlls_predict(f, rows["X"][rest], sigma[rest])
        sec = time.perf_counter() - t
        timing[name].update(voxels=int(keep.sum()), seconds=timing[name]["pilot_seconds"] + sec)
        run.log(f"{name}: {keep.sum()} voxels ({k} draws per SNR) in {timing[name]['seconds']:.0f} s")
    return preds, keep, {"k": k, "of": {f"{s:g}": len(v) for s, v in order.items()}, **timing}


def sigma_from_image(net, rows, s, args):
    """fit_maps with sigma=None on SNR ``s``'s draws as an image (n_theta, n_draws, 1): estimates, sigma used."""
    from sklearn_crb import fit_maps

    at = rows["snr"] == s
    X = rows["X"][at]
    r = X.shape[1] // 2
    img = (X[:, :r] + 1j * X[:, r:]).reshape(args.n_theta, args.n_draws, 1, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = fit_maps(net, img, np.ones(img.shape[:3], bool), sigma=None, compute_se=False)
    pred = np.full((at.sum(), len(EST)), np.nan)
    for j, p in enumerate(EST):
        pred[:, j] = np.asarray(maps.arrays[p], dtype=float).reshape(-1)
    return pred, float(maps.sigma), str(maps.sigma_method)


# --------------------------------------------------------------------- scoring
def score(rows, pred, keep, p_var, snrs, n_draws):
    """``{snr: {parameter: record}}`` over the informative draws among the rows ``keep``; a 1-D ``pred`` is a
    constant (the prior mean: its std is 0). Draws with a non-finite estimate are left out and counted."""
    from sklearn_crb.metrics import bias_variance_report

    out = {}
    for s in snrs:
        sel = keep & (rows["snr"] == s)
        n = sel.sum() // n_draws
        y = rows["y"][sel].reshape(n, n_draws, -1)[:, 0]
        crb = rows["crb"][sel].reshape(n, n_draws, -1)[:, 0]
        est = np.broadcast_to(pred, (n, n_draws, len(EST))) if np.ndim(pred) == 1 else \
            pred[sel].reshape(n, n_draws, -1)
        finite = np.all(np.isfinite(est), axis=(1, 2))
        cell = {}
        if finite.any():
            if np.ndim(pred) == 1:  # the prior mean: bias only (the report's std needs a spread)
                strata = _constant_strata(y[finite], pred, crb[finite], p_var)
            else:
                strata = bias_variance_report(y[finite], est[finite], crb=crb[finite], names=EST,
                                              prior_variance=p_var).strata
            cell = {r["parameter"]: r for r in strata if r["snr"] == "all" and r["identifiability"] == "informative"}
        for j, p in enumerate(EST):
            rec = dict(cell.get(p, {"n_theta": 0, "normalized_mse": None}))
            rec["n_dropped_non_finite"] = int((~finite & (crb[:, j] < 0.1 * p_var[j])).sum())
            out.setdefault(f"{s:g}", {})[p] = rec
    return out


def _constant_strata(y, const, crb, p_var):
    from sklearn_crb.metrics import constant_predictor_report

    return constant_predictor_report(y, const, crb=crb, names=EST, prior_variance=p_var).strata


def _cell(r):
    if not r or not r.get("n_theta") or r.get("normalized_mse") is None:
        return "— (n=0)"
    dropped = f", {r['n_dropped_non_finite']} non-finite left out" if r.get("n_dropped_non_finite") else ""
    return (f"{r['normalized_mse']:.3g} / {r['median_abs_bias_over_sqrt_crb']:.2f} / "
            f"{r['median_std_over_sqrt_crb']:.2f} (n={r['n_theta']}{dropped})")


CELL_NOTE = ("Cells: nMSE / median |bias|/√CRB / median std/√CRB (n = informative draws, CRB < 0.1 × prior "
             "variance; std over the noise draws, ddof 1). The prior mean's std is 0 by construction.")


def score_table(title, scores, snrs, notes=""):
    rows = [[f"{s:g}", name, *(_cell(sc[f"{s:g}"][p]) for p in EST)] for s in snrs for name, sc in scores.items()]
    return table(title, ["SNR", "estimator", *EST], rows, (CELL_NOTE + " " + notes).strip())


def verdict_table(scores, scores_sub, snrs, nets):
    """The issue's pass/fail per SNR and parameter for each network."""
    rows = []
    for name in nets:
        for s in [f"{v:g}" for v in snrs]:
            for p in EST:
                r = scores[name][s][p]
                if not r.get("n_theta") or r.get("normalized_mse") is None:
                    rows.append([s, p, name, 0, "—", "—", "—", "—", "—", "no informative draw", "—"])
                    continue
                nlls = scores_sub.get("nlls-from-net", {}).get(s, {}).get(p, {}).get("normalized_mse")
                nmse, where = r["normalized_mse"], "all"
                if nlls is not None and nlls > NMSE_MAX:  # judged against NLLS on the same draws
                    nmse, limit, where = scores_sub[name][s][p]["normalized_mse"], nlls, "NLLS subset"
                else:
                    limit = NMSE_MAX
                b, sd = r["median_abs_bias_over_sqrt_crb"], r["median_std_over_sqrt_crb"]
                ok = [nmse <= limit, b <= BIAS_MAX, STD_RANGE[0] <= sd <= STD_RANGE[1]]
                rows.append([s, p, name, r["n_theta"], round(nmse, 4), f"≤ {limit:.3g} ({where})",
                             *("pass" if o else "FAIL" for o in ok), "pass" if all(ok) else "FAIL",
                             "pass" if r["normalized_mse"] <= NMSE_STRETCH else "no"])
    return table("The issue's targets per SNR and parameter (informative draws)",
                 ["SNR", "parameter", "estimator", "n", "nMSE", "nMSE limit", "nMSE ≤ limit", "|bias|/√CRB ≤ 0.3",
                  "std/√CRB in [0.7, 1.2]", "all", "stretch nMSE ≤ 1.1"], rows,
                 "nMSE ≤ 1.3 on all draws, or, where NLLS from the network is above 1.3 on its subset, the network's "
                 "nMSE on that subset no worse than NLLS's there.")


def bias_reduced_table(scores, snrs):
    rows = []
    for s in [f"{v:g}" for v in snrs]:
        for p in EST:
            c, b = scores["net"][s][p], scores["net-bias-reduced"][s][p]
            if not c.get("n_theta") or c.get("normalized_mse") is None or b.get("normalized_mse") is None:
                rows.append([s, p, 0, "—", "—", "—", "—", "no informative draw"])
                continue
            cb, bb, bs = (c["median_abs_bias_over_sqrt_crb"], b["median_abs_bias_over_sqrt_crb"],
                          b["median_std_over_sqrt_crb"])
            if cb <= BR_APPLIES:
                met = "n/a (CRB net ≤ 0.2)"
            else:
                met = "met" if bb <= 0.5 * cb and bs <= BR_STD_MAX else "not met"
            rows.append([s, p, c["n_theta"], round(cb, 4), round(bb, 4), round(bb / cb, 3) if cb else "inf",
                         round(bs, 4), met])
    return table("Bias-reduced against the CRB network (default, noise-aware), informative draws",
                 ["SNR", "parameter", "n", "CRB net |bias|/√CRB", "bias-reduced |bias|/√CRB", "ratio",
                  "bias-reduced std/√CRB", "goal"], rows,
                 "Goal: where the CRB net's median |bias|/√CRB > 0.2, the bias-reduced net's at most half of it with "
                 "median std/√CRB ≤ 1.2.")


def _shown(command, cache):
    """``command`` with the cache folder and the data folder as short placeholders."""
    return command.replace(str(cache), "<cache>").replace(str(v32_path().parent), "$SKLEARN_CRB_DATA")


def timing_table(timings, nlls_timing, threads, cache):
    rows = [[name, _shown(t["command"], cache), round(t["seconds"], 1), t.get("threads") or "inherited",
             "cached" if t["cached"] else "this run"] for name, t in timings.items()]
    total = timings["simulate"]["seconds"] + timings["net"]["seconds"]
    rows.append(["simulate + train (default)", "issue: ≤ 900 s on 2 cores", round(total, 1),
                 timings["net"].get("threads") or "inherited", "pass" if total <= 900 else "FAIL"])
    for name, t in nlls_timing.items():
        if isinstance(t, dict) and "seconds" in t:
            rows.append([name, f"{t['voxels']} voxels", round(t["seconds"], 1), threads or "inherited",
                         f"{t['voxels'] / t['seconds']:.3g} voxels/s"])
    return table("Wall times", ["step", "command", "seconds", "threads", "note"], rows,
                 "OMP_NUM_THREADS (and numba's threads) of the CLI subprocesses from --threads.")


# ------------------------------------------------------------------------ main
def predictions(nets, sim, rows, args, run):
    """Every estimator's EST estimates on the rows (NLLS: NaN off its subset), the subset and the sigma data."""
    sigma = np.full(rows["y"].shape[0], float(sim.sigma))
    preds = {}
    for name, net in nets.items():
        t = time.perf_counter()
        preds[name] = net_predict(net, rows["X"], sigma)
        run.log(f"{name}: {rows['X'].shape[0]} predictions in {time.perf_counter() - t:.1f} s "
                f"({'noise-aware' if noise_aware(net) else 'unconditioned'})")
    for f in SIGMA_FACTORS:
        preds[f"net, σ × {f:g}"] = net_predict(nets["net"], rows["X"], f * sigma)
    est = np.full_like(rows["y"], np.nan)
    sig = {}
    for s in args.snr:
        p, sig_hat, method = sigma_from_image(nets["net"], rows, s, args)
        est[rows["snr"] == s] = p
        sig[f"{s:g}"] = {"sigma_estimated": sig_hat, "ratio_to_true": sig_hat / float(sim.sigma), "method": method}
        run.log(f"SNR {s:g}: fit_maps estimated sigma {sig_hat:.4g} ({sig_hat / sim.sigma:.3f} x true, {method})")
    preds["net, σ estimated"] = est
    nlls_preds, keep, nlls_timing = run_nlls(nlls_fitters(sim, nets["net"], args), rows, sigma, args, run)
    preds.update(nlls_preds)
    return preds, keep, sig, nlls_timing


def main(argv=None):
    args = parse_args(argv)
    run = start("snr_efficiency", "Efficiency at SNR 30-300 of the CLI default network, NLLS from it, its "
                "unconditioned and bias-reduced twins and the prior mean", args, argv)
    from sklearn_crb import load_model

    data, models, timings = user_path(args, run)
    sim, p_mean, p_var, rows = evaluation(data, args, run)
    nets = {name: load_model(folder, device="cpu") for name, folder in models.items()}
    preds, keep, sig, nlls_timing = predictions(nets, sim, rows, args, run)
    everything = np.ones(rows["y"].shape[0], bool)
    main_names = ["net", "nlls-from-net", "nlls-from-net-fast", "net-unconditioned", "net-bias-reduced"]
    scores = {n: score(rows, preds[n], keep if n.startswith("nlls") else everything, p_var, args.snr, args.n_draws)
              for n in main_names if n in preds}
    scores["prior-mean"] = score(rows, p_mean, everything, p_var, args.snr, args.n_draws)
    scores_sub = {n: score(rows, preds[n], keep, p_var, args.snr, args.n_draws) for n in main_names if n in preds}
    scores_sub["prior-mean"] = score(rows, p_mean, keep, p_var, args.snr, args.n_draws)
    robust = {n: score(rows, preds[n], everything, p_var, args.snr, args.n_draws)
              for n in ["net", *(f"net, σ × {f:g}" for f in SIGMA_FACTORS), "net, σ estimated"]}
    k = nlls_timing["k"]
    nlls_note = (f"NLLS rows: the first {k} draws per SNR that are informative for some parameter (of "
                 f"{nlls_timing.get('of')}), all {args.n_draws} noise draws each; the other rows: every draw.")
    sig_txt = ", ".join(f"SNR {s}: {v['ratio_to_true']:.3f}" for s, v in sig.items())
    tables = [
        score_table(f"{args.n_theta} prior draws × {args.n_draws} noise draws", {n: scores[n] for n in scores},
                    args.snr, nlls_note),
        score_table("The NLLS subset: every estimator on the same draws", scores_sub, args.snr, nlls_note),
        verdict_table(scores, scores_sub, args.snr, ["net", "net-unconditioned", "net-bias-reduced"]),
        score_table("σ-error robustness of the default network", robust, args.snr,
                    f"σ estimated: fit_maps(net, image, sigma=None) on each SNR's {args.n_theta} × {args.n_draws} "
                    f"draws as an image; estimated/true σ: {sig_txt} (method {next(iter(sig.values()))['method']})."
                    + ("" if noise_aware(nets["net"]) else " The default network takes no σ: rows are identical.")),
        bias_reduced_table(scores, args.snr),
        timing_table(timings, nlls_timing, args.threads, Path(data).parent),
    ]
    data_out = {"config": {k: v for k, v in vars(args).items()}, "reported": EST, "sigma": float(sim.sigma),
                "training_snr": list(sim.snr) if hasattr(sim, "snr") else None, "prior_mean": p_mean,
                "prior_variance": p_var, "noise_input": {n: noise_aware(net) for n, net in nets.items()},
                "models": {n: str(f) for n, f in models.items()}, "dataset": str(data), "cli": timings,
                "nlls": nlls_timing, "sigma_estimated": sig, "scores": scores, "scores_nlls_subset": scores_sub,
                "sigma_robustness": robust}
    return run.write(tables, data_out)


if __name__ == "__main__":
    main()
