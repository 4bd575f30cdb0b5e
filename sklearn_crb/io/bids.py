"""BIDS derivative names and JSON sidecars of fitted maps (BIDS specification, qMRI appendix and derivatives).

A fit written with ``sklearn-crb fit --bids`` is a derivative dataset: the
``--out`` folder plays ``derivatives/sklearn-crb/``, holds a
``dataset_description.json`` (``DatasetType: "derivative"``, ``GeneratedBy``)
and per subject (and session) ``sub-<label>/[ses-<label>/]anat/`` with one
NIfTI and one JSON sidecar per map.

Names follow the qMRI appendix where BIDS defines the quantity: the free
pool's ``R1f``, ``R2f``, ``T1f`` and ``T2f`` are ``R1map``, ``R2map``,
``T1map`` and ``T2map`` (BIDS times in seconds, so ``T2f``, in ms in
:class:`~sklearn_crb.maps.Maps`, is written in s), ``|M0|`` is ``M0map``.
BIDS has no suffix for the semi-solid pool or the exchange rate, so these get
``desc-`` labels, as other qMRI pipelines do: a relaxation parameter of the
semi-solid pool keeps its quantity's suffix (``desc-R1s_R1map``,
``desc-T2s_T2map``), a quantity BIDS does not define (``m0s``, ``Rex``,
``omega0``, ``B1``, the phase, residual and flag maps) the generic suffix
``map`` (``desc-m0s_map``); the fit mask is ``desc-fit_mask``. A standard
error map is its parameter's name with ``desc-<name>SE`` (``desc-R1fSE_R1map``).

Every sidecar holds ``Units``, ``EstimationAlgorithm``,
``EstimationReference`` (Zhang et al., MRM 2022, doi:10.1002/mrm.29206),
``Sources`` (BIDS URIs ``bids:raw:<path>`` when an input lies in a BIDS
dataset, else paths relative to the derivative folder), the sequence and
basis SHA-256, the noise level sigma and how it was estimated, and the
package version.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from sklearn_crb._version import __version__

__all__ = ["BIDS_VERSION", "ESTIMATION_REFERENCE", "bids_map_names", "dataset_description", "estimation_algorithm",
           "map_sidecar", "subject_session", "source_uris", "to_bids_units", "check_label", "is_own_description"]

#: The BIDS specification version the names and sidecars follow.
BIDS_VERSION = "1.10.0"
#: The paper the estimators implement (Zhang et al., MRM 2022).
ESTIMATION_REFERENCE = "https://doi.org/10.1002/mrm.29206"
#: The derivative pipeline's name (``GeneratedBy``; the folder ``derivatives/sklearn-crb/``).
PIPELINE = "sklearn-crb"

#: ``{map: (desc label or None, suffix, description)}`` of every map :func:`~sklearn_crb.maps.fit_maps` writes.
_NAMES = {
    "R1f": (None, "R1map", "longitudinal relaxation rate of the free (water) pool"),
    "R2f": (None, "R2map", "transverse relaxation rate of the free (water) pool"),
    "T1f": (None, "T1map", "longitudinal relaxation time of the free pool, 1/R1f"),
    "T2f": (None, "T2map", "transverse relaxation time of the free pool, 1/R2f"),
    "R1s": ("R1s", "R1map", "longitudinal relaxation rate of the semi-solid pool"),
    "T1s": ("T1s", "T1map", "longitudinal relaxation time of the semi-solid pool, 1/R1s"),
    "T2s": ("T2s", "T2map", "transverse relaxation time of the semi-solid pool"),
    "m0s": ("m0s", "map", "fractional size of the semi-solid spin pool, M0s / (M0f + M0s)"),
    "Rex": ("Rex", "map", "exchange rate between the free and the semi-solid pool"),
    "omega0": ("omega0", "map", "off-resonance frequency"),
    "B1": ("B1", "map", "relative transmit field (1 = nominal flip angle)"),
    "M0_abs": (None, "M0map", "|M0|, the magnitude of the complex scale of the fitted signal (arbitrary units)"),
    "M0_phase": ("M0phase", "map", "phase of the complex M0"),
    "relative_residual": ("relresidual", "map", "||c - M0 U^H s(theta_hat)|| / ||c|| per voxel"),
    "trust_chi2": ("trustchi2", "map", "misfit chi-squared per degree of freedom at the estimate (1 where the data "
                   "agree; sklearn_crb.maps.trust)"),
    "trust_step": ("truststep", "map", "Gauss-Newton step from the estimate in standard errors "
                   "(sklearn_crb.maps.trust)"),
    "flags": ("flags", "map", "bit flags of voxels that could not be fitted (0 = fitted without problems)"),
    "mask": ("fit", "mask", "the voxels that were fitted"),
}
#: BIDS times are in seconds; the maps that are not are converted by this factor.
_TO_BIDS_FACTOR = {"T2f": 1e-3, "T2f_se": 1e-3}
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")


def check_label(label, argname):
    """A BIDS label (letters and digits only), or a one-line error naming ``argname``."""
    label = str(label)
    if not _LABEL.match(label):
        raise ValueError(f"{argname}: a BIDS label has only letters and digits, got {label!r}")
    return label


def subject_session(path, subject=None, session=None):
    """``(subject, session)``: the given labels, else those of a BIDS-named ``path`` (``sub-01_ses-a_...``).

    Raises ValueError naming ``--bids-subject`` when no subject is given and the file name has none.
    """
    name = Path(path).name
    found = dict(re.findall(r"(?:^|_)(sub|ses)-([a-zA-Z0-9]+)(?=_|\.)", name))
    subject = subject if subject is not None else found.get("sub")
    session = session if session is not None else found.get("ses")
    if subject is None:
        raise ValueError(f"--bids-subject: {name} is not BIDS-named (no sub-<label>); give --bids-subject LABEL")
    check_label(subject, "--bids-subject")
    if session is not None:
        check_label(session, "--bids-session")
    return subject, session


def _entities(name):
    if name.endswith("_se") and name[:-3] in _NAMES:
        base = name[:-3]
        return f"{base}SE", _NAMES[base][1]
    if name not in _NAMES:
        raise ValueError(f"no BIDS name for the map {name!r}")
    desc, suffix, _ = _NAMES[name]
    return desc, suffix


def bids_map_names(names, subject, session=None):
    """``{map: relative path of its NIfTI}`` under the derivative folder (``.json`` beside it is the sidecar)."""
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    folder = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
    out = {}
    for name in names:
        desc, suffix = _entities(name)
        out[name] = (folder / f"{stem}{f'_desc-{desc}' if desc else ''}_{suffix}.nii.gz").as_posix()
    if len(set(out.values())) != len(out):
        raise ValueError(f"two maps share a BIDS name: {sorted(out)}")
    return out


def to_bids_units(name, array, unit):
    """``(array, unit)`` in the units BIDS uses for the map's suffix (times in s)."""
    factor = _TO_BIDS_FACTOR.get(name)
    if factor is None:
        return array, unit
    return array * factor, "s"


