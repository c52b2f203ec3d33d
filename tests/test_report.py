"""The screen report: sections appear exactly when their inputs exist, the timecourse interval is the t-interval,
and in a real headless Chromium every section renders and the gene table sorts and filters. The inputs other
stages write are faked here, small and hand-made."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from browser_util import chromium, keep_figure, wait_until  # noqa: F401  (chromium is a fixture)

from serving.report.build import build_report, timecourse_profile
from training.errors import DataError

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
ALL = ["model", "galleries", "studies", "screen", "timecourse", "discovery"]


def png(path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)


def fake_project(root: Path, manifest: Path) -> dict:
    """Every input of the report, small: real cells from the tiny dataset, hand-made numbers."""
    from training.data.cellindex import build_index
    from training.io.tables import write_table

    idx = build_index(manifest, progress=False)
    rng = np.random.default_rng(0)
    # cell index with a timecourse: the screen slide's cells get timepoints 0 / 4 / 8
    screen = idx["label"].isna()
    idx["timepoint"] = pd.Series(np.nan, index=idx.index, dtype=float)
    idx.loc[screen, "timepoint"] = np.tile([0.0, 4.0, 8.0], int(screen.sum()) // 3 + 1)[: int(screen.sum())]
    write_table(idx, root / "data/index/cells.parquet")
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics/evaluate.json").write_text(json.dumps({"balanced_accuracy": 0.91, "nll": 0.25, "ece": 0.03,
                                                            "heldout/epistemic/auroc": 0.8,
                                                            "heldout/novelty/auroc": 0.9,
                                                            "heldout_ei24/novelty/auroc": 0.7,
                                                            "heldout_tc_2h/novelty/auroc": 0.6,
                                                            "heldout_tc_14h/novelty/auroc": 0.5},
                                                           sort_keys=True))  # as the CLI writes metrics
    for n in ("confusion", "reliability", "embedding", "uncertainty"):
        png(root / f"reports/evaluate/{n}.png", n)
    labeled = idx[~screen].sample(40, random_state=0)
    pred = pd.DataFrame({"source_file": labeled["source_file"].astype(str).to_numpy(), "cell_id": labeled["cell_id"],
                         "label": labeled["label"].astype(str), "split": "test"})
    p1 = rng.uniform(0, 1, len(pred))
    pred["prob_bright"], pred["prob_spotty"] = p1, 1 - p1
    pred["predicted_class"] = np.where(p1 >= 0.5, "bright", "spotty")
    pred["confidence"] = np.maximum(p1, 1 - p1)
    pred["novelty"] = rng.uniform(0, 10, len(pred))
    write_table(pred, root / "reports/evaluate/predictions.parquet")
    png(root / "reports/al/learning_curve.png", "learning curve")
    (root / "reports/al/summary.json").write_text(json.dumps({"best_strategy": "margin", "labels_to_match": 65}))
    for arm, ba in (("supervised", 0.7), ("fixmatch", 0.8)):
        (root / f"metrics/ssl_{arm}.json").write_text(json.dumps({"balanced_accuracy": ba, "nll": 0.5}))
    # screen: scores with known timecourse probabilities: P(bright) = 0.1 / 0.5 / 0.9 + noise by timepoint
    sc = idx[screen]
    t = sc["timepoint"].to_numpy()
    pb = np.clip(np.select([t == 0, t == 4], [0.1, 0.5], 0.9) + rng.normal(0, 0.05, len(sc)), 0, 1)
    scores = pd.DataFrame({"source_file": sc["source_file"].astype(str).to_numpy(), "cell_id": sc["cell_id"],
                           "prob_bright": pb, "prob_spotty": 1 - pb, "novelty": rng.uniform(0, 10, len(sc))})
    (root / "reports/screen/bins").mkdir(parents=True, exist_ok=True)
    scores.to_parquet(root / "reports/screen/scores.parquet")
    bins = scores[["source_file", "cell_id"]].assign(score=1 - pb, bin=np.where(pb < 0.2, 1, 2))
    bins.to_parquet(root / "reports/screen/bins/bins.parquet")
    genes = pd.DataFrame({"gene": ["ATG5", "EI24", "NT_1", "GENE_3", "ATG7"], "n_grnas": [4, 4, 4, 3, 4],
                          "effect": [2.5, 1.1, 0.05, -0.3, 3.0], "p_value": [1e-5, 0.01, 0.8, 0.5, 1e-6],
                          "fdr": [1e-4, 0.05, 0.9, 0.7, 1e-5], "rank": [2, 3, 5, 4, 1],
                          "is_hit": [True, True, False, False, True]})
    (root / "reports/screen/hits").mkdir(parents=True)
    genes.to_csv(root / "reports/screen/hits/genes.csv", index=False)
    png(root / "reports/screen/hits/volcano.png", "volcano")
    png(root / "reports/screen/hits/rank.png", "rank")
    (root / "reports/screen/hits/summary.json").write_text(json.dumps({"n_hits": 3, "fdr": 0.1}))
    (root / "reports/discovery").mkdir(parents=True)
    pd.DataFrame({"cluster": [0, 1], "n_cells": [12, 7], "mean_novelty": [8.1, 6.5]}).to_csv(
        root / "reports/discovery/clusters.csv", index=False)
    png(root / "reports/discovery/cluster_0.png", "cluster 0")
    pd.DataFrame({"cluster": [0] * 7 + [1] * 2, "gene": [f"G{i}" for i in range(9)],
                  "p_value": [1e-6 * 10**i for i in range(7)] + [0.01, 0.2]}).to_csv(
        root / "reports/discovery/cluster_genes.csv", index=False)
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/discovery.json").write_text(json.dumps({
        "reference": "controls", "n_novel": 19, "n_scored": 80, "quantile": 0.95, "n_clusters": 2,
        "top_cluster_top_gene": "GNOV", "top_cluster_top_gene_fdr": 1e-6}))
    return {"genes": genes, "scores": scores, "timepoint": t}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_manifest):
    root = tmp_path_factory.mktemp("proj")
    facts = fake_project(root, tiny_manifest)
    return root, facts


def test_sections_appear_only_with_their_inputs(tmp_path, project):
    root, _ = project
    assert build_report(tmp_path, tmp_path / "empty.html") == []
    assert "No inputs yet" in (tmp_path / "empty.html").read_text()
    only = tmp_path / "only"
    (only / "reports/screen/hits").mkdir(parents=True)
    shutil.copy(root / "reports/screen/hits/genes.csv", only / "reports/screen/hits/genes.csv")
    assert build_report(only, only / "r.html") == ["screen"]
    assert build_report(root, root / "r.html") == ALL
    html = (root / "r.html").read_text()
    assert "src=\"http" not in html and "<link" not in html  # self-contained: nothing fetched
    assert html.count('class="tile"') >= 2 * 8 + 8 + 2        # class galleries, novel cells, bin galleries


@pytest.mark.parametrize(("file", "spoil", "message"), [
    ("metrics/evaluate.json", lambda f: f.write_text('{"balanced_accuracy": '), "evaluate.json: not valid JSON"),
    ("reports/screen/bins/bins.parquet", lambda f: f.write_bytes(b"PAR1"), "bins.parquet: not a readable Parquet"),
    ("reports/screen/bins/bins.parquet", lambda f: pd.DataFrame({"x": [1]}).to_parquet(f),
     "an input of the report's 'screen' section is not what the pipeline writes (KeyError"),
    ("reports/screen/hits/genes.csv", lambda f: f.write_bytes(b"\xff\xfe\x00gene\n\x81"), "genes.csv: not a readable CSV"),
    ("metrics/evaluate.json", lambda f: f.write_text("[1, 2, 3]"), "evaluate.json: expected a JSON object"),
    ("metrics/discovery.json", lambda f: f.write_text("[1, 2, 3]"), "discovery.json: expected a JSON object"),
    ("reports/screen/hits/summary.json", lambda f: f.write_text('"done"'), "summary.json: expected a JSON object"),
])
def test_a_spoiled_input_is_one_error_naming_it_and_no_report(file, spoil, message, tmp_path, project):
    root = tmp_path / "proj"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("*.html"))
    spoil(root / file)
    with pytest.raises(DataError, match=re.escape(message)):
        build_report(root, root / "r.html")
    assert not (root / "r.html").exists() and not list(root.glob(".r.html*"))


def test_timecourse_profile_is_the_t_interval():
    from scipy import stats

    cells = pd.DataFrame({"timepoint": [0, 0, 0, 4, 4], "p": [0.1, 0.2, 0.3, 0.8, 0.9]})
    prof = timecourse_profile(cells, "p")
    assert prof["n"].tolist() == [3, 2]
    np.testing.assert_allclose(prof["mean"], [0.2, 0.85])
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    np.testing.assert_allclose([prof["low"][0], prof["high"][0]], [0.2 - half, 0.2 + half])


def test_report_cli_and_page_in_chromium(chromium, project):  # noqa: F811
    root, facts = project
    out = root / "reports/screen/index.html"
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "report", "--out", str(out),
                           "--set", "report.timecourse_class=bright"],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "sections model, galleries, studies, screen, timecourse, discovery" in proc.stdout
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    page.goto(out.as_uri())
    for sid in ALL:
        assert page.locator(f"section#{sid}").is_visible()
        assert page.locator(f"section#{sid} h2").text_content()
    wait_until(page, "Array.from(document.images).every((im) => im.complete && im.naturalWidth > 0)")
    assert page.locator("#heldout-metrics tbody tr td:first-child").all_text_contents() == [
        "heldout", "heldout_ei24", "heldout_tc_2h", "heldout_tc_14h"]  # timepoints in time order
    assert page.locator("section#galleries h3.class-gallery").all_text_contents() == ["bright", "spotty"]
    assert page.locator("section#screen h4.bin-gallery").count() == 2
    summary = page.locator("#discovery-summary").text_content()
    assert "19 of 80 cells are unlike the non-targeting controls of the same slide" in summary
    assert "top gene of cluster 0: GNOV" in summary
    shown = page.locator("#cluster-genes tbody tr td:nth-child(2)").all_text_contents()
    assert shown == ["G0", "G1", "G2", "G3", "G4", "G7", "G8"]  # five per cluster, in the queue's order
    # the timecourse table: the means the scores were made with (0.1 / 0.5 / 0.9 by timepoint)
    means = [float(x) for x in page.locator("#timecourse-table tbody tr td:nth-child(3)").all_text_contents()]
    np.testing.assert_allclose(means, [0.1, 0.5, 0.9], atol=0.04)
    # gene table: sorts by a numeric column both ways, and filters by name
    genes = facts["genes"]

    def column(n: int) -> list[str]:
        return page.locator(f"#genes tbody tr td:nth-child({n})").all_text_contents()

    assert column(1) == genes.sort_values("rank")["gene"].tolist()
    page.click("#genes th:has-text('effect')")
    assert column(1) == genes.sort_values("effect")["gene"].tolist()
    page.click("#genes th:has-text('effect')")
    assert column(1) == genes.sort_values("effect", ascending=False)["gene"].tolist()
    page.click("#genes th:has-text('gene')")
    assert column(1) == sorted(genes["gene"])
    page.fill("#gene-search", "atg")
    visible = [r for r in page.locator("#genes tbody tr").all() if r.is_visible()]
    assert sorted(r.locator("td").first.text_content() for r in visible) == ["ATG5", "ATG7"]
    assert page.locator("#gene-count").text_content() == "2 of 5 genes"
    page.fill("#gene-search", "")
    shot = root / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    keep_figure(shot, "screen_report.png")
    page.close()


def test_markup_in_an_input_file_cannot_run_in_the_page(chromium, tmp_path, project):  # noqa: F811
    """The discovery counts went into the page unescaped: markup in metrics/discovery.json ran its script. And the page's
    Content-Security-Policy lets no script run but the report's own, whatever reaches the HTML."""
    root = tmp_path / "proj"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("*.html"))
    trap = '<img src=x onerror="window.pwned=1">'
    m = json.loads((root / "metrics/discovery.json").read_text())
    (root / "metrics/discovery.json").write_text(json.dumps({**m, "n_novel": trap, "n_clusters": trap}))
    out = root / "r.html"
    build_report(root, out)
    page = chromium.new_page()
    page.goto(out.as_uri())
    assert page.locator("#discovery-summary").text_content().startswith(f"{trap} of 80 cells are unlike")
    assert page.locator("#discovery-summary img").count() == 0 and page.evaluate("() => window.pwned") is None
    out.write_text(out.read_text().replace("</nav>", f"</nav>{trap}"))  # markup past every escape
    page.goto(out.as_uri())
    wait_until(page, "document.getElementById('gene-count').textContent === '5 of 5 genes'")  # own script ran
    assert page.locator("nav + img").count() == 1 and page.evaluate("() => window.pwned") is None
    page.close()
