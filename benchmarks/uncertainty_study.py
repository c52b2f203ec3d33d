"""Calibration modes and novelty scores, measured on the simulated screen (the README's "Uncertainty you can trust").

Part ``calibration`` (the default two-class task, ``--seeds`` ensembles of ``--members`` members): test NLL / ECE of
the ensemble calibrated ``none`` / ``member`` / ``pooled`` against the mean member (each member scaled by its own
temperature), with the 95 % paired bootstrap interval ``evaluate`` computes; the pooled temperature fitted on the
validation cells, on each test slide alone, and on the validation cells of each training slide (slide shift); the
temperature refitted on a few labeled test cells, and the one ATC sets from the unlabeled test cells (label-free).
The same members give every novelty score's AUROC for the held-out classes and the screen's novel phenotype.

Part ``loco`` (how the novelty default is chosen, without the held-out classes or the novel phenotype): leave one of
the four control classes out, train on the other three, and measure how well each score flags the left-out class
against the test cells of the three.

    python benchmarks/uncertainty_study.py --out reports/uncertainty_study          # both parts, ~20 min on 2 cores
    python benchmarks/uncertainty_study.py --part loco --check                      # floor: the chosen score >= 0.5
    python benchmarks/uncertainty_study.py --part calibration --model models/ensemble   # the pipeline's ensemble

Needs ``dvc repro split`` (data/raw, data/index). Prints JSON; writes ``<out>/calibration.json`` / ``loco.json``, and
per ensemble ``<out>/logits_seed<k>.npz`` (validation and test member logits, labels and slides).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy import optimize, special
from sklearn.metrics import roc_auc_score

from training.config import parse_override, resolve
from training.data.loader import loader_for
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.engine import predict
from training.evaluation.metrics import balanced_accuracy, calibration_report, ece_if_calibrated, paired_bootstrap
from training.io.tables import read_table
from training.regimes.ensemble_training import train_member
from training.uncertainty.calibration import (
    TEMPERATURE_BOUNDS,
    fit_pooled_temperature,
    fit_temperature,
    pooled_log_probs,
)
from training.uncertainty.decompose import softmax
from training.uncertainty.ensemble import Ensemble
from training.uncertainty.novelty import NOVELTY_KINDS, make_novelty, novelty_inputs, stage_features
from training.uncertainty.pixel_descriptor import pixel_descriptor
from training.uncertainty.shift import atc_threshold, label_free_temperature

SETS: dict = {}  # --set overrides, applied to every run
RAW: dict = {}  # params.yaml, read once (an edit while the study runs does not change it)


def load_params(_path, overrides: dict | None = None):
    return resolve(RAW, {**SETS, **(overrides or {})})
CONTROL_CLASSES = ["stimulated", "unstimulated", "atg5_ko", "ei24_ko"]


def member_outputs(model: torch.nn.Module, cells: pd.DataFrame, params, channels: list[str]) -> dict[str, np.ndarray]:
    """Penultimate features, logits, multi-stage pooled features and the pixel descriptor of ``cells`` (table
    order)."""
    loader = loader_for(cells, params.data, channels, shuffle=False, seed=0, cache=False, batch_size=256)
    out = predict(model, loader, with_features=True, pool_stages=stage_features, describe_pixels=pixel_descriptor)
    order = np.argsort(out["idx"], kind="stable")
    return {k: out[k][order] for k in ("features", "logits", "stages", "pixels")}


def novelty_by_kind(train: dict, train_y: np.ndarray, queries: dict[str, dict], params, seed: int
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Every novelty kind fitted on one member's training outputs, scored on each query set."""
    res = {}
    for kind in NOVELTY_KINDS:
        nov = make_novelty(kind, params.uncertainty.knn_k, params.uncertainty.knn_bank, seed)
        nov.fit(novelty_inputs(nov, train), train_y)
        res[kind] = {name: nov.score(novelty_inputs(nov, q)) for name, q in queries.items()}
    return res


def auroc(inlier: np.ndarray, outlier: np.ndarray) -> float:
    y = np.r_[np.zeros(len(inlier)), np.ones(len(outlier))]
    return float(roc_auc_score(y, np.r_[inlier, outlier]))


