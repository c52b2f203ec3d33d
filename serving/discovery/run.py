"""``discover``: per-cell scores (+ genotypes) -> the discovery queue directory.

Outputs (written under a temporary name, renamed when complete): ``cells.parquet`` (``source_file, cell_id,
novelty, cluster``; -1 = not novel), ``clusters.csv``, ``cluster_<k>.png`` (gallery of the most novel cells),
``cluster_<k>_cells.csv`` (``source_file, cell_id``: the cluster as its own excision bin) and, with genotypes,
``cluster_genes.csv`` (genes enriched in each cluster, Fisher exact + BH).

Which cells are novel (``discover.reference``): with genotypes, by default those far from the same slide's
non-targeting control cells in unlearned multi-stage features (:mod:`serving.discovery.controls`; the threshold is
``discover.quantile`` of the controls' own leave-one-out distances, and clusters are found in the same features);
without genotypes, or with ``reference=model``, those whose model novelty exceeds ``discover.quantile`` of the
model's validation cells (clusters on the scores' embeddings). ``cells.parquet``'s ``novelty`` is the score used.

Clusters are numbered in queue order: with genotypes, the cluster with the strongest gene enrichment first
(:func:`queue_rank`); without, the largest first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from serving.discovery.controls import controls_queue
from serving.discovery.enrichment import cluster_gene_enrichment
from serving.discovery.gallery import plot_gallery, read_cells
from serving.discovery.genotypes import attach_genotypes
from serving.discovery.queue import NOT_NOVEL, cluster_table, novel_clusters, novelty_threshold
from serving.model import ServedModel
from serving.screen.counts import read_truth
from training.config import DiscoverConfig
from training.errors import DataError
from training.io.atomic import atomic_path
from training.io.tables import read_table, write_table


def queue_rank(clusters: pd.DataFrame, genes: pd.DataFrame) -> dict[int, int]:
    """Old cluster id -> place in the queue (0 = first). A cluster made by one gene's knockouts is the finding worth
    cutting out, so clusters are ordered by their strongest gene enrichment (smallest p-value; none = 1), then by
    size; a cluster of debris or of cells from every gRNA (no gene stands out) goes to the back."""
    best = genes.groupby("cluster")["p_value"].min() if len(genes) else pd.Series(dtype=float)
    order = clusters.assign(p=clusters["cluster"].map(best).fillna(1.0)).sort_values(
        ["p", "n_cells", "cluster"], ascending=[True, False, True], kind="stable")
    return {int(c): i for i, c in enumerate(order["cluster"])}


def top_genes(genes: pd.DataFrame) -> pd.DataFrame:
    """``cluster, top_gene, top_gene_fdr``: each cluster's most enriched gene (``genes`` sorted by p-value)."""
    first = genes.groupby("cluster", sort=True).head(1)
    return first[["cluster", "gene", "fdr"]].rename(columns={"gene": "top_gene", "fdr": "top_gene_fdr"})


