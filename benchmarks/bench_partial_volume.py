"""Partial volume: a saved tied network against tied NLLS on two-tissue mixtures, and the trust map's flags.

    OMP_NUM_THREADS=1 python benchmarks/bench_partial_volume.py --model DIR [--snr 116] [--n-draws 40] [--out DIR]

Real voxels at tissue borders hold two tissues, and no single two-pool model
describes their sum. Per mixture fraction ``f`` the fingerprint is
``(1 - f) PD_a s(theta_a) + f PD_b s(theta_b)`` with the unconstrained
two-pool tissues of the phantom (``phantom.TISSUES``, proton densities
``PROTON_DENSITY``; B1 = 1, on resonance), compressed to the network's
basis, with a uniform random M0 phase and complex noise of std
``1/snr`` per real component, ``--n-draws`` draws per ``f``. The network
(``io.models.load_model``) and tied NLLS (``NLLSFitter`` estimating every
free parameter of the tied model) fit the same draws; the table gives
their medians of m0s and T1 = 1/R1f per ``f`` for WM-GM and WM-CSF.
The trust map (``fit_maps(trust=...)``, :mod:`sklearn_crb.maps.trust`) is
measured on the same draws: per ``f``, the fraction of draws flagged
"untrusted" for the network with ``trust="tangent"`` (sigma given as the
true one, and sigma estimated by ``fit_maps`` from one image of every draw
plus as many pure WM and GM draws), split into its chi-squared and
Gauss-Newton-step parts, for the network with the raw residual's
chi-squared (``trust="residual"``), and for NLLS (its residual's
chi-squared, exact at its optimum); beside them the noise-free NLLS misfit
``lambda = ||c - M0 u(theta_NLLS)||^2 / sigma^2`` of each mixture and the
detection rate of a chi-squared test at that noncentrality, which shows
how far the data themselves separate a mixture from the model. A headline
table gives the rates on pure WM and GM and on WM-CSF mixtures with
10-90 % CSF.
Writes ``partial_volume.json`` and ``partial_volume.png`` under ``--out``
(default ``benchmarks/results``). ``--quick`` without ``--model`` trains a
tiny stand-in network.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from _harness import parser, quick_model, start, table

from sklearn_crb.maps.trust import ALPHA, MAX_STEP

PAIRS = (("WM", "GM"), ("WM", "CSF"))


def _theta(name):
    from sklearn_crb.phantom import TISSUES
    from sklearn_crb.physics.parameters import PARAMETERS

    v = dict(TISSUES[name], omega0=0.0, B1=1.0)
    return np.array([v[p] for p in PARAMETERS])


def load_network(model):
    """The saved network, refused in one line unless it is tied, takes fingerprints only and estimates m0s, R1f."""
    from sklearn_crb import load_model

    try:
        net = load_model(model, device="cpu")
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"--model {model}: {e}") from None
    if getattr(net, "measured_", ()):
        raise SystemExit(f"--model {model}: the network takes measured {list(net.measured_)} as inputs; "
                         "this benchmark gives it fingerprints only")
    md = net.crb_metadata_
    if not md.get("tied_R1", False):
        raise SystemExit(f"--model {model}: a tied network (sklearn-crb simulate --tied-R1) is needed")
    names = list(net.target_names_)
    if "m0s" not in names or "R1f" not in names:
        raise SystemExit(f"--model {model}: the network must estimate m0s and R1f, it estimates {names}")
    return net


def _draws(c, n_draws, snr, rng):
    """``n_draws`` noisy copies of each row of ``c`` (complex (F, r)) with a uniform random phase: (F * n_draws, r)."""
    F, r = c.shape
    phase = np.exp(2j * np.pi * rng.uniform(size=(F, n_draws, 1)))
    noise = (rng.standard_normal((F, n_draws, r)) + 1j * rng.standard_normal((F, n_draws, r))) / snr
    return (c[:, None, :] * phase + noise).reshape(-1, r)


def _fit(estimator, coef, sigma, trust):
    """``fit_maps`` of the draws as an (n, 1) image, every voxel masked (with standard errors, as by default: a
    network's sigma is then estimated from its tangent-projected residuals)."""
    from sklearn_crb import fit_maps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_maps(estimator, coef[:, None, :], np.ones((coef.shape[0], 1), bool), sigma=sigma, trust=trust)


def _flag_parts(maps, n):
    """Per draw (first ``n`` voxels): flagged "untrusted", by the chi-squared, by the Gauss-Newton step."""
    from sklearn_crb.maps import FLAGS
    from sklearn_crb.maps.trust import misfit_pvalue

    tr = maps.provenance["trust"]
    flagged = (maps.arrays["flags"][:n, 0] & FLAGS["untrusted"]) != 0
    _, p = misfit_pvalue(maps.arrays["trust_chi2"][:n, 0] * tr["dof"], 1.0, tr["dof"])
    step = maps.arrays.get("trust_step")
    by_step = np.zeros(n, bool) if step is None else step[:n, 0] > tr["max_step"]
    return {"untrusted": flagged, "chi2": p < tr["alpha"], "step": by_step}


def _min_misfit(nlls, c, snr, dof, alpha):
    """Noise-free NLLS misfit ``lambda = ||c - M0 u(theta_NLLS)||^2 / sigma^2`` per mixture, and the detection rate
    of the chi-squared test at that noncentrality (what any test of the model fit can reach at ``alpha``)."""
    from scipy.stats import chi2, ncx2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lam = (np.asarray(nlls.predict_details(np.hstack([c.real, c.imag]), compute_crb=False).residual_norm)
               * snr) ** 2
    return lam, ncx2.sf(chi2.isf(alpha, dof), dof, lam)


def mixtures(net, snr, n_draws, fractions, seed):
    """Medians of m0s and T1 and the trust map's flag rates per mixture fraction, network and NLLS."""
    from sklearn_crb import NLLSFitter, Sequence
    from sklearn_crb.phantom import PROTON_DENSITY
    from sklearn_crb.physics.parameters import free_parameters
    from sklearn_crb.physics.signal import simulate

    md, names = net.crb_metadata_, list(net.target_names_)
    seq, U = Sequence.from_dict(md["sequence"]), np.asarray(md["basis"])
    rng = np.random.default_rng(seed)
    nlls = NLLSFitter(seq, basis=U, estimate=free_parameters(True), tied_R1=True).fit()
    sig = {t: PROTON_DENSITY[t] * (simulate(seq, _theta(t)[None]) @ U.conj())[0] for t in ("WM", "GM", "CSF")}
    res, coefs, F = {}, [], len(fractions)
    for a, b in PAIRS:
        c = np.stack([(1 - f) * sig[a] + f * sig[b] for f in fractions])
        coef = _draws(c, n_draws, snr, rng)
        coefs.append(coef)
        X = np.hstack([coef.real, coef.imag])  # the features [Re c, Im c]
        if getattr(net, "noise_input_", False):  # a noise-aware network: the true noise level as its last column
            X = np.hstack([X, np.full((len(X), 1), 1 / snr)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_net = np.asarray(net.predict(X), float).reshape(F, n_draws, -1)
        m_nlls = _fit(nlls, coef, 1 / snr, "residual")
        failed = (m_nlls.arrays["flags"][:, 0] & 2) != 0
        p_nlls = np.stack([np.where(failed, np.nan, m_nlls.arrays[p][:, 0]) for p in ("m0s", "R1f")], 1)
        p_nlls = p_nlls.reshape(F, n_draws, 2)
        m_tan = _fit(net, coef, 1 / snr, "tangent")
        dof = m_tan.provenance["trust"]["dof"]
        lam, ideal = _min_misfit(nlls, c, snr, dof, m_tan.provenance["trust"]["alpha"])
        rate = {"net_sigma_given": _flag_parts(m_tan, len(coef)),
                "net_raw_residual": _flag_parts(_fit(net, coef, 1 / snr, "residual"), len(coef)),
                "nlls": _flag_parts(m_nlls, len(coef))}
        jm, jr = names.index("m0s"), names.index("R1f")
        res[f"{a}-{b}"] = {
            "fraction": fractions.tolist(),
            "net": {"m0s": np.median(p_net[..., jm], 1).tolist(), "T1": np.median(1 / p_net[..., jr], 1).tolist()},
            "nlls": {"m0s": np.nanmedian(p_nlls[..., 0], 1).tolist(),
                     "T1": np.nanmedian(1 / p_nlls[..., 1], 1).tolist()},
            "min_misfit": lam.tolist(), "ideal_detection": ideal.tolist(), "dof": dof,
            "flagged": {k: {part: v.reshape(F, n_draws).mean(1).tolist() for part, v in r.items()}
                        for k, r in rate.items()},
            "_flags": {k: r["untrusted"].reshape(F, n_draws) for k, r in rate.items()}}
    _sigma_estimated(net, res, coefs, sig, n_draws, snr, rng)
    return res


def _sigma_estimated(net, res, coefs, sig, n_draws, snr, rng):
    """The network's flags with sigma estimated by ``fit_maps`` from one image: every draw of every mixture series
    and as many pure WM and GM draws (half of the image is pure tissue, as in a brain slice at least)."""
    n_pure = sum(len(c) for c in coefs) // 2
    pure = np.concatenate([_draws(sig[t][None], n_pure // 2 + 1, snr, rng) for t in ("WM", "GM")])
    maps = _fit(net, np.concatenate([*coefs, pure]), None, "tangent")
    start = 0
    for (a, b), coef in zip(PAIRS, coefs):
        part = {k: v[start: start + len(coef)] for k, v in _flag_parts(maps, start + len(coef)).items()}
        r, F = res[f"{a}-{b}"], len(coef) // n_draws
        r["flagged"]["net_sigma_estimated"] = {k: v.reshape(F, n_draws).mean(1).tolist() for k, v in part.items()}
        r["_flags"]["net_sigma_estimated"] = part["untrusted"].reshape(F, n_draws)
        r["sigma_estimated_over_true"] = maps.sigma * snr
        start += len(coef)


def tables(res):
    out = []
    for pair, r in res.items():
        rows = [[f, r["net"]["m0s"][i], r["nlls"]["m0s"][i], r["net"]["T1"][i], r["nlls"]["T1"][i]]
                for i, f in enumerate(r["fraction"])]
        out.append(table(f"{pair}: f = volume fraction of {pair.split('-')[1]} (each tissue at its proton density)",
                         ["f", "net m0s", "NLLS m0s", "net T1/s", "NLLS T1/s"], rows, "medians over the noise draws"))
    for pair, r in res.items():
        fl = r["flagged"]
        rows = [[f, r["min_misfit"][i], r["ideal_detection"][i], fl["net_sigma_given"]["untrusted"][i],
                 fl["net_sigma_given"]["chi2"][i], fl["net_sigma_given"]["step"][i],
                 fl["net_sigma_estimated"]["untrusted"][i], fl["net_raw_residual"]["untrusted"][i],
                 fl["nlls"]["untrusted"][i]] for i, f in enumerate(r["fraction"])]
        out.append(table(f"{pair}: fraction of draws flagged 'untrusted' per volume fraction f of {pair.split('-')[1]}",
                         ["f", "min misfit/sigma^2", "ideal chi2 test", "net tangent (sigma given)", "  by chi2",
                          "  by step", "net tangent (sigma est.)", "net residual (sigma given)", "NLLS residual"],
                         rows, f"min misfit: the noise-free NLLS residual^2/sigma^2 (the data's distance from the "
                         f"model); ideal chi2 test: the detection rate of a chi2({r['dof']}) test at that "
                         f"noncentrality; sigma est./true = {r['sigma_estimated_over_true']:.3f}"))
    out.append(table("Trust map: pure tissue flagged (goal <= 0.05) and WM-CSF mixtures with >= 10 % CSF flagged "
                     "(goal >= 0.9)", ["estimator and trust test", "pure WM", "pure GM", "WM-CSF 0.1 <= f <= 0.9",
                                       "WM-CSF 0.1 <= f <= 0.2"], headline(res),
                     "fraction of noise draws flagged 'untrusted'; pure CSF (f = 1) is a tissue the model holds for, "
                     "not a partial volume"))
    return out


def headline(res):
    """Rows ``[setting, pure WM, pure GM, 10-90 % CSF, 10-20 % CSF]`` of flag rates over the draws."""
    gm, csf = res["WM-GM"], res["WM-CSF"]
    f_gm, f_csf = np.asarray(gm["fraction"]), np.asarray(csf["fraction"])
    rows = []
    for key, label in (("net_sigma_given", "network, tangent, sigma given"),
                       ("net_sigma_estimated", "network, tangent, sigma estimated"),
                       ("net_raw_residual", "network, residual, sigma given"), ("nlls", "NLLS, residual, sigma given")):
        a, b = gm["_flags"][key], csf["_flags"][key]
        wm = np.concatenate([a[f_gm == 0].ravel(), b[f_csf == 0].ravel()])
        pv = (f_csf >= 0.1 - 1e-9) & (f_csf <= 0.9 + 1e-9)
        low = pv & (f_csf <= 0.2 + 1e-9)  # none in a --quick run
        rows.append([label, float(wm.mean()), float(a[f_gm == 1].mean()), float(b[pv].mean()),
                     float(b[low].mean()) if low.any() else float("nan")])
    return rows


def figure(run, res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(res), figsize=(5 * len(res), 6), constrained_layout=True)
    for j, (pair, r) in enumerate(res.items()):
        for i, q in enumerate(("m0s", "T1")):
            for k, style in (("net", "o-"), ("nlls", "s--")):
                axes[i, j].plot(r["fraction"], r[k][q], style, label=k)
            axes[i, j].set_title(f"{pair}: median {q}", fontsize=9)
            axes[i, j].set_xlabel(f"fraction of {pair.split('-')[1]}")
    axes[0, 0].legend(fontsize=8)
    run.save_figure(fig, dpi=90)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--model", default=None, help="a saved tied network (sklearn-crb train); required unless --quick")
    ap.add_argument("--snr", type=float, default=116.0, help="1/sigma (WM |M0|/sigma = 0.69 snr)")
    ap.add_argument("--n-draws", type=int, default=40, help="noise draws per mixture fraction")
    a = ap.parse_args(argv)
    if a.model is None and not a.quick:
        ap.error("--model is required (only --quick trains a stand-in)")
    if a.quick:
        a.n_draws = 3
    if not (np.isfinite(a.snr) and a.snr > 0) or a.n_draws < 1:
        ap.error(f"--snr must be positive and --n-draws at least 1, got {a.snr} and {a.n_draws}")
    run = start("partial_volume", "Partial volume: a saved tied network against tied NLLS on two-tissue mixtures, "
                "and the trust map's flags", a, argv)
    with tempfile.TemporaryDirectory() as tmp:
        net = load_network(a.model or quick_model(Path(tmp) / "model", seed=a.seed))
    fractions = np.linspace(0, 1, 3) if a.quick else np.unique(np.r_[np.linspace(0, 1, 11), 0.05, 0.15])
    res = mixtures(net, a.snr, a.n_draws, fractions, a.seed)
    tabs = tables(res)
    for r in res.values():
        r.pop("_flags")
    doc = run.write(tabs, {"model": str(a.model or "quick stand-in"), "snr": a.snr, "n_draws": a.n_draws,
                           "trust": {"alpha": ALPHA, "max_step": MAX_STEP}, "mixtures": res})
    figure(run, res)
    return doc


if __name__ == "__main__":
    main()
