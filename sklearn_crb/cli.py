"""The ``sklearn-crb`` command line: demo, simulate, train and fit (argparse only).

``sklearn-crb demo``
    The end-to-end demo of :mod:`sklearn_crb.demo` (no downloads).
``sklearn-crb simulate``
    Writes a training set (:mod:`sklearn_crb.io.datasets`).
``sklearn-crb train``
    Trains a network from such a set and saves it (:mod:`sklearn_crb.io.models`).
``sklearn-crb fit``
    Applies a saved network or NLLS to a coefficient image
    (:func:`sklearn_crb.maps.fit_maps`) and writes NIfTI maps, a PNG overview
    (:mod:`sklearn_crb.viz`) and ``summary.json``.

Every output is written atomically (a failed or interrupted run leaves no
partial file and an existing output as it was), with the permissions of the
umask. Every error is one line on stderr with exit status 2 (130 after
Ctrl-C), and every check runs before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import torch

from sklearn_crb._version import __version__
from sklearn_crb.demo import make_network, run_demo
from sklearn_crb.estimators.network import InputNormalization
from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io._files import atomic_files, check_file_name, check_output_file, check_output_folder
from sklearn_crb.io.datasets import (SUFFIXES, dataset_meta, is_dataset, load_dataset, save_dataset,
                                     simulate_dataset, simulator_from_dataset)
from sklearn_crb.io.images import load_array, load_basis, load_coefficients, make_mask, save_nifti
from sklearn_crb.io.models import MODEL_FILES, check_compatible, load_model, save_model
from sklearn_crb.maps import fit_maps, map_names
from sklearn_crb.physics.parameters import free_parameters, resolve_estimate
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator
from sklearn_crb.viz import overview_png

__all__ = ["main", "build_parser", "CLIError", "load_dataset", "make_network", "simulate_dataset"]

OVERWRITE_HELP = ("replace existing outputs; only outputs that sklearn-crb wrote are ever replaced (a training "
                  "set, a saved model, a demo folder, the files listed in a fit's summary.json), anything else "
                  "is refused")
EPILOG = ("Outputs: an existing output is refused unless --overwrite is given, and --overwrite replaces only "
          "outputs that sklearn-crb wrote itself. Errors are one line on stderr, exit status 2; Ctrl-C exits "
          "with 130 and leaves existing outputs untouched.")
SCHEDULER_TIMEOUT = "5s"
#: ``simulate`` defaults: the brain prior (parenchyma, CSF and partial volume) and an SNR range with in-vivo values.
DEFAULT_PRIOR = "brain"
DEFAULT_SNR = (10.0, 300.0)
#: Training-set size of the measured default recipe (48,000 parameter draws).
DEFAULT_N_SAMPLES = 48000
#: Rank of the learnt SVD basis when no ``--basis`` is given.
DEFAULT_RANK = 13


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


# --------------------------------------------------------------------------- argument types
def _number(kind, low, strict=True):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not np.isfinite(v) or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


_positive_int, _positive_float = _number(int, 0), _number(float, 0.0)


def _device(text):
    """A torch device the machine has (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use auto, cpu, cuda or cuda:N")
    return text


def _normalization(text):
    """An input normalisation the network module accepts (checked by the module itself)."""
    try:
        InputNormalization(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _prefix(text):
    try:
        return check_file_name(text, "--prefix")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- helpers
def _sequence(args):
    if getattr(args, "sequence", None):
        return Sequence.from_mat(args.sequence, TR=args.TR)
    return Sequence.default(n_pulses=args.n_pulses, TR=args.TR)


@contextlib.contextmanager
def _interrupt_guard():
    """Record Ctrl-C even where a library swallows ``KeyboardInterrupt`` (skorch's fit loop)."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield hit
        return

    def handler(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


def _dask_context(scheduler):
    """``joblib.parallel_config(backend="dask")`` on a dask cluster, or a no-op; fails fast."""
    if not scheduler:
        return contextlib.nullcontext()
    try:  # dask is an optional dependency (the "examples" extra)
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise CLIError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from exc
    stack = contextlib.ExitStack()
    try:
        if scheduler == "local":
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            stack.enter_context(Client(cluster, timeout=SCHEDULER_TIMEOUT))
        else:
            stack.enter_context(Client(scheduler, timeout=SCHEDULER_TIMEOUT))
    except Exception as exc:  # noqa: BLE001 - dask raises OSError, TimeoutError, ValueError, ...
        stack.close()
        raise CLIError(f"--scheduler: cannot reach {scheduler!r} within {SCHEDULER_TIMEOUT} "
                       f"({type(exc).__name__}: {exc})") from None
    stack.enter_context(joblib.parallel_config(backend="dask"))
    return stack


# --------------------------------------------------------------------------- simulate
def cmd_simulate(args):
    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise CLIError(f"--out must end in .npz, .h5 or .hdf5, got {out.name}")
    check_output_file(out, overwrite=args.overwrite, owned=is_dataset, argname="--out")
    names = free_parameters(args.tied_R1) if args.estimate is None else tuple(args.estimate)
    estimate = resolve_estimate(names, args.tied_R1, argname="--estimate")
    seq = _sequence(args)
    basis = load_basis(args.basis, n_pulses=seq.n_pulses) if args.basis else None
    if basis is not None and args.rank is not None and args.rank > basis.shape[1]:
        raise CLIError(f"--rank {args.rank} exceeds the {basis.shape[1]} columns of --basis {args.basis}")
    rank = args.rank if (args.rank is not None or basis is not None) else DEFAULT_RANK
    sim = MTFingerprintSimulator(seq, n_components=rank, basis=basis, estimate=estimate,
                                 snr=tuple(args.snr), sigma=args.sigma, tied_R1=args.tied_R1, prior=args.prior,
                                 n_basis_samples=args.n_basis_samples, random_state=args.seed).fit()
    data = simulate_dataset(sim, args.n_samples, args.seed, progress=not args.quiet)
    data["basis"] = sim.basis_
    data["meta"] = dataset_meta(sim, prior=args.prior)
    save_dataset(out, data, overwrite=args.overwrite, argname="--out")
    print(f"wrote {out}: {args.n_samples} samples, {data['X'].shape[1]} features (rank {sim.n_components_}), "
          f"targets {list(sim.estimate_)}")
    return 0


# --------------------------------------------------------------------------- train
def cmd_train(args):
    out = check_output_folder(args.out, overwrite=args.overwrite, owned_names=MODEL_FILES, marker="model.json",
                              argname="--out")
    data = load_dataset(args.data, argname="--data")
    sim = simulator_from_dataset(data)
    augment = args.augment and "X_clean" in data and "crb_unit" in data
    X, crb = (data["X_clean"], data["crb_unit"]) if augment else (data["X"], data["crb"])
    # options not given stay None: the estimator's defaults (the package's training recipe) apply
    net = make_network(args.loss, sim, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet,
                       paper=args.paper, normalization=args.normalization)
    net.set_params(augment=augment)
    t0 = time.perf_counter()
    with _interrupt_guard():
        net.fit(X, data["y"], crb=crb)
    h = net.history[-1] if len(net.history) else {}
    if "train_loss" not in h or not np.isfinite(h["train_loss"]):
        raise CLIError(f"training did not finish with a finite loss ({h.get('train_loss')}); nothing was saved")
    save_model(net, out, simulator=sim, overwrite=args.overwrite)
    print(f"trained {args.loss}-loss network in {time.perf_counter() - t0:.1f} s "
          f"(train loss {h['train_loss']:.4g}, valid loss {h.get('valid_loss', float('nan')):.4g}); saved {out}")
    return 0


# --------------------------------------------------------------------------- fit
def _fit_names(prefix, estimate, times=False):
    maps = map_names(estimate, times=times)
    return {k: f"{prefix}{k}.nii.gz" for k in maps}, f"{prefix}overview.png", f"{prefix}summary.json"


def _fit_owned(summary):
    """Which files of a folder a previous ``sklearn-crb fit`` wrote (from its summary.json)."""
    try:
        s = json.loads(Path(summary).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or s.get("written_by") != "sklearn-crb fit" or not isinstance(s.get("files"), list):
        return None
    return {f for f in s["files"] if isinstance(f, str)} | {Path(summary).name}


def _fit_basis(args, seq):
    """``--basis FILE`` (first ``--rank`` columns when given)."""
    U = load_basis(args.basis, n_pulses=seq.n_pulses)
    if args.rank is not None:
        if args.rank > U.shape[1]:
            raise CLIError(f"--rank {args.rank} exceeds the {U.shape[1]} columns of --basis {args.basis}")
        U = U[:, :args.rank]
    return U


def cmd_fit(args):
    # ---- all checks first
    if not args.model and not args.nlls:
        raise CLIError("give --model DIR (a saved network) or --nlls")
    out = Path(os.path.abspath(args.out))
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if args.model:
        model = load_model(args.model, device=args.device)
        meta = model.crb_metadata_
        seq = _sequence(args) if args.sequence else Sequence.from_dict(meta["sequence"])
        basis = _fit_basis(args, seq) if args.basis else meta["basis"]
        estimate = tuple(meta["estimate"])
    else:
        model = None
        if not args.basis:
            raise CLIError("--nlls needs --basis (the basis the coefficients were reconstructed in)")
        seq = _sequence(args)
        basis = _fit_basis(args, seq)
        estimate = resolve_estimate(tuple(args.estimate), args.tied_R1, argname="--estimate")
    img = load_coefficients(args.coefficients, basis=basis)
    mask_arr = load_array(args.mask, None, "mask", preferred=("mask",))[0] if args.mask else None
    make_mask(img, mask_arr)  # shape check before any work
    map_files, png, summary_name = _fit_names(args.prefix, estimate, times=args.times)
    names = [*map_files.values(), png, summary_name]
    owned = _fit_owned(out / summary_name) or set()
    for name in names:
        check_output_file(out / name, overwrite=args.overwrite, owned=lambda p: p.name in owned, argname="--out")
    if model is not None:
        check_compatible(model, sequence=seq, basis=basis, rank=img.rank)
        estimator = model
    else:
        estimator = NLLSFitter(seq, basis=basis, estimate=estimate, tied_R1=args.tied_R1,
                               device=args.device if args.device != "auto" else "cpu", n_jobs=args.n_jobs,
                               progress=not args.quiet, chunk_size=args.chunk_size).fit()

    # ---- work
    t0 = time.perf_counter()
    with _dask_context(args.scheduler):
        maps = fit_maps(estimator, img, mask_arr, sequence=seq, basis=basis, sigma=args.sigma,
                        chunk_size=args.chunk_size, times=args.times, progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    arrays = {k: v for k, v in maps.items() if isinstance(v, np.ndarray)}
    if not set(arrays) <= set(map_files):
        raise CLIError(f"the estimator returned maps {sorted(set(arrays) - set(map_files))} not announced by its "
                       "estimate; nothing was written")
    n_fit = int(arrays["mask"].sum())
    kind = "network" if model is not None else "NLLS"
    summary = {"written_by": "sklearn-crb fit", "sklearn_crb_version": __version__, "n_voxels_fitted": n_fit,
               "seconds": elapsed, "sigma": maps["sigma"], "units": maps["units"],
               "flag_counts": {int(k): int(v) for k, v in zip(*np.unique(arrays["flags"], return_counts=True))},
               "input": str(args.coefficients), "estimator": kind,
               "files": [map_files[k] for k in arrays] + [png]}
    written = [map_files[k] for k in arrays] + [png, summary_name]
    with atomic_files(out, written) as tmp:
        for k, arr in arrays.items():
            dtype = np.uint8 if arr.dtype == bool else (np.int16 if np.issubdtype(arr.dtype, np.integer)
                                                        else np.float32)
            save_nifti(tmp[map_files[k]], arr, img.affine, img.header, dtype=dtype)
        overview_png(tmp[png], arrays, title=f"{kind}: {Path(args.coefficients).name}")
        tmp[summary_name].write_text(json.dumps(summary, indent=1))
    print(f"fitted {n_fit} voxels in {elapsed:.1f} s ({1e3 * elapsed / max(n_fit, 1):.2f} ms/voxel), "
          f"sigma = {maps['sigma']:.3g}; wrote {len(written)} files to {out}")
    return 0


def cmd_demo(args):
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------- parser
def _add_sequence_args(p, basis=True):
    g = p.add_argument_group("sequence and basis")
    g.add_argument("--sequence", help="MATLAB file with alpha (rad) and TRF (s); default: the built-in sequence")
    g.add_argument("--TR", type=_positive_float, default=3.5e-3, help="repetition time in s (default 3.5e-3)")
    g.add_argument("--n-pulses", type=_positive_int, default=1142,
                   help="length of the built-in sequence (default 1142)")
    if basis:
        g.add_argument("--basis", help="compression basis (n_pulses x r; .npy/.npz/.mat/.nii); default: SVD")
        g.add_argument("--rank", type=_positive_int, default=None,
                       help=f"rank: the first RANK columns of --basis (default: all of them), or the rank of the "
                            f"learnt SVD basis (default {DEFAULT_RANK})")


def _common(p, device=None):
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if device:
        p.add_argument("--device", type=_device, default=device, help=f"auto, cpu, cuda or cuda:N (default {device})")


def build_parser():
    """The argparse parser of ``sklearn-crb``."""
    parser = _Parser(
        prog="sklearn-crb", epilog=EPILOG,
        description="Cramér–Rao-bound-informed neural networks and NLLS for quantitative MT MRI "
                    "(Zhang et al., MRM 2022).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,simulate,train,fit}")
    sub.required = True

    p = sub.add_parser("demo", help="end-to-end demo on a simulated brain phantom (no downloads)", epilog=EPILOG,
                       description="Simulate training data with the built-in sequence, train a CRB-loss and an "
                                   "MSE-loss network, fit a brain phantom with both and with NLLS, print a "
                                   "comparison table and write PNG figures.")
    p.add_argument("--out", default="sklearn_crb_demo", help="output directory (default ./sklearn_crb_demo)")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write a simulated training set (.npz or HDF5)", epilog=EPILOG,
                       description="Simulate compressed fingerprints with per-sample CRBs.")
    p.add_argument("--out", required=True, help="output file (.npz, .h5 or .hdf5)")
    p.add_argument("--n-samples", type=_number(int, 2, strict=False), default=DEFAULT_N_SAMPLES,
                   help=f"at least 2 (default {DEFAULT_N_SAMPLES}, the default recipe's training-set size)")
    _add_sequence_args(p)
    p.add_argument("--estimate", nargs="+", default=None,
                   help="targets: parameter names, or relaxation times T1f, T2f, T1s (s) instead of R1f, R2f, R1s "
                        "(default: every free parameter of the model, m0s R1f R2f Rex T2s omega0 B1 with --tied-R1 "
                        "and also R1s without, so that the network estimates the nuisance parameters too and the "
                        "maps of `fit` are evaluated at its own estimates)")
    p.add_argument("--tied-R1", action="store_true", help="R1s = R1f (the paper's single T1)")
    p.add_argument("--prior", choices=["brain", "parenchyma", "paper2022"], default=DEFAULT_PRIOR,
                   help="parameter prior (default brain: parenchyma, CSF-like and partial-volume tissue, for "
                        "the tied or untied model)")
    p.add_argument("--snr", nargs=2, type=_positive_float, default=list(DEFAULT_SNR), metavar=("LOW", "HIGH"),
                   help=f"|M0|/sigma range (default {DEFAULT_SNR[0]:g} {DEFAULT_SNR[1]:g}: in-vivo values included)")
    p.add_argument("--sigma", type=_positive_float, default=0.01, help="noise std per real coefficient component")
    p.add_argument("--n-basis-samples", type=_positive_int, default=1000, help="fingerprints for the SVD basis")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train a network from a simulated set and save it", epilog=EPILOG,
                       description="Train a CRBNetRegressor and save it with its sequence and basis.")
    p.add_argument("--data", required=True, help="training set from `sklearn-crb simulate`")
    p.add_argument("--out", required=True, help="model directory to write (new, empty or a saved model)")
    p.add_argument("--loss", choices=["crb", "mse", "relative"], default="crb")
    p.add_argument("--paper", action="store_true",
                   help="the paper's residual network and recipe (Zhang et al. 2022) instead of the default recipe")
    g = p.add_argument_group("overrides of the recipe (default: CRBNetRegressor's, or the paper's with --paper)")
    g.add_argument("--epochs", type=_positive_int, default=None)
    g.add_argument("--hidden", nargs="+", type=_positive_int, default=None, help="hidden layer widths")
    g.add_argument("--normalization", type=_normalization, default=None,
                   help="input normalisation (l2, first-coefficient, phase-l2, ...; see InputNormalization)")
    g.add_argument("--lr", type=_positive_float, default=None, help="learning rate")
    g.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train on the stored noisy samples instead of fresh noise each epoch")
    p.add_argument("--seed", type=int, default=0)
    _common(p, device="auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fit", help="fit a coefficient image with a saved network or NLLS", epilog=EPILOG,
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
    p.add_argument("--times", action="store_true",
                   help="also write relaxation-time maps T1f (s), T2f (ms) (and T1s untied) with their standard errors")
    p.add_argument("--tied-R1", action="store_true", help="NLLS: R1s = R1f")
    p.add_argument("--sigma", type=_positive_float, default=None,
                   help="noise std (default: estimated from residuals)")
    p.add_argument("--chunk-size", type=_positive_int, default=1024, help="voxels per chunk")
    p.add_argument("--n-jobs", type=int, default=None, help="NLLS: joblib workers")
    p.add_argument("--scheduler", default=None,
                   help=f"NLLS on dask: a scheduler address (connect timeout {SCHEDULER_TIMEOUT}), or 'local' for "
                        "a 2-worker LocalCluster")
    p.add_argument("--prefix", type=_prefix, default="", help="prefix of the output file names (no path separators)")
    _common(p, device="cpu")
    p.set_defaults(func=cmd_fit)
    return parser


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None):
    """Entry point of the ``sklearn-crb`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sklearn-crb {args.command}: interrupted; no output was written or changed", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError) as exc:
        print(f"sklearn-crb {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback (SKLEARN_CRB_DEBUG=1 to see it)
        if os.environ.get("SKLEARN_CRB_DEBUG"):
            raise
        print(f"sklearn-crb {args.command}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
