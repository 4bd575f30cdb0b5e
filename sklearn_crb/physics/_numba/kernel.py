"""Fused CPU kernel (numba) for generalized-Bloch MT fingerprints and Jacobians.

This is the ``"numba"`` backend of :mod:`sklearn_crb.physics.signal`; it
computes the same discrete model as the torch reference backend (the linear
approximation of the generalized Bloch model, Assländer et al., "Generalized
Bloch model: a theory for pulsed magnetization transfer", MRM
2022;87:2003-2017, Eq. 9, with the two-pool Bloch-McConnell equations and
the periodic steady state of the phase-cycled sequence), tissue by tissue, in
one compiled, multi-threaded loop. Its layers, bottom up:

* :mod:`.simd`: jit options and the 8-tuple / 6-tuple helpers;
* :mod:`.expm`: the pulse propagator ``P = expm(H TRF)`` of the 5x5
  Bloch-McConnell core plus its affine column, by scaling and squaring of the
  degree-18 Taylor polynomial of Bader, Blanes & Casas (2019), and its
  dual-number derivative; the affine 6x6 matrices are stored as 5x6 blocks
  with a scalar corner;
* :mod:`.bloch`: per pulse, the R2sl lookup (the identical bilinear
  interpolant of :mod:`sklearn_crb.physics.r2sl.table`, with its exact,
  piecewise-constant partials), the closed-form free precession and the
  crushed inversion pulse ``U_c`` (or the ``spoiler_dual`` /
  ``spoiler_prepulse`` projections), and the per-TR map
  ``E_i = F_i P_i R(phi) F_i`` reduced to the 4 states that survive the
  ``D_xs`` projection ``(xf, yf, zf, zs)`` plus the constant;
* this module: the cycle product ``A = E_1 E_N ... E_2``, the periodic steady
  state ``(I - A) m = a`` (4x4 LU with partial pivoting; the xs row of the
  5x5 system is identically zero), the sweep ``S_i = E_i S_{i-1}``, the
  parallel kernels and their launch.

The Jacobian carries 8 tangents (one per parameter of ``theta``) through the
*same* algorithm: dual-number (forward-mode) differentiation of the Taylor
polynomial and of every squaring (Al-Mohy & Higham's approach to the Fréchet
derivative, with ``s`` chosen from ``||H||`` alone), with ``dH`` including the
R2sl partials for T2s and B1; analytic derivatives of the closed-form free
precession and of ``U_c``; and the tangent sweep
``dS_i = E_i dS_{i-1} + dE_i S_{i-1}`` from ``dS_1 = 0``,
``r = E_1 dS_N + dE_1 S_N``, ``dS_1 = (I - A)^-1 r`` and a second sweep. The
8 tangents are the innermost, contiguous axis of every tangent array and are
handled as 8-tuples, which LLVM's SLP vectorizer turns into AVX instructions
(enabled for these kernels only, see :func:`_slp_vectorize`).

Cost per tissue on the 1142-pulse v3.2 sequence, one core of the 2-core
Xeon (Sapphire Rapids, AVX-512) this was developed on: ~0.47 ms per
fingerprint, ~3.6 ms per Jacobian (both kernels: ~3800 fingerprints/s and
~490 Jacobians + CRBs/s on 2 cores, ``benchmarks/bench_simulator.py``). The
first call compiles (~20 s) and writes numba's on-disk cache, keyed on a hash
of every source file compiled into the kernels (:mod:`.cache`); later
processes load it in ~0.3 s (:func:`warmup`).

Threading
---------
``prange`` over ``min(n, 4 * n_threads)`` contiguous chunks of tissues, handed
to the threads dynamically (chunk size 1), each chunk with private scratch
allocated once (the ``E_i`` of one tissue, 1142 x 20 doubles, and for the
Jacobian their tangents, 1142 x 160 doubles, ~1.5 MB). Small batches (fewer
than 4 tissues per thread for fingerprints, 1 for Jacobians) run on the
calling thread only: waking the pool costs more than it saves there, and on
a busy machine a parallel region can wait a scheduler tick for a descheduled
worker. There is no Python loop over tissues or pulses and no allocation in
the pulse loop.

numba uses ``numba.get_num_threads()`` threads, by default the number of
CPUs (``NUMBA_NUM_THREADS`` or ``numba.set_num_threads`` change it; the
setting is per calling thread). torch's intra-op pool (``torch.set_num_threads``,
default: the number of cores) never runs at the same time as the kernel when
both are called from one Python thread, so the two pools do not compete; when
several Python threads call them concurrently, give each fewer threads so
that their sum stays at the number of cores.

``fastmath`` is off (IEEE semantics, no reassociation): a tissue's result does
not depend on the batch it is in, the chunking or the number of threads.
"""

