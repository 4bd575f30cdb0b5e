"""Partial volume: a saved tied network against tied NLLS on two-tissue mixtures.

    OMP_NUM_THREADS=1 python benchmarks/bench_partial_volume.py --model DIR [--snr 116] [--n-draws 40]
                                                                [--out DIR]

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
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from _results import save_figure, write_json

PAIRS = (("WM", "GM"), ("WM", "CSF"))


def _theta(name):
    from sklearn_crb.phantom import TISSUES
    from sklearn_crb.physics.parameters import PARAMETERS

    v = dict(TISSUES[name], omega0=0.0, B1=1.0)
    return np.array([v[p] for p in PARAMETERS])


def run(model, snr=116.0, n_draws=40, fractions=None, out=None, seed=0):
    import torch

    from sklearn_crb import NLLSFitter, Sequence
    from sklearn_crb.io.images import features_from_coefficients
    from sklearn_crb.io.models import load_model
    from sklearn_crb.phantom import PROTON_DENSITY
    from sklearn_crb.physics.parameters import free_parameters
    from sklearn_crb.physics.signal import simulate

    torch.set_num_threads(1)
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
    seq, U = Sequence.from_dict(md["sequence"]), np.asarray(md["basis"])
    fractions = np.linspace(0, 1, 11) if fractions is None else np.asarray(fractions, float)
    rng = np.random.default_rng(seed)
    nlls = NLLSFitter(seq, basis=U, estimate=free_parameters(True), tied_R1=True).fit()
    sig = {t: PROTON_DENSITY[t] * (simulate(seq, _theta(t)[None]) @ U.conj())[0] for t in ("WM", "GM", "CSF")}
    res, t0 = {}, time.perf_counter()
    for a, b in PAIRS:
        c = np.stack([(1 - f) * sig[a] + f * sig[b] for f in fractions])
        phase = np.exp(2j * np.pi * rng.uniform(size=(len(fractions), n_draws, 1)))
        noise = (rng.standard_normal((len(fractions), n_draws, U.shape[1]))
                 + 1j * rng.standard_normal((len(fractions), n_draws, U.shape[1]))) / snr
        X = features_from_coefficients((c[:, None, :] * phase + noise).reshape(-1, U.shape[1]))
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
    seconds = time.perf_counter() - t0

    lines = []
    for pair, r in res.items():
        lines.append(f"{pair}: f = volume fraction of {pair.split('-')[1]} (each tissue at its proton density)")
        lines.append(f"{'f':>5} {'net m0s':>9} {'NLLS m0s':>9} {'net T1/s':>9} {'NLLS T1/s':>9}")
        for i, f in enumerate(r["fraction"]):
            lines.append(f"{f:5.2f} {r['net']['m0s'][i]:9.4f} {r['nlls']['m0s'][i]:9.4f} "
                         f"{r['net']['T1'][i]:9.3f} {r['nlls']['T1'][i]:9.3f}")
    table = "\n".join(lines)
    print(table)
    print(f"{seconds:.0f} s")
    out = Path(out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "partial_volume.json", {"model": str(model), "snr": snr, "n_draws": n_draws,
                                             "mixtures": res, "seconds": seconds, "table": table})

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
    save_figure(fig, out / "partial_volume.png", dpi=90)
    plt.close(fig)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved tied network (sklearn-crb train)")
    ap.add_argument("--snr", type=float, default=116.0, help="1/sigma (WM |M0|/sigma = 0.69 snr)")
    ap.add_argument("--n-draws", type=int, default=40, help="noise draws per mixture fraction")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not (np.isfinite(a.snr) and a.snr > 0) or a.n_draws < 1:
        ap.error(f"--snr must be positive and --n-draws at least 1, got {a.snr} and {a.n_draws}")
    run(a.model, a.snr, a.n_draws, out=a.out)
