"""Shared pieces of the model-based estimators (dictionary matching, NLLS, the regressor).

* :func:`model_estimator_tags`: the sklearn tags of an estimator whose model,
  not ``fit``, fixes the number of features;
* :func:`as_complex_data`: the accepted input layouts (real ``[Re c, Im c]``,
  complex coefficients, complex full signals), with non-finite rows kept for
  the caller to flag;
* :func:`finite_rows` and :func:`robust_norm`: which rows can be fitted, and
  their norm without overflow or underflow (inputs scaled by 1e+-160 must
  neither overflow to ``inf`` nor underflow to zero);
* :func:`resolve_fixed`: the ``fixed=`` argument of ``predict_details``;
* :data:`MODEL_PARAMETER_CONSTRAINTS`: the declared validation
  (``sklearn.utils._param_validation``) of the constructor arguments the
  estimators share.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from sklearn_crb._validation import check_parameter_dict
from sklearn_crb.physics.parameters import BOUNDS, PARAMETERS
from sklearn_crb.physics.priors import ParameterPrior
from sklearn_crb.physics.sequence import Sequence

__all__ = [
    "MODEL_PARAMETER_CONSTRAINTS",
    "POSITIVE_INT",
    "POSITIVE_REAL",
    "model_estimator_tags",
    "as_complex_data",
    "finite_rows",
    "robust_norm",
    "resolve_fixed",
]

class _IntInterval(Interval):
    """An integer interval that, unlike sklearn's, rejects ``True``/``False``."""

    def is_satisfied_by(self, val):
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)


#: A positive integer (not a bool) / a positive finite float, for ``_parameter_constraints``.
POSITIVE_INT = _IntInterval(Integral, 1, None, closed="left")
POSITIVE_REAL = Interval(Real, 0, np.inf, closed="neither")

#: Declared constraints of the constructor arguments shared by the model-based
#: estimators (each estimator adds its own).
MODEL_PARAMETER_CONSTRAINTS = {
    "sequence": [Sequence, None],
    "basis": ["array-like", None],
    "estimate": [str, tuple, list],
    "tied_R1": ["boolean"],
    "fixed": [dict, None],
    "prior": [ParameterPrior, StrOptions({"parenchyma", "paper2022"}), None],
    "backend": [StrOptions({"auto", "numba", "torch"})],
    "chunk_size": [POSITIVE_INT],
    "n_jobs": [Integral, None],
    "random_state": [Interval(Integral, 0, None, closed="left"), np.random.Generator, None],
}


def model_estimator_tags(tags):
    """sklearn tags shared by the model-based estimators (dictionary, NLLS):
    the model, not ``fit``, fixes the features; NaN voxels are flagged, not
    rejected; ``y`` is optional and multi-output."""
    tags.requires_fit = True
    tags.input_tags.allow_nan = True
    tags.target_tags.required = False
    tags.target_tags.multi_output = True
    tags.regressor_tags.poor_score = True
    return tags


def as_complex_data(estimator, X, n_pulses, basis, argname="X"):
    """Complex data (n, K) from real ``[Re c, Im c]`` (n, 2K), complex coefficients (n, K)
    or complex full signals (n, n_pulses) (projected on ``basis`` if set).

    ``estimator.n_features_in_`` must be ``2 K``. Non-finite values (NaN and
    inf alike) are kept: the caller flags those rows (:func:`finite_rows`).
    """
    K = estimator.n_features_in_ // 2
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if np.iscomplexobj(X):
        arr = np.asarray(X, dtype=np.complex128)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] not in (n_pulses, K):
            raise ValueError(f"{argname} (complex) must have shape (n_samples, {n_pulses}) (full signals) or "
                             f"(n_samples, {K}) (coefficients), got {arr.shape}")
        if arr.shape[1] == n_pulses and basis is not None:
            ok = finite_rows(arr)
            out = np.full((arr.shape[0], basis.shape[1]), np.nan + 0j)
            out[ok] = arr[ok] @ basis.conj()
            arr = out
        return arr
    arr = validate_data(estimator, X, reset=False, ensure_all_finite=False, dtype=np.float64)
    out = np.empty((arr.shape[0], K), dtype=np.complex128)
    out.real, out.imag = arr[:, :K], arr[:, K:]  # no 1j * inf = nan + inf j
    return out


