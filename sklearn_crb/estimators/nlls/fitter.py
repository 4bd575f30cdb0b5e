"""``NLLSFitter``: bounded Levenberg–Marquardt fits of MT fingerprints, batched over voxels.

The reference estimator of the field and the baseline of Zhang et al. (MRM
2022): nonlinear least squares of the generalized-Bloch model (Assländer et
al., MRM 2022),

    min_{theta, M0}  || y - M0 * g(theta) ||^2,     g(theta) = U^H s(theta)

(``U = I`` for the full signal), with box bounds on ``theta``, as
``fit_gBloch`` of MRIgeneralizedBloch.jl. The complex ``M0`` is projected
out (variable projection, Golub & Pereyra 1973); the batched solver lives in
:mod:`sklearn_crb.estimators.nlls.solver`. This module is the scikit-learn estimator:
declared parameter validation, bounds and starts, chunking over
:mod:`joblib` (``joblib.parallel_config(backend="dask")`` spreads a volume over
a ``dask.distributed`` cluster), and the ``predict_details`` protocol.
"""

from __future__ import annotations

import dataclasses
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

import sklearn_crb.estimators.nlls.solver as _lm
from sklearn_crb._model import ModelMixin, fitted_model
from sklearn_crb._validation import chunk_slices
from sklearn_crb.crb import IllConditionedFisherWarning, crb_from_jacobian
from sklearn_crb.estimators._base import (
    DEFAULT_BOUNDS,
    DEFAULT_START,
    MODEL_PARAMETER_CONSTRAINTS,
    POSITIVE_INT,
    POSITIVE_REAL,
    _IntInterval,
    as_complex_data,
    fit_box,
    init_start_values,
    model_estimator_tags,
    r2sl_range,
    resolve_fixed,
    robust_norm,
    start_values,
)
from sklearn_crb.estimators.details import PredictionDetails
from sklearn_crb.estimators.dictionary import DictionaryMatcher
from sklearn_crb.estimators.fixed_sensitivity import model_sensitivity
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, SCALE, free_parameters, validate_theta

__all__ = ["NLLSFitter", "NLLSFitWarning", "STATUS", "DEFAULT_START", "DEFAULT_BOUNDS"]

#: Per-voxel status codes of ``predict_details`` (see :mod:`sklearn_crb.estimators.nlls.solver`).
STATUS = _lm.STATUS

class NLLSFitWarning(UserWarning):
    """Some voxels did not converge or could not be fitted (see ``predict_details``)."""