from __future__ import annotations

import contextlib
import time

import numba
import numpy as np
from numba import njit, prange

from sklearn_crb.physics._numba.bloch import (
    _build_dE,
    _build_E,
)
from sklearn_crb.physics._numba.cache import enable_source_cache
from sklearn_crb.physics._numba.expm import (
    _C0,
    NSLOT,
)
from sklearn_crb.physics._numba.simd import (
    _JIT,
    NT,
    _vfma2,
    _vld,
    _vld2,
    _vst2,
)
from sklearn_crb.physics.r2sl.table import load_r2sl_table
from sklearn_crb.physics.sequence import Sequence

__all__ = ["simulate_numba", "jacobian_numba", "prepare_sequence", "warmup"]

_KINDS = {"balanced": 0, "crusher": 1, "spoiler_dual": 2, "spoiler_prepulse": 3}

# parallel kernels; their on-disk cache is keyed on every source file they compile
# (enable_source_cache below), not only on this file as numba's cache=True would be
_PJIT = dict(_JIT, parallel=True)


# =========================================================================== steady state
@njit(**_JIT)
def _mm4(E, k, C, x, z):
    """C[z] = E[k] @ C[x] for affine 4x5 blocks (corner 1)."""
    for i in range(4):
        e0 = E[k, i, 0]
        e1 = E[k, i, 1]
        e2 = E[k, i, 2]
        e3 = E[k, i, 3]
        for j in range(5):
            C[z, i, j] = e0 * C[x, 0, j] + e1 * C[x, 1, j] + e2 * C[x, 2, j] + e3 * C[x, 3, j]
        C[z, i, 4] += E[k, i, 4]


@njit(**_JIT)
def _lu4(M, piv):
    """In-place LU with partial pivoting of the 4x4 M."""
    for k in range(4):
        p = k
        big = abs(M[k, k])
        for i in range(k + 1, 4):
            if abs(M[i, k]) > big:
                big = abs(M[i, k])
                p = i
        piv[k] = p
        if p != k:
            for j in range(4):
                tmp = M[k, j]
                M[k, j] = M[p, j]
                M[p, j] = tmp
        for i in range(k + 1, 4):
            M[i, k] /= M[k, k]
            f = M[i, k]
            for j in range(k + 1, 4):
                M[i, j] -= f * M[k, j]


@njit(**_JIT)
def _lusolve4(M, piv, b):
    """Solve in place for b (4, m) with the factors of _lu4."""
    m = b.shape[1]
    for k in range(4):
        p = piv[k]
        if p != k:
            for c in range(m):
                tmp = b[k, c]
                b[k, c] = b[p, c]
                b[p, c] = tmp
    for i in range(1, 4):
        for k in range(i):
            f = M[i, k]
            for c in range(m):
                b[i, c] -= f * b[k, c]
    for i in range(3, -1, -1):
        for k in range(i + 1, 4):
            f = M[i, k]
            for c in range(m):
                b[i, c] -= f * b[k, c]
        d = M[i, i]
        for c in range(m):
            b[i, c] /= d


@njit(**_JIT)
def _cycle_lu(E, C, M, piv, rhs):
    """A = E_1 E_N ... E_2 (C (2, 4, 5) scratch); LU of I - A[:, :4] into M, piv; rhs[:, 0] = A[:, 4]."""
    N = E.shape[0]
    src = _C0
    if N == 1:
        for i in range(4):
            for j in range(5):
                C[0, i, j] = E[0, i, j]
    else:
        for i in range(4):
            for j in range(5):
                C[0, i, j] = E[1, i, j]
        for k in range(2, N + 1):
            _mm4(E, k if k < N else 0, C, src, 1 - src)
            src = 1 - src
    for i in range(4):
        for j in range(4):
            M[i, j] = -C[src, i, j]
        M[i, i] += 1.0
        rhs[i, 0] = C[src, i, 4]
    _lu4(M, piv)


