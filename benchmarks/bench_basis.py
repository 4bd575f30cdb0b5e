"""CRB-optimised basis against the SVD basis at the same rank, learnt from the same prior.

Mao et al., "Cramér–Rao bound optimized subspace reconstruction in quantitative
MRI" (arXiv 2305.00326) choose the compression basis to minimise the CRB
inflation instead of the energy residual. This script fits
``MTFingerprintSimulator(basis_method="svd")`` and ``(basis_method="crb")`` with
the same seed (so the same prior draws) on the v3.2 sequence (tied T1, brain
prior, estimate m0s/R1f/R2f, the other parameters and complex M0 as nuisance,
rank 13), and reports on held-out prior draws

* the median CRB inflation CRB(compressed) / CRB(full signal) of m0s, R1f, R2f,
* the fraction of the held-out fingerprints' energy each basis keeps,
* the fit time of each (on a shared machine: the JSON records the load).

The issue's target: a median inflation at least 15 % lower with the CRB basis.
Writes JSON (``benchmarks/results/bench_basis.json`` by default) and a PNG next
to it, and prints a table. Not a test.

Usage::

    SKLEARN_CRB_DATA=../shared/data python benchmarks/bench_basis.py          # a few minutes
    python benchmarks/bench_basis.py --quick                                  # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sklearn_crb._atomic import atomic_path
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator

REPO = Path(__file__).resolve().parents[1]
V32_NAME = "control_MT_v3p2_TR3p5ms_discretized.mat"
EST = ("m0s", "R1f", "R2f")
TARGET_REDUCTION = 0.15


def _sequence():
    path = Path(os.environ.get("SKLEARN_CRB_DATA", REPO.parent / "shared" / "data")) / V32_NAME
    if not path.is_file():
        raise SystemExit(f"{V32_NAME} not found (set SKLEARN_CRB_DATA); this benchmark is defined on v3.2")
    return Sequence.from_mat(path, TR=3.5e-3), str(path)


def _plot(path, res, infl):
    import matplotlib  # optional dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    pos = np.arange(len(EST))
    for k, (m, c) in enumerate((("svd", "tab:blue"), ("crb", "tab:orange"))):
        bp = ax.boxplot([infl[m][:, j] for j in range(len(EST))], positions=pos + (k - 0.5) * 0.35, widths=0.3,
                        patch_artist=True, showfliers=False)
        for b in bp["boxes"]:
            b.set_facecolor(c)
        ax.plot([], [], color=c, lw=6, label=f"{m} (energy kept {res['energy_held_out'][m]:.3f})")
    ax.set_xticks(pos, EST)
    ax.set_yscale("log")
    ax.set_ylabel("CRB(rank %d) / CRB(full)" % res["rank"])
    ax.set_title(f"{res['n_test']} held-out brain-prior draws, v3.2, tied T1")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(np.exp(res["crb_history"]))
    ax.set_xlabel("iteration")
    ax.set_ylabel("geometric-mean inflation (training draws)")
    ax.set_yscale("log")
    ax.set_title("CRB basis: Riemannian CG from the SVD basis")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=13)
    ap.add_argument("--n-basis-samples", type=int, default=1000)
    ap.add_argument("--n-crb-samples", type=int, default=256)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="64 CRB draws, 30 iterations, 200 test draws")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_basis.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_crb_samples, args.max_iter, args.n_test = 64, 30, 200
    seq, seq_src = _sequence()
    load0 = os.getloadavg()
    kw = dict(n_components=args.rank, estimate=EST, tied_R1=True, prior="brain",
              n_basis_samples=args.n_basis_samples, n_crb_samples=args.n_crb_samples,
              basis_max_iter=args.max_iter, random_state=args.seed)
    sims, fit_s = {}, {}
    for m in ("svd", "crb"):
        t = time.perf_counter()
        sims[m] = MTFingerprintSimulator(seq, basis_method=m, **kw).fit()
        fit_s[m] = time.perf_counter() - t
    assert np.array_equal(sims["svd"]._basis_theta, sims["crb"]._basis_theta)  # the same prior draws
    held = sims["svd"].sample_parameters(args.n_test, random_state=10_000 + args.seed)
    infl, energy = {}, {}
    for m, sim in sims.items():
        out = sim.compression_inflation(held, estimate=EST, methods=(m,))
        infl[m], energy[m] = out["inflation"][m][args.rank], out["energy"][m][args.rank]
    med = {m: np.median(v, axis=0) for m, v in infl.items()}
    reduction = 1 - med["crb"] / med["svd"]
    res = {
        "sequence": seq_src, "n_pulses": seq.n_pulses, "rank": args.rank, "estimate": list(EST), "tied_R1": True,
        "prior": "brain", "nuisance": "all (+ complex M0)", "n_basis_samples": args.n_basis_samples,
        "n_crb_samples": args.n_crb_samples, "max_iter": args.max_iter, "n_test": args.n_test, "seed": args.seed,
        "median_inflation": {m: dict(zip(EST, v.tolist())) for m, v in med.items()},
        "quartiles_inflation": {m: {p: np.percentile(infl[m][:, j], [25, 75]).tolist() for j, p in enumerate(EST)}
                                for m in infl},
        "median_reduction": dict(zip(EST, reduction.tolist())),
        "target_reduction": TARGET_REDUCTION, "target_met": bool(np.all(reduction >= TARGET_REDUCTION)),
        "energy_held_out": energy,
        "energy_training": {m: s.explained_energy_ for m, s in sims.items()},
        "fit_seconds": fit_s, "crb_iterations": len(sims["crb"].basis_history_) - 1,
        "crb_history": sims["crb"].basis_history_.tolist(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads":
                    torch.get_num_threads(), "loadavg_before": load0, "loadavg_after": os.getloadavg()},
    }
    out = Path(args.out)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1))
    _plot(out.with_suffix(".png"), res, infl)
    print(f"v3.2 ({seq.n_pulses} pulses), tied T1, brain prior, rank {args.rank}, {args.n_test} held-out draws")
    print(f"{'basis':6s} " + " ".join(f"{p:>12s}" for p in EST) + f" {'energy':>8s} {'fit (s)':>8s}")
    for m in ("svd", "crb"):
        print(f"{m:6s} " + " ".join(f"{v:12.3f}" for v in med[m]) + f" {energy[m]:8.4f} {fit_s[m]:8.1f}")
    print(f"{'lower':6s} " + " ".join(f"{100 * v:11.1f}%" for v in reduction)
          + f"   (target >= {100 * TARGET_REDUCTION:.0f} %: {'met' if res['target_met'] else 'NOT met'})")
    print(f"load average before/after: {load0[0]:.2f} / {res['machine']['loadavg_after'][0]:.2f}; wrote {out}")
    return res


if __name__ == "__main__":
    main()
