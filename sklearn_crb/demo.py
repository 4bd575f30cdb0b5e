"""The ``sklearn-crb demo``: CRB loss versus MSE loss versus NLLS on a brain phantom.

A reduced version of the comparison of Zhang et al., "Cramér-Rao bound-
informed training of neural networks for quantitative MRI", MRM 2022;
88:436-448: two identical networks trained on simulated generalized-Bloch
MT fingerprints (Assländer et al., MRM 2022) of the built-in sequence, one
with the CRB-normalised loss and one with the MSE, and NLLS, applied to the
2-D brain phantom (:mod:`sklearn_crb.phantom`) and compared with the CRB at
the true parameters. The networks are :func:`sklearn_crb.recipes.make_network`'s, as the CLI's.
"""

from __future__ import annotations

import json
import os
import sys
import time

import joblib
import numpy as np
import torch

from sklearn_crb._atomic import atomic_dir, claim_output
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io._files import check_output_folder, releases_claims
from sklearn_crb.io.datasets import simulate_dataset
from sklearn_crb.io.images import features_from_coefficients, save_nifti
from sklearn_crb.io.models import save_model
from sklearn_crb.maps import fit_maps
from sklearn_crb.metrics import bias_variance_report, crb_normalized_mse
from sklearn_crb.phantom import LABELS, make_phantom
from sklearn_crb.physics.parameters import INDEX, free_parameters
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.recipes import make_network
from sklearn_crb.simulator import MTFingerprintSimulator
from sklearn_crb.viz import demo_figures

__all__ = ["run_demo", "make_network", "DEMO_SIZES", "DEMO_SNR", "DEMO_TRAIN_SNR", "DEMO_FILES"]


#: Sizes of the demo (full: the default recipe's 96,000 draws x 150 epochs, about 10 minutes on a 2-core
#: CPU with the two networks trained side by side; quick: CI, a much smaller budget).
DEMO_SIZES = {
    False: {"n_train": 96000, "epochs": 150, "shape": (48, 48), "n_nlls": 60, "n_basis": 500},
    True: {"n_train": 1500, "epochs": 30, "shape": (32, 32), "n_nlls": 18, "n_basis": 300},
}
DEMO_SNR = 116.0  # phantom: 1/sigma; WM voxels have |M0|/sigma = 0.69 * 116 = 80 (in vivo)
#: Training SNR range (|M0|/sigma), in-vivo values included; the model: one T1 (R1s = R1f), the brain prior.
DEMO_TRAIN_SNR = (10.0, 300.0)
#: Compression basis of the demo: CRB-optimised (the built-in sequence's SVD basis loses most of m0s).
DEMO_BASIS = "crb"
#: What the demo writes into its folder.
DEMO_FILES = ("maps.png", "error_maps.png", "bias_std.png", "results.json", "phantom_coefficients.nii.gz",
              "crb_model")
_TISSUES = ("WM", "GM", "CSF")


def _two_cores():
    return (os.cpu_count() or 1) >= 2


def _train(loss, sim, data, epochs, seed, progress):
    """One demo network (a joblib task): the default recipe at the demo's budget; (net, seconds)."""
    t0 = time.perf_counter()
    net = make_network(loss, sim, epochs=epochs, device="cpu", seed=seed, progress=progress)
    net.set_params(augment=True)
    net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
    return net, time.perf_counter() - t0


def _demo_table(rows, names):
    head = f"{'estimator':<11} {'param':<6} {'nMSE':>8} {'|bias|/sqrtCRB':>15} {'std/sqrtCRB':>12} {'ms/voxel':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for j, p in enumerate(names):
            ms = r.get("ms_per_voxel", float("nan")) if j == 0 else float("nan")
            lines.append(f"{r['name'] if j == 0 else '':<11} {p:<6} {r['nmse'][j]:>8.3g} {r['abs_bias'][j]:>15.3g} "
                         f"{r['std'][j]:>12.3g} {ms:>9.3g}".replace("nan", "   "))
    return "\n".join(lines)


