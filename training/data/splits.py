"""Group-wise splits and class-balanced undersampling on the cell index (never on pixels).

Every row of the output carries ``split`` in:

* ``train`` / ``val`` — training classes, from groups (slides) that are not test groups; ``val`` is a stratified
  random share of those cells (used for early stopping and temperature scaling);
* ``test`` — training classes, from held-out test groups only: no slide is in both train and test;
* ``heldout`` — labeled cells of classes *not* trained on (the thesis "cases": how uncertain is the model on
  classes it never saw), from any group;
* ``unlabeled`` — screen cells without a label (semi-supervised / active learning pool).

Test groups are drawn per class (``test_fraction`` of that class's groups, at least one), unless
``split.test_groups`` fixes them. Each split is undersampled to the same number of cells per class.

Cell labels a person gave (``labels.csv``, see :mod:`training.data.labels`) join first: test groups are still drawn
from the slide labels (the same test split with or without them), person-labeled cells of other slides are never
undersampled away and go to ``train`` (or ``heldout`` when their label is not a training class).
``label_source`` says where each row's label came from (``slide`` or ``cell``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import SplitConfig
from training.data.cellindex import labels_in
from training.errors import ConfigError, DataError

SPLITS = ("train", "val", "test", "heldout", "unlabeled")


def _balance(df: pd.DataFrame, rng: np.random.Generator, cap: int | None) -> pd.DataFrame:
    """Undersample every label to the smallest label's count (and at most ``cap``)."""
    if df.empty:
        return df
    n = int(df["label"].value_counts().min())
    if cap is not None:
        n = min(n, cap)
    keep = [rng.choice(idx.to_numpy(), size=n, replace=False) for _, idx in df.groupby("label", observed=True).groups.items()]
    return df.loc[np.sort(np.concatenate(keep))]


def choose_test_groups(labeled: pd.DataFrame, classes: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    test: set[str] = set()
    for cls in classes:
        groups = sorted(labeled.loc[labeled["label"] == cls, "group"].astype(str).unique())
        if len(groups) < 2:
            raise DataError(
                f"class '{cls}' comes from {len(groups)} group(s) ({', '.join(groups)}); a group-wise split needs at "
                "least 2 slides per class so that no slide is in both train and test"
            )
        k = min(len(groups) - 1, max(1, round(fraction * len(groups))))
        test.update(rng.choice(groups, size=k, replace=False).tolist())
    return test


def make_splits(index: pd.DataFrame, cfg: SplitConfig, cell_labels: pd.DataFrame | None = None,
                labels_path: str = "labels.csv") -> tuple[pd.DataFrame, dict]:
    """Assign a split to the cells kept; returns the table and a summary (classes, groups, counts).

    ``cell_labels``: current labels a person gave (``training.data.labels.current_labels``); they win over slide
    labels outside the test slides."""
    from training.data.labels import apply_cell_labels

    rng = np.random.default_rng(cfg.seed)
    slide_labels = labels_in(index)
    test_classes = [c for c in (list(cfg.classes) or slide_labels) if c in slide_labels]
    slide_in_classes = index[index["label"].notna() & index["label"].isin(test_classes)]
    if cfg.test_groups:
        test_groups = set(cfg.test_groups)
        missing = test_groups - set(index["group"].astype(str))
        if missing:
            raise ConfigError(f"split.test_groups: unknown group(s) {', '.join(sorted(missing))}")
    else:
        test_groups = choose_test_groups(slide_in_classes, test_classes, cfg.test_fraction, rng)
    person = np.zeros(len(index), dtype=bool)
    if cell_labels is not None and not cell_labels.empty:
        index, person = apply_cell_labels(index, cell_labels, test_groups, labels_path, set(cfg.classes))
    available = labels_in(index)
    classes = list(cfg.classes) or available
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ConfigError(
            f"split.classes: {', '.join(unknown)} not in the manifest's labels ({', '.join(available) or 'none'})"
        )
    by_person = index[person]
    index = index[~person]
    labeled = index[index["label"].notna()]
    in_classes = labeled[labeled["label"].isin(classes)]
    is_test = in_classes["group"].astype(str).isin(test_groups)
    test = _balance(in_classes[is_test], rng, cfg.max_per_class)
    pool = _balance(in_classes[~is_test], rng, cfg.max_per_class)
    val_parts = [
        grp.sample(frac=cfg.val_fraction, random_state=int(rng.integers(2**31)))
        for _, grp in pool.groupby("label", observed=True)
    ]
    val_index = pd.concat(val_parts).index if val_parts else pool.index[:0]
    person_train = by_person["label"].isin(classes).to_numpy()
    parts = {
        "train": pd.concat([pool.drop(val_index), by_person[person_train]]),
        "val": pool.loc[val_index],
        "test": test,
        "heldout": pd.concat([_balance(labeled[~labeled["label"].isin(classes)], rng, cfg.max_per_class),
                              by_person[~person_train]]),
        "unlabeled": index[index["label"].isna()],
    }
    if cfg.unlabeled_max is not None and len(parts["unlabeled"]) > cfg.unlabeled_max:
        u = parts["unlabeled"]
        parts["unlabeled"] = u.loc[np.sort(rng.choice(u.index.to_numpy(), cfg.unlabeled_max, replace=False))]
    for name in ("train", "test"):
        present = set(parts[name]["label"].dropna())
        empty = [c for c in (classes if name == "train" else test_classes) if c not in present]
        if empty:
            raise DataError(f"class(es) {', '.join(empty)} have no cells in the {name} split after group-wise splitting")
    from_person = set(by_person.index)
    out = pd.concat([p.assign(split=name, label_source=np.where(p.index.isin(from_person), "cell", "slide"))
                     for name, p in parts.items()], ignore_index=True)
    out["split"] = pd.Categorical(out["split"], categories=list(SPLITS))
    counts = {
        name: {str(k): int(v) for k, v in p["label"].fillna("<unlabeled>").value_counts().sort_index().items()}
        for name, p in parts.items()
    }
    summary = {"classes": classes, "test_groups": sorted(test_groups), "counts": counts, "params": cfg.model_dump(),
               "cell_labels": int(person.sum())}
    return out, summary


def read_splits(path: str | Path, cfg: SplitConfig | None = None) -> tuple[pd.DataFrame, dict]:
    """A split table written by :func:`make_splits` (``spatial split``) and its summary.

    With ``cfg`` (the split params in force) the table must have been made with them, ``out`` aside: otherwise a
    ``--set split.*`` or an edited ``params.yaml`` would be silently ignored by a command that reads the table.
    """
    from training.io.tables import read_table

    table, summary = read_table(path, what="split table", hint="`spatial split` writes it (`dvc repro split`)")
    if "split" not in table.columns:
        raise DataError(f"{path}: not a split table (no 'split' column); run `spatial split`")
    made = summary.get("params") or {}
    wanted = cfg.model_dump(mode="json") if cfg is not None else {}
    differ = [key for key in wanted if key != "out" and key in made and made[key] != wanted[key]]
    if differ:
        def values(params: dict) -> str:
            return ", ".join(f"split.{key}={json.dumps(params[key])}" for key in differ)

        raise ConfigError(f"{path} was made with {values(made)}; the params say {values(wanted)}. Split again with "
                          "these params (`spatial split`, or `dvc repro split`), or give --manifest to split now")
    return table, summary


def class_table(splits: pd.DataFrame, classes: list[str]) -> pd.Series:
    """Class index per row (-1 for unlabeled and held-out classes)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return splits["label"].map(lookup).fillna(-1).astype(np.int64)
