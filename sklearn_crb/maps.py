"""Parameter maps with standard-error, goodness-of-fit and failure maps.

``fit_maps`` applies a fitted estimator (``CRBNetRegressor``, ``NLLSFitter``
or a network loaded with ``sklearn_crb.model_io.load_model``) to every voxel
of a coefficient image, in chunks, and adds per voxel

* the standard error ``sqrt(CRB(theta_hat))`` of each estimated parameter:
  the Cramér–Rao bound of the rank-r coefficients (Zhang et al., MRM 2022,
  Eq. 3) evaluated at the estimate, with the unknowns the estimator does not
  report (and complex M0) marginalised as nuisance parameters, at the fitted
  ``|M0|`` and the noise level ``sigma``;
* the relative residual ``||c - M0 U^H s(theta_hat)|| / ||c||``;
* ``|M0|`` and its phase. A network does not estimate M0: it is the
  closed-form linear least-squares fit ``M0 = u^H c / u^H u`` with
  ``u = U^H s(theta_hat)``, i.e. the variable-projection solution of the
  complex scale at fixed ``theta_hat``;
* a bit-flag map of voxels that could not be fitted (``FLAGS``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from sklearn_crb.io.images import CoefficientImage, features_from_coefficients, make_mask
from sklearn_crb.physics.parameters import BOUNDS, INDEX, PARAMETERS, UNITS, free_parameters, resolve_estimate, tie_R1

__all__ = ["fit_maps", "FLAGS", "describe_estimator", "estimate_sigma"]

#: Bits of the ``"flags"`` map (0 = fitted without problems).
FLAGS = {
    "invalid_input": 1,  # non-finite or all-zero coefficients (never fitted)
    "estimator_failed": 2,  # non-finite prediction or NLLS not converged
    "out_of_range": 4,  # estimate outside the physical bounds (clipped for the CRB/residual)
    "singular_crb": 8,  # Fisher information singular at the estimate: no standard error
}


class _Description(dict):
    """What ``fit_maps`` needs to know about an estimator."""

    __getattr__ = dict.__getitem__


def describe_estimator(estimator, sequence=None, basis=None):
    """Sequence, basis, estimated parameters and fill values of an estimator.

    Looks, in order, at ``crb_metadata_`` (set by ``model_io.load_model``),
    a fitted simulator (``simulator_``/``simulator``) and the estimator's own
    ``sequence``/``basis``/``estimate``/``tied_R1`` attributes; explicit
    ``sequence``/``basis`` arguments override.
    """
    from sklearn_crb.physics.sequence import Sequence
    from sklearn_crb.simulator import MTFingerprintSimulator

    d = _Description(kind="nlls" if hasattr(estimator, "predict_details") else "network", sequence=None, basis=None,
                     estimate=None, tied_R1=False, nuisance="all", fill=None)
    meta = getattr(estimator, "crb_metadata_", None)
    if meta is not None:
        d.update(sequence=Sequence.from_dict(meta["sequence"]), basis=meta.get("basis"),
                 estimate=tuple(meta["estimate"]), tied_R1=bool(meta.get("tied_R1", False)),
                 nuisance=meta.get("nuisance", "all"), fill=np.asarray(meta["fill_values"], dtype=float))
    sim = None
    for attr in ("simulator_", "simulator"):
        cand = getattr(estimator, attr, None)
        if isinstance(cand, MTFingerprintSimulator) and hasattr(cand, "basis_"):
            sim = cand
            break
    if sim is not None and meta is None:
        d.update(sequence=sim.sequence_, basis=sim.basis_, estimate=tuple(sim.estimate_),
                 tied_R1=bool(sim.tied_R1), nuisance=sim.nuisance, fill=sim.prior_.center())
    if meta is None and sim is None:
        for attr in ("sequence", "basis", "tied_R1", "nuisance"):
            val = getattr(estimator, attr + "_", None)
            val = getattr(estimator, attr, None) if val is None else val
            if val is not None:
                d[attr] = val
    if d.estimate is None:
        est = getattr(estimator, "estimate_", None)
        est = getattr(estimator, "estimate", None) if est is None else est
        if est is not None:
            d.estimate = tuple(est)
    if d.estimate is None:
        names = getattr(estimator, "target_names_", None)
        if names is not None and all(n in INDEX for n in names):
            d.estimate = tuple(names)
    d.known = tuple(getattr(estimator, "fixed_", None) or ())
    if meta is not None:
        from sklearn_crb.io.models import check_compatible

        check_compatible(meta, sequence=sequence, basis=basis)
    if sequence is not None:
        d.sequence = sequence
    if basis is not None:
        d.basis = basis
    if d.sequence is None:
        raise ValueError("sequence: the estimator does not carry its sequence; pass sequence=")
    if d.basis is None:
        raise ValueError("basis: the estimator does not carry its compression basis; pass basis=")
    if d.estimate is None:
        raise ValueError("the estimator does not say which parameters it estimates (no estimate/estimate_)")
    d.estimate = resolve_estimate(d.estimate, d.tied_R1)
    d.basis = np.asarray(d.basis, dtype=np.complex128)
    if d.basis.ndim != 2 or d.basis.shape[0] != d.sequence.n_pulses:
        raise ValueError(f"basis has shape {d.basis.shape} but the sequence has {d.sequence.n_pulses} pulses")
    return d


def estimate_sigma(residual_sq, dof):
    """Pooled noise level from squared residual norms of the real 2r-vector.

    ``||r||^2 / sigma^2`` is approximately chi-squared with ``dof`` degrees
    of freedom; the median is used (robust to badly fitted voxels) with its
    chi-squared correction.
    """
    from scipy.stats import chi2

    r = np.asarray(residual_sq, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0 or dof < 1:
        raise ValueError("sigma cannot be estimated from the residuals (no fitted voxels or no degrees of freedom); "
                         "pass sigma=")
    return float(np.sqrt(np.median(r) / chi2.median(dof)))


def _clip(theta):
    lo = np.array([BOUNDS[p][0] for p in PARAMETERS])
    hi = np.array([BOUNDS[p][1] for p in PARAMETERS])
    # keep strictly inside so that every parameter stays identifiable
    eps = np.array([1e-4, 0, 0, 1e-3, 0, 0, 0, 0])
    outside = np.any((theta < lo) | (theta > hi), axis=1)
    return np.clip(theta, lo + eps, hi), outside


def _fixed_columns(fixed, mask, n_vox):
    cols = {}
    for name, val in (fixed or {}).items():
        if name not in INDEX:
            raise ValueError(f"fixed: unknown parameter {name!r}; allowed {PARAMETERS}")
        arr = np.asarray(val, dtype=float)
        if arr.ndim == 0:
            cols[name] = np.full(n_vox, float(arr))
        elif arr.shape == mask.shape:
            cols[name] = arr[mask]
        else:
            raise ValueError(f"fixed[{name!r}] must be a scalar or a map of shape {mask.shape}, got {arr.shape}")
        if not np.all(np.isfinite(cols[name])):
            raise ValueError(f"fixed[{name!r}] has non-finite values inside the mask")
    return cols


def fit_maps(estimator, coefficients, mask=None, *, sequence=None, basis=None, sigma=None, fixed=None,
             chunk_size=2048, device="cpu", compute_se=True, threshold=0.05, progress=False, backend="auto"):
    """Fit every masked voxel of a coefficient image and return named maps.

    Parameters
    ----------
    estimator : fitted CRBNetRegressor, NLLSFitter or loaded model
        Its ``predict`` takes features ``[Re c, Im c]`` (n, 2r).
    coefficients : CoefficientImage or ndarray, complex, shape (*spatial, r)
    mask : None, array_like (spatial) or path
        Voxels to fit; None: automatic (``io.make_mask``). Non-finite and
        all-zero voxels are always excluded and flagged.
    sequence : Sequence, optional
        Overrides the estimator's sequence.
    basis : array_like (n_pulses, r), optional
        Overrides the estimator's basis; its rank must match the image.
    sigma : float, optional
        Noise standard deviation per real component of the coefficients;
        default: estimated from the residuals (``estimate_sigma``).
    fixed : dict, optional
        Values (scalars or maps) of parameters the estimator does not give,
        e.g. a measured ``{"B1": b1_map}``; they are treated as known.
        Parameters neither estimated nor fixed take the training prior's
        centre and are marginalised as nuisance in the CRB.
    chunk_size : int
        Voxels per chunk.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``: device of the physics (signal
        and Jacobian at the estimate).
    compute_se : bool
        Compute the standard-error maps (one Jacobian per voxel).
    threshold : float
        Automatic-mask threshold (see ``io.make_mask``).
    progress : bool
        Show a tqdm progress bar.
    backend : str
        Physics backend on CPU.

    Returns
    -------
    maps : dict of str -> ndarray (spatial)
        ``<p>`` and ``<p>_se`` for each estimated parameter p (SI units),
        ``M0_abs``, ``M0_phase`` (rad), ``relative_residual``, ``flags``
        (int, see ``FLAGS``) and ``mask`` (bool). Voxels outside the mask are
        0; voxels without a finite estimate are NaN; all problems are flagged. ``maps["sigma"]`` is
        not a map but the noise level used (float), and ``maps["units"]`` a
        dict of units.
    """
    from tqdm.auto import tqdm

    from sklearn_crb.crb import IllConditionedFisherWarning, crb_from_jacobian
    from sklearn_crb.io.images import check_rank
    from sklearn_crb.physics.signal import jacobian, simulate

    # ---- every check before any work
    if isinstance(coefficients, CoefficientImage):
        c_img = coefficients.data
    else:
        c_img = np.asarray(coefficients)
        if not np.iscomplexobj(c_img):
            raise TypeError("coefficients must be complex with the coefficient axis last (or a CoefficientImage)")
    if c_img.ndim < 2:
        raise ValueError(f"coefficients must have shape (*spatial, rank), got {c_img.shape}")
    info = describe_estimator(estimator, sequence, basis)
    check_rank(c_img.shape[-1], info.basis.shape[1])
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    fit_mask, invalid = make_mask(c_img, mask, threshold=threshold)
    spatial = c_img.shape[:-1]
    n_vox = int(fit_mask.sum())
    fixed_cols = _fixed_columns(fixed, fit_mask, n_vox)
    est = info.estimate
    known = tuple(p for p in set(fixed_cols) | set(info.known) if p not in est)
    free = free_parameters(info.tied_R1)
    nuis = tuple(p for p in free if p not in est and p not in known) if info.nuisance == "all" else (
        tuple(p for p in (info.nuisance or ()) if p not in est and p not in known))
    fill = info.fill if info.fill is not None else None

    c = c_img[fit_mask]  # (n, r)
    U = info.basis
    Ut = torch.as_tensor(U, device=device)
    theta = np.zeros((n_vox, len(PARAMETERS)))
    M0 = np.zeros(n_vox, dtype=np.complex128)
    res_sq = np.full(n_vox, np.nan)
    rel = np.full(n_vox, np.nan)
    crb_unit = np.full((n_vox, len(est)), np.nan)
    flags = np.zeros(n_vox, dtype=np.int16)
    n_free_fit = len(est) + len(nuis) + 2
    if info.kind == "nlls":
        if getattr(estimator, "basis_", None) is None:
            raise ValueError("fit_maps needs an NLLSFitter with a basis (coefficient images are rank-r)")
        n_free_fit = len(estimator.free_parameters_) + 2

    chunks = [slice(i, min(i + chunk_size, n_vox)) for i in range(0, n_vox, chunk_size)]
    bar = tqdm(total=n_vox, desc="fit_maps", unit="voxel", disable=not progress)
    for sl in chunks:
        cc = c[sl]
        X = features_from_coefficients(cc)
        if info.kind == "nlls":
            with warnings.catch_warnings():  # failures are reported in the flag map
                warnings.filterwarnings("ignore", message="NLLSFitter")
                det = estimator.predict_details(X)
            th = np.asarray(det["theta"], dtype=float).copy()
            m0_fit = np.asarray(det["M0"])
            conv = np.asarray(det["converged"], dtype=bool)
            failed = ~conv | ~np.all(np.isfinite(th), axis=1)
            # the fitter's CRB is at its per-voxel sigma: bring it back to M0 = 1, sigma = 1
            with np.errstate(invalid="ignore", divide="ignore"):
                nlls_unit = np.asarray(det["crb"]) * (np.abs(m0_fit) ** 2 / np.asarray(det["sigma"]) ** 2)[:, None]
        else:
            pred = np.asarray(estimator.predict(X), dtype=float).reshape(len(cc), -1)
            if pred.shape[1] != len(est):
                raise ValueError(f"the estimator returned {pred.shape[1]} outputs, expected {len(est)} ({est})")
            if fill is None:
                raise ValueError("the estimator carries no values for the parameters it does not estimate; "
                                 "pass fixed= or use a model saved with model_io")
            th = np.tile(fill, (len(cc), 1))
            th[:, [INDEX[p] for p in est]] = pred
            m0_fit = None
            failed = ~np.all(np.isfinite(pred), axis=1)
        for p, col in fixed_cols.items():
            if p not in est:
                th[:, INDEX[p]] = col[sl]
        if info.tied_R1:
            th = tie_R1(th)
        th_eval, clipped = _clip(np.where(np.isfinite(th), th, fill if fill is not None else 0.0))
        if fill is None and np.any(~np.isfinite(th)):
            th_eval = np.where(np.isfinite(th), th_eval, np.array([0.1, 1, 10, 10, 1, 1e-5, 0, 1]))
        theta[sl] = th
        flags[sl] |= np.where(failed, FLAGS["estimator_failed"], 0).astype(np.int16)
        flags[sl] |= np.where(clipped & ~failed, FLAGS["out_of_range"], 0).astype(np.int16)

        if info.kind == "nlls":
            M0[sl] = m0_fit
            res_sq[sl] = np.asarray(det["residual_norm"]) ** 2
            rel[sl] = np.sqrt(res_sq[sl]) / np.linalg.norm(cc, axis=1)
            crb_unit[sl] = nlls_unit
            bar.update(len(cc))
            continue
        tt = torch.as_tensor(th_eval, device=device) if device.type != "cpu" else th_eval
        if compute_se:
            s, J = jacobian(info.sequence, tt, backend=backend)
        else:
            s, J = simulate(info.sequence, tt, backend=backend), None
        s_t = torch.as_tensor(s, device=device)
        u = (s_t @ Ut.conj()).cpu().numpy()  # (n, r): U^H s at M0 = 1
        if m0_fit is None:
            m0_fit = np.sum(u.conj() * cc, axis=1) / np.sum(np.abs(u) ** 2, axis=1)
        M0[sl] = m0_fit
        r = cc - m0_fit[:, None] * u
        res_sq[sl] = np.sum(np.abs(r) ** 2, axis=1)
        rel[sl] = np.sqrt(res_sq[sl]) / np.linalg.norm(cc, axis=1)
        if compute_se:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedFisherWarning)
                cu = crb_from_jacobian(s, J, estimate=est, nuisance=nuis if nuis else None, tied_R1=info.tied_R1,
                                       basis=Ut, on_singular="inf")
            crb_unit[sl] = cu.cpu().numpy() if isinstance(cu, torch.Tensor) else cu
        bar.update(len(cc))
    bar.close()

    ok = flags == 0
    if sigma is None:
        sigma = estimate_sigma(res_sq[ok] if ok.any() else res_sq, 2 * U.shape[1] - n_free_fit)
    sigma = float(sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(crb_unit) * sigma / np.abs(M0)[:, None]
    if compute_se:
        bad_se = ~np.all(np.isfinite(se), axis=1)
        flags |= np.where(bad_se, FLAGS["singular_crb"], 0).astype(np.int16)

    def to_map(values, dtype=float):
        out = np.zeros(spatial, dtype=dtype)
        out[fit_mask] = values
        return out

    # not-converged voxels keep their (flagged) last iterate; only non-finite estimates become NaN
    failed = ~np.all(np.isfinite(theta[:, [INDEX[p] for p in est]]), axis=1) | ~np.isfinite(M0)
    maps = {}
    for k, p in enumerate(est):
        maps[p] = to_map(np.where(failed, np.nan, theta[:, INDEX[p]]))
    maps["M0_abs"] = to_map(np.where(failed, np.nan, np.abs(M0)))
    maps["M0_phase"] = to_map(np.where(failed, np.nan, np.angle(M0)))
    if compute_se:
        for k, p in enumerate(est):
            maps[p + "_se"] = to_map(np.where(np.isfinite(se[:, k]) & ~failed, se[:, k], np.nan))
    maps["relative_residual"] = to_map(np.where(failed, np.nan, rel))
    all_flags = np.where(invalid, FLAGS["invalid_input"], 0).astype(np.int16)
    all_flags[fit_mask] = flags
    maps["flags"] = all_flags
    maps["mask"] = fit_mask
    maps["sigma"] = sigma
    units = {p: UNITS[p] for p in est}
    units.update({p + "_se": UNITS[p] for p in est}, M0_abs="a.u.", M0_phase="rad", relative_residual="1")
    maps["units"] = units
    return maps


def map_names(maps):
    """Names of the array-valued entries of a ``fit_maps`` result."""
    return [k for k, v in maps.items() if isinstance(v, np.ndarray)]
