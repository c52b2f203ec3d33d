"""Are an ensemble's confident errors on new slides miscalibration, or cells whose slide label is wrong?

A knockout control slide is labeled by its gRNA, but about 3 % of its cells escape the knockout and look wild-type
(``synth``'s ``control_escape``; in a real screen, in-frame edits and unedited cells). A phenotype classifier that
calls such a cell "stimulated" with confidence is right about the cell and wrong about its slide label, and the
ECE counts it as a confident error. The simulated screen knows each cell's true state (``truth.parquet``), so this
script reads the per-cell logits ``benchmarks/uncertainty_study.py`` saved for the slide folds
(``<fold>/logits_seed<k>.npz``), rebuilds each fold's test table in the study's order (``split.test_groups``, checked
against the saved labels and slides), and reports per ensemble, at the validation temperature and at ATC's
label-free one (both set from the validation cells' slide labels, as ``spatial evaluate`` and ``spatial recalibrate
--unlabeled`` set them):

* ``ece_slide_labels``: the ECE against the slide labels (what the study reported);
* ``ece_phenotype``: against each cell's phenotype, escapers (knockout-slide cells the knockout missed, in an
  autophagy-on state) labeled as the class they look like;
* the test errors and the confident ones (confidence >= 0.9), counted by the cell's true state;
* the balanced accuracy against the slide labels and against the phenotype (the same at any temperature).

A fold split made with a labels history (``spatial split --set label.labels=FILE``) is rebuilt with ``--labels
FILE``; ``--baseline OTHER.json`` adds each figure's difference to another run of this script, paired by fold and
seed.

    python benchmarks/calibration_truth.py --raw data/raw --index data/index/cells.parquet \\
        reports/uncertainty_study/intel/folds_encoder*/*/logits_seed*.npz \\
        --out reports/uncertainty_study/intel/calibration_truth.json

Fold directories are named ``s<k><j>``: test slides ``atg5_ko_s<k>`` and ``stimulated_s<j>`` (the fold study's
names). The raw data must be the screen the logits were computed on (``synth.seed`` 0, the default).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from escaper_labels import is_escaper

from serving.cli.options import write_json
from training.config import resolve
from training.data.labels import current_labels
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.evaluation.metrics import balanced_accuracy, calibration_report
from training.evaluation.seeds import mean_interval
from training.io.tables import read_table
from training.uncertainty.calibration import fit_temperature, pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.shift import atc_threshold, label_free_temperature

N_BINS = 15
CONFIDENT = 0.9
ACCURACIES = ("balanced_accuracy_slide_labels", "balanced_accuracy_phenotype")


def fold_test_cells(fold: str, index: pd.DataFrame, raw: Path, params_raw: dict,
                    cell_labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """The fold's test table in the study's order, with each cell's true state and its phenotype label."""
    m = re.fullmatch(r"s(\d)s(\d)", fold)
    if m is None:
        raise SystemExit(f"fold directory {fold!r} is not named s<k>s<j> (test slides atg5_ko_s<k>, stimulated_s<j>)")
    groups = [f"atg5_ko_s{m.group(1)}", f"stimulated_s{m.group(2)}"]
    params = resolve(params_raw, {"split.test_groups": groups})
    splits, _ = make_splits(index, params.split, cell_labels)
    classes = list(params.split.classes)
    test = prepare_data(splits, classes, params).split("test").reset_index(drop=True)
    truth = pd.read_parquet(raw / "truth.parquet")
    truth["source_file"] = [str(raw / p) for p in truth["path"]]
    test = test.merge(truth[["source_file", "cell_id", "state", "knockout"]], on=["source_file", "cell_id"],
                      how="left", validate="one_to_one")
    if test["state"].isna().any():
        raise SystemExit(f"{int(test['state'].isna().sum())} test cells of fold {fold} have no truth row in {raw}")
    wt_class = classes.index("stimulated")
    escaper = is_escaper(test)  # the test slides keep their slide labels: ``condition`` is the slide's class
    test["escaper"] = escaper.to_numpy()
    test["phenotype_y"] = np.where(escaper, wt_class, test["y"].to_numpy())
    return test


def counts(kinds: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in pd.Series(kinds).value_counts().sort_index().items()}


def category(test: pd.DataFrame) -> np.ndarray:
    """Each test cell's true kind: escaper, debris, doublet, or its state (blocked / on / partial / off)."""
    return np.where(test["escaper"], "escaper", test["state"].astype(str).to_numpy())