def train_members(splits: pd.DataFrame, classes: list[str], params, members: int):
    data = prepare_data(splits, classes, params)
    work = Path(tempfile.mkdtemp(prefix="uncertainty_study_"))
    models, temps, val_logits, val_y = [], [], [], None
    for k in range(members):
        model, t, _, _, (vl, val_y) = train_member(k, data, params, work, progress=False)
        models.append(model)
        temps.append(t)
        val_logits.append(vl)
    return data, models, np.array(temps), np.stack(val_logits, axis=1), val_y


def screen_cells(index: pd.DataFrame, raw: Path) -> pd.DataFrame:
    truth = pd.read_parquet(raw / "truth.parquet")
    truth["source_file"] = [str(raw / p) for p in truth["path"]]
    screen = index[index["condition"] == "screen"].reset_index(drop=True)
    return screen.merge(truth[["source_file", "cell_id", "state", "is_novel", "gene"]], on=["source_file", "cell_id"],
                        how="left", validate="one_to_one")


def trained_members(model_dir: Path, splits: pd.DataFrame, classes: list[str], params):
    """``train_members``' outputs for an ensemble trained before (e.g. the pipeline's ``models/ensemble``)."""
    ens = Ensemble.load(model_dir)
    if list(ens.spec.classes) != classes:
        raise SystemExit(f"{model_dir}: classes {ens.spec.classes}, the study expects {classes}")
    data = prepare_data(splits, classes, params)
    val = data.split("val")
    val_logits = np.stack([member_outputs(m, val, params, data.channels)["logits"] for m in ens.members], axis=1)
    return data, ens.members, np.asarray(ens.spec.temperatures), val_logits, val["y"].to_numpy()


