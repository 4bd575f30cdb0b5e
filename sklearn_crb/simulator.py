"""``MTFingerprintSimulator``: training data, compression and per-sample CRBs.

Turns tissue parameters into the real feature vectors an estimator sees,
``[Re c, Im c]`` with ``c = U^H s(theta)`` in a low-rank basis ``U`` (SVD of
simulated fingerprints, Zhang et al. 2022: rank 13 keeps ~99 % of the energy;
or the basis minimising the prior-averaged CRB inflation, Mao et al., arXiv
2305.00326, :mod:`sklearn_crb.basis`), and attaches to every sample the CRB
*of the compressed coefficients* at its own ``|M0|`` and noise level ``sigma`` (Zhang et al., MRM 2022, Eq. 3).

The M0/noise model and the packing of per-sample CRBs with their targets live
in :mod:`sklearn_crb.noise` (re-exported here).
"""

from __future__ import annotations

import copy
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._model import ModelMixin
from sklearn_crb._validation import check_snr_range, chunk_slices
from sklearn_crb.basis import fit_crb_basis
from sklearn_crb.crb import crb_from_jacobian
from sklearn_crb.noise import apply_m0_and_noise, check_sigma, crb_gain, draw_m0_and_noise, pack_targets, unpack_targets
from sklearn_crb.physics.parameters import (
    INDEX,
    PARAMETERS,
    crb_to_targets,
    free_parameters,
    rate_name,
    targets_from_theta,
    tie_R1,
    validate_theta,
)
from sklearn_crb.physics.priors import ParameterPrior, resolve_prior
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.physics.signal import jacobian, simulate

__all__ = ["MTFingerprintSimulator", "draw_m0_and_noise", "apply_m0_and_noise", "crb_gain", "pack_targets",
           "unpack_targets"]

_MAX_STORED_RANK = 128
_ON_SINGULAR = ("raise", "redraw", "inf")
_MAX_REDRAWS = 20
#: The Fisher matrix at m0s = 0 exactly is singular (Rex, T2s and R1s drop out of the model); for any
#: m0s > 0 the CRB is finite and continuous, so training CRBs are computed at m0s >= this value (the
#: m0s -> 0+ limit), while the signal and the targets keep the drawn m0s.
CRB_M0S_FLOOR = 1e-4


