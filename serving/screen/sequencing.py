"""SIMULATOR ONLY: from the simulated screen's truth and its excision bins to a gRNA count table.

Nothing here touches real data; a real screen's counts come from the sequencer (``mageck count`` or any counter).
Per replicate:

1. the cell population: the rendered screen cells with their bins (``sequence.virtual_cells = 0``), or a
   *virtual* screen of realistic size: each virtual cell's gRNA and latent state are drawn with the simulator's own
   model (``training.sim.synth.draw_cells``, no pixels), and its score, bin and uncertainty are those of a random
   rendered cell **of the same true state**, so the statistics meet realistic depth while the scores stay the
   classifier's;
2. cutting: each cut cell is recovered with a probability drawn per sample from ``sequence.recovery``;
3. PCR: every recovered cell yields Gamma(``pcr_shape``) template copies (jackpotting: a few cells dominate);
4. background: non-selected cells add a share of ``sequence.background`` of the copies;
5. sequencing: ``reads_per_cell`` reads per cut cell, multinomial over the copies; the unsorted library is a sample
   of ``library_cells`` cells of the whole population, sequenced at ``library_reads_per_grna``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import SequenceConfig, SynthConfig
from training.errors import DataError

VIRTUAL = "virtual"


def rendered_cells(bins: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The binned screen cells joined with their truth (``grna, state``); every binned cell must have a truth row."""
    key_b = pd.MultiIndex.from_arrays([bins["source_file"].map(os.path.abspath), bins["cell_id"].astype(np.int64)])
    t = truth.assign(source_file=truth["source_file"].map(os.path.abspath))
    t = t.set_index(["source_file", "cell_id"])[["grna", "gene", "state"]]
    missing = ~key_b.isin(t.index)
    if missing.any():
        raise DataError(f"{int(missing.sum())} binned cell(s) have no truth row (e.g. {key_b[missing][0]}); "
                        "the bins must come from the simulated screen's files")
    joined = t.loc[key_b].reset_index(drop=True)
    out = bins.reset_index(drop=True).copy()
    out[["grna", "gene", "state"]] = joined[["grna", "gene", "state"]].to_numpy()
    return out[out["grna"].astype(str) != ""].reset_index(drop=True)


def virtual_population(rendered: pd.DataFrame, synth: SynthConfig, n: int, replicate: int,
                       rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, str]]:
    """``n`` virtual screen cells: gRNA and true state from the simulator's model, score/bin/uncertainty resampled
    from rendered cells of the same true state (a state never rendered falls back to every rendered cell)."""
    from training.sim.synth import SCREEN, FileSpec, draw_cells, make_library

    lib = make_library(synth)
    spec = FileSpec(path=VIRTUAL, fmt="h5sc", label="", group=VIRTUAL, condition=SCREEN, timepoint=None,
                    replicate=replicate, n=n, slide=0, index=0)
    cells = draw_cells(spec, synth, lib, rng)
    states = cells.states()
    pick = np.empty(n, np.int64)
    fallback: dict[str, str] = {}
    by_state = {s: np.nonzero(rendered["state"].to_numpy() == s)[0] for s in np.unique(states)}
    for s, pool in by_state.items():
        sel = np.nonzero(states == s)[0]
        if len(pool) == 0:
            pool = np.arange(len(rendered))
            fallback[str(s)] = "no rendered cell of this state: drawn from every rendered cell"
        pick[sel] = pool[rng.integers(0, len(pool), len(sel))]
    src = rendered.iloc[pick].reset_index(drop=True)
    out = pd.DataFrame({"source_file": f"{VIRTUAL}_r{replicate}", "cell_id": np.arange(n, dtype=np.int64),
                        "grna": cells.grna.astype(str), "gene": cells.gene.astype(str), "state": states.astype(str),
                        "bin": src["bin"].to_numpy(), "score": src["score"].to_numpy()})
    if "epistemic" in src.columns:
        out["epistemic"] = src["epistemic"].to_numpy()
    return out, fallback


def _pcr(rng: np.random.Generator, cells_per_grna: np.ndarray, shape: float) -> np.ndarray:
    """Template copies per gRNA: the sum of one Gamma(shape) yield per cell is Gamma(shape * cells)."""
    out = np.zeros(len(cells_per_grna))
    has = cells_per_grna > 0
    out[has] = rng.gamma(shape * cells_per_grna[has])
    return out


def _reads(rng: np.random.Generator, copies: np.ndarray, total: int) -> np.ndarray:
    s = copies.sum()
    return rng.multinomial(total, copies / s) if s > 0 and total > 0 else np.zeros(len(copies), np.int64)


