"""Several ``uncertainty_study.py --part calibration`` runs read together: per arm, mean and 95 % t-interval over
seeds; per other arm, the paired difference to the baseline arm; per run, which of issue 13's targets it meets.

    python benchmarks/uncertainty_seeds.py --baseline convnext \\
        --run convnext=reports/uncertainty_study/intel/scratch/calibration.json \\
        --run vgg=reports/uncertainty_study/intel/vgg_m3/calibration.json@0 \\
        --run vgg=reports/uncertainty_study/intel/vgg_m3_s1/calibration.json@1 \\
        --novelty multistage_knn --out reports/uncertainty_study/intel/vgg_seeds.json

``ARM=FILE`` takes every run in the file with the seed it recorded; ``ARM=FILE@SEED`` takes a file of one run (a
study of a trained ``--model``, which records seed 0) as that seed; ``ARM=FILE@+N`` adds ``N`` to every recorded seed,
so that the folds of a cross-validation (seeds 0-2 each) become one arm and two recipes pair by fold and seed
(``--run scratch=s1s1/calibration.json@+10 --run encoder=enc/s1s1/calibration.json@+10 ...``). ``--all`` adds the mean and interval over every run
of every arm, for arms that are replicates of one recipe (the slide folds of a cross-validation): the interval then
treats all runs as independent, so it reads as a description, not a test. ``--per-file`` averages each file's runs
into one unit, for files that hold one screen each (the interval then counts screens, not ensembles). Prints a
table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.evaluation.seeds import compare_arms, mean_interval

TARGETS = {  # issue 13: ECE <= 0.015 and never worse than the mean member beyond noise; novelty >= 0.85 / 0.95
    "ece": ("<=", 0.015),
    "heldout_pooled": (">=", 0.85),
    "novel_vs_screen": (">=", 0.95),
}


def run_metrics(run: dict, novelty: str, others: tuple[str, ...] = ()) -> dict[str, float]:
    """The figures issue 13 reads from one ensemble's row of a calibration study; for each of ``others`` (novelty
    scores fitted on the same members) also its figures and ``novelty`` minus it, so scores pair by ensemble."""
    pooled, nov = run["pooled"], run["novelty"]
    out = {"ece": pooled["ece"], "nll": pooled["nll"], "balanced_accuracy": pooled["balanced_accuracy"],
           "ece_minus_mean_member": pooled["ece_diff"], "ece_minus_mean_member_ci_low": pooled["ece_diff_ci_low"]}
    if "none" in run:  # the uncalibrated ensemble
        out["ece_uncalibrated"] = run["none"]["ece"]
    if "pooled_at_test_temperature" in run:  # studies since the slide folds: the temperature the test cells want
        out["ece_at_test_temperature"] = run["pooled_at_test_temperature"]["ece"]
        out["temperature_validation"] = run["pooled_temperature"]
        out["temperature_test"] = run["pooled_temperature_fitted_on_test"]
    for k, recal in run.get("recalibrated_on_test_cells", {}).items():  # the temperature refitted on k labeled cells
        out[f"ece_recalibrated_on_{k}_cells"] = recal["ece_mean"]
        if "class_bias_ece_mean" in recal:  # the refit with a bias per class, and the sampling-noise floor
            out[f"ece_recalibrated_with_class_bias_on_{k}_cells"] = recal["class_bias_ece_mean"]
            out[f"ece_if_calibrated_after_refit_on_{k}_cells"] = recal["ece_if_calibrated_median_mean"]
            out[f"class_bias_minus_temperature_on_{k}_cells"] = recal["class_bias_ece_mean"] - recal["ece_mean"]
    for arm in ("label_free", "label_free_per_slide"):  # ATC's temperature from the unlabeled test cells
        if arm in run:
            out[f"ece_{arm}"] = run[arm]["ece"]
            out[f"ece_{arm}_minus_validation_temperature"] = run[arm]["ece_diff_vs_validation_temperature"]
            out[f"ece_{arm}_minus_mean_member"] = run[arm]["ece_diff"]
    if "label_free" in run:
        out["temperature_label_free"] = run["label_free"]["temperature"]
        out["label_free_predicted_minus_actual_error"] = run["label_free"]["predicted_error"] - run["label_free"]["error"]
    for score in dict.fromkeys([novelty, "energy_multistage", *others]):
        if score not in nov:
            raise SystemExit(f"novelty score '{score}' not in this study (it has {', '.join(nov)})")
        out[f"{score}/heldout_pooled"] = nov[score]["heldout_pooled"]
        out[f"{score}/novel_vs_screen"] = nov[score]["novel_vs_screen_trained_states"]
    for score in dict.fromkeys(others):
        if score != novelty:
            for key in ("heldout_pooled", "novel_vs_screen"):
                out[f"{novelty}_minus_{score}/{key}"] = out[f"{novelty}/{key}"] - out[f"{score}/{key}"]
    return out


def meets(metrics: dict[str, float], novelty: str) -> dict[str, bool]:
    """Each target of issue 13 for one ensemble (ECE also needs no member-worse interval above zero)."""
    ok = {}
    for key, (op, bound) in TARGETS.items():
        value = metrics[key if key == "ece" else f"{novelty}/{key}"]
        ok[key] = value <= bound if op == "<=" else value >= bound
    ok["ece"] = ok["ece"] and metrics["ece_minus_mean_member_ci_low"] <= 0
    return ok


def load_runs(specs: list[str]) -> dict[str, dict[int, dict]]:
    arms: dict[str, dict[int, dict]] = {}
    for spec in specs:
        arm, sep, rest = spec.partition("=")
        if not sep or not arm:
            raise SystemExit(f"--run {spec}: expected ARM=FILE, ARM=FILE@SEED or ARM=FILE@+N")
        path, _, seed = rest.partition("@")
        try:
            runs = json.loads(Path(path).read_text())["runs"]
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"--run {spec}: cannot read a calibration study's runs ({exc})") from None
        if seed.startswith("+"):
            if not seed[1:].isdigit():
                raise SystemExit(f"--run {spec}: expected @+N with N a whole number")
            runs = [{**r, "seed": r["seed"] + int(seed[1:])} for r in runs]
        elif seed:
            if len(runs) != 1:
                raise SystemExit(f"--run {spec}: @SEED needs a file of one run, it has {len(runs)}")
            runs = [{**runs[0], "seed": int(seed)}]
        for run in runs:
            if run["seed"] in arms.setdefault(arm, {}):
                raise SystemExit(f"arm '{arm}' has seed {run['seed']} twice")
            arms[arm][run["seed"]] = {**run, "file": path}
    return arms


def per_file(runs: dict[int, dict[str, float]], files: dict[int, str]) -> dict[int, dict[str, float]]:
    """The runs of each file averaged into one unit, numbered 0, 1, ... in the order of their seeds: the screen, not
    the ensemble, as the unit where each file holds one screen's ensembles."""
    by_file: dict[str, list[dict[str, float]]] = {}
    for seed, metrics in runs.items():
        by_file.setdefault(files[seed], []).append(metrics)
    return {unit: {key: float(np.mean([m[key] for m in group])) for key in group[0]}
            for unit, group in enumerate(by_file.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="ARM=FILE, ARM=FILE@SEED or ARM=FILE@+N (repeat)")
    ap.add_argument("--baseline", required=True, help="the arm the others are compared with, seed by seed")
    ap.add_argument("--novelty", default="energy_multistage", help="the score the novelty targets are read on")
    ap.add_argument("--compare-novelty", nargs="*", default=[], metavar="SCORE",
                    help="other novelty scores of the same members: their figures and --novelty minus each, paired")
    ap.add_argument("--all", action="store_true", help="also mean and interval over every run of every arm")
    ap.add_argument("--per-file", action="store_true",
                    help="average each --run file's ensembles into one unit (one screen each), numbered 0, 1, ...")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    arms = load_runs(args.run)
    if args.baseline not in arms:
        raise SystemExit(f"--baseline {args.baseline}: no such arm ({', '.join(arms)})")
    per_run = {arm: {s: run_metrics(r, args.novelty, tuple(args.compare_novelty)) for s, r in sorted(runs.items())} for arm, runs in arms.items()}
    if args.per_file:
        per_run = {arm: per_file(runs, {s: r["file"] for s, r in arms[arm].items()}) for arm, runs in per_run.items()}
    every = [m for runs in per_run.values() for m in runs.values()]
    keys = [k for k in every[0] if not k.endswith("_ci_low") and all(k in m for m in every)]  # what all runs report
    out: dict = {"novelty_score": args.novelty, "baseline": args.baseline, "per_run": per_run, "targets": {},
                 "arms": {}, "differences": {}}
    for arm, runs in per_run.items():
        out["targets"][arm] = {s: meets(m, args.novelty) for s, m in runs.items()}
        out["arms"][arm] = {k: mean_interval([m[k] for m in runs.values()]) for k in keys}
    if args.all:
        out["all_runs"] = {k: mean_interval([m[k] for m in every]) for k in keys}
        out["all_runs_meeting_ece"] = sum(ok["ece"] for t in out["targets"].values() for ok in t.values())
    for key in keys:
        cmp = compare_arms({arm: {s: m[key] for s, m in runs.items()} for arm, runs in per_run.items()}, args.baseline)
        out["differences"][key] = {k: v for k, v in cmp.items() if "/diff_" in k}
    print(f"{'arm':<12} {'figure':<36} {'mean [95 % interval]':<28} per seed")
    for arm, stats in out["arms"].items():
        for key, st in stats.items():
            seeds = " ".join(f"{per_run[arm][s][key]:.4f}" for s in per_run[arm])
            print(f"{arm:<12} {key:<36} {st['mean']:.4f} [{st['ci_low']:.4f}, {st['ci_high']:.4f}]   {seeds}")
        for s, ok in out["targets"][arm].items():
            print(f"{arm:<12} seed {s}: targets met: {', '.join(k for k, v in ok.items() if v) or 'none'}")
    for key, st in out.get("all_runs", {}).items():
        print(f"{'all runs':<12} {key:<36} {st['mean']:.4f} [{st['ci_low']:.4f}, {st['ci_high']:.4f}]   n={st['n']}")
    if args.all:
        print(f"all runs: {out['all_runs_meeting_ece']} of {sum(len(r) for r in per_run.values())} meet the ECE target")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
