"""Time of network maps with standard errors on a slice-sized phantom (issue 9: 19,000 voxels in <= 10 s).

A network of the default architecture that estimates every free parameter of
the tied model (the CLI's default targets, so nothing is left to polish) is
trained for a few epochs only: the time of ``fit_maps`` does not depend on
how well it is trained. It is applied to a brain phantom with about
``--voxels`` masked voxels, with and without standard-error maps, for both
standard-error methods of the network (``se="delta"``, the default, and
``se="crb"``). The reference sequence (v3.2) is used when
``SKLEARN_CRB_DATA`` has it, the built-in sequence otherwise. Writes
``maps.json`` and ``.png`` under ``--out``.

    python benchmarks/bench_maps.py [--voxels 19000]
"""

from __future__ import annotations

import time

import numpy as np
from _harness import parser, sequence, start, table

from sklearn_crb import CRBNetRegressor, MTFingerprintSimulator, fit_maps, make_phantom
from sklearn_crb.physics.parameters import free_parameters


def parse_args(argv=None):
    p = parser(__doc__, threads=None)
    p.add_argument("--voxels", type=int, default=19000, help="masked voxels (default 19000)")
    a = p.parse_args(argv)
    if a.quick:
        a.voxels = 400
    return a


def figure(run, rows):
    import matplotlib  # optional plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.barh([r["setting"] for r in rows], [r["seconds"] for r in rows])
    ax.axvline(10, color="k", ls="--", lw=1)
    ax.set_xlabel(f"seconds for {rows[0]['voxels']} voxels")
    fig.tight_layout()
    run.save_figure(fig, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    run = start("maps", "Time of network maps with standard errors on a slice-sized phantom", args, argv)
    seq, seq_name = sequence()
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(True), tied_R1=True,
                                 n_basis_samples=100 if args.quick else 300, random_state=args.seed).fit()
    net = CRBNetRegressor(simulator=sim, max_epochs=3, random_state=args.seed, device="cpu").fit_simulated(
        300 if args.quick else 2000)
    side = int(np.ceil(np.sqrt(args.voxels / 0.6)))  # the phantom's mask covers about 60 % of the square
    ph = make_phantom((side, side), seq, basis=sim, snr=116.0, tied_R1=True, random_state=args.seed + 1)
    idx = np.flatnonzero(ph.mask)[: args.voxels]
    mask = np.zeros_like(ph.mask)
    mask.flat[idx] = True
    fit_maps(net, ph.coefficients, mask & (np.cumsum(mask.ravel()).reshape(mask.shape) <= 64))  # compile, warm up
    rows = []
    for label, compute, se in (("no standard errors", False, None), ("se='delta' (default)", True, "delta"),
                               ("se='crb'", True, "crb")):
        t0 = time.perf_counter()
        m = fit_maps(net, ph.coefficients, mask, compute_se=compute, se=se)
        dt = time.perf_counter() - t0
        rows.append({"setting": label, "voxels": int(mask.sum()), "seconds": dt, "voxels_per_s": mask.sum() / dt,
                     "sigma_ratio": m.sigma * 116.0})
    tables = [table(f"fit_maps on {rows[0]['voxels']} phantom voxels ({seq_name})",
                    ["setting", "voxels", "seconds", "voxels/s", "sigma/true"],
                    [[r["setting"], r["voxels"], r["seconds"], r["voxels_per_s"], r["sigma_ratio"]] for r in rows],
                    "target: 19,000 voxels in at most 10 s")]
    doc = run.write(tables, {"sequence": seq_name, "rows": rows})
    figure(run, rows)
    return doc


if __name__ == "__main__":
    main()