def finite_rows(y):
    """(n,) bool: rows of complex ``y`` (n, K) whose entries are all finite."""
    y = np.asarray(y, dtype=np.complex128)
    return np.isfinite(y.view(np.float64)).reshape(y.shape[0], -1).all(1)


def robust_norm(y):
    """Row 2-norms of complex ``y`` (n, K) and the unit-norm rows, without overflow or underflow.

    Each row is first divided by its largest modulus (a power of two, so the
    division is exact), then normalised. Rows that are not finite or all zero
    get norm ``nan``/0 and a zero unit row.

    Returns
    -------
    norm : ndarray (n,)
        ``||y_i||``; ``inf`` when the norm itself exceeds the float64 range.
    unit : ndarray complex (n, K)
        ``y_i / ||y_i||``.
    """
    y = np.asarray(y, dtype=np.complex128)
    ok = finite_rows(y)
    yy = np.where(ok[:, None], y, 0)
    m = np.abs(yy).max(axis=1) if y.shape[1] else np.zeros(y.shape[0])
    good = ok & (m > 0)
    e = np.zeros(y.shape[0])
    e[good] = np.floor(np.log2(m[good]))  # max |z| in [1, 2): 2**e never overflows
    p2 = np.ldexp(1.0, e.astype(np.int64))  # exact scaling by a power of two
    z = yy / p2[:, None]
    nz = np.linalg.norm(z, axis=1)
    unit = np.zeros_like(y)
    unit[good] = z[good] / nz[good, None]
    with np.errstate(over="ignore"):
        norm = np.where(good, nz * p2, 0.0)
    norm[~ok] = np.nan
    return norm, unit


def resolve_fixed(fixed, n, allowed, ranges=None, argname="fixed"):
    """Validate ``predict_details(fixed=...)``: ``{name: scalar or (n,) array}``.

    ``allowed`` are the names the estimator accepts (those it does not
    estimate). A wrong name, type or shape raises; values that are not finite
    or leave ``ranges[name]`` (default ``parameters.BOUNDS``) only flag their
    voxels (a measured B1 map has NaN or zero outside the head).

    Returns
    -------
    values : dict
        ``{name: (n,) float64}`` in ``PARAMETERS`` order (flagged entries are
        replaced by a harmless in-range value).
    bad : ndarray (n,) bool
        Voxels with a flagged fixed value.
    """
    d = check_parameter_dict(fixed, argname)
    ranges = BOUNDS if ranges is None else ranges
    values, bad = {}, np.zeros(n, dtype=bool)
    for name in PARAMETERS:
        if name not in d:
            continue
        if name not in allowed:
            raise ValueError(f"{argname}[{name!r}]: {name} is estimated by this estimator and cannot be fixed; "
                             f"allowed: {tuple(allowed)}")
        v = d[name]
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        if np.iscomplexobj(v):
            raise TypeError(f"{argname}[{name!r}] must be real, got a complex array")
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{argname}[{name!r}] must be a real scalar or an array of shape ({n},), "
                            f"got {type(v).__name__}") from None
        if arr.ndim == 0:
            arr = np.full(n, float(arr))
        if arr.shape != (n,):
            raise ValueError(f"{argname}[{name!r}] must be a scalar or have shape ({n},), got {arr.shape}")
        lo, hi = ranges[name]
        out = ~(np.isfinite(arr) & (arr >= lo) & (arr <= hi))
        bad |= out
        values[name] = np.where(out, 0.5 * (lo + hi), arr)
    return values, bad