@njit(**_JIT)
def _steady_forward(E, out, t, C, M, piv, rhs):
    """out[t] (N,) complex: the periodic steady state of E (N, 4, 5) and its sweep."""
    N = E.shape[0]
    _cycle_lu(E, C, M, piv, rhs)
    _lusolve4(M, piv, rhs)
    x0 = rhs[0, 0]
    x1 = rhs[1, 0]
    x2 = rhs[2, 0]
    x3 = rhs[3, 0]
    out[t, 0] = complex(x0, x1)
    for k in range(1, N):
        y0 = E[k, 0, 0] * x0 + E[k, 0, 1] * x1 + E[k, 0, 2] * x2 + E[k, 0, 3] * x3 + E[k, 0, 4]
        y1 = E[k, 1, 0] * x0 + E[k, 1, 1] * x1 + E[k, 1, 2] * x2 + E[k, 1, 3] * x3 + E[k, 1, 4]
        y2 = E[k, 2, 0] * x0 + E[k, 2, 1] * x1 + E[k, 2, 2] * x2 + E[k, 2, 3] * x3 + E[k, 2, 4]
        y3 = E[k, 3, 0] * x0 + E[k, 3, 1] * x1 + E[k, 3, 2] * x2 + E[k, 3, 3] * x3 + E[k, 3, 4]
        x0 = y0
        x1 = y1
        x2 = y2
        x3 = y3
        out[t, k] = complex(x0, x1)


@njit(**_JIT)
def _tangent_step(E, dE, k, S, ks, dS, x, z):
    """dS[z] = E[k][:, :4] dS[x] + dE[k][:, :4] S[ks] + dE[k][:, 4] (8 tangents)."""
    for r in range(4):
        acc = _vld(dE, k, r, 4)
        for c in range(4):
            acc = _vfma2(acc, _vld2(dS, x, c), E[k, r, c], S[ks, c], _vld(dE, k, r, c))
        _vst2(dS, z, r, acc)


@njit(**_JIT)
def _steady_jacobian(E, dE, out, J, t, S, dS, C, M, piv, rhs):
    """out[t] (N,) and J[t] (N, 8) from E, dE (the tangent sweep of the module docstring).

    S (N, 4), dS (2, 4, 8) scratch.
    """
    N = E.shape[0]
    _cycle_lu(E, C, M, piv, rhs)
    _lusolve4(M, piv, rhs)
    for r in range(4):
        S[0, r] = rhs[r, 0]
    for k in range(1, N):
        for r in range(4):
            S[k, r] = (E[k, r, 0] * S[k - 1, 0] + E[k, r, 1] * S[k - 1, 1] + E[k, r, 2] * S[k - 1, 2]
                       + E[k, r, 3] * S[k - 1, 3] + E[k, r, 4])
    for k in range(N):
        out[t, k] = complex(S[k, 0], S[k, 1])
    # particular solution from dS_1 = 0; r = E_1 dS_N + dE_1 S_N; dS_1 = (I - A)^-1 r
    for r in range(4):
        for p in range(NT):
            dS[0, r, p] = 0.0
    x = _C0
    for k in range(1, N):
        _tangent_step(E, dE, k, S, k - 1, dS, x, 1 - x)
        x = 1 - x
    _tangent_step(E, dE, _C0, S, N - 1, dS, x, 1 - x)
    x = 1 - x
    _lusolve4(M, piv, dS[x])
    for p in range(NT):
        J[t, 0, p] = complex(dS[x, 0, p], dS[x, 1, p])
    for k in range(1, N):
        _tangent_step(E, dE, k, S, k - 1, dS, x, 1 - x)
        x = 1 - x
        for p in range(NT):
            J[t, k, p] = complex(dS[x, 0, p], dS[x, 1, p])


