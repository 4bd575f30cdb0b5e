"""``DictionaryMatcher``: classic MRF dictionary matching (Ma et al., Nature 2013).

Each voxel gets the parameters of the dictionary atom whose normalised
(compressed) fingerprint has the largest ``|<d, y>|``; the complex M0 follows
by linear least squares, ``M0 = <g, y> / ||g||^2``. Taking the modulus of the
inner product makes the match invariant to the complex M0 (scale and phase),
like the variable projection of NLLS. The estimate is quantised to the
dictionary, so it is a baseline and a start for
:class:`sklearn_crb.estimators.nlls.NLLSFitter`, not an efficient estimator.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin, _fit_context
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._model import ModelMixin
from sklearn_crb._validation import chunk_slices
from sklearn_crb.crb import IllConditionedFisherWarning, crb_from_jacobian, project
from sklearn_crb.estimators._base import (
    MODEL_PARAMETER_CONSTRAINTS,
    POSITIVE_INT,
    as_complex_data,
    model_estimator_tags,
    resolve_fixed,
    robust_norm,
)
from sklearn_crb.estimators.details import PredictionDetails
from sklearn_crb.estimators.fixed_sensitivity import model_sensitivity
from sklearn_crb.physics.parameters import INDEX, free_parameters, tie_R1, validate_theta
from sklearn_crb.physics.priors import resolve_prior
from sklearn_crb.physics.signal import jacobian, simulate

__all__ = ["DictionaryMatcher"]

_SHARED = ("sequence", "basis", "estimate", "tied_R1", "fixed", "prior", "backend", "random_state")


class DictionaryMatcher(ModelMixin, RegressorMixin, BaseEstimator):
    """Dictionary matching of (compressed) MT fingerprints.

    Parameters
    ----------
    sequence : Sequence or None
        The pulse train (``None``: ``Sequence.default()``).
    basis : array_like, complex, shape (n_pulses, r), optional
        Orthonormal compression basis; ``None``: match full signals.
    estimate : tuple of str
        Parameters ``predict`` returns.
    tied_R1 : bool
        Atoms with R1s = R1f.
    fixed : dict, optional
        ``{name: value}`` held fixed in every atom (e.g. a known B1).
    prior : ParameterPrior, "parenchyma", "paper2022" or None
        Distribution the atoms are drawn from (``None``: ``"paper2022"`` when
        ``tied_R1``, else ``"parenchyma"``; see ``physics.priors.resolve_prior``).
    n_atoms : int
        Number of atoms drawn from the prior (ignored if ``theta`` is given).
    theta : array_like (n_atoms, 8), optional
        Explicit atom parameters (e.g. a grid).
    backend : str
        Physics backend.
    batch_size : int
        Voxels matched per matrix product (bounds memory).
    random_state : int or None
        Seed of the atom draw.

    Attributes
    ----------
    sequence_ : Sequence
    basis_ : ndarray or None
    estimate_ : tuple of str
    theta_ : ndarray (n_atoms, 8)
    atoms_ : ndarray complex (n_atoms, K)
        Unit-norm (compressed) fingerprints.
    atom_norms_ : ndarray (n_atoms,)
        Norms of the fingerprints at M0 = 1.
    n_features_in_ : int
        ``2 K``.

    Examples
    --------
    >>> from sklearn_crb import Sequence
    >>> from sklearn_crb.estimators.dictionary import DictionaryMatcher
    >>> dm = DictionaryMatcher(Sequence.default(n_pulses=120), n_atoms=500, random_state=0).fit()
    """

    _parameter_constraints: dict = {
        **{k: MODEL_PARAMETER_CONSTRAINTS[k] for k in _SHARED},
        "n_atoms": [POSITIVE_INT],
        "theta": ["array-like", None],
        "batch_size": [POSITIVE_INT],
    }

    def __init__(self, sequence=None, basis=None, estimate=("m0s", "R1f", "R2f"), tied_R1=False, fixed=None,
                 prior=None, n_atoms=2000, theta=None, backend="auto", batch_size=4096, random_state=None):
        self.sequence = sequence
        self.basis = basis
        self.estimate = estimate
        self.tied_R1 = tied_R1
        self.fixed = fixed
        self.prior = prior
        self.n_atoms = n_atoms
        self.theta = theta
        self.backend = backend
        self.batch_size = batch_size
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Simulate the dictionary.

        Parameters
        ----------
        X, y : ignored

        Returns
        -------
        self
        """
        seq, self.basis_ = self._resolve_model()
        if self.theta is not None:
            theta = validate_theta(self.theta, "theta").copy()
        else:
            theta = resolve_prior(self.prior, seq.TR, self.tied_R1).sample(int(self.n_atoms), self.random_state)
        for k, v in self.fixed_.items():
            theta[:, INDEX[k]] = v
        if self.tied_R1:
            theta = tie_R1(theta)
        theta = validate_theta(theta, "theta")
        g = self._fingerprints(theta)
        norms = np.linalg.norm(g, axis=1)
        keep = np.isfinite(norms) & (norms > 0)
        if not keep.any():
            raise ValueError("all dictionary atoms are zero or non-finite")
        self.theta_ = theta[keep]
        self.atom_norms_ = norms[keep]
        self.atoms_ = g[keep] / norms[keep, None]
        self.n_features_in_ = 2 * g.shape[1]
        return self

    def _fingerprints(self, theta):
        s = simulate(self.sequence_, theta, backend=self.backend)
        return s if self.basis_ is None else s @ self.basis_.conj()

    def _nuisance(self, fixed):
        """Free parameters the atoms vary besides ``estimate_`` (marginalised in the CRB)."""
        return tuple(q for q in free_parameters(self.tied_R1)
                     if q not in self.estimate_ and q not in self.fixed_ and q not in fixed)

    def _match(self, yunit, rows, n_best):
        """Best atom index, <d, y> of the unit data, and the n_best atoms of each row in ``rows``."""
        n = yunit.shape[0]
        idx = np.full(n, -1, dtype=np.int64)
        ip = np.zeros(n, dtype=np.complex128)
        best = np.full((n, n_best), -1, dtype=np.int64)
        Dc = self.atoms_.conj().T
        for sl in chunk_slices(rows.size, self.batch_size, "batch_size"):
            r = rows[sl]
            C = yunit[r] @ Dc  # <d, y>, conj on the atom
            aC = np.abs(C)
            j = aC.argmax(1)
            idx[r] = j
            ip[r] = C[np.arange(r.size), j]
            if n_best > 1:
                kb = min(n_best, aC.shape[1])
                top = np.argpartition(-aC, kb - 1, axis=1)[:, :kb]
                order = np.argsort(-np.take_along_axis(aC, top, 1), axis=1)
                best[r, :kb] = np.take_along_axis(top, order, 1)
        return idx, ip, best

    def predict_details(self, X, n_best=1, *, fixed=None, compute_crb=True):
        """Match every voxel (the ``predict_details`` protocol).

        Parameters
        ----------
        X : array_like
            Real ``[Re c, Im c]`` (n, 2K), complex coefficients (n, K) or
            complex full signals (n, n_pulses). Non-finite rows are flagged.
        n_best : int
            Also return the ``n_best`` best atoms (``theta_best``).
        fixed : dict, optional
            ``{name: scalar or (n,) array}`` of parameters not in
            ``estimate_`` (e.g. a measured B1 map). The match uses the stored
            atoms; the fixed values replace the atom's in ``theta``, and M0,
            the residual and the CRB are computed at that theta (one
            simulation per voxel). Non-finite or out-of-range values flag the voxel.
        compute_crb : bool
            Compute ``crb_unit`` at the matched theta (one Jacobian per voxel).

        Returns
        -------
        PredictionDetails
            ``theta`` (n, 8) of the best atom (fixed values substituted);
            ``M0`` complex (n,) by linear least squares; ``residual_norm``
            (n,) ``||y - M0 g(theta)||``; ``converged`` (n,) bool (False for
            non-finite or zero input, or invalid fixed values: those rows are
            NaN); ``crb_unit`` (n, len(estimate_)) at M0 = 1, sigma = 1 (the
            parameters the atoms vary and complex M0 marginalised; None
            without ``compute_crb``); ``n_free``; ``estimate`` (names);
            ``prediction`` (n, len(estimate_)), what ``predict`` returns;
            ``correlation`` (n,) in [0, 1]; ``index`` (n,) atom index (-1 if
            unmatched); ``failed`` = ``~converged``; with ``n_best > 1`` also
            ``theta_best`` (n, n_best, 8), the best atoms by decreasing match
            (else None); with ``fixed`` and ``compute_crb``,
            ``fixed_sensitivity`` (n, len(estimate_), len(fixed_names)): the
            ``d estimate / d fixed value`` of the least-squares fit the match
            approximates, at the matched theta (as NLLS reports it; the match
            itself uses the stored atoms, see
            :mod:`sklearn_crb.estimators.fixed_sensitivity`). NLLS's and the
            network's own fields are None.
        """
        if isinstance(n_best, bool) or not isinstance(n_best, (int, np.integer)) or n_best < 1:
            raise ValueError(f"n_best must be a positive integer, got {n_best!r}")
        check_is_fitted(self, "atoms_")
        y = as_complex_data(self, X, self.sequence_.n_pulses, self.basis_)
        n = y.shape[0]
        allowed = tuple(q for q in free_parameters(self.tied_R1) if q not in self.estimate_)
        fixed, bad_fixed = resolve_fixed(fixed, n, allowed)
        ynorm, yunit = robust_norm(y)
        ok = np.isfinite(ynorm) & (ynorm > 0) & ~bad_fixed
        rows = np.flatnonzero(ok)
        idx, ip, best = self._match(yunit, rows, int(n_best))
        theta = np.full((n, 8), np.nan)
        theta[rows] = self.theta_[idx[rows]]
        for k, v in fixed.items():
            theta[rows, INDEX[k]] = v[rows]
        if self.tied_R1:
            theta = tie_R1(theta)
        a, res, crb_unit, sens = self._fit_at_match(yunit, rows, idx, ip, theta, fixed, compute_crb)
        with np.errstate(over="ignore", invalid="ignore"):
            M0 = a * ynorm
            resid = res * ynorm
        corr = np.full(n, np.nan)
        corr[rows] = np.abs(ip[rows])
        if (~ok).any():
            warnings.warn(f"DictionaryMatcher: {int((~ok).sum())} of {n} voxels have non-finite or all-zero input "
                          f"or invalid fixed values and get NaN (see predict_details().failed)", UserWarning,
                          stacklevel=2)
        return PredictionDetails(
            estimate=tuple(self.estimate_), prediction=theta[:, [INDEX[p] for p in self.estimate_]], theta=theta,
            M0=M0, residual_norm=resid, converged=ok, failed=~ok,
            n_free=len(self.estimate_) + len(self._nuisance(fixed)) + 2, fixed_names=tuple(fixed),
            crb_unit=crb_unit, fixed_sensitivity=sens, correlation=corr, index=idx,
            theta_best=self._theta_best(best, theta, int(n_best)) if n_best > 1 else None)

    def _fit_at_match(self, yunit, rows, idx, ip, theta, fixed, compute_crb):
        """M0 (of the unit data), residual, unit CRB and fixed sensitivity of the matched rows at ``theta``."""
        n = yunit.shape[0]
        a = np.full(n, np.nan + 0j)  # M0 of the unit-norm data
        res = np.full(n, np.nan)
        crb_unit = np.full((n, len(self.estimate_)), np.nan) if compute_crb else None
        sens = np.full((n, len(self.estimate_), len(fixed)), np.nan) if compute_crb and fixed else None
        if not rows.size:
            return a, res, crb_unit, sens
        s = J = None
        if compute_crb or fixed:
            s, J = jacobian(self.sequence_, theta[rows], backend=self.backend) if compute_crb else (
                simulate(self.sequence_, theta[rows], backend=self.backend), None)
        if fixed:  # the fingerprint at the substituted theta
            g = s if self.basis_ is None else project(torch.as_tensor(self.basis_), torch.as_tensor(s)).numpy()
            gg = np.einsum("ij,ij->i", g.conj(), g).real
            a[rows] = np.einsum("ij,ij->i", g.conj(), yunit[rows]) / gg
            res[rows] = np.linalg.norm(yunit[rows] - a[rows, None] * g, axis=1)
        else:
            d = self.atoms_[idx[rows]]
            res[rows] = np.linalg.norm(yunit[rows] - ip[rows, None] * d, axis=1)
            a[rows] = ip[rows] / self.atom_norms_[idx[rows]]
        if compute_crb:
            nuisance = self._nuisance(fixed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedFisherWarning)
                crb_unit[rows] = crb_from_jacobian(s, J, estimate=self.estimate_, nuisance=nuisance or None,
                                                   tied_R1=self.tied_R1, basis=self.basis_, on_singular="inf")
            if fixed:  # the least-squares fit the match approximates, as NLLS reports it
                sens[rows] = model_sensitivity(s, J, estimate=self.estimate_, nuisance=nuisance,
                                               fixed_names=tuple(fixed), tied_R1=self.tied_R1, basis=self.basis_)
        return a, res, crb_unit, sens

    def _theta_best(self, best, theta, n_best):
        """(n, n_best, 8) parameters of the best atoms (fewer atoms than n_best: the best repeated)."""
        tb = np.full((theta.shape[0], n_best, 8), np.nan)
        sel = best >= 0
        tb[sel] = self.theta_[best[sel]]
        return np.where(np.isnan(tb), theta[:, None, :], tb)

    def predict(self, X):
        """Matched parameters ``estimate_`` (n, len(estimate_)), SI units (NaN for unusable input, warned)."""
        return self.predict_details(X, compute_crb=False).prediction

    def __sklearn_tags__(self):
        return model_estimator_tags(super().__sklearn_tags__())