def calibration_part(seeds: int, members: int, params_path: str | None, partial: Path | None = None,
                     model_dir: Path | None = None, logits_dir: Path | None = None, first_seed: int = 0) -> dict:
    base = load_params(params_path)
    splits, _ = read_table(base.split.out)
    index, _ = read_table(base.index.out)
    screen = screen_cells(index, Path(base.synth.out))
    classes = list(base.split.classes)
    results = []
    for seed in range(first_seed, first_seed + (1 if model_dir else seeds)):
        params = load_params(params_path, {"train.seed": seed, "uncertainty.novelty": "none"})
        t0 = time.time()
        if model_dir:
            data, models, temps, val_logits, val_y = trained_members(model_dir, splits, classes, params)
            members = len(models)
        else:
            data, models, temps, val_logits, val_y = train_members(splits, classes, params, members)
        test = data.split("test")
        held = data.split("heldout")
        y = test["y"].to_numpy()
        outs = {name: [member_outputs(m, cells, params, data.channels) for m in models]
                for name, cells in (("train", data.split("train")), ("test", test), ("heldout", held),
                                    ("screen", screen))}
        logits = np.stack([o["logits"] for o in outs["test"]], axis=1)  # (N, M, K)
        t_pool = fit_pooled_temperature(val_logits, val_y)
        test_logp = pooled_log_probs(logits)
        member_probs = [softmax(logits[:, k] / temps[k]) for k in range(members)]
        views = {
            "none": softmax(logits).mean(axis=1),
            "member": np.mean(member_probs, axis=0),
            "pooled": softmax(test_logp / t_pool),
        }
        row = {"seed": seed, "member_temperatures": temps.tolist(), "pooled_temperature": t_pool,
               "train_seconds": time.time() - t0}
        for k in range(members):
            row[f"member_{k}"] = calibration_report(member_probs[k], y, 15)
        for mode, probs in views.items():
            cal = calibration_report(probs, y, 15)
            diff = paired_bootstrap(probs, member_probs, y, 15)
            row[mode] = {"nll": cal["nll"], "ece": cal["ece"],
                         "balanced_accuracy": float(balanced_accuracy(y, probs.argmax(axis=1))), **diff}
        # slide shift: the pooled temperature each test slide / each training slide's validation cells would choose
        row["pooled_temperature_per_test_slide"] = {
            g: fit_temperature(test_logp[(test["group"] == g).to_numpy()], y[(test["group"] == g).to_numpy()])
            for g in sorted(test["group"].astype(str).unique())}
        val = data.split("val")
        row["pooled_temperature_per_val_slide"] = {
            g: fit_temperature(pooled_log_probs(val_logits[(val["group"] == g).to_numpy()]), val_y[(val["group"] == g).to_numpy()])
            for g in sorted(val["group"].astype(str).unique())}
        t_test = fit_temperature(test_logp, y)
        row["pooled_temperature_fitted_on_test"] = t_test
        # not a method (it reads the test labels): the best any one temperature could do on these slides
        oracle = calibration_report(softmax(test_logp / t_test), y, 15)
        row["pooled_at_test_temperature"] = {"nll": oracle["nll"], "ece": oracle["ece"]}
        row["recalibrated_on_test_cells"] = recalibration_draws(test_logp, y, t_pool, seed)
        row.update(label_free(pooled_log_probs(val_logits), val_y, test_logp, y, test["group"].astype(str).to_numpy(),
                              views["pooled"], member_probs))
        if logits_dir is not None:  # per-cell outputs, so later label-free methods can be measured without retraining
            np.savez_compressed(logits_dir / f"logits_seed{seed}.npz", val_logits=val_logits, val_y=val_y,
                                val_group=val["group"].astype(str).to_numpy(), test_logits=logits, test_y=y,
                                test_group=test["group"].astype(str).to_numpy(), member_temperatures=temps)
        # novelty, averaged over members
        scores: dict[str, dict[str, list]] = {}
        train_y = data.split("train")["y"].to_numpy()
        for k in range(members):
            per = novelty_by_kind(outs["train"][k], train_y,
                                  {n: outs[n][k] for n in ("test", "heldout", "screen")}, params, seed)
            for kind, by_set in per.items():
                for name, s in by_set.items():
                    scores.setdefault(kind, {}).setdefault(name, []).append(s)
        nov = {}
        novel = screen["is_novel"].fillna(False).to_numpy(bool)
        trained_state = screen["state"].isin(["on", "blocked"]).to_numpy()
        for kind, by_set in scores.items():
            m = {n: np.mean(v, axis=0) for n, v in by_set.items()}
            entry = {"heldout_pooled": auroc(m["test"], m["heldout"])}
            for cls in sorted(held["label"].astype(str).unique()):
                entry[f"heldout_{cls}"] = auroc(m["test"], m["heldout"][(held["label"] == cls).to_numpy()])
            entry["novel_vs_test"] = auroc(m["test"], m["screen"][novel])
            entry["novel_vs_screen_trained_states"] = auroc(m["screen"][trained_state & ~novel], m["screen"][novel])
            nov[kind] = entry
        row["novelty"] = nov
        results.append(row)
        if partial is not None:
            partial.write_text(json.dumps(results, indent=2))
        print(json.dumps({"seed": seed, "pooled": row["pooled"], "member": row["member"], "none": row["none"]}),
              file=sys.stderr, flush=True)
    return {"seeds": seeds, "members": members, "runs": results, "summary": summarise(results)}


def label_free(val_logp: np.ndarray, val_y: np.ndarray, test_logp: np.ndarray, y: np.ndarray, groups: np.ndarray,
               validation_probs: np.ndarray, member_probs: list[np.ndarray]) -> dict:
    """The temperature ATC sets from the test cells without their labels (``training/uncertainty/shift.py``): once
    for the test slides together (``label_free``) and once per test slide (``label_free_per_slide``), each with its
    NLL / ECE, the ECE minus the mean member's and minus the validation temperature's (paired bootstrap intervals),
    and the predicted against the actual error rate."""
    threshold = atc_threshold(val_logp, val_y)
    wrong = test_logp.argmax(axis=1) != y

    def entry(probs: np.ndarray, **info) -> dict:
        cal = calibration_report(probs, y, 15)
        vs_member = paired_bootstrap(probs, member_probs, y, 15)
        vs_val = paired_bootstrap(probs, [validation_probs], y, 15)
        return {**info, "nll": cal["nll"], "ece": cal["ece"], **vs_member,
                **{f"{k}_vs_validation_temperature": v for k, v in vs_val.items()}}

    pooled = label_free_temperature(test_logp, threshold)
    per_slide, probs = {}, np.empty_like(test_logp)
    for g in sorted(set(groups)):
        rows = groups == g
        fit = label_free_temperature(test_logp[rows], threshold)
        probs[rows] = softmax(test_logp[rows] / fit.temperature)
        per_slide[g] = {"temperature": fit.temperature, "predicted_error": fit.predicted_error,
                        "error": float(wrong[rows].mean())}
    return {
        "atc_threshold": threshold,
        "label_free": entry(softmax(test_logp / pooled.temperature), temperature=pooled.temperature,
                            predicted_error=pooled.predicted_error, error=float(wrong.mean())),
        "label_free_per_slide": entry(probs, slides=per_slide),
    }