def one_ensemble(path: Path, test: pd.DataFrame) -> dict:
    with np.load(path, allow_pickle=True) as f:
        lv, lt = pooled_log_probs(f["val_logits"]), pooled_log_probs(f["test_logits"])
        yv, yt, groups = f["val_y"], f["test_y"], f["test_group"].astype(str)
    if len(yt) != len(test) or (yt != test["y"].to_numpy()).any() or (groups != test["group"].astype(str)).any():
        raise SystemExit(f"{path}: the saved test labels or slides do not match the rebuilt test table")
    temps = {"validation": fit_temperature(lv, yv),
             "atc": label_free_temperature(lt, atc_threshold(lv, yv)).temperature}
    kinds = category(test)
    predicted = lt.argmax(1)  # the same at any temperature
    out: dict = {"file": str(path), "n_test": int(len(yt)), "n_escapers": int(test["escaper"].sum()),
                 "balanced_accuracy_slide_labels": balanced_accuracy(yt, predicted),
                 "balanced_accuracy_phenotype": balanced_accuracy(test["phenotype_y"].to_numpy(), predicted)}
    for name, t in temps.items():
        probs = softmax(lt / t)
        wrong = probs.argmax(1) != yt
        confident = wrong & (probs.max(1) >= CONFIDENT)
        out[name] = {
            "temperature": float(t),
            "ece_slide_labels": calibration_report(probs, yt, N_BINS)["ece"],
            "ece_phenotype": calibration_report(probs, test["phenotype_y"].to_numpy(), N_BINS)["ece"],
            "errors": counts(kinds[wrong]),
            "confident_errors": counts(kinds[confident]),
        }
    return out


def summarize(runs: list[dict], target: float) -> dict:
    out: dict = {"n_ensembles": len(runs), "target": target, "confident_at": CONFIDENT}
    for m in ACCURACIES:
        out[f"{m}_mean"] = float(np.mean([r[m] for r in runs]))
    for name in ("validation", "atc"):
        slide = np.array([r[name]["ece_slide_labels"] for r in runs])
        pheno = np.array([r[name]["ece_phenotype"] for r in runs])
        conf = sum(sum(r[name]["confident_errors"].values()) for r in runs)
        esc = sum(r[name]["confident_errors"].get("escaper", 0) for r in runs)
        err = sum(sum(r[name]["errors"].values()) for r in runs)
        out[name] = {
            "ece_slide_labels_mean": float(slide.mean()), "at_most_target_slide_labels": int((slide <= target).sum()),
            "ece_phenotype_mean": float(pheno.mean()), "at_most_target_phenotype": int((pheno <= target).sum()),
            "errors": int(err), "confident_errors": int(conf), "confident_errors_escapers": int(esc),
            "escaper_share_of_confident_errors": esc / conf if conf else float("nan"),
        }
    return out


def paired(runs: list[dict], baseline: list[dict]) -> dict:
    """This file's ensembles minus the baseline's, paired by fold and seed: mean and 95 % t-interval per figure."""
    def key(r: dict) -> tuple[str, str]:
        return r["fold"], re.search(r"seed(\d+)", r["file"]).group(1)

    base = {key(r): r for r in baseline}
    pairs = [(r, base[key(r)]) for r in runs if key(r) in base]
    if not pairs:
        raise SystemExit("--baseline: no ensemble of the same fold and seed")
    diffs = {f"{t}/{m}": mean_interval(a[t][m] - b[t][m] for a, b in pairs)
             for t in ("validation", "atc") for m in ("ece_slide_labels", "ece_phenotype")}
    for m in ACCURACIES:
        diffs[m] = mean_interval(a[m] - b[m] for a, b in pairs)
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logits", nargs="+", type=Path, help="<fold>/logits_seed<k>.npz files")
    ap.add_argument("--raw", type=Path, default=Path("data/raw"), help="the screen's raw folder (truth.parquet)")
    ap.add_argument("--index", type=Path, default=Path("data/index/cells.parquet"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--labels", type=Path, default=None, help="the labels history the fold splits were made with")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another output of this script: differences paired by fold and seed")
    ap.add_argument("--target", type=float, default=0.015)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    params_raw = yaml.safe_load(a.params.read_text())
    index, _ = read_table(a.index)
    tables: dict[str, pd.DataFrame] = {}
    runs = []
    for path in sorted(a.logits):
        fold = path.parent.name
        if fold not in tables:
            tables[fold] = fold_test_cells(fold, index, a.raw, params_raw,
                                           current_labels(a.labels) if a.labels else None)
        runs.append({"fold": fold, **one_ensemble(path, tables[fold])})
    result = {"summary": summarize(runs, a.target), "runs": runs}
    if a.baseline:
        result["summary"]["minus_baseline"] = {"baseline": str(a.baseline),
                                               **paired(runs, json.loads(a.baseline.read_text())["runs"])}
    print(json.dumps(result["summary"], indent=2))
    if a.out:
        write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
