"""Parameter maps with standard-error, goodness-of-fit and failure maps.

``fit_maps`` applies a fitted estimator (``CRBNetRegressor``, ``NLLSFitter``,
``DictionaryMatcher`` or a network loaded with
``sklearn_crb.io.models.load_model``) to every voxel of a coefficient image,
in chunks, through one declared protocol::

    model = estimator.fitted_model()   # sequence, basis, targets, measured inputs, standard errors
    det = estimator.predict_details(X, fixed=None, compute_crb=True)   # a PredictionDetails

(:class:`sklearn_crb._model.FittedModel`,
:class:`sklearn_crb.estimators.details.PredictionDetails`), which returns
per voxel all eight parameters ``theta`` (the fixed and nuisance values
the estimator's model fingerprint used included), the complex ``M0``, the
residual norm, a convergence flag, the CRB at ``M0 = 1, sigma = 1`` of the
estimated parameters, and the number of real unknowns ``n_free`` of the fit
(optionally ``var_unit``, the estimator's own variance at ``M0 = 1,
sigma = 1``, used instead of ``crb_unit``, and
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
* the trust map (``trust=``, :mod:`sklearn_crb.maps.trust`): per voxel the
  misfit chi-squared of the residual against ``sigma`` and, with
  ``trust="tangent"``, the Gauss–Newton step from the estimate in standard
  errors; the flag bit ``"untrusted"`` where the data contradict the
  estimate;
* with ``times=True``, the relaxation times as qMRI papers report them:
  ``T1f`` (s), ``T2f`` (ms) and, for the untied model, ``T1s`` (s), with
  standard errors by the delta method, ``se(T) = se(R) / R**2`` (times the
  unit factor, 1e3 for ms).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.stats import chi2
from tqdm.auto import tqdm

from sklearn_crb._model import fitted_model
from sklearn_crb._validation import chunk_slices
from sklearn_crb.estimators.fixed_sensitivity import fixed_variance
from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io.images import CoefficientImage, check_rank, features_from_coefficients, make_mask
from sklearn_crb.io.models import basis_sha256, check_compatible
from sklearn_crb.maps.result import Maps
from sklearn_crb.maps.trust import ALPHA, MAX_STEP, TRUST_METHODS, tangent_parameters, trust_statistics
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, TIMES, UNITS, rate_name

__all__ = ["fit_maps", "FLAGS", "check_estimator", "estimate_sigma", "map_names", "resolve_trust", "TIME_UNITS"]

#: Units of the relaxation-time maps of ``fit_maps(..., times=True)``: (unit, factor from seconds).
TIME_UNITS = {"T1f": ("s", 1.0), "T2f": ("ms", 1e3), "T1s": ("s", 1.0)}
_RATE_TO_TIME = {r: t for t, r in TIMES.items()}

#: Bits of the ``"flags"`` map (0 = fitted without problems).
FLAGS = {
    "invalid_input": 1,  # non-finite or all-zero coefficients (never fitted)
    "estimator_failed": 2,  # non-finite estimate or M0, or the estimator reports no convergence
    "out_of_range": 4,  # estimate outside the physical bounds (physics.parameters.BOUNDS)
    "singular_crb": 8,  # Fisher information singular at the estimate: no standard error
    "untrusted": 16,  # the data contradict the estimate (maps.trust: misfit chi-squared or Gauss-Newton step)
}


def _metadata(model):
    """The ``io.models.check_compatible`` view of a :class:`~sklearn_crb._model.FittedModel`."""
    U = model.basis
    return {"sequence": model.sequence.to_dict(), "sequence_sha256": model.sequence.sha256(), "rank": model.rank,
            "basis": U, "basis_sha256": None if U is None else basis_sha256(U)}


def check_estimator(estimator, rank, sequence=None, basis=None):
    """Refuse an estimator that cannot be applied to a rank-``rank`` coefficient image; return its model.

    The estimator fits with its own sequence and basis, which it declares by
    ``fitted_model()`` (:class:`sklearn_crb._model.FittedModel`);
    ``sequence``/``basis``, when given, are the acquisition of the data and
    must be the estimator's (``io.models.check_compatible``).

    Returns
    -------
    FittedModel

    Raises
    ------
    TypeError
        The estimator does not implement ``predict_details`` or declares no model.
    ValueError
        Rank, sequence or basis mismatch, or no basis to work in.
    """
    if not callable(getattr(estimator, "predict_details", None)):
        raise TypeError(f"estimator must implement predict_details(X, fixed=, compute_crb=) (the maps protocol), "
                        f"got {type(estimator).__name__}")
    model = fitted_model(estimator)
    if model.basis is None:
        raise ValueError("the estimator carries no compression basis (coefficient images are rank-r): fit it with "
                         "basis= (NLLS, dictionary) or simulator= (network), or load a saved model")
    check_rank(rank, model.rank)
    check_compatible(_metadata(model), sequence=sequence, basis=basis, rank=rank)
    return model


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


def map_names(estimate, *, times=False, compute_se=True, trust=None):
    """The keys of the arrays :func:`fit_maps` returns for an estimator's ``estimate``.

    Known before any fitting, so that callers (the CLI) can check every
    output path first. A time target (e.g. ``T1f``) is its own map; with
    ``times=True`` each estimated relaxation rate also gets its time map
    (``T2f`` in ms: an estimated ``T2f`` is then reported in ms). The trust
    maps of ``trust``, the test :func:`resolve_trust` chooses: ``trust_chi2``
    unless None, and ``trust_step`` with ``"tangent"``.
    """
    est = tuple(estimate)
    extra = tuple(t for t in _time_names(est, times) if t not in est)
    names = [*est, *extra]
    if compute_se:
        names += [p + "_se" for p in names]
    return names + ["M0_abs", "M0_phase", "relative_residual", *_trust_names(trust), "flags", "mask"]


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


def _fixed_columns(fixed, mask, n_vox, argname="fixed"):
    """``{name: (n_vox,) values}`` of scalars or maps, inside the mask, finite (checked before any work)."""
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


def _fixed_values(fixed, mask, n_vox, model):
    """The ``fixed=`` maps inside the mask: not estimated, inside the physical bounds, and covering every
    measured input of the estimator (all checked before any work, as the CLI checks its maps)."""
    cols = _fixed_columns(fixed, mask, n_vox)
    bad = sorted(set(cols) & {rate_name(p) for p in model.estimate})
    if bad:
        raise ValueError(f"fixed: {bad} are estimated by the estimator; fix only parameters it does not "
                         f"estimate (it estimates {tuple(model.estimate)})")
    for name, col in cols.items():
        lo, hi = BOUNDS[name]
        if col.size and (col.min() < lo or col.max() > hi):
            hint = " (B1 is relative, 1 = nominal, not in percent)" if name == "B1" else ""
            raise ValueError(f"fixed[{name!r}]: values in the voxels to fit span [{col.min():.4g}, {col.max():.4g}] "
                             f"{UNITS[name]}, outside the physical bounds [{lo:.4g}, {hi:.4g}]{hint}")
    need = [p for p in model.measured if p not in cols]
    if need:  # a network conditioned on measured maps (CRBNetRegressor(measured=...))
        raise ValueError(f"fixed: the network takes {tuple(model.measured)} as measured inputs; pass maps "
                         f"of {need} as fixed= (the CLI's --b1-map, --b0-map or --fixed NAME=FILE)")
    return cols


def _fixed_error_columns(fixed_se, fixed_cols, mask, n_vox, compute_se):
    """Map errors ``{name: (n_vox,)}`` of fixed parameters (``fit_maps(fixed_se=)``), checked before any work."""
    cols = _fixed_columns(fixed_se, mask, n_vox, "fixed_se")
    if not cols:
        return cols
    extra = sorted(set(cols) - set(fixed_cols))
    if extra:
        raise ValueError(f"fixed_se: {extra} are not fixed; give the error only of parameters in fixed= "
                         f"({sorted(fixed_cols)})")
    for name, col in cols.items():
        lo, hi = BOUNDS[name]
        if np.any(col < 0):
            raise ValueError(f"fixed_se[{name!r}] must be >= 0 (a standard deviation, SI units)")
        if col.size and col.max() > hi - lo:
            # a first-order error propagation is meaningless for an error wider than the parameter can range
            raise ValueError(f"fixed_se[{name!r}] = {col.max():.4g} {UNITS[name]} exceeds the width of {name}'s "
                             f"physical range [{lo:.4g}, {hi:.4g}]; give the map error's standard deviation")
    if not compute_se:
        raise ValueError("fixed_se needs compute_se=True (it adds to the standard-error maps)")
    return cols


def _se_keywords(model, se):
    """``predict_details`` keywords for the ``se`` choice of :func:`fit_maps` (checked before any work)."""
    if se is None:
        return {}
    if se not in ("delta", "crb"):
        raise ValueError(f"se must be None, 'delta' or 'crb', got {se!r}")
    if se not in model.se_methods:
        raise ValueError(f"se={se!r}: the estimator gives {' or '.join(model.se_methods)} standard errors "
                         "(se='delta' is the delta method of a network; NLLS and dictionary matching give "
                         "sqrt(CRB) at their estimate: se='crb' or None)")
    return {"se": se} if len(model.se_methods) > 1 else {}


class _Plan:
    """Everything :func:`fit_maps` checked before any work."""

    __slots__ = ("image", "c", "fit_mask", "invalid", "model", "model_name", "fixed", "fixed_se", "details_kw",
                 "sigma_vox", "sigma_method", "sigma_scalar")


class _Voxels:
    """Per-voxel results of the masked voxels, gathered chunk by chunk from ``predict_details``."""

    __slots__ = ("theta", "M0", "res_sq", "noise_sq", "converged", "var_unit", "var_fixed", "estimate", "n_free")


def fit_maps(estimator, coefficients, mask=None, *, sequence=None, basis=None, sigma=None, fixed=None,
             fixed_se=None, chunk_size=2048, compute_se=True, se=None, threshold=0.05, times=False, progress=False,
             trust="auto", trust_alpha=ALPHA, trust_max_step=MAX_STEP):
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
    sigma : float or array_like (spatial), optional
        Noise standard deviation per real component of the coefficients, one
        value or a noise map on the image grid (e.g. parallel imaging's
        g-factor times the channel noise); default: estimated from the
        residuals (``estimate_sigma``). A noise-aware network
        (``CRBNetRegressor(noise_input=True)``, or NLLS started from one) needs
        it before it runs: when not given, it is estimated first on up to
        1024 evenly spaced voxels, from the residuals projected off the
        model's tangent space at the network's estimate (a chi-squared
        variate whether or not the estimate is the least-squares optimum,
        so the first estimate does not need the right sigma), in two rounds
        started at the network's typical training SNR (``sigma_method``
        ``"noise_residuals_first_pass"``).
    fixed : dict, optional
        Values (scalars or maps, SI units) of parameters the estimator does
        not give, e.g. a measured ``{"B1": b1_map}``, finite and inside the
        physical bounds (``physics.parameters.BOUNDS``) in every voxel to fit
        (B1 is relative: 1, not 100, is nominal); they are treated as known
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
    trust : {"auto", "residual", "tangent", None}
        The trust map (:mod:`sklearn_crb.maps.trust`): do the data contradict
        the estimate? ``"residual"`` (no extra model evaluation): the misfit
        chi-squared of the residual against ``sigma`` with ``2r - n_free``
        degrees of freedom, exact at an NLLS optimum; at a network's
        estimate the residual also holds the network's own error, so it
        flags many voxels where the model holds. ``"tangent"`` (one physics
        Jacobian per voxel, several times the time of a network's maps): the
        residual projected off the model's tangent space, a chi-squared with
        the same degrees of freedom at any estimate, and the Gauss–Newton
        step from the estimate in standard errors. ``"auto"`` (default):
        ``"residual"`` for NLLS, no trust map for other estimators (ask for
        ``"tangent"``). None: no trust map.
    trust_alpha : float in (0, 1)
        Voxels whose chi-squared p-value is below it are flagged
        ``"untrusted"`` (the false-flag rate where the model holds).
    trust_max_step : float
        Voxels whose Gauss–Newton step exceeds it (standard errors of an
        estimated parameter; ``trust="tangent"``) are flagged ``"untrusted"``.

    Returns
    -------
    maps : Maps
        ``maps.arrays``: ``<p>`` and ``<p>_se`` for each estimated parameter p
        (SI units; a time target such as ``T1f`` carries its own name, in s),
        ``M0_abs``, ``M0_phase`` (rad), ``relative_residual``, the trust maps
        ``trust_chi2`` (the misfit chi-squared per degree of freedom, 1 where
        the data agree) and, with ``trust="tangent"``, ``trust_step`` (the
        Gauss–Newton step in standard errors), ``flags`` (int, see
        ``FLAGS``) and ``mask`` (bool), all of the image's spatial
        shape. Voxels outside the mask are 0; voxels without a finite
        estimate are NaN; all problems are flagged. ``maps.units``,
        ``maps.sigma`` (the noise level used) and ``maps.sigma_method``,
        ``maps.provenance``; ``maps.to_nifti(folder)`` writes them. The 0.1
        dict access (``maps["m0s"]``, ``maps["sigma"]``) still works, with a
        ``DeprecationWarning``.

    Notes
    -----
    What ``fit_maps`` needs from an estimator is declared: ``fitted_model()``
    (its sequence, basis, targets, measured inputs and standard-error
    methods, :class:`sklearn_crb._model.FittedModel`) and
    ``predict_details(X, fixed=, compute_crb=)`` (plus ``se=`` where it
    offers several standard errors) returning
    :class:`sklearn_crb.estimators.details.PredictionDetails`.
    """
    trust_kw = _trust_settings(resolve_trust(trust, isinstance(estimator, NLLSFitter)), trust_alpha, trust_max_step)
    plan = _plan(estimator, coefficients, mask, sequence, basis, sigma, fixed, fixed_se, chunk_size, compute_se,
                 se, threshold)
    if plan.model.noise_input and plan.sigma_vox is None:  # a noise-aware network needs sigma before it runs
        plan.sigma_vox, plan.sigma_method = _first_pass_sigma(estimator, plan)
    vox = _predict(estimator, plan, chunk_size, compute_se, progress)
    failed, flags = _flags(vox)
    sigma, sigma_method = _noise_level(vox, flags == 0, plan)
    trusted = _trust(plan, vox, failed, sigma, trust_kw, getattr(estimator, "free_parameters_", None))
    return _assemble(plan, vox, failed, flags, sigma, sigma_method, compute_se, se, times, trusted)


