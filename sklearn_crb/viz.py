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


def demo_figures(folder, ph, results, names, maps_by_est):
    """The demo's figures in ``folder``: ``maps.png`` (truth and estimates),
    ``error_maps.png`` (|error| and standard error per estimator) and
    ``bias_std.png`` (bias and standard deviation over sqrt(CRB) per tissue); ``maps_by_est`` maps each
    estimator's label to its ``Maps.arrays``.
    """
    folder = Path(folder)
    disp = {"m0s": ("m0s", 1.0, ""), "R1f": ("T1f", None, "s"), "R2f": ("T2f", None, "ms")}

    def show(p, img):
        if p == "R1f":
            return np.where(img > 0, 1 / np.where(img > 0, img, 1), 0)
        if p == "R2f":
            return np.where(img > 0, 1e3 / np.where(img > 0, img, 1), 0)
        return img

    head = ph.mask
    rows = [("truth", {p: ph.theta[..., INDEX[p]] for p in names})] + [(k, m) for k, m in maps_by_est.items()]
    fig = _figure(figsize=(3.3 * len(names), 2.9 * len(rows)))
    axes = fig.subplots(len(rows), len(names), squeeze=False)
    for j, p in enumerate(names):
        ref = show(p, ph.theta[..., INDEX[p]])[head]
        lo, hi = np.percentile(ref, [1, 99])
        lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
        for i, (label, m) in enumerate(rows):
            img = np.where(head, show(p, np.nan_to_num(m[p])), np.nan)
            im = axes[i, j].imshow(img, vmin=lo, vmax=hi, cmap="viridis")
            axes[i, j].set_title(f"{label}: {disp[p][0]}" + (f" ({disp[p][2]})" if disp[p][2] else ""), fontsize=9)
            axes[i, j].axis("off")
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    fig.tight_layout()
    fig.savefig(folder / "maps.png", dpi=80)

    # error maps: |estimate - truth| / standard error at the estimate, and the standard errors
    ests = list(maps_by_est)
    fig = _figure(figsize=(3.3 * len(names), 2.9 * 2 * len(ests)))
    axes = fig.subplots(2 * len(ests), len(names), squeeze=False)
    for i, k in enumerate(ests):
        m = maps_by_est[k]
        for j, p in enumerate(names):
            sel = m["mask"]
            err = np.where(sel, np.abs(np.nan_to_num(m[p]) - ph.theta[..., INDEX[p]]), np.nan)
            se = np.where(sel, np.nan_to_num(m[p + "_se"]), np.nan)
            hi = np.nanpercentile(se[sel], 95) if sel.any() else 1
            for r, (img, t) in enumerate(((err, "|error|"), (se, "std. error"))):
                ax = axes[2 * i + r, j]
                im = ax.imshow(img, vmin=0, vmax=2 * hi if r == 0 else hi, cmap="magma")
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
