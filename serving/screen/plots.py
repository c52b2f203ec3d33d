"""Hit-calling figures (PNG, matplotlib object API on the Agg canvas): volcano, rank and the NT null's QQ plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(w: float = 6.0, h: float = 4.5) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    fig.savefig(path, format="png")
    fig.clear()
    return Path(path)


def _neglog(p: pd.Series) -> np.ndarray:
    return -np.log10(np.clip(p.to_numpy(float), 1e-300, 1))


def plot_volcano(genes: pd.DataFrame, path: str | os.PathLike, title: str, label_top: int = 10) -> Path:
    """Effect (mean log2 enrichment) against -log10 p; called genes in red, NT pseudo-genes in grey."""
    fig = _figure()
    ax = fig.add_subplot()
    tg, ctrl = genes[~genes["is_control"]], genes[genes["is_control"]]
    hit = tg["is_hit"].to_numpy(bool)
    ax.scatter(ctrl["effect"], _neglog(ctrl["p_value"]), s=10, c="0.7", label="NT pseudo-genes")
    ax.scatter(tg["effect"][~hit], _neglog(tg["p_value"][~hit]), s=10, c="tab:blue", label="genes")
    ax.scatter(tg["effect"][hit], _neglog(tg["p_value"][hit]), s=14, c="tab:red", label="called")
    for _, r in tg.dropna(subset=["p_value"]).nsmallest(label_top, "p_value").iterrows():
        ax.annotate(str(r["gene"]), (r["effect"], -np.log10(max(r["p_value"], 1e-300))), fontsize=7)
    ax.set_xlabel("effect (mean log2 enrichment over gRNAs)")
    ax.set_ylabel("-log10 p")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rank(genes: pd.DataFrame, path: str | os.PathLike, title: str) -> Path:
    """Genes by rank against -log10 p, with the called ones marked."""
    fig = _figure()
    ax = fig.add_subplot()
    tg = genes[~genes["is_control"]].dropna(subset=["p_value"]).sort_values("p_value")
    hit = tg["is_hit"].to_numpy(bool)
    x = np.arange(1, len(tg) + 1)
    y = _neglog(tg["p_value"])
    ax.plot(x, y, c="tab:blue", lw=1)
    ax.scatter(x[hit], y[hit], s=14, c="tab:red", label="called", zorder=3)
    if len(tg):
        ax.set_xscale("log")
    else:  # e.g. too few gRNAs per gene for the method's test: an empty plot that says so, not a failed command
        ax.text(0.5, 0.5, "no gene has a p-value", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("gene rank")
    ax.set_ylabel("-log10 p")
    ax.set_title(title, fontsize=10)
    if hit.any():
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_qq(p_values: dict[str, np.ndarray], path: str | os.PathLike, title: str) -> Path:
    """QQ plot of p-values against U(0, 1) (-log10 scale), one series per name."""
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    top = 1.0
    for name, p in p_values.items():
        p = np.sort(np.asarray(p, float)[~np.isnan(p)])
        if not len(p):
            continue
        expected = -np.log10((np.arange(1, len(p) + 1) - 0.5) / len(p))
        observed = -np.log10(np.clip(p, 1e-300, 1))
        ax.scatter(expected, observed, s=8, label=f"{name} (n={len(p)})")
        top = max(top, expected.max(), min(observed.max(), 10))
    ax.plot([0, top], [0, top], c="k", lw=1)
    ax.set_xlabel("expected -log10 p (uniform)")
    ax.set_ylabel("observed -log10 p")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
