"""How far the exact posterior mean under the true prior follows the data: std/sqrt(CRB) on informative draws.

The efficiency benchmark (``bench_crb_vs_mse.py``) asks a network trained
with a squared-error loss to spread at least 0.7 sqrt(CRB) over noise draws
where the data decide. Such a network approaches a posterior mean. This
script computes, with no network, the posterior mean itself under the
package's prior (its real uniform, log-uniform and truncated-normal
marginals, with the ``R2f > R1f`` constraint), and reports its spread over
noise draws in units of sqrt(CRB): the spread that a squared-error estimator
which uses this prior optimally reaches. Beside it is the Gaussian-prior,
first-order reference of ``crb.linearized_bayes_spread`` on the same draws.

Per prior draw ``theta`` and noise draw: complex M0 flat (integrated out in
closed form, ``log L = -||P_perp(theta) x||^2 / (2 sigma^2) - log ||g(theta)||^2``);
one adaptive random-walk Metropolis chain (Gaussian steps shaped by the CRB
covariance at ``theta``, then by the chain's own covariance, step size
adapted during ``--n-burn`` steps), started at the draw's least-squares fit
(or ``--start truth``: a spread that changes with the start means the
chains have not mixed), averaged over ``--n-keep`` steps; all chains
run batched. The Monte-Carlo error of each posterior mean (from the two
halves of its chain) is reported and removed from the spread. (Importance
sampling with a Gaussian proposal failed here: the posterior is far from
Gaussian on the CRB's scale, and effective sample sizes were 1-30 of 3000.)
v3.2 (``SKLEARN_CRB_DATA``, else the built-in sequence), SVD rank 13, tied
T1, the ``brain`` prior, informative draws as in the efficiency benchmark
(CRB < 0.1 x prior variance). Usage::

    python benchmarks/bench_posterior_mean.py [--n-theta 40] [--n-noise 16] [--n-burn 2000] [--n-keep 4000]
                                              [--snr 100] [--model DIR ...] [--out DIR]

``--model`` scores saved networks on the same draws (same theta, same noise), so
that their spread is compared with the posterior mean's where both are measured.
Writes ``posterior_mean.json`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import warnings

import numpy as np
from _harness import GivenStart, crb_covariance, parser, sequence, start, table

from sklearn_crb import MTFingerprintSimulator, NLLSFitter, load_model
from sklearn_crb.crb import linearized_bayes_spread
from sklearn_crb.estimators.nlls import NLLSFitWarning
from sklearn_crb.metrics import prior_moments
from sklearn_crb.physics.parameters import INDEX, free_parameters
from sklearn_crb.physics.signal import simulate
from sklearn_crb.simulator import CRB_M0S_FLOOR

REPORT = ("m0s", "R1f", "R2f")


def log_prior(prior, th):
    """Log density of the prior at theta (n, 8): the tied model's marginals and R2f > R1f; -inf outside."""
    out = np.zeros(len(th))
    for p, dist in prior.distributions.items():
        if prior.tied_R1 and p == "R1s":
            continue
        with np.errstate(divide="ignore"):
            out += np.log(np.asarray(dist.pdf(th[:, INDEX[p]]), dtype=float))
    if prior.R2f_gt_R1f:
        out[th[:, INDEX["R2f"]] <= th[:, INDEX["R1f"]]] = -np.inf
    return np.where(np.isfinite(out), out, -np.inf)


def log_target(seq, basis, prior, th, x, sigma):
    """Log posterior (up to a constant) of each chain's theta (n, 8) given its data x (n, K); complex M0 flat."""
    lp = log_prior(prior, th)
    out = np.full(len(th), -np.inf)
    r = np.flatnonzero(np.isfinite(lp))
    if r.size:
        g = simulate(seq, th[r]) @ basis.conj()
        gg = (np.abs(g) ** 2).sum(1)
        inner = np.abs((g.conj() * x[r]).sum(1)) ** 2 / gg  # |g^H x|^2 / ||g||^2
        out[r] = -((np.abs(x[r]) ** 2).sum(1) - inner) / (2 * sigma**2) - np.log(gg) + lp[r]
    return out


