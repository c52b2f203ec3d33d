"""Is an ensemble's test ECE miscalibration, or the noise of the cells it is measured on?

Reads the ``logits_seed<k>.npz`` files ``benchmarks/uncertainty_study.py`` writes (one per ensemble) and, at the
validation temperature and at ATC's label-free one (both set without the test labels, as ``spatial evaluate`` and
``spatial recalibrate --unlabeled`` set them), reports per ensemble the test ECE, the ECEs a perfectly calibrated
model with the same confidences would show on the same cells (``ece_null_draws``: median, 95th percentile), the
consistency-resampling p-value (``ece_calibration_p``, as ``spatial evaluate`` reports it) and the probability that
such a perfect model's ECE is at or below ``--target``. Over the ensembles: how many are consistent with perfect
calibration at the 5 % level, how many meet the target, and the probability that perfectly calibrated models
would meet it on every one (the product).

    python benchmarks/calibration_noise.py reports/uncertainty_study/intel/folds*/*/logits_seed*.npz \\
        --out reports/uncertainty_study/intel/calibration_noise.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from training.evaluation.metrics import calibration_report, ece_noise_summary, ece_null_draws
from training.uncertainty.calibration import fit_temperature, pooled_log_probs
from training.uncertainty.decompose import softmax
from training.uncertainty.shift import atc_threshold, label_free_temperature

DRAWS = 1000
N_BINS = 15


def one_ensemble(path: Path, seed: int, target: float) -> dict:
    """Both temperatures' figures for one ensemble's saved logits."""
    with np.load(path) as f:  # numeric arrays only (the slide names are stored as objects)
        lv, lt = pooled_log_probs(f["val_logits"]), pooled_log_probs(f["test_logits"])
        yv, yt = f["val_y"], f["test_y"]
    temps = {"validation": fit_temperature(lv, yv),
             "atc": label_free_temperature(lt, atc_threshold(lv, yv)).temperature}
    out: dict = {"file": str(path), "n_test": int(len(yt))}
    for name, t in temps.items():
        probs = softmax(lt / t)
        ece = calibration_report(probs, yt, N_BINS)["ece"]
        null = ece_null_draws(probs, N_BINS, DRAWS, seed)  # drawn once: the summary and the target share them
        out[name] = {"temperature": float(t), "ece": ece, **ece_noise_summary(null, observed=ece),
                     "p_perfect_at_most_target": float(np.mean(null <= target))}
    return out


def summarize(runs: list[dict], target: float) -> dict:
    """Counts over the ensembles, per temperature."""
    out: dict = {"n_ensembles": len(runs), "target": target}
    for name in ("validation", "atc"):
        ece = np.array([r[name]["ece"] for r in runs])
        p = np.array([r[name]["ece_calibration_p"] for r in runs])
        perfect = np.array([r[name]["p_perfect_at_most_target"] for r in runs])
        out[name] = {
            "ece_mean": float(ece.mean()),
            "at_most_target": int((ece <= target).sum()),
            "consistent_with_perfect_calibration": int((p >= 0.05).sum()),
            "ece_if_calibrated_median_mean": float(np.mean([r[name]["ece_if_calibrated_median"] for r in runs])),
            "perfect_models_expected_at_most_target": float(perfect.sum()),
            "perfect_models_all_at_most_target_probability": float(np.prod(perfect)),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logits", nargs="+", type=Path, help="logits_seed<k>.npz files")
    ap.add_argument("--target", type=float, default=0.015)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    runs = []
    for path in sorted(a.logits):  # each ensemble's null draws are seeded by its train.seed
        seed = re.search(r"seed(\d+)", path.name)
        runs.append(one_ensemble(path, int(seed.group(1)) if seed else 0, a.target))
    result = {"summary": summarize(runs, a.target), "runs": runs}
    print(json.dumps(result["summary"], indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
