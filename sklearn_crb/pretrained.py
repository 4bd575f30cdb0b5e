"""The pretrained networks shipped with the package, found by the hashes of the sequence and the basis.

``sklearn_crb/data/pretrained/<name>/`` holds one model folder per network
(:func:`sklearn_crb.io.models.save_model`'s format 5: ``params.pt``,
``model.json`` with its content hash, ``basis.npy``) and ``provenance.json``
(recipe, seed, commit, command, date, and the efficiency measured on
held-out draws). ``scripts/build_pretrained.py`` rebuilds them. Today: the
demo's CRB-loss network (``demo-crb``) and its MSE-loss twin (``demo-mse``)
for the built-in sequence (``Sequence.default()``), the tied model, the
"brain" prior and a rank-13 CRB-optimised basis (Zhang et al., "Cramér-Rao
bound-informed training of neural networks for quantitative MRI", MRM 2022).

A network is returned only for the exact sequence and basis it was trained
for (SHA-256 of each): coefficients of another basis or fingerprints of
another sequence make a network return plausible-looking nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sklearn_crb.io.models import basis_sha256, load_model
from sklearn_crb.physics.sequence import Sequence

__all__ = ["PRETRAINED", "LOSSES", "list_pretrained", "load_pretrained", "pretrained_basis", "pretrained_provenance"]

#: The folder of the shipped model folders.
PRETRAINED = Path(__file__).resolve().parent / "data" / "pretrained"
#: Training losses of the shipped networks.
LOSSES = ("crb", "mse")


def list_pretrained(root=None):
    """The shipped networks: a list of dicts (``name``, ``path``, ``loss``, ``sequence``, ``sequence_sha256``,
    ``basis_sha256``), read from each folder's ``model.json`` for matching only (:func:`load_pretrained`
    loads a match through every check of :func:`~sklearn_crb.io.models.load_model`)."""
    root = PRETRAINED if root is None else Path(root)
    out = []
    for meta_path in sorted(root.glob("*/model.json")):
        try:
            meta = json.loads(meta_path.read_text())
            out.append({"name": meta_path.parent.name, "path": meta_path.parent, "loss": meta.get("loss"),
                        "sequence": (meta.get("sequence") or {}).get("name"),
                        "sequence_sha256": meta["sequence_sha256"], "basis_sha256": meta["basis_sha256"]})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"pretrained model {meta_path.parent.name}: unreadable model.json ({exc})") from exc
    return out


def _check_args(sequence, loss):
    if not isinstance(sequence, Sequence):
        raise TypeError(f"sequence must be a Sequence, got {type(sequence).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _for_sequence(sequence, loss, root):
    """The shipped entries of ``loss`` trained for ``sequence``; a clear error when there is none."""
    shipped = [e for e in list_pretrained(root) if e["loss"] == loss]
    sha = sequence.sha256()
    match = [e for e in shipped if e["sequence_sha256"] == sha]
    if not match:
        have = "; ".join(f"{e['name']} for {e['sequence']!r} (sha256 {e['sequence_sha256'][:12]})" for e in shipped)
        raise ValueError(f"sequence: no pretrained {loss.upper()} network for sequence {sequence.name!r} "
                         f"({sequence.n_pulses} pulses, sha256 {sha[:12]}); shipped: {have or 'none'}")
    return match


def load_pretrained(sequence, basis, *, loss="crb", device="cpu", root=None):
    """Load the shipped network trained for ``sequence`` and ``basis``.

    Parameters
    ----------
    sequence : Sequence
        Matched by :meth:`Sequence.sha256` (every pulse, timing and setting).
    basis : array_like (n_pulses, rank)
        The compression basis of the data, matched by its SHA-256 (complex128
        bytes, as :func:`~sklearn_crb.io.models.basis_sha256`); use
        :func:`pretrained_basis` to get the shipped one.
    loss : {"crb", "mse"}
        The CRB-loss network or its MSE-loss twin.
    device : str
        Where the network runs.
    root : path-like, optional
        Another folder of model folders (default: the package's, :data:`PRETRAINED`).

    Returns
    -------
    CRBNetRegressor
        Loaded by :func:`~sklearn_crb.io.models.load_model`: no pickle, the
        weights' and ``model.json``'s hashes verified, the sequence and basis
        checked once more.

    Raises
    ------
    ValueError
        No shipped network matches, naming what did not match (the sequence,
        or the basis for a known sequence).
    """
    _check_args(sequence, loss)
    match = _for_sequence(sequence, loss, root)
    U = np.asarray(basis)
    if U.ndim != 2 or U.shape[0] != sequence.n_pulses:
        raise ValueError(f"basis must have shape ({sequence.n_pulses}, rank) for sequence {sequence.name!r}, "
                         f"got {U.shape}")
    sha = basis_sha256(U)
    for e in match:
        if e["basis_sha256"] == sha:
            return load_model(e["path"], device=device, sequence=sequence, basis=U)
    have = ", ".join(f"{e['name']} (sha256 {e['basis_sha256'][:12]})" for e in match)
    raise ValueError(f"basis: no pretrained {loss.upper()} network for this basis (shape {U.shape}, sha256 {sha[:12]}) "
                     f"of sequence {sequence.name!r}; shipped for this sequence: {have}; pass "
                     "pretrained_basis(sequence) or train a network (sklearn-crb train)")


def pretrained_basis(sequence, *, loss="crb", root=None):
    """The compression basis (complex128, ``(n_pulses, rank)``) of the shipped network for ``sequence``,
    from its verified model folder; raises ``ValueError`` when none is shipped for ``sequence``."""
    _check_args(sequence, loss)
    e = _for_sequence(sequence, loss, root)[0]
    return load_model(e["path"], device="cpu", sequence=sequence).crb_metadata_["basis"]


def pretrained_provenance(name, root=None):
    """The ``provenance.json`` of shipped network ``name`` (e.g. ``"demo-crb"``) as a dict."""
    root = PRETRAINED if root is None else Path(root)
    names = sorted(p.parent.name for p in root.glob("*/provenance.json"))
    if name not in names:
        raise ValueError(f"name: no pretrained network {name!r}; shipped: {', '.join(names) or 'none'}")
    return json.loads((root / name / "provenance.json").read_text())
