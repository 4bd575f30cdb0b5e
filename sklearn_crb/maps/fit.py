"""Parameter maps with standard-error, goodness-of-fit and failure maps.

``fit_maps`` applies a fitted estimator (``CRBNetRegressor``, ``NLLSFitter``,
``DictionaryMatcher`` or a network loaded with
``sklearn_crb.io.models.load_model``) to every voxel of a coefficient image,
in chunks, through one protocol::

    det = estimator.predict_details(X, fixed=None, compute_crb=True)

which returns per voxel all eight parameters ``theta`` (the fixed and
nuisance values the estimator's model fingerprint used included), the
complex ``M0``, the residual norm, a convergence flag, the CRB at ``M0 = 1,
sigma = 1`` of the estimated parameters, and the number of real unknowns
``n_free`` of the fit (optionally ``var_unit``, the estimator's own variance
at ``M0 = 1, sigma = 1``, used instead of ``crb_unit``, and
``noise_residual_norm``, a residual for the noise level with the model
misfit of an off-optimum estimate projected out, NaN where not computed).
From these the maps give per voxel

* the standard error of each estimated parameter at the fitted ``|M0|`` and
  the noise level ``sigma``: for NLLS and dictionary matching
  ``sqrt(CRB(theta_hat))``, the Cramér–Rao bound of the rank-r coefficients
  (Zhang et al., MRM 2022, Eq. 3) evaluated at the estimate, with the
  unknowns the estimator does not report (and complex M0) marginalised as
  nuisance parameters (the asymptotic standard error of an efficient
  estimator); for a network, when its ``predict_details`` returns
  ``var_unit``, its own delta-method standard error (the spread of the
  network's estimate over noise draws to first order, below ``sqrt(CRB)``
  where it leans on its prior);
* the relative residual ``||c - M0 U^H s(theta_hat)|| / ||c||``;
* ``|M0|`` and its phase. A network does not estimate M0: it is the
  closed-form linear least-squares fit ``M0 = u^H c / u^H u`` with
  ``u = U^H s(theta_hat)``, i.e. the variable-projection solution of the
  complex scale at fixed ``theta_hat``;
* a bit-flag map of voxels that could not be fitted (``FLAGS``);
* with ``times=True``, the relaxation times as qMRI papers report them:
  ``T1f`` (s), ``T2f`` (ms) and, for the untied model, ``T1s`` (s), with
  standard errors by the delta method, ``se(T) = se(R) / R**2`` (times the
  unit factor, 1e3 for ms).
"""

from __future__ import annotations

import inspect

import numpy as np
from scipy.stats import chi2
from tqdm.auto import tqdm

from sklearn_crb._validation import chunk_slices
from sklearn_crb.io.images import CoefficientImage, check_rank, features_from_coefficients, make_mask
from sklearn_crb.io.models import basis_sha256, check_compatible
from sklearn_crb.estimators.fixed_sensitivity import fixed_variance
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, TIMES, UNITS, rate_name
from sklearn_crb.physics.sequence import Sequence

__all__ = ["fit_maps", "FLAGS", "check_estimator", "estimate_sigma", "map_names", "TIME_UNITS"]

#: Units of the relaxation-time maps of ``fit_maps(..., times=True)``: (unit, factor from seconds).
TIME_UNITS = {"T1f": ("s", 1.0), "T2f": ("ms", 1e3), "T1s": ("s", 1.0)}
_RATE_TO_TIME = {r: t for t, r in TIMES.items()}

#: Bits of the ``"flags"`` map (0 = fitted without problems).
FLAGS = {
    "invalid_input": 1,  # non-finite or all-zero coefficients (never fitted)
    "estimator_failed": 2,  # non-finite estimate or M0, or the estimator reports no convergence
    "out_of_range": 4,  # estimate outside the physical bounds (physics.parameters.BOUNDS)
    "singular_crb": 8,  # Fisher information singular at the estimate: no standard error
}


def _carried(estimator):
    """The sequence and basis an estimator carries, or None (attributes only, no type checks).

    ``crb_metadata_`` (a model loaded by ``io.models.load_model``), a fitted
    simulator (``simulator_``/``simulator``), or the estimator's own fitted
    ``sequence_``/``basis_``.
    """
    meta = getattr(estimator, "crb_metadata_", None)
    if meta is not None:
        return meta
    for attr in ("simulator_", "simulator"):
        sim = getattr(estimator, attr, None)
        if getattr(sim, "basis_", None) is not None and getattr(sim, "sequence_", None) is not None:
            return _meta(sim.sequence_, sim.basis_)
    seq, U = getattr(estimator, "sequence_", None), getattr(estimator, "basis_", None)
    if isinstance(seq, Sequence) and U is not None:
        return _meta(seq, U)
    return None


