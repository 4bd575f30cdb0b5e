"""The tied-model brain phantom at in-vivo SNR through the CLI with every default.

    OMP_NUM_THREADS=1 python benchmarks/bench_phantom.py [--sequence MAT] [--n-samples N] [--epochs E] [--out DIR]
                                                         [--untied-tissues]

``sklearn-crb simulate --tied-R1`` (default prior, SNR range and size),
``train`` (the default recipe; ``--epochs`` only when given), ``fit --model``
on the tied phantom (``|M0|/sigma = 80`` in WM) and ``fit --nlls`` on a
voxel subset per tissue of the same image. Prints a per-tissue table
(median m0s and T1, network against NLLS and truth, WM-GM contrast) and the
standard-error calibration over noise draws, and writes
``benchmarks/results/bench_phantom.json`` and ``bench_phantom.png``.
This is the full-default version of ``tests/test_invivo_phantom.py``.
``--untied-tissues`` simulates the phantom with the unconstrained two-pool
model instead (``phantom.TISSUES``: a fast semi-solid T1), which the tied
network and tied NLLS both misspecify, as they do real tissue; its "truth"
row is then the unconstrained model's m0s and T1f, which no tied fit gives.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from sklearn_crb.cli import main
from sklearn_crb.io.datasets import load_dataset
from sklearn_crb.io.models import load_model
from sklearn_crb.maps import fit_maps
from sklearn_crb.phantom import TIED_TISSUES, TISSUES as UNTIED_TISSUES, make_phantom
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.viz import overview_png
from _results import write_json

SNR = 116.0
TISSUES = ("WM", "GM", "CSF")


def _cli(*args):
    t0 = time.perf_counter()
    rc = main([*map(str, args), "--quiet"])
    if rc != 0:
        raise SystemExit(f"sklearn-crb {args[0]} failed ({rc})")
    return time.perf_counter() - t0


def _medians(ph, m0s, R1f, ok):
    return {t: {"m0s": float(np.median(m0s[ph.tissue_mask(t) & ok])),
                "T1": float(np.median(1 / R1f[ph.tissue_mask(t) & ok])), "n": int((ph.tissue_mask(t) & ok).sum())}
            for t in TISSUES}


def run(n_samples=None, epochs=None, out=None, n_nlls=100, n_draws=5, shape=(48, 48), sequence=None,
        standardize_inputs=None, untied_tissues=False):
    work = Path(tempfile.mkdtemp(prefix="bench_phantom_"))
    seconds = {}
    seq_args = ["--sequence", sequence] if sequence else []
    sim_args = ["simulate", "--out", work / "train.npz", "--tied-R1", *seq_args] + (
        ["--n-samples", n_samples] if n_samples else [])
    seconds["simulate"] = _cli(*sim_args)
    seconds["train"] = _cli("train", "--data", work / "train.npz", "--out", work / "model",
                            *(["--epochs", epochs] if epochs else []),
                            *([] if standardize_inputs is None else
                              ["--standardize-inputs" if standardize_inputs else "--no-standardize-inputs"]))
    U = load_dataset(work / "train.npz")["basis"]
    np.save(work / "U.npy", U)
    seq = Sequence.from_mat(sequence, TR=3.5e-3) if sequence else Sequence.default()
    tied = not untied_tissues
    ph = make_phantom(shape, seq, basis=U, snr=SNR, tied_R1=tied, random_state=1)
    nib.save(nib.Nifti1Image(ph.coefficients[:, :, None, :].astype(np.complex64), np.eye(4)), work / "coef.nii.gz")
    rng = np.random.default_rng(0)
    sub = np.zeros(ph.labels.shape, dtype=bool)
    for t in TISSUES:
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), n_nlls, replace=False)] = True
    np.save(work / "sub.npy", sub[:, :, None].astype(np.uint8))
    seconds["fit_net"] = _cli("fit", "--model", work / "model", "--coefficients", work / "coef.nii.gz",
                              "--out", work / "net")
    seconds["fit_nlls"] = _cli("fit", "--nlls", "--tied-R1", *seq_args, "--basis", work / "U.npy", "--coefficients",
                               work / "coef.nii.gz", "--mask", work / "sub.npy", "--out", work / "nlls")
    load = lambda k, p: nib.load(work / k / f"{p}.nii.gz").get_fdata()[..., 0]  # noqa: E731
    med = {}
    for k in ("net", "nlls"):
        ok = (load(k, "mask") > 0) & (load(k, "flags") == 0)
        med[k] = _medians(ph, load(k, "m0s"), load(k, "R1f"), ok)
    truth = TIED_TISSUES if tied else UNTIED_TISSUES
    med["truth"] = {t: {"m0s": truth[t]["m0s"], "T1": 1 / truth[t]["R1f"]} for t in TISSUES}

    # standard errors against the spread over noise draws (Python API)
    net = load_model(work / "model", device="cpu")
    draws = [fit_maps(net, make_phantom(shape, ph.sequence, basis=U, snr=SNR, tied_R1=tied,
                                        random_state=100 + k).coefficients, ph.mask) for k in range(n_draws)]
    calib = {}
    for t in ("WM", "GM"):
        sel = ph.tissue_mask(t)
        for p in ("m0s", "R1f", "R2f"):
            e = np.stack([m[p][sel] for m in draws])
            s = np.stack([m[p + "_se"][sel] for m in draws])
            calib[f"{t}/{p}"] = float(np.sqrt(np.mean(np.var(e, axis=0, ddof=1))) / np.sqrt(np.mean(s**2)))
    sigma_ratio = float(np.median([m["sigma"] for m in draws]) * SNR)

    contrast = {k: med[k]["WM"]["m0s"] - med[k]["GM"]["m0s"] for k in med}
    lines = [f"{'':<7}" + "".join(f" {t + ' m0s':>9} {t + ' T1/s':>9}" for t in TISSUES) + f" {'WM-GM m0s':>10}"]
    for k in ("truth", "nlls", "net"):
        lines.append(f"{k:<7}" + "".join(f" {med[k][t]['m0s']:>9.4f} {med[k][t]['T1']:>9.3f}" for t in TISSUES)
                     + f" {contrast[k]:>10.4f}")
    rel = {f"{t}/{p}": med["net"][t][p] / med["nlls"][t][p] - 1 for t in ("WM", "GM") for p in ("m0s", "T1")}
    lines.append("net vs NLLS: " + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in rel.items())
                 + f", contrast {100 * (contrast['net'] / contrast['nlls'] - 1):+.1f} %")
    lines.append("spread / RMS standard error (want 0.75-1.25): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in calib.items()) + f"; sigma / truth {sigma_ratio:.3f}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    table = "\n".join(lines)
    print(table)

    out = Path(out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    result = {"n_samples": n_samples or "default", "epochs": epochs or "default", "snr": SNR,
              "sequence": str(sequence or "built-in"), "n_nlls_per_tissue": n_nlls, "medians": med,
              "relative_to_nlls": rel, "contrast": contrast, "se_calibration": calib, "sigma_over_truth": sigma_ratio,
              "seconds": seconds, "table": table, "phantom_tissues": "tied" if tied else "untied"}
    write_json(out / "bench_phantom.json", result)
    net_maps = {p: load("net", p) for p in ("m0s", "R1f", "R2f", "m0s_se")}
    net_maps["T1f"] = np.where(net_maps["R1f"] > 0, 1 / np.where(net_maps["R1f"] > 0, net_maps["R1f"], 1), 0)
    overview_png(out / "bench_phantom.png", net_maps, names=["m0s", "T1f", "R2f", "m0s_se"],
                 title=f"CLI defaults, {'tied' if tied else 'untied-model'} phantom, WM |M0|/sigma 80")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=None, help="default: the CLI's")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sequence", default=None, help="a .mat pulse train (default: the built-in sequence); the "
                                                     "in-vivo data are v3.2: $SKLEARN_CRB_DATA/control_MT_v3p2_TR3p5ms_discretized.mat")
    ap.add_argument("--n-nlls", type=int, default=100, help="NLLS voxels per tissue (the median's noise: GM m0s "
                                                             "scatters 0.05 per voxel at this SNR)")
    ap.add_argument("--standardize-inputs", action=argparse.BooleanOptionalAction, default=None,
                    help="train --[no-]standardize-inputs (default: the CLI's, on)")
    ap.add_argument("--untied-tissues", action="store_true",
                    help="simulate the phantom with the unconstrained two-pool model (misspecified by the tied fits)")
    a = ap.parse_args()
    run(a.n_samples, a.epochs, a.out, n_nlls=a.n_nlls, sequence=a.sequence, standardize_inputs=a.standardize_inputs,
        untied_tissues=a.untied_tissues)
