"""Shared pieces of the ``sklearn-crb`` commands: errors, argument types, defaults, Ctrl-C and dask."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

import joblib
import numpy as np
import torch

from sklearn_crb.estimators.net.modules import InputNormalization
from sklearn_crb.io._files import check_file_name
from sklearn_crb.physics.sequence import Sequence

OVERWRITE_HELP = ("replace existing outputs; only outputs that sklearn-crb wrote are ever replaced (a training "
                  "set, a saved model, a demo folder, the files listed in a fit's summary.json), anything else "
                  "is refused")
EPILOG = ("Outputs: an existing output is refused unless --overwrite is given, and --overwrite replaces only "
          "outputs that sklearn-crb wrote itself. Errors are one line on stderr, exit status 2; Ctrl-C exits "
          "with 130 and leaves existing outputs untouched.")
SCHEDULER_TIMEOUT = "5s"
#: ``simulate`` defaults: the brain prior (parenchyma, CSF and partial volume) and an SNR range with in-vivo values.
DEFAULT_PRIOR = "brain"
DEFAULT_SNR = (10.0, 400.0)
#: Training-set size of the measured default recipe (96,000 parameter draws).
DEFAULT_N_SAMPLES = 96000
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
            v = _integral(text) if kind is int else None  # "1e6" samples: an integer in float notation
            if v is None:
                raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                                 f"got {text!r}") from None
        if not np.isfinite(v) or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _integral(text):
    """``int`` of an integral number written as a float ("1e6", "96000.0"); None otherwise."""
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if np.isfinite(v) and v == int(v) else None


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


#: Bytes a file name may have on common file systems (ext4, XFS, APFS, NTFS: 255).
NAME_MAX = 255


def _longest_output_name():
    """The longest name ``fit`` writes after its prefix (every map of the untied model, times included)."""
    from sklearn_crb.maps import map_names  # the maps decide the names; imported when a prefix is checked
    from sklearn_crb.physics.parameters import free_parameters

    names = [f"{k}.nii.gz" for k in map_names(free_parameters(False), times=True)]
    return max([*names, "overview.png", "summary.json"], key=len)


def _prefix(text):
    try:
        text = check_file_name(text, "--prefix")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    longest = _longest_output_name()
    if len((text + longest).encode()) > NAME_MAX:  # checked here: the OS refuses it only after the whole fit
        raise argparse.ArgumentTypeError(f"{len(text.encode())} bytes is too long: output names such as "
                                         f"PREFIX{longest} must stay within {NAME_MAX} bytes; give at most "
                                         f"{NAME_MAX - len(longest.encode())} bytes")
    return text


# --------------------------------------------------------------------------- helpers
#: Defaults of --TR and --n-pulses (left None in the parser, so that an option given can be told from its default).
DEFAULT_TR, DEFAULT_N_PULSES = 3.5e-3, 1142


def _sequence(args):
    """The sequence of --sequence FILE (with --TR) or the built-in one (--n-pulses, --TR)."""
    TR = DEFAULT_TR if args.TR is None else args.TR
    if getattr(args, "sequence", None):
        if args.n_pulses is not None:
            raise CLIError(f"--n-pulses sets the length of the built-in sequence; --sequence {args.sequence} has "
                           "its own length: drop --n-pulses")
        return Sequence.from_mat(args.sequence, TR=TR)
    return Sequence.default(n_pulses=DEFAULT_N_PULSES if args.n_pulses is None else args.n_pulses, TR=TR)


def _no_sequence_options(args, source):
    """Refuse --TR/--n-pulses where the sequence comes from ``source`` (a saved model), not from them."""
    given = [opt for opt, v in (("--TR", args.TR), ("--n-pulses", args.n_pulses)) if v is not None]
    if given and not getattr(args, "sequence", None):
        raise CLIError(f"{' and '.join(given)}: {source} carries its own sequence, which is used; drop "
                       f"{' and '.join(given)} (or give --sequence FILE, which must then match it)")


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


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Start worker processes with SIGINT ignored (inherited across exec): Ctrl-C reaches the whole process
    group, and each worker would print its own traceback; the command stops them itself, in one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


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
            with _workers_ignore_ctrl_c():
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


def _add_sequence_args(p, basis=True):
    g = p.add_argument_group("sequence and basis")
    g.add_argument("--sequence", help="MATLAB file with alpha (rad) and TRF (s); default: the built-in sequence")
    g.add_argument("--TR", type=_positive_float, default=None,
                   help=f"repetition time in s (default {DEFAULT_TR:g})")
    g.add_argument("--n-pulses", type=_positive_int, default=None,
                   help=f"length of the built-in sequence (default {DEFAULT_N_PULSES}; not with --sequence)")
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
