"""Head-to-head: CRB-loss network, MSE-loss network, NLLS (cold and network start), dictionary matching.

All estimators see the same held-out test set: parameter vectors drawn from
the tied-R1 prior of Zhang et al. 2022 (``ParameterPrior.paper2022``), each
with ``--n-draws`` noise realisations at SNR ``--snr``, compressed to rank 13
with the v3.2 sequence (``control_MT_v3p2_TR3p5ms_discretized.mat`` from
``SKLEARN_CRB_DATA``; the built-in sequence if it is missing, which the
output says). m0s, R1f (= R1s) and R2f are estimated; Rex, T2s, omega0, B1
and complex M0 are nuisance. Per estimator and parameter it reports the
CRB-normalised MSE, |bias|/sqrt(CRB), std/sqrt(CRB) (``metrics.
bias_variance_report``) and the time per voxel; NLLS runs on the first
``--nlls-theta`` parameter vectors only (it is slow).

Writes ``<out>/bench_compare.json``, ``bench_compare.png`` (accuracy against
time per voxel) and ``bench_compare.md`` (the README table, generated from
the JSON), and prints the table.

    python benchmarks/bench_compare.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from _results import save_figure, write_json, write_text

NAMES = ("m0s", "R1f", "R2f")
V32 = "control_MT_v3p2_TR3p5ms_discretized.mat"


def _sequence(path):
    from sklearn_crb import Sequence

    cands = [path] if path else [Path(os.environ.get("SKLEARN_CRB_DATA", Path(__file__).resolve().parents[2]
                                                     / "shared" / "data")) / V32]
    for c in cands:
        if c and Path(c).is_file():
            return Sequence.from_mat(c, TR=3.5e-3), str(c)
    print(f"note: {V32} not found; using Sequence.default() (set SKLEARN_CRB_DATA)", file=sys.stderr)
    return Sequence.default(), "builtin default"


def markdown_table(res):
    lines = ["| estimator | parameter | CRB-normalised MSE | median abs(bias)/√CRB | median std/√CRB | ms/voxel |",
             "|---|---|---|---|---|---|"]
    for r in res["estimators"]:
        for j, p in enumerate(NAMES):
            name, ms = (r["name"], f"{r['ms_per_voxel']:.3g}") if j == 0 else ("", "")
            lines.append(f"| {name} | {p} | {r['nmse'][j]:.3g} | {r['abs_bias'][j]:.3g} | {r['std'][j]:.3g} | {ms} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 256, 128])
    ap.add_argument("--n-theta", type=int, default=40, help="held-out parameter vectors")
    ap.add_argument("--n-draws", type=int, default=20, help="noise draws per parameter vector")
    ap.add_argument("--nlls-theta", type=int, default=8, help="parameter vectors fitted by NLLS")
    ap.add_argument("--n-atoms", type=int, default=20000, help="dictionary atoms")
    ap.add_argument("--snr", type=float, default=50.0, help="|M0|/sigma of the test set")
    ap.add_argument("--sequence", help=f"path of {V32}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    if a.quick:
        a.n_train, a.epochs, a.n_theta, a.n_draws, a.nlls_theta, a.n_atoms = 2000, 30, 8, 6, 3, 3000
        a.hidden = [128, 128]

    import warnings

    from sklearn_crb import MTFingerprintSimulator
    from sklearn_crb.cli import make_network, simulate_dataset
    from sklearn_crb.estimators.dictionary import DictionaryMatcher
    from sklearn_crb.metrics import bias_variance_report
    from sklearn_crb.estimators.nlls import NLLSFitter

    t_all = time.perf_counter()
    seq, seq_src = _sequence(a.sequence)
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=NAMES, tied_R1=True, prior="paper2022",
                                 random_state=a.seed).fit()
    print(f"sequence {seq_src} ({seq.n_pulses} pulses), rank 13 keeps {sim.explained_energy_:.4f} of the energy")
    data = simulate_dataset(sim, a.n_train, a.seed)
    # held-out test set: noise-free coefficients and unit CRBs once per theta, then noise draws
    _, y_t, _, det = sim.make_dataset(a.n_theta, a.seed + 1000, noise=False, return_details=True)
    rng = np.random.default_rng(a.seed + 2000)
    r = sim.n_components_
    c0 = det["X_clean"][:, :r] + 1j * det["X_clean"][:, r:]
    M0 = a.snr * sim.sigma * np.exp(2j * np.pi * rng.uniform(size=(a.n_theta, a.n_draws)))
    noise = sim.sigma * (rng.standard_normal((a.n_theta, a.n_draws, r)) +
                         1j * rng.standard_normal((a.n_theta, a.n_draws, r)))
    c = M0[..., None] * c0[:, None, :] + noise
    X = np.concatenate([c.real, c.imag], -1)  # (n_theta, n_draws, 2r)
    crb = det["crb_unit"] * (sim.sigma**2 / (a.snr * sim.sigma) ** 2)

    nets = {}
    for loss in ("crb", "mse"):
        net = make_network(loss, sim, hidden=a.hidden, epochs=a.epochs, device=a.device, seed=a.seed)
        net.set_params(augment=True)
        t0 = time.perf_counter()
        net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
        nets[loss] = net
        print(f"trained {loss} network in {time.perf_counter() - t0:.0f} s")
    dico = DictionaryMatcher(seq, basis=sim.basis_, estimate=NAMES, tied_R1=True, prior="paper2022",
                             n_atoms=a.n_atoms, random_state=a.seed).fit()
    estimators = [
        ("CRB net", nets["crb"], a.n_theta),
        ("MSE net", nets["mse"], a.n_theta),
        ("dictionary", dico, a.n_theta),
        ("NLLS (net start)", NLLSFitter(seq, basis=sim.basis_, estimate=NAMES, tied_R1=True, init=nets["crb"],
                                        progress=True).fit(), a.nlls_theta),
        ("NLLS (cold)", NLLSFitter(seq, basis=sim.basis_, estimate=NAMES, tied_R1=True, progress=True).fit(),
         a.nlls_theta),
    ]
    results = []
    for name, est, nt in estimators:
        Xe = X[:nt].reshape(-1, X.shape[-1])
        if not name.startswith("NLLS"):
            est.predict(Xe[:16])  # warm-up: time the steady state, not first-call set-up
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pred = np.asarray(est.predict(Xe), dtype=float).reshape(nt, a.n_draws, len(NAMES))
        sec = (time.perf_counter() - t0) / Xe.shape[0]
        ok = np.all(np.isfinite(pred), axis=(1, 2))
        rep = bias_variance_report(y_t[:nt][ok], pred[ok], crb=crb[:nt][ok], names=NAMES)
        results.append({"name": name, "n_theta": int(ok.sum()), "n_voxels": int(Xe.shape[0]),
                        "nmse": rep.summary["mean_normalized_mse"].tolist(),
                        "abs_bias": rep.summary["median_abs_bias_over_sqrt_crb"].tolist(),
                        "std": rep.summary["median_std_over_sqrt_crb"].tolist(),
                        "ms_per_voxel": 1e3 * sec})
        print(f"{name}: {1e3 * sec:.3g} ms/voxel, nMSE {np.round(results[-1]['nmse'], 3).tolist()}")
    res = {"sequence": seq_src, "n_pulses": seq.n_pulses, "rank": 13, "tied_R1": True, "snr": a.snr,
           "args": vars(a), "estimators": results, "seconds_total": time.perf_counter() - t_all}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_compare.json", res)
    table = markdown_table(res)
    write_text(out / "bench_compare.md", table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r_ in results:
        ax.scatter(r_["ms_per_voxel"], np.mean(r_["nmse"]), s=50)
        ax.annotate(r_["name"], (r_["ms_per_voxel"], np.mean(r_["nmse"])), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1, color="k", ls="--", lw=0.8)
    ax.set_xlabel("time per voxel (ms, this CPU)")
    ax.set_ylabel("mean CRB-normalised MSE (m0s, R1f, R2f)")
    ax.set_title(f"{seq.n_pulses} pulses, rank 13, tied R1, SNR {a.snr:g}")
    fig.tight_layout()
    save_figure(fig, out / "bench_compare.png", dpi=110)
    print(table)
    print(f"wrote {out}/bench_compare.json, .png, .md in {res['seconds_total']:.0f} s")
    return res


if __name__ == "__main__":
    main()
