"""The ``sklearn-crb`` parser and entry point (one-line errors, exit status 2; 130 after Ctrl-C)."""

from __future__ import annotations

import os
import sys

import sklearn_crb.cli.fit as fit
import sklearn_crb.cli.migrate as migrate
import sklearn_crb.cli.simulate as simulate
import sklearn_crb.cli.train as train
from sklearn_crb._version import __version__
from sklearn_crb.cli._common import EPILOG, CLIError, _common, _Parser
from sklearn_crb.demo import run_demo

__all__ = ["main", "build_parser"]


def cmd_demo(args):
    run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
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
                       description="Simulate training data with the built-in sequence, train a CRB-loss and an "
                                   "MSE-loss network, fit a brain phantom with both and with NLLS, print a "
                                   "comparison table and write PNG figures.")
    p.add_argument("--out", default="sklearn_crb_demo", help="output directory (default ./sklearn_crb_demo)")
    p.add_argument("--quick", action="store_true", help="reduced sizes for CI (about a minute)")
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
