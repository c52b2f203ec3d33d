"""Each novelty score on the pipeline's own ensemble: scoring speed against ``energy`` (the baseline, timed in the
same run) and what the discovery queue finds on the simulated screen with it.

For every ``--kind``, the novelty is refitted on the members of ``--model`` (no retraining,
``refit_novelty``), the screen is scored with ``spatial score --embeddings`` and queued with ``spatial discover``;
the simulator's truth then says which states the flagged cells are in. Speed: ``predict_tensor`` on random 64x64
inputs, one thread, best of ``--repeats``.

    python benchmarks/novelty_scores.py [--model models/ensemble] [--out reports/uncertainty_study/novelty_scores.json]
    python benchmarks/novelty_scores.py --check      # floor: energy_multistage scores >= 0.5x as fast as energy

Needs ``dvc repro discover`` (data/raw, data/index, models/ensemble, data/screen/genotypes.csv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from training.config import load_params
from training.data.trainset import prepare_data
from training.io.tables import read_table
from training.regimes.ensemble_training import refit_novelty
from training.uncertainty.ensemble import Ensemble

BASELINE = "energy"
FLOOR = 0.5  # energy_multistage / energy cells per second


def cells_per_second(ens: Ensemble, repeats: int, n: int = 4096, batch: int = 256) -> float:
    x = torch.rand(n, len(ens.spec.channels), ens.spec.image_size, ens.spec.image_size,
                   generator=torch.Generator().manual_seed(0))
    ens.predict_tensor(x[:batch])
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, n, batch):
            ens.predict_tensor(x[i : i + batch])
        best = min(best, time.perf_counter() - t)
    return n / best


def queue_with(kind: str, ens: Ensemble, work: Path, truth: pd.DataFrame) -> dict:
    """Score the screen with ``ens`` and run the discovery queue; the flagged cells' true states."""
    model, scores, queue = work / f"ens_{kind}", work / f"scores_{kind}.parquet", work / f"queue_{kind}"
    ens.save(model)
    screen = sorted(str(p) for p in Path("data/raw/screen").iterdir())
    subprocess.run(["spatial", "score", *screen, "--model", str(model), "--embeddings", "--out", str(scores),
                    "--no-progress"], check=True, capture_output=True)
    subprocess.run(["spatial", "discover", "--scores", str(scores), "--model", str(model), "--genotypes",
                    "data/screen/genotypes.csv", "--library", "data/raw/library.csv", "--truth-genes",
                    "data/raw/truth_genes.csv", "--out", str(queue), "--metrics", str(work / f"{kind}.json")],
                   check=True, capture_output=True)
    metrics = json.loads((work / f"{kind}.json").read_text())
    cells, _ = read_table(queue / "cells.parquet")
    cells = cells.assign(key=cells["source_file"].map(os.path.relpath)).merge(truth, on=["key", "cell_id"])
    novel, trained = cells["state"] == "novel", cells["state"].isin(["on", "blocked"])
    auroc = roc_auc_score(np.r_[np.zeros(trained.sum()), np.ones(novel.sum())],
                          np.r_[cells.loc[trained, "novelty"], cells.loc[novel, "novelty"]])
    flagged = cells[cells["cluster"] >= 0]
    return {"auroc_novel_vs_screen_trained_states": float(auroc), "n_flagged": len(flagged),
            "flagged_states": flagged["state"].value_counts().to_dict(),
            **{k: metrics.get(k) for k in ("threshold", "top_cluster_top_gene", "top_cluster_top_gene_fdr",
                                           "planted_novel_gene_is_top")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/ensemble")
    ap.add_argument("--kind", action="append", default=None, help="novelty scores (default: energy, "
                    "multistage_knn, energy_multistage)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports/uncertainty_study/novelty_scores.json"))
    ap.add_argument("--check", action="store_true", help=f"exit 1 when energy_multistage < {FLOOR}x energy's speed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    kinds = a.kind or [BASELINE, "multistage_knn", "energy_multistage"]
    if BASELINE not in kinds:
        kinds.insert(0, BASELINE)
    truth = pd.read_parquet("data/raw/truth.parquet")
    truth = pd.DataFrame({"key": [os.path.join("data/raw", p) for p in truth["path"]],
                          "cell_id": truth["cell_id"], "state": truth["state"]})
    results = {}
    with tempfile.TemporaryDirectory(prefix="novelty_scores_") as tmp:
        for kind in kinds:
            params = load_params("params.yaml", {"uncertainty.novelty": kind})
            ens = Ensemble.load(a.model)
            splits, _ = read_table(params.split.out)
            ens = refit_novelty(ens, prepare_data(splits, ens.spec.classes, params), params)
            results[kind] = {"cells_per_second": cells_per_second(ens, a.repeats),
                             **queue_with(kind, ens, Path(tmp), truth)}
            r = results[kind]
            print(f"{kind:18s} {r['cells_per_second']:6.0f} cells/s "
                  f"({r['cells_per_second'] / results[BASELINE]['cells_per_second']:.2f}x {BASELINE}); novel vs "
                  f"screen AUROC {r['auroc_novel_vs_screen_trained_states']:.3f}; flagged {r['n_flagged']} "
                  f"{r['flagged_states']}; top gene {r['top_cluster_top_gene']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "baseline": BASELINE, "kinds": results}, indent=2))
    ok = True
    if "energy_multistage" in results:
        ratio = results["energy_multistage"]["cells_per_second"] / results[BASELINE]["cells_per_second"]
        ok = ratio >= FLOOR
        print(f"floor  energy_multistage / {BASELINE} speed: {ratio:.2f}x vs floor {FLOOR:.2f}x -> "
              f"{'ok' if ok else 'BELOW'}")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
