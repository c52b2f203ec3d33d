"""Labels a person gives: the history file (replay, undo, concurrent writers), the join with slide labels in the
split, ``spatial query`` on the real pool, and the labeling API's bad-input answers."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.config import SplitConfig
from training.data.labels import COLUMNS, current_labels, read_history, replay
from training.data.splits import make_splits
from training.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def hist(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"cell_id": np.int64})


def write_labels(path: Path, rows: list[tuple]) -> Path:
    hist(rows).to_csv(path, index=False)
    return path


# -- history ------------------------------------------------------------------------------------------------------
def test_replay_latest_wins_and_undo_pops_the_annotators_own_label():
    h = hist([("f", 1, "a", "ann", "t1"), ("f", 1, "b", "bob", "t2"), ("f", 2, "a", "ann", "t3"),
              ("f", 1, "undo", "bob", "t4"), ("f", 2, "b", "ann", "t5"), ("f", 3, "a", "ann", "t6"),
              ("f", 3, "undo", "ann", "t7"), ("f", 2, "undo", "bob", "t8")])  # bob has no label on 2: no-op
    cur = replay(h).set_index("cell_id")["label"].to_dict()
    assert cur == {1: "a", 2: "b"}  # 1: bob's b undone -> ann's a; 2: latest b; 3: undone entirely
    per = replay(h, by_annotator=True)
    assert sorted(zip(per["cell_id"], per["annotator"], per["label"], strict=True)) == [
        (1, "ann", "a"), (2, "ann", "b")]


def test_history_file_errors_name_the_file_and_field(tmp_path):
    assert read_history(tmp_path / "absent.csv").empty
    (tmp_path / "header.csv").write_text(",".join(COLUMNS) + "\n")
    assert current_labels(tmp_path / "header.csv").empty
    bad = tmp_path / "bad.csv"
    bad.write_text("source_file,cell_id,label,annotator,time,comment\nf,1,a,x,t,hi\n")
    with pytest.raises(DataError, match=r"bad.csv: unknown column\(s\) comment"):
        read_history(bad)
    bad.write_text("source_file,cell_id,label,annotator,time\nf,1.5,a,x,t\n")
    with pytest.raises(DataError, match="line 2: cell_id '1.5' is not an integer"):
        read_history(bad)


# -- the join -----------------------------------------------------------------------------------------------------
def toy_index() -> pd.DataFrame:
    """Two slides each of classes a and b (10 cells each) and a 10-cell screen slide."""
    rows = []
    for g, lab in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"), ("scr", None)):
        for k in range(10):
            rows.append({"source_file": f"/d/{g}.h5", "row": k, "cell_id": 100 + k, "label": lab, "group": g})
    idx = pd.DataFrame(rows)
    idx["label"] = idx["label"].astype("string")
    return idx


CFG = SplitConfig(classes=["a", "b"], max_per_class=None, val_fraction=0.2, test_fraction=0.5, unlabeled_max=None)


def test_cell_labels_win_outside_the_fixed_test_split():
    idx = toy_index()
    base, summary = make_splits(idx, CFG)
    same, _ = make_splits(idx, CFG, hist([]))
    pd.testing.assert_frame_equal(base, same)
    test_groups = set(summary["test_groups"])
    train_a = sorted({"a1", "a2"} - test_groups)[0]
    test_a = sorted({"a1", "a2"} & test_groups)[0]
    labels = hist([("/d/scr.h5", 101, "b", "ann", "t"), ("/d/scr.h5", 102, "a", "ann", "t"),
                   ("/d/scr.h5", 103, "unsure", "ann", "t"), ("/d/scr.h5", 104, "new:vacuolated", "ann", "t"),
                   (f"/d/{train_a}.h5", 105, "b", "ann", "t"),     # a slide-labeled cell the person calls b
                   (f"/d/{test_a}.h5", 106, "b", "ann", "t")])     # test slide: ignored, test stays fixed
    out, s = make_splits(idx, CFG, labels)
    assert s["test_groups"] == summary["test_groups"]
    key = out.set_index(["source_file", "cell_id"])
    assert key.loc[("/d/scr.h5", 101), ["split", "label", "label_source"]].tolist() == ["train", "b", "cell"]
    assert key.loc[("/d/scr.h5", 102), ["split", "label"]].tolist() == ["train", "a"]
    assert key.loc[("/d/scr.h5", 103), "split"] == "unlabeled"
    assert key.loc[("/d/scr.h5", 104), ["split", "label"]].tolist() == ["heldout", "vacuolated"]
    assert key.loc[(f"/d/{train_a}.h5", 105), ["split", "label", "label_source"]].tolist() == ["train", "b", "cell"]
    assert key.loc[(f"/d/{test_a}.h5", 106), ["split", "label"]].tolist() == ["test", "a"]
    pd.testing.assert_frame_equal(out[out["split"] == "test"].reset_index(drop=True),
                                  base[base["split"] == "test"].reset_index(drop=True).assign(
                                      label_source="slide").astype({"label_source": out["label_source"].dtype}),
                                  check_dtype=False)
    # a new phenotype becomes a class once it is in split.classes (trained, no test cells: it has no slide)
    cfg3 = CFG.model_copy(update={"classes": ["a", "b", "vacuolated"]})
    out3, _ = make_splits(idx, cfg3, labels)
    assert out3.set_index(["source_file", "cell_id"]).loc[("/d/scr.h5", 104), "split"] == "train"


def test_labels_of_unknown_cells_or_classes_are_errors():
    idx = toy_index()
    with pytest.raises(DataError, match=r"labels.csv: 1 labeled cell\(s\) are not in the manifest's files"):
        make_splits(idx, CFG, hist([("/d/scr.h5", 999, "a", "ann", "t")]))
    with pytest.raises(DataError, match=r"label\(s\) zebra are not configured classes"):
        make_splits(idx, CFG, hist([("/d/scr.h5", 101, "zebra", "ann", "t")]))


def test_split_cli_reads_labels_csv(tmp_path, tiny_manifest):
    """`spatial split` joins label.labels: a screen cell labeled 'bright' trains."""
    from training.data.cellindex import build_index
    from training.io.tables import read_table, write_table

    idx = build_index(tiny_manifest, progress=False)
    write_table(idx, tmp_path / "cells.parquet")
    screen = str(idx.loc[idx["label"].isna(), "source_file"].iloc[0])
    cid = int(idx.loc[idx["label"].isna(), "cell_id"].iloc[0])
    write_labels(tmp_path / "labels.csv", [(screen, cid, "bright", "ann", "2026-01-01T00:00:00Z")])
    args = ["split", "--index", str(tmp_path / "cells.parquet"), "--out", str(tmp_path / "splits.parquet"),
            "--set", "split.classes=[bright,spotty]", "--set", f"label.labels={tmp_path / 'labels.csv'}"]
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    table, summary = read_table(tmp_path / "splits.parquet")
    row = table[(table["source_file"].astype(str) == screen) & (table["cell_id"] == cid)]
    assert row[["split", "label", "label_source"]].values.tolist() == [["train", "bright", "cell"]]
    assert summary["cell_labels"] == 1


# -- the store ----------------------------------------------------------------------------------------------------
def test_two_writers_at_once_lose_nothing(tmp_path):
    from serving.labeling.store import LabelStore

    path = tmp_path / "labels.csv"
    stores = [LabelStore(path, ["a", "b"]), LabelStore(path, ["a", "b"])]

    def work(k: int) -> None:
        for j in range(40):
            stores[k].append([{"source_file": "/d/f.h5", "cell_id": 1000 * k + j, "label": "ab"[k], "annotator":
                               f"ann{k}"}])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = read_history(path)
    assert len(h) == 80 and sorted(h["cell_id"]) == sorted([j for j in range(40)] + [1000 + j for j in range(40)])
    assert path.read_text().count("source_file") == 1
    with pytest.raises(DataError, match="label 'c' is not one of a, b"):
        stores[0].append([{"source_file": "/d/f.h5", "cell_id": 1, "label": "c", "annotator": "x"}])
    assert len(read_history(path)) == 80


# -- spatial query ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ens(tiny_ensemble):
    from training.uncertainty.ensemble import Ensemble

    return Ensemble.load(tiny_ensemble)


def test_query_skips_labeled_and_test_cells_and_is_reproducible(ens, tiny_manifest, one_thread):
    from training.active.acquisition import bald
    from training.active.query import member_probs, run_query
    from training.data.cellindex import build_index

    idx = build_index(tiny_manifest, progress=False)
    screen = idx[idx["label"].isna()]
    labeled = hist([(f, int(c), "bright", "ann", "t") for f, c in zip(screen["source_file"].astype(str)[:30],
                                                                      screen["cell_id"][:30], strict=True)])
    exclude = idx[idx["group"] == "bright_s0"]
    a = run_query(ens, idx, "bald", 12, labeled=labeled, exclude=exclude, pool_subsample=150, seed=3)
    b = run_query(ens, idx, "bald", 12, labeled=labeled, exclude=exclude, pool_subsample=150, seed=3)
    pd.testing.assert_frame_equal(a.queries, b.queries)
    assert a.pool == len(idx) - 30 - len(exclude) and a.scored == 150
    q = a.queries
    keys = set(zip(q["source_file"], q["cell_id"], strict=True))
    assert not keys & set(zip(labeled["source_file"], labeled["cell_id"], strict=True))
    assert not keys & set(zip(exclude["source_file"].astype(str), exclude["cell_id"], strict=True))
    assert {"strategy", "seed", "round", "source_file", "cell_id", "score", "label", "predicted_class",
            "confidence", "epistemic", "novelty", "prob_bright"} <= set(q.columns)
    assert (np.diff(q["score"].to_numpy()) <= 1e-12).all()  # top-k: in score order
    # the score is BALD on the members' probabilities of exactly these cells, and equals the ensemble's epistemic part
    from training.data.loader import CellLoader

    cells = q[["source_file", "row", "cell_id"]]
    raw = ens.predict_batches(CellLoader(cells, ens.preprocess, batch_size=64), raw=True)
    np.testing.assert_allclose(q["score"], bald(member_probs(ens, raw["logits"])), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q["score"], q["epistemic"], rtol=1e-4, atol=1e-6)


def test_typiclust_query_covers_the_labeled_cells(ens, tiny_manifest, one_thread, monkeypatch):
    """coreset / typiclust get the embeddings of the labeled cells, so they cover what a person labeled already."""
    import training.active.query as query
    from training.data.cellindex import build_index

    idx = build_index(tiny_manifest, progress=False)
    screen = idx[idx["label"].isna()]
    labeled = hist([(f, int(c), "bright", "ann", "t") for f, c in zip(screen["source_file"].astype(str)[:9],
                                                                      screen["cell_id"][:9], strict=True)])
    seen = {}
    real = query.select

    def spy(strategy, k, rng, **kw):
        seen[strategy] = tuple(None if kw[k] is None else kw[k].shape for k in ("embeddings", "labeled_embeddings"))
        return real(strategy, k, rng, **kw)

    monkeypatch.setattr(query, "select", spy)
    q = query.run_query(ens, idx, "typiclust", 5, labeled=labeled, pool_subsample=60, seed=1).queries
    (pool_shape, lab_shape) = seen["typiclust"]
    assert lab_shape == (9, pool_shape[1]) and len(q) == 5 and q["score"].gt(0).all()
    query.run_query(ens, idx, "margin", 5, labeled=labeled, pool_subsample=60, seed=1)
    assert seen["margin"][1] is None  # uncertainty strategies do not need them
    q = query.run_query(ens, idx, "badge", 5, labeled=labeled, pool_subsample=60, seed=1).queries
    assert seen["badge"] == (pool_shape, None)  # badge: the pool's features, not the labeled cells'
    assert len(q) == 5 and q["cell_id"].is_unique


def test_label_check_queues_the_cells_whose_slide_label_the_model_disputes(ens, tiny_manifest, one_thread):
    """Cells moved to the other class's slide label (as a knockout control's escapers carry the wrong label) come
    first; only cells with a slide label of the model's classes are asked about; the score is 1 - p(slide class)."""
    from training.active.query import run_query
    from training.data.cellindex import build_index
    from training.errors import DataError

    idx = build_index(tiny_manifest, progress=False)
    spotty = idx.index[idx["label"] == "spotty"][:4]
    idx["label"] = idx["label"].astype(object)
    idx.loc[spotty, "label"] = "bright"  # four spotty cells now say "bright"
    res = run_query(ens, idx, "label_check", 4, pool_subsample=None)
    q = res.queries
    assert res.pool == int(idx["label"].isin(["bright", "spotty"]).sum())  # screen cells (no slide label) left out
    assert set(q["cell_id"].astype(int)) == set(idx.loc[spotty, "cell_id"].astype(int))
    assert set(q["source_file"]) == set(idx.loc[spotty, "source_file"].astype(str))
    np.testing.assert_allclose(q["score"], 1 - q["prob_bright"], atol=1e-6)
    assert (q["predicted_class"] == "spotty").all() and (q["score"] > 0.5).all()
    assert (q["slide_label"] == "bright").all()  # the label the person is asked to confirm
    assert (np.diff(q["score"].to_numpy()) <= 1e-12).all()
    with pytest.raises(DataError, match="label_check: no unlabeled cell"):
        run_query(ens, idx[idx["label"].isna()], "label_check", 4)


