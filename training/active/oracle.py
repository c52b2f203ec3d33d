"""Oracles: who answers an active-learning query ("which class is this cell?").

Every oracle maps cells (``source_file``, ``cell_id``) to a class index, or ``NO_CLASS`` (-1) when the cell is
none of the configured classes (debris, a doublet, a phenotype outside the classes): such a query costs a
label but adds nothing to train on, as with a person who answers "none of these".

* :class:`SimulatedOracle` - the simulated annotator: reads the simulator's true per-cell state
  (``truth.parquet``) and names the class whose phenotype that state is (``al.state_classes``; by default
  on -> stimulated, off -> unstimulated, blocked -> atg5_ko, partial -> ei24_ko). It looks at the cell, not the
  slide: an ATG5-KO cell that escaped the knockout is answered "stimulated".
* :class:`ManifestOracle` - the slide's label from the cell index (the classic simulated campaign on a labeled
  data set); cells of unlabeled slides or other labels are ``NO_CLASS``.
* :class:`LabelsCsvOracle` - labels a person gave, CSV ``source_file,cell_id,label``; only those cells can be
  queried.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.cellindex import resolve_path
from training.errors import ConfigError, DataError
from training.io.tables import cell_ids, read_csv, require_columns

NO_CLASS = -1
LABEL_COLUMNS = ("source_file", "cell_id", "label")
KNOWN_STATES = frozenset({"on", "partial", "off", "blocked", "novel", "debris", "doublet"})


def cell_keys(cells: pd.DataFrame) -> pd.MultiIndex:
    """(absolute source_file, cell_id) keys of a cell table: relative and absolute names of a file agree."""
    files = cells["source_file"].astype(str)
    uniq = pd.unique(files)
    absolute = dict(zip(uniq, (os.path.abspath(f) for f in uniq), strict=True))
    return pd.MultiIndex.from_arrays(
        [files.map(absolute).to_numpy(), cells["cell_id"].to_numpy(np.int64)], names=["source_file", "cell_id"],
    )


def _lookup(series: pd.Series, cells: pd.DataFrame, what: str) -> np.ndarray:
    """Values of ``series`` (indexed by cell keys) for ``cells``; cells it lacks are a DataError."""
    keys = cell_keys(cells)
    pos = series.index.get_indexer(keys)
    if (pos < 0).any():
        miss = keys[pos < 0][:3].tolist()
        raise DataError(f"{what} has no entry for {int((pos < 0).sum())} queried cell(s), e.g. {miss}")
    return series.to_numpy()[pos]


def state_class_index(states: np.ndarray, classes: list[str], state_classes: dict[str, str]) -> np.ndarray:
    """Class index per true state (``NO_CLASS`` for states that map to no configured class)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(state_classes.get(str(s), ""), NO_CLASS) for s in states], dtype=np.int64)


def truth_classes(truth: pd.DataFrame, classes: list[str], state_classes: dict[str, str]) -> pd.Series:
    """Class index per cell (indexed by cell keys) from a simulator truth table (``load_truth`` output)."""
    missing = [c for c in ("source_file", "cell_id", "state") if c not in truth.columns]
    if missing:
        raise DataError(f"truth table lacks column(s) {', '.join(missing)}")
    values = state_class_index(truth["state"].to_numpy(), classes, state_classes)
    s = pd.Series(values, index=cell_keys(truth))
    if s.index.has_duplicates:
        raise DataError("truth table names a cell (source_file, cell_id) twice")
    return s


class SimulatedOracle:
    """The simulated annotator over the simulator's ground truth."""

    kind = "truth"

    def __init__(self, truth: pd.DataFrame, classes: list[str], state_classes: dict[str, str]):
        bad = sorted(set(state_classes) - set(truth["state"].astype(str).unique()) - KNOWN_STATES)
        if bad:
            raise ConfigError(f"al.state_classes: unknown state(s) {', '.join(bad)}; the truth has "
                              f"{', '.join(sorted(truth['state'].astype(str).unique()))}")
        self.classes = list(classes)
        self._labels = truth_classes(truth, self.classes, state_classes)

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike, classes: list[str], state_classes: dict[str, str]
                      ) -> SimulatedOracle:
        from training.sim.synth import load_truth

        return cls(load_truth(manifest), classes, state_classes)

    def available(self, cells: pd.DataFrame) -> np.ndarray:
        return self._labels.index.get_indexer(cell_keys(cells)) >= 0

    def label(self, cells: pd.DataFrame) -> np.ndarray:
        return _lookup(self._labels, cells, "the simulator's truth table").astype(np.int64)


class ManifestOracle:
    """The label of the cell's slide (``label`` column of the cell table)."""

    kind = "manifest"

    def __init__(self, cells: pd.DataFrame, classes: list[str]):
        self.classes = list(classes)
        lookup = {c: i for i, c in enumerate(self.classes)}
        values = cells["label"].astype(object).map(lambda v: lookup.get(v, NO_CLASS) if isinstance(v, str) else NO_CLASS)
        self._labels = pd.Series(values.to_numpy(np.int64), index=cell_keys(cells))
        self._labels = self._labels[~self._labels.index.duplicated()]

    def available(self, cells: pd.DataFrame) -> np.ndarray:
        return self._labels.index.get_indexer(cell_keys(cells)) >= 0

    def label(self, cells: pd.DataFrame) -> np.ndarray:
        return _lookup(self._labels, cells, "the cell index").astype(np.int64)


