"""Excision bins: every scored cell gets a bin by its probability of the phenotype class.

Bin 1 is the most extreme; 0 = not excised. ``thresholds`` mode uses lower score edges (the SPARCS autophagy screen:
``[0.99999, 0.999, 0.9975, 0.995, 0.99, 0.98]``, so bin 1 = [0.99999, 1], bin 2 = [0.999, 0.99999) ...);
``quantiles`` mode (the default) takes cumulative top shares of the eligible cells (``[0.001, 0.01, 0.03]``: top
0.1 %, 0.1-1 %, 1-3 %), by rank so ties cannot change a bin's size. Cells above a novelty or epistemic cut are left out (bin 0,
``excluded``): they are not the phenotype the classifier was trained for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import BinsConfig
from training.errors import DataError
from training.io.tables import cell_ids, require_columns

SCORE_COLUMNS = ("source_file", "cell_id")
META_COLUMNS = ("group", "plate", "well")


def read_scores(path: str | os.PathLike, class_name: str, extra: tuple[str, ...] = ("novelty", "epistemic"),
                finite: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The columns of a ``spatial score`` table that binning needs (never the embeddings).

    ``cell_id`` must be integers (a float column of whole numbers is cast to int64) and each ``(source_file,
    cell_id)`` one row. ``finite``: the columns of ``extra`` the caller uses, which must then hold finite numbers
    where present (default: every one of ``extra``; a model without a novelty model writes NaN novelty, so callers
    that do not use ``novelty`` leave it out)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: scores table not found (written by `spatial score`)")
    try:
        names = pq.ParquetFile(p).schema_arrow.names
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"{p}: not a readable Parquet table ({exc})") from None
    classes = [c[len("prob_"):] for c in names if c.startswith("prob_")]
    require_columns(names, SCORE_COLUMNS, p, "a `spatial score` table")
    if class_name not in classes:
        raise DataError(f"{p}: no class '{class_name}' among the scored classes ({', '.join(classes) or 'none'})")
    cols = [*SCORE_COLUMNS, *[f"prob_{c}" for c in classes], *[c for c in extra if c in names]]
    df = pq.read_table(p, columns=cols).to_pandas()
    df["cell_id"] = integer_cell_ids(df, p)
    check_unique_cells(df, p)
    for c in (extra if finite is None else finite):
        if c in df.columns:
            check_finite(df, c, p)
    for c in classes:
        prob = df[f"prob_{c}"].to_numpy(float)
        bad = ~((prob >= 0) & (prob <= 1))  # NaN included
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{p}: prob_{c} of cell {df['cell_id'].iloc[i]} ({df['source_file'].iloc[i]}) is "
                            f"{prob[i]}; probabilities must be in [0, 1]")
    return df, classes


def integer_cell_ids(df: pd.DataFrame, path: str | os.PathLike) -> pd.Series:
    """``df["cell_id"]`` as int64 (``training.io.tables.cell_ids``: a float column of whole numbers, what a nullable
    integer column may come back as, is cast; text is refused in a table ``spatial score`` writes)."""
    ids = df["cell_id"]
    values, bad = cell_ids(ids, numeric_only=True)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: column 'cell_id' must hold integer cell ids; row {i} (counting from 0, source_file "
                        f"{df['source_file'].iloc[i]}) holds {ids.iloc[i]!r} ({ids.dtype} column)")
    return pd.Series(values, index=ids.index, name=ids.name)


def check_unique_cells(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Each cell once: no two rows with the same ``(source_file, cell_id)`` (source files compared as absolute
    paths, as the callers join them)."""
    source = df["source_file"].astype(str)
    key = pd.DataFrame({"source_file": source.map({s: os.path.abspath(s) for s in source.unique()}),
                        "cell_id": df["cell_id"].to_numpy()})
    dup = key.duplicated().to_numpy()
    if dup.any():
        j = int(np.argmax(dup))
        same = (key["source_file"] == key["source_file"].iloc[j]).to_numpy() & (
            key["cell_id"] == key["cell_id"].iloc[j]).to_numpy()
        i = int(np.argmax(same))
        raise DataError(f"{path}: cell {df['cell_id'].iloc[j]} of {df['source_file'].iloc[j]} is listed twice (rows "
                        f"{i} and {j}, counting from 0); each (source_file, cell_id) must be one row")


def check_finite(df: pd.DataFrame, column: str, path: str | os.PathLike) -> None:
    """``column`` holds finite numbers (NaN would crash the plots or pass any cut unnoticed)."""
    try:
        v = df[column].to_numpy(float)
    except (TypeError, ValueError):
        raise DataError(f"{path}: column '{column}' must hold numbers, not {df[column].dtype} values") from None
    bad = ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: column '{column}' of cell {df['cell_id'].iloc[i]} ({df['source_file'].iloc[i]}) "
                        f"is {v[i]}; {column} must be a finite number")


def manifest_meta(manifest: str | os.PathLike | None) -> pd.DataFrame | None:
    """``source_file`` (absolute) -> group / plate / well from a manifest, or None without one."""
    if not manifest:
        return None
    from training.data.cellindex import read_manifest, resolve_path

    m = read_manifest(manifest)
    out = pd.DataFrame({"source_file": [os.path.abspath(resolve_path(manifest, p)) for p in m["path"]]})
    for c in META_COLUMNS:
        if c in m.columns:
            out[c] = m[c].to_numpy()
    return out