def sample_posterior_means(seq, basis, prior, start, chol, x, sigma, free, n_burn, n_keep, rng):
    """Posterior means (n, p) by batched random-walk Metropolis (one chain per row), and their Monte-Carlo
    variance (n, p) from the two halves of each chain.

    Proposal: ``theta + kappa L z`` with ``L`` the Cholesky factor of the row's CRB covariance for the
    first half of the burn-in, then of the chain's own covariance over its second quarter (adaptive
    Metropolis, Haario et al. 2001); ``kappa`` adapted per chain during burn-in towards an acceptance
    rate of 0.25.
    """
    idx = [INDEX[p] for p in free]
    d = len(free)
    th = start.copy()
    lt = log_target(seq, basis, prior, th, x, sigma)
    kappa = np.full(len(th), 2.38 / np.sqrt(d))
    acc_win = np.zeros(len(th))
    s1, s2 = np.zeros((len(th), d)), np.zeros((len(th), d))
    h = n_keep // 2
    q1, q2 = n_burn // 4, n_burn // 2  # steps whose samples shape the proposal (adaptive Metropolis)
    m_sum, c_sum = np.zeros((len(th), d)), np.zeros((len(th), d, d))
    for t in range(n_burn + n_keep):
        if q1 <= t < q2:
            v = th[:, idx]
            m_sum += v
            c_sum += v[:, :, None] * v[:, None, :]
        elif t == q2 and q2 > q1:
            # Haario et al. (2001): the chain's own covariance (plus a sliver of the CRB's) shapes the steps
            mu = m_sum / (q2 - q1)
            emp = c_sum / (q2 - q1) - mu[:, :, None] * mu[:, None, :]
            base = chol @ chol.transpose(0, 2, 1)
            w, V = np.linalg.eigh(0.5 * (emp + emp.transpose(0, 2, 1)) + 1e-3 * base)
            w = np.clip(w, 1e-12 * w.max(1, keepdims=True), None)
            chol = V * np.sqrt(w)[:, None, :]  # any square root of the covariance shapes the steps
            kappa[:] = 2.38 / np.sqrt(d)
        z = rng.standard_normal((len(th), len(free)))
        prop = th.copy()
        prop[:, idx] += kappa[:, None] * np.einsum("nij,nj->ni", chol, z)
        prop[:, INDEX["R1s"]] = prop[:, INDEX["R1f"]]
        lp = log_target(seq, basis, prior, prop, x, sigma)
        accept = np.log(rng.uniform(size=len(th))) < lp - lt
        th[accept], lt[accept] = prop[accept], lp[accept]
        if t < n_burn:
            acc_win += accept
            if (t + 1) % 50 == 0:  # adapt the step size in windows of 50 steps
                kappa *= np.exp(2 * np.clip(acc_win / 50 - 0.25, -0.2, 0.2))
                acc_win[:] = 0
        elif t - n_burn < h:
            s1 += th[:, idx]
        else:
            s2 += th[:, idx]
    m1, m2 = s1 / h, s2 / (n_keep - h)
    return 0.5 * (m1 + m2), (m1 - m2) ** 2 / 4


def _network_cells(model, basis, theta, x, crb, pv, free, n, m):
    """A saved network's median std/sqrt(CRB), bias/sqrt(CRB) and nMSE on the informative draws, per target."""
    try:
        net = load_model(model, device="cpu")
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"--model {model}: {e}") from None
    if getattr(net, "measured_", ()) or not net.crb_metadata_.get("tied_R1", False):
        raise SystemExit(f"--model {model}: a tied network without measured inputs is needed")
    U = np.asarray(net.crb_metadata_.get("basis"))
    if U.shape != basis.shape or not np.allclose(U, basis, atol=1e-8):
        raise SystemExit(f"--model {model}: its basis is not this script's rank-13 SVD basis (seed --seed)")
    pred = np.asarray(net.predict(np.column_stack([x.real, x.imag])), dtype=float).reshape(n, m, -1)
    cells = {}
    for j, p in enumerate(net.target_names_):
        if p not in free:
            continue
        k = free.index(p)
        inf = crb[:, k] < 0.1 * pv[k]
        if not inf.any():
            continue
        e = pred[:, :, j] - theta[:, INDEX[p], None]
        cells[p] = {"n_informative": int(inf.sum()),
                    "std_over_sqrt_crb": float(np.median(np.sqrt(pred[inf, :, j].var(1, ddof=1) / crb[inf, k]))),
                    "median_bias_over_sqrt_crb": float(np.median(e[inf].mean(1) / np.sqrt(crb[inf, k]))),
                    "nmse": float(np.mean(np.mean(e[inf] ** 2, 1) / crb[inf, k]))}
    return cells


