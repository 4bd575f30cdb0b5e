"""The tissue model an estimator fits with, resolved once (``ModelMixin``), and the protocol that reads it.

NLLS (:class:`~sklearn_crb.estimators.nlls.NLLSFitter`), dictionary matching
(:class:`~sklearn_crb.estimators.dictionary.DictionaryMatcher`) and the
simulator (:class:`~sklearn_crb.simulator.MTFingerprintSimulator`) take the
same model arguments, ``sequence``, ``basis``, ``estimate``, ``tied_R1`` and
(the estimators) ``fixed``; :class:`ModelMixin` turns them into the fitted
``sequence_``, ``basis_``, ``estimate_`` and ``fixed_`` with one set of checks.

:class:`FittedModel` is the declared protocol by which other code asks an
estimator what it fits with (:func:`sklearn_crb.maps.fit_maps`, the ``init=``
check of NLLS): an estimator provides ``fitted_model()``; :func:`fitted_model`
returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._validation import check_basis, check_parameter_dict
from sklearn_crb.physics.parameters import resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["FittedModel", "ModelMixin", "fitted_model", "BASIS_MATCH_TOL", "NETWORK_SE"]

#: Largest element-wise difference at which two bases count as the same (a float32 copy of a basis is
#: the same basis; ``io.models.check_compatible`` uses the same tolerance).
BASIS_MATCH_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class FittedModel:
    """What a fitted estimator fits with: the protocol :func:`sklearn_crb.maps.fit_maps` reads.

    Attributes
    ----------
    sequence : Sequence
        The pulse train of its fingerprints.
    basis : ndarray complex (n_pulses, r) or None
        The compression basis of its input coefficients (None: full signals).
    estimate : tuple of str
        The targets ``predict`` returns, in its column order.
    tied_R1 : bool
        The R1s = R1f model.
    measured : tuple of str
        Parameters the estimator takes as measured inputs and needs as ``fixed=`` values (a network
        conditioned on a B1 map); empty for estimators that only accept them.
    se_methods : tuple of str
        The standard errors ``predict_details`` gives, its default first: ``("crb",)`` (sqrt(CRB) at the
        estimate: NLLS, dictionary) or ``("delta", "crb")`` (a network); an estimator with several takes
        ``predict_details(..., se=)``.
    noise_input : bool
        The estimator needs the noise level before it runs (a noise-aware network, or NLLS started
        from one): ``predict_details(..., sigma=)``; :func:`sklearn_crb.maps.fit_maps` estimates it
        first when not given.
    typical_snr : float or None
        ``||x|| / sigma`` at the centre of a noise-aware network's training data (features ``x``):
        where ``fit_maps`` starts its estimate of an unknown sigma.
    """

    sequence: Sequence
    basis: np.ndarray | None
    estimate: tuple
    tied_R1: bool = False
    measured: tuple = ()
    se_methods: tuple = ("crb",)
    noise_input: bool = False
    typical_snr: float | None = None

    @property
    def rank(self):
        """Coefficients per voxel: the basis rank, or the number of pulses for full signals."""
        return self.sequence.n_pulses if self.basis is None else int(self.basis.shape[1])

    def check_same_acquisition(self, other, argname):
        """Refuse ``other`` (a FittedModel) unless it has the same sequence and basis.

        Raises
        ------
        ValueError
            Naming ``argname`` and what differs (sequence hash, basis shape or values).
        """
        if self.sequence.sha256() != other.sequence.sha256():
            raise ValueError(f"{argname}: sequence mismatch, {other.sequence.name!r} ({other.sequence.n_pulses} "
                             f"pulses, sha256 {other.sequence.sha256()[:12]}) is not this estimator's "
                             f"{self.sequence.name!r} ({self.sequence.n_pulses} pulses, sha256 "
                             f"{self.sequence.sha256()[:12]})")
        mine, theirs = self.basis, other.basis
        if (mine is None) != (theirs is None):
            raise ValueError(f"{argname}: basis mismatch, one works on full signals and the other on rank-"
                             f"{(theirs if mine is None else mine).shape[1]} coefficients")
        if mine is None:
            return
        if mine.shape != theirs.shape or np.abs(mine - np.asarray(theirs, np.complex128)).max() > BASIS_MATCH_TOL:
            raise ValueError(f"{argname}: basis mismatch, its basis (shape {np.shape(theirs)}) is not this "
                             f"estimator's (shape {mine.shape}); coefficients in another basis cannot be used")


class ModelMixin:
    """Resolves the model arguments ``sequence``, ``basis``, ``estimate``, ``tied_R1`` and ``fixed``.

    The estimator calls :meth:`_resolve_model` in ``fit``; the fitted attributes are its own:
    ``sequence_`` (Sequence), ``basis_`` (checked complex128 or None), ``estimate_`` (canonical
    target names) and ``fixed_`` (``{name: float}``, SI units).
    """

    def _resolve_model(self, *, with_fixed=True):
        """Set ``sequence_``, ``estimate_`` (and ``fixed_``); return the sequence and the checked basis.

        The basis is returned, not set, so that an estimator that cuts it (the simulator's
        ``n_components``) sets its ``basis_`` once.
        """
        seq = Sequence.resolve(self.sequence)
        basis = None if self.basis is None else check_basis(self.basis, seq.n_pulses)
        self.sequence_ = seq
        self.estimate_ = resolve_estimate(self.estimate, self.tied_R1)
        if with_fixed:
            self.fixed_ = self._resolve_fixed_values()
        return seq, basis

    def _resolve_fixed_values(self):
        fixed = {k: float(v) for k, v in check_parameter_dict(self.fixed, "fixed").items()}
        if self.tied_R1 and "R1s" in fixed:
            raise ValueError("fixed cannot contain 'R1s' when tied_R1=True (R1s = R1f)")
        overlap = [p for p in self.estimate_ if p in fixed]
        if overlap:
            raise ValueError(f"estimate and fixed overlap: {overlap}")
        return fixed

    def fitted_model(self):
        """The :class:`FittedModel` of this fitted estimator (the protocol of ``fit_maps``)."""
        check_is_fitted(self, "estimate_")
        return FittedModel(sequence=self.sequence_, basis=self.basis_, estimate=tuple(self.estimate_),
                           tied_R1=bool(self.tied_R1))


def fitted_model(estimator, argname="estimator"):
    """The :class:`FittedModel` of a fitted estimator.

    An estimator declares its model by a ``fitted_model()`` method: :class:`ModelMixin` gives it to
    ``NLLSFitter``, ``DictionaryMatcher`` and the simulator; ``CRBNetRegressor`` has its own.

    Raises
    ------
    TypeError
        The estimator declares no model.
    ValueError
        A network that carries no sequence and basis.
    """
    method = getattr(estimator, "fitted_model", None)
    if not callable(method):
        raise TypeError(f"{argname} must declare the model it fits with (a fitted_model() method, as NLLSFitter, "
                        f"DictionaryMatcher and CRBNetRegressor do), got {type(estimator).__name__}")
    try:
        return method()
    except ValueError as exc:
        raise ValueError(f"{argname}: {exc}") from None


#: A network's standard errors: its delta-method spread (default) or sqrt(CRB) at its estimate.
NETWORK_SE = ("delta", "crb")