def _plan(estimator, coefficients, mask, sequence, basis, sigma, fixed, fixed_se, chunk_size, compute_se, se,
          threshold):
    """Every check of :func:`fit_maps`, before any work."""
    plan = _Plan()
    if isinstance(coefficients, CoefficientImage):
        plan.image, c_img = coefficients, coefficients.data
    else:
        c_img = np.asarray(coefficients)
        plan.image = None
        if not np.iscomplexobj(c_img):
            raise TypeError("coefficients must be complex with the coefficient axis last (or a CoefficientImage)")
    if c_img.ndim < 2:
        raise ValueError(f"coefficients must have shape (*spatial, rank), got {c_img.shape}")
    plan.model = check_estimator(estimator, c_img.shape[-1], sequence, basis)
    plan.model_name = type(estimator).__name__
    plan.details_kw = _se_keywords(plan.model, se)
    chunk_slices(0, chunk_size)
    plan.fit_mask, plan.invalid = make_mask(c_img, mask, threshold=threshold)
    plan.sigma_vox, plan.sigma_method = _given_sigma(sigma, plan.fit_mask)
    plan.sigma_scalar = float(sigma) if plan.sigma_method == "given" else None
    n_vox = int(plan.fit_mask.sum())
    if sigma is None and n_vox == 0:
        raise ValueError(f"coefficients: no voxel to fit ({int(plan.invalid.sum())} of {plan.invalid.size} are "
                         "non-finite or all zero, and the mask selects no other), so sigma cannot be estimated; "
                         "check the image and the mask")
    plan.fixed = _fixed_values(fixed, plan.fit_mask, n_vox, plan.model)
    plan.fixed_se = _fixed_error_columns(fixed_se, plan.fixed, plan.fit_mask, n_vox, compute_se)
    plan.c = c_img[plan.fit_mask]  # (n, r)
    return plan


