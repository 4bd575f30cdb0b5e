"""Rebuild the pretrained networks shipped in ``sklearn_crb/data/pretrained/`` (reproducibly, seeded).

Trains the demo's two networks with the package's default recipe (:func:`sklearn_crb.recipes.make_network`,
the estimator's own defaults; only the training budget is set here), a CRB-loss network and its MSE-loss
twin, on the same fingerprints of the built-in sequence (``Sequence.default()``): the tied model, the
"brain" prior, every free parameter estimated, a rank-13 CRB-optimised basis, training SNR 10-300. Each
network is saved with :func:`sklearn_crb.io.models.save_model` (format 5, hashed) into
``<out>/demo-<loss>/``, with ``provenance.json`` beside it: recipe, seed, commit, command, date, and the
efficiency measured on held-out draws (nMSE beside median |bias|/sqrt(CRB), std/sqrt(CRB) and the
prior-mean predictor's row, on the informative draws, per SNR), from
:func:`sklearn_crb.metrics.bias_variance_report` and :func:`~sklearn_crb.metrics.constant_predictor_report`.

Usage::

    python scripts/build_pretrained.py                 # the shipped size: 96,000 draws x 150 epochs
    python scripts/build_pretrained.py --quick --out /tmp/pre   # a smoke run of about a minute

Existing model folders are replaced only with ``--overwrite`` and only if they are model folders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("m0s", "R1f", "R2f")  # reported; the networks estimate every free parameter of the tied model
EVAL_SNRS = (20.0, 50.0, 80.0, 150.0)  # |M0|/sigma of the held-out draws; 80 is WM in vivo (the demo's)
#: The shipped size: the full demo's budget (``sklearn-crb demo --train``), the default recipe's 150 epochs on
#: 96,000 draws (a fresh noise draw per epoch): about 7 minutes on an idle 2-core machine, 30 and more under
#: load; ``--n-train 24000`` is a quarter of it.
SIZES = {False: {"n_train": 96000, "epochs": 150, "n_basis": 500, "n_eval": 400, "n_draws": 25},
         True: {"n_train": 1500, "epochs": 5, "n_basis": 300, "n_eval": 40, "n_draws": 4}}
BASIS_METHOD, RANK, TRAIN_SNR = "crb", 13, (10.0, 300.0)


def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
        return (head.stdout.strip() or "unknown"), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _simulator(cfg, seed):
    from sklearn_crb.physics.parameters import free_parameters
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.simulator import MTFingerprintSimulator

    return MTFingerprintSimulator(Sequence.default(), n_components=RANK, estimate=free_parameters(True),
                                  n_basis_samples=cfg["n_basis"], basis_method=BASIS_METHOD, snr=TRAIN_SNR,
                                  tied_R1=True, prior="brain", random_state=seed).fit()


def _held_out(sim, cfg, seed):
    """Noisy draws of held-out thetas at each of ``EVAL_SNRS``: features, truth, CRB, group, SNR per row."""
    from sklearn_crb.io.datasets import simulate_dataset
    from sklearn_crb.simulator import apply_m0_and_noise

    ev = simulate_dataset(sim, cfg["n_eval"], seed, progress=False)
    rng = np.random.default_rng(seed)
    n_theta, f = ev["X_clean"].shape
    rows = {k: [] for k in ("X", "y", "crb", "group", "snr")}
    for i, s in enumerate(EVAL_SNRS):
        idx = np.repeat(np.arange(n_theta), cfg["n_draws"])
        M0 = sim.sigma * s * np.exp(2j * np.pi * rng.uniform(0, 1, idx.size))
        eps = sim.sigma * (rng.standard_normal((idx.size, f // 2)) + 1j * rng.standard_normal((idx.size, f // 2)))
        rows["X"].append(apply_m0_and_noise(ev["X_clean"][idx], M0, eps))
        rows["y"].append(ev["y"][idx])
        rows["crb"].append(ev["crb_unit"][idx] / s**2)  # the unit-SNR CRB scales as 1/SNR^2
        rows["group"].append(idx + i * n_theta)
        rows["snr"].append(np.full(idx.size, s))
    return {k: np.concatenate(v) for k, v in rows.items()}


def _informative_rows(rep, label):
    """One record per (SNR, parameter) of the informative stratum of a report."""
    out = []
    for r in rep.strata:
        if r["identifiability"] == "informative" and r["snr"] != "all":
            out.append({"estimator": label, "snr": r["snr"], "parameter": r["parameter"], "n_theta": r["n_theta"],
                        "nmse": r["normalized_mse"],
                        "median_abs_bias_over_sqrt_crb": r["median_abs_bias_over_sqrt_crb"],
                        "median_std_over_sqrt_crb": r["median_std_over_sqrt_crb"]})
    return out


def efficiency(net, sim, ev):
    """The network's and the prior-mean predictor's informative-draw rows per SNR (a list of records)."""
    from sklearn_crb.metrics import bias_variance_report, constant_predictor_report, prior_moments

    cols = [list(sim.estimate_).index(p) for p in NAMES]
    pred = np.asarray(net.predict(ev["X"]))[:, cols]
    yt, crb = ev["y"][:, cols], ev["crb"][:, cols]
    mean, var = prior_moments(sim.prior_, NAMES)
    rep = bias_variance_report(yt, pred, crb=crb, groups=ev["group"], names=NAMES, prior_variance=var,
                               snr=ev["snr"])
    first = np.unique(ev["group"], return_index=True)[1]  # one row per theta and SNR
    base = constant_predictor_report(yt[first], mean, crb=crb[first], names=NAMES, prior_variance=var,
                                     snr=ev["snr"][first])
    return _informative_rows(rep, net.loss) + _informative_rows(base, "prior mean")


def _train(loss, sim, data, cfg, seed):
    from sklearn_crb.recipes import make_network

    t0 = time.perf_counter()
    net = make_network(loss, sim, epochs=cfg["epochs"], device="cpu", seed=seed, progress=False, noise_input=False)
    net.set_params(augment=True)  # as the demo trains: a fresh noise draw per epoch
    net.fit(data["X_clean"], data["y"], crb=data["crb_unit"])
    return net, time.perf_counter() - t0


def _check_folder(folder, overwrite):
    """A model folder this script may write: new, or (with ``overwrite``) one holding only what it wrote."""
    from sklearn_crb.io._files import check_output_folder
    from sklearn_crb.io.models import MODEL_FILES

    return check_output_folder(folder, overwrite=overwrite, owned_names=MODEL_FILES + ("provenance.json",),
                               marker="model.json", argname="--out")


def _save(net, sim, folder, prov, overwrite):
    """The model folder and its provenance, replacing ``folder`` as a whole (atomically)."""
    from sklearn_crb._atomic import atomic_dir
    from sklearn_crb.io.models import save_model

    folder = _check_folder(folder, overwrite)
    with atomic_dir(folder, argname="--out") as tmp:
        save_model(net, tmp / "model", simulator=sim)
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")


def build(out, seed=0, quick=False, overwrite=False, argv=(), n_train=None, epochs=None):
    """Train, measure and save the CRB and MSE networks; returns the provenance records."""
    import joblib

    from sklearn_crb._version import __version__
    from sklearn_crb.io.datasets import simulate_dataset

    cfg = dict(SIZES[bool(quick)])
    cfg.update({k: v for k, v in (("n_train", n_train), ("epochs", epochs)) if v is not None})
    out = Path(out)
    folders = {loss: out / f"demo-{loss}" for loss in ("crb", "mse")}
    for f in folders.values():  # refuse before the training, not after
        _check_folder(f, overwrite)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit, dirty = _git_commit()
    t0 = time.perf_counter()
    sim = _simulator(cfg, seed)
    data = simulate_dataset(sim, cfg["n_train"], seed, progress=False)
    print(f"[{time.perf_counter() - t0:6.0f} s] basis and {cfg['n_train']} training fingerprints", flush=True)
    trained = joblib.Parallel(n_jobs=2, backend="loky")(
        joblib.delayed(_train)(loss, sim, data, cfg, seed) for loss in folders)
    print(f"[{time.perf_counter() - t0:6.0f} s] trained", flush=True)
    ev = _held_out(sim, cfg, seed + 1000)  # thetas and noise the training never saw
    records = {}
    for (loss, folder), (net, seconds) in zip(folders.items(), trained):
        prov = {"name": folder.name, "loss": loss, "twin": f"demo-{'mse' if loss == 'crb' else 'crb'}",
                "recipe": {"function": "sklearn_crb.recipes.make_network", "paper": False, "epochs": cfg["epochs"],
                           "augment": True, "module": type(net.module_.module).__name__,
                           "hidden": list(net.module_.module.hidden) if hasattr(net.module_.module, "hidden")
                           else None, "batch_size": net.batch_size, "lr": net.lr},
                "training_set": {"n_samples": cfg["n_train"], "prior": "brain", "tied_R1": True,
                                 "snr": list(TRAIN_SNR), "estimate": list(sim.estimate_), "rank": RANK,
                                 "basis_method": BASIS_METHOD, "n_basis_samples": cfg["n_basis"],
                                 "sequence": sim.sequence_.name},
                "sequence_sha256": sim.sequence_.sha256(), "seed": seed, "quick": bool(quick),
                "commit": commit, "dirty": dirty, "sklearn_crb_version": __version__,
                "command": ("python scripts/build_pretrained.py " + shlex.join(argv)).strip(), "date": date,
                "train_seconds": seconds,
                "efficiency": {"description": "held-out draws (thetas from the prior, noise draws per theta) at "
                                              "each SNR; rows of the informative stratum (CRB < 0.1 x prior "
                                              "variance); 'prior mean' is the constant prior-mean predictor",
                               "n_theta": cfg["n_eval"], "n_draws": cfg["n_draws"], "snrs": list(EVAL_SNRS),
                               "rows": efficiency(net, sim, ev)}}
        _save(net, sim, folder, prov, overwrite)
        records[loss] = prov
        print(f"[{time.perf_counter() - t0:6.0f} s] wrote {folder}", flush=True)
    return records


def _table(records):
    lines = [f"{'estimator':<11} {'SNR':>5} {'param':<5} {'n':>4} {'nMSE':>8} {'|bias|/sqrtCRB':>15} "
             f"{'std/sqrtCRB':>12}"]
    seen = set()
    for prov in records.values():
        for r in prov["efficiency"]["rows"]:
            key = (r["estimator"], r["snr"], r["parameter"])
            if key in seen:
                continue
            seen.add(key)
            fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            lines.append(f"{r['estimator']:<11} {r['snr']:>5} {r['parameter']:<5} {r['n_theta']:>4} "
                         f"{fmt(r['nmse']):>8} {fmt(r['median_abs_bias_over_sqrt_crb']):>15} "
                         f"{fmt(r['median_std_over_sqrt_crb']):>12}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "sklearn_crb" / "data" / "pretrained"),
                   help="folder of the model folders (default sklearn_crb/data/pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; the models mean nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing demo-crb/demo-mse model folders")
    p.add_argument("--n-train", type=int, default=None, help="training draws (default 96000; --quick 1500)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 150, the recipe's; --quick 5)")
    args = p.parse_args(argv)
    for name in ("n_train", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        records = build(args.out, seed=args.seed, quick=args.quick, overwrite=args.overwrite, argv=argv,
                        n_train=args.n_train, epochs=args.epochs)
    except ValueError as exc:  # a refused --out: one line, exit status 2
        p.error(str(exc))
    print(_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
