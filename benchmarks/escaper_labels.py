"""An oracle's answers to ``spatial query --strategy label_check``: a labels history that relabels every knockout
escaper of the simulated screen's control slides, outside the given test slides, as the class it looks like.

An escaper is a cell of a knockout control slide whose knockout missed and whose autophagy is on (``truth.parquet``:
``knockout`` false, ``state`` on or partial); its slide label says ``<gene>_ko``, its phenotype ``stimulated``. The
file has the columns of ``labels.csv`` (annotator ``oracle``) and a person's label wins over the slide label outside
the test split (``spatial split``), so ``spatial split --set label.labels=FILE`` gives the split a biologist who
confirmed every escaper would train on.

    python benchmarks/escaper_labels.py --raw data/raw --test-group atg5_ko_s2 --test-group stimulated_s3 \\
        --out labels_clean.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from training.data.labels import COLUMNS
from training.io.atomic import atomic_path

ON_STATES = ("on", "partial")


def is_escaper(cells: pd.DataFrame, knockouts: tuple[str, ...] | list[str] = ("atg5_ko",)) -> pd.Series:
    """Cells (columns of ``truth.parquet``: ``condition, knockout, state``) of a knockout control slide whose
    knockout missed and whose autophagy is on."""
    return (cells["condition"].astype(str).isin(knockouts) & ~cells["knockout"].astype(bool)
            & cells["state"].isin(ON_STATES))


def escapers(raw: Path, test_groups: list[str], knockout_classes: list[str], phenotype: str) -> pd.DataFrame:
    truth = pd.read_parquet(raw / "truth.parquet")
    cells = truth[is_escaper(truth, knockout_classes) & ~truth["group"].astype(str).isin(test_groups)]
    return pd.DataFrame({"source_file": [str((raw / p).resolve()) for p in cells["path"]],
                         "cell_id": cells["cell_id"].astype("int64").to_numpy(), "label": phenotype,
                         "annotator": "oracle", "time": "2026-01-01T00:00:00Z"})[list(COLUMNS)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--test-group", action="append", default=[], help="a test slide (never relabeled); repeat")
    ap.add_argument("--knockout", action="append", default=None, help="knockout control classes (default atg5_ko)")
    ap.add_argument("--phenotype", default="stimulated", help="the class an escaper looks like")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    labels = escapers(a.raw, a.test_group, a.knockout or ["atg5_ko"], a.phenotype)
    with atomic_path(a.out, suffix=".csv") as tmp:
        labels.to_csv(tmp, index=False)
    print(f"wrote {a.out}: {len(labels)} escapers relabeled {a.phenotype} "
          f"(test slides kept: {', '.join(a.test_group) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
