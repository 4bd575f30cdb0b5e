"""``CRBNetRegressor``: a skorch network trained with the CRB-normalised loss.

Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022. The regressor owns and sets its fitted state;
the modules of this sub-package return values. ``fit`` takes ``X`` through
six rooms, each once and in this order:

1. **validate** (here): the declared ``_parameter_constraints``, the
   settings that depend on each other, the inputs' shape, the fitted
   simulator, the measured inputs (:mod:`~.measured`);
2. **prepare data** (:mod:`~.data`): ``X`` as a row source (arrays in memory
   are one block of the lazy path), checked block by block, the target and
   measured-input statistics, packed into ``{"X", "k", "w", "c"}`` with the
   loss weights (:mod:`~.losses`);
3. **targets/scaling** (:mod:`~.targets`): names, the bounded head's range,
   the range check;
4. **weighting** (:mod:`~.crb_weighting`): the nuisance weight caps and the
   CRB-at-estimate surrogate;
5. **module** (:mod:`~.modules`): the network, seeded, with the scaling in
   its buffers;
6. **train loop** (skorch): batches (:mod:`~.loaders`), per-batch noise
   (:mod:`~.augmentation`), the loss, the callbacks (:mod:`~.callbacks`).

The per-sample CRB travels with its sample: the packed dict is sliced,
shuffled and batched together with ``y``; only ``"X"`` (and the measured
inputs ``"k"``) reach the module, the rest reaches :meth:`CRBNetRegressor.get_loss`
and the scoring callback.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch
from sklearn import get_config
from sklearn.utils._param_validation import Interval, Options, StrOptions, validate_parameter_constraints
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch.dataset import ValidSplit, unpack_data
from skorch.regressor import NeuralNetRegressor
from skorch.utils import to_tensor
from torch import nn

from sklearn_crb._model import NETWORK_SE, FittedModel
from sklearn_crb._validation import check_snr_range, resolve_device
from sklearn_crb.estimators.net.augmentation import augment_batch, augment_realizations
from sklearn_crb.estimators.net.callbacks import (
    CRBScoring,
    DivergenceGuard,
    OneCycleSchedule,
    StepDecayWithFloor,
    paper_lr_scheduler,
)
from sklearn_crb.estimators.net.crb_weighting import CRB_AT, SURROGATE_ROWS, crb_surrogate, resolve_crb_at, weight_caps
from sklearn_crb.estimators.net.data import (
    ArrayRows,
    SourceRows,
    check_noise_column,
    check_rows,
    fixed_noise_dataset,
    is_row_source,
    prepare,
)
from sklearn_crb.estimators.net.details import network_details
from sklearn_crb.estimators.net.loaders import forward_in_batches, make_iterator, net_threads, torch_threads
from sklearn_crb.estimators.net.losses import CRB_LOSSES, LOSSES, WeightedMSELoss, batch_weights, bias_reduced_loss
from sklearn_crb.estimators.net.measured import (
    append_measured,
    check_simulator_measured,
    resolve_measured,
    split_measured,
)
from sklearn_crb.estimators.net.modules import MLP, ResidualMLP, TargetStandardizedModule, reset_parameters_with
from sklearn_crb.estimators.net.targets import HEADS, check_target_range, output_bounds, target_names
from sklearn_crb.metrics import crb_efficiency_score
from sklearn_crb.noise import SNR_SAMPLINGS
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.simulator import MTFingerprintSimulator, unpack_targets

__all__ = ["CRBNetRegressor", "SEED_STREAMS", "paper_recipe", "WeightedMSELoss", "TargetStandardizedModule",
           "StepDecayWithFloor", "paper_lr_scheduler", "CRBScoring", "DivergenceGuard", "OneCycleSchedule"]

#: The random streams of a seeded net, each seeded ``(random_state + 7919 * stream) % 2**32``. "surrogate"
#: seeds both the subset of a large set the CRB-weight surrogate sees and the surrogate's own fit.
SEED_STREAMS = {"init": 0, "split": 1, "augment": 2, "valid_noise": 3, "shuffle": 4, "surrogate": 7}

# Seeded modules draw their weights from a private torch.Generator (reset_parameters_with); their
# construction (whose default draws are then overwritten) still runs under this lock and in a forked
# RNG state, for layers reset_parameters_with does not know.
_SEED_LOCK = threading.Lock()

#: The fitted target attributes and the module buffers that carry them (``save_params``/``load_params``).
_SCALING = (("y_mean_", "mean"), ("y_scale_", "scale"), ("target_low_", "low"), ("target_high_", "high"),
            ("target_log_", "log_head"))

#: ``weight_decay``'s default: "not given" (the deprecated alias then leaves ``optimizer__weight_decay`` alone).
_UNSET = "deprecated"


def paper_recipe(lr=1e-2):
    """The ``CRBNetRegressor`` parameters of Zhang et al., MRM 2022 (``CRBNetRegressor.paper``)."""
    return dict(module=ResidualMLP, module__normalization="l2", optimizer=torch.optim.Adam, lr=lr, crb_at="truth",
                optimizer__weight_decay=0.0, lr_schedule=None, head=None, batch_size=1024, max_epochs=800,
                train_split=0.2, callbacks=[("lr", paper_lr_scheduler(lr))])


def _fit_context(method):
    """Check the declared ``_parameter_constraints`` before ``method`` runs (sklearn's ``_fit_context``).

    sklearn's own decorator calls ``_validate_params``, which skorch defines
    for its ``__`` routing; this one calls sklearn's validation directly
    (skipped under ``sklearn.config_context(skip_parameter_validation=True)``).
    """

    @functools.wraps(method)
    def fit_method(self, *args, **kwargs):
        if not get_config()["skip_parameter_validation"]:
            validate_parameter_constraints(self._parameter_constraints,
                                           {k: getattr(self, k) for k in self._parameter_constraints},
                                           caller_name=type(self).__name__)
        return method(self, *args, **kwargs)

    return fit_method


class CRBNetRegressor(NeuralNetRegressor):
    """Neural-network estimator of tissue parameters with a CRB-normalised loss.

    A skorch :class:`~skorch.NeuralNetRegressor`: all skorch parameters
    (``module__*``, ``optimizer__*``, ``callbacks``, ``iterator_train__*``,
    ...) work, and so do ``get_params``/``set_params``/``clone``, pipelines and
    grid searches.

    The defaults are the measured default recipe (v3.2 sequence, rank 13,
    tied model, brain prior, 96,000 samples, one CPU thread): MLP
    256-256-256, SiLU, ``"phase-l2"`` input standardised per feature, log-space head for
    relaxation targets, AdamW (lr 2e-3, weight decay 1e-4), one-cycle schedule per
    batch, batch 512, 150 epochs; its measured efficiency is in the README
    (``benchmarks/bench_crb_vs_mse.py``). :meth:`paper` builds the recipe of Zhang et al.

    Parameters
    ----------
    module : type or nn.Module, default ``MLP``
        The network; ``n_features`` and ``n_outputs`` are filled in from the
        data when its constructor takes them. Set its hyper-parameters with
        ``module__hidden=(...)``, ``module__normalization="first-coefficient"``...
    criterion : type, default ``WeightedMSELoss``
        Must accept ``(y_pred, y_true, weight)``.
    optimizer : type, default ``torch.optim.AdamW``
    lr : float, default 2e-3
        Learning rate; with ``lr_schedule="onecycle"`` the peak of the cycle.
    max_epochs : int, default 150
        >= 1. The one-cycle schedule anneals over all of them; chosen for about 96,000 samples (README).
    batch_size : int, default 512
        >= 1, or -1 for the whole training set in one batch.
    train_split : float, None or callable, default None
        Fraction of the data held out for validation (a
        ``skorch.dataset.ValidSplit`` seeded by ``random_state``), ``None``
        for none, or any skorch ``train_split`` callable.
    optimizer__weight_decay : float, default 1e-4
        The optimizer's weight decay (a skorch ``optimizer__`` parameter with the recipe's default).
    weight_decay : float or None, deprecated
        The 0.1 spelling of ``optimizer__weight_decay``; given, it overrides it with a
        ``FutureWarning`` (None: the optimizer's own default).
    lr_schedule : {"onecycle", None}, default "onecycle"
        ``"onecycle"``: the callback ``"onecycle"``, :class:`~.callbacks.OneCycleSchedule`
        (peak ``lr``, 10 % warm-up, stepped per batch, restarted by every
        ``fit``/``partial_fit``, the rate recorded as ``event_lr`` per batch).
        None, or ``callbacks__onecycle=None``: the constant ``lr`` or your own ``callbacks``.
    head : {"auto", "sigmoid", "linear", None}, default "auto"
        Each output with a known support is mapped onto it (outputs stay
        physical, e.g. m0s >= 0). The support is ``target_bounds[name]``, else
        the simulator's prior support, else the physical ``BOUNDS``.
        ``"auto"``: relaxation rates and times through ``exp`` of a sigmoid
        on [log low, log high], the others through a sigmoid on the support
        widened by ``head_margin``; ``"sigmoid"``: the latter for all;
        ``"linear"``/None: linear (:func:`~.targets.output_bounds`).
    target_bounds : dict, optional
        ``{target name: (low, high)}`` for the bounded head.
    head_margin : float, default 0.05
        Fraction of the support's width added on both sides of a sigmoid
        output (cut at the physical bounds: m0s >= 0).
    nuisance_weight_cap : float or None, default 400.0
        Cap of the CRB loss weight ``s^2/CRB`` (``s``: the target's scale) of
        the nuisance outputs Rex, T2s, omega0, B1; None: uncapped. omega0's
        weight spans 1e3-1e9 and otherwise dominates the loss (m0s nMSE 29x
        worse); see :func:`~.crb_weighting.weight_caps`.
    n_threads : int, "auto" or None, default "auto"
        torch CPU threads during ``fit`` and ``predict``; "auto":
        :func:`~.loaders.default_threads` (1: degrades
        gracefully under machine load); None: torch's setting.
    loss : {"crb", "mse", "relative", "bias_reduced"}, default "crb"
        ``"crb"``: mean of ``(theta_hat - theta)^2 / CRB``; needs ``crb=`` in
        ``fit`` (or targets packed with ``simulator.pack_targets``), or
        :meth:`fit_simulated`. ``"mse"``: mean squared error in raw SI
        units (the paper's baseline). ``"relative"``: mean of
        ``(theta_hat - theta)^2 / theta^2`` (targets must be non-zero).
        ``"bias_reduced"`` (Mao et al., arXiv 2312.11468): each of the
        ``batch_size`` fingerprints of a batch gets one fresh ``M0`` and
        ``n_realizations`` fresh noise draws (a step sees ``batch_size *
        n_realizations`` rows, an epoch costs ``n_realizations`` CRB epochs,
        the number of steps and the one-cycle schedule are unchanged); the
        loss is ``mean_p[(mean_r theta_hat - theta)^2 / CRB] + bias_lambda *
        mean_p max(Var_r theta_hat / CRB - var_delta, 0)`` with the CRB loss's
        weights (own SNR, ``nuisance_weight_cap``). Needs augmentation
        (``X_clean``/``crb_unit``, :meth:`fit_simulated`); the first
        ``pretrain_epochs`` epochs use ``"crb"``; validation scores ``"crb"``.
        Measured at the CLI's default budget (noise-aware, 96,000 draws, 300
        epochs of which the last 30 bias-reduced, ``benchmarks/bench_snr_efficiency.py``):
        it lowers the median |bias|/sqrt(CRB) on informative draws at every SNR
        tested (30-300) and the nMSE at SNR 300, with a similar spread, for
        about twice the training time; it does not halve the bias (Mao et
        al.'s goal), so it stays an option, not the default.
    crb_at : {"auto", "truth", "estimate"}, default "auto"
        Where the ``"crb"`` loss weight's CRB is evaluated: ``"truth"`` (Zhang
        et al. 2022) tilts uninformed estimates towards low-CRB values;
        ``"estimate"``: at the net's detached estimate, through a surrogate of
        the training set's CRBs (:mod:`~.crb_weighting`). ``"auto"``:
        ``"estimate"`` for ``loss="crb"``, else ``"truth"``.
    n_realizations : int, default 16
        Noise realisations per fingerprint (>= 2) of ``"bias_reduced"``
        (paper: 200; 16 keeps an epoch affordable on a CPU).
    bias_lambda : float, default 1.0
        Weight (>= 0) of the variance hinge (paper: 1; 0: squared bias only).
    var_delta : float, default 1.0
        Variance over CRB (>= 0) below which the hinge is zero (paper: 1).
    pretrain_epochs : int, default 0
        Epochs since initialisation trained with ``"crb"`` before
        ``"bias_reduced"`` (the paper's pre-training; <= ``max_epochs``).
    simulator : MTFingerprintSimulator, optional
        A *fitted* simulator: the data source of :meth:`fit_simulated`, the
        model context of :meth:`predict_details` (sequence, basis, nuisance
        fill values) and the default of ``target_names``, ``snr`` and
        ``sigma``. It does not make CRBs for ``fit(X, y)``: a CRB computed
        from ``y`` alone would miss the sample's nuisance parameters and SNR.
    measured : str, sequence of str or None
        Parameters measured by a separate scan (``("B1",)``, ``("B1", "omega0")``; SI units, B1
        relative) that condition the estimate: ``X`` is the coefficient features followed by one
        column per measured parameter (no M0 scaling, no noise); ``predict_details``/``fit_maps``
        take them as ``fixed`` maps. The CRBs must treat them as known (the simulator's
        ``nuisance`` without them: :func:`~.measured.measured_nuisance`); :meth:`fit_simulated`
        appends the drawn values.
    noise_input : bool, default False
        Tell the network the noise level. Its input gets one column after the
        coefficient features (before the ``measured`` ones): ``sigma``, the
        noise standard deviation per real feature of that row, in the
        features' units (a scalar for the image, or a noise map for parallel
        imaging). The network sees ``log(||x|| / sigma)`` beside the
        normalised features (:class:`~.modules.InputNormalization`), i.e. the
        SNR that the input normalisation removes, so that it can follow the
        data more at high SNR and lean on the prior at low SNR instead of
        averaging over its training range. Trained with augmentation (the
        per-batch draws give each row its ``sigma``). ``predict_details`` and
        :func:`sklearn_crb.maps.fit_maps` take ``sigma=`` (``fit_maps``
        estimates it from the image when not given). False: the
        unconditioned network of Zhang et al. (for data without a noise
        estimate).
    snr_sampling : {"uniform", "log-uniform"}, default "uniform"
        The distribution of ``|M0| / sigma`` over ``snr`` in the augmentation:
        uniform (paper) or uniform in its logarithm (every factor of the range
        equally often; the CLI's noise-aware default).
    augment : bool or "auto", default "auto"
        Per-epoch noise augmentation (paper). When True, ``fit`` takes
        *noise-free* features at ``M0 = 1`` and the CRB at ``M0 = 1``,
        ``sigma = 1`` (``make_dataset(..., return_details=True)``'s
        ``X_clean`` and ``crb_unit``); each training batch then gets a fresh
        complex ``M0`` (``|M0| = sigma * U[snr]``, uniform phase) and fresh
        Gaussian noise, and each CRB is rescaled by ``sigma^2/|M0|^2``. The
        validation part gets one fixed draw. ``"auto"``: True in
        :meth:`fit_simulated`, False in :meth:`fit`.
    snr : (float, float) or None
        ``|M0| / sigma`` range for augmentation; None: the simulator's, else (10, 300).
    sigma : float or None
        Noise standard deviation per real feature for augmentation; None: the
        simulator's, else 0.01.
    target_names : sequence of str, optional
        Names used in the history columns ``valid_crb_<name>``; default: the
        simulator's ``estimate_`` or ``y0, y1, ...``.
    random_state : int or None
        Seeds the weight initialisation, the batch shuffling, the validation
        split, the augmentation draws and the CRB-weight surrogate, each from
        its own stream (:data:`SEED_STREAMS`; None: unseeded).
    device : str, default "auto"
        ``"auto"`` uses CUDA when available, else CPU. It is resolved once, at
        construction and ``set_params``, into the attribute ``device`` that
        skorch uses; ``get_params``, ``clone`` and pickles keep the value
        given ("auto" re-resolves where a pickle is loaded). ``device_`` is
        the resolved ``torch.device``. The network runs in float32; inputs
        may be float64 (rows outside float32's range are refused).
    verbose : int, default 0
    **kwargs
        Further skorch parameters.

    Attributes
    ----------
    module_ : TargetStandardizedModule
        The trained network (``module_.module``) and the target scaling.
    n_features_in_ : int
        Coefficient features plus the noise column (``noise_input_``) and the ``measured_`` columns.
    measured_ : tuple of str
    noise_input_ : bool
        Whether ``X`` carries the noise-level column (``noise_input``).
    n_outputs_ : int
    target_names_ : tuple of str
    augment_ : bool
        Whether the last fit used noise augmentation.
    simulator_ : MTFingerprintSimulator or None
        The fitted simulator the net was given (its model context).
    history_ : skorch History
        Per epoch ``train_loss``, ``valid_loss`` and, when CRBs are known,
        ``valid_crb`` (mean CRB-normalised MSE on the validation part),
        ``valid_crb_best`` (for ``Checkpoint(monitor="valid_crb_best")``) and
        ``valid_crb_<name>`` per parameter (:class:`CRBScoring`). A
        non-finite or diverging training loss stops ``fit`` with
        ``FloatingPointError`` (:class:`DivergenceGuard`).

    Examples
    --------
    >>> from sklearn_crb import CRBNetRegressor
    >>> net = CRBNetRegressor(module__hidden=(64, 64), max_epochs=20)  # doctest: +SKIP
    >>> net.fit(X, y, crb=crb).predict(X_test)  # doctest: +SKIP
    """

    _parameter_constraints = {
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), Options(Integral, {-1})],
        "lr_schedule": [StrOptions({"onecycle"}), None],
        "head": [StrOptions({h for h in HEADS if h is not None}), None],
        "head_margin": [Interval(Real, 0, None, closed="left")],
        "nuisance_weight_cap": [Interval(Real, 0, None, closed="neither"), None],
        "n_threads": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}), None],
        "loss": [StrOptions(set(LOSSES))],
        "crb_at": [StrOptions(set(CRB_AT))],
        "n_realizations": [Interval(Integral, 2, None, closed="left")],
        "bias_lambda": [Interval(Real, 0, None, closed="left")],
        "var_delta": [Interval(Real, 0, None, closed="left")],
        "pretrain_epochs": [Interval(Integral, 0, None, closed="left")],
        "augment": ["boolean", StrOptions({"auto"})],
        "noise_input": ["boolean"],
        "snr_sampling": [StrOptions(set(SNR_SAMPLINGS))],
        "sigma": [Interval(Real, 0, None, closed="neither"), None],
        "random_state": [Interval(Integral, None, None, closed="neither"), None],
    }

    def __init__(self, module=MLP, *args, criterion=WeightedMSELoss, optimizer=torch.optim.AdamW, lr=2e-3,
                 max_epochs=150, batch_size=512, train_split=None, weight_decay=_UNSET, lr_schedule="onecycle",
                 head="auto", target_bounds=None, head_margin=0.05, nuisance_weight_cap=400.0, n_threads="auto",
                 loss="crb", crb_at="auto", n_realizations=16, bias_lambda=1.0, var_delta=1.0, pretrain_epochs=0,
                 simulator=None, measured=None, noise_input=False, augment="auto", snr=None, snr_sampling="uniform",
                 sigma=None, target_names=None, random_state=None, device="auto", verbose=0,
                 optimizer__weight_decay=1e-4, **kwargs):
        super().__init__(module, *args, criterion=criterion, optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                         batch_size=batch_size, train_split=train_split, device=resolve_device(device),
                         verbose=verbose, optimizer__weight_decay=optimizer__weight_decay, **kwargs)
        self._device_param = device
        self.weight_decay, self.lr_schedule = weight_decay, lr_schedule
        self.head = head
        self.target_bounds = target_bounds
        self.head_margin = head_margin
        self.nuisance_weight_cap = nuisance_weight_cap
        self.n_threads = n_threads
        self.loss, self.crb_at = loss, crb_at
        self.n_realizations, self.bias_lambda, self.var_delta = n_realizations, bias_lambda, var_delta
        self.pretrain_epochs = pretrain_epochs
        self.simulator, self.measured = simulator, measured
        self.noise_input = noise_input
        self.augment = augment
        self.snr, self.snr_sampling = snr, snr_sampling
        self.sigma = sigma
        self.target_names = target_names
        self.random_state = random_state

    def get_params(self, deep=True, **kwargs):
        params = super().get_params(deep=deep, **kwargs)
        params["device"] = self.__dict__.get("_device_param", params.get("device"))
        return params

    def set_params(self, **kwargs):
        if "device" in kwargs:
            self._device_param = kwargs["device"]
            kwargs["device"] = resolve_device(kwargs["device"])
        return super().set_params(**kwargs)

    def __setstate__(self, state):
        if state.get("_device_param") == "auto":  # re-resolve where the pickle is loaded
            state["device"] = resolve_device("auto")
        state.setdefault("optimizer__weight_decay", 1e-4)  # pickled by 0.1: weight_decay carried it
        super().__setstate__(state)

    @property
    def device_(self):
        """The torch device the network runs on."""
        return torch.device(self.device)

    @classmethod
    def paper(cls, **kwargs):
        """The recipe of Zhang et al., MRM 2022 (the CLI's ``--paper``); ``kwargs`` override it.

        ``ResidualMLP`` (BatchNorm, ReLU, ``"l2"`` input, linear output),
        Adam with lr 1e-2 halved every 40 epochs down to 1e-5
        (:func:`paper_lr_scheduler`), batch 1024, 800 epochs, 20 %
        validation split. On the benchmark of the class docstring it left
        the m0s map without white/grey-matter contrast at 40 epochs.
        """
        return cls(**{**paper_recipe(kwargs.pop("lr", 1e-2)), **kwargs})

    def get_default_callbacks(self):
        return [*super().get_default_callbacks(), ("valid_crb", CRBScoring()), ("divergence", DivergenceGuard()),
                ("onecycle", OneCycleSchedule())]

    def get_params_for_optimizer(self, prefix, named_parameters):
        args, kwargs = super().get_params_for_optimizer(prefix, named_parameters)
        # the deprecated alias wins over optimizer__weight_decay; compared by value, since a pickled copy of
        # the sentinel (a dask worker's) is another string object
        if not (isinstance(self.weight_decay, str) and self.weight_decay == _UNSET):
            warnings.warn("CRBNetRegressor(weight_decay=...) is deprecated since 0.2: use optimizer__weight_decay "
                          "(None: the optimizer's own default)", FutureWarning, stacklevel=2)
            kwargs.pop("weight_decay", None)
            if self.weight_decay is not None:
                kwargs["weight_decay"] = float(self.weight_decay)
        if "weight_decay" in kwargs and "weight_decay" not in inspect.signature(self.optimizer).parameters:
            del kwargs["weight_decay"]  # e.g. LBFGS: the recipe's default does not apply
        return args, kwargs

    def _seed(self, stream):
        """The seed of one of the random streams (:data:`SEED_STREAMS`) from ``random_state`` (None: unseeded)."""
        rs = self.random_state
        if rs is None:
            return None
        if isinstance(rs, (bool, np.bool_)) or not isinstance(rs, Integral):
            raise TypeError(f"random_state must be an int or None, got {rs!r}")
        return (int(rs) + 7919 * SEED_STREAMS[stream]) % (2**32)

    # ------------------------------------------------------------------ fit: the six rooms
    @_fit_context
    def fit(self, X, y=None, crb=None, **fit_params):
        """Train the network.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features), or a lazy training set
            Features, e.g. ``[Re c, Im c]`` of compressed fingerprints
            (noise-free at ``M0 = 1`` when ``augment=True``); or the rows of an
            HDF5 training set (``sklearn_crb.io.datasets.open_dataset``), read
            batch by batch, with its own ``y`` and CRBs (then no ``y``/``crb``).
        y : array_like, shape (n_samples,) or (n_samples, n_outputs)
            True parameters in SI units, or targets packed with their CRBs by
            :func:`sklearn_crb.simulator.pack_targets` (then ``crb`` follows
            every cross-validation fold without metadata routing).
        crb : array_like, shape like ``y``, optional
            Per-sample Cramér–Rao bounds (squared SI units); at ``M0 = 1``,
            ``sigma = 1`` when ``augment=True``. Sliced with its samples by
            ``GridSearchCV``/``cross_validate`` (legacy fit params or
            metadata routing after ``set_fit_request(crb=True)``).
        **fit_params
            Passed on to skorch (module forward, train split).

        Returns
        -------
        self
        """
        reset = not (self.warm_start and self.initialized_)
        return self._train(X, y, crb, self._resolve_augment(False), reset, "fit", **fit_params)

    @_fit_context
    def partial_fit(self, X, y=None, classes=None, crb=None, **fit_params):
        """Continue training without re-initialising (see :meth:`fit`)."""
        if "_routing_method" in fit_params:  # called by skorch internals with packed data
            return super().partial_fit(X, y, **fit_params)
        return self._train(X, y, crb, self._resolve_augment(False), not self.initialized_, "partial_fit",
                           **fit_params)

    @_fit_context
    def fit_simulated(self, n_samples, random_state=None, **fit_params):
        """Train on ``n_samples`` drawn by the simulator (augmentation on by default).

        Parameters
        ----------
        n_samples : int
            Parameter draws; the default recipe's ``max_epochs`` is chosen for 96,000.
        random_state : int or None
            Seed of the parameter draws (default: ``self.random_state``).

        Returns
        -------
        self
        """
        sim = self._fitted_simulator()
        if sim is None:
            raise ValueError("fit_simulated needs simulator=, a fitted MTFingerprintSimulator")
        augment = self._resolve_augment(True)
        rs = self.random_state if random_state is None else random_state
        X, y, crb, det = sim.make_dataset(int(n_samples), rs, return_details=True)
        if augment:
            X, crb = det["X_clean"], det["crb_unit"]
        measured = resolve_measured(self.measured, sim.estimate_, sim.tied_R1)
        if measured:
            check_simulator_measured(sim, measured)
        return self._train(append_measured(X, det["theta"], measured), y, crb, augment, True, "fit", **fit_params)

    def _train(self, X, y, crb, augment, reset, method, **fit_params):
        rows = self._validate_inputs(X, y, crb, augment, reset)  # 1 validate
        data = prepare(rows, loss=self.loss, measured=self.measured_, normalization=self._normalization(),
                       augment=augment, block=65536, **self._previous_fit(reset))  # 2 prepare data
        self._set_targets(data, reset)  # 3 targets/scaling
        self._set_weighting(data, reset)  # 4 weighting
        if reset or not self.initialized_:  # 5 module
            self.initialize()
        self._load_scaling()
        if self.augment_:
            self.rng_ = self._augmentation_generator()
        with torch_threads(net_threads(self)):  # 6 train loop
            NeuralNetRegressor.partial_fit(self, data.X, data.y, _routing_method=method, **fit_params)
        return self

    # ------------------------------------------------------------------ 1 validate
    def _validate_inputs(self, X, y, crb, augment, reset):
        """Settings that depend on each other and the inputs; returns the row source of :func:`~.data.prepare`."""
        self.simulator_ = self._fitted_simulator()
        self.crb_at_ = resolve_crb_at(self.crb_at, self.loss)
        self._check_bias_reduced(augment)
        self._set_noise_input(augment, reset)
        self.augment_ = bool(augment)
        if augment:
            self.noise_ = self._noise_setup()
        tied = bool(getattr(self.simulator_, "tied_R1", False))
        if is_row_source(X):  # a lazy set (e.g. io.h5.H5Rows of an HDF5 training set): read batch by batch
            if y is not None or crb is not None:
                raise ValueError("a lazy training set holds y and crb itself: call fit(rows) without y= or crb=")
            measured = resolve_measured(self.measured, (), tied)
            rows = SourceRows(X, *(("X_clean", "crb_unit") if augment else ("X", "crb")), measured)
            n_out = np.asarray(X.read(("y",), [0])["y"]).reshape(1, -1).shape[1]
        else:
            y, packed = unpack_targets(y)
            crb = packed if crb is None else crb
            X, y = validate_data(self, X, y, reset=reset, multi_output=True, y_numeric=True, dtype=np.float64)
            n_out = y.reshape(y.shape[0], -1).shape[1]
            measured = resolve_measured(self.measured, (), tied)
            k = len(measured)
            rows = ArrayRows({"X": X[:, :-k] if k else X, "k": X[:, -k:] if k else None, "y": y, "crb": crb})
        if crb is None and not is_row_source(X) and self.loss in CRB_LOSSES:
            raise ValueError(f"loss={self.loss!r} needs the per-sample CRB at each sample's own parameters and SNR: "
                             "pass fit(X, y, crb=...) (e.g. from simulator.make_dataset), pack it with the targets "
                             "(sklearn_crb.simulator.pack_targets(y, crb)), or train with fit_simulated(); or "
                             "choose loss='mse' or 'relative'")
        self._set_measured(resolve_measured(measured, self._target_names(n_out), tied), reset)
        return rows

    def _set_noise_input(self, augment, reset):
        """``noise_input_``: trained with augmentation (its draws give each row its sigma); kept by a warm start."""
        noise_input = bool(self.noise_input)
        if noise_input and not augment:
            raise ValueError("noise_input=True trains with augmentation, whose per-batch M0 and noise draws give each "
                             "row its noise level: pass noise-free features at M0 = 1 and unit CRBs with augment=True "
                             "(make_dataset(..., return_details=True)'s X_clean and crb_unit), or use fit_simulated()")
        if not reset and bool(getattr(self, "noise_input_", False)) != noise_input:
            raise ValueError(f"noise_input={noise_input} differs from the fitted network's: refit it")
        self.noise_input_ = noise_input

    def _set_measured(self, measured, reset):
        if not reset and tuple(getattr(self, "measured_", ())) != measured:
            raise ValueError(f"measured={self.measured!r} differs from the fitted network's {self.measured_}: "
                             "refit it")
        if measured and self.simulator_ is not None:
            check_simulator_measured(self.simulator_, measured)
        self.measured_ = measured

    def _check_bias_reduced(self, augment):
        """``loss="bias_reduced"`` needs augmentation and ``pretrain_epochs <= max_epochs``."""
        if self.loss != "bias_reduced":
            return
        if not augment:
            raise ValueError("loss='bias_reduced' draws n_realizations noise realisations of every fingerprint and "
                             "needs augment=True with noise-free features at M0 = 1 and unit CRBs (make_dataset(..., "
                             "return_details=True)'s X_clean and crb_unit), or fit_simulated()")
        if self.pretrain_epochs > self.max_epochs:
            raise ValueError(f"pretrain_epochs ({self.pretrain_epochs}) must not exceed max_epochs "
                             f"({self.max_epochs})")

    def _noise_setup(self):
        """``((snr_lo, snr_hi), sigma, snr_sampling)`` of the augmentation: the net's, else its simulator's, else
        (10, 300), 0.01."""
        sim = self.simulator
        snr = self.snr if self.snr is not None else (getattr(sim, "snr", None) or (10.0, 300.0))
        sigma = self.sigma if self.sigma is not None else (getattr(sim, "sigma", None) or 0.01)
        lo, hi = check_snr_range(snr)
        if not (isinstance(sigma, Real) and np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
        return (lo, hi), float(sigma), self.snr_sampling

    def _resolve_augment(self, auto_value):
        """``augment`` as a bool (``"auto"``: ``auto_value``)."""
        return auto_value if isinstance(self.augment, str) else bool(self.augment)

    def _fitted_simulator(self):
        """``simulator`` (None or a fitted ``MTFingerprintSimulator``)."""
        sim = self.simulator
        if sim is None:
            return None
        if not isinstance(sim, MTFingerprintSimulator) or not hasattr(sim, "basis_"):
            raise ValueError("simulator must be a fitted MTFingerprintSimulator (call simulator.fit() first)")
        return sim

    def _target_names(self, n_outputs):
        return target_names(self.target_names, self.simulator, n_outputs)

    def _normalization(self):
        """The module's input normalisation (``module__normalization``, the module or its class's default)."""
        params = self.get_params_for("module")
        if "normalization" in params:
            return params["normalization"]
        inner = getattr(getattr(self, "module_", None), "module", None)
        if inner is not None:
            return getattr(getattr(inner, "normalize", None), "mode", None)
        try:
            cls = self.module if inspect.isclass(self.module) else type(self.module)
            return inspect.signature(cls).parameters["normalization"].default
        except (KeyError, TypeError, ValueError):
            return None

    def _previous_fit(self, reset):
        """What :func:`~.data.prepare` keeps of a previous fit, and the surrogate sample it should draw."""
        kw = {}
        if not reset and hasattr(self, "y_mean_"):
            kw["scaling"] = (self.y_mean_, self.y_scale_)
        if not reset and hasattr(self, "measured_loc_"):
            kw["conditioning"] = (self.measured_loc_, self.measured_scale_)
        if self.crb_at_ == "estimate" and (reset or getattr(self, "crb_surrogate_", None) is None):
            kw["sample"] = (SURROGATE_ROWS, self._seed("surrogate"))
        return kw

    # ------------------------------------------------------------------ 3 targets/scaling
    def _set_targets(self, data, reset):
        """The fitted target attributes: scaling, names, the bounded head's range; the training targets' range."""
        n_features = int(data.n_features) + int(self.noise_input_)  # the noise column comes with augmentation
        if reset:
            self.n_features_in_ = n_features
        elif n_features != self.n_features_in_:
            raise ValueError(f"X has {n_features} features, but CRBNetRegressor is expecting "
                             f"{self.n_features_in_} features as input.")
        self.measured_loc_, self.measured_scale_ = data.measured_loc, data.measured_scale
        if reset or not hasattr(self, "y_mean_"):
            self._y_1d_ = bool(data.y_1d)
            self.n_outputs_ = int(np.shape(data.y_mean)[0])
            self.y_mean_, self.y_scale_ = data.y_mean, data.y_scale
            self.target_names_ = self._target_names(self.n_outputs_)
            prior = getattr(self.simulator_, "prior_", None)
            self.target_low_, self.target_high_, self.target_log_ = output_bounds(
                self.target_names_, self.head, prior, self.target_bounds, float(self.head_margin))
        check_target_range(self.target_names_, self.target_low_, self.target_high_, data.y_min, data.y_max)

    # ------------------------------------------------------------------ 4 weighting
    def _set_weighting(self, data, reset):
        """The nuisance weight caps; for ``crb_at="estimate"`` the surrogate (kept by a warm start)."""
        self.loss_weight_cap_ = weight_caps(self.target_names_, self.nuisance_weight_cap)
        if self.crb_at_ != "estimate":
            self.crb_surrogate_, self.crb_surrogate_rms_ = None, None
        elif data.sample is not None:
            self.crb_surrogate_, self.crb_surrogate_rms_ = crb_surrogate("estimate", *data.sample,
                                                                         seed=self._seed("surrogate"))

    # ------------------------------------------------------------------ 5 module
    def initialize_module(self):
        """The ``TargetStandardizedModule`` around the network; seeded weights from a private torch.Generator."""
        kwargs = self.get_params_for("module")
        measured = getattr(self, "measured_", None) or resolve_measured(self.measured)
        noise_input = bool(getattr(self, "noise_input_", self.noise_input))
        inner = self._build_network(kwargs, len(measured), noise_input)
        norm = getattr(inner, "normalize", None)
        if len(measured) != getattr(norm, "n_conditioning", 0):
            raise ValueError(f"measured={measured} needs a network whose input normalisation passes {len(measured)} "
                             "measured column(s) through (MLP or ResidualMLP with n_conditioning)")
        if noise_input != bool(getattr(norm, "noise_input", False)):
            raise ValueError(f"noise_input={noise_input} needs a network whose input normalisation reads the noise "
                             "column accordingly (MLP or ResidualMLP with noise_input)")
        self.noise_input_ = noise_input
        self.measured_ = measured
        n_out = getattr(self, "n_outputs_", None) or kwargs.get("n_outputs") or getattr(inner, "n_outputs", None)
        if n_out is None:
            raise ValueError("cannot tell the number of outputs of the module: fit the net or pass "
                             "module__n_outputs")
        self.module_ = TargetStandardizedModule(inner, n_out)
        return self

    def _build_network(self, kwargs, n_measured, noise_input=False):
        module = self.module
        if isinstance(module, nn.Module) and not kwargs:
            return module
        cls = module if inspect.isclass(module) else type(module)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        for name, val in (("n_features", getattr(self, "n_features_in_", None)),
                          ("n_outputs", getattr(self, "n_outputs_", None)), ("n_conditioning", n_measured or None),
                          ("noise_input", noise_input or None)):
            if name in params and name not in kwargs and val is not None:
                kwargs[name] = val
        seed = self._seed("init")
        if seed is None or not inspect.isclass(module):
            return self.initialized_instance(module, kwargs)
        with _SEED_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inner = self.initialized_instance(module, kwargs)
        # the weights from a private generator: no draw from the global RNG counts
        reset_parameters_with(inner, torch.Generator().manual_seed(seed))
        return inner

    def _load_scaling(self):
        """Copy the target scaling, head range and measured-input standardisation into the module's buffers."""
        for attr, buf in _SCALING:
            getattr(self.module_, buf).copy_(torch.as_tensor(getattr(self, attr)))
        norm = getattr(self.module_.module, "normalize", None)
        if getattr(norm, "n_conditioning", 0):
            norm.cond_loc.copy_(torch.as_tensor(self.measured_loc_))
            norm.cond_scale.copy_(torch.as_tensor(self.measured_scale_))

    def load_params(self, *args, **kwargs):
        """skorch's ``load_params``; also restores the fitted attributes from the module's buffers."""
        super().load_params(*args, **kwargs)
        inner = self.module_.module
        if getattr(inner, "n_features", None) is not None:
            self.n_features_in_ = int(inner.n_features)
        self.n_outputs_ = int(self.module_.mean.shape[0])
        for attr, buf in _SCALING:
            setattr(self, attr, getattr(self.module_, buf).detach().cpu().numpy().copy())
        norm = getattr(inner, "normalize", None)
        self.noise_input_ = bool(getattr(norm, "noise_input", False))
        if getattr(norm, "n_conditioning", 0):
            self.measured_loc_ = norm.cond_loc.detach().cpu().numpy().astype(np.float64)
            self.measured_scale_ = norm.cond_scale.detach().cpu().numpy().astype(np.float64)
        if not hasattr(self, "target_names_"):
            self.target_names_ = self._target_names(self.n_outputs_)
        return self

    # ------------------------------------------------------------------ 6 train loop
    def _augmentation_generator(self):
        """The torch.Generator of the per-batch M0/noise draws, on the training device."""
        seed = self._seed("augment")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        return torch.Generator(device=self.device_).manual_seed(seed)

    def get_split_datasets(self, X, y=None, **fit_params):
        """skorch's split, seeded; a float ``train_split`` is the held-out fraction of a seeded ``ValidSplit``.

        With augmentation the validation part gets one fixed M0/noise draw (:func:`~.data.fixed_noise_dataset`).
        """
        dataset, ts = self.get_dataset(X, y), self.train_split
        if isinstance(ts, Real) and not isinstance(ts, (bool, np.bool_)):
            if not 0 < ts < 1:
                raise ValueError(f"train_split as a float must be a fraction in (0, 1), got {ts}")
            ts = ValidSplit(float(ts), random_state=self._seed("split"))
        if not ts:
            return dataset, None
        dtrain, dvalid = ts(dataset, y, **fit_params) if y is not None else ts(dataset, **fit_params)
        if self.augment_ and dvalid is not None:
            dvalid = fixed_noise_dataset(dvalid, self._seed("valid_noise"), self.noise_, self.loss)
        return dtrain, dvalid

    def get_iterator(self, dataset, training=False):
        """Whole batches of the packed data by tensor indexing, else skorch's (:func:`~.loaders.make_iterator`)."""
        return make_iterator(self, dataset, training, seed=self._seed("shuffle"))

    def infer(self, x, **fit_params):
        """The module's output for features (or a packed batch: ``"X"``, then the noise column ``"s"`` of a
        noise-aware net, then the measured inputs ``"k"``)."""
        if isinstance(x, Mapping):
            keys = ("X", "s", "k") if getattr(self, "noise_input_", False) else ("X", "k")
            parts = [x[k] for k in keys if k in x]
        else:
            parts = [x]
        parts = [(torch.as_tensor(v, device=self.device_) if isinstance(v, torch.Tensor) else to_tensor(
            v, self.device_)).to(torch.float32) for v in parts]
        return self.module_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        """Weighted squared error of the standardised outputs (see :mod:`~.losses`)."""
        y_true = to_tensor(y_true, device=self.device_).to(y_pred.dtype).reshape(y_pred.shape)
        caps = getattr(self, "loss_weight_cap_", None)
        return self.criterion_(y_pred, y_true, batch_weights(X, self.loss, self.module_.scale, y_pred, caps))

    def train_step_single(self, batch, **fit_params):
        """One training step on a packed batch: fresh noise (augmentation), the loss weights, backward.

        With ``crb_at="estimate"`` the CRB weights move to the network's detached estimate
        (:mod:`~.crb_weighting`); after ``pretrain_epochs`` the bias-reduced loss draws ``n_realizations``
        noise realisations per fingerprint (:meth:`_bias_reduced_step`).
        """
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        if self.augment_:
            Xi = {k: to_tensor(v, device=self.device_) for k, v in Xi.items()}
            if self.loss == "bias_reduced" and len(self.history) > self.pretrain_epochs:  # fine-tuning epochs
                return self._bias_reduced_step(Xi, yi, **fit_params)
            snr, sigma, sampling = self.noise_
            Xi = augment_batch(Xi, self.rng_, snr, sigma, self.loss, sampling)
        y_pred = self.infer(Xi, **fit_params)
        if getattr(self, "crb_at_", "truth") == "estimate":  # the CRB weight at the (detached) estimate
            Xi["w"] = self.crb_surrogate_(Xi["w"], y_pred, yi)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        loss.backward()
        return {"loss": loss, "y_pred": y_pred}

    def _bias_reduced_step(self, Xi, yi, **fit_params):
        """A ``loss="bias_reduced"`` training step: the loss and the mean prediction per fingerprint."""
        nr = int(self.n_realizations)
        snr, sigma, sampling = self.noise_
        Xr = augment_realizations(Xi, self.rng_, snr, sigma, nr, sampling)
        y_pred = self.infer(Xr, **fit_params)
        y_true = to_tensor(yi, device=y_pred.device).to(y_pred.dtype).reshape(-1, y_pred.shape[-1])
        w = batch_weights(Xr, self.loss, self.module_.scale, y_pred, getattr(self, "loss_weight_cap_", None))
        loss = bias_reduced_loss(y_pred, y_true, w, nr, self.bias_lambda, self.var_delta)
        loss.backward()
        return {"loss": loss, "y_pred": y_pred.detach().reshape(-1, nr, y_pred.shape[-1]).mean(1)}

    # ------------------------------------------------------------------ prediction
    def predict(self, X, batch_size=None):
        """Estimated parameters in SI units.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Features (then the noise column of a noise-aware net, then the ``measured_`` columns);
            all-zero rows (background), rows outside float32's range and a noise column that is not
            positive and finite raise ``ValueError``: mask or rescale them.
        batch_size : int, optional
            Samples per forward pass; default 1024 on CPU, 65,536 on CUDA
            (:func:`~.loaders.forward_in_batches`).

        Returns
        -------
        y_pred : ndarray, float64, shape (n_samples, n_outputs) or (n_samples,)
        """
        self.check_is_fitted()
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        feats = split_measured(X, self.measured_, "predict")[0] if getattr(self, "measured_", ()) else X
        if getattr(self, "noise_input_", False):
            feats = check_noise_column(feats)
        check_rows(feats, getattr(getattr(self.module_.module, "normalize", None), "mode", None), "predict")
        with torch_threads(net_threads(self)):
            y = forward_in_batches(self.module_, X, self.device_, batch_size)
        return y[:, 0] if getattr(self, "_y_1d_", False) else y

    def fitted_model(self):
        """The model the network's coefficients belong to (the protocol of :func:`sklearn_crb.maps.fit_maps`).

        From ``crb_metadata_`` of a loaded model (:func:`sklearn_crb.io.models.load_model`), else the
        fitted ``simulator_``. Its standard errors are the delta-method spread (``"delta"``, default) or
        sqrt(CRB) at the estimate (``"crb"``).

        Returns
        -------
        sklearn_crb._model.FittedModel
        """
        self.check_is_fitted()
        measured = tuple(getattr(self, "measured_", None) or ())
        meta = getattr(self, "crb_metadata_", None)
        if meta is not None:
            basis = None if meta.get("basis") is None else np.asarray(meta["basis"], dtype=np.complex128)
            return FittedModel(sequence=Sequence.from_dict(meta["sequence"]), basis=basis,
                               estimate=tuple(meta["estimate"]), tied_R1=bool(meta.get("tied_R1", False)),
                               measured=measured, se_methods=NETWORK_SE, **self._noise_model())
        sim = getattr(self, "simulator_", None)
        if sim is None or getattr(sim, "basis_", None) is None:
            raise ValueError("the network carries no sequence and compression basis (coefficient images are rank-r): "
                             "train it with simulator= or fit_simulated, or load a saved model")
        return FittedModel(sequence=sim.sequence_, basis=np.asarray(sim.basis_, np.complex128),
                           estimate=tuple(self.target_names_), tied_R1=bool(sim.tied_R1), measured=measured,
                           se_methods=NETWORK_SE, **self._noise_model())

    def _noise_model(self):
        """``noise_input`` and ``typical_snr`` of :class:`~sklearn_crb._model.FittedModel`."""
        norm = getattr(self.module_.module, "normalize", None)
        if not getattr(self, "noise_input_", False) or norm is None:
            return {"noise_input": False}
        # the mean of log(||x|| / sigma) in training (the standardisation's centre)
        return {"noise_input": True, "typical_snr": float(np.exp(float(norm.snr_loc[0])))}

    def predict_details(self, X, *, fixed=None, compute_crb=True, sequence=None, basis=None, polish_iter=5,
                        se="delta", sigma=None):
        """Estimates with M0, residual, convergence and standard errors (the ``predict_details`` protocol).

        ``theta``: the network's estimates (time targets as rates), the ``fixed``
        values (``{name: scalar or (n,) array}``) and, for the other
        parameters, per-voxel values fitted by ``polish_iter`` batched VarPro
        Levenberg–Marquardt iterations with the estimates held, started at the
        model context's fill values. ``se="delta"``: the network's own
        delta-method variance ``var_unit``; ``"crb"``: the CRB at the estimate,
        ``crb_unit``. ``sequence``/``basis`` override the model context's; see
        :func:`sklearn_crb.estimators.net.details.network_details`. ``X`` holds the
        coefficient features only; ``sigma`` (a float or one per row, the noise
        standard deviation per real feature) is the noise column of a
        noise-aware network (``noise_input_``) and required by it.

        Returns
        -------
        PredictionDetails
            ``prediction``: the network's estimates in target units (NaN where ``failed``); the
            fields a network does not produce (``crb``, ``status``, ...) are None.
        """
        self.check_is_fitted()
        return network_details(self, X, fixed=fixed, compute_crb=compute_crb, sequence=sequence, basis=basis,
                               polish_iter=polish_iter, se=se, sigma=sigma)

    def score(self, X, y, sample_weight=None, crb=None):
        """CRB efficiency (``metrics.crb_efficiency_score``), not R^2.

        Needs the per-sample CRB: ``crb=`` or targets packed with
        :func:`sklearn_crb.simulator.pack_targets`; raises ``ValueError``
        without one.
        """
        y_pred = self.predict(X)  # validates X first
        y, packed = unpack_targets(y)
        crb = packed if crb is None else crb
        if crb is None:
            raise ValueError("CRBNetRegressor.score is the CRB efficiency and needs the per-sample CRB: pass "
                             "score(X, y, crb=...) or y = sklearn_crb.simulator.pack_targets(y, crb); for R^2 use "
                             "sklearn.metrics.r2_score(y, net.predict(X))")
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by the CRB efficiency score")
        return crb_efficiency_score(y, y_pred, crb=crb)

    @available_if(lambda self: False)
    def predict_proba(self, X):
        """Not available: a regressor has no class probabilities (use ``predict``)."""
        raise AttributeError("CRBNetRegressor has no predict_proba")

    def trim_for_prediction(self):
        """Drop optimizer, criterion and training-only state (smaller pickles)."""
        super().trim_for_prediction()
        for name in ("rng_", "crb_surrogate_"):
            self.__dict__.pop(name, None)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.input_tags.allow_nan = False
        tags.regressor_tags.poor_score = True
        tags.non_deterministic = self.random_state is None
        return tags
