"""The ``sklearn-crb demo``: CRB loss versus MSE loss versus NLLS on a brain phantom.

A reduced version of the comparison of Zhang et al., "Cramér-Rao bound-
informed training of neural networks for quantitative MRI", MRM 2022;
88:436-448: two identical networks trained on simulated generalized-Bloch
MT fingerprints (Assländer et al., MRM 2022) of the built-in sequence, one
with the CRB-normalised loss and one with the MSE, and NLLS, applied to the
2-D brain phantom (:mod:`sklearn_crb.phantom`) and compared with the CRB at
the true parameters. The networks are :func:`sklearn_crb.recipes.make_network`'s, as the CLI's:
by default the pretrained pair shipped with the package (:mod:`sklearn_crb.pretrained`, rebuilt by
``scripts/build_pretrained.py`` at the full demo's budget), so that the demo takes about a minute;
``train=True`` (``sklearn-crb demo --train``) trains both here, as the full comparison always did.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import joblib
import numpy as np
import torch

from sklearn_crb._atomic import atomic_dir, claim_output
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.estimators.nlls import NLLSFitter, NLLSFitWarning
from sklearn_crb.io._files import check_output_folder, releases_claims
from sklearn_crb.io.datasets import simulate_dataset
from sklearn_crb.io.images import features_from_coefficients, save_nifti
from sklearn_crb.io.models import MODEL_FILES, save_model
from sklearn_crb.maps import FLAGS, fit_maps
from sklearn_crb.metrics import bias_variance_report, crb_normalized_mse
from sklearn_crb.phantom import LABELS, make_phantom
from sklearn_crb.physics.parameters import INDEX, free_parameters
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.pretrained import list_pretrained, load_pretrained, pretrained_basis, pretrained_provenance
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
    """One demo network (a joblib task): the default recipe at the demo's budget; (net, seconds).

    Unconditioned (``noise_input=False``), as the shipped pretrained pair: the demo compares the CRB loss
    with the MSE loss of Zhang et al., and its networks take the coefficients only.
    """
    t0 = time.perf_counter()
    net = make_network(loss, sim, epochs=epochs, device="cpu", seed=seed, progress=progress, noise_input=False)
    net.set_params(augment=True)
    net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
    return net, time.perf_counter() - t0


def _demo_simulator(seq, seed, basis=None, n_basis=500):
    """The demo's simulator: tied model, brain prior, every free parameter; a given basis or the CRB basis."""
    # the CRB-optimised basis (Mao et al., arXiv 2305.00326): on the built-in sequence the rank-13 SVD
    # basis inflates sqrt(CRB(m0s)) in WM 5x over the full signal (0.11 against 0.020 at the demo's SNR),
    # the CRB basis about 1.1x (0.022); measured with benchmarks/bench_basis.py-style CRBs
    return MTFingerprintSimulator(seq, n_components=13, basis=basis, estimate=free_parameters(True),
                                  n_basis_samples=n_basis, basis_method="svd" if basis is not None else DEMO_BASIS,
                                  snr=DEMO_TRAIN_SNR, tied_R1=True, prior="brain", random_state=seed).fit()


def _trained_networks(seq, cfg, seed, progress, say):
    """``--train``: simulate the training set and train both networks here; (sim, nets, info)."""
    say(f"[1/6] {DEMO_BASIS.upper()} basis and {cfg['n_train']} training fingerprints with CRBs ({seq.n_pulses} "
        "pulses, rank 13, brain prior, tied T1)")
    sim = _demo_simulator(seq, seed, n_basis=cfg["n_basis"])
    data = simulate_dataset(sim, cfg["n_train"], seed, progress=progress)
    say(f"[2/6] training the CRB-loss and the MSE-loss networks (default recipe, {cfg['epochs']} epochs"
        f"{', side by side' if _two_cores() else ''})")
    jobs = [joblib.delayed(_train)(loss, sim, data, cfg["epochs"], seed, progress and not _two_cores())
            for loss in ("crb", "mse")]
    trained = joblib.Parallel(n_jobs=2 if _two_cores() else 1, backend="loky")(jobs)
    nets = {loss: net for loss, (net, _) in zip(("crb", "mse"), trained)}
    train_s = {loss: t for loss, (_, t) in zip(("crb", "mse"), trained)}
    say(f"[3/6] trained in {train_s['crb']:.0f} s (CRB) and {train_s['mse']:.0f} s (MSE)")
    return sim, nets, {"pretrained": False, "train_seconds": train_s, "n_train": cfg["n_train"],
                       "epochs": cfg["epochs"]}


