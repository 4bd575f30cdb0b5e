"""Taylor-18 matrix exponential of the affine 5x6 blocks, and its dual-number derivative.

Scaling and squaring of the degree-18 Taylor polynomial with 5 matrix
products (Bader, Blanes & Casas, "Computing the matrix exponential with an
optimized Taylor polynomial approximation", Mathematics 7, 1174 (2019)); the
number of squarings ``s = ceil(log2(||A||_1 / 1.0909))`` is the minimal one
for a double-precision truncation error, as in ``torch.linalg.matrix_exp``.
The derivative carries 8 tangents through the same polynomial and every
squaring (forward mode, as in Al-Mohy & Higham, "Computing the Fréchet
derivative of the matrix exponential", SIAM J. Matrix Anal. Appl. 30, 1639
(2009), with ``s`` chosen from ``||A||`` alone).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from sklearn_crb.physics._numba.simd import (
    _JIT,
    _rlc,
    _rld,
    _rst,
    _vadd,
    _vfma2,
    _vlc,
    _vld,
    _vmul,
    _vst,
)

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
# Taylor-18 coefficients as module-level scalars (compile-time constants)
(_a01, _a11, _a21, _a31, _a61) = _B18[0]
(_b01, _b11, _b21, _b31, _b61) = _B18[1]
(_b02, _b12, _b22, _b32, _b62) = _B18[2]
(_b03, _b13, _b23, _b33, _b63) = _B18[3]
(_b04, _b14, _b24, _b34, _b64) = _B18[4]
_C91 = _b03  # corner of q91 = q31 q64 + q63 (q31 has corner 0)
_CEXP = _b01 + (_b02 + _C91) * _C91  # corner of T18 (= 1 up to rounding)
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
