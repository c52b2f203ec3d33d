"""Genes enriched among a cluster's cells against all scored cells with a genotype: one-sided Fisher exact test per
(cluster, gene), Benjamini-Hochberg FDR within each cluster. Controls (``is_control``) are the null, not tested."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, fisher_exact

from serving.discovery.queue import NOT_NOVEL

COLUMNS = ["cluster", "gene", "n_cells", "n_gene_cells", "odds_ratio", "p_value", "fdr"]


def cluster_gene_enrichment(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells``: one row per scored cell with a genotype (``cluster``, ``gene``, ``is_control``).

    For every cluster and every targeted gene with at least one cell in the cluster: the 2x2 table (in cluster or
    not) x (this gene or not), ``alternative='greater'``. Sorted by cluster, then p-value, then gene."""
    rows = []
    targeted = ~cells["is_control"].astype(bool).to_numpy()
    genes = cells["gene"].astype(str).to_numpy()
    clusters = cells["cluster"].to_numpy()
    n_total = len(cells)
    gene_counts = pd.Series(genes).value_counts()
    for c in sorted(set(clusters.tolist()) - {NOT_NOVEL}):
        in_c = clusters == c
        n_c = int(in_c.sum())
        counts = pd.Series(genes[in_c & targeted]).value_counts()
        block = []
        for gene, a in counts.items():
            g_total = int(gene_counts[gene])
            table = [[a, n_c - a], [g_total - a, n_total - n_c - (g_total - a)]]
            res = fisher_exact(table, alternative="greater")
            block.append({"cluster": int(c), "gene": gene, "n_cells": int(a), "n_gene_cells": g_total,
                          "odds_ratio": float(res.statistic), "p_value": float(res.pvalue)})
        if block:
            p = np.array([b["p_value"] for b in block])
            for b, q in zip(block, false_discovery_control(p, method="bh"), strict=True):
                b["fdr"] = float(q)
            rows += block
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.DataFrame(rows)[COLUMNS]
    return out.sort_values(["cluster", "p_value", "gene"], kind="stable").reset_index(drop=True)
