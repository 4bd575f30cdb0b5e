"""The benchmark harness: common options, machine facts and the one results writer.

Every ``benchmarks/bench_*.py`` script builds its parser on :func:`parser` (options ``--out DIR``,
``--seed``, ``--threads``, ``--quick``), calls :func:`start` once its options are parsed, and writes its
results with :meth:`Run.write`; figures go through :meth:`Run.save_figure`. A script imports this module
as ``from _harness import ...`` (a script's own folder is first on ``sys.path``) and never imports another
script: code that two scripts share lives here.

Results schema
--------------
Each run writes ``<out>/<benchmark>.json``, or ``<out>/<benchmark>-<variant>.json`` for a variant of the
benchmark (``--quick`` runs are the variant ``quick``, so that a smoke run never replaces a real result).
The documentation's benchmarks page is generated from these files; it shows ``tables``. The file holds one
JSON object::

    {
      "benchmark": str,      # the script's name without "bench_" and ".py", e.g. "crb_vs_mse"
      "title": str,          # one line: what was measured
      "command": str,        # the command line that produced the file, "python benchmarks/<script> ..."
      "commit": str,         # git commit of the working tree ("unknown" outside a git checkout)
      "dirty": bool,         # whether the tree had uncommitted changes to tracked files
      "machine": {...},      # machine(): CPU model, cores, load average, versions, CUDA device
      "date": str,           # ISO 8601 with time zone, when the run started
      "wall_s": float,       # seconds from start() to write()
      "quick": bool,         # a --quick smoke run: tiny sizes, its figures mean nothing
      "tables": [            # what the docs show, in order
        {"title": str, "columns": [str], "rows": [[str | number]], "notes": str}
      ],
      "data": {...}          # free-form: configuration and raw results
    }

Non-finite numbers are written as ``null`` in ``data`` and as text (``"nan"``, ``"inf"``) in tables, so the
file is strict JSON. Writing is atomic (the package's :func:`sklearn_crb._atomic.atomic_path`): an
interrupted benchmark leaves the previous file as it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator

from sklearn_crb._atomic import atomic_path

__all__ = ["RESULTS", "V32", "parser", "start", "Run", "table", "validate", "machine", "git_state", "sequence",
           "v32_path", "cached_dataset", "eval_draws", "save_npz", "GivenStart", "crb_covariance", "step_fractions",
           "bootstrap_se", "quick_model"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
V32 = "control_MT_v3p2_TR3p5ms_discretized.mat"
TOP_KEYS = {"benchmark": str, "title": str, "command": str, "commit": str, "dirty": bool, "machine": dict,
            "date": str, "wall_s": float, "quick": bool, "tables": list, "data": dict}


# ------------------------------------------------------------------ options
def _folder(value):
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"--out must be a folder, {value} is a file")
    return path


def parser(doc, *, seed=0, threads=1):
    """An ``ArgumentParser`` described by the module docstring ``doc``, with the harness's options.

    ``--out DIR`` (default ``benchmarks/results/``), ``--seed`` (default ``seed``), ``--threads`` and
    ``--quick``. ``--threads N`` sets torch's and numba's CPU threads; without it torch gets ``threads``
    (``None``: its default) and numba keeps its default (all CPUs), as the scripts always ran.
    """
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("harness")
    g.add_argument("--out", type=_folder, default=RESULTS, metavar="DIR",
                   help="folder of the results (default benchmarks/results/)")
    g.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    g.add_argument("--threads", type=int, default=None,
                   help=f"torch and numba CPU threads (default: torch {threads or 'default'}, numba all CPUs)")
    g.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: tiny sizes, written as "
                                                        "<benchmark>-quick.json")
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(torch_threads=threads)
    return p


def _set_threads(args):
    import torch

    n = args.threads
    if n is None:
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        return
    if n < 1:
        raise SystemExit(f"--threads must be at least 1, got {n}")
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------- machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "sklearn", "skorch", "torch", "numba", "sklearn_crb"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(mod, "__version__", "unknown")
    return out


def machine():
    """Facts about this machine: CPU model, cores, load average, library versions, threads, CUDA device."""
    import numba
    import torch

    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "versions": _versions(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "cuda": None}
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpus_available"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                        "cuda": torch.version.cuda}
    return info


def git_state():
    """``(commit, dirty)`` of the checkout holding the benchmarks; ``("unknown", False)`` outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", False
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


# ------------------------------------------------------------------ results
def table(title, columns, rows, notes=""):
    """A table of the results file: ``rows`` of str or numbers, one cell per column."""
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "notes": notes}


