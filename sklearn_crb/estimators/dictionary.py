"""``DictionaryMatcher``: classic MRF dictionary matching (Ma et al., Nature 2013).

Each voxel gets the parameters of the dictionary atom whose normalised
(compressed) fingerprint has the largest ``|<d, y>|``; the complex M0 follows
in closed form, ``M0 = <g, y> / ||g||^2``. Taking the modulus of the inner
product makes the match invariant to the complex M0 (scale and phase), like
the NLLS variable projection. The estimate is quantised to the dictionary, so
it is a baseline and a start for :class:`sklearn_crb.nlls.NLLSFitter`, not an
efficient estimator.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from sklearn_crb._validation import check_basis
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, resolve_estimate, tie_R1, validate_theta
from sklearn_crb.physics.priors import resolve_prior
from sklearn_crb.physics.sequence import Sequence

__all__ = ["DictionaryMatcher", "as_complex_data"]


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

    ``estimator.n_features_in_`` must be ``2 K``. NaN is allowed (flagged by the caller).
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
            arr = arr @ basis.conj()
        return arr
    arr = validate_data(estimator, X, reset=False, ensure_all_finite="allow-nan", dtype=np.float64)
    return arr[:, :K] + 1j * arr[:, K:]


def _check_fixed(fixed):
    if fixed is None:
        return {}
    if not isinstance(fixed, dict):
        raise TypeError(f"fixed must be a dict mapping parameter names to values, got {type(fixed).__name__}")
    bad = [k for k in fixed if k not in PARAMETERS]
    if bad:
        raise ValueError(f"fixed has unknown parameter names {bad}; allowed: {PARAMETERS}")
    return {k: float(v) for k, v in fixed.items()}


class DictionaryMatcher(RegressorMixin, BaseEstimator):
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
        ``tied_R1``, else ``"parenchyma"``; see ``parameters.resolve_prior``).
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
    >>> from sklearn_crb.dictionary import DictionaryMatcher
    >>> dm = DictionaryMatcher(Sequence.default(n_pulses=120), n_atoms=500, random_state=0).fit()
    """

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

    def fit(self, X=None, y=None):
        """Simulate the dictionary.

        Parameters
        ----------
        X, y : ignored

        Returns
        -------
        self
        """
        from sklearn_crb.physics.signal import simulate

        seq = Sequence.resolve(self.sequence)
        for name in ("n_atoms", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.sequence_ = seq
        self.basis_ = None if self.basis is None else check_basis(self.basis, seq.n_pulses)
        self.estimate_ = resolve_estimate(self.estimate, self.tied_R1)
        fixed = _check_fixed(self.fixed)
        if self.theta is not None:
            theta = validate_theta(self.theta, "theta").copy()
        else:
            theta = resolve_prior(self.prior, seq.TR, self.tied_R1).sample(int(self.n_atoms), self.random_state)
        for k, v in fixed.items():
            theta[:, INDEX[k]] = v
        if self.tied_R1:
            theta = tie_R1(theta)
        theta = validate_theta(theta, "theta")
        s = simulate(seq, theta, backend=self.backend)
        g = s if self.basis_ is None else s @ self.basis_.conj()
        norms = np.linalg.norm(g, axis=1)
        keep = np.isfinite(norms) & (norms > 0)
        if not keep.any():
            raise ValueError("all dictionary atoms are zero or non-finite")
        self.theta_ = theta[keep]
        self.atom_norms_ = norms[keep]
        self.atoms_ = g[keep] / norms[keep, None]
        self.n_features_in_ = 2 * g.shape[1]
        return self

    def predict_details(self, X, n_best=1):
        """Match every voxel.

        Parameters
        ----------
        X : array_like
            Real ``[Re c, Im c]`` (n, 2K), complex coefficients (n, K) or
            complex full signals (n, n_pulses).

        Returns
        -------
        dict
            ``estimate`` (n, len(estimate_)), ``theta`` (n, 8), ``M0``
            complex (n,), ``correlation`` (n,) in [0, 1], ``index`` (n,) atom
            index (-1 if unmatched), ``failed`` (n,) bool (non-finite or zero
            input; those rows are NaN); with ``n_best > 1`` also
            ``theta_best`` (n, n_best, 8), the best atoms by decreasing match.
        """
        if isinstance(n_best, bool) or not isinstance(n_best, (int, np.integer)) or n_best < 1:
            raise ValueError(f"n_best must be a positive integer, got {n_best!r}")
        check_is_fitted(self, "atoms_")
        y = as_complex_data(self, X, self.sequence_.n_pulses, self.basis_)
        n = y.shape[0]
        finite = np.isfinite(y.view(np.float64)).reshape(n, -1).all(1)
        ynorm = np.linalg.norm(np.where(finite[:, None], y, 0), axis=1)
        ok = finite & (ynorm > 0)
        idx = np.full(n, -1, dtype=np.int64)
        ip = np.zeros(n, dtype=np.complex128)
        Dc = self.atoms_.conj().T
        bs = int(self.batch_size)
        rows = np.flatnonzero(ok)
        best = np.full((n, int(n_best)), -1, dtype=np.int64)
        for i in range(0, rows.size, bs):
            r = rows[i:i + bs]
            C = y[r] @ Dc  # <d, y>, conj on the atom
            aC = np.abs(C)
            j = aC.argmax(1)
            idx[r] = j
            if n_best > 1:
                kb = min(int(n_best), aC.shape[1])
                top = np.argpartition(-aC, kb - 1, axis=1)[:, :kb]
                order = np.argsort(-np.take_along_axis(aC, top, 1), axis=1)
                best[r, :kb] = np.take_along_axis(top, order, 1)
            ip[r] = C[np.arange(r.size), j]
        theta = np.full((n, 8), np.nan)
        M0 = np.full(n, np.nan + 0j)
        corr = np.full(n, np.nan)
        theta[ok] = self.theta_[idx[ok]]
        M0[ok] = ip[ok] / self.atom_norms_[idx[ok]]
        corr[ok] = np.abs(ip[ok]) / ynorm[ok]
        if (~ok).any():
            warnings.warn(f"DictionaryMatcher: {int((~ok).sum())} of {n} voxels have non-finite or all-zero input "
                          f"and get NaN (see predict_details()['failed'])", UserWarning, stacklevel=3)
        out = {"estimate": theta[:, [INDEX[p] for p in self.estimate_]], "theta": theta, "M0": M0,
               "correlation": corr, "index": idx, "failed": ~ok}
        if n_best > 1:
            tb = np.full((n, int(n_best), 8), np.nan)
            sel = best >= 0
            tb[sel] = self.theta_[best[sel]]
            tb = np.where(np.isnan(tb), theta[:, None, :], tb)  # fewer atoms than n_best: repeat the best
            out["theta_best"] = tb
        return out

    def predict(self, X):
        """Matched parameters ``estimate_`` (n, len(estimate_)), SI units (NaN for unusable input, warned)."""
        return self.predict_details(X)["estimate"]

    def __sklearn_tags__(self):
        return model_estimator_tags(super().__sklearn_tags__())