def _predict(estimator, plan, chunk_size, compute_se, progress):
    """``predict_details`` of the masked voxels, chunk by chunk (chunks only bound memory)."""
    n_vox = plan.c.shape[0]
    vox = _Voxels()
    vox.theta = np.full((n_vox, len(PARAMETERS)), np.nan)
    vox.M0 = np.full(n_vox, np.nan + 0j)
    vox.res_sq, vox.noise_sq = np.full(n_vox, np.nan), np.full(n_vox, np.nan)
    vox.converged = np.zeros(n_vox, dtype=bool)
    vox.var_unit = vox.var_fixed = vox.estimate = vox.n_free = None
    with tqdm(total=n_vox, desc="fit_maps", unit="voxel", disable=not progress) as bar:
        for sl in chunk_slices(n_vox, chunk_size):
            fx = {p: col[sl] for p, col in plan.fixed.items()} or None
            kw = {"sigma": plan.sigma_vox[sl]} if plan.model.noise_input else {}
            det = estimator.predict_details(features_from_coefficients(plan.c[sl]), fixed=fx, compute_crb=compute_se,
                                            **plan.details_kw, **kw)
            _gather(vox, sl, det, plan, compute_se)
            bar.update(sl.stop - sl.start)
    if vox.estimate is None:  # nothing to fit: ask for the names on an empty batch
        det = estimator.predict_details(np.zeros((0, 2 * plan.c.shape[1])), fixed=None, compute_crb=False)
        vox.estimate, vox.n_free = tuple(det.estimate), int(det.n_free)
        vox.var_unit = np.full((0, len(vox.estimate)), np.nan)
    return vox


