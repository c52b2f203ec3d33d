"""The CLI wiring of train / evaluate / register / inspect, the MLflow run layout and the champion alias."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from serving.cli.main import app
from training.errors import ModelError
from training.evaluation.metrics import calibration_report, ece_if_calibrated
from training.tracking import repo_root, resolve_model
from training.uncertainty.ensemble import Ensemble

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_manifest):
    d = tmp_path_factory.mktemp("cli")
    params = {
        "split": {"classes": ["bright", "spotty"], "test_fraction": 0.5, "max_per_class": None},
        "data": {"channels": ["LC3B"], "image_size": 32, "batch_size": 16},
        "model": {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
        "train": {"epochs": 3},
        "ensemble": {"members": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{d / 'mlflow.db'}", "experiment": "cli"},
        "registry": {"model_name": "tiny"},
    }
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d


@pytest.fixture(scope="module")
def trained(workdir, tiny_manifest):
    p = workdir / "params.yaml"
    invoke("train", "--params", p, "--manifest", tiny_manifest, "--out", workdir / "ens",
           "--metrics", workdir / "train.json", "--no-progress")
    invoke("evaluate", "--params", p, "--model", workdir / "ens", "--splits", workdir / "ens.splits.parquet",
           "--out", workdir / "report", "--metrics", workdir / "eval.json", "--no-progress")
    invoke("register", "--params", p, "--model", workdir / "ens", "--out", workdir / "reg.json")
    return workdir


def test_train_evaluate_register_outputs(trained):
    train = json.loads((trained / "train.json").read_text())
    assert train["members"] == 2 and train["classes"] == ["bright", "spotty"]
    ev = json.loads((trained / "eval.json").read_text())
    for key in ("uncalibrated/ece", "single_member/nll", "heldout_dim/mutual_info/auroc"):
        assert key in ev
    for png in ("confusion.png", "reliability.png", "embedding.png", "uncertainty.png"):
        assert (trained / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = pd.read_parquet(trained / "report" / "predictions.parquet")
    assert {"source_file", "cell_id", "prob_bright", "prob_spotty", "epistemic", "novelty", "split"} <= set(preds.columns)
    np.testing.assert_allclose(preds[["prob_bright", "prob_spotty"]].sum(axis=1), 1, atol=1e-5)
    # the headline metrics are those of the per-cell table (float32 there): recomputed from it
    test_rows = preds[preds["split"] == "test"]
    y = test_rows["label"].map({"bright": 0, "spotty": 1}).to_numpy()
    cal = calibration_report(test_rows[["prob_bright", "prob_spotty"]].to_numpy(np.float64), y)
    assert ev["balanced_accuracy"] == 1.0
    assert (ev["nll"], ev["brier"], ev["ece"]) == pytest.approx((cal["nll"], cal["brier"], cal["ece"]), abs=1e-6)
    held = preds["split"] == "heldout"
    assert ev["heldout/density/auroc"] == pytest.approx(
        roc_auc_score(held[held | (preds["split"] == "test")], preds["novelty"][held | (preds["split"] == "test")]))
    # the noise floor of the ECE is the one of the served test probabilities (seeded; the table stores float32)
    test = preds[preds["split"] == "test"][["prob_bright", "prob_spotty"]].to_numpy()
    assert ev["ece_if_calibrated_q95"] == pytest.approx(ece_if_calibrated(test, seed=0)["ece_if_calibrated_q95"],
                                                        rel=0.01)
    # every test cell right and near-certain: the observed ECE is what a perfect model shows, p = 1 (not 0.002 from
    # float rounding of the probabilities)
    assert ev["accuracy"] == 1.0 and ev["ece_calibration_p"] == 1.0
    assert ece_if_calibrated(test, seed=0, observed=ev["ece"])["ece_calibration_p"] == 1.0
    # the tiny model gets every validation cell right: no ATC threshold, so no label-free figure (not a made-up one)
    spec = json.loads((trained / "ens" / "spec.json").read_text())
    assert spec["info"]["atc_threshold"] is None and not any(k.startswith("label_free/") for k in ev)


def test_mlflow_run_layout_and_champion(trained):
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    client = MlflowClient()
    reg = json.loads((trained / "reg.json").read_text())
    run = client.get_run(reg["run_id"])
    assert run.data.params["train.epochs"] == "3" and run.data.params["ensemble.members"] == "2"
    assert "test_balanced_accuracy" in run.data.metrics and "test_heldout_density_auroc" in run.data.metrics
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["member-0", "member-1"]
    # the MLflow 3 UI opens a model-training experiment on its runs table, not the GenAI view
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # artifacts beside the store, not in ./mlruns of whatever folder the command ran in
    assert exp.artifact_location == (trained / "mlruns" / exp.name).as_uri()
    assert (trained / "mlruns" / exp.name / run.info.run_id / "artifacts" / "evaluate" / "reliability.png").is_file()

    history = client.get_metric_history(children[0].info.run_id, "val_loss")
    assert len(history) == 3  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert "evaluate/reliability.png" in artifacts and "evaluate/predictions.parquet" in artifacts
    mv = client.get_model_version_by_alias("tiny", "champion")
    assert int(mv.version) == reg["version"] == 1
    # models:/ URI resolves to the same ensemble, logged as code: nothing in it is pickled
    logged = Path(mlflow.artifacts.download_artifacts("models:/tiny@champion", dst_path=str(trained / "dl")))
    files = sorted(str(f.relative_to(logged)) for f in logged.rglob("*") if f.is_file())
    assert "mlflow_model.py" in files and not [f for f in files if f.endswith(".pkl")], files
    loaded = mlflow.pyfunc.load_model("models:/tiny@champion")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    out = loaded.predict(x)
    direct = Ensemble.load(trained / "ens").to_frame(Ensemble.load(trained / "ens").predict_images(x))
    np.testing.assert_allclose(out["prob_bright"], direct["prob_bright"], atol=1e-5)


def test_work_folder_removed_after_a_successful_train(trained):
    assert (trained / "ens" / "spec.json").is_file()
    assert not (trained / ".ens.work").exists()


def test_alias_moves_only_to_a_better_version(trained):
    """A second ensemble (its own MLflow run) takes the alias only when its test metric beats the holder's."""
    import shutil

    p = trained / "params.yaml"
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    client = MlflowClient()
    holder_run = Ensemble.load(trained / "ens").spec.info["mlflow_run_id"]
    holder_value = client.get_run(holder_run).data.metrics["test_balanced_accuracy"]
    challenger = trained / "ens2"
    shutil.copytree(trained / "ens", challenger)
    run = client.create_run(client.get_run(holder_run).info.experiment_id)
    spec = json.loads((challenger / "spec.json").read_text())
    spec["info"]["mlflow_run_id"] = run.info.run_id
    (challenger / "spec.json").write_text(json.dumps(spec))
    client.log_metric(run.info.run_id, "test_balanced_accuracy", holder_value - 0.1)
    res = invoke("register", "--params", p, "--model", challenger, "--out", trained / "reg2.json")
    reg2 = json.loads((trained / "reg2.json").read_text())
    assert reg2["version"] == 2 and not reg2["alias_moved"] and "stays on version 1" in res.output
    client.log_metric(run.info.run_id, "test_balanced_accuracy", holder_value + 0.1)
    invoke("register", "--params", p, "--model", challenger, "--out", trained / "reg3.json")
    assert json.loads((trained / "reg3.json").read_text())["alias_moved"]
    assert int(client.get_model_version_by_alias("tiny", "champion").version) == 3