def test_query_cli_writes_queries(tmp_path, tiny_manifest, tiny_ensemble):
    args = ["query", "--model", str(tiny_ensemble), "--manifest", str(tiny_manifest), "--strategy", "margin",
            "--n", "7", "--out", str(tmp_path / "q.parquet"), "--labels", str(tmp_path / "none.csv"),
            "--set", "al.pool_subsample=100", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    q = pd.read_parquet(tmp_path / "q.parquet")
    assert len(q) == 7 and (q["strategy"] == "margin").all() and q["query_rank"].tolist() == list(range(7))
    proc = subprocess.run([sys.executable, "-m", "serving.cli", *args[:-1], "--strategy", "oracle"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "unknown active learning strategy 'oracle'" in proc.stderr
    for bad in ("0", "-5"):  # not the default count, not a traceback: a clear error, nothing written
        out = tmp_path / f"q{bad}.parquet"
        proc = subprocess.run([sys.executable, "-m", "serving.cli", *args[:5], "--n", bad, "--out", str(out),
                               "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                              env={"PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2 and f"--n must be at least 1, got {bad}" in proc.stderr and not out.exists()


# -- spatial recalibrate ------------------------------------------------------------------------------------------
def _spatial(monkeypatch, *args: str) -> int:
    import serving.cli.main as cli

    monkeypatch.setattr(sys, "argv", ["spatial", *map(str, args)])
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_recalibrate_refits_the_served_temperature_on_labels_of_new_slides(tmp_path, tiny_manifest, tiny_ensemble,
                                                                           ens, monkeypatch, capsys, one_thread):
    """Labels that contradict the model on 1 cell in 8 make it over-confident there: the copy serves a pooled
    temperature softer than the one it had, exactly softmax(log mean member probability / T), with a lower NLL on those cells; the model it
    came from is untouched; too few cells or an unknown slide are clear errors that write nothing."""
    import json

    from training.data.cellindex import build_index
    from training.data.loader import CellLoader
    from training.uncertainty.calibration import pooled_log_probs
    from training.uncertainty.decompose import softmax
    from training.uncertainty.ensemble import Ensemble

    idx = build_index(tiny_manifest, progress=False)
    new = idx[idx["group"].isin(["bright_s1", "spotty_s1"])].reset_index(drop=True)
    truth = new["label"].astype(str).to_numpy()
    flip = np.arange(len(new)) % 8 == 0
    given = np.where(flip, np.where(truth == "bright", "spotty", "bright"), truth)
    other = idx[idx["group"] == "bright_s0"].head(5)  # labeled, but on a slide left out with --group
    labels = write_labels(tmp_path / "labels.csv",
                          [(f, int(c), lab, "ann", "t") for f, c, lab in zip(new["source_file"].astype(str),
                                                                             new["cell_id"], given, strict=True)]
                          + [(f, int(c), "bright", "ann", "t") for f, c in zip(other["source_file"].astype(str),
                                                                              other["cell_id"], strict=True)])
    before = json.loads((tiny_ensemble / "spec.json").read_text())
    common = ["recalibrate", "--model", tiny_ensemble, "--manifest", tiny_manifest, "--labels", labels,
              "--group", "bright_s1", "--group", "spotty_s1", "--no-progress"]
    out = tmp_path / "recalibrated"
    assert _spatial(monkeypatch, *common, "--min-cells", "50", "--out", out, "--metrics", tmp_path / "m.json") == 0
    m = json.loads((tmp_path / "m.json").read_text())
    spec = json.loads((out / "spec.json").read_text())
    assert spec["pooled_temperature"] == m["temperature"] and spec["calibration"] == "pooled"
    assert m["n_cells"] == len(new) and m["cells_per_group"] == {"bright_s1": 60, "spotty_s1": 60}
    assert m["temperature"] > m["previous_temperature"] and m["nll_after"] < m["nll_before"]  # softer than served
    assert spec["info"]["recalibration"]["labels"] == str(labels)
    assert spec["info"]["recalibration"]["from"] == str(tiny_ensemble)
    assert json.loads((tiny_ensemble / "spec.json").read_text()) == before

    cells = new[["source_file", "row", "cell_id"]].assign(source_file=lambda t: t["source_file"].astype(str))
    raw = ens.predict_batches(CellLoader(cells, ens.preprocess, batch_size=64), raw=True)
    served = Ensemble.load(out).predict_batches(CellLoader(cells, ens.preprocess, batch_size=64))
    np.testing.assert_allclose(served["mean_probs"], softmax(pooled_log_probs(raw["logits"]) / m["temperature"]),
                               rtol=1e-5, atol=1e-6)

    capsys.readouterr()
    assert _spatial(monkeypatch, *common, "--min-cells", "500", "--out", tmp_path / "few") == 2
    assert "120 labeled cell(s) of the model's classes; a temperature needs at least 500" in capsys.readouterr().err
    assert _spatial(monkeypatch, *common[:-1], "--group", "plate_9", "--out", tmp_path / "bad", "--no-progress") == 2
    assert "unknown group(s) plate_9" in capsys.readouterr().err
    missing = tmp_path / "typo.csv"  # a mistyped --labels is "not found", not an empty history
    assert _spatial(monkeypatch, *[missing if a == labels else a for a in common], "--out", tmp_path / "gone") == 2
    assert f"{missing}: labels file not found" in capsys.readouterr().err
    assert not (tmp_path / "few").exists() and not (tmp_path / "bad").exists() and not (tmp_path / "gone").exists()


def test_recalibrate_unlabeled_serves_the_temperature_atc_predicts(tmp_path, tiny_manifest, tiny_ensemble, ens,
                                                                    monkeypatch, capsys, one_thread):
    """Without labels: the copy serves the temperature at which the new slides' mean confidence equals the accuracy
    ATC predicts from the threshold the model stored (here set so that 1 cell in 10 falls below it); a model without a
    threshold, no --group, or --labels with --unlabeled are clear errors that write nothing."""
    import json
    import shutil

    from training.data.cellindex import build_index
    from training.data.loader import CellLoader
    from training.uncertainty.calibration import pooled_log_probs
    from training.uncertainty.decompose import softmax
    from training.uncertainty.ensemble import Ensemble
    from training.uncertainty.shift import confidence, temperature_for_accuracy

    assert "atc_threshold" in json.loads((tiny_ensemble / "spec.json").read_text())["info"]  # stored at training
    idx = build_index(tiny_manifest, progress=False)
    new = idx[idx["group"].isin(["bright_s1", "spotty_s1"])].reset_index(drop=True)
    cells = new[["source_file", "row", "cell_id"]].assign(source_file=lambda t: t["source_file"].astype(str))
    logp = pooled_log_probs(ens.predict_batches(CellLoader(cells, ens.preprocess, batch_size=64), raw=True)["logits"])
    conf = np.sort(confidence(logp))
    k = len(conf) // 10
    model = tmp_path / "model"
    shutil.copytree(tiny_ensemble, model)
    spec = json.loads((model / "spec.json").read_text())
    spec["info"]["atc_threshold"] = float((conf[k - 1] + conf[k]) / 2)
    (model / "spec.json").write_text(json.dumps(spec))

    common = ["recalibrate", "--model", model, "--manifest", tiny_manifest, "--unlabeled", "--no-progress"]
    out = tmp_path / "recalibrated"
    assert _spatial(monkeypatch, *common, "--group", "bright_s1", "--group", "spotty_s1", "--min-cells", "50",
                    "--out", out, "--metrics", tmp_path / "m.json") == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["method"] == "atc" and m["n_cells"] == len(new) == 120
    assert m["predicted_error"] == pytest.approx(k / len(conf))
    assert m["cells_per_group"] == {"bright_s1": 60, "spotty_s1": 60} and m["from"] == str(model)
    t = temperature_for_accuracy(logp, 1 - k / len(conf))
    assert m["temperature"] == pytest.approx(t, rel=1e-5)
    served = Ensemble.load(out).predict_batches(CellLoader(cells, ens.preprocess, batch_size=64))["mean_probs"]
    np.testing.assert_allclose(served, softmax(logp / m["temperature"]), rtol=1e-5, atol=1e-6)
    assert served.max(axis=1).mean() == pytest.approx(1 - k / len(conf), abs=1e-4)
    assert json.loads((out / "spec.json").read_text())["info"]["recalibration"]["method"] == "atc"

    capsys.readouterr()
    assert _spatial(monkeypatch, *common, "--out", tmp_path / "nogroup") == 2
    assert "name the new slides" in capsys.readouterr().err
    assert _spatial(monkeypatch, *common, "--group", "bright_s1", "--max-cells", "-5", "--out", tmp_path / "neg") == 2
    assert "--max-cells must be at least 1, got -5" in capsys.readouterr().err
    assert _spatial(monkeypatch, *common, "--group", "bright_s1", "--labels", tmp_path / "l.csv",
                    "--out", tmp_path / "both") == 2
    assert "--labels and --unlabeled exclude each other" in capsys.readouterr().err
    spec["info"]["atc_threshold"] = None  # e.g. no validation cell was misclassified
    (model / "spec.json").write_text(json.dumps(spec))
    assert _spatial(monkeypatch, *common, "--group", "bright_s1", "--min-cells", "50", "--out", tmp_path / "old") == 2
    assert "no ATC threshold" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("nogroup", "neg", "both", "old"))


# -- the labeling API: bad input ----------------------------------------------------------------------------------
def labeling_app(tmp_path: Path, ens, manifest: Path, n: int, pool: int, allow_remote: bool = False):
    """The labeling app on ``n`` cells ``margin`` queries from ``pool`` of the manifest's; returns it and its
    labels file (not written yet)."""
    from serving.labeling.app import Session, create_app, read_queries
    from training.active.query import run_query
    from training.data.cellindex import build_index

    q = run_query(ens, build_index(manifest, progress=False), "margin", n, pool_subsample=pool).queries
    q.to_parquet(tmp_path / "q.parquet")
    labels = tmp_path / "labels.csv"
    session = Session(read_queries(tmp_path / "q.parquet"), labels, ["bright", "spotty"])
    return create_app(session, allow_remote), labels


def test_labeling_api_rejects_bad_requests_and_keeps_labels(tmp_path, ens, tiny_manifest):
    from starlette.testclient import TestClient

    from serving.labeling.app import create_app

    app, labels = labeling_app(tmp_path, ens, tiny_manifest, 5, 60)
    local = {"client": ("127.0.0.1", 5000), "base_url": "http://127.0.0.1:8000"}
    with TestClient(app, **local) as c:
        assert c.post("/api/label", json={"i": 0, "label": "bright", "annotator": "ann"}).status_code == 200
        before = labels.read_bytes()
        assert c.post("/api/label", json={"i": 5, "label": "bright", "annotator": "ann"}).status_code == 404
        assert c.post("/api/label", json={"i": 0, "label": "zebra", "annotator": "ann"}).status_code == 400
        assert c.post("/api/label", json={"i": 0, "label": "bright", "annotator": ""}).status_code == 400
        assert c.post("/api/label", content=b"not json", headers={"Content-Type": "application/json"}
                      ).status_code == 400
        assert c.post("/api/label", json={"i": "../../etc/passwd", "label": "bright", "annotator": "a"}
                      ).status_code == 400
        assert c.get("/thumb/5/composite").status_code == 404
        assert c.get("/thumb/0/9").status_code == 400
        assert c.get("/thumb/0/composite?contrast=abc").status_code == 400
        assert c.get("/thumb/0/composite").headers["content-type"] == "image/png"
        # each a 500 before: deep nesting, an integer past Python's 4,300 digits, in a body or in the URL
        for content in (b"[" * 60_000, b'{"i": ' + b"1" * 5_000 + b"}"):
            r = c.post("/api/label", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == "request body is not JSON", r.text
        assert c.get("/thumb/" + "9" * 5_000 + "/composite").status_code == 404
        assert c.get("/thumb/-1/composite").status_code == 404
        assert c.get("/thumb/0/" + "1" * 5_000).json()["error"].startswith("channel must be 'composite' or 0..")
        assert labels.read_bytes() == before
    with TestClient(app, client=("10.1.2.3", 5000), base_url="http://127.0.0.1:8000") as c:
        r = c.post("/api/label", json={"i": 1, "label": "bright", "annotator": "ann"})
        assert r.status_code == 403 and "this machine only" in r.json()["error"]
        assert c.get("/").status_code == 403
    assert labels.read_bytes() == before
    with TestClient(create_app(app.state.session, allow_remote=True), client=("10.1.2.3", 5000),
                    base_url="http://lab-pc.example.org:8000") as c:
        assert c.get("/api/session").status_code == 200
        assert c.post("/api/label", json={"i": 1, "label": "bright", "annotator": "ann"}).status_code == 200


def test_labeling_pages_cannot_be_framed_or_run_other_scripts(tmp_path, ens, tiny_manifest):
    """Another site could show the page in an invisible frame and catch the annotator's keys; and a model column with
    inf in the queries made /api/cells a 500, so the page never loaded."""
    from starlette.testclient import TestClient

    from serving.labeling.app import create_app

    app, _ = labeling_app(tmp_path, ens, tiny_manifest, 3, 30)
    session = app.state.session
    session.cells.loc[0, "confidence"] = np.inf
    with TestClient(create_app(session), client=("127.0.0.1", 5000), base_url="http://127.0.0.1:8000") as c:
        for r in (c.get("/"), c.get("/api/session"), c.post("/api/label", content=b"i=0")):  # the last one refused
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            policy = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "script-src 'sha256-" in policy, policy
        cells = c.get("/api/cells").json()["cells"]
        assert "confidence" not in cells[0] and "confidence" in cells[1]


@pytest.mark.parametrize(("allow_remote", "base_url", "headers", "status", "message"), [
    # another site's page in the annotator's browser: a text/plain POST needs no CORS preflight
    (False, "http://127.0.0.1:8000", {"Origin": "http://evil.example.com", "Content-Type": "text/plain"}, 403,
     "a request from another site (http://evil.example.com) may not write labels"),
    (False, "http://127.0.0.1:8000", {"Origin": "http://evil.example.com"}, 403, "from another site"),
    (False, "http://127.0.0.1:8000", {"Origin": "null"}, 403, "from another site (null)"),  # sandboxed frame, file://
    (False, "http://127.0.0.1:8000", {"Origin": "http://[::1"}, 403, "from another site (http://[::1)"),  # no parse
    (True, "http://lab-pc:8000", {"Origin": "http://evil.example.com"}, 403, "from another site"),
    # a site whose name resolves to 127.0.0.1 (DNS rebinding): its own origin, but not this machine's name
    (False, "http://evil.example.com:8000", {"Origin": "http://evil.example.com:8000"}, 403,
     "Host 'evil.example.com:8000' is not this machine"),
    # a form or a plain fetch (no preflight) cannot send JSON
    (False, "http://127.0.0.1:8000", {"Content-Type": "text/plain"}, 415, "the body must be JSON"),
    (False, "http://127.0.0.1:8000", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "must be JSON"),
])
def test_labeling_api_refuses_writes_from_other_sites(tmp_path, ens, tiny_manifest, allow_remote, base_url, headers,
                                                      status, message):
    import json

    from starlette.testclient import TestClient

    app, labels = labeling_app(tmp_path, ens, tiny_manifest, 3, 30, allow_remote)
    body = json.dumps({"i": 0, "label": "bright", "annotator": "csrf"})
    with TestClient(app, client=("127.0.0.1", 5000), base_url=base_url) as c:
        r = c.post("/api/label", content=body, headers={"Content-Type": "application/json", **headers})
        assert r.status_code == status and message in r.json()["error"], r.text
        assert not labels.exists() or "csrf" not in labels.read_text()
        if "evil" not in base_url:  # the page itself, opened by this machine's name: same origin, JSON
            ok = c.post("/api/label", content=body, headers={"Content-Type": "application/json", "Origin": base_url})
            assert ok.status_code == 200 and "csrf" in labels.read_text()


def test_labeling_behind_a_reverse_proxy_accepts_the_forwarded_origin(tmp_path, ens, tiny_manifest):
    """A proxy may ask by its upstream's name (nginx's default Host): the page's Origin is the forwarded host."""
    from starlette.testclient import TestClient

    app, labels = labeling_app(tmp_path, ens, tiny_manifest, 3, 30, allow_remote=True)
    with TestClient(app, client=("10.0.0.2", 5000), base_url="http://127.0.0.1:8000") as c:
        body = {"i": 0, "label": "bright", "annotator": "ann"}
        proxied = {"Origin": "https://labs.example.org", "X-Forwarded-Host": "labs.example.org"}
        assert c.post("/api/label", json=body, headers=proxied).status_code == 200
        other = {"Origin": "https://evil.example.com", "X-Forwarded-Host": "labs.example.org"}
        assert c.post("/api/label", json={**body, "annotator": "csrf"}, headers=other).status_code == 403
    assert "ann" in labels.read_text() and "csrf" not in labels.read_text()


def test_a_queries_table_needs_integer_cell_ids(tmp_path):
    from serving.labeling.app import read_queries

    for bad, shown in (("abc", "'abc'"), ("1.5", "'1.5'"), ("", "'nan'")):
        (tmp_path / "q.csv").write_text(f"source_file,cell_id\nf.h5,3\nf.h5,{bad}\n")
        with pytest.raises(DataError, match=rf"q\.csv: cell_id must be an integer, got {re.escape(shown)} \(row 2 "):
            read_queries(tmp_path / "q.csv")
    (tmp_path / "q.csv").write_text("source_file,cell_id\nf.h5,3.0\nf.h5,4\n")
    assert read_queries(tmp_path / "q.csv")["cell_id"].tolist() == [3, 4]


def test_queries_with_cells_not_in_the_files_are_refused(tmp_path, ens, tiny_manifest):
    from training.active.query import run_query
    from training.data.cellindex import build_index

    q = run_query(ens, build_index(tiny_manifest, progress=False), "random", 3, pool_subsample=60).queries
    q.loc[1, "cell_id"] = 987654321
    q.to_parquet(tmp_path / "q.parquet")
    (tmp_path / "bad.csv").write_text("source_file,cell_id,label,who\n")
    env = {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "label", "--queries", str(tmp_path / "q.parquet"),
                           "--labels", str(tmp_path / "l.csv")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "1 cell(s) are not in" in proc.stderr and "Traceback" not in proc.stderr
    q.drop(index=1).to_parquet(tmp_path / "q2.parquet")
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "label", "--queries", str(tmp_path / "q2.parquet"),
                           "--labels", str(tmp_path / "bad.csv")], capture_output=True, text=True, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 2 and "bad.csv: unknown column(s) who" in proc.stderr
    (tmp_path / "zebra.csv").write_text("source_file,cell_id,label,annotator,time\nf.h5,1,zebra,ann,t\n")
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "label", "--queries", str(tmp_path / "q2.parquet"),
                           "--labels", str(tmp_path / "zebra.csv"), "--set", "split.classes=[bright,spotty]"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "zebra.csv: label(s) zebra are not configured classes" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "label", "--queries", str(tmp_path / "q2.parquet"),
                           "--host", "0.0.0.0", "--labels", str(tmp_path / "l.csv")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr == ("error: --host 0.0.0.0 is not a loopback address; pass "
                                                    "--allow-remote to serve other machines\n"), proc.stderr


def test_a_wildcard_bind_is_announced_by_the_names_that_reach_it():
    """`--host 0.0.0.0` announced http://0.0.0.0:PORT, which is no address to type (and BentoML logs localhost)."""
    import socket

    from serving.cli.options import server_url

    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"
    assert server_url("::1", 3000, "") == "http://[::1]:3000"
    assert server_url("0.0.0.0", 8000) == (f"http://{socket.gethostname()}:8000/ (every interface; "
                                           "http://127.0.0.1:8000/ on this machine)")
    assert server_url("::", 3000, "").endswith("http://[::1]:3000 on this machine)")


def test_a_labeling_history_is_an_al_oracle(tmp_path):
    """`spatial al --labels labels.csv` reads the page's history: latest label per cell, unsure / new left out."""
    from training.active.oracle import read_labels_csv

    path = write_labels(tmp_path / "labels.csv", [("f.h5", 1, "a", "ann", "t1"), ("f.h5", 1, "b", "bob", "t2"),
                                                   ("f.h5", 2, "unsure", "ann", "t3"), ("f.h5", 3, "new:x", "ann", "t4"),
                                                   ("f.h5", 4, "a", "ann", "t5"), ("f.h5", 4, "undo", "ann", "t6")])
    table = read_labels_csv(path)
    assert table[["cell_id", "label"]].values.tolist() == [[1, "b"]]
