"""Results over seeds (intervals, paired differences) and the run summary written from metrics files."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from serving.cli.main import app
from training.errors import DataError
from training.evaluation.seeds import al_per_seed, compare_arms, mean_interval, metrics_per_seed
from training.evaluation.study_summary import cpu_model, machine, write_summary

runner = CliRunner()


def test_mean_interval_known_answer():
    r = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert r["mean"] == 2.0 and r["ci_low"] == pytest.approx(2 - half) and r["ci_high"] == pytest.approx(2 + half)
    one = mean_interval([0.5])
    assert one["n"] == 1 and np.isnan(one["ci_low"])


def test_paired_difference_excludes_zero_only_when_consistent():
    base = {0: 0.70, 1: 0.60, 2: 0.80}
    res = compare_arms({"sup": base, "up": {0: 0.75, 1: 0.66, 2: 0.84}, "noisy": {0: 0.80, 1: 0.55, 2: 0.82}}, "sup")
    # "up" is better by 0.05, 0.06, 0.04 on every seed: the paired interval excludes zero although the arms' own
    # intervals overlap (the seed-to-seed spread is shared)
    assert res["up/diff_mean"] == pytest.approx(0.05) and res["up/diff_excludes_zero"] is True
    assert res["up/ci_low"] < res["sup/ci_high"]
    assert res["noisy/diff_excludes_zero"] is False
    assert "sup/diff_mean" not in res
    assert res["up/diff_seeds_above"] == 3 and res["noisy/diff_seeds_above"] == 2


def test_metrics_per_seed_and_the_cli(tmp_path):
    for arm, values in {"supervised": [0.70, 0.60, 0.80], "fixmatch": [0.75, 0.66, 0.84]}.items():
        for s, v in enumerate(values):
            (tmp_path / f"ssl_{arm}_s{s}.json").write_text(json.dumps({"balanced_accuracy": v}))
    assert metrics_per_seed(str(tmp_path / "ssl_fixmatch_s*.json"), "balanced_accuracy") == {0: 0.75, 1: 0.66, 2: 0.84}
    out = tmp_path / "ssl.json"
    r = runner.invoke(app, ["seeds", "--arm", f"supervised={tmp_path}/ssl_supervised_s*.json", "--arm",
                            f"fixmatch={tmp_path}/ssl_fixmatch_s*.json", "--baseline", "supervised", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text())
    assert m["fixmatch/diff_mean"] == pytest.approx(0.05) and m["fixmatch/diff_excludes_zero"] is True
    assert "fixmatch: 0.7500" in r.output
    (tmp_path / "ssl_fixmatch_s3.json").write_text('{"balanced_accuracy": 0.7')  # a run killed while writing
    with pytest.raises(DataError, match="ssl_fixmatch_s3.json: not valid JSON"):
        metrics_per_seed(str(tmp_path / "ssl_fixmatch_s*.json"), "balanced_accuracy")


def test_one_seed_writes_strict_json_and_says_it_has_no_interval(tmp_path):
    """One seed has a mean but no interval: the file holds null (NaN is not JSON), the line says why."""
    for arm, value in {"random": 0.8656, "margin": 0.87}.items():
        (tmp_path / f"al_{arm}_s0.json").write_text(json.dumps({"aubc": value}))
    out = tmp_path / "seeds.json"
    r = runner.invoke(app, ["seeds", "--arm", f"random={tmp_path}/al_random_s*.json", "--arm",
                            f"margin={tmp_path}/al_margin_s*.json", "--baseline", "random", "--key", "aubc",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {out}"))
    assert m["random/mean"] == 0.8656 and m["random/ci_low"] is None and m["margin/diff_ci_high"] is None
    assert m["margin/diff_excludes_zero"] is False and m["margin/n"] == 1
    assert "random: 0.8656 [no interval from one seed]" in r.output
    assert "minus random +0.0044 [no interval from one seed], above on 1 of 1 seeds" in r.output


def test_al_per_seed():
    curve = pd.DataFrame({"strategy": ["random"] * 4 + ["margin"] * 2, "seed": [0, 0, 1, 1, 0, 0],
                          "n_labels": [10, 20, 10, 20, 10, 20], "balanced_accuracy": [0.5, 0.7, 0.6, 0.6, 0.6, 0.8]})
    assert al_per_seed(curve) == {"random": {0: pytest.approx(0.6), 1: pytest.approx(0.6)},
                                       "margin": {0: pytest.approx(0.7)}}
    assert al_per_seed(curve, at_labels=20) == {"random": {0: 0.7, 1: 0.6}, "margin": {0: 0.8}}
    with pytest.raises(DataError, match="no round at 30 labels"):
        al_per_seed(curve, at_labels=30)


def test_summary_writes_the_table_from_metrics_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "evaluate.json").write_text(json.dumps({"balanced_accuracy": 0.9781, "nll": 0.1, "other": 3}))
    (tmp_path / "m" / "discovery.json").write_text(json.dumps({"top_cluster_top_gene": "G052",
                                                               "planted_novel_gene_is_top": True}))
    info = {"commit": "abc123", "platform": "Linux-x", "cpu": "Test CPU", "torch": "2.14.1"}
    out = write_summary(tmp_path / "m", tmp_path / "summary.md", info)
    text = out.read_text()
    assert "| commit | abc123 |" in text and "| cpu | Test CPU |" in text and "| torch | 2.14.1 |" in text
    ev = text[text.index("## evaluate.json"):]  # files in name order: discovery.json comes first
    assert "| balanced_accuracy | 0.9781 |" in ev and "| other | 3 |" in ev
    assert "| top_cluster_top_gene | G052 |" in text and "| planted_novel_gene_is_top | True |" in text
    (tmp_path / "m" / "ssl.json").write_text(json.dumps({
        "supervised/mean": 0.7, "supervised/ci_low": 0.6, "supervised/ci_high": 0.8, "supervised/n": 3,
        "fixmatch/mean": 0.75, "fixmatch/ci_low": 0.66, "fixmatch/ci_high": 0.84, "fixmatch/n": 3,
        "fixmatch/diff_mean": 0.05, "fixmatch/diff_ci_low": 0.04, "fixmatch/diff_ci_high": 0.06,
        "fixmatch/diff_excludes_zero": True}))
    text = write_summary(tmp_path / "m", tmp_path / "summary.md", info).read_text()
    ssl = text[text.index("## ssl.json"):]
    assert "| supervised | 3 | 0.7000 | [0.6000, 0.8000] | baseline | | |" in ssl
    assert "| fixmatch | 3 | 0.7500 | [0.6600, 0.8400] | +0.0500 | [+0.0400, +0.0600] | yes |" in ssl
    assert "| arm |" not in text[:text.index("## ssl.json")]  # only results of `spatial seeds` get the arm table
    real = machine()
    assert real["torch"] and real["platform"] and real["commit"]
    import torch

    assert real["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()


def test_the_cpu_model_names_its_family_and_model(tmp_path):
    """A cloud's "AMD EPYC" names several generations: the summary adds family and model from the first processor."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 23\nmodel\t\t: 49\n")
    assert cpu_model(info) == "AMD EPYC (family 25, model 1)"
    info.write_text("processor\t: 0\nmodel name\t: Some ARM core\n")
    assert cpu_model(info) == "Some ARM core"