def parse_args(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--n-theta", type=int, default=40, help="prior draws (default 40)")
    ap.add_argument("--n-noise", type=int, default=16, help="noise draws per prior draw (default 16)")
    ap.add_argument("--n-burn", type=int, default=2000, help="Metropolis burn-in (adaptation) steps per chain")
    ap.add_argument("--n-keep", type=int, default=4000, help="Metropolis steps averaged per chain")
    ap.add_argument("--start", choices=("fit", "truth"), default="fit",
                    help="chain start: the draw's least-squares fit (default) or the true theta; a spread that "
                         "depends on it means the chains have not forgotten their start")
    ap.add_argument("--snr", type=float, default=100.0, help="|M0|/sigma (default 100)")
    ap.add_argument("--model", nargs="+", default=(), metavar="DIR",
                    help="saved networks (tied, this script's sequence and SVD basis, e.g. from bench_crb_vs_mse.py "
                         "--save-nets) to score on the same draws, beside the posterior mean")
    a = ap.parse_args(argv)
    if a.quick:
        a.n_theta, a.n_noise, a.n_burn, a.n_keep = 3, 2, 20, 20
    return a


def draws(args, seq, free):
    """The prior draws, their CRB covariance and linearised reference, and the noisy data ``x`` (n * m, 13)."""
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free, tied_R1=True, prior="brain",
                                 snr=(args.snr, args.snr), n_basis_samples=100 if args.quick else 1000,
                                 random_state=args.seed).fit()
    prior, basis, sigma = sim.prior_, sim.basis_, float(sim.sigma)
    M0 = args.snr * sigma
    _, pv = prior_moments(prior, free, random_state=args.seed + 7)
    rng = np.random.default_rng(args.seed + 1)
    n, m = args.n_theta, args.n_noise
    theta = prior.sample(n, random_state=args.seed + 2)
    theta[:, 0] = np.maximum(theta[:, 0], CRB_M0S_FLOOR)
    cov, s, J = crb_covariance(seq, basis, theta, M0, sigma, free)
    lin = linearized_bayes_spread(s, J, pv, estimate=free, tied_R1=True, M0=M0, sigma=sigma, basis=basis)
    g_true = simulate(seq, theta) @ basis.conj()
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, (n, m)))
    noise = sigma * (rng.standard_normal((n, m, 13)) + 1j * rng.standard_normal((n, m, 13)))
    x = (M0 * phase[:, :, None] * g_true[:, None, :] + noise).reshape(n * m, 13)
    return sim, pv, theta, cov, lin, x, rng


def chain_starts(args, seq, sim, theta, x, free):
    """Each chain starts at its least-squares fit, started at the truth (an integration device, not an
    estimator), or at the truth where that fit leaves the prior's support (or with --start truth)."""
    idx = [INDEX[p] for p in free]
    start_ = np.repeat(theta, args.n_noise, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NLLSFitWarning)
        fit = NLLSFitter(seq, basis=sim.basis_, estimate=free, tied_R1=True,
                         init=GivenStart(start_[:, idx], free).fit()).fit().predict_details(
                             np.column_stack([x.real, x.imag]))
    ok = np.isfinite(fit["theta"]).all(1)
    ok[ok] = np.isfinite(log_prior(sim.prior_, fit["theta"][ok]))
    if args.start == "fit":
        start_[ok] = fit["theta"][ok]
    return start_


def summary(crb, pv, free, spread, bias, mc_err, lin):
    rows = {}
    for k, p in enumerate(free):
        inf = crb[:, k] < 0.1 * pv[k]
        med = (lambda a: float(np.median(a[inf, k])) if inf.any() else None)  # noqa: E731
        rows[p] = {"n_informative": int(inf.sum()), "posterior_mean_std_over_sqrt_crb": med(spread),
                   "posterior_mean_median_bias_over_sqrt_crb": med(bias), "mc_error_over_sqrt_crb": med(mc_err),
                   "linearized_reference": med(lin)}
    return rows


