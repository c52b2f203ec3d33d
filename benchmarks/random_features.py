"""Novelty from untrained networks: is the SPARCS VGG's lead in flagging new phenotypes its architecture, not its training?

No model is trained. Each cell is seen through networks at seeded random initialisations (``NETWORK_SEEDS``; the
discovery queue's features: ``serving/discovery/controls.py``), summarised by ``stage_features`` (per stage the
channel means and standard deviations), and scored by ``KNNNovelty`` (the ``k``-th nearest training cell,
``uncertainty.knn_k`` / ``knn_bank``), the distances averaged over the networks. ``pixel_knn`` (the fixed pixel
description, also untrained) is measured beside them on the same cells.

Part ``loco`` (the protocol that chose every novelty default, without the default task's held-out classes or the
screen): leave one of the four control classes out, the bank the other three's training cells, and the AUROC of the
left-out class against the three's test cells. Part ``task``: on the default split (``--screen DIR@SEED`` for another
data set written by ``spatial synth``), the held-out classes against the training classes' test cells (pooled and
per class) and the screen's novel phenotype against its cells in a training state. Declared in FINDINGS ("Novelty
from untrained networks") before it ran; part ``task`` alone decides nothing.

    python benchmarks/random_features.py --part loco --out reports/uncertainty_study/amd/random_features/loco.json
    python benchmarks/random_features.py --part task --out reports/uncertainty_study/amd/random_features/task.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from pixel_probe import auroc, images
from slide_shift import data_params
from tqdm.auto import tqdm
from uncertainty_study import CONTROL_CLASSES, screen_cells

from serving.cli.options import write_json
from serving.discovery.controls import random_network
from training.config import ModelConfig
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.engine import forward
from training.io.tables import read_table
from training.uncertainty.novelty import KNNNovelty, make_novelty, stage_features
from training.uncertainty.pixel_descriptor import pixel_descriptor

NETWORK_SEEDS = (0, 1, 2)
HELD = ("unstimulated", "ei24_ko", "timecourse")
KEY = ["source_file", "cell_id"]


def architectures(model: ModelConfig) -> dict[str, ModelConfig]:
    """The untrained networks measured: the SPARCS VGG, and the pipeline's ConvNeXt with its full-resolution stem
    and with its own (stride 4)."""
    convnext = model.model_dump()
    return {"random_vgg": ModelConfig(name="sparcs_vgg"),
            "random_convnext_p1": ModelConfig(**{**convnext, "patch_size": 1}),
            "random_convnext": ModelConfig(**convnext)}


def describe(cells: pd.DataFrame, params, channels: list[str], archs: dict[str, ModelConfig]) -> dict[str, np.ndarray]:
    """Per cell of ``cells`` (table order): ``pixels`` (the pixel description) and, per architecture and network
    seed, ``<arch>/<seed>`` (``stage_features`` of the untrained network)."""
    x = images(cells, params, channels)
    out = {"pixels": pixel_descriptor(x)}
    for name, cfg in archs.items():
        for seed in NETWORK_SEEDS:
            net = random_network(cfg, len(channels), 2, seed)
            rows = []
            for i in tqdm(range(0, len(x), 256), desc=f"{name} seed {seed}", leave=False):
                maps: list = []
                with torch.no_grad():
                    forward(net, x[i : i + 256], 0, False, False, stages=maps)
                rows.append(stage_features(maps).astype(np.float32))
            out[f"{name}/{seed}"] = np.concatenate(rows)
    return out


def subset(feats: dict[str, np.ndarray], index: pd.DataFrame, cells: pd.DataFrame) -> dict[str, np.ndarray]:
    """The rows of ``feats`` (aligned with ``index``) for ``cells``, in ``cells``' order."""
    pos = pd.Series(np.arange(len(index)), index=pd.MultiIndex.from_frame(index[KEY].astype(str)))
    rows = pos.loc[pd.MultiIndex.from_frame(cells[KEY].astype(str))].to_numpy()
    return {k: v[rows] for k, v in feats.items()}