def _bids_root(path):
    """The BIDS dataset folder (holding ``dataset_description.json``) that contains ``path``, or None."""
    p = Path(os.path.abspath(path)).parent
    for folder in (p, *p.parents):
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


def source_uris(paths, out):
    """``(sources, dataset_links)``: BIDS URIs of inputs inside a BIDS dataset, else paths relative to ``out``.

    An input inside one BIDS dataset becomes ``bids:raw:<path in the dataset>`` and ``dataset_links`` maps
    ``raw`` to that dataset's folder relative to ``out``; every other input its path relative to ``out``.
    """
    sources, links = [], {}
    out = Path(os.path.abspath(out))
    for path in paths:
        root = _bids_root(path)
        absolute = Path(os.path.abspath(path))
        if root is not None and root != out and out not in absolute.parents:
            key = "raw" if links.get("raw", root) == root else f"raw{len(links) + 1}"
            links[key] = os.path.relpath(root, out)
            sources.append(f"bids:{key}:{absolute.relative_to(root).as_posix()}")
        else:
            sources.append(os.path.relpath(absolute, out))
    return sources, links


def _code_url():
    # only a URL the installed package declares; none is invented
    try:
        urls = importlib.metadata.metadata("sklearn-crb").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for item in urls:
        label, _, url = item.partition(",")
        if label.strip().lower() in ("source", "repository", "homepage", "code"):
            return url.strip()
    return None


