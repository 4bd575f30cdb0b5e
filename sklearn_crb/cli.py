"""The ``sklearn-crb`` command line: demo, simulate, train and fit.

``sklearn-crb demo``
    Simulates training data with the built-in sequence, trains a CRB-loss
    and an MSE-loss network, fits the brain phantom with both and with NLLS,
    prints a comparison table and writes PNG figures (no downloads, no data
    files).
``sklearn-crb simulate``
    Writes a training set (features, targets, CRBs, noise-free features,
    basis and sequence) to ``.npz`` or HDF5.
``sklearn-crb train``
    Trains a network from such a set and saves it (``sklearn_crb.model_io``).
``sklearn-crb fit``
    Applies a saved network or NLLS to a coefficient image and writes NIfTI
    maps (with the input's affine/header), standard-error, residual and flag
    maps, and a PNG overview.

Every output is written atomically: a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------- helpers
class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _sequence(args):
    from sklearn_crb.physics.sequence import Sequence

    if getattr(args, "sequence", None):
        return Sequence.from_mat(args.sequence, TR=args.TR)
    return Sequence.default(n_pulses=args.n_pulses, TR=args.TR)


def _commit(staging, outdir):
    """Move every file of ``staging`` into ``outdir`` (all written already)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in sorted(Path(staging).iterdir()):
        os.replace(f, outdir / f.name)
        moved.append(outdir / f.name)
    return moved


class _Staging:
    """A temporary directory inside ``outdir``'s parent, removed on exit."""

    def __init__(self, outdir):
        self.outdir = Path(outdir)

    def __enter__(self):
        self.outdir.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.outdir.name}.", suffix=".tmp", dir=self.outdir.parent))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        return False


def _add_sequence_args(p, basis=True):
    g = p.add_argument_group("sequence and basis")
    g.add_argument("--sequence", help="MATLAB file with alpha (rad) and TRF (s); default: the built-in sequence")
    g.add_argument("--TR", type=float, default=3.5e-3, help="repetition time in s (default 3.5e-3)")
    g.add_argument("--n-pulses", type=int, default=1142, help="length of the built-in sequence (default 1142)")
    if basis:
        g.add_argument("--basis", help="compression basis (n_pulses x r; .npy/.npz/.mat/.nii); default: SVD")
        g.add_argument("--rank", type=int, default=13, help="rank of the SVD basis (default 13)")


# --------------------------------------------------------------------------- simulate
def _save_dataset(path, data):
    path = Path(path)
    from sklearn_crb._atomic import atomic_path

    suffix = path.suffix.lower()
    if suffix not in (".npz", ".h5", ".hdf5"):
        raise CLIError(f"--out must end in .npz, .h5 or .hdf5, got {path.name}")
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            np.savez_compressed(tmp, **data)
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                for k, v in data.items():
                    f.create_dataset(k, data=v)
    return path