def _shipped_networks(seq, seed, say):
    """Default: the pretrained pair for the built-in sequence, in its shipped basis; (sim, nets, info)."""
    basis = pretrained_basis(seq)
    nets = {loss: load_pretrained(seq, basis, loss=loss, device="cpu") for loss in ("crb", "mse")}
    prov = {loss: pretrained_provenance(f"demo-{loss}") for loss in nets}
    p = prov["crb"]
    say(f"[1-3/6] the shipped CRB-loss and MSE-loss networks for the built-in sequence ({seq.n_pulses} pulses, "
        f"rank {basis.shape[1]} CRB basis, brain prior, tied T1; default recipe, {p['training_set']['n_samples']} "
        f"draws x {p['recipe']['epochs']} epochs; `sklearn-crb demo --train` trains them here)")
    sim = _demo_simulator(seq, seed, basis=basis)
    return sim, nets, {"pretrained": True, "provenance": {k: {f: v[f] for f in ("name", "seed", "commit", "date",
                                                                               "command")}
                                                          for k, v in prov.items()},
                       "n_train": p["training_set"]["n_samples"], "epochs": p["recipe"]["epochs"]}


def _fmt_median(value, bound):
    """A median, with the bound it sits at marked as such (``"≥ 1000 (bound)"``)."""
    if bound is None:
        return f"{value:.3g}"
    return f"{'≥' if bound == 'upper' else '≤'} {value:.4g} (bound)"


def _tissue_table(medians):
    """Per-tissue medians of m0s and T1 (s): truth and every estimator; bounds of the fit box marked."""
    w = 15
    head = f"{'':<11}" + "".join(f" {t + ' m0s':>{w}} {t + ' T1/s':>{w}}" for t in _TISSUES)
    lines = [head, "-" * len(head)]
    for name, med in medians.items():
        cells = []
        for t in _TISSUES:
            if t not in med:
                cells.append(f" {'':>{w}} {'':>{w}}")
                continue
            m = med[t]
            cells.append(f" {_fmt_median(m['m0s'], m.get('m0s_bound')):>{w}} "
                         f"{_fmt_median(m['T1'], m.get('T1_bound')):>{w}}")
        lines.append(f"{name:<11}" + "".join(cells))
    return "\n".join(lines)


def _at_bound(value, box):
    """``"lower"``/``"upper"`` when ``value`` sits at a bound of the fit box ``(lo, hi)`` (1e-6 of its width)."""
    if box is None:
        return None
    lo, hi = box
    tol = 1e-6 * (hi - lo)
    return "lower" if value <= lo + tol else "upper" if value >= hi - tol else None


def _medians(ph, m, mask, bounds=None):
    """Median m0s and T1 = 1/R1f per tissue over ``mask``; ``*_bound`` names the fit-box bound a median sits at
    (``bounds``: the NLLS box of m0s and R1f; a lower bound of R1f is an upper bound of T1)."""
    bounds = bounds or {}
    flip = {"lower": "upper", "upper": "lower", None: None}
    out = {}
    for t in _TISSUES:
        sel = mask & ph.tissue_mask(t) & np.isfinite(m["m0s"]) & np.isfinite(m["R1f"])
        if sel.any():
            m0s, r1 = float(np.median(m["m0s"][sel])), float(np.median(m["R1f"][sel]))
            out[t] = {"m0s": m0s, "T1": 1 / r1, "m0s_bound": _at_bound(m0s, bounds.get("m0s")),
                      "T1_bound": flip[_at_bound(r1, bounds.get("R1f"))]}
    return out


