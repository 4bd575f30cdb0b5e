"""Fused CPU kernel (numba) for generalized-Bloch MT fingerprints and Jacobians.

This is the ``"numba"`` backend of :mod:`sklearn_crb.physics`; it computes the
same discrete model as the torch reference backend (``gbloch_spec.md`` §1-3,
§8), tissue by tissue, in one compiled, multi-threaded loop:

* per pulse, the R2sl lookup (the identical bilinear interpolant of
  :mod:`sklearn_crb.r2sl`, with its exact, piecewise-constant partials);
* the pulse propagator ``P = expm(H TRF)`` of the 5x5 Bloch-McConnell core
  plus its affine column, by scaling and squaring of the degree-18 Taylor
  polynomial of Bader, Blanes & Casas (2019) (5 products; the number of
  squarings ``s = ceil(log2(||H TRF||_1 / 1.0909))`` is the minimal one for a
  double-precision truncation error, as in ``torch.linalg.matrix_exp``); the
  affine 6x6 matrices are stored as 5x6 blocks with a scalar corner;
* the closed-form free precession (spec §8.1) and the crushed inversion
  pulse ``U_c`` (or the ``spoiler_dual`` / ``spoiler_prepulse`` projections);
* the per-TR map ``E_i = F_i P_i R(phi) F_i`` reduced to the 4 states that
  survive the ``D_xs`` projection ``(xf, yf, zf, zs)`` plus the constant,
  the cycle product ``A = E_1 E_N ... E_2``, the periodic steady state
  ``(I - A) m = a`` (4x4 LU with partial pivoting; the xs row of the spec's 5x5
  system is identically zero) and the sweep ``S_i = E_i S_{i-1}``.

The Jacobian carries 8 tangents (one per parameter of ``theta``) through the
*same* algorithm: dual-number (forward-mode) differentiation of the Taylor
polynomial and of every squaring (Al-Mohy & Higham's approach to the Fréchet
derivative, with ``s`` chosen from ``||H||`` alone), with ``dH`` of spec §3
(including the R2sl partials for T2s and B1); analytic derivatives of the
closed-form free precession and of ``U_c``; and the tangent sweep of spec §3
("cheaper but equivalent"): ``dS_i = E_i dS_{i-1} + dE_i S_{i-1}`` from
``dS_1 = 0``, ``r = E_1 dS_N + dE_1 S_N``, ``dS_1 = (I - A)^-1 r`` and a
second sweep. The 8 tangents are the innermost, contiguous axis of every
tangent array and are handled as 8-tuples, which LLVM's SLP vectorizer turns
into AVX instructions (enabled for these kernels only, see
:func:`_slp_vectorize`).

Cost per tissue on the 1142-pulse v3.2 sequence, one core of the 2-core
Xeon (Sapphire Rapids, AVX-512) this was developed on: ~0.47 ms per
fingerprint, ~3.6 ms per Jacobian (both kernels: ~3800 fingerprints/s and
~490 Jacobians + CRBs/s on 2 cores, ``benchmarks/bench_simulator.py``). The
first call compiles (~20 s) and writes numba's on-disk cache
(``cache=True``); later processes load it in ~0.3 s (:func:`warmup`).

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
import math

import numba
import numpy as np
from numba import njit, prange

from sklearn_crb.physics.r2sl.table import rho_bilinear

__all__ = ["simulate_numba", "jacobian_numba", "prepare_sequence", "warmup"]

NT = 8  # number of tangents = len(PARAMETERS)

# Degree-18 Taylor approximation with 5 matrix products (Bader, Blanes & Casas,
# Mathematics 7, 1174 (2019)); rows: q31, q61, q62, q63, q64; columns:
# I, A, A^2, A^3, A^6.  T18(A) = q61 + (q62 + q91) q91, q91 = q31 q64 + q63.
_B18 = np.array(
    [
        [0.0, -1.00365581030144618291e-01, -8.02924648241156932449e-03, -8.92138498045729985177e-04, 0.0],
        [0.0, 3.97849749499645077844e-01, 1.36783778460411720168e00, 4.98289622525382669416e-01,
         -6.37898194594723280150e-04],
        [-1.09676396052962061844e01, 1.68015813878906206114e00, 5.71779846478865511061e-02,
         -6.98210122488052056106e-03, 3.34975017086070470649e-05],
        [-9.04316832390810593223e-02, -6.76404519071381882256e-02, 6.75961301770459654925e-02,
         2.95552570429315521194e-02, -1.39180257516060693404e-05],
        [0.0, 0.0, -9.23364619367118555360e-02, -1.69364939002081722752e-02, -1.40086798182036094347e-05],
    ]
)
_THETA18 = 1.090863719290036  # backward error <= 2^-53 for ||A||_1 <= theta (double)

_KINDS = {"balanced": 0, "crusher": 1, "spoiler_dual": 2, "spoiler_prepulse": 3}

_JIT = dict(fastmath=False, error_model="numpy", nogil=True)
_PJIT = dict(_JIT, parallel=True, cache=True)
_INL = dict(error_model="numpy", fastmath=False, inline="always")

# Taylor-18 coefficients as module-level scalars (compile-time constants)
(_a01, _a11, _a21, _a31, _a61) = _B18[0]
(_b01, _b11, _b21, _b31, _b61) = _B18[1]
(_b02, _b12, _b22, _b32, _b62) = _B18[2]
(_b03, _b13, _b23, _b33, _b63) = _B18[3]
(_b04, _b14, _b24, _b34, _b64) = _B18[4]
_C91 = _b03  # corner of q91 = q31 q64 + q63 (q31 has corner 0)
_CEXP = _b01 + (_b02 + _C91) * _C91  # corner of T18 (= 1 up to rounding)


# =========================================================================== R2sl
# the one bilinear lookup of r2sl.py, compiled for the kernel
_rho_bilinear = njit(**_JIT)(rho_bilinear)


@njit(**_JIT)
def _r2sl(log_tau, phi, T2s, aabs, rho, lt0, dlt, ph0, dph):
    """R2sl, dR2sl/dT2s, dR2sl/dB1: the bilinear (log tau, phi) lookup of
    :class:`sklearn_crb.r2sl.R2slTable` (same formula, same cell selection;
    out-of-range points are extrapolated from the edge cells, the range is
    validated by ``physics``)."""
    val, rho_lt, rho_phi = _rho_bilinear(log_tau, phi, lt0, dlt, ph0, dph, rho)
    R = val / T2s
    dT = -(rho_lt + val) / (T2s * T2s)
    dB = rho_phi * aabs / T2s
    return R, dT, dB


# =========================================================================== SIMD helpers
# The 8 tangents of a matrix entry live in the contiguous last axis of the
# tangent arrays. These small functions (inlined by LLVM) load them into an
# 8-tuple, combine tuples and store them; keeping loads, arithmetic and stores
# in separate groups lets LLVM's SLP vectorizer emit AVX instructions for
# them (see ``_slp_vectorize``). Rows of the 5x6 value blocks are 6-tuples.
# All scratch matrices are slots of one array indexed by integers (no array
# views in the hot loops: a view costs two atomic reference-count updates).


@njit(**_INL)
def _vld(a, s, i, j):
    return (a[s, i, j, 0], a[s, i, j, 1], a[s, i, j, 2], a[s, i, j, 3],
            a[s, i, j, 4], a[s, i, j, 5], a[s, i, j, 6], a[s, i, j, 7])


@njit(**_INL)
def _vst(a, s, i, j, v):
    a[s, i, j, 0] = v[0]
    a[s, i, j, 1] = v[1]
    a[s, i, j, 2] = v[2]
    a[s, i, j, 3] = v[3]
    a[s, i, j, 4] = v[4]
    a[s, i, j, 5] = v[5]
    a[s, i, j, 6] = v[6]
    a[s, i, j, 7] = v[7]


@njit(**_INL)
def _vld2(a, s, i):
    return (a[s, i, 0], a[s, i, 1], a[s, i, 2], a[s, i, 3], a[s, i, 4], a[s, i, 5], a[s, i, 6], a[s, i, 7])


@njit(**_INL)
def _vst2(a, s, i, v):
    a[s, i, 0] = v[0]
    a[s, i, 1] = v[1]
    a[s, i, 2] = v[2]
    a[s, i, 3] = v[3]
    a[s, i, 4] = v[4]
    a[s, i, 5] = v[5]
    a[s, i, 6] = v[6]
    a[s, i, 7] = v[7]


@njit(**_INL)
def _vld1(a, i):
    return (a[i, 0], a[i, 1], a[i, 2], a[i, 3], a[i, 4], a[i, 5], a[i, 6], a[i, 7])


@njit(**_INL)
def _vmul(u, y):
    """u * y (tuple times scalar)."""
    return (u[0] * y, u[1] * y, u[2] * y, u[3] * y, u[4] * y, u[5] * y, u[6] * y, u[7] * y)


@njit(**_INL)
def _vadd(u, w):
    return (u[0] + w[0], u[1] + w[1], u[2] + w[2], u[3] + w[3], u[4] + w[4], u[5] + w[5], u[6] + w[6],
            u[7] + w[7])


@njit(**_INL)
def _vaxpy(acc, u, y):
    """acc + u * y."""
    return (acc[0] + u[0] * y, acc[1] + u[1] * y, acc[2] + u[2] * y, acc[3] + u[3] * y,
            acc[4] + u[4] * y, acc[5] + u[5] * y, acc[6] + u[6] * y, acc[7] + u[7] * y)


@njit(**_INL)
def _vmul2(u, y, x, w):
    """u * y + x * w (u, w tuples; y, x scalars)."""
    return (u[0] * y + x * w[0], u[1] * y + x * w[1], u[2] * y + x * w[2], u[3] * y + x * w[3],
            u[4] * y + x * w[4], u[5] * y + x * w[5], u[6] * y + x * w[6], u[7] * y + x * w[7])


@njit(**_INL)
def _vfma2(acc, u, y, x, w):
    """acc + u * y + x * w."""
    return (acc[0] + u[0] * y + x * w[0], acc[1] + u[1] * y + x * w[1], acc[2] + u[2] * y + x * w[2],
            acc[3] + u[3] * y + x * w[3], acc[4] + u[4] * y + x * w[4], acc[5] + u[5] * y + x * w[5],
            acc[6] + u[6] * y + x * w[6], acc[7] + u[7] * y + x * w[7])


@njit(**_INL)
def _vlc(c1, u1, c2, u2, c3, u3, c4, u4):
    """c1 u1 + c2 u2 + c3 u3 + c4 u4."""
    return (c1 * u1[0] + c2 * u2[0] + c3 * u3[0] + c4 * u4[0], c1 * u1[1] + c2 * u2[1] + c3 * u3[1] + c4 * u4[1],
            c1 * u1[2] + c2 * u2[2] + c3 * u3[2] + c4 * u4[2], c1 * u1[3] + c2 * u2[3] + c3 * u3[3] + c4 * u4[3],
            c1 * u1[4] + c2 * u2[4] + c3 * u3[4] + c4 * u4[4], c1 * u1[5] + c2 * u2[5] + c3 * u3[5] + c4 * u4[5],
            c1 * u1[6] + c2 * u2[6] + c3 * u3[6] + c4 * u4[6], c1 * u1[7] + c2 * u2[7] + c3 * u3[7] + c4 * u4[7])


@njit(**_INL)
def _rld(a, s, i):
    return (a[s, i, 0], a[s, i, 1], a[s, i, 2], a[s, i, 3], a[s, i, 4], a[s, i, 5])


@njit(**_INL)
def _rst(a, s, i, r):
    a[s, i, 0] = r[0]
    a[s, i, 1] = r[1]
    a[s, i, 2] = r[2]
    a[s, i, 3] = r[3]
    a[s, i, 4] = r[4]
    a[s, i, 5] = r[5]


@njit(**_INL)
def _rlc(c1, u1, c2, u2, c3, u3, c4, u4):
    """c1 u1 + c2 u2 + c3 u3 + c4 u4 for 6-tuples."""
    return (c1 * u1[0] + c2 * u2[0] + c3 * u3[0] + c4 * u4[0], c1 * u1[1] + c2 * u2[1] + c3 * u3[1] + c4 * u4[1],
            c1 * u1[2] + c2 * u2[2] + c3 * u3[2] + c4 * u4[2], c1 * u1[3] + c2 * u2[3] + c3 * u3[3] + c4 * u4[3],
            c1 * u1[4] + c2 * u2[4] + c3 * u3[4] + c4 * u4[4], c1 * u1[5] + c2 * u2[5] + c3 * u3[5] + c4 * u4[5])


# =========================================================================== affine 5x6 algebra
# An affine 6x6 matrix [[M, v], [0, c]] is stored as a 5x6 block [M, v] plus
# its scalar corner c (a constant: 0 for powers of H, 1 for exponentials).
# Value blocks are W[slot] (W: (NSLOT, 5, 6)), tangents D[slot] (NSLOT, 5, 6, 8).
# (numpy int64 constants, so that numba does not specialise functions on
# literal slot numbers)
_A, _A2, _A3, _A6, _Q31, _Q61, _Q62, _Q63, _Q64, _T, _P = (np.int64(k) for k in range(11))
NSLOT = 11
_C0, _C1, _C2, _C4, _C5 = (np.int64(k) for k in (0, 1, 2, 4, 5))


@njit(**_JIT)
def _mm(W, x, y, cy, z):
    """W[z] = W[x] @ W[y] (affine blocks; W[y] has corner cy; z != x, y)."""
    y00, y01, y02, y03, y04, y05 = _rld(W, y, 0)
    y10, y11, y12, y13, y14, y15 = _rld(W, y, 1)
    y20, y21, y22, y23, y24, y25 = _rld(W, y, 2)
    y30, y31, y32, y33, y34, y35 = _rld(W, y, 3)
    y40, y41, y42, y43, y44, y45 = _rld(W, y, 4)
    for i in range(5):
        x0, x1, x2, x3, x4, x5 = _rld(W, x, i)
        _rst(W, z, i, (x0 * y00 + x1 * y10 + x2 * y20 + x3 * y30 + x4 * y40,
                       x0 * y01 + x1 * y11 + x2 * y21 + x3 * y31 + x4 * y41,
                       x0 * y02 + x1 * y12 + x2 * y22 + x3 * y32 + x4 * y42,
                       x0 * y03 + x1 * y13 + x2 * y23 + x3 * y33 + x4 * y43,
                       x0 * y04 + x1 * y14 + x2 * y24 + x3 * y34 + x4 * y44,
                       x0 * y05 + x1 * y15 + x2 * y25 + x3 * y35 + x4 * y45 + x5 * cy))


@njit(**_JIT)
def _dmm(W, D, x, y, cy, z):
    """W[z] = W[x] @ W[y] and D[z] = D[x] @ W[y] + W[x] @ D[y] (8 tangents)."""
    _mm(W, x, y, cy, z)
    for i in range(5):
        for j in range(6):
            acc = _vmul(_vld(D, x, i, 5), cy if j == 5 else 0.0)
            for k in range(5):
                acc = _vfma2(acc, _vld(D, x, i, k), W[y, k, j], W[x, i, k], _vld(D, y, k, j))
            _vst(D, z, i, j, acc)


@njit(**_JIT)
def _n_squarings(W, s):
    """Squarings for Taylor-18 from the 1-norm of the affine 6x6 [[W[s]], [0]]."""
    nrm = 0.0
    for j in range(6):
        c = abs(W[s, 0, j]) + abs(W[s, 1, j]) + abs(W[s, 2, j]) + abs(W[s, 3, j]) + abs(W[s, 4, j])
        if c > nrm:
            nrm = c
    if nrm <= _THETA18:
        return 0
    return int(math.ceil(math.log2(nrm / _THETA18)))


@njit(**_JIT)
def _taylor18_combinations(W):
    """q31, q61..q64 from A, A^2, A^3, A^6 (slots)."""
    for i in range(5):
        a = _rld(W, _A, i)
        a2 = _rld(W, _A2, i)
        a3 = _rld(W, _A3, i)
        a6 = _rld(W, _A6, i)
        _rst(W, _Q31, i, _rlc(_a11, a, _a21, a2, _a31, a3, 0.0, a6))
        _rst(W, _Q61, i, _rlc(_b11, a, _b21, a2, _b31, a3, _b61, a6))
        _rst(W, _Q62, i, _rlc(_b12, a, _b22, a2, _b32, a3, _b62, a6))
        _rst(W, _Q63, i, _rlc(_b13, a, _b23, a2, _b33, a3, _b63, a6))
        _rst(W, _Q64, i, _rlc(_b14, a, _b24, a2, _b34, a3, _b64, a6))
        W[_Q61, i, i] += _b01
        W[_Q62, i, i] += _b02
        W[_Q63, i, i] += _b03
        W[_Q64, i, i] += _b04


@njit(**_JIT)
def _expm(W):
    """W[_P] = expm([[W[_A]], [0]]) (corner 1); W[_A] is overwritten (scaled).

    Scaling and squaring of the Taylor-18 polynomial, the minimal number of
    squarings for ||A||_1 <= 1.0909 after scaling.
    """
    s = _n_squarings(W, _A)
    if s > 0:
        sc = 0.5**s
        for i in range(5):
            for j in range(6):
                W[_A, i, j] *= sc
    _mm(W, _A, _A, 0.0, _A2)
    _mm(W, _A2, _A, 0.0, _A3)
    _mm(W, _A3, _A3, 0.0, _A6)
    _taylor18_combinations(W)
    _mm(W, _Q31, _Q64, _b04, _A2)  # q91 = q31 @ q64 + q63 -> slot A2
    for i in range(5):
        for j in range(6):
            W[_A2, i, j] += W[_Q63, i, j]
            W[_T, i, j] = W[_Q62, i, j] + W[_A2, i, j]
    # T18 = q61 + (q62 + q91) @ q91, then s squarings (ping-pong A3 <-> A6)
    res = _P if s == 0 else _A3
    _mm(W, _T, _A2, _C91, res)
    for i in range(5):
        for j in range(6):
            W[res, i, j] += W[_Q61, i, j]
    c = _CEXP
    src = _A3
    dst = _A6
    for k in range(s):
        if k == s - 1:
            dst = _P
        _mm(W, src, src, c, dst)
        c = c * c
        tmp = src
        src = dst
        dst = tmp


@njit(**_JIT)
def _dexpm(W, D):
    """W[_P] = expm(W[_A]) and D[_P][..., p] = its derivative along D[_A][..., p].

    Forward-mode (dual-number) differentiation of the scaling-and-squaring
    Taylor-18 algorithm itself, the number of squarings chosen from ||A||
    alone (as for the value; Al-Mohy & Higham, SIMAX 30, 2009).
    """
    s = _n_squarings(W, _A)
    if s > 0:
        sc = 0.5**s
        for i in range(5):
            for j in range(6):
                W[_A, i, j] *= sc
                _vst(D, _A, i, j, _vmul(_vld(D, _A, i, j), sc))
    _dmm(W, D, _A, _A, 0.0, _A2)
    _dmm(W, D, _A2, _A, 0.0, _A3)
    _dmm(W, D, _A3, _A3, 0.0, _A6)
    _taylor18_combinations(W)
    for i in range(5):
        for j in range(6):
            da = _vld(D, _A, i, j)
            da2 = _vld(D, _A2, i, j)
            da3 = _vld(D, _A3, i, j)
            da6 = _vld(D, _A6, i, j)
            _vst(D, _Q31, i, j, _vlc(_a11, da, _a21, da2, _a31, da3, 0.0, da6))
            _vst(D, _Q61, i, j, _vlc(_b11, da, _b21, da2, _b31, da3, _b61, da6))
            _vst(D, _Q62, i, j, _vlc(_b12, da, _b22, da2, _b32, da3, _b62, da6))
            _vst(D, _Q63, i, j, _vlc(_b13, da, _b23, da2, _b33, da3, _b63, da6))
            _vst(D, _Q64, i, j, _vlc(_b14, da, _b24, da2, _b34, da3, _b64, da6))
    _dmm(W, D, _Q31, _Q64, _b04, _A2)
    for i in range(5):
        for j in range(6):
            W[_A2, i, j] += W[_Q63, i, j]
            W[_T, i, j] = W[_Q62, i, j] + W[_A2, i, j]
            d = _vadd(_vld(D, _A2, i, j), _vld(D, _Q63, i, j))
            _vst(D, _A2, i, j, d)
            _vst(D, _T, i, j, _vadd(_vld(D, _Q62, i, j), d))
    res = _P if s == 0 else _A3
    _dmm(W, D, _T, _A2, _C91, res)
    for i in range(5):
        for j in range(6):
            W[res, i, j] += W[_Q61, i, j]
            _vst(D, res, i, j, _vadd(_vld(D, res, i, j), _vld(D, _Q61, i, j)))
    c = _CEXP
    src = _A3
    dst = _A6
    for k in range(s):
        if k == s - 1:
            dst = _P
        _dmm(W, D, src, src, c, dst)
        c = c * c
        tmp = src
        src = dst
        dst = tmp


# =========================================================================== free precession
@njit(**_JIT)
def _cosh_sinhc(q2):
    """cosh(sqrt(q2)), sinh(sqrt(q2))/sqrt(q2) and d[sinh(q)/q]/d(q2), q2 real."""
    if abs(q2) < 1e-2:
        ch = 1.0 + q2 * (1 / 2 + q2 * (1 / 24 + q2 * (1 / 720 + q2 * (1 / 40320 + q2 * (
            1 / 3628800 + q2 * (1 / 479001600))))))
        shc = 1.0 + q2 * (1 / 6 + q2 * (1 / 120 + q2 * (1 / 5040 + q2 * (1 / 362880 + q2 * (
            1 / 39916800 + q2 * (1 / 6227020800))))))
        g = 1 / 6 + q2 * (2 / 120 + q2 * (3 / 5040 + q2 * (4 / 362880 + q2 * (5 / 39916800 + q2 * (
            6 / 6227020800 + q2 * (7 / 1307674368000))))))
        return ch, shc, g
    if q2 > 0.0:
        q = math.sqrt(q2)
        ch = math.cosh(q)
        shc = math.sinh(q) / q
    else:
        q = math.sqrt(-q2)
        ch = math.cos(q)
        shc = math.sin(q) / q
    return ch, shc, (ch - shc) / (2.0 * q2)


@njit(**_JIT)
def _free_precession(t, phi, R2f, w0, La, Lb, Lc, Ld, zf_eq, zs_eq, fp):
    """Closed-form D_xs expm(H_fp t) (spec §8.1) into fp (14,).

    fp[0:4] = e^{-R2f t} R(phi + w0 t) (row-major 2x2, the phase-cycled
    rotation R(phi) F folded in), fp[4:8] = e^{-R2f t} R(w0 t),
    fp[8:12] = expm(L t) on (zf, zs), fp[12:14] = its affine part
    z_eq - expm(L t) z_eq.
    """
    e = math.exp(-R2f * t)
    c1 = e * math.cos(phi + w0 * t)
    s1 = e * math.sin(phi + w0 * t)
    c2 = e * math.cos(w0 * t)
    s2 = e * math.sin(w0 * t)
    fp[0] = c1
    fp[1] = -s1
    fp[2] = s1
    fp[3] = c1
    fp[4] = c2
    fp[5] = -s2
    fp[6] = s2
    fp[7] = c2
    a = La * t
    b = Lb * t
    c = Lc * t
    d = Ld * t
    hd = 0.5 * (a - d)
    ch, shc, g = _cosh_sinhc(hd * hd + b * c)
    ex = math.exp(0.5 * (a + d))
    z00 = ex * (ch + hd * shc)
    z01 = ex * b * shc
    z10 = ex * c * shc
    z11 = ex * (ch - hd * shc)
    fp[8] = z00
    fp[9] = z01
    fp[10] = z10
    fp[11] = z11
    fp[12] = zf_eq - z00 * zf_eq - z01 * zs_eq
    fp[13] = zs_eq - z10 * zf_eq - z11 * zs_eq


@njit(**_JIT)
def _dfree_precession(t, phi, m0s, R1f, R2f, Rex, R1s, w0, fp, dfp):
    """_free_precession plus its tangents dfp (14, NT) w.r.t. theta."""
    m0f = 1.0 - m0s
    for k in range(14):
        for p in range(NT):
            dfp[k, p] = 0.0
    e = math.exp(-R2f * t)
    cs1 = math.cos(phi + w0 * t)
    sn1 = math.sin(phi + w0 * t)
    cs2 = math.cos(w0 * t)
    sn2 = math.sin(w0 * t)
    fp[0] = e * cs1
    fp[1] = -e * sn1
    fp[2] = e * sn1
    fp[3] = e * cs1
    fp[4] = e * cs2
    fp[5] = -e * sn2
    fp[6] = e * sn2
    fp[7] = e * cs2
    for k in range(8):  # d/dR2f = -t * value
        dfp[k, 2] = -t * fp[k]
    et = e * t  # d/dw0
    dfp[0, 6] = -et * sn1
    dfp[1, 6] = -et * cs1
    dfp[2, 6] = et * cs1
    dfp[3, 6] = -et * sn1
    dfp[4, 6] = -et * sn2
    dfp[5, 6] = -et * cs2
    dfp[6, 6] = et * cs2
    dfp[7, 6] = -et * sn2
    # (zf, zs): M = L t, tangents dM = dL t for m0s (0), R1f (1), Rex (3), R1s (4)
    a = (-R1f - Rex * m0s) * t
    b = Rex * m0f * t
    c = Rex * m0s * t
    d = (-R1s - Rex * m0f) * t
    hd = 0.5 * (a - d)
    q2 = hd * hd + b * c
    ch, shc, g = _cosh_sinhc(q2)
    ex = math.exp(0.5 * (a + d))
    z00 = ex * (ch + hd * shc)
    z01 = ex * b * shc
    z10 = ex * c * shc
    z11 = ex * (ch - hd * shc)
    zf_eq = m0f
    zs_eq = m0s
    fp[8] = z00
    fp[9] = z01
    fp[10] = z10
    fp[11] = z11
    fp[12] = zf_eq - z00 * zf_eq - z01 * zs_eq
    fp[13] = zs_eq - z10 * zf_eq - z11 * zs_eq
    # tangents of (a, b, c, d) for parameters 0 (m0s), 1 (R1f), 3 (Rex), 4 (R1s)
    for p in (0, 1, 3, 4):
        if p == 0:
            da = -Rex * t
            db = -Rex * t
            dc = Rex * t
            dd = Rex * t
            dzf = -1.0
            dzs = 1.0
        elif p == 1:
            da = -t
            db = 0.0
            dc = 0.0
            dd = 0.0
            dzf = 0.0
            dzs = 0.0
        elif p == 3:
            da = -m0s * t
            db = m0f * t
            dc = m0s * t
            dd = -m0f * t
            dzf = 0.0
            dzs = 0.0
        else:
            da = 0.0
            db = 0.0
            dc = 0.0
            dd = -t
            dzf = 0.0
            dzs = 0.0
        dhd = 0.5 * (da - dd)
        dq2 = 2.0 * hd * dhd + db * c + b * dc
        dch = 0.5 * shc * dq2
        dshc = g * dq2
        dex = ex * 0.5 * (da + dd)
        d00 = dex * (ch + hd * shc) + ex * (dch + dhd * shc + hd * dshc)
        d01 = dex * b * shc + ex * (db * shc + b * dshc)
        d10 = dex * c * shc + ex * (dc * shc + c * dshc)
        d11 = dex * (ch - hd * shc) + ex * (dch - dhd * shc - hd * dshc)
        dfp[8, p] = d00
        dfp[9, p] = d01
        dfp[10, p] = d10
        dfp[11, p] = d11
        dfp[12, p] = dzf - d00 * zf_eq - z00 * dzf - d01 * zs_eq - z01 * dzs
        dfp[13, p] = dzs - d10 * zf_eq - z10 * dzf - d11 * zs_eq - z11 * dzs


# =========================================================================== per-TR map
@njit(**_JIT)
def _assemble(W, fp, Q, E, k):
    """E[k] (4x5) = F P R(phi) F on (xf, yf, zf, zs | 1); P = W[_P], Q (4, 5) scratch.

    F's xs row and column vanish (D_xs), so only the P rows and columns of
    (xf, yf, zf, zs) and the affine column are needed.
    """
    for rr in range(4):
        r = rr if rr < 3 else 4
        p0 = W[_P, r, 0]
        p1 = W[_P, r, 1]
        p2 = W[_P, r, 2]
        p4 = W[_P, r, 4]
        Q[rr, 0] = p0 * fp[0] + p1 * fp[2]
        Q[rr, 1] = p0 * fp[1] + p1 * fp[3]
        Q[rr, 2] = p2 * fp[8] + p4 * fp[10]
        Q[rr, 3] = p2 * fp[9] + p4 * fp[11]
        Q[rr, 4] = p2 * fp[12] + p4 * fp[13] + W[_P, r, 5]
    for c in range(5):
        E[k, 0, c] = fp[4] * Q[0, c] + fp[5] * Q[1, c]
        E[k, 1, c] = fp[6] * Q[0, c] + fp[7] * Q[1, c]
        E[k, 2, c] = fp[8] * Q[2, c] + fp[9] * Q[3, c]
        E[k, 3, c] = fp[10] * Q[2, c] + fp[11] * Q[3, c]
    E[k, 2, 4] += fp[12]
    E[k, 3, 4] += fp[13]


@njit(**_JIT)
def _dassemble(W, D, fp, dfp, Q, dQ, E, dE, k):
    """_assemble with tangents into E[k], dE[k]. Q (4, 5), dQ (1, 4, 5, 8) scratch.

    fp[0:4] (R(phi) F, xy block) acts on P's columns (xf, yf); fp[8:12] (the
    z block) and fp[12:14] (its affine part) on the columns (zf, zs).
    """
    for rr in range(4):
        r = rr if rr < 3 else 4
        for c in range(5):
            if c < 2:  # Q[:, c] = P[:, 0] fp[c] + P[:, 1] fp[2 + c]
                ca = _C0
                cb = _C1
                fa = c
                fb = 2 + c
            else:  # zf, zs, affine: P[:, 2] fp[.] + P[:, 4] fp[.]
                ca = _C2
                cb = _C4
                fa = 6 + c if c < 4 else 12
                fb = 8 + c if c < 4 else 13
            pa = W[_P, r, ca]
            pb = W[_P, r, cb]
            q = pa * fp[fa] + pb * fp[fb]
            d = _vfma2(_vmul2(_vld(D, _P, r, ca), fp[fa], pa, _vld1(dfp, fa)), _vld(D, _P, r, cb), fp[fb], pb,
                       _vld1(dfp, fb))
            if c == 4:
                q += W[_P, r, 5]
                d = _vadd(d, _vld(D, _P, r, _C5))
            Q[rr, c] = q
            _vst(dQ, _C0, rr, c, d)
    # rows (xf, yf) <- Fr (fp[4:8]) @ Q[0:2];  rows (zf, zs) <- Z (fp[8:12]) @ Q[2:4] + b
    for row in range(4):
        q = 2 * (row // 2)
        o = 4 + 2 * row
        g0 = fp[o]
        g1 = fp[o + 1]
        dg0 = _vld1(dfp, o)
        dg1 = _vld1(dfp, o + 1)
        for c in range(5):
            qa = Q[q, c]
            qb = Q[q + 1, c]
            E[k, row, c] = g0 * qa + g1 * qb
            _vst(dE, k, row, c, _vfma2(_vmul2(dg0, qa, g0, _vld(dQ, _C0, q, c)), dg1, qb, g1, _vld(dQ, _C0, q + 1, c)))
        if row >= 2:
            E[k, row, 4] += fp[10 + row]
            _vst(dE, k, row, 4, _vadd(_vld(dE, k, row, 4), _vld1(dfp, 10 + row)))


# =========================================================================== pulses
@njit(**_JIT)
def _pulse_generator(W, w1, TRF, B1, w0, m0s, R1f, R2f, Rex, R1s, R2s):
    """W[_A] = H TRF (5x6, affine column last), spec §1."""
    m0f = 1.0 - m0s
    w = B1 * w1
    for i in range(5):
        for j in range(6):
            W[_A, i, j] = 0.0
    W[_A, 0, 0] = -R2f * TRF
    W[_A, 0, 1] = -w0 * TRF
    W[_A, 0, 2] = w * TRF
    W[_A, 1, 0] = w0 * TRF
    W[_A, 1, 1] = -R2f * TRF
    W[_A, 2, 0] = -w * TRF
    W[_A, 2, 2] = (-R1f - Rex * m0s) * TRF
    W[_A, 2, 4] = Rex * m0f * TRF
    W[_A, 2, 5] = R1f * m0f * TRF
    W[_A, 3, 3] = -R2s * TRF
    W[_A, 3, 4] = w * TRF
    W[_A, 4, 2] = Rex * m0s * TRF
    W[_A, 4, 3] = -w * TRF
    W[_A, 4, 4] = (-R1s - Rex * m0f) * TRF
    W[_A, 4, 5] = R1s * m0s * TRF


@njit(**_JIT)
def _zero_tangents(D, s):
    for i in range(5):
        for j in range(6):
            for p in range(NT):
                D[s, i, j, p] = 0.0


@njit(**_JIT)
def _pulse_generator_tangents(D, w1, TRF, m0s, R1f, Rex, R1s, dR2s_dT2s, dR2s_dB1):
    """D[_A][..., p] = dH/dtheta_p TRF (spec §3 'Per-parameter derivative of H', M0 = 1)."""
    m0f = 1.0 - m0s
    _zero_tangents(D, _A)
    # m0s
    D[_A, 2, 2, 0] = -Rex * TRF
    D[_A, 2, 4, 0] = -Rex * TRF
    D[_A, 2, 5, 0] = -R1f * TRF
    D[_A, 4, 2, 0] = Rex * TRF
    D[_A, 4, 4, 0] = Rex * TRF
    D[_A, 4, 5, 0] = R1s * TRF
    # R1f
    D[_A, 2, 2, 1] = -TRF
    D[_A, 2, 5, 1] = m0f * TRF
    # R2f
    D[_A, 0, 0, 2] = -TRF
    D[_A, 1, 1, 2] = -TRF
    # Rex
    D[_A, 2, 2, 3] = -m0s * TRF
    D[_A, 2, 4, 3] = m0f * TRF
    D[_A, 4, 2, 3] = m0s * TRF
    D[_A, 4, 4, 3] = -m0f * TRF
    # R1s
    D[_A, 4, 4, 4] = -TRF
    D[_A, 4, 5, 4] = m0s * TRF
    # T2s (through R2sl)
    D[_A, 3, 3, 5] = -dR2s_dT2s * TRF
    # omega0
    D[_A, 0, 1, 6] = -TRF
    D[_A, 1, 0, 6] = TRF
    # B1 (omega1 of both pools and R2sl)
    D[_A, 0, 2, 7] = w1 * TRF
    D[_A, 2, 0, 7] = -w1 * TRF
    D[_A, 3, 3, 7] = -dR2s_dB1 * TRF
    D[_A, 3, 4, 7] = w1 * TRF
    D[_A, 4, 3, 7] = -w1 * TRF


@njit(**_JIT)
def _crusher_generator(alpha, w1, TRF, B1, R2s, W):
    """W[_A] = the semi-solid block [[-R2sl, B1 w1], [-B1 w1, 0]] TRF of U_c."""
    for i in range(5):
        for j in range(6):
            W[_A, i, j] = 0.0
    W[_A, 3, 3] = -R2s * TRF
    W[_A, 3, 4] = B1 * w1 * TRF
    W[_A, 4, 3] = -B1 * w1 * TRF


@njit(**_JIT)
def _crusher_free_pool(alpha, B1, W):
    """Keep the semi-solid 2x2 block of W[_P]; free pool: xf <- sin^2(a/2) xf,
    yf <- -sin^2(a/2) yf, zf <- cos(a) zf (a = B1 alpha), no affine part."""
    a = B1 * alpha
    sa = math.sin(0.5 * a)
    for i in range(5):
        for j in range(6):
            if (i != 3 and i != 4) or (j != 3 and j != 4):
                W[_P, i, j] = 0.0
    W[_P, 0, 0] = sa * sa
    W[_P, 1, 1] = -sa * sa
    W[_P, 2, 2] = math.cos(a)


@njit(**_JIT)
def _crusher(alpha, w1, TRF, B1, R2s, W):
    """U_c (spec §1 ':crusher') into W[_P]: the refocused echo path of the free
    pool and the semi-solid saturation expm([[-R2sl, B1 w1], [-B1 w1, 0]] TRF)."""
    _crusher_generator(alpha, w1, TRF, B1, R2s, W)
    _expm(W)
    _crusher_free_pool(alpha, B1, W)


@njit(**_JIT)
def _dcrusher(alpha, w1, TRF, B1, R2s, dR2s_dT2s, dR2s_dB1, W, D):
    """_crusher with its tangents (only T2s and B1 act on U_c) into D[_P]."""
    _crusher_generator(alpha, w1, TRF, B1, R2s, W)
    _zero_tangents(D, _A)
    D[_A, 3, 3, 5] = -dR2s_dT2s * TRF
    D[_A, 3, 3, 7] = -dR2s_dB1 * TRF
    D[_A, 3, 4, 7] = w1 * TRF
    D[_A, 4, 3, 7] = -w1 * TRF
    _dexpm(W, D)
    _crusher_free_pool(alpha, B1, W)
    for i in range(5):
        for j in range(6):
            if (i != 3 and i != 4) or (j != 3 and j != 4):
                for p in range(NT):
                    D[_P, i, j, p] = 0.0
    a = B1 * alpha
    sa = math.sin(0.5 * a)
    ca = math.cos(0.5 * a)
    D[_P, 0, 0, 7] = sa * ca * alpha
    D[_P, 1, 1, 7] = -sa * ca * alpha
    D[_P, 2, 2, 7] = -math.sin(a) * alpha


@njit(**_JIT)
def _spoil(kind, W):
    """spoiler_dual: P <- D_xy P D_xy; spoiler_prepulse: P <- P D_xy (D_xy = diag(0,0,1,0,1,1))."""
    for i in range(5):
        for j in range(6):
            if j == 0 or j == 1 or j == 3 or (kind == 2 and (i == 0 or i == 1 or i == 3)):
                W[_P, i, j] = 0.0


@njit(**_JIT)
def _dspoil(kind, W, D):
    for i in range(5):
        for j in range(6):
            if j == 0 or j == 1 or j == 3 or (kind == 2 and (i == 0 or i == 1 or i == 3)):
                W[_P, i, j] = 0.0
                for p in range(NT):
                    D[_P, i, j, p] = 0.0


# =========================================================================== per tissue
@njit(**_JIT)
def _build_E(th, alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph,
             i0, i1, E, W, fp, Q):
    """E[i] (4x5) for pulses i0 <= i < i1 of one tissue th (8,)."""
    m0s = th[0]
    R1f = th[1]
    R2f = th[2]
    Rex = th[3]
    R1s = th[4]
    T2s = th[5]
    w0 = th[6]
    B1 = th[7]
    m0f = 1.0 - m0s
    La = -R1f - Rex * m0s
    Lb = Rex * m0f
    Lc = Rex * m0s
    Ld = -R1s - Rex * m0f
    logT2s = math.log(T2s)
    for i in range(i0, i1):
        R2s, dT, dB = _r2sl(logTRF[i] - logT2s, B1 * aabs[i], T2s, aabs[i], rho, lt0, dlt, ph0, dph)
        k = kind[i]
        if k == 1:
            _crusher(alpha[i], w1[i], TRF[i], B1, R2s, W)
        else:
            _pulse_generator(W, w1[i], TRF[i], B1, w0, m0s, R1f, R2f, Rex, R1s, R2s)
            _expm(W)
            if k != 0:
                _spoil(k, W)
        _free_precession(tfp[i], phi, R2f, w0, La, Lb, Lc, Ld, m0f, m0s, fp)
        _assemble(W, fp, Q, E, i)


@njit(**_JIT)
def _build_dE(th, alpha, aabs, w1, TRF, logTRF, tfp, kind, phi, rho, lt0, dlt, ph0, dph,
              i0, i1, E, dE, W, D, fp, dfp, Q, dQ):
    """E[i] and dE[i] (4x5x8) for pulses i0 <= i < i1 of one tissue."""
    m0s = th[0]
    R1f = th[1]
    R2f = th[2]
    Rex = th[3]
    R1s = th[4]
    T2s = th[5]
    w0 = th[6]
    B1 = th[7]
    logT2s = math.log(T2s)
    for i in range(i0, i1):
        R2s, dT, dB = _r2sl(logTRF[i] - logT2s, B1 * aabs[i], T2s, aabs[i], rho, lt0, dlt, ph0, dph)
        k = kind[i]
        if k == 1:
            _dcrusher(alpha[i], w1[i], TRF[i], B1, R2s, dT, dB, W, D)
        else:
            _pulse_generator(W, w1[i], TRF[i], B1, w0, m0s, R1f, R2f, Rex, R1s, R2s)
            _pulse_generator_tangents(D, w1[i], TRF[i], m0s, R1f, Rex, R1s, dT, dB)
            _dexpm(W, D)
            if k != 0:
                _dspoil(k, W, D)
        _dfree_precession(tfp[i], phi, m0s, R1f, R2f, Rex, R1s, w0, fp, dfp)
        _dassemble(W, D, fp, dfp, Q, dQ, E, dE, i)


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
    """out[t] (N,) and J[t] (N, 8) from E, dE (spec §3 tangent sweep).

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


# =========================================================================== Python API
class _SeqArrays:
    """Per-sequence arrays for the kernels (tissue independent, spec §8.5).

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
    from sklearn_crb.physics.r2sl.table import load_r2sl_table

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
    import time

    from sklearn_crb.physics.sequence import Sequence

    t0 = time.perf_counter()
    seq = Sequence(np.full(4, 0.3), np.full(4, 3e-4), 3.5e-3)
    th = np.array([[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 0.0, 1.0]])
    simulate_numba(seq, th)
    jacobian_numba(seq, th)
    return time.perf_counter() - t0
