"""CRB-loss vs MSE-loss networks on the v3.2 sequence (Zhang et al., MRM 2022).

Both networks share the architecture (the paper's residual MLP), the training
data (rank-13 compressed fingerprints of the tied-T1 model, prior "paper2022",
noise and complex M0 re-drawn every epoch, SNR 10-100), the optimiser and the
epoch budget; they differ only in the loss. Estimated: m0s, R1f (= R1s) and
R2f; Rex, T2s, omega0, B1 and complex M0 are nuisance parameters.

Evaluation:
* a grid over the (R1f, m0s) plane (R2f, Rex, T2s, B1 at fixed values,
  omega0 = 0) at a fixed SNR, each point with many noise draws: bias/sqrt(CRB),
  std/sqrt(CRB) and CRB-normalised MSE per parameter (maps as in the paper);
* held-out prior draws at random SNR: the mean CRB-normalised MSE;
* inference throughput on a 175 x 215 = 37,625-voxel slice (CPU).

Training data need Jacobians (the CRB); they are generated in chunks of 1000
samples cached under ``benchmarks/results/`` so reruns and larger ``--n-train``
reuse them.

Usage::

    python benchmarks/bench_crb_vs_mse.py --n-train 8000 --epochs 60
    python benchmarks/bench_crb_vs_mse.py --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_NAME = "control_MT_v3p2_TR3p5ms_discretized.mat"
CHUNK = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=8000, help="training samples (incl. the 20%% validation part)")
    p.add_argument("--n-test-prior", type=int, default=1000, help="held-out prior draws for the mean normalised MSE")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--grid", type=int, default=8, help="grid points per axis of the (R1f, m0s) test plane")
    p.add_argument("--n-draws", type=int, default=200, help="noise draws per test grid point")
    p.add_argument("--test-snr", type=float, default=50.0, help="|M0|/sigma of the grid test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.environ.get("SKLEARN_CRB_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "crb_vs_mse.json"))
    p.add_argument("--quick", action="store_true", help="tiny run (2000 samples, 8 epochs, 4x4 grid, 50 draws)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test_prior, a.epochs, a.grid, a.n_draws = 2000, 1000, 8, 4, 50
    return a


def chunked_dataset(sim, n, seed, cache_dir, tag, log):
    """Noise-free features, targets and unit CRBs for ``n`` prior draws, cached per 1000-sample chunk."""
    parts = []
    for k in range(int(np.ceil(n / CHUNK))):
        f = cache_dir / f"{tag}_seed{seed}_chunk{k}.npz"
        if f.is_file():
            d = np.load(f)
            parts.append({key: d[key] for key in d.files})
            continue
        t = time.perf_counter()
        _, y, _, det = sim.make_dataset(CHUNK, [seed, k], return_details=True)
        d = {"X_clean": det["X_clean"], "y": y, "crb_unit": det["crb_unit"], "theta": det["theta"]}
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, **d)
        os.replace(tmp, f)  # never leave a partly written cache file
        parts.append(d)
        log(f"  chunk {k}: {CHUNK} Jacobians in {time.perf_counter() - t:.1f} s")
    return {key: np.concatenate([p[key] for p in parts])[:n] for key in parts[0]}


def noisy(X_clean, crb_unit, snr, sigma, rng):
    """One draw of complex M0 (|M0| = sigma * snr) and noise; the matching CRB."""
    n, f = X_clean.shape
    r = f // 2
    mag = sigma * np.broadcast_to(np.asarray(snr, dtype=float), (n,))
    M0 = mag * np.exp(2j * np.pi * rng.uniform(0, 1, n))
    c = (X_clean[:, :r] + 1j * X_clean[:, r:]) * M0[:, None]
    c = c + sigma * (rng.standard_normal(c.shape) + 1j * rng.standard_normal(c.shape))
    return np.hstack([c.real, c.imag]), crb_unit * (sigma**2 / mag**2)[:, None]


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn_crb import Sequence
    from sklearn_crb.metrics import bias_variance_report, crb_normalized_mse
    from sklearn_crb.physics.parameters import INDEX
    from sklearn_crb.estimators.regressor import CRBNetRegressor, paper_lr_scheduler
    from sklearn_crb.simulator import MTFingerprintSimulator

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = out.parent / "cache"
    cache.mkdir(exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    seq_path = Path(args.data) / SEQ_NAME
    if not seq_path.is_file():
        raise SystemExit(f"{SEQ_NAME} not found in {args.data} (set --data or SKLEARN_CRB_DATA)")
    seq = Sequence.from_mat(seq_path, TR=3.5e-3)
    est = ("m0s", "R1f", "R2f")
    sigma = 0.01
    # the basis depends only on the sequence and the seed: cache it
    tag = hashlib.sha256(f"{seq.sha256()}-13-paper2022-tied".encode()).hexdigest()[:12]
    fb = cache / f"basis_{tag}_seed{args.seed}.npz"
    if fb.is_file():
        basis = np.load(fb)["basis"]
    else:
        basis = MTFingerprintSimulator(seq, n_components=13, tied_R1=True, prior="paper2022",
                                       random_state=args.seed).fit().basis_
        np.savez(fb, basis=basis)
    sim = MTFingerprintSimulator(seq, basis=basis, estimate=est, snr=(10.0, 100.0), sigma=sigma, tied_R1=True,
                                 prior="paper2022", random_state=args.seed).fit()
    log(f"simulator ready (rank {sim.n_components_})")

    n_total = args.n_train + args.n_test_prior
    t = time.perf_counter()
    data = chunked_dataset(sim, n_total, args.seed, cache, tag, log)
    log(f"dataset of {n_total} samples ready in {time.perf_counter() - t:.1f} s")
    Xtr, ytr, ctr = (data[k][: args.n_train] for k in ("X_clean", "y", "crb_unit"))
    Xte_c, yte, cte_u = (data[k][args.n_train:] for k in ("X_clean", "y", "crb_unit"))

    # test grid over (R1f, m0s); other parameters fixed (WM-like R2f, prior-centre nuisance)
    g = args.grid
    m0s_axis = np.linspace(0.02, 0.23, g)
    R1_axis = 1.0 / np.linspace(1.9, 0.7, g)
    center = sim.prior_.center()
    theta_grid = np.tile(center, (g * g, 1))
    mm, rr = np.meshgrid(m0s_axis, R1_axis, indexing="ij")
    theta_grid[:, INDEX["m0s"]] = mm.ravel()
    theta_grid[:, INDEX["R1f"]] = theta_grid[:, INDEX["R1s"]] = rr.ravel()
    theta_grid[:, INDEX["R2f"]] = 1 / 0.0776
    theta_grid[:, INDEX["omega0"]] = 0.0
    _, ygrid, _, det = sim.make_dataset(g * g, 1234, theta=theta_grid, return_details=True)
    Xg_clean, cg_unit = det["X_clean"], det["crb_unit"]
    log("test grid ready")

    rng = np.random.default_rng(args.seed + 99)
    Xgrid = np.empty((g * g, args.n_draws, Xg_clean.shape[1]))
    for r in range(args.n_draws):
        Xgrid[:, r], cgrid = noisy(Xg_clean, cg_unit, args.test_snr, sigma, rng)
    Xprior, cprior = noisy(Xte_c, cte_u, rng.uniform(10, 100, len(yte)), sigma, rng)

    results = {"config": {k: v for k, v in vars(args).items()}, "estimate": est, "nets": {}}
    results["config"].update(sequence=SEQ_NAME, rank=13, tied_R1=True, prior="paper2022", snr_train=[10, 100],
                             sigma=sigma, architecture="ResidualMLP (paper widths)",
                             lr_schedule=f"Adam lr {args.lr}, x0.5 every {max(1, args.epochs // 4)} epochs")
    maps = {}
    for loss in ("crb", "mse"):
        net = CRBNetRegressor(
            loss=loss, augment=True, snr=(10.0, 100.0), sigma=sigma, max_epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, device=args.device, random_state=args.seed,
            target_names=est,
            callbacks=[("lr", paper_lr_scheduler(args.lr, step_size=max(1, args.epochs // 4), gamma=0.5,
                                                 min_lr=args.lr * 1e-3))],
        )
        t = time.perf_counter()
        net.fit(Xtr, ytr, crb=ctr)
        t_fit = time.perf_counter() - t
        h = net.history
        log(f"{loss}-net trained in {t_fit:.0f} s; last valid_crb {h[-1, 'valid_crb']:.3g}")
        pg = net.predict(Xgrid.reshape(-1, Xgrid.shape[-1])).reshape(g * g, args.n_draws, -1)
        rep = bias_variance_report(ygrid, pg, crb=cgrid, names=est)
        pp = net.predict(Xprior)
        nm_prior = crb_normalized_mse(yte, pp, crb=cprior, multioutput="raw_values")
        # throughput: one 175 x 215 slice
        slice_X = Xprior[rng.integers(0, len(Xprior), 175 * 215)]
        net.predict(slice_X)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            net.predict(slice_X)
            times.append(time.perf_counter() - t)
        best = min(times)
        results["nets"][loss] = {
            "fit_seconds": t_fit,
            "history_valid_crb": [float(v) for v in h[:, "valid_crb"]],
            "prior_test_normalized_mse": dict(zip(est, map(float, nm_prior))),
            "prior_test_normalized_mse_mean": float(nm_prior.mean()),
            "grid_normalized_mse": dict(zip(est, map(float, rep.summary["mean_normalized_mse"]))),
            "grid_normalized_mse_mean": float(rep.summary["mean_normalized_mse"].mean()),
            "grid_median_abs_bias_over_sqrt_crb": dict(zip(est, map(float, rep.summary["median_abs_bias_over_sqrt_crb"]))),
            "grid_median_std_over_sqrt_crb": dict(zip(est, map(float, rep.summary["median_std_over_sqrt_crb"]))),
            "slice_seconds": best,
            "throughput_voxels_per_s": 175 * 215 / best,
        }
        maps[loss] = rep

    # figure: bias/sqrt(CRB) and std/sqrt(CRB) over the (R1f, m0s) plane
    fig, axes = plt.subplots(4, 3, figsize=(11, 13), constrained_layout=True)
    ext = [1 / 1.9, 1 / 0.7, m0s_axis[0], m0s_axis[-1]]
    for row, (loss, stat) in enumerate([(l, s) for s in ("bias_over_sqrt_crb", "std_over_sqrt_crb")
                                         for l in ("crb", "mse")]):
        vals = maps[loss][stat]
        for j, name in enumerate(est):
            ax = axes[row, j]
            img = vals[:, j].reshape(g, g)
            kw = dict(cmap="RdBu_r", vmin=-2, vmax=2) if stat.startswith("bias") else dict(cmap="viridis", vmin=0,
                                                                                          vmax=2)
            im = ax.imshow(img, origin="lower", aspect="auto", extent=ext, **kw)
            ax.set_title(f"{loss}-net {name}: {stat.replace('_over_sqrt_crb', '')}/√CRB", fontsize=9)
            ax.set_xlabel("R1f (1/s)")
            ax.set_ylabel("m0s")
            fig.colorbar(im, ax=ax)
    fig.suptitle(f"SNR {args.test_snr:g}, {args.n_draws} noise draws per point, n_train={args.n_train}, "
                 f"{args.epochs} epochs")
    png = out.with_suffix(".png")
    fig.savefig(png.with_suffix(".tmp.png"), dpi=90)
    os.replace(png.with_suffix(".tmp.png"), png)

    results["total_seconds"] = time.perf_counter() - t_start
    tmp = out.with_suffix(".tmp.json")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)

    print(f"\n{'':24s}{'crb-net':>12s}{'mse-net':>12s}")
    rows = [("prior nMSE mean", "prior_test_normalized_mse_mean", None),
            ("grid nMSE mean", "grid_normalized_mse_mean", None)]
    for label, key, _ in rows:
        print(f"{label:24s}" + "".join(f"{results['nets'][l][key]:12.3g}" for l in ("crb", "mse")))
    for key, label in (("prior_test_normalized_mse", "prior nMSE"), ("grid_median_abs_bias_over_sqrt_crb",
                                                                     "med|bias|/√CRB"),
                       ("grid_median_std_over_sqrt_crb", "med std/√CRB")):
        for p in est:
            print(f"{label + ' ' + p:24s}" + "".join(f"{results['nets'][l][key][p]:12.3g}" for l in ("crb", "mse")))
    print(f"{'voxels/s (predict)':24s}" + "".join(f"{results['nets'][l]['throughput_voxels_per_s']:12.0f}"
                                                  for l in ("crb", "mse")))
    print(f"\nwrote {out} and {png} in {results['total_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
