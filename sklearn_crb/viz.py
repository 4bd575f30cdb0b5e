"""All matplotlib: the overview PNG of ``sklearn-crb fit`` and the demo's figures.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, not
through ``pyplot``, so that writing them never changes the user's pyplot
backend or leaves figures open. matplotlib is imported on first use: the
reading, training and fitting paths do not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sklearn_crb._atomic import atomic_path
from sklearn_crb.maps.result import Maps
from sklearn_crb.phantom import LABELS
from sklearn_crb.physics.parameters import INDEX

__all__ = ["overview_png", "demo_figures"]


def _figure(figsize):
    # matplotlib is heavy and only needed for PNG output: import it here
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def overview_png(path, maps, names=None, title=None):
    """Write a PNG grid of maps (each with its own colour scale) atomically.

    Parameters
    ----------
    path : str or path-like
    maps : Maps or dict of str -> ndarray
        2-D maps, or 3-D volumes (their middle slice is shown).
    names : list of str, optional
        Default: every array of at least two dimensions except ``"mask"``.
    title : str, optional
    """
    maps = maps.arrays if isinstance(maps, Maps) else maps
    names = names or [k for k, v in maps.items() if np.ndim(v) >= 2 and k != "mask"]
    ncol = min(4, len(names))
    nrow = -(-len(names) // ncol)
    fig = _figure(figsize=(3.2 * ncol, 3.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        img = np.asarray(maps[name], dtype=float)
        if img.ndim == 3:  # a volume: show its middle slice
            img = img[..., img.shape[-1] // 2]
        finite = img[np.isfinite(img) & (img != 0)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
        im = ax.imshow(img.T if img.shape[0] != img.shape[1] else img, cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return Path(path)


def _display(p, img):
    """A map as the demo shows it: T1f in s and T2f in ms from the rates; NaN where there is no positive rate."""
    img = np.asarray(img, dtype=float)
    if p in ("R1f", "R2f"):
        scale = 1.0 if p == "R1f" else 1e3
        return np.where(img > 0, scale / np.where(img > 0, img, 1), np.nan)
    return img


def _tissue_range(ph, p):
    """A colour range that shows the WM/GM contrast: robust percentiles of the truth inside WM and GM (CSF's
    long T1 and T2 would squeeze the tissues into one colour), widened by 15 % each side."""
    tissue = np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])
    ref = _display(p, ph.theta[..., INDEX[p]])[tissue & ph.mask]
    ref = ref[np.isfinite(ref)]
    lo, hi = np.percentile(ref, [1, 99]) if ref.size else (0.0, 1.0)
    pad = 0.15 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-12)
    return lo - pad, hi + pad


def demo_figures(folder, ph, results, names, maps_by_est):
    """The demo's figures in ``folder``: ``maps.png`` (truth and estimates),
    ``error_maps.png`` (|error| and standard error per estimator) and
    ``bias_std.png`` (bias and standard deviation over sqrt(CRB) per tissue); ``maps_by_est`` maps each
    estimator's label to its ``Maps.arrays``.

    Voxels an estimator did not fit (outside its ``mask``, e.g. NLLS's subset, or failed) are blank
    (NaN, transparent), never zero; the colour scales span the WM and GM values (CSF saturates, the
    colour bar's arrows say so).
    """
    folder = Path(folder)
    disp = {"m0s": ("m0s", ""), "R1f": ("T1f", "s"), "R2f": ("T2f", "ms")}
    rows = [("truth", {p: ph.theta[..., INDEX[p]] for p in names}, ph.mask)]
    rows += [(k, m, np.asarray(m["mask"], dtype=bool)) for k, m in maps_by_est.items()]
    fig = _figure(figsize=(3.3 * len(names), 2.9 * len(rows)))
    axes = fig.subplots(len(rows), len(names), squeeze=False)
    for j, p in enumerate(names):
        lo, hi = _tissue_range(ph, p)
        for i, (label, m, fitted) in enumerate(rows):
            img = np.where(fitted & ph.mask, _display(p, m[p]), np.nan)
            axes[i, j].set_facecolor("0.92")  # blank (not fitted) voxels read as background, not as zero
            im = axes[i, j].imshow(img, vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
            axes[i, j].set_title(f"{label}: {disp[p][0]}" + (f" ({disp[p][1]})" if disp[p][1] else ""), fontsize=9)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            fig.colorbar(im, ax=axes[i, j], fraction=0.046, extend="both")
    fig.tight_layout()
    fig.savefig(folder / "maps.png", dpi=80)

    # error maps: |estimate - truth| / standard error at the estimate, and the standard errors
    ests = list(maps_by_est)
    tissue = np.isin(ph.labels, [LABELS["WM"], LABELS["GM"]])
    fig = _figure(figsize=(3.3 * len(names), 2.9 * 2 * len(ests)))
    axes = fig.subplots(2 * len(ests), len(names), squeeze=False)
    for i, k in enumerate(ests):
        m = maps_by_est[k]
        for j, p in enumerate(names):
            sel = np.asarray(m["mask"], dtype=bool)
            err = np.where(sel, np.abs(m[p] - ph.theta[..., INDEX[p]]), np.nan)  # unfitted: NaN, blank
            se = np.where(sel, m[p + "_se"], np.nan)
            ref = se[sel & tissue]  # the scale of WM and GM: a few CSF voxels' large errors would flatten it
            hi = np.nanpercentile(ref, 95) if np.isfinite(ref).any() else 1.0
            for r, (img, t) in enumerate(((err, "|error|"), (se, "std. error"))):
                ax = axes[2 * i + r, j]
                ax.set_facecolor("0.92")
                im = ax.imshow(img, vmin=0, vmax=2 * hi if r == 0 else hi, cmap="magma", interpolation="nearest")
                ax.set_title(f"{k}: {t} {p}", fontsize=9)
                ax.axis("off")
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(folder / "error_maps.png", dpi=80)

    # bias and std relative to sqrt(CRB), per tissue and estimator
    fig = _figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(results)
    x = np.arange(len(names) * 2)
    labels = [f"{p}\n{t}" for t in ("WM", "GM") for p in names]
    for k, r in enumerate(results):
        b = np.asarray(r["bias_by_tissue"]).ravel()
        sd = np.asarray(r["std_by_tissue"]).ravel()
        axes[0].bar(x + k * width, b, width, label=r["name"])
        axes[1].bar(x + k * width, sd, width, label=r["name"])
    axes[0].axhline(0, color="k", lw=0.8)
    axes[1].axhline(1, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("bias / sqrt(CRB)")
    axes[1].set_ylabel("std / sqrt(CRB)")
    for ax in axes:
        ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "bias_std.png", dpi=90)
