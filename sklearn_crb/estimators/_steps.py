"""The training step of ``CRBNetRegressor``: augmentation, the loss weights, backward.

One function per kind of step: :func:`train_step` (every loss; the CRB
weights at the truth or, with ``crb_at="estimate"``, at the network's
estimate, :mod:`~._crb_surrogate`) and :func:`bias_reduced_step` (``Nr``
noise realisations per fingerprint, Mao et al., arXiv 2312.11468).
"""

from __future__ import annotations

from skorch.dataset import unpack_data
from skorch.utils import to_tensor

from sklearn_crb.estimators._training import augment_batch, augment_realizations, batch_weights, bias_reduced_loss

__all__ = ["train_step", "bias_reduced_step"]


def train_step(net, batch, **fit_params):
    """One training step of ``net`` on a packed batch: the loss (backpropagated) and the prediction."""
    net._set_training(True)
    Xi, yi = unpack_data(batch)
    if net.augment_:
        Xi = {k: to_tensor(v, device=net.device_) for k, v in Xi.items()}
        if net.loss == "bias_reduced" and len(net.history) > net.pretrain_epochs:  # fine-tuning epochs
            return bias_reduced_step(net, Xi, yi, **fit_params)
        Xi = augment_batch(Xi, net.rng_, *net.noise_, net.loss)
    y_pred = net.infer(Xi, **fit_params)
    if getattr(net, "crb_at_", "truth") == "estimate":  # the CRB weight at the (detached) estimate
        Xi["w"] = net.crb_surrogate_(Xi["w"], y_pred, yi)
    loss = net.get_loss(y_pred, yi, X=Xi, training=True)
    loss.backward()
    return {"loss": loss, "y_pred": y_pred}


def bias_reduced_step(net, Xi, yi, **fit_params):
    """A ``loss="bias_reduced"`` training step: the loss and the mean prediction per fingerprint."""
    nr = int(net.n_realizations)
    Xr = augment_realizations(Xi, net.rng_, *net.noise_, nr)
    y_pred = net.infer(Xr, **fit_params)
    y_true = to_tensor(yi, device=y_pred.device).to(y_pred.dtype).reshape(-1, y_pred.shape[-1])
    w = batch_weights(Xr, net.loss, net.module_.scale, y_pred, getattr(net, "loss_weight_cap_", None))
    loss = bias_reduced_loss(y_pred, y_true, w, nr, net.bias_lambda, net.var_delta)
    loss.backward()
    return {"loss": loss, "y_pred": y_pred.detach().reshape(-1, nr, y_pred.shape[-1]).mean(1)}
