"""Bloch building blocks of the numba kernel: R2sl, pulse and free-precession propagators.

Per pulse of one tissue (Assländer et al., "Generalized Bloch model", MRM
2022;87:2003-2017, linear approximation, Eq. 9): the R2sl lookup (the very
:func:`sklearn_crb.physics.r2sl.table.bilinear` formula and cell rule,
compiled here), the pulse generator ``H`` and its tangents, the closed-form
free precession of the two-pool Bloch-McConnell equations, the crushed
inversion pulse, the spoiler projections, and the per-TR map
``E_i = F_i P_i R(phi) F_i`` reduced to the 4 states ``(xf, yf, zf, zs)``
plus the constant, with its 8 tangents.
"""

from __future__ import annotations

import math

from numba import njit

from sklearn_crb.physics._numba.expm import (
    _A,
    _C0,
    _C1,
    _C2,
    _C4,
    _C5,
    _P,
    _dexpm,
    _expm,
)
from sklearn_crb.physics._numba.simd import (
    _JIT,
    NT,
    _vadd,
    _vfma2,
    _vld,
    _vld1,
    _vmul2,
    _vst,
)
from sklearn_crb.physics.r2sl.table import bilinear, cell

# =========================================================================== R2sl
# the one bilinear lookup of sklearn_crb.physics.r2sl.table, compiled for the kernel
_cell = njit(**_JIT)(cell)
_bilinear = njit(**_JIT)(bilinear)


@njit(**_JIT)
def _r2sl(log_tau, phi, T2s, aabs, rho, lt0, dlt, ph0, dph):
    """R2sl, dR2sl/dT2s, dR2sl/dB1: the bilinear (log tau, phi) lookup of
    :class:`sklearn_crb.physics.r2sl.table.R2slTable` (same formula, same cell
    selection; out-of-range points are extrapolated from the edge cells, the
    range is validated by :mod:`sklearn_crb.physics.signal`)."""
    fi, fu = _cell((log_tau - lt0) / dlt, rho.shape[0])
    fj, fv = _cell((phi - ph0) / dph, rho.shape[1])
    i = int(fi)
    j = int(fj)
    return _bilinear(rho[i, j], rho[i, j + 1], rho[i + 1, j], rho[i + 1, j + 1], fu, fv, T2s, aabs,
                     dlt, dph)


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
    """Closed-form D_xs expm(H_fp t) (two-pool Bloch-McConnell relaxation and exchange) into fp (14,).

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
    """W[_A] = H TRF (5x6, affine column last), Assländer et al., MRM 2022, Eq. 9."""
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
    """D[_A][..., p] = dH/dtheta_p TRF (the per-parameter derivative of H, M0 = 1)."""
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
    """U_c (the ``"crusher"`` gradient moment) into W[_P]: the refocused echo path of the free
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
