"""CRB-normalised error metrics and scorers (Zhang et al., MRM 2022).

``crb_normalized_mse`` is the paper's loss: the mean over samples of
``(theta_hat - theta)^2 / CRB``. For an unbiased estimator it is ``>= 1`` and
equals 1 for an efficient one; a biased estimator (one leaning on its
training prior at low SNR) can go below 1, so report bias and variance
separately with :func:`bias_variance_report`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import make_scorer
from sklearn.utils import Bunch

__all__ = ["crb_normalized_mse", "crb_efficiency_score", "make_crb_scorer", "bias_variance_report"]

_MULTI = ("raw_values", "uniform_average")


def _as_2d(a, argname):
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
    return _aggregate(np.mean((yp - yt) ** 2 / c, axis=0), multioutput)


def crb_efficiency_score(y_true, y_pred, *, crb, multioutput="uniform_average"):
    """Statistical efficiency: the reciprocal of the CRB-normalised MSE per parameter.

    ``1 / crb_normalized_mse`` is computed for each parameter, then
    aggregated by ``multioutput``. 1 for an efficient unbiased estimator;
    higher is better (values above 1 are possible only for biased
    estimators). Parameters and returns as in :func:`crb_normalized_mse`.
    """
    nmse = crb_normalized_mse(y_true, y_pred, crb=crb, multioutput="raw_values")
    with np.errstate(divide="ignore"):
        eff = np.where(nmse > 0, 1.0 / np.maximum(nmse, np.finfo(float).tiny), np.inf)
    return _aggregate(eff, multioutput)


def _crb_from_simulator(simulator, y_true):
    from sklearn_crb.physics.parameters import INDEX

    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(simulator, "basis_")
    yt = _as_2d(y_true, "y_true")
    est = tuple(simulator.estimate_)
    if yt.shape[1] != len(est):
        raise ValueError(f"y_true has {yt.shape[1]} columns but the simulator estimates {est}")
    theta = np.tile(simulator.prior_.center(), (yt.shape[0], 1))
    theta[:, [INDEX[p] for p in est]] = yt
    return np.asarray(simulator.crb(theta, M0=1.0, sigma=simulator.sigma), dtype=np.float64)


def _crb_score(y_true, y_pred, crb=None, *, metric, simulator, multioutput):
    if crb is None:
        if simulator is None:
            raise ValueError("the CRB scorer needs crb: enable metadata routing and pass crb= (it is requested), "
                             "or build the scorer with make_crb_scorer(simulator=...)")
        crb = _crb_from_simulator(simulator, y_true)
    func = crb_normalized_mse if metric == "normalized_mse" else crb_efficiency_score
    return func(y_true, y_pred, crb=crb, multioutput=multioutput)


def make_crb_scorer(metric="efficiency", *, simulator=None, multioutput="uniform_average", request_crb="auto"):
    """A scorer for ``GridSearchCV(scoring=...)`` / ``cross_validate``.

    Parameters
    ----------
    metric : {"efficiency", "normalized_mse"}
        ``crb_efficiency_score`` (greater is better) or
        ``crb_normalized_mse`` (the scorer returns its negative, sklearn's
        convention for losses).
    simulator : MTFingerprintSimulator, optional
        A fitted simulator that computes the CRB from ``y_true`` (the
        estimated parameters; others at the prior centre) at ``|M0| = 1``
        and its ``sigma``, when no ``crb`` is routed to the scorer.
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
    >>> import sklearn
    >>> sklearn.set_config(enable_metadata_routing=True)  # doctest: +SKIP
    >>> search = GridSearchCV(net.set_fit_request(crb=True), grid, scoring=make_crb_scorer())  # doctest: +SKIP
    >>> search.fit(X, y, crb=crb)  # doctest: +SKIP
    """
    if metric not in ("efficiency", "normalized_mse"):
        raise ValueError(f"metric must be 'efficiency' or 'normalized_mse', got {metric!r}")
    if isinstance(multioutput, str) and multioutput not in _MULTI:
        raise ValueError(f"multioutput must be one of {_MULTI} or weights, got {multioutput!r}")
    scorer = make_scorer(_crb_score, greater_is_better=(metric == "efficiency"), metric=metric,
                         simulator=simulator, multioutput=multioutput)
    if request_crb == "auto":
        import sklearn

        request_crb = bool(sklearn.get_config().get("enable_metadata_routing", False))
    if request_crb:
        scorer = scorer.set_score_request(crb=True)
    return scorer


def bias_variance_report(y_true, y_pred, *, crb, groups=None, names=None):
    """Bias and variance relative to the CRB over repeated noise draws.

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
        Shaped like ``y_true``. A group's CRB is the mean of its rows'
        (identical when only the noise differs between draws).
    groups : array_like (n_samples,), optional
        Group label of each row for 2-D input; default: rows with identical
        ``y_true`` form a group.
    names : sequence of str, optional
        Parameter names for the table (default ``y0, y1, ...``).

    Returns
    -------
    report : sklearn.utils.Bunch
        Arrays per true parameter vector (shape (n_theta, n_outputs)):
        ``theta``, ``crb``, ``mean``, ``bias``, ``variance``,
        ``bias_over_sqrt_crb``, ``std_over_sqrt_crb``, ``variance_over_crb``,
        ``normalized_mse`` (mean over draws of (est - theta)^2/CRB), and
        ``n_draws`` (n_theta,). ``summary`` holds per-parameter aggregates
        (``median_abs_bias_over_sqrt_crb``, ``mean_variance_over_crb``,
        ``mean_normalized_mse``); ``table`` is the tidy table (one record per
        parameter and statistic, ``parameter``/``statistic``/``value``), and
        ``to_string()`` formats it.
    """
    yp = np.asarray(y_pred, dtype=np.float64)
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
        p = yt.shape[1]
    n_draws = np.array([s.shape[0] for s in stacks])
    if np.any(n_draws < 2):
        raise ValueError("every true parameter vector needs at least 2 noise draws to estimate a variance")
    mean = np.array([s.mean(0) for s in stacks])
    var = np.array([s.var(0, ddof=1) for s in stacks])
    nmse = np.array([((s - t) ** 2).mean(0) for s, t in zip(stacks, theta)]) / crbg
    bias = mean - theta
    names = tuple(names) if names is not None else tuple(f"y{j}" for j in range(p))
    if len(names) != p:
        raise ValueError(f"names has {len(names)} entries for {p} outputs")
    b_rel = bias / np.sqrt(crbg)
    summary = {
        "median_abs_bias_over_sqrt_crb": np.median(np.abs(b_rel), axis=0),
        "mean_variance_over_crb": (var / crbg).mean(0),
        "median_std_over_sqrt_crb": np.median(np.sqrt(var / crbg), axis=0),
        "mean_normalized_mse": nmse.mean(0),
    }
    table = [{"parameter": n, "statistic": k, "value": float(v[j])}
             for j, n in enumerate(names) for k, v in summary.items()]

    def to_string():
        w = max(len(n) for n in names + ("parameter",))
        head = f"{'parameter':<{w}}  " + "  ".join(f"{k:>30}" for k in summary)
        rows = [f"{n:<{w}}  " + "  ".join(f"{summary[k][j]:>30.4g}" for k in summary) for j, n in enumerate(names)]
        return "\n".join([head, *rows])

    return Bunch(theta=theta, crb=crbg, mean=mean, bias=bias, variance=var, bias_over_sqrt_crb=b_rel,
                 std_over_sqrt_crb=np.sqrt(var / crbg), variance_over_crb=var / crbg, normalized_mse=nmse,
                 n_draws=n_draws, names=names, summary=summary, table=table, to_string=to_string)
