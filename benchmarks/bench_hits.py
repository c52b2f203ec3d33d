"""Hit-calling speed at genome scale: ``spatial hits`` on a synthetic count table of ``--grnas`` gRNAs (1,000 NT,
4 per gene) from ``--cells`` cells per replicate, 2 replicates, 6 bins (the SPARCS layout), sequenced with the
simulator's cutting / PCR / background model. Times the whole command (parse the files, call hits with our method
AND the SPARCS baseline, write tables and figures) and, as the baseline measured in the same run, the published
SPARCS statistic alone (a groupby t-test)::

    .venv/bin/python benchmarks/bench_hits.py [--cells 2000000] [--grnas 80000] [--check] [--json PATH]

Target: under 60 s for 2e6 cells x 80,000 gRNAs on 2 cores (``--check`` exits 1 above ``--limit``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Screen(NamedTuple):
    """The files of a synthetic screen and its truth (``gene, role, effect``: the planted fold of the bin rate)."""

    counts: Path
    samples: Path
    library: Path
    truth: pd.DataFrame


def write_screen(root: Path, n_cells: int, n_grnas: int, n_nt: int = 1000, seed: int = 0,
                 folds: tuple[float, ...] = (4.0,), share: float = 1 / 200) -> Screen:
    """Count table, sample sheet and library of a synthetic screen: 1.4 % of the cells in the bins, as in the larger
    SPARCS screen; for each fold in ``folds`` a ``share`` of the genes (the next ones in order) has its bin rate
    multiplied by it (4 gRNAs per gene, all affected); ``folds=()`` plants nothing."""
    from serving.screen.counts import write_count_table
    from serving.screen.sequencing import sequence_replicate
    from training.config import SequenceConfig

    rng = np.random.default_rng(seed)
    n_genes = (n_grnas - n_nt) // 4
    grna = np.array([f"NTC_{i:05d}" for i in range(n_nt)] + [f"G{g:05d}_{k}" for g in range(n_genes) for k in range(4)])
    gene = np.array(["non-targeting"] * n_nt + [f"G{g:05d}" for g in range(n_genes) for _ in range(4)])
    w = rng.lognormal(0, 0.5, len(grna))
    fold = np.ones(n_genes)
    k = int(n_genes * share)
    for i, f in enumerate(folds):
        fold[i * k:(i + 1) * k] = f
    tail = 0.014 * np.concatenate([np.ones(n_nt), np.repeat(fold, 4)])
    table = pd.DataFrame({"sgRNA": grna, "Gene": gene})
    rows = []
    cfg = SequenceConfig(library_cells=n_cells, library_reads_per_grna=300)
    for r in (1, 2):
        g = rng.choice(len(grna), n_cells, p=w / w.sum())
        inbin = rng.random(n_cells) < tail[g]
        bins = np.where(inbin, rng.choice(np.arange(1, 7), n_cells, p=[0.04, 0.48, 0.14, 0.11, 0.11, 0.12]), 0)
        counts, sr = sequence_replicate(pd.DataFrame({"grna": grna[g], "bin": bins}), grna, cfg, r,
                                        np.random.default_rng([seed, r]))
        for key, v in counts.items():
            table[key] = v
        rows += sr
    write_count_table(table, root / "counts.tsv")
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    pd.DataFrame({"grna": grna, "gene": gene, "is_control": np.arange(len(grna)) < n_nt}).to_csv(
        root / "library.csv", index=False)
    truth = pd.DataFrame({"gene": [f"G{g:05d}" for g in range(n_genes)], "role": np.where(fold > 1, "hit", "neutral"),
                          "effect": fold})
    return Screen(root / "counts.tsv", root / "samples.csv", root / "library.csv", truth)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2_000_000, help="cells per replicate")
    ap.add_argument("--grnas", type=int, default=80_000)
    ap.add_argument("--limit", type=float, default=60.0, help="--check: seconds allowed for the whole command")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    from serving.screen.calling import load_counts_input, run_counts
    from serving.screen.hits import call_sparcs
    from training.config import HitsConfig

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t0 = time.perf_counter()
        counts, samples, library, _ = write_screen(root, args.cells, args.grnas)
        print(f"synthetic screen: {args.cells:,} cells x 2 replicates, {args.grnas:,} gRNAs, 6 bins "
              f"({time.perf_counter() - t0:.1f} s to simulate)")
        cfg = HitsConfig()
        t0 = time.perf_counter()
        inp = load_counts_input(counts, samples, library, cfg)
        t_parse = time.perf_counter() - t0
        t0 = time.perf_counter()
        call_sparcs(inp)
        t_sparcs = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run_counts(counts, samples, library, root / "hits", cfg)
        t_total = time.perf_counter() - t0
    called = summary["methods"]["spatial"]["n_called"]
    print(f"parse the three files:                 {t_parse:6.1f} s")
    print(f"SPARCS statistic alone (baseline):     {t_sparcs:6.1f} s")
    print(f"spatial hits, whole command:           {t_total:6.1f} s  ({t_total / max(t_sparcs, 1e-9):.1f}x the "
          f"baseline; it also parses, runs the baseline and writes tables + figures)")
    planted = (args.grnas - 1000) // 4 // 200
    print(f"genes called at FDR 0.1: {called} (planted: {planted})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "cells_per_replicate": args.cells, "grnas": args.grnas, "gene_null": cfg.gene_null,
            "seconds_parse": round(t_parse, 2), "seconds_sparcs_baseline": round(t_sparcs, 2),
            "seconds_spatial_hits": round(t_total, 2), "ratio_to_baseline": round(t_total / max(t_sparcs, 1e-9), 1),
            "genes_called": called, "planted": planted}, indent=2) + "\n")
    if args.check and t_total > args.limit:
        print(f"FAIL: {t_total:.1f} s > {args.limit:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
