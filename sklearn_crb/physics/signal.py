"""Generalized-Bloch MT fingerprints and their exact Jacobian (linear approximation).

Implements the linear approximation of the generalized Bloch model
(Assländer et al., MRM 2022; Gloor et al. for the two-pool frame) as in
``MRIgeneralizedBloch.jl`` ``simulate_linearapprox``: per-TR propagators
``E_i = F_i P_i R(phi) F_i`` (free precession, pulse, RF phase cycling), the
crushed inversion pulse, the periodic steady state of the whole cycle, and the
signal ``xf + i yf`` at the TR boundary (TR/2 after each pulse centre), in the
phase-cycled frame (Assländer et al., MRM 2022;87:2003-2017, Eqs. 1-9, and the
periodic steady state of Zhang et al., MRM 2022).

State vector: ``m = (xf, yf, zf, xs, zs, 1)`` with ``M0 = 1``.

Two backends compute the same thing:

``"torch"``
    Batched float64 torch (CPU or CUDA): all pulse exponentials in one
    ``torch.linalg.matrix_exp`` call, a tree product for the cycle matrix, a
    5x5 solve and a sweep; the Jacobian by forward-mode autodiff.
``"numba"``
    A fused CPU kernel (``sklearn_crb.physics._numba.kernel``) with analytic tangents,
    used by default for CPU input.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import jvp

from sklearn_crb._validation import chunk_slices
from sklearn_crb.physics.parameters import PARAMETERS, SCALE, validate_theta
from sklearn_crb.physics.r2sl.table import r2sl, r2sl_numpy
from sklearn_crb.physics.sequence import Sequence

__all__ = ["simulate", "jacobian", "pulse_hamiltonian", "free_precession_propagator"]

_DTYPE = torch.float64
#: tangents are taken in theta / SCALE, so that all 8 are of order one
_TANGENT_SCALE = tuple(SCALE[p] for p in PARAMETERS)


# --------------------------------------------------------------------------- helpers
def _stack6(entries, like):
    """Build (..., 6, 6) from {(i, j): tensor}; missing entries are zero."""
    zero = torch.zeros_like(like)
    rows = [torch.stack([entries.get((i, j), zero) for j in range(6)], dim=-1) for i in range(6)]
    return torch.stack(rows, dim=-2)


def pulse_hamiltonian(omega1, B1, omega0, m0s, R1f, R2f, Rex, R1s, R2s, M0=1.0):
    """Generator ``H`` (..., 6, 6) of dm/dt = H m during a rectangular pulse.

    All arguments broadcast (torch tensors or floats). ``omega1`` (rad/s) is the
    nominal nutation rate, scaled by ``B1``; ``R2s`` (1/s) is the linearised
    semi-solid saturation rate; rates in 1/s, ``omega0`` in rad/s.
    Free precession is ``omega1 = 0, R2s = 0`` (Assländer et al., MRM 2022, Eq. 9 with the
    two-pool Bloch-McConnell exchange terms).
    """
    args = torch.broadcast_tensors(*[torch.as_tensor(a, dtype=_DTYPE) for a in
                                     (omega1, B1, omega0, m0s, R1f, R2f, Rex, R1s, R2s, M0)])
    w1, B1, w0, m0s, R1f, R2f, Rex, R1s, R2s, M0 = args
    w = B1 * w1
    m0f = 1.0 - m0s
    e = {
        (0, 0): -R2f, (0, 1): -w0, (0, 2): w,
        (1, 0): w0, (1, 1): -R2f,
        (2, 0): -w, (2, 2): -R1f - Rex * m0s, (2, 4): Rex * m0f, (2, 5): R1f * M0 * m0f,
        (3, 3): -R2s, (3, 4): w,
        (4, 2): Rex * m0s, (4, 3): -w, (4, 4): -R1s - Rex * m0f, (4, 5): R1s * M0 * m0s,
    }
    return _stack6(e, w)


def _exp2x2(a, b, c, d):
    """Closed-form exp of [[a, b], [c, d]] with real eigenvalues (b*c >= 0)."""
    half_tr = 0.5 * (a + d)
    hd = 0.5 * (a - d)
    q2 = hd * hd + b * c
    q = torch.sqrt(torch.clamp(q2, min=0.0))
    # cosh(q) and sinh(q)/q as functions of q^2, with Taylor series near 0
    # (keeps forward/backward derivatives finite when q^2 = 0, e.g. Rex = 0, R1f = R1s)
    small = q < 1e-4
    qs = torch.where(small, torch.ones_like(q), q)
    ch = torch.where(small, 1.0 + q2 / 2.0 + q2 * q2 / 24.0, torch.cosh(qs))
    shc = torch.where(small, 1.0 + q2 / 6.0 + q2 * q2 / 120.0, torch.sinh(qs) / qs)
    s = torch.exp(half_tr)
    return s * (ch + hd * shc), s * b * shc, s * c * shc, s * (ch - hd * shc)


def free_precession_propagator(t, m0s, R1f, R2f, Rex, R1s, omega0, M0=1.0):
    """Exact ``D_xs expm(H_fp t)`` (..., 6, 6) in closed form.

    ``(xf, yf)`` decay with R2f and rotate by ``omega0 t``; ``xs`` is zeroed
    (crushed by the ``D_xs`` projection); ``(zf, zs)`` relax and exchange
    towards ``M0 (m0f, m0s)``. ``t`` in s.
    """
    t, m0s, R1f, R2f, Rex, R1s, w0, M0 = torch.broadcast_tensors(
        *[torch.as_tensor(a, dtype=_DTYPE) for a in (t, m0s, R1f, R2f, Rex, R1s, omega0, M0)])
    m0f = 1.0 - m0s
    e = torch.exp(-R2f * t)
    c, s = torch.cos(w0 * t), torch.sin(w0 * t)
    a11, a12, a21, a22 = _exp2x2((-R1f - Rex * m0s) * t, Rex * m0f * t, Rex * m0s * t, (-R1s - Rex * m0f) * t)
    zf_eq, zs_eq = M0 * m0f, M0 * m0s
    ent = {
        (0, 0): e * c, (0, 1): -e * s,
        (1, 0): e * s, (1, 1): e * c,
        (2, 2): a11, (2, 4): a12, (2, 5): zf_eq - a11 * zf_eq - a12 * zs_eq,
        (4, 2): a21, (4, 4): a22, (4, 5): zs_eq - a21 * zf_eq - a22 * zs_eq,
        (5, 5): torch.ones_like(e),
    }
    return _stack6(ent, e)


def _crusher_propagator(alpha, TRF, B1, R2s):
    """Instantaneous crushed pulse ``U_c`` (..., 6, 6) (the ``"crusher"`` gradient moment).

    Keeps only the refocused echo path of the free pool; the semi-solid pool
    sees ``expm([[-R2s, B1 w1], [-B1 w1, 0]] TRF)``.
    """
    a = B1 * alpha
    s2 = torch.sin(0.5 * a) ** 2
    w = B1 * alpha / TRF
    # 2x2 exp of [[-R2s, w], [-w, 0]] * TRF, eigenvalues possibly complex:
    # exp(M) = e^{tr/2}[cosh(q) I + sinh(q)/q (M - tr/2 I)], q^2 = (a-d)^2/4 + bc.
    A, Bm, C, D = -R2s * TRF, w * TRF, -w * TRF, torch.zeros_like(R2s)
    half_tr, hd = 0.5 * (A + D), 0.5 * (A - D)
    q2 = hd * hd + Bm * C
    qc = torch.sqrt(q2.to(torch.complex128))
    small = qc.abs() < 1e-6
    qs = torch.where(small, torch.ones_like(qc), qc)
    ch = torch.cosh(qc).real
    shc = torch.where(small, 1.0 + q2.to(torch.complex128) / 6.0, torch.sinh(qs) / qs).real
    ex = torch.exp(half_tr)
    ent = {
        (0, 0): s2, (1, 1): -s2, (2, 2): torch.cos(a),
        (3, 3): ex * (ch + hd * shc), (3, 4): ex * Bm * shc,
        (4, 3): ex * C * shc, (4, 4): ex * (ch - hd * shc),
        (5, 5): torch.ones_like(s2),
    }
    return _stack6(ent, s2)


def _sequence_tensors(seq, device):
    f = lambda x: torch.tensor(np.array(x), dtype=_DTYPE, device=device)  # noqa: E731
    return f(seq.alpha), f(seq.TRF)


def _per_tr_propagators(seq, theta):
    """E_i (B, N, 6, 6) for tissues ``theta`` (B, 8) torch float64."""
    device = theta.device
    alpha, TRF = _sequence_tensors(seq, device)
    m0s, R1f, R2f, Rex, R1s, T2s, w0, B1 = [x[:, None] for x in theta.unbind(-1)]
    R2s = r2sl(TRF[None, :], alpha[None, :], B1, T2s)[0]
    H = pulse_hamiltonian(alpha / TRF, B1, w0, m0s, R1f, R2f, Rex, R1s, R2s)
    P = torch.linalg.matrix_exp(H * TRF[None, :, None, None])
    gm = seq.grad_moment
    t_fp = (seq.TR - TRF) / 2
    crush = [i for i, g in enumerate(gm) if g == "crusher"]
    if crush:
        idx = torch.as_tensor(crush, device=device)
        Pc = _crusher_propagator(alpha[idx][None, :], TRF[idx][None, :], B1, R2s[:, idx])
        P = P.index_copy(1, idx, Pc)
        t_fp = t_fp.index_fill(0, idx, seq.TR / 2)
    Dxy = torch.diag(torch.tensor([0, 0, 1, 0, 1, 1], dtype=_DTYPE, device=device))
    for kind, fn in (("spoiler_dual", lambda p: Dxy @ p @ Dxy), ("spoiler_prepulse", lambda p: p @ Dxy)):
        sel = [i for i, g in enumerate(gm) if g == kind]
        if sel:
            idx = torch.as_tensor(sel, device=device)
            P = P.index_copy(1, idx, fn(P[:, idx]))
    F = free_precession_propagator(t_fp[None, :], m0s, R1f, R2f, Rex, R1s, w0)
    phi = seq.rf_phase_increment
    Rphi = torch.eye(6, dtype=_DTYPE, device=device)
    Rphi[0, 0], Rphi[0, 1], Rphi[1, 0], Rphi[1, 1] = math.cos(phi), -math.sin(phi), math.sin(phi), math.cos(phi)
    return F @ (P @ (Rphi @ F))


def _ordered_product(X):
    """X[:, -1] @ ... @ X[:, 1] @ X[:, 0] for X (B, K, 6, 6), as a tree product."""
    while X.shape[1] > 1:
        K = X.shape[1]
        even = K - (K % 2)
        Y = X[:, 1:even:2] @ X[:, 0:even:2]
        X = torch.cat([Y, X[:, even:]], dim=1) if K % 2 else Y
    return X[:, 0]


def _signal_real(seq, theta):
    """(B, N, 2): (xf, yf) at each TR boundary, steady state, M0 = 1."""
    E = _per_tr_propagators(seq, theta)
    A = E[:, 0] @ _ordered_product(E[:, 1:]) if E.shape[1] > 1 else E[:, 0]
    I5 = torch.eye(5, dtype=_DTYPE, device=theta.device)
    m5 = torch.linalg.solve(I5 - A[:, :5, :5], A[:, :5, 5:6])[..., 0]
    m = torch.cat([m5, torch.ones_like(m5[:, :1])], dim=-1)
    out = [m[:, :2]]
    for i in range(1, E.shape[1]):
        m = (E[:, i] @ m[..., None])[..., 0]
        out.append(m[:, :2])
    return torch.stack(out, dim=1)


# --------------------------------------------------------------------------- public API
def _prepare(sequence, theta, argname="theta"):
    sequence = Sequence.resolve(sequence)
    is_torch = isinstance(theta, torch.Tensor)
    device = theta.device if is_torch else torch.device("cpu")
    arr = validate_theta(theta, argname)
    # fail early, naming the parameter, if the R2sl table does not cover it
    # (the extreme TRF and |alpha| bound every pulse's table coordinates)
    a_max = np.abs(sequence.alpha).max()
    for TRF_x in (sequence.TRF.min(), sequence.TRF.max()):
        r2sl_numpy(TRF_x, a_max, arr[:, 7], arr[:, 5])
    return sequence, torch.as_tensor(arr, dtype=_DTYPE, device=device), is_torch


def _apply_M0(sig, M0, n, argname="M0"):
    M0a = np.asarray(M0.detach().cpu() if isinstance(M0, torch.Tensor) else M0)
    if not np.issubdtype(M0a.dtype, np.number):
        raise TypeError(f"{argname} must be a number or a numeric array, got dtype {M0a.dtype}")
    M0t = torch.as_tensor(M0a.astype(np.complex128 if np.iscomplexobj(M0a) else np.float64), device=sig.device)
    if M0t.ndim > 1 or (M0t.ndim == 1 and M0t.shape[0] != n):
        raise ValueError(f"{argname} must be a scalar or have shape ({n},), got {tuple(M0t.shape)}")
    if not torch.all(torch.isfinite(torch.view_as_real(M0t) if torch.is_complex(M0t) else M0t)):
        raise ValueError(f"{argname} must be finite")
    return sig * (M0t[:, None] if M0t.ndim == 1 else M0t)


def _use_numba(backend, device):
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "torch" or device.type != "cpu":
        if backend == "numba" and device.type != "cpu":
            raise ValueError("backend='numba' runs on CPU tensors only")
        return False
    return _numba_kernel(required=backend == "numba") is not None


def _numba_kernel(required=False):
    """The numba kernel module, or None without numba.

    Imported on first use, not at module import: numba is optional for the torch
    backend, and importing the kernel costs a second (its cache is checked then).
    """
    try:
        from sklearn_crb.physics._numba import kernel
    except ImportError:
        if required:
            raise
        return None
    return kernel


def _check_finite(out, sequence, th, what):
    """Raise, naming the samples, when the model gave non-finite values (never silent NaN)."""
    flat = torch.view_as_real(out).reshape(out.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"{what} is not finite for {len(idx)} sample(s) (indices {idx[:10]}"
            f"{', ...' if len(idx) > 10 else ''}; first theta = {th[idx[0]].tolist()}, "
            f"sequence TR = {sequence.TR} s): these parameters are outside the range where "
            "the model can be evaluated")


def simulate(sequence, theta, M0=1.0, *, backend="auto", chunk_size=None):
    """Steady-state MT fingerprints of the generalized Bloch model.

    Parameters
    ----------
    sequence : Sequence or None
        The pulse train (``None``: ``Sequence.default()``).
    theta : array_like or torch.Tensor, shape (n_samples, 8)
        Tissue parameters in ``PARAMETERS`` order and SI units.
    M0 : complex or array_like of shape (n_samples,), optional
        Proton density (scales the signal linearly; complex allowed).
    backend : {"auto", "torch", "numba"}
        ``"auto"``: the fused numba kernel for CPU input, torch otherwise.
    chunk_size : int, optional
        Tissues per batch (bounds the memory of the torch backend).

    Returns
    -------
    signal : ndarray or torch.Tensor, complex128, shape (n_samples, n_pulses)
        ``xf + i yf`` at each TR boundary (TR/2 after each pulse centre), in
        the phase-cycled frame, in units of M0. A torch tensor (on the input's
        device) when ``theta`` is one, else numpy.
    """
    sequence, th, is_torch = _prepare(sequence, theta)
    if _use_numba(backend, th.device):
        sig = torch.from_numpy(_numba_kernel().simulate_numba(sequence, th.numpy()))
    else:
        parts = []
        for sl in chunk_slices(th.shape[0], 64 if chunk_size is None else chunk_size):
            xy = _signal_real(sequence, th[sl])
            parts.append(torch.complex(xy[..., 0], xy[..., 1]))
        sig = torch.cat(parts)
    _check_finite(sig, sequence, th, "the simulated signal")
    sig = _apply_M0(sig, M0, th.shape[0])
    return sig if is_torch else sig.numpy()


def _jacobian_torch(sequence, th):
    f = lambda x: _signal_real(sequence, x)  # noqa: E731
    # tangents of typical size: a unit T2s tangent (1 s!) would force many
    # extra squarings in the matrix-exponential derivative and lose accuracy
    scale = torch.as_tensor(_TANGENT_SCALE, dtype=_DTYPE, device=th.device)
    eye = torch.diag(scale)
    outs = [jvp(f, (th,), (eye[k].expand_as(th),)) for k in range(th.shape[1])]
    sig = outs[0][0]
    J = torch.stack([o[1] for o in outs], dim=-1) / scale  # (B, N, 2, 8)
    return torch.complex(sig[..., 0], sig[..., 1]), torch.complex(J[..., 0, :], J[..., 1, :])


def jacobian(sequence, theta, M0=1.0, *, backend="auto", chunk_size=None):
    """Fingerprints and their exact derivatives with respect to ``theta``.

    Parameters
    ----------
    sequence, theta, M0, backend, chunk_size
        As in :func:`simulate`.

    Returns
    -------
    signal : complex128, shape (n_samples, n_pulses)
    J : complex128, shape (n_samples, n_pulses, 8)
        ``d signal / d theta`` in ``PARAMETERS`` order (per SI unit of each
        parameter). ``d signal / d M0 = signal / M0`` is not included.

    Notes
    -----
    Exact: forward-mode derivatives of the same discrete model (torch) or
    analytic tangents carried through the fused kernel (numba); finite
    differences are used only as a test oracle.
    """
    sequence, th, is_torch = _prepare(sequence, theta)
    if _use_numba(backend, th.device):
        s, J = _numba_kernel().jacobian_numba(sequence, th.numpy())
        sig, J = torch.from_numpy(s), torch.from_numpy(J)
    else:
        ss, JJ = [], []
        for sl in chunk_slices(th.shape[0], 16 if chunk_size is None else chunk_size):
            s, J = _jacobian_torch(sequence, th[sl])
            ss.append(s)
            JJ.append(J)
        sig, J = torch.cat(ss), torch.cat(JJ)
    _check_finite(sig, sequence, th, "the simulated signal")
    _check_finite(J, sequence, th, "the Jacobian")
    sig = _apply_M0(sig, M0, th.shape[0])
    J = _apply_M0(J.reshape(J.shape[0], -1), M0, th.shape[0]).reshape(J.shape)
    if is_torch:
        return sig, J
    return sig.numpy(), J.numpy()
