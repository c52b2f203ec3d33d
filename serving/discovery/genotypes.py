"""Cells -> gRNA -> gene for the discovery queue (``GENOTYPES.csv`` and ``LIBRARY.csv``, read and checked by
:mod:`serving.screen.counts`), and the simulated screen's genotypes from its truth table (``spatial genotypes``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from serving.screen.counts import read_genotypes, read_library
from training.errors import DataError
from training.io.atomic import atomic_path


def attach_genotypes(cells: pd.DataFrame, genotypes: str | os.PathLike, library: str | os.PathLike) -> pd.DataFrame:
    """``cells`` with ``grna, gene, is_control`` (NaN where a cell has no genotype). Genotype paths may be relative
    to the working directory; they are matched on absolute paths."""
    geno = read_genotypes(genotypes, read_library(library), library)
    out = cells.assign(source_file=cells["source_file"].astype(str).map(os.path.abspath))
    out = out.merge(geno, on=["source_file", "cell_id"], how="left", validate="many_to_one")
    return out.assign(source_file=cells["source_file"].to_numpy())


def genotypes_from_truth(truth: str | os.PathLike, raw_dir: str | os.PathLike, out: str | os.PathLike) -> int:
    """Simulator only: ``source_file,cell_id,grna`` of the screen cells from ``truth.parquet`` (paths relative to
    ``raw_dir``), written atomically; returns the number of cells."""
    t = pd.read_parquet(truth)
    missing = [c for c in ("path", "cell_id", "grna") if c not in t.columns]
    if missing:
        raise DataError(f"{truth}: no column(s) {', '.join(missing)}; expected the simulator's truth.parquet")
    t = t[t["grna"].notna() & (t["grna"].astype(str) != "")]
    df = pd.DataFrame({"source_file": [str(Path(raw_dir) / p) for p in t["path"]],
                       "cell_id": t["cell_id"].to_numpy(np.int64), "grna": t["grna"].astype(str).to_numpy()})
    with atomic_path(out, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    return len(df)
