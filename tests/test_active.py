"""Active learning campaigns on tiny data: bookkeeping, oracles, outputs, bad input (exit code 2)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_params

from training.active.campaign import full_data_reference, run_campaign
from training.active.oracle import NO_CLASS, LabelsCsvOracle, ManifestOracle, SimulatedOracle
from training.active.report import aubc, labels_to_reach, summarize
from training.config import SynthConfig
from training.data.cellindex import build_index
from training.data.splits import make_splits
from training.data.trainset import prepare_data
from training.errors import DataError

AL = {"al.initial": 4, "al.query_size": 3, "al.rounds": 2, "al.seeds": 1, "al.min_steps": 2, "al.epochs": 1,
      "al.batch_size": 8, "al.mc_samples": 3, "al.full_data": False}


@pytest.fixture(scope="module")
def setup(tiny_manifest, tmp_path_factory):
    p = tiny_params(tmp_path_factory.mktemp("al"), **AL)
    index = build_index(tiny_manifest, progress=False)
    table, summary = make_splits(index, p.split)
    return p, index, prepare_data(table, summary["classes"], p)


def _keys(df: pd.DataFrame) -> list[tuple[str, int]]:
    return list(zip(df["source_file"].astype(str), df["cell_id"].astype(int), strict=True))


@pytest.mark.parametrize("strategy", ["margin", "coreset", "typiclust", "probcover", "badge"])
def test_campaign_bookkeeping(setup, strategy):
    p, index, data = setup
    reported = []
    curve = run_campaign(p, data, strategy, 0, ManifestOracle(index, data.classes), report=reported.append,
                         progress=False)
    q = curve.attrs["queries"]
    assert curve["round"].tolist() == [0, 1, 2] and reported == curve.to_dict("records")
    assert np.diff(curve["n_labels"]).tolist() == [3, 3]  # grows by exactly the query size
    assert len(q) == 4 + 2 * 3 and q.groupby("round").size().tolist() == [4, 3, 3]
    assert len(set(_keys(q))) == len(q)  # never a cell twice
    assert not set(_keys(q)) & set(_keys(data.split("test")))  # never a test cell
    assert set(_keys(q)) <= set(_keys(data.split("train")))  # the default pool is the training split
    assert q.loc[q["round"] > 0, "score"].notna().all()
    # typiclust's cold start is its own typicality selection (scored), the others' the class-balanced random one
    assert q.loc[q["round"] == 0, "score"].notna().all() == (strategy == "typiclust")
    assert curve["balanced_accuracy"].between(0, 1).all() and (curve["nll"] > 0).all()


def test_campaign_is_paired_across_strategies_and_reproducible(setup):
    p, index, data = setup
    oracle = ManifestOracle(index, data.classes)
    a = run_campaign(p, data, "random", 3, oracle, progress=False)
    b = run_campaign(p, data, "entropy", 3, oracle, progress=False)
    c = run_campaign(p, data, "random", 3, oracle, progress=False)
    qa, qb, qc = (x.attrs["queries"] for x in (a, b, c))
    assert _keys(qa[qa["round"] == 0]) == _keys(qb[qb["round"] == 0])  # same initial set
    assert a.loc[0, "balanced_accuracy"] == b.loc[0, "balanced_accuracy"]  # same round-0 model
    assert _keys(qa) == _keys(qc)
    pd.testing.assert_frame_equal(a.drop(columns=[c for c in a if c.startswith("seconds")]),
                                  c.drop(columns=[c for c in c if c.startswith("seconds")]))


def test_campaign_with_a_labels_csv_oracle(setup, tmp_path):
    p, index, data = setup
    train = data.split("train").iloc[::2]  # a person labeled every other training cell...
    flipped = np.where(train["label"] == "bright", "spotty", "bright")  # ...and disagrees with the slide label
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"source_file": train["source_file"].astype(str), "cell_id": train["cell_id"],
                  "label": flipped}).to_csv(csv, index=False)
    oracle = LabelsCsvOracle(csv, index, data.classes)
    curve = run_campaign(p, data, "least_confidence", 0, oracle, progress=False)
    q = curve.attrs["queries"]
    given = dict(zip(_keys(train), flipped, strict=True))
    assert set(_keys(q)) <= set(given)
    assert [given[k] for k in _keys(q)] == q["label"].tolist()
    assert curve["n_labels"].iloc[-1] == 4 + 2 * 3


def test_simulated_oracle_answers_by_true_state(tmp_path):
    from training.sim.synth import load_truth, synthesize

    cfg = SynthConfig(image_size=16, cells_per_class=12, slides_per_condition=2, timecourse_hours=[0.0],
                      cells_per_timepoint=4, screen_slides=1, cells_per_screen_slide=40, n_genes=8, n_hits=2,
                      n_controls=4, seed=1)
    manifest = synthesize(cfg, tmp_path / "raw", progress=False)
    truth = load_truth(manifest)
    classes = ["stimulated", "atg5_ko"]
    oracle = SimulatedOracle.from_manifest(manifest, classes, {"on": "stimulated", "blocked": "atg5_ko"})
    answers = oracle.label(truth)
    expected = truth["state"].map({"on": 0, "blocked": 1}).fillna(NO_CLASS).astype(int).to_numpy()
    assert (answers == expected).all()
    assert (answers == NO_CLASS).any() and (answers == 0).any() and (answers == 1).any()
    # the annotator looks at the cell, not the slide: escaped knockouts are answered by phenotype
    cells = build_index(manifest, progress=False)
    assert oracle.available(cells).all()
    with pytest.raises(DataError, match="no entry"):
        oracle.label(pd.DataFrame({"source_file": ["nowhere.h5"], "cell_id": [1]}))


def test_summary_area_and_labels_to_target():
    assert aubc(np.array([10, 20, 30]), np.array([0.5, 0.7, 0.9])) == pytest.approx(0.7)
    assert labels_to_reach(np.array([10, 20, 30]), np.array([0.5, 0.91, 0.99]), 0.9) == 20
    assert labels_to_reach(np.array([10, 20]), np.array([0.5, 0.6]), 0.9) is None
    rows = []
    for s, vals in (("random", [0.5, 0.7, 0.9]), ("margin", [0.5, 0.91, 0.95])):
        for seed in (0, 1):
            rows += [{"strategy": s, "seed": seed, "round": r, "n_labels": 10 * (r + 1), "balanced_accuracy": v,
                      "macro_f1": v, "nll": 1 - v, "seconds_train": 1.0, "seconds_score": 0.1, "seconds_eval": 0.1}
                     for r, v in enumerate(vals)]
    ref = pd.DataFrame([{"seed": 0, "n_labels": 100, "balanced_accuracy": 0.95, "macro_f1": 0.95, "nll": 0.1}])
    summ = summarize(pd.DataFrame(rows), ref)
    m = summ["strategies"]["margin"]
    assert summ["target_balanced_accuracy"] == pytest.approx(0.9025)
    assert m["labels_to_target"] == 20 and summ["strategies"]["random"]["labels_to_target"] is None
    assert m["labels_to_target_ratio_to_random"] is None and m["labels_to_target_ratio_to_random_at_most"] == 20 / 30
    assert m["aubc_ratio_to_random"] == pytest.approx(aubc([10, 20, 30], [0.5, 0.91, 0.95]) / 0.7)


# -- the command -----------------------------------------------------------------------------------------------
def _spatial(monkeypatch, *args: str) -> int:
    import serving.cli.main as cli

    monkeypatch.setattr(sys, "argv", ["spatial", *args])
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _params_file(tmp_path, **extra) -> str:
    import yaml

    p = tiny_params(tmp_path, **{**AL, **extra})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    return str(path)


def test_al_command_writes_every_output(tiny_manifest, tmp_path, monkeypatch):
    params = _params_file(tmp_path, **{"al.full_data": True, "al.full_data_seeds": None, "al.rounds": 1})
    out = tmp_path / "al"
    rc = _spatial(monkeypatch, "al", "--params", params, "--manifest", str(tiny_manifest), "--out", str(out),
                  "--strategy", "random,power_margin", "--seeds", "2", "--metrics", str(tmp_path / "m.json"),
                  "--no-progress")
    assert rc == 0
    curve = pd.read_csv(out / "curve.csv")
    assert {"strategy", "seed", "round", "n_labels", "balanced_accuracy", "macro_f1", "nll"} <= set(curve.columns)
    assert len(curve) == 2 * 2 * 2 and set(curve["strategy"]) == {"random", "power_margin"}
    q = pd.read_parquet(out / "queries.parquet")
    assert {"strategy", "seed", "round", "source_file", "cell_id", "score"} <= set(q.columns)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["strategies"]["power_margin"]
    assert {"aubc", "aubc_ratio_to_random", "labels_to_target", "labels_to_target_ratio_to_random"} <= set(s)
    assert summary["full_data"]["seeds"] == 2
    asked = q[q["round"] > 0]
    assert summary["query_labels"]["random"] == pytest.approx(
        asked[asked["strategy"] == "random"]["label"].fillna("(none of the classes)").value_counts(normalize=True)
        .to_dict())
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "curve_mean.csv").is_file()
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "power_margin/labels_to_95" in metrics and "full_data_balanced_accuracy" in metrics


@pytest.mark.parametrize("case, args, message", [
    ("strategy", ["--strategy", "bogus"], "unknown active learning strategy 'bogus'"),
    ("budget", ["--initial", "500"], "exceeds the pool"),
    ("query0", ["--query-size", "0"], "al.query_size"),
    ("cell", [], "not in the manifest"),
    ("class", [], "not configured classes"),
    ("shares", ["--set", "al.pool_shares={bright: 1.0}"], "al.pool_shares must give a share for each class of the "
                                                           "campaign (bright, spotty); missing: spotty"),
    ("shares_sum", ["--set", "al.pool_shares={bright: 0.5, spotty: 0.6}"], "sum to 1"),
])
def test_bad_input_exits_2(tiny_manifest, tmp_path, monkeypatch, capsys, case, args, message):
    params = _params_file(tmp_path)
    if case in ("cell", "class"):
        index = build_index(tiny_manifest, progress=False)
        row = index.iloc[0]
        rows = [{"source_file": str(row["source_file"]), "cell_id": int(row["cell_id"]), "label": "bright"}]
        rows.append({"source_file": str(row["source_file"]), "cell_id": 10**9, "label": "bright"} if case == "cell"
                    else {"source_file": str(row["source_file"]), "cell_id": int(index.iloc[1]["cell_id"]),
                          "label": "mitotic"})
        pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
        args = ["--labels", str(tmp_path / "labels.csv")]
    out = tmp_path / "out"
    rc = _spatial(monkeypatch, "al", "--params", params, "--manifest", str(tiny_manifest), "--out", str(out), *args,
                  "--no-progress")
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_share_positions_draw_the_largest_pool_with_the_shares():
    from training.active.campaign import share_positions

    y = np.repeat([0, 1, 2], [500, 40, 100])  # 500 / 40 / 100 cells of three slide classes
    shares = {"a": 0.8, "b": 0.1, "c": 0.1}
    pos = share_positions(y, ["a", "b", "c"], shares, np.random.default_rng(0))
    # class b (40 cells at 10 %) limits the pool to 400 cells: 320 / 40 / 40
    assert np.bincount(y[pos]).tolist() == [320, 40, 40]
    assert len(np.unique(pos)) == len(pos) and (np.diff(pos) > 0).all()
    assert pos.tolist() == share_positions(y, ["a", "b", "c"], shares, np.random.default_rng(0)).tolist()
    assert pos.tolist() != share_positions(y, ["a", "b", "c"], shares, np.random.default_rng(1)).tolist()
    with pytest.raises(DataError, match="slide class"):
        share_positions(np.array([0, 1, -1]), ["a", "b"], {"a": 0.5, "b": 0.5}, np.random.default_rng(0))


def test_campaign_pool_follows_al_pool_shares(setup):
    """A pool dominated by one class: every campaign draws from (and the reference trains on) the same subset."""
    p, index, data = setup
    p = p.model_copy(update={"al": p.al.model_copy(update={"pool_shares": {"bright": 0.75, "spotty": 0.25},
                                                            "full_data": True})})
    oracle = ManifestOracle(index, data.classes)
    from training.active.campaign import pool_table

    pool = pool_table(data, p, oracle)
    counts = pool["label"].value_counts()
    train = data.split("train")["label"].value_counts()
    assert train["bright"] == train["spotty"] == 48  # balanced: bright limits the pool, spotty is drawn down
    assert (counts["bright"], counts["spotty"]) == (48, 16)
    assert set(_keys(pool)) <= set(_keys(data.split("train")))
    q = run_campaign(p, data, "entropy", 0, oracle, progress=False).attrs["queries"]
    assert set(_keys(q)) <= set(_keys(pool))
    assert full_data_reference(p, data, 0, oracle, progress=False)["n_labels"] == len(pool)


def test_query_labels_are_the_answers_to_the_queries_after_the_initial_set():
    from training.active.report import query_labels

    q = pd.DataFrame({"strategy": ["random"] * 5 + ["margin"] * 5, "round": [0, 1, 1, 2, 2] * 2,
                      "label": ["a", "a", "b", "a", None, "b", "b", "b", "c", "b"]})
    assert query_labels(q) == {"random": {"(none of the classes)": 0.25, "a": 0.5, "b": 0.25},
                               "margin": {"b": 0.75, "c": 0.25}}


def test_full_data_reference_uses_the_whole_pool(setup):
    p, index, data = setup
    ref = full_data_reference(p, data, 0, ManifestOracle(index, data.classes), progress=False)
    assert ref["n_labels"] == len(data.split("train")) == ref["n_trained"]
    again = full_data_reference(p, data, 0, ManifestOracle(index, data.classes), progress=False)
    assert again["balanced_accuracy"] == ref["balanced_accuracy"]  # seeded: the same reference each time


def test_campaign_with_semisupervised_rounds(setup):
    p, index, data = setup
    runs = {}
    for semi in (True, False):
        q = p.model_copy(update={"al": p.al.model_copy(update={"semisupervised": semi, "rounds": 1})})
        runs[semi] = run_campaign(q, data, "entropy", 0, ManifestOracle(index, data.classes), progress=False)
    assert runs[True]["n_labels"].tolist() == [4, 7]
    # the same labeled cells and seeds: only the unlabeled pool in training makes the first round's models differ
    assert runs[True]["nll"].iloc[0] != runs[False]["nll"].iloc[0]


def test_al_classes_make_the_campaign_split_for_them(tiny_manifest, tmp_path, monkeypatch):
    """al.classes other than split.classes: the campaign splits the manifest for its own classes."""
    params = _params_file(tmp_path, **{"al.rounds": 1, "al.classes": ["bright", "dim", "spotty"]})
    two_class = tmp_path / "splits.parquet"
    from training.io.tables import write_table

    index = build_index(tiny_manifest, progress=False)
    table, summary = make_splits(index, tiny_params(tmp_path).split)
    write_table(table, two_class, summary)
    out = tmp_path / "al"
    rc = _spatial(monkeypatch, "al", "--params", params, "--manifest", str(tiny_manifest), "--splits", str(two_class),
                  "--out", str(out), "--strategy", "margin", "--no-progress")
    assert rc == 0
    campaign = json.loads((out / "summary.json").read_text())["campaign"]
    assert campaign["classes"] == ["bright", "dim", "spotty"]
    q = pd.read_parquet(out / "queries.parquet")
    assert set(q["label"]) <= {"bright", "dim", "spotty", NO_CLASS} and len(q) == 4 + 3


def test_semisupervised_rounds_honour_ssl_method(setup):
    """al.semisupervised trains each round with the regime's objective: FixMatch or the autoencoder (ssl.method)."""
    import torch

    from training.active.campaign import train_models

    p, _, _ = setup
    g = torch.Generator().manual_seed(0)
    x, y, u = torch.rand(12, 1, 32, 32, generator=g), np.arange(12) % 2, torch.rand(24, 1, 32, 32, generator=g)
    p = p.model_copy(update={"al": p.al.model_copy(update={"min_steps": 3, "epochs": 1, "batch_size": 4})})

    def weights(method: str | None) -> list[torch.Tensor]:
        q = p if method is None else p.model_copy(update={"ssl": p.ssl.model_copy(update={
            "method": method, "threshold": 1e-6})})
        (model,) = train_models(x, y, q, seed=0, n_classes=2, unlabeled=None if method is None else u)
        return [t.clone() for t in model.state_dict().values()]

    sup, fix, ae = weights(None), weights("fixmatch"), weights("autoencoder")
    assert weights("autoencoder")[0].equal(ae[0])  # same seed, same result
    differs = lambda a, b: any(not s.equal(t) for s, t in zip(a, b, strict=True))  # noqa: E731
    assert differs(sup, fix) and differs(sup, ae) and differs(fix, ae)


