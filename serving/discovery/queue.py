"""Which cells are novel, and how they group: a threshold on the model's own novelty distribution, then a Gaussian
mixture on the novel cells' embeddings with the number of components chosen by BIC."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from training.errors import DataError, ModelError

NOT_NOVEL = -1


def novelty_threshold(model_info: Mapping, quantile: float) -> float:
    """The ``quantile`` of the model's validation cells' novelty (stored at training in ``spec.info``)."""
    ref = model_info.get("novelty_val_quantiles")
    if not ref:
        raise ModelError("the model has no novelty reference (spec.info.novelty_val_quantiles): it was trained "
                         "before the discovery queue existed or without a novelty score; retrain it, or pass --threshold")
    key = str(float(quantile))
    if key not in ref:
        raise ModelError(f"novelty quantile {quantile} is not stored with the model; choose one of "
                         f"{', '.join(sorted(ref, key=float))} or pass --threshold")
    return float(ref[key])


def embedding_matrix(scores: pd.DataFrame, where: str = "scores") -> np.ndarray:
    """Embeddings as ``(N, D)``: the ``embedding`` list column of ``spatial score --embeddings`` or ``emb_*`` columns."""
    cols = [c for c in scores.columns if c.startswith("emb_")]
    if cols:
        x = scores[cols].to_numpy(np.float64)
    elif "embedding" in scores.columns:
        rows = scores["embedding"].to_numpy()
        sizes = np.array([-1 if r is None else len(r) for r in rows], dtype=np.int64)
        common = int(np.bincount(sizes[sizes >= 0]).argmax()) if (sizes >= 0).any() else -1
        odd = np.flatnonzero(sizes != common)
        if odd.size:
            cell = scores["cell_id"].iloc[odd[0]] if "cell_id" in scores.columns else odd[0]
            got = "no embedding" if sizes[odd[0]] < 0 else f"an embedding of {sizes[odd[0]]} values"
            raise DataError(f"{where}: cell {cell} has {got} where the others have {common}; score every cell with "
                            "the same model and --embeddings")
        x = np.stack(rows).astype(np.float64) if len(scores) else np.zeros((0, 1))
    else:
        raise DataError(f"{where}: no embeddings (an 'embedding' or 'emb_*' column); score with --embeddings")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: embeddings contain NaN or infinite values")
    return x


def cluster_embeddings(x: np.ndarray, max_clusters: int = 8, pca_components: int = 10, seed: int = 0
                       ) -> np.ndarray:
    """Cluster labels (0 = the largest cluster, then by size) of a Gaussian mixture (diagonal covariances) whose
    number of components (1..``max_clusters``, at most one per 5 cells) has the lowest BIC, fitted on the first
    ``pca_components`` principal components. Features are not standardised per dimension: that would give the
    directions that separate groups the same weight as noise dimensions."""
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    dims = max(1, min(pca_components, x.shape[1], n - 1))
    z = PCA(dims, random_state=seed).fit_transform(x)
    best, best_bic = None, np.inf
    for k in range(1, max(1, min(max_clusters, n // 5)) + 1):
        gm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-4, n_init=2, random_state=seed).fit(z)
        bic = gm.bic(z)
        if bic < best_bic:
            best, best_bic = gm, bic
    raw = best.predict(z)
    order = np.argsort(-np.bincount(raw, minlength=best.n_components), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[raw].astype(np.int64)


def novel_clusters(scores: pd.DataFrame, threshold: float, max_clusters: int = 8, pca_components: int = 10,
                   seed: int = 0, where: str = "scores") -> np.ndarray:
    """Per cell of ``scores``: its cluster, or ``NOT_NOVEL`` (-1) when its novelty is at most ``threshold``;
    ``where`` names the table in errors."""
    novel = scores["novelty"].to_numpy(np.float64) > threshold
    labels = np.full(len(scores), NOT_NOVEL, dtype=np.int64)
    if novel.any():
        labels[novel] = cluster_embeddings(embedding_matrix(scores[novel], where), max_clusters, pca_components, seed)
    return labels


def cluster_table(scores: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """``cluster, n_cells, mean_novelty, mean_epistemic, mean_confidence, predicted_class`` (the most common)."""
    df = scores.assign(cluster=labels)
    df = df[df["cluster"] != NOT_NOVEL]
    cols = ["cluster", "n_cells", "mean_novelty", "mean_epistemic", "mean_confidence", "predicted_class"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    g = df.groupby("cluster")
    out = pd.DataFrame({
        "n_cells": g.size(),
        "mean_novelty": g["novelty"].mean(),
        "mean_epistemic": g["epistemic"].mean() if "epistemic" in df else np.nan,
        "mean_confidence": g["confidence"].mean() if "confidence" in df else np.nan,
        "predicted_class": g["predicted_class"].agg(lambda s: s.value_counts().index[0])
        if "predicted_class" in df else "",
    }).reset_index()
    return out[cols].sort_values("cluster").reset_index(drop=True)
