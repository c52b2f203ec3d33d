"""Novelty from the self-supervised encoder's features (`spatial pretrain`, SimCLR): does a feature space trained to
keep cells apart, with no label, flag what a classifier never saw better than the classifier's own features?

No classifier is trained here. Per encoder, the kNN novelty (distance to the k-th nearest training cell,
L2-normalised; ``uncertainty.knn_k``, bank ``uncertainty.knn_bank``) on two kinds of encoder features: the
penultimate features (``knn``) and the multi-stage pooled statistics (``multistage_knn``); and each averaged over
the encoders of several pretraining seeds, as deep-ensemble members are.

``--part loco`` chooses among them without the default task's held-out classes or the screen's novel phenotype:
on the four control classes (encoders ``models/ssl_pretrain_s<seed>``, pretrained on the four classes' training
cells and the screen; the study stage ``ssl_pretrained`` makes them), each class in turn is left out of the bank
(the other three classes' training cells), and the score separates its test cells from the other three classes'
test cells (AUROC). The encoders saw the left-out class's training cells unlabeled (as they see every phenotype on
a screen); its test slides never.

``--part default`` measures the default task (stimulated vs ATG5 KO; held-out classes unstimulated, EI24 KO and the
timecourse, none of whose cells the encoders saw): bank = the training cells of the two classes, AUROC of each
held-out class against the test cells, and of the screen's novel phenotype against the test cells and against the
screen cells in a training state (the simulator's truth). Encoders: ``spatial pretrain`` on the default split, one
per ``train.seed``. Beside them: the trained ensemble's own score (``--model``), its sum with the encoder kNN (each
centred and scaled on the validation cells), and the averages over the encoders through the product path
(``refit_novelty`` with ``uncertainty.encoders``: what `spatial train --set uncertainty.encoders=[...]` serves), with
the scoring speed of each artifact (random 64x64 inputs, one thread with ``--threads 1``, best of 3).

    python benchmarks/encoder_novelty.py --part loco --seeds 0 1 2
    spatial pretrain --out models/pretrain; spatial pretrain --set train.seed=1 --out models/pretrain_s1  # (s2 alike)
    python benchmarks/encoder_novelty.py --part default --encoder models/pretrain/encoder.pt \\
        models/pretrain_s1/encoder.pt models/pretrain_s2/encoder.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from novelty_scores import cells_per_second
from sklearn.metrics import roc_auc_score

from training.config import load_params
from training.data.loader import loader_for
from training.data.trainset import TrainData, prepare_data
from training.engine import predict
from training.io.tables import read_table
from training.models.factory import build_model
from training.regimes.ensemble_training import refit_novelty, train_ensemble
from training.uncertainty.ensemble import Ensemble
from training.uncertainty.novelty import KNNNovelty, stage_features

CONTROL_CLASSES = ["stimulated", "unstimulated", "atg5_ko", "ei24_ko"]
INPUTS = {"knn": "features", "multistage_knn": "stages"}


def encoder_features(encoder: str, cells: pd.DataFrame, data: TrainData, params) -> dict[str, np.ndarray]:
    """Penultimate features and multi-stage pooled statistics of the encoder for ``cells`` (in row order)."""
    model = build_model(params.model.model_copy(update={"pretrained": encoder}), len(data.channels), 2)
    loader = loader_for(cells, params.data, data.channels, shuffle=False, seed=0, cache=False, batch_size=256)
    out = predict(model, loader, with_features=True, pool_stages=stage_features)
    order = np.argsort(out["idx"], kind="stable")
    return {"features": np.asarray(out["features"])[order], "stages": out["stages"][order]}


def knn_scores(bank: dict[str, np.ndarray], queries: dict[str, dict[str, np.ndarray]], params,
               seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per kind (``knn``, ``multistage_knn``): the kNN novelty of every query set against ``bank``."""
    u = params.uncertainty
    fitted = {kind: KNNNovelty(u.knn_k, u.knn_bank, seed, input=inp).fit(bank[inp]) for kind, inp in INPUTS.items()}
    return {kind: {name: knn.score(q[INPUTS[kind]]) for name, q in queries.items()} for kind, knn in fitted.items()}


def ensemble_novelty(ens: Ensemble, cells: pd.DataFrame, data: TrainData, params) -> np.ndarray:
    """The ensemble's own per-cell novelty (its ``uncertainty.novelty`` score) for ``cells`` (in row order)."""
    loader = loader_for(cells, params.data, data.channels, shuffle=False, seed=0, cache=False, batch_size=256)
    scores = np.empty(len(cells))
    for batch in loader:
        scores[batch["idx"].numpy()] = ens.predict_tensor(batch["image"])["novelty"]
    return scores


def robust_sum(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sum of scores, each centred on its validation cells' median and divided by their interquartile range."""
    out: dict[str, np.ndarray] = {}
    for s in parts:
        q25, med, q75 = np.quantile(s["val"], [0.25, 0.5, 0.75])
        for name, v in s.items():
            out[name] = out.get(name, 0.0) + (v - med) / max(q75 - q25, 1e-12)
    return out


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inlier)), np.ones(len(outlier))], np.r_[inlier, outlier]))