def test_semisupervised_rounds_honour_the_balanced_unlabeled_pool(setup):
    """ssl.balance_unlabeled=predicted in an AL round: from the second epoch the unlabeled cells are drawn by the
    teacher's predicted class, so the weights differ from plain FixMatch; the same seed gives the same model."""
    import torch

    from training.active.campaign import train_models

    p, _, _ = setup
    g = torch.Generator().manual_seed(0)
    x, y, u = torch.rand(12, 1, 32, 32, generator=g), np.arange(12) % 2, torch.rand(24, 1, 32, 32, generator=g)
    p = p.model_copy(update={"al": p.al.model_copy(update={"min_steps": 4, "epochs": 2, "batch_size": 4})})

    def weights(balance) -> list[torch.Tensor]:
        q = p.model_copy(update={"ssl": p.ssl.model_copy(update={"threshold": 1e-6, "balance_unlabeled": balance})})
        (model,) = train_models(x, y, q, seed=0, n_classes=2, unlabeled=u)
        return [t.clone() for t in model.state_dict().values()]

    plain, balanced = weights(False), weights("predicted")
    assert any(not a.equal(b) for a, b in zip(plain, balanced, strict=True))
    assert all(a.equal(b) for a, b in zip(balanced, weights("predicted"), strict=True))


def test_round_metrics_are_the_one_balanced_accuracy_on_a_known_posterior(setup):
    """A round's test metrics come from the engine's inference step and evaluation.metrics: a model that calls
    every cell 'a' has balanced accuracy 1/2 on two classes, accuracy 4/6 and a known NLL."""
    import math

    import torch
    from torch import nn

    from training.active.campaign import test_metrics

    class Always(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward_features(self, x):
            return x.flatten(1)[:, :2]

        def forward_head(self, f, pre_logits: bool = False):
            return f if pre_logits else torch.tensor([[5.0, 0.0]]).expand(len(f), 2) + 0 * self.w

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    p, _, _ = setup
    y = np.array([0, 0, 0, 0, 1, 1])
    m = test_metrics([Always()], torch.rand(6, 1, 4, 4), y, ["a", "b"], p)
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["nll"] == pytest.approx(math.log1p(math.exp(-5)) + 5 * 2 / 6, rel=1e-4)
