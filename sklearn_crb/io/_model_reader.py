"""Reading a saved model folder: every file's bytes once, their hashes, and the checks of their content.

A model folder (:mod:`sklearn_crb.io.models`) is untrusted input, and a
folder can be replaced while it is read. :func:`read_checked` reads each file
once, relative to one open descriptor of the folder, checks those bytes (the
format version, ``params_sha256``, the basis hash, every key of
``model.json`` through :mod:`sklearn_crb.io._model_schema`, the weights'
shapes and values) and compares ``content_sha256``, the hash of the meaning
of ``model.json``, last. The loader builds the network from the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from sklearn_crb._validation import basis_sha256
from sklearn_crb.estimators.net.measured import resolve_measured
from sklearn_crb.io._model_schema import (
    BOUND_KEYS,
    LOG_KEY,
    NETWORKS,
    check_state_values,
    expected_state,
    fail,
    head_kinds,
    is_int,
    parse_module_kwargs,
    require,
)
from sklearn_crb.physics.parameters import PARAMETERS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["FORMAT", "FORMAT_VERSION", "HASHED_SINCE", "MODEL_FILES", "basis_sha256", "content_sha256",
           "read_checked", "state_head"]

FORMAT = "sklearn-crb-network"
#: 2: ``module_class`` is a registry name and ``params_sha256`` is recorded.
#: 3: ``module_kwargs`` records every constructor argument, so a later change of
#: a network's defaults cannot change what a saved model loads as. ``output_head`` (the per-output head kind,
#: checked against the ``log_head``/``low``/``high`` buffers of ``params.pt``) is optional: older files lack it.
#: 5: ``content_sha256`` hashes the meaning of ``model.json`` (every key, with ``params_sha256`` and
#: ``basis_sha256``), required. Older folders load only with ``trust_unhashed=True`` or after
#: :func:`~sklearn_crb.io.models.migrate_model`; a version never written (< 1) is refused.
FORMAT_VERSION = 5
#: The first format version whose ``model.json`` carries ``content_sha256``.
HASHED_SINCE = 5
#: The files of a model folder; a folder holding anything else is never replaced.
MODEL_FILES = ("params.pt", "model.json", "basis.npy")

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
    kwargs = meta.get("module_kwargs")
    noise = int(isinstance(kwargs, dict) and kwargs.get("noise_input") is True)  # its type is checked with the rest
    if n_features != 2 * rank + noise + len(measured) or rank < 1:
        fail(file, "n_features", f"is {n_features} but 'rank' is {rank}, {len(measured)} parameters are measured and "
                                 f"the noise column is {'' if noise else 'not '}an input (expected 2 * rank real "
                                 "features, then the noise column of a noise-aware network, then the measured "
                                 "columns)")


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
    if "output_head" in meta and meta["output_head"] != state_head(state, n):
        fail(file, "output_head", f"is {meta['output_head']!r:.120} but params.pt holds the head "
                                  f"{state_head(state, n)}")


def state_head(state, n):
    """Per-output head kinds of a checked state dict (older ones lack the bound and log buffers)."""
    low, high = (state.get(k, torch.full((n,), float(s) * torch.inf)) for k, s in zip(BOUND_KEYS, (-1, 1)))
    return head_kinds(low, high, state.get(LOG_KEY, torch.zeros(n, dtype=torch.bool)))


def read_checked(path, trust_unhashed):
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
