"""CRB-normalised error metrics and scorers (Zhang et al., MRM 2022).

``crb_normalized_mse`` is the paper's loss: the mean over samples of
``(theta_hat - theta)^2 / CRB``. For an unbiased estimator it is ``>= 1`` and
equals 1 for an efficient one; a biased estimator (one leaning on its
training prior at low SNR) can go below 1, so report bias and variance
separately with :func:`bias_variance_report`, stratified by SNR and by
identifiability (the CRB against the prior variance), and beside the trivial
estimator that predicts the prior mean (:func:`constant_predictor_report`):
where the CRB exceeds the prior variance, that constant already scores
``nMSE < 1``.

Edge cases: every score is a finite float or a clear ``ValueError``. CRBs must
be positive normal floats (a subnormal CRB is refused: its reciprocal
overflows), inputs real (complex arrays are refused, not truncated), and a
normalised squared error beyond the float64 range is refused. The efficiency
of several parameters is the reciprocal of their mean normalised MSE, so one
perfectly predicted parameter cannot make it infinite.
"""

from __future__ import annotations

import numpy as np
import sklearn
from sklearn.metrics import make_scorer

from sklearn_crb._report import snr_per_group, stratified_report
from sklearn_crb.physics.parameters import INDEX
from sklearn_crb.simulator import unpack_targets

__all__ = ["crb_normalized_mse", "crb_efficiency_score", "make_crb_scorer", "MissingCRBError",
           "bias_variance_report", "constant_predictor_report", "prior_moments"]

_MULTI = ("raw_values", "uniform_average")


def _as_2d(a, argname):
    if np.iscomplexobj(a):
        raise TypeError(f"{argname} must be real, got a complex array (pass the real parameters, not coefficients)")
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a real numeric array") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{argname} must be 1-D or 2-D (n_samples, n_outputs), got shape {arr.shape}")
    return arr


