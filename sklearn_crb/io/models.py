"""A saved, self-describing network: everything needed to apply it safely.

A model is a directory::

    model/
      params.pt     skorch ``save_params(f_params=...)``: the module state dict
                    (network weights and the target scaling buffers); loads
                    with ``torch.load(..., weights_only=True)`` and with
                    ``CRBNetRegressor.load_params(f_params=...)``
      model.json    format version, module class and hyper-parameters, the
                    input normalisation, parameter names and units, which are
                    estimated, the tied-R1 model, the values assumed for the
                    parameters that are not estimated, the sequence (full
                    description and SHA-256) and the basis SHA-256
      basis.npy     the compression basis (complex128, ``allow_pickle=False``)

No pickle is involved: JSON, ``.npy`` and a tensor-only state dict. Applying
the model to data from a different basis or sequence is refused
(:func:`check_compatible`), because a network trained on coefficients of one
basis returns plausible-looking nonsense on another.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import torch

from sklearn_crb._validation import check_basis
from sklearn_crb._version import __version__
from sklearn_crb._atomic import atomic_dir
from sklearn_crb.physics.parameters import PARAMETERS, UNITS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["save_model", "load_model", "check_compatible", "basis_sha256", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sklearn-crb-network"
FORMAT_VERSION = 1
_JSON_TYPES = (str, int, float, bool, type(None))


def basis_sha256(basis):
    """SHA-256 of a basis as little-endian complex128 (shape included)."""
    U = np.ascontiguousarray(np.asarray(basis), dtype="<c16")
    h = hashlib.sha256(str(U.shape).encode())
    h.update(U.tobytes())
    return h.hexdigest()


def _jsonable(v):
    if isinstance(v, _JSON_TYPES):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    return False


def _module_path(module):
    cls = module if isinstance(module, type) else type(module)
    path = f"{cls.__module__}:{cls.__qualname__}"
    if not cls.__module__.startswith("sklearn_crb."):
        raise ValueError(f"only modules defined in sklearn_crb can be saved in the portable format, got {path}; "
                         "use skorch save_params with your own loading code")
    return path


def _import_module_class(path):
    mod, _, name = path.partition(":")
    if not mod.startswith("sklearn_crb."):
        raise ValueError(f"model.json names module class {path!r} outside sklearn_crb; refusing to import it")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def save_model(net, path, *, sequence=None, basis=None, simulator=None, fill_values=None, tied_R1=None,
               nuisance=None, estimate=None):
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

    Returns
    -------
    Path
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(net, "module_")
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
    module_kwargs = {k[len("module__"):]: v for k, v in net.get_params(deep=False).items()
                     if k.startswith("module__")}
    bad = [k for k, v in module_kwargs.items() if not _jsonable(v)]
    if bad:
        raise ValueError(f"module parameters {bad} are not JSON-serialisable; cannot save portably")
    inner = net.module_.module
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sklearn_crb_version": __version__,
        "module_class": _module_path(net.module if isinstance(net.module, type) else type(inner)),
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
        np.save(tmp / "basis.npy", U, allow_pickle=False)
        (tmp / "model.json").write_text(json.dumps(meta, indent=1))
    return Path(path)


def _read_meta(path):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a model directory (expected params.pt, model.json, basis.npy)")
    missing = [f for f in ("params.pt", "model.json", "basis.npy") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"model: {path} is incomplete, missing {missing}")
    try:
        meta = json.loads((path / "model.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model: {path / 'model.json'} is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"model: {path} is not a {FORMAT} model (format={meta.get('format')!r})")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"model: format version {meta['format_version']} is newer than this package supports "
                         f"({FORMAT_VERSION}); upgrade sklearn-crb")
    return meta


def load_model(path, *, device="auto", sequence=None, basis=None):
    """Load a model saved by :func:`save_model`.

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
    """
    from sklearn_crb.estimators.regressor import CRBNetRegressor

    path = Path(path)
    meta = _read_meta(path)
    try:
        U = np.load(path / "basis.npy", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt file
        raise ValueError(f"model: {path / 'basis.npy'} is not a readable .npy file ({exc})") from exc
    if basis_sha256(U) != meta["basis_sha256"]:
        raise ValueError(f"model: {path / 'basis.npy'} does not match the basis hash in model.json (corrupt model)")
    seq = Sequence.from_dict(meta["sequence"])
    if seq.sha256() != meta["sequence_sha256"]:
        raise ValueError("model: the sequence in model.json does not match its hash (corrupt model)")
    try:
        state = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"model: {path / 'params.pt'} cannot be loaded safely ({type(exc).__name__}: {exc})") from exc
    del state  # the load above is the safety check; skorch loads it again into the module
    cls = _import_module_class(meta["module_class"])
    kwargs = {f"module__{k}": tuple(v) if isinstance(v, list) else v for k, v in meta["module_kwargs"].items()}
    kwargs.setdefault("module__n_features", meta["n_features"])
    kwargs.setdefault("module__n_outputs", meta["n_outputs"])
    net = CRBNetRegressor(module=cls, loss=meta.get("loss") or "crb", target_names=tuple(meta["estimate"]),
                          device=device, **kwargs)
    net.n_features_in_ = int(meta["n_features"])
    net.n_outputs_ = int(meta["n_outputs"])
    net.initialize()
    net.load_params(f_params=str(path / "params.pt"))
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