def _demo_table(rows, names):
    head = f"{'estimator':<11} {'param':<6} {'nMSE':>8} {'|bias|/sqrtCRB':>15} {'std/sqrtCRB':>12} {'ms/voxel':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for j, p in enumerate(names):
            ms = r.get("ms_per_voxel", float("nan")) if j == 0 else float("nan")
            lines.append(f"{r['name'] if j == 0 else '':<11} {p:<6} {r['nmse'][j]:>8.3g} {r['abs_bias'][j]:>15.3g} "
                         f"{r['std'][j]:>12.3g} {ms:>9.3g}".replace("nan", "   "))
    return "\n".join(lines)


def _constant_row(prior_mean, yt, crb, labels, names):
    """The prior-mean predictor (ignores the data): nMSE, |bias|/sqrt(CRB) per tissue and std 0."""
    err = prior_mean[None, :] - yt
    nmse = np.mean(err**2 / crb, axis=0)
    per = np.array([np.median(np.abs(err[labels == g]) / np.sqrt(crb[labels == g]), axis=0)
                    for g in np.unique(labels)])
    return {"name": "prior mean", "n_voxels": int(len(yt)), "nmse": nmse.tolist(),
            "abs_bias": np.median(per, axis=0).tolist(), "std": [0.0] * len(names), "constant": prior_mean.tolist()}




def _nlls_voxels(ph, n_nlls, seed):
    """A few voxels of each tissue for NLLS (a bool mask)."""
    rng = np.random.default_rng(seed)
    sub = np.zeros(ph.labels.shape, dtype=bool)
    per = max(1, n_nlls // 3)
    for t in _TISSUES:
        idx = np.flatnonzero(ph.tissue_mask(t))
        sub.flat[rng.choice(idx, size=min(per, idx.size), replace=False)] = True
    return sub


def _fit_phantom(ph, nets, seq, sim, sub, names, progress):
    """Maps of both networks (all voxels) and of NLLS (cold start, ``sub``); (maps, seconds/voxel, masks, nlls)."""
    maps_by_est, seconds, masks = {}, {}, {}
    for label, est in (("CRB net", nets["crb"]), ("MSE net", nets["mse"])):
        X = features_from_coefficients(ph.coefficients[ph.mask])
        est.predict(X[:16])  # warm-up: time the steady state, not first-call set-up
        t0 = time.perf_counter()
        est.predict(X)
        seconds[label] = (time.perf_counter() - t0) / X.shape[0]
        maps_by_est[label] = fit_maps(est, ph.coefficients, ph.mask, sigma=ph.sigma, progress=progress).arrays
        masks[label] = ph.mask
    nlls = NLLSFitter(seq, basis=sim.basis_, estimate=names, tied_R1=True, progress=progress).fit()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NLLSFitWarning)
        maps_by_est["NLLS"] = fit_maps(nlls, ph.coefficients, sub, sigma=ph.sigma, progress=False).arrays
    seconds["NLLS"] = (time.perf_counter() - t0) / sub.sum()
    masks["NLLS"] = sub
    _nlls_warnings(caught, maps_by_est["NLLS"], sub)
    return maps_by_est, seconds, masks, nlls