class MTFingerprintSimulator(ModelMixin, TransformerMixin, BaseEstimator):
    """Simulate compressed MT fingerprints, noisy training sets and their CRBs.

    Parameters
    ----------
    sequence : Sequence or None
        Pulse train; ``None`` uses ``Sequence.default()``.
    n_components : int or None
        Rank ``r`` of the compression basis. With ``basis``: the first ``r``
        of its columns (None: all of them); without: the rank of the SVD
        basis (None: 13, the paper's).
    basis : array_like, complex, shape (n_pulses, k), optional
        A fixed orthonormal basis (e.g. the one real data were reconstructed
        in), possibly wider than ``n_components``. If None, ``fit`` learns one
        (``basis_method``); a given basis wins over ``basis_method``.
    basis_method : {"svd", "crb"}, default "svd"
        ``"svd"``: right singular vectors of prior fingerprints (most energy
        kept); ``"crb"``: the rank-r basis minimising the mean log CRB
        inflation (compressed / full) of ``estimate`` over prior draws,
        nuisance parameters and complex M0 marginalised, from the SVD start
        (Mao et al., arXiv 2305.00326; :mod:`sklearn_crb.basis`).
    estimate : tuple of str
        Targets ``y`` the downstream estimator predicts: parameter names
        (rates, 1/s) or the time forms ``"T1f"``, ``"T2f"``, ``"T1s"``
        (``1/R`` in s; with ``tied_R1``, ``"T1f"`` is the single T1). The CRB
        of a time is ``CRB(R) / R^4`` (delta method).
    snr : (float, float), default (10, 300)
        Range of ``|M0| / sigma`` drawn uniformly per sample; the default holds in-vivo values (50-300) and
        SNR 100 inside the range, not at its top edge (where the network shrinks towards the prior).
    sigma : float
        Noise standard deviation per real component of the coefficients.
    tied_R1 : bool
        Model with R1s = R1f (the paper's single T1).
    nuisance : "all", None or tuple of str
        Unknowns marginalised in the CRB (besides complex M0).
    prior : ParameterPrior, "brain", "parenchyma", "paper2022" or None, default "brain"
        Parameter distribution for sampling. ``"brain"`` covers parenchyma,
        CSF and partial-volume tissue for the tied and the untied model
        (:meth:`ParameterPrior.brain`); None: ``resolve_prior``'s default.
    n_basis_samples : int
        Fingerprints drawn from the prior for the SVD in ``fit``.
    n_crb_samples : int, default 256
        With ``basis_method="crb"``: how many of those draws (the first)
        define the CRB objective (one Jacobian each, ~146 kB on 1142 pulses).
    basis_max_iter : int, default 100
        With ``basis_method="crb"``: conjugate-gradient iterations.
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
    basis_method_ : {"svd", "crb", "given"}
    basis_history_ : ndarray or None
        With ``"crb"``: the objective (mean log CRB inflation over the
        training draws) at the SVD start and after each iteration.
    prior_ : ParameterPrior
    estimate_ : tuple of str
    n_features_in_ : int
        8 (``transform`` takes ``theta``).
    """

    _parameter_constraints: dict = {
        "sequence": [Sequence, None],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "basis": ["array-like", None],
        "estimate": [str, tuple, list],
        "snr": [tuple, list, "array-like"],
        "sigma": [Interval(Real, 0, None, closed="neither")],
        "tied_R1": ["boolean"],
        "nuisance": [StrOptions({"all"}), str, tuple, list, None],
        "prior": [ParameterPrior, StrOptions({"brain", "parenchyma", "paper2022"}), None],
        "basis_method": [StrOptions({"svd", "crb"})],
        "n_basis_samples": [Interval(Integral, 1, None, closed="left")],
        "n_crb_samples": [Interval(Integral, 1, None, closed="left")],
        "basis_max_iter": [Interval(Integral, 0, None, closed="left")],
        "backend": [StrOptions({"auto", "numba", "torch"})],
        "chunk_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, sequence=None, n_components=None, basis=None, estimate=("m0s", "R1f", "R2f"),
                 snr=(10.0, 300.0), sigma=0.01, tied_R1=False, nuisance="all", prior="brain",
                 n_basis_samples=1000, backend="auto", chunk_size=2048, random_state=None, basis_method="svd",
                 n_crb_samples=256, basis_max_iter=100):
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
        self.basis_method = basis_method
        self.n_crb_samples = n_crb_samples
        self.basis_max_iter = basis_max_iter

    @_fit_context(prefer_skip_nested_validation=True)
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
        Sequence.resolve(self.sequence)  # the sequence is checked first, as before
        check_snr_range(self.snr)
        check_sigma(self.sigma)
        seq, U = self._resolve_model(with_fixed=False)
        self.prior_ = resolve_prior(self.prior, seq.TR, self.tied_R1)
        self.n_features_in_ = len(PARAMETERS)
        if U is not None:
            if self.n_components is not None:
                r = int(self.n_components)
                if not 1 <= r <= U.shape[1]:
                    raise ValueError(f"n_components must be in [1, {U.shape[1]}] (the columns of basis), "
                                     f"got {self.n_components}")
                U = np.ascontiguousarray(U[:, :r])
            self.basis_ = U
            self.singular_values_ = None
            self.explained_energy_ = None
            self._extended_basis = self.basis_
            self.basis_method_, self.basis_history_, self._basis_theta = "given", None, None
        else:
            r = 13 if self.n_components is None else int(self.n_components)
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
            self._extended_basis = np.ascontiguousarray(V[:, : min(sv.size, max(r, _MAX_STORED_RANK))])
            self._basis_theta, self._bases = theta, {}
            self.basis_method_, self.singular_values_ = self.basis_method, sv
            self.basis_, self.basis_history_ = (self._crb_basis(r) if self.basis_method == "crb"
                                                else (np.ascontiguousarray(V[:, :r]), None))
            self.explained_energy_ = float(np.linalg.norm(s @ self.basis_.conj()) ** 2 / np.sum(sv**2))
        self.n_components_ = self.basis_.shape[1]
        return self

    def _crb_basis(self, r):
        """(CRB-optimised rank-r basis, objective history) from the first ``n_crb_samples`` basis draws."""
        theta = self._basis_theta[: int(self.n_crb_samples)]
        return fit_crb_basis(self.sequence_, theta, self._extended_basis[:, :r], estimate=self.estimate_,
                             nuisance=self.nuisance, tied_R1=self.tied_R1, max_iter=int(self.basis_max_iter),
                             m0s_floor=CRB_M0S_FLOOR, backend=self.backend, chunk_size=self.chunk_size)

    def _learnt_basis(self, method, r):
        """Rank-r basis: the fitted one (``method=None``) or the one ``method`` learns from the fit's draws."""
        if method is not None and self.basis_method_ == "given":
            raise ValueError("methods= compares learnt bases: this simulator was given a basis (basis=...)")
        if not 1 <= r <= (k := self._extended_basis.shape[1]):
            raise ValueError(f"rank {r} not available: stored basis has {k} columns")
        if method is None and self.basis_method_ == "crb" and r != self.n_components_:
            raise ValueError(f"the CRB basis is optimised for rank {self.n_components_} only; pass "
                             "methods=('crb',) to optimise one per rank")
        if r == self.n_components_ and method in (None, self.basis_method_):
            return self.basis_
        if method in (None, "svd"):
            return self._extended_basis[:, :r]
        if (method, r) not in self._bases:
            self._bases[(method, r)] = self._crb_basis(r)[0]
        return self._bases[(method, r)]

    def __sklearn_clone__(self):
        """Fitted: a copy with its fitted basis (it defines the features), e.g. inside ``GridSearchCV``."""
        return copy.deepcopy(self) if hasattr(self, "basis_") else super().__sklearn_clone__()

    def _chunks(self, n):
        return chunk_slices(n, self.chunk_size)

    def _coefficients_and_crb(self, th, estimate=None, compressed=True, on_singular="raise", m0s_floor=0.0):
        """Noise-free coefficients ``U^H s`` (M0 = 1) and the unit CRB in target units, chunk by chunk.

        The CRB is that of the compressed coefficients (``compressed=True``)
        or of the full signal, of the rates behind the target names, mapped
        to the targets with :func:`crb_to_targets`. ``m0s_floor``: the CRB
        (only) is computed at ``max(m0s, m0s_floor)``.
        """
        names = tuple(estimate or self.estimate_)
        rates = tuple(rate_name(p) for p in names)
        U = self.basis_ if compressed else None
        cs, crbs = [], []
        for sl in self._chunks(th.shape[0]):
            t = th[sl]
            low = t[:, INDEX["m0s"]] < m0s_floor
            tc = t.copy()
            tc[low, INDEX["m0s"]] = m0s_floor
            s, J = jacobian(self.sequence_, tc, backend=self.backend)
            crb = crb_from_jacobian(s, J, estimate=rates, nuisance=self.nuisance, tied_R1=self.tied_R1, basis=U,
                                    on_singular=on_singular)
            if low.any():  # the signal at the drawn m0s
                s = s.copy()
                s[low] = simulate(self.sequence_, t[low], backend=self.backend)
            cs.append(s @ self.basis_.conj())
            crbs.append(crb_to_targets(np.asarray(crb), tc, names))
        return np.concatenate(cs), np.concatenate(crbs)

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

    def crb(self, theta, M0=1.0, sigma=None, compressed=True, estimate=None, on_singular="raise"):
        """CRB of ``estimate`` at ``theta`` for the features this simulator makes.

        Parameters
        ----------
        theta : array_like (n, 8)
        M0 : complex or array_like (n,)
            The CRB scales as ``1 / |M0|^2``.
        sigma : float or array_like (n,), default ``self.sigma``
        compressed : bool
            CRB of the rank-r coefficients (True) or of the full signal.
        estimate : tuple of str, default ``estimate_``
        on_singular : {"raise", "inf"}
            See :func:`sklearn_crb.crb.crb_from_jacobian`.

        Returns
        -------
        crb : ndarray (n, len(estimate))
        """
        check_is_fitted(self, "basis_")
        th = self._theta(theta, "theta")
        _, unit = self._coefficients_and_crb(th, estimate, compressed, on_singular)
        sig = np.asarray(self.sigma if sigma is None else sigma, dtype=float)
        M0 = np.asarray(M0)
        if not (np.all(np.isfinite(sig)) and np.all(sig > 0) and np.all(np.isfinite(M0)) and np.all(M0 != 0)):
            raise ValueError("M0 must be non-zero and finite, and sigma positive and finite")
        scale = np.broadcast_to(sig**2 / np.abs(M0) ** 2, (th.shape[0],))
        return unit * scale[:, None]

    def compression_inflation(self, theta=None, ranks=None, estimate=None, methods=None):
        """CRB(compressed) / CRB(full signal), per parameter and rank (and basis method).

        Parameters
        ----------
        theta : array_like (n, 8), optional
            Default: a white-matter-like tissue (m0s=.15, R1f=.5, R2f=15,
            Rex=30, R1s=3, T2s=10 us, omega0=0, B1=1). The CRBs are taken at
            ``max(m0s, CRB_M0S_FLOOR)``.
        ranks : sequence of int, optional
            Default: n_components_. Without ``methods``: truncations of the
            fitted basis (a CRB basis only at its own rank); ranks above 128
            (those stored) need a larger ``n_basis_samples``.
        estimate : tuple of str, default: all free parameters
        methods : sequence of {"svd", "crb"}, optional
            Compare the bases each method learns from this fit's prior draws
            side by side (a CRB basis is optimised for ``estimate_`` at each
            rank it was not fitted at: slow).

        Returns
        -------
        dict
            ``{rank: ndarray (n, len(estimate))}`` of inflation factors (>= 1);
            with ``methods``: ``{"inflation": {method: that}, "energy": {method:
            {rank: fraction of the energy of theta's fingerprints kept}}}``.
        """
        check_is_fitted(self, "basis_")
        th = self._theta([[0.15, 0.5, 15.0, 30.0, 3.0, 10e-6, 0.0, 1.0]] if theta is None else theta, "theta")
        tc = np.where(np.arange(th.shape[1]) == INDEX["m0s"], np.maximum(th, CRB_M0S_FLOOR), th)
        s, J = jacobian(self.sequence_, tc, backend=self.backend)
        kw = dict(estimate=estimate or free_parameters(self.tied_R1), nuisance=self.nuisance, tied_R1=self.tied_R1)
        full = crb_from_jacobian(s, J, **kw)
        ranks = [self.n_components_] if ranks is None else [int(r) for r in ranks]
        if methods is not None:
            methods = (methods,) if isinstance(methods, str) else tuple(methods)
            if not methods or not set(methods) <= {"svd", "crb"}:
                raise ValueError(f"methods must be a non-empty selection of ('svd', 'crb'), got {methods!r}")
        bases = {m: {r: self._learnt_basis(m, r) for r in ranks} for m in (methods or (None,))}
        infl = {m: {r: crb_from_jacobian(s, J, basis=U, **kw) / full for r, U in b.items()} for m, b in bases.items()}
        if methods is None:
            return infl[None]
        sig = simulate(self.sequence_, th, backend=self.backend)
        kept = {m: {r: float(np.linalg.norm(sig @ U.conj()) ** 2 / np.linalg.norm(sig) ** 2) for r, U in b.items()}
                for m, b in bases.items()}
        return {"inflation": infl, "energy": kept}

    # -------------------------------------------------------------- dataset
    def make_dataset(self, n_samples, random_state=None, *, noise=True, theta=None, return_details=False,
                     on_singular="raise"):
        """Noisy features, targets and per-sample CRBs.

        Each sample gets ``M0 = |M0| exp(i phi)`` with ``|M0| = sigma * U[snr]``
        and ``phi ~ U[0, 2 pi)``, and complex white noise of standard deviation
        ``sigma`` per real component added to its coefficients
        (:func:`draw_m0_and_noise`).

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
            ``X_clean`` (noise-free features at M0 = 1), ``crb_unit``
            (CRB at M0 = 1, sigma = 1; what per-epoch noise augmentation
            needs) and ``singular`` (bool per sample).
        on_singular : {"raise", "redraw", "inf"}
            A draw whose Fisher matrix is singular: raise ``ValueError``;
            replace it by a new prior draw (not with ``theta=``); or keep it
            with ``inf`` CRBs, flagged in ``details["singular"]`` (a CRB-loss
            network gives such rows zero weight). Draws with ``m0s = 0``
            (singular exactly there) get the CRB at ``m0s = CRB_M0S_FLOOR``
            (1e-4), the finite m0s -> 0+ limit; their signal and targets keep
            ``m0s = 0``.

        Returns
        -------
        X : ndarray (n_samples, 2 r)
        y : ndarray (n_samples, len(estimate_))
        crb : ndarray (n_samples, len(estimate_))
            CRB of each sample at its own ``|M0|`` and ``sigma``.
        """
        check_is_fitted(self, "basis_")
        if on_singular not in _ON_SINGULAR:
            raise ValueError(f"on_singular must be one of {_ON_SINGULAR}, got {on_singular!r}")
        if on_singular == "redraw" and theta is not None:
            raise ValueError("on_singular='redraw' draws new parameters from the prior: it cannot be used with theta=")
        rng = np.random.default_rng(self.random_state if random_state is None else random_state)
        if theta is None:
            theta = self.prior_.sample(n_samples, rng)
        th = self._theta(theta, "theta")
        # m0s = 0 draws (CSF-like; the brain prior's edge) get the CRB of the m0s -> 0+ limit
        c, crb_unit = self._coefficients_and_crb(th, on_singular="raise" if on_singular == "raise" else "inf",
                                                 m0s_floor=CRB_M0S_FLOOR)
        singular = ~np.all(np.isfinite(crb_unit), axis=1)
        for _ in range(_MAX_REDRAWS if on_singular == "redraw" else 0):
            if not singular.any():
                break
            idx = np.flatnonzero(singular)
            th[idx] = self._theta(self.prior_.sample(idx.size, rng), "theta")
            c[idx], crb_unit[idx] = self._coefficients_and_crb(th[idx], on_singular="inf", m0s_floor=CRB_M0S_FLOOR)
            singular[idx] = ~np.all(np.isfinite(crb_unit[idx]), axis=1)
        if on_singular == "redraw" and singular.any():
            raise ValueError(f"{int(singular.sum())} draws stayed singular after {_MAX_REDRAWS} redraws: "
                             "the prior puts too much mass where the parameters are not identifiable")
        n = th.shape[0]
        sig = check_sigma(self.sigma)
        M0, eps = draw_m0_and_noise(rng, n, c.shape[1], self.snr, sig, noise=noise)
        X_clean = np.hstack([c.real, c.imag])
        X = apply_m0_and_noise(X_clean, M0, eps)
        y = targets_from_theta(th, self.estimate_)
        crb = crb_unit / crb_gain(M0, sig)[:, None]
        if return_details:
            return X, y, crb, {"theta": th, "M0": M0, "sigma": sig, "X_clean": X_clean, "crb_unit": crb_unit,
                               "singular": singular}
        return X, y, crb

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.allow_nan = False
        return tags
