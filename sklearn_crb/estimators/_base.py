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
* :data:`DEFAULT_BOUNDS`, :func:`r2sl_range`, :func:`fit_box`: the box of
  fitted parameters (``parameters.BOUNDS`` with the documented overrides,
  cut to the range the R2sl table of a sequence covers), and
  :data:`DEFAULT_START`, :func:`start_values`: the starts of a fit, and
  :func:`init_start_values`: the starts an ``init`` estimator predicts;
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
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, TIMES, validate_theta
from sklearn_crb.physics.priors import ParameterPrior
from sklearn_crb.physics.r2sl.table import PHI_MAX, TAU_MAX, TAU_MIN
from sklearn_crb.physics.sequence import Sequence

__all__ = [
    "DEFAULT_BOUNDS",
    "DEFAULT_START",
    "start_values",
    "init_start_values",
    "noise_column",
    "fit_box",
    "r2sl_range",
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


#: Default box (SI units): the physical ``parameters.BOUNDS`` except T2s in the
#: parenchyma range [5, 25] us and B1 >= 0.05. ``fit`` further intersects T2s
#: and B1 with the range the R2sl table covers for the sequence.
DEFAULT_BOUNDS = {**BOUNDS, "T2s": (5e-6, 25e-6), "B1": (0.05, BOUNDS["B1"][1])}


def r2sl_range(seq):
    """``{"T2s": (lo, hi), "B1": (lo, hi)}`` keeping the R2sl lookup of ``seq`` inside its table.

    The table covers ``TRF/T2s`` in [TAU_MIN, TAU_MAX] and ``B1 |alpha|`` in [0, PHI_MAX].
    """
    TRF = np.asarray(seq.TRF)
    b1_hi = min(BOUNDS["B1"][1], PHI_MAX / np.abs(seq.alpha).max())
    return {"T2s": (TRF.max() / TAU_MAX, TRF.min() / TAU_MIN), "B1": (BOUNDS["B1"][0], b1_hi)}


def fit_box(seq, free, bounds=None):
    """``{name: (low, high)}`` of the parameters ``free``: ``DEFAULT_BOUNDS`` cut to the R2sl table of
    ``seq``, or the user's ``bounds`` (checked against ``BOUNDS`` and the table)."""
    user = check_parameter_dict(bounds, "bounds")
    table = r2sl_range(seq)
    out = {}
    for name in free:
        lo, hi = DEFAULT_BOUNDS[name]
        if name in table and name not in user:
            lo, hi = max(lo, table[name][0]), min(hi, table[name][1])
        if name in user:
            try:
                lo, hi = (float(v) for v in user[name])
            except (TypeError, ValueError):
                raise TypeError(f"bounds[{name!r}] must be a (low, high) pair, got {user[name]!r}") from None
        plo, phi = BOUNDS[name]
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds[{name!r}] must be finite with low < high, got ({lo}, {hi})")
        if lo < plo or hi > phi:
            raise ValueError(f"bounds[{name!r}] = ({lo:g}, {hi:g}) must lie inside the physical range "
                             f"[{plo:g}, {phi:g}]")
        if name == "T2s" and (lo < table["T2s"][0] * (1 - 1e-12) or hi > table["T2s"][1] * (1 + 1e-12)):
            raise ValueError(f"bounds['T2s'] = ({lo:g}, {hi:g}) s leaves the R2sl table for this sequence "
                             f"(TRF/T2s in [{TAU_MIN:g}, {TAU_MAX:g}] needs T2s in "
                             f"[{table['T2s'][0]:g}, {table['T2s'][1]:g}] s)")
        if name == "B1" and hi > table["B1"][1] * (1 + 1e-12):
            raise ValueError(f"bounds['B1'] upper bound {hi:g} leaves the R2sl table for this sequence "
                             f"(B1 <= {table['B1'][1]:g})")
        out[name] = (lo, hi)
    return out


#: Start values of ``fit_gBloch`` (MRIgeneralizedBloch.jl); with ``tied_R1`` the
#: tied R1 starts at 0.7 1/s (Julia's ``R1a``).
DEFAULT_START = {"m0s": 0.2, "R1f": 0.3, "R2f": 15.0, "Rex": 20.0, "R1s": 3.0, "T2s": 10e-6,
                 "omega0": 0.0, "B1": 1.0}
_TIED_R1_START = 0.7


def start_values(start, fixed, tied_R1):
    """Start values (n_starts, 8) of a fit from ``start`` (None, "default", "grid", a dict or an array;
    "dictionary" starts from ``DEFAULT_START`` until matched), with the ``fixed`` values filled in."""
    base = dict(DEFAULT_START)
    if tied_R1:
        base["R1f"] = _TIED_R1_START
    base.update(fixed)
    if start is None or isinstance(start, str):
        if start == "grid":
            rows = [dict(base, m0s=m0s, R1f=R1f, R2f=R2f, **fixed)
                    for m0s in (0.05, 0.25) for R1f in (0.4, 1.2) for R2f in (8.0, 25.0)]
        else:
            rows = [base]
        starts = np.array([[d[p] for p in PARAMETERS] for d in rows], dtype=float)
    elif isinstance(start, dict):
        base.update(check_parameter_dict(start, "start"))
        base.update(fixed)
        starts = np.array([[base[p] for p in PARAMETERS]], dtype=float)
    else:
        starts = validate_theta(np.atleast_2d(np.asarray(start, dtype=float)), "start")
    if tied_R1:
        starts[:, INDEX["R1s"]] = starts[:, INDEX["R1f"]]
    return starts


def noise_column(sigma, n, argname="sigma"):
    """``(n, 1)`` float64 column of the noise level (a float or one per row), positive and finite.

    The input column of a noise-aware network (``CRBNetRegressor(noise_input=True)``).

    Raises
    ------
    ValueError
        Naming ``argname``: a shape that is not one value or ``n``, or values that are not positive and finite.
    """
    try:
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1) if np.ndim(sigma) else
                              np.float64(sigma), (n,))
    except (TypeError, ValueError):
        raise ValueError(f"{argname} must be a positive float or one per row of X ({n}), got shape "
                         f"{np.shape(sigma)}") from None
    bad = ~(np.isfinite(sig) & (sig > 0))
    if bad.any():
        raise ValueError(f"{argname} must be positive and finite; {int(bad.sum())} of {n} values are not")
    return sig[:, None].copy()