def test_resolve_model_errors(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained / 'mlflow.db'}")
    with pytest.raises(ModelError, match="does not resolve"):
        resolve_model("models:/tiny@nonexistent")
    with pytest.raises(ModelError, match="not an ensemble directory"):
        resolve_model(trained)
    local, info = resolve_model("models:/tiny@champion")
    champion = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}").get_model_version_by_alias("tiny", "champion")
    assert (local / "spec.json").is_file() and info["version"] == int(champion.version)  # 3 after the alias test
    assert Ensemble.load(local).spec.info["mlflow_run_id"] == champion.run_id


def test_refit_novelty_serves_another_score_without_retraining(trained, tmp_path):
    """`spatial refit-novelty` on the registered champion writes a copy that serves `pixel_knn`: the distance to the
    k-th nearest training cell in the pixel description, computed here from the split's training cells, with the
    members' probabilities as they were; the model it came from is untouched; --out onto the model is refused."""
    from training.config import load_params
    from training.data.loader import CellLoader
    from training.uncertainty.novelty import PixelKNN
    from training.uncertainty.pixel_descriptor import pixel_descriptor

    p, src = trained / "params.yaml", trained / "ens"
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    out = tmp_path / "pixel"
    res = invoke("refit-novelty", "--params", p, "--model", "models:/tiny@champion", "--splits",
                 trained / "ens.splits.parquet", "--set", "uncertainty.novelty=pixel_knn", "--out", out,
                 "--set", "data.image_size=48")  # the model's own 32 px preprocessing still applies
    old, new = Ensemble.load(src), Ensemble.load(out)
    refit = new.spec.info["novelty_refit"]
    default = "energy_pixel_mahalanobis"
    assert old.spec.info["novelty_score"] == default and new.spec.info["novelty_score"] == "pixel_knn"
    assert refit == {"from": "models:/tiny@champion", "previous": default, "score": "pixel_knn",
                     "training_cells": refit["training_cells"]}
    assert f"novelty {default} -> pixel_knn, fitted on {refit['training_cells']} training cells" in res.output
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before

    splits = pd.read_parquet(trained / "ens.splits.parquet")
    def cells(split: str) -> pd.DataFrame:
        t = splits[splits["split"] == split][["source_file", "row", "cell_id"]].reset_index(drop=True)
        return t.assign(source_file=t["source_file"].astype(str))

    def descriptors(table: pd.DataFrame) -> np.ndarray:
        batches = list(CellLoader(table, old.preprocess, batch_size=64))
        order = np.argsort(np.concatenate([b["idx"].numpy() for b in batches]))
        return np.concatenate([pixel_descriptor(b["image"]) for b in batches])[order]

    train = cells("train")
    assert len(train) == refit["training_cells"]
    knn = load_params(p).uncertainty
    expected = PixelKNN(knn.knn_k, knn.knn_bank).fit(descriptors(train)).score(descriptors(cells("test")))
    test = CellLoader(cells("test"), old.preprocess, batch_size=64)
    served, was = new.predict_batches(test), old.predict_batches(test)
    np.testing.assert_allclose(served["novelty"], expected, rtol=1e-5)
    np.testing.assert_array_equal(served["mean_probs"], was["mean_probs"])
    assert not np.allclose(was["novelty"], expected)  # the score did change

    proc = subprocess.run([sys.executable, "-m", "serving.cli", "refit-novelty", "--params", str(p), "--model",
                           str(src), "--splits", str(trained / "ens.splits.parquet"), "--out", str(src)],
                          capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "is the model directory itself" in proc.stderr, proc.stderr
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before

    # and off again: no trace of the old score is left for /metadata or a reader of spec.json to take as current
    invoke("refit-novelty", "--params", p, "--model", out, "--splits", trained / "ens.splits.parquet", "--set",
           "uncertainty.novelty=none", "--out", tmp_path / "none")
    off = Ensemble.load(tmp_path / "none").spec
    assert not off.has_novelty and off.info["novelty_refit"]["previous"] == "pixel_knn"
    assert "novelty_score" not in off.info and "novelty_val_quantiles" not in off.info


TINY_CLASSES = "split.classes=[bright,dim]"  # the tiny manifest's labels (the defaults are the screen's)


def test_cli_user_errors_exit_2_without_traceback(tmp_path, tiny_manifest):
    cases = [
        (["inspect", str(tmp_path / "none.h5")], "file not found"),
        (["train", "--manifest", str(tiny_manifest), "--set", "model.name=resnet9000", "--set", "train.epochs=1",
          "--set", TINY_CLASSES, "--out", str(tmp_path / "m")], "unknown model"),
        (["train", "--manifest", str(tiny_manifest), "--set", "split.classes=[bright,mitotic]",
          "--out", str(tmp_path / "m")], "mitotic"),
        (["train", "--manifest", str(tiny_manifest), "--set", "data.batch_size=100000", "--set", "data.image_size=32",
          "--set", TINY_CLASSES, "--out", str(tmp_path / "m")], "batch_size"),
        (["evaluate", "--model", str(tmp_path)], "not an ensemble directory"),
        (["split", "--set", "split.test_fraction=2"], "split.test_fraction"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
                                                 "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})
        assert proc.returncode == 2, (args, proc.stderr)
        assert message.lower() in proc.stderr.lower(), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_repo_root_escapes_dvc_temp_copies(tmp_path):
    (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    assert repo_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc") == tmp_path


def test_a_split_table_made_with_other_split_params_is_refused(tmp_path, tiny_manifest, monkeypatch, capsys):
    """`--set split.*` (or an edited params.yaml) beside a split table made without it used to be silently ignored:
    the table fixed the split. Now the commands that read the table refuse it, naming both values."""
    from conftest import run_main, tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits, read_splits
    from training.errors import ConfigError
    from training.io.tables import write_table

    p = tiny_params(tmp_path)
    table, summary = make_splits(build_index(tiny_manifest, progress=False), p.split)
    write_table(table, tmp_path / "splits.parquet", summary)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
    same, _ = read_splits(tmp_path / "splits.parquet", p.split.model_copy(update={"out": "elsewhere.parquet"}))
    pd.testing.assert_frame_equal(same, table)
    with pytest.raises(ConfigError, match=r"made with split.seed=0; the params say split.seed=3\. Split again"):
        read_splits(tmp_path / "splits.parquet", p.split.model_copy(update={"seed": 3}))
    for command in (["train", "--out", str(tmp_path / "m")], ["pretrain", "--out", str(tmp_path / "m")],
                    ["al", "--out", str(tmp_path / "m")], ["tune", "--out", str(tmp_path / "m")]):
        code, err = run_main([*command, "--params", str(tmp_path / "params.yaml"), "--splits",
                              str(tmp_path / "splits.parquet"), "--set", "split.val_fraction=0.3",
                              "--set", "split.test_groups=[bright_s0]"], monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, err)
        assert ("made with split.val_fraction=0.2, split.test_groups=[]; the params say split.val_fraction=0.3, "
                'split.test_groups=["bright_s0"]') in err, (command, err)
    assert not (tmp_path / "m").exists()


def test_help_joins_wrapped_docstring_lines_and_keeps_placeholders(monkeypatch):
    """`spatial --help` shows each command's summary as wrapped prose (a docstring's line breaks are not the
    screen's), and `<out>`-style placeholders in option help survive the Markdown rendering."""
    monkeypatch.setenv("COLUMNS", "120")  # rich's width
    listing = runner.invoke(app, ["--help"]).output
    lines = listing.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("│ pretrain "))
    entry = [lines[first][len("│ pretrain "):]]
    entry += [line for line in lines[first + 1:first + 4] if line.startswith("│" + " " * 10)]  # its wrapped lines
    text = [line.strip("│ ") for line in entry]
    assert len(text) == 2 and all(len(t.split()) > 3 for t in text), text  # no line broken where the source was
    assert text[1].startswith("fine-tune from it with spatial train"), text
    monkeypatch.setenv("COLUMNS", "200")
    score = runner.invoke(app, ["score", "--help"]).output
    assert "parts go to <out>.parts/ until done" in score and "keep <out>.parts/ after assembly" in score
    assert "else sweep-<time>" in runner.invoke(app, ["tune", "--help"]).output