def _tissue_table(medians):
    """Per-tissue medians of m0s and T1 (s): truth and every estimator."""
    head = f"{'':<11}" + "".join(f" {t + ' m0s':>8} {t + ' T1/s':>8}" for t in _TISSUES)
    lines = [head, "-" * len(head)]
    for name, med in medians.items():
        lines.append(f"{name:<11}" + "".join(
            f" {med[t]['m0s']:>8.3f} {med[t]['T1']:>8.2f}" if t in med else f" {'':>8} {'':>8}" for t in _TISSUES))
    return "\n".join(lines)


def _medians(ph, m, mask):
    """Median m0s and T1 = 1/R1f per tissue over ``mask``."""
    out = {}
    for t in _TISSUES:
        sel = mask & ph.tissue_mask(t) & np.isfinite(m["m0s"]) & np.isfinite(m["R1f"])
        if sel.any():
            out[t] = {"m0s": float(np.median(m["m0s"][sel])), "T1": float(np.median(1 / m["R1f"][sel]))}
    return out


def _constant_row(prior_mean, yt, crb, labels, names):
    """The prior-mean predictor (ignores the data): nMSE, |bias|/sqrt(CRB) per tissue and std 0."""
    err = prior_mean[None, :] - yt
    nmse = np.mean(err**2 / crb, axis=0)
    per = np.array([np.median(np.abs(err[labels == g]) / np.sqrt(crb[labels == g]), axis=0)
                    for g in np.unique(labels)])
    return {"name": "prior mean", "n_voxels": int(len(yt)), "nmse": nmse.tolist(),
            "abs_bias": np.median(per, axis=0).tolist(), "std": [0.0] * len(names), "constant": prior_mean.tolist()}


