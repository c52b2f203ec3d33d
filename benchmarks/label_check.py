"""How many of the cells ``spatial query --strategy label_check`` asks about are knockout escapers?

Runs the query as ``spatial query`` does (the pool without the fixed test split and without labeled cells) with a
trained ensemble on the simulated screen, joins the simulator's truth (``truth.parquet``) and reports, for the
first ``n`` cells of the queue, how many are escapers (knockout-slide cells the knockout missed, in an autophagy-on
state), how many escapers the pool holds (every pool cell is ranked), and what the other queued cells are.

    python benchmarks/label_check.py --model models/ensemble --out reports/label_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from escaper_labels import is_escaper

from serving.cli.options import write_json
from training.active.query import LABEL_CHECK, run_query
from training.data.cellindex import build_index
from training.io.tables import read_table
from training.uncertainty.ensemble import Ensemble


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/ensemble"))
    ap.add_argument("--manifest", type=Path, default=Path("data/raw/manifest.csv"))
    ap.add_argument("--splits", type=Path, default=Path("data/index/splits.parquet"))
    ap.add_argument("--raw", type=Path, default=Path("data/raw"))
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    index = build_index(a.manifest, progress=False)
    splits, _ = read_table(a.splits)
    ens = Ensemble.load(a.model)
    res = run_query(ens, index, LABEL_CHECK, 10**9, exclude=splits[splits["split"] == "test"], pool_subsample=None)
    truth = pd.read_parquet(a.raw / "truth.parquet")
    truth["source_file"] = [str((a.raw / p).resolve()) for p in truth["path"]]
    cells = truth[["source_file", "cell_id", "condition", "state", "knockout"]].assign(escaper=is_escaper(truth))
    q = res.queries.assign(source_file=lambda t: t["source_file"].map(lambda p: str(Path(p).resolve())))
    q = q.merge(cells, on=["source_file", "cell_id"], how="left", validate="one_to_one")
    kind = np.where(q["escaper"], "escaper", q["state"].astype(str))
    out: dict = {"model": str(a.model), "pool": res.pool, "escapers_in_pool": int(q["escaper"].sum()), "first": {}}
    for n in sorted(a.n):
        head = kind[:n]
        out["first"][str(n)] = {"escapers": int((head == "escaper").sum()),
                                "min_score": float(q["score"].iloc[:n].min()),
                                "kinds": {str(k): int(v) for k, v in pd.Series(head).value_counts().sort_index().items()}}
    out["disputed_over_half"] = int((q["score"] > 0.5).sum())
    print(json.dumps(out, indent=2))
    if a.out:
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