class LabelsCsvOracle:
    """Labels a person gave: CSV ``source_file,cell_id,label``, checked against the index and the classes."""

    kind = "labels"

    def __init__(self, path: str | os.PathLike, index: pd.DataFrame, classes: list[str],
                 manifest: str | os.PathLike | None = None):
        self.path = Path(path)
        self.classes = list(classes)
        table = read_labels_csv(self.path)
        known = {os.path.abspath(f) for f in index["source_file"].astype(str).unique()}
        table["source_file"] = [_match_file(f, known, manifest, self.path) for f in table["source_file"]]
        keys = cell_keys(table)
        present = cell_keys(index.drop_duplicates(["source_file", "cell_id"]))
        missing = keys[present.get_indexer(keys) < 0]
        if len(missing):
            raise DataError(f"{self.path}: {len(missing)} labeled cell(s) are not in the manifest's files, "
                            f"e.g. {missing[:3].tolist()}")
        bad = sorted(set(table["label"]) - set(self.classes))
        if bad:
            raise DataError(f"{self.path}: label(s) {', '.join(bad)} are not configured classes "
                            f"({', '.join(self.classes)}); set split.classes or fix the CSV")
        lookup = {c: i for i, c in enumerate(self.classes)}
        self._labels = pd.Series(table["label"].map(lookup).to_numpy(np.int64), index=keys)

    def available(self, cells: pd.DataFrame) -> np.ndarray:
        return self._labels.index.get_indexer(cell_keys(cells)) >= 0

    def label(self, cells: pd.DataFrame) -> np.ndarray:
        return _lookup(self._labels, cells, str(self.path)).astype(np.int64)


def read_labels_csv(path: Path) -> pd.DataFrame:
    """Validate the columns, cell ids and duplicates of a labels CSV. A ``spatial label`` history
    (``source_file,cell_id,label,annotator,time``) is replayed first: the latest label per cell, without ``unsure``
    and ``new:<name>`` answers."""
    if not path.is_file():
        raise DataError(f"{path}: labels CSV not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().strip().split(",")
    if "annotator" in header:
        from training.data.labels import NEW_PREFIX, UNSURE, current_labels

        cur = current_labels(path)
        cur = cur[(cur["label"] != UNSURE) & ~cur["label"].str.startswith(NEW_PREFIX)]
        if cur.empty:
            raise DataError(f"{path}: no labels")
        return cur[list(LABEL_COLUMNS)].reset_index(drop=True)
    table = read_csv(path, dtype={"source_file": str, "label": str}, keep_default_na=False)
    require_columns(table.columns, LABEL_COLUMNS, path)
    if table.empty:
        raise DataError(f"{path}: no labels")
    ids, bad = cell_ids(table["cell_id"])
    if bad.any():
        raise DataError(f"{path}: cell_id must be integers, got e.g. {table.loc[bad, 'cell_id'].head(3).tolist()}")
    table["cell_id"] = ids
    table["label"] = table["label"].str.strip()
    empty = table.index[table["label"] == ""].tolist()
    if empty:
        raise DataError(f"{path}: empty label on line(s) {', '.join(str(i + 2) for i in empty[:5])}")
    dup = table.duplicated(["source_file", "cell_id"], keep=False)
    if dup.any():
        clash = table[dup].groupby(["source_file", "cell_id"])["label"].nunique()
        if (clash > 1).any():
            raise DataError(f"{path}: cell(s) labeled twice with different labels, e.g. "
                            f"{clash[clash > 1].index[:3].tolist()}")
        table = table.drop_duplicates(["source_file", "cell_id"])
    return table.reset_index(drop=True)


def _match_file(name: str, known: set[str], manifest: str | os.PathLike | None, csv: Path) -> str:
    """A CSV ``source_file`` as the index names it: as given, relative to the manifest or to the CSV."""
    candidates = [name]
    if manifest is not None:
        candidates.append(resolve_path(manifest, name))
    candidates.append(os.path.join(csv.parent, name))
    for c in candidates:
        if os.path.abspath(c) in known:
            return os.path.abspath(c)
    return name  # reported as not in the manifest by the caller


def make_oracle(kind: str, classes: list[str], index: pd.DataFrame, state_classes: dict[str, str],
                manifest: str | os.PathLike | None = None, labels_csv: str | os.PathLike | None = None):
    """The oracle ``al.oracle`` names (``auto``: labels CSV if given, else the simulator's truth beside the
    manifest if present, else the manifest's slide labels)."""
    if kind == "auto":
        if labels_csv:
            kind = "labels"
        elif manifest is not None and (Path(manifest).parent / "truth.parquet").is_file():
            kind = "truth"
        else:
            kind = "manifest"
    if kind == "labels":
        if not labels_csv:
            raise ConfigError("al.oracle=labels needs a labels CSV (--labels or al.labels_csv)")
        return LabelsCsvOracle(labels_csv, index, classes, manifest)
    if kind == "truth":
        if manifest is None:
            raise ConfigError("al.oracle=truth needs the simulator's manifest (--manifest)")
        return SimulatedOracle.from_manifest(manifest, classes, state_classes)
    if kind == "manifest":
        return ManifestOracle(index, classes)
    raise ConfigError(f"al.oracle: unknown oracle '{kind}'")
