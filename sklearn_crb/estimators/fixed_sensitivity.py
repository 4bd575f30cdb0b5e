"""How the error of a measured (fixed) parameter map propagates into the estimates.

A parameter held fixed at a measured value ``b`` (a B1 or B0 map) is not
known exactly: with a map error of standard deviation ``sigma_b`` the
estimate moves by ``(d theta_hat / d b) * error`` to first order, and its
variance grows by ``sum_b (d theta_hat_p / d b)^2 sigma_b^2`` (independent
map errors). This module computes the *sensitivities* ``d theta_hat / d b``;
:func:`sklearn_crb.maps.fit_maps` (``fixed_se=``) adds the variance to the
standard-error maps.

* A least-squares fit (NLLS, dictionary matching as its approximation): the
  implicit-function derivative at the optimum, to first order
  (Gauss-Newton), ``d u / d b = -Re(C^H C)^-1 Re(C^H c_b)`` with ``C`` the
  columns of the unknowns ``u`` (estimated and nuisance parameters, complex
  M0) and ``c_b = d g / d b``, in the compressed basis.
* A network that takes ``b`` as an input (``measured_``): its own derivative
  with respect to that input, by autograd
  (:func:`._network_details.input_gradient_variance`). A network that does
  not take ``b`` as an input does not depend on it: sensitivity 0.
"""

from __future__ import annotations

import numpy as np
import torch

from sklearn_crb.crb import fisher_columns, project
from sklearn_crb.physics.parameters import INDEX, rate_name

__all__ = ["model_sensitivity", "fixed_variance"]


def model_sensitivity(signal, J, *, estimate, nuisance, fixed_names, tied_R1=False, basis=None):
    """``d theta_hat_p / d b`` of a least-squares fit, shape (n, len(estimate), len(fixed_names)).

    Parameters
    ----------
    signal, J : array_like, complex, (n, N) and (n, N, 8)
        Model and its exact Jacobian at the estimate, M0 = 1 (full signal, or
        already compressed with ``basis=None``).
    estimate : tuple of str
        Estimated rates (canonical order, as in the fit).
    nuisance : tuple of str
        Free nuisance parameters of the fit (marginalised, like complex M0).
    fixed_names : tuple of str
        The fixed parameters ``b``.
    basis : array_like (N, r), optional
        Compression basis applied to ``signal`` and ``J``.

    Returns NaN rows where the unknowns' normal matrix is singular.
    """
    s = torch.as_tensor(np.asarray(signal), dtype=torch.complex128)
    Jt = torch.as_tensor(np.asarray(J), dtype=torch.complex128)
    C, _, n_est = fisher_columns(s, Jt, estimate=estimate, nuisance=tuple(nuisance) or None, tied_R1=tied_R1)
    Cb = torch.stack([Jt[..., INDEX[rate_name(b)]] for b in fixed_names], dim=-1)
    if basis is not None:
        U = torch.as_tensor(np.asarray(basis), dtype=torch.complex128)
        C, Cb = project(U, C), project(U, Cb)
    A = (C.conj().transpose(1, 2) @ C).real
    B = (C.conj().transpose(1, 2) @ Cb).real
    d = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()  # unit-diagonal scaling
    L, info = torch.linalg.cholesky_ex(A * d[:, :, None] * d[:, None, :])
    ok = info == 0
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
    sol = -d[:, :, None] * torch.cholesky_solve(d[:, :, None] * B, torch.where(ok[:, None, None], L, eye))
    sol[~ok] = float("nan")
    return sol[:, :n_est].numpy()


def fixed_variance(sensitivity, fixed_se):
    """``sum_b (S_pb sigma_b)^2``, shape (n, n_est), from sensitivities (n, n_est, n_b) and map errors (n, n_b)."""
    S = np.asarray(sensitivity, dtype=np.float64)
    e = np.asarray(fixed_se, dtype=np.float64)
    return np.einsum("npb,nb->np", S**2, e**2)
