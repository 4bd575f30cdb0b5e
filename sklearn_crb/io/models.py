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
                    description and SHA-256), the basis SHA-256, and
                    ``content_sha256``: the SHA-256 of all of the above
                    (canonical JSON), which binds what a prediction means
                    to the weights and the basis (format version 5)
      basis.npy     the compression basis (complex128, ``allow_pickle=False``)

Loading reads each file once and uses only the bytes it verified. Folders
written before format version 5 (sklearn-crb 0.1) load only with
``load_model(..., trust_unhashed=True)`` or after the one-time conversion
:func:`migrate_model` (``sklearn-crb migrate-model``), which writes a new
folder; a format number the package never wrote is refused.

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
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._atomic import atomic_dir
from sklearn_crb._validation import check_basis
from sklearn_crb._version import __version__
from sklearn_crb.estimators._measured import resolve_measured
from sklearn_crb.estimators.regressor import CRBNetRegressor
from sklearn_crb.io._files import check_output_folder
from sklearn_crb.io._model_schema import (
    BOUND_KEYS,
    LOG_KEY,
    NETWORKS,
    check_state_values,
    constructor_kwargs,
    expected_state,
    fail,
    head_kinds,
    is_int,
    jsonable,
    parse_module_kwargs,
    registry_name,
    require,
)
from sklearn_crb.physics.parameters import PARAMETERS, UNITS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["save_model", "load_model", "migrate_model", "check_compatible", "basis_sha256", "file_sha256",
           "content_sha256", "NETWORKS", "FORMAT", "FORMAT_VERSION", "HASHED_SINCE", "MODEL_FILES"]

