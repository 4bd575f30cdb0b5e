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
(its sequence, basis, estimate and tied flag are read from it), trained on
the ``brain`` prior (``--quick`` without ``--model`` trains a tiny
stand-in). Outputs ``data_following.json`` and ``.png`` in ``--out``.
Usage::

    python benchmarks/bench_data_following.py --model crb_model --snr 100 [--n 3000]
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _harness import bootstrap_se, parser, quick_model, start, step_fractions, table

BETAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PRIOR = "brain"


def parse_args(argv=None):
    p = parser(__doc__, seed=4242)
    p.add_argument("--model", default=None, help="model folder (sklearn-crb train --out); required unless --quick")
    p.add_argument("--snr", type=float, default=100.0, help="|M0|/sigma of the held-out draws (default 100)")
    p.add_argument("--n", type=int, default=3000, help="held-out prior draws (default 3000)")
    a = p.parse_args(argv)
    if a.model is None and not a.quick:
        p.error("--model is required (only --quick trains a stand-in)")
    if a.quick:
        a.n = 40
    if a.n < 10 or not a.snr > 0:
        p.error("--n must be >= 10 and --snr positive")
    return a


def one_step(net, args):
    """Held-out draws, the net's estimates ``p0``, the Gauss-Newton step ``d`` and the CRBs at truth and step."""
    from sklearn_crb import MTFingerprintSimulator, NLLSFitter, Sequence
    from sklearn_crb.simulator import apply_m0_and_noise

    meta = net.crb_metadata_
    seq = Sequence.from_dict(meta["sequence"])
    est, tied = tuple(meta["estimate"]), bool(meta["tied_R1"])
    sim = MTFingerprintSimulator(seq, basis=meta["basis"], estimate=est, tied_R1=tied, prior=PRIOR,
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=1: every voxel "did not converge", by design
        gd = gn.predict_details(X)
    step_s = time.perf_counter() - t
    d = np.asarray(gd.prediction, dtype=float) - p0
    crb_est = gd.crb_unit / args.snr**2  # CRB at the step's end point: the estimate's, to first order
    return sim, est, y, p0, d, crb_truth, crb_est, step_s


def tables(res, est):
    rows = [[f"beta* ± bootstrap SE, {k}", *(f"{v:+.2f} ± {e:.2f}" for v, e in zip(vals, res["beta_star_se"][k]))]
            for k, vals in res["beta_star"].items()]
    rows.append(["n informative", *res["n_informative"]])
    nmse = [[lab, b, *vals] for lab, by_b in res["nmse"].items() for b, vals in by_b.items()]
    return [table(f"One-step test, SNR {res['snr']:g}, {res['n']} draws of the {PRIOR!r} prior", ["", *est], rows,
                  "beta*: the loss-optimal fraction of one exact Gauss-Newton step from the net's estimate "
                  "(0: the net follows the data as its loss wants; > 0: it shrinks too much)."),
            table("CRB-normalised MSE of theta_net + beta * step", ["draws", "beta", *est], nmse)]


def figure(run, res, est):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, q in enumerate(est):
        ax.plot(BETAS, [res["nmse"]["informative"][str(b)][j] for b in BETAS], marker="o", label=q)
    ax.set(xlabel="fraction beta of one Gauss-Newton step", ylabel="nMSE, informative draws", yscale="log",
           title=f"SNR {res['snr']:g}")
    ax.legend(fontsize=7)
    run.save_figure(fig)


def main(argv=None):
    args = parse_args(argv)
    run = start("data_following", "Does a trained network follow the data as far as its loss wants? The one-step "
                "test", args, argv)
    from sklearn_crb import load_model
    from sklearn_crb.metrics import prior_moments

    with tempfile.TemporaryDirectory() as tmp:
        net = load_model(args.model or quick_model(Path(tmp) / "model", seed=args.seed), device="cpu")
    sim, est, y, p0, d, crb_truth, crb_est, step_s = one_step(net, args)
    _, p_var = prior_moments(sim.prior_, est, random_state=args.seed + 7)
    informative = crb_truth < 0.1 * p_var
    w_truth, w_est = 1.0 / crb_truth, 1.0 / crb_est
    res = {"model": str(args.model or "quick stand-in"), "snr": args.snr, "n": args.n, "prior": PRIOR,
           "estimate": list(est), "step_seconds": step_s, "beta_star": {}, "beta_star_se": {}, "nmse": {}}
    for lab, m in (("all", np.ones_like(informative)), ("informative", informative)):
        mm = np.where(m, 1.0, np.nan)
        for wl, w in (("truth", w_truth * mm), ("estimate", w_est * mm)):
            res["beta_star"][f"{lab}, w at {wl}"] = step_fractions(y, p0, d, w).tolist()
            res["beta_star_se"][f"{lab}, w at {wl}"] = bootstrap_se(y, p0, d, w, seed=args.seed).tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column with no informative draw: NaN, reported
            res["nmse"][lab] = {str(b): np.nanmean(np.where(m, (p0 + b * d - y) ** 2 / crb_truth, np.nan),
                                                   axis=0).tolist() for b in BETAS}
    res["n_informative"] = informative.sum(axis=0).tolist()
    doc = run.write(tables(res, est), res)
    figure(run, res, est)
    return doc


if __name__ == "__main__":
    main()