@releases_claims
def run_demo(out="sklearn_crb_demo", quick=False, seed=0, progress=True, stream=None, overwrite=False):
    """The ``sklearn-crb demo`` pipeline; returns the results dict.

    Trains a CRB-loss and an MSE-loss network with the package's default
    recipe (the estimator's defaults; only the number of training samples
    and epochs is set by the demo's budget) on fingerprints of the built-in
    sequence simulated from the ``"brain"`` prior of the tied model (rank-13
    basis; every free parameter estimated, as ``sklearn-crb simulate`` does by
    default, so that the maps are evaluated at the network's own estimates;
    m0s, R1f and R2f are reported), the two side by side in two processes
    where the machine has two cores, fits the tied-model
    brain phantom at in-vivo SNR (``|M0|/sigma = 80`` in WM) with both and
    with NLLS (cold start, on a voxel subset), and compares them on the WM
    and GM voxels against the CRB at the true parameters (Zhang et al., MRM
    2022, Figs. 4-6, at demo size), beside a constant prior-mean predictor,
    with per-tissue medians of m0s and T1 (WM, GM, CSF).

    ``out`` is written as a whole, atomically; an existing ``out`` is
    replaced only with ``overwrite=True`` and only if it holds nothing but
    a previous demo's outputs (``DEMO_FILES``).
    """
    stream = stream or sys.stdout
    say = lambda msg: print(msg, file=stream, flush=True)  # noqa: E731
    cfg = DEMO_SIZES[bool(quick)]
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    claim = claim_output(out, argname="out")  # held to the commit: a second demo into out is refused
    out = check_output_folder(claim.path, overwrite=overwrite, owned_names=DEMO_FILES, marker="results.json")
    names = ("m0s", "R1f", "R2f")  # reported; the networks estimate every free parameter
    with atomic_dir(out) as staging:
        seq = Sequence.default()
        say(f"[1/6] {DEMO_BASIS.upper()} basis and {cfg['n_train']} training fingerprints with CRBs ({seq.n_pulses} "
            "pulses, rank 13, brain prior, tied T1)")
        # the CRB-optimised basis (Mao et al., arXiv 2305.00326): on the built-in sequence the rank-13 SVD
        # basis inflates sqrt(CRB(m0s)) in WM 5x over the full signal (0.11 against 0.020 at the demo's SNR),
        # the CRB basis about 1.1x (0.022); measured with benchmarks/bench_basis.py-style CRBs
        sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(True),
                                     n_basis_samples=cfg["n_basis"], basis_method=DEMO_BASIS,
                                     snr=DEMO_TRAIN_SNR, tied_R1=True, prior="brain", random_state=seed).fit()
        data = simulate_dataset(sim, cfg["n_train"], seed, progress=progress)
        say(f"[2/6] training the CRB-loss and the MSE-loss networks (default recipe, {cfg['epochs']} epochs"
            f"{', side by side' if _two_cores() else ''})")
        jobs = [joblib.delayed(_train)(loss, sim, data, cfg["epochs"], seed, progress and not _two_cores())
                for loss in ("crb", "mse")]
        trained = joblib.Parallel(n_jobs=2 if _two_cores() else 1, backend="loky")(jobs)
        nets = {loss: net for loss, (net, _) in zip(("crb", "mse"), trained)}
        train_s = {loss: t for loss, (_, t) in zip(("crb", "mse"), trained)}
        say(f"[3/6] trained in {train_s['crb']:.0f} s (CRB) and {train_s['mse']:.0f} s (MSE)")
        say(f"[4/6] brain phantom {cfg['shape'][0]}x{cfg['shape'][1]} (tied-model tissues), 1/sigma {DEMO_SNR:g} "
            f"(WM |M0|/sigma {0.69 * DEMO_SNR:.0f})")
        ph = make_phantom(cfg["shape"], seq, basis=sim, snr=DEMO_SNR, tied_R1=True, random_state=seed + 1)
        tissue = np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])
        rng = np.random.default_rng(seed)
        sub = np.zeros_like(tissue)
        per = max(1, cfg["n_nlls"] // 3)
        for t in _TISSUES:  # NLLS on a few voxels of each tissue
            idx = np.flatnonzero(ph.tissue_mask(t))
            sub.flat[rng.choice(idx, size=min(per, idx.size), replace=False)] = True

        say("[5/6] fitting the phantom: CRB net, MSE net (all voxels), NLLS (cold start, "
            f"{int(sub.sum())} voxels)")
        maps_by_est, seconds, masks = {}, {}, {}
        for label, est, mask in (("CRB net", nets["crb"], ph.mask), ("MSE net", nets["mse"], ph.mask)):
            X = features_from_coefficients(ph.coefficients[mask])
            est.predict(X[:16])  # warm-up: time the steady state, not first-call set-up
            t0 = time.perf_counter()
            est.predict(X)
            seconds[label] = (time.perf_counter() - t0) / X.shape[0]
            maps_by_est[label] = fit_maps(est, ph.coefficients, mask, sigma=ph.sigma, progress=progress).arrays
            masks[label] = mask
        nlls = NLLSFitter(seq, basis=sim.basis_, estimate=names, tied_R1=True, progress=progress).fit()
        t0 = time.perf_counter()
        maps_by_est["NLLS"] = fit_maps(nlls, ph.coefficients, sub, sigma=ph.sigma, progress=False).arrays
        seconds["NLLS"] = (time.perf_counter() - t0) / sub.sum()
        masks["NLLS"] = sub

        say("[6/6] CRB at the true parameters and the comparison")
        theta_t = ph.theta[tissue]
        crb_t = cramer_rao_bound(seq, theta_t, estimate=names, tied_R1=True, basis=sim.basis_,
                                 M0=np.abs(ph.M0[tissue]),
                                 sigma=ph.sigma, on_singular="inf")
        crb_map = np.zeros(ph.labels.shape + (3,))
        crb_map[tissue] = crb_t
        cols = [INDEX[p] for p in names]
        results = []
        for label, m in maps_by_est.items():
            sel = masks[label] & tissue
            yt = ph.theta[sel][:, cols]
            yp = np.stack([m[p][sel] for p in names], axis=1)
            ok = np.all(np.isfinite(yp), axis=1) & np.all(np.isfinite(crb_map[sel]), axis=1)
            rep = bias_variance_report(yt[ok], yp[ok], crb=crb_map[sel][ok], groups=ph.labels[sel][ok],
                                       names=names)
            results.append({
                "name": label, "n_voxels": int(ok.sum()), "n_failed": int((~ok).sum()),
                "nmse": crb_normalized_mse(yt[ok], yp[ok], crb=crb_map[sel][ok], multioutput="raw_values").tolist(),
                "abs_bias": rep.summary["median_abs_bias_over_sqrt_crb"].tolist(),
                "std": rep.summary["median_std_over_sqrt_crb"].tolist(),
                "bias_by_tissue": rep.bias_over_sqrt_crb.tolist(), "std_by_tissue": rep.std_over_sqrt_crb.tolist(),
                "ms_per_voxel": 1e3 * seconds[label],
                "median_relative_residual": float(np.nanmedian(m["relative_residual"][sel])),
                "median_se_over_sqrt_crb": np.nanmedian(
                    np.stack([m[p + "_se"][sel] for p in names], 1)[ok] / np.sqrt(crb_map[sel][ok]), 0).tolist(),
            })
        ok_t = np.all(np.isfinite(crb_map[tissue]), axis=1)
        baseline = _constant_row(sim.prior_.center()[cols], ph.theta[tissue][:, cols][ok_t], crb_map[tissue][ok_t],
                                 ph.labels[tissue][ok_t], names)
        truth = {p: ph.theta[..., INDEX[p]] for p in names}
        medians = {"truth": _medians(ph, truth, ph.mask)}
        medians.update({k: _medians(ph, m, masks[k]) for k, m in maps_by_est.items()})
        table = _demo_table(results + [baseline], names)
        tissue_table = _tissue_table(medians)
        demo_figures(staging, ph, results, names, maps_by_est)
        # the phantom as a coefficient image and the CRB network, to try `sklearn-crb fit` on
        save_nifti(staging / "phantom_coefficients.nii.gz", ph.coefficients.astype(np.complex64),
                   dtype=np.complex64)
        save_model(nets["crb"], staging / "crb_model", simulator=sim)
        summary = {"quick": bool(quick), "seed": seed, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in cfg.items()},
                   "snr": DEMO_SNR, "train_snr": list(DEMO_TRAIN_SNR), "prior": "brain", "tied_R1": True,
                   "sequence": seq.name, "n_pulses": seq.n_pulses, "rank": 13, "basis_method": DEMO_BASIS,
                   "estimate": list(names), "train_seconds": train_s, "results": results, "baseline": baseline,
                   "tissue_medians": medians, "table": table, "tissue_table": tissue_table,
                   "seconds_total": time.perf_counter() - t_all}
        (staging / "results.json").write_text(json.dumps(summary, indent=1))
    say("")
    say(f"Phantom WM+GM voxels, WM |M0|/sigma {0.69 * DEMO_SNR:.0f}; nMSE = mean (estimate - truth)^2 / CRB; "
        "never read an nMSE below 1 without its bias:")
    say("bias and std over each tissue region, relative to sqrt(CRB) at the truth; NLLS on a voxel subset;")
    say("'prior mean' predicts the prior's centre whatever the data (std 0): the floor to judge nMSE against.")
    say(table)
    say("")
    say("Per-tissue medians (m0s, T1 = 1/R1f in s):")
    say(tissue_table)
    say("")
    say(f"wrote {out}/maps.png, error_maps.png, bias_std.png, results.json, phantom_coefficients.nii.gz, crb_model/")
    say(f"try:  sklearn-crb fit --model {out}/crb_model --coefficients {out}/phantom_coefficients.nii.gz "
        f"--out {out}/fit --times")
    say(f"demo finished in {time.perf_counter() - t_all:.0f} s")
    return summary
