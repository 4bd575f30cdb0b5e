"""``CRBNetRegressor``: a skorch network trained with the CRB-normalised loss.

Zhang et al., "Cramér–Rao bound-informed training of neural networks for
quantitative MRI", MRM 2022. The training pieces (losses, target scaling, the
paper's LR schedule, per-batch M0/noise augmentation, the validation CRB
score) live in :mod:`sklearn_crb.estimators._training`; this module wires them
into skorch.

The per-sample CRB travels with its sample: ``fit`` packs ``X`` into the dict
``{"X": features, "w": loss weights, "c": s^2/CRB}`` that skorch's
``Dataset`` slices, shuffles and batches together with ``y``; only ``"X"``
reaches the module, the rest reaches :meth:`CRBNetRegressor.get_loss` and
the scoring callback.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data
from skorch.dataset import Dataset, ValidSplit, unpack_data
from skorch.regressor import NeuralNetRegressor
from skorch.utils import to_tensor
from torch import nn

from sklearn_crb._validation import check_snr_range, resolve_device
from sklearn_crb.estimators._network_details import network_details
from sklearn_crb.estimators._training import (LOSSES, CRBScoring, DivergenceGuard, StepDecayWithFloor,
                                              TargetStandardizedModule, WeightedMSELoss, augment_batch,
                                              check_float32_range, loss_weights, paper_lr_scheduler,
                                              target_scaling)
from sklearn_crb.estimators.network import ResidualMLP
from sklearn_crb.simulator import MTFingerprintSimulator, unpack_targets

# torch's RNG is process-global: seeded module construction runs under this
# lock (and in a forked RNG state), so nets fitted concurrently in threads
# (joblib threading / dask threads) stay reproducible.
_SEED_LOCK = threading.Lock()

__all__ = ["CRBNetRegressor", "WeightedMSELoss", "TargetStandardizedModule", "StepDecayWithFloor",
           "paper_lr_scheduler", "CRBScoring", "DivergenceGuard"]


def _check_positive_finite(a, argname):
    if not np.all(np.isfinite(a)):
        i = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise ValueError(f"{argname} contains non-finite values (e.g. row {i})")
    if np.any(a <= 0):
        i = int(np.flatnonzero((a <= 0).any(axis=1))[0])
        raise ValueError(f"{argname} must be strictly positive (e.g. row {i}: {a[i]})")


class CRBNetRegressor(NeuralNetRegressor):
    """Neural-network estimator of tissue parameters with a CRB-normalised loss.

    A skorch :class:`~skorch.NeuralNetRegressor`: all skorch parameters
    (``module__*``, ``optimizer__*``, ``callbacks``, ``iterator_train__*``,
    ...) work, and so do ``get_params``/``set_params``/``clone``, pipelines and
    grid searches.

    Parameters
    ----------
    module : type or nn.Module, default ``ResidualMLP``
        The network; ``n_features`` and ``n_outputs`` are filled in from the
        data when its constructor takes them. Set its hyper-parameters with
        ``module__hidden=(...)``, ``module__normalization="first-coefficient"``...
    criterion : type, default ``WeightedMSELoss``
        Must accept ``(y_pred, y_true, weight)``.
    optimizer : type, default ``torch.optim.Adam``
    lr : float, default 1e-3
        Learning rate (paper: 1e-2 with BatchNorm and batch 1024; see
        :func:`paper_lr_scheduler` for its step schedule).
    max_epochs : int, default 100
    batch_size : int, default 1024
    train_split : float, None or callable, default 0.2
        Fraction of the data held out for validation (a
        ``skorch.dataset.ValidSplit`` seeded by ``random_state``), ``None``
        for none, or any skorch ``train_split`` callable.
    loss : {"crb", "mse", "relative"}, default "crb"
        ``"crb"``: mean of ``(theta_hat - theta)^2 / CRB``; needs ``crb=`` in
        ``fit`` (or targets packed with ``simulator.pack_targets``), or
        :meth:`fit_simulated`. ``"mse"``: mean squared error in raw SI
        units (the paper's baseline). ``"relative"``: mean of
        ``(theta_hat - theta)^2 / theta^2`` (targets must be non-zero).
    simulator : MTFingerprintSimulator, optional
        A *fitted* simulator: the data source of :meth:`fit_simulated`, the
        model context of :meth:`predict_details` (sequence, basis, nuisance
        fill values) and the default of ``target_names``, ``snr`` and
        ``sigma``. It does not make CRBs for ``fit(X, y)``: a CRB computed
        from ``y`` alone would miss the sample's nuisance parameters and SNR.
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
        ``|M0| / sigma`` range for augmentation; None: the simulator's, else
        (10, 100).
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

    def __init__(self, module=ResidualMLP, *args, criterion=WeightedMSELoss, optimizer=torch.optim.Adam, lr=1e-3,
                 max_epochs=100, batch_size=1024, train_split=0.2, loss="crb", simulator=None, augment="auto",
                 snr=None, sigma=None, target_names=None, random_state=None, device="auto", verbose=0, **kwargs):
        super().__init__(module, *args, criterion=criterion, optimizer=optimizer, lr=lr, max_epochs=max_epochs,
                         batch_size=batch_size, train_split=train_split, device=resolve_device(device),
                         verbose=verbose, **kwargs)
        self._device_param = device
        self.loss = loss
        self.simulator = simulator
        self.augment = augment
        self.snr = snr
        self.sigma = sigma
        self.target_names = target_names
        self.random_state = random_state

    # ------------------------------------------------------------ device
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

    def get_default_callbacks(self):
        return [*super().get_default_callbacks(), ("valid_crb", CRBScoring()), ("divergence", DivergenceGuard())]

    # ------------------------------------------------------------ helpers
    def _seed(self, offset=0):
        rs = self.random_state
        if rs is None:
            return None
        if isinstance(rs, (bool, np.bool_)) or not isinstance(rs, Integral):
            raise TypeError(f"random_state must be an int or None, got {rs!r}")
        return (int(rs) + 7919 * offset) % (2**32)

    def _noise_setup(self):
        sim = self.simulator
        snr = self.snr if self.snr is not None else (getattr(sim, "snr", None) or (10.0, 100.0))
        sigma = self.sigma if self.sigma is not None else (getattr(sim, "sigma", None) or 0.01)
        lo, hi = check_snr_range(snr)
        if not (isinstance(sigma, Real) and np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
        return (lo, hi), float(sigma)

    def _fitted_simulator(self):
        sim = self.simulator
        if sim is None:
            return None
        if not isinstance(sim, MTFingerprintSimulator) or not hasattr(sim, "basis_"):
            raise ValueError("simulator must be a fitted MTFingerprintSimulator (call simulator.fit() first)")
        return sim

    def _normalization(self):
        mode = self.get_params_for("module").get("normalization")
        if mode is None and "normalization" not in self.get_params_for("module"):
            inner = getattr(getattr(self, "module_", None), "module", None)
            norm = getattr(inner, "normalize", None)
            mode = getattr(norm, "mode", "l2" if inner is None else None)
        return mode

    def _resolve_names(self, n_outputs):
        names = self.target_names
        if names is None and self.simulator is not None and hasattr(self.simulator, "estimate_"):
            names = self.simulator.estimate_
        if names is None:
            return tuple(f"y{j}" for j in range(n_outputs))
        names = tuple(str(n) for n in ([names] if isinstance(names, str) else names))
        if len(names) != n_outputs:
            raise ValueError(f"target_names has {len(names)} entries for {n_outputs} targets")
        return names

    def _prepare(self, X, y, crb, augment, reset):
        """Validate the data and pack it into the dict skorch batches."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        y, packed = unpack_targets(y)
        crb = packed if crb is None else crb
        X, y = validate_data(self, X, y, reset=reset, multi_output=True, y_numeric=True, dtype=np.float64)
        if X.shape[0] < 2:
            raise ValueError(f"CRBNetRegressor needs at least 2 samples to fit, got n_samples={X.shape[0]}")
        Y = y.reshape(y.shape[0], -1)
        if not np.all(np.isfinite(Y)):
            raise ValueError("y contains non-finite values")
        self.simulator_ = self._fitted_simulator()
        if crb is not None:
            crb = np.asarray(crb, dtype=np.float64)
            if crb.ndim == 1 and Y.shape[1] == 1:
                crb = crb[:, None]
            if crb.shape != Y.shape:
                raise ValueError(f"crb must have the shape of y {Y.shape} (one CRB per sample and target), "
                                 f"got {crb.shape}")
            _check_positive_finite(crb, "crb")
        elif self.loss == "crb":
            raise ValueError("loss='crb' needs the per-sample CRB at each sample's own parameters and SNR: pass "
                             "fit(X, y, crb=...) (e.g. from simulator.make_dataset), pack it with the targets "
                             "(sklearn_crb.simulator.pack_targets(y, crb)), or train with fit_simulated(); or "
                             "choose loss='mse' or 'relative'")
        if augment and X.shape[1] % 2:
            raise ValueError("augment=True needs [Re c, Im c] features (an even number of columns)")
        mode = self._normalization()
        zero = ~np.any(X != 0, axis=1)
        if mode is not None and zero.any():
            raise ValueError(f"X has all-zero rows (e.g. row {int(np.flatnonzero(zero)[0])}: background voxels) "
                             f"that normalization={mode!r} cannot handle; mask them out before fit")
        check_float32_range(X, mode)
        if reset or not hasattr(self, "y_mean_"):
            self._y_1d_ = y.ndim == 1
            self.n_outputs_ = Y.shape[1]
            self.y_mean_, self.y_scale_ = target_scaling(Y)
            self.target_names_ = self._resolve_names(Y.shape[1])
        elif Y.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {Y.shape[1]} targets, the net was fitted with {self.n_outputs_}")
        Xd = {"X": X.astype(np.float32), "w": loss_weights(self.loss, Y, crb, self.y_scale_)}
        if crb is not None:
            Xd["c"] = loss_weights("crb", Y, crb, self.y_scale_)
        Ys = ((Y - self.y_mean_) / self.y_scale_).astype(np.float32)
        self.augment_ = bool(augment)
        if augment:
            self.noise_ = self._noise_setup()
            self.rng_ = np.random.default_rng(self._seed(2))
        return Xd, Ys

    def _resolve_augment(self, auto_value):
        a = self.augment
        if isinstance(a, str) and a == "auto":
            return auto_value
        if isinstance(a, (bool, np.bool_)):
            return bool(a)
        raise ValueError(f"augment must be True, False or 'auto', got {a!r}")

    # ---------------------------------------------------------------- fit
    def fit(self, X, y, crb=None, **fit_params):
        """Train the network.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Features, e.g. ``[Re c, Im c]`` of compressed fingerprints
            (noise-free at ``M0 = 1`` when ``augment=True``).
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
        Xd, Ys = self._prepare(X, y, crb, self._resolve_augment(False),
                               reset=not (self.warm_start and self.initialized_))
        if not self.warm_start or not self.initialized_:
            self.initialize()
        return self._fit_packed(Xd, Ys, "fit", **fit_params)

    def partial_fit(self, X, y=None, classes=None, crb=None, **fit_params):
        """Continue training without re-initialising (see :meth:`fit`)."""
        if "_routing_method" in fit_params:  # called by skorch internals with packed data
            return super().partial_fit(X, y, **fit_params)
        Xd, Ys = self._prepare(X, y, crb, self._resolve_augment(False), reset=not self.initialized_)
        if not self.initialized_:
            self.initialize()
        return self._fit_packed(Xd, Ys, "partial_fit", **fit_params)

    def _fit_packed(self, Xd, Ys, method, **fit_params):
        self.module_.mean.copy_(torch.as_tensor(self.y_mean_))
        self.module_.scale.copy_(torch.as_tensor(self.y_scale_))
        NeuralNetRegressor.partial_fit(self, Xd, Ys, _routing_method=method, **fit_params)
        return self

    def fit_simulated(self, n_samples, random_state=None, **fit_params):
        """Train on ``n_samples`` drawn by the simulator (augmentation on by default).

        Parameters
        ----------
        n_samples : int
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
        Xd, Ys = self._prepare(X, y, crb, augment, reset=True)
        self.initialize()
        return self._fit_packed(Xd, Ys, "fit", **fit_params)

    # -------------------------------------------------------- skorch hooks
    def initialize_module(self):
        kwargs = self.get_params_for("module")
        module = self.module
        if isinstance(module, nn.Module) and not kwargs:
            inner = module
        else:
            cls = module if inspect.isclass(module) else type(module)
            try:
                params = inspect.signature(cls).parameters
            except (TypeError, ValueError):
                params = {}
            for name, val in (("n_features", getattr(self, "n_features_in_", None)),
                              ("n_outputs", getattr(self, "n_outputs_", None))):
                if name in params and name not in kwargs and val is not None:
                    kwargs[name] = val
            seed = self._seed(0)
            if seed is not None and inspect.isclass(module):
                # built once, seeded, under the lock: no unseeded draw from the global RNG
                with _SEED_LOCK, torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    inner = self.initialized_instance(module, kwargs)
            else:
                inner = self.initialized_instance(module, kwargs)
        n_out = getattr(self, "n_outputs_", None) or kwargs.get("n_outputs") or getattr(inner, "n_outputs", None)
        if n_out is None:
            raise ValueError("cannot tell the number of outputs of the module: fit the net or pass "
                             "module__n_outputs")
        self.module_ = TargetStandardizedModule(inner, n_out)
        return self

    def load_params(self, *args, **kwargs):
        """skorch's ``load_params``; also restores ``n_features_in_``/``n_outputs_``."""
        super().load_params(*args, **kwargs)
        inner = self.module_.module
        if getattr(inner, "n_features", None) is not None:
            self.n_features_in_ = int(inner.n_features)
        self.n_outputs_ = int(self.module_.mean.shape[0])
        self.y_mean_ = self.module_.mean.detach().cpu().numpy().copy()
        self.y_scale_ = self.module_.scale.detach().cpu().numpy().copy()
        if not hasattr(self, "target_names_"):
            self.target_names_ = self._resolve_names(self.n_outputs_)
        return self

    def get_split_datasets(self, X, y=None, **fit_params):
        ts = self.train_split
        if isinstance(ts, Real) and not isinstance(ts, (bool, np.bool_)):
            if not 0 < ts < 1:
                raise ValueError(f"train_split as a float must be a fraction in (0, 1), got {ts}")
            ts = ValidSplit(float(ts), random_state=self._seed(1))
        dataset = self.get_dataset(X, y)
        if not ts:
            return dataset, None
        dtrain, dvalid = ts(dataset, y, **fit_params) if y is not None else ts(dataset, **fit_params)
        if self.augment_ and dvalid is not None:
            dvalid = self._fixed_noise_dataset(dvalid)
        return dtrain, dvalid

    def _fixed_noise_dataset(self, subset):
        """One fixed draw of M0 and noise for the validation part (paper)."""
        if not (isinstance(subset, torch.utils.data.Subset) and isinstance(subset.dataset, Dataset)
                and isinstance(subset.dataset.X, Mapping)):
            return subset  # a user-supplied validation set is taken as is
        idx = np.asarray(subset.indices)
        Xd = {k: np.asarray(v)[idx] for k, v in subset.dataset.X.items()}
        Xd = augment_batch(Xd, np.random.default_rng(self._seed(3)), *self.noise_, self.loss)
        return Dataset(Xd, np.asarray(subset.dataset.y)[idx])

    def get_iterator(self, dataset, training=False):
        if not training:
            return super().get_iterator(dataset, training=False)
        kwargs = self.get_params_for("iterator_train")
        bs = kwargs.get("batch_size", self.batch_size)
        bs = len(dataset) if bs == -1 else bs
        # BatchNorm cannot train on a batch of one sample: drop such a last batch
        if len(dataset) > 1 and len(dataset) % bs == 1 and "drop_last" not in kwargs:
            kwargs["drop_last"] = True
        kwargs.setdefault("batch_size", bs)
        kwargs.setdefault("shuffle", True)
        seed = self._seed(4)
        if seed is not None and "generator" not in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        return self.iterator_train(dataset, **kwargs)

    def infer(self, x, **fit_params):
        if isinstance(x, Mapping):
            x = x["X"]
        x = to_tensor(x, device=self.device_)
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return self.module_(x, **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        """Weighted squared error of the standardised outputs (see :mod:`._training`)."""
        y_true = to_tensor(y_true, device=self.device_)
        if isinstance(X, Mapping) and "w" in X:
            w = to_tensor(X["w"], device=self.device_)
        elif self.loss == "mse":
            w = (self.module_.scale**2).to(y_pred.dtype)
        else:
            raise ValueError(f"loss={self.loss!r} needs the per-sample weights packed in X by fit()")
        return self.criterion_(y_pred, y_true.to(y_pred.dtype).reshape(y_pred.shape), w)

    def train_step_single(self, batch, **fit_params):
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        if self.augment_:
            Xi = augment_batch({k: to_tensor(v, device=self.device_) for k, v in Xi.items()}, self.rng_,
                               *self.noise_, self.loss)
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        loss.backward()
        return {"loss": loss, "y_pred": y_pred}

    # ------------------------------------------------------------ predict
    def predict(self, X, batch_size=None):
        """Estimated parameters in SI units.

        Parameters
        ----------
        X : array_like, shape (n_samples, n_features)
            Features; all-zero rows (background) and rows outside float32's
            range raise ``ValueError``: mask or rescale them.
        batch_size : int, optional
            Samples per forward pass. Default: 1024 on CPU (activations stay
            in cache: a 37,625-voxel slice through the paper's network took
            0.85 s against 1.23 s with 65,536 on 2 cores), 65,536 on CUDA.

        Returns
        -------
        y_pred : ndarray, float64, shape (n_samples, n_outputs) or (n_samples,)
        """
        self.check_is_fitted()
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        mode = getattr(getattr(self.module_.module, "normalize", None), "mode", None)
        zero = ~np.any(X != 0, axis=1)
        if mode is not None and zero.any():
            raise ValueError(f"X has {int(zero.sum())} all-zero rows (e.g. row {int(np.flatnonzero(zero)[0])}): "
                             "background voxels cannot be normalised; mask them out before predict")
        check_float32_range(X, mode)
        dev = self.device_
        if batch_size is None:
            batch_size = 1024 if dev.type == "cpu" else 65536
        self.module_.eval()
        outs = []
        with torch.inference_mode():
            for i in range(0, X.shape[0], int(batch_size)):
                xb = torch.as_tensor(X[i: i + int(batch_size)], dtype=torch.float32, device=dev)
                outs.append(self.module_.to_physical(self.module_(xb)).cpu())
        y = torch.cat(outs).numpy() if outs else np.zeros((0, self.n_outputs_))
        return y[:, 0] if getattr(self, "_y_1d_", False) else y

    def predict_details(self, X, *, fixed=None, compute_crb=True, sequence=None, basis=None):
        """Estimates with M0, residual, convergence and unit CRB (the ``predict_details`` protocol).

        ``theta`` holds the network's estimates, the ``fixed`` values and, for
        the other parameters, the fill values of the model context (the
        simulator's prior centre, or ``crb_metadata_["fill_values"]`` of a
        loaded model). See :func:`sklearn_crb.estimators._network_details.network_details`.

        Parameters
        ----------
        X : array_like (n, 2r)
        fixed : dict, optional
            ``{name: scalar or (n,) array}`` of known, non-estimated parameters.
        compute_crb : bool
        sequence, basis : optional
            Override the model context's sequence and basis.

        Returns
        -------
        dict
            ``theta``, ``M0``, ``residual_norm``, ``converged``, ``crb_unit``,
            ``n_free``, ``estimate`` and ``out_of_range``.
        """
        self.check_is_fitted()
        return network_details(self, X, fixed=fixed, compute_crb=compute_crb, sequence=sequence, basis=basis)

    def score(self, X, y, sample_weight=None, crb=None):
        """CRB efficiency (``metrics.crb_efficiency_score``), not R^2.

        Needs the per-sample CRB: ``crb=`` or targets packed with
        :func:`sklearn_crb.simulator.pack_targets`; raises ``ValueError``
        without one.
        """
        # metrics sits above the estimators in the import flow
        from sklearn_crb.metrics import crb_efficiency_score

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
        self.__dict__.pop("rng_", None)
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