def _meta(sequence, basis):
    U = np.asarray(basis)
    return {"sequence": sequence.to_dict(), "sequence_sha256": sequence.sha256(), "rank": int(U.shape[1]),
            "basis": U, "basis_sha256": basis_sha256(U)}


def check_estimator(estimator, rank, sequence=None, basis=None):
    """Refuse an estimator that cannot be applied to a rank-``rank`` coefficient image.

    The estimator fits with its own sequence and basis (``predict_details``
    protocol); ``sequence``/``basis``, when given, are the acquisition of the
    data and must be the estimator's (``io.models.check_compatible``).

    Raises
    ------
    TypeError
        The estimator does not implement ``predict_details``.
    ValueError
        Rank, sequence or basis mismatch, or no basis to work in.
    """
    if not callable(getattr(estimator, "predict_details", None)):
        raise TypeError(f"estimator must implement predict_details(X, fixed=, compute_crb=) (the maps protocol), "
                        f"got {type(estimator).__name__}")
    meta = _carried(estimator)
    if meta is None:
        raise ValueError("the estimator carries no sequence and compression basis (coefficient images are "
                         "rank-r): fit it with basis= (NLLS, dictionary) or simulator= (network), or load a "
                         "saved model")
    check_rank(rank, meta["rank"])
    check_compatible(meta, sequence=sequence, basis=basis, rank=rank)


def estimate_sigma(residual_sq, dof):
    """Pooled noise level from squared residual norms of the real 2r-vector.

    ``||r||^2 / sigma^2`` is approximately chi-squared with ``dof`` degrees
    of freedom; the median is used (robust to badly fitted voxels) with its
    chi-squared correction.
    """
    r = np.asarray(residual_sq, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0 or dof < 1:
        raise ValueError("sigma cannot be estimated from the residuals (no fitted voxels or no degrees of freedom); "
                         "pass sigma=")
    return float(np.sqrt(np.median(r) / chi2.median(dof)))


def _time_names(estimate, times):
    """Names of the time maps: one per estimated relaxation rate or time (``times=True``)."""
    if not times:
        return ()
    return tuple(_RATE_TO_TIME[rate_name(p)] for p in estimate if rate_name(p) in _RATE_TO_TIME)


def map_names(estimate, *, times=False, compute_se=True):
    """The keys of the arrays :func:`fit_maps` returns for an estimator's ``estimate``.

    Known before any fitting, so that callers (the CLI) can check every
    output path first. A time target (e.g. ``T1f``) is its own map; with
    ``times=True`` each estimated relaxation rate also gets its time map
    (``T2f`` in ms: an estimated ``T2f`` is then reported in ms).
    """
    est = tuple(estimate)
    extra = tuple(t for t in _time_names(est, times) if t not in est)
    names = [*est, *extra]
    if compute_se:
        names += [p + "_se" for p in names]
    return names + ["M0_abs", "M0_phase", "relative_residual", "flags", "mask"]


def _target_values(theta, name):
    """The column of a target (rate, or time = 1/rate) from theta; NaN where the rate is not positive."""
    r = theta[:, INDEX[rate_name(name)]]
    if name not in TIMES:
        return r
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, 1.0 / np.where(r > 0, r, 1.0), np.nan)


def _add_time_maps(maps, units, theta, se, est, times, failed, to_map):
    """``T1f``/``T2f``/``T1s`` maps (and standard errors) by the delta method (``times=True``)."""
    for t in _time_names(est, times):
        unit, f = TIME_UNITS[t]
        j = next(k for k, p in enumerate(est) if rate_name(p) == rate_name(t))
        T = _target_values(theta, t)
        maps[t] = to_map(np.where(failed, np.nan, f * T))
        units[t] = unit
        if se is not None:
            # se of the estimated target: a rate R gives se(T) = se(R) / R^2 = se(R) T^2; a time is already T
            se_T = se[:, j] * T**2 if est[j] not in TIMES else se[:, j]
            maps[t + "_se"] = to_map(np.where(np.isfinite(se_T) & ~failed, f * se_T, np.nan))
            units[t + "_se"] = unit


def _out_of_range(theta):
    lo = np.array([BOUNDS[p][0] for p in PARAMETERS])
    hi = np.array([BOUNDS[p][1] for p in PARAMETERS])
    return np.any((theta < lo) | (theta > hi), axis=1)