def _gather(vox, sl, det, plan, compute_se):
    """Copy one chunk's :class:`PredictionDetails` into the per-voxel arrays."""
    if vox.estimate is None:  # the column names of what the estimator returns, from its first chunk
        n_vox, k = vox.theta.shape[0], len(det.estimate)
        vox.estimate, vox.n_free = tuple(det.estimate), int(det.n_free)
        vox.var_unit = np.full((n_vox, k), np.nan)
        vox.var_fixed = np.zeros((n_vox, k)) if plan.fixed_se else None
    vox.theta[sl] = det.theta
    vox.M0[sl] = det.M0
    vox.res_sq[sl] = np.asarray(det.residual_norm, dtype=float) ** 2
    if det.noise_residual_norm is not None:
        vox.noise_sq[sl] = np.asarray(det.noise_residual_norm, dtype=float) ** 2
    vox.converged[sl] = det.converged
    if compute_se:
        vox.var_unit[sl] = det.crb_unit if det.var_unit is None else det.var_unit
    if plan.fixed_se:  # the fixed maps' errors, through the estimator's sensitivity to them
        S, names = det.fixed_sensitivity, tuple(det.fixed_names)
        if S is None or any(b not in names for b in plan.fixed_se):
            raise ValueError(f"fixed_se: the estimator's predict_details does not report fixed_sensitivity for "
                             f"{sorted(plan.fixed_se)}")
        vox.var_fixed[sl] = fixed_variance(np.asarray(S)[:, :, [names.index(b) for b in plan.fixed_se]],
                                           np.column_stack([col[sl] for col in plan.fixed_se.values()]))