def check_cuts(df: pd.DataFrame, cfg: BinsConfig, path: str | os.PathLike) -> np.ndarray:
    """Cells left out by the novelty / epistemic cuts."""
    out = np.zeros(len(df), bool)
    for col, cut in (("novelty", cfg.max_novelty), ("epistemic", cfg.max_epistemic)):
        if cut is None:
            continue
        if col not in df.columns:
            raise DataError(f"{path}: bins.max_{col} is set but the table has no '{col}' column")
        out |= df[col].to_numpy(float) > cut
    return out


def assign(score: np.ndarray, eligible: np.ndarray, cfg: BinsConfig) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Bin per cell (0 = not excised) and each bin's score range ``(lower, upper)``."""
    n_bins = len(cfg.thresholds) if cfg.mode == "thresholds" else len(cfg.quantiles)
    b = np.zeros(len(score), np.int64)
    ranges: list[tuple[float, float]] = []
    if cfg.mode == "thresholds":
        edges = [1.0, *cfg.thresholds]
        for k in range(n_bins):
            lo, hi = edges[k + 1], edges[k]
            sel = eligible & (score >= lo) & ((score < hi) if k else np.ones(len(score), bool)) & (b == 0)
            b[sel] = k + 1
            ranges.append((lo, hi))
        return b, ranges
    idx = np.nonzero(eligible)[0]
    order = idx[np.argsort(-score[idx], kind="stable")]
    cum = [0, *[int(round(q * len(idx))) for q in cfg.quantiles]]
    for k in range(n_bins):
        members = order[cum[k]:cum[k + 1]]
        b[members] = k + 1
        ranges.append((float(score[members].min()) if len(members) else float("nan"),
                       float(score[members].max()) if len(members) else float("nan")))
    return b, ranges


def make_bins(scores: str | os.PathLike, cfg: BinsConfig, class_name: str | None = None,
              manifest: str | os.PathLike | None = None) -> dict[str, Any]:
    """Bin every cell of a scores table; returns ``bins`` (per cell), ``counts`` (per bin) and ``cell_sets``."""
    cls = class_name or cfg.class_name
    used = tuple(c for c, cut in (("novelty", cfg.max_novelty), ("epistemic", cfg.max_epistemic)) if cut is not None)
    df, classes = read_scores(scores, cls, finite=used)
    score = df[f"prob_{cls}"].to_numpy(float)
    excluded = check_cuts(df, cfg, scores)
    b, ranges = assign(score, ~excluded, cfg)
    out = pd.DataFrame({"source_file": df["source_file"].astype(str), "cell_id": df["cell_id"].astype(np.int64),
                        "bin": b, "score": score, "excluded": excluded})
    for c in ("novelty", "epistemic"):
        if c in df.columns:
            out[c] = df[c].to_numpy(float)
    meta = manifest_meta(manifest)
    if meta is not None:
        key = out["source_file"].map(os.path.abspath)
        for c in meta.columns[1:]:
            out[c] = key.map(dict(zip(meta["source_file"], meta[c], strict=True))).fillna("").astype(str)
    n = len(out)
    rows = []
    for k, (lo, hi) in enumerate(ranges, start=1):
        sel = b == k
        rows.append({"bin": k, "lower": lo, "upper": hi, "cells": int(sel.sum()),
                     "share_of_imaged": float(sel.sum() / n) if n else 0.0,
                     "expected_phenotype_cells": float(score[sel].sum())})
    rows.append({"bin": 0, "lower": float("nan"), "upper": float("nan"), "cells": int((b == 0).sum()),
                 "share_of_imaged": float((b == 0).sum() / n) if n else 0.0,
                 "expected_phenotype_cells": float(score[b == 0].sum())})
    counts = pd.DataFrame(rows)
    counts["excluded_cells"] = [0] * (len(rows) - 1) + [int(excluded.sum())]
    return {"bins": out, "counts": counts, "cell_sets": cell_sets(out), "classes": classes, "class_name": cls}


def cell_sets(bins: pd.DataFrame) -> list[dict[str, Any]]:
    """The per-bin cell lists as scPortrait's selection step takes them: one set per bin and slide, each with a
    ``name``, the cell ids (``classes``) and the ``well`` (plus the slide and source file, for the record)."""
    sets = []
    sel = bins[bins["bin"] > 0]
    slide_col = "group" if "group" in sel.columns else "source_file"
    for (k, slide, source), part in sel.groupby(["bin", slide_col, "source_file"], sort=True):
        well = str(part["well"].iloc[0]) if "well" in part.columns and part["well"].iloc[0] else str(slide)
        name = f"bin{int(k)}_{Path(str(slide)).stem}"
        sets.append({"name": name, "bin": int(k), "classes": part["cell_id"].astype(int).tolist(), "well": well,
                     "slide": str(slide), "source_file": str(source)})
    return sets


def write_bins(result: dict[str, Any], out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """``bins.parquet``, ``bin_counts.csv``, ``cell_sets.json`` into ``out_dir`` (written as a whole, atomically)."""
    from training.io.atomic import atomic_path
    from training.io.tables import write_table

    with atomic_path(out_dir, suffix="") as tmp:
        tmp.mkdir(parents=True)
        write_table(result["bins"], tmp / "bins.parquet", meta)
        result["counts"].to_csv(tmp / "bin_counts.csv", index=False)
        (tmp / "cell_sets.json").write_text(json.dumps(result["cell_sets"]) + "\n")
    return Path(out_dir)
