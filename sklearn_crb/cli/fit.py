"""``sklearn-crb fit``: maps from a coefficient image with a saved network or NLLS.

The image is one slice or a volume: (x, y, channels) or (x, y, z, channels),
NIfTI (complex, or ``2 r`` real channels ``[Re c_1..c_r, Im c_1..c_r]``),
MATLAB or NumPy; every output map has the image's spatial shape, affine and
header. Measured field maps (``--b1-map``, ``--b0-map``, ``--fixed
NAME=FILE``) are per-voxel values of parameters that are then not estimated;
they are checked against the image (spatial shape; affine to 1e-4 mm when
both are NIfTI; finite and inside the physical bounds in every fitted voxel)
before any work starts.

Besides the maps, ``fit`` writes ``report.html``, a self-contained QC report
(:mod:`sklearn_crb.report`); with ``--check N`` it also refits N random
voxels with NLLS from the network's estimate and compares the two.

With ``--bids`` the ``--out`` folder is a BIDS derivative dataset (it plays
``derivatives/sklearn-crb/``): ``dataset_description.json`` (written when
absent, kept when an earlier sklearn-crb fit wrote it, refused when another
tool did) and ``sub-<label>/[ses-<label>/]anat/`` with qMRI-BIDS names and a
JSON sidecar per map (:mod:`sklearn_crb.io.bids`). The subject and session
come from ``--bids-subject``/``--bids-session``, else from a BIDS-named
``--coefficients`` file (``sub-01_ses-1_...``). The overview PNG, the
summary and the report are ``sub-<label>[_ses-<label>]_{overview.png,
summary.json,report.html}`` beside the maps, so that one subject's fit is
one folder committed at once (``dataset_description.json`` follows in its
own commit, only for the dataset's first fit).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from sklearn_crb._version import __version__
from sklearn_crb.cli._common import (
    EPILOG,
    SCHEDULER_TIMEOUT,
    CLIError,
    _add_sequence_args,
    _common,
    _dask_context,
    _no_sequence_options,
    _positive_float,
    _positive_int,
    _prefix,
    _sequence,
)
from sklearn_crb.estimators.nlls import NLLSFitter
from sklearn_crb.io._files import atomic_files, check_output_file, claim_output, releases_claims
from sklearn_crb.io.bids import (
    bids_map_names,
    dataset_description,
    estimation_algorithm,
    is_own_description,
    map_sidecar,
    source_uris,
    subject_session,
    to_bids_units,
)
from sklearn_crb.io.images import load_array, load_basis, load_coefficients, load_mask, make_mask, save_nifti
from sklearn_crb.io.models import check_compatible, load_model
from sklearn_crb.maps import FLAGS, fit_maps, map_names, resolve_trust
from sklearn_crb.maps.result import SIGMA_METHODS
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, UNITS, rate_name, resolve_estimate
from sklearn_crb.physics.sequence import Sequence
from sklearn_crb.report import nlls_check, render_report
from sklearn_crb.viz import overview_png

__all__ = ["cmd_fit", "add_parser"]


#: The files beside the BIDS maps that BIDS does not define, for validators to skip.
BIDS_IGNORE = "*_overview.png\n*_summary.json\n*_report.html\n"


def _fit_names(prefix, estimate, times=False, bids=None, trust=None):
    """``(map files, png, summary, report)`` in the fit's folder; ``bids=(subject, session)``: BIDS names."""
    maps = map_names(estimate, times=times, trust=trust)
    if bids is None:
        return ({k: f"{prefix}{k}.nii.gz" for k in maps}, f"{prefix}overview.png", f"{prefix}summary.json",
                f"{prefix}report.html")
    stem = f"sub-{bids[0]}" + (f"_ses-{bids[1]}" if bids[1] else "")
    files = {k: Path(v).name for k, v in bids_map_names(maps, *bids).items()}
    return files, f"{stem}_overview.png", f"{stem}_summary.json", f"{stem}_report.html"


