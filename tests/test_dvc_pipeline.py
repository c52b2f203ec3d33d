"""`dvc repro` of the real dvc.yaml in a fresh git + DVC repo, with a tiny params file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # a full `dvc repro` (minutes): `pytest -m "not slow"` skips
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "synth": {"image_size": 32, "cells_per_class": 80, "slides_per_condition": 2, "cells_per_timepoint": 10,
              "screen_slides": 1, "cells_per_screen_slide": 120, "n_genes": 8, "n_controls": 4, "n_hits": 2},
    "split": {"max_per_class": 60, "test_fraction": 0.5},
    "data": {"image_size": 32, "batch_size": 16},
    "model": {"dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
    "train": {"epochs": 2},
    "pretrain": {"epochs": 1, "batch_size": 32, "max_cells": 128},
    "ensemble": {"members": 2},
    "al": {"seeds": 1, "initial": 4, "query_size": 4, "rounds": 1, "epochs": 2, "min_steps": 10, "pool_subsample": 200,
           "mc_samples": 4},
    # the screen read-out: quantile bins (a 2-epoch model is not confident enough for the SPARCS thresholds), a small
    # virtual screen
    "bins": {"mode": "quantiles", "quantiles": [0.1, 0.3]},
    "sequence": {"virtual_cells": 3000, "library_cells": 5000},
    "hits": {"null_draws": 200},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("dvcrepo")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("training", "serving"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / ".ci").mkdir()
    for name in ("bentofile.yaml", ".ci/constraints.txt"):  # the `package` stage builds the Bento from them
        shutil.copy(REPO / name, root / name)
    shutil.copy(REPO / "labels.csv", root / "labels.csv")  # header only: no cell labels yet
    (root / "benchmarks" / "studies").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "studies" / "dvc.yaml", root / "benchmarks" / "studies" / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", "TQDM_DISABLE": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # __pycache__ never changes a folder dependency
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "init"], root, env)
    run(["dvc", "repro"], root, env)
    return root, env


def test_repro_runs_every_default_stage(dvc_repo):
    root, env = dvc_repo
    for path in ("data/raw/manifest.csv", "data/index/cells.parquet", "data/index/splits.parquet",
                 "models/ensemble/spec.json", "reports/evaluate/reliability.png", "metrics/evaluate.json",
                 "reports/screen/scores.parquet", "reports/screen/bins/bins.parquet",
                 "reports/screen/bins/bin_counts.csv", "reports/screen/bins/cell_sets.json",
                 "reports/screen/counts/counts.tsv", "reports/screen/counts/samples.csv",
                 "reports/screen/hits/genes.csv", "reports/screen/hits/grnas.csv", "reports/screen/hits/volcano.png",
                 "reports/screen/hits/rank.png", "reports/screen/hits/summary.json", "metrics/hits.json",
                 "reports/screen/hits_cells/genes.csv", "reports/screen/index.html",
                 "data/screen/genotypes.csv", "reports/discovery/cells.parquet",
                 "reports/discovery/clusters.csv", "metrics/discovery.json", "reports/summary.md"):
        assert (root / path).exists(), path
    # the members are fine-tuned from the pipeline's own self-supervised encoder
    assert json.loads((root / "models/pretrain/pretrain.json").read_text())["cells"] == 128
    spec = json.loads((root / "models/ensemble/spec.json").read_text())
    assert spec["model"]["pretrained"] == "models/pretrain/encoder.pt"
    split = json.loads((root / "metrics/split.json").read_text())
    assert split["train"] > 0 and split["test"] > 0 and split["unlabeled"] == 120
    reg = json.loads((root / "metrics/register.json").read_text())
    assert reg["alias"] == "champion" and reg["alias_moved"] and reg["version"] == 1
    package = json.loads((root / "metrics/package.json").read_text())
    assert package["model"] == reg["bento_model"] and package["bento"].startswith("spatial:")
    assert (root / "mlflow.db").is_file()  # the default tracking store at the repo root
    status = run(["dvc", "status", "dvc.yaml"], root, env).stdout  # the default pipeline (the studies are opt-in)
    assert [line for line in status.splitlines() if "changed" in line] == ["\talways changed"]  # summary only
    shown = run(["dvc", "metrics", "show", "--json"], root, env).stdout
    assert "balanced_accuracy" in shown and "metrics/discovery.json" in shown
    scores = pd.read_parquet(root / "reports/screen/scores.parquet")
    assert len(scores) == 120 and {"source_file", "cell_id", "prob_atg5_ko", "novelty", "embedding"} <= set(scores)
    bins = pd.read_parquet(root / "reports/screen/bins/bins.parquet")
    assert (bins["bin"] == 1).sum() == 12 and (bins["bin"] == 2).sum() == 24  # top 10 %, then 10-30 %
    hits = json.loads((root / "metrics/hits.json").read_text())
    assert {"spatial/n_called", "sparcs/n_called", "spatial/fdp"} <= set(hits)
    for name in ("hits", "hits_cells", "discovery"):
        assert f"metrics/{name}.json" in shown, name
    disc = json.loads((root / "metrics/discovery.json").read_text())
    assert disc["n_scored"] == 120 and "planted_novel_gene_is_top" in disc
    assert disc["reference"] == "controls" and disc["n_controls"] > 10  # genotypes given: the screen's own controls
    summary = (root / "reports/summary.md").read_text()
    assert "## evaluate.json" in summary and "## discovery.json" in summary and "| torch |" in summary
    # the label-efficiency studies are an opt-in pipeline: not run by default, but a valid DAG
    assert not (root / "reports/al").exists()
    dag = run(["dvc", "dag", "benchmarks/studies/dvc.yaml:ssl_seeds"], root, env).stdout
    assert "ssl@2" in dag
    run(["dvc", "plots", "show", "-o", str(root / "plots")], root, env)
    assert (root / "plots" / "index.html").is_file()


def test_screen_stages_write_bins_counts_and_hits(dvc_repo):
    """score_screen -> bins -> sequence -> hits (and the --cells genotype mode) in the same repro."""
    root, _ = dvc_repo
    scores = pd.read_parquet(root / "reports/screen/scores.parquet")
    assert {"source_file", "cell_id", "prob_atg5_ko", "epistemic", "embedding"} <= set(scores)
    bins = pd.read_parquet(root / "reports/screen/bins/bins.parquet")
    assert set(bins["group"]) == {"screen_s1"}  # from the manifest
    sets = json.loads((root / "reports/screen/bins/cell_sets.json").read_text())
    assert sorted(s["name"] for s in sets) == ["bin1_screen_s1", "bin2_screen_s1"]
    samples = pd.read_csv(root / "reports/screen/counts/samples.csv")
    counts = pd.read_csv(root / "reports/screen/counts/counts.tsv", sep="\t")
    assert list(counts.columns[2:]) == samples["sample"].tolist()
    assert set(samples["replicate"]) == {"r1", "r2"} and (samples["kind"] == "library").sum() == 2
    for name in ("genes.csv", "grnas.csv", "volcano.png", "rank.png", "qq.png", "summary.json"):
        assert (root / "reports/screen/hits" / name).is_file(), name
    hits = json.loads((root / "metrics/hits.json").read_text())
    assert {"spatial/n_called", "sparcs/n_called", "spatial/fdp", "sparcs/recall_all_hits"} <= set(hits)
    cells = json.loads((root / "metrics/hits_cells.json").read_text())
    assert {"cells_soft/n_called", "cells_threshold/n_called"} <= set(cells)


def test_rerunning_synth_writes_the_same_bytes(dvc_repo):
    """`dvc repro -f -s synth` rewrites data/raw: its hash in dvc.lock stays, so nothing downstream goes stale."""
    root, env = dvc_repo

    def raw_hash() -> str:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"]["synth"]["outs"] if o["path"] == "data/raw")

    before = raw_hash()
    run(["dvc", "repro", "-f", "-s", "synth"], root, env)
    assert raw_hash() == before
    assert "index" not in run(["dvc", "status", "index"], root, env).stdout


def test_data_stages_rerun_only_downstream_of_a_param_change(dvc_repo):
    root, env = dvc_repo
    dry = run(["dvc", "repro", "--dry", "-s", "split"], root, env).stdout
    assert "didn't change" in dry or "skipping" in dry.lower()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "status"], root, env).stdout
    assert "split" in out and "synth" not in out.split("split")[0]


def test_labels_csv_is_a_dependency_of_split(dvc_repo):
    """A labeling session (rows appended to labels.csv) makes `dvc repro` rerun split and what follows."""
    import pandas as pd

    root, env = dvc_repo
    cells = pd.read_parquet(root / "data/index/cells.parquet")
    screen = cells[cells["label"].isna()].iloc[0]
    before = (root / "labels.csv").read_text()
    try:
        with open(root / "labels.csv", "a") as f:
            f.write(f"{screen['source_file']},{int(screen['cell_id'])},stimulated,ann,2026-01-01T00:00:00Z\n")
        out = run(["dvc", "status"], root, env).stdout
        changed = [line.strip().rstrip(":") for line in out.splitlines() if line and not line.startswith(("\t", " "))]
        assert {"split", "train"} <= set(changed) and "synth" not in changed and "index" not in changed
    finally:
        (root / "labels.csv").write_text(before)


def test_exp_run_temp_logs_to_the_repo_root_store(dvc_repo):
    """`dvc exp run --temp` works in a copy under .dvc/tmp; its MLflow run must land in <repo>/mlflow.db."""
    import mlflow
    from mlflow import MlflowClient

    root, env = dvc_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "repro", "--allow-empty"], root, env)
    run(["dvc", "exp", "run", "--temp", "-S", "evaluate.ece_bins=10"], root, env)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    versions = MlflowClient().search_model_versions("name='spatial-phenotype'")
    assert len(versions) == 2  # the experiment registered a second version in the same store
