"""``sklearn-crb simulate``: write a simulated training set (``.npz`` or HDF5)."""

from __future__ import annotations

from pathlib import Path

from sklearn_crb.cli._common import (
    DEFAULT_N_SAMPLES,
    DEFAULT_PRIOR,
    DEFAULT_RANK,
    DEFAULT_SNR,
    EPILOG,
    SCHEDULER_TIMEOUT,
    CLIError,
    _add_sequence_args,
    _common,
    _dask_context,
    _number,
    _positive_float,
    _positive_int,
    _sequence,
)
from sklearn_crb._validation import check_snr_range
from sklearn_crb.estimators.net.measured import measured_nuisance, resolve_measured
from sklearn_crb.io._files import check_output_file, claim_output, releases_claims
from sklearn_crb.io.datasets import SUFFIXES, check_dataset_size, is_dataset, simulate_to_file
from sklearn_crb.io.images import load_basis
from sklearn_crb.physics.parameters import free_parameters, resolve_estimate
from sklearn_crb.simulator import MTFingerprintSimulator

__all__ = ["cmd_simulate", "add_parser"]


@releases_claims
def cmd_simulate(args):
    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise CLIError(f"--out must end in .npz, .h5 or .hdf5, got {out.name}")
    claim = claim_output(out, argname="--out")  # held to the commit: a second command into --out is refused
    out = check_output_file(claim.path, overwrite=args.overwrite, owned=is_dataset, argname="--out")
    if args.n_jobs == 0:
        raise CLIError("--n-jobs must be a positive number of workers or negative (-1: every core), got 0")
    names = free_parameters(args.tied_R1) if args.estimate is None else tuple(args.estimate)
    if args.estimate is None and args.measured:  # every free parameter that is not measured
        names = tuple(p for p in names if p not in args.measured)
    estimate = resolve_estimate(names, args.tied_R1, argname="--estimate")
    seq = _sequence(args)
    basis = load_basis(args.basis, n_pulses=seq.n_pulses) if args.basis else None
    if basis is not None and args.rank is not None and args.rank > basis.shape[1]:
        raise CLIError(f"--rank {args.rank} exceeds the {basis.shape[1]} columns of --basis {args.basis}")
    rank = args.rank if (args.rank is not None or basis is not None) else DEFAULT_RANK
    if basis is not None and args.basis_method == "crb":
        raise CLIError("--basis-method crb learns a basis; it cannot be combined with --basis")
    n_columns = rank if rank is not None else basis.shape[1]
    if basis is None and n_columns > seq.n_pulses:
        raise CLIError(f"--rank {n_columns} exceeds the {seq.n_pulses} pulses of the sequence (--n-pulses or "
                       "--sequence): a basis has at most one column per pulse")
    if basis is None and n_columns > args.n_basis_samples:
        raise CLIError(f"--rank {n_columns} exceeds --n-basis-samples {args.n_basis_samples}: the learnt basis "
                       f"needs at least {n_columns} fingerprints")
    if args.basis_method == "crb" and args.n_crb_samples < n_columns:
        raise CLIError(f"--basis-method crb: --n-crb-samples {args.n_crb_samples} is below --rank {n_columns}; the "
                       f"learnt basis would have rank {args.n_crb_samples} only: give --n-crb-samples >= {n_columns}")
    # before the simulator learns its basis: a set that cannot fit is refused within a second
    check_snr_range(args.snr, "--snr")  # SNRs whose CRBs under- or overflow are refused by option
    check_dataset_size(out, args.n_samples, n_columns, len(estimate), argname="--out", n_samples_arg="--n-samples")
    measured = resolve_measured(args.measured, estimate, args.tied_R1, argname="--measured")
    nuisance = measured_nuisance(estimate, measured, args.tied_R1) if measured else "all"
    sim = MTFingerprintSimulator(seq, n_components=rank, basis=basis, estimate=estimate, nuisance=nuisance,
                                 snr=tuple(args.snr), sigma=args.sigma, tied_R1=args.tied_R1, prior=args.prior,
                                 n_basis_samples=args.n_basis_samples, basis_method=args.basis_method,
                                 n_crb_samples=args.n_crb_samples, random_state=args.seed).fit()
    with _dask_context(args.scheduler):
        simulate_to_file(out, sim, args.n_samples, args.seed, chunk=args.chunk_size, n_jobs=args.n_jobs,
                         prior=args.prior, overwrite=args.overwrite, progress=not args.quiet, argname="--out",
                         n_samples_arg="--n-samples",
                         measured=measured)
    print(f"wrote {out}: {args.n_samples} samples, {2 * sim.n_components_} features (rank {sim.n_components_}), "
          f"targets {list(sim.estimate_)}")
    return 0


def add_parser(sub):
    """Register ``simulate`` on the subcommand parser ``sub``."""
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
    p.add_argument("--measured", nargs="+", default=None, metavar="NAME",
                   help="parameters measured by a separate scan (e.g. B1, omega0): the CRBs hold them known, and "
                        "`train` makes a network that takes them as inputs (`fit --b1-map/--b0-map` supplies them; "
                        "default: none; they must not be in --estimate)")
    p.add_argument("--tied-R1", action="store_true", help="R1s = R1f (the paper's single T1)")
    p.add_argument("--prior", choices=["brain", "parenchyma", "paper2022"], default=DEFAULT_PRIOR,
                   help="parameter prior (default brain: parenchyma, CSF-like and partial-volume tissue, for "
                        "the tied or untied model)")
    p.add_argument("--snr", nargs=2, type=_positive_float, default=list(DEFAULT_SNR), metavar=("LOW", "HIGH"),
                   help=f"|M0|/sigma range (default {DEFAULT_SNR[0]:g} {DEFAULT_SNR[1]:g}: in-vivo values included)")
    p.add_argument("--sigma", type=_positive_float, default=0.01, help="noise std per real coefficient component")
    p.add_argument("--n-basis-samples", type=_positive_int, default=1000, help="fingerprints for the learnt basis")
    p.add_argument("--basis-method", choices=["svd", "crb"], default="svd",
                   help="basis learnt without --basis: svd (most fingerprint energy, default) or crb (minimises the "
                        "prior-averaged CRB inflation of --estimate, Mao et al. arXiv 2305.00326; about a minute)")
    p.add_argument("--n-crb-samples", type=_positive_int, default=256,
                   help="prior draws in the CRB objective (--basis-method crb)")
    p.add_argument("--seed", type=_number(int, 0, strict=False), default=0,
                   help="root of the per-chunk seeds (default 0); with --chunk-size it fixes the set bitwise")
    g = p.add_argument_group("parallel and large sets (.h5 outputs are written chunk by chunk, bounded memory)")
    g.add_argument("--chunk-size", type=_positive_int, default=500,
                   help="samples per task (default 500); each chunk has its own seed, so the set depends on "
                        "--seed and --chunk-size only, not on --n-jobs or --scheduler")
    g.add_argument("--n-jobs", type=int, default=None,
                   help="joblib workers for the chunks (default 1; -1: every core; with --scheduler: the cluster's)")
    g.add_argument("--scheduler", default=None,
                   help=f"compute the chunks on dask: a scheduler address (connect timeout {SCHEDULER_TIMEOUT}), or "
                        f"'local' for a 2-worker LocalCluster")
    _common(p)
    p.set_defaults(func=cmd_simulate)
