"""A saved, self-describing network: everything needed to apply it safely.

A model is a directory::

    model/
      params.pt     skorch ``save_params(f_params=...)``: the module state dict
                    (network weights and the target scaling buffers); loads
                    with ``torch.load(..., weights_only=True)`` and with
                    ``CRBNetRegressor.load_params(f_params=...)``
      model.json    format version, the network's registry name (``NETWORKS``)
                    and its JSON-typed constructor arguments, the SHA-256 of
                    params.pt, the
                    input normalisation, parameter names and units, which are
                    estimated, the tied-R1 model, the values assumed for the
                    parameters that are not estimated, the sequence (full
                    description and SHA-256) and the basis SHA-256
      basis.npy     the compression basis (complex128, ``allow_pickle=False``)

No pickle is involved: JSON, ``.npy`` and a tensor-only state dict, and a
model folder is treated as untrusted input: ``model.json`` can name only the
package's own networks, every key is type-checked, and the weights must
match their hash and the network's shapes. Applying
the model to data from a different basis or sequence is refused
(:func:`check_compatible`), because a network trained on coefficients of one
basis returns plausible-looking nonsense on another.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch

from sklearn.utils.validation import check_is_fitted

from sklearn_crb._validation import check_basis
from sklearn_crb._version import __version__
from sklearn_crb.estimators.network import MLP, ResidualMLP
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb._atomic import atomic_dir
from sklearn_crb.io._files import check_output_folder
from sklearn_crb.physics.parameters import PARAMETERS, UNITS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["save_model", "load_model", "check_compatible", "basis_sha256", "file_sha256", "NETWORKS", "FORMAT",
           "FORMAT_VERSION", "MODEL_FILES"]

FORMAT = "sklearn-crb-network"
#: 2: ``module_class`` is a registry name and ``params_sha256`` is recorded.
#: 3: ``module_kwargs`` records every constructor argument, so a later change of
#: a network's defaults cannot change what a saved model loads as.
FORMAT_VERSION = 3
#: The files of a model folder; a folder holding anything else is never replaced.
MODEL_FILES = ("params.pt", "model.json", "basis.npy")
_JSON_TYPES = (str, int, float, bool, type(None))

#: The only network classes a ``model.json`` may name. Nothing else is
#: imported or called: a model folder from someone else is untrusted input.
NETWORKS = {"MLP": MLP, "ResidualMLP": ResidualMLP}
#: ``module_class`` values written by format version 1 (a dotted path).
_LEGACY_NAMES = {f"{mod}:{cls}": cls for mod in ("sklearn_crb.network", "sklearn_crb.estimators.network")
                 for cls in NETWORKS}
#: JSON type of every constructor argument (checked against the signatures in the tests).
_SCHEMAS = {
    "MLP": {"n_features": "size", "n_outputs": "size", "hidden": "widths", "normalization": "str|null",
            "batch_norm": "bool", "activation": "str"},
    "ResidualMLP": {"n_features": "size", "n_outputs": "size", "hidden": "widths|null", "skips": "skips",
                    "normalization": "str|null", "batch_norm": "bool"},
}
#: Constructor defaults of the networks as format versions <= 2 saved them (only the non-default
#: arguments were written then): what an older model.json that omits a key means.
_V2_DEFAULTS = {
    "MLP": {"hidden": (256, 256, 128), "normalization": "l2", "batch_norm": True, "activation": "relu"},
    "ResidualMLP": {"hidden": None, "skips": "auto", "normalization": "l2", "batch_norm": True},
}
_KIND_TEXT = {"size": "an integer in [1, 65536]", "widths": "a list of integers in [1, 65536]",
              "widths|null": "null or a list of integers in [1, 65536]", "str|null": "a string or null", "str": "a string",
              "bool": "true or false", "skips": '"auto", null or a list of [source, target] integer pairs'}
_MAX_WIDTH, _MAX_LAYERS = 65536, 256


def basis_sha256(basis):
    """SHA-256 of a basis as little-endian complex128 (shape included)."""
    U = np.ascontiguousarray(np.asarray(basis), dtype="<c16")
    h = hashlib.sha256(str(U.shape).encode())
    h.update(U.tobytes())
    return h.hexdigest()


def file_sha256(path):
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(v):
    if isinstance(v, _JSON_TYPES):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    return False


def _registry_name(module):
    cls = module if isinstance(module, type) else type(module)
    for name, known in NETWORKS.items():
        if cls is known:
            return name
    raise ValueError(f"only the package's own networks {sorted(NETWORKS)} can be saved in the portable format, "
                     f"got {cls.__module__}.{cls.__qualname__}; use skorch save_params with your own loading code")


def _constructor_kwargs(net):
    """Every constructor argument of the net's module: its defaults, overridden by ``module__*``."""
    cls = net.module if isinstance(net.module, type) else type(net.module_.module)
    kwargs = {k: p.default for k, p in inspect.signature(cls).parameters.items()
              if p.default is not inspect.Parameter.empty and k not in ("n_features", "n_outputs")}
    kwargs.update({k[len("module__"):]: v for k, v in net.get_params(deep=False).items() if k.startswith("module__")})
    return kwargs