def _se_option(estimator, se):
    """``predict_details`` keywords for the ``se`` choice of :func:`fit_maps` (checked before any work)."""
    if se is None:
        return {}
    if se not in ("delta", "crb"):
        raise ValueError(f"se must be None, 'delta' or 'crb', got {se!r}")
    if "se" in inspect.signature(estimator.predict_details).parameters:
        return {"se": se}
    if se == "delta":
        raise ValueError(f"se='delta' is the delta method of a network; {type(estimator).__name__} gives "
                         "sqrt(CRB) at its estimate (se='crb' or None)")
    return {}


def _declared_estimate(estimator):
    """What an estimator estimates, from its attributes where it says (else empty)."""
    meta = getattr(estimator, "crb_metadata_", None)
    if meta is not None and "estimate" in meta:
        return tuple(meta["estimate"])
    for attr in ("target_names_", "estimate_"):
        names = getattr(estimator, attr, None)
        if names is not None and not isinstance(names, str):
            return tuple(names)
    return ()


def _fixed_columns(fixed, mask, n_vox, argname="fixed"):
    if fixed is not None and not isinstance(fixed, dict):
        raise TypeError(f"{argname} must be a dict {{name: scalar or map}}, got {type(fixed).__name__}")
    cols = {}
    for name, val in (fixed or {}).items():
        if name not in INDEX:
            raise ValueError(f"{argname}: unknown parameter {name!r}; allowed {PARAMETERS}")
        try:
            arr = np.asarray(val, dtype=float)
        except (TypeError, ValueError):
            raise TypeError(f"{argname}[{name!r}] must be a real scalar or map, got {type(val).__name__}") from None
        if arr.ndim == 0:
            cols[name] = np.full(n_vox, float(arr))
        elif arr.shape == mask.shape:
            cols[name] = arr[mask]
        else:
            raise ValueError(f"{argname}[{name!r}] must be a scalar or a map of shape {mask.shape}, got {arr.shape}")
        if not np.all(np.isfinite(cols[name])):
            raise ValueError(f"{argname}[{name!r}] has non-finite values inside the mask")
    return cols


def _fixed_error_columns(fixed_se, fixed_cols, mask, n_vox, estimator, compute_se):
    """Map errors ``{name: (n_vox,)}`` of fixed parameters (``fit_maps(fixed_se=)``), checked before any work."""
    cols = _fixed_columns(fixed_se, mask, n_vox, "fixed_se")
    if not cols:
        return cols
    extra = sorted(set(cols) - set(fixed_cols))
    if extra:
        raise ValueError(f"fixed_se: {extra} are not fixed; give the error only of parameters in fixed= "
                         f"({sorted(fixed_cols)})")
    for name, col in cols.items():
        if np.any(col < 0):
            raise ValueError(f"fixed_se[{name!r}] must be >= 0 (a standard deviation, SI units)")
    if not compute_se:
        raise ValueError("fixed_se needs compute_se=True (it adds to the standard-error maps)")
    if type(estimator).__name__ == "DictionaryMatcher":
        raise ValueError("fixed_se: a DictionaryMatcher's match does not depend on the fixed values, so the map "
                         "error cannot be propagated; use NLLSFitter or a network")
    return cols


