"""NLLS reference maps through the CLI on a whole phantom slice and a 3-slice volume, with a measured B1 map.

    OMP_NUM_THREADS=1 python benchmarks/bench_phantom_volume.py [--snr 300] [--fast] [--out DIR]

The tied-model brain phantom (``sklearn_crb.phantom``) simulated with the
reference v3.2 sequence (``SKLEARN_CRB_DATA``, default ``../shared/data``)
and a rank-13 SVD basis, on a 48 x 48 slice and a 48 x 48 x 3 volume, is
written as a NIfTI coefficient image (26
real channels, a non-trivial affine) with its true B1 map; then

    sklearn-crb fit --nlls --tied-R1 --sequence v3.2.mat --basis U.npy \\
        --coefficients coef.nii.gz --mask head.nii.gz --b1-map B1.nii.gz

fits every head voxel (``--fast``: with the CLI's fast schedule, written as
the variant ``phantom_volume-fast.json``). Reported per image: voxels/s (the CLI's
own fit time, from its summary.json), and per tissue the median bias and the
standard deviation of the estimates of m0s, R1f and R2f in units of
``sqrt(CRB)`` at the *true* parameters (the CRB with B1 known): an
efficient, unbiased fit gives 0 and 1. Writes ``phantom_volume.json`` and
``.png`` under ``--out``. Measured on a shared machine: voxels/s depends on
the load.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _harness import V32, parser, sequence, start, table, v32_path

from sklearn_crb import MTFingerprintSimulator, cramer_rao_bound, make_phantom
from sklearn_crb.cli import main as cli_main
from sklearn_crb.physics.parameters import INDEX

RANK = 13
NAMES = ("m0s", "R1f", "R2f")
TISSUES = ("WM", "GM", "CSF")
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]])


def _write(work, ph):
    c = ph.coefficients
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    shape = c.shape[:-1] if c.ndim == 4 else c.shape[:-1] + (1,)
    c = c.reshape(*shape, c.shape[-1])
    for name, arr in (("coef", np.concatenate([c.real, c.imag], -1).astype(np.float32)),
                      ("B1", ph.fixed_maps()["B1"].reshape(shape).astype(np.float32)),
                      ("head", ph.mask.reshape(shape).astype(np.uint8))):
        nib.save(nib.Nifti1Image(arr, AFFINE, header=hdr if name == "coef" else None), work / f"{name}.nii.gz")
    np.save(work / "U.npy", ph.basis)
    return shape


def _recovery(ph, out, shape, b1_known):
    """Per tissue: median bias and std of the estimates over sqrt(CRB(true theta)), and the flagged fraction."""
    nuisance = ("Rex", "T2s", "omega0") + (() if b1_known else ("B1",))
    est = {p: nib.load(out / f"{p}.nii.gz").get_fdata().reshape(ph.mask.shape) for p in NAMES}
    flags = nib.load(out / "flags.nii.gz").get_fdata().reshape(ph.mask.shape)
    res = {}
    for t in TISSUES:
        sel = ph.tissue_mask(t)
        crb = cramer_rao_bound(ph.sequence, ph.theta[sel], estimate=NAMES, nuisance=nuisance, tied_R1=True,
                               basis=ph.basis)
        sd = np.sqrt(crb) * ph.sigma / np.abs(ph.M0[sel])[:, None]
        row = {"n": int(sel.sum()), "flagged": float(np.mean(flags[sel] != 0))}
        for k, p in enumerate(NAMES):
            z = (est[p][sel] - ph.theta[sel][:, INDEX[p]]) / sd[:, k]
            z = z[np.isfinite(z)]
            row[p] = {"median_bias_over_sqrt_crb": float(np.median(z)), "std_over_sqrt_crb": float(np.std(z)),
                      "median_sqrt_crb": float(np.median(sd[:, k]))}
        res[t] = row
    return res


def _fit(work, seq_file, out, b1, fast=False):
    argv = ["fit", "--nlls", "--tied-R1", "--sequence", seq_file, "--basis", work / "U.npy", "--coefficients",
            work / "coef.nii.gz", "--mask", work / "head.nii.gz", "--out", out, "--quiet", "--overwrite"]
    if b1:
        argv += ["--b1-map", work / "B1.nii.gz"]
    if fast:
        argv += ["--fast"]
    t0 = time.perf_counter()
    if cli_main([str(a) for a in argv]) != 0:
        raise SystemExit("sklearn-crb fit failed")
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    img = nib.load(out / "m0s.nii.gz")
    assert np.allclose(img.affine, AFFINE, atol=1e-5)
    return {"n_voxels": s["n_voxels_fitted"], "fit_seconds": s["seconds"], "wall_seconds": wall,
            "voxels_per_s": s["n_voxels_fitted"] / s["seconds"], "output_shape": list(img.shape),
            "fixed_maps": s["fixed_maps"]}


def run(run_, seq_file, shapes, snr, seed, fast):
    seq = sequence(required=True)[0]
    sim = MTFingerprintSimulator(seq, n_components=RANK, prior="brain", tied_R1=True,
                                 n_basis_samples=100 if run_.args.quick else 1000, random_state=seed).fit()
    results = {"snr": snr, "rank": RANK, "sequence": V32, "model": "tied (R1s = R1f)", "fast": bool(fast),
               "images": {}}
    for label, shape in shapes.items():
        ph = make_phantom(shape, seq, basis=sim, snr=snr, tied_R1=True, random_state=seed + 1)
        with tempfile.TemporaryDirectory(prefix=f"bench_volume_{label}_") as tmp:
            work = Path(tmp)
            nifti_shape = _write(work, ph)
            entry = {"shape": list(shape), "nifti_shape": list(nifti_shape), "n_head_voxels": int(ph.mask.sum())}
            entry["fixed_B1"] = _fit(work, seq_file, work / "fixed_B1", True, fast)
            entry["fixed_B1"]["recovery"] = _recovery(ph, work / "fixed_B1", nifti_shape, True)
        run_.log(f"{label} {shape}: {entry['fixed_B1']['n_voxels']} voxels in {entry['fixed_B1']['fit_seconds']:.1f}"
                 f" s = {entry['fixed_B1']['voxels_per_s']:.1f} voxels/s")
        results["images"][label] = entry
    return results


def tables(results):
    rows = []
    for label, e in results["images"].items():
        r = e["fixed_B1"]
        for t, row in r["recovery"].items():
            rows.append([label, r["voxels_per_s"], t, row["n"], 100 * row["flagged"]]
                        + [row[p][k] for p in NAMES for k in ("median_bias_over_sqrt_crb", "std_over_sqrt_crb")])
    return [table(f"NLLS via `sklearn-crb fit --b1-map` (v3.2, tied, rank {results['rank']}, SNR {results['snr']:g})",
                  ["image", "voxels/s", "tissue", "n", "flagged %"]
                  + [f"{p} {k}" for p in NAMES for k in ("bias/√CRB", "std/√CRB")], rows,
                  "bias and std over sqrt(CRB at the true theta, B1 known)")]


def main(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--snr", type=float, default=300.0, help="1/sigma of the phantom (default 300)")
    p.add_argument("--fast", action="store_true", help="fit with `sklearn-crb fit --fast` (the cold fast schedule)")
    a = p.parse_args(argv)
    run_ = start("phantom_volume", "NLLS maps through the CLI on a phantom slice and volume with a measured B1 map",
                 a, argv, variant="fast" if a.fast else None)
    shapes = {"slice": (12, 12), "volume": (12, 12, 2)} if a.quick else {"slice": (48, 48), "volume": (48, 48, 3)}
    results = run(run_, v32_path(), shapes, a.snr, a.seed, a.fast)
    doc = run_.write(tables(results), results)
    _figure(results, run_)
    return doc


def _figure(results, run_):
    import matplotlib  # plotting only in the benchmark

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, mode, e[mode]) for label, e in results["images"].items() for mode in ("fixed_B1", "free_B1")
            if mode in e]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(TISSUES) * len(NAMES))
    ticks = [f"{t}\n{p}" for t in TISSUES for p in NAMES]
    for i, (label, mode, r) in enumerate(rows):
        bias = [r["recovery"][t][p]["median_bias_over_sqrt_crb"] for t in TISSUES for p in NAMES]
        std = [r["recovery"][t][p]["std_over_sqrt_crb"] for t in TISSUES for p in NAMES]
        kw = dict(width=width, label=f"{label} {mode} ({r['voxels_per_s']:.0f} vox/s)")
        axes[0].bar(x + i * width, bias, **kw)
        axes[1].bar(x + i * width, std, **kw)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[1].axhline(1, color="k", lw=0.8)
    for ax, title in zip(axes, ("median bias / sqrt(CRB)", "std / sqrt(CRB)")):
        ax.set_xticks(x + 0.4 - width / 2, ticks, fontsize=7)
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    run_.save_figure(fig, dpi=90)


if __name__ == "__main__":
    main()