RECALIBRATION_CELLS = (50, 100, 200)
RECALIBRATION_DRAWS = 20


def fit_temperature_and_class_bias(logp: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """One temperature and a bias per class (the first fixed at 0) on log-probabilities, by NLL: a new slide can
    shift the classes' confidences apart, which one temperature cannot follow (vector scaling with tied scales)."""
    k = logp.shape[1]

    def nll(theta: np.ndarray) -> float:
        z = logp / np.exp(theta[0]) + np.concatenate([[0.0], theta[1:]])
        return float(-special.log_softmax(z, axis=1)[np.arange(len(y)), y].mean())

    res = optimize.minimize(nll, np.zeros(k), method="L-BFGS-B", bounds=[tuple(np.log(TEMPERATURE_BOUNDS))] + [(-10, 10)] * (k - 1))
    return float(np.exp(res.x[0])), np.concatenate([[0.0], res.x[1:]])


def recalibration_draws(logp: np.ndarray, y: np.ndarray, t_val: float, seed: int) -> dict[str, dict[str, float]]:
    """A person labels ``k`` random cells of the new slides and the pooled temperature is refitted on them: per ``k``,
    over ``RECALIBRATION_DRAWS`` draws, the ECE on the other test cells, the validation temperature's ECE on the same
    cells, the share of draws at or below 0.015, the median temperature fitted, the ECE a perfectly calibrated model
    with the refitted confidences would show on those cells (median of 200 draws: the sampling-noise floor), and the
    same refit with a bias per class as well (``class_bias_*``). ``logp``: the ensemble's pooled log-probabilities."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in RECALIBRATION_CELLS:
        fitted, refit, kept, floor, biased = [], [], [], [], []
        for draw in range(RECALIBRATION_DRAWS):
            order = rng.permutation(len(y))
            few, rest = order[:k], order[k:]
            t = fit_temperature(logp[few], y[few])
            probs = softmax(logp[rest] / t)
            fitted.append(t)
            refit.append(calibration_report(probs, y[rest], 15)["ece"])
            kept.append(calibration_report(softmax(logp[rest] / t_val), y[rest], 15)["ece"])
            floor.append(ece_if_calibrated(probs, 15, draws=200, seed=draw)["ece_if_calibrated_median"])
            tb, bias = fit_temperature_and_class_bias(logp[few], y[few])
            biased.append(calibration_report(softmax(logp[rest] / tb + bias), y[rest], 15)["ece"])
        out[str(k)] = {"ece_mean": float(np.mean(refit)), "ece_validation_temperature_mean": float(np.mean(kept)),
                       "share_at_most_0.015": float(np.mean(np.array(refit) <= 0.015)),
                       "temperature_median": float(np.median(fitted)),
                       "ece_if_calibrated_median_mean": float(np.mean(floor)),
                       "class_bias_ece_mean": float(np.mean(biased)),
                       "class_bias_share_at_most_0.015": float(np.mean(np.array(biased) <= 0.015))}
    return out


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for mode in ("none", "member", "pooled"):
        for key in ("nll", "ece", "ece_diff", "nll_diff"):
            v = np.array([r[mode][key] for r in runs])
            out[f"{mode}/{key}_mean"] = float(v.mean())
        out[f"{mode}/ece_diff_excludes_zero_worse"] = [bool(r[mode]["ece_diff_ci_low"] > 0) for r in runs]
    out["pooled/balanced_accuracy_mean"] = float(np.mean([r["pooled"]["balanced_accuracy"] for r in runs]))
    out["mean_member/ece_mean"] = float(np.mean([np.mean([r[f"member_{k}"]["ece"] for k in range(len(r["member_temperatures"]))]) for r in runs]))
    for kind in runs[0]["novelty"]:
        for key in runs[0]["novelty"][kind]:
            out[f"novelty/{kind}/{key}"] = float(np.mean([r["novelty"][kind][key] for r in runs]))
    return out


def loco_part(params_path: str | None, seed: int = 0, partial: Path | None = None) -> dict:
    base = load_params(params_path)
    index, _ = read_table(base.index.out)
    folds = {}
    for left_out in CONTROL_CLASSES:
        classes = [c for c in CONTROL_CLASSES if c != left_out]
        params = load_params(params_path, {"split.classes": classes, "train.seed": seed, "uncertainty.novelty": "none"})
        splits, _ = make_splits(index, params.split)
        splits = splits[splits["label"].isin(CONTROL_CLASSES) & splits["split"].isin(["train", "val", "test", "heldout"])]
        data, models, *_ = train_members(splits.reset_index(drop=True), classes, params, 1)
        held = data.split("heldout")
        held = held[held["label"] == left_out].reset_index(drop=True)
        outs = {n: member_outputs(models[0], c, params, data.channels)
                for n, c in (("train", data.split("train")), ("test", data.split("test")), ("left_out", held))}
        per = novelty_by_kind(outs["train"], data.split("train")["y"].to_numpy(),
                              {"test": outs["test"], "left_out": outs["left_out"]}, params, seed)
        folds[left_out] = {kind: auroc(s["test"], s["left_out"]) for kind, s in per.items()}
        print(json.dumps({left_out: folds[left_out]}), file=sys.stderr, flush=True)
        if partial is not None:
            partial.write_text(json.dumps(folds, indent=2))
    mean = {kind: float(np.mean([f[kind] for f in folds.values()])) for kind in NOVELTY_KINDS}
    return {"folds": folds, "mean_auroc": mean, "chosen": max(mean, key=mean.get)}


def loco_over_seeds(runs: list[dict]) -> dict:
    """Several seeds' ``loco_part``: per kind the mean over every (fold, seed), each seed's mean, and the pick."""
    kinds = list(runs[0]["mean_auroc"])
    mean = {k: float(np.mean([f[k] for r in runs for f in r["folds"].values()])) for k in kinds}
    return {"seeds": runs, "mean_auroc": mean, "mean_auroc_per_seed": {k: [r["mean_auroc"][k] for r in runs] for k in kinds},
            "chosen": max(mean, key=mean.get)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["calibration", "loco", "both"], default="both")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--loco-seeds", type=int, default=1,
                    help="leave-one-class-out with train.seed 0..N-1; the pick is the best mean over every fold and seed")
    ap.add_argument("--first-seed", type=int, default=0, help="train.seed of the first ensemble (then +1, +2, ...)")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None,
                    help="measure this trained ensemble (e.g. models/ensemble) instead of training --seeds ensembles")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override (e.g. train.epochs=2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="reports/uncertainty_study")
    ap.add_argument("--check", action="store_true", help="fail when the LOCO-chosen score's mean AUROC is < 0.5")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    SETS.update(dict(parse_override(item) for item in a.set))
    RAW.update(yaml.safe_load(Path(a.params).read_text()) or {})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    if a.part in ("loco", "both"):
        runs = [loco_part(a.params, seed, partial=out / f"loco_partial_seed{seed}.json") for seed in range(a.loco_seeds)]
        loco = runs[0] if len(runs) == 1 else loco_over_seeds(runs)
        (out / "loco.json").write_text(json.dumps(loco, indent=2))
        print(json.dumps({"loco_mean_auroc": loco["mean_auroc"], "chosen": loco["chosen"]}, indent=2))
        ok &= loco["mean_auroc"][loco["chosen"]] >= 0.5
    if a.part in ("calibration", "both"):
        cal = calibration_part(a.seeds, a.members, a.params, partial=out / "calibration_partial.json", model_dir=a.model,
                               logits_dir=out, first_seed=a.first_seed)
        (out / "calibration.json").write_text(json.dumps(cal, indent=2))
        print(json.dumps(cal["summary"], indent=2))
    return 1 if a.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