def init_start_values(init, X, default_names, sigma=None):
    """``{parameter: (n,) values}`` (SI rates) that a fitted ``init`` estimator predicts for ``X``.

    A noise-aware network (``init.noise_input_``) gets ``sigma`` (a float or one per row) as its noise column.

    The columns of ``init.predict(X)`` are named by ``init.estimate_``, else by ``init.target_names_`` (a
    network) where those are parameter names, else by ``default_names``. Relaxation-time targets (``T1f``,
    ``T2f``, ... in s) are inverted to their rates; other names must be ``PARAMETERS``.
    """
    def known(names):
        return all(q in INDEX or q in TIMES for q in names)

    names = tuple(getattr(init, "estimate_", None) or ())
    if not names:
        targets = tuple(getattr(init, "target_names_", None) or ())
        names = targets if targets and known(targets) else tuple(default_names)
    if getattr(init, "noise_input_", False):
        if sigma is None:
            raise ValueError("sigma: init is a noise-aware network (noise_input=True); pass the noise level, "
                             "NLLSFitter(sigma=...) or predict_details(X, sigma=...)")
        X = np.hstack([np.asarray(X, dtype=np.float64), noise_column(sigma, np.shape(X)[0])])
    pred = np.asarray(init.predict(X), dtype=float).reshape(np.shape(X)[0], -1)
    if pred.shape[1] != len(names):
        raise ValueError(f"init.predict returned {pred.shape[1]} columns but init names {names}")
    if not known(names):
        bad = [q for q in names if q not in INDEX and q not in TIMES]
        raise ValueError(f"init names outputs {bad} that are not model parameters {PARAMETERS} or times {tuple(TIMES)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return {TIMES.get(q, q): (1.0 / pred[:, k] if q in TIMES else pred[:, k]) for k, q in enumerate(names)}