def _nlls_warnings(caught, maps, sub):
    """NLLS's warnings, in the demo's terms (the fitter's speak of ``predict_details``, which a demo user
    never called); any other warning passes unchanged."""
    for w in caught:
        if issubclass(w.category, NLLSFitWarning):
            n = int(np.count_nonzero(np.asarray(maps["flags"])[sub] & FLAGS["estimator_failed"]))
            warnings.warn(f"NLLS: {n} of {int(sub.sum())} phantom voxels did not converge or failed (cold start); "
                          "they are flagged in its maps, and those without an estimate are left out of its row",
                          NLLSFitWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _result_row(label, m, sel, ph, crb_map, names, seconds):
    """One estimator's row of the comparison over the voxels ``sel``."""
    cols = [INDEX[p] for p in names]
    yt = ph.theta[sel][:, cols]
    yp = np.stack([m[p][sel] for p in names], axis=1)
    ok = np.all(np.isfinite(yp), axis=1) & np.all(np.isfinite(crb_map[sel]), axis=1)
    rep = bias_variance_report(yt[ok], yp[ok], crb=crb_map[sel][ok], groups=ph.labels[sel][ok], names=names)
    return {
        "name": label, "n_voxels": int(ok.sum()), "n_failed": int((~ok).sum()),
        "nmse": crb_normalized_mse(yt[ok], yp[ok], crb=crb_map[sel][ok], multioutput="raw_values").tolist(),
        "abs_bias": rep.summary["median_abs_bias_over_sqrt_crb"].tolist(),
        "std": rep.summary["median_std_over_sqrt_crb"].tolist(),
        "bias_by_tissue": rep.bias_over_sqrt_crb.tolist(), "std_by_tissue": rep.std_over_sqrt_crb.tolist(),
        "ms_per_voxel": 1e3 * seconds,
        "median_relative_residual": float(np.nanmedian(m["relative_residual"][sel])),
        "median_se_over_sqrt_crb": np.nanmedian(
            np.stack([m[p + "_se"][sel] for p in names], 1)[ok] / np.sqrt(crb_map[sel][ok]), 0).tolist(),
    }


def _compare(ph, seq, sim, maps_by_est, masks, seconds, names):
    """The CRB at the true parameters (WM and GM) and every estimator's row, with the prior-mean row."""
    tissue = np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])
    crb_t = cramer_rao_bound(seq, ph.theta[tissue], estimate=names, tied_R1=True, basis=sim.basis_,
                             M0=np.abs(ph.M0[tissue]), sigma=ph.sigma, on_singular="inf")
    crb_map = np.zeros(ph.labels.shape + (3,))
    crb_map[tissue] = crb_t
    results = [_result_row(label, m, masks[label] & tissue, ph, crb_map, names, seconds[label])
               for label, m in maps_by_est.items()]
    cols = [INDEX[p] for p in names]
    ok_t = np.all(np.isfinite(crb_map[tissue]), axis=1)
    baseline = _constant_row(sim.prior_.center()[cols], ph.theta[tissue][:, cols][ok_t], crb_map[tissue][ok_t],
                             ph.labels[tissue][ok_t], names)
    return results, baseline


def _copy_model(net, folder):
    """The shipped model folder, byte for byte (its hashes stay those of the package's copy)."""
    src = next(e["path"] for e in list_pretrained() if e["basis_sha256"] == net.crb_metadata_["basis_sha256"]
               and e["loss"] == "crb")
    folder.mkdir()
    for f in MODEL_FILES:
        (folder / f).write_bytes((src / f).read_bytes())


def _report(say, out, table, tissue_table, t_all):
    say("")
    say(f"Phantom WM+GM voxels, WM |M0|/sigma {0.69 * DEMO_SNR:.0f}; nMSE = mean (estimate - truth)^2 / CRB; "
        "never read an nMSE below 1 without its bias:")
    say("bias and std over each tissue region, relative to sqrt(CRB) at the truth; NLLS on a voxel subset;")
    say("'prior mean' predicts the prior's centre whatever the data (std 0): the floor to judge nMSE against.")
    say(table)
    say("")
    say("Per-tissue medians (m0s, T1 = 1/R1f in s; '(bound)': NLLS stopped at its fit box, the value is a limit):")
    say(tissue_table)
    say("")
    say(f"wrote {out}/maps.png, error_maps.png, bias_std.png, results.json, phantom_coefficients.nii.gz, crb_model/")
    say(f"try:  sklearn-crb fit --model {out}/crb_model --coefficients {out}/phantom_coefficients.nii.gz "
        f"--out {out}/fit --times")
    say(f"demo finished in {time.perf_counter() - t_all:.0f} s")