def _flags(vox):
    """Failed voxels (no finite estimate or M0) and the flag bits of the masked voxels."""
    cols = [INDEX[rate_name(p)] for p in vox.estimate]
    # not-converged voxels keep their (flagged) last iterate; only non-finite estimates become NaN
    failed = ~np.all(np.isfinite(vox.theta[:, cols]), axis=1) | ~np.isfinite(vox.M0)
    flags = np.where(~vox.converged | failed, FLAGS["estimator_failed"], 0).astype(np.int16)
    with np.errstate(invalid="ignore"):
        flags |= np.where(_out_of_range(vox.theta) & ~failed, FLAGS["out_of_range"], 0).astype(np.int16)
    return failed, flags


def _given_sigma(sigma, fit_mask):
    """``(sigma per masked voxel, "given" or "given_map")`` of ``fit_maps``' ``sigma``; ``(None, None)`` if not given.

    A map must have the image's spatial shape and be positive and finite in every voxel to fit.
    """
    if sigma is None:
        return None, None
    if np.ndim(sigma) == 0:
        try:
            value = float(sigma)
        except (TypeError, ValueError):
            raise TypeError(f"sigma must be a positive float or a noise map, got {sigma!r}") from None
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        return np.full(int(fit_mask.sum()), value), "given"
    smap = np.asarray(sigma, dtype=np.float64)
    if smap.shape != fit_mask.shape:
        raise ValueError(f"sigma: a noise map must have the image's spatial shape {fit_mask.shape}, got {smap.shape}")
    vals = smap[fit_mask]
    bad = ~(np.isfinite(vals) & (vals > 0))
    if bad.any():
        raise ValueError(f"sigma: the noise map is not positive and finite in {int(bad.sum())} of the "
                         f"{vals.size} voxels to fit")
    return vals, "given_map"


