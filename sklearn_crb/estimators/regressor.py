"""``CRBNetRegressor``: a skorch network trained with the CRB-normalised loss.

Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022. The training pieces (losses, target scaling, the
paper's LR schedule, the one-cycle schedule, per-batch M0/noise augmentation,
the validation CRB score) live in :mod:`sklearn_crb.estimators._training`, the
data preparation in :mod:`~sklearn_crb.estimators._prepare`, the batch loader
in :mod:`~sklearn_crb.estimators._batches`; this module wires them into skorch.

The per-sample CRB travels with its sample: ``fit`` packs ``X`` into the dict
``{"X": features, "w": loss weights, "c": s^2/CRB}`` that is sliced,
shuffled and batched together with ``y``; only ``"X"`` reaches the module,
the rest reaches :meth:`CRBNetRegressor.get_loss` and the scoring callback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch.regressor import NeuralNetRegressor
from skorch.utils import to_tensor

from sklearn_crb._validation import resolve_device
from sklearn_crb.estimators._measured import simulated_inputs, split_measured
from sklearn_crb.estimators._batches import forward_in_batches, make_iterator, net_threads, torch_threads
from sklearn_crb.estimators._network_details import network_details
from sklearn_crb.estimators._prepare import (augmentation_generator, build_module, check_rows, crb_score,
                                             fitted_simulator, load_scaling, net_seed, prepare, resolve_augment,
                                             restore_fitted, split_datasets)
from sklearn_crb.estimators._prepare_rows import is_row_source, prepare_rows
from sklearn_crb.estimators._steps import train_step
from sklearn_crb.estimators._training import (CRBScoring, DivergenceGuard, OneCycleSchedule, StepDecayWithFloor,
                                              TargetStandardizedModule, WeightedMSELoss, batch_weights,
                                              paper_lr_scheduler, paper_recipe)
from sklearn_crb.estimators.network import MLP

__all__ = ["CRBNetRegressor", "WeightedMSELoss", "TargetStandardizedModule", "StepDecayWithFloor",
           "paper_lr_scheduler", "CRBScoring", "DivergenceGuard", "OneCycleSchedule"]


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
        The one-cycle schedule anneals over all of them; chosen for about 96,000 samples (README).
    batch_size : int, default 512
    train_split : float, None or callable, default None
        Fraction of the data held out for validation (a
        ``skorch.dataset.ValidSplit`` seeded by ``random_state``), ``None``
        for none, or any skorch ``train_split`` callable.
    weight_decay : float, default 1e-4
        Passed to the optimizer unless ``optimizer__weight_decay`` is given.
    lr_schedule : {"onecycle", None}, default "onecycle"
        ``"onecycle"``: :class:`OneCycleSchedule` (peak ``lr``, 10 % warm-up,
        stepped per batch, restarted by every ``fit``/``partial_fit``).
        None: the constant ``lr`` or your own ``callbacks``.
    head : {"auto", "sigmoid", "linear", None}, default "auto"
        Each output with a known support is mapped onto it (outputs stay
        physical, e.g. m0s >= 0). The support is ``target_bounds[name]``, else
        the simulator's prior support, else the physical ``BOUNDS``.
        ``"auto"``: relaxation rates and times through ``exp`` of a sigmoid
        on [log low, log high], the others through a sigmoid on the support
        widened by ``head_margin``; ``"sigmoid"``: the latter for all;
        ``"linear"``/None: linear (:func:`~._prepare.output_bounds`).
    target_bounds : dict, optional
        ``{target name: (low, high)}`` for the bounded head.
    head_margin : float, default 0.05
        Fraction of the support's width added on both sides of a sigmoid
        output (cut at the physical bounds: m0s >= 0).
    nuisance_weight_cap : float or None, default 400.0
        Cap of the CRB loss weight ``s^2/CRB`` (``s``: the target's scale) of
        the nuisance outputs Rex, T2s, omega0, B1; None: uncapped. omega0's
        weight spans 1e3-1e9 and otherwise dominates the loss (m0s nMSE 29x
        worse); see :func:`~._training.weight_caps`.
    n_threads : int, "auto" or None, default "auto"
        torch CPU threads during ``fit`` and ``predict``; "auto":
        :func:`~sklearn_crb.estimators._batches.default_threads` (1: degrades
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
    crb_at : {"auto", "truth", "estimate"}, default "auto"
        Where the ``"crb"`` loss weight's CRB is evaluated: ``"truth"`` (Zhang
        et al. 2022) tilts uninformed estimates towards low-CRB values;
        ``"estimate"``: at the net's detached estimate, through a surrogate of
        the training set's CRBs (:mod:`~._crb_surrogate`). ``"auto"``:
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
        ``nuisance`` without them: :func:`~._measured.measured_nuisance`); :meth:`fit_simulated`
        appends the drawn values.
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
        split and the augmentation draws (None: torch's global RNG).
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
        Coefficient features plus the ``measured_`` columns.
    measured_ : tuple of str
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

    def __init__(self, module=MLP, *args, criterion=WeightedMSELoss, optimizer=torch.optim.AdamW, lr=2e-3,
                 max_epochs=150, batch_size=512, train_split=None, weight_decay=1e-4, lr_schedule="onecycle",
                 head="auto", target_bounds=None, head_margin=0.05, nuisance_weight_cap=400.0, n_threads="auto",
                 loss="crb", crb_at="auto", n_realizations=16, bias_lambda=1.0, var_delta=1.0, pretrain_epochs=0,
                 simulator=None, measured=None, augment="auto", snr=None, sigma=None, target_names=None,
                 random_state=None, device="auto", verbose=0,
                 **kwargs):
        super().__init__(module, *args, criterion=criterion, optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                         batch_size=batch_size, train_split=train_split, device=resolve_device(device),
                         verbose=verbose, **kwargs)
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
        self.augment = augment
        self.snr = snr
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
        if self.weight_decay is not None and "weight_decay" not in self.get_params_for(prefix):
            if "weight_decay" in inspect.signature(self.optimizer).parameters:
                kwargs["weight_decay"] = float(self.weight_decay)
        return args, kwargs

    def _seed(self, offset=0):
        return net_seed(self, offset)

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
        if is_row_source(X):  # a lazy set (e.g. io.h5.H5Rows of an HDF5 training set): read batch by batch
            if y is not None or crb is not None:
                raise ValueError("a lazy training set holds y and crb itself: call fit(rows) without y= or crb=")
            Xd, Ys = prepare_rows(self, X, resolve_augment(self, False), reset=reset), None
        else:
            Xd, Ys = prepare(self, X, y, crb, resolve_augment(self, False), reset=reset)
        if not self.warm_start or not self.initialized_:
            self.initialize()
        return self._fit_packed(Xd, Ys, "fit", **fit_params)

    def partial_fit(self, X, y=None, classes=None, crb=None, **fit_params):
        """Continue training without re-initialising (see :meth:`fit`)."""
        if "_routing_method" in fit_params:  # called by skorch internals with packed data
            return super().partial_fit(X, y, **fit_params)
        Xd, Ys = prepare(self, X, y, crb, resolve_augment(self, False), reset=not self.initialized_)
        if not self.initialized_:
            self.initialize()
        return self._fit_packed(Xd, Ys, "partial_fit", **fit_params)

    def _fit_packed(self, Xd, Ys, method, **fit_params):
        load_scaling(self)
        if self.augment_:
            self.rng_ = augmentation_generator(self)
        with torch_threads(net_threads(self)):
            NeuralNetRegressor.partial_fit(self, Xd, Ys, _routing_method=method, **fit_params)
        return self

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
        sim = fitted_simulator(self)
        if sim is None:
            raise ValueError("fit_simulated needs simulator=, a fitted MTFingerprintSimulator")
        augment = resolve_augment(self, True)
        rs = self.random_state if random_state is None else random_state
        X, y, crb, det = sim.make_dataset(int(n_samples), rs, return_details=True)
        if augment:
            X, crb = det["X_clean"], det["crb_unit"]
        Xd, Ys = prepare(self, simulated_inputs(self, sim, X, det["theta"]), y, crb, augment, reset=True)
        self.initialize()
        return self._fit_packed(Xd, Ys, "fit", **fit_params)

    def initialize_module(self):
        self.module_ = build_module(self)
        return self

    def load_params(self, *args, **kwargs):
        """skorch's ``load_params``; also restores ``n_features_in_``/``n_outputs_``."""
        super().load_params(*args, **kwargs)
        restore_fitted(self)
        return self

    def get_split_datasets(self, X, y=None, **fit_params):
        """skorch's split, seeded; with augmentation one fixed M0/noise draw (:func:`~._prepare.split_datasets`)."""
        return split_datasets(self, self.get_dataset(X, y), y, **fit_params)

    def get_iterator(self, dataset, training=False):
        """Whole batches of the packed data by tensor indexing, else skorch's (:func:`~._batches.make_iterator`)."""
        return make_iterator(self, dataset, training)

    def infer(self, x, **fit_params):
        """The module's output for features (or a packed batch: measured inputs ``"k"`` go behind ``"X"``)."""
        parts = [x["X"], x["k"]] if isinstance(x, Mapping) and "k" in x else [x["X"] if isinstance(x, Mapping) else x]
        parts = [(torch.as_tensor(v, device=self.device_) if isinstance(v, torch.Tensor) else to_tensor(
            v, self.device_)).to(torch.float32) for v in parts]
        return self.module_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        """Weighted squared error of the standardised outputs (see :mod:`._training`)."""
        y_true = to_tensor(y_true, device=self.device_).to(y_pred.dtype).reshape(y_pred.shape)
        caps = getattr(self, "loss_weight_cap_", None)
        return self.criterion_(y_pred, y_true, batch_weights(X, self.loss, self.module_.scale, y_pred, caps))

    def train_step_single(self, batch, **fit_params):
        return train_step(self, batch, **fit_params)

    def predict(self, X, batch_size=None):
        """Estimated parameters in SI units.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Features (then the ``measured_`` columns); all-zero rows (background) and rows outside
            float32's range raise ``ValueError``: mask or rescale them.
        batch_size : int, optional
            Samples per forward pass; default 1024 on CPU, 65,536 on CUDA
            (:func:`~._batches.forward_in_batches`).

        Returns
        -------
        y_pred : ndarray, float64, shape (n_samples, n_outputs) or (n_samples,)
        """
        self.check_is_fitted()
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        feats = split_measured(self, X, "predict")[0] if getattr(self, "measured_", ()) else X
        check_rows(feats, getattr(getattr(self.module_.module, "normalize", None), "mode", None), "predict")
        with torch_threads(net_threads(self)):
            y = forward_in_batches(self.module_, X, self.device_, batch_size)
        return y[:, 0] if getattr(self, "_y_1d_", False) else y

    def predict_details(self, X, *, fixed=None, compute_crb=True, sequence=None, basis=None, polish_iter=5,
                        se="delta"):
        """Estimates with M0, residual, convergence and standard errors (the ``predict_details`` protocol).

        ``theta``: the network's estimates (time targets as rates), the ``fixed``
        values (``{name: scalar or (n,) array}``) and, for the other
        parameters, per-voxel values fitted by ``polish_iter`` batched VarPro
        Levenberg–Marquardt iterations with the estimates held, started at the
        model context's fill values. ``se="delta"``: the network's own
        delta-method variance ``var_unit``; ``"crb"``: the CRB at the estimate,
        ``crb_unit``. ``sequence``/``basis`` override the model context's; see
        :func:`sklearn_crb.estimators._network_details.network_details`.

        Returns
        -------
        PredictionDetails
            ``prediction``: the network's estimates in target units (NaN where ``failed``); the
            fields a network does not produce (``crb``, ``status``, ...) are None.
        """
        self.check_is_fitted()
        return network_details(self, X, fixed=fixed, compute_crb=compute_crb, sequence=sequence, basis=basis,
                               polish_iter=polish_iter, se=se)

    def score(self, X, y, sample_weight=None, crb=None):
        """CRB efficiency (``metrics.crb_efficiency_score``), not R^2.

        Needs the per-sample CRB: ``crb=`` or targets packed with
        :func:`sklearn_crb.simulator.pack_targets`; raises ``ValueError``
        without one.
        """
        return crb_score(self, X, y, sample_weight, crb)

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
