"""The losses of ``CRBNetRegressor``: weighted squared errors of standardised outputs.

Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022: the loss is the mean over samples ``n`` and
estimated parameters ``p`` of ``(theta_hat - theta)^2 / CRB``, with each
sample's own CRB at its own ``|M0|`` and noise level.

The per-sample losses are weighted squared errors of standardised outputs
(``y = (theta - m) / s``): ``w = s^2/CRB`` (``"crb"``), ``s^2`` (``"mse"``)
or ``s^2/theta^2`` (``"relative"``), so the network trains in float32 at a
well-conditioned scale while the loss is the one in physical units.
``"bias_reduced"`` (Mao et al., arXiv 2312.11468) puts ``w = s^2/CRB`` on the squared bias and the
variance over ``Nr`` noise realisations per fingerprint (:func:`bias_reduced_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from skorch.utils import to_tensor
from torch import nn

__all__ = ["LOSSES", "CRB_LOSSES", "WeightedMSELoss", "loss_weights", "batch_weights", "bias_reduced_loss"]

LOSSES = ("crb", "mse", "relative", "bias_reduced")
#: Losses whose weights are ``s^2/CRB`` at each sample's own SNR (rescaled by the augmentation, capped).
CRB_LOSSES = ("crb", "bias_reduced")


class WeightedMSELoss(nn.Module):
    """``mean_{n,p} w_np (y_pred_np - y_true_np)^2`` (all losses of the regressor).

    With standardised targets ``y = (theta - m) / s`` and ``w = s^2 / CRB`` this
    is the CRB-normalised MSE of Zhang et al. 2022 in physical units.
    """

    def forward(self, y_pred, y_true, weight):
        return torch.mean(weight * (y_pred - y_true) ** 2)


def loss_weights(loss, Y, crb, scale):
    """Per-sample, per-target weights ``w`` of the standardised squared error (float32).

    An infinite CRB (a singular Fisher matrix, ``on_singular="inf"``) gives
    weight 0: the sample carries no information on that target. Raises
    ``ValueError`` when another weight is not a finite positive float32 (e.g.
    a CRB of 1e-300 against a target scale of 0.1): such a loss cannot be
    trained.
    """
    s2 = scale**2
    if loss in CRB_LOSSES:
        with np.errstate(divide="ignore"):
            w = np.where(np.isposinf(crb), 0.0, s2 / crb)
    elif loss == "mse":
        w = np.broadcast_to(s2, Y.shape)
    else:
        if np.any(Y == 0):
            raise ValueError("loss='relative' divides by theta^2: y must not contain zeros")
        w = s2 / Y**2
    with np.errstate(over="ignore"):
        w32 = np.ascontiguousarray(w, dtype=np.float32)
    bad = ~np.isfinite(w32) | (w32 <= 0)
    if loss in CRB_LOSSES:
        bad &= ~np.isposinf(crb)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        crbl = loss in CRB_LOSSES
        what = "crb" if crbl else "y"
        raise ValueError(f"the loss weights (target scale^2 / {'CRB' if crbl else 'theta^2'}) of "
                         f"{int(bad.any(axis=1).sum())} samples are not finite positive float32 numbers (e.g. row "
                         f"{i}: {what} = {(crb if crbl else Y)[i]}): the {what} values are degenerate "
                         f"(far below the targets' scale {scale}); drop those samples")
    return w32


def batch_weights(Xb, loss, scale, like, caps=None):
    """The loss weights of a batch: its packed ``"w"`` (with the CRB loss, capped per target at ``caps``),
    or ``scale^2`` for ``loss="mse"`` (on ``like``'s device)."""
    if isinstance(Xb, Mapping) and "w" in Xb:
        w = to_tensor(Xb["w"], device=like.device).to(like.dtype)
        if loss in CRB_LOSSES and caps is not None and bool(np.isfinite(caps).any()):
            w = torch.minimum(w, torch.as_tensor(caps, dtype=like.dtype, device=like.device))
        return w
    if loss == "mse":
        return (scale**2).to(like.dtype)
    raise ValueError(f"loss={loss!r} needs the per-sample weights packed in X by fit()")


def bias_reduced_loss(y_pred, y_true, weight, n_realizations, bias_lambda=1.0, var_delta=1.0):
    """The bias-reduced loss of Mao, Flassbeck, Assländer (arXiv 2312.11468), in standardised units.

    ``mean_{b,p} w (mean_r y_hat - y)^2 + lambda mean_{b,p} max(w Var_r y_hat - delta, 0)``,
    with ``w = s^2/CRB``: the squared bias over the CRB plus ``lambda`` times
    the hinge of the variance over the CRB above ``delta``. ``y_pred`` has
    ``B * Nr`` rows, ``Nr`` consecutive ones per fingerprint
    (:func:`augment_realizations`); ``y_true`` and ``weight`` have ``B``.
    ``Var_r`` is the unbiased sample variance over the ``Nr`` realisations.
    """
    nr = int(n_realizations)
    yp = y_pred.reshape(-1, nr, y_pred.shape[-1])
    bias2 = weight * (yp.mean(1) - y_true) ** 2
    hinge = torch.relu(weight * yp.var(1, correction=1) - float(var_delta))
    return bias2.mean() + float(bias_lambda) * hinge.mean()
