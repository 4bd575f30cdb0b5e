"""``simulate`` of a large training set on a 2-worker dask LocalCluster, streamed to HDF5 (issue 12, item 4).

What it measures, with the package's default recipe (every free parameter of
the untied model estimated, rank-13 SVD basis, brain prior, SNR 10-300, the
v3.2 sequence from ``SKLEARN_CRB_DATA`` or else the 1142-pulse built-in one):

1. a ``--check-samples`` set (default 5,000) on a 1-worker cluster;
2. ``--n-samples`` (default 1,000,000) on a 2-worker cluster (processes,
   one thread each), written chunk by chunk to HDF5 through
   ``simulate_to_file``: wall time, samples/s, and the memory of every worker
   and of the writing process (RSS sampled every 0.25 s with psutil, and the
   kernel's peak ``VmHWM``);
3. the bitwise check: the first ``--check-samples`` rows of the 2-worker file
   equal the 1-worker set (whole chunks are shared by any longer set with the
   same seed and chunk size).

The writing process also hosts the dask scheduler and client of the
LocalCluster: their bookkeeping grows by roughly 0.15 MiB per task (not per
sample; with loky the writer stays flat), so use a larger ``--chunk`` for
very large sets (fewer tasks) or an external scheduler.

Run with fewer samples on a small machine and the 1,000,000-sample time is
extrapolated linearly from the steady rate, labelled as an extrapolation.
Writes ``benchmarks/results/simulate_cluster.json``, ``.png`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_simulate_cluster.py --n-samples 50000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import psutil
from dask.distributed import Client, LocalCluster

from sklearn_crb.io.datasets import simulate_dataset, simulate_to_file
from sklearn_crb.io.h5 import H5Rows
from sklearn_crb.physics.parameters import free_parameters
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator
from _results import save_figure, write_json, write_text

V32 = "control_MT_v3p2_TR3p5ms_discretized.mat"
KEYS = ("X", "y", "crb", "X_clean", "crb_unit", "theta", "M0")


def sequence():
    path = Path(os.environ.get("SKLEARN_CRB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / V32
    if path.is_file():
        return Sequence.from_mat(path, TR=3.5e-3), "v3.2 (1142 pulses)"
    return Sequence.default(), "built-in (1142 pulses)"


def _vmhwm():
    """Peak RSS of this process so far (Linux VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return float("nan")


class RSSSampler(threading.Thread):
    """RSS of some processes every ``dt`` seconds, in a thread."""

    def __init__(self, pids, dt=0.25):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.dt, self.t0, self.samples, self.stop_ = dt, time.perf_counter(), [], threading.Event()

    def run(self):
        while not self.stop_.is_set():
            row = {"t": time.perf_counter() - self.t0}
            for name, p in self.procs.items():
                try:
                    row[name] = p.memory_info().rss
                except psutil.Error:
                    row[name] = float("nan")
            self.samples.append(row)
            self.stop_.wait(self.dt)

    def stop(self):
        self.stop_.set()
        self.join()


def cluster(n_workers):
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=1_000_000)
    ap.add_argument("--check-samples", type=int, default=5000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args()
    if a.check_samples % a.chunk or a.check_samples > a.n_samples:
        ap.error("--check-samples must be a multiple of --chunk and at most --n-samples")
    seq, seq_name = sequence()
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(False), snr=(10.0, 300.0),
                                 prior="brain", n_basis_samples=1000, random_state=a.seed).fit()
    load = os.getloadavg()
    res = {"sequence": seq_name, "n_samples": a.n_samples, "chunk": a.chunk, "check_samples": a.check_samples,
           "estimate": list(sim.estimate_), "rank": 13, "cpus": os.cpu_count(), "loadavg_before": load}

    # 1 worker: the reference set and the 1-worker rate (after a one-chunk warm-up: imports, numba cache)
    with cluster(1) as c1, Client(c1), joblib.parallel_config(backend="dask"):
        simulate_dataset(sim, a.chunk, a.seed + 1, chunk=a.chunk, progress=False)
        t0 = time.perf_counter()
        ref = simulate_dataset(sim, a.check_samples, a.seed, chunk=a.chunk, progress=False)
        res["one_worker_s"] = time.perf_counter() - t0
    res["one_worker_rate"] = a.check_samples / res["one_worker_s"]

    with tempfile.TemporaryDirectory(dir=a.out if Path(a.out).is_dir() else None) as tmp:
        out = Path(tmp) / "big.h5"
        with cluster(2) as c2, Client(c2) as client, joblib.parallel_config(backend="dask"):
            simulate_dataset(sim, 2 * a.chunk, a.seed + 1, chunk=a.chunk, progress=False)  # warm both workers
            pids = {f"worker{i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
            rss = client.run(lambda: psutil.Process().memory_info().rss)
            base = {f"worker{i}": v for i, v in enumerate(rss.values())}
            base["writer"] = psutil.Process().memory_info().rss
            sampler = RSSSampler({**pids, "writer": os.getpid()})
            sampler.start()
            t0 = time.perf_counter()
            simulate_to_file(out, sim, a.n_samples, a.seed, chunk=a.chunk, progress=True)
            res["two_workers_s"] = time.perf_counter() - t0
            sampler.stop()
            hwm = {f"worker{i}": v for i, v in enumerate(client.run(_vmhwm).values())}
        hwm["writer"] = _vmhwm()
        res["file_bytes"] = out.stat().st_size
        with H5Rows(out) as rows:
            head = rows.read_slice(KEYS, 0, a.check_samples)
        res["bitwise_1_vs_2_workers"] = bool(all(np.array_equal(head[k], ref[k]) for k in KEYS))
    res["two_worker_rate"] = a.n_samples / res["two_workers_s"]
    res["speedup_2_vs_1"] = res["two_worker_rate"] / res["one_worker_rate"]
    samples = sampler.samples
    res["memory"] = {}
    for name in base:
        series = np.array([s[name] for s in samples], float)
        half = series[: max(1, len(series) // 2)]
        res["memory"][name] = {"rss_before_MiB": base[name] / 2**20,
                               "rss_peak_sampled_MiB": np.nanmax(series) / 2**20,
                               "rss_peak_first_half_MiB": np.nanmax(half) / 2**20, "VmHWM_MiB": hwm[name] / 2**20}
    res["extrapolated_1M_s"] = 1e6 / res["two_worker_rate"]
    res["extrapolated_1M_file_GiB"] = res["file_bytes"] / a.n_samples * 1e6 / 2**30
    res["loadavg_after"] = os.getloadavg()
    res["rss_series"] = samples[:: max(1, len(samples) // 400)]

    rows = [("samples (2 workers)", f"{a.n_samples:,}"), ("time, 2 workers (s)", f"{res['two_workers_s']:.1f}"),
            ("samples/s, 2 workers", f"{res['two_worker_rate']:.1f}"),
            ("samples/s, 1 worker", f"{res['one_worker_rate']:.1f}"),
            ("speed-up 2 vs 1", f"{res['speedup_2_vs_1']:.2f}"),
            (f"bitwise equal, first {a.check_samples:,} rows, 1 vs 2 workers", str(res["bitwise_1_vs_2_workers"])),
            ("HDF5 file (MiB)", f"{res['file_bytes'] / 2**20:.1f}")]
    for name, m in res["memory"].items():
        rows.append((f"{name}: RSS before / peak first half / peak (MiB)", f"{m['rss_before_MiB']:.0f} / "
                     f"{m['rss_peak_first_half_MiB']:.0f} / {m['rss_peak_sampled_MiB']:.0f}"))
    if a.n_samples != 1_000_000:
        rows.append(("EXTRAPOLATION (linear): 1,000,000 samples, 2 workers (min)",
                     f"{res['extrapolated_1M_s'] / 60:.1f}"))
        rows.append(("EXTRAPOLATION (linear): 1,000,000-sample file (GiB)", f"{res['extrapolated_1M_file_GiB']:.2f}"))
    rows.append(("load average before / after", f"{load[0]:.1f} / {res['loadavg_after'][0]:.1f} "
                                                 f"({os.cpu_count()} cores, shared)"))
    w = max(len(r[0]) for r in rows)
    table = "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)
    table = f"| {'quantity':<{w}} | value |\n|{'-' * (w + 2)}|-------|\n" + table
    print(f"\nsimulate on a 2-worker LocalCluster, {seq_name}, {len(sim.estimate_)} targets, chunk {a.chunk}\n")
    print(table)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "simulate_cluster.json", res, indent=2, default=float)
    write_text(out_dir / "simulate_cluster.md", table + "\n")
    try:  # matplotlib is optional: only the figure needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    t = [s["t"] for s in samples]
    for name in base:
        ax.plot(t, [s[name] / 2**20 for s in samples], label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"simulate {a.n_samples:,} samples to HDF5, 2 dask workers: memory stays flat")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "simulate_cluster.png", dpi=120)


if __name__ == "__main__":
    main()
