"""Label-free temperatures looked at after the fact, on the per-cell logits the uncertainty study saved.

Reads ``logits_seed<k>.npz`` files (``benchmarks/uncertainty_study.py`` writes one per ensemble) and, per ensemble,
the test ECE of the pooled ensemble at the temperature each way of predicting the new slides' error rate gives when
the mean confidence is matched to it (``training/uncertainty/shift.py``): ATC (what ``spatial recalibrate
--unlabeled`` does), the *true* error rate (not a method: how good matching could be), difference of confidences
(DoC), members' pairwise disagreement, one ATC threshold per predicted class, ATC per member averaged, ATC with
Jeffreys' prior on the validation error count (``atc_jeffreys``), and the geometric mean of ATC's and the validation
temperature; each one's ECE minus ATC's, paired by ensemble, with a 95 % t-interval; then, over ``DRAWS`` draws of
``k`` labeled test cells, the NLL refit against matching the error rate counted on those cells. Only
``atc_jeffreys`` was declared before it was read, on the sets benchmarks/FINDINGS.md names ("ATC with Jeffreys'
prior"); the rest was looked at after the fact and decides nothing.

    python benchmarks/label_free_posthoc.py reports/uncertainty_study/intel/folds/*/logits_seed*.npz \\
        --out reports/uncertainty_study/intel/folds/label_free_posthoc.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from training.evaluation.metrics import calibration_report
from training.evaluation.seeds import mean_interval
from training.uncertainty.calibration import fit_temperature, pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.shift import atc_threshold, confidence, predicted_error, temperature_for_accuracy

LABELED_CELLS = (50, 100, 200)
DRAWS = 20
JEFFREYS = 0.5  # Beta(1/2, 1/2): the validation error rate counted as (errors + 1/2) / (cells + 1)


def jeffreys_threshold(logp: np.ndarray, labels: np.ndarray, prior: float = JEFFREYS) -> float:
    """ATC's threshold with the validation error rate taken as its posterior mean under a Beta(prior, prior) prior,
    ``(errors + prior) / (cells + 2 prior)``, not at face value: the confidence below which that share of the
    validation cells falls (linear between cells; finite even with no error). Declared as a test in FINDINGS ("ATC
    with Jeffreys' prior"); it did not beat plain ATC, so it lives here and not in ``training/uncertainty/shift.py``."""
    z, y = np.asarray(logp, dtype=np.float64), np.asarray(labels)
    share = (int((z.argmax(axis=1) != y).sum()) + prior) / (y.size + 2 * prior)
    return float(np.interp(share * y.size - 0.5, np.arange(y.size), np.sort(confidence(z))))


def predicted_errors(d: dict[str, np.ndarray]) -> dict[str, float]:
    """Each way of predicting the test cells' error rate (the ``true`` one included) for one ensemble."""
    vz, tz = d["val_logits"], d["test_logits"]
    lv, lt = pooled_log_probs(vz), pooled_log_probs(tz)
    yv, yt = d["val_y"], d["test_y"]
    tv = fit_temperature(lv, yv)
    val_err = float((lv.argmax(1) != yv).mean())
    conf_val = softmax(lv / tv).max(axis=1).mean()
    conf_test = softmax(lt / tv).max(axis=1).mean()
    members = [z.reshape(len(z), -1, z.shape[-1]) for z in (vz, tz)]  # (N, M, K) with MC samples folded in
    preds = members[1].argmax(axis=-1)
    m = preds.shape[1]
    by_class = 0
    pv, pt = lv.argmax(1), lt.argmax(1)
    for c in range(lt.shape[1]):
        if (pv == c).any() and (pt == c).any():
            by_class += int((confidence(lt[pt == c]) < atc_threshold(lv[pv == c], yv[pv == c])).sum())
    return {
        "atc": predicted_error(lt, atc_threshold(lv, yv)),
        "atc_jeffreys": predicted_error(lt, jeffreys_threshold(lv, yv)),
        "true": float((lt.argmax(1) != yt).mean()),
        "doc": max(val_err + conf_val - conf_test, 0.0),
        "disagreement": float(np.mean([(preds[:, i] != preds[:, j]).mean() for i in range(m) for j in range(i + 1, m)]))
        if m > 1 else 0.0,
        "atc_by_class": by_class / len(yt),
        "atc_members": float(np.mean([predicted_error(members[1][:, k], atc_threshold(members[0][:, k], yv))
                                      for k in range(m)])),
    }


def one_ensemble(path: Path, seed: int) -> dict:
    with np.load(path) as f:  # numeric arrays only (the slide names are stored as objects)
        d = {k: f[k] for k in ("val_logits", "val_y", "test_logits", "test_y")}
    lv, lt, yv, yt = pooled_log_probs(d["val_logits"]), pooled_log_probs(d["test_logits"]), d["val_y"], d["test_y"]

    def ece(t: float, rows: np.ndarray | slice = slice(None)) -> float:
        return calibration_report(softmax(lt[rows] / t), yt[rows], 15)["ece"]

    t_val = fit_temperature(lv, yv)
    errors = predicted_errors(d)
    temps = {name: temperature_for_accuracy(lt, 1.0 - e) for name, e in errors.items()}
    temps["geometric_mean_atc_validation"] = float(np.sqrt(temps["atc"] * t_val))
    out = {"file": str(path), "ece_validation_temperature": ece(t_val), "predicted_error": errors,
           "ece": {name: ece(t) for name, t in temps.items()}, "labeled": {}}
    rng = np.random.default_rng(seed)
    for k in LABELED_CELLS:
        nll, match = [], []
        for _ in range(DRAWS):
            order = rng.permutation(len(yt))
            few, rest = order[:k], order[k:]
            nll.append(ece(fit_temperature(lt[few], yt[few]), rest))
            match.append(ece(temperature_for_accuracy(lt, 1.0 - float((lt[few].argmax(1) != yt[few]).mean())), rest))
        out["labeled"][str(k)] = {"ece_nll_refit": float(np.mean(nll)), "ece_error_rate_matched": float(np.mean(match))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logits", nargs="+", type=Path, help="logits_seed<k>.npz files")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    runs = []
    for path in sorted(a.logits):  # the labeled draws are seeded by the ensemble's train.seed, as in the study
        seed = re.search(r"seed(\d+)", path.name)
        runs.append(one_ensemble(path, int(seed.group(1)) if seed else 0))
    summary = {"ece_validation_temperature": float(np.mean([r["ece_validation_temperature"] for r in runs]))}
    for name in runs[0]["ece"]:
        v = np.array([r["ece"][name] for r in runs])
        summary[f"ece/{name}"] = float(v.mean())
        summary[f"at_most_0.015/{name}"] = int((v <= 0.015).sum())
        if name != "atc":
            summary[f"minus_atc/{name}"] = mean_interval(v - np.array([r["ece"]["atc"] for r in runs]))
    for k in runs[0]["labeled"]:
        diff = [r["labeled"][k]["ece_error_rate_matched"] - r["labeled"][k]["ece_nll_refit"] for r in runs]
        summary[f"labeled_{k}/matched_minus_nll_refit"] = float(np.mean(diff))
    result = {"n_ensembles": len(runs), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