#: Voxels of the first pass that estimates sigma for a noise-aware network, and their chunk (each chunk's
#: network details give the tangent-projected residual of up to 64 voxels).
_FIRST_PASS_VOXELS, _FIRST_PASS_CHUNK = 1024, 128


def _first_pass_sigma(estimator, plan):
    """``(sigma per masked voxel, how)`` for a noise-aware estimator, from up to 1024 evenly spaced voxels.

    Two rounds: the estimator runs at a sigma (the first: the median ``||x||`` over the network's
    typical training SNR), and sigma is pooled from its residuals projected off the model's tangent
    space (:func:`estimate_sigma`), which hold the noise and not the estimate's offset to first order.
    """
    n = plan.c.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, _FIRST_PASS_VOXELS)).astype(int))
    X = features_from_coefficients(plan.c[idx])
    typical = plan.model.typical_snr or 100.0
    sigma = float(np.median(np.linalg.norm(X, axis=1))) / typical
    kw = {"se": "delta"} if "delta" in plan.model.se_methods else {}
    for _ in range(2):
        pool, dof = [], None
        for sl in chunk_slices(idx.size, _FIRST_PASS_CHUNK):
            fx = {p: col[idx[sl]] for p, col in plan.fixed.items()} or None
            det = estimator.predict_details(X[sl], fixed=fx, compute_crb=True, sigma=sigma, **kw)
            noise = det.noise_residual_norm
            r = np.where(np.isfinite(noise), noise, np.nan) if noise is not None else det.residual_norm
            pool.append(np.asarray(r, dtype=float)[np.asarray(det.converged, dtype=bool)] ** 2)
            dof = 2 * plan.c.shape[1] - int(det.n_free)
        sigma = estimate_sigma(np.concatenate(pool), dof)
    return np.full(n, sigma), "noise_residuals_first_pass"


