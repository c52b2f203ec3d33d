"""Cells -> gRNA -> gene: reading ``GENOTYPES.csv`` / ``LIBRARY.csv`` for the discovery queue, and the simulated
screen's genotypes from its truth table (``spatial genotypes``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from training.errors import DataError
from training.io.atomic import atomic_path


def read_csv(path: str | os.PathLike, columns: list[str], what: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: unreadable {what} CSV ({exc})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: {what} CSV lacks column(s) {', '.join(missing)} (needs {', '.join(columns)})")
    return df


def _key(source: pd.Series) -> pd.Series:
    return source.astype(str).map(lambda s: os.path.normpath(os.path.abspath(s)))


def attach_genotypes(cells: pd.DataFrame, genotypes: str | os.PathLike, library: str | os.PathLike) -> pd.DataFrame:
    """``cells`` with ``grna, gene, is_control`` (NaN where a cell has no genotype). Genotype paths may be relative
    to the working directory; they are matched on absolute paths."""
    geno = read_csv(genotypes, ["source_file", "cell_id", "grna"], "genotypes")
    lib = read_csv(library, ["grna", "gene", "is_control"], "library")
    if geno.duplicated(["source_file", "cell_id"]).any():
        raise DataError(f"{genotypes}: some cells are listed twice (source_file, cell_id)")
    unknown = sorted(set(geno["grna"].dropna().astype(str)) - set(lib["grna"].astype(str)))
    if unknown:
        raise DataError(f"{genotypes}: gRNA(s) not in {library}: {', '.join(unknown[:5])}")
    geno = geno.assign(key=_key(geno["source_file"]), grna=geno["grna"].astype(str))
    geno = geno.merge(lib.assign(grna=lib["grna"].astype(str)), on="grna", how="left")
    out = cells.assign(key=_key(cells["source_file"]))
    out = out.merge(geno[["key", "cell_id", "grna", "gene", "is_control"]], on=["key", "cell_id"], how="left")
    return out.drop(columns="key")


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