def _check_inputs(y_true, y_pred, crb):
    if crb is None:
        raise ValueError("crb is required: pass the per-sample Cramér–Rao bounds (shape of y_true)")
    yt, yp, c = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred"), _as_2d(crb, "crb")
    if yp.shape != yt.shape:
        raise ValueError(f"y_pred must have the shape of y_true {yt.shape}, got {yp.shape}")
    if c.shape != yt.shape:
        raise ValueError(f"crb must have the shape of y_true {yt.shape}, got {c.shape}")
    if yt.shape[0] == 0:
        raise ValueError("y_true has no samples")
    for name, a in (("y_true", yt), ("y_pred", yp), ("crb", c)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains non-finite values")
    if np.any(c <= 0):
        raise ValueError("crb must be strictly positive")
    if np.any(c < np.finfo(np.float64).tiny):
        raise ValueError(f"crb has subnormal values (below {np.finfo(np.float64).tiny:.3g}): such a bound is "
                         "degenerate; drop those samples")
    return yt, yp, c


def _aggregate(values, multioutput):
    if isinstance(multioutput, str):
        if multioutput not in _MULTI:
            raise ValueError(f"multioutput must be one of {_MULTI} or an array of weights, got {multioutput!r}")
        return values if multioutput == "raw_values" else float(values.mean())
    w = np.asarray(multioutput, dtype=np.float64)
    if w.shape != values.shape:
        raise ValueError(f"multioutput weights must have shape {values.shape}, got {w.shape}")
    return float(np.average(values, weights=w))


def crb_normalized_mse(y_true, y_pred, *, crb, multioutput="uniform_average"):
    """Mean of ``(y_pred - y_true)^2 / crb``: the CRB-normalised MSE (paper's loss).

    Parameters
    ----------
    y_true, y_pred : array_like, shape (n_samples,) or (n_samples, n_outputs)
        True and estimated parameters (SI units).
    crb : array_like, same shape
        Per-sample Cramér–Rao bounds (squared SI units) at each sample's
        ``|M0|`` and noise level.
    multioutput : "uniform_average", "raw_values" or array of weights
        Average over parameters, return one value per parameter, or a
        weighted average.

    Returns
    -------
    float or ndarray (n_outputs,)
        1 for an efficient unbiased estimator; lower is better.
    """
    yt, yp, c = _check_inputs(y_true, y_pred, crb)
    with np.errstate(over="ignore"):
        values = np.mean((yp - yt) ** 2 / c, axis=0)
    if not np.all(np.isfinite(values)):
        raise ValueError("the CRB-normalised squared errors overflow float64 (errors over 1e154 x sqrt(CRB))")
    return _aggregate(values, multioutput)


def crb_efficiency_score(y_true, y_pred, *, crb, multioutput="uniform_average"):
    """Statistical efficiency: the reciprocal of the CRB-normalised MSE.

    1 for an efficient unbiased estimator; higher is better (values above 1
    are possible only for biased estimators). Per parameter
    (``"raw_values"``) it is ``1 / nMSE_p``; aggregated (``"uniform_average"``
    or weights) it is ``1 / (weighted mean of nMSE_p)``, the weighted harmonic
    mean of the per-parameter efficiencies: a parameter predicted perfectly
    cannot make the score infinite. A zero nMSE counts as the smallest
    normal float64, so the score is always finite (at most ~4.5e307).
    Parameters as in :func:`crb_normalized_mse`.
    """
    nmse = crb_normalized_mse(y_true, y_pred, crb=crb, multioutput="raw_values")
    tiny = np.finfo(np.float64).tiny
    if isinstance(multioutput, str) and multioutput == "raw_values":
        return 1.0 / np.maximum(nmse, tiny)
    return 1.0 / max(_aggregate(nmse, multioutput), tiny)


class MissingCRBError(BaseException):
    """A CRB scorer was called without the per-sample CRB of the test samples.

    It derives from ``BaseException``, not ``Exception``, on purpose:
    scikit-learn's searches and ``cross_validate`` turn every ``Exception`` a
    scorer raises into a NaN score with only a warning (their default
    ``error_score=np.nan``), and a search whose every candidate scores NaN
    picks one arbitrarily. A missing CRB is a mistake in the call, never a
    property of one candidate, so it stops the search.
    """


def _crb_score(y_true, y_pred, crb=None, *, metric, multioutput):
    y_true, packed = unpack_targets(np.asarray(y_true))
    crb = packed if crb is None else crb
    if crb is None:
        raise MissingCRBError("the CRB scorer sees no per-sample CRB: pack it with the targets "
                         "(y = sklearn_crb.simulator.pack_targets(y, crb), which every CV fold slices), or enable "
                         "metadata routing (sklearn.set_config(enable_metadata_routing=True)) and pass crb= (the "
                         "scorer requests it). Without routing, fit(X, y, crb=crb) gives the CRB to the fit only")
    func = crb_normalized_mse if metric == "normalized_mse" else crb_efficiency_score
    return func(y_true, y_pred, crb=crb, multioutput=multioutput)


def make_crb_scorer(metric="efficiency", *, simulator=None, multioutput="uniform_average", request_crb="auto"):
    """A scorer for ``GridSearchCV(scoring=...)`` / ``cross_validate``.

    The per-sample CRB of the test samples comes either packed with the
    targets (``y = simulator.pack_targets(y, crb)``: works without metadata
    routing, the folds slice it) or as routed metadata (``crb=``). Without
    either the scorer raises; sklearn's searches turn scorer errors into NaN
    scores with only a warning, so pass ``error_score="raise"``.

    Parameters
    ----------
    metric : {"efficiency", "normalized_mse"}
        ``crb_efficiency_score`` (greater is better) or
        ``crb_normalized_mse`` (the scorer returns its negative, sklearn's
        convention for losses).
    simulator : None
        Removed: a CRB computed from ``y_true`` alone (nuisance parameters at
        the prior centre, ``|M0| = 1``) was off by factors 0.02-35. Passing
        one raises ``ValueError``.
    multioutput : "uniform_average", "raw_values" or weights
        ``"raw_values"`` is not valid for model selection.
    request_crb : "auto", bool
        Request ``crb`` as score metadata (``set_score_request(crb=True)``);
        "auto": when sklearn's metadata routing is enabled at creation.

    Returns
    -------
    scorer : callable ``scorer(estimator, X, y_true, crb=None)``

    Examples
    --------
    >>> from sklearn_crb.simulator import pack_targets
    >>> search = GridSearchCV(net, grid, scoring=make_crb_scorer(), error_score="raise")  # doctest: +SKIP
    >>> search.fit(X, pack_targets(y, crb))  # doctest: +SKIP
    """
    if simulator is not None:
        raise ValueError("make_crb_scorer(simulator=) was removed: its CRB (from y_true alone, nuisance parameters "
                         "at the prior centre, |M0| = 1) was wrong. Pass the per-sample CRB from make_dataset "
                         "packed with the targets (sklearn_crb.simulator.pack_targets(y, crb)) or routed as crb=")
    if metric not in ("efficiency", "normalized_mse"):
        raise ValueError(f"metric must be 'efficiency' or 'normalized_mse', got {metric!r}")
    if isinstance(multioutput, str) and multioutput not in _MULTI:
        raise ValueError(f"multioutput must be one of {_MULTI} or weights, got {multioutput!r}")
    scorer = make_scorer(_crb_score, greater_is_better=(metric == "efficiency"), metric=metric,
                         multioutput=multioutput)
    if request_crb == "auto":
        request_crb = bool(sklearn.get_config().get("enable_metadata_routing", False))
    if request_crb:
        scorer = scorer.set_score_request(crb=True)
    return scorer


def prior_moments(prior, names, *, n_samples=200_000, random_state=0):
    """Monte-Carlo mean and variance of parameters under a prior.

    Parameters
    ----------
    prior : ParameterPrior
        Anything with ``sample(n, random_state)`` returning ``theta`` of
        shape (n, 8) in ``PARAMETERS`` order (rejections such as
        ``R2f > R1f`` are part of the prior, hence the sampling).
    names : sequence of str
        Parameter names (``"m0s"``, ``"R1f"``, ...).
    n_samples : int, default 200000
    random_state : int, default 0

    Returns
    -------
    mean, variance : ndarray (len(names),)
        The prior mean is the constant with the smallest expected squared
        error; the variance is the scale of identifiability: a parameter is
        informed by the data where its CRB is well below it.
    """
    unknown = [n for n in names if n not in INDEX]
    if unknown:
        raise ValueError(f"names must be parameter names {tuple(INDEX)}, got unknown {unknown}")
    theta = np.asarray(prior.sample(int(n_samples), random_state), dtype=np.float64)
    cols = theta[:, [INDEX[n] for n in names]]
    return cols.mean(0), cols.var(0)


def bias_variance_report(y_true, y_pred, *, crb, groups=None, names=None, prior_variance=None, snr=None,
                         snr_bins=None, informative_ratio=0.1):
    """Bias and variance relative to the CRB over repeated noise draws, stratified.

    For every true parameter vector (a *group* of noise draws) it computes
    the bias, the standard deviation and the CRB-normalised MSE of the
    estimates, each relative to that vector's CRB. An nMSE below 1 is not
    efficiency: a biased estimator that leans on its training prior gets
    there wherever the CRB exceeds the prior variance. So the report also
    splits the thetas into strata: by SNR and by identifiability,
    "informative" where ``CRB < informative_ratio * prior_variance`` (the
    data decide; a constant prior-mean predictor scores ``nMSE >= 1 /
    informative_ratio`` on average there) and "prior-dominated" otherwise.

    Parameters
    ----------
    y_true : array_like
        ``(n_theta, n_outputs)`` when ``y_pred`` is 3-D, else
        ``(n_samples, n_outputs)`` (one row per draw).
    y_pred : array_like
        ``(n_theta, n_draws, n_outputs)``: estimates from ``n_draws`` noise
        realisations of each true parameter vector; or ``(n_samples,
        n_outputs)`` with ``groups``.
    crb : array_like
        Shaped like ``y_true``, at each draw's own ``|M0|`` and noise level.
        A group's CRB is the mean of its rows' (identical when only the
        noise differs between draws).
    groups : array_like (n_samples,), optional
        Group label of each row for 2-D input; default: rows with identical
        ``y_true`` form a group. Draws at different SNRs belong in different
        groups.
    names : sequence of str, optional
        Parameter names for the table (default ``y0, y1, ...``).
    prior_variance : array_like (n_outputs,), optional
        Variance of each parameter under the training prior
        (:func:`prior_moments`); enables the identifiability strata.
    snr : float or array_like, optional
        ``|M0|/sigma`` per true parameter vector (3-D input) or per row
        (2-D input; constant within a group); enables the SNR strata.
    snr_bins : array_like, optional
        Increasing SNR bin edges (``[lo, hi)``, the last bin closed); groups
        outside every bin are only in the "all" stratum. Default: one stratum
        per distinct SNR value (at most 12).
    informative_ratio : float, default 0.1
        The identifiability threshold on ``CRB / prior_variance``.

    Returns
    -------
    report : sklearn.utils.Bunch
        Arrays per true parameter vector (shape (n_theta, n_outputs)):
        ``theta``, ``crb``, ``mean``, ``bias``, ``variance``,
        ``bias_over_sqrt_crb``, ``std_over_sqrt_crb``, ``variance_over_crb``,
        ``normalized_mse`` (mean over draws of (est - theta)^2/CRB),
        ``informative`` (bool, or None without ``prior_variance``); ``snr``
        (n_theta,) or None and ``n_draws`` (n_theta,). ``summary`` holds
        per-parameter aggregates over all groups
        (``median_abs_bias_over_sqrt_crb``, ``median_bias_over_sqrt_crb``,
        ``mean_variance_over_crb``, ``median_std_over_sqrt_crb``,
        ``mean_normalized_mse``). ``strata`` is a list of records, one per
        parameter, SNR stratum (``"all"`` and each level) and identifiability
        (``"all"``, ``"informative"``, ``"prior-dominated"``), with
        ``n_theta``, ``n_samples``, ``normalized_mse`` (mean over its thetas,
        each theta weighted equally), ``median_abs_bias_over_sqrt_crb``,
        ``median_bias_over_sqrt_crb`` and ``median_std_over_sqrt_crb``
        (None for an empty stratum). ``table`` is the tidy summary
        (``parameter``/``statistic``/``value``); ``to_string()`` formats the
        summary and ``to_markdown()`` the strata.
    """
    if np.iscomplexobj(y_pred):
        raise TypeError("y_pred must be real, got a complex array")
    yp = np.asarray(y_pred, dtype=np.float64)
    labels = order = None
    if yp.ndim == 3:
        yt, c = _as_2d(y_true, "y_true"), _as_2d(crb, "crb")
        n_theta, n_draws, p = yp.shape
        if yt.shape != (n_theta, p) or c.shape != (n_theta, p):
            raise ValueError(f"for y_pred of shape {yp.shape}, y_true and crb must have shape {(n_theta, p)}, "
                             f"got {yt.shape} and {c.shape}")
        _check_inputs(yt, yp[:, 0], c)
        if not np.all(np.isfinite(yp)):
            raise ValueError("y_pred contains non-finite values")
        stacks = [yp[i] for i in range(n_theta)]
        theta, crbg = yt, c
    else:
        yt, yp2, c = _check_inputs(y_true, y_pred, crb)
        if groups is None:
            _, labels = np.unique(yt, axis=0, return_inverse=True)
        else:
            labels = np.asarray(groups).ravel()
            if labels.shape[0] != yt.shape[0]:
                raise ValueError(f"groups must have one label per row ({yt.shape[0]}), got {labels.shape[0]}")
            _, labels = np.unique(labels, return_inverse=True)
        labels = labels.ravel()
        order = np.unique(labels)
        stacks = [yp2[labels == g] for g in order]
        theta = np.array([yt[labels == g].mean(0) for g in order])
        crbg = np.array([c[labels == g].mean(0) for g in order])
    n_draws = np.array([s.shape[0] for s in stacks])
    if np.any(n_draws < 2):
        raise ValueError("every true parameter vector needs at least 2 noise draws to estimate a variance")
    mean = np.array([s.mean(0) for s in stacks])
    var = np.array([s.var(0, ddof=1) for s in stacks])
    nmse = np.array([((s - t) ** 2).mean(0) for s, t in zip(stacks, theta)]) / crbg
    snr_g = snr_per_group(snr, labels, order, theta.shape[0])
    return stratified_report(theta, crbg, mean, var, nmse, n_draws, names, prior_variance=prior_variance,
                             snr_g=snr_g, snr_bins=snr_bins, informative_ratio=informative_ratio)


def constant_predictor_report(y_true, constant, *, crb, names=None, prior_variance=None, snr=None, snr_bins=None,
                              informative_ratio=0.1):
    """The report of :func:`bias_variance_report` for an estimator that ignores the data.

    Predicting one constant (the prior mean, from :func:`prior_moments`, is
    the best one in expected squared error) has zero variance and bias
    ``constant - theta``, so its CRB-normalised MSE is
    ``(constant - theta)^2 / CRB`` per theta, whatever the noise: averaged
    over the prior it is about ``prior_variance / CRB``. It is the floor that
    an nMSE must be judged against: below 1 where the CRB exceeds the prior
    variance, at least ``1 / informative_ratio`` on average where the data
    are informative.

    Parameters
    ----------
    y_true : array_like (n_theta, n_outputs)
        One row per true parameter vector.
    constant : array_like (n_outputs,)
        The constant prediction (SI units).
    crb : array_like (n_theta, n_outputs)
        CRB of each row at its SNR.
    names, prior_variance, snr, snr_bins, informative_ratio
        As in :func:`bias_variance_report` (``snr`` per row).

    Returns
    -------
    report : sklearn.utils.Bunch
        As :func:`bias_variance_report`, with ``variance`` 0 and
        ``n_draws`` 1 per row.
    """
    yt, c = _as_2d(y_true, "y_true"), _as_2d(crb, "crb")
    k = np.asarray(constant, dtype=np.float64).ravel()
    if k.shape != (yt.shape[1],) or not np.all(np.isfinite(k)):
        raise ValueError(f"constant must be {yt.shape[1]} finite values (one per output), got {constant!r}")
    yp = np.broadcast_to(k, yt.shape)
    yt, yp, c = _check_inputs(yt, yp, c)
    nmse = (yp - yt) ** 2 / c
    snr_g = snr_per_group(snr, None, None, yt.shape[0])
    return stratified_report(yt, c, np.array(yp), np.zeros_like(yt), nmse, np.ones(yt.shape[0], dtype=int), names,
                             prior_variance=prior_variance, snr_g=snr_g, snr_bins=snr_bins,
                             informative_ratio=informative_ratio)
