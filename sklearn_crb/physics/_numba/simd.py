"""SIMD tuple helpers of the numba kernel: 8-tangent and 6-wide rows as tuples.

The bottom layer of :mod:`sklearn_crb.physics._numba`: the jit options shared by
all layers and the small inlined functions that load, combine and store the
8 tangents of a matrix entry (or the 6 entries of a 5x6 block row) as tuples,
so that LLVM's SLP vectorizer emits AVX instructions for them (see
:func:`sklearn_crb.physics._numba.kernel._slp_vectorize`).
"""

from __future__ import annotations

from numba import njit

NT = 8  # number of tangents = len(PARAMETERS)

# fastmath off: IEEE semantics, a tissue's result does not depend on its batch
_JIT = dict(fastmath=False, error_model="numpy", nogil=True)
_INL = dict(error_model="numpy", fastmath=False, inline="always")


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