def sequence_replicate(pop: pd.DataFrame, grna_names: np.ndarray, cfg: SequenceConfig, replicate: int,
                       rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Counts per sample (library + every non-empty bin) of one replicate, and their sample-sheet rows."""
    pos = {g: i for i, g in enumerate(grna_names)}
    g = pop["grna"].map(pos).to_numpy()
    if np.isnan(g.astype(float)).any():
        raise DataError(f"gRNA {pop['grna'][pd.isna(g)].iloc[0]} of the screen is not in the library")
    g = g.astype(np.int64)
    n_g = len(grna_names)
    bins = pop["bin"].to_numpy()
    counts: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    rep = f"r{replicate}"
    pool = np.bincount(g, minlength=n_g)
    lib_cells = rng.multinomial(cfg.library_cells, pool / pool.sum())
    counts[f"library_{rep}"] = _reads(rng, _pcr(rng, lib_cells, cfg.pcr_shape), int(cfg.library_reads_per_grna * n_g))
    rows.append({"sample": f"library_{rep}", "kind": "library", "bin": "", "replicate": rep,
                 "cells": int(cfg.library_cells)})
    background = g[bins == 0]
    for k in sorted(int(b) for b in np.unique(bins) if b > 0):
        cut = g[bins == k]
        recovered = cut[rng.random(len(cut)) < rng.uniform(*cfg.recovery)]
        copies = _pcr(rng, np.bincount(recovered, minlength=n_g), cfg.pcr_shape)
        beta = rng.uniform(*cfg.background)
        n_bg = int(rng.poisson(beta / (1 - beta) * max(len(recovered), 1)))
        if n_bg and len(background):
            bg = background[rng.integers(0, len(background), n_bg)]
            copies = copies + _pcr(rng, np.bincount(bg, minlength=n_g), cfg.pcr_shape)
        name = f"bin{k}_{rep}"
        counts[name] = _reads(rng, copies, int(round(cfg.reads_per_cell * len(cut))))
        rows.append({"sample": name, "kind": "bin", "bin": k, "replicate": rep, "cells": int(len(cut))})
    return counts, rows


def simulate(bins: pd.DataFrame, truth: pd.DataFrame, library: pd.DataFrame, synth: SynthConfig,
             cfg: SequenceConfig, class_name: str) -> dict[str, Any]:
    """Count table, sample sheet, the screen's gene truth and per-cell genotypes for every replicate."""
    from training.sim.synth import make_library

    rendered = rendered_cells(bins, truth)
    if rendered.empty:
        raise DataError("no binned cell carries a gRNA: the scores hold no simulated screen cell")
    sim_lib = make_library(synth)
    if not sim_lib.table[["grna", "gene"]].reset_index(drop=True).equals(
            library[["grna", "gene"]].reset_index(drop=True)):
        raise DataError("the library does not match the simulator's for these synth params (same synth.seed, "
                        "n_genes, grnas_per_gene, n_controls?)")
    names = library["grna"].to_numpy()
    table = library[["grna", "gene"]].rename(columns={"grna": "sgRNA", "gene": "Gene"}).reset_index(drop=True)
    rows: list[dict[str, Any]] = []
    cells: list[pd.DataFrame] = []
    info: dict[str, Any] = {"simulated": True, "virtual_cells_per_replicate": cfg.virtual_cells,
                            "rendered_screen_cells": int(len(rendered)), "replicates": {}}
    for r in range(1, cfg.replicates + 1):
        rng = np.random.default_rng([cfg.seed, r])
        if cfg.virtual_cells:
            pop, fallback = virtual_population(rendered, synth, cfg.virtual_cells, r, rng)
        else:
            pop, fallback = rendered, {}
        counts, sample_rows = sequence_replicate(pop, names, cfg, r, rng)
        for s, c in counts.items():
            table[s] = c
        rows += sample_rows
        if cfg.virtual_cells:
            cells.append(pop)
        info["replicates"][f"r{r}"] = {"cells": int(len(pop)), "binned": int((pop["bin"] > 0).sum()),
                                       "state_fallback": fallback}
    out: dict[str, Any] = {"counts": table, "samples": pd.DataFrame(rows), "info": info,
                           "genes": sim_lib.genes if cfg.virtual_cells else None}
    if cells:
        v = pd.concat(cells, ignore_index=True)
        cols = {"source_file": v["source_file"], "cell_id": v["cell_id"], f"prob_{class_name}": v["score"]}
        if "epistemic" in v.columns:
            cols["epistemic"] = v["epistemic"]
        out["virtual_cells"] = pd.DataFrame(cols)
        out["virtual_genotypes"] = v[["source_file", "cell_id", "grna"]]
    out["genotypes"] = rendered[["source_file", "cell_id", "grna"]]
    return out


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike, gene_truth: pd.DataFrame) -> Path:
    """Write the counts folder as a whole (atomically)."""
    from serving.screen.counts import write_count_table
    from training.io.atomic import atomic_path

    with atomic_path(out_dir, suffix="") as tmp:
        tmp.mkdir(parents=True)
        write_count_table(result["counts"], tmp / "counts.tsv")
        result["samples"].to_csv(tmp / "samples.csv", index=False)
        genes = result["genes"] if result["genes"] is not None else gene_truth
        genes.to_csv(tmp / "truth_genes.csv", index=False)
        result["genotypes"].to_csv(tmp / "genotypes.csv", index=False)
        if "virtual_cells" in result:
            result["virtual_cells"].to_parquet(tmp / "virtual_cells.parquet", index=False)
            result["virtual_genotypes"].to_csv(tmp / "virtual_genotypes.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(result["info"], indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)