def loco_part(seeds: list[int], params, members: bool = True) -> dict:
    splits, _ = read_table(f"models/ssl_pretrain_s{seeds[0]}.splits.parquet")  # the same split for every seed
    data = prepare_data(splits, CONTROL_CLASSES, params)
    train, test = data.split("train"), data.split("test")
    features = [[encoder_features(f"models/ssl_pretrain_s{seed}/encoder.pt", c, data, params) for c in (train, test)]
                for seed in seeds]
    folds: dict[str, dict[str, list[float]]] = {}
    for left_out in CONTROL_CLASSES:
        keep_tr, out_te = (train["label"] != left_out).to_numpy(), (test["label"] == left_out).to_numpy()
        per_encoder = []
        for seed, (f_train, f_test) in zip(seeds, features, strict=True):
            bank = {k: v[keep_tr] for k, v in f_train.items()}
            per_encoder.append(knn_scores(bank, {"test": f_test}, params, seed))
        fold = folds.setdefault(left_out, {})
        for kind in INPUTS:
            runs = [r[kind]["test"] for r in per_encoder]
            fold[kind] = [auroc(r[~out_te], r[out_te]) for r in runs]
            fold[f"{kind}, {len(seeds)} encoders averaged"] = [auroc(np.mean(runs, 0)[~out_te],
                                                                     np.mean(runs, 0)[out_te])]
    if members:
        encoders = [f"models/ssl_pretrain_s{seed}/encoder.pt" for seed in seeds]
        for left_out, aucs in members_loco(splits, test, encoders, params).items():
            folds[left_out].update({kind: [v] for kind, v in aucs.items()})
    mean = {kind: float(np.mean([np.mean(f[kind]) for f in folds.values()])) for kind in next(iter(folds.values()))}
    return {"seeds": seeds, "folds": folds, "mean_auroc": mean, "chosen": max(mean, key=mean.get)}


def fold_auroc(ens: Ensemble, cells: tuple[pd.DataFrame, pd.DataFrame], data: TrainData, params) -> float:
    """AUROC of the ensemble's novelty: the left-out class's cells (``cells[1]``) against the inliers (``cells[0]``)."""
    return auroc(*(ensemble_novelty(ens, c, data, params) for c in cells))


def members_loco(splits: pd.DataFrame, test: pd.DataFrame, encoders: list[str], params) -> dict[str, dict]:
    """The same folds through the product path: per left-out class, a one-member ensemble of the default recipe
    trained on the other three classes (``train.seed``), its ``energy_multistage`` novelty, and the same ensemble
    refitted with ``uncertainty.encoders`` (``knn`` and ``multistage_knn``); AUROC as in :func:`loco_part`."""
    out = {}
    for left_out in CONTROL_CLASSES:
        classes = [c for c in CONTROL_CLASSES if c != left_out]
        p = load_params("params.yaml", {"split.classes": classes, "ensemble.members": 1,
                                        "uncertainty.novelty": "energy_multistage", "uncertainty.encoders": []})
        fold = prepare_data(splits[splits["label"] != left_out].reset_index(drop=True), classes, p)
        with tempfile.TemporaryDirectory() as tmp:
            ens = train_ensemble(fold, p, Path(tmp) / "ens", progress=False)
        cells = (fold.split("test"), test[test["label"] == left_out].reset_index(drop=True))
        out[left_out] = {"members energy_multistage (product)": fold_auroc(ens, cells, fold, p)}
        for kind in INPUTS:
            q = p.model_copy(update={"uncertainty": p.uncertainty.model_copy(
                update={"novelty": kind, "encoders": encoders})})
            out[left_out][f"{kind}, {len(encoders)} encoders averaged (product)"] = fold_auroc(
                refit_novelty(ens, fold, q), cells, fold, q)
        print(json.dumps({left_out: {k: round(v, 3) for k, v in out[left_out].items()}}), file=sys.stderr, flush=True)
    return out