# ---------------------------------------------------------------- validation of model.json (untrusted)
def _fail(file, key, what):
    raise ValueError(f"model: {file}: {key!r} {what}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_kwarg(file, key, kind, v):
    """One JSON-typed constructor argument of a registered network."""
    width = lambda x: _is_int(x) and 1 <= x <= _MAX_WIDTH  # noqa: E731
    ok = {
        "size": lambda: width(v),
        "widths": lambda: isinstance(v, list) and len(v) <= _MAX_LAYERS and all(width(x) for x in v),
        "widths|null": lambda: v is None or (isinstance(v, list) and len(v) <= _MAX_LAYERS
                                             and all(width(x) for x in v)),
        "str|null": lambda: v is None or isinstance(v, str),
        "str": lambda: isinstance(v, str),
        "bool": lambda: isinstance(v, bool),
        "skips": lambda: v is None or v == "auto" or (isinstance(v, list) and all(
            isinstance(pair, list) and len(pair) == 2 and all(_is_int(i) for i in pair) for pair in v)),
    }[kind]()
    if not ok:
        _fail(file, f"module_kwargs.{key}", f"must be {_KIND_TEXT[kind]}, got {v!r:.80}")
    return tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v


def _module_kwargs(file, name, kwargs, version=FORMAT_VERSION):
    """Validate ``module_kwargs`` against the registered constructor's schema.

    Format versions <= 2 recorded only non-default arguments: the omitted
    ones get the defaults of that time (``_V2_DEFAULTS``).
    """
    if name not in NETWORKS:
        legacy = _LEGACY_NAMES.get(name)
        if legacy is None:
            _fail(file, "module_class", f"names {name!r}, which is not one of the package's networks "
                                        f"{sorted(NETWORKS)}; refusing to load it")
        name = legacy
    if not isinstance(kwargs, dict):
        _fail(file, "module_kwargs", f"must be a JSON object, got {type(kwargs).__name__}")
    schema = _SCHEMAS[name]
    unknown = sorted(set(kwargs) - set(schema))
    if unknown:
        _fail(file, "module_kwargs", f"has keys {unknown} that {name} does not take (it takes {sorted(schema)})")
    checked = {k: _check_kwarg(file, k, schema[k], v) for k, v in kwargs.items()}
    if version <= 2:
        checked = {**_V2_DEFAULTS.get(name, {}), **checked}
    return name, checked


def _require(meta, file, key, types, what):
    if key not in meta:
        _fail(file, key, "is missing")
    v = meta[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (int in types and bool not in types and isinstance(v, bool)):
        _fail(file, key, f"must be {what}, got {type(v).__name__}")
    return v


def save_model(net, path, *, sequence=None, basis=None, simulator=None, fill_values=None, tied_R1=None,
               nuisance=None, estimate=None, overwrite=True):
    """Save a fitted ``CRBNetRegressor`` with its metadata (atomically).

    Parameters
    ----------
    net : fitted CRBNetRegressor
    path : str or path-like
        Output directory (replaced only once completely written).
    sequence, basis : optional
        Default: taken from ``simulator`` (or ``net.simulator``).
    simulator : fitted MTFingerprintSimulator, optional
        Supplies sequence, basis, estimated parameters, tied-R1 model,
        nuisance set, the prior centre (``fill_values``) and the SNR range.
    fill_values : array_like (8,), optional
        Values assumed for parameters the network does not estimate (used for
        the residual and the CRB at the estimate); default: prior centre.
    tied_R1, nuisance, estimate : optional
        Override the simulator's.
    overwrite : bool
        Replace an existing saved model at ``path`` (atomically: the old one
        stays whole until the new one is complete). A folder that holds
        anything but a saved model's files is never replaced.

    Returns
    -------
    Path
    """
    check_is_fitted(net, "module_")
    path = check_output_folder(path, overwrite=overwrite, owned_names=MODEL_FILES, marker="model.json",
                               argname="path")
    sim = simulator if simulator is not None else getattr(net, "simulator", None)
    if sim is not None and not hasattr(sim, "basis_"):
        raise ValueError("simulator must be fitted")
    sequence = sequence if sequence is not None else (sim.sequence_ if sim is not None else None)
    basis = basis if basis is not None else (sim.basis_ if sim is not None else None)
    if not isinstance(sequence, Sequence):
        raise ValueError("sequence: pass the Sequence the network was trained for (or simulator=)")
    if basis is None:
        raise ValueError("basis: pass the compression basis the network was trained in (or simulator=)")

    U = check_basis(basis, sequence.n_pulses)
    est = estimate if estimate is not None else (sim.estimate_ if sim is not None else
                                                 getattr(net, "target_names_", None))
    tied = bool(tied_R1 if tied_R1 is not None else (sim.tied_R1 if sim is not None else False))
    est = resolve_estimate(est, tied)
    if len(est) != net.n_outputs_:
        raise ValueError(f"estimate names {len(est)} parameters {est} but the network has {net.n_outputs_} outputs")
    if net.n_features_in_ != 2 * U.shape[1]:
        raise ValueError(f"the network takes {net.n_features_in_} features but the basis has rank {U.shape[1]} "
                         f"({2 * U.shape[1]} real features)")
    if fill_values is None:
        if sim is None:
            raise ValueError("fill_values: pass the values of the parameters the network does not estimate "
                             "(or simulator=)")
        fill_values = sim.prior_.center()
    fill = np.asarray(fill_values, dtype=float).reshape(-1)
    if fill.shape != (len(PARAMETERS),) or not np.all(np.isfinite(fill)):
        raise ValueError(f"fill_values must be 8 finite values in PARAMETERS order, got {fill_values!r}")
    nuis = nuisance if nuisance is not None else (sim.nuisance if sim is not None else "all")
    module_kwargs = _constructor_kwargs(net)
    bad = [k for k, v in module_kwargs.items() if not _jsonable(v)]
    if bad:
        raise ValueError(f"module parameters {bad} are not JSON-serialisable; cannot save portably")
    inner = net.module_.module
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sklearn_crb_version": __version__,
        "module_class": _registry_name(net.module if isinstance(net.module, type) else type(inner)),
        "module_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in module_kwargs.items()},
        "input_normalization": getattr(inner, "normalization", module_kwargs.get("normalization", "l2")),
        "n_features": int(net.n_features_in_),
        "n_outputs": int(net.n_outputs_),
        "parameters": list(PARAMETERS),
        "units": dict(UNITS),
        "estimate": list(est),
        "tied_R1": tied,
        "nuisance": nuis if isinstance(nuis, str) or nuis is None else list(nuis),
        "fill_values": fill.tolist(),
        "loss": getattr(net, "loss", None),
        "snr": list(sim.snr) if sim is not None else None,
        "sigma": float(sim.sigma) if sim is not None else None,
        "rank": int(U.shape[1]),
        "basis_sha256": basis_sha256(U),
        "sequence_sha256": sequence.sha256(),
        "sequence": sequence.to_dict(),
    }
    with atomic_dir(path) as tmp:
        net.save_params(f_params=str(tmp / "params.pt"))
        meta["params_sha256"] = file_sha256(tmp / "params.pt")
        np.save(tmp / "basis.npy", U, allow_pickle=False)
        (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_meta(path):
    """Read and validate ``model.json``: one ``ValueError`` naming the file and the key."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a model directory (expected params.pt, model.json, basis.npy)")
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"model: {path} is incomplete, missing {missing}")
    file = path / "model.json"
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"model: {file} is not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"model: {file} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"model: {path} is not a {FORMAT} model (format={meta.get('format')!r:.60})")
    version = _require(meta, file, "format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"model: {file}: format version {version} is newer than this package supports "
                         f"({FORMAT_VERSION}); upgrade sklearn-crb")
    if version >= 2:
        _require(meta, file, "params_sha256", str, "a SHA-256 hex string")
    _require(meta, file, "module_class", str, "a string")
    _require(meta, file, "module_kwargs", dict, "a JSON object")
    n_features = _require(meta, file, "n_features", int, "an integer")
    n_outputs = _require(meta, file, "n_outputs", int, "an integer")
    rank = _require(meta, file, "rank", int, "an integer")
    est = _require(meta, file, "estimate", list, "a list of parameter names")
    tied = _require(meta, file, "tied_R1", bool, "true or false")
    fill = _require(meta, file, "fill_values", list, "a list of 8 numbers")
    for key in ("basis_sha256", "sequence_sha256"):
        _require(meta, file, key, str, "a SHA-256 hex string")
    _require(meta, file, "sequence", dict, "a JSON object")
    if not all(isinstance(p, str) for p in est):
        _fail(file, "estimate", "must be a list of parameter names")
    try:
        meta["estimate"] = list(resolve_estimate(tuple(est), tied))
    except (ValueError, TypeError) as exc:
        _fail(file, "estimate", f"is invalid ({exc})")
    if len(est) != n_outputs:
        _fail(file, "n_outputs", f"is {n_outputs} but 'estimate' names {len(est)} parameters")
    if n_features != 2 * rank or rank < 1:
        _fail(file, "n_features", f"is {n_features} but 'rank' is {rank} (expected 2 * rank real features)")
    if len(fill) != len(PARAMETERS) or not all(_is_int(v) or isinstance(v, float) for v in fill) or not np.all(
            np.isfinite(np.asarray(fill, dtype=float))):
        _fail(file, "fill_values", "must be 8 finite numbers in PARAMETERS order")
    for key in ("loss",):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            _fail(file, key, "must be a string or null")
    nuis = meta.get("nuisance", "all")
    if not (nuis is None or isinstance(nuis, str) or (isinstance(nuis, list) and all(isinstance(p, str)
                                                                                    for p in nuis))):
        _fail(file, "nuisance", "must be a string, a list of parameter names or null")
    meta["_module"] = _module_kwargs(file, meta["module_class"], meta["module_kwargs"], version)
    try:
        meta["_sequence"] = Sequence.from_dict(meta["sequence"])
    except Exception as exc:  # noqa: BLE001 - an arbitrary JSON object: any failure is a bad file
        _fail(file, "sequence", f"is not a valid sequence ({type(exc).__name__}: {exc})")
    if meta["_sequence"].sha256() != meta["sequence_sha256"]:
        _fail(file, "sequence", "does not match 'sequence_sha256' (corrupt model)")
    return meta


def _expected_state(cls, kwargs, n_outputs):
    """Shapes of the state dict of the wrapped network, built without memory (meta device)."""
    with torch.device("meta"):
        inner = cls(**kwargs)
    shapes = {f"module.{k}": tuple(v.shape) for k, v in inner.state_dict().items()}
    shapes.update(mean=(n_outputs,), scale=(n_outputs,))
    return shapes


#: Output-bound buffers of the wrapper (bounded heads): +-inf marks a linear output; absent in older models.
_BOUND_KEYS = ("low", "high")


def _check_state_values(state, params):
    """Finite weights and scaling; bounds may be +-inf (linear output) but never NaN, and low < high."""
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        ok = ~torch.isnan(v) if k in _BOUND_KEYS else torch.isfinite(v)
        if not bool(torch.all(ok)):
            raise ValueError(f"model: {params} holds non-finite values in {k!r}")
    if all(k in state for k in _BOUND_KEYS) and not bool(torch.all(state["low"] < state["high"])):
        raise ValueError(f"model: {params}: the output bounds must satisfy low < high")


def load_model(path, *, device="auto", sequence=None, basis=None):
    """Load a model saved by :func:`save_model`; the folder is untrusted input.

    Only the registered networks (``NETWORKS``) are built, with the
    constructor arguments of ``model.json`` checked against their schema;
    ``params.pt`` must match its recorded SHA-256, loads with
    ``torch.load(weights_only=True)`` and must fit the network exactly.

    Parameters
    ----------
    path : str or path-like
        The model directory.
    device : str
        Where the network runs (``"auto"``, ``"cpu"``, ``"cuda"``).
    sequence, basis : optional
        If given, checked against the model (:func:`check_compatible`).

    Returns
    -------
    net : CRBNetRegressor
        Ready to ``predict``; ``net.crb_metadata_`` holds the metadata (with
        the basis under ``"basis"``), which ``maps.fit_maps`` uses.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a folder.
    ValueError
        Anything wrong with the folder, naming the file and the key.
    """
    path = Path(path)
    meta = _read_meta(path)
    name, kwargs = meta.pop("_module")
    seq = meta.pop("_sequence")
    try:
        U = np.load(path / "basis.npy", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt file
        raise ValueError(f"model: {path / 'basis.npy'} is not a readable .npy file ({exc})") from exc
    if basis_sha256(U) != meta["basis_sha256"]:
        raise ValueError(f"model: {path / 'basis.npy'} does not match the basis hash in model.json (corrupt model)")
    if U.shape != (seq.n_pulses, meta["rank"]):
        _fail(path / "model.json", "rank", f"is {meta['rank']} but basis.npy has shape {U.shape}")
    params = path / "params.pt"
    if "params_sha256" in meta and file_sha256(params) != meta["params_sha256"]:
        raise ValueError(f"model: {params} does not match 'params_sha256' in model.json (corrupt or altered "
                         "weights); refusing to load it")
    try:
        state = torch.load(params, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"model: {params} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    kwargs.setdefault("n_features", meta["n_features"])
    kwargs.setdefault("n_outputs", meta["n_outputs"])
    cls = NETWORKS[name]
    try:
        expected = _expected_state(cls, kwargs, meta["n_outputs"])
    except (ValueError, TypeError) as exc:
        _fail(path / "model.json", "module_kwargs", f"is rejected by {name} ({exc})")
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) and all(
        isinstance(v, torch.Tensor) for v in state.values()) else None
    if got is None:
        raise ValueError(f"model: {params} is not a state dict of tensors")
    if set(_BOUND_KEYS) <= set(got) or not set(got) & set(_BOUND_KEYS):  # both bounds, or neither (older)
        expected.update({k: got[k] for k in _BOUND_KEYS if k in got and got[k] == (meta["n_outputs"],)})
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(f"model: {params} does not fit the network described by model.json "
                         f"('module_class' {name}, 'module_kwargs'): mismatch at {diff[:4]}")
    _check_state_values(state, params)
    del state  # checked; skorch loads the file into the module
    net = CRBNetRegressor(module=cls, loss=meta.get("loss") or "crb", target_names=tuple(meta["estimate"]),
                          device=device, **{f"module__{k}": v for k, v in kwargs.items()})
    net.n_features_in_ = int(meta["n_features"])
    net.n_outputs_ = int(meta["n_outputs"])
    net.initialize()
    net.load_params(f_params=str(params))
    net.target_names_ = tuple(meta["estimate"])
    net.crb_metadata_ = dict(meta, basis=U)
    if sequence is not None or basis is not None:
        check_compatible(net, sequence=sequence, basis=basis)
    return net


def check_compatible(model, *, sequence=None, basis=None, rank=None):
    """Refuse data from another basis or sequence than the model's.

    Parameters
    ----------
    model : loaded network (with ``crb_metadata_``) or metadata dict
    sequence : Sequence, optional
    basis : array_like, optional
        Compared to the stored basis (exactly by hash, else numerically to
        1e-6, so a float32 copy of the same basis is accepted).
    rank : int, optional
        Rank of a coefficient image.

    Raises
    ------
    ValueError
        Naming what differs.
    """
    meta = model.crb_metadata_ if hasattr(model, "crb_metadata_") else model
    if sequence is not None:
        if not isinstance(sequence, Sequence):
            raise TypeError(f"sequence must be a Sequence, got {type(sequence).__name__}")
        if sequence.sha256() != meta["sequence_sha256"]:
            raise ValueError(f"sequence mismatch: the data's sequence {sequence.name!r} ({sequence.n_pulses} pulses, "
                             f"sha256 {sequence.sha256()[:12]}) is not the one the model was trained for "
                             f"({meta['sequence'].get('name')!r}, {len(meta['sequence']['alpha'])} pulses, "
                             f"sha256 {meta['sequence_sha256'][:12]})")
    if rank is not None and int(rank) != int(meta["rank"]):
        raise ValueError(f"rank mismatch: the image has rank {rank} but the model was trained on rank {meta['rank']} "
                         "coefficients")
    if basis is not None:
        U = np.asarray(basis)
        stored = meta.get("basis")
        same = basis_sha256(U) == meta["basis_sha256"]
        if not same and stored is not None and U.shape == stored.shape:
            same = np.abs(U.astype(np.complex128) - stored).max() <= 1e-6
        if not same:
            raise ValueError(f"basis mismatch: the data's basis (shape {U.shape}, sha256 {basis_sha256(U)[:12]}) is "
                             f"not the one the model was trained in (rank {meta['rank']}, sha256 "
                             f"{meta['basis_sha256'][:12]}); coefficients in another basis cannot be applied")
    return True