def test_the_commit_is_dirty_only_when_more_than_the_runs_outputs_changed(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})

    for name in ("dvc.lock", "metrics/evaluate.json", "reports/summary.md", "params.yaml", "training/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    clean = machine(tmp_path)["commit"]
    assert len(clean) == 12 and not clean.endswith("-dirty")
    for name in ("dvc.lock", "metrics/evaluate.json", "reports/summary.md"):  # what make run rewrites
        (tmp_path / name).write_text("1\n")
    (tmp_path / "new_untracked.py").write_text("")
    assert machine(tmp_path)["commit"] == clean
    for name in ("params.yaml", "training/x.py"):
        (tmp_path / name).write_text("1\n")
        assert machine(tmp_path)["commit"] == f"{clean}-dirty", name
        git("checkout", "--", name)


def test_summary_tables_the_al_transfer_study(tmp_path):
    (tmp_path / "m").mkdir()
    flat = {"random/mean": 0.61, "random/ci_low": 0.58, "random/ci_high": 0.64, "random/sd": 0.01, "random/n": 3,
            "power_bald/mean": 0.66, "power_bald/ci_low": 0.6, "power_bald/ci_high": 0.7, "power_bald/n": 3,
            "power_bald/diff_mean": 0.05, "power_bald/diff_ci_low": -0.01, "power_bald/diff_ci_high": 0.11,
            "power_bald/diff_excludes_zero": False}
    (tmp_path / "m" / "al_transfer_seed1_weak.json").write_text(json.dumps(flat))
    text = write_summary(tmp_path / "m", tmp_path / "summary.md", {"commit": "x"}).read_text()
    table = text[text.index("## al_transfer_seed1_weak.json"):text.index("<details>")]
    assert "| random | 3 | 0.6100 | [0.5800, 0.6400] | baseline | | |" in table
    assert "| power_bald | 3 | 0.6600 | [0.6000, 0.7000] | +0.0500 | [-0.0100, +0.1100] | no |" in table


def test_al_transfer_study_compares_random_with_the_default_strategy():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    study = yaml.safe_load((root / "benchmarks/studies/dvc.yaml").read_text())
    vars_ = {k: v for d in study["vars"] for k, v in d.items()}
    default = yaml.safe_load((root / "params.yaml").read_text())["label"]["strategy"]
    assert vars_["al_transfer_strategies"].split(",") == ["random", default]
    configs = vars_["al_transfer_configs"]
    assert len(configs) >= 2 and all("synth.seed=0" not in c["synth"] and "synth.seed=" in c["synth"]
                                     for c in configs.values())  # never the seed the default was chosen on


def test_ssl_seeds_depends_on_every_arm_and_seed_the_ssl_stages_write():
    """The aggregate must rerun when any arm of any seed changes: each --arm glob of ssl_seeds matches exactly the
    per-seed metrics files the ssl, ssl_pretrained and ssl_lpft stages declare, and every one of them is a dependency."""
    import fnmatch
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    study = yaml.safe_load((root / "benchmarks/studies/dvc.yaml").read_text())
    vars_ = {k: v for d in study["vars"] for k, v in d.items()}
    agg = study["stages"]["ssl_seeds"]
    written = {m.replace("${item}", str(seed)) for seed in vars_["seeds"] for stage in ("ssl", "ssl_pretrained", "ssl_lpft")
               for entry in study["stages"][stage]["do"]["metrics"] for m in entry}
    globs = dict(re.findall(r"--arm '(\w+)=([^']+)'", agg["cmd"]))
    assert {"supervised", "fixmatch", "all_labels", "pretrained", "pretrained_fixmatch", "lpft", "lpft_fixmatch", "lpft_dlr"} == set(
        globs)
    assert len(written) == len(globs) * len(vars_["seeds"])
    for arm, pattern in globs.items():
        matched = {w for w in written if fnmatch.fnmatch(w, pattern)}
        assert len(matched) == len(vars_["seeds"]), arm
        assert matched <= set(agg["deps"]), arm
    assert "train.monitor=val_balanced_accuracy" in vars_["ssl_schedule"]


def test_same_seed_same_machine_same_metrics(tiny_manifest, tmp_path, one_thread):
    """What the README promises: on one machine, the same seed gives the same ensemble and the same numbers
    (temperatures, novelty reference, test probabilities); across CPUs the kernels may differ."""
    from conftest import tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import train_ensemble

    params = tiny_params(tmp_path, train={"epochs": 2, "patience": None})
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    outs = []
    for run in ("a", "b"):
        ens = train_ensemble(data, params, tmp_path / run, progress=False)
        test = data.split("test")
        from training.data.loader import loader_for

        loader = loader_for(test, params.data, ens.spec.channels, shuffle=False, seed=0, cache=False)
        outs.append((ens.spec, ens.predict_batches(loader)))
    (spec_a, pred_a), (spec_b, pred_b) = outs
    assert spec_a.temperatures == spec_b.temperatures and spec_a.pooled_temperature == spec_b.pooled_temperature
    assert spec_a.info["novelty_val_quantiles"] == spec_b.info["novelty_val_quantiles"]
    for key in ("mean_probs", "epistemic", "novelty"):
        np.testing.assert_array_equal(pred_a[key], pred_b[key])


def _calibration_run(seed: int, ece: float, ece_ci_low: float, pooled: float, novel: float) -> dict:
    nov = {"heldout_pooled": pooled, "novel_vs_screen_trained_states": novel}
    return {"seed": seed, "pooled": {"ece": ece, "nll": 0.1, "balanced_accuracy": 0.97, "ece_diff": ece_ci_low + 0.002,
                                     "ece_diff_ci_low": ece_ci_low},
            "none": {"ece": ece + 0.005},
            "novelty": {"multistage_knn": nov, "energy_multistage": {k: v - 0.1 for k, v in nov.items()}}}


def test_uncertainty_seeds_reads_studies_together_and_checks_each_ensemble(tmp_path):
    """benchmarks/uncertainty_seeds.py: files of one trained model take the seed given after @, the difference to the
    baseline is paired by seed, and an ensemble meets the ECE target only if its member-worse interval does not
    exclude zero from above."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "uncertainty_seeds.py"
    base = tmp_path / "base.json"
    oracle = {"pooled_at_test_temperature": {"ece": 0.01, "nll": 0.1}, "pooled_temperature": 0.9,
              "pooled_temperature_fitted_on_test": 1.1,  # only the baseline's runs have these: not compared
              "recalibrated_on_test_cells": {"100": {"ece_mean": 0.012, "class_bias_ece_mean": 0.010,
                                                     "ece_if_calibrated_median_mean": 0.009}}}
    base.write_text(json.dumps({"runs": [{**_calibration_run(s, 0.02, -0.01, 0.6, 0.8), **oracle} for s in range(3)]}))
    runs = [("a.json", _calibration_run(0, 0.014, -0.003, 0.90, 0.96)),   # meets all three
            ("b.json", _calibration_run(0, 0.012, 0.001, 0.86, 0.94)),    # ECE low but worse than its members
            ("c.json", _calibration_run(0, 0.016, -0.002, 0.84, 0.97))]
    args = [sys.executable, str(script), "--baseline", "convnext", "--novelty", "multistage_knn",
            "--run", f"convnext={base}", "--out", str(tmp_path / "out.json")]
    for seed, (name, run) in enumerate(runs):
        (tmp_path / name).write_text(json.dumps({"runs": [run]}))
        args += ["--run", f"vgg={tmp_path / name}@{seed}"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["targets"]["vgg"] == {
        "0": {"ece": True, "heldout_pooled": True, "novel_vs_screen": True},
        "1": {"ece": False, "heldout_pooled": True, "novel_vs_screen": False},
        "2": {"ece": False, "heldout_pooled": False, "novel_vs_screen": True}}
    assert out["arms"]["vgg"]["ece"]["mean"] == pytest.approx(0.014)
    assert out["arms"]["vgg"]["ece_uncalibrated"]["mean"] == pytest.approx(0.019)
    assert "ece_at_test_temperature" not in out["arms"]["convnext"]
    refit = out["per_run"]["convnext"]["1"]
    assert refit["ece_recalibrated_on_100_cells"] == 0.012 and refit["ece_if_calibrated_after_refit_on_100_cells"] == 0.009
    assert refit["class_bias_minus_temperature_on_100_cells"] == pytest.approx(-0.002)
    assert out["differences"]["multistage_knn/heldout_pooled"]["vgg/diff_mean"] == pytest.approx(0.8667 - 0.6, abs=1e-4)
    assert out["differences"]["ece"]["vgg/diff_excludes_zero"] is True
    assert "seed 0: targets met: ece, heldout_pooled, novel_vs_screen" in done.stdout

    pooled = subprocess.run([*args, "--all"], capture_output=True, text=True)
    assert pooled.returncode == 0, pooled.stderr
    every = json.loads((tmp_path / "out.json").read_text())
    assert every["all_runs"]["ece"]["n"] == 6
    assert every["all_runs"]["ece"]["mean"] == pytest.approx((3 * 0.02 + 0.014 + 0.012 + 0.016) / 6)
    assert every["all_runs_meeting_ece"] == 1 and "1 of 6 meet the ECE target" in pooled.stdout
    assert "all_runs" not in out

    bad = subprocess.run([*args[:8], "--run", f"vgg={base}@1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "@SEED needs a file of one run, it has 3" in bad.stderr
    assert "Traceback" not in bad.stderr

    # two scores of the same members, paired by ensemble
    both = subprocess.run([*args[:8], "--compare-novelty", "energy_multistage", "--out", str(tmp_path / "both.json")],
                          capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    paired = json.loads((tmp_path / "both.json").read_text())["arms"]["convnext"]
    gap = paired["multistage_knn_minus_energy_multistage/novel_vs_screen"]
    assert gap["mean"] == pytest.approx(0.1) and gap["n"] == 3
    assert paired["energy_multistage/heldout_pooled"]["mean"] == pytest.approx(0.5)
    unknown = subprocess.run([*args[:8], "--compare-novelty", "lof"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "novelty score 'lof' not in this study" in unknown.stderr

    # folds: @+N shifts a file's seeds, so two recipes' folds pair by fold and seed and the folds make one arm
    fold2 = tmp_path / "fold2.json"
    fold2.write_text(json.dumps({"runs": [_calibration_run(s, 0.03, -0.01, 0.6, 0.8) for s in range(3)]}))
    other = [tmp_path / f"other{k}.json" for k in (1, 2)]
    for path, ece in zip(other, (0.015, 0.026), strict=True):
        path.write_text(json.dumps({"runs": [_calibration_run(s, ece, -0.01, 0.6, 0.8) for s in range(3)]}))
    folds = subprocess.run([*args[:6], "--run", f"convnext={base}@+10", "--run", f"convnext={fold2}@+20",
                            "--run", f"enc={other[0]}@+10", "--run", f"enc={other[1]}@+20",
                            "--out", str(tmp_path / "folds.json")], capture_output=True, text=True)
    assert folds.returncode == 0, folds.stderr
    paired = json.loads((tmp_path / "folds.json").read_text())
    assert sorted(paired["per_run"]["enc"], key=int) == ["10", "11", "12", "20", "21", "22"]
    assert paired["differences"]["ece"]["enc/diff_mean"] == pytest.approx(-0.0045)
    bad = subprocess.run([*args[:6], "--run", f"convnext={base}@+x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "expected @+N" in bad.stderr and "Traceback" not in bad.stderr

    # --per-file: each file is one screen, its ensembles averaged into one unit, so the interval counts screens
    screens = subprocess.run([*args[:6], "--per-file", "--run", f"convnext={base}@+10", "--run",
                              f"convnext={fold2}@+20", "--run", f"convnext={tmp_path / 'a.json'}@30",
                              "--out", str(tmp_path / "screens.json")], capture_output=True, text=True)
    assert screens.returncode == 0, screens.stderr
    units = json.loads((tmp_path / "screens.json").read_text())
    assert [u["ece"] for u in units["per_run"]["convnext"].values()] == pytest.approx([0.02, 0.03, 0.014])
    assert units["arms"]["convnext"]["ece"]["n"] == 3


def test_label_free_posthoc_matches_each_predicted_error_and_reads_the_study_files(tmp_path):
    """benchmarks/label_free_posthoc.py on a study's logits file: the ATC arm is what shift.py gives, the 'true' arm
    matches the test cells' own error rate, identical members never disagree, and the slide names stored as objects
    in the file do not stop it."""
    import subprocess
    import sys
    from pathlib import Path

    from training.evaluation.metrics import calibration_report
    from training.uncertainty.calibration import pooled_log_probs
    from training.uncertainty.decompose import softmax
    from training.uncertainty.shift import atc_threshold, predicted_error, temperature_for_accuracy

    rng = np.random.default_rng(0)
    one = rng.normal(0, 2.0, (300, 1, 2))
    val, test = np.repeat(one[:120], 3, axis=1)[:, :, None], np.repeat(one[120:], 3, axis=1)  # 3 identical members
    yv, yt = (rng.random(120) < 0.3).astype(np.int64), (rng.random(180) < 0.3).astype(np.int64)
    np.savez_compressed(tmp_path / "logits_seed4.npz", val_logits=val, val_y=yv, test_logits=test, test_y=yt,
                        val_group=np.array(["a"] * 120, dtype=object), test_group=np.array(["b"] * 180, dtype=object))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "label_free_posthoc.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "logits_seed4.npz"), "--out",
                           str(tmp_path / "out.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "out.json").read_text())["runs"][0]
    lv, lt = pooled_log_probs(val), pooled_log_probs(test)
    err = {"atc": predicted_error(lt, atc_threshold(lv, yv)), "true": float((lt.argmax(1) != yt).mean()),
           "atc_jeffreys": predicted_error(lt, _load_script("label_free_posthoc").jeffreys_threshold(lv, yv))}
    for arm, e in err.items():
        assert run["predicted_error"][arm] == pytest.approx(e)
        t = temperature_for_accuracy(lt, 1 - e)
        assert run["ece"][arm] == pytest.approx(calibration_report(softmax(lt / t), yt, 15)["ece"])
    assert run["predicted_error"]["disagreement"] == 0.0
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]  # each method paired with ATC
    assert summary["minus_atc/atc_jeffreys"]["mean"] == pytest.approx(run["ece"]["atc_jeffreys"] - run["ece"]["atc"])
    assert set(run["labeled"]) == {"50", "100", "200"}


def test_calibration_noise_tells_calibrated_from_overconfident_ensembles(tmp_path):
    """benchmarks/calibration_noise.py on two study logits files: test labels drawn from the probabilities the
    validation temperature serves are consistent with perfect calibration, labels unrelated to confident
    predictions are not; each figure is the metrics module's, seeded by the file's train.seed, and the summary
    counts and multiplies them."""
    import subprocess
    import sys
    from pathlib import Path

    from training.evaluation.metrics import calibration_report, ece_if_calibrated
    from training.uncertainty.calibration import fit_temperature, pooled_log_probs
    from training.uncertainty.decompose import softmax

    rng = np.random.default_rng(0)

    def draw(logits: np.ndarray) -> np.ndarray:
        p = softmax(pooled_log_probs(logits))
        return (rng.random(len(p)) < p[:, 1]).astype(np.int64)

    files = []
    for seed, honest in ((1, True), (2, False)):
        val, test = rng.normal(0, 3.0, (400, 3, 2)), rng.normal(0, 3.0, (800, 3, 2))
        yv = draw(val)
        yt = draw(test) if honest else rng.integers(0, 2, 800)
        files.append(tmp_path / f"logits_seed{seed}.npz")
        np.savez_compressed(files[-1], val_logits=val, val_y=yv, test_logits=test, test_y=yt,
                            test_group=np.array(["b"] * 800, dtype=object))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_noise.py"
    done = subprocess.run([sys.executable, str(script), *map(str, files), "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    honest, noise = out["runs"]
    assert honest["validation"]["ece_calibration_p"] >= 0.05
    assert noise["validation"]["ece_calibration_p"] == 1 / 1001 and noise["atc"]["ece_calibration_p"] == 1 / 1001
    with np.load(files[0]) as f:
        lv, lt, yv, yt = pooled_log_probs(f["val_logits"]), pooled_log_probs(f["test_logits"]), f["val_y"], f["test_y"]
    probs = softmax(lt / fit_temperature(lv, yv))
    ece = calibration_report(probs, yt, 15)["ece"]
    assert honest["validation"]["ece"] == pytest.approx(ece)
    assert honest["validation"]["ece_calibration_p"] == ece_if_calibrated(probs, 15, 1000, 1, observed=ece)[
        "ece_calibration_p"]
    s = out["summary"]["validation"]
    assert s["consistent_with_perfect_calibration"] == 1
    assert s["perfect_models_all_at_most_target_probability"] == pytest.approx(
        honest["validation"]["p_perfect_at_most_target"] * noise["validation"]["p_perfect_at_most_target"])


def _load_script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_jeffreys_threshold_counts_the_validation_errors_as_a_posterior_mean():
    """label_free_posthoc.py's ATC with Jeffreys' prior: 10 errors of 100 put the threshold at the 10.5 / 101 share
    of the validation confidences, where plain ATC puts it midway between the 10th and 11th; no error still gives a
    finite one (the lowest confidence)."""
    from training.uncertainty.shift import atc_threshold

    jeffreys_threshold = _load_script("label_free_posthoc").jeffreys_threshold
    margins = np.linspace(0.1, 6.0, 100)
    val = np.c_[margins, np.zeros(100)]
    conf = -np.log1p(np.exp(-margins))  # the largest log-probability of [m, 0]
    y = np.zeros(100, dtype=np.int64)
    y[:10] = 1
    assert atc_threshold(val, y) == pytest.approx((conf[9] + conf[10]) / 2)
    assert jeffreys_threshold(val, y, prior=0.0) == pytest.approx(atc_threshold(val, y))
    position = 100 * 10.5 / 101 - 0.5  # 9.896: between the 10th and 11th lowest confidence
    assert jeffreys_threshold(val, y) == pytest.approx(conf[9] + (position - 9) * (conf[10] - conf[9]))
    assert jeffreys_threshold(val, np.zeros(100, dtype=np.int64)) == pytest.approx(conf[0])


def test_al_tests_tables_each_declared_test_and_counts_what_chance_gives(tmp_path):
    """benchmarks/al_tests.py: one row per test and configuration from its seeds.json, a test met only where both
    configurations' intervals lie above zero, and the chance of one interval above zero among n with no effect."""
    al_tests = _load_script("al_tests")
    random = {s: 0.60 + 0.02 * s for s in range(4)}
    arms = {"steady": {s: v + 0.03 + 0.001 * s for s, v in random.items()},       # +3 points on every seed
            "noisy": {s: v + (0.05 if s % 2 else -0.04) for s, v in random.items()}}
    for d, arm in (("a", "steady"), ("b", "noisy")):
        for name in ("c1", "c2"):
            out = tmp_path / d / name
            out.mkdir(parents=True)
            seeds = compare_arms({"random": random, arm: arms[arm]}, "random")
            (out / "seeds.json").write_text(json.dumps(seeds))
    last = {s: v + 0.05 + 0.01 * s for s, v in random.items()}  # the steady arm at the last budget: +6.5, SD 1.3
    (tmp_path / "a" / "c1" / "seeds_at80.json").write_text(json.dumps(compare_arms({"random": random, "steady": last},
                                                                                  "random")))
    tests = (al_tests.Test("a", "steady", "steady arm", ("c1", "c2")),
             al_tests.Test("b", "noisy", "noisy arm", ("c1", "c2")),
             al_tests.Test("a", "steady", "a replication", ("c1",), counts=False),
             al_tests.Test("a", "steady", "one configuration only", ("c2",)),
             al_tests.Test("a", "steady", "at the last budget", ("c1",), counts=False, measure="at80"))
    rows = al_tests.rows_of(tests, tmp_path)
    assert [(r["test"], r["configuration"]) for r in rows] == [
        ("steady arm", "c1"), ("steady arm", "c2"), ("noisy arm", "c1"), ("noisy arm", "c2"), ("a replication", "c1"),
        ("one configuration only", "c2"), ("at the last budget", "c1")]
    assert rows[0]["diff"] == pytest.approx(0.0315) and rows[0]["above_zero"] and not rows[2]["above_zero"]
    assert rows[-1]["measure"] == "at80" and rows[-1]["diff"] == pytest.approx(0.065)  # read from seeds_at80.json
    summary = al_tests.tally(rows)
    assert summary["tests"] == 3 and summary["intervals"] == 5 and summary["above_zero"] == 3  # replication not counted
    assert summary["tests_above_zero_on_two_configurations"] == ["steady arm"]  # one configuration cannot meet it
    assert summary["chance_of_one_or_more_above_zero"] == pytest.approx(1 - 0.975 ** 5)
    p0, p1, p2 = (math.comb(5, k) * 0.025 ** k * 0.975 ** (5 - k) for k in range(3))
    assert summary["chance_of_as_many_above_zero"] == pytest.approx(1 - p0 - p1 - p2)
    rows = al_tests.add_power(rows, effect=0.01)
    diffs = [arms["steady"][s] - random[s] for s in random]
    assert rows[0]["sd"] == pytest.approx(np.std(diffs, ddof=1))  # read back from the interval
    spread = al_tests.spread_by_measure(rows, effects=[0.01])  # every row has 4 seeds: the root of the mean variance
    assert spread["aubc"]["sd_pooled"] == pytest.approx(np.sqrt(np.mean([r["sd"] ** 2 for r in rows[:-1]])))
    assert spread["at80"]["sd_pooled"] == pytest.approx(np.std([last[s] - random[s] for s in random], ddof=1))
    table = al_tests.markdown(rows, {**summary, "spread": spread}, effect=0.01)
    assert "| steady arm (steady) | `c1` | AUBC | 0.630 | 0.662 | +3.2 [" in table and "| **yes** |" in table
    assert "| at the last budget (steady) | `c1` | at 80 labels | 0.630 | 0.695 | +6.5 [" in table

    with pytest.raises(ValueError, match="'at40' is not one of"):
        al_tests.Test("a", "steady", "a measure no run wrote", measure="at40")
    with pytest.raises(ValueError, match="holds the AUBC only"):
        al_tests.Test("results.md", "steady", "a summary read at 80 labels", measure="at80")
    (tmp_path / "b" / "c2" / "seeds.json").unlink()
    with pytest.raises(FileNotFoundError, match="b/c2/seeds.json is missing"):
        al_tests.rows_of(tests, tmp_path)

    # the committed files of every declared test (the first from the pipeline's summary markdown) are all there
    assert al_tests.main(["--out", str(tmp_path / "repo")]) == 0
    written = json.loads((tmp_path / "repo" / "tests.json").read_text())
    assert len(written["rows"]) == sum(len(t.configurations) for t in al_tests.TESTS)
    assert written["rows"][0]["dir"].endswith("results_intel.md") and written["rows"][0]["seeds"] == 10
    assert al_tests.main(["--out", str(tmp_path / "repo"), "--effect", "0.01", "1.5"]) == 2  # a difference of AUBC is < 1


def test_al_tests_seeds_needed_is_what_simulated_reruns_show():
    """benchmarks/al_tests.py's power figures against simulation: paired differences drawn with a known mean and SD,
    the interval of training.evaluation.seeds, and the share of reruns whose interval lies above zero."""
    al_tests = _load_script("al_tests")
    effect, sd = 0.017, 0.035
    n = al_tests.seeds_needed(effect, sd)
    assert n >= math.ceil(((1.959964 + 0.841621) * sd / effect) ** 2)  # the t's heavier tails: never fewer than the normal approximation's
    rng = np.random.default_rng(0)

    def share_above_zero(seeds: int, reps: int = 4000) -> float:
        draws = rng.normal(effect, sd, size=(reps, seeds))
        return float(np.mean([mean_interval(d)["ci_low"] > 0 for d in draws]))

    assert share_above_zero(n) == pytest.approx(0.8, abs=0.025)
    assert share_above_zero(n // 2) < 0.6  # half the seeds: far from enough
    assert al_tests.power(al_tests.detectable(sd, 20), sd, 20) == pytest.approx(0.8)
    assert al_tests.detectable(sd, 80) < al_tests.detectable(sd, 20)
    assert al_tests.seeds_needed(1e-6, sd) is None  # beyond the search


def test_escaper_labels_and_calibration_truth_on_a_simulated_screen(tmp_path):
    """benchmarks/escaper_labels.py relabels exactly the knockout escapers outside the test slides;
    benchmarks/calibration_truth.py rebuilds a fold's test table, counts every error of a model that calls each cell
    by its phenotype as an escaper, scores ECE against the slide labels and the phenotype as the metrics module does,
    pairs with a baseline by fold and seed, and refuses logits of another test table."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from training.config import SynthConfig, resolve
    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.evaluation.metrics import calibration_report
    from training.io.tables import write_table
    from training.sim.synth import synthesize
    from training.uncertainty.calibration import fit_temperature, pooled_log_probs
    from training.uncertainty.decompose import softmax

    raw = tmp_path / "raw"
    synthesize(SynthConfig(image_size=16, cells_per_class=90, cells_per_timepoint=3, screen_slides=1,
                           cells_per_screen_slide=30, workers=1, phenotype={"control_escape": 0.3}), raw,
               progress=False)
    index = build_index(raw / "manifest.csv", progress=False)
    write_table(index, tmp_path / "cells.parquet", {})
    truth = pd.read_parquet(raw / "truth.parquet")
    escaper = (truth["condition"] == "atg5_ko") & ~truth["knockout"] & truth["state"].isin(["on", "partial"])
    bench = Path(__file__).resolve().parents[1] / "benchmarks"

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(bench / script), *args], capture_output=True, text=True,
                              cwd=tmp_path)

    done = run("escaper_labels.py", "--raw", str(raw), "--test-group", "atg5_ko_s1", "--test-group", "stimulated_s1",
               "--out", "labels.csv")
    assert done.returncode == 0, done.stderr
    labels = pd.read_csv(tmp_path / "labels.csv")
    want = truth[escaper & (truth["group"] != "atg5_ko_s1")]
    assert len(want) > 5 and (labels["label"] == "stimulated").all()
    assert set(zip(labels["source_file"], labels["cell_id"], strict=True)) == {
        (str((raw / p).resolve()), c) for p, c in zip(want["path"], want["cell_id"], strict=True)}

    # a model that calls every test cell by its phenotype, at the study's test order for fold s1s1
    params_raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = resolve(params_raw, {"split.test_groups": ["atg5_ko_s1", "stimulated_s1"]})
    data = prepare_data(make_splits(index, params.split)[0], list(params.split.classes), params)
    test, val = data.split("test"), data.split("val")
    truth["source_file"] = [str(raw / p) for p in truth["path"]]
    keyed = truth.assign(escaper=escaper).set_index(["source_file", "cell_id"])["escaper"]
    test_escaper = keyed.loc[list(zip(test["source_file"].astype(str), test["cell_id"], strict=True))].to_numpy()
    phenotype = np.where(test_escaper, 0, test["y"].to_numpy())  # classes: stimulated (0), atg5_ko (1)
    rng = np.random.default_rng(0)

    def logits(y: np.ndarray) -> np.ndarray:
        z = np.zeros((len(y), 3, 2))
        z[np.arange(len(y)), :, y] = rng.normal(3.0, 0.5, (len(y), 3))
        return z

    fold = tmp_path / "s1s1"
    fold.mkdir()
    lt, lv = logits(phenotype), logits(val["y"].to_numpy())
    np.savez_compressed(fold / "logits_seed0.npz", val_logits=lv, val_y=val["y"].to_numpy(), test_logits=lt,
                        test_y=test["y"].to_numpy(), test_group=test["group"].astype(str).to_numpy().astype(object))
    args = ["--raw", str(raw), "--index", "cells.parquet", "--params",
            str(Path(__file__).resolve().parents[1] / "params.yaml"), str(fold / "logits_seed0.npz")]
    done = run("calibration_truth.py", *args, "--out", "truth.json")
    assert done.returncode == 0, done.stderr
    r = json.loads((tmp_path / "truth.json").read_text())["runs"][0]
    assert r["n_escapers"] == int(test_escaper.sum()) > 5
    assert r["validation"]["errors"] == {"escaper": int(test_escaper.sum())}
    t = fit_temperature(pooled_log_probs(lv), val["y"].to_numpy())
    probs = softmax(pooled_log_probs(lt) / t)
    assert r["validation"]["temperature"] == pytest.approx(t)
    assert r["validation"]["ece_slide_labels"] == pytest.approx(calibration_report(probs, test["y"].to_numpy())["ece"])
    assert r["validation"]["ece_phenotype"] == pytest.approx(calibration_report(probs, phenotype)["ece"])
    assert r["validation"]["ece_phenotype"] < r["validation"]["ece_slide_labels"]
    # right about every phenotype; against the slide labels the knockout slide's escapers count as its errors
    assert r["balanced_accuracy_phenotype"] == 1.0
    ko = test["y"].to_numpy() == 1
    assert r["balanced_accuracy_slide_labels"] == pytest.approx((1 + 1 - test_escaper[ko].mean()) / 2)
    # the split a labels history makes (escapers of the training slides relabeled) keeps the same test table
    done = run("calibration_truth.py", *args, "--labels", "labels.csv", "--baseline", "truth.json", "--out", "again.json")
    assert done.returncode == 0, done.stderr
    paired = json.loads((tmp_path / "again.json").read_text())["summary"]["minus_baseline"]
    assert paired["atc/ece_phenotype"]["mean"] == 0 and paired["atc/ece_phenotype"]["n"] == 1
    assert paired["balanced_accuracy_phenotype"]["mean"] == 0 and paired["balanced_accuracy_phenotype"]["n"] == 1
    np.savez_compressed(fold / "logits_seed0.npz", val_logits=lv, val_y=val["y"].to_numpy(), test_logits=lt,
                        test_y=1 - test["y"].to_numpy(), test_group=test["group"].astype(str).to_numpy().astype(object))
    done = run("calibration_truth.py", *args)
    assert done.returncode != 0 and "do not match the rebuilt test table" in done.stderr