def scores(bank: dict[str, np.ndarray], queries: dict[str, dict[str, np.ndarray]], params, archs) -> dict:
    """Per score (``pixel_knn``, each architecture averaged over its networks, and its first network alone), the
    score of every query set against ``bank``."""
    k, size = params.uncertainty.knn_k, params.uncertainty.knn_bank
    pix = make_novelty("pixel_knn", k, size, 0).fit(bank["pixels"])
    res = {"pixel_knn": {n: pix.score(q["pixels"]) for n, q in queries.items()}}
    for name in archs:
        per_net = []
        for seed in NETWORK_SEEDS:
            knn = KNNNovelty(k, size, 0, input="stages").fit(bank[f"{name}/{seed}"])
            per_net.append({n: knn.score(q[f"{name}/{seed}"]) for n, q in queries.items()})
        res[name] = {n: np.mean([p[n] for p in per_net], axis=0) for n in queries}
        res[f"{name}_one_network"] = per_net[0]
    return res


def loco_part(params, archs) -> dict:
    index, _ = read_table(params.index.out)
    controls = index[index["condition"].isin(CONTROL_CLASSES)].reset_index(drop=True)
    channels = prepare_data(make_splits(index, params.split)[0], list(params.split.classes), params).channels
    feats = describe(controls, params, channels, archs)
    folds = {}
    for left_out in CONTROL_CLASSES:
        split_cfg = params.split.model_copy(update={"classes": [c for c in CONTROL_CLASSES if c != left_out]})
        splits, _ = make_splits(index, split_cfg)
        sets = {"train": splits[splits["split"] == "train"], "test": splits[splits["split"] == "test"],
                "left_out": splits[(splits["split"] == "heldout") & (splits["label"] == left_out)]}
        sets = {n: subset(feats, controls, c) for n, c in sets.items()}
        s = scores(sets.pop("train"), sets, params, archs)
        folds[left_out] = {kind: auroc(v["test"], v["left_out"]) for kind, v in s.items()}
        print(left_out, json.dumps({k: round(v, 3) for k, v in folds[left_out].items()}), file=sys.stderr, flush=True)
    kinds = list(next(iter(folds.values())))
    return {"folds": folds, "mean_auroc": {k: float(np.mean([f[k] for f in folds.values()])) for k in kinds}}


def task_part(params, archs) -> dict:
    index, _ = read_table(params.index.out)
    splits, _ = make_splits(index, params.split)
    data = prepare_data(splits, list(params.split.classes), params)
    held = data.split("heldout")
    screen = screen_cells(index, Path(params.synth.out))
    novel = screen["is_novel"].fillna(False).to_numpy(bool)
    sets = {"train": data.split("train"), "test": data.split("test"), "heldout": held,
            "screen_trained_states": screen[screen["state"].isin(["on", "blocked"]).to_numpy() & ~novel],
            "novel": screen[novel]}
    keys = pd.concat([c[KEY] for c in sets.values()], ignore_index=True).drop_duplicates(KEY)
    cells = index.merge(keys, on=KEY, validate="one_to_one")  # the index's rows: what the loader reads
    feats = describe(cells, params, data.channels, archs)
    sets = {n: subset(feats, cells, c) for n, c in sets.items()}
    labels = held["label"].astype(str).to_numpy()
    out = {}
    for kind, s in scores(sets.pop("train"), sets, params, archs).items():
        row = {"heldout_pooled": auroc(s["test"], s["heldout"])}
        row |= {f"heldout_{c}": auroc(s["test"], s["heldout"][labels == c]) for c in HELD}
        row["novel_vs_screen_trained_states"] = auroc(s["screen_trained_states"], s["novel"])
        out[kind] = row
        print(kind, json.dumps({k: round(v, 3) for k, v in row.items()}), file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["loco", "task"], required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--screen", default="data", help="DIR[@SEED]: a data set written by spatial synth (default: data)")
    ap.add_argument("--arch", action="append", help="measure only these architectures (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    raw = yaml.safe_load(a.params.read_text())
    params = data_params(raw, a.screen)
    archs = architectures(params.model)
    if a.arch:
        unknown = sorted(set(a.arch) - set(archs))
        if unknown:
            raise SystemExit(f"--arch: unknown {unknown}; choose from {sorted(archs)}")
        archs = {k: v for k, v in archs.items() if k in a.arch}
    t0 = time.time()
    result = (loco_part if a.part == "loco" else task_part)(params, archs)
    result = {"part": a.part, "screen": a.screen, "network_seeds": list(NETWORK_SEEDS),
              "k": params.uncertainty.knn_k, "seconds": round(time.time() - t0, 1), "result": result}
    print(json.dumps(result, indent=2))
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