@releases_claims
def run_demo(out="sklearn_crb_demo", quick=False, seed=0, progress=True, stream=None, overwrite=False, train=False):
    """The ``sklearn-crb demo`` pipeline; returns the results dict.

    Compares a CRB-loss and an MSE-loss network of the package's default
    recipe (:func:`sklearn_crb.recipes.make_network`) on fingerprints of the
    built-in sequence simulated from the ``"brain"`` prior of the tied model
    (rank-13 CRB basis; every free parameter estimated, as ``sklearn-crb
    simulate`` does by default, so that the maps are evaluated at the
    network's own estimates; m0s, R1f and R2f are reported). By default the
    two networks are the pretrained pair shipped with the package
    (:func:`sklearn_crb.pretrained.load_pretrained`, trained by
    ``scripts/build_pretrained.py`` at the full budget, 96,000 draws x 150
    epochs); with ``train=True`` they are trained here (at the demo's budget,
    ``DEMO_SIZES``; side by side in two processes where the machine has two
    cores). It fits the tied-model brain phantom at in-vivo SNR (``|M0|/sigma
    = 80`` in WM) with both and with NLLS (cold start, on a voxel subset),
    and compares them on the WM and GM voxels against the CRB at the true
    parameters (Zhang et al., MRM 2022, Figs. 4-6, at demo size), beside a
    constant prior-mean predictor, with per-tissue medians of m0s and T1
    (WM, GM, CSF; NLLS medians at its fit box marked as bounds).

    ``quick`` shrinks the phantom and the NLLS subset (and, with ``train``,
    the training budget). ``out`` is written as a whole, atomically; an
    existing ``out`` is replaced only with ``overwrite=True`` and only if it
    holds nothing but a previous demo's outputs (``DEMO_FILES``).
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
        if train:
            sim, nets, info = _trained_networks(seq, cfg, seed, progress, say)
        else:
            sim, nets, info = _shipped_networks(seq, seed, say)
        say(f"[4/6] brain phantom {cfg['shape'][0]}x{cfg['shape'][1]} (tied-model tissues), 1/sigma {DEMO_SNR:g} "
            f"(WM |M0|/sigma {0.69 * DEMO_SNR:.0f})")
        ph = make_phantom(cfg["shape"], seq, basis=sim, snr=DEMO_SNR, tied_R1=True, random_state=seed + 1)
        sub = _nlls_voxels(ph, cfg["n_nlls"], seed)
        say("[5/6] fitting the phantom: CRB net, MSE net (all voxels), NLLS (cold start, "
            f"{int(sub.sum())} voxels)")
        maps_by_est, seconds, masks, nlls = _fit_phantom(ph, nets, seq, sim, sub, names, progress)

        say("[6/6] CRB at the true parameters and the comparison")
        results, baseline = _compare(ph, seq, sim, maps_by_est, masks, seconds, names)
        truth = {p: ph.theta[..., INDEX[p]] for p in names}
        medians = {"truth": _medians(ph, truth, ph.mask)}
        medians.update({k: _medians(ph, m, masks[k], nlls.bounds_ if k == "NLLS" else None)
                        for k, m in maps_by_est.items()})
        table = _demo_table(results + [baseline], names)
        tissue_table = _tissue_table(medians)
        demo_figures(staging, ph, results, names, maps_by_est)
        # the phantom as a coefficient image and the CRB network, to try `sklearn-crb fit` on
        save_nifti(staging / "phantom_coefficients.nii.gz", ph.coefficients.astype(np.complex64),
                   dtype=np.complex64)
        if train:
            save_model(nets["crb"], staging / "crb_model", simulator=sim)
        else:
            _copy_model(nets["crb"], staging / "crb_model")
        sizes = dict(cfg, n_train=info["n_train"], epochs=info["epochs"])
        summary = {"quick": bool(quick), "seed": seed, "pretrained": info["pretrained"],
                   "networks": info.get("provenance"),
                   "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
                   "snr": DEMO_SNR, "train_snr": list(DEMO_TRAIN_SNR), "prior": "brain", "tied_R1": True,
                   "sequence": seq.name, "n_pulses": seq.n_pulses, "rank": 13, "basis_method": DEMO_BASIS,
                   "estimate": list(names), "train_seconds": info.get("train_seconds"), "results": results,
                   "baseline": baseline, "tissue_medians": medians, "table": table, "tissue_table": tissue_table,
                   "seconds_total": time.perf_counter() - t_all}
        (staging / "results.json").write_text(json.dumps(summary, indent=1))
    _report(say, out, table, tissue_table, t_all)
    return summary
