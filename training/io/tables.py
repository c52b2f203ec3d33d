"""Parquet tables that carry the params that made them (in the schema metadata)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.errors import DataError
from training.io.atomic import atomic_path

META_KEY = b"spatial"


def write_table(df: pd.DataFrame, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``df`` atomically as Parquet with ``meta`` (JSON) in the schema metadata."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta)})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _not_found(path: Path, what: str, hint: str | None) -> DataError:
    """``PATH: WHAT not found``, and then ``hint``: for a file the project makes itself, which command writes it."""
    return DataError(f"{path}: {what} not found" + (f"; {hint}" if hint else ""))


def require_columns(present: Iterable[str], required: Sequence[str], path: str | os.PathLike,
                    expected: str | None = None) -> None:
    """:class:`DataError` naming ``path`` and the ``required`` columns missing from ``present``, then what was
    ``expected`` (default: the required columns, comma-separated)."""
    have = set(present)
    missing = [c for c in required if c not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {expected or ','.join(required)}")


def read_table(path: str | os.PathLike, columns: list[str] | None = None, what: str = "table",
               hint: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by ``write_table``; returns ``(df, meta)``. ``hint``: said when it is missing (which
    command writes it)."""
    p = Path(path)
    if not p.is_file():
        raise _not_found(p, what, hint)
    try:
        table = pq.read_table(p, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{p}: not a readable Parquet table ({exc})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table.to_pandas(), (json.loads(raw) if raw else {})


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file, or :class:`DataError` naming it when it is missing or not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not valid JSON ({exc})") from None


def read_csv(path: str | os.PathLike, what: str = "CSV", hint: str | None = None, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv(path, **kwargs)``, or :class:`DataError` naming the file (as ``what``, e.g. "manifest") when it
    is missing or cannot be parsed: the one way every checked table of the project is read."""
    p = Path(path)
    if not p.is_file():
        raise _not_found(p, what, hint)
    try:
        return pd.read_csv(p, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not a readable {what} ({str(exc).splitlines()[0]})") from None


def cell_ids(values: pd.Series, numeric_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as int64 cell ids, and the mask of entries that are not one: the one rule for a ``cell_id`` column.

    A cell id is a whole number within int64. Integer columns are taken as they are; a float column (a nullable
    integer column read back, a CSV with a blank) and text (a CSV read with ``dtype=str``; not with ``numeric_only``,
    for a table this project writes) are parsed, and NaN, inf, fractions, text and overflow are flagged, never cast
    into another id (nor a float beyond 2**53, which need not be the number written). Flagged entries hold 0 in the returned ids; the caller names the first in its own words."""
    kind = values.dtype.kind
    if kind in "iu":  # numpy or nullable (pandas "Int64") integers
        missing = values.isna().to_numpy()
        raw = values.fillna(0).to_numpy()
        bad = missing | (raw > np.iinfo(np.int64).max) if kind == "u" else missing
        return np.where(bad, 0, raw).astype(np.int64), bad
    if kind != "f" and numeric_only:
        return np.zeros(len(values), np.int64), np.ones(len(values), bool)
    parsed = values if kind == "f" else pd.to_numeric(values, errors="coerce")
    if parsed.dtype.kind in "iu":  # every text entry was a whole number
        return cell_ids(parsed)
    v = parsed.to_numpy(np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):  # beyond 2**53 a float is not the whole number that was written
        bad = ~(np.isfinite(v) & (v == np.floor(v)) & (np.abs(v) <= 2.0**53))
    return np.where(bad, 0, v).astype(np.int64), bad
