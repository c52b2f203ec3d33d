"""The labels history file: append-only, atomic (the whole file is rewritten under a temporary name and renamed)
and locked (``<file>.lock``), so two annotators writing at once lose nothing and a crash never leaves half a row.

Reading and replaying the history (latest label wins, ``undo`` takes an annotator's latest label back) is
:mod:`training.data.labels`, the same code training uses.
"""

from __future__ import annotations

import csv
import io
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from filelock import FileLock

from training.data.labels import COLUMNS, NEW_PREFIX, UNDO, UNSURE, read_history, replay
from training.errors import DataError
from training.io.atomic import atomic_path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,39}$")
LOCK_TIMEOUT_S = 30


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LabelStore:
    """``labels.csv`` of one labeling session; ``classes`` are the labels a person may give (plus ``unsure``,
    ``new:<name>`` and ``undo``)."""

    def __init__(self, path: str | os.PathLike, classes: list[str]):
        self.path = Path(path)
        self.classes = list(classes)
        self.lock = FileLock(f"{self.path}.lock", timeout=LOCK_TIMEOUT_S)
        h = read_history(self.path)  # a damaged file is an error before anyone labels
        bad = sorted({lab for lab in h["label"] if lab not in (UNSURE, UNDO) and lab not in self.classes
                      and not lab.startswith(NEW_PREFIX)})
        if bad:
            raise DataError(f"{self.path}: label(s) {', '.join(bad)} are not configured classes "
                            f"({', '.join(self.classes)}); set split.classes or fix the file")

    def check_label(self, label: str) -> str:
        label = str(label).strip()
        if label in self.classes or label in (UNSURE, UNDO):
            return label
        if label.startswith(NEW_PREFIX) and NAME.match(label[len(NEW_PREFIX):]):
            return label
        raise DataError(f"label '{label}' is not one of {', '.join(self.classes)}, '{UNSURE}' or "
                        f"'{NEW_PREFIX}<name>' (letters, digits, ' _.-', at most 40)")

    @staticmethod
    def check_annotator(name: str) -> str:
        name = str(name).strip()
        if not NAME.match(name):
            raise DataError(f"annotator '{name}': use 1-40 letters, digits, ' _.-'")
        return name

    def append(self, rows: list[dict]) -> pd.DataFrame:
        """Append ``rows`` (source_file, cell_id, label, annotator; time is set here); returns the new history."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in rows:
            w.writerow([r["source_file"], int(r["cell_id"]), self.check_label(r["label"]),
                        self.check_annotator(r["annotator"]), r.get("time") or now()])
        with self.lock:
            old = self.path.read_bytes() if self.path.is_file() else b""
            if not old.strip():
                old = (",".join(COLUMNS) + "\n").encode()
            elif not old.endswith(b"\n"):
                old += b"\n"
            with atomic_path(self.path, suffix=".csv") as tmp:
                tmp.write_bytes(old + buf.getvalue().encode())
                os.chmod(tmp, 0o644)
            return read_history(self.path)

    def history(self) -> pd.DataFrame:
        with self.lock:
            return read_history(self.path)

    def current(self) -> pd.DataFrame:
        return replay(self.history())

    def per_annotator(self) -> pd.DataFrame:
        return replay(self.history(), by_annotator=True)
