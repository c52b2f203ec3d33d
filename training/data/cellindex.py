"""The cell index: one row per cell (file, row, cell id, label, group, metadata), built from the
files' index datasets only. Pixels are never read here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from training.errors import DataError
from training.io.formats import CellFile
from training.io.tables import read_csv, read_table, require_columns

REQUIRED_COLUMNS = ("path", "label", "group")
METADATA_COLUMNS = ("condition", "timepoint", "replicate", "plate", "well", "treatment", "description")
INDEX_COLUMNS = ("source_file", "row", "cell_id", "label", "group")


def resolve_path(manifest: str | os.PathLike, path: str) -> str:
    """A manifest entry's path as the index names it: relative paths are taken from the manifest's folder."""
    return os.path.normpath(os.path.join(os.path.dirname(os.fspath(manifest)), path))


def read_manifest(manifest: str | os.PathLike) -> pd.DataFrame:
    """Validate a manifest CSV (``path,label,group`` + optional metadata columns)."""
    m = Path(manifest)
    df = read_csv(m, "manifest", hint="`spatial synth` writes the simulated screen's (`dvc repro synth`); for your "
                  "own files write one (README: Your own data)", dtype=str, keep_default_na=False)
    require_columns(df.columns, REQUIRED_COLUMNS, m, f"path,label,group[,{','.join(METADATA_COLUMNS)}]")
    unknown = [c for c in df.columns if c not in REQUIRED_COLUMNS + METADATA_COLUMNS]
    if unknown:
        raise DataError(f"{m}: unknown column(s) {', '.join(unknown)}; allowed metadata: {', '.join(METADATA_COLUMNS)}")
    if df.empty:
        raise DataError(f"{m}: manifest lists no files")
    for col in ("path", "group"):
        empty = df.index[df[col].str.strip() == ""].tolist()
        if empty:
            raise DataError(f"{m}: empty '{col}' on line(s) {', '.join(str(i + 2) for i in empty)}")
    dup = df["path"][df["path"].duplicated()].tolist()
    if dup:
        raise DataError(f"{m}: file(s) listed twice: {', '.join(dup)}")
    df["label"] = df["label"].str.strip()
    return df


def build_index(manifest: str | os.PathLike, progress: bool = True) -> pd.DataFrame:
    """Concatenate the cell ids of every manifest file into the cell index.

    ``label`` is empty (``<NA>``) for unlabeled screen files. Duplicated cell ids inside a file are an error
    (a cell id must name one cell to be cut out).
    """
    df = read_manifest(manifest)
    meta_cols = [c for c in METADATA_COLUMNS if c in df.columns]
    parts = []
    for rec in tqdm(df.to_dict("records"), desc="index", unit="file", disable=not progress):
        source = resolve_path(manifest, rec["path"])
        with CellFile(source) as f:
            ids = f.cell_ids()
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            raise DataError(f"{source}: duplicated cell ids in the index dataset (e.g. {uniq[counts > 1][:5].tolist()})")
        n = len(ids)
        part = pd.DataFrame({"source_file": source, "row": np.arange(n, dtype=np.int64), "cell_id": ids})
        part["label"] = rec["label"] or None
        part["group"] = rec["group"]
        for c in meta_cols:
            part[c] = rec[c]
        parts.append(part)
    index = pd.concat(parts, ignore_index=True)
    for col in ["source_file", "group", *meta_cols]:
        index[col] = index[col].astype("category")
    index["label"] = index["label"].astype("string")
    return index


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """The cell index ``spatial index`` wrote, checked for its columns."""
    index, _ = read_table(path, what="cell index", hint="`spatial index` writes it (`dvc repro index`)")
    require_columns(index.columns, INDEX_COLUMNS, path, "a cell index (`spatial index`)")
    return index


def labels_in(index: pd.DataFrame) -> list[str]:
    """Labels in order of first appearance (the default class order)."""
    return [str(x) for x in pd.unique(index["label"].dropna())]