def fit_maps(estimator, coefficients, mask=None, *, sequence=None, basis=None, sigma=None, fixed=None,
             fixed_se=None, chunk_size=2048, compute_se=True, se=None, threshold=0.05, times=False, progress=False):
    """Fit every masked voxel of a coefficient image and return named maps.

    Parameters
    ----------
    estimator : fitted estimator with ``predict_details``
        ``CRBNetRegressor``, ``NLLSFitter``, ``DictionaryMatcher`` or a
        loaded model; it takes features ``[Re c, Im c]`` (n, 2r) and fits
        with its own sequence and basis.
    coefficients : CoefficientImage or ndarray, complex, shape (*spatial, r)
    mask : None, array_like (spatial) or path
        Voxels to fit; None: automatic (``io.make_mask``). Non-finite and
        all-zero voxels are always excluded and flagged.
    sequence : Sequence, optional
        The data's sequence: refused unless it is the estimator's.
    basis : array_like (n_pulses, r), optional
        The data's basis: refused unless it is the estimator's (to 1e-6).
    sigma : float, optional
        Noise standard deviation per real component of the coefficients;
        default: estimated from the residuals (``estimate_sigma``).
    fixed : dict, optional
        Values (scalars or maps) of parameters the estimator does not give,
        e.g. a measured ``{"B1": b1_map}``; they are treated as known
        (passed to ``predict_details`` chunk by chunk). Parameters neither
        estimated nor fixed are the estimator's nuisance parameters.
    fixed_se : dict, optional
        Standard deviations (scalars or maps, SI units) of the errors of
        some ``fixed`` maps, e.g. ``{"B1": 0.03}``: the standard-error maps
        then include them, ``se^2 + sum_b (d theta_hat / d b)^2 sigma_b^2``
        (independent errors, first order; the estimator's own sensitivity,
        see :mod:`sklearn_crb.estimators.fixed_sensitivity`). Default: the fixed
        maps are exact.
    chunk_size : int
        Voxels per chunk.
    compute_se : bool
        Compute the standard-error maps (NLLS, dictionary: one Jacobian per
        voxel; a network: its delta-method standard error, one backward pass).
    se : {None, "delta", "crb"}
        Standard error of an estimator that offers a choice (a network:
        ``"delta"``, its own delta-method spread, or ``"crb"``, sqrt(CRB) at
        its estimate); None: the estimator's default. NLLS and dictionary
        matching give sqrt(CRB) only (``"delta"`` is refused for them).
    threshold : float
        Automatic-mask threshold (see ``io.make_mask``).
    times : bool
        Also return the relaxation-time maps ``T1f`` (s), ``T2f`` (ms) and,
        untied, ``T1s`` (s) of the estimated rates, with standard errors by
        the delta method (``se(T) = se(R) / R**2``); see :func:`map_names`.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    maps : dict of str -> ndarray (spatial)
        ``<p>`` and ``<p>_se`` for each estimated parameter p (SI units; a
        time target such as ``T1f`` carries its own name, in s),
        ``M0_abs``, ``M0_phase`` (rad), ``relative_residual``, ``flags``
        (int, see ``FLAGS``) and ``mask`` (bool). Voxels outside the mask are
        0; voxels without a finite estimate are NaN; all problems are
        flagged. ``maps["sigma"]`` is not a map but the noise level used (float), and ``maps["units"]`` a
        dict of units.
    """
    # ---- every check before any work
    if isinstance(coefficients, CoefficientImage):
        c_img = coefficients.data
    else:
        c_img = np.asarray(coefficients)
        if not np.iscomplexobj(c_img):
            raise TypeError("coefficients must be complex with the coefficient axis last (or a CoefficientImage)")
    if c_img.ndim < 2:
        raise ValueError(f"coefficients must have shape (*spatial, rank), got {c_img.shape}")
    check_estimator(estimator, c_img.shape[-1], sequence, basis)
    details_kw = _se_option(estimator, se)
    chunk_slices(0, chunk_size)
    if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    fit_mask, invalid = make_mask(c_img, mask, threshold=threshold)
    spatial = c_img.shape[:-1]
    n_vox = int(fit_mask.sum())
    fixed_cols = _fixed_columns(fixed, fit_mask, n_vox)
    fixed_err = _fixed_error_columns(fixed_se, fixed_cols, fit_mask, n_vox, estimator, compute_se)
    var_fixed = None

    c = c_img[fit_mask]  # (n, r)
    theta = np.full((n_vox, len(PARAMETERS)), np.nan)
    M0 = np.full(n_vox, np.nan + 0j)
    res_sq = np.full(n_vox, np.nan)
    noise_sq = np.full(n_vox, np.nan)
    crb_unit = None
    converged = np.zeros(n_vox, dtype=bool)
    declared = _declared_estimate(estimator)
    bad = sorted(set(fixed_cols) & {rate_name(p) for p in declared})
    if bad:  # before any work where the estimator says what it estimates; else after the first chunk
        raise ValueError(f"fixed: {bad} are estimated by the estimator; fix only parameters it does not "
                         f"estimate (it estimates {tuple(declared)})")
    need = [p for p in getattr(estimator, "measured_", ()) if p not in fixed_cols]
    if need:  # a network conditioned on measured maps (CRBNetRegressor(measured=...))
        raise ValueError(f"fixed: the network takes {tuple(estimator.measured_)} as measured inputs; pass maps "
                         f"of {need} as fixed= (the CLI's --b1-map, --b0-map or --fixed NAME=FILE)")
    est, n_free = None, None
    bar = tqdm(total=n_vox, desc="fit_maps", unit="voxel", disable=not progress)
    for sl in chunk_slices(n_vox, chunk_size):
        fx = {p: col[sl] for p, col in fixed_cols.items()} or None
        det = estimator.predict_details(features_from_coefficients(c[sl]), fixed=fx, compute_crb=compute_se,
                                        **details_kw)
        if est is None:
            est, n_free = tuple(det["estimate"]), int(det["n_free"])
            bad = sorted(set(fixed_cols) & {rate_name(p) for p in est})
            if bad:
                raise ValueError(f"fixed: {bad} are estimated by the estimator; fix only parameters it does not "
                                 f"estimate (it estimates {est})")
            crb_unit = np.full((n_vox, len(est)), np.nan)
        theta[sl] = det["theta"]
        M0[sl] = det["M0"]
        res_sq[sl] = np.asarray(det["residual_norm"], dtype=float) ** 2
        if det.get("noise_residual_norm") is not None:
            noise_sq[sl] = np.asarray(det["noise_residual_norm"], dtype=float) ** 2
        converged[sl] = det["converged"]
        if compute_se:
            var = det.get("var_unit")
            crb_unit[sl] = det["crb_unit"] if var is None else var
        if fixed_err:  # the fixed maps' errors, through the estimator's sensitivity to them
            S, names = det.get("fixed_sensitivity"), tuple(det.get("fixed_names", ()))
            if S is None or any(b not in names for b in fixed_err):
                raise ValueError(f"fixed_se: {type(estimator).__name__}.predict_details does not report "
                                 f"fixed_sensitivity for {sorted(fixed_err)}")
            if var_fixed is None:
                var_fixed = np.zeros((n_vox, len(est)))
            var_fixed[sl] = fixed_variance(np.asarray(S)[:, :, [names.index(b) for b in fixed_err]],
                                           np.column_stack([col[sl] for col in fixed_err.values()]))
        bar.update(sl.stop - sl.start)
    bar.close()
    if est is None:  # nothing to fit: ask for the names on an empty batch
        det = estimator.predict_details(np.zeros((0, 2 * c_img.shape[-1])), fixed=None, compute_crb=False)
        est, n_free = tuple(det["estimate"]), int(det["n_free"])
        crb_unit = np.full((0, len(est)), np.nan)

    cols = [INDEX[rate_name(p)] for p in est]
    # not-converged voxels keep their (flagged) last iterate; only non-finite estimates become NaN
    failed = ~np.all(np.isfinite(theta[:, cols]), axis=1) | ~np.isfinite(M0)
    flags = np.where(~converged | failed, FLAGS["estimator_failed"], 0).astype(np.int16)
    with np.errstate(invalid="ignore"):
        flags |= np.where(_out_of_range(theta) & ~failed, FLAGS["out_of_range"], 0).astype(np.int16)
    ok = flags == 0
    if sigma is None and n_vox == 0:
        raise ValueError(f"coefficients: no voxel to fit ({int(invalid.sum())} of {invalid.size} are non-finite or "
                         "all zero, and the mask selects no other), so sigma cannot be estimated; check the image "
                         "and the mask")
    if sigma is None:
        # the misfit-free residuals where the estimator gives them (networks), else the residuals
        pool = noise_sq if np.isfinite(noise_sq[ok]).any() else res_sq
        sigma = estimate_sigma(pool[ok] if ok.any() else pool, 2 * c_img.shape[-1] - n_free)
    sigma = float(sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(res_sq) / np.linalg.norm(c, axis=1)
        if compute_se:
            se = np.sqrt(crb_unit) * sigma / np.abs(M0)[:, None]
            if var_fixed is not None:
                se = np.sqrt(se**2 + var_fixed)
            flags |= np.where(~np.all(np.isfinite(se), axis=1), FLAGS["singular_crb"], 0).astype(np.int16)

    def to_map(values, dtype=float):
        out = np.zeros(spatial, dtype=dtype)
        out[fit_mask] = values
        return out

    maps = {}
    for p in est:
        maps[p] = to_map(np.where(failed, np.nan, _target_values(theta, p)))
    maps["M0_abs"] = to_map(np.where(failed, np.nan, np.abs(M0)))
    maps["M0_phase"] = to_map(np.where(failed, np.nan, np.angle(M0)))
    if compute_se:
        for k, p in enumerate(est):
            maps[p + "_se"] = to_map(np.where(np.isfinite(se[:, k]) & ~failed, se[:, k], np.nan))
    units = {p: UNITS[p] for p in est}
    if compute_se:
        units.update({p + "_se": UNITS[p] for p in est})
    _add_time_maps(maps, units, theta, se if compute_se else None, est, times, failed, to_map)
    maps["relative_residual"] = to_map(np.where(failed, np.nan, rel))
    all_flags = np.where(invalid, FLAGS["invalid_input"], 0).astype(np.int16)
    all_flags[fit_mask] = flags
    maps["flags"] = all_flags
    maps["mask"] = fit_mask
    maps["sigma"] = sigma
    units.update(M0_abs="a.u.", M0_phase="rad", relative_residual="1")
    maps["units"] = units
    return maps
