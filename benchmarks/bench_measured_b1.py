"""A measured B1 map as a network input (issue 12, item 2): what conditioning on B1 buys.

Two networks with the package's default recipe (``--epochs`` and
``--n-train`` set the budget), trained with ``fit_simulated`` on the same
prior draws (v3.2 sequence from ``SKLEARN_CRB_DATA``, else the built-in one;
SVD rank 13, tied T1, brain prior, training SNR ``--train-snr``):

* ``estimated B1``: every free parameter estimated (m0s, R1f, R2f, Rex,
  T2s, omega0, B1), the CRB with B1 unknown;
* ``measured B1``: ``CRBNetRegressor(measured=("B1",))``, B1 an input
  column (the true B1 of each draw, i.e. a noise-free B1 map), the other six
  estimated, the CRB with B1 known (``measured_nuisance``).

Both are judged on the same ``--n-eval-theta`` held-out draws x ``--n-draws``
noise draws at each ``--eval-snr``: per parameter (m0s, R1f, R2f), the RMSE
in SI units over every theta (the same set for both), the median of sqrt(CRB) of each model (and their ratio: what
knowing B1 can buy at most), nMSE against each model's own CRB, median
|bias|/sqrt(CRB) and median std/sqrt(CRB) on the informative thetas (CRB <
0.1 x prior variance), beside the constant prior mean scored the same way.
The two networks train side by side in two processes (one with
``--quick``). Writes ``measured_b1.json`` and ``.png`` under ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/bench_measured_b1.py --n-train 12000 --epochs 150 [--save-models DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _harness import parser, sequence, start, table

EST = ("m0s", "R1f", "R2f")
ALL = ("m0s", "R1f", "R2f", "Rex", "T2s", "omega0", "B1")
MEASURED = {"estimated B1": None, "measured B1": ("B1",)}


def parse_args(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--n-train", type=int, default=12000, help="training draws (default 12000)")
    p.add_argument("--epochs", type=int, default=150, help="max_epochs (default 150)")
    p.add_argument("--train-snr", type=float, nargs=2, default=(10.0, 300.0), help="training |M0|/sigma range")
    p.add_argument("--eval-snr", type=float, nargs="+", default=(50.0, 100.0))
    p.add_argument("--n-eval-theta", type=int, default=200, help="held-out prior draws (default 200)")
    p.add_argument("--n-draws", type=int, default=20, help="noise draws per theta and SNR (default 20)")
    p.add_argument("--load-models", default=None, metavar="DIR",
                   help="evaluate the networks an earlier run saved with --save-models instead of training")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="also save both networks (DIR/estimated_b1, DIR/measured_b1), e.g. as NLLS starts for "
                        "bench_nlls.py --start-model")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.epochs, a.n_eval_theta, a.n_draws = 300, 1, 8, 3
    return a


def _train(sim, measured, n, epochs, seed):
    import torch

    from sklearn_crb import CRBNetRegressor

    torch.set_num_threads(1)
    t = time.perf_counter()
    net = CRBNetRegressor(simulator=sim, measured=measured, max_epochs=epochs, random_state=seed, n_threads=1,
                          device="cpu").fit_simulated(n, random_state=seed)
    return net, time.perf_counter() - t


def _stats(pred, y, crb, groups, pvar):
    """Per parameter: RMSE, nMSE, median |bias|/sqrt(CRB), median std/sqrt(CRB) on informative thetas."""
    out = {}
    for j, p in enumerate(EST):
        inf = crb[:, j] < 0.1 * pvar[j]
        g = np.unique(groups[inf])
        e = pred[:, j] - y[:, j]
        bias = np.array([e[groups == k].mean() for k in g])
        std = np.array([e[groups == k].std(ddof=1) for k in g])
        sc = np.array([np.sqrt(crb[groups == k, j][0]) for k in g])
        out[p] = {"rmse": float(np.sqrt(np.mean(e**2))),  # over every theta: the same set for both networks
                  "rmse_informative": float(np.sqrt(np.mean(e[inf] ** 2))),
                  "nmse": float(np.mean(e[inf] ** 2 / crb[inf, j])),
                  "median_abs_bias_over_sqrt_crb": float(np.median(np.abs(bias) / sc)),
                  "median_std_over_sqrt_crb": float(np.median(std / sc)), "n_theta": int(g.size)}
    return out


def networks(args, seq):
    """The two simulators (B1 estimated, B1 measured) on one basis, and their networks (trained or loaded)."""
    from joblib import Parallel, delayed

    from sklearn_crb import MTFingerprintSimulator
    from sklearn_crb.estimators.net.measured import measured_nuisance

    common = dict(tied_R1=True, prior="brain", snr=tuple(args.train_snr), random_state=args.seed)
    basis = MTFingerprintSimulator(seq, n_components=13, n_basis_samples=100 if args.quick else 1000,
                                   **common).fit().basis_
    known = tuple(p for p in ALL if p != "B1")
    sims = {"estimated B1": MTFingerprintSimulator(seq, basis=basis, estimate=ALL, **common).fit(),
            "measured B1": MTFingerprintSimulator(seq, basis=basis, estimate=known,
                                                  nuisance=measured_nuisance(known, ("B1",), True), **common).fit()}
    if args.load_models:  # evaluate networks saved by an earlier run (--save-models), no training
        from sklearn_crb import load_model

        nets = {k: (load_model(Path(args.load_models) / k.replace(" ", "_").lower(), device="cpu"), float("nan"))
                for k in sims}
        for k, (net, _) in nets.items():
            if tuple(net.crb_metadata_["estimate"]) != sims[k].estimate_ or net.measured_ != (MEASURED[k] or ()):
                raise SystemExit(f"--load-models: {k} does not match this benchmark's setting")
    else:
        trained = Parallel(n_jobs=1 if args.quick else 2)(
            delayed(_train)(sims[k], MEASURED[k], args.n_train, args.epochs, args.seed) for k in sims)
        nets = dict(zip(sims, trained))
    if args.save_models:
        from sklearn_crb import save_model

        for name, (net, _) in nets.items():
            save_model(net, Path(args.save_models) / name.replace(" ", "_").lower(), simulator=sims[name])
    return sims, nets


def evaluate(args, sims, nets):
    from sklearn_crb.metrics import prior_moments
    from sklearn_crb.physics.parameters import INDEX
    from sklearn_crb.simulator import apply_m0_and_noise

    pmean, pvar = prior_moments(sims["estimated B1"].prior_, EST, random_state=args.seed + 7)
    theta = sims["estimated B1"].prior_.sample(args.n_eval_theta, args.seed + 1000)
    rng = np.random.default_rng(args.seed + 2000)
    sigma = sims["estimated B1"].sigma
    out = {}
    for snr in args.eval_snr:
        idx = np.repeat(np.arange(args.n_eval_theta), args.n_draws)
        M0 = sigma * snr * np.exp(2j * np.pi * rng.uniform(0, 1, idx.size))
        eps = sigma * (rng.standard_normal((idx.size, 13)) + 1j * rng.standard_normal((idx.size, 13)))
        cell = {}
        for name, sim in sims.items():
            _, y, _, det = sim.make_dataset(args.n_eval_theta, 0, theta=theta, return_details=True, on_singular="inf")
            cols = [sim.estimate_.index(p) for p in EST]
            X = apply_m0_and_noise(det["X_clean"][idx], M0, eps)
            if MEASURED[name]:
                X = np.column_stack([X, det["theta"][idx, INDEX["B1"]]])
            pred = np.asarray(nets[name][0].predict(X))[:, cols]
            crb = det["crb_unit"][idx][:, cols] / snr**2
            cell[name] = _stats(pred, y[idx][:, cols], crb, idx, pvar)
            # the constant prior mean, judged against the same model's CRB (the baseline of every nMSE)
            cell[name]["prior_mean"] = _stats(np.broadcast_to(pmean, pred.shape), y[idx][:, cols], crb, idx, pvar)
            cell[name]["median_sqrt_crb"] = {p: float(np.median(np.sqrt(det["crb_unit"][:, c] / snr**2)))
                                             for p, c in zip(EST, cols)}
        out[f"{snr:g}"] = cell
    return out


def tables(args, results, seq_name):
    rows = []
    for snr, cell in results["snr"].items():
        for name, r in cell.items():
            c = r["prior_mean"]
            rows.append([snr, f"prior mean (vs {name}'s CRB)", *(f"RMSE {c[p]['rmse']:.3g}; nMSE {c[p]['nmse']:.3g}"
                                                                 for p in EST)])
            rows.append([snr, name, *(
                f"RMSE {r[p]['rmse']:.3g}, median √CRB {r['median_sqrt_crb'][p]:.3g}; nMSE {r[p]['nmse']:.2f} / "
                f"{r[p]['median_abs_bias_over_sqrt_crb']:.2f} / {r[p]['median_std_over_sqrt_crb']:.2f} "
                f"(n={r[p]['n_theta']})" for p in EST)])
    ts = results["train_seconds"]
    return [table(f"A measured B1 map as a network input ({seq_name}, rank 13, tied, brain prior; {args.n_train} "
                  f"draws x {args.epochs} epochs)", ["SNR", "network", *EST], rows,
                  f"training {ts['estimated B1']:.0f} s / {ts['measured B1']:.0f} s. Cells: RMSE over every theta "
                  "(SI), median √CRB of that model; over the informative thetas of that model: nMSE / median "
                  "|bias|/√CRB / median std/√CRB.")]


def main(argv=None):
    args = parse_args(argv)
    run = start("measured_b1", "A measured B1 map as a network input: what conditioning on B1 buys", args, argv)
    seq, seq_name = sequence()
    sims, nets = networks(args, seq)
    results = {"sequence": seq_name, "config": vars(args), "train_seconds": {k: v[1] for k, v in nets.items()},
               "snr": evaluate(args, sims, nets)}
    doc = run.write(tables(args, results, seq_name), results)
    _figure(run, results)
    return doc


def _figure(run, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EST), figsize=(11, 3.4), constrained_layout=True)
    snrs = list(results["snr"])
    for j, p in enumerate(EST):
        for k, name in enumerate(("estimated B1", "measured B1")):
            x = np.arange(len(snrs)) + 0.35 * k
            axes[j].bar(x, [results["snr"][s][name][p]["rmse"] for s in snrs], 0.35, label=f"{name}: RMSE")
            axes[j].plot(x, [results["snr"][s][name]["median_sqrt_crb"][p] for s in snrs], "k_", ms=18,
                         label="median √CRB" if k == 0 else None)
        axes[j].set_xticks(np.arange(len(snrs)) + 0.175, [f"SNR {s}" for s in snrs])
        axes[j].set_title(p)
    axes[0].legend(fontsize=7)
    run.save_figure(fig, dpi=90)


if __name__ == "__main__":
    main()