def default_part(encoders: list[str], model: str, params, raw: str) -> dict:
    truth = pd.read_parquet(Path(raw) / "truth.parquet")
    truth = pd.DataFrame({"key": [os.path.join(raw, p) for p in truth["path"]],
                          "cell_id": truth["cell_id"], "state": truth["state"]})

    def with_state(cells: pd.DataFrame) -> pd.DataFrame:
        keyed = cells.assign(key=cells["source_file"].map(os.path.relpath))
        return keyed.merge(truth, on=["key", "cell_id"], how="left", validate="one_to_one")

    splits, _ = read_table(params.split.out)
    data = prepare_data(splits, params.split.classes, params)
    train, val, test, held = (with_state(data.split(n)) for n in ("train", "val", "test", "heldout"))
    index, _ = read_table(params.index.out)
    screen = with_state(index[index["condition"] == "screen"].reset_index(drop=True))
    queries = {"val": val, "test": test, "heldout": held, "screen": screen}
    ens = Ensemble.load(model)
    own = {n: ensemble_novelty(ens, c, data, params) for n, c in queries.items()}
    own_kind = f"ensemble {ens.spec.info.get('novelty_score', 'novelty')}"
    novel = (screen["state"] == "novel").to_numpy()
    trained_state = screen["state"].isin(["on", "blocked"]).to_numpy()

    def measure(s: dict[str, np.ndarray]) -> dict[str, float]:
        return {"auroc_heldout_pooled": auroc(s["test"], s["heldout"]),
                **{f"auroc_heldout_{label}": auroc(s["test"], s["heldout"][(held["label"] == label).to_numpy()])
                   for label in sorted(held["label"].unique())},
                "auroc_novel_vs_test": auroc(s["test"], s["screen"][novel]),
                "auroc_novel_vs_screen_trained_states": auroc(s["screen"][trained_state], s["screen"][novel])}

    per_encoder = {}
    for i, encoder in enumerate(encoders):
        feats = {n: encoder_features(encoder, c, data, params) for n, c in {"train": train, **queries}.items()}
        scores = knn_scores(feats.pop("train"), feats, params, params.seed + i)
        scores[f"{own_kind} + encoder knn"] = robust_sum([own, scores["knn"]])
        scores[f"{own_kind} + encoder multistage_knn"] = robust_sum([own, scores["multistage_knn"]])
        per_encoder[encoder] = {kind: measure(s) for kind, s in scores.items()}
    averaged, speed = {}, {own_kind: cells_per_second(ens, repeats=3)}
    for kind in INPUTS:  # the product path: the ensemble's novelty refitted on the encoders (uncertainty.encoders)
        p = params.model_copy(update={"uncertainty": params.uncertainty.model_copy(
            update={"novelty": kind, "encoders": list(encoders)})})
        with_encoders = refit_novelty(Ensemble.load(model), data, p)
        name = f"{kind}, {len(encoders)} encoders averaged (uncertainty.encoders)"
        averaged[name] = measure({n: ensemble_novelty(with_encoders, c, data, p) for n, c in queries.items()})
        speed[name] = cells_per_second(with_encoders, repeats=3)
    kinds = next(iter(per_encoder.values()))
    summary = {kind: {m: {"mean": float(np.mean(v := [r[kind][m] for r in per_encoder.values()])),
                          "min": float(np.min(v)), "max": float(np.max(v))} for m in kinds[kind]} for kind in kinds}
    return {"encoders": encoders, "model": model, "raw": raw, "index": params.index.out, "split": params.split.out,
            "classes": params.split.classes,
            "ensemble": {own_kind: measure(own)}, "per_encoder": per_encoder, "over_encoders": summary,
            "averaged": averaged, "cells_per_second": speed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["loco", "default"], required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="loco: the ssl_pretrain_s<seed> encoders")
    ap.add_argument("--no-members", action="store_true",
                    help="loco: skip the one-member ensembles (4 trainings, a few minutes) and the product-path rows")
    ap.add_argument("--encoder", nargs="+", default=["models/pretrain/encoder.pt"],
                    help="default: the encoders to measure (one per pretraining seed)")
    ap.add_argument("--model", default="models/ensemble", help="default: the trained ensemble to compare and combine")
    ap.add_argument("--raw", default="data/raw", help="default: the simulated screen's folder (its truth.parquet)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE params override (index.out=..., split.out=...)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("reports/uncertainty_study"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = load_params("params.yaml", a.set)
    if a.part == "loco":
        res, name = loco_part(a.seeds, params, not a.no_members), "encoder_loco.json"
        for c, f in res["folds"].items():
            print(f"left out {c:13s} " + "  ".join(f"{k}: {np.mean(v):.3f}" for k, v in f.items()))
        print("mean " + "  ".join(f"{k}: {v:.3f}" for k, v in res["mean_auroc"].items()) + f" -> {res['chosen']}")
    else:
        missing = [e for e in a.encoder if not Path(e).is_file()]
        if missing:
            print(f"error: encoder(s) {', '.join(missing)} not found; make one with `spatial pretrain --out DIR`",
                  file=sys.stderr)
            return 2
        res, name = default_part(a.encoder, a.model, params, a.raw), "encoder_default.json"
        for kind, r in {**res["ensemble"], **{f"{k} (mean over encoders)": {m: v["mean"] for m, v in r.items()}
                                              for k, r in res["over_encoders"].items()}, **res["averaged"]}.items():
            print(f"{kind:45s} " + "  ".join(f"{k.removeprefix('auroc_')} {v:.3f}" for k, v in r.items()))
        for kind, v in res["cells_per_second"].items():
            print(f"{kind:45s} scores {v:,.0f} cells/s (one thread)")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / name).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
