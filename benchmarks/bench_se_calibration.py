"""Calibration of a saved network's maps on the tied brain phantom: sigma and standard errors (issue 9 item 3).

For a model folder (``sklearn-crb train`` or the demo's ``crb_model``), the
tied phantom in the model's own sequence and basis at ``1/sigma = 116`` (WM
``|M0|/sigma = 80``) is drawn ``--draws`` times; ``fit_maps`` (estimated
sigma, the network's default standard error, or ``--se``) is run on
``--voxels`` WM and GM voxels. Reports the median estimated sigma against the
truth and, per tissue and parameter, the empirical spread of the estimates
over the draws against the RMS of the standard-error maps (target: sigma
within 20 %, ratio within 0.75-1.25). Writes ``se_calibration.json`` and
``.png`` under ``--out``. ``--quick`` without ``--model`` trains a tiny
stand-in network.

    python benchmarks/bench_se_calibration.py --model sklearn_crb_demo/crb_model [--se delta|crb]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _harness import parser, quick_model, start, table

from sklearn_crb import Sequence, fit_maps, load_model, make_phantom

SNR = 116.0


def parse_args(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--model", default=None, help="model folder (required unless --quick)")
    p.add_argument("--draws", type=int, default=4, help="phantom noise draws (default 4)")
    p.add_argument("--voxels", type=int, default=40, help="voxels per tissue, WM and GM (default 40)")
    p.add_argument("--se", choices=["delta", "crb"], default=None, help="standard-error method (default: the net's)")
    a = p.parse_args(argv)
    if a.model is None and not a.quick:
        p.error("--model is required (only --quick trains a stand-in)")
    if a.quick:
        a.draws, a.voxels = 2, 6
    return a


def calibrate(net, args):
    meta = net.crb_metadata_
    seq, U = Sequence.from_dict(meta["sequence"]), meta["basis"]
    names = [p for p in ("m0s", "R1f", "R2f", "T1f", "T2f") if p in meta["estimate"]]
    shape = (24, 24) if args.quick else (40, 40)
    ph = make_phantom(shape, seq, basis=U, snr=SNR, tied_R1=True, random_state=1)
    rng = np.random.default_rng(1)
    sub = np.zeros(ph.labels.shape, bool)
    for t in ("WM", "GM"):
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), args.voxels, replace=False)] = True
    est, se, sigmas = {p: [] for p in names}, {p: [] for p in names}, []
    for k in range(args.draws):
        ph_k = make_phantom(ph.labels.shape, seq, basis=U, snr=SNR, tied_R1=True, random_state=100 + k)
        m = fit_maps(net, ph_k.coefficients, sub, se=args.se)
        sigmas.append(m.sigma)
        for p in names:
            est[p].append(m.arrays[p])
            se[p].append(m.arrays[p + "_se"])
    rows = []
    for t in ("WM", "GM"):
        sel = ph.tissue_mask(t) & sub
        for p in names:
            e = np.stack(est[p])[:, sel]
            spread = float(np.sqrt(np.mean(np.var(e, axis=0, ddof=1))))
            rms = float(np.sqrt(np.mean(np.stack(se[p])[:, sel] ** 2)))
            rows.append({"tissue": t, "param": p, "spread": spread, "rms_se": rms, "ratio": spread / rms,
                         "median": float(np.median(e))})
    return rows, float(np.median(sigmas))


def figure(run, rows):
    import matplotlib  # optional plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.bar([f"{r['tissue']} {r['param']}" for r in rows], [r["ratio"] for r in rows])
    for y in (0.75, 1.0, 1.25):
        ax.axhline(y, color="k", ls="--" if y != 1 else "-", lw=0.8)
    ax.set_ylabel("spread / RMS(se)")
    fig.tight_layout()
    run.save_figure(fig, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    run = start("se_calibration", "Standard errors and sigma of a network's maps on the tied phantom", args, argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or quick_model(Path(tmp) / "model", seed=args.seed)
        net = load_model(model, device="cpu")
    rows, sigma = calibrate(net, args)
    data = {"model": str(args.model or "quick stand-in"), "se": args.se or "default", "draws": args.draws,
            "voxels_per_tissue": args.voxels, "sigma_true": 1 / SNR, "sigma_median": sigma,
            "sigma_ratio": sigma * SNR, "rows": rows}
    tables = [table(f"Spread over {args.draws} noise draws against the RMS standard error ({data['se']})",
                    ["tissue", "parameter", "spread", "RMS se", "spread/se", "median"],
                    [[r["tissue"], r["param"], r["spread"], r["rms_se"], r["ratio"], r["median"]] for r in rows],
                    f"estimated sigma / true sigma = {sigma * SNR:.3f}; targets: within 20 % and 0.75-1.25")]
    doc = run.write(tables, data)
    figure(run, rows)
    return doc


if __name__ == "__main__":
    main()
