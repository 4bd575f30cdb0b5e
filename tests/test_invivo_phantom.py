"""The tied-model brain phantom at in-vivo SNR through the CLI (issue: "Phantom at in-vivo SNR").

On the published v3.2 sequence (the one the in-vivo data come from):
``sklearn-crb simulate`` (defaults: brain prior, SNR 10-400; ``--tied-R1``),
``train`` (the estimator's default recipe) and ``fit --model`` on the tied
phantom with ``|M0|/sigma = 80`` in WM, against ``fit --nlls`` (tied NLLS) on
a subset of voxels of each tissue of the same image:

* the network's per-tissue median m0s and T1 within 10 % of NLLS's (WM, GM);
* its WM-GM m0s contrast within 15 % of NLLS's;
* CSF m0s <= 0.03;
* its standard-error maps within 25 % of the empirical spread over noise
  draws (Python API: ``load_model`` + ``fit_maps`` on repeated draws);
* on a phantom simulated with the unconstrained two-pool model, which the
  tied model misspecifies as it does real tissue, the same medians and
  contrast against tied NLLS on the same image.

Reduced budget, to stay within about 5 minutes on 2 cores: ``--n-samples``
``N_TRAIN`` instead of the default 96,000 (everything else is the default
recipe: the network is told the noise level, which ``fit`` estimates from the
image first). The full-default run is ``benchmarks/bench_phantom.py``.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import V32_NAME, require_data_file

from sklearn_crb.cli import main

pytestmark = pytest.mark.slow

N_TRAIN = 24000
SNR = 116.0  # 1/sigma: WM |M0| = 0.69 -> |M0|/sigma = 80
# NLLS voxels per tissue: GM m0s scatters 0.05 per voxel at this SNR (30 left the GM median 12 % uncertain)
N_NLLS = 120
N_DRAWS = 4  # noise draws for the empirical spread
N_SE = 40  # voxels per tissue (WM, GM) in the spread check


def _load(path):
    return nib.load(path).get_fdata()[..., 0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sklearn_crb import Sequence
    from sklearn_crb.io.datasets import load_dataset
    from sklearn_crb.phantom import make_phantom

    mat = require_data_file(V32_NAME)
    d = tmp_path_factory.mktemp("invivo")
    q = ["--quiet"]
    assert main(["simulate", "--sequence", str(mat), "--out", str(d / "train.npz"), "--tied-R1",
                 "--n-samples", str(N_TRAIN), *q]) == 0
    assert main(["train", "--data", str(d / "train.npz"), "--out", str(d / "model"),
                 "--device", "cpu", *q]) == 0
    U = load_dataset(d / "train.npz")["basis"]
    np.save(d / "U.npy", U)
    seq = Sequence.from_mat(mat, TR=3.5e-3)
    ph = make_phantom((40, 40), seq, basis=U, snr=SNR, tied_R1=True, random_state=1)
    c = ph.coefficients[:, :, None, :]
    nib.save(nib.Nifti1Image(c.astype(np.complex64), np.eye(4)), d / "coef.nii.gz")
    rng = np.random.default_rng(0)
    sub = np.zeros(ph.labels.shape, dtype=bool)
    for t in ("WM", "GM", "CSF"):
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), N_NLLS, replace=False)] = True
    np.save(d / "sub.npy", sub[:, :, None].astype(np.uint8))
    assert main(["fit", "--model", str(d / "model"), "--coefficients", str(d / "coef.nii.gz"),
                 "--out", str(d / "net"), *q]) == 0
    assert main(["fit", "--nlls", "--tied-R1", "--sequence", str(mat), "--basis", str(d / "U.npy"), "--coefficients",
                 str(d / "coef.nii.gz"), "--mask", str(d / "sub.npy"), "--out", str(d / "nlls"), *q]) == 0
    maps = {k: {p: _load(d / k / f"{p}.nii.gz") for p in ("m0s", "R1f", "flags", "mask")} for k in ("net", "nlls")}
    med = {}
    for k, m in maps.items():
        for t in ("WM", "GM", "CSF"):
            # medians over every fitted voxel: only invalid input (1) and estimator failure (2) are left out;
            # CSF voxels (m0s ~ 0.01) are expected to carry the singular-CRB flag (Rex, T2s unidentifiable)
            a = m
            sel = ph.tissue_mask(t) & (a["mask"] > 0) & ((a["flags"].astype(int) & 3) == 0)
            med[k, t] = {"m0s": float(np.median(a["m0s"][sel])), "T1": float(np.median(1 / a["R1f"][sel])),
                         "n": int(sel.sum())}
    print(json.dumps({f"{k}/{t}": v for (k, t), v in med.items()}))
    return d, ph, med


def test_median_m0s_and_T1_within_10_percent_of_nlls(run):
    """Measured (2 cores): net WM m0s 0.137 / T1 1.51 s, GM 0.082 / 2.05 s against NLLS (120 voxels per
    tissue) 0.136 / 1.50 s and 0.087 / 2.03 s. With 12,000 x 300 GM m0s was 13 % low; with the CRB
    weight at the truth (``crb_at="truth"``) 17-23 % low in WM and GM."""
    _, _, med = run
    for t in ("WM", "GM"):
        assert med["nlls", t]["n"] >= N_NLLS // 2 and med["net", t]["n"] > 50
        for p in ("m0s", "T1"):
            rel = med["net", t][p] / med["nlls", t][p] - 1
            assert abs(rel) <= 0.10, (t, p, med["net", t][p], med["nlls", t][p])


def test_wm_gm_m0s_contrast_within_15_percent_of_nlls_or_nearer_the_truth(run):
    """The network's WM-GM m0s contrast lands where NLLS's does, or nearer the phantom's truth.

    NLLS's medians (120 voxels per tissue) are themselves biased at this SNR: measured WM m0s 0.136 and
    GM 0.087 against the truth's 0.14 and 0.08, a contrast 18 % low. The unconditioned network of
    release 0.2 landed within 12 % of NLLS's contrast; the noise-aware network (issue 27) lands within
    4 % of the truth's, 17 % above NLLS's. Either is accepted: within 15 % of NLLS's, or within 15 %
    of the truth's and nearer to it than NLLS's.
    """
    _, ph, med = run
    net = med["net", "WM"]["m0s"] - med["net", "GM"]["m0s"]
    nlls = med["nlls", "WM"]["m0s"] - med["nlls", "GM"]["m0s"]
    truth = float(np.median(ph.parameter_map("m0s")[ph.tissue_mask("WM")])
                  - np.median(ph.parameter_map("m0s")[ph.tissue_mask("GM")]))
    assert nlls > 0.03  # the phantom has the contrast (0.14 against 0.08)
    near_nlls = abs(net / nlls - 1) <= 0.15
    nearer_truth = abs(net / truth - 1) <= 0.15 and abs(net - truth) < abs(nlls - truth)
    assert near_nlls or nearer_truth, (net, nlls, truth)


def test_csf_m0s_is_small(run):
    _, _, med = run
    assert med["net", "CSF"]["m0s"] <= 0.03


def test_standard_error_maps_match_the_spread_over_noise_draws(run):
    """Per WM/GM voxel, N_DRAWS noise draws of the same phantom; the pooled within-voxel std of the
    network's m0s and R1f against the RMS of its standard-error maps (the network's delta-method standard
    error, with sigma estimated per draw from the tangent-projected residuals)."""
    from sklearn_crb.io.models import load_model
    from sklearn_crb.maps import fit_maps
    from sklearn_crb.phantom import make_phantom

    d, ph, _ = run
    net = load_model(d / "model", device="cpu")
    est, se = {p: [] for p in ("m0s", "R1f")}, {p: [] for p in ("m0s", "R1f")}
    sigmas = []
    rng = np.random.default_rng(1)
    sub = np.zeros(ph.labels.shape, dtype=bool)
    for t in ("WM", "GM"):
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), N_SE, replace=False)] = True
    for k in range(N_DRAWS):
        ph_k = make_phantom(ph.labels.shape, ph.sequence, basis=ph.basis, snr=SNR, tied_R1=True,
                            random_state=100 + k)
        m = fit_maps(net, ph_k.coefficients, sub)
        sigmas.append(m.sigma)
        for p in est:
            est[p].append(m.arrays[p])
            se[p].append(m.arrays[p + "_se"])
    assert np.median(sigmas) == pytest.approx(1 / SNR, rel=0.20)  # sigma within 20 % of the truth
    for t in ("WM", "GM"):
        sel = ph.tissue_mask(t) & sub
        for p in est:
            e = np.stack(est[p])[:, sel]
            spread = np.sqrt(np.mean(np.var(e, axis=0, ddof=1)))
            rms_se = np.sqrt(np.mean(np.stack(se[p])[:, sel] ** 2))
            assert 0.75 <= spread / rms_se <= 1.25, (t, p, spread, rms_se)


def test_outputs_are_the_cli_files(run):
    d, _, _ = run
    assert {"m0s.nii.gz", "m0s_se.nii.gz", "summary.json"} <= set(os.listdir(d / "net"))


def _tissue_medians(maps, ph, sel):
    out = {}
    for t in ("WM", "GM"):
        m = ph.tissue_mask(t) & sel & np.isfinite(maps["m0s"]) & ((maps["flags"] & 3) == 0)
        out[t] = {"m0s": float(np.median(maps["m0s"][m])), "T1": float(np.median(1 / maps["R1f"][m])),
                  "n": int(m.sum())}
    return out


def test_misspecified_tissue_lands_where_tied_nlls_does(run):
    """Real tissue does not obey the tied model (the fast semi-solid T1: T1s 0.34 s against T1f 1.9 s).
    On the phantom simulated with the unconstrained model (``TISSUES``: WM m0s 0.20, T1f 1.92 s), tied
    NLLS absorbs that into a smaller m0s and a shorter T1; the tied network sees fingerprints off its
    training manifold and must land where NLLS does. Measured (2 cores, this module's 24,000-draw net):
    WM m0s 0.139 / T1 1.57 s against NLLS's 0.141 / 1.56 s, GM 0.085 / 2.20 s against 0.085 / 2.19 s,
    contrast -2 %."""
    from sklearn_crb import NLLSFitter
    from sklearn_crb.io.models import load_model
    from sklearn_crb.maps import fit_maps
    from sklearn_crb.phantom import TISSUES, make_phantom
    from sklearn_crb.physics.parameters import free_parameters

    d, ph_tied, _ = run
    ph = make_phantom(ph_tied.labels.shape, ph_tied.sequence, basis=ph_tied.basis, snr=SNR, tied_R1=False,
                      random_state=2)
    assert ph.parameter_map("R1s")[ph.tissue_mask("WM")][0] > 5 * ph.parameter_map("R1f")[ph.tissue_mask("WM")][0]
    rng = np.random.default_rng(2)
    sub = np.zeros(ph.labels.shape, dtype=bool)
    for t in ("WM", "GM"):
        sub.flat[rng.choice(np.flatnonzero(ph.tissue_mask(t)), N_NLLS, replace=False)] = True
    net = load_model(d / "model", device="cpu")
    nlls = NLLSFitter(ph.sequence, basis=ph.basis, estimate=free_parameters(True), tied_R1=True).fit()
    med_net = _tissue_medians(fit_maps(net, ph.coefficients, ph.mask, compute_se=False).arrays, ph, ph.mask)
    med_nlls = _tissue_medians(fit_maps(nlls, ph.coefficients, sub, compute_se=False).arrays, ph, sub)
    print(json.dumps({"net": med_net, "nlls": med_nlls}))
    # the misspecification is real: the tied fit is far from the unconstrained truth
    assert med_nlls["WM"]["m0s"] < 0.85 * TISSUES["WM"]["m0s"]
    for t in ("WM", "GM"):
        assert med_nlls[t]["n"] >= N_NLLS // 2
        for p in ("m0s", "T1"):
            rel = med_net[t][p] / med_nlls[t][p] - 1
            assert abs(rel) <= 0.10, (t, p, med_net[t][p], med_nlls[t][p])
    net_c = med_net["WM"]["m0s"] - med_net["GM"]["m0s"]
    nlls_c = med_nlls["WM"]["m0s"] - med_nlls["GM"]["m0s"]
    assert nlls_c > 0.03 and abs(net_c / nlls_c - 1) <= 0.15, (net_c, nlls_c)
