"""``spatial hits`` end to end: read and check the inputs, call hits with the chosen method and the baselines beside
it, write ``genes.csv``, ``grnas.csv``, ``compare.csv``, ``volcano.png``, ``rank.png``, ``qq.png`` and
``summary.json`` into one folder (atomically: a bad input leaves nothing behind)."""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

from serving.screen.counts import (
    check_library,
    read_count_table,
    read_genotypes,
    read_library,
    read_sample_sheet,
    read_truth,
)
from serving.screen.hits import (
    CellsInput,
    CountsInput,
    HitsResult,
    call_cells,
    call_counts,
    call_rra,
    call_sparcs,
    truth_metrics,
)
from training.config import HitsConfig
from training.errors import DataError


def load_counts_input(counts: str | os.PathLike, samples: str | os.PathLike, library: str | os.PathLike,
                      cfg: HitsConfig) -> CountsInput:
    table = read_count_table(counts)
    sheet = read_sample_sheet(samples, list(table.columns[2:]), counts)
    lib = read_library(library)
    joined = check_library(table, lib, counts, library)
    if cfg.bins:
        have = set(sheet.of("bin")["bin"].astype(int))
        unknown = [b for b in cfg.bins if b not in have]
        if unknown:
            raise DataError(f"{samples}: hits.bins asks for bin(s) {unknown} that no sample holds")
    return CountsInput(joined, sheet, tuple(cfg.bins))


def load_cells_input(scores: str | os.PathLike, genotypes: str | os.PathLike, library: str | os.PathLike,
                     class_name: str) -> CellsInput:
    """Scores joined with genotypes (on ``source_file, cell_id``) and the library."""
    from serving.screen.bins import read_scores

    df, _ = read_scores(scores, class_name, extra=("epistemic",))
    geno = read_genotypes(genotypes, read_library(library), library)
    df = df.assign(source_file=df["source_file"].astype(str).map(os.path.abspath))
    if "epistemic" not in df.columns:
        df["epistemic"] = 0.0
    cells = df.merge(geno, on=["source_file", "cell_id"], how="inner")
    if cells.empty:
        raise DataError(f"{genotypes}: no genotyped cell is in {scores} (source_file and cell_id must match)")
    return CellsInput(cells.rename(columns={f"prob_{class_name}": "p"})[
        ["source_file", "cell_id", "grna", "gene", "is_control", "p", "epistemic"]])


def compare_table(results: list[HitsResult]) -> pd.DataFrame:
    """Genes side by side: ``<method>_p``, ``<method>_fdr``, ``<method>_hit`` for each method."""
    out = None
    for r in results:
        g = r.genes[~r.genes["is_control"]].set_index("gene")[["effect", "p_value", "fdr", "is_hit"]]
        g.columns = [f"{r.method}_{c}" for c in ("effect", "p", "fdr", "hit")]
        out = g if out is None else out.join(g, how="outer")
    return out.reset_index().sort_values(f"{results[0].method}_p", na_position="last")


def write_results(results: list[HitsResult], out_dir: str | os.PathLike, truth: pd.DataFrame | None,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """The first result is the primary one (``genes.csv``); every method's table is also ``genes_<method>.csv``."""
    from serving.screen.plots import plot_qq, plot_rank, plot_volcano
    from training.io.atomic import atomic_path

    main = results[0]
    summary: dict[str, Any] = {"method": main.method, **extra, "methods": {}}
    for r in results:
        entry = dict(r.summary)
        if truth is not None:
            entry["truth"] = truth_metrics(r.genes, truth)
        summary["methods"][r.method] = entry
    with atomic_path(out_dir, suffix="") as tmp:
        tmp.mkdir(parents=True)
        main.genes.to_csv(tmp / "genes.csv", index=False)
        main.grnas.to_csv(tmp / "grnas.csv", index=False)
        for r in results:
            r.genes.to_csv(tmp / f"genes_{r.method}.csv", index=False)
        compare_table(results).to_csv(tmp / "compare.csv", index=False)
        plot_volcano(main.genes, tmp / "volcano.png", f"{main.method}: {int(main.genes['is_hit'].sum())} called")
        plot_rank(main.genes, tmp / "rank.png", f"{main.method}: genes by p-value")
        qq = {f"{r.method} NT pseudo-genes": r.genes.loc[r.genes["is_control"], "p_value"].to_numpy()
              for r in results if r.genes["is_control"].any()}
        if truth is not None:
            null_genes = set(truth.loc[truth["role"].isin(["neutral"]), "gene"])
            for r in results:
                qq[f"{r.method} null genes"] = r.genes.loc[r.genes["gene"].isin(null_genes), "p_value"].to_numpy()
        plot_qq(qq, tmp / "qq.png", "p-values of null genes against U(0, 1)")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return summary


def flat_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``<method>/<metric>`` numbers for DVC."""
    out: dict[str, Any] = {}
    for method, entry in summary["methods"].items():
        out[f"{method}/n_called"] = entry["n_called"]
        ks = entry.get("pseudo_gene_ks") or {}
        if ks.get("statistic") is not None:
            out[f"{method}/nt_pseudo_gene_ks"] = ks["statistic"]
        for k, v in (entry.get("truth") or {}).items():
            if v is not None:
                out[f"{method}/{k}"] = v
    return out


def run_counts(counts: str | os.PathLike, samples: str | os.PathLike, library: str | os.PathLike,
               out_dir: str | os.PathLike, cfg: HitsConfig, truth: str | os.PathLike | None = None,
               method: str | None = None) -> dict[str, Any]:
    inp = load_counts_input(counts, samples, library, cfg)
    gene_truth = read_truth(truth) if truth is not None else None
    results = [call_counts(inp, cfg.fdr, cfg.min_library_reads, cfg.null_draws, cfg.seed, cfg.min_nt_cells,
                           cfg.nt_null, cfg.gene_null, cfg.quiet_sibling_p),
               call_sparcs(inp, cfg.sparcs_p, cfg.fdr),
               call_rra(inp, cfg.rra_alpha, cfg.fdr, cfg.null_draws, cfg.seed, cfg.min_library_reads)]
    first = method or cfg.method
    results.sort(key=lambda r: r.method != first)  # the chosen method first (genes.csv), the baselines beside it
    return write_results(results, out_dir, gene_truth, {"mode": "counts", "counts": str(counts)})


def run_cells(scores: str | os.PathLike, genotypes: str | os.PathLike, library: str | os.PathLike,
              class_name: str, out_dir: str | os.PathLike, cfg: HitsConfig, truth: str | os.PathLike | None = None,
              method: str | None = None) -> dict[str, Any]:
    inp = load_cells_input(scores, genotypes, library, class_name)
    gene_truth = read_truth(truth) if truth is not None else None
    first = method or cfg.cells_method
    modes = [first, "threshold" if first == "soft" else "soft"]
    results = [call_cells(inp, m, cfg.fdr, cfg.min_cells, cfg.null_draws, cfg.seed, cfg.gene_null,
                          cfg.quiet_sibling_p) for m in modes]
    return write_results(results, out_dir, gene_truth, {"mode": "cells", "class": class_name,
                                                         "scores": str(scores)})
