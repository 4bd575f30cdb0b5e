"""Partial volume: a saved tied network against tied NLLS on two-tissue mixtures.

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


def mixtures(net, snr, n_draws, fractions, seed):
    from sklearn_crb import NLLSFitter, Sequence
    from sklearn_crb.phantom import PROTON_DENSITY
    from sklearn_crb.physics.parameters import free_parameters
    from sklearn_crb.physics.signal import simulate

    md, names = net.crb_metadata_, list(net.target_names_)
    seq, U = Sequence.from_dict(md["sequence"]), np.asarray(md["basis"])
    rng = np.random.default_rng(seed)
    nlls = NLLSFitter(seq, basis=U, estimate=free_parameters(True), tied_R1=True).fit()
    sig = {t: PROTON_DENSITY[t] * (simulate(seq, _theta(t)[None]) @ U.conj())[0] for t in ("WM", "GM", "CSF")}
    res = {}
    for a, b in PAIRS:
        c = np.stack([(1 - f) * sig[a] + f * sig[b] for f in fractions])
        phase = np.exp(2j * np.pi * rng.uniform(size=(len(fractions), n_draws, 1)))
        noise = (rng.standard_normal((len(fractions), n_draws, U.shape[1]))
                 + 1j * rng.standard_normal((len(fractions), n_draws, U.shape[1]))) / snr
        coef = (c[:, None, :] * phase + noise).reshape(-1, U.shape[1])
        X = np.hstack([coef.real, coef.imag])  # the features [Re c, Im c]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_net = np.asarray(net.predict(X), float).reshape(len(fractions), n_draws, -1)
            p_nlls = np.asarray(nlls.predict(X), float).reshape(len(fractions), n_draws, -1)
        jm, jr = names.index("m0s"), names.index("R1f")
        res[f"{a}-{b}"] = {
            "fraction": fractions.tolist(),
            "net": {"m0s": np.median(p_net[..., jm], 1).tolist(), "T1": np.median(1 / p_net[..., jr], 1).tolist()},
            "nlls": {"m0s": np.nanmedian(p_nlls[..., 0], 1).tolist(),
                     "T1": np.nanmedian(1 / p_nlls[..., 1], 1).tolist()}}
    return res


def tables(res):
    out = []
    for pair, r in res.items():
        rows = [[f, r["net"]["m0s"][i], r["nlls"]["m0s"][i], r["net"]["T1"][i], r["nlls"]["T1"][i]]
                for i, f in enumerate(r["fraction"])]
        out.append(table(f"{pair}: f = volume fraction of {pair.split('-')[1]} (each tissue at its proton density)",
                         ["f", "net m0s", "NLLS m0s", "net T1/s", "NLLS T1/s"], rows, "medians over the noise draws"))
    return out


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
    run = start("partial_volume", "Partial volume: a saved tied network against tied NLLS on two-tissue mixtures",
                a, argv)
    with tempfile.TemporaryDirectory() as tmp:
        net = load_network(a.model or quick_model(Path(tmp) / "model", seed=a.seed))
    fractions = np.linspace(0, 1, 3 if a.quick else 11)
    res = mixtures(net, a.snr, a.n_draws, fractions, a.seed)
    doc = run.write(tables(res), {"model": str(a.model or "quick stand-in"), "snr": a.snr, "n_draws": a.n_draws,
                                  "mixtures": res})
    figure(run, res)
    return doc


if __name__ == "__main__":
    main()