def _plain(obj, in_table=False):
    """``obj`` as plain JSON types: numpy scalars and arrays unpacked, non-finite floats made explicit."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, in_table) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v, in_table) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj) if in_table else None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)  # paths, dtypes, classes: their text


def validate(doc):
    """Raise ``ValueError`` naming the first field of ``doc`` that breaks the results schema."""
    for key, typ in TOP_KEYS.items():
        ok = isinstance(doc.get(key), (int, float) if typ is float else typ) and not (
            typ is not bool and isinstance(doc.get(key), bool))
        if not ok:
            raise ValueError(f"results field {key!r} must be {typ.__name__}, got {doc.get(key)!r:.80}")
    for i, t in enumerate(doc["tables"]):
        if set(t) != {"title", "columns", "rows", "notes"}:
            raise ValueError(f"tables[{i}] must have exactly title, columns, rows, notes; got {sorted(t)}")
        n = len(t["columns"])
        for r in t["rows"]:
            if len(r) != n or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in r):
                raise ValueError(f"tables[{i}] ({t['title']!r}): a row is not {n} str/number cells: {r!r:.120}")


def _format(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(t):
    """``t`` as aligned plain text, for the terminal."""
    cells = [list(map(str, t["columns"]))] + [[_format(v) for v in r] for r in t["rows"]]
    width = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    lines = [f"## {t['title']}"] + ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in cells]
    return "\n".join(lines + ([t["notes"]] if t["notes"] else []))


class Run:
    """One benchmark run: where it writes, when it started, and how it logs."""

    def __init__(self, benchmark, title, args, argv, variant=None):
        self.benchmark, self.title, self.args = benchmark, title, args
        self.out = Path(args.out)
        parts = [v for v in (variant, "quick" if args.quick else None) if v]
        self.stem = "-".join([benchmark, *parts])
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        self.command = f"python benchmarks/bench_{benchmark}.py {shlex.join(argv)}".strip()
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()

    def log(self, msg):
        """Print ``msg`` with the seconds since the start."""
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def path(self, suffix):
        """``<out>/<benchmark>[-variant].<suffix>``: the results file's siblings (figures)."""
        return self.out / f"{self.stem}.{suffix}"

    def save_figure(self, fig, dpi=100, suffix="png"):
        """Save a matplotlib figure atomically next to the results file and close it; returns the path."""
        import matplotlib.pyplot as plt

        path = self.path(suffix)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
        plt.close(fig)
        return path

    def write(self, tables, data, quiet=False):
        """Validate and write the results file atomically; print the tables; returns the document."""
        commit, dirty = git_state()
        doc = {"benchmark": self.benchmark, "title": self.title, "command": self.command, "commit": commit,
               "dirty": dirty, "machine": machine(), "date": self.date, "wall_s": time.perf_counter() - self.t0,
               "quick": bool(self.args.quick), "tables": _plain(tables, in_table=True), "data": _plain(data)}
        validate(doc)
        path = self.path("json")
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        if not quiet:
            print("\n" + "\n\n".join(format_table(t) for t in doc["tables"]))
        self.log(f"wrote {path}")
        return doc


