"""Bias-reduced network vs CRB network on a (m0s, T1) grid (Mao, Flassbeck, Assländer, arXiv 2312.11468).

Setting: the v3.2 sequence (``SKLEARN_CRB_DATA``, default ``../shared/data``), SVD rank 13 (learnt from the
brain prior), the tied-T1 generalized Bloch model, estimating m0s, R1f (= R1s = 1/T1) and R2f; Rex, T2s,
omega0, B1 and complex M0 are nuisance parameters.

Estimators (same training data, same architecture, same seed, same ``max_epochs``):

* ``crb-net``: ``CRBNetRegressor(simulator=sim)``, the package's default recipe, trained as ``fit_simulated``
  does (noise-free features and unit CRBs, fresh M0 and noise per batch);
* ``bias-reduced-net``: the same with ``loss="bias_reduced"``: ``--pretrain-epochs`` CRB-loss epochs, then
  bias-reduced epochs with ``--n-realizations`` noise realisations per fingerprint (paper: 200).

Evaluation: every point of the grid m0s x T1 (``M0S`` x ``T1``; the other parameters fixed at ``FIXED``), at each
SNR of ``--snr`` with ``--n-draws`` noise draws (``|M0| = SNR * sigma``, uniform phase). Per point, SNR and
parameter: bias/sqrt(CRB) and std/sqrt(CRB) (std with ddof 1) of the estimates, and the CRB-normalised MSE.
The summary is over the *informative* points (CRB < 0.1 x prior variance of that parameter): the median of
|bias|/sqrt(CRB) and of std/sqrt(CRB), per parameter, per SNR and pooled. Targets of the issue: the
bias-reduced net's median |bias|/sqrt(CRB) at most half the CRB net's, and its median std/sqrt(CRB) at most 1.3.

Outputs under ``--out`` (default ``benchmarks/results/``): ``bias_reduced.json`` and ``bias_reduced.png``
(grid maps of |bias|/sqrt(CRB) and std/sqrt(CRB)). Training sets are cached in ``<out>/cache/`` with the
naming of ``bench_crb_vs_mse.py`` (shared caches).

Usage::

    python benchmarks/bench_bias_reduced.py --n-train 12000 --epochs 100 --pretrain-epochs 70
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _harness import cached_dataset, eval_draws, parser, save_npz, sequence, start, table

EST = ("m0s", "R1f", "R2f")
PRIOR = "brain"
#: Fixed parameters of the grid: white-matter-like (Mao et al.'s typical WM T2f 77.6 ms, T2s 12.4 us; the
#: tied model's in-vivo exchange rate near 25-30 1/s), on resonance, nominal B1.
FIXED = {"R2f": 1 / 77.6e-3, "Rex": 25.0, "T2s": 12.4e-6, "omega0": 0.0, "B1": 1.0}
M0S = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25)
T1 = (0.7, 0.9, 1.1, 1.4, 1.7, 2.0)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--n-train", type=int, default=12000, help="training parameter draws (default 12000)")
    p.add_argument("--epochs", type=int, default=100, help="max_epochs of both nets (default 100)")
    p.add_argument("--pretrain-epochs", type=int, default=70, help="CRB-loss epochs of the bias-reduced net")
    p.add_argument("--n-realizations", type=int, default=16, help="noise realisations per fingerprint (paper 200)")
    p.add_argument("--train-snr", type=float, nargs=2, default=(10.0, 100.0), help="training |M0|/sigma range")
    p.add_argument("--snr", type=float, nargs="+", default=(50.0, 100.0), help="evaluation SNRs")
    p.add_argument("--n-draws", type=int, default=200, help="noise draws per grid point and SNR")
    a = p.parse_args(argv)
    a.m0s, a.T1 = M0S, T1
    if a.quick:
        a.n_train, a.epochs, a.pretrain_epochs, a.n_realizations, a.n_draws = 300, 2, 1, 2, 6
        a.m0s, a.T1 = M0S[2:4], T1[1:3]
    a.fixed = FIXED
    return a


def grid_theta(args):
    """``theta`` (n, 8) of the grid, m0s fastest, and the (m0s, T1) of each point."""
    from sklearn_crb.physics.parameters import INDEX, PARAMETERS

    mm, tt = np.meshgrid(args.m0s, args.T1, indexing="xy")  # (n_T1, n_m0s)
    th = np.zeros((mm.size, len(PARAMETERS)))
    for k, v in args.fixed.items():
        th[:, INDEX[k]] = v
    th[:, INDEX["m0s"]] = mm.ravel()
    th[:, INDEX["R1f"]] = th[:, INDEX["R1s"]] = 1.0 / tt.ravel()
    return th, mm.ravel(), tt.ravel()


def train(sim, data, loss, args, log):
    from sklearn_crb import CRBNetRegressor

    kw = dict(simulator=sim, loss=loss, random_state=args.seed, max_epochs=args.epochs, augment=True,
              n_threads=args.threads or args.torch_threads)
    if loss == "bias_reduced":
        kw.update(pretrain_epochs=args.pretrain_epochs, n_realizations=args.n_realizations, bias_lambda=1.0,
                  var_delta=1.0)
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


def summary_table(summary, snrs):
    rows = []
    for s in [f"{v:g}" for v in snrs] + ["pooled"]:
        for name, recs in summary.items():
            rec = {r["parameter"]: r for r in recs if r["snr"] == s}
            cells = []
            for p in EST:
                b, sd = rec[p]["median_abs_bias_over_sqrt_crb"], rec[p]["median_std_over_sqrt_crb"]
                cells += ["—" if b is None else f"{b:.3f} (n={rec[p]['n_points']})", "—" if sd is None else sd]
            rows.append([s, name, *cells])
    return table("Medians over informative grid points (CRB < 0.1 x prior variance)",
                 ["SNR", "estimator", *[f"{p} {k}" for p in EST for k in ("|b|/√CRB", "std/√CRB")]], rows,
                 "n = informative points. Targets: the bias-reduced net's |bias|/√CRB at most half the CRB net's, "
                 "its std/√CRB at most 1.3.")


def figure(run, stats_by_est, informative, args):
    import matplotlib  # optional dependency of the benchmark's figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    run.save_figure(fig, dpi=80)


def setup(args, run):
    """The simulator, its sigma, the prior variances and the cached training set."""
    from sklearn_crb import MTFingerprintSimulator
    from sklearn_crb.metrics import prior_moments

    seq = sequence(required=True)[0]
    cache = Path(args.out) / "cache"
    tag = f"{seq.sha256()[:10]}_r13_{PRIOR}_tied"
    fb = cache / f"basis_{tag}_seed{args.seed}{'_quick' if args.quick else ''}.npz"  # a quick basis is not shared
    if fb.is_file():
        basis = np.load(fb)["basis"]
    else:
        basis = MTFingerprintSimulator(seq, n_components=13, tied_R1=True, prior=PRIOR,
                                       n_basis_samples=100 if args.quick else 1000, random_state=args.seed).fit().basis_
        save_npz(fb, basis=basis)
    sim = MTFingerprintSimulator(seq, basis=basis, estimate=EST, snr=tuple(args.train_snr), tied_R1=True,
                                 prior=PRIOR, random_state=args.seed).fit()
    _, p_var = prior_moments(sim.prior_, EST, random_state=args.seed + 7)
    data = cached_dataset(sim, args.n_train, args.seed, cache, f"train_{tag}", run.log)
    return sim, float(sim.sigma), p_var, data


def checks_of(summary, snrs):
    checks = {}
    for s in [f"{v:g}" for v in snrs] + ["pooled"]:
        c = {r["parameter"]: r for r in summary["crb-net"] if r["snr"] == s}
        b = {r["parameter"]: r for r in summary["bias-reduced-net"] if r["snr"] == s}
        for p in EST:
            if c[p]["n_points"] == 0:
                checks[f"{s}/{p}"] = "no informative point"
                continue
            half = b[p]["median_abs_bias_over_sqrt_crb"] <= 0.5 * c[p]["median_abs_bias_over_sqrt_crb"]
            std_ok = b[p]["median_std_over_sqrt_crb"] <= 1.3
            checks[f"{s}/{p}"] = {"bias_at_most_half": bool(half), "std_at_most_1.3": bool(std_ok)}
    return checks


def main(argv=None):
    args = parse_args(argv)
    run = start("bias_reduced", "Bias-reduced network against the CRB network on an (m0s, T1) grid", args, argv)
    sim, sigma, p_var, data = setup(args, run)
    theta, m0s, T1 = grid_theta(args)
    _, y, _, det = sim.make_dataset(theta.shape[0], 0, theta=theta, return_details=True)
    ev = {"X_clean": det["X_clean"], "y": y, "crb_unit": det["crb_unit"]}
    rows = eval_draws(ev, args.snr, args.n_draws, sigma, args.seed + 3000)
    n_pts = theta.shape[0]
    crb_grid = np.stack([ev["crb_unit"] / s**2 for s in args.snr])  # (n_snr, n_points, P)
    informative = crb_grid < 0.1 * p_var
    run.log(f"grid: {n_pts} points x {len(args.snr)} SNRs x {args.n_draws} draws; informative points per SNR and "
            f"parameter: {informative.sum(1).tolist()}")
    results, stats, summary = {}, {}, {}
    for loss, name in (("crb", "crb-net"), ("bias_reduced", "bias-reduced-net")):
        net, results[name] = train(sim, data, loss, args, run.log)
        pred = net.predict(rows["X"])
        if not np.all(np.isfinite(pred)):
            raise SystemExit(f"{name} predicted non-finite values")
        stats[name] = grid_stats(rows, pred, n_pts, args.snr, args.n_draws)
        summary[name] = summarise(stats[name], informative, args.snr)
    checks = checks_of(summary, args.snr)
    res = {"config": vars(args), "rank": 13, "tied_R1": True, "estimate": EST, "prior_variance": p_var,
           "sigma": sigma, "estimators": results, "summary": summary, "checks": checks,
           "grid": {"m0s": m0s, "T1": T1, "fixed": args.fixed, "informative": informative,
                    **{name: {k: v for k, v in st.items()} for name, st in stats.items()}}}
    doc = run.write([summary_table(summary, args.snr)], res)
    figure(run, stats, informative, args)
    return doc


if __name__ == "__main__":
    main()
