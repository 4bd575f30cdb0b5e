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
match their hash and the network's shapes (those checks are in
:mod:`sklearn_crb.io._model_schema`). Applying
the model to data from a different basis or sequence is refused
(:func:`check_compatible`), because a network trained on coefficients of one
basis returns plausible-looking nonsense on another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from sklearn.utils.validation import check_is_fitted

from sklearn_crb._validation import check_basis
from sklearn_crb._version import __version__
from sklearn_crb.estimators.net.measured import resolve_measured
from sklearn_crb.estimators.net.regressor import CRBNetRegressor
from sklearn_crb._atomic import atomic_dir
from sklearn_crb.io._files import check_output_folder
from sklearn_crb.io._model_schema import (BOUND_KEYS, LOG_KEY, NETWORKS, check_state_values, constructor_kwargs,
                                         expected_state, fail, head_kinds, is_int, jsonable, parse_module_kwargs,
                                         registry_name, require)
from sklearn_crb.physics.parameters import PARAMETERS, UNITS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["save_model", "load_model", "check_compatible", "basis_sha256", "file_sha256", "NETWORKS", "FORMAT",
           "FORMAT_VERSION", "MODEL_FILES"]

FORMAT = "sklearn-crb-network"
#: 2: ``module_class`` is a registry name and ``params_sha256`` is recorded.
#: 3: ``module_kwargs`` records every constructor argument, so a later change of
#: a network's defaults cannot change what a saved model loads as. ``output_head`` (the per-output head kind,
#: checked against the ``log_head``/``low``/``high`` buffers of ``params.pt``) is optional: older files lack it.
FORMAT_VERSION = 4
#: The files of a model folder; a folder holding anything else is never replaced.
MODEL_FILES = ("params.pt", "model.json", "basis.npy")


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
    measured = tuple(getattr(net, "measured_", ()))
    if net.n_features_in_ != 2 * U.shape[1] + len(measured):
        raise ValueError(f"the network takes {net.n_features_in_} features but the basis has rank {U.shape[1]} "
                         f"({2 * U.shape[1]} real features{f' and {len(measured)} measured' if measured else ''})")
    if fill_values is None:
        if sim is None:
            raise ValueError("fill_values: pass the values of the parameters the network does not estimate "
                             "(or simulator=)")
        fill_values = sim.prior_.center()
    fill = np.asarray(fill_values, dtype=float).reshape(-1)
    if fill.shape != (len(PARAMETERS),) or not np.all(np.isfinite(fill)):
        raise ValueError(f"fill_values must be 8 finite values in PARAMETERS order, got {fill_values!r}")
    nuis = nuisance if nuisance is not None else (sim.nuisance if sim is not None else "all")
    module_kwargs = constructor_kwargs(net)
    bad = [k for k, v in module_kwargs.items() if not jsonable(v)]
    if bad:
        raise ValueError(f"module parameters {bad} are not JSON-serialisable; cannot save portably")
    inner = net.module_.module
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sklearn_crb_version": __version__,
        "module_class": registry_name(net.module if isinstance(net.module, type) else type(inner)),
        "module_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in module_kwargs.items()},
        "input_normalization": getattr(inner, "normalization", module_kwargs.get("normalization", "l2")),
        "n_features": int(net.n_features_in_),
        "n_outputs": int(net.n_outputs_),
        "output_head": head_kinds(net.module_.low, net.module_.high, net.module_.log_head),
        "parameters": list(PARAMETERS),
        "units": dict(UNITS),
        "estimate": list(est),
        "tied_R1": tied,
        "nuisance": nuis if isinstance(nuis, str) or nuis is None else list(nuis),
        "fill_values": fill.tolist(),
        "loss": getattr(net, "loss", None),
        "crb_at": getattr(net, "crb_at_", None),
        "measured": list(measured),
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
    version = require(meta, file, "format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"model: {file}: format version {version} is newer than this package supports "
                         f"({FORMAT_VERSION}); upgrade sklearn-crb")
    if version >= 2:
        require(meta, file, "params_sha256", str, "a SHA-256 hex string")
    require(meta, file, "module_class", str, "a string")
    require(meta, file, "module_kwargs", dict, "a JSON object")
    n_features = require(meta, file, "n_features", int, "an integer")
    n_outputs = require(meta, file, "n_outputs", int, "an integer")
    rank = require(meta, file, "rank", int, "an integer")
    est = require(meta, file, "estimate", list, "a list of parameter names")
    tied = require(meta, file, "tied_R1", bool, "true or false")
    fill = require(meta, file, "fill_values", list, "a list of 8 numbers")
    for key in ("basis_sha256", "sequence_sha256"):
        require(meta, file, key, str, "a SHA-256 hex string")
    require(meta, file, "sequence", dict, "a JSON object")
    if not all(isinstance(p, str) for p in est):
        fail(file, "estimate", "must be a list of parameter names")
    try:
        meta["estimate"] = list(resolve_estimate(tuple(est), tied))
    except (ValueError, TypeError) as exc:
        fail(file, "estimate", f"is invalid ({exc})")
    if len(est) != n_outputs:
        fail(file, "n_outputs", f"is {n_outputs} but 'estimate' names {len(est)} parameters")
    measured = meta.setdefault("measured", [])
    if not (isinstance(measured, list) and all(isinstance(p, str) for p in measured)):
        fail(file, "measured", "must be a list of parameter names")
    try:
        meta["measured"] = list(resolve_measured(tuple(measured), meta["estimate"], tied))
    except (ValueError, TypeError) as exc:
        fail(file, "measured", f"is invalid ({exc})")
    if n_features != 2 * rank + len(measured) or rank < 1:
        fail(file, "n_features", f"is {n_features} but 'rank' is {rank} and {len(measured)} parameters are "
                                 "measured (expected 2 * rank real features, then the measured columns)")
    if len(fill) != len(PARAMETERS) or not all(is_int(v) or isinstance(v, float) for v in fill) or not np.all(
            np.isfinite(np.asarray(fill, dtype=float))):
        fail(file, "fill_values", "must be 8 finite numbers in PARAMETERS order")
    for key in ("loss", "crb_at"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            fail(file, key, "must be a string or null")
    nuis = meta.get("nuisance", "all")
    if not (nuis is None or isinstance(nuis, str) or (isinstance(nuis, list) and all(isinstance(p, str)
                                                                                    for p in nuis))):
        fail(file, "nuisance", "must be a string, a list of parameter names or null")
    meta["_module"] = parse_module_kwargs(file, meta["module_class"], meta["module_kwargs"], version)
    try:
        meta["_sequence"] = Sequence.from_dict(meta["sequence"])
    except Exception as exc:  # noqa: BLE001 - an arbitrary JSON object: any failure is a bad file
        fail(file, "sequence", f"is not a valid sequence ({type(exc).__name__}: {exc})")
    if meta["_sequence"].sha256() != meta["sequence_sha256"]:
        fail(file, "sequence", "does not match 'sequence_sha256' (corrupt model)")
    return meta


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
        fail(path / "model.json", "rank", f"is {meta['rank']} but basis.npy has shape {U.shape}")
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
    if kwargs.setdefault("n_conditioning", len(meta["measured"])) != len(meta["measured"]):
        fail(path / "model.json", "module_kwargs.n_conditioning", f"is {kwargs['n_conditioning']} but "
                                                                   f"'measured' names {meta['measured']}")
    cls = NETWORKS[name]
    try:
        expected = expected_state(cls, kwargs, meta["n_outputs"])
    except (ValueError, TypeError) as exc:
        fail(path / "model.json", "module_kwargs", f"is rejected by {name} ({exc})")
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) and all(
        isinstance(v, torch.Tensor) for v in state.values()) else None
    if got is None:
        raise ValueError(f"model: {params} is not a state dict of tensors")
    if set(BOUND_KEYS) <= set(got) or not set(got) & set(BOUND_KEYS):  # both bounds, or neither (older)
        expected.update({k: got[k] for k in BOUND_KEYS if k in got and got[k] == (meta["n_outputs"],)})
    if got.get(LOG_KEY) == (meta["n_outputs"],):  # absent in models saved before the log-space head
        expected[LOG_KEY] = got[LOG_KEY]
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(f"model: {params} does not fit the network described by model.json "
                         f"('module_class' {name}, 'module_kwargs'): mismatch at {diff[:4]}")
    check_state_values(state, params)
    if "output_head" in meta:
        n = meta["n_outputs"]
        low, high = (state.get(k, torch.full((n,), float(s) * torch.inf)) for k, s in zip(BOUND_KEYS, (-1, 1)))
        kinds = head_kinds(low, high, state.get(LOG_KEY, torch.zeros(n, dtype=torch.bool)))
        if meta["output_head"] != kinds:
            fail(path / "model.json", "output_head", f"is {meta['output_head']!r:.120} but params.pt holds the "
                                                     f"head {kinds}")
    del state  # checked; skorch loads the file into the module
    net = CRBNetRegressor(module=cls, loss=meta.get("loss") or "crb", target_names=tuple(meta["estimate"]),
                          measured=tuple(meta["measured"]) or None, device=device,
                          **{f"module__{k}": v for k, v in kwargs.items()})
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
