"""``PredictionDetails``: the one result type of every estimator's ``predict_details``.

NLLS, the dictionary matcher and the network return the same fields, so that
:func:`sklearn_crb.maps.fit_maps` and user code never ask which estimator made
them. A field that an estimator does not produce is ``None``, never missing.

Units: ``theta`` in SI units in the order of
:data:`sklearn_crb.physics.parameters.PARAMETERS` (rates in 1/s, ``T2s`` in s,
``omega0`` in rad/s, ``B1`` relative); ``prediction`` in the units of the
estimator's targets (a time target ``T1f`` in s); ``M0`` and the residuals in
the data's units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["PredictionDetails"]


@dataclass(frozen=True, eq=False)
class PredictionDetails:
    """Per-voxel estimates with their model fit, convergence and uncertainty.

    Attributes
    ----------
    estimate : tuple of str
        The estimated targets, in the column order of ``prediction``, ``crb_unit``, ``var_unit``.
    prediction : ndarray, shape (n, len(estimate))
        What ``predict`` returns (NaN where ``failed``).
    theta : ndarray, shape (n, 8)
        All model parameters: the estimates (as rates), the fixed values and the
        fill or fitted values of the others.
    M0 : ndarray of complex, shape (n,)
        The fitted complex proton density (data units).
    residual_norm : ndarray, shape (n,)
        ``||c - M0 u(theta)||`` in the data's units.
    converged : ndarray of bool, shape (n,)
        Usable estimate (finite input, finite outputs, solver converged).
    failed : ndarray of bool, shape (n,)
        ``~converged``.
    n_free : int
        Free real parameters of the fit, the estimates, the fitted nuisance
        parameters and the two of complex ``M0`` (the residual's degrees of
        freedom are ``2 K - n_free``, ``K`` complex coefficients).
    fixed_names : tuple of str
        Parameters held at ``fixed=`` values.
    crb_unit : ndarray (n, len(estimate)) or None
        The CRB at the estimate for ``M0 = 1``, ``sigma = 1`` (squared target units).
    var_unit : ndarray (n, len(estimate)) or None
        The network's delta-method variance for ``M0 = 1``, ``sigma = 1`` (``se="delta"``).
    crb : ndarray (n, len(estimate)) or None
        The CRB at the fitted ``M0`` and ``sigma`` (NLLS).
    std_error : ndarray (n, len(estimate)) or None
        ``sqrt(crb)``.
    sigma : ndarray (n,) or None
        Noise standard deviation per real coefficient used for ``crb`` (NLLS).
    fixed_sensitivity : ndarray (n, len(estimate), len(fixed_names)) or None
        d estimate / d fixed value, for propagating a measured map's error.
    noise_residual_norm : ndarray (n,) or None
        The residual projected off the model's tangent space (NaN where not computed; network).
    out_of_range : ndarray of bool (n,) or None
        Estimates outside the model's bounds (network).
    at_bound : ndarray of bool (n, n_free_parameters) or None
        Fitted parameters at a bound (NLLS), columns as ``free_parameters``.
    free_parameters : tuple of str or None
        The parameters the solver fitted (NLLS).
    status : ndarray of int (n,) or None
        Solver status per voxel (NLLS), named by ``status_names``.
    status_names : dict or None
    n_iter, n_jacobian : ndarray of int (n,) or None
        Solver iterations and exact Jacobians (NLLS).
    correlation : ndarray (n,) or None
        |inner product| with the matched atom (dictionary).
    index : ndarray of int (n,) or None
        The matched atom (dictionary).
    theta_best : ndarray (n, n_best, 8) or None
        The ``n_best`` best atoms' parameters (dictionary).
    """

    estimate: tuple
    prediction: np.ndarray
    theta: np.ndarray
    M0: np.ndarray
    residual_norm: np.ndarray
    converged: np.ndarray
    failed: np.ndarray
    n_free: int
    fixed_names: tuple = ()
    crb_unit: np.ndarray | None = None
    var_unit: np.ndarray | None = None
    crb: np.ndarray | None = None
    std_error: np.ndarray | None = None
    sigma: np.ndarray | None = None
    fixed_sensitivity: np.ndarray | None = None
    noise_residual_norm: np.ndarray | None = None
    out_of_range: np.ndarray | None = None
    at_bound: np.ndarray | None = None
    free_parameters: tuple | None = None
    status: np.ndarray | None = None
    status_names: dict | None = None
    n_iter: np.ndarray | None = None
    n_jacobian: np.ndarray | None = None
    correlation: np.ndarray | None = None
    index: np.ndarray | None = None
    theta_best: np.ndarray | None = None

    @classmethod
    def field_names(cls):
        """The names of every field, in order."""
        return tuple(f.name for f in fields(cls))

    def to_dict(self):
        """``{field: value}`` of every field (None included)."""
        return {name: getattr(self, name) for name in self.field_names()}

    def __len__(self):
        return int(np.shape(self.theta)[0])

    # The 0.1 dict protocol, kept for one release so scripts written against it keep working.
    def __getitem__(self, key):
        warnings.warn("predict_details() returns a PredictionDetails object since 0.2: use details.%s instead "
                      "of details[%r]" % (key, key), DeprecationWarning, stacklevel=2)
        if key not in self.field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key, default=None):
        """Deprecated dict access (see ``__getitem__``); ``default`` for unknown names."""
        warnings.warn("predict_details() returns a PredictionDetails object since 0.2: use attribute access",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, key, default) if key in self.field_names() else default