FORMAT = "sklearn-crb-network"
#: 2: ``module_class`` is a registry name and ``params_sha256`` is recorded.
#: 3: ``module_kwargs`` records every constructor argument, so a later change of
#: a network's defaults cannot change what a saved model loads as. ``output_head`` (the per-output head kind,
#: checked against the ``log_head``/``low``/``high`` buffers of ``params.pt``) is optional: older files lack it.
#: 5: ``content_sha256`` hashes the meaning of ``model.json`` (every key, with ``params_sha256`` and
#: ``basis_sha256``), required. Older folders load only with ``trust_unhashed=True`` or after
#: :func:`migrate_model`; a version never written (< 1) is refused.
FORMAT_VERSION = 5
#: The first format version whose ``model.json`` carries ``content_sha256``.
HASHED_SINCE = 5
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
        meta["content_sha256"] = content_sha256(meta)
        np.save(tmp / "basis.npy", U, allow_pickle=False)
        (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_files(path):
    """The bytes of every model file, each read once, all from one directory.

    The files are opened relative to one open descriptor of the folder (where
    the platform allows it), so a folder replaced while it is read (the
    atomic rename of :func:`save_model`) yields the files of one model, never
    one model's ``model.json`` with another's weights; the hashes then bind
    what was read, and only those bytes are used.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a model directory (expected params.pt, model.json, basis.npy)")
    files = {}
    use_fd = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if use_fd else None
    try:
        for name in MODEL_FILES:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dfd) if use_fd else os.open(path / name, os.O_RDONLY)
            except (FileNotFoundError, IsADirectoryError):
                continue
            with os.fdopen(fd, "rb") as f:
                files[name] = f.read()
    finally:
        if dfd is not None:
            os.close(dfd)
    missing = [f for f in MODEL_FILES if f not in files]
    if missing:
        raise ValueError(f"model: {path} is incomplete, missing {missing}")
    return files


def content_sha256(meta):
    """SHA-256 of what a ``model.json`` means: every key but ``content_sha256``, as canonical JSON.

    Canonical JSON (sorted keys, no whitespace, ASCII) of the parsed file, so
    the hash does not depend on the formatting. It covers ``params_sha256``
    and ``basis_sha256``, which are checked against the bytes, so it binds the
    weights, the basis and every field that changes what a prediction means
    (``estimate``, ``tied_R1``, ``fill_values``, ``module_kwargs``, units,
    normalisation, sequence...).
    """
    body = {k: v for k, v in meta.items() if k != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _parse_json(data, file):
    """``model.json``'s bytes as a dict (one ``ValueError`` naming the file)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"model: {file} is not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"model: {file} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"model: {file.parent} is not a {FORMAT} model (format={meta.get('format')!r:.60})")
    return meta


def _check_version(meta, file, trust_unhashed):
    """The format version: one this package wrote, hashed unless the caller trusts the folder."""
    version = require(meta, file, "format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"model: {file}: format version {version} is newer than this package supports "
                         f"({FORMAT_VERSION}); upgrade sklearn-crb")
    if version < 1:
        fail(file, "format_version", f"is {version}, which sklearn-crb never wrote (it wrote 1 to {FORMAT_VERSION}); "
                                     "refusing to load it")
    if version < HASHED_SINCE and not trust_unhashed:
        raise ValueError(f"model: {file.parent} has format version {version}, written before model.json was hashed "
                         "with the weights, so nothing shows that its meaning fields and weights belong together. "
                         "If you trust this folder, convert it once with `sklearn-crb migrate-model "
                         f"{file.parent} --out NEW_DIR` (Python: migrate_model), or load it with "
                         "load_model(..., trust_unhashed=True)")
    return version


def _check_params_hash(meta, files, file, version):
    """``params_sha256`` against the bytes read (required from format version 2)."""
    if version >= 2:
        require(meta, file, "params_sha256", str, "a SHA-256 hex string")
    if "params_sha256" in meta and hashlib.sha256(files["params.pt"]).hexdigest() != meta["params_sha256"]:
        raise ValueError(f"model: {file.parent / 'params.pt'} does not match 'params_sha256' in model.json (corrupt "
                         "or altered weights, or files of two models); refusing to load it")


def _check_content_hash(meta, file):
    """``content_sha256`` against the meaning of the file as read (``meta["_content"]``; from format version 5).

    Checked after every other check, so that a malformed key is named as such; the digest itself was taken
    before the checks normalised anything.
    """
    if meta["format_version"] < HASHED_SINCE:
        return
    require(meta, file, "content_sha256", str, "a SHA-256 hex string")
    if meta["_content"] != meta["content_sha256"]:
        raise ValueError(f"model: {file} does not match its 'content_sha256': a field of model.json was changed "
                         "after saving (estimate, tied_R1, fill_values, units...); refusing to load it")


def _check_estimate(meta, file):
    """``estimate``, ``measured``, ``n_outputs`` and ``n_features`` agree with each other."""
    est, tied, n_outputs = meta["estimate"], meta["tied_R1"], meta["n_outputs"]
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
    rank, n_features = meta["rank"], meta["n_features"]
    if n_features != 2 * rank + len(measured) or rank < 1:
        fail(file, "n_features", f"is {n_features} but 'rank' is {rank} and {len(measured)} parameters are "
                                 "measured (expected 2 * rank real features, then the measured columns)")


def _check_optional(meta, file):
    """``fill_values``, ``loss``, ``crb_at`` and ``nuisance``."""
    fill = meta["fill_values"]
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


_TYPED_KEYS = (("module_class", str, "a string"), ("module_kwargs", dict, "a JSON object"),
               ("n_features", int, "an integer"), ("n_outputs", int, "an integer"), ("rank", int, "an integer"),
               ("estimate", list, "a list of parameter names"), ("tied_R1", bool, "true or false"),
               ("fill_values", list, "a list of 8 numbers"), ("basis_sha256", str, "a SHA-256 hex string"),
               ("sequence_sha256", str, "a SHA-256 hex string"), ("sequence", dict, "a JSON object"))


def _read_meta(path, files=None, *, trust_unhashed=False):
    """Read and validate ``model.json``: one ``ValueError`` naming the file and the key.

    Phases: the bytes (read once, :func:`_read_files`), the JSON, the
    format version, the hash of the weights, the typed keys, then their
    agreement with each other. The digest of the meaning is taken here
    (``meta["_content"]``) and compared once everything else has been
    checked (:func:`_check_content_hash`).
    """
    path = Path(path)
    files = _read_files(path) if files is None else files
    file = path / "model.json"
    meta = _parse_json(files["model.json"], file)
    version = _check_version(meta, file, trust_unhashed)
    _check_params_hash(meta, files, file, version)
    meta["_content"] = content_sha256(meta)  # before any check normalises a value
    for key, types, what in _TYPED_KEYS:
        require(meta, file, key, types, what)
    _check_estimate(meta, file)
    _check_optional(meta, file)
    meta["_module"] = parse_module_kwargs(file, meta["module_class"], meta["module_kwargs"], version)
    try:
        meta["_sequence"] = Sequence.from_dict(meta["sequence"])
    except Exception as exc:  # noqa: BLE001 - an arbitrary JSON object: any failure is a bad file
        fail(file, "sequence", f"is not a valid sequence ({type(exc).__name__}: {exc})")
    if meta["_sequence"].sha256() != meta["sequence_sha256"]:
        fail(file, "sequence", "does not match 'sequence_sha256' (corrupt model)")
    return meta


def _load_basis(data, path, meta, seq):
    """The basis from its verified bytes."""
    file = path / "basis.npy"
    try:
        U = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt file
        raise ValueError(f"model: {file} is not a readable .npy file ({exc})") from exc
    if basis_sha256(U) != meta["basis_sha256"]:
        raise ValueError(f"model: {file} does not match the basis hash in model.json (corrupt model, or files of "
                         "two models)")
    if U.shape != (seq.n_pulses, meta["rank"]):
        fail(path / "model.json", "rank", f"is {meta['rank']} but basis.npy has shape {U.shape}")
    return U


def _load_state(data, params):
    """The state dict from the verified bytes of ``params.pt`` (tensors only: ``weights_only=True``)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"model: {params} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"model: {params} is not a state dict of tensors")
    return state


def _check_state(state, meta, name, kwargs, path):
    """The state dict has exactly the shapes of the described network, finite values and the recorded head."""
    file, params, n = path / "model.json", path / "params.pt", meta["n_outputs"]
    kwargs.setdefault("n_features", meta["n_features"])
    kwargs.setdefault("n_outputs", n)
    if kwargs.setdefault("n_conditioning", len(meta["measured"])) != len(meta["measured"]):
        fail(file, "module_kwargs.n_conditioning", f"is {kwargs['n_conditioning']} but "
                                                   f"'measured' names {meta['measured']}")
    try:
        expected = expected_state(NETWORKS[name], kwargs, n)
    except (ValueError, TypeError) as exc:
        fail(file, "module_kwargs", f"is rejected by {name} ({exc})")
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(BOUND_KEYS) <= set(got) or not set(got) & set(BOUND_KEYS):  # both bounds, or neither (older)
        expected.update({k: got[k] for k in BOUND_KEYS if k in got and got[k] == (n,)})
    if got.get(LOG_KEY) == (n,):  # absent in models saved before the log-space head
        expected[LOG_KEY] = got[LOG_KEY]
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise ValueError(f"model: {params} does not fit the network described by model.json "
                         f"('module_class' {name}, 'module_kwargs'): mismatch at {diff[:4]}")
    check_state_values(state, params)
    if "output_head" in meta and meta["output_head"] != _state_head(state, n):
        fail(file, "output_head", f"is {meta['output_head']!r:.120} but params.pt holds the head "
                                  f"{_state_head(state, n)}")


def _state_head(state, n):
    """Per-output head kinds of a checked state dict (older ones lack the bound and log buffers)."""
    low, high = (state.get(k, torch.full((n,), float(s) * torch.inf)) for k, s in zip(BOUND_KEYS, (-1, 1)))
    return head_kinds(low, high, state.get(LOG_KEY, torch.zeros(n, dtype=torch.bool)))


def _read_checked(path, trust_unhashed):
    """Every file of a model folder read once and checked: ``(meta, network name, kwargs, basis, files)``."""
    path = Path(path)
    files = _read_files(path)
    meta = _read_meta(path, files, trust_unhashed=trust_unhashed)
    name, kwargs = meta.pop("_module")
    seq = meta.pop("_sequence")
    U = _load_basis(files["basis.npy"], path, meta, seq)
    state = _load_state(files["params.pt"], path / "params.pt")
    _check_state(state, meta, name, kwargs, path)
    _check_content_hash(meta, path / "model.json")
    del meta["_content"]
    return meta, name, kwargs, U, files, state


def load_model(path, *, device="auto", sequence=None, basis=None, trust_unhashed=False):
    """Load a model saved by :func:`save_model`; the folder is untrusted input.

    Every file is read once; those bytes are checked and used. Only the
    registered networks (``NETWORKS``) are built, with the constructor
    arguments of ``model.json`` checked against their schema; ``params.pt``
    must match its recorded SHA-256, ``model.json`` its ``content_sha256``
    (which binds its meaning fields to the weights and the basis), and the
    weights load with ``torch.load(weights_only=True)`` and must fit the
    network exactly.

    Parameters
    ----------
    path : str or path-like
        The model directory.
    device : str
        Where the network runs (``"auto"``, ``"cpu"``, ``"cuda"``).
    sequence, basis : optional
        If given, checked against the model (:func:`check_compatible`).
    trust_unhashed : bool, default False
        Load a folder written before ``model.json`` was hashed (format
        version 4 and older, sklearn-crb 0.1): nothing then shows that its
        meaning fields belong to its weights. Only for folders you trust;
        :func:`migrate_model` (``sklearn-crb migrate-model``) converts such a
        folder once into a hashed one.

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
    meta, name, kwargs, U, files, state = _read_checked(path, trust_unhashed)
    del state  # checked; the net loads the same verified bytes
    net = CRBNetRegressor(module=NETWORKS[name], loss=meta.get("loss") or "crb", target_names=tuple(meta["estimate"]),
                          measured=tuple(meta["measured"]) or None, device=device,
                          **{f"module__{k}": v for k, v in kwargs.items()})
    net.n_features_in_ = int(meta["n_features"])
    net.n_outputs_ = int(meta["n_outputs"])
    net.initialize()
    net.load_params(f_params=io.BytesIO(files["params.pt"]))  # the verified bytes; the path is not reopened
    net.target_names_ = tuple(meta["estimate"])
    net.crb_metadata_ = dict(meta, basis=U)
    if sequence is not None or basis is not None:
        check_compatible(net, sequence=sequence, basis=basis)
    return net


def migrate_model(path, out, *, overwrite=False, argname="out"):
    """Convert a model folder of an older format into the current, hashed one (a new folder).

    For folders written before ``model.json`` was hashed (format version 4
    and older, sklearn-crb 0.1), by someone you trust: the folder is loaded
    with every check of :func:`load_model` (``trust_unhashed=True``), and
    ``out`` gets the same weights and basis, byte for byte, and a
    ``model.json`` in the current format (the network's constructor
    arguments written out in full, the output head recorded) with
    ``params_sha256`` and ``content_sha256``; ``migrated_from`` records the
    old format version and package version. ``path`` is not changed.

    Parameters
    ----------
    path : str or path-like
        The old model folder.
    out : str or path-like
        The new folder (written atomically). An existing ``out`` is replaced
        only with ``overwrite=True`` and only if it is itself a saved model.
    overwrite : bool
    argname : str
        The name of ``out`` in messages (``"--out"`` from the CLI).

    Returns
    -------
    Path
    """
    meta, name, kwargs, U, files, state = _read_checked(path, trust_unhashed=True)
    old = meta["format_version"]
    if old >= HASHED_SINCE:
        raise ValueError(f"model: {path} already has format version {old} (hashed); there is nothing to migrate")
    if Path(os.path.abspath(out)) == Path(os.path.abspath(path)):
        raise ValueError(f"{argname}: the migrated model goes to a new folder, not to the old one")
    out = check_output_folder(out, overwrite=overwrite, owned_names=MODEL_FILES, marker="model.json", argname=argname)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
              if k not in ("n_features", "n_outputs")}
    kwargs = {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v
              for k, v in kwargs.items()}
    new = dict(meta, format_version=FORMAT_VERSION, module_class=name, module_kwargs=kwargs,
               output_head=_state_head(state, meta["n_outputs"]),
               params_sha256=hashlib.sha256(files["params.pt"]).hexdigest(),
               migrated_from={"format_version": old, "sklearn_crb_version": meta.get("sklearn_crb_version")})
    new.pop("content_sha256", None)
    new["content_sha256"] = content_sha256(new)
    with atomic_dir(out) as tmp:
        (tmp / "params.pt").write_bytes(files["params.pt"])
        (tmp / "basis.npy").write_bytes(files["basis.npy"])
        (tmp / "model.json").write_text(json.dumps(new, indent=1))
    return Path(out)


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