def discover(scores: str | os.PathLike, model_info: Mapping[str, Any], channel: str, out: str | os.PathLike,
             cfg: DiscoverConfig | None = None, genotypes: str | os.PathLike | None = None,
             library: str | os.PathLike | None = None, threshold: float | None = None,
             truth_genes: str | os.PathLike | None = None, model: ServedModel | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Write the discovery queue for ``scores`` to ``out``; returns the metrics (``metrics/discovery.json``).

    ``model_info``: the model's ``spec.info`` (its validation novelty quantiles set the threshold of the model
    reference unless ``threshold`` is given); ``channel``: the image channel of the galleries; ``model``: the served
    model whose architecture and preprocessing the controls reference uses. ``truth_genes`` (simulator only): adds
    whether the planted novel gene is the top gene of the top cluster."""
    cfg = cfg or DiscoverConfig()
    if (genotypes is None) != (library is None):
        raise DataError("--genotypes and --library go together (cells -> gRNA -> gene)")
    reference = cfg.reference if genotypes is not None else "model"
    table, _ = read_table(scores)
    needed = ("source_file", "cell_id") + (("novelty",) if reference == "model" else ())
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(f"{scores}: no column(s) {', '.join(missing)}; expected the output of `spatial score`")
    with_geno = attach_genotypes(table[["source_file", "cell_id"]], genotypes, library) if genotypes else None
    if reference == "controls":
        is_control = with_geno["is_control"].eq(True).to_numpy()
        nov, thr, labels = controls_queue(table, is_control, model, cfg, threshold, progress)
        table = table.assign(novelty=nov)
    else:
        thr = float(threshold) if threshold is not None else novelty_threshold(model_info, cfg.quantile)
        labels = novel_clusters(table, thr, cfg.max_clusters, cfg.pca_components, cfg.seed, str(scores))
    cells = table[["source_file", "cell_id", "novelty"]].assign(cluster=labels)  # numbered by size
    clusters = cluster_table(table, labels)
    metrics: dict[str, Any] = {"n_scored": len(table), "reference": reference, "threshold": thr,
                               "quantile": cfg.quantile, "n_novel": int((labels != NOT_NOVEL).sum()),
                               "novel_fraction": float((labels != NOT_NOVEL).mean()) if len(table) else 0.0,
                               "n_clusters": len(clusters)}
    genes = None
    if with_geno is not None:
        with_geno = with_geno.assign(cluster=labels)
        metrics["n_with_genotype"] = int(with_geno["grna"].notna().sum())
        if reference == "controls":
            metrics["n_controls"] = int(is_control.sum())
        genes = cluster_gene_enrichment(with_geno[with_geno["grna"].notna()])
        rank = queue_rank(clusters, genes)
        cells["cluster"] = cells["cluster"].map(lambda c: rank.get(c, c))
        genes["cluster"] = genes["cluster"].map(rank)
        genes = genes.sort_values(["cluster", "p_value", "gene"], kind="stable").reset_index(drop=True)
        clusters = cluster_table(table, cells["cluster"].to_numpy())
        clusters = (clusters.merge(top_genes(genes), on="cluster", how="left") if len(clusters)
                    else clusters.assign(top_gene=[], top_gene_fdr=[]))  # no novel cell: no cluster, no gene
        top = genes[genes["cluster"] == 0].head(1)
        metrics["top_cluster_top_gene"] = str(top["gene"].iloc[0]) if len(top) else None
        metrics["top_cluster_top_gene_fdr"] = float(top["fdr"].iloc[0]) if len(top) else None
        if truth_genes is not None:
            truth = read_truth(truth_genes, ("gene", "role"))
            planted = sorted(truth.loc[truth["role"] == "novel", "gene"].astype(str))
            metrics["planted_novel_genes"] = planted
            metrics["planted_novel_gene_is_top"] = metrics["top_cluster_top_gene"] in planted
    if len(clusters):
        metrics["top_cluster_n_cells"] = int(clusters["n_cells"].iloc[0])
    with atomic_path(out, suffix="") as tmp:
        tmp.mkdir()
        write_table(cells, tmp / "cells.parquet", {"reference": reference, "threshold": thr, "quantile": cfg.quantile})
        clusters.to_csv(tmp / "clusters.csv", index=False)
        if genes is not None:
            genes.to_csv(tmp / "cluster_genes.csv", index=False)
        for c in clusters["cluster"]:
            members = cells[cells["cluster"] == c].sort_values("novelty", ascending=False)
            members[["source_file", "cell_id"]].to_csv(tmp / f"cluster_{c}_cells.csv", index=False)
            shown = members.head(cfg.gallery_cells)
            plot_gallery(read_cells(shown, channel), tmp / f"cluster_{c}.png",
                         f"cluster {c}: {len(members)} cells (most novel {len(shown)} shown, {channel})")
    return metrics