def _noise_level(vox, ok, plan):
    """``(sigma per voxel, how)``: the given (or first-pass) one, else pooled from the residuals of the voxels
    fitted without problems."""
    if plan.sigma_vox is not None:
        return plan.sigma_vox, plan.sigma_method
    # the misfit-free residuals where the estimator gives them (networks), else the residuals
    noise = bool(np.isfinite(vox.noise_sq[ok]).any())
    pool = vox.noise_sq if noise else vox.res_sq
    sigma = estimate_sigma(pool[ok] if ok.any() else pool, 2 * plan.c.shape[1] - vox.n_free)
    return np.full(plan.c.shape[0], float(sigma)), "noise_residuals" if noise else "residuals"


def _assemble(plan, vox, failed, flags, sigma, sigma_method, compute_se, se_choice, times, trusted=None):
    """The :class:`Maps` of the fit: estimates, standard errors, M0, residual, flags and mask on the image grid."""
    est, fit_mask = vox.estimate, plan.fit_mask
    spatial = fit_mask.shape
    se = None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(vox.res_sq) / np.linalg.norm(plan.c, axis=1)
        if compute_se:
            se = np.sqrt(vox.var_unit) * sigma[:, None] / np.abs(vox.M0)[:, None]
            if vox.var_fixed is not None:  # independent errors: variances add (quadrature)
                se = np.sqrt(se**2 + vox.var_fixed)
            flags |= np.where(~np.all(np.isfinite(se), axis=1), FLAGS["singular_crb"], 0).astype(np.int16)

    def to_map(values, dtype=float):
        out = np.zeros(spatial, dtype=dtype)
        out[fit_mask] = values
        return out

    arrays = {p: to_map(np.where(failed, np.nan, _target_values(vox.theta, p))) for p in est}
    arrays["M0_abs"] = to_map(np.where(failed, np.nan, np.abs(vox.M0)))
    arrays["M0_phase"] = to_map(np.where(failed, np.nan, np.angle(vox.M0)))
    units = {p: UNITS[p] for p in est}
    if compute_se:
        for k, p in enumerate(est):
            arrays[p + "_se"] = to_map(np.where(np.isfinite(se[:, k]) & ~failed, se[:, k], np.nan))
        units.update({p + "_se": UNITS[p] for p in est})
    _add_time_maps(arrays, units, vox.theta, se, est, times, failed, to_map)
    arrays["relative_residual"] = to_map(np.where(failed, np.nan, rel))
    units.update(M0_abs="a.u.", M0_phase="rad", relative_residual="1")
    if trusted is not None:
        arrays["trust_chi2"] = to_map(trusted.chi2)
        units["trust_chi2"] = "1"
        if trusted.step is not None:
            arrays["trust_step"] = to_map(trusted.step)
            units["trust_step"] = "SE"
        flags |= np.where(trusted.untrusted, FLAGS["untrusted"], 0).astype(np.int16)
    all_flags = np.where(plan.invalid, FLAGS["invalid_input"], 0).astype(np.int16)
    all_flags[fit_mask] = flags
    arrays["flags"] = all_flags
    arrays["mask"] = fit_mask
    provenance = _provenance(plan, compute_se, se_choice)
    provenance["trust"] = None if trusted is None else trusted.summary()
    # one number for the report: the noise map's median (a scalar sigma is that scalar)
    sigma_value = plan.sigma_scalar if plan.sigma_scalar is not None else float(np.median(sigma))
    return Maps(arrays=arrays, units=units, sigma=sigma_value, sigma_method=sigma_method, estimate=est,
                provenance=provenance, affine=_image_attr(plan, "affine", np.eye(4)),
                header=_image_attr(plan, "header", None))


