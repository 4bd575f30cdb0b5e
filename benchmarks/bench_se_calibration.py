"""Calibration of a saved network's maps on the tied brain phantom: sigma and standard errors (issue 9 item 3).

For a model folder (``sklearn-crb train`` or the demo's ``crb_model``), the
tied phantom in the model's own sequence and basis at ``1/sigma = 116`` (WM
``|M0|/sigma = 80``) is drawn ``--draws`` times; ``fit_maps`` (estimated
sigma, the network's default standard error) is run on ``--voxels`` WM and GM
voxels. Reports the median estimated sigma against the truth and, per tissue
and parameter, the empirical spread of the estimates over the draws against
the RMS of the standard-error maps (target: sigma within 20 %, ratio within
0.75-1.25). Writes ``benchmarks/results/se_calibration.json`` and ``.png``.

    python benchmarks/bench_se_calibration.py --model sklearn_crb_demo/crb_model [--se delta|crb]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from sklearn_crb.io.models import load_model
from sklearn_crb.maps import fit_maps
from sklearn_crb.phantom import make_phantom
from sklearn_crb.physics.sequence import Sequence
from _results import save_figure, write_json

OUT = Path(__file__).resolve().parent / "results"
SNR = 116.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--voxels", type=int, default=40, help="voxels per tissue (WM, GM)")
    ap.add_argument("--se", choices=["delta", "crb"], default=None)
    args = ap.parse_args(argv)
    net = load_model(args.model, device="cpu")
    meta = net.crb_metadata_
    seq, U = Sequence.from_dict(meta["sequence"]), meta["basis"]
    names = [p for p in ("m0s", "R1f", "R2f", "T1f", "T2f") if p in meta["estimate"]]
    ph = make_phantom((40, 40), seq, basis=U, snr=SNR, tied_R1=True, random_state=1)
    rng = np.random.default_rng(1)
    sub = np.zeros(ph.labels.shape, bool)
    for t in ("WM", "GM"):
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), args.voxels, replace=False)] = True
    est, se, sigmas = {p: [] for p in names}, {p: [] for p in names}, []
    t0 = time.perf_counter()
    for k in range(args.draws):
        ph_k = make_phantom(ph.labels.shape, seq, basis=U, snr=SNR, tied_R1=True, random_state=100 + k)
        m = fit_maps(net, ph_k.coefficients, sub, se=args.se)
        sigmas.append(m["sigma"])
        for p in names:
            est[p].append(m[p])
            se[p].append(m[p + "_se"])
    rows = []
    for t in ("WM", "GM"):
        sel = ph.tissue_mask(t) & sub
        for p in names:
            e = np.stack(est[p])[:, sel]
            spread = float(np.sqrt(np.mean(np.var(e, axis=0, ddof=1))))
            rms = float(np.sqrt(np.mean(np.stack(se[p])[:, sel] ** 2)))
            rows.append({"tissue": t, "param": p, "spread": spread, "rms_se": rms, "ratio": spread / rms,
                         "median": float(np.median(e))})
    res = {"model": str(args.model), "se": args.se or "default", "draws": args.draws, "sigma_true": 1 / SNR,
           "sigma_median": float(np.median(sigmas)), "sigma_ratio": float(np.median(sigmas) * SNR), "rows": rows,
           "seconds": time.perf_counter() - t0, "load_average": os.getloadavg()}
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "se_calibration.json", res)
    print(f"sigma: estimated/true = {res['sigma_ratio']:.3f}")
    print(f"{'tissue':<6} {'param':<5} {'spread':>10} {'RMS se':>10} {'spread/se':>10} {'median':>9}")
    for r in rows:
        print(f"{r['tissue']:<6} {r['param']:<5} {r['spread']:>10.4g} {r['rms_se']:>10.4g} {r['ratio']:>10.3f} "
              f"{r['median']:>9.4g}")
    import matplotlib  # optional plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.bar([f"{r['tissue']} {r['param']}" for r in rows], [r["ratio"] for r in rows])
    for y in (0.75, 1.0, 1.25):
        ax.axhline(y, color="k", ls="--" if y != 1 else "-", lw=0.8)
    ax.set_ylabel("spread / RMS(se)")
    fig.tight_layout()
    save_figure(fig, OUT / "se_calibration.png", dpi=120)


if __name__ == "__main__":
    main()
