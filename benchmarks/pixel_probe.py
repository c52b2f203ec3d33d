"""Is the held-out classes' difference in the pixel description, and can a label-free distance find it?

No model is trained: ``pixel_knn`` needs only the images. On the default screen's split, per variant of the pixel
description and of the distance, the AUROC of held-out classes against the test cells of the training classes
(pooled and per class) and of the screen's novel phenotype against its cells in a training state, with the bank the
training cells. Then the ceiling: a logistic regression that *sees* the held-out class (5-fold cross-validated
on test cells against that class's cells, the same description) says how separable each class is at all. An
exploratory probe on a screen that was seen before: it decides nothing.

    python benchmarks/pixel_probe.py --out reports/uncertainty_study/intel/pixel/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving.cli.options import write_json
from training.config import resolve
from training.data.loader import loader_for
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.io.tables import read_table
from training.uncertainty.novelty import PixelKNN, kth_nearest
from training.uncertainty.pixel_descriptor import _gaussian_blur, pixel_descriptor

HELD = ("unstimulated", "ei24_ko", "timecourse")


def images(cells: pd.DataFrame, params, channels: list[str]) -> torch.Tensor:
    """Model-ready images of ``cells`` in table order."""
    xs, idx = [], []
    for b in loader_for(cells, params.data, channels, shuffle=False, seed=0, cache=False, batch_size=256):
        xs.append(b["image"])
        idx.append(b["idx"])
    return torch.cat(xs)[np.argsort(torch.cat(idx).numpy(), kind="stable")]


def spot_counts(x: torch.Tensor, levels: tuple[float, ...] = (3.0, 6.0, 12.0)) -> np.ndarray:
    """Local maxima of the two fine difference-of-Gaussian bands above ``levels`` robust SDs of the band: spots."""
    b = [_gaussian_blur(x, s) for s in (1.0, 2.0, 4.0)]
    out = []
    for d in (b[0] - b[1], b[1] - b[2]):
        flat = d.flatten(2)
        med = flat.median(2).values
        mad = (flat - med[..., None]).abs().median(2).values * 1.4826 + 1e-8
        z = (d - med[..., None, None]) / mad[..., None, None]
        peak = d == F.max_pool2d(d, 3, 1, 1)
        out += [(peak & (z > t)).flatten(2).sum(2).float() for t in levels]
    return torch.cat(out, 1).double().numpy()


def radial_profile(x: torch.Tensor, rings: int = 4) -> np.ndarray:
    """Mean intensity in concentric rings around the crop centre (over the cell's mean), and the intensity-weighted
    mean and SD of the radius: where in the cell the signal sits."""
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    r = torch.sqrt(yy**2 + xx**2) / (min(h, w) / 2)
    edges = np.linspace(0, 1, rings + 1)
    ring = torch.stack([(x * ((r >= a) & (r < b))).flatten(2).sum(2) / ((r >= a) & (r < b)).sum()
                        for a, b in zip(edges, edges[1:], strict=False)], -1)
    tot = x.flatten(2).sum(2).clamp_min(1e-8)
    mean_r = (x * r).flatten(2).sum(2) / tot
    sd_r = ((x * r**2).flatten(2).sum(2) / tot - mean_r**2).clamp_min(0).sqrt()
    return torch.cat([(ring / ring.mean(-1, keepdim=True).clamp_min(1e-8)).flatten(1), mean_r, sd_r], 1).double().numpy()


DESCRIPTIONS: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
    "pixel_descriptor": pixel_descriptor,
    "+spot_counts": lambda x: np.c_[pixel_descriptor(x), spot_counts(x)],
    "+radial_profile": lambda x: np.c_[pixel_descriptor(x), radial_profile(x)],
}


def distances(train: np.ndarray, queries: dict[str, np.ndarray], k: int) -> dict[str, dict[str, np.ndarray]]:
    """Each distance variant on ``pixel_knn``'s standardised signed-log transform, fitted on ``train``."""
    m = PixelKNN(k=k).fit(train)
    t = {n: m.transform(q) for n, q in queries.items()}
    bank = m.transform(train)
    mu = bank.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(bank - mu, rowvar=False))
    white = evecs / np.sqrt(evals + 1e-2 * evals.max())
    _, _, vt = np.linalg.svd(bank - mu, full_matrices=False)
    out = {f"knn_k{kk}": {n: kth_nearest(q, bank, kk) for n, q in t.items()} for kk in (3, k, 30)}
    out["knn_whitened"] = {n: kth_nearest((q - mu) @ white, (bank - mu) @ white, k) for n, q in t.items()}
    out["knn_pca5"] = {n: kth_nearest((q - mu) @ vt[:5].T, (bank - mu) @ vt[:5].T, k) for n, q in t.items()}
    return out


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inlier)), np.ones(len(outlier))], np.r_[inlier, outlier]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    params = resolve(yaml.safe_load(a.params.read_text()), {})
    index, _ = read_table(params.index.out)
    splits, _ = make_splits(index, params.split)
    data = prepare_data(splits, list(params.split.classes), params)
    held = data.split("heldout")
    raw = Path(params.synth.out)
    truth = pd.read_parquet(raw / "truth.parquet").assign(source_file=lambda t: [str(raw / p) for p in t["path"]])
    screen = index[index["condition"] == "screen"].merge(truth[["source_file", "cell_id", "state", "is_novel"]],
                                                         on=["source_file", "cell_id"], validate="one_to_one")
    novel = screen["is_novel"].fillna(False).astype(bool)
    sets = {"train": data.split("train"), "test": data.split("test"), "heldout": held,
            "screen_trained_states": screen[screen["state"].isin(["on", "blocked"]) & ~novel], "novel": screen[novel]}
    x = {n: images(c, params, data.channels) for n, c in sets.items()}
    labels = held["label"].astype(str).to_numpy()
    result: dict = {"k": params.uncertainty.knn_k, "label_free": {}, "supervised_ceiling": {}}
    for name, describe in DESCRIPTIONS.items():
        d = {n: describe(v) for n, v in x.items()}
        for dist, s in distances(d["train"], {n: v for n, v in d.items() if n != "train"},
                                 params.uncertainty.knn_k).items():
            row = {"heldout_pooled": auroc(s["test"], s["heldout"])}
            row |= {f"heldout_{c}": auroc(s["test"], s["heldout"][labels == c]) for c in HELD}
            row["novel_vs_screen_trained_states"] = auroc(s["screen_trained_states"], s["novel"])
            result["label_free"][f"{name}/{dist}"] = row
            print(name, dist, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        t = PixelKNN().fit(d["test"])
        for c in HELD:
            feats = np.r_[t.transform(d["test"]), t.transform(d["heldout"][labels == c])]
            y = np.r_[np.zeros(len(d["test"])), np.ones(int((labels == c).sum()))]
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            p = cross_val_predict(clf, feats, y, cv=5, method="predict_proba")[:, 1]
            result["supervised_ceiling"][f"{name}/{c}"] = float(roc_auc_score(y, p))
        print(name, "ceiling", {k: round(v, 3) for k, v in result["supervised_ceiling"].items() if k.startswith(name)})
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
