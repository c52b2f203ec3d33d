"""Cells mode (per-cell genotypes, as in an optical pooled screen) at genome scale: is the FDR honest?

``genome_scale_hits.py`` measures the counts mode. Here every imaged cell carries its gRNA: 80,000 gRNAs (4 per
gene, 1,000 non-targeting, library frequencies log-normal, sd 0.5), ``--cells`` cells, each in the phenotype with
probability 0.05 (the planted genes' cells: ``--fold`` times that, 1 % of the genes), its calibrated probability
Beta(8, 2) if it is and Beta(1, 20) if not, its epistemic uncertainty exponential with mean 0.01. ``call_cells``
(soft mode) gives the gRNA z-scores; the gene level is then run with each ``--gene-null`` on the same z-scores::

    .venv/bin/python benchmarks/genome_scale_cells.py [--cells 4000000] [--null-seeds 20] [--planted-seeds 5]
        [--fold 2 3] [--first-seed 0] [--out reports/screen/genome_scale/cells]

Writes ``cells.json``: per gene null, the screens without hits with a call and the null genes' p-values below 1e-2
... 1e-5 against a uniform null (``genome_scale_hits.null_tail``); per fold, true and false calls and the false
discovery proportion (mean and 95 % t-interval over the planted screens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

N_GENES, N_NT, BASE = 19_750, 1_000, 0.05
HIT_GENES = frozenset(f"G{g}" for g in range(0, N_GENES, 100))  # 1 % of the genes


def screen(seed: int, n_cells: int, fold: float) -> pd.DataFrame:
    """One genotyped cell per row: ``grna, gene, is_control, p, epistemic``."""
    rng = np.random.default_rng(seed)
    grna = np.array([f"NT{i}" for i in range(N_NT)] + [f"G{g}_{k}" for g in range(N_GENES) for k in range(4)])
    gene = np.array(["NT"] * N_NT + [f"G{g}" for g in range(N_GENES) for _ in range(4)])
    rate = np.full(len(grna), BASE)
    if fold:
        rate[np.isin(gene, list(HIT_GENES))] *= fold
    w = rng.lognormal(0, 0.5, len(grna))
    g = rng.choice(len(grna), n_cells, p=w / w.sum())
    in_phenotype = rng.random(n_cells) < rate[g]
    p = np.where(in_phenotype, rng.beta(8, 2, n_cells), rng.beta(1, 20, n_cells))
    return pd.DataFrame({"grna": grna[g], "gene": gene[g], "is_control": gene[g] == "NT", "p": p,
                         "epistemic": rng.exponential(0.01, n_cells)})


def gene_tables(cells: pd.DataFrame, seed: int, gene_nulls: list[str]) -> dict[str, pd.DataFrame]:
    """Targeting genes' tables under each gene null, from one set of gRNA z-scores."""
    from serving.screen.hits import CellsInput, call_cells, gene_level

    grnas = call_cells(CellsInput(cells), "soft", 0.1, 1, 2000, seed).grnas
    out = {}
    for m in gene_nulls:
        table, _ = gene_level(grnas, 2000, 0.1, np.random.default_rng(seed), m)
        out[m] = table[~table["is_control"]]
    return out


def null_screen(genes: pd.DataFrame) -> dict:
    """A screen without hits: whether anything was called, its null genes' p-values below each of ``TAIL``."""
    from genome_scale_hits import TAIL

    p = genes["p_value"].dropna().to_numpy()
    return {"called": bool(genes["is_hit"].any()), "null_below": {f"{t:g}": int((p < t).sum()) for t in TAIL},
            "n_null": int(len(p))}


def planted_screens(calls: list[tuple[int, int]]) -> dict:
    """True and false calls per planted screen, recall and false discovery proportion over the screens."""
    from screen_targets import t_interval

    true, false = [t for t, _ in calls], [f for _, f in calls]
    fdp = [f / max(1, t + f) for t, f in calls]
    return {"true": true, "false": false, "recall": float(np.mean(true)) / len(HIT_GENES), "fdp": float(np.mean(fdp)),
            "fdp_95ci": t_interval(fdp)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4_000_000)
    ap.add_argument("--null-seeds", type=int, default=20)
    ap.add_argument("--planted-seeds", type=int, default=5)
    ap.add_argument("--fold", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--gene-null", nargs="+", default=["nt", "nt_and_quiet_screen"])
    ap.add_argument("--out", type=Path, default=ROOT / "reports/screen/genome_scale/cells")
    args = ap.parse_args()
    from genome_scale_hits import null_tail

    seeds = range(args.first_seed, args.first_seed + args.planted_seeds)
    null: dict[str, list[dict]] = {m: [] for m in args.gene_null}
    for s in range(args.first_seed, args.first_seed + args.null_seeds):
        for m, genes in gene_tables(screen(1000 + s, args.cells, 0.0), s, args.gene_null).items():
            null[m].append(null_screen(genes))
    result: dict = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "null": {m: {"screens": len(r), "screens_with_a_call": sum(x["called"] for x in r),
                                 "below": null_tail(r)} for m, r in null.items()},
                    "planted": {}}
    for fold in args.fold:
        calls: dict[str, list[tuple[int, int]]] = {m: [] for m in args.gene_null}
        for s in seeds:
            for m, genes in gene_tables(screen(s, args.cells, fold), s, args.gene_null).items():
                called = set(genes.loc[genes["is_hit"], "gene"])
                calls[m].append((len(called & HIT_GENES), len(called - HIT_GENES)))
        result["planted"][f"{fold:g}"] = {m: planted_screens(c) for m, c in calls.items()}
    for m in args.gene_null:
        n = result["null"][m]
        tail = ", ".join(f"p<{t}: {v['observed']} ({v['expected']:.1f}, top {v['poisson_95'][1]})"
                         for t, v in n["below"].items())
        print(f"{m}: screens without hits with a call {n['screens_with_a_call']} of {n['screens']}; {tail}")
        for fold, by in result["planted"].items():
            s = by[m]
            print(f"  {fold}x: recall {s['recall']:.2f}, FDP {s['fdp']:.3f} [{s['fdp_95ci'][0]:.3f}, "
                  f"{s['fdp_95ci'][1]:.3f}]")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cells.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'cells.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
