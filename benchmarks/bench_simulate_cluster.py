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
Writes ``simulate_cluster.json`` and ``.png`` under ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/bench_simulate_cluster.py --n-samples 50000
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import joblib
import numpy as np
import psutil
from _harness import parser, sequence, start, table
from dask.distributed import Client, LocalCluster

from sklearn_crb import MTFingerprintSimulator
from sklearn_crb.io.datasets import simulate_dataset, simulate_to_file
from sklearn_crb.io.h5 import H5Rows
from sklearn_crb.physics.parameters import free_parameters

KEYS = ("X", "y", "crb", "X_clean", "crb_unit", "theta", "M0")


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


def parse_args(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--n-samples", type=int, default=1_000_000, help="samples on 2 workers (default 1,000,000)")
    ap.add_argument("--check-samples", type=int, default=5000, help="samples on 1 worker, compared bitwise")
    ap.add_argument("--chunk", type=int, default=500, help="samples per task (default 500)")
    a = ap.parse_args(argv)
    if a.quick:
        a.n_samples, a.check_samples, a.chunk = 100, 50, 25
    if a.check_samples % a.chunk or a.check_samples > a.n_samples:
        ap.error("--check-samples must be a multiple of --chunk and at most --n-samples")
    return a


def one_worker(a, sim, res):
    """The reference set and the 1-worker rate (after a one-chunk warm-up: imports, numba cache)."""
    with cluster(1) as c1, Client(c1), joblib.parallel_config(backend="dask"):
        simulate_dataset(sim, a.chunk, a.seed + 1, chunk=a.chunk, progress=False)
        t0 = time.perf_counter()
        ref = simulate_dataset(sim, a.check_samples, a.seed, chunk=a.chunk, progress=False)
        res["one_worker_s"] = time.perf_counter() - t0
    res["one_worker_rate"] = a.check_samples / res["one_worker_s"]
    return ref


def two_workers(a, sim, res, ref, tmp):
    """The large set on 2 workers, streamed to HDF5, with its memory sampled; returns the RSS samples."""
    out = os.path.join(tmp, "big.h5")
    with cluster(2) as c2, Client(c2) as client, joblib.parallel_config(backend="dask"):
        simulate_dataset(sim, 2 * a.chunk, a.seed + 1, chunk=a.chunk, progress=False)  # warm both workers
        pids = {f"worker{i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        rss = client.run(lambda: psutil.Process().memory_info().rss)
        base = {f"worker{i}": v for i, v in enumerate(rss.values())}
        base["writer"] = psutil.Process().memory_info().rss
        sampler = RSSSampler({**pids, "writer": os.getpid()})
        sampler.start()
        t0 = time.perf_counter()
        simulate_to_file(out, sim, a.n_samples, a.seed, chunk=a.chunk, progress=not a.quick)
        res["two_workers_s"] = time.perf_counter() - t0
        sampler.stop()
        hwm = {f"worker{i}": v for i, v in enumerate(client.run(_vmhwm).values())}
    hwm["writer"] = _vmhwm()
    res["file_bytes"] = os.path.getsize(out)
    with H5Rows(out) as rows:
        head = rows.read_slice(KEYS, 0, a.check_samples)
    res["bitwise_1_vs_2_workers"] = bool(all(np.array_equal(head[k], ref[k]) for k in KEYS))
    res["memory"] = {}
    samples = sampler.samples
    for name in base:
        series = np.array([s[name] for s in samples], float)
        half = series[: max(1, len(series) // 2)]
        res["memory"][name] = {"rss_before_MiB": base[name] / 2**20,
                               "rss_peak_sampled_MiB": np.nanmax(series) / 2**20,
                               "rss_peak_first_half_MiB": np.nanmax(half) / 2**20, "VmHWM_MiB": hwm[name] / 2**20}
    return samples


def summary_rows(a, res):
    rows = [("samples (2 workers)", a.n_samples), ("time, 2 workers (s)", res["two_workers_s"]),
            ("samples/s, 2 workers", res["two_worker_rate"]), ("samples/s, 1 worker", res["one_worker_rate"]),
            ("speed-up 2 vs 1", res["speedup_2_vs_1"]),
            (f"bitwise equal, first {a.check_samples:,} rows, 1 vs 2 workers", str(res["bitwise_1_vs_2_workers"])),
            ("HDF5 file (MiB)", res["file_bytes"] / 2**20)]
    for name, m in res["memory"].items():
        rows.append((f"{name}: RSS before / peak first half / peak (MiB)", f"{m['rss_before_MiB']:.0f} / "
                     f"{m['rss_peak_first_half_MiB']:.0f} / {m['rss_peak_sampled_MiB']:.0f}"))
    if a.n_samples != 1_000_000:
        rows.append(("EXTRAPOLATION (linear): 1,000,000 samples, 2 workers (min)", res["extrapolated_1M_s"] / 60))
        rows.append(("EXTRAPOLATION (linear): 1,000,000-sample file (GiB)", res["extrapolated_1M_file_GiB"]))
    return rows


def figure(run, a, samples):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = [s["t"] for s in samples]
    for name in (k for k in samples[0] if k != "t") if samples else ():
        ax.plot(t, [s[name] / 2**20 for s in samples], label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"simulate {a.n_samples:,} samples to HDF5, 2 dask workers: memory stays flat")
    ax.legend()
    fig.tight_layout()
    run.save_figure(fig, dpi=120)


def main(argv=None):
    a = parse_args(argv)
    run = start("simulate_cluster", "simulate of a large training set on a 2-worker dask LocalCluster, streamed to "
                "HDF5", a, argv)
    seq, seq_name = sequence()
    sim = MTFingerprintSimulator(seq, n_components=13, estimate=free_parameters(False), snr=(10.0, 300.0),
                                 prior="brain", n_basis_samples=100 if a.quick else 1000, random_state=a.seed).fit()
    res = {"sequence": seq_name, "n_samples": a.n_samples, "chunk": a.chunk, "check_samples": a.check_samples,
           "estimate": list(sim.estimate_), "rank": 13}
    ref = one_worker(a, sim, res)
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        samples = two_workers(a, sim, res, ref, tmp)
    res["two_worker_rate"] = a.n_samples / res["two_workers_s"]
    res["speedup_2_vs_1"] = res["two_worker_rate"] / res["one_worker_rate"]
    res["extrapolated_1M_s"] = 1e6 / res["two_worker_rate"]
    res["extrapolated_1M_file_GiB"] = res["file_bytes"] / a.n_samples * 1e6 / 2**30
    res["rss_series"] = samples[:: max(1, len(samples) // 400)]
    tables = [table(f"simulate on a 2-worker LocalCluster, {seq_name}, {len(sim.estimate_)} targets, chunk {a.chunk}",
                    ["quantity", "value"], [list(r) for r in summary_rows(a, res)])]
    doc = run.write(tables, res)
    figure(run, a, samples)
    return doc


if __name__ == "__main__":
    main()
