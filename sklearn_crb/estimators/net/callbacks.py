"""skorch callbacks of ``CRBNetRegressor``: the learning-rate schedules, the validation CRB score, the guard.

* :class:`OneCycleSchedule`: the default recipe's one-cycle learning rate
  (Smith & Topin 2019), a skorch :class:`~skorch.callbacks.LRScheduler`
  stepped per batch that records the rate in the history (``event_lr``).
* :func:`paper_lr_scheduler`: the step schedule of Zhang et al., MRM 2022.
* :class:`CRBScoring`: the validation CRB-normalised MSE per epoch.
* :class:`DivergenceGuard`: stops a non-finite or diverging fit with an error.
"""

from __future__ import annotations

import numpy as np
import torch
from skorch.callbacks import Callback, LRScheduler
from skorch.callbacks.scoring import ScoringBase
from skorch.dataset import unpack_data
from skorch.utils import to_tensor
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

__all__ = ["OneCycleSchedule", "OneCycleToEnd", "one_cycle_steps", "StepDecayWithFloor", "paper_lr_scheduler",
           "CRBScoring", "DivergenceGuard", "DIVERGENCE_FACTOR"]

#: A training loss this many times above its first epoch's value is divergence.
DIVERGENCE_FACTOR = 1e6


class OneCycleToEnd(OneCycleLR):
    """torch's :class:`~torch.optim.lr_scheduler.OneCycleLR` that holds its last rate once its steps are spent.

    The planned number of steps (:func:`one_cycle_steps`) can fall short of the
    batches actually run by one or two (rounding of the validation split);
    OneCycleLR raises past its end, this policy stays at its final rate.
    """

    def step(self, epoch=None):
        if self.last_epoch < self.total_steps - 1:
            super().step()


def one_cycle_steps(net, X):
    """Steps of the one-cycle schedule for one ``fit`` of ``net`` on the packed ``X``.

    ``max_epochs`` times the training batches per epoch (the held-out fraction
    of a float ``train_split`` taken off), plus one, and at least 20
    (OneCycleLR needs a few steps per phase).
    """
    n = len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
    frac = net.train_split if isinstance(net.train_split, float) else 0.0
    bs = net.batch_size if net.batch_size not in (-1, None) else n
    n_batches = max(1, -(-int(round(n * (1 - frac))) // int(bs)))
    return max(int(net.max_epochs) * n_batches + 1, 20)


class OneCycleSchedule(LRScheduler):
    """The one-cycle learning rate of the default recipe, a skorch ``LRScheduler`` stepped per batch.

    At the start of every ``fit``/``partial_fit`` it builds ``policy``
    (:class:`OneCycleToEnd`, torch's OneCycleLR) with ``max_lr = net.lr``,
    ``pct_start`` warm-up and :func:`one_cycle_steps` steps, so every fit
    runs a whole cycle; the rate of each training batch is recorded as
    ``event_lr`` in the batch history. ``CRBNetRegressor`` registers it as
    ``"onecycle"``: ``callbacks__onecycle=None`` (or ``lr_schedule=None``)
    switches it off.

    Parameters
    ----------
    pct_start : float, default 0.1
        Fraction of the steps spent raising the rate.
    policy : type, default :class:`OneCycleToEnd`
        Called as ``policy(optimizer, max_lr=, total_steps=, pct_start=, **kwargs)``.
    """

    def __init__(self, pct_start=0.1, policy=OneCycleToEnd, event_name="event_lr", **kwargs):
        super().__init__(policy=policy, monitor=None, event_name=event_name, step_every="batch",
                         pct_start=pct_start, **kwargs)

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.lr_scheduler_ = None
        if getattr(net, "lr_schedule", "onecycle") != "onecycle":
            return
        # a fresh cycle from step 0 on every fit (skorch's LRScheduler would resume at len(history))
        self.lr_scheduler_ = self.policy_(net.optimizer_, max_lr=float(net.lr), total_steps=one_cycle_steps(net, X),
                                          **self.kwargs)

    def on_batch_end(self, net, training, **kwargs):
        if self.lr_scheduler_ is not None:
            super().on_batch_end(net, training, **kwargs)

    def on_epoch_end(self, net, **kwargs):  # stepped per batch only
        return


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
