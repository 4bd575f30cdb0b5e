"""``sklearn-crb train``: train a network from a simulated set and save it.

``--loss bias_reduced`` is the bias-reduced loss of Mao, Flassbeck, Assländer (arXiv 2312.11468):
``--n-realizations``, ``--bias-lambda``, ``--var-delta`` and ``--pretrain-epochs`` set
``CRBNetRegressor``'s parameters of the same names (not given: the estimator's defaults). It needs the
noise-free features (``X_clean``/``crb_unit`` of ``sklearn-crb simulate``) and refuses ``--no-augment``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sklearn_crb.cli._common import (
    EPILOG,
    CLIError,
    _common,
    _interrupt_guard,
    _normalization,
    _number,
    _positive_float,
    _positive_int,
)
from sklearn_crb.estimators.net.measured import append_measured
from sklearn_crb.io._files import check_output_folder, claim_output, releases_claims
from sklearn_crb.io.datasets import dataset_measured, load_dataset, open_dataset, simulator_from_dataset
from sklearn_crb.io.models import MODEL_FILES, save_model
from sklearn_crb.recipes import make_network

__all__ = ["cmd_train", "add_parser", "BIAS_REDUCED_OPTIONS", "LAZY_BYTES"]

#: HDF5 training sets larger than this (bytes of per-sample arrays) are read batch by batch, not loaded.
#: ``SKLEARN_CRB_LAZY_BYTES`` overrides it (checked when ``train`` runs).
LAZY_BYTES = 4 * 2**30


def _lazy_bytes():
    text = os.environ.get("SKLEARN_CRB_LAZY_BYTES")
    if text is None:
        return LAZY_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise CLIError(f"SKLEARN_CRB_LAZY_BYTES must be a non-negative integer (bytes), got {text!r}")
    return value

#: The ``CRBNetRegressor`` parameters of ``--loss bias_reduced`` (options ``--n-realizations`` ...).
BIAS_REDUCED_OPTIONS = ("n_realizations", "bias_lambda", "var_delta", "pretrain_epochs")


@releases_claims
def cmd_train(args):
    if args.standardize_inputs is not None and args.paper:
        raise CLIError("--[no-]standardize-inputs applies to the default MLP; --paper's residual network has no "
                       "such option")
    claim = claim_output(args.out, argname="--out")  # held to the save: a second command into --out is refused
    out = check_output_folder(claim.path, overwrite=args.overwrite, owned_names=MODEL_FILES, marker="model.json",
                              argname="--out")
    rows = None
    if str(args.data).lower().endswith((".h5", ".hdf5")):
        rows, data = open_dataset(args.data, argname="--data")
        nbytes = sum(len(rows) * int(np.prod(rows.shapes[k])) * rows.dtypes[k].itemsize for k in rows.keys)
        if nbytes <= _lazy_bytes():  # small enough: in memory (per-batch HDF5 reads cost more than they save)
            rows = None
    if rows is None:
        data = load_dataset(args.data, argname="--data")
    have = set(rows.keys) if rows is not None else set(data)
    sim = simulator_from_dataset(data)
    measured = dataset_measured(data)  # `simulate --measured`: the network takes them as inputs
    if measured and "theta" not in have:
        raise CLIError(f"--data records measured parameters {list(measured)} but holds no 'theta' to take them from")
    augment = args.augment and {"X_clean", "crb_unit"} <= have
    if args.noise_input and not augment:
        raise CLIError("--noise-input trains with augmentation (its draws give each row its noise level): it needs a "
                       "data file with X_clean and crb_unit (from `sklearn-crb simulate`) and cannot take "
                       "--no-augment; use --no-noise-input")
    if args.loss == "bias_reduced" and not augment:
        raise CLIError("--loss bias_reduced draws fresh noise realisations of every fingerprint: it needs a data "
                       "file with X_clean and crb_unit (from `sklearn-crb simulate`) and cannot take --no-augment")
    # options not given stay None: the estimator's defaults (the package's training recipe) apply
    net = make_network(args.loss, sim, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, device=args.device, seed=args.seed, progress=not args.quiet,
                       paper=args.paper, normalization=args.normalization, noise_input=args.noise_input)
    if args.standardize_inputs is not None:
        net.set_params(module__standardize=args.standardize_inputs)
    net.set_params(augment=augment, measured=measured or None,
                   **{k: getattr(args, k) for k in (*BIAS_REDUCED_OPTIONS, "crb_at") if getattr(args, k) is not None})
    t0 = time.perf_counter()
    with _interrupt_guard():
        if rows is not None:
            net.fit(rows)
        else:
            X, crb = (data["X_clean"], data["crb_unit"]) if augment else (data["X"], data["crb"])
            net.fit(append_measured(X, data.get("theta"), measured), data["y"], crb=crb)
    h = net.history[-1] if len(net.history) else {}
    if "train_loss" not in h or not np.isfinite(h["train_loss"]):
        raise CLIError(f"training did not finish with a finite loss ({h.get('train_loss')}); nothing was saved")
    save_model(net, out, simulator=sim, overwrite=args.overwrite)
    valid = f"valid loss {h['valid_loss']:.4g}" if "valid_loss" in h else "no validation split"
    print(f"trained {args.loss}-loss network in {time.perf_counter() - t0:.1f} s "
          f"(train loss {h['train_loss']:.4g}, {valid}); saved {out}")
    return 0


def add_parser(sub):
    """Register ``train`` on the subcommand parser ``sub``."""
    p = sub.add_parser("train", help="train a network from a simulated set and save it", epilog=EPILOG,
                       description="Train a CRBNetRegressor and save it with its sequence and basis.")
    p.add_argument("--data", required=True, help="training set from `sklearn-crb simulate`")
    p.add_argument("--out", required=True, help="model directory to write (new, empty or a saved model)")
    p.add_argument("--loss", choices=["crb", "mse", "relative", "bias_reduced"], default="crb",
                   help="training loss (bias_reduced: Mao et al., arXiv 2312.11468; default crb)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's residual network and recipe (Zhang et al. 2022) instead of the default recipe")
    g = p.add_argument_group("overrides of the recipe (default: CRBNetRegressor's, or the paper's with --paper)")
    g.add_argument("--epochs", type=_positive_int, default=None)
    g.add_argument("--hidden", nargs="+", type=_positive_int, default=None, help="hidden layer widths")
    g.add_argument("--normalization", type=_normalization, default=None,
                   help="input normalisation (l2, first-coefficient, phase-l2, ...; see InputNormalization)")
    g.add_argument("--standardize-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise the normalised inputs per feature (MLP(standardize=...); default on, "
                        "part of the default recipe; not with --paper)")
    g.add_argument("--lr", type=_positive_float, default=None, help="learning rate")
    g.add_argument("--batch-size", type=_positive_int, default=None)
    g.add_argument("--crb-at", choices=["auto", "truth", "estimate"], default=None,
                   help="where the crb loss weight's CRB is evaluated: the true parameters (the paper) or the "
                        "network's estimate (default auto: the estimate for --loss crb)")
    b = p.add_argument_group("--loss bias_reduced (default: CRBNetRegressor's)")
    b.add_argument("--n-realizations", type=_number(int, 2, strict=False), default=None,
                   help="noise realisations per fingerprint (>= 2; the paper used 200)")
    b.add_argument("--bias-lambda", type=_number(float, 0.0, strict=False), default=None,
                   help="weight of the variance hinge (>= 0; paper 1)")
    b.add_argument("--var-delta", type=_number(float, 0.0, strict=False), default=None,
                   help="variance/CRB below which the hinge is zero (>= 0; paper 1)")
    b.add_argument("--pretrain-epochs", type=_number(int, 0, strict=False), default=None,
                   help="first epochs trained with the CRB loss (<= --epochs)")
    p.add_argument("--noise-input", action=argparse.BooleanOptionalAction, default=True,
                   help="tell the network the noise level (default; `fit` then takes or estimates sigma); "
                        "--no-noise-input: the unconditioned network, for data without a noise estimate")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train on the stored noisy samples instead of fresh noise each epoch")
    p.add_argument("--seed", type=int, default=0)
    _common(p, device="auto")
    p.set_defaults(func=cmd_train)