def load_dataset(path):
    """Read a training set written by ``sklearn-crb simulate`` (``.npz`` or HDF5)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--data: file not found: {path}")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        else:
            import h5py

            with h5py.File(path, "r") as f:
                data = {k: f[k][()] for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise CLIError(f"--data: {path} is truncated or not a training set ({type(exc).__name__}: {exc})") from exc
    need = {"X", "y", "crb", "basis", "meta"}
    if not need <= set(data):
        raise CLIError(f"--data: {path} lacks {sorted(need - set(data))}; write it with `sklearn-crb simulate`")
    meta = data["meta"]
    data["meta"] = json.loads(meta.decode() if isinstance(meta, bytes) else str(meta))
    return data


def simulate_dataset(simulator, n_samples, random_state=0, chunk=500, progress=True):
    """``make_dataset`` in chunks with a progress bar; returns a dict of arrays."""
    from tqdm.auto import tqdm

    seeds = np.random.SeedSequence(random_state).spawn(max(1, -(-n_samples // chunk)))
    parts = []
    with tqdm(total=n_samples, desc="simulate", unit="sample", disable=not progress) as bar:
        for i, seed in enumerate(seeds):
            n = min(chunk, n_samples - i * chunk)
            X, y, crb, det = simulator.make_dataset(n, np.random.default_rng(seed), return_details=True)
            parts.append({"X": X, "y": y, "crb": crb, "X_clean": det["X_clean"], "crb_unit": det["crb_unit"],
                          "theta": det["theta"], "M0": det["M0"]})
            bar.update(n)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _simulator_from_args(args, seq):
    from sklearn_crb.io.images import load_basis
    from sklearn_crb.simulator import MTFingerprintSimulator

    basis = load_basis(args.basis, n_pulses=seq.n_pulses) if args.basis else None
    return MTFingerprintSimulator(seq, n_components=args.rank, basis=basis, estimate=tuple(args.estimate),
                                  snr=tuple(args.snr), sigma=args.sigma, tied_R1=args.tied_R1, prior=args.prior,
                                  n_basis_samples=args.n_basis_samples, random_state=args.seed)


def cmd_simulate(args):
    seq = _sequence(args)
    if args.n_samples < 2:
        raise CLIError("--n-samples must be >= 2")
    out = Path(args.out)
    if out.suffix.lower() not in (".npz", ".h5", ".hdf5"):
        raise CLIError(f"--out must end in .npz, .h5 or .hdf5, got {out.name}")
    sim = _simulator_from_args(args, seq).fit()
    data = simulate_dataset(sim, args.n_samples, args.seed, progress=not args.quiet)
    data["basis"] = sim.basis_
    data["meta"] = np.bytes_(json.dumps({
        "estimate": list(sim.estimate_), "tied_R1": bool(sim.tied_R1), "snr": list(sim.snr), "sigma": sim.sigma,
        "prior": args.prior, "nuisance": "all", "sequence": seq.to_dict(), "sequence_sha256": seq.sha256(),
        "fill_values": sim.prior_.center().tolist()}))
    _save_dataset(out, data)
    print(f"wrote {out}: {args.n_samples} samples, {data['X'].shape[1]} features (rank {sim.n_components_}), "
          f"targets {list(sim.estimate_)}")
    return 0


# --------------------------------------------------------------------------- train
def _epoch_bar(total, desc, disable):
    """A skorch callback showing one tqdm step per epoch."""
    from skorch.callbacks import Callback
    from tqdm.auto import tqdm

    class EpochBar(Callback):
        def on_train_begin(self, net, **kw):
            self.bar = tqdm(total=total, desc=desc, unit="epoch", disable=disable)

        def on_epoch_end(self, net, **kw):
            h = net.history[-1]
            self.bar.set_postfix(train=f"{h['train_loss']:.3g}",
                                 valid=f"{h['valid_loss']:.3g}" if "valid_loss" in h else "-")
            self.bar.update(1)

        def on_train_end(self, net, **kw):
            self.bar.close()

    return EpochBar()


def make_network(loss, simulator, *, hidden=(256, 256, 128), epochs=60, lr=3e-3, batch_size=256, device="auto",
                 seed=0, progress=True, paper=False, normalization="l2"):
    """A ``CRBNetRegressor`` as the CLI builds it (plain MLP, or the paper's ResNet)."""
    from sklearn_crb.estimators.network import MLP, ResidualMLP
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    kw = {} if paper else {"module__hidden": tuple(hidden)}
    return CRBNetRegressor(module=ResidualMLP if paper else MLP, loss=loss, simulator=simulator, max_epochs=epochs,
                           lr=lr, batch_size=batch_size, device=device, random_state=seed,
                           module__normalization=normalization,
                           callbacks=[("epochs", _epoch_bar(epochs, f"train ({loss})", not progress))], **kw)


def _simulator_from_dataset(data):
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.simulator import MTFingerprintSimulator

    meta = data["meta"]
    seq = Sequence.from_dict(meta["sequence"])
    return MTFingerprintSimulator(seq, basis=data["basis"], estimate=tuple(meta["estimate"]),
                                  snr=tuple(meta["snr"]), sigma=meta["sigma"], tied_R1=meta["tied_R1"],
                                  prior=meta.get("prior")).fit()


def cmd_train(args):
    from sklearn_crb.io.models import save_model

    data = load_dataset(args.data)
    sim = _simulator_from_dataset(data)
    augment = args.augment and "X_clean" in data and "crb_unit" in data
    X, crb = (data["X_clean"], data["crb_unit"]) if augment else (data["X"], data["crb"])
    net = make_network(args.loss, sim, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet,
                       paper=args.paper, normalization=args.normalization)
    net.set_params(augment=augment)
    t0 = time.perf_counter()
    net.fit(X, data["y"], crb=crb)
    save_model(net, args.out, simulator=sim)
    h = net.history[-1]
    print(f"trained {args.loss}-loss network in {time.perf_counter() - t0:.1f} s "
          f"(train loss {h['train_loss']:.4g}, valid loss {h.get('valid_loss', float('nan')):.4g}); saved {args.out}")
    return 0


# --------------------------------------------------------------------------- fit
def overview_png(path, maps, names=None, title=None):
    """Write a PNG grid of maps (each with its own colour scale) atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn_crb._atomic import atomic_path

    names = names or [k for k, v in maps.items() if isinstance(v, np.ndarray) and v.ndim >= 2 and k != "mask"]
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        img = np.asarray(maps[name], dtype=float)
        if img.ndim == 3:  # a volume: show its middle slice
            img = img[..., img.shape[-1] // 2]
        finite = img[np.isfinite(img) & (img != 0)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
        im = ax.imshow(img.T if img.shape[0] != img.shape[1] else img, cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)


def cmd_fit(args):
    from sklearn_crb.io.images import load_basis, load_coefficients, make_mask
    from sklearn_crb.maps import fit_maps

    # ---- all checks first
    if not args.model and not args.nlls:
        raise CLIError("give --model DIR (a saved network) or --nlls")
    if args.model and args.nlls:
        raise CLIError("--model and --nlls are exclusive")
    model = None
    if args.model:
        from sklearn_crb.io.models import load_model

        try:
            model = load_model(args.model, device=args.device)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError(str(exc)) from exc
        meta = model.crb_metadata_
        from sklearn_crb.physics.sequence import Sequence

        seq = _sequence(args) if args.sequence else Sequence.from_dict(meta["sequence"])
        basis = load_basis(args.basis, n_pulses=seq.n_pulses) if args.basis else meta["basis"]
    else:
        if not args.basis:
            raise CLIError("--nlls needs --basis (the basis the coefficients were reconstructed in)")
        seq = _sequence(args)
        basis = load_basis(args.basis, n_pulses=seq.n_pulses)
    img = load_coefficients(args.coefficients, basis=basis)
    mask_arr = None
    if args.mask:
        from sklearn_crb.io.images import load_array

        mask_arr, _, _ = load_array(args.mask, None, "mask", preferred=("mask",))
    make_mask(img, mask_arr)  # shape check before any work
    if model is not None:
        from sklearn_crb.io.models import check_compatible

        check_compatible(model, sequence=seq, basis=basis, rank=img.rank)
        estimator = model
    else:
        from sklearn_crb.estimators.nlls import NLLSFitter

        estimator = NLLSFitter(seq, basis=basis, estimate=tuple(args.estimate), tied_R1=args.tied_R1,
                               device=args.device if args.device != "auto" else "cpu", n_jobs=args.n_jobs,
                               progress=not args.quiet, chunk_size=args.chunk_size).fit()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")

    # ---- work
    t0 = time.perf_counter()
    device = args.device if args.device != "auto" else "cpu"
    ctx = _dask_context(args.scheduler)
    with ctx:
        maps = fit_maps(estimator, img, mask_arr, sequence=seq, basis=basis, sigma=args.sigma,
                        chunk_size=args.chunk_size, device=device, progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    from sklearn_crb.io.images import save_maps

    arrays = {k: v for k, v in maps.items() if isinstance(v, np.ndarray)}
    with _Staging(out) as staging:
        save_maps(arrays, staging, affine=img.affine, header=img.header, prefix=args.prefix)
        overview_png(staging / f"{args.prefix}overview.png", arrays,
                     title=f"{'network' if model is not None else 'NLLS'}: {Path(args.coefficients).name}")
        n_fit = int(arrays["mask"].sum())
        summary = {"n_voxels_fitted": n_fit, "seconds": elapsed, "sigma": maps["sigma"], "units": maps["units"],
                   "flag_counts": {int(k): int(v) for k, v in zip(*np.unique(arrays["flags"], return_counts=True))},
                   "input": str(args.coefficients), "estimator": "network" if model is not None else "NLLS"}
        (staging / f"{args.prefix}summary.json").write_text(json.dumps(summary, indent=1))
        files = _commit(staging, out)
    print(f"fitted {n_fit} voxels in {elapsed:.1f} s ({1e3 * elapsed / max(n_fit, 1):.2f} ms/voxel), "
          f"sigma = {maps['sigma']:.3g}; wrote {len(files)} files to {out}")
    return 0


def _dask_context(scheduler):
    """``joblib.parallel_config(backend="dask")`` on a dask cluster, or a no-op."""
    import contextlib

    if not scheduler:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise CLIError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    import joblib

    if scheduler == "local":
        cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                   dashboard_address=None))
        stack.enter_context(Client(cluster))
    else:
        stack.enter_context(Client(scheduler))
    stack.enter_context(joblib.parallel_config(backend="dask"))
    return stack


# --------------------------------------------------------------------------- demo
#: Sizes of the demo (full: <= 5 min on a 2-core CPU; quick: CI).
DEMO_SIZES = {
    False: {"n_train": 12000, "epochs": 60, "hidden": (128, 128), "shape": (48, 48), "n_nlls": 40,
            "n_basis": 500},
    True: {"n_train": 1200, "epochs": 25, "hidden": (128, 128), "shape": (32, 32), "n_nlls": 16, "n_basis": 300},
}
DEMO_SNR = 300.0  # phantom: 1/sigma; WM voxels have SNR 0.69 * 300 = 207
# training SNR range around the phantom's; the paper's model: one T1 (R1s = R1f)
DEMO_TRAIN_SNR = (50.0, 500.0)


def _demo_table(rows, names):
    head = f"{'estimator':<10} {'param':<6} {'nMSE':>8} {'|bias|/sqrtCRB':>15} {'std/sqrtCRB':>12} {'ms/voxel':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for j, p in enumerate(names):
            lines.append(f"{r['name'] if j == 0 else '':<10} {p:<6} {r['nmse'][j]:>8.3g} {r['abs_bias'][j]:>15.3g} "
                         f"{r['std'][j]:>12.3g} {(r['ms_per_voxel'] if j == 0 else float('nan')):>9.3g}"
                         .replace("nan", "   "))
    return "\n".join(lines)


def _demo_figures(staging, ph, results, names, maps_by_est):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn_crb.physics.parameters import INDEX

    disp = {"m0s": ("m0s", 1.0, ""), "R1f": ("T1f", None, "s"), "R2f": ("T2f", None, "ms")}

    def show(p, img):
        if p == "R1f":
            return np.where(img > 0, 1 / np.where(img > 0, img, 1), 0)
        if p == "R2f":
            return np.where(img > 0, 1e3 / np.where(img > 0, img, 1), 0)
        return img

    head = ph.mask
    rows = [("truth", {p: ph.theta[..., INDEX[p]] for p in names})] + [(k, m) for k, m in maps_by_est.items()]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.3 * len(names), 2.9 * len(rows)), squeeze=False)
    for j, p in enumerate(names):
        ref = show(p, ph.theta[..., INDEX[p]])[head]
        lo, hi = np.percentile(ref, [1, 99])
        lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
        for i, (label, m) in enumerate(rows):
            img = np.where(head, show(p, np.nan_to_num(m[p])), np.nan)
            im = axes[i, j].imshow(img, vmin=lo, vmax=hi, cmap="viridis")
            axes[i, j].set_title(f"{label}: {disp[p][0]}" + (f" ({disp[p][2]})" if disp[p][2] else ""), fontsize=9)
            axes[i, j].axis("off")
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    fig.tight_layout()
    fig.savefig(staging / "maps.png", dpi=80)
    plt.close(fig)

    # error maps: |estimate - truth| / standard error at the estimate, and the standard errors
    ests = list(maps_by_est)
    fig, axes = plt.subplots(2 * len(ests), len(names), figsize=(3.3 * len(names), 2.9 * 2 * len(ests)),
                             squeeze=False)
    for i, k in enumerate(ests):
        m = maps_by_est[k]
        for j, p in enumerate(names):
            sel = m["mask"]
            err = np.where(sel, np.abs(np.nan_to_num(m[p]) - ph.theta[..., INDEX[p]]), np.nan)
            se = np.where(sel, np.nan_to_num(m[p + "_se"]), np.nan)
            hi = np.nanpercentile(se[sel], 95) if sel.any() else 1
            for r, (img, t) in enumerate(((err, "|error|"), (se, "std. error"))):
                ax = axes[2 * i + r, j]
                im = ax.imshow(img, vmin=0, vmax=2 * hi if r == 0 else hi, cmap="magma")
                ax.set_title(f"{k}: {t} {p}", fontsize=9)
                ax.axis("off")
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(staging / "error_maps.png", dpi=80)
    plt.close(fig)

    # bias and std relative to sqrt(CRB), per tissue and estimator
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(results)
    x = np.arange(len(names) * 2)
    labels = [f"{p}\n{t}" for t in ("WM", "GM") for p in names]
    for k, r in enumerate(results):
        b = np.asarray(r["bias_by_tissue"]).ravel()
        sd = np.asarray(r["std_by_tissue"]).ravel()
        axes[0].bar(x + k * width, b, width, label=r["name"])
        axes[1].bar(x + k * width, sd, width, label=r["name"])
    axes[0].axhline(0, color="k", lw=0.8)
    axes[1].axhline(1, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("bias / sqrt(CRB)")
    axes[1].set_ylabel("std / sqrt(CRB)")
    for ax in axes:
        ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(staging / "bias_std.png", dpi=90)
    plt.close(fig)


def run_demo(out="sklearn_crb_demo", quick=False, seed=0, progress=True, stream=None):
    """The ``sklearn-crb demo`` pipeline; returns the results dict.

    Trains a CRB-loss and an MSE-loss network (same MLP, data and epochs) on
    simulated data of the built-in sequence (rank-13 basis; m0s, R1f, R2f
    estimated, the rest nuisance), fits a 2-D brain phantom at SNR 35 (WM)
    with both and with NLLS (cold start, on a voxel subset), and compares
    them on the WM and GM voxels against the CRB at the true parameters.
    """
    import torch

    from sklearn_crb.crb import cramer_rao_bound
    from sklearn_crb.io.images import features_from_coefficients, save_nifti
    from sklearn_crb.maps import fit_maps
    from sklearn_crb.metrics import bias_variance_report, crb_normalized_mse
    from sklearn_crb.io.models import save_model
    from sklearn_crb.estimators.nlls import NLLSFitter
    from sklearn_crb.physics.parameters import INDEX
    from sklearn_crb.phantom import LABELS, make_phantom
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.simulator import MTFingerprintSimulator

    stream = stream or sys.stdout
    say = lambda msg: print(msg, file=stream, flush=True)  # noqa: E731
    cfg = DEMO_SIZES[bool(quick)]
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out)
    names = ("m0s", "R1f", "R2f")
    with _Staging(out) as staging:
        seq = Sequence.default()
        say(f"[1/6] basis and {cfg['n_train']} training fingerprints with CRBs ({seq.n_pulses} pulses, rank 13)")
        sim = MTFingerprintSimulator(seq, n_components=13, estimate=names, n_basis_samples=cfg["n_basis"],
                                     snr=DEMO_TRAIN_SNR, tied_R1=True, random_state=seed).fit()
        data = simulate_dataset(sim, cfg["n_train"], seed, progress=progress)
        nets, train_s = {}, {}
        for step, loss in ((2, "crb"), (3, "mse")):
            say(f"[{step}/6] training the {loss.upper()}-loss network ({cfg['epochs']} epochs, MLP {cfg['hidden']})")
            t0 = time.perf_counter()
            net = make_network(loss, sim, hidden=cfg["hidden"], epochs=cfg["epochs"], device="cpu", seed=seed,
                               progress=progress)
            net.set_params(augment=True)
            net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
            nets[loss], train_s[loss] = net, time.perf_counter() - t0
        say(f"[4/6] brain phantom {cfg['shape'][0]}x{cfg['shape'][1]}, SNR {DEMO_SNR:g} (WM {0.69 * DEMO_SNR:g})")
        ph = make_phantom(cfg["shape"], seq, basis=sim, snr=DEMO_SNR, tied_R1=True, random_state=seed + 1)
        tissue = np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])
        rng = np.random.default_rng(seed)
        sub = np.zeros_like(tissue)
        idx = np.flatnonzero(tissue)
        sub.flat[rng.choice(idx, size=min(cfg["n_nlls"], idx.size), replace=False)] = True

        say("[5/6] fitting the phantom: CRB net, MSE net (all voxels), NLLS (cold start, "
            f"{int(sub.sum())} voxels)")
        maps_by_est, seconds, masks = {}, {}, {}
        for label, est, mask in (("CRB net", nets["crb"], ph.mask), ("MSE net", nets["mse"], ph.mask)):
            X = features_from_coefficients(ph.coefficients[mask])
            est.predict(X[:16])  # warm-up: time the steady state, not first-call set-up
            t0 = time.perf_counter()
            est.predict(X)
            seconds[label] = (time.perf_counter() - t0) / X.shape[0]
            maps_by_est[label] = fit_maps(est, ph.coefficients, mask, sigma=ph.sigma, progress=progress)
            masks[label] = mask
        nlls = NLLSFitter(seq, basis=sim.basis_, estimate=names, tied_R1=True, progress=progress).fit()
        t0 = time.perf_counter()
        maps_by_est["NLLS"] = fit_maps(nlls, ph.coefficients, sub, sigma=ph.sigma, progress=False)
        seconds["NLLS"] = (time.perf_counter() - t0) / sub.sum()
        masks["NLLS"] = sub

        say("[6/6] CRB at the true parameters and the comparison")
        theta_t = ph.theta[tissue]
        crb_t = cramer_rao_bound(seq, theta_t, estimate=names, tied_R1=True, basis=sim.basis_,
                                 M0=np.abs(ph.M0[tissue]),
                                 sigma=ph.sigma, on_singular="inf")
        crb_map = np.zeros(ph.labels.shape + (3,))
        crb_map[tissue] = crb_t
        results = []
        for label, m in maps_by_est.items():
            sel = masks[label] & tissue
            yt = ph.theta[sel][:, [INDEX[p] for p in names]]
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
        table = _demo_table(results, names)
        _demo_figures(staging, ph, results, names, maps_by_est)
        # the phantom as a coefficient image and the CRB network, to try `sklearn-crb fit` on
        save_nifti(staging / "phantom_coefficients.nii.gz", ph.coefficients.astype(np.complex64),
                   dtype=np.complex64)
        save_model(nets["crb"], staging / "crb_model", simulator=sim)
        summary = {"quick": bool(quick), "seed": seed, "sizes": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in cfg.items()},
                   "snr": DEMO_SNR, "sequence": seq.name, "n_pulses": seq.n_pulses, "rank": 13,
                   "estimate": list(names), "train_seconds": train_s, "results": results,
                   "table": table, "seconds_total": time.perf_counter() - t_all}
        (staging / "results.json").write_text(json.dumps(summary, indent=1))
        _commit(staging, out)
    say("")
    say(f"Phantom WM+GM voxels, SNR {DEMO_SNR:g}; nMSE = mean (estimate - truth)^2 / CRB (1 = efficient and unbiased);")
    say("bias and std over each tissue region, relative to sqrt(CRB) at the truth; NLLS on a voxel subset.")
    say(table)
    say("")
    say(f"wrote {out}/maps.png, error_maps.png, bias_std.png, results.json, phantom_coefficients.nii.gz, crb_model/")
    say(f"try:  sklearn-crb fit --model {out}/crb_model --coefficients {out}/phantom_coefficients.nii.gz "
        f"--out {out}/fit")
    say(f"demo finished in {time.perf_counter() - t_all:.0f} s")
    return summary


def cmd_demo(args):
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser():
    """The argparse parser of ``sklearn-crb``."""
    from sklearn_crb._version import __version__

    parser = argparse.ArgumentParser(
        prog="sklearn-crb",
        description="Cramér–Rao-bound-informed neural networks and NLLS for quantitative MT MRI "
                    "(Zhang et al., MRM 2022).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,simulate,train,fit}")
    sub.required = True

    p = sub.add_parser("demo", help="end-to-end demo on a simulated brain phantom (no downloads)",
                       description="Simulate training data with the built-in sequence, train a CRB-loss and an "
                                   "MSE-loss network, fit a brain phantom with both and with NLLS, print a "
                                   "comparison table and write PNG figures.")
    p.add_argument("--out", default="sklearn_crb_demo", help="output directory (default ./sklearn_crb_demo)")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write a simulated training set (.npz or HDF5)",
                       description="Simulate compressed fingerprints with per-sample CRBs.")
    p.add_argument("--out", required=True, help="output file (.npz, .h5 or .hdf5)")
    p.add_argument("--n-samples", type=int, default=2000)
    _add_sequence_args(p)
    p.add_argument("--estimate", nargs="+", default=["m0s", "R1f", "R2f"], help="parameters to estimate")
    p.add_argument("--tied-R1", action="store_true", help="R1s = R1f (the paper's single T1)")
    p.add_argument("--prior", choices=["parenchyma", "paper2022"], default=None,
                   help="parameter prior (default: paper2022 with --tied-R1, else parenchyma)")
    p.add_argument("--snr", nargs=2, type=float, default=[10.0, 100.0], metavar=("LOW", "HIGH"))
    p.add_argument("--sigma", type=float, default=0.01, help="noise std per real coefficient component")
    p.add_argument("--n-basis-samples", type=int, default=1000, help="fingerprints for the SVD basis")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train a network from a simulated set and save it",
                       description="Train a CRBNetRegressor and save it with its sequence and basis.")
    p.add_argument("--data", required=True, help="training set from `sklearn-crb simulate`")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--loss", choices=["crb", "mse", "relative"], default="crb")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", nargs="+", type=int, default=[256, 256, 128], help="MLP widths")
    p.add_argument("--paper", action="store_true", help="the paper's residual network instead of the MLP")
    p.add_argument("--normalization", choices=["l2", "first-coefficient"], default="l2")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train on the stored noisy samples instead of fresh noise each epoch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fit", help="fit a coefficient image with a saved network or NLLS",
                       description="Write NIfTI parameter, standard-error, residual and flag maps and a PNG.")
    p.add_argument("--coefficients", required=True,
                   help="coefficient image: NIfTI (complex, or 2r channels [Re..., Im...]), .mat, .npy, .npz")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="saved network directory (from `sklearn-crb train`)")
    g.add_argument("--nlls", action="store_true", help="fit with NLLS instead of a network")
    _add_sequence_args(p)
    p.add_argument("--mask", help="mask image (non-zero = fit); default: automatic")
    p.add_argument("--estimate", nargs="+", default=["m0s", "R1f", "R2f"], help="NLLS: parameters to report")
    p.add_argument("--tied-R1", action="store_true", help="NLLS: R1s = R1f")
    p.add_argument("--sigma", type=float, default=None, help="noise std (default: estimated from residuals)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--chunk-size", type=int, default=1024, help="voxels per chunk")
    p.add_argument("--n-jobs", type=int, default=None, help="NLLS: joblib workers")
    p.add_argument("--scheduler", default=None,
                   help="NLLS on dask: a scheduler address, or 'local' for a 2-worker LocalCluster")
    p.add_argument("--prefix", default="", help="prefix of the output file names")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit)
    return parser


def main(argv=None):
    """Entry point of the ``sklearn-crb`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sklearn-crb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
