"""The tied-model brain phantom at in-vivo SNR through the CLI with every default.

    OMP_NUM_THREADS=1 python benchmarks/bench_phantom.py [--sequence MAT] [--n-samples N] [--epochs E] [--out DIR]
                                                         [--untied-tissues]

``sklearn-crb simulate --tied-R1`` (default prior, SNR range and size),
``train`` (the default recipe; ``--epochs`` only when given), ``fit --model``
on the tied phantom (``|M0|/sigma = 80`` in WM) and ``fit --nlls`` on a
voxel subset per tissue of the same image. Prints a per-tissue table
(median m0s and T1, network against NLLS and truth, WM-GM contrast) and the
standard-error calibration over noise draws, and writes ``phantom.json``
and ``phantom.png`` under ``--out`` (``phantom-untied.json`` with
``--untied-tissues``).
This is the full-default version of ``tests/test_invivo_phantom.py``.
``--untied-tissues`` simulates the phantom with the unconstrained two-pool
model instead (``phantom.TISSUES``: a fast semi-solid T1), which the tied
network and tied NLLS both misspecify, as they do real tissue; its "truth"
row is then the unconstrained model's m0s and T1f, which no tied fit gives.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _harness import parser, start, table

from sklearn_crb import Sequence, fit_maps, load_model, make_phantom
from sklearn_crb.cli import main as cli_main
from sklearn_crb.io.datasets import load_dataset
from sklearn_crb.phantom import TIED_TISSUES
from sklearn_crb.phantom import TISSUES as UNTIED_TISSUES
from sklearn_crb.viz import overview_png

SNR = 116.0
TISSUES = ("WM", "GM", "CSF")


def _cli(*args):
    t0 = time.perf_counter()
    rc = cli_main([*map(str, args), "--quiet"])
    if rc != 0:
        raise SystemExit(f"sklearn-crb {args[0]} failed ({rc})")
    return time.perf_counter() - t0


def _medians(ph, m0s, R1f, ok):
    return {t: {"m0s": float(np.median(m0s[ph.tissue_mask(t) & ok])),
                "T1": float(np.median(1 / R1f[ph.tissue_mask(t) & ok])), "n": int((ph.tissue_mask(t) & ok).sum())}
            for t in TISSUES}


def run_cli(work, sequence, ph, n_nlls):
    """simulate, train, fit --model on the phantom and fit --nlls on a voxel subset per tissue, through the
    CLI in ``work``; seconds of each."""
    seconds = {}
    seq_args = ["--sequence", sequence] if sequence else []
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
    return seconds


def calibration(work, ph, U, shape, tied, n_draws):
    """Spread over noise draws / RMS standard error per tissue and parameter, and sigma / truth (Python API)."""
    net = load_model(work / "model", device="cpu")
    draws = [fit_maps(net, make_phantom(shape, ph.sequence, basis=U, snr=SNR, tied_R1=tied,
                                        random_state=100 + k).coefficients, ph.mask) for k in range(n_draws)]
    calib = {}
    for t in ("WM", "GM"):
        sel = ph.tissue_mask(t)
        for p in ("m0s", "R1f", "R2f"):
            e = np.stack([m.arrays[p][sel] for m in draws])
            s = np.stack([m.arrays[p + "_se"][sel] for m in draws])
            calib[f"{t}/{p}"] = float(np.sqrt(np.mean(np.var(e, axis=0, ddof=1))) / np.sqrt(np.mean(s**2)))
    return calib, float(np.median([m.sigma for m in draws]) * SNR)


def report(med, calib, sigma_ratio, seconds):
    contrast = {k: med[k]["WM"]["m0s"] - med[k]["GM"]["m0s"] for k in med}
    rel = {f"{t}/{p}": med["net"][t][p] / med["nlls"][t][p] - 1 for t in ("WM", "GM") for p in ("m0s", "T1")}
    rows = [[k, *[med[k][t][q] for t in TISSUES for q in ("m0s", "T1")], contrast[k]] for k in ("truth", "nlls", "net")]
    tables = [table("Per-tissue medians: the network and NLLS against the truth",
                    ["", *[f"{t} {q}" for t in TISSUES for q in ("m0s", "T1/s")], "WM-GM m0s"], rows,
                    "net vs NLLS: " + ", ".join(f"{k} {100 * v:+.1f} %" for k, v in rel.items())
                    + f", contrast {100 * (contrast['net'] / contrast['nlls'] - 1):+.1f} %"),
              table("Spread over noise draws / RMS standard error (want 0.75-1.25)", ["tissue/parameter", "ratio"],
                    [[k, v] for k, v in calib.items()], f"estimated sigma / true sigma {sigma_ratio:.3f}"),
              table("Seconds", ["step", "seconds"], [[k, v] for k, v in seconds.items()])]
    return tables, contrast, rel


def main(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--n-samples", type=int, default=None, help="simulate --n-samples (default: the CLI's)")
    p.add_argument("--epochs", type=int, default=None, help="train --epochs (default: the recipe's)")
    p.add_argument("--sequence", default=None, help="a .mat pulse train (default: the built-in sequence); the "
                                                    "in-vivo data are v3.2: $SKLEARN_CRB_DATA/" + "control_MT_v3p2_"
                                                    "TR3p5ms_discretized.mat")
    p.add_argument("--untied-tissues", action="store_true",
                   help="simulate the phantom with the unconstrained two-pool model (misspecified by the tied fits)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_samples, a.epochs = a.n_samples or 300, a.epochs or 1
    run = start("phantom", "The tied brain phantom at in-vivo SNR through the CLI with every default", a, argv,
                variant="untied" if a.untied_tissues else None)
    sizes = dict(n_nlls=4, n_draws=2, shape=(24, 24)) if a.quick else dict(n_nlls=100, n_draws=5, shape=(48, 48))
    with tempfile.TemporaryDirectory(prefix="bench_phantom_") as tmp:
        return pipeline(run, Path(tmp), a, **sizes)


def pipeline(run, work, a, n_nlls, n_draws, shape):
    seq_args = ["--sequence", a.sequence] if a.sequence else []
    seconds = {"simulate": _cli("simulate", "--out", work / "train.npz", "--tied-R1", *seq_args,
                                *(["--n-samples", a.n_samples] if a.n_samples else []))}
    seconds["train"] = _cli("train", "--data", work / "train.npz", "--out", work / "model",
                            *(["--epochs", a.epochs] if a.epochs else []))
    U = load_dataset(work / "train.npz")["basis"]
    np.save(work / "U.npy", U)
    seq = Sequence.from_mat(a.sequence, TR=3.5e-3) if a.sequence else Sequence.default()
    tied = not a.untied_tissues
    ph = make_phantom(shape, seq, basis=U, snr=SNR, tied_R1=tied, random_state=1)
    seconds.update(run_cli(work, a.sequence, ph, n_nlls))
    load = lambda k, p: nib.load(work / k / f"{p}.nii.gz").get_fdata()[..., 0]  # noqa: E731
    med = {}
    for k in ("net", "nlls"):
        ok = (load(k, "mask") > 0) & (load(k, "flags") == 0)
        med[k] = _medians(ph, load(k, "m0s"), load(k, "R1f"), ok)
    truth = TIED_TISSUES if tied else UNTIED_TISSUES
    med["truth"] = {t: {"m0s": truth[t]["m0s"], "T1": 1 / truth[t]["R1f"]} for t in TISSUES}
    calib, sigma_ratio = calibration(work, ph, U, shape, tied, n_draws)
    tables, contrast, rel = report(med, calib, sigma_ratio, seconds)
    data = {"n_samples": a.n_samples or "default", "epochs": a.epochs or "default", "snr": SNR,
            "sequence": str(a.sequence or "built-in"), "n_nlls_per_tissue": n_nlls, "n_draws": n_draws,
            "shape": shape, "medians": med, "relative_to_nlls": rel, "contrast": contrast, "se_calibration": calib,
            "sigma_over_truth": sigma_ratio, "seconds": seconds, "phantom_tissues": "tied" if tied else "untied"}
    doc = run.write(tables, data)
    net_maps = {p: load("net", p) for p in ("m0s", "R1f", "R2f", "m0s_se")}
    net_maps["T1f"] = np.where(net_maps["R1f"] > 0, 1 / np.where(net_maps["R1f"] > 0, net_maps["R1f"], 1), 0)
    overview_png(run.path("png"), net_maps, names=["m0s", "T1f", "R2f", "m0s_se"],
                 title=f"CLI defaults, {'tied' if tied else 'untied-model'} phantom, WM |M0|/sigma 80")
    return doc


if __name__ == "__main__":
    main()