def _bids_labels(args):
    """``(subject, session)`` of --bids (None without it); every check before any work."""
    if not args.bids:
        if args.bids_subject or args.bids_session:
            raise CLIError("--bids-subject and --bids-session name a BIDS output: give --bids")
        return None
    if args.prefix:
        raise CLIError("--prefix cannot be combined with --bids (the BIDS entities name the files)")
    try:
        return subject_session(args.coefficients, args.bids_subject, args.bids_session)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _output_names(args, out, estimate):
    """``(bids labels, claim, (map files, png, summary, report), owned, [dataset_description.json] or [])``.

    The fit's files go to one folder, ``--out`` or with --bids ``--out/sub-<label>/[ses-<label>/]anat``,
    claimed here (``claim.path``) and committed together. Each is checked: an existing one is replaced only
    with --overwrite and when the previous fit's summary lists it (``owned``).
    """
    bids = _bids_labels(args)
    folder = out if bids is None else out / Path(bids_map_names(["mask"], *bids)["mask"]).parent
    names = _fit_names(args.prefix, estimate, times=args.times, bids=bids, trust=_trust(args))
    map_files, png, summary_name, report_name = names
    sidecars = [m[:-len(".nii.gz")] + ".json" for m in map_files.values()] if bids else []
    owned = _fit_owned(folder / summary_name) or set()
    for name in [*map_files.values(), *sidecars, png, summary_name, report_name]:
        check_output_file(folder / name, overwrite=args.overwrite, owned=lambda p: p.name in owned, argname="--out")
    description = _bids_description(out) if bids else []
    return bids, claim_output(folder, argname="--out"), names, owned, description


def _trust(args):
    """The trust test of ``--trust`` (``fit_maps(trust=)``; ``auto``: the residual's for --nlls, the tangent test for
    a network: the CLI writes every network estimate with its trust map, at one Jacobian per voxel)."""
    if args.trust == "auto" and args.model:
        return "tangent"
    return resolve_trust(None if args.trust == "none" else args.trust, least_squares=not args.model)


def _write_description(out, names, desc):
    """The dataset's ``dataset_description.json`` and ``.bidsignore`` (those of ``names``, the ones absent),
    shared by its subjects: written in their own commit once the first subject's maps are in."""
    if names:
        with atomic_files(out, names, argname="--out") as tmp:
            for name in names:
                tmp[name].write_text(json.dumps(desc, indent=1) if name.endswith(".json") else BIDS_IGNORE)


def _bids_description(out):
    """Which of ``dataset_description.json`` and ``.bidsignore`` to write: those absent. An existing
    description must be an earlier sklearn-crb fit's (kept); another tool's is refused."""
    path = out / "dataset_description.json"
    if (path.exists() or path.is_symlink()) and not is_own_description(path):
        raise CLIError(f"--out {out}: its dataset_description.json was not written by sklearn-crb; give a "
                       "derivatives/sklearn-crb folder of its own")
    return [n for n in ("dataset_description.json", ".bidsignore") if not os.path.lexists(out / n)]


def _check_options(args, model):
    if not args.check:
        return
    if model is None:
        raise CLIError("--check compares a network with NLLS on a few voxels: give --model")
    if getattr(model, "measured_", ()):
        raise CLIError(f"--check: the network --model {args.model} takes measured {list(model.measured_)} as "
                       "inputs and cannot start NLLS")


def _bids_files(args, out, maps, map_files, algorithm):
    """``{relative path: JSON-ready dict}`` of the BIDS sidecars and, when new, ``dataset_description.json``."""
    inputs = [args.coefficients, *([args.mask] if args.mask else []),
              *(path for _, _, path, _ in _fixed_specs(args))]
    sources, links = source_uris(inputs, out)
    summary = {**maps.summary(), "sigma_description": SIGMA_METHODS.get(maps.sigma_method),
               "flag_bits": dict(FLAGS)}
    files = {}
    for k, name in map_files.items():
        if k in maps.arrays:
            unit = to_bids_units(k, 0.0, maps.units.get(k))[1]
            files[name[:-len(".nii.gz")] + ".json"] = map_sidecar(k, unit, algorithm=algorithm, sources=sources,
                                                                  summary=summary)
    return files, dataset_description(links)


def _save_maps(tmp, arrays, map_files, img, bids):
    """The NIfTI maps into the staged paths ``tmp`` (in BIDS units with --bids)."""
    for k, arr in arrays.items():
        dtype = np.uint8 if arr.dtype == bool else (np.int16 if np.issubdtype(arr.dtype, np.integer)
                                                    else np.float32)
        data = to_bids_units(k, arr, None)[0] if bids else arr
        save_nifti(tmp[map_files[k]], data, img.affine, img.header, dtype=dtype)


