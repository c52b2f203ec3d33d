"""Evaluation figures as PNG files.

Uses matplotlib's object API (``Figure`` rendered by the Agg canvas), never ``pyplot``: no global figure
registry, no GUI backend, nothing left open, safe in worker threads. Every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.evaluation.metrics import ece_from_bins
from training.io.atomic import atomic_path


def _figure(w: float = 6.0, h: float = 4.5) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    fig.clear()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_confusion(
    cm: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Confusion matrix: colour = row-normalised fraction (recall), text = counts. Rows = true class.."""
    m = np.asarray(cm, dtype=np.float64)
    k = len(class_names)
    if m.shape != (k, k):
        raise ValueError(f"cm must be ({k}, {k}) for {k} class names, got {m.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(m / m.sum(axis=1, keepdims=True))
    fig = _figure(max(4.0, 0.7 * k + 2.5), max(3.5, 0.6 * k + 2.0))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black",
                )
    ax.set_title(title or f"confusion matrix (n={int(m.sum())})")
    _save(fig, path)


def plot_reliability(bins_before: pd.DataFrame, bins_after: pd.DataFrame | None, path: str | os.PathLike) -> None:
    """Reliability diagram (accuracy vs confidence per bin, ``metrics.reliability_bins`` tables) with the
    diagonal, before and optionally after temperature scaling, and the bin counts below."""
    fig = _figure(5.5, 6.0)
    ax, axc = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    series = [("before", bins_before, "tab:red")]
    if bins_after is not None:
        series.append(("after temperature scaling", bins_after, "tab:blue"))
    width = float((bins_before["upper"] - bins_before["lower"]).iloc[0]) if len(bins_before) else 0.05
    for i, (name, b, color) in enumerate(series):
        filled = b[b["count"] > 0]
        ece, _ = ece_from_bins(b)
        ax.plot(filled["confidence"], filled["accuracy"], marker="o", color=color, label=f"{name} (ECE {ece:.3f})")
        offset = (i - (len(series) - 1) / 2) * width / len(series)
        axc.bar(
            (b["lower"] + b["upper"]) / 2 + offset,
            b["count"],
            width=width / len(series),
            color=color,
            alpha=0.6,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("reliability")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("cells")
    _save(fig, path)


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D embedding (N, 2) of ``features`` (N, D) by ``"pca"`` or ``"tsne"`` (scikit-learn)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {x.shape}")
    n, d = x.shape
    out = np.zeros((n, 2))
    if n < 2:
        return out
    if method == "pca":
        from sklearn.decomposition import PCA

        c = min(2, n, d)
        out[:, :c] = PCA(n_components=c, random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        out[:] = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    return out


def plot_embedding(
    features: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    path: str | os.PathLike,
    method: str = "pca",
    max_points: int = 5000,
    seed: int = 0,
    title: str | None = None,
) -> None:
    """Scatter of a 2-D embedding of the features, coloured by label; at most ``max_points`` cells
    (a seeded random subsample)."""
    x = np.asarray(features)
    lab = np.asarray(labels).astype(str)
    if x.ndim != 2 or lab.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and labels (N,) must match, got {x.shape} and {lab.shape}")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, lab = x[keep], lab[keep]
    emb = embed_2d(x, method, seed)
    groups = sorted(set(lab.tolist()))
    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot()
    for g, color in zip(groups, _colors(len(groups)), strict=True):
        sel = lab == g
        ax.scatter(
            emb[sel, 0],
            emb[sel, 1],
            s=4,
            alpha=0.6,
            color=color,
            label=f"{g} ({int(sel.sum())})",
            rasterized=True,
        )
    if 0 < len(groups) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title or f"features ({method}, {emb.shape[0]} cells)")
    _save(fig, path)


def plot_uncertainty_hist(
    values_by_group: dict[str, np.ndarray],
    path: str | os.PathLike,
    xlabel: str,
    bins: int = 40,
    title: str | None = None,
) -> None:
    """Overlaid density histograms (shared bin edges) of a per-cell value per group, e.g. epistemic
    uncertainty for seen vs unseen classes. Non-finite values are left out; the legend gives counts."""
    clean = {str(k): np.asarray(v, dtype=np.float64).ravel() for k, v in values_by_group.items()}
    clean = {k: v[np.isfinite(v)] for k, v in clean.items()}
    allv = np.concatenate(list(clean.values())) if clean else np.zeros(0)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    if allv.size:
        lo, hi = float(allv.min()), float(allv.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for (name, v), color in zip(clean.items(), _colors(len(clean)), strict=True):
            if v.size:
                ax.hist(v, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=color)
                ax.hist(v, bins=edges, density=True, histtype="step", color=color, label=f"{name} (n={v.size})")
            else:
                ax.plot([], [], color=color, label=f"{name} (n=0)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    _save(fig, path)