def start(benchmark, title, args, argv=None, variant=None):
    """Begin a run: set the thread counts, create ``--out`` and return the :class:`Run`."""
    _set_threads(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Run(benchmark, title, args, argv, variant)


# ------------------------------------------------------ shared by scripts
def v32_path():
    """Where the v3.2 sequence file should be: ``$SKLEARN_CRB_DATA`` (default ``../shared/data``)."""
    return Path(os.environ.get("SKLEARN_CRB_DATA", ROOT.parent / "shared" / "data")) / V32


def sequence(required=False):
    """``(Sequence, name)``: v3.2 from :func:`v32_path`, else the built-in sequence (the same 1142 pulses),
    unless ``required``."""
    from sklearn_crb import Sequence

    path = v32_path()
    if path.is_file():
        return Sequence.from_mat(path, TR=3.5e-3), V32
    if required:
        raise SystemExit(f"{V32} not found in SKLEARN_CRB_DATA={path.parent}: this benchmark is defined on v3.2")
    return Sequence.default(), "built-in"


def save_npz(path, **arrays):
    """``np.savez`` atomically (never a partly written cache file)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def cached_dataset(sim, n, seed, cache, tag, log, theta=None, chunk=2000):
    """Noise-free features, targets, unit CRBs and theta of ``n`` draws of ``sim``, cached per chunk in
    ``cache`` (files ``<tag>_seed<seed>_n<m>_chunk<k>.npz``)."""
    parts = []
    for k in range(-(-n // chunk)):
        m = min(chunk, n - k * chunk)
        f = Path(cache) / f"{tag}_seed{seed}_n{m}_chunk{k}.npz"
        if f.is_file():
            d = np.load(f)
            parts.append({key: d[key] for key in d.files})
            continue
        t = time.perf_counter()
        th = None if theta is None else theta[k * chunk:k * chunk + m]
        _, y, _, det = sim.make_dataset(m, [seed, k], theta=th, return_details=True)
        d = {"X_clean": det["X_clean"], "y": y, "crb_unit": det["crb_unit"], "theta": det["theta"]}
        save_npz(f, **d)
        parts.append(d)
        log(f"  {tag} chunk {k}: {m} Jacobians in {time.perf_counter() - t:.1f} s")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def eval_draws(ev, snrs, n_draws, sigma, seed):
    """Noisy features of ``ev`` at exactly each SNR (uniform M0 phase), with groups, SNR and CRB per row."""
    from sklearn_crb.simulator import apply_m0_and_noise

    rng = np.random.default_rng(seed)
    n_theta, f = ev["X_clean"].shape
    rows = {k: [] for k in ("X", "y", "crb", "group", "snr", "theta_index", "draw_index")}
    for i, s in enumerate(snrs):
        idx = np.repeat(np.arange(n_theta), n_draws)
        M0 = sigma * s * np.exp(2j * np.pi * rng.uniform(0, 1, idx.size))
        eps = sigma * (rng.standard_normal((idx.size, f // 2)) + 1j * rng.standard_normal((idx.size, f // 2)))
        rows["X"].append(apply_m0_and_noise(ev["X_clean"][idx], M0, eps))
        rows["y"].append(ev["y"][idx])
        rows["crb"].append(ev["crb_unit"][idx] / s**2)  # CRB at |M0| = s * sigma: unit CRB * sigma^2/|M0|^2
        rows["group"].append(idx + i * n_theta)
        rows["snr"].append(np.full(idx.size, float(s)))
        rows["theta_index"].append(idx)
        rows["draw_index"].append(np.tile(np.arange(n_draws), n_theta))
    return {k: np.concatenate(v) for k, v in rows.items()}


class GivenStart(BaseEstimator):
    """A fitted stand-in for a network, as ``NLLSFitter(init=...)`` takes one: returns the given estimates
    ``values`` of ``names`` for the first ``len(X)`` rows."""

    def __init__(self, values=None, names=()):
        self.values, self.names = values, names

    def fit(self, X=None, y=None):
        self.estimate_ = tuple(self.names)
        return self

    def predict(self, X):
        return self.values[: len(X)]


def crb_covariance(seq, basis, theta, M0, sigma, free):
    """Full CRB covariance (n, p, p) of the tied model's free parameters at ``theta`` (complex M0 unknown; a
    pseudo-inverse where the Fisher matrix is singular, e.g. m0s = 0), and the signal and Jacobian."""
    import torch

    from sklearn_crb.crb import fisher_columns, project
    from sklearn_crb.physics.signal import jacobian

    s, J = jacobian(seq, theta)
    C, _, n_est = fisher_columns(torch.as_tensor(s), torch.as_tensor(J), estimate=free, tied_R1=True)
    C = project(torch.as_tensor(basis), C)
    scale = np.abs(np.asarray(M0)) ** 2 / np.asarray(sigma, dtype=float) ** 2
    F = (C.conj().transpose(1, 2) @ C).real.numpy() * np.reshape(scale, (-1, 1, 1))
    cov = np.linalg.pinv(np.nan_to_num(F), hermitian=True)[:, :n_est, :n_est]
    return 0.5 * (cov + cov.transpose(0, 2, 1)), s, J


def step_fractions(y, p0, d, w):
    """``beta*`` per column: the weighted least-squares fraction of the step ``d`` that best explains
    ``y - p0`` (non-finite steps, weights or starts are left out)."""
    ok = np.isfinite(d) & np.isfinite(w) & np.isfinite(p0)
    num = np.where(ok, w * (y - p0) * d, 0.0).sum(axis=0)
    den = np.where(ok, w * d**2, 0.0).sum(axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_se(y, p0, d, w, n_boot=200, seed=0):
    """Bootstrap standard error of :func:`step_fractions` over the draws (a few heavy-weight draws dominate)."""
    rng = np.random.default_rng(seed)
    reps = [step_fractions(y[i], p0[i], d[i], w[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    return np.nanstd(np.asarray(reps), axis=0)


def quick_model(folder, seed=0, basis=None):
    """Train and save a tiny tied network estimating every free parameter (the stand-in model folder of a
    ``--quick`` run of a script that needs ``--model``); returns the folder. Its quality is irrelevant."""
    from sklearn_crb import CRBNetRegressor, MTFingerprintSimulator, save_model
    from sklearn_crb.physics.parameters import free_parameters

    seq, _ = sequence()
    kw = {"n_components": 13, "n_basis_samples": 100} if basis is None else {"basis": basis}
    sim = MTFingerprintSimulator(seq, estimate=free_parameters(True), tied_R1=True, prior="brain",
                                 random_state=seed, **kw).fit()
    net = CRBNetRegressor(simulator=sim, max_epochs=2, module__hidden=(32, 32), random_state=seed, device="cpu",
                          crb_at="truth").fit_simulated(400)
    return save_model(net, Path(folder), simulator=sim)
