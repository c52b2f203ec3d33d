"""The screen stages of the real dvc.yaml (score_screen -> bins -> sequence -> hits) in a fresh git + DVC repo at
tiny size: `dvc repro hits` runs only what they need (synth ... register), not the ssl / al studies."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import yaml
from test_dvc_pipeline import BIN, REPO, TINY, run


@pytest.mark.timeout(1500)
def test_screen_stages_at_tiny_size(tmp_path):
    root = tmp_path
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("training", "serving"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "labels.csv", root / "labels.csv")  # split depends on it (header only: no cell labels)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", "TQDM_DISABLE": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, root, env)
    run(["dvc", "repro", "hits"], root, env)

    scores = pd.read_parquet(root / "reports/screen/scores.parquet")
    assert len(scores) == 120 and {"source_file", "cell_id", "prob_atg5_ko", "epistemic", "embedding"} <= set(scores)
    bins = pd.read_parquet(root / "reports/screen/bins/bins.parquet")
    assert (bins["bin"] == 1).sum() == 12 and (bins["bin"] == 2).sum() == 24  # quantile bins: top 10 %, 10-30 %
    assert set(bins["group"]) == {"screen_s1"}  # from the manifest
    sets = json.loads((root / "reports/screen/bins/cell_sets.json").read_text())
    assert sorted(s["name"] for s in sets) == ["bin1_screen_s1", "bin2_screen_s1"]
    samples = pd.read_csv(root / "reports/screen/counts/samples.csv")
    counts = pd.read_csv(root / "reports/screen/counts/counts.tsv", sep="\t")
    assert list(counts.columns[2:]) == samples["sample"].tolist()
    assert set(samples["replicate"]) == {"r1", "r2"} and (samples["kind"] == "library").sum() == 2
    for name in ("genes.csv", "grnas.csv", "volcano.png", "rank.png", "qq.png", "summary.json"):
        assert (root / "reports/screen/hits" / name).is_file(), name
    metrics = json.loads((root / "metrics/hits.json").read_text())
    assert {"spatial/n_called", "sparcs/n_called", "spatial/fdp", "sparcs/recall_all_hits"} <= set(metrics)
    cells = json.loads((root / "metrics/hits_cells.json").read_text())
    assert {"cells_soft/n_called", "cells_threshold/n_called"} <= set(cells)
    assert "changed" not in run(["dvc", "status", "hits"], root, env).stdout
    assert not (root / "reports/al").exists()  # only what the screen stages need
