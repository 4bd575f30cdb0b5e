"""Training pieces of ``CRBNetRegressor``: losses, target scaling, schedule, augmentation, scoring.

Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022: the loss is the mean over samples ``n`` and
estimated parameters ``p`` of ``(theta_hat - theta)^2 / CRB``, with each
sample's own CRB at its own ``|M0|`` and noise level. Every training batch
can re-draw ``M0`` and the noise of its (noise-free) fingerprints; the CRB
then scales by ``sigma^2 / |M0|^2``.

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
from skorch.callbacks import Callback, LRScheduler
from skorch.callbacks.scoring import ScoringBase
from skorch.dataset import unpack_data
from skorch.utils import to_tensor
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from sklearn_crb.estimators.network import ResidualMLP
from sklearn_crb.noise import apply_m0_and_noise, crb_gain, draw_m0_and_noise

__all__ = ["LOSSES", "WeightedMSELoss", "TargetStandardizedModule", "StepDecayWithFloor", "paper_lr_scheduler",
           "target_scaling", "loss_weights", "augment_batch", "CRBScoring", "DivergenceGuard", "OneCycleSchedule",
           "check_float32_range", "paper_recipe", "batch_weights", "weight_caps", "NUISANCE_TARGETS", "CRB_LOSSES",
           "bias_reduced_loss", "augment_realizations"]

LOSSES = ("crb", "mse", "relative", "bias_reduced")
#: Losses whose weights are ``s^2/CRB`` at each sample's own SNR (rescaled by the augmentation, capped).
CRB_LOSSES = ("crb", "bias_reduced")

_F32 = np.finfo(np.float32)
#: Largest per-row max |x| whose squared L2 norm stays finite in float32 (checked per feature count).
_F32_SQRT_MAX = float(np.sqrt(_F32.max))
#: Smallest per-row max |x| whose square is a normal float32.
_F32_SQRT_TINY = float(np.sqrt(_F32.tiny))
#: A training loss this many times above its first epoch's value is divergence.
DIVERGENCE_FACTOR = 1e6


class WeightedMSELoss(nn.Module):
    """``mean_{n,p} w_np (y_pred_np - y_true_np)^2`` (all losses of the regressor).

    With standardised targets ``y = (theta - m) / s`` and ``w = s^2 / CRB`` this
    is the CRB-normalised MSE of Zhang et al. 2022 in physical units.
    """

    def forward(self, y_pred, y_true, weight):
        return torch.mean(weight * (y_pred - y_true) ** 2)


class TargetStandardizedModule(nn.Module):
    """Wraps the regression network; stores the target scaling and the output bounds as buffers.

    ``forward`` returns standardised outputs (what the loss sees);
    :meth:`to_physical` maps them to SI units. Keeping the scaling in the
    module's ``state_dict`` makes ``save_params``/``load_params`` and
    ``Checkpoint`` restore a net that predicts in physical units.

    Outputs with finite ``low``/``high`` (physical units) go through a
    bounded head: ``theta = low + (high - low) sigmoid(z)`` (sigmoid head),
    or, where ``log_head`` is set, ``theta = exp(log low + (log high - log
    low) sigmoid(z))`` (log-space head, for relaxation rates and times whose
    prior spans a decade or more). Both are returned in standardised units
    ``(theta - m) / s``, so the loss is the same function of ``theta`` as with
    a linear head. Outputs with an infinite bound are linear.

    Parameters
    ----------
    module : nn.Module
        The network mapping ``(batch, n_features)`` to ``(batch, n_outputs)``.
    n_outputs : int
    """

    def __init__(self, module, n_outputs):
        super().__init__()
        self.module = module
        n = int(n_outputs)
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n, dtype=torch.float64))
        self.register_buffer("low", torch.full((n,), -torch.inf, dtype=torch.float64))
        self.register_buffer("high", torch.full((n,), torch.inf, dtype=torch.float64))
        self.register_buffer("log_head", torch.zeros(n, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the bounded head (linear outputs) or before the log-space head (sigmoid outputs)
        for name in ("low", "high", "log_head"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, X):
        z = self.module(X)
        bounded = torch.isfinite(self.low) & torch.isfinite(self.high)
        if not bool(bounded.any()):
            return z
        dt = z.dtype
        lo_s = ((self.low - self.mean) / self.scale).to(dt)
        span_s = ((self.high - self.low) / self.scale).to(dt)
        sig = torch.sigmoid(z)
        head = torch.where(bounded, lo_s, torch.zeros_like(lo_s)) + torch.where(
            bounded, span_s, torch.zeros_like(span_s)) * sig
        out = torch.where(bounded.to(z.device), head, z)
        is_log = self.log_head & bounded
        if not bool(is_log.any()):
            return out
        # Exponentiate only the log entries (by index): exp of every entry inside torch.where would
        # overflow for large non-log outputs (omega0 ~ 1e3 rad/s) and back-propagate inf * 0 = NaN.
        idx = torch.nonzero(is_log).ravel().to(z.device)
        log_lo = torch.log(self.low[is_log])
        u = log_lo.to(dt) + (torch.log(self.high[is_log]) - log_lo).to(dt) * sig.index_select(-1, idx)
        m, s = self.mean[is_log].to(dt), self.scale[is_log].to(dt)
        return out.index_copy(-1, idx, (torch.exp(u) - m) / s)

    def to_physical(self, out):
        return out.to(self.scale.dtype) * self.scale + self.mean


class StepDecayWithFloor:
    """Multiplicative LR factor ``max(gamma ** (epoch // step_size), min_factor)``.

    A picklable ``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`.
    """

    def __init__(self, step_size=40, gamma=0.5, min_factor=1e-3):
        self.step_size, self.gamma, self.min_factor = int(step_size), float(gamma), float(min_factor)

    def __call__(self, epoch):
        return max(self.gamma ** (epoch // self.step_size), self.min_factor)


def paper_lr_scheduler(lr=1e-2, step_size=40, gamma=0.5, min_lr=1e-5):
    """The step schedule of Zhang et al. 2022 as a skorch ``LRScheduler``.

    The learning rate starts at ``lr`` (the net's ``lr`` must match), is
    multiplied by ``gamma`` every ``step_size`` epochs and never drops below
    ``min_lr`` (paper: 0.01, halved every 40 epochs, floor 1e-5).

    Examples
    --------
    >>> net = CRBNetRegressor(lr=1e-2, callbacks=[("lr", paper_lr_scheduler(1e-2))])  # doctest: +SKIP
    """
    if not (lr > 0 and min_lr > 0):
        raise ValueError(f"lr and min_lr must be positive, got {lr}, {min_lr}")
    return LRScheduler(policy=LambdaLR, lr_lambda=StepDecayWithFloor(step_size, gamma, min_lr / lr),
                       step_every="epoch")


def paper_recipe(lr=1e-2):
    """The ``CRBNetRegressor`` parameters of Zhang et al., MRM 2022 (``CRBNetRegressor.paper``)."""
    return dict(module=ResidualMLP, module__normalization="l2", optimizer=torch.optim.Adam, lr=lr, crb_at="truth",
                weight_decay=0.0, lr_schedule=None, head=None, batch_size=1024, max_epochs=800, train_split=0.2,
                callbacks=[("lr", paper_lr_scheduler(lr))])


def target_scaling(Y):
    """Mean and scale of the targets (std; ``|mean|`` or 1 for a constant column)."""
    mean = Y.mean(axis=0)
    scale = Y.std(axis=0)
    return mean, np.where(scale > 0, scale, np.where(mean != 0, np.abs(mean), 1.0))


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


def augment_batch(Xd, rng, snr, sigma, loss):
    """A fresh complex ``M0`` and noise for a packed batch of noise-free features.

    ``Xd`` is the dict packed by the regressor (``"X"``: features at
    ``M0 = 1``, ``"w"``: loss weights, ``"c"``: ``s^2/CRB_unit``), numpy or
    torch; ``rng`` a numpy or a torch generator (a torch generator draws on
    its own device, e.g. the training GPU). The M0/noise model is
    :func:`sklearn_crb.noise.draw_m0_and_noise`;
    ``"c"`` (and ``"w"`` for the losses of :data:`CRB_LOSSES`) are multiplied by
    ``|M0|^2 / sigma^2``, the inverse scaling of each sample's CRB.
    """
    x = Xd["X"]
    M0, noise = draw_m0_and_noise(rng, x.shape[0], x.shape[1] // 2, snr, sigma)
    gain = crb_gain(M0, sigma)
    if isinstance(x, torch.Tensor):
        gain = torch.as_tensor(gain, device=x.device).to(x.dtype)
    elif isinstance(gain, torch.Tensor):
        gain = gain.cpu().numpy().astype(x.dtype)
    else:
        gain = gain.astype(x.dtype)
    out = dict(Xd)
    out["X"] = apply_m0_and_noise(x, M0, noise)
    if "c" in Xd:
        out["c"] = Xd["c"] * gain[:, None]
    if loss in CRB_LOSSES:
        out["w"] = Xd["w"] * gain[:, None]
    return out


def augment_realizations(Xd, rng, snr, sigma, n_realizations):
    """``B`` packed noise-free fingerprints (torch) -> ``B * Nr`` rows, grouped by fingerprint.

    Each fingerprint gets one fresh complex ``M0`` (as :func:`augment_batch`) shared by its ``Nr``
    rows and fresh noise in every row: ``Nr`` noise realisations at its own SNR. ``"w"`` and ``"c"``
    (per fingerprint, ``(B, P)``) are rescaled by ``|M0|^2 / sigma^2``.
    """
    x, nr = Xd["X"], int(n_realizations)
    M0, _ = draw_m0_and_noise(rng, x.shape[0], x.shape[1] // 2, snr, sigma, noise=False)
    _, noise = draw_m0_and_noise(rng, x.shape[0] * nr, x.shape[1] // 2, snr, sigma)
    gain = torch.as_tensor(crb_gain(M0, sigma), device=x.device).to(x.dtype)[:, None]
    out = {k: v * gain for k, v in Xd.items() if k in ("w", "c")}
    out["X"] = apply_m0_and_noise(x.repeat_interleave(nr, 0), M0.repeat_interleave(nr, 0), noise)
    if "k" in Xd:  # measured inputs (no M0, no noise), one copy per realisation
        out["k"] = Xd["k"].repeat_interleave(nr, 0)
    return out


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


def check_float32_range(X, normalization, argname="X"):
    """Refuse rows the float32 network cannot represent (instead of silent garbage).

    With an input normalisation (``"l2"``/``"first-coefficient"``) the net
    is invariant to a common scale of a row, so rows whose largest |value|
    leaves ``[sqrt(tiny32), sqrt(max32 / n_features)]`` would underflow or
    overflow in the norm: they are refused with a hint to rescale. Without
    normalisation every value must be a finite float32.
    """
    a = np.abs(X)
    m = a.max(axis=1) if X.shape[1] else np.zeros(X.shape[0])
    if normalization is None:
        bad = m > _F32.max
        reason = "exceed the float32 range"
    else:
        hi = _F32_SQRT_MAX / np.sqrt(max(X.shape[1], 1))
        bad = (m > hi) | ((m < _F32_SQRT_TINY) & (m > 0))
        reason = (f"have a largest |value| outside [{_F32_SQRT_TINY:.2g}, {hi:.2g}], where the float32 network's "
                  f"input normalisation {normalization!r} under- or overflows")
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(f"{argname} has {idx.size} rows that {reason} (e.g. rows {idx[:5].tolist()}, max |value| "
                         f"{m[idx[0]]:.3g}); rescale the data by a common factor (the normalised network is "
                         "invariant to it) or mask those voxels")


class OneCycleSchedule(Callback):
    """A one-cycle learning rate stepped per batch (Smith & Topin 2019; the default recipe).

    Active when the net's ``lr_schedule`` is ``"onecycle"``: at the start of
    every ``fit``/``partial_fit`` it builds
    :class:`torch.optim.lr_scheduler.OneCycleLR` with ``max_lr = net.lr``,
    ``pct_start`` warm-up and ``max_epochs * batches per epoch`` steps.
    """

    def __init__(self, pct_start=0.1):
        self.pct_start = pct_start

    def initialize(self):
        self.scheduler_ = None
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.scheduler_ = None
        if getattr(net, "lr_schedule", None) != "onecycle":
            return
        n = len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
        frac = net.train_split if isinstance(net.train_split, float) else 0.0
        bs = net.batch_size if net.batch_size not in (-1, None) else n
        n_batches = max(1, -(-int(round(n * (1 - frac))) // int(bs)))
        total = max(int(net.max_epochs) * n_batches + 1, 20)  # OneCycleLR needs a few steps per phase
        self.scheduler_ = OneCycleLR(net.optimizer_, max_lr=float(net.lr), total_steps=total,
                                     pct_start=float(self.pct_start))

    def on_batch_end(self, net, training=False, **kwargs):
        if training and self.scheduler_ is not None and self.scheduler_.last_epoch < self.scheduler_.total_steps - 1:
            self.scheduler_.step()


class CRBScoring(ScoringBase):
    """Validation CRB-normalised MSE, per epoch, as a skorch scoring callback.

    Records ``valid_crb`` (mean over parameters of ``mean (theta_hat -
    theta)^2 / CRB`` on the validation part), ``valid_crb_best`` (for
    ``Checkpoint(monitor="valid_crb_best")``) and ``valid_crb_<name>`` per
    parameter, whatever the training loss. Needs the per-sample CRB packed
    with the validation samples (``"c"``); records nothing without it.

    Parameters
    ----------
    names : sequence of str or None
        Parameter names for the per-parameter columns; None: the net's
        ``target_names_``.
    """

    def __init__(self, names=None):
        super().__init__(scoring=None, lower_is_better=True, on_train=False, name="valid_crb")
        self.names = names

    def initialize(self):
        self.best_score_ = np.inf
        self.name_ = self.name
        self._acc = [None, 0]
        return self

    def on_epoch_begin(self, net, **kwargs):
        self._acc = [None, 0]

    def on_batch_end(self, net, batch, training, y_pred=None, **kwargs):
        if training or y_pred is None:
            return
        Xi, yi = unpack_data(batch)
        if not (isinstance(Xi, dict) and "c" in Xi):
            return
        dev = y_pred.device
        c = to_tensor(Xi["c"], device=dev)
        yt = to_tensor(yi, device=dev).reshape(y_pred.shape).to(y_pred.dtype)
        err = (c * (y_pred.detach() - yt) ** 2).sum(0).double().cpu().numpy()
        self._acc[0] = err if self._acc[0] is None else self._acc[0] + err
        self._acc[1] += yt.shape[0]

    def on_epoch_end(self, net, **kwargs):
        total, count = self._acc
        if total is None or count == 0:
            return
        per = total / count
        score = float(per.mean())
        net.history.record(self.name_, score)
        is_best = self._is_best_score(score)
        net.history.record(self.name_ + "_best", bool(is_best))
        if is_best:
            self.best_score_ = score
        names = self.names if self.names is not None else getattr(net, "target_names_", None)
        names = names or tuple(f"y{j}" for j in range(per.size))
        for name, v in zip(names, per):
            net.history.record(f"{self.name_}_{name}", float(v))


class DivergenceGuard(Callback):
    """Stop training with a clear error on a non-finite or diverging loss.

    A training batch with a non-finite loss, or an epoch whose training loss
    exceeds ``factor`` times the first epoch's, raises ``FloatingPointError``
    (skorch lets it through; a net that goes on would predict NaN).
    """

    def __init__(self, factor=DIVERGENCE_FACTOR):
        self.factor = factor

    def initialize(self):
        self.first_loss_ = None
        return self

    def on_batch_end(self, net, batch=None, training=None, loss=None, **kwargs):
        if training and loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(
                f"training diverged: non-finite loss in epoch {len(net.history)} (lr={net.lr}); lower lr, check "
                "that the CRBs and targets are well scaled, or use gradient clipping")

    def on_epoch_end(self, net, **kwargs):
        loss = net.history[-1].get("train_loss")
        if loss is None:
            return
        if self.first_loss_ is None:
            self.first_loss_ = loss
        elif loss > self.factor * max(self.first_loss_, np.finfo(float).tiny):
            raise FloatingPointError(f"training diverged: train_loss {loss:.3g} in epoch {len(net.history)} is "
                                     f"over {self.factor:g} x the first epoch's ({self.first_loss_:.3g}); lower lr")

