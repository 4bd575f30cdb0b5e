"""The CRB loss weights: where the CRB is evaluated, and the caps of the nuisance outputs' weights.

CRB at the network's own estimate (``CRBNetRegressor(crb_at="estimate")``).

Why. With weights ``w = s^2/CRB(theta)`` at the *true* ``theta`` the CRB
loss ``E[w(theta) (theta_hat - theta)^2]`` is minimised by the posterior
mean under the prior *tilted* by ``1/CRB(theta)``: where the data leave a
parameter uncertain, the estimate is pulled towards the values of the
prior whose CRB is small. On the brain prior (v3.2, rank 13, in-vivo SNR)
``sqrt(CRB(m0s))`` grows with m0s (and falls with Rex), so the tilt pulls
m0s down: a 12,000 x 300 recipe gave white-/grey-matter phantom medians
16-17 % / 14-17 % below NLLS's (5-8 % / 9-13 % with the weight at the
estimate). A weight that depends on the *data* only leaves
each input's minimiser at the plain posterior mean while it keeps the CRB
loss's balance between parameters and SNRs (the reason for the CRB
normalisation).

How. ``w = w_truth * exp(g(theta_hat) - g(theta))``, with ``theta_hat``
the network's detached estimate and ``g`` a smooth surrogate of the log
weight ``log(s^2/CRB)``: a small MLP fitted once per ``fit`` to the
training set's exact CRBs (standardised targets in, one log weight per
target out; infinite CRBs left out). The factor moves the smooth part of
the weight's dependence on ``theta`` (what tilts the estimate) from the
truth to the estimate; where the estimate is close to the truth (the
informative regime) the weight is the paper's whatever the surrogate's
error, and each row keeps its own SNR factor. The exponent is clipped to
``+-MAX_LOG_RATIO``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sklearn_crb.estimators.net.modules import reset_parameters_with

__all__ = ["CRB_AT", "LogWeightSurrogate", "fit_log_weight_surrogate", "estimate_weights", "resolve_crb_at",
           "crb_surrogate", "FittedSurrogate", "SURROGATE_ROWS", "NUISANCE_TARGETS", "weight_caps"]

#: Largest |log| of the factor by which the weight at the estimate may differ from the weight at the truth.
MAX_LOG_RATIO = 5.0

#: Rows of a lazy set read (at random) to fit the weight surrogate of ``crb_at="estimate"``.
SURROGATE_ROWS = 200_000

#: Where the CRB of the loss weight is evaluated: at the true parameters (Zhang et al. 2022) or at the
#: network's estimate; "auto": the estimate with the CRB loss, else the truth.
CRB_AT = ("auto", "truth", "estimate")


def resolve_crb_at(crb_at, loss):
    """``"truth"`` or ``"estimate"`` for a fit; refuses ``"estimate"`` where it is not defined."""
    if crb_at not in CRB_AT:
        raise ValueError(f"crb_at must be one of {CRB_AT}, got {crb_at!r}")
    if crb_at == "auto":
        return "estimate" if loss == "crb" else "truth"
    if crb_at == "estimate" and loss != "crb":
        raise ValueError(f"crb_at='estimate' is defined for loss='crb' only, got loss={loss!r}")
    return crb_at


class LogWeightSurrogate(nn.Module):
    """Standardised targets ``(batch, P)`` -> ``log(s^2/CRB_unit)`` ``(batch, P)`` (float32 MLP).

    ``mean``/``scale`` (buffers) undo the standardisation of the log weights.
    """

    def __init__(self, n_outputs, hidden=128):
        super().__init__()
        n, h = int(n_outputs), int(hidden)
        self.body = nn.Sequential(nn.Linear(n, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, n))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scale", torch.ones(n))

    def forward(self, z):
        return self.body(z) * self.scale + self.mean


def fit_log_weight_surrogate(Ys, w_unit, *, seed=0, steps=None, batch_size=512, lr=3e-3, max_rows=200_000):
    """Fit :class:`LogWeightSurrogate` to the unit CRB weights of a training set.

    Parameters
    ----------
    Ys : ndarray (n, P)
        Standardised targets ``(theta - m)/s`` (what the network outputs).
    w_unit : ndarray (n, P)
        ``s^2/CRB_unit`` (:func:`~._training.loss_weights`); 0 where the CRB
        is infinite (left out of that target's fit).
    seed : int
        Seeds the row subset, the initialisation and the batches.
    steps, batch_size, lr
        Adam steps on a one-cycle schedule; ``steps=None``: ``n/4`` within
        [200, 3000] (3000 steps take about 8 s on one CPU core, 1 % of the
        default recipe's training).
    max_rows : int
        Rows used at most (a random subset of larger sets).

    Returns
    -------
    surrogate : LogWeightSurrogate
        In eval mode, on the CPU, without gradients.
    rms : ndarray (P,)
        RMS error of the log weight on the rows it was fitted to.
    """
    Ys = np.asarray(Ys, dtype=np.float64)
    w = np.asarray(w_unit, dtype=np.float64)
    n, p = Ys.shape
    steps = int(np.clip(n // 4, 200, 3000)) if steps is None else int(steps)
    rng = np.random.default_rng(seed)
    if n > max_rows:
        idx = np.sort(rng.choice(n, max_rows, replace=False))
        Ys, w = Ys[idx], w[idx]
    ok = np.isfinite(w) & (w > 0)
    if not ok.any(axis=0).all():
        raise ValueError("every CRB weight of some target is zero or non-finite: nothing to fit the surrogate to")
    with np.errstate(divide="ignore"):
        lw = np.where(ok, np.log(np.where(ok, w, 1.0)), 0.0)
    mu = np.array([lw[ok[:, j], j].mean() for j in range(p)])
    sd = np.array([lw[ok[:, j], j].std() for j in range(p)])
    sd = np.where(sd > 0, sd, 1.0)
    gen = torch.Generator().manual_seed(int(seed))
    sur = LogWeightSurrogate(p)
    with torch.no_grad():
        reset_parameters_with(sur, gen)  # no draw from torch's process-global RNG (other threads may use it)
    Z = torch.as_tensor(Ys, dtype=torch.float32)
    L = torch.as_tensor((lw - mu) / sd, dtype=torch.float32)
    M = torch.as_tensor(ok, dtype=torch.float32)
    opt = torch.optim.Adam(sur.body.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=int(steps))
    bs = min(int(batch_size), len(Z))
    for _ in range(int(steps)):
        i = torch.randint(0, len(Z), (bs,), generator=gen)
        m = M[i]
        loss = (m * (sur.body(Z[i]) - L[i]) ** 2).sum() / m.sum().clamp_min(1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    sur.mean.copy_(torch.as_tensor(mu, dtype=torch.float32))
    sur.scale.copy_(torch.as_tensor(sd, dtype=torch.float32))
    sur.eval().requires_grad_(False)
    with torch.no_grad():
        err = (sur(Z).double().numpy() - lw) ** 2
    rms = np.sqrt(np.array([err[ok[:, j], j].mean() for j in range(p)]))
    return sur, rms


def estimate_weights(surrogate, w_truth, y_pred, y_true, max_log_ratio=MAX_LOG_RATIO):
    """``w_truth * exp(g(y_pred) - g(y_true))`` without gradients: the CRB loss weights moved to the estimate.

    ``g`` is the surrogate log weight; ``w_truth`` (batch, P) the weights at
    the truth (each row's own SNR included, 0 for an infinite CRB),
    ``y_pred``/``y_true`` standardised. Where the estimate is close to the
    truth the weight is the truth's whatever the surrogate's error; the
    exponent is clipped to ``+-max_log_ratio``. Returns (batch, P) in
    ``y_pred``'s dtype and device.
    """
    with torch.no_grad():
        if next(surrogate.buffers()).device != y_pred.device:
            surrogate.to(y_pred.device)
        yt = torch.as_tensor(y_true, device=y_pred.device).reshape(y_pred.shape).float()
        d = (surrogate(y_pred.detach().float()) - surrogate(yt)).double().clamp(-max_log_ratio, max_log_ratio)
        w = torch.as_tensor(w_truth, device=y_pred.device).double()
        return (w * torch.exp(d)).to(y_pred.dtype)


def crb_surrogate(crb_at, Ys, w_unit, seed):
    """``(FittedSurrogate, rms)`` of the log weight for ``crb_at="estimate"``, ``(None, None)`` for ``"truth"``.

    ``Ys``/``w_unit``: the standardised targets and unit CRB weights of the
    training set (or of a random subset of a lazy one); ``seed`` seeds the fit.
    """
    if crb_at != "estimate":
        return None, None
    module, rms = fit_log_weight_surrogate(Ys, w_unit, seed=seed)
    return FittedSurrogate(module), rms


class FittedSurrogate:
    """A fitted :class:`LogWeightSurrogate` held outside skorch's module registry (training-only state)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, w_truth, y_pred, y_true):
        return estimate_weights(self.module, w_truth, y_pred, y_true)


#: Targets whose CRB loss weight ``nuisance_weight_cap`` caps: the nuisance parameters of the tied model.
NUISANCE_TARGETS = ("Rex", "T2s", "omega0", "B1")


def weight_caps(names, cap):
    """Per-target caps of the CRB loss weight ``s^2/CRB``: ``cap`` for :data:`NUISANCE_TARGETS`, else +inf.

    The weight of a nuisance output can dwarf those of the targets of
    interest: at SNR 100 on the brain prior, omega0's ``s^2/CRB`` is about
    1e3 at the median and up to 1e9, against medians of about 11 / 100 / 290
    for m0s / R1f / R2f. An uncapped average over the 7 free parameters of
    the tied model spent the network on fitting omega0 far below 1 rad/s and
    made the m0s CRB-normalised MSE 29x worse (56.8 against 1.97); capping
    Rex, T2s, omega0 and B1 at 400 (their CRB floored at (5 % of their
    standard deviation)^2) left m0s, R1f and R2f unchanged within run-to-run
    noise and still gave CRB-level omega0 and B1 on the typical voxel.
    Primary targets (m0s, the relaxation rates and times, R1s) are never
    capped.
    """
    caps = np.full(len(names), np.inf)
    if cap is not None:
        caps[[j for j, p in enumerate(names) if p in NUISANCE_TARGETS]] = float(cap)
    return caps