def _fit_owned(summary):
    """Which files of a folder a previous ``sklearn-crb fit`` wrote (from its summary.json)."""
    try:
        s = json.loads(Path(summary).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or s.get("written_by") != "sklearn-crb fit" or not isinstance(s.get("files"), list):
        return None
    return {f for f in s["files"] if isinstance(f, str)} | {Path(summary).name}


def _fit_basis(args, seq):
    """``--basis FILE`` (first ``--rank`` columns when given)."""
    U = load_basis(args.basis, n_pulses=seq.n_pulses)
    if args.rank is not None:
        if args.rank > U.shape[1]:
            raise CLIError(f"--rank {args.rank} exceeds the {U.shape[1]} columns of --basis {args.basis}")
        U = U[:, :args.rank]
    return U


#: Tolerance (mm) of the affine check between a field map and the coefficient image.
AFFINE_TOL = 1e-4
#: Variable names tried in a .mat/.npz field map holding several arrays.
_MAP_KEYS = {"B1": ("B1", "b1", "B1map", "b1map", "b1_map"),
             "omega0": ("B0", "b0", "B0map", "b0map", "b0_map", "omega0", "fieldmap")}


def _fixed_specs(args):
    """``[(parameter, option, path, factor)]`` from --b1-map, --b0-map (with --b0-unit) and --fixed NAME=FILE."""
    specs = []
    if args.b1_map:
        specs.append(("B1", "--b1-map", args.b1_map, 1.0))
    if args.b0_map:
        specs.append(("omega0", "--b0-map", args.b0_map, 2 * np.pi if args.b0_unit == "Hz" else 1.0))
    for item in args.fixed or ():
        name, sep, path = item.partition("=")
        if not sep or not path or name not in INDEX:
            raise CLIError(f"--fixed {item!r}: expected NAME=FILE with NAME one of {PARAMETERS}")
        specs.append((name, f"--fixed {name}", path, 1.0))
    seen = {}
    for name, opt, _, _ in specs:
        if name in seen:
            raise CLIError(f"{opt}: {name} is already fixed by {seen[name]}; give each parameter once")
        seen[name] = opt
    return specs


def _fixed_errors(args, fixed):
    """``{name: sd}`` in SI units from --fixed-se NAME=VALUE, each of a parameter given as a map.

    VALUE is in the unit of its map: for --b0-map with ``--b0-unit Hz`` in Hz, converted to rad/s here.
    """
    factor = {name: f for name, _, _, f in _fixed_specs(args)}
    out = {}
    for item in args.fixed_se or ():
        name, sep, val = item.partition("=")
        try:
            sd = float(val) if sep else float("nan")
        except ValueError:
            sd = float("nan")
        if name not in INDEX or not np.isfinite(sd) or sd < 0:
            raise CLIError(f"--fixed-se {item!r}: expected NAME=VALUE, NAME one of {PARAMETERS} and VALUE a "
                           f"standard deviation >= 0 in the unit of its map")
        if name not in fixed:
            raise CLIError(f"--fixed-se {name}: {name} has no map (--b1-map, --b0-map or --fixed {name}=FILE)")
        if name in out:
            raise CLIError(f"--fixed-se {name}: given twice")
        out[name] = sd * factor.get(name, 1.0)
    return out


def _map_on_grid(path, opt, name, img, keys):
    """A real map (float64) of the coefficient image's spatial shape and affine, read from ``path``."""
    spatial = img.spatial_shape
    arr, affine, header = load_array(path, None, opt, preferred=keys)
    if np.iscomplexobj(arr):
        raise CLIError(f"{opt}: {path} is complex; a {name} map must be real")
    if arr.ndim == len(spatial) + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim + 1 == len(spatial) and spatial[-1] == 1:
        arr = arr[..., None]  # a 2-D map of a one-slice (x, y, 1) image
    if arr.shape != spatial:
        raise CLIError(f"{opt}: the {name} map has shape {arr.shape} but the coefficient image has spatial "
                       f"shape {spatial}")
    if header is not None and img.header is not None and not np.allclose(affine, img.affine, rtol=0,
                                                                           atol=AFFINE_TOL):
        raise CLIError(f"{opt}: the affine of {path} {np.round(affine, 4).tolist()} differs from the coefficient "
                       f"image's {np.round(img.affine, 4).tolist()} (tolerance {AFFINE_TOL} mm): resample the "
                       "map onto the image grid first")
    return arr.astype(np.float64)


def _noise_level(args, img, fit_mask):
    """``--sigma`` (a float), or the ``--noise-map`` (positive and finite in every voxel to fit), or None."""
    if args.noise_map is None:
        return args.sigma
    if args.sigma is not None:
        raise CLIError("--noise-map: give either --sigma or --noise-map, not both")
    smap = _map_on_grid(args.noise_map, "--noise-map", "noise", img, ("sigma", "noise", "noise_map"))
    inside = smap[fit_mask]
    n_bad = int((~(np.isfinite(inside) & (inside > 0))).sum())
    if n_bad:
        raise CLIError(f"--noise-map: the noise map is not positive and finite in {n_bad} of the {inside.size} voxels "
                       "to fit; fill them or exclude them with --mask")
    return np.where(fit_mask, smap, 1.0)


def _load_fixed(specs, img, fit_mask, estimate, tied_R1):
    """Per-voxel fixed maps ``{name: array(spatial)}`` (SI units), every check before any work."""
    fixed, files = {}, {}
    estimated = {rate_name(p) for p in estimate}  # a time target (T1f) estimates its rate (R1f)
    for name, opt, path, factor in specs:
        if name in estimated:
            raise CLIError(f"{opt}: {name} is estimated ({', '.join(estimate)}); a fixed parameter cannot also be "
                           f"estimated: drop it from --estimate (NLLS) or use a model that does not estimate it")
        if tied_R1 and name == "R1s":
            raise CLIError(f"{opt}: R1s cannot be fixed with the tied model (R1s = R1f)")
        values = _map_on_grid(path, opt, name, img, _MAP_KEYS.get(name, (name,))) * factor
        inside = values[fit_mask]
        n_bad = int((~np.isfinite(inside)).sum())
        if n_bad:
            raise CLIError(f"{opt}: the {name} map is not finite in {n_bad} of the {inside.size} voxels to fit; "
                           "fill them or exclude them with --mask")
        lo, hi = BOUNDS[name]
        if inside.size and (inside.min() < lo or inside.max() > hi):
            hint = " (B1 is relative, 1 = nominal, not in percent)" if name == "B1" else ""
            raise CLIError(f"{opt}: {name} values in the voxels to fit span [{inside.min():.4g}, {inside.max():.4g}] "
                           f"{UNITS[name]}, outside the physical bounds [{lo:.4g}, {hi:.4g}]{hint}")
        fixed[name] = np.where(fit_mask, values, 0.0)
        files[name] = {"file": str(path), "option": opt, "unit": UNITS[name],
                       **({"input_unit": "Hz" if factor != 1.0 else "rad/s"} if name == "omega0" else {})}
    return fixed, files


def _nlls_schedule(args, seq, basis, rank):
    """NLLSFitter options of --nlls-init and --fast (checked before any fit)."""
    kw = {}
    if args.nlls_init:
        init = load_model(args.nlls_init, device="cpu")
        try:
            check_compatible(init, sequence=seq, basis=basis, rank=rank)
        except ValueError as e:
            raise CLIError(f"--nlls-init {args.nlls_init}: {e}") from None
        if getattr(init, "measured_", ()):
            raise CLIError(f"--nlls-init {args.nlls_init}: the network takes measured {list(init.measured_)} as "
                           "inputs and cannot start NLLS; give a network without measured inputs")
        kw["init"] = init
        if args.fast:
            kw.update(lambda0=1e-3, se_tol=0.7, final_step=True)
    elif args.fast:
        kw.update(start="dictionary", n_dictionary=8000, random_state=0, lambda0=1e-2, se_tol=0.05, final_step=True)
    return kw


@releases_claims
def cmd_fit(args):
    # ---- all checks first
    if not args.model and not args.nlls:
        raise CLIError("give --model DIR (a saved network) or --nlls")
    if (args.nlls_init or args.fast) and not args.nlls:
        raise CLIError("--nlls-init and --fast set up an NLLS fit: give --nlls (and --model for a network fit alone)")
    out = Path(os.path.abspath(args.out))
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    claim = claim_output(out, argname="--out")  # held to the commit: a second command into --out is refused
    if args.model:
        _no_sequence_options(args, f"--model {args.model}")
        model = load_model(args.model, device=args.device)
        meta = model.crb_metadata_
        seq = _sequence(args) if args.sequence else Sequence.from_dict(meta["sequence"])
        basis = _fit_basis(args, seq) if args.basis else meta["basis"]
        estimate = tuple(meta["estimate"])
    else:
        model = None
        if not args.basis:
            raise CLIError("--nlls needs --basis (the basis the coefficients were reconstructed in)")
        seq = _sequence(args)
        basis = _fit_basis(args, seq)
        estimate = resolve_estimate(tuple(args.estimate), args.tied_R1, argname="--estimate")
    img = load_coefficients(args.coefficients, basis=basis)
    mask_arr = load_mask(args.mask, img, "--mask") if args.mask else None  # on the coefficients' grid
    fit_mask, _ = make_mask(img, mask_arr)  # shape check before any work
    if not fit_mask.any():
        raise CLIError(f"--mask {args.mask} selects no voxel to fit (all zero, or only non-finite voxels of "
                       "--coefficients)" if args.mask else "--coefficients: no voxel to fit (the automatic mask is "
                       "empty: the image is zero or not finite everywhere); give --mask")
    sigma = _noise_level(args, img, fit_mask)
    fixed, fixed_files = _load_fixed(_fixed_specs(args), img, fit_mask, estimate,
                                     bool(args.tied_R1 if model is None else meta.get("tied_R1", False)))
    fixed_se = _fixed_errors(args, fixed)
    need = [p for p in getattr(model, "measured_", ()) if p not in fixed]
    if need:
        opts = {"B1": "--b1-map", "omega0": "--b0-map"}
        raise CLIError(f"--model {args.model} takes measured {list(model.measured_)} as inputs: give "
                       + ", ".join(opts.get(p, f"--fixed {p}=FILE") for p in need))
    _check_options(args, model)
    bids, target, (map_files, png, summary_name, report_name), owned, description = _output_names(args, out,
                                                                                                  estimate)
    folder = target.path  # --out, or the subject's anat folder in it: claimed (held) to the commit, as --out is
    if model is not None:
        check_compatible(model, sequence=seq, basis=basis, rank=img.rank)
        estimator = model
    else:
        estimator = NLLSFitter(seq, basis=basis, estimate=estimate, tied_R1=args.tied_R1,
                               device=args.device if args.device != "auto" else "cpu", n_jobs=args.n_jobs,
                               progress=not args.quiet, chunk_size=args.chunk_size,
                               **_nlls_schedule(args, seq, basis, img.rank)).fit()

    # ---- work
    t0 = time.perf_counter()
    with _dask_context(args.scheduler):
        maps = fit_maps(estimator, img, mask_arr, sequence=seq, basis=basis, sigma=sigma, fixed=fixed or None,
                        fixed_se=fixed_se or None, chunk_size=args.chunk_size, times=args.times,
                        progress=not args.quiet, se=args.se if model is not None else None, trust=_trust(args))
    elapsed = time.perf_counter() - t0
    check = None if not args.check else nlls_check(
        estimator, img, maps, n=args.check, sequence=seq, basis=basis, fixed=fixed or None,
        random_state=args.check_seed, tied_R1=bool(meta.get("tied_R1", False)), chunk_size=args.chunk_size)
    arrays = maps.arrays
    if not set(arrays) <= set(map_files):
        raise CLIError(f"the estimator returned maps {sorted(set(arrays) - set(map_files))} not announced by its "
                       "estimate; nothing was written")
    n_fit = int(arrays["mask"].sum())
    kind = "network" if model is not None else "NLLS"
    summary = {"written_by": "sklearn-crb fit", "sklearn_crb_version": __version__, "n_voxels_fitted": n_fit,
               "seconds": elapsed, "sigma": maps.sigma, "sigma_method": maps.sigma_method, "units": maps.units,
               "flag_counts": {int(k): int(v) for k, v in zip(*np.unique(arrays["flags"], return_counts=True))},
               "input": str(args.coefficients), "estimator": kind, "spatial_shape": list(img.spatial_shape),
               **({"nlls_init": args.nlls_init, "nlls_fast": bool(args.fast)} if model is None else {}),
               "fixed_maps": fixed_files, "fixed_map_errors": fixed_se,
               "standard_error": args.se if model is not None else "crb",
               "files": [map_files[k] for k in arrays] + [png]}
    algorithm = estimation_algorithm(None if model is None else model.crb_metadata_, se=args.se,
                                     nlls_init=args.nlls_init, fast=args.fast)
    sidecar_files, desc = _bids_files(args, out, maps, map_files, algorithm) if bids else ({}, None)
    # dataset_description.json is shared by every subject's fit: never listed as this fit's own file
    summary["files"] += [*sidecar_files, report_name]
    if bids:
        summary["bids"] = {"subject": bids[0], "session": bids[1]}
    written = [map_files[k] for k in arrays] + [*sidecar_files, png, report_name, summary_name]
    info = {"input": str(args.coefficients), "fit time (s)": f"{elapsed:.1f}",
            **({"model": str(args.model), "standard errors": args.se} if model is not None else {})}
    # the previous run's files (its summary's list) that this run does not write go in the same commit
    stale = owned - set(written) if args.overwrite else set()
    with atomic_files(folder, written, remove=sorted(stale), argname="--out") as tmp:
        _save_maps(tmp, arrays, map_files, img, bids)
        for name, content in sidecar_files.items():
            tmp[name].write_text(json.dumps(content, indent=1))
        overview_png(tmp[png], arrays, title=f"{kind}: {Path(args.coefficients).name}")
        tmp[report_name].write_text(render_report(maps, title=f"sklearn-crb fit ({kind}): "
                                                  f"{Path(args.coefficients).name}", info=info, check=check),
                                    encoding="utf-8")
        tmp[summary_name].write_text(json.dumps(summary, indent=1))
    _write_description(claim.path, description, desc)
    print(f"fitted {n_fit} voxels in {elapsed:.1f} s ({1e3 * elapsed / max(n_fit, 1):.2f} ms/voxel), "
          f"sigma = {maps.sigma:.3g}; wrote {len(written) + len(description)} files to {folder}")
    return 0


def add_parser(sub):
    """Register ``fit`` on the subcommand parser ``sub``."""
    p = sub.add_parser("fit", help="fit a coefficient image with a saved network or NLLS", epilog=EPILOG,
                       description="Write NIfTI parameter, standard-error, residual and flag maps, a PNG and a "
                                   "self-contained QC report (report.html); --bids: a BIDS derivative dataset.")
    p.add_argument("--coefficients", required=True,
                   help="coefficient image: NIfTI (complex, or 2r channels [Re..., Im...]), .mat, .npy, .npz")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="saved network directory (from `sklearn-crb train`)")
    g.add_argument("--nlls", action="store_true", help="fit with NLLS instead of a network")
    g = p.add_argument_group("NLLS start and schedule")
    g.add_argument("--nlls-init", metavar="DIR",
                   help="NLLS: start every voxel from a saved network's estimates (its sequence and basis must be "
                        "the data's; a network with measured inputs cannot start it)")
    g.add_argument("--fast", action="store_true",
                   help="NLLS: the measured fast schedule (README, NLLS speed). With --nlls-init: lambda0=1e-3, "
                        "se_tol=0.7 and the final Gauss-Newton step; else a dictionary start (8,000 prior atoms), "
                        "lambda0=1e-2, se_tol=0.05 and the final step. Default: converge to 1e-2 standard errors "
                        "from the default start")
    _add_sequence_args(p)
    p.add_argument("--mask", help="mask image (non-zero = fit); default: automatic")
    p.add_argument("--estimate", nargs="+", default=["m0s", "R1f", "R2f"], help="NLLS: parameters to report")
    g = p.add_argument_group("measured field maps (fixed per voxel, not estimated; same grid as --coefficients)")
    g.add_argument("--b1-map", help="B1 map, relative (1 = nominal flip angle): NIfTI, .mat, .npy or .npz")
    g.add_argument("--b0-map", help="off-resonance map (unit: --b0-unit): NIfTI, .mat, .npy or .npz")
    g.add_argument("--b0-unit", choices=("Hz", "rad/s"), default="Hz",
                   help="unit of --b0-map (default Hz, as most scanners write it); converted to omega0 = 2 pi f "
                        "in rad/s")
    g.add_argument("--fixed", action="append", metavar="NAME=FILE",
                   help=f"a per-voxel map of any parameter in SI units ({', '.join(PARAMETERS)}; omega0 in "
                        "rad/s); repeatable")
    g.add_argument("--fixed-se", action="append", metavar="NAME=VALUE",
                   help="standard deviation of a fixed map's error in the unit of that map (omega0 from --b0-map: "
                        "--b0-unit), e.g. B1=0.03: the standard-error maps then include it (first order); "
                        "repeatable. Default: maps are exact")
    p.add_argument("--times", action="store_true",
                   help="also write relaxation-time maps T1f (s), T2f (ms) (and T1s untied) with their standard errors")
    p.add_argument("--tied-R1", action="store_true", help="NLLS: R1s = R1f")
    p.add_argument("--sigma", type=_positive_float, default=None,
                   help="noise std per real coefficient component (default: estimated from the residuals; for a "
                        "noise-aware network first, from a pass on up to 1024 voxels)")
    p.add_argument("--noise-map", metavar="FILE",
                   help="noise std per voxel on the image grid (e.g. g-factor x channel noise), instead of --sigma: "
                        "NIfTI, .mat, .npy or .npz")
    p.add_argument("--chunk-size", type=_positive_int, default=1024, help="voxels per chunk")
    p.add_argument("--n-jobs", type=int, default=None, help="NLLS: joblib workers")
    p.add_argument("--scheduler", default=None,
                   help=f"NLLS on dask: a scheduler address (connect timeout {SCHEDULER_TIMEOUT}), or 'local' for "
                        "a 2-worker LocalCluster")
    p.add_argument("--se", choices=["delta", "crb"], default="delta",
                   help="network standard-error maps: delta (its own delta-method spread over noise draws, default) "
                        "or crb (sqrt(CRB) at the estimate, one Jacobian per voxel); NLLS always gives sqrt(CRB)")
    p.add_argument("--trust", choices=["auto", "residual", "tangent", "none"], default="auto",
                   help="trust map (flag 'untrusted' where the data contradict the estimate; sklearn_crb.maps.trust): "
                        "residual (misfit chi-squared, no extra cost; exact for NLLS, flags many voxels of a "
                        "network), tangent (the residual off the model's tangent space and the Gauss-Newton step "
                        "in standard errors: one Jacobian per voxel, several times a network's fit time), none; "
                        "default auto: residual with --nlls, tangent with --model")
    p.add_argument("--prefix", type=_prefix, default="", help="prefix of the output file names (no path separators)")
    p.add_argument("--check", type=_positive_int, default=None, metavar="N",
                   help="network fits: refit N random fitted voxels with NLLS started from the network's estimate "
                        "and compare estimates and standard errors in report.html (seeded by --check-seed)")
    p.add_argument("--check-seed", type=int, default=0, help="seed of the --check voxels (default 0)")
    g = p.add_argument_group("BIDS derivatives")
    g.add_argument("--bids", action="store_true",
                   help="write --out as a BIDS derivative dataset (derivatives/sklearn-crb/): "
                        "dataset_description.json and sub-<label>/[ses-<label>/]anat/ maps with qMRI-BIDS names "
                        "(R1map, R2map, T1map, T2map in s; desc-<name> for m0s, Rex, R1s, T2s and the others; "
                        "desc-<name>SE for standard errors) and a JSON sidecar per map (units, estimation "
                        "algorithm, reference, sources, sequence and basis SHA-256, sigma, version); the PNG, "
                        "summary and report beside them as sub-<label>[_ses-<label>]_overview.png, _summary.json, "
                        "_report.html")
    g.add_argument("--bids-subject", metavar="LABEL",
                   help="BIDS subject label (default: the sub-<label> of a BIDS-named --coefficients file)")
    g.add_argument("--bids-session", metavar="LABEL",
                   help="BIDS session label (default: the ses-<label> of a BIDS-named --coefficients file, if any)")
    _common(p, device="cpu")
    p.set_defaults(func=cmd_fit)