def _image_attr(plan, name, default):
    return default if plan.image is None else getattr(plan.image, name)


def _provenance(plan, compute_se, se_choice):
    model = plan.model
    se_used = None if not compute_se else (se_choice or model.se_methods[0])
    return {"estimator": plan.model_name, "sequence": model.sequence.name,
            "sequence_sha256": model.sequence.sha256(), "basis_sha256": basis_sha256(model.basis),
            "rank": model.rank, "standard_error": se_used, "fixed": sorted(plan.fixed),
            "fixed_se": sorted(plan.fixed_se)}


def resolve_trust(trust, least_squares):
    """The trust test of a ``fit_maps(trust=)`` choice: ``"residual"``, ``"tangent"`` or None (no trust map).

    ``"auto"`` is the raw residual's chi-squared for an estimator at its least-squares optimum
    (``least_squares``: NLLS), where it is exact and costs nothing, and None for the others (a network's
    or a dictionary's raw residual holds its own error; their test is ``"tangent"``, one Jacobian per voxel).
    """
    if trust is not None and trust != "auto" and trust not in TRUST_METHODS:
        raise ValueError(f"trust must be 'auto', None or one of {TRUST_METHODS}, got {trust!r}")
    if trust == "auto":
        return "residual" if least_squares else None
    return trust


def _trust_names(trust):
    """The trust maps of a ``trust=`` choice (:func:`map_names`)."""
    return () if trust is None else ("trust_chi2", "trust_step") if trust == "tangent" else ("trust_chi2",)


def _trust_settings(trust, alpha, max_step):
    """The checked ``trust=``, ``trust_alpha=``, ``trust_max_step=`` of :func:`fit_maps` (before any work)."""
    if trust is not None and trust not in TRUST_METHODS:
        raise ValueError(f"trust must be None or one of {TRUST_METHODS}, got {trust!r}")
    if not (np.isscalar(alpha) and 0 < float(alpha) < 1):
        raise ValueError(f"trust_alpha must be a p-value in (0, 1), got {alpha!r}")
    if not (np.isscalar(max_step) and float(max_step) > 0):
        raise ValueError(f"trust_max_step must be a positive number of standard errors, got {max_step!r}")
    return {"method": trust, "alpha": float(alpha), "max_step": float(max_step)}


def _trust(plan, vox, failed, sigma, settings, free=None):
    """The trust statistics of the masked voxels (:mod:`sklearn_crb.maps.trust`), once ``sigma`` is known.

    ``"tangent"`` needs the estimator's free parameters: ``free`` (NLLS's ``free_parameters_``) less the
    fixed ones, else the estimated and all other free parameters; where they do not match its ``n_free``
    (it holds nuisance parameters at values it does not report), the raw residual's test is used, the
    step map is NaN and the provenance says so. Without degrees of freedom (``2r <= n_free``) nothing
    can be tested: NaN maps, no flag.
    """
    method = settings["method"]
    if method is None:
        return None
    model = plan.model
    if free is not None:
        free = tuple(p for p in free if p not in plan.fixed)
    free = tangent_parameters(vox.estimate, vox.n_free, tied_R1=model.tied_R1, fixed_names=tuple(plan.fixed),
                              free=free)
    dof = 2 * plan.c.shape[1] - vox.n_free
    ok = ~failed if dof >= 1 else np.zeros_like(failed)
    trusted = trust_statistics(plan.c, vox.theta, vox.M0, vox.res_sq, sigma, dof=max(dof, 1),
                               method="residual" if free is None or dof < 1 else method, sequence=model.sequence,
                               basis=model.basis, free=free, n_est=len(vox.estimate), tied_R1=model.tied_R1,
                               alpha=settings["alpha"], max_step=settings["max_step"], ok=ok)
    if method == "tangent" and trusted.step is None:
        trusted = replace(trusted, step=np.full(len(failed), np.nan))
    return replace(trusted, dof=dof)
