"""Throughput of the MT fingerprint simulator and its Jacobian (+ CRB).

Measures fingerprints/s and Jacobians/s (each Jacobian followed by its
Cramér-Rao bound) versus batch size for

* the fused numba CPU kernel (``sklearn_crb._numba_kernel``, ``backend="numba"``),
* the batched torch backend (``backend="torch"``, forward-mode autodiff),
* a naive per-sample baseline: ``scipy.linalg.expm`` of every pulse and free
  precession in a Python loop (signal), and the Julia-style Jacobian (one
  11-state block-triangular ``expm`` run per parameter),

on the published v3.2 sequence (1142 pulses; ``Sequence.default()`` if the
data file is missing), and the numba JIT time (loading the on-disk cache, and
optionally compiling from scratch in a subprocess with an empty cache).

Writes ``simulator.json`` and ``.png`` under ``--out``. ``--threads`` sets
the numba threads (default: all CPUs); ``--quick`` skips the torch Jacobian,
the naive Jacobian and the JIT timings.

Usage::

    python benchmarks/bench_simulator.py [--sequence FILE]   # a few minutes

Throughput on a shared machine depends on what else runs: the JSON records the
load average and, for numba, the CPU time per item (which other processes
affect much less than the wall-clock rate).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _harness import machine, parser, sequence, start, table

REPO = Path(__file__).resolve().parents[1]
# tutorial tissue (MRIgeneralizedBloch.jl) and a spread around it
THETA0 = np.array([0.15, 0.5, 15.0, 30.0, 3.0, 10e-6, 0.0, 1.0])
TARGET_FPS, TARGET_JPS = 1000.0, 100.0
FULL = {"sim": [1, 10, 100, 1000], "jac": [1, 10, 100, 1000], "torch_sim": [1, 10, 100, 1000],
        "torch_jac": [1, 10, 100], "min_time": 1.0, "budget": 150.0, "naive_signal": 3, "naive_jacobian": 1}
QUICK = {"sim": [1, 10], "jac": [1, 10], "torch_sim": [1, 10], "torch_jac": [], "min_time": 0.05, "budget": 5.0,
         "naive_signal": 1, "naive_jacobian": 0}


# ----------------------------------------------------------------------------- helpers
def load_sequence(path=None):
    from sklearn_crb import Sequence

    if path is None:
        return sequence()
    return Sequence.from_mat(path, TR=3.5e-3), str(path)


def tissues(n, seed=0):
    """n tissues around THETA0 (all parameters varied, omega0 != 0, B1 != 1)."""
    rng = np.random.default_rng(seed)
    th = np.repeat(THETA0[None], n, axis=0)
    th[:, :6] *= rng.uniform(0.8, 1.2, size=(n, 6))
    th[:, 6] = rng.uniform(-200.0, 200.0, n)
    th[:, 7] = rng.uniform(0.8, 1.2, n)
    return th


def timeit(fn, min_time, max_reps=1000):
    """Best wall time of fn() over repetitions lasting >= min_time in total,
    plus the process CPU time of that best repetition."""
    best, best_cpu, total, reps = math.inf, math.inf, 0.0, 0
    while reps < max_reps and (total < min_time or reps < 2):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        total += dt
        reps += 1
        if dt < best:
            best, best_cpu = dt, dc
        if dt > 4 * min_time:  # one long run is enough
            break
    return best, best_cpu, reps


# --------------------------------------------------------------------------- naive baseline
def _naive_parts(seq, th):
    """Per-pulse generators for the naive scipy loop (Assländer et al., MRM 2022, Eq. 9)."""
    from sklearn_crb.physics.r2sl.table import r2sl_numpy

    m0s, R1f, R2f, Rex, R1s, T2s, w0, B1 = th
    m0f = 1 - m0s
    R2s, dR_dT2s, dR_dB1 = r2sl_numpy(seq.TRF, seq.alpha, B1, T2s)

    def H(w1, R2):
        w = B1 * w1
        M = np.zeros((6, 6))
        M[0, :3] = [-R2f, -w0, w]
        M[1, :2] = [w0, -R2f]
        M[2, [0, 2, 4, 5]] = [-w, -R1f - Rex * m0s, Rex * m0f, R1f * m0f]
        M[3, 3:5] = [-R2, w]
        M[4, 2:6] = [Rex * m0s, -w, -R1s - Rex * m0f, R1s * m0s]
        return M

    def dH(p, w1, i):
        """dH/dtheta_p during pulse i (w1 = 0, i = None: free precession)."""
        M = np.zeros((6, 6))
        if p == 0:
            M[2, [2, 4, 5]] = [-Rex, -Rex, -R1f]
            M[4, [2, 4, 5]] = [Rex, Rex, R1s]
        elif p == 1:
            M[2, [2, 5]] = [-1.0, m0f]
        elif p == 2:
            M[0, 0] = M[1, 1] = -1.0
        elif p == 3:
            M[2, [2, 4]] = [-m0s, m0f]
            M[4, [2, 4]] = [m0s, -m0f]
        elif p == 4:
            M[4, [4, 5]] = [-1.0, m0s]
        elif p == 5 and i is not None:
            M[3, 3] = -dR_dT2s[i]
        elif p == 6:
            M[0, 1], M[1, 0] = -1.0, 1.0
        elif p == 7 and i is not None:
            M[0, 2], M[2, 0], M[3, 4], M[4, 3] = w1, -w1, w1, -w1
            M[3, 3] = -dR_dB1[i]
        return M

    return H, dH, R2s, dR_dT2s, dR_dB1


def _naive_crusher(alpha, TRF, B1, R2, dR=None):
    """U_c (6x6) and, with dR = (dR2/dT2s, dR2/dB1), its 8 tangents."""
    from scipy.linalg import expm

    a = B1 * alpha
    U = np.zeros((6, 6))
    U[0, 0], U[1, 1], U[2, 2], U[5, 5] = np.sin(a / 2) ** 2, -np.sin(a / 2) ** 2, np.cos(a), 1.0
    M = np.array([[-R2 * TRF, B1 * alpha], [-B1 * alpha, 0.0]])
    U[3:5, 3:5] = expm(M)
    if dR is None:
        return U
    dU = np.zeros((8, 6, 6))
    for p, dM in ((5, np.array([[-dR[0] * TRF, 0.0], [0.0, 0.0]])),
                  (7, np.array([[-dR[1] * TRF, alpha], [-alpha, 0.0]]))):
        blk = expm(np.block([[M, np.zeros((2, 2))], [dM, M]]))  # 4x4 block trick
        dU[p, 3:5, 3:5] = blk[2:, :2]
    dU[7, 0, 0] = np.sin(a / 2) * np.cos(a / 2) * alpha
    dU[7, 1, 1] = -dU[7, 0, 0]
    dU[7, 2, 2] = -np.sin(a) * alpha
    return U, dU


def naive_signal(seq, th):
    """Fingerprint of one tissue with scipy.linalg.expm per segment (Python loop)."""
    from scipy.linalg import expm

    H, _, R2s, _, _ = _naive_parts(seq, th)
    N, TR, phi = seq.n_pulses, seq.TR, seq.rf_phase_increment
    Dxs = np.diag([1.0, 1, 1, 0, 1, 1])
    Dxy = np.diag([0.0, 0, 1, 0, 1, 1])
    R = np.eye(6)
    R[:2, :2] = [[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]]
    Hfp = H(0.0, 0.0)
    E = np.empty((N, 6, 6))
    for i in range(N):
        g = seq.grad_moment[i]
        if g == "crusher":
            P, t = _naive_crusher(seq.alpha[i], seq.TRF[i], th[7], R2s[i]), TR / 2
        else:
            P, t = expm(H(seq.alpha[i] / seq.TRF[i], R2s[i]) * seq.TRF[i]), (TR - seq.TRF[i]) / 2
            P = Dxy @ P @ Dxy if g == "spoiler_dual" else (P @ Dxy if g == "spoiler_prepulse" else P)
        F = Dxs @ expm(Hfp * t)
        E[i] = F @ P @ R @ F
    A = E[0]
    for i in range(N - 1, 0, -1):
        A = A @ E[i]
    m = np.append(np.linalg.solve(np.eye(5) - A[:5, :5], A[:5, 5]), 1.0)
    out = np.empty(N, complex)
    for i in range(N):
        if i:
            m = E[i] @ m
        out[i] = m[0] + 1j * m[1]
    return out


def naive_jacobian(seq, th):
    """Julia-style Jacobian: per parameter, an 11-state run [m(5); dm(5); 1] with
    block-triangular expm of every segment (Van Loan's block-triangular Fréchet derivative)."""
    from scipy.linalg import expm

    H, dH, R2s, dT, dB = _naive_parts(seq, th)
    N, TR, phi = seq.n_pulses, seq.TR, seq.rf_phase_increment
    R = np.eye(6)
    R[:2, :2] = [[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]]

    def aug(U, dU):
        """11x11 [[U5, 0, u], [dU5, U5, du], [0, 0, 1]] from 6x6 U, dU."""
        X = np.zeros((11, 11))
        X[:5, :5], X[:5, 10] = U[:5, :5], U[:5, 5]
        X[5:10, :5], X[5:10, 5:10], X[5:10, 10] = dU[:5, :5], U[:5, :5], dU[:5, 5]
        X[10, 10] = 1.0
        return X

    def aug_expm(M, dM, t):
        G = np.zeros((11, 11))
        G[:5, :5], G[:5, 10] = M[:5, :5] * t, M[:5, 5] * t
        G[5:10, :5], G[5:10, 5:10], G[5:10, 10] = dM[:5, :5] * t, M[:5, :5] * t, dM[:5, 5] * t
        return expm(G)

    def proj(D6):  # a diagonal 6x6 projection acting blockwise
        return aug(D6, np.zeros((6, 6)))

    Dxs, Dxy, Ra = proj(np.diag([1.0, 1, 1, 0, 1, 1])), proj(np.diag([0.0, 0, 1, 0, 1, 1])), proj(R)
    Hfp = H(0.0, 0.0)
    J = np.empty((N, 8), complex)
    for p in range(8):
        E = np.empty((N, 11, 11))
        dHfp = dH(p, 0.0, None)
        for i in range(N):
            g = seq.grad_moment[i]
            if g == "crusher":
                U, dU = _naive_crusher(seq.alpha[i], seq.TRF[i], th[7], R2s[i], (dT[i], dB[i]))
                P, t = aug(U, dU[p]), TR / 2
            else:
                w1 = seq.alpha[i] / seq.TRF[i]
                P, t = aug_expm(H(w1, R2s[i]), dH(p, w1, i), seq.TRF[i]), (TR - seq.TRF[i]) / 2
                P = Dxy @ P @ Dxy if g == "spoiler_dual" else (P @ Dxy if g == "spoiler_prepulse" else P)
            F = Dxs @ aug_expm(Hfp, dHfp, t)
            E[i] = F @ P @ Ra @ F
        A = E[0]
        for i in range(N - 1, 0, -1):
            A = A @ E[i]
        m = np.append(np.linalg.solve(np.eye(10) - A[:10, :10], A[:10, 10]), 1.0)
        for i in range(N):
            if i:
                m = E[i] @ m
            J[i, p] = m[5] + 1j * m[6]
    return J


# ------------------------------------------------------------------------------ measurements
def jacobian_and_crb(seq, th, backend):
    """Jacobian of every tissue and its CRB (all 8 parameters, complex M0 as a
    nuisance): ``sklearn_crb.crb.cramer_rao_bound`` when available, else
    F = Re(J^H J) with the M0 columns [s, i s], inverted after scaling."""
    try:
        from sklearn_crb.crb import cramer_rao_bound
    except ImportError:  # pragma: no cover - crb.py not there yet
        cramer_rao_bound = None
    if cramer_rao_bound is not None:
        return cramer_rao_bound(seq, th, backend=backend, on_singular="inf")
    from sklearn_crb.physics import signal as physics

    s, J = physics.jacobian(seq, th, backend=backend)
    Jf = np.concatenate([J, s[..., None], 1j * s[..., None]], axis=-1)
    F = np.einsum("nti,ntj->nij", Jf.conj(), Jf).real
    d = 1 / np.sqrt(np.diagonal(F, axis1=1, axis2=2))
    Fi = np.linalg.inv(F * d[:, :, None] * d[:, None, :]) * d[:, :, None] * d[:, None, :]
    return np.diagonal(Fi, axis1=1, axis2=2)[:, :8]


def bench_backend(seq, backend, sim_sizes, jac_sizes, min_time, budget_s):
    from sklearn_crb.physics import signal as physics

    rows = []
    th_all = tissues(max(sim_sizes + jac_sizes))
    physics.simulate(seq, th_all[:2], backend=backend)  # warm-up
    for kind, sizes in (("simulate", sim_sizes), ("jacobian+crb", jac_sizes)):
        t_start = time.perf_counter()
        last_rate = None
        for n in sizes:
            th = th_all[:n]
            if kind == "simulate":
                fn = lambda: physics.simulate(seq, th, backend=backend)  # noqa: E731
            else:
                fn = lambda: jacobian_and_crb(seq, th, backend)  # noqa: E731
            expected = n / last_rate if last_rate else 0.0
            if time.perf_counter() - t_start + expected > budget_s:
                print(f"  {backend:6s} {kind:13s} n={n:5d}: skipped (time budget, ~{expected:.0f} s)")
                continue
            wall, cpu, reps = timeit(fn, min_time)
            last_rate = n / wall
            rows.append({"backend": backend, "kind": kind, "batch": n, "wall_s": wall, "cpu_s": cpu,
                         "reps": reps, "per_s": n / wall, "cpu_ms_per_item": 1e3 * cpu / n})
            print(f"  {backend:6s} {kind:13s} n={n:5d}: {n / wall:10.1f} /s   ({1e3 * wall / n:8.3f} ms/item wall, "
                  f"{1e3 * cpu / n:8.3f} ms/item CPU, {reps} reps)")
    return rows


def jit_times(fresh):
    """Seconds (wall, CPU) of the first simulate + jacobian call in a new process
    (imports excluded): loading the on-disk cache, and (fresh=True) compiling
    from scratch (subprocess with an empty NUMBA_CACHE_DIR)."""
    code = ("import time, numpy, torch, numba, sklearn_crb.physics;"
            "from sklearn_crb.physics._numba import kernel as K;"
            "t = time.perf_counter(); c = time.process_time(); K.warmup();"
            "print(time.perf_counter() - t, time.process_time() - c)")
    out = {}
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode == 0:
        w, c = map(float, r.stdout.split()[-2:])
        out["cached_load_s"] = w
        out["cached_load_cpu_s"] = c
    if fresh:
        with tempfile.TemporaryDirectory() as d:
            env["NUMBA_CACHE_DIR"] = d
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        if r.returncode == 0:
            w, c = map(float, r.stdout.split()[-2:])
            out["fresh_compile_s"] = w
            out["fresh_compile_cpu_s"] = c
        else:
            out["fresh_compile_error"] = r.stderr[-2000:]
    return out


def plot(run, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"numba": ("C0", "o-"), "torch": ("C1", "s-")}
    for ax, kind, target, label in ((axes[0], "simulate", TARGET_FPS, "fingerprints / s"),
                                    (axes[1], "jacobian+crb", TARGET_JPS, "Jacobians (+CRB) / s")):
        for backend, (color, style) in styles.items():
            rows = [r for r in results["rows"] if r["backend"] == backend and r["kind"] == kind]
            if rows:
                ax.plot([r["batch"] for r in rows], [r["per_s"] for r in rows], style, color=color, label=backend)
        naive = results["naive"].get("signal_per_s" if kind == "simulate" else "jacobian_per_s")
        if naive:
            ax.axhline(naive, color="C2", ls="--", label="naive scipy loop (1 sample)")
        ax.axhline(target, color="k", ls=":", label=f"target {target:g}/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size (tissues per call)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = machine()
    fig.suptitle(f"{results['sequence']['n_pulses']}-pulse sequence, {m['cpu']} ({m['cpus_available']} CPUs), "
                 f"numba {m['versions']['numba']}, torch {m['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    run.save_figure(fig, dpi=120)


def naive_rates(seq, size, K):
    """Seconds per sample and agreement with numba of the naive scipy loop (signal, and Jacobian if asked)."""
    n_sig, n_jac = size["naive_signal"], size["naive_jacobian"]
    th = tissues(max(n_sig, n_jac, 1), seed=1)
    out = {}
    t = time.perf_counter()
    sig = [naive_signal(seq, x) for x in th[:n_sig]]
    dt = time.perf_counter() - t
    ref_s, ref_J = K.jacobian_numba(seq, th)
    err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(sig, ref_s))
    out.update(signal_s=dt / n_sig, signal_per_s=n_sig / dt, signal_max_rel_diff=err)
    if n_jac:
        t = time.perf_counter()
        Js = [naive_jacobian(seq, x) for x in th[:n_jac]]
        dt = time.perf_counter() - t
        errJ = max((np.linalg.norm(a - b, axis=0) / np.linalg.norm(b, axis=0)).max() for a, b in zip(Js, ref_J))
        out.update(jacobian_s=dt / n_jac, jacobian_per_s=n_jac / dt, jacobian_max_rel_diff=errJ)
    return out


def summarise(results):
    """Per kind: numba's best rate, and its speed-ups over the naive loop and over torch."""
    def best(backend, kind):
        rows = [r for r in results["rows"] if r["backend"] == backend and r["kind"] == kind]
        return max(rows, key=lambda r: r["per_s"]) if rows else None

    summary = {}
    for kind, key in (("simulate", "signal_per_s"), ("jacobian+crb", "jacobian_per_s")):
        b = best("numba", kind)
        if not b:
            continue
        summary[kind] = {"numba_best_per_s": b["per_s"], "at_batch": b["batch"],
                         "numba_cpu_ms_per_item": b["cpu_ms_per_item"]}
        if results["naive"].get(key):
            summary[kind]["speedup_vs_naive"] = b["per_s"] / results["naive"][key]
        bt = best("torch", kind)
        if bt:
            summary[kind]["torch_best_per_s"] = bt["per_s"]
            summary[kind]["speedup_vs_torch"] = b["per_s"] / bt["per_s"]
    return summary


def tables(results):
    rows = [[r["backend"], r["kind"], r["batch"], r["per_s"], r["cpu_ms_per_item"]] for r in results["rows"]]
    nv = results["naive"]
    rows += [["naive scipy loop", "simulate", 1, nv["signal_per_s"], ""]]
    if "jacobian_per_s" in nv:
        rows += [["naive scipy loop", "jacobian", 1, nv["jacobian_per_s"], ""]]
    jit = results["jit"]
    return [table(f"Throughput, {results['sequence']['n_pulses']}-pulse sequence",
                  ["backend", "kind", "batch", "items/s", "CPU ms/item"], rows,
                  f"targets: {TARGET_FPS:g} fingerprints/s and {TARGET_JPS:g} Jacobians (+CRB)/s"),
            table("numba JIT", ["what", "seconds"], [[k, v] for k, v in jit.items() if isinstance(v, float)])]


def main(argv=None):
    ap = parser(__doc__, threads=None)
    ap.add_argument("--sequence", type=Path, default=None, help="a .mat sequence (default: v3.2, else built-in)")
    args = ap.parse_args(argv)
    run = start("simulator", "Throughput of the fingerprint simulator and its Jacobian (+ CRB)", args, argv)
    import torch

    # torch and numba never run at the same time here; keep torch at the core count
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), os.cpu_count() or 1))
    seq, seq_src = load_sequence(args.sequence)
    size = QUICK if args.quick else FULL
    results = {"sequence": {"source": seq_src, "n_pulses": seq.n_pulses, "TR": seq.TR}, "sizes": size, "rows": []}
    from sklearn_crb.physics._numba import kernel as K

    t0 = time.perf_counter()
    K.warmup()
    results["jit"] = {"first_call_this_process_s": time.perf_counter() - t0}
    run.log("numba backend")
    results["rows"] += bench_backend(seq, "numba", size["sim"], size["jac"], size["min_time"], size["budget"])
    run.log("torch backend")
    results["rows"] += bench_backend(seq, "torch", size["torch_sim"], size["torch_jac"], size["min_time"],
                                     size["budget"])
    run.log("naive per-sample scipy loop")
    results["naive"] = naive_rates(seq, size, K)
    results["summary"] = summarise(results)
    if not args.quick:
        results["jit"].update(jit_times(fresh=True))
    doc = run.write(tables(results), results)
    plot(run, results)
    return doc


if __name__ == "__main__":
    main()
