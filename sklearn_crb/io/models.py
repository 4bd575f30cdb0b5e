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
from sklearn.utils.validation import check_is_fitted

from sklearn_crb._atomic import atomic_dir
from sklearn_crb._validation import check_basis
from sklearn_crb._version import __version__
from sklearn_crb.estimators.net.regressor import CRBNetRegressor
from sklearn_crb.io._files import check_output_folder
from sklearn_crb.io._model_reader import (
    FORMAT,
    FORMAT_VERSION,
    HASHED_SINCE,
    MODEL_FILES,
    basis_sha256,
    content_sha256,
    read_checked,
    state_head,
)
from sklearn_crb.io._model_schema import (
    NETWORKS,
    constructor_kwargs,
    head_kinds,
    jsonable,
    registry_name,
)
from sklearn_crb.physics.parameters import PARAMETERS, UNITS, resolve_estimate
from sklearn_crb.physics.sequence import Sequence

__all__ = ["save_model", "load_model", "migrate_model", "check_compatible", "basis_sha256", "file_sha256",
           "content_sha256", "NETWORKS", "FORMAT", "FORMAT_VERSION", "HASHED_SINCE", "MODEL_FILES"]


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
    noise = int(bool(getattr(net, "noise_input_", False)))
    if net.n_features_in_ != 2 * U.shape[1] + noise + len(measured):
        raise ValueError(f"the network takes {net.n_features_in_} features but the basis has rank {U.shape[1]} "
                         f"({2 * U.shape[1]} real features{', the noise column' if noise else ''}"
                         f"{f' and {len(measured)} measured' if measured else ''})")
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
    meta, name, kwargs, U, files, state = read_checked(path, trust_unhashed)
    del state  # checked; the net loads the same verified bytes
    net = CRBNetRegressor(module=NETWORKS[name], loss=meta.get("loss") or "crb", target_names=tuple(meta["estimate"]),
                          measured=tuple(meta["measured"]) or None, noise_input=bool(kwargs.get("noise_input", False)),
                          device=device,
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
    meta, name, kwargs, U, files, state = read_checked(path, trust_unhashed=True)
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
               output_head=state_head(state, meta["n_outputs"]),
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