def tables(args, rows, nets):
    f = (lambda v: "—" if v is None else v)  # noqa: E731
    out = [table(f"Posterior mean under the brain prior (tied), SNR {args.snr:g}, {args.n_theta} theta x "
                 f"{args.n_noise} noise draws, {args.n_burn}+{args.n_keep} Metropolis steps from the {args.start}",
                 ["parameter", "informative", "post. mean std/√CRB", "bias/√CRB", "MC error", "linearised ref"],
                 [[p, r["n_informative"], f(r["posterior_mean_std_over_sqrt_crb"]),
                   f(r["posterior_mean_median_bias_over_sqrt_crb"]), f(r["mc_error_over_sqrt_crb"]),
                   f(r["linearized_reference"])] for p, r in rows.items()], "informative draws: CRB < 0.1 x prior "
                 "variance; the Monte-Carlo error of the chains is removed from the spread")]
    for d, cells in nets.items():
        out.append(table(f"Network {d} on the same draws (informative)", ["parameter", "nMSE", "median bias/√CRB",
                                                                            "median std/√CRB", "n"],
                         [[p, c["nmse"], c["median_bias_over_sqrt_crb"], c["std_over_sqrt_crb"], c["n_informative"]]
                          for p, c in cells.items()]))
    return out


def figure(run, args, rows, free):
    import matplotlib  # optional: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(free))
    ax.bar(xs - 0.2, [rows[p]["posterior_mean_std_over_sqrt_crb"] or np.nan for p in free], 0.4,
           label="posterior mean (Metropolis)")
    ax.bar(xs + 0.2, [rows[p]["linearized_reference"] or np.nan for p in free], 0.4,
           label="linearised Gaussian-prior reference")
    ax.axhline(0.7, ls="--", c="k", lw=0.8)
    ax.set_xticks(xs, [f"{p}\n(n={rows[p]['n_informative']})" for p in free])
    ax.set_ylabel("std / sqrt(CRB), informative draws")
    ax.set_title(f"Bayes-optimal spread, v3.2 rank 13, SNR {args.snr:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    run.save_figure(fig, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    run = start("posterior_mean", "The exact posterior mean's spread over noise draws, in sqrt(CRB), on informative "
                "draws", args, argv)
    seq = sequence()[0]
    free = free_parameters(True)
    idx = [INDEX[p] for p in free]
    sim, pv, theta, cov, lin, x, rng = draws(args, seq, free)
    n, m = args.n_theta, args.n_noise
    crb = np.diagonal(cov, axis1=1, axis2=2)
    start_ = chain_starts(args, seq, sim, theta, x, free)
    nets = {d: _network_cells(d, sim.basis_, theta, x, crb, pv, free, n, m) for d in args.model}
    covm = np.repeat(cov, m, axis=0)
    jitter = 1e-10 * np.diagonal(covm, axis1=1, axis2=2).max(1)[:, None, None] * np.eye(len(free))
    L = np.linalg.cholesky(covm + jitter)
    pm, mc_var = sample_posterior_means(seq, sim.basis_, sim.prior_, start_, L, x, float(sim.sigma), free,
                                        args.n_burn, args.n_keep, rng)
    pm, mc_var = pm.reshape(n, m, -1), mc_var.reshape(n, m, -1)
    var_noise = np.clip(pm.var(1, ddof=1) - mc_var.mean(1), 0, None)  # the chains' Monte-Carlo error removed
    spread = np.sqrt(var_noise / crb)
    bias = (pm.mean(1) - theta[:, idx]) / np.sqrt(crb)
    mc_err = np.sqrt(mc_var.mean(1) / crb)  # Monte-Carlo error of one posterior mean, in sqrt(CRB)
    rows = summary(crb, pv, free, spread, bias, mc_err, lin)
    result = {"sequence": seq.name, "rank": 13, "snr": args.snr, "prior": "brain (tied)", "n_theta": n,
              "n_noise": m, "n_burn": args.n_burn, "n_keep": args.n_keep, "start": args.start,
              "parameters": rows, "networks_on_the_same_draws": nets}
    doc = run.write(tables(args, rows, nets), result)
    figure(run, args, rows, free)
    return doc


if __name__ == "__main__":
    main()