class NLLSFitter(ModelMixin, RegressorMixin, BaseEstimator):
    """Nonlinear least-squares fits of MT fingerprints (bounded LM, variable projection).

    The model (sequence, compression basis, free/fixed parameters, bounds,
    starts) lives in the constructor, as in DIPY models; ``fit`` only
    validates it; ``predict`` fits each voxel.

    Parameters
    ----------
    sequence : Sequence or None
        The pulse train (``None``: ``Sequence.default()``).
    basis : array_like, complex, shape (n_pulses, r), optional
        Orthonormal compression basis ``U``; the data are the coefficients
        ``c = U^H s``. ``None``: fit the full signal.
    estimate : tuple of str
        Parameters that ``predict`` returns (in ``PARAMETERS`` order). All
        parameters that are not ``fixed`` are fitted; the others are nuisance.
    fixed : dict, optional
        ``{name: value}`` (SI units) of parameters held fixed (e.g. a known
        ``B1``). Cannot overlap ``estimate``.
    tied_R1 : bool
        The R1s = R1f model ("R1f" names the single R1).
    bounds : dict, optional
        ``{name: (low, high)}`` overriding ``DEFAULT_BOUNDS`` (SI units).
        Bounds must lie in ``parameters.BOUNDS``; T2s and B1 must keep the
        R2sl lookup inside its table (TRF/T2s in [1, 150], B1 <= 1.4).
    start : None, "default", "grid", "dictionary", dict or array_like
        ``None``/``"default"``: ``DEFAULT_START`` (the Julia defaults); a dict
        overrides some of them; an array (8,) is one start, (n_starts, 8) a
        multi-start (best cost kept); ``"grid"``: 8 starts, m0s, R1f and R2f
        at two levels each; ``"dictionary"``: a :class:`DictionaryMatcher`
        match (built in ``fit`` from ``n_dictionary`` prior draws).
    init : estimator, optional
        A fitted estimator whose ``predict(X)`` seeds the fit (e.g. a
        ``CRBNetRegressor``). Its outputs are the parameters named by its
        ``estimate_`` (else a network's ``target_names_``, else ``estimate``;
        times such as T1f in s start their rates); the other parameters start
        from ``start``. Overrides ``start``. An ``init`` that declares its model
        (a network trained with a simulator or loaded, another NLLS or
        dictionary estimator) must have this fitter's sequence and basis, and
        take no measured inputs. A noise-aware network (``noise_input=True``)
        gets the noise level ``sigma`` (``predict_details(X, sigma=)``, else
        this fitter's ``sigma``) as its noise column.
    prior : ParameterPrior, "parenchyma", "paper2022" or None
        Prior for the dictionary start (``None``: parenchyma, tied if
        ``tied_R1``).
    n_dictionary : int
        Dictionary atoms for ``start="dictionary"``.
    n_starts : int
        With ``start="dictionary"``: fit from the ``n_starts`` best-matching
        atoms and keep the lowest cost (a data-driven multi-start).
    sigma : float, optional
        Noise standard deviation per real component of the data, for the
        standard errors. ``None``: estimated per voxel from the residual,
        ``||r|| / sqrt(2K - p - 2)``.
    max_iter : int
        LM iterations per voxel (LsqFit: 100).
    gtol, xtol, ftol : float
        Convergence on the projected gradient (inf-norm), the step
        (``||dx|| < xtol (xtol + ||x||)``) and the relative cost decrease of
        an accepted step; all in the solver's normalised units.
    se_tol : float
        Also converged when an accepted step moves every parameter by less
        than ``se_tol`` standard errors (``(J^T J)^-1``, residual variance),
        or when the undamped Gauss–Newton step (the distance to the minimum)
        is below ``se_tol / 10`` of them, before any trial step (a start at
        the optimum costs one Jacobian). 0 disables it; on noiseless data the
        numerical tolerances decide.
    lambda0 : float
        Initial damping (LsqFit: 10). From a good start (``init``) ``1e-3``
        trusts it: 25 % fewer Jacobians on v3.2 (benchmarks/bench_nlls.py).
    damping : {"lsqfit", "nielsen"}
        LsqFit's update (x0.1 after a gain ratio > 0.75, x10 on a rejection)
        or Nielsen's (1999) ``lambda *= max(1/3, 1 - (2 rho - 1)^3)`` and a
        doubling factor on failure (default; 2-4x fewer iterations on v3.2).
    jacobian_reuse : int
        Up to this many consecutive accepted steps update the Jacobian by
        Broyden's rank-one formula instead of evaluating it (0: exact at every
        step). Stops are confirmed, and the CRB computed, with exact Jacobians.
    geodesic : bool
        Geodesic acceleration of each step (Transtrum & Sethna, arXiv
        1201.5885; one extra model evaluation per step).
    secant : bool
        Add NL2SOL's secant estimate of the second-order term (Dennis, Gay &
        Welsch 1981), and the curvature that rejected trials measure, to J^T J.
    final_step : bool
        At the statistical stop, take the last Gauss–Newton step (the
        remaining distance) where it lowers the cost: one simulation, and a
        Jacobian only where it moved more than ``se_tol`` standard errors
        (elsewhere the CRB's is at most that far away).
    backend : {"auto", "numba", "torch"}
        Physics backend (see :func:`sklearn_crb.physics.jacobian`).
    device : str
        Torch device of the solver (``"cpu"``, ``"cuda"``: torch physics).
    chunk_size : int
        Voxels per joblib task (bounds memory; the unit of parallel work).
    n_jobs : int or None
        joblib workers (``None``: the active ``joblib.parallel_config``).
    progress : bool
        Show a tqdm bar over voxels.
    random_state : int or None
        Seed of the dictionary start.

    Attributes
    ----------
    sequence_ : Sequence
    basis_ : ndarray or None
    estimate_ : tuple of str
    free_parameters_ : tuple of str
        Fitted parameters, in solver order.
    bounds_ : dict
        Effective ``{name: (low, high)}`` of the free parameters.
    starts_ : ndarray (n_starts, 8)
        Start values (ignored where ``init`` or the dictionary seeds).
    dictionary_ : DictionaryMatcher or None
    n_features_in_ : int
        ``2 K`` real features: ``[Re c, Im c]`` (K = rank or n_pulses).

    Notes
    -----
    The solver and the variable projection are described in the module
    docstring of :mod:`sklearn_crb.estimators.nlls.solver`. ``predict_details``
    returns per-voxel flags; failed voxels (non-finite or all-zero input,
    invalid fixed values, non-finite model or output, no convergence within
    ``max_iter``) are kept, flagged and warned about with
    :class:`NLLSFitWarning`: ``predict`` returns NaN only for voxels that
    cannot be fitted, and the last iterate for the others. Each voxel is
    scaled to unit norm before the solve (without overflow, so data scaled by
    1e+-160 fit like any other) and ``M0`` is scaled back.

    Examples
    --------
    >>> from sklearn_crb import Sequence
    >>> from sklearn_crb.estimators.nlls import NLLSFitter
    >>> from sklearn_crb.physics import simulate
    >>> seq = Sequence.default(n_pulses=120)
    >>> theta = [[0.15, 0.5, 15.0, 30.0, 3.0, 12e-6, 50.0, 0.9]]
    >>> s = 0.8 * simulate(seq, theta)
    >>> nlls = NLLSFitter(seq, fixed={"omega0": 50.0, "B1": 0.9}).fit()
    >>> m0s_R1f_R2f = nlls.predict(s)
    """

    _parameter_constraints: dict = {
        **MODEL_PARAMETER_CONSTRAINTS,
        "bounds": [dict, None],
        "start": [StrOptions({"default", "grid", "dictionary"}), dict, "array-like", None],
        "init": [HasMethods(["predict"]), None],
        "n_dictionary": [POSITIVE_INT],
        "n_starts": [POSITIVE_INT],
        "sigma": [POSITIVE_REAL, None],
        "max_iter": [POSITIVE_INT], "gtol": [POSITIVE_REAL], "xtol": [POSITIVE_REAL], "ftol": [POSITIVE_REAL],
        "se_tol": [Interval(Real, 0, np.inf, closed="left")],
        "lambda0": [POSITIVE_REAL],
        "damping": [StrOptions({"lsqfit", "nielsen"})],
        "jacobian_reuse": [_IntInterval(Integral, 0, None, closed="left")],
        "geodesic": ["boolean"], "secant": ["boolean"], "final_step": ["boolean"],
        "device": [str, torch.device],
        "progress": ["boolean"],
    }

    def __init__(self, sequence=None, basis=None, estimate=("m0s", "R1f", "R2f"), fixed=None, tied_R1=False,
                 bounds=None, start=None, init=None, prior=None, n_dictionary=2000, n_starts=1, sigma=None,
                 max_iter=100, gtol=1e-10, xtol=1e-8, ftol=1e-10, se_tol=1e-2, lambda0=1.0, damping="nielsen",
                 jacobian_reuse=0, geodesic=False, secant=False, final_step=False, backend="auto", device="cpu",
                 chunk_size=256, n_jobs=None, progress=False, random_state=None):
        self.sequence, self.basis, self.estimate, self.fixed = sequence, basis, estimate, fixed
        self.tied_R1 = tied_R1
        self.bounds = bounds
        self.start = start
        self.init = init
        self.prior = prior
        self.n_dictionary = n_dictionary
        self.n_starts = n_starts
        self.sigma = sigma
        self.max_iter = max_iter
        self.gtol, self.xtol, self.ftol, self.se_tol = gtol, xtol, ftol, se_tol
        self.lambda0, self.damping = lambda0, damping
        self.jacobian_reuse, self.geodesic, self.secant = jacobian_reuse, geodesic, secant
        self.final_step, self.backend, self.device = final_step, backend, device
        self.chunk_size, self.n_jobs = chunk_size, n_jobs
        self.progress = progress
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Validate the model (cheap; ``start="dictionary"`` also builds the dictionary).

        Parameters
        ----------
        X : array_like, optional
            Data of the shape ``predict`` takes, only checked.
        y : ignored

        Returns
        -------
        self
        """
        seq, self.basis_ = self._resolve_model()
        K = seq.n_pulses if self.basis_ is None else self.basis_.shape[1]
        free = tuple(p for p in free_parameters(self.tied_R1) if p not in self.fixed_)
        if not free:
            raise ValueError("fixed leaves no parameter to fit")
        if 2 * K < len(free) + 2:
            raise ValueError(f"the model has {len(free)} parameters plus complex M0 but the data only {2 * K} "
                             f"real values (basis rank {K}); fix parameters or use a larger basis")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda', "
                             f"got {self.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        self.free_parameters_ = free
        self.bounds_ = fit_box(seq, free, self.bounds)
        for name, v in self.fixed_.items():
            validate_theta(np.array([[v if p == name else DEFAULT_START[p] for p in PARAMETERS]]), "fixed")
        self.starts_ = start_values(self.start, self.fixed_, self.tied_R1)
        if self.init is not None:
            self._check_init()
        self.dictionary_ = None
        if self.init is None and self.start == "dictionary":
            self.dictionary_ = DictionaryMatcher(
                seq, basis=self.basis_, estimate=free, tied_R1=self.tied_R1, fixed=self.fixed_,
                prior=self.prior, n_atoms=self.n_dictionary, backend=self.backend,
                random_state=self.random_state).fit()
        self.n_features_in_ = 2 * K
        if X is not None:
            as_complex_data(self, X, seq.n_pulses, self.basis_)
        return self

    def _check_init(self):
        """Refuse an ``init`` estimator of another sequence or basis, or one that needs measured inputs."""
        check_is_fitted(self.init)
        try:
            theirs = fitted_model(self.init, "init")
        except (TypeError, ValueError):
            return  # it declares no model (a plain regressor on the features): nothing to compare
        if theirs.measured:
            raise ValueError(f"init: the network takes measured {list(theirs.measured)} as inputs and cannot "
                             "start NLLS (its predict needs them); give a network without measured inputs")
        self.fitted_model().check_same_acquisition(theirs, "init")

    # ------------------------------------------------------------- predict
    def _initial(self, X, y, free, base, sigma=None):
        """Scaled starts (n, n_starts, p) of the free parameters ``free``; ``base`` (n, 8) fixed values."""
        n = y.shape[0]
        idx = [INDEX[q] for q in free]
        if self.init is not None:
            th = np.repeat(self.starts_[:1], n, axis=0)
            for q, v in init_start_values(self.init, X, self.estimate_, sigma).items():
                if q in free:
                    th[:, INDEX[q]] = np.where(np.isfinite(v), v, th[:, INDEX[q]])
            th = th[:, None, :]
        elif self.dictionary_ is not None:
            det = self.dictionary_.predict_details(y, n_best=int(self.n_starts), compute_crb=False)
            th = det.theta_best if self.n_starts > 1 else det.theta[:, None, :]
        else:
            th = np.broadcast_to(self.starts_[None], (n,) + self.starts_.shape)
        scale = np.array([SCALE[q] for q in free])
        lo = np.array([self.bounds_[q][0] for q in free])
        hi = np.array([self.bounds_[q][1] for q in free])
        return np.clip(th[..., idx], lo, hi) / scale

    def _problem(self, free=None):
        free = self.free_parameters_ if free is None else free
        scale = np.array([SCALE[q] for q in free])
        return _lm.Problem(
            sequence=self.sequence_, basis=self.basis_, free_idx=tuple(INDEX[q] for q in free),
            tied_R1=bool(self.tied_R1), scale=scale,
            lo=np.array([self.bounds_[q][0] for q in free]) / scale,
            hi=np.array([self.bounds_[q][1] for q in free]) / scale,
            max_iter=int(self.max_iter), gtol=float(self.gtol), xtol=float(self.xtol), ftol=float(self.ftol),
            se_tol=float(self.se_tol), lambda0=float(self.lambda0), damping=self.damping, backend=self.backend,
            device=str(self.device), jacobian_reuse=int(self.jacobian_reuse),
            geodesic=bool(self.geodesic), secant=bool(self.secant), final_step=bool(self.final_step))

    def _base_theta(self, n, fixed):
        """(n, 8) values of the parameters that are not fitted: constructor ``fixed``, then per-voxel ``fixed``."""
        base = np.tile([self.fixed_.get(p, DEFAULT_START[p]) for p in PARAMETERS], (n, 1))
        for name, v in fixed.items():
            base[:, INDEX[name]] = v
        return base

    def fitted_model(self):
        """The :class:`~sklearn_crb._model.FittedModel` of this fitter; with a noise-aware ``init`` network it
        needs the noise level before it runs (``noise_input``)."""
        model = super().fitted_model()
        if self.init is not None and getattr(self.init, "noise_input_", False):
            theirs = fitted_model(self.init, "init")
            model = dataclasses.replace(model, noise_input=True, typical_snr=theirs.typical_snr)
        return model

    def predict_details(self, X, *, fixed=None, compute_crb=True, sigma=None):
        """Fit every voxel and return all results (the ``predict_details`` protocol).

        Parameters
        ----------
        X : array_like
            Real features ``[Re c, Im c]`` (n, 2K), complex coefficients
            (n, K) or complex full signals (n, n_pulses) (projected on
            ``basis`` when one is set). Non-finite rows are allowed and flagged.
        fixed : dict, optional
            ``{name: scalar or (n,) array}`` (SI units) of parameters held
            fixed in this fit, per voxel (e.g. a measured B1 map): any
            parameter not in ``estimate_``. Free nuisance parameters named
            here are not fitted. Non-finite values, or values outside the
            physical range and the R2sl table, flag the voxel
            (``status`` "invalid_fixed").
        sigma : float or array (n,), optional
            Noise standard deviation per real component: the noise column of a
            noise-aware ``init`` network and the noise level of the standard
            errors (default: this fitter's ``sigma``).
        compute_crb : bool
            Compute ``crb_unit``/``crb``/``std_error`` (one Jacobian per voxel,
            already at hand from the solve).

        Returns
        -------
        details : PredictionDetails, one row per voxel
            ``theta`` (n, 8) all parameters (fixed ones filled in);
            ``M0`` complex (n,) in data units; ``residual_norm`` (n,)
            ``||y - M0 g(theta)||``; ``converged`` (n,) bool; ``crb_unit``
            (n, len(estimate_)) CRB at theta for M0 = 1, sigma = 1 (free
            nuisance parameters and complex M0 marginalised; inf where
            singular; None without ``compute_crb``); ``n_free`` the real
            unknowns per voxel (free parameters + 2); ``estimate`` the names
            ``estimate_``. Also ``prediction`` (n, len(estimate_)), what
            ``predict`` returns; ``n_iter`` (n,) trial steps; ``n_jacobian`` (n,)
            exact Jacobian evaluations; ``status`` (n,) int, see
            ``STATUS``; ``failed`` (n,) bool (``status != 0``); ``at_bound``
            (n, p) bool; ``sigma`` (n,) noise level used for the errors;
            ``crb`` (n, len(estimate_)) CRB in squared SI units at that sigma
            and the fitted M0; ``std_error`` = sqrt(crb); ``free_parameters``,
            ``status_names``; ``fixed_sensitivity`` (n, len(estimate_),
            len(fixed_names)) ``d estimate / d fixed value`` (with ``fixed``
            and ``compute_crb``, else None; see
            :mod:`sklearn_crb.estimators.fixed_sensitivity`). The network's
            and the dictionary's fields are None.
        """
        check_is_fitted(self, "free_parameters_")
        y = as_complex_data(self, X, self.sequence_.n_pulses, self.basis_)
        n = y.shape[0]
        allowed = tuple(q for q in free_parameters(self.tied_R1) if q not in self.estimate_)
        fixed, bad_fixed = resolve_fixed(fixed, n, allowed, {**BOUNDS, **r2sl_range(self.sequence_)})
        free = tuple(q for q in self.free_parameters_ if q not in fixed)
        base = self._base_theta(n, fixed)
        ynorm, yunit = robust_norm(y)
        status = np.select([np.isnan(ynorm), ynorm == 0, bad_fixed], [_lm.NANIN, _lm.ZEROIN, _lm.INVALID_FIXED],
                           _lm.MAXIT)
        given = self.sigma if sigma is None else sigma
        sol = self._solve(X, yunit, status, free, base, given)
        with np.errstate(over="ignore", invalid="ignore"):
            M0 = sol["a"] * ynorm  # back to data units (a is the M0 of the unit-norm data)
            resid = np.sqrt(sol["cost"]) * ynorm
        status = sol["status"]
        lost = (status < _lm.NANIN) & ~(np.isfinite(M0) & np.isfinite(resid))
        status[lost] = _lm.NANOUT  # the data's scale pushes M0 or the residual beyond float64
        dof = 2 * y.shape[1] - len(free) - 2
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = resid / np.sqrt(dof) if given is None else np.broadcast_to(given, (n,)).astype(np.float64)
        crb_unit = crb = sens = None
        if compute_crb:
            crb_unit, crb = self._crb(sol["g"], sol["dg"], M0, sigma, status, free)
            sens = self._fixed_sensitivity(sol["g"], sol["dg"], free, tuple(fixed))
        self._warn_failed(status)
        theta = sol["theta"]
        return PredictionDetails(
            estimate=tuple(self.estimate_), prediction=theta[:, [INDEX[q] for q in self.estimate_]], theta=theta,
            M0=M0, residual_norm=resid, converged=status == _lm.OK, failed=status != _lm.OK, n_free=len(free) + 2,
            fixed_names=tuple(fixed), crb_unit=crb_unit, crb=crb, std_error=None if crb is None else np.sqrt(crb),
            sigma=sigma, fixed_sensitivity=sens, at_bound=self._at_bound(theta, free), free_parameters=free,
            status=status, status_names=dict(STATUS), n_iter=sol["n_iter"], n_jacobian=sol["n_jac"])

    def _solve(self, X, yunit, status, free, base, sigma=None):
        """Fit the voxels whose ``status`` is still ``MAXIT`` (the others keep theirs), chunk by chunk.

        Returns per voxel ``theta`` (n, 8), ``a`` (complex M0 of the unit-norm data), ``cost``,
        ``n_iter``, ``n_jac``, ``status`` and the model ``g`` (n, K) and exact Jacobian ``dg`` (n, K, 8)
        at the estimate (zero where not fitted).
        """
        from tqdm.auto import tqdm  # optional progress bar, imported only when predicting

        n, K = yunit.shape
        out = {"theta": np.full((n, 8), np.nan), "a": np.full(n, np.nan + 0j), "cost": np.full(n, np.nan),
               "n_iter": np.zeros(n, dtype=np.int64), "n_jac": np.zeros(n, dtype=np.int64), "status": status,
               "g": np.zeros((n, K), dtype=np.complex128), "dg": np.zeros((n, K, 8), dtype=np.complex128)}
        valid = np.flatnonzero(status == _lm.MAXIT)
        if not valid.size:
            return out
        yv = yunit[valid]
        Xv = None if self.init is None else (X[torch.as_tensor(valid)] if isinstance(X, torch.Tensor)
                                             else np.asarray(X)[valid])
        sig = None if sigma is None or not np.ndim(sigma) else np.broadcast_to(sigma, (n,))[valid]
        x0 = np.ascontiguousarray(self._initial(Xv, yv, free, base[valid], sigma if sig is None else sig))
        prob = self._problem(free)
        slices = chunk_slices(valid.size, max(1, int(self.chunk_size) // x0.shape[1]))
        par = Parallel(n_jobs=self.n_jobs, return_as="generator")
        gen = par(delayed(_lm.fit_chunk)(prob, yv[sl], x0[sl], base[valid[sl]]) for sl in slices)
        with tqdm(total=valid.size, disable=not self.progress, unit="voxel", desc="NLLS") as bar:
            for sl, res in zip(slices, gen):
                idx = valid[sl]
                for key in ("theta", "a", "cost", "n_iter", "n_jac", "status", "g", "dg"):
                    out[key][idx] = res[key]
                bar.update(sl.stop - sl.start)
        return out

    def _at_bound(self, theta, free):
        """(n, len(free)) bool: fitted parameters within 1e-9 of the box width from a bound."""
        lo = np.array([self.bounds_[q][0] for q in free])
        hi = np.array([self.bounds_[q][1] for q in free])
        th_free = theta[:, [INDEX[q] for q in free]]
        tol = 1e-9 * (hi - lo)
        return (th_free <= lo + tol) | (th_free >= hi - tol)

    def _fixed_sensitivity(self, g, dg, free, fixed_names):
        """d estimate / d fixed value of the per-voxel ``fixed`` parameters (None without any)."""
        if not fixed_names:
            return None
        return model_sensitivity(g, dg, estimate=self.estimate_, nuisance=tuple(q for q in free if q not in
                                 self.estimate_), fixed_names=fixed_names, tied_R1=self.tied_R1)

    def _warn_failed(self, status):
        failed = status != _lm.OK
        if failed.any():
            counts = {STATUS[s]: int((status == s).sum()) for s in np.unique(status[failed])}
            warnings.warn(f"NLLSFitter: {int(failed.sum())} of {status.size} voxels failed or did not converge "
                          f"{counts}; see predict_details().status", NLLSFitWarning, stacklevel=3)

    def _crb(self, g, dg, M0, sigma, status, free):
        """CRB at the estimate: for M0 = 1, sigma = 1, and at the fitted M0 and sigma."""
        n = g.shape[0]
        unit = np.full((n, len(self.estimate_)), np.nan)
        ok = np.flatnonzero((status < _lm.NANIN) & (np.abs(M0) > 0))
        if ok.size:
            nuis = tuple(q for q in free if q not in self.estimate_)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedFisherWarning)
                unit[ok] = crb_from_jacobian(g[ok], dg[ok], estimate=self.estimate_, nuisance=nuis or None,
                                             tied_R1=self.tied_R1, on_singular="inf")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            crb = unit * ((sigma / np.abs(M0)) ** 2)[:, None]
        return unit, crb

    def predict(self, X, return_details=False):
        """Estimated parameters ``estimate_`` (n, len(estimate_)), SI units.

        Voxels whose input is non-finite or all zero get NaN; every failed or
        unconverged voxel is reported by an :class:`NLLSFitWarning`. With
        ``return_details=True`` also returns the :class:`PredictionDetails` of
        :meth:`predict_details`.
        """
        details = self.predict_details(X)
        if return_details:
            return details.prediction, details
        return details.prediction

    def __sklearn_tags__(self):
        return model_estimator_tags(super().__sklearn_tags__())
