"""The stratified tables of :func:`sklearn_crb.metrics.bias_variance_report`.

Per-group statistics (bias, standard deviation and CRB-normalised MSE of the
estimates of each true parameter vector, relative to its CRB; Zhang et al.,
MRM 2022) are split into strata by SNR and by identifiability (the CRB against
the prior variance) and formatted as a summary string and a markdown table.
Pure NumPy: the checked inputs come from :mod:`sklearn_crb.metrics`.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import Bunch

__all__ = ["snr_per_group", "snr_strata", "stratified_report", "STATS", "MAX_SNR_LEVELS"]

#: The per-stratum statistics (None for an empty stratum).
STATS = ("normalized_mse", "median_abs_bias_over_sqrt_crb", "median_bias_over_sqrt_crb", "median_std_over_sqrt_crb")
MAX_SNR_LEVELS = 12


def snr_per_group(snr, labels, order, n_theta):
    """One SNR per group (rows of one group must share it)."""
    if snr is None:
        return None
    s = np.asarray(snr, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(n_theta if labels is None else labels.shape[0], float(s))
    s = s.ravel()
    if labels is None:
        if s.shape[0] != n_theta:
            raise ValueError(f"snr must be a scalar or have one value per true parameter vector ({n_theta}), "
                             f"got {s.shape[0]}")
        out = s
    else:
        if s.shape[0] != labels.shape[0]:
            raise ValueError(f"snr must be a scalar or have one value per row ({labels.shape[0]}), got {s.shape[0]}")
        out = np.array([s[labels == g][0] for g in order])
        spread = np.array([np.ptp(s[labels == g]) for g in order])
        if np.any(spread > 1e-9 * np.abs(out)):
            raise ValueError("snr must be constant within each group (the CRB depends on it): put draws at "
                             "different SNRs in different groups")
    if not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise ValueError("snr must be finite and positive")
    return out


def snr_strata(snr_g, snr_bins):
    """[(label, mask over groups)] for the SNR strata (without "all")."""
    if snr_g is None:
        return []
    if snr_bins is None:
        levels = np.unique(snr_g)
        if levels.size > MAX_SNR_LEVELS:
            raise ValueError(f"snr has {levels.size} distinct values: pass snr_bins (bin edges) to stratify it")
        return [(f"{v:g}", snr_g == v) for v in levels]
    e = np.asarray(snr_bins, dtype=np.float64).ravel()
    if e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(f"snr_bins must be at least 2 finite increasing edges, got {snr_bins!r}")
    out = []
    for k in range(e.size - 1):
        last = k == e.size - 2
        m = (snr_g >= e[k]) & ((snr_g <= e[k + 1]) if last else (snr_g < e[k + 1]))
        out.append((f"[{e[k]:g}, {e[k + 1]:g}{']' if last else ')'}", m))
    return out


def _informative(crbg, prior_variance, informative_ratio, p):
    """Where the data decide: CRB < ``informative_ratio`` x the prior variance (None without a prior variance)."""
    if prior_variance is None:
        return None
    pv = np.asarray(prior_variance, dtype=np.float64).ravel()
    if pv.shape != (p,) or not np.all(np.isfinite(pv)) or np.any(pv <= 0):
        raise ValueError(f"prior_variance must be {p} finite positive values (one per output), got "
                         f"{prior_variance!r}")
    r = float(informative_ratio)
    if not np.isfinite(r) or r <= 0:
        raise ValueError(f"informative_ratio must be a finite positive number, got {informative_ratio!r}")
    return crbg < r * pv


def stratified_report(theta, crbg, mean, var, nmse, n_draws, names, *, prior_variance, snr_g, snr_bins,
                      informative_ratio):
    """The Bunch of :func:`sklearn_crb.metrics.bias_variance_report` from per-group statistics."""
    p = theta.shape[1]
    names = tuple(names) if names is not None else tuple(f"y{j}" for j in range(p))
    if len(names) != p:
        raise ValueError(f"names has {len(names)} entries for {p} outputs")
    bias = mean - theta
    b_rel = bias / np.sqrt(crbg)
    s_rel = np.sqrt(var / crbg)
    informative = _informative(crbg, prior_variance, informative_ratio, p)
    snr_levels = [("all", np.ones(theta.shape[0], bool))] + snr_strata(snr_g, snr_bins)
    ident_levels = ["all"] + (["informative", "prior-dominated"] if informative is not None else [])
    strata = []
    for j, name in enumerate(names):
        for s_label, s_mask in snr_levels:
            for ident in ident_levels:
                m = s_mask.copy()
                if ident != "all":
                    m &= informative[:, j] if ident == "informative" else ~informative[:, j]
                rec = {"parameter": name, "snr": s_label, "identifiability": ident, "n_theta": int(m.sum()),
                       "n_samples": int(n_draws[m].sum())}
                if m.any():
                    rec.update(normalized_mse=float(nmse[m, j].mean()),
                               median_abs_bias_over_sqrt_crb=float(np.median(np.abs(b_rel[m, j]))),
                               median_bias_over_sqrt_crb=float(np.median(b_rel[m, j])),
                               median_std_over_sqrt_crb=float(np.median(s_rel[m, j])))
                else:  # an empty stratum: counted, no statistics (None, not NaN)
                    rec.update({k: None for k in STATS})
                strata.append(rec)
    summary = {
        "median_abs_bias_over_sqrt_crb": np.median(np.abs(b_rel), axis=0),
        "median_bias_over_sqrt_crb": np.median(b_rel, axis=0),
        "mean_variance_over_crb": (var / crbg).mean(0),
        "median_std_over_sqrt_crb": np.median(s_rel, axis=0),
        "mean_normalized_mse": nmse.mean(0),
    }
    table = [{"parameter": n, "statistic": k, "value": float(v[j])}
             for j, n in enumerate(names) for k, v in summary.items()]

    def to_string():
        w = max(len(n) for n in names + ("parameter",))
        head = f"{'parameter':<{w}}  " + "  ".join(f"{k:>30}" for k in summary)
        rows = [f"{n:<{w}}  " + "  ".join(f"{summary[k][j]:>30.4g}" for k in summary) for j, n in enumerate(names)]
        return "\n".join([head, *rows])

    def to_markdown():
        lines = ["| parameter | SNR | identifiability | n θ | nMSE | median \\|bias\\|/√CRB | median bias/√CRB "
                 "| median std/√CRB |", "|---|---|---|---|---|---|---|---|"]
        for r in strata:
            vals = ["—" if r[k] is None else (f"{r[k]:+.3g}" if k == "median_bias_over_sqrt_crb" else f"{r[k]:.3g}")
                    for k in STATS]
            lines.append(f"| {r['parameter']} | {r['snr']} | {r['identifiability']} | {r['n_theta']} | "
                         + " | ".join(vals) + " |")
        return "\n".join(lines)

    return Bunch(theta=theta, crb=crbg, mean=mean, bias=bias, variance=var, bias_over_sqrt_crb=b_rel,
                 std_over_sqrt_crb=s_rel, variance_over_crb=var / crbg, normalized_mse=nmse, n_draws=n_draws,
                 snr=snr_g, informative=informative, names=names, summary=summary, table=table, strata=strata,
                 to_string=to_string, to_markdown=to_markdown)
