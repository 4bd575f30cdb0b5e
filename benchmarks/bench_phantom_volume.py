"""NLLS reference maps through the CLI on a whole phantom slice and a 3-slice volume, with a measured B1 map.

    OMP_NUM_THREADS=1 python benchmarks/bench_phantom_volume.py [--slice 48 48] [--volume 48 48 3]
        [--snr 300] [--rank 13] [--compare-free] [--fast] [--out DIR]

The tied-model brain phantom (``sklearn_crb.phantom``) simulated with the
reference v3.2 sequence (``SKLEARN_CRB_DATA``, default ``../shared/data``)
and a rank-``r`` SVD basis is written as a NIfTI coefficient image (``2 r``
real channels, a non-trivial affine) with its true B1 map; then

    sklearn-crb fit --nlls --tied-R1 --sequence v3.2.mat --basis U.npy \\
        --coefficients coef.nii.gz --mask head.nii.gz --b1-map B1.nii.gz

fits every head voxel (``--compare-free``: also without ``--b1-map``, B1
estimated as a nuisance parameter). Reported per image: voxels/s (the CLI's
own fit time, from its summary.json), and per tissue the median bias and the
standard deviation of the estimates of m0s, R1f and R2f in units of
``sqrt(CRB)`` at the *true* parameters (the CRB with B1 known for the fixed
fit, estimated for the free one): an efficient, unbiased fit gives 0 and 1.
Writes ``benchmarks/results/bench_phantom_volume.json`` and ``.png`` and
prints a table. Measured on a shared machine: voxels/s depends on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from sklearn_crb.cli import main
from sklearn_crb.crb import cramer_rao_bound
from sklearn_crb.phantom import make_phantom
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator
from _results import save_figure, write_json

V32 = "control_MT_v3p2_TR3p5ms_discretized.mat"
NAMES = ("m0s", "R1f", "R2f")
TISSUES = ("WM", "GM", "CSF")
AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 2.0, -72.0], [0, 0, 0, 1]])


def _data_file():
    root = Path(os.environ.get("SKLEARN_CRB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / V32
    if not path.is_file():
        raise SystemExit(f"{V32} not found in SKLEARN_CRB_DATA={root}")
    return path


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
    if main([str(a) for a in argv]) != 0:
        raise SystemExit("sklearn-crb fit failed")
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())
    img = nib.load(out / "m0s.nii.gz")
    assert np.allclose(img.affine, AFFINE, atol=1e-5)
    return {"n_voxels": s["n_voxels_fitted"], "fit_seconds": s["seconds"], "wall_seconds": wall,
            "voxels_per_s": s["n_voxels_fitted"] / s["seconds"], "output_shape": list(img.shape),
            "fixed_maps": s["fixed_maps"]}


def run(slice_shape=(48, 48), volume_shape=(48, 48, 3), snr=300.0, rank=13, compare_free=False, out=None, seed=0,
        fast=False):
    seq_file = _data_file()
    seq = Sequence.from_mat(seq_file, TR=3.5e-3)
    sim = MTFingerprintSimulator(seq, n_components=rank, prior="brain", tied_R1=True, n_basis_samples=1000,
                                 random_state=seed).fit()
    results = {"snr": snr, "rank": rank, "sequence": V32, "model": "tied (R1s = R1f)", "fast": bool(fast),
               "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()), "images": {}}
    for label, shape in (("slice", tuple(slice_shape)), ("volume", tuple(volume_shape))):
        ph = make_phantom(shape, seq, basis=sim, snr=snr, tied_R1=True, random_state=seed + 1)
        work = Path(tempfile.mkdtemp(prefix=f"bench_volume_{label}_"))
        nifti_shape = _write(work, ph)
        entry = {"shape": list(shape), "nifti_shape": list(nifti_shape), "n_head_voxels": int(ph.mask.sum())}
        for mode in ("fixed_B1",) + (("free_B1",) if compare_free else ()):
            b1 = mode == "fixed_B1"
            entry[mode] = _fit(work, seq_file, work / mode, b1, fast)
            entry[mode]["recovery"] = _recovery(ph, work / mode, nifti_shape, b1)
            print(f"{label} {shape} {mode}: {entry[mode]['n_voxels']} voxels in {entry[mode]['fit_seconds']:.1f} s "
                  f"= {entry[mode]['voxels_per_s']:.1f} voxels/s", flush=True)
        entry["work_dir"] = str(work)
        results["images"][label] = entry
    results["load_average_at_end"] = list(os.getloadavg())
    out = Path(out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_phantom_volume.json", results)
    _table(results)
    _figure(results, out / "bench_phantom_volume.png")
    return results


def _table(results):
    print(f"\nNLLS via `sklearn-crb fit` (v3.2, tied, rank {results['rank']}, SNR {results['snr']:g}); "
          f"bias and std over sqrt(CRB at the true theta); load {results['load_average_at_start'][0]:.1f} on "
          f"{results['cpu_count']} CPUs")
    print(f"{'image':8s} {'B1':6s} {'vox/s':>6s} {'tissue':6s} {'n':>5s} {'flag%':>6s} " +
          " ".join(f"{p + ' bias':>9s} {p + ' std':>8s}" for p in NAMES))
    for label, e in results["images"].items():
        for mode in ("fixed_B1", "free_B1"):
            if mode not in e:
                continue
            r = e[mode]
            for t, row in r["recovery"].items():
                print(f"{label:8s} {mode[:5]:6s} {r['voxels_per_s']:6.1f} {t:6s} {row['n']:5d} "
                      f"{100 * row['flagged']:6.1f} " +
                      " ".join(f"{row[p]['median_bias_over_sqrt_crb']:9.2f} {row[p]['std_over_sqrt_crb']:8.2f}"
                               for p in NAMES))


def _figure(results, path):
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
    save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slice", type=int, nargs=2, default=(48, 48))
    ap.add_argument("--volume", type=int, nargs=3, default=(48, 48, 3))
    ap.add_argument("--snr", type=float, default=300.0)
    ap.add_argument("--rank", type=int, default=13)
    ap.add_argument("--compare-free", action="store_true", help="also fit with B1 estimated (no --b1-map)")
    ap.add_argument("--fast", action="store_true", help="fit with `sklearn-crb fit --fast` (the cold fast schedule)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run(a.slice, a.volume, a.snr, a.rank, a.compare_free, a.out, fast=a.fast)