def dataset_description(dataset_links=None):
    """The derivative dataset's ``dataset_description.json`` content (``GeneratedBy``: name, version, code URL)."""
    generated = {"Name": PIPELINE, "Version": __version__,
                 "Description": "CRB-informed neural network or NLLS fits of the generalized-Bloch MT model"}
    url = _code_url()
    if url:
        generated["CodeURL"] = url
    desc = {"Name": "sklearn-crb quantitative MT maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [generated]}
    if dataset_links:
        desc["DatasetLinks"] = dict(dataset_links)
    return desc


def is_own_description(path):
    """Whether the ``dataset_description.json`` at ``path`` describes an sklearn-crb derivative."""
    import json

    try:
        d = json.loads(Path(path).read_text())
        return d.get("DatasetType") == "derivative" and d["GeneratedBy"][0]["Name"] == PIPELINE
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


def estimation_algorithm(meta=None, *, se="delta", nlls_init=None, fast=False):
    """The sidecars' ``EstimationAlgorithm``: a network with its recipe (its saved ``meta``), or NLLS with its start.

    Returns ``{"EstimationAlgorithm": str}`` and, for a network, ``"EstimationNetwork"``: its module, loss,
    where the CRB weight is evaluated, the training SNR range, the nuisance handling and the content SHA-256.
    """
    if meta is None:
        start = (f"started from the network {nlls_init}" if nlls_init else "dictionary start" if fast
                 else "default start")
        return {"EstimationAlgorithm": f"NLLS: bounded Levenberg-Marquardt with variable projection ({start}"
                                       f"{', fast schedule' if fast else ''}); standard errors sqrt(CRB)"}
    recipe = {k: meta.get(k) for k in ("module_class", "module_kwargs", "loss", "crb_at", "snr", "nuisance",
                                       "tied_R1", "content_sha256")}
    return {"EstimationAlgorithm": f"neural network ({meta.get('module_class')}, loss {meta.get('loss')}) "
                                   f"trained on simulated fingerprints (Zhang et al., MRM 2022); standard errors: "
                                   f"{se}",
            "EstimationNetwork": recipe}


def map_sidecar(name, unit, *, algorithm, sources, summary):
    """The JSON sidecar of one map.

    Parameters
    ----------
    name : str
        The map's name in :class:`~sklearn_crb.maps.Maps` (``"R1f"``, ``"R1f_se"``, ``"flags"``...).
    unit : str or None
        Its unit in BIDS (after :func:`to_bids_units`); None for flags and mask.
    algorithm : dict
        ``{"EstimationAlgorithm": str, ...}``: how the map was estimated (the network with its recipe, or NLLS).
    sources : list of str
        The input files (:func:`source_uris`).
    summary : dict
        :meth:`sklearn_crb.maps.Maps.summary` and ``sigma_description``.
    """
    base = name[:-3] if name.endswith("_se") else name
    what = _NAMES[base][2]
    prov = summary.get("provenance", {})
    side = {"Description": f"standard error of the {what}" if base != name else what,
            "Units": unit if unit else "n/a",
            **algorithm,
            "EstimationReference": ESTIMATION_REFERENCE,
            "Sources": list(sources),
            "SequenceName": prov.get("sequence"),
            "SequenceSHA256": prov.get("sequence_sha256"),
            "BasisSHA256": prov.get("basis_sha256"),
            "BasisRank": prov.get("rank"),
            "NoiseSigma": summary["sigma"],
            "NoiseSigmaMethod": summary["sigma_method"],
            "NoiseSigmaDescription": summary.get("sigma_description"),
            "StandardError": prov.get("standard_error"),
            "FixedParameters": prov.get("fixed", []),
            "SoftwareName": PIPELINE,
            "SoftwareVersion": __version__}
    if name == "flags":
        side["FlagBits"] = dict(summary.get("flag_bits", {}))
    return side
