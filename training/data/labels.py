"""Cell labels a person gave (``labels.csv``) and how they join the manifest's slide labels.

``labels.csv`` is an append-only history, one row per action: ``source_file,cell_id,label,annotator,time``
(``time`` ISO 8601 UTC). A label is a class name, ``unsure`` (looked at, no call), ``new:<name>`` (a phenotype
outside the classes; it trains as class ``<name>`` once ``<name>`` is in ``split.classes``, otherwise it is a
held-out class) or ``undo`` (takes back that annotator's latest label of the cell). Replaying the history per cell
gives its current label: the latest one wins.

Joining (:func:`apply_cell_labels`): a cell's label wins over its slide's label, in every regime, because the split
is built from the joined table. Cells of the fixed test slides keep their slide labels (the test split stays the
one the registry compares models on); ``unsure`` cells keep what they had.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from training.errors import DataError
from training.io.tables import cell_ids, read_csv

log = logging.getLogger(__name__)
COLUMNS = ("source_file", "cell_id", "label", "annotator", "time")
UNSURE = "unsure"
UNDO = "undo"
NEW_PREFIX = "new:"


def empty_history() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "cell_id" else "object") for c in COLUMNS})


def read_history(path: str | os.PathLike) -> pd.DataFrame:
    """Every row of a labels file, validated; an absent or header-only file is an empty history."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return empty_history()
    table = read_csv(p, "labels CSV", dtype=str, keep_default_na=False)
    unknown = [c for c in table.columns if c not in COLUMNS]
    missing = [c for c in COLUMNS if c not in table.columns]
    if unknown or missing:
        what = "; ".join(x for x in (unknown and f"unknown column(s) {', '.join(unknown)}",
                                     missing and f"missing column(s) {', '.join(missing)}") if x)
        raise DataError(f"{p}: {what}; expected {','.join(COLUMNS)}")
    ids, bad = cell_ids(table["cell_id"])
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{p}: line {i + 2}: cell_id '{table['cell_id'].iloc[i]}' is not an integer")
    table["cell_id"] = ids
    table["label"] = table["label"].str.strip()
    for col in ("source_file", "label"):
        empty = np.nonzero((table[col] == "").to_numpy())[0]
        if len(empty):
            raise DataError(f"{p}: line {int(empty[0]) + 2}: empty {col}")
    new = table["label"].str.startswith(NEW_PREFIX)
    if (table.loc[new, "label"].str.len() <= len(NEW_PREFIX)).any():
        raise DataError(f"{p}: a '{NEW_PREFIX}' label needs a name, e.g. '{NEW_PREFIX}vacuolated'")
    return table[list(COLUMNS)].reset_index(drop=True)


def class_name(label: str) -> str:
    """The class a label trains as (``new:<name>`` -> ``<name>``)."""
    return label[len(NEW_PREFIX):] if label.startswith(NEW_PREFIX) else label


def replay(history: pd.DataFrame, by_annotator: bool = False) -> pd.DataFrame:
    """Current label per cell (or per cell and annotator): file order, ``undo`` pops that annotator's latest label.

    Returns ``source_file, cell_id, label, annotator, time`` of each cell's winning row (cells whose every label
    was undone are absent)."""
    if history.empty:
        return empty_history()
    stacks: dict[tuple, list[int]] = {}
    for i, (f, c, lab, who) in enumerate(zip(history["source_file"], history["cell_id"], history["label"],
                                             history["annotator"], strict=True)):
        key = (f, int(c), who) if by_annotator else (f, int(c))
        stack = stacks.setdefault(key, [])
        if lab == UNDO:
            mine = [j for j in stack if history["annotator"].iat[j] == who]
            if mine:
                stack.remove(mine[-1])
        else:
            stack.append(i)
    rows = sorted(s[-1] for s in stacks.values() if s)
    return history.iloc[rows].reset_index(drop=True)


def current_labels(path: str | os.PathLike) -> pd.DataFrame:
    return replay(read_history(path))


def abs_keys(files: pd.Series, ids: pd.Series | np.ndarray) -> pd.MultiIndex:
    """(absolute source_file, cell_id) keys: relative and absolute names of one file agree."""
    names = files.astype(str)
    uniq = pd.unique(names)
    absolute = dict(zip(uniq, (os.path.abspath(f) for f in uniq), strict=True))
    return pd.MultiIndex.from_arrays([names.map(absolute).to_numpy(), np.asarray(ids, dtype=np.int64)])


def check_known(labels: pd.DataFrame, index: pd.DataFrame, allowed: set[str], path: str | os.PathLike) -> None:
    """Every labeled cell is in the index, every label is allowed (or ``unsure`` / ``new:<name>``)."""
    if labels.empty:
        return
    pos = abs_keys(index["source_file"], index["cell_id"]).get_indexer(abs_keys(labels["source_file"],
                                                                                labels["cell_id"]))
    if (pos < 0).any():
        miss = labels.loc[pos < 0, ["source_file", "cell_id"]].head(3).to_records(index=False).tolist()
        raise DataError(f"{path}: {int((pos < 0).sum())} labeled cell(s) are not in the manifest's files, e.g. {miss}")
    bad = sorted({lab for lab in labels["label"] if lab != UNSURE and not lab.startswith(NEW_PREFIX)
                  and lab not in allowed})
    if bad:
        raise DataError(f"{path}: label(s) {', '.join(bad)} are not configured classes ({', '.join(sorted(allowed))}); "
                        f"use a class, '{UNSURE}' or '{NEW_PREFIX}<name>'")


def apply_cell_labels(index: pd.DataFrame, labels: pd.DataFrame, protected_groups: set[str] | None = None,
                      path: str | os.PathLike = "labels.csv", allowed: set[str] | None = None
                      ) -> tuple[pd.DataFrame, np.ndarray]:
    """The index with cell labels over slide labels; returns it and a mask of the rows a person labeled.

    ``labels`` are current labels (:func:`replay`). ``unsure`` leaves a cell as it was; cells of
    ``protected_groups`` (the fixed test slides) keep their slide label."""
    out = index.copy()
    mask = np.zeros(len(out), dtype=bool)
    if labels.empty:
        return out, mask
    known = set(out["label"].dropna().astype(str)) | (allowed or set())
    check_known(labels, out, known, path)
    use = labels[labels["label"] != UNSURE]
    pos = abs_keys(out["source_file"], out["cell_id"]).get_indexer(abs_keys(use["source_file"], use["cell_id"]))
    values = use["label"].map(class_name).to_numpy()
    if protected_groups:
        keep = ~out["group"].astype(str).iloc[pos].isin(protected_groups).to_numpy()
        if (~keep).any():
            log.warning("%s: %d label(s) on cells of the fixed test slides are not used (the test split stays fixed)",
                        path, int((~keep).sum()))
        pos, values = pos[keep], values[keep]
    out["label"] = out["label"].astype("string")
    out.iloc[pos, out.columns.get_loc("label")] = values
    mask[pos] = True
    return out, mask
