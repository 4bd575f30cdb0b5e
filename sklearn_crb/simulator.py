"""``MTFingerprintSimulator``: training data, compression and per-sample CRBs.

Turns tissue parameters into the real feature vectors an estimator sees,
``[Re c, Im c]`` with ``c = U^H s(theta)`` in a low-rank basis ``U`` (SVD of
simulated fingerprints, Zhang et al. 2022: rank 13 keeps ~99 % of the energy),
and attaches to every sample the CRB *of the compressed coefficients* at its
own ``|M0|`` and noise level ``sigma`` (gbloch_spec.md §4, paper_notes.md).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._validation import check_basis, check_snr_range, chunk_slices
from sklearn_crb.crb import crb_from_jacobian
from sklearn_crb.physics.parameters import INDEX, PARAMETERS, resolve_estimate, tie_R1, validate_theta
from sklearn_crb.physics.priors import resolve_prior
from sklearn_crb.physics.signal import jacobian, simulate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["MTFingerprintSimulator"]

_MAX_STORED_RANK = 128


class MTFingerprintSimulator(TransformerMixin, BaseEstimator):
    """Simulate compressed MT fingerprints, noisy training sets and their CRBs.

    Parameters
    ----------
    sequence : Sequence or None
        Pulse train; ``None`` uses ``Sequence.default()``.
    n_components : int
        Rank ``r`` of the compression basis (ignored when ``basis`` is given).
    basis : array_like, complex, shape (n_pulses, r), optional
        A fixed orthonormal basis (e.g. the one real data were reconstructed
        in). If None, ``fit`` learns one by SVD.
    estimate : tuple of str
        Parameters the downstream estimator predicts (targets ``y``).
    snr : (float, float)
        Range of ``|M0| / sigma`` drawn uniformly per sample.
    sigma : float
        Noise standard deviation per real component of the coefficients.
    tied_R1 : bool
        Model with R1s = R1f (the paper's single T1).
    nuisance : "all", None or tuple of str
        Unknowns marginalised in the CRB (besides complex M0).
    prior : ParameterPrior, "parenchyma", "paper2022" or None
        Parameter distribution for sampling; None: ``"paper2022"`` when
        ``tied_R1`` else ``"parenchyma"``.
    n_basis_samples : int
        Fingerprints drawn from the prior for the SVD in ``fit``.
    backend : str
        Physics backend (``"auto"``, ``"numba"``, ``"torch"``).
    chunk_size : int
        Samples simulated at once; bounds memory (a Jacobian takes
        ~146 kB per sample on 1142 pulses) for datasets of millions.
    random_state : int or None
        Seed for the basis and (unless overridden) the datasets.

    Attributes
    ----------
    sequence_ : Sequence
    basis_ : ndarray, complex128, shape (n_pulses, n_components_)
    n_components_ : int
    singular_values_ : ndarray or None
    explained_energy_ : float or None
        Fraction of the training fingerprints' energy kept by ``basis_``.
    prior_ : ParameterPrior
    estimate_ : tuple of str
    n_features_in_ : int
        8 (``transform`` takes ``theta``).
    """

    def __init__(self, sequence=None, n_components=13, basis=None, estimate=("m0s", "R1f", "R2f"),
                 snr=(10.0, 100.0), sigma=0.01, tied_R1=False, nuisance="all", prior=None,
                 n_basis_samples=1000, backend="auto", chunk_size=2048, random_state=None):
        self.sequence = sequence
        self.n_components = n_components
        self.basis = basis
        self.estimate = estimate
        self.snr = snr
        self.sigma = sigma
        self.tied_R1 = tied_R1
        self.nuisance = nuisance
        self.prior = prior
        self.n_basis_samples = n_basis_samples
        self.backend = backend
        self.chunk_size = chunk_size
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def fit(self, X=None, y=None):
        """Learn the compression basis.

        Parameters
        ----------
        X : array_like, shape (n_samples, 8), optional
            Parameters whose fingerprints span the basis; default: draw
            ``n_basis_samples`` from the prior.
        y : ignored

        Returns
        -------
        self
        """
        seq = Sequence.resolve(self.sequence)
        lo, hi = self._check_snr()
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {self.sigma}")
        self.sequence_ = seq
        self.estimate_ = resolve_estimate(self.estimate, self.tied_R1)
        self.prior_ = resolve_prior(self.prior, seq.TR, self.tied_R1)
        self.n_features_in_ = len(PARAMETERS)
        if self.basis is not None:
            self.basis_ = check_basis(self.basis, seq.n_pulses)
            self.singular_values_ = None
            self.explained_energy_ = None
            self._extended_basis = self.basis_
        else:
            r = int(self.n_components)
            if not 1 <= r <= seq.n_pulses:
                raise ValueError(f"n_components must be in [1, {seq.n_pulses}], got {self.n_components}")
            if X is None:
                theta = self.prior_.sample(int(self.n_basis_samples), self.random_state)
            else:
                theta = validate_theta(X, "X")
            if self.tied_R1:
                theta = tie_R1(theta)
            s = simulate(seq, theta, backend=self.backend)
            # right singular vectors of the (n, N) dictionary span the fingerprints
            _, sv, Vh = np.linalg.svd(s, full_matrices=False)
            if r > sv.size:
                raise ValueError(f"n_components={r} exceeds the number of basis fingerprints ({sv.size})")
            V = Vh.T  # columns u_k with c = U^H s (s as a column vector)
            self.basis_ = np.ascontiguousarray(V[:, :r])
            self._extended_basis = np.ascontiguousarray(V[:, : min(sv.size, max(r, _MAX_STORED_RANK))])
            self.singular_values_ = sv
            self.explained_energy_ = float(np.sum(sv[:r] ** 2) / np.sum(sv**2))
        self.n_components_ = self.basis_.shape[1]
        return self

    def _check_snr(self):
        return check_snr_range(self.snr)

    # ------------------------------------------------------------- chunking
    def _chunks(self, n):
        return chunk_slices(n, self.chunk_size)

    def _coefficients_and_crb(self, th, estimate=None, basis="fitted"):
        """Noise-free coefficients ``U^H s`` (M0 = 1) and the unit CRB, chunk by chunk."""
        U = self.basis_ if basis == "fitted" else basis
        cs, crbs = [], []
        for sl in self._chunks(th.shape[0]):
            s, J = jacobian(self.sequence_, th[sl], backend=self.backend)
            cs.append(s @ self.basis_.conj())
            crbs.append(crb_from_jacobian(s, J, estimate=estimate or self.estimate_, nuisance=self.nuisance,
                                          tied_R1=self.tied_R1, basis=U))
        return np.concatenate(cs), np.concatenate(crbs)

    # ------------------------------------------------------------ transform
    def _theta(self, X, argname="X"):
        theta = validate_theta(X, argname)
        return tie_R1(theta) if self.tied_R1 else theta

    def compress(self, signal):
        """Real features ``[Re c, Im c]`` of complex signals (n, n_pulses)."""
        check_is_fitted(self, "basis_")
        s = np.asarray(signal)
        if s.ndim != 2 or s.shape[1] != self.sequence_.n_pulses:
            raise ValueError(f"signal must have shape (n_samples, {self.sequence_.n_pulses}), got {s.shape}")
        c = s @ self.basis_.conj()
        return np.hstack([c.real, c.imag])

    def transform(self, X):
        """Noise-free features ``[Re c, Im c]`` at ``M0 = 1`` for ``theta`` X.

        Parameters
        ----------
        X : array_like, shape (n_samples, 8)

        Returns
        -------
        features : ndarray, float64, shape (n_samples, 2 * n_components_)
        """
        check_is_fitted(self, "basis_")
        theta = self._theta(X)
        return np.concatenate([self.compress(simulate(self.sequence_, theta[sl], backend=self.backend))
                               for sl in self._chunks(theta.shape[0])])

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "basis_")
        r = self.n_components_
        return np.array([f"re_c{k}" for k in range(r)] + [f"im_c{k}" for k in range(r)], dtype=object)

    def sample_parameters(self, n_samples, random_state=None):
        """Draw ``theta`` (n_samples, 8) from the prior."""
        check_is_fitted(self, "prior_")
        return self.prior_.sample(n_samples, self.random_state if random_state is None else random_state)

    # ------------------------------------------------------------------ CRB
    def crb(self, theta, M0=1.0, sigma=None, compressed=True, estimate=None, on_singular="raise"):
        """CRB of ``estimate`` at ``theta`` for the features this simulator makes.

        Parameters
        ----------
        theta : array_like (n, 8)
        M0 : complex or array_like (n,)
        sigma : float or array_like (n,), default ``self.sigma``
        compressed : bool
            CRB of the rank-r coefficients (True) or of the full signal.
        estimate : tuple of str, default ``estimate_``

        Returns
        -------
        crb : ndarray (n, len(estimate))
        """
        check_is_fitted(self, "basis_")
        th = self._theta(theta, "theta")
        if on_singular != "raise":
            s, J = jacobian(self.sequence_, th, backend=self.backend)
            return crb_from_jacobian(s, J, estimate=estimate or self.estimate_, nuisance=self.nuisance,
                                     tied_R1=self.tied_R1, M0=M0, sigma=self.sigma if sigma is None else sigma,
                                     basis=self.basis_ if compressed else None, on_singular=on_singular)
        _, unit = self._coefficients_and_crb(th, estimate, "fitted" if compressed else None)
        sig = np.asarray(self.sigma if sigma is None else sigma, dtype=float)
        M0 = np.asarray(M0)
        if not (np.all(np.isfinite(sig)) and np.all(sig > 0) and np.all(np.isfinite(M0)) and np.all(M0 != 0)):
            raise ValueError("M0 must be non-zero and finite, and sigma positive and finite")
        scale = np.broadcast_to(sig**2 / np.abs(M0) ** 2, (th.shape[0],))
        return unit * scale[:, None]

    def compression_inflation(self, theta=None, ranks=None, estimate=None):
        """CRB(compressed) / CRB(full signal), per parameter and rank.

        Parameters
        ----------
        theta : array_like (n, 8), optional
            Default: the spec's tutorial tissue (m0s=.15, R1f=.5, R2f=15,
            Rex=30, R1s=3, T2s=10 us, omega0=0, B1=1).
        ranks : sequence of int, optional
            Ranks of the learned SVD basis to evaluate (default: n_components_).
            Ranks above those stored (up to 128) need a larger ``n_basis_samples``.
        estimate : tuple of str, default: all free parameters

        Returns
        -------
        dict
            ``{rank: ndarray (n, len(estimate))}`` of inflation factors (>= 1).
        """
        check_is_fitted(self, "basis_")
        from sklearn_crb.physics.parameters import free_parameters

        if theta is None:
            theta = [[0.15, 0.5, 15.0, 30.0, 3.0, 10e-6, 0.0, 1.0]]
        est = estimate or free_parameters(self.tied_R1)
        th = self._theta(theta, "theta")
        s, J = jacobian(self.sequence_, th, backend=self.backend)
        kw = dict(estimate=est, nuisance=self.nuisance, tied_R1=self.tied_R1)
        full = crb_from_jacobian(s, J, **kw)
        ranks = [self.n_components_] if ranks is None else [int(r) for r in ranks]
        out = {}
        for r in ranks:
            if not 1 <= r <= self._extended_basis.shape[1]:
                raise ValueError(f"rank {r} not available: stored basis has {self._extended_basis.shape[1]} columns")
            out[r] = crb_from_jacobian(s, J, basis=self._extended_basis[:, :r], **kw) / full
        return out

    # -------------------------------------------------------------- dataset
    def make_dataset(self, n_samples, random_state=None, *, noise=True, theta=None, return_details=False):
        """Noisy features, targets and per-sample CRBs.

        Each sample gets ``M0 = |M0| exp(i phi)`` with ``|M0| = sigma * U[snr]``
        and ``phi ~ U[0, 2 pi)``, and complex white noise of standard deviation
        ``sigma`` per real component added to its coefficients.

        Parameters
        ----------
        n_samples : int
        random_state : int, Generator or None
            Default: ``self.random_state``.
        noise : bool
            Add noise (False: ``X`` is the noise-free ``M0``-scaled signal).
        theta : array_like (n_samples, 8), optional
            Use these parameters instead of prior draws.
        return_details : bool
            Also return a dict with ``theta``, ``M0``, ``sigma``,
            ``X_clean`` (noise-free features at M0 = 1) and ``crb_unit``
            (CRB at M0 = 1, sigma = 1), which is what per-epoch noise
            augmentation needs.

        Returns
        -------
        X : ndarray (n_samples, 2 r)
        y : ndarray (n_samples, len(estimate_))
        crb : ndarray (n_samples, len(estimate_))
            CRB of each sample at its own ``|M0|`` and ``sigma``.
        """
        check_is_fitted(self, "basis_")
        rng = np.random.default_rng(self.random_state if random_state is None else random_state)
        if theta is None:
            theta = self.prior_.sample(n_samples, rng)
        th = self._theta(theta, "theta")
        n = th.shape[0]
        lo, hi = self._check_snr()
        sig = float(self.sigma)
        M0 = sig * rng.uniform(lo, hi, n) * np.exp(2j * np.pi * rng.uniform(0, 1, n))
        c, crb_unit = self._coefficients_and_crb(th)
        X_clean = np.hstack([c.real, c.imag])
        cn = M0[:, None] * c
        if noise:
            cn = cn + sig * (rng.standard_normal(cn.shape) + 1j * rng.standard_normal(cn.shape))
        X = np.hstack([cn.real, cn.imag])
        y = th[:, [INDEX[p] for p in self.estimate_]]
        crb = crb_unit * (sig**2 / np.abs(M0) ** 2)[:, None]
        if return_details:
            return X, y, crb, {"theta": th, "M0": M0, "sigma": sig, "X_clean": X_clean, "crb_unit": crb_unit}
        return X, y, crb

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.allow_nan = False
        return tags
