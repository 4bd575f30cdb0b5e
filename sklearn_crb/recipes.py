"""The training recipes: the network that the CLI (``sklearn-crb train``) and the demo build.

One place for both: :func:`make_network` starts from ``CRBNetRegressor``'s
own defaults (the package's measured recipe: MLP 256-256-256, SiLU,
``"phase-l2"`` input, AdamW lr 2e-3 with weight decay 1e-4, one-cycle
schedule, batch 512, 150 epochs) or, with ``paper=True``, from the recipe of
Zhang et al., MRM 2022 (:func:`~sklearn_crb.estimators.net.regressor.paper_recipe`),
and adds :class:`EpochBar`. Only what the caller gives overrides them, so the
CLI, the demo and the estimator never restate a default. One choice is the
recipe's own: the network is told the noise level (``noise_input=True``,
trained with the SNR drawn log-uniformly over the training range), so that
it is efficient across the range instead of averaging over it (issue 27;
the measurement is ``benchmarks/bench_snr_efficiency.py``).
"""

from __future__ import annotations

from skorch.callbacks import Callback
from tqdm.auto import tqdm

from sklearn_crb.estimators.net.regressor import CRBNetRegressor

__all__ = ["make_network", "EpochBar", "NOISE_AWARE_EPOCHS"]

#: Epochs of the noise-aware recipe (the estimator's own default, 150, is the unconditioned recipe's): its
#: precision at high SNR limits its efficiency there, and 300 epochs fit the 15-minute budget of simulate + train.
NOISE_AWARE_EPOCHS = 300


class EpochBar(Callback):
    """A skorch callback showing one tqdm step per epoch."""

    def __init__(self, total, desc, disable=False):
        self.total, self.desc, self.disable = total, desc, disable

    def on_train_begin(self, net, **kw):
        self.bar = tqdm(total=self.total, desc=self.desc, unit="epoch", disable=self.disable)

    def on_epoch_end(self, net, **kw):
        h = net.history[-1]
        self.bar.set_postfix(train=f"{h['train_loss']:.3g}" if "train_loss" in h else "-",
                             valid=f"{h['valid_loss']:.3g}" if "valid_loss" in h else "-")
        self.bar.update(1)

    def on_train_end(self, net, **kw):
        self.bar.close()
        self.bar = None  # the fitted net stays picklable (joblib, save)


def make_network(loss, simulator, *, paper=False, device="auto", seed=0, progress=True, hidden=None, epochs=None,
                 lr=None, batch_size=None, normalization=None, noise_input=True):
    """A ``CRBNetRegressor`` as the CLI and the demo build it.

    Everything not given (None) is the estimator's own default, i.e. the
    package's measured training recipe; ``paper=True`` starts from the
    paper's residual network and recipe instead (``CRBNetRegressor.paper``).
    ``hidden`` (widths), ``epochs``, ``lr``, ``batch_size`` and
    ``normalization`` override single settings; one tqdm step per epoch
    is shown when ``progress``. ``noise_input``: the noise-aware network
    (``CRBNetRegressor(noise_input=True, snr_sampling="log-uniform")``, the
    default, :data:`NOISE_AWARE_EPOCHS` epochs unless ``epochs`` is given);
    False: the unconditioned network of the paper, with the SNR drawn uniformly.
    """
    overrides = {"module__hidden": None if hidden is None else tuple(int(h) for h in hidden), "max_epochs": epochs,
                 "lr": lr, "batch_size": batch_size, "module__normalization": normalization}
    params = {k: v for k, v in overrides.items() if v is not None}
    if noise_input:
        params.update(noise_input=True, snr_sampling="log-uniform")
        if epochs is None and not paper:
            params["max_epochs"] = NOISE_AWARE_EPOCHS
    factory = CRBNetRegressor.paper if paper else CRBNetRegressor
    net = factory(loss=loss, simulator=simulator, device=device, random_state=seed, **params)
    callbacks = list(net.callbacks or [])  # keep the estimator's own default callbacks (e.g. its LR schedule)
    callbacks.append(("epochs", EpochBar(net.max_epochs, f"train ({loss})", not progress)))
    return net.set_params(callbacks=callbacks)
