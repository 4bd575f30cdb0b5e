"""Data preparation of ``CRBNetRegressor``: validation, CRB checks, the bounded head's range, packing, the
train/validation split, the module and its target scaling, and the CRB score.

``fit`` packs ``X`` into the dict ``{"X": features, "w": loss weights,
"c": s^2/CRB}`` that the batch loader slices together with the
standardised targets; only ``"X"`` reaches the module, the rest reaches the
loss and the validation CRB score (:mod:`sklearn_crb.estimators._training`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch
from skorch.dataset import Dataset, ValidSplit
from sklearn.utils.validation import validate_data
from torch import nn

from sklearn_crb.estimators._batches import PackedRows
from sklearn_crb.estimators._crb_surrogate import setup_crb_at
from sklearn_crb.estimators._measured import (fitted_measured, load_conditioning, measured_columns,
                                              restore_conditioning)
from sklearn_crb.estimators._training import (CRB_LOSSES, LOSSES, TargetStandardizedModule, augment_batch,
                                              check_float32_range, loss_weights, target_scaling, weight_caps)
from sklearn_crb.estimators.network import reset_parameters_with
from sklearn_crb.physics.parameters import BOUNDS, PARAMETERS, TIMES, rate_name
from sklearn_crb._validation import check_snr_range
from sklearn_crb.metrics import crb_efficiency_score
from sklearn_crb.simulator import MTFingerprintSimulator, unpack_targets

# Seeded modules draw their weights from a private torch.Generator (reset_parameters_with); their
# construction (whose default draws are then overwritten) still runs under this lock and in a forked
# RNG state, for layers reset_parameters_with does not know.
_SEED_LOCK = threading.Lock()

__all__ = ["build_module", "fixed_noise_dataset", "split_datasets", "crb_score", "check_crb", "check_rows",
           "output_bounds", "LOG_TARGETS", "HEADS", "prepare", "noise_setup", "fitted_simulator", "normalization",
           "resolve_names", "set_targets", "set_weight_caps", "check_target_range",
           "load_scaling", "restore_fitted", "resolve_augment", "augmentation_generator",
           "net_seed", "check_bias_reduced"]


def net_seed(net, stream=0):
    """The seed of one of the net's random streams from its ``random_state`` (None: unseeded).

    Streams: 0 weight initialisation, 1 validation split, 2 per-batch
    augmentation, 3 the validation part's fixed noise draw, 4 batch shuffling.
    """
    rs = net.random_state
    if rs is None:
        return None
    if isinstance(rs, (bool, np.bool_)) or not isinstance(rs, Integral):
        raise TypeError(f"random_state must be an int or None, got {rs!r}")
    return (int(rs) + 7919 * stream) % (2**32)


def check_crb(crb, shape):
    """Per-sample CRBs of the shape of ``y``: positive, and finite or +inf (a singular Fisher matrix)."""
    crb = np.asarray(crb, dtype=np.float64)
    if crb.ndim == 1 and shape[1] == 1:
        crb = crb[:, None]
    if crb.shape != shape:
        raise ValueError(f"crb must have the shape of y {shape} (one CRB per sample and target), got {crb.shape}")
    bad = np.isnan(crb) | np.isneginf(crb)
    if bad.any():
        raise ValueError(f"crb contains NaN or -inf values (e.g. row {int(np.flatnonzero(bad.any(axis=1))[0])})")
    if np.any(crb <= 0):
        i = int(np.flatnonzero((crb <= 0).any(axis=1))[0])
        raise ValueError(f"crb must be strictly positive (e.g. row {i}: {crb[i]})")
    if np.all(np.isinf(crb), axis=0).any():
        raise ValueError("crb is infinite for every sample of some target: nothing to train it on")
    return crb


def check_rows(X, mode, action="fit"):
    """Refuse all-zero rows when the input is normalised (``mode`` not None) and rows outside float32's range."""
    zero = ~np.any(X != 0, axis=1)
    if mode is not None and zero.any():
        raise ValueError(f"X has {int(zero.sum())} all-zero rows (e.g. row {int(np.flatnonzero(zero)[0])}: "
                         f"background voxels) that normalization={mode!r} cannot handle; mask them out before "
                         f"{action}")
    check_float32_range(X, mode)


#: Targets whose bounded head is log-space under ``head="auto"``: relaxation rates and their times.
LOG_TARGETS = ("R1f", "R2f", "R1s", "T1f", "T2f", "T1s")
HEADS = ("auto", "sigmoid", "linear", None)


