"""Time of network maps with standard errors on a slice-sized phantom (issue 9: 19,000 voxels in <= 10 s).

A network of the default architecture that estimates every free parameter of
the tied model (the CLI's default targets, so nothing is left to polish) is
trained for a few epochs only: the time of ``fit_maps`` does not depend on
how well it is trained. It is applied to a brain phantom with about 19,000
masked voxels, with and without standard-error maps, for both standard-error
methods of the network (``se="delta"``, the default, and ``se="crb"``).
Writes ``benchmarks/results/maps_timing.json`` and ``.png`` and prints a table.

    python benchmarks/bench_maps.py [--voxels 19000] [--sequence FILE]

The reference sequence (v3.2) is used when ``SKLEARN_CRB_DATA`` (default
``../shared/data``) has it, the built-in sequence otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.maps import fit_maps
from sklearn_crb.phantom import make_phantom
from sklearn_crb.physics.parameters import free_parameters
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator
from _results import save_figure, write_json

OUT = Path(__file__).resolve().parent / "results"
V32 = "control_MT_v3p2_TR3p5ms_discretized.mat"


def _sequence(path):
    if path:
        return Sequence.from_mat(path, TR=3.5e-3), Path(path).name
    data = Path(os.environ.get("SKLEARN_CRB_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    if (data / V32).exists():
        return Sequence.from_mat(data / V32, TR=3.5e-3), V32
    return Sequence.default(), "built-in"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voxels", type=int, default=19000)
    ap.add_argument("--sequence", default=None)
    ap.add_argument("--chunk-size", type=int, default=2048)
    args = ap.parse_args(argv)
    seq, seq_name = _sequence(args.sequence)
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(True), tied_R1=True,
                                 n_basis_samples=300, random_state=0).fit()
    net = CRBNetRegressor(simulator=sim, max_epochs=3, random_state=0, device="cpu").fit_simulated(2000)
    side = int(np.ceil(np.sqrt(args.voxels / 0.6)))  # the phantom's mask covers about 60 % of the square
    ph = make_phantom((side, side), seq, basis=sim, snr=116.0, tied_R1=True, random_state=1)
    idx = np.flatnonzero(ph.mask)[: args.voxels]
    mask = np.zeros_like(ph.mask)
    mask.flat[idx] = True
    fit_maps(net, ph.coefficients, mask & (np.cumsum(mask.ravel()).reshape(mask.shape) <= 64))  # compile, warm up
    rows = []
    for label, compute, se in (("no standard errors", False, None), ("se='delta' (default)", True, "delta"),
                               ("se='crb'", True, "crb")):
        t0 = time.perf_counter()
        m = fit_maps(net, ph.coefficients, mask, compute_se=compute, se=se, chunk_size=args.chunk_size)
        dt = time.perf_counter() - t0
        rows.append({"setting": label, "voxels": int(mask.sum()), "seconds": dt, "voxels_per_s": mask.sum() / dt,
                     "sigma_ratio": m["sigma"] * 116.0})
    OUT.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "sequence": seq_name,
               "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "default")}
    write_json(OUT / "maps_timing.json", {"machine": machine, "rows": rows})
    print(f"{'setting':<22} {'voxels':>7} {'seconds':>8} {'voxels/s':>9} {'sigma/true':>10}")
    for r in rows:
        print(f"{r['setting']:<22} {r['voxels']:>7} {r['seconds']:>8.1f} {r['voxels_per_s']:>9.0f} "
              f"{r['sigma_ratio']:>10.3f}")
    print(f"machine: {machine}")
    import matplotlib  # optional plotting dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.5))
    ax.barh([r["setting"] for r in rows], [r["seconds"] for r in rows])
    ax.axvline(10, color="k", ls="--", lw=1)
    ax.set_xlabel(f"seconds for {rows[0]['voxels']} voxels")
    fig.tight_layout()
    save_figure(fig, OUT / "maps_timing.png", dpi=120)


if __name__ == "__main__":
    main()
