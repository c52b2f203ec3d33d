"""Each novelty score on the pipeline's own ensemble: scoring speed against ``energy`` (the baseline, timed in the
same run) and what the discovery queue finds on the simulated screen with it.

For every ``--kind``, the novelty is refitted on the members of ``--model`` (no retraining,
``refit_novelty``), the screen is scored with ``spatial score --embeddings`` and queued with ``spatial discover``;
the simulator's truth then says which states the flagged cells are in. Speed: ``predict_tensor`` on random 64x64
inputs, one thread, best of ``--repeats``.

Why the novel phenotype is hard to flag (``feature_sources``): the multi-stage kNN on the trained members' features
and on the same architecture at a seeded random initialisation, each against the novel phenotype, the held-out
classes and what passes the 0.99 threshold; and for every screen cell the simulator state of its nearest training
cell in the trained members' features.

    python benchmarks/novelty_scores.py [--model models/ensemble] [--out reports/uncertainty_study/novelty_scores.json]
    python benchmarks/novelty_scores.py --check      # floor: the default score (params.yaml) >= FLOOR x energy's speed

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

from serving.discovery.controls import random_filter_network
from training.config import load_params
from training.data.loader import loader_for
from training.data.trainset import TrainData, prepare_data
from training.engine import predict
from training.io.tables import read_table
from training.regimes.ensemble_training import refit_novelty
from training.uncertainty.ensemble import Ensemble
from training.uncertainty.novelty import KNNNovelty, stage_features

BASELINE = "energy"
FLOOR = 0.35  # the default score / energy, cells per second (0.44x at 8469a88: the pixel description's cost)


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
    auc = auroc(cells.loc[trained, "novelty"].to_numpy(), cells.loc[novel, "novelty"].to_numpy())
    flagged = cells[cells["cluster"] >= 0]
    return {"auroc_novel_vs_screen_trained_states": auc, "n_flagged": len(flagged),
            "flagged_states": flagged["state"].value_counts().to_dict(),
            **{k: metrics.get(k) for k in ("threshold", "top_cluster_top_gene", "top_cluster_top_gene_fdr",
                                           "planted_novel_gene_is_top")}}


def _stage_features(model: torch.nn.Module, cells: pd.DataFrame, data: TrainData, params) -> np.ndarray:
    loader = loader_for(cells, params.data, data.channels, shuffle=False, seed=0, cache=False, batch_size=256)
    out = predict(model, loader, with_features=False, pool_stages=stage_features)
    return out["stages"][np.argsort(out["idx"], kind="stable")]


def feature_sources(ens: Ensemble, data: TrainData, params, truth: pd.DataFrame) -> dict[str, dict]:
    """The multi-stage kNN novelty (``multistage_knn``) on two sources of features: the trained members, and networks
    of the same architecture at a seeded random initialisation (no training: multi-scale filter statistics that
    nothing has taught an invariance). Per source: AUROC of the novel phenotype against screen cells in a trained
    state, of the held-out classes against the test cells, and the states over the 0.99 validation quantile;
    for the trained members also the simulator state of every screen cell's nearest training cell (cosine, the
    space the kNN searches), counted over cells x members, with ``"training cells"``: the training cells' states."""
    def with_state(cells: pd.DataFrame) -> pd.DataFrame:
        keyed = cells.assign(key=cells["source_file"].map(os.path.relpath))
        return keyed.merge(truth, on=["key", "cell_id"], how="left", validate="one_to_one")

    train, val, test, held = (with_state(data.split(n)) for n in ("train", "val", "test", "heldout"))
    index, _ = read_table(params.index.out)
    screen = with_state(index[index["condition"] == "screen"].reset_index(drop=True))
    untrained = [random_filter_network(ens.spec, params.seed + k) for k in range(len(ens.members))]
    novel = (screen["state"] == "novel").to_numpy()
    trained_state = screen["state"].isin(["on", "blocked"]).to_numpy()  # the training classes' states
    out: dict[str, dict] = {}
    for source, members in (("trained members", ens.members), ("untrained network", untrained)):
        scores: dict[str, list] = {"val": [], "test": [], "heldout": [], "screen": []}
        counts: dict[str, pd.Series] = {}
        for k, model in enumerate(members):
            bank = _stage_features(model, train, data, params)
            knn = KNNNovelty(params.uncertainty.knn_k, params.uncertainty.knn_bank, params.seed + k,
                             input="stages").fit(bank)
            feats = {n: _stage_features(model, c, data, params) for n, c in
                     (("val", val), ("test", test), ("heldout", held), ("screen", screen))}
            for n, f in feats.items():
                scores[n].append(knn.score(f))
            nearest = (feats["screen"] @ bank.T).argmax(axis=1)  # rows are L2-normalised: cosine
            pairs = pd.DataFrame({"screen": screen["state"].to_numpy(), "train": train["state"].to_numpy()[nearest]})
            for state, group in pairs.groupby("screen"):
                counts[state] = group["train"].value_counts().add(counts.get(state, pd.Series(dtype=int)),
                                                                  fill_value=0)
        mean = {n: np.mean(v, axis=0) for n, v in scores.items()}
        flagged = screen.loc[mean["screen"] > np.quantile(mean["val"], 0.99), "state"]
        res = {"auroc_novel_vs_screen_trained_states": auroc(mean["screen"][trained_state], mean["screen"][novel]),
               "auroc_heldout_pooled": auroc(mean["test"], mean["heldout"]),
               **{f"auroc_heldout_{label}": auroc(mean["test"], mean["heldout"][(held["label"] == label).to_numpy()])
                  for label in sorted(held["label"].unique())},
               "flagged_states_at_0.99": {k: int(v) for k, v in flagged.value_counts().items()}}
        if source == "trained members":
            counts["training cells"] = train["state"].value_counts()
            res["nearest_training_state"] = {state: {k: int(v) for k, v in c.sort_values(ascending=False).items()}
                                             for state, c in counts.items()}
        out[source] = res
    return out


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inlier)), np.ones(len(outlier))], np.r_[inlier, outlier]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/ensemble")
    ap.add_argument("--kind", action="append", default=None, help="novelty scores (default: energy, "
                    "multistage_knn, energy_multistage, pixel_knn and the default of params.yaml)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports/uncertainty_study/novelty_scores.json"))
    ap.add_argument("--check", action="store_true", help=f"exit 1 when the default score < {FLOOR}x energy's speed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    default = load_params("params.yaml").uncertainty.novelty
    kinds = a.kind or list(dict.fromkeys([BASELINE, "multistage_knn", "energy_multistage", "pixel_knn", default]))
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
    params = load_params("params.yaml")
    ens = Ensemble.load(a.model)
    splits, _ = read_table(params.split.out)
    sources = feature_sources(ens, prepare_data(splits, ens.spec.classes, params), params, truth)
    for source, r in sources.items():
        print(f"multistage kNN on the {source}: novel vs screen AUROC {r['auroc_novel_vs_screen_trained_states']:.3f},"
              f" held-out pooled {r['auroc_heldout_pooled']:.3f}; over the 0.99 quantile {r['flagged_states_at_0.99']}")
    nearest = sources["trained members"]["nearest_training_state"]
    for state in ("training cells", "novel", "debris", "blocked", "on"):
        share = {k: f"{v / sum(nearest.get(state, {0: 1}).values()):.0%}" for k, v in nearest.get(state, {}).items()}
        print(f"nearest training cell of a screen '{state}' cell: {share}" if state != "training cells" else
              f"training cells: {share}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "baseline": BASELINE, "kinds": results,
                                 "feature_sources": sources}, indent=2))
    ok = True
    if default in results:
        ratio = results[default]["cells_per_second"] / results[BASELINE]["cells_per_second"]
        ok = ratio >= FLOOR
        print(f"floor  {default} (the default) / {BASELINE} speed: {ratio:.2f}x vs floor {FLOOR:.2f}x -> "
              f"{'ok' if ok else 'BELOW'}")
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
