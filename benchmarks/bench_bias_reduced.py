"""Bias-reduced network vs CRB network on a (m0s, T1) grid (Mao, Flassbeck, Assländer, arXiv 2312.11468).

Setting: the v3.2 sequence (``SKLEARN_CRB_DATA``, default ``../shared/data``), SVD rank 13 (learnt from the
brain prior), the tied-T1 generalized Bloch model, estimating m0s, R1f (= R1s = 1/T1) and R2f; Rex, T2s,
omega0, B1 and complex M0 are nuisance parameters.

Estimators (same training data, same architecture, same seed, same ``max_epochs``):

* ``crb-net``: ``CRBNetRegressor(simulator=sim)``, the package's default recipe, trained as ``fit_simulated``
  does (noise-free features and unit CRBs, fresh M0 and noise per batch);
* ``bias-reduced-net``: the same with ``loss="bias_reduced"``: ``--pretrain-epochs`` CRB-loss epochs, then
  bias-reduced epochs with ``--n-realizations`` noise realisations per fingerprint (paper: 200).

Evaluation: every point of the grid ``--m0s`` x ``--T1`` (the other parameters fixed at ``--fixed``), at each
SNR of ``--snr`` with ``--n-draws`` noise draws (``|M0| = SNR * sigma``, uniform phase). Per point, SNR and
parameter: bias/sqrt(CRB) and std/sqrt(CRB) (std with ddof 1) of the estimates, and the CRB-normalised MSE.
The summary is over the *informative* points (CRB < 0.1 x prior variance of that parameter): the median of
|bias|/sqrt(CRB) and of std/sqrt(CRB), per parameter, per SNR and pooled. Targets of the issue: the
bias-reduced net's median |bias|/sqrt(CRB) at most half the CRB net's, and its median std/sqrt(CRB) at most 1.3.

Outputs under ``--out`` (default ``benchmarks/results/``, ignored by git): ``bias_reduced.json``,
``bias_reduced.png`` (grid maps of |bias|/sqrt(CRB) and std/sqrt(CRB)) and the printed table. Training sets
are cached in ``benchmarks/results/cache/`` with the naming of ``bench_crb_vs_mse.py`` (shared caches).

Usage::

    python benchmarks/bench_bias_reduced.py --quick
    python benchmarks/bench_bias_reduced.py --n-train 12000 --epochs 100 --pretrain-epochs 70
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from _results import save_figure, write_json

ROOT = Path(__file__).resolve().parents[1]
SEQ_NAME = "control_MT_v3p2_TR3p5ms_discretized.mat"
EST = ("m0s", "R1f", "R2f")
#: Fixed parameters of the grid: white-matter-like (Mao et al.'s typical WM T2f 77.6 ms, T2s 12.4 us; the
#: tied model's in-vivo exchange rate near 25-30 1/s), on resonance, nominal B1.
FIXED = {"R2f": 1 / 77.6e-3, "Rex": 25.0, "T2s": 12.4e-6, "omega0": 0.0, "B1": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=12000, help="training parameter draws (default 12000)")
    p.add_argument("--epochs", type=int, default=100, help="max_epochs of both nets (default 100)")
    p.add_argument("--pretrain-epochs", type=int, default=70, help="CRB-loss epochs of the bias-reduced net")
    p.add_argument("--n-realizations", type=int, default=16, help="noise realisations per fingerprint (paper 200)")
    p.add_argument("--bias-lambda", type=float, default=1.0)
    p.add_argument("--var-delta", type=float, default=1.0)
    p.add_argument("--train-snr", type=float, nargs=2, default=(10.0, 100.0), help="training |M0|/sigma range")
    p.add_argument("--snr", type=float, nargs="+", default=(50.0, 100.0), help="evaluation SNRs")
    p.add_argument("--n-draws", type=int, default=200, help="noise draws per grid point and SNR")
    p.add_argument("--m0s", type=float, nargs="+", default=(0.025, 0.05, 0.1, 0.15, 0.2, 0.25))
    p.add_argument("--T1", type=float, nargs="+", default=(0.7, 0.9, 1.1, 1.4, 1.7, 2.0), help="T1 grid in s")
    p.add_argument("--fixed", type=json.loads, default=None, help=f"JSON overrides of the fixed parameters {FIXED}")
    p.add_argument("--prior", default="brain")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.environ.get("SKLEARN_CRB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: 2000 draws, 6 epochs (3 pre-training), "
                                                        "4 realisations, 30 noise draws")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.epochs, a.pretrain_epochs, a.n_realizations, a.n_draws = 2000, 6, 3, 4, 30
    a.fixed = {**FIXED, **(a.fixed or {})}
    return a


def grid_theta(args):
    """``theta`` (n, 8) of the grid, m0s fastest, and the (m0s, T1) of each point."""
    import numpy as np

    from sklearn_crb.physics.parameters import INDEX, PARAMETERS

    mm, tt = np.meshgrid(args.m0s, args.T1, indexing="xy")  # (n_T1, n_m0s)
    th = np.zeros((mm.size, len(PARAMETERS)))
    for k, v in args.fixed.items():
        th[:, INDEX[k]] = v
    th[:, INDEX["m0s"]] = mm.ravel()
    th[:, INDEX["R1f"]] = th[:, INDEX["R1s"]] = 1.0 / tt.ravel()
    return th, mm.ravel(), tt.ravel()


def train(sim, data, loss, args, log):
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    kw = dict(simulator=sim, loss=loss, random_state=args.seed, max_epochs=args.epochs, augment=True,
              n_threads=args.threads)
    if loss == "bias_reduced":
        kw.update(pretrain_epochs=args.pretrain_epochs, n_realizations=args.n_realizations,
                  bias_lambda=args.bias_lambda, var_delta=args.var_delta)
    if args.device is not None:
        kw["device"] = args.device
    net = CRBNetRegressor(**kw)
    t = time.perf_counter()
    net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
    sec = time.perf_counter() - t
    loss_hist = [float(v) for v in net.history[:, "train_loss"]]
    log(f"{loss}-net: {len(net.history)} epochs in {sec:.0f} s (train loss first {loss_hist[0]:.3g}, "
        f"last {loss_hist[-1]:.3g})")
    return net, {"train_seconds": sec, "epochs_run": len(net.history), "train_loss": loss_hist,
                 "params": {k: repr(v) for k, v in net.get_params(deep=False).items()
                            if k not in ("simulator", "callbacks")}}


def grid_stats(rows, pred, n_points, snrs, n_draws):
    """Per (SNR, point, parameter): bias/sqrt(CRB), std/sqrt(CRB), nMSE; arrays (n_snr, n_points, P)."""
    import numpy as np

    P = pred.shape[1]
    shape = (len(snrs), n_points, n_draws, P)
    order = np.lexsort((rows["draw_index"], rows["theta_index"], rows["group"] // n_points))
    est, y, crb = (a[order].reshape(shape) for a in (pred, rows["y"], rows["crb"]))
    sd = np.sqrt(crb[:, :, 0])
    bias = (est.mean(2) - y[:, :, 0]) / sd
    std = est.std(2, ddof=1) / sd
    nmse = ((est - y) ** 2 / crb).mean(2)
    return {"bias_over_sqrt_crb": bias, "std_over_sqrt_crb": std, "normalized_mse": nmse, "crb": crb[:, :, 0]}


def summarise(stats, informative, snrs):
    import numpy as np

    out = []
    for si, s in enumerate(list(snrs) + ["pooled"]):
        sel = (slice(None) if s == "pooled" else si)
        for j, p in enumerate(EST):
            m = informative[sel, :, j] if s != "pooled" else informative[:, :, j]
            b = np.abs(stats["bias_over_sqrt_crb"][sel, :, j])[m]
            sd = stats["std_over_sqrt_crb"][sel, :, j][m]
            nm = stats["normalized_mse"][sel, :, j][m]
            out.append({"snr": s if s == "pooled" else f"{s:g}", "parameter": p, "n_points": int(m.sum()),
                        "median_abs_bias_over_sqrt_crb": float(np.median(b)) if b.size else None,
                        "median_std_over_sqrt_crb": float(np.median(sd)) if sd.size else None,
                        "median_normalized_mse": float(np.median(nm)) if nm.size else None})
    return out


def table(summary, snrs):
    head = f"{'SNR':>7} {'estimator':<17} " + " ".join(f"{p + ' |b|/√CRB':>14} {p + ' std/√CRB':>14}" for p in EST)
    lines = [head, "-" * len(head)]
    for s in [f"{v:g}" for v in snrs] + ["pooled"]:
        for name, rows in summary.items():
            rec = {r["parameter"]: r for r in rows if r["snr"] == s}
            cells = []
            for p in EST:
                r = rec[p]
                f = (lambda v: "—" if v is None else f"{v:.3f}")  # noqa: E731
                b = f(r["median_abs_bias_over_sqrt_crb"]) + f" (n={r['n_points']})"
                cells.append(f"{b:>14} {f(r['median_std_over_sqrt_crb']):>14}")
            lines.append(f"{s:>7} {name:<17} " + " ".join(cells))
    return "\n".join(lines)


def figure(path, stats_by_est, informative, args):
    import matplotlib  # optional dependency of the benchmark's figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shape = (len(args.T1), len(args.m0s))
    panels = [(n, k) for n in stats_by_est for k in ("bias_over_sqrt_crb", "std_over_sqrt_crb")]
    ncol = len(args.snr) * len(EST)
    fig, axes = plt.subplots(len(panels), ncol, figsize=(2.6 * ncol, 2.3 * len(panels)), constrained_layout=True,
                             squeeze=False)
    for i, (name, key) in enumerate(panels):
        for si, s in enumerate(args.snr):
            for j, p in enumerate(EST):
                ax = axes[i, si * len(EST) + j]
                v = stats_by_est[name][key][si, :, j].copy()
                v = np.abs(v) if key.startswith("bias") else v
                v[~informative[si, :, j]] = np.nan  # only informative points are judged
                im = ax.imshow(v.reshape(shape), origin="lower", aspect="auto", vmin=0,
                               vmax=1.0 if key.startswith("bias") else 2.0, cmap="viridis",
                               extent=(-0.5, shape[1] - 0.5, -0.5, shape[0] - 0.5))
                ax.set_xticks(range(shape[1]), [f"{m:g}" for m in args.m0s], fontsize=6)
                ax.set_yticks(range(shape[0]), [f"{t:g}" for t in args.T1], fontsize=6)
                ax.set_title(f"{name}\n{p} {'|bias|' if key.startswith('bias') else 'std'}/√CRB, SNR {s:g}",
                             fontsize=7)
                if i == len(panels) - 1:
                    ax.set_xlabel("m0s", fontsize=7)
                if j == 0 and si == 0:
                    ax.set_ylabel("T1 (s)", fontsize=7)
                fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("blank: non-informative (CRB >= 0.1 x prior variance)", fontsize=8)
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_crb_vs_mse import _save_npz, cached_dataset, eval_draws, run_setup  # the shared cache and draws

    from sklearn_crb.metrics import prior_moments
    from sklearn_crb.simulator import MTFingerprintSimulator

    out, cache, log, info, seq, t0 = run_setup(args)
    tag = f"{seq.sha256()[:10]}_r13_{args.prior}_tied"
    fb = cache / f"basis_{tag}_seed{args.seed}.npz"
    if fb.is_file():
        basis = np.load(fb)["basis"]
    else:
        basis = MTFingerprintSimulator(seq, n_components=13, tied_R1=True, prior=args.prior,
                                       random_state=args.seed).fit().basis_
        _save_npz(fb, basis=basis)
    sim = MTFingerprintSimulator(seq, basis=basis, estimate=EST, snr=tuple(args.train_snr), tied_R1=True,
                                 prior=args.prior, random_state=args.seed).fit()
    sigma = float(sim.sigma)
    _, p_var = prior_moments(sim.prior_, EST, random_state=args.seed + 7)
    data = cached_dataset(sim, args.n_train, args.seed, cache, f"train_{tag}", log)
    theta, m0s, T1 = grid_theta(args)
    _, y, _, det = sim.make_dataset(theta.shape[0], 0, theta=theta, return_details=True)
    ev = {"X_clean": det["X_clean"], "y": y, "crb_unit": det["crb_unit"]}
    rows = eval_draws(ev, args.snr, args.n_draws, sigma, args.seed + 3000)
    n_pts = theta.shape[0]
    crb_grid = np.stack([ev["crb_unit"] / s**2 for s in args.snr])  # (n_snr, n_points, P)
    informative = crb_grid < 0.1 * p_var
    log(f"grid: {n_pts} points x {len(args.snr)} SNRs x {args.n_draws} draws; informative points per SNR and "
        f"parameter: {informative.sum(1).tolist()}")

    results, stats, summary = {}, {}, {}
    for loss, name in (("crb", "crb-net"), ("bias_reduced", "bias-reduced-net")):
        net, results[name] = train(sim, data, loss, args, log)
        pred = net.predict(rows["X"])
        if not np.all(np.isfinite(pred)):
            raise SystemExit(f"{name} predicted non-finite values")
        stats[name] = grid_stats(rows, pred, n_pts, args.snr, args.n_draws)
        summary[name] = summarise(stats[name], informative, args.snr)
    checks = {}
    for s in [f"{v:g}" for v in args.snr] + ["pooled"]:
        c = {r["parameter"]: r for r in summary["crb-net"] if r["snr"] == s}
        b = {r["parameter"]: r for r in summary["bias-reduced-net"] if r["snr"] == s}
        for p in EST:
            if c[p]["n_points"] == 0:
                checks[f"{s}/{p}"] = "no informative point"
                continue
            half = b[p]["median_abs_bias_over_sqrt_crb"] <= 0.5 * c[p]["median_abs_bias_over_sqrt_crb"]
            std_ok = b[p]["median_std_over_sqrt_crb"] <= 1.3
            checks[f"{s}/{p}"] = {"bias_at_most_half": bool(half), "std_at_most_1.3": bool(std_ok)}
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()
    cmd = "python benchmarks/bench_bias_reduced.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = table(summary, args.snr)
    res = {"command": cmd, "config": vars(args), "sequence": SEQ_NAME, "rank": 13, "tied_R1": True,
           "estimate": EST, "prior_variance": p_var.tolist(), "sigma": sigma, "machine": info,
           "seconds_total": time.perf_counter() - t0, "estimators": results, "summary": summary, "checks": checks,
           "grid": {"m0s": m0s.tolist(), "T1": T1.tolist(), "fixed": args.fixed,
                    "informative": informative.tolist(),
                    **{name: {k: v.tolist() for k, v in st.items()} for name, st in stats.items()}}}
    path = out / "bias_reduced.json"
    write_json(path, res, default=str)
    figure(out / "bias_reduced.png", stats, informative, args)
    print(f"\n`{cmd}`\nmedians over informative grid points (CRB < 0.1 x prior variance), n = points\n{text}\n")
    print("checks (bias-reduced vs crb net):", json.dumps(checks))
    log(f"wrote {path} and {out / 'bias_reduced.png'}")
    return res


if __name__ == "__main__":
    main()
