"""Screen read-out tables: the MAGeCK count table, the sample sheet, the gRNA library, per-cell genotypes and the
simulator's gene truth.

- ``COUNTS.tsv`` (MAGeCK ``count`` format): tab-separated ``sgRNA``, ``Gene``, one non-negative integer column per
  sample, so tables from ``mageck count`` or any other counter work as they are.
- ``SAMPLES.csv``: ``sample,kind,bin,replicate,cells`` (``kind`` = library | bin; ``bin`` 1 = most extreme, empty
  for a library sample; ``cells`` = cells cut for a bin, cells in the library sample otherwise).
- ``LIBRARY.csv``: ``grna,gene,is_control`` (what ``spatial synth`` writes).
- ``GENOTYPES.csv``: ``source_file,cell_id,grna``, one row per cell whose barcode was read (optical pooled screens);
  an empty ``grna`` is a cell without a genotype.
- ``truth_genes.csv`` (simulator only): ``gene,role,effect``.

Every reader checks its file and raises :class:`training.errors.DataError` with one line naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.errors import DataError
from training.io.tables import cell_ids, read_csv, require_columns

SAMPLE_COLUMNS = ("sample", "kind", "bin", "replicate", "cells")
LIBRARY_COLUMNS = ("grna", "gene", "is_control")
GENOTYPE_COLUMNS = ("source_file", "cell_id", "grna")
TRUTH_COLUMNS = ("gene", "role", "effect")
KINDS = ("library", "bin")
TRUE_WORDS = {"true", "1", "yes", "t", "y"}
FALSE_WORDS = {"false", "0", "no", "f", "n", ""}
INT64_MAX = int(np.iinfo(np.int64).max)


def beyond_int64(values: pd.Series) -> np.ndarray:
    """Which parsed numbers (``pd.to_numeric``'s int64, uint64, float64 or object result) are above the int64
    maximum, so a cast to int64 would wrap them round (inf included; NaN is not). Compared as exact Python numbers,
    never as float64, where 2**63 and ``INT64_MAX`` are the same number."""
    if values.dtype.kind == "i":
        return np.zeros(len(values), bool)
    return np.fromiter((v > INT64_MAX for v in values.tolist()), bool, len(values))


def read_count_table(path: str | os.PathLike) -> pd.DataFrame:
    """A MAGeCK count table: ``sgRNA`` and ``Gene`` as strings, every other column a non-negative int64."""
    df = read_csv(path, "count table", sep="\t", dtype=str, keep_default_na=False)
    if list(df.columns[:2]) != ["sgRNA", "Gene"]:
        raise DataError(f"{path}: expected a tab-separated MAGeCK count table starting with columns sgRNA, Gene; "
                        f"got {', '.join(map(str, df.columns[:3]))}")
    samples = list(df.columns[2:])
    if not samples:
        raise DataError(f"{path}: no sample columns after sgRNA, Gene")
    if df.empty:
        raise DataError(f"{path}: no gRNA rows")
    dup = df["sgRNA"][df["sgRNA"].duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: sgRNA(s) listed twice: {', '.join(dup[:5])}")
    out = df[["sgRNA", "Gene"]].copy()
    for s in samples:
        raw = df[s].str.strip()
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna() | (values != np.floor(values.fillna(0)))
        if bad.any():
            i = int(np.argmax(bad.to_numpy()))
            raise DataError(f"{path}: column '{s}' holds a non-integer count '{raw.iloc[i]}' "
                            f"(sgRNA {df['sgRNA'].iloc[i]}); counts must be integers >= 0")
        if (values < 0).any():
            i = int(np.argmax((values < 0).to_numpy()))
            raise DataError(f"{path}: column '{s}' holds a negative count {raw.iloc[i]} (sgRNA {df['sgRNA'].iloc[i]})")
        huge = beyond_int64(values)
        if huge.any():
            i = int(np.argmax(huge))
            raise DataError(f"{path}: column '{s}' holds a count '{raw.iloc[i]}' too large for a 64-bit integer "
                            f"(sgRNA {df['sgRNA'].iloc[i]}); counts must be at most {INT64_MAX}")
        out[s] = values.astype(np.int64)
    return out


def read_library(path: str | os.PathLike) -> pd.DataFrame:
    """``grna, gene, is_control`` with at least one non-targeting control gRNA."""
    df = read_csv(path, "gRNA library", dtype=str, keep_default_na=False)
    require_columns(df.columns, LIBRARY_COLUMNS, path)
    words = df["is_control"].str.strip().str.lower()
    bad = ~words.isin(TRUE_WORDS | FALSE_WORDS)
    if bad.any():
        raise DataError(f"{path}: is_control must be true/false, got '{df['is_control'][bad].iloc[0]}'")
    dup = df["grna"][df["grna"].duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: gRNA(s) listed twice: {', '.join(dup[:5])}")
    blank = df["grna"].str.strip().eq("") | df["gene"].str.strip().eq("")
    if blank.any():
        i = int(blank.to_numpy().argmax())
        raise DataError(f"{path}: row {i + 2} has an empty grna or gene; every gRNA needs its gene "
                        "(non-targeting controls too, e.g. 'non-targeting')")
    out = pd.DataFrame({"grna": df["grna"], "gene": df["gene"], "is_control": words.isin(TRUE_WORDS)})
    if not out["is_control"].any():
        raise DataError(f"{path}: no non-targeting control gRNA (is_control true); NT gRNAs are the only honest null")
    return out


def read_genotypes(path: str | os.PathLike, library: pd.DataFrame, library_path: str | os.PathLike
                   ) -> pd.DataFrame:
    """``source_file`` (absolute), ``cell_id`` (int64), ``grna``, ``gene``, ``is_control`` of every genotyped cell;
    ``library`` is :func:`read_library`'s table. Rows with an empty ``grna`` (barcode not read) are left out."""
    df = read_csv(path, "genotypes table", dtype=str, keep_default_na=False)
    require_columns(df.columns, GENOTYPE_COLUMNS, path)
    df = df[df["grna"].str.strip() != ""]
    ids, bad = cell_ids(df["cell_id"].str.strip())
    if bad.any():
        raise DataError(f"{path}: cell_id must be an integer, got '{df['cell_id'][bad].iloc[0]}'")
    unknown = df["grna"][~df["grna"].isin(library["grna"])]
    if len(unknown):
        raise DataError(f"{path}: {len(unknown)} cell(s) carry gRNA(s) missing from {library_path} "
                        f"(e.g. {unknown.iloc[0]})")
    out = pd.DataFrame({"source_file": df["source_file"].map(os.path.abspath), "cell_id": ids,
                        "grna": df["grna"]})
    if out.duplicated(["source_file", "cell_id"]).any():
        first = out[out.duplicated(["source_file", "cell_id"])].iloc[0]
        raise DataError(f"{path}: cell {first['cell_id']} of {first['source_file']} is listed twice")
    return out.merge(library, on="grna", how="left", validate="many_to_one").reset_index(drop=True)


def read_truth(path: str | os.PathLike, columns: tuple[str, ...] = TRUTH_COLUMNS) -> pd.DataFrame:
    """The simulator's ``truth_genes.csv`` (``gene, role, effect`` per gene); ``columns``: the ones the caller
    needs. ``effect``, where present, is a number."""
    df = read_csv(path, "gene truth", dtype=str, keep_default_na=False)
    require_columns(df.columns, columns, path, ",".join(TRUTH_COLUMNS))
    if "effect" not in df.columns:
        return df
    effect = pd.to_numeric(df["effect"].str.strip(), errors="coerce")
    if effect.isna().any():
        raise DataError(f"{path}: effect must be a number, got '{df['effect'][effect.isna()].iloc[0]}' "
                        f"(gene {df['gene'][effect.isna()].iloc[0]})")
    return df.assign(effect=effect)


@dataclass(frozen=True)
class SampleSheet:
    """The validated sample sheet, in count-table column order."""

    table: pd.DataFrame  # sample, kind, bin (Int64, <NA> for libraries), replicate (str), cells (int64)

    @property
    def replicates(self) -> list[str]:
        return sorted(self.table["replicate"].unique().tolist())

    def of(self, kind: str, replicate: str | None = None) -> pd.DataFrame:
        t = self.table[self.table["kind"] == kind]
        return t if replicate is None else t[t["replicate"] == replicate]


def read_sample_sheet(path: str | os.PathLike, count_columns: list[str], counts_path: str | os.PathLike = "COUNTS"
                      ) -> SampleSheet:
    """``sample,kind,bin,replicate,cells``; every sample must be a column of the count table and vice versa."""
    df = read_csv(path, "sample sheet", dtype=str, keep_default_na=False)
    require_columns(df.columns, SAMPLE_COLUMNS, path)
    df = df[list(SAMPLE_COLUMNS)].apply(lambda c: c.str.strip())
    dup = df["sample"][df["sample"].duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: sample(s) listed twice: {', '.join(dup)}")
    not_in_counts = [s for s in df["sample"] if s not in count_columns]
    not_in_sheet = [s for s in count_columns if s not in set(df["sample"])]
    if not_in_counts or not_in_sheet:
        parts = []
        if not_in_counts:
            parts.append(f"sample(s) {', '.join(not_in_counts)} are not columns of {counts_path}")
        if not_in_sheet:
            parts.append(f"count column(s) {', '.join(not_in_sheet)} are not in the sheet")
        raise DataError(f"{path}: does not match the count table: {'; '.join(parts)}")
    bad_kind = df["kind"][~df["kind"].isin(KINDS)].tolist()
    if bad_kind:
        raise DataError(f"{path}: kind must be library or bin, got '{bad_kind[0]}'")
    cells = pd.to_numeric(df["cells"], errors="coerce")
    if cells.isna().any() or (cells < 0).any() or (cells != np.floor(cells.fillna(0))).any():
        i = int(np.argmax((cells.isna() | (cells < 0) | (cells != np.floor(cells.fillna(0)))).to_numpy()))
        raise DataError(f"{path}: sample '{df['sample'].iloc[i]}': cells must be an integer >= 0, "
                        f"got '{df['cells'].iloc[i]}'")
    huge = beyond_int64(cells)
    if huge.any():
        i = int(np.argmax(huge))
        raise DataError(f"{path}: sample '{df['sample'].iloc[i]}': cells '{df['cells'].iloc[i]}' is too large for a "
                        f"64-bit integer (at most {INT64_MAX})")
    bins = pd.to_numeric(df["bin"], errors="coerce")
    is_bin = df["kind"] == "bin"
    bad_bin = is_bin & (bins.isna() | (bins < 1) | (bins != np.floor(bins.fillna(0))))
    if bad_bin.any():
        s = df["sample"][bad_bin].iloc[0]
        raise DataError(f"{path}: bin sample '{s}' needs a bin number >= 1 (1 = most extreme)")
    huge_bin = is_bin.to_numpy() & beyond_int64(bins)
    if huge_bin.any():
        i = int(np.argmax(huge_bin))
        raise DataError(f"{path}: bin sample '{df['sample'].iloc[i]}': bin '{df['bin'].iloc[i]}' is too large for a "
                        f"64-bit integer")
    lib_with_bin = ~is_bin & (df["bin"] != "")
    if lib_with_bin.any():
        raise DataError(f"{path}: library sample '{df['sample'][lib_with_bin].iloc[0]}' must have an empty bin")
    if df["replicate"].eq("").any():
        raise DataError(f"{path}: sample '{df['sample'][df['replicate'].eq('')].iloc[0]}' has no replicate")
    if not is_bin.any():
        raise DataError(f"{path}: no bin sample (kind = bin)")
    if is_bin.all():
        raise DataError(f"{path}: no library sample (kind = library): enrichment needs the unsorted library")
    out = pd.DataFrame({"sample": df["sample"], "kind": df["kind"], "bin": bins.where(is_bin).astype("Int64"),
                        "replicate": df["replicate"], "cells": cells.astype(np.int64)})
    order = {s: i for i, s in enumerate(count_columns)}
    out = out.iloc[np.argsort([order[s] for s in out["sample"]], kind="stable")].reset_index(drop=True)
    return SampleSheet(out)


def check_library(counts: pd.DataFrame, library: pd.DataFrame, counts_path: str | os.PathLike,
                  library_path: str | os.PathLike) -> pd.DataFrame:
    """Join the count table with the library: every gRNA must be in the library under the same gene.

    Returns the count table with an ``is_control`` column (library gRNAs absent from the table are left out)."""
    lib = library.set_index("grna")
    missing = counts["sgRNA"][~counts["sgRNA"].isin(lib.index)]
    if len(missing):
        genes = counts.loc[missing.index, "Gene"].unique().tolist()
        raise DataError(f"{counts_path}: {len(missing)} gRNA(s) missing from {library_path} "
                        f"(e.g. {missing.iloc[0]} of gene {', '.join(genes[:3])})")
    other = lib.loc[counts["sgRNA"], "gene"].to_numpy() != counts["Gene"].to_numpy()
    if other.any():
        i = int(np.argmax(other))
        raise DataError(f"{counts_path}: gRNA {counts['sgRNA'].iloc[i]} is gene {counts['Gene'].iloc[i]} here but "
                        f"{lib.loc[counts['sgRNA'].iloc[i], 'gene']} in {library_path}")
    out = counts.copy()
    out.insert(2, "is_control", lib.loc[counts["sgRNA"], "is_control"].to_numpy())
    if not out["is_control"].any():
        raise DataError(f"{counts_path}: none of its gRNAs is a non-targeting control of {library_path}")
    return out


def write_count_table(counts: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a MAGeCK count table (atomically)."""
    from training.io.atomic import atomic_path

    with atomic_path(path, suffix=".tsv") as tmp:
        counts.to_csv(tmp, sep="\t", index=False)
    return Path(path)