# =========================================================================== parallel kernels
@njit(**_PJIT)
def _simulate_kernel(theta, alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph, out, items):
    """Fingerprints of all tissues; ``items`` contiguous chunks of tissues are
    handed dynamically to the threads, each with private scratch."""
    n = theta.shape[0]
    N = alpha.shape[0]
    for c in prange(items):
        E = np.empty((N, 4, 5))
        W = np.empty((NSLOT, 5, 6))
        fp = np.empty(14)
        Q = np.empty((4, 5))
        C = np.empty((2, 4, 5))
        M = np.empty((4, 4))
        piv = np.empty(4, dtype=np.int64)
        rhs = np.empty((4, 1))
        for t in range((c * n) // items, ((c + 1) * n) // items):
            _build_E(theta[t], alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph,
                     0, N, E, W, fp, Q)
            _steady_forward(E, out, t, C, M, piv, rhs)


@njit(**_PJIT)
def _jacobian_kernel(theta, alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph, out, J, items):
    """Fingerprints and Jacobians of all tissues (chunks as in _simulate_kernel)."""
    n = theta.shape[0]
    N = alpha.shape[0]
    for c in prange(items):
        E = np.empty((N, 4, 5))
        dE = np.empty((N, 4, 5, NT))
        W = np.empty((NSLOT, 5, 6))
        D = np.empty((NSLOT, 5, 6, NT))
        fp = np.empty(14)
        dfp = np.empty((14, NT))
        Q = np.empty((4, 5))
        dQ = np.empty((1, 4, 5, NT))
        S = np.empty((N, 4))
        dS = np.empty((2, 4, NT))
        C = np.empty((2, 4, 5))
        M = np.empty((4, 4))
        piv = np.empty(4, dtype=np.int64)
        rhs = np.empty((4, 1))
        for t in range((c * n) // items, ((c + 1) * n) // items):
            _build_dE(theta[t], alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph,
                      0, N, E, dE, W, D, fp, dfp, Q, dQ)
            _steady_jacobian(E, dE, out, J, t, S, dS, C, M, piv, rhs)


enable_source_cache(_simulate_kernel)
enable_source_cache(_jacobian_kernel)


# =========================================================================== Python API
class _SeqArrays:
    """Per-sequence arrays for the kernels (tissue independent).

    All are fresh, writable, C-contiguous copies, so that the kernels always
    see the same argument types (one compiled specialisation).
    """

    __slots__ = ("alpha", "aabs", "w1", "TRF", "logTRF", "tfp", "kind", "phi")

    def __init__(self, seq):
        alpha = np.array(seq.alpha, dtype=np.float64, order="C")
        TRF = np.array(seq.TRF, dtype=np.float64, order="C")
        kinds = np.array([_KINDS[g] for g in seq.grad_moment], dtype=np.int64)
        tfp = (seq.TR - TRF) / 2.0
        tfp[kinds == 1] = seq.TR / 2.0  # crushed pulse: instantaneous for the free pool
        self.alpha = alpha
        self.aabs = np.abs(alpha)
        self.w1 = alpha / TRF
        self.TRF = TRF
        self.logTRF = np.log(TRF)
        self.tfp = tfp
        self.kind = kinds
        self.phi = float(seq.rf_phase_increment)


_SEQ_CACHE = {}
_TABLE_CACHE = {}


def prepare_sequence(sequence):
    """Tissue-independent arrays of ``sequence`` (cached by its hash)."""
    key = sequence.sha256()
    arr = _SEQ_CACHE.get(key)
    if arr is None:
        if len(_SEQ_CACHE) > 16:
            _SEQ_CACHE.clear()
        arr = _SEQ_CACHE[key] = _SeqArrays(sequence)
    return arr


def _table():
    """(rho, log_tau0, dlog_tau, phi0, dphi) of the shipped R2sl table."""
    t = load_r2sl_table()
    args = _TABLE_CACHE.get(id(t))
    if args is None or args[0] is not t:
        args = (t, (np.array(t.rho, dtype=np.float64, order="C"), float(t.log_tau0), float(t.dlog_tau),
                    float(t.phi0), float(t.dphi)))
        _TABLE_CACHE.clear()
        _TABLE_CACHE[id(t)] = args
    return args[1]


def _theta(theta):
    th = np.array(theta, dtype=np.float64, order="C", ndmin=2)
    if th.ndim != 2 or th.shape[1] != NT:
        raise ValueError(f"theta must have shape (n_samples, {NT}), got {np.shape(theta)}")
    return th


@contextlib.contextmanager
def _slp_vectorize():
    """Enable LLVM's SLP vectorizer while our kernels are compiled.

    numba disables SLP vectorization by default (numba PR #8852, after LLVM
    miscompilations); it is what turns the 8-tuple tangent arithmetic and the
    6-wide matrix rows of this module into AVX code (measured: Jacobians 2.5x,
    fingerprints 1.7x faster than without). It is switched on only while the
    kernels of this module are compiled (holding numba's global compiler
    lock, so no other compilation sees it); the result is cached on disk. The
    tests compare against the torch backend to ~1e-10 and against
    scipy's expm / expm_frechet, which would catch a miscompilation.
    """
    from numba.core import config
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        old = config.SLP_VECTORIZE
        config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            config.SLP_VECTORIZE = old


def _call(kernel, *args):
    sig = tuple(numba.typeof(a) for a in args)
    if sig not in kernel.overloads:  # first call in this process: compile, or load the disk cache
        with _slp_vectorize():
            kernel.compile(sig)
    kernel(*args)


#: Tissues per thread below which a call runs on the calling thread only:
#: for small batches, waking the pool costs more than it saves, and on a busy
#: machine a parallel region can wait a scheduler tick (4-8 ms) for a
#: descheduled worker.
_MIN_PER_THREAD_SIM = 4
_MIN_PER_THREAD_JAC = 1


def _launch(kernel, n, min_per_thread, args):
    nth = numba.get_num_threads()
    if nth > 1 and n >= min_per_thread * nth:
        # a few chunks per thread, handed out dynamically (load balance when
        # a thread is descheduled); each chunk allocates its scratch once
        chunksize = numba.get_parallel_chunksize()
        try:  # thread-local setting
            numba.set_parallel_chunksize(1)
            _call(kernel, *args, min(n, 4 * nth))
        finally:
            numba.set_parallel_chunksize(chunksize)
        return
    try:  # thread-local setting: no parallel region, no wake-up of the pool
        numba.set_num_threads(1)
        _call(kernel, *args, 1)
    finally:
        numba.set_num_threads(nth)


def simulate_numba(sequence, theta):
    """Fingerprints (n, n_pulses) complex128 at M0 = 1 (see ``physics.simulate``).

    ``theta`` (n, 8) float64 in ``PARAMETERS`` order; no validation here
    (``physics.simulate`` validates).
    """
    th = _theta(theta)
    s = prepare_sequence(sequence)
    out = np.empty((th.shape[0], s.alpha.shape[0]), dtype=np.complex128)
    _launch(_simulate_kernel, th.shape[0], _MIN_PER_THREAD_SIM,
            (th, s.alpha, s.aabs, s.w1, s.TRF, s.logTRF, s.tfp, s.kind, s.phi, *_table(), out))
    return out


def jacobian_numba(sequence, theta):
    """Fingerprints (n, N) and exact Jacobians (n, N, 8), complex128, M0 = 1.

    ``J[t, i, p] = d signal[t, i] / d theta[t, p]`` (per SI unit).
    """
    th = _theta(theta)
    s = prepare_sequence(sequence)
    n, N = th.shape[0], s.alpha.shape[0]
    out = np.empty((n, N), dtype=np.complex128)
    J = np.empty((n, N, NT), dtype=np.complex128)
    _launch(_jacobian_kernel, n, _MIN_PER_THREAD_JAC,
            (th, s.alpha, s.aabs, s.w1, s.TRF, s.logTRF, s.tfp, s.kind, s.phi, *_table(), out, J))
    return out, J


def warmup():
    """Compile (or load from numba's on-disk cache) both kernels; returns seconds.

    The first call in a fresh environment compiles for ~20 s; afterwards each
    new process loads the cache in ~0.3 s.
    """
    t0 = time.perf_counter()
    seq = Sequence(np.full(4, 0.3), np.full(4, 3e-4), 3.5e-3)
    th = np.array([[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 0.0, 1.0]])
    simulate_numba(seq, th)
    jacobian_numba(seq, th)
    return time.perf_counter() - t0
