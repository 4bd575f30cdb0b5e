"""Checks and small conversions shared across the package.

One home for each rule: the orthonormal-basis check, parameter-name dicts,
the SNR range, chunking, the torch device choice, and the real feature layout
``[Re c, Im c]`` of complex coefficients. Nothing here imports another module
of the package except :mod:`sklearn_crb.physics.parameters`.
"""

from __future__ import annotations

import hashlib

import numpy as np

from sklearn_crb.physics.parameters import PARAMETERS

__all__ = [
    "check_basis",
    "check_parameter_dict",
    "check_snr_range",
    "SNR_LIMITS",
    "chunk_slices",
    "resolve_device",
    "features_from_complex",
    "complex_from_features",
    "basis_sha256",
]

#: Tolerance of the orthonormality check ``max |U^H U - I|``.
ORTHONORMAL_TOL = 1e-6


def check_basis(basis, n_pulses, argname="basis"):
    """Validate an orthonormal basis (n_pulses, rank); return complex128 numpy.

    Raises
    ------
    TypeError
        If ``basis`` is not a numeric array.
    ValueError
        Wrong shape, non-finite values or columns that are not orthonormal.
    """
    try:
        U = np.asarray(basis)
    except Exception:  # noqa: BLE001
        raise TypeError(f"{argname} must be an array of shape (n_pulses, rank)") from None
    if not np.issubdtype(U.dtype, np.number):
        raise TypeError(f"{argname} must be numeric, got dtype {U.dtype}")
    U = U.astype(np.complex128)
    if U.ndim != 2 or U.shape[0] != n_pulses or not (1 <= U.shape[1] <= n_pulses):
        raise ValueError(f"{argname} must have shape ({n_pulses}, rank) for a {n_pulses}-pulse sequence, "
                         f"got {U.shape}")
    if not np.all(np.isfinite(U)):
        raise ValueError(f"{argname} contains non-finite values")
    G = U.conj().T @ U
    err = np.abs(G - np.eye(U.shape[1])).max()
    if err > ORTHONORMAL_TOL:
        raise ValueError(f"{argname} must have orthonormal columns (max |U^H U - I| = {err:.2g})")
    return U


def check_parameter_dict(d, argname):
    """``{}`` for None, else a copy of a dict keyed by names of ``PARAMETERS``."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise TypeError(f"{argname} must be a dict mapping parameter names to values, got {type(d).__name__}")
    bad = [k for k in d if k not in PARAMETERS]
    if bad:
        raise ValueError(f"{argname} has unknown parameter names {bad}; allowed: {PARAMETERS}")
    return dict(d)


#: The SNR range accepted. A CRB scales as ``1 / SNR**2`` times a unit-SNR bound; within these limits that
#: factor stays within 1e+-60 of 1, so the bound stays a normal float64 (no underflow to 0, no overflow to inf)
#: for any unit-SNR bound within 1e+-240. Measured SNRs are between about 1 and 1e4.
SNR_LIMITS = (1e-30, 1e30)


def check_snr_range(snr, argname="snr"):
    """``(low, high)`` floats with ``0 < low <= high < inf`` (SNR = |M0| / sigma), within :data:`SNR_LIMITS`.

    Raises
    ------
    TypeError
        Not a pair of numbers.
    ValueError
        Out of order, not positive, or beyond :data:`SNR_LIMITS` (where the
        CRBs, which scale as ``1 / SNR**2``, underflow to 0 or overflow).
    """
    try:
        lo, hi = (float(v) for v in snr)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a (low, high) pair, got {snr!r}") from None
    if not (0 < lo <= hi < np.inf):
        raise ValueError(f"{argname} must satisfy 0 < low <= high < inf, got {snr!r}")
    if hi > SNR_LIMITS[1] or lo < SNR_LIMITS[0]:
        bad, what = (hi, "underflow to 0") if hi > SNR_LIMITS[1] else (lo, "overflow")
        raise ValueError(f"{argname}: an SNR of {bad:g} is outside [{SNR_LIMITS[0]:g}, {SNR_LIMITS[1]:g}]: the CRBs "
                         f"scale as 1/SNR^2 and would {what} (SNR = |M0|/sigma; measured values are about 1 to 1e4)")
    return lo, hi


def chunk_slices(n, size, argname="chunk_size"):
    """Slices of at most ``size`` covering ``range(n)``."""
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a positive integer, got {size!r}") from None
    if size < 1:
        raise ValueError(f"{argname} must be a positive integer, got {size!r}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def resolve_device(device):
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other values unchanged."""
    if isinstance(device, str) and device == "auto":
        import torch  # only estimators ask for a device; keep this module torch-free otherwise

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def features_from_complex(c):
    """Real features ``[Re c, Im c]`` (n, 2r) of complex coefficients (n, r)."""
    c = np.asarray(c)
    return np.hstack([c.real, c.imag])


def complex_from_features(X):
    """Complex coefficients (n, r) of real features ``[Re c, Im c]`` (n, 2r)."""
    X = np.asarray(X)
    K = X.shape[1] // 2
    return X[:, :K] + 1j * X[:, K:]


def basis_sha256(basis):
    """SHA-256 of a compression basis as little-endian complex128, its shape included (model folders and
    training-set manifests record it, so that coefficients of another basis are refused)."""
    U = np.ascontiguousarray(np.asarray(basis), dtype="<c16")
    h = hashlib.sha256(str(U.shape).encode())
    h.update(U.tobytes())
    return h.hexdigest()