def _support(p, user, prior):
    """``(low, high, physical low, physical high)`` of target ``p``, or None for a linear output."""
    if p in user:
        try:
            lo, hi = (float(v) for v in user[p])
        except (TypeError, ValueError):
            raise TypeError(f"target_bounds[{p!r}] must be a (low, high) pair, got {user[p]!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"target_bounds[{p!r}] must be finite with low < high, got ({lo}, {hi})")
        return lo, hi, None, None
    if not (p in PARAMETERS or p in TIMES):
        return None
    rate = rate_name(p)
    dist = getattr(prior, "distributions", {}).get(rate) if prior is not None else None
    lo, hi = getattr(dist, "support", None) or BOUNDS[rate]
    plo, phi = BOUNDS[rate]
    lo, hi = max(float(lo), plo), min(float(hi), phi)
    if p in TIMES:
        lo, hi, plo, phi = 1.0 / hi, 1.0 / max(lo, 1e-12), 1.0 / phi, 1.0 / plo
    return lo, hi, plo, phi


def output_bounds(names, head, prior=None, target_bounds=None, margin=0.05):
    """``(low, high, log)`` arrays of the bounded output head (physical units; +-inf: linear output).

    The support of each target is ``target_bounds[name]`` if given, else the
    prior's support of its rate (inverted for a time target ``T = 1/R``),
    else ``physics.parameters.BOUNDS``; names that are not parameters
    (``y0``, ...) stay linear.

    ``head="auto"``: relaxation targets (:data:`LOG_TARGETS`) with a positive
    support get the log-space head (``log[j]`` True) on exactly that support
    (their log-uniform or decade-wide priors train faster and to a lower loss
    in log space: -13 % final CRB loss and -10 to -30 % CRB-normalised MSE at
    equal budget on the brain prior, v3.2 sequence). Every other bounded
    target, and every target under ``head="sigmoid"``, gets the sigmoid head
    on its support widened by ``margin`` times its width on both sides (a
    sigmoid reaches its ends only as ``z -> +-inf``, and targets drawn at
    the support edge, e.g. ``m0s = 0``, must be reachable), cut to the
    physical bounds (``m0s >= 0``). ``head="linear"`` or None: all linear.
    """
    k = len(names)
    low, high, log = np.full(k, -np.inf), np.full(k, np.inf), np.zeros(k, dtype=bool)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head is None or head == "linear":
        return low, high, log
    user = {} if target_bounds is None else dict(target_bounds)
    unknown = sorted(set(user) - set(names))
    if unknown:
        raise ValueError(f"target_bounds names {unknown} that are not targets {tuple(names)}")
    for j, p in enumerate(names):
        sup = _support(p, user, prior)
        if sup is None:
            continue
        lo, hi, plo, phi = sup
        if head == "auto" and p in LOG_TARGETS and lo > 0:
            low[j], high[j], log[j] = lo, hi, True
        elif plo is None:  # user bounds are taken as given
            low[j], high[j] = lo, hi
        else:
            width = hi - lo
            low[j] = max(lo - margin * width, plo)
            high[j] = min(hi + margin * width, phi)
    return low, high, log


def prepare(net, X, y, crb, augment, reset):
    """Validate the data of ``CRBNetRegressor.fit`` and pack it into the dict skorch batches.

    Sets the fitted attributes (``n_outputs_``, ``y_mean_``, ``y_scale_``,
    ``target_names_``, ``target_low_``/``target_high_``/``target_log_`` when
    ``reset``; ``simulator_``, ``augment_``, ``noise_``,
    ``loss_weight_cap_``). Returns ``(Xd, Ys)``.
    """
    if net.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {net.loss!r}")
    y, packed = unpack_targets(y)
    crb = packed if crb is None else crb
    X, y = validate_data(net, X, y, reset=reset, multi_output=True, y_numeric=True, dtype=np.float64)
    if X.shape[0] < 2:
        raise ValueError(f"CRBNetRegressor needs at least 2 samples to fit, got n_samples={X.shape[0]}")
    Y = y.reshape(y.shape[0], -1)
    if not np.all(np.isfinite(Y)):
        raise ValueError("y contains non-finite values")
    net.simulator_ = fitted_simulator(net)
    X, cond = measured_columns(net, X, resolve_names(net, Y.shape[1]), reset)
    if crb is not None:
        crb = check_crb(crb, Y.shape)
    elif net.loss in CRB_LOSSES:
        raise ValueError(f"loss={net.loss!r} needs the per-sample CRB at each sample's own parameters and SNR: pass "
                         "fit(X, y, crb=...) (e.g. from simulator.make_dataset), pack it with the targets "
                         "(sklearn_crb.simulator.pack_targets(y, crb)), or train with fit_simulated(); or "
                         "choose loss='mse' or 'relative'")
    if augment and X.shape[1] % 2:
        raise ValueError("augment=True needs [Re c, Im c] features (an even number of columns)")
    check_bias_reduced(net, augment)
    check_rows(X, normalization(net), "fit")
    if reset or not hasattr(net, "y_mean_"):
        set_targets(net, *target_scaling(Y), y.ndim == 1)
    elif Y.shape[1] != net.n_outputs_:
        raise ValueError(f"y has {Y.shape[1]} targets, the net was fitted with {net.n_outputs_}")
    set_weight_caps(net)
    check_target_range(net, Y)
    Xd = {"X": X.astype(np.float32), "w": loss_weights(net.loss, Y, crb, net.y_scale_)}
    if cond is not None:  # measured inputs: no M0 scaling, no noise (the module appends them)
        Xd["k"] = cond.astype(np.float32)
    if crb is not None:
        Xd["c"] = loss_weights("crb", Y, crb, net.y_scale_)
    Ys = ((Y - net.y_mean_) / net.y_scale_).astype(np.float32)
    net.augment_ = bool(augment)
    if augment:
        net.noise_ = noise_setup(net)
    setup_crb_at(net, Ys, Xd["w"], reset)
    return Xd, Ys


def _is_int(v):
    return isinstance(v, Integral) and not isinstance(v, (bool, np.bool_))


def check_bias_reduced(net, augment):
    """Validate ``n_realizations``, ``bias_lambda``, ``var_delta``, ``pretrain_epochs``; ``loss="bias_reduced"``
    needs augmentation (noise-free ``X_clean`` and unit CRBs ``crb_unit``) and ``pretrain_epochs <= max_epochs``."""
    nr, pre = net.n_realizations, net.pretrain_epochs
    if not (_is_int(nr) and nr >= 2):
        raise ValueError(f"n_realizations must be an int >= 2 (a variance needs two noise realisations), got {nr!r}")
    for name in ("bias_lambda", "var_delta"):
        v = getattr(net, name)
        if not (isinstance(v, Real) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    if not (_is_int(pre) and pre >= 0):
        raise ValueError(f"pretrain_epochs must be an int >= 0, got {pre!r}")
    if net.loss != "bias_reduced":
        return
    if not augment:
        raise ValueError("loss='bias_reduced' draws n_realizations noise realisations of every fingerprint and needs "
                         "augment=True with noise-free features at M0 = 1 and unit CRBs (make_dataset(..., "
                         "return_details=True)'s X_clean and crb_unit), or fit_simulated()")
    if _is_int(net.max_epochs) and pre > net.max_epochs:
        raise ValueError(f"pretrain_epochs ({pre}) must not exceed max_epochs ({net.max_epochs})")


def set_targets(net, mean, scale, y_1d):
    """The fitted target attributes: scaling, names and the bounded head's range."""
    net._y_1d_ = bool(y_1d)
    net.n_outputs_ = int(np.shape(mean)[0])
    net.y_mean_, net.y_scale_ = mean, scale
    net.target_names_ = resolve_names(net, net.n_outputs_)
    prior = getattr(net.simulator_, "prior_", None)
    net.target_low_, net.target_high_, net.target_log_ = output_bounds(
        net.target_names_, net.head, prior, net.target_bounds, float(net.head_margin))


def set_weight_caps(net):
    """``loss_weight_cap_`` from ``nuisance_weight_cap`` (checked)."""
    cap = net.nuisance_weight_cap
    if cap is not None and not (isinstance(cap, Real) and not isinstance(cap, bool) and np.isfinite(cap) and cap > 0):
        raise ValueError(f"nuisance_weight_cap must be a positive finite float or None, got {cap!r}")
    net.loss_weight_cap_ = weight_caps(net.target_names_, cap)


def check_target_range(net, Y):
    """Refuse targets outside the bounded head's range."""
    out = (Y < net.target_low_) | (Y > net.target_high_)
    if out.any():
        j = int(np.flatnonzero(out.any(axis=0))[0])
        raise ValueError(f"y[:, {j}] ({net.target_names_[j]}) has values outside the bounded head's range "
                         f"[{net.target_low_[j]:g}, {net.target_high_[j]:g}]: widen target_bounds, train with "
                         "the simulator whose prior drew y, or use head=None")


def noise_setup(net):
    """``((snr_lo, snr_hi), sigma)`` of the augmentation: the net's, else its simulator's, else (10, 300), 0.01."""
    sim = net.simulator
    snr = net.snr if net.snr is not None else (getattr(sim, "snr", None) or (10.0, 300.0))
    sigma = net.sigma if net.sigma is not None else (getattr(sim, "sigma", None) or 0.01)
    lo, hi = check_snr_range(snr)
    if not (isinstance(sigma, Real) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
    return (lo, hi), float(sigma)


def resolve_augment(net, auto_value):
    """The net's ``augment`` as a bool (``"auto"``: ``auto_value``)."""
    a = net.augment
    if isinstance(a, str) and a == "auto":
        return auto_value
    if isinstance(a, (bool, np.bool_)):
        return bool(a)
    raise ValueError(f"augment must be True, False or 'auto', got {a!r}")


def augmentation_generator(net):
    """The torch.Generator of the per-batch M0/noise draws, on the training device; seeded by ``random_state``."""
    seed = net._seed(2)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    return torch.Generator(device=net.device_).manual_seed(seed)


def fitted_simulator(net):
    """The net's ``simulator`` (None or a fitted ``MTFingerprintSimulator``)."""
    sim = net.simulator
    if sim is None:
        return None
    if not isinstance(sim, MTFingerprintSimulator) or not hasattr(sim, "basis_"):
        raise ValueError("simulator must be a fitted MTFingerprintSimulator (call simulator.fit() first)")
    return sim


def normalization(net):
    """The input normalisation of the net's module (from ``module__normalization``, the module or its class)."""
    mode = net.get_params_for("module").get("normalization")
    if mode is None and "normalization" not in net.get_params_for("module"):
        inner = getattr(getattr(net, "module_", None), "module", None)
        norm = getattr(inner, "normalize", None)
        if inner is None:
            try:
                default = inspect.signature(net.module if inspect.isclass(net.module) else type(net.module))
                mode = default.parameters["normalization"].default
            except (KeyError, TypeError, ValueError):
                mode = None
        else:
            mode = getattr(norm, "mode", None)
    return mode


def resolve_names(net, n_outputs):
    """Target names: ``target_names``, the simulator's ``estimate_`` or ``y0, y1, ...``."""
    names = net.target_names
    if names is None and net.simulator is not None and hasattr(net.simulator, "estimate_"):
        names = net.simulator.estimate_
    if names is None:
        return tuple(f"y{j}" for j in range(n_outputs))
    names = tuple(str(n) for n in ([names] if isinstance(names, str) else names))
    if len(names) != n_outputs:
        raise ValueError(f"target_names has {len(names)} entries for {n_outputs} targets")
    return names


def build_module(net):
    """The ``TargetStandardizedModule`` of ``net`` (its ``initialize_module``); seeded weights from a private
    torch.Generator (:func:`~sklearn_crb.estimators.network.reset_parameters_with`)."""
    kwargs = net.get_params_for("module")
    module = net.module
    if isinstance(module, nn.Module) and not kwargs:
        inner = module
    else:
        cls = module if inspect.isclass(module) else type(module)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        for name, val in (("n_features", getattr(net, "n_features_in_", None)),
                          ("n_outputs", getattr(net, "n_outputs_", None)),
                          ("n_conditioning", len(fitted_measured(net)) or None)):
            if name in params and name not in kwargs and val is not None:
                kwargs[name] = val
        seed = net._seed(0)
        if seed is not None and inspect.isclass(module):
            with _SEED_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                inner = net.initialized_instance(module, kwargs)
            # the weights from a private generator: no draw from the global RNG counts
            reset_parameters_with(inner, torch.Generator().manual_seed(seed))
        else:
            inner = net.initialized_instance(module, kwargs)
    measured = fitted_measured(net)
    k = len(measured)
    if k != getattr(getattr(inner, "normalize", None), "n_conditioning", 0):
        raise ValueError(f"measured={measured} needs a network whose input normalisation passes {k} measured "
                         "column(s) through (MLP or ResidualMLP with n_conditioning)")
    net.measured_ = measured
    n_out = getattr(net, "n_outputs_", None) or kwargs.get("n_outputs") or getattr(inner, "n_outputs", None)
    if n_out is None:
        raise ValueError("cannot tell the number of outputs of the module: fit the net or pass "
                         "module__n_outputs")
    return TargetStandardizedModule(inner, n_out)


_SCALING = (("y_mean_", "mean"), ("y_scale_", "scale"), ("target_low_", "low"), ("target_high_", "high"),
            ("target_log_", "log_head"))


def load_scaling(net):
    """Copy the fitted target scaling and head range into the module's buffers (they travel in its state_dict)."""
    for attr, buf in _SCALING:
        getattr(net.module_, buf).copy_(torch.as_tensor(getattr(net, attr)))
    load_conditioning(net)


def restore_fitted(net):
    """The fitted attributes of a net whose parameters were loaded (``load_params``), from its module."""
    inner = net.module_.module
    if getattr(inner, "n_features", None) is not None:
        net.n_features_in_ = int(inner.n_features)
    net.n_outputs_ = int(net.module_.mean.shape[0])
    for attr, buf in _SCALING:
        setattr(net, attr, getattr(net.module_, buf).detach().cpu().numpy().copy())
    restore_conditioning(net)
    if not hasattr(net, "target_names_"):
        net.target_names_ = resolve_names(net, net.n_outputs_)


def fixed_noise_dataset(net, subset):
    """One fixed draw of M0 and noise for the validation part (paper).

    The validation part of a lazy set (:class:`~._batches.PackedRows`) is
    read into memory for it (its ``train_split`` fraction only).
    """
    if isinstance(subset, torch.utils.data.Subset) and isinstance(subset.dataset, PackedRows):
        Xd, y = subset.dataset.take(np.asarray(subset.indices))
        subset = torch.utils.data.Subset(Dataset(Xd, y), np.arange(len(y)))
    if not (isinstance(subset, torch.utils.data.Subset) and isinstance(subset.dataset, Dataset)
            and isinstance(subset.dataset.X, Mapping)):
        return subset  # a user-supplied validation set is taken as is
    idx = np.asarray(subset.indices)
    Xd = {k: np.asarray(v)[idx] for k, v in subset.dataset.X.items()}
    Xd = augment_batch(Xd, np.random.default_rng(net._seed(3)), *net.noise_, net.loss)
    return Dataset(Xd, np.asarray(subset.dataset.y)[idx])


def split_datasets(net, dataset, y=None, **fit_params):
    """``(train, valid)`` of ``CRBNetRegressor.get_split_datasets``.

    A float ``train_split`` is the held-out fraction of a ``ValidSplit``
    seeded by ``random_state``; with augmentation the validation part gets
    one fixed M0/noise draw (:func:`fixed_noise_dataset`).
    """
    ts = net.train_split
    if isinstance(ts, Real) and not isinstance(ts, (bool, np.bool_)):
        if not 0 < ts < 1:
            raise ValueError(f"train_split as a float must be a fraction in (0, 1), got {ts}")
        ts = ValidSplit(float(ts), random_state=net._seed(1))
    if not ts:
        return dataset, None
    dtrain, dvalid = ts(dataset, y, **fit_params) if y is not None else ts(dataset, **fit_params)
    if net.augment_ and dvalid is not None:
        dvalid = fixed_noise_dataset(net, dvalid)
    return dtrain, dvalid


def crb_score(net, X, y, sample_weight=None, crb=None):
    """CRB efficiency (``metrics.crb_efficiency_score``), not R^2.

    Needs the per-sample CRB: ``crb=`` or targets packed with
    :func:`sklearn_crb.simulator.pack_targets`; raises ``ValueError``
    without one.
    """
    y_pred = net.predict(X)  # validates X first
    y, packed = unpack_targets(y)
    crb = packed if crb is None else crb
    if crb is None:
        raise ValueError("CRBNetRegressor.score is the CRB efficiency and needs the per-sample CRB: pass "
                         "score(X, y, crb=...) or y = sklearn_crb.simulator.pack_targets(y, crb); for R^2 use "
                         "sklearn.metrics.r2_score(y, net.predict(X))")
    if sample_weight is not None:
        raise ValueError("sample_weight is not supported by the CRB efficiency score")
    return crb_efficiency_score(y, y_pred, crb=crb)
