"""The ``sklearn-crb`` parser and entry point (one-line errors, exit status 2; 130 after Ctrl-C)."""

from __future__ import annotations

import os
import sys
import warnings

import sklearn_crb.cli.fit as fit
import sklearn_crb.cli.migrate as migrate
import sklearn_crb.cli.simulate as simulate
import sklearn_crb.cli.train as train
from sklearn_crb._version import __version__
from sklearn_crb.cli._common import EPILOG, CLIError, _common, _Parser
from sklearn_crb.demo import run_demo

__all__ = ["main", "build_parser"]


def _warning_line(command):
    """A ``warnings.showwarning`` for the CLI: one line in the user's terms, without the source path and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"sklearn-crb {command}: warning: {_one_line(message)}", file=file or sys.stderr, flush=True)
    return show


def cmd_demo(args):
    with warnings.catch_warnings():  # restores the user's showwarning afterwards
        warnings.showwarning = _warning_line("demo")
        run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite,
                 train=args.train)
    return 0


def build_parser():
    """The argparse parser of ``sklearn-crb``."""
    parser = _Parser(
        prog="sklearn-crb", epilog=EPILOG,
        description="Cramér–Rao-bound-informed neural networks and NLLS for quantitative MT MRI "
                    "(Zhang et al., MRM 2022).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,simulate,train,fit,migrate-model,migrate-data}")
    sub.required = True

    p = sub.add_parser("demo", help="end-to-end demo on a simulated brain phantom (no downloads)", epilog=EPILOG,
                       description="Fit a simulated brain phantom of the built-in sequence with the shipped "
                                   "pretrained CRB-loss network, its MSE-loss twin and NLLS, print a comparison "
                                   "table against the Cramér-Rao bound and per-tissue medians, and write PNG "
                                   "figures (about a minute); --train trains both networks here first.")
    p.add_argument("--out", default="sklearn_crb_demo", help="output directory (default ./sklearn_crb_demo)")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (smaller phantom and NLLS subset; "
                                                        "with --train a much smaller training budget)")
    p.add_argument("--train", action="store_true", help="train the CRB and MSE networks here instead of using the "
                                                        "shipped ones (the full comparison: about 10 minutes on 2 "
                                                        "cores)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_demo)
    simulate.add_parser(sub)
    train.add_parser(sub)
    fit.add_parser(sub)
    migrate.add_parser(sub)
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
