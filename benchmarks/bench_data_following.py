"""Does a trained network follow the data as far as its own loss wants? The one-step test.

A network trained with a squared-error loss (the CRB loss included) should
approach the minimiser of that loss. Then no correction that moves its
estimate along the data, however small, lowers the loss on fresh prior
draws. This script takes one exact Gauss-Newton step from the network's
estimate towards the data, ``delta = theta_GN - theta_net`` (the package's
``NLLSFitter(init=net, max_iter=1)``: exact Jacobian, complex M0 and every
free parameter of the model, no damping to speak of), and reports per
parameter the fraction ``beta*`` of that step that minimises the
CRB-weighted squared error on held-out prior draws::

    beta* = sum_n w_n r_n d_n / sum_n w_n d_n^2,   r = theta - theta_net,  d = delta

with the weights ``w = 1/CRB`` at the truth (the paper's loss) and at the
estimate (``crb_at="auto"``). ``beta* = 0`` is what a net at its loss
optimum gives; ``beta* > 0`` means that the net shrinks too much (it
under-follows the data), ``beta* < 0`` that it over-follows. Beside
``beta*`` the script prints the CRB-normalised MSE of ``theta_net + beta
delta`` for a grid of ``beta`` (all draws and the informative ones,
CRB < 0.1 x prior variance), so that the size of the possible gain is
visible. A full step (``beta = 1``) is a one-step NLLS estimate: at rank 13
and moderate SNR it is noisier than the net.

Input: a model folder written by ``sklearn-crb train`` / ``save_model``
(its sequence, basis, estimate and tied flag are read from it); the
prior is ``--prior`` (the one the net was trained on). Outputs
``data_following.json``, ``.md`` and ``.png`` in ``--out``. Usage::

    python benchmarks/bench_data_following.py --model crb_model --snr 100 [--n 3000] [--prior brain]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _results import save_figure, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (sklearn-crb train --out)")
    p.add_argument("--snr", type=float, default=100.0, help="|M0|/sigma of the held-out draws (default 100)")
    p.add_argument("--n", type=int, default=3000, help="held-out prior draws (default 3000)")
    p.add_argument("--prior", default="brain", help="prior the draws come from (default brain)")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if a.n < 10 or not a.snr > 0:
        p.error("--n must be >= 10 and --snr positive")
    return a


def step_fractions(y, p0, d, w):
    """``beta*`` per column: the weighted least-squares fraction of the step ``d`` that best explains ``y - p0``."""
    import numpy as np

    ok = np.isfinite(d) & np.isfinite(w) & np.isfinite(p0)
    num = np.where(ok, w * (y - p0) * d, 0.0).sum(axis=0)
    den = np.where(ok, w * d**2, 0.0).sum(axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_se(y, p0, d, w, n_boot=200, seed=0):
    """Bootstrap standard error of :func:`step_fractions` over the draws (a few heavy-weight draws dominate)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reps = [step_fractions(y[i], p0[i], d[i], w[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    return np.nanstd(np.asarray(reps), axis=0)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from sklearn_crb.estimators.nlls import NLLSFitter
    from sklearn_crb.io.models import load_model
    from sklearn_crb.metrics import prior_moments
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.simulator import MTFingerprintSimulator, apply_m0_and_noise

    t0 = time.perf_counter()
    net = load_model(args.model, device="cpu")
    meta = net.crb_metadata_
    seq = Sequence.from_dict(meta["sequence"])
    est, tied = tuple(meta["estimate"]), bool(meta["tied_R1"])
    sim = MTFingerprintSimulator(seq, basis=meta["basis"], estimate=est, tied_R1=tied, prior=args.prior,
                                 snr=(args.snr, args.snr), random_state=args.seed).fit()
    theta = sim.prior_.sample(args.n, args.seed)
    _, y, _, det = sim.make_dataset(args.n, [args.seed, 1], theta=theta, return_details=True)
    rng = np.random.default_rng(args.seed + 1)
    sigma = float(sim.sigma)
    r = det["X_clean"].shape[1] // 2
    M0 = sigma * args.snr * np.exp(2j * np.pi * rng.uniform(0, 1, args.n))
    X = apply_m0_and_noise(det["X_clean"], M0, sigma * (rng.standard_normal((args.n, r))
                                                        + 1j * rng.standard_normal((args.n, r))))
    crb_truth = det["crb_unit"] / args.snr**2  # CRB at |M0| = snr * sigma
    p0 = np.asarray(net.predict(X), dtype=float)
    t = time.perf_counter()
    gn = NLLSFitter(seq, basis=meta["basis"], estimate=est, tied_R1=tied, init=net, max_iter=1, lambda0=1e-6,
                    se_tol=1e-12, gtol=1e-30, xtol=1e-30, ftol=1e-30).fit()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=1: every voxel "did not converge", by design
        gd = gn.predict_details(X)
    step_s = time.perf_counter() - t
    d = np.asarray(gd["prediction"], dtype=float) - p0
    crb_est = gd["crb_unit"] / args.snr**2  # CRB at the step's end point: the estimate's, to first order
    _, p_var = prior_moments(sim.prior_, est, random_state=args.seed + 7)
    informative = crb_truth < 0.1 * p_var
    w_truth, w_est = 1.0 / crb_truth, 1.0 / crb_est
    res = {"model": str(args.model), "snr": args.snr, "n": args.n, "prior": args.prior, "estimate": list(est),
           "step_seconds": step_s, "beta_star": {}, "beta_star_se": {}, "nmse": {}}
    for lab, m in (("all", np.ones_like(informative)), ("informative", informative)):
        mm = np.where(m, 1.0, np.nan)
        for wl, w in (("truth", w_truth * mm), ("estimate", w_est * mm)):
            res["beta_star"][f"{lab}, w at {wl}"] = step_fractions(y, p0, d, w).tolist()
            res["beta_star_se"][f"{lab}, w at {wl}"] = bootstrap_se(y, p0, d, w, seed=args.seed).tolist()
        res["nmse"][lab] = {str(b): np.nanmean(np.where(m, (p0 + b * d - y) ** 2 / crb_truth, np.nan), axis=0).tolist()
                            for b in BETAS}
    res["n_informative"] = informative.sum(axis=0).tolist()
    res["seconds"] = time.perf_counter() - t0
    lines = [f"# One-step test: {args.model}, SNR {args.snr:g}, {args.n} draws of the {args.prior!r} prior",
             "", f"`python benchmarks/bench_data_following.py --model {args.model} --snr {args.snr:g} --n {args.n}`",
             "", "beta*: the loss-optimal fraction of one exact Gauss-Newton step from the net's estimate "
             "(0: the net follows the data as its loss wants; > 0: it shrinks too much).", "",
             "| | " + " | ".join(est) + " |", "|---|" + "---|" * len(est)]
    lines += [f"| beta* ± bootstrap SE, {k} | " + " | ".join(f"{v:+.2f} ± {e:.2f}" for v, e in zip(
        vals, res["beta_star_se"][k])) + " |" for k, vals in res["beta_star"].items()]
    lines += ["| n informative | " + " | ".join(str(v) for v in res["n_informative"]) + " |", ""]
    lines += ["CRB-normalised MSE of theta_net + beta * step:", "", "| draws | beta | " + " | ".join(est) + " |",
              "|---|---|" + "---|" * len(est)]
    for lab, rows in res["nmse"].items():
        lines += [f"| {lab} | {b} | " + " | ".join(f"{v:.3g}" for v in vals) + " |" for b, vals in rows.items()]
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "data_following.json", res)
    write_text(out / "data_following.md", table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, q in enumerate(est):
        ax.plot(BETAS, [res["nmse"]["informative"][str(b)][j] for b in BETAS], marker="o", label=q)
    ax.set(xlabel="fraction beta of one Gauss-Newton step", ylabel="nMSE, informative draws", yscale="log",
           title=f"SNR {args.snr:g}")
    ax.legend(fontsize=7)
    save_figure(fig, out / "data_following.png")
    print(table)
    print(f"one GN step on {args.n} draws: {step_s:.1f} s; total {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
