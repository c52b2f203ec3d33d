"""The discovery queue: a planted cluster of novel cells is found, its gene tops the enrichment, outputs and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.discovery.controls import control_novelty
from serving.discovery.enrichment import cluster_gene_enrichment
from serving.discovery.genotypes import genotypes_from_truth
from serving.discovery.queue import NOT_NOVEL, cluster_embeddings, novelty_threshold
from serving.discovery.run import discover
from training.config import DiscoverConfig
from training.errors import DataError, ModelError
from training.io.formats import CellFile
from training.io.tables import read_table, write_table

N_PLANTED = 20
MODEL_REF = DiscoverConfig(reference="model", quantile=0.99)  # hand-made novelty: the model is the reference


def _planted_scores(screen: Path, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Scores for the screen file's cells: ``N_PLANTED`` cells with high novelty and embeddings far out along one
    direction, a few scattered novel-looking cells, the rest ordinary."""
    with CellFile(screen) as f:
        ids = f.cell_ids()
    n = ids.size
    planted = np.zeros(n, bool)
    planted[rng.choice(n, N_PLANTED, replace=False)] = True
    emb = rng.normal(0, 1, (n, 16))
    emb[planted, 0] += 12.0
    novelty = rng.uniform(0, 1, n)
    novelty[planted] = rng.uniform(3, 4, N_PLANTED)
    scattered = np.flatnonzero(~planted)[:4]
    novelty[scattered] = 2.5  # novel, but not a group
    df = pd.DataFrame({"source_file": os.fspath(screen), "cell_id": ids, "prob_a": 0.9, "prob_b": 0.1,
                       "predicted_class": "a", "confidence": 0.9, "entropy": 0.3, "aleatoric": 0.3,
                       "epistemic": np.where(planted, 0.2, 0.01), "novelty": novelty,
                       "embedding": list(emb.astype(np.float32))})
    return df, planted


def _genotypes(df: pd.DataFrame, planted: np.ndarray, rng: np.random.Generator, tmp: Path) -> tuple[Path, Path]:
    genes = ["G1", "G2", "G3", "G4"]
    grna = np.array([f"{rng.choice(genes)}_{rng.integers(1, 3)}" if rng.random() < 0.8 else f"NTC_{rng.integers(1, 4)}"
                     for _ in range(len(df))], dtype=object)
    grna[planted] = [f"GNOV_{i % 2 + 1}" for i in range(planted.sum())]
    grna[np.flatnonzero(~planted)[:3]] = "GNOV_1"  # the gene also has cells that look ordinary (KO escapers)
    keep = np.ones(len(df), bool)
    keep[np.flatnonzero(~planted)[-5:]] = False  # cells whose barcode was not read
    keep[np.flatnonzero(planted)[:2]] = False
    geno = pd.DataFrame({"source_file": df["source_file"], "cell_id": df["cell_id"], "grna": grna})[keep]
    lib = pd.DataFrame({"grna": [f"{g}_{i}" for g in [*genes, "GNOV"] for i in (1, 2)] + [f"NTC_{i}" for i in (1, 2, 3)],
                        "gene": [g for g in [*genes, "GNOV"] for _ in (1, 2)] + ["non-targeting"] * 3,
                        "is_control": [False] * 10 + [True] * 3})
    geno.to_csv(tmp / "genotypes.csv", index=False)
    lib.to_csv(tmp / "library.csv", index=False)
    return tmp / "genotypes.csv", tmp / "library.csv"


def test_cluster_embeddings_finds_two_blobs_and_numbers_by_size():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(0, 1, (25, 8)) + 10.0])
    labels = cluster_embeddings(x, max_clusters=5, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [25, 60]
    assert (labels[:60] == 0).all() and (labels[60:] == 1).all()  # 0 = the larger cluster
    np.testing.assert_array_equal(labels, cluster_embeddings(x, max_clusters=5, seed=0))  # seeded


def test_threshold_comes_from_the_models_validation_quantiles():
    info = {"novelty_val_quantiles": {"0.95": 1.5, "0.99": 2.0}}
    assert novelty_threshold(info, 0.99) == 2.0
    with pytest.raises(ModelError, match="0.9 is not stored"):
        novelty_threshold(info, 0.9)
    with pytest.raises(ModelError, match="no novelty reference"):
        novelty_threshold({}, 0.99)


def test_fisher_enrichment_known_answer():
    # 10 cells in cluster 0: 6 of gene A (A has 8 cells overall of 100), 4 of B (B has 40 overall)
    cells = pd.DataFrame({
        "cluster": [0] * 10 + [NOT_NOVEL] * 90,
        "gene": ["A"] * 6 + ["B"] * 4 + ["A"] * 2 + ["B"] * 36 + ["NT"] * 52,
        "is_control": [False] * 48 + [True] * 52,
    })
    res = cluster_gene_enrichment(cells)
    assert res["gene"].tolist() == ["A", "B"]
    from scipy.stats import fisher_exact
    p_a = fisher_exact([[6, 4], [2, 88]], alternative="greater").pvalue
    assert res["p_value"].iloc[0] == pytest.approx(p_a)
    assert res["n_cells"].tolist() == [6, 4] and res["n_gene_cells"].tolist() == [8, 40]
    assert res["fdr"].iloc[0] == pytest.approx(min(1.0, 2 * p_a))  # BH over two genes, A the smaller p


def test_discover_finds_the_planted_cluster_and_its_gene(tiny_manifest, tmp_path):
    rng = np.random.default_rng(3)
    screen = tiny_manifest.parent / "screen_s0.h5sc"
    df, planted = _planted_scores(screen, rng)
    write_table(df, tmp_path / "scores.parquet")
    geno, lib = _genotypes(df, planted, rng, tmp_path)
    truth = tmp_path / "truth_genes.csv"
    pd.DataFrame({"gene": ["G1", "GNOV"], "role": ["neutral", "novel"]}).to_csv(truth, index=False)
    info = {"novelty_val_quantiles": {"0.99": 2.0}}
    m = discover(tmp_path / "scores.parquet", info, "LC3B", tmp_path / "q", MODEL_REF, geno, lib, truth_genes=truth)
    cells, _ = read_table(tmp_path / "q" / "cells.parquet")
    assert list(cells.columns[:2]) == ["source_file", "cell_id"]
    top = cells["cluster"].to_numpy() == 0
    assert set(np.flatnonzero(top)) == set(np.flatnonzero(planted))  # the planted cells, and only they
    assert (cells["cluster"].to_numpy() != NOT_NOVEL).sum() == N_PLANTED + 4
    genes = pd.read_csv(tmp_path / "q" / "cluster_genes.csv")
    best = genes[genes["cluster"] == 0].iloc[0]
    assert best["gene"] == "GNOV" and best["n_cells"] == N_PLANTED - 2 and best["fdr"] < 0.001
    assert "non-targeting" not in set(genes["gene"])
    assert m["top_cluster_top_gene"] == "GNOV" and m["planted_novel_gene_is_top"] is True
    assert m["n_novel"] == N_PLANTED + 4 and m["n_with_genotype"] == len(df) - 7
    clusters = pd.read_csv(tmp_path / "q" / "clusters.csv")
    assert clusters["n_cells"].iloc[0] == N_PLANTED and clusters["mean_novelty"].iloc[0] > 3
    assert (tmp_path / "q" / "cluster_0.png").stat().st_size > 1000
    cut = pd.read_csv(tmp_path / "q" / "cluster_0_cells.csv")
    assert set(cut["cell_id"]) == set(df["cell_id"][planted])


def test_queue_puts_the_gene_driven_cluster_before_a_larger_one_without_a_gene(tiny_manifest, tmp_path):
    """Debris-like cells (any gRNA) outnumber the planted gene's cells; the queue still starts with the gene."""
    rng = np.random.default_rng(6)
    df, planted = _planted_scores(tiny_manifest.parent / "screen_s0.h5sc", rng)
    n_debris = 2 * N_PLANTED
    debris = np.zeros(len(df), bool)
    debris[rng.choice(np.flatnonzero(~planted), n_debris, replace=False)] = True
    emb = np.stack(df["embedding"].to_numpy())
    emb[debris, 1] -= 12.0
    novelty = df["novelty"].to_numpy().copy()
    novelty[debris] = rng.uniform(4, 5, n_debris)  # more novel than the planted cells, too
    df = df.assign(embedding=list(emb), novelty=novelty)
    write_table(df, tmp_path / "scores.parquet")
    geno, lib = _genotypes(df, planted, rng, tmp_path)
    cfg = MODEL_REF.model_copy(update={"max_clusters": 3})  # the order of the queue, not the number of clusters
    m = discover(tmp_path / "scores.parquet", {}, "LC3B", tmp_path / "q", cfg, geno, lib, threshold=2.0)
    cells, _ = read_table(tmp_path / "q" / "cells.parquet")
    clusters = pd.read_csv(tmp_path / "q" / "clusters.csv")
    assert set(np.flatnonzero(cells["cluster"].to_numpy() == 0)) == set(np.flatnonzero(planted))
    assert clusters["n_cells"].iloc[0] == N_PLANTED and clusters["n_cells"].iloc[1] > N_PLANTED  # the larger, second
    assert cells["cluster"].to_numpy()[debris].tolist().count(1) >= n_debris - 2
    assert clusters["top_gene"].iloc[0] == "GNOV" and clusters["top_gene_fdr"].iloc[0] < 0.001
    assert clusters["top_gene_fdr"].iloc[1] > 0.05  # the debris cluster: no gene stands out
    assert m["top_cluster_top_gene"] == "GNOV" and m["top_cluster_n_cells"] == N_PLANTED
    genes = pd.read_csv(tmp_path / "q" / "cluster_genes.csv")
    assert genes["cluster"].is_monotonic_increasing and genes[genes["cluster"] == 0]["gene"].iloc[0] == "GNOV"
    cut = pd.read_csv(tmp_path / "q" / "cluster_0_cells.csv")
    assert set(cut["cell_id"]) == set(df["cell_id"][planted])


def test_discover_without_genotypes_writes_cell_lists_only(tiny_manifest, tmp_path):
    df, planted = _planted_scores(tiny_manifest.parent / "screen_s0.h5sc", np.random.default_rng(4))
    write_table(df, tmp_path / "s.parquet")
    m = discover(tmp_path / "s.parquet", {}, "LC3B", tmp_path / "q", threshold=2.0)
    assert not (tmp_path / "q" / "cluster_genes.csv").exists() and "top_cluster_top_gene" not in m
    cells, _ = read_table(tmp_path / "q" / "cells.parquet")
    cut = pd.read_csv(tmp_path / "q" / "cluster_0_cells.csv")  # the top cluster, ready to cut out as its own bin
    assert list(cut.columns) == ["source_file", "cell_id"]
    assert set(cut["cell_id"]) == set(cells.loc[cells["cluster"] == 0, "cell_id"]) >= set(df["cell_id"][planted])
    # on this seed the mixture (no noise label; BIC does not pay for a 4-cell component) takes the 4 scattered novel
    # cells into the planted cluster: the README says so beside the clustering
    assert len(cut) == N_PLANTED + 4 and set(cut["cell_id"]) == set(df["cell_id"][df["novelty"] > 2.0])


def test_bad_inputs_name_the_file_and_leave_nothing(tiny_manifest, tmp_path):
    df, planted = _planted_scores(tiny_manifest.parent / "screen_s0.h5sc", np.random.default_rng(5))
    write_table(df.drop(columns="embedding"), tmp_path / "noemb.parquet")
    with pytest.raises(DataError, match="--embeddings"):
        discover(tmp_path / "noemb.parquet", {}, "LC3B", tmp_path / "q", threshold=2.0)
    write_table(df, tmp_path / "s.parquet")
    pd.DataFrame({"grna": ["a", "nt"], "gene": ["A", "NT"], "is_control": [False, True]}).to_csv(tmp_path / "l.csv",
                                                                                                 index=False)
    for table, message in (({"source_file": ["x"], "cell_id": [1]}, "g.csv: missing column.s. grna"),
                           ({"source_file": ["x"], "cell_id": ["c7"], "grna": ["a"]}, "cell_id must be an integer"),
                           ({"source_file": ["x"], "cell_id": [1], "grna": ["b"]}, "gRNA.s. missing from .*l.csv")):
        pd.DataFrame(table).to_csv(tmp_path / "g.csv", index=False)
        with pytest.raises(DataError, match=message):
            discover(tmp_path / "s.parquet", {}, "LC3B", tmp_path / "q", genotypes=tmp_path / "g.csv",
                     library=tmp_path / "l.csv", threshold=2.0)
    geno, lib = _genotypes(df, planted, np.random.default_rng(5), tmp_path)
    with pytest.raises(DataError, match="reference=controls needs the model"):
        discover(tmp_path / "s.parquet", {}, "LC3B", tmp_path / "q", genotypes=geno, library=lib)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_genotypes_from_truth(tmp_path):
    pd.DataFrame({"path": ["screen/s1.h5", "controls/c.h5sc", "screen/s1.h5"], "cell_id": [1, 2, 3],
                  "grna": ["G1_1", "", "NTC_1"]}).to_parquet(tmp_path / "truth.parquet")
    assert genotypes_from_truth(tmp_path / "truth.parquet", "data/raw", tmp_path / "g.csv") == 2
    g = pd.read_csv(tmp_path / "g.csv")
    assert g.to_dict("list") == {"source_file": ["data/raw/screen/s1.h5"] * 2, "cell_id": [1, 3], "grna": ["G1_1", "NTC_1"]}


def test_cli_score_then_discover(tiny_ensemble, tiny_manifest, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    screen = tiny_manifest.parent / "screen_s0.h5sc"
    run = lambda *a: subprocess.run([sys.executable, "-m", "serving.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path, env=env)
    proc = run("score", str(screen), "--model", str(tiny_ensemble), "--embeddings", "--out", "scores.parquet",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run("discover", "--scores", "scores.parquet", "--model", str(tiny_ensemble), "--out", "q",
               "--metrics", "d.json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "d.json").read_text())
    spec = json.loads((tiny_ensemble / "spec.json").read_text())
    assert m["threshold"] == pytest.approx(spec["info"]["novelty_val_quantiles"]["0.95"])
    assert m["reference"] == "model"  # no genotypes, so no controls
    assert m["n_scored"] == 80 and (tmp_path / "q" / "cells.parquet").is_file()
    proc = run("discover", "--scores", "scores.parquet", "--model", str(tiny_ensemble), "--out", "q2",
               "--genotypes", "missing.csv", "--library", "missing.csv")
    assert proc.returncode == 2 and "missing.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_control_novelty_measures_each_slide_against_its_own_controls():
    """Two slides, the second shifted (its optics); 15 cells per slide are displaced (a phenotype). Against their own
    slide's controls exactly the displaced cells stand out; a slide without controls of its own is measured against
    the other slide's, and then its shift is what stands out."""
    rng = np.random.default_rng(0)
    n, d = 400, 12
    x = rng.normal(0, 1, (2 * n, d))
    x[n:, 1] += 10.0  # slide 2's shift
    x[:, 0] += 20.0  # keeps every row far from the origin, so L2-normalising keeps the geometry
    planted = np.zeros(2 * n, bool)
    planted[rng.choice(n, 15, replace=False)] = True
    planted[n + rng.choice(n, 15, replace=False)] = True
    x[planted, 2] += 8.0
    is_control = ~planted & (rng.random(2 * n) < 0.5)
    slides = np.repeat(["s1", "s2"], n)
    own = control_novelty(x, is_control, slides, k=5, min_controls=50)
    assert set(np.argsort(-own)[:30]) == set(np.flatnonzero(planted))
    few = is_control & (slides == "s1")  # slide 2 has no controls: the pooled ones (slide 1's) are its reference
    borrowed = control_novelty(x, few, slides, k=5, min_controls=50)
    ordinary = ~planted & ~few
    assert np.median(borrowed[ordinary & (slides == "s2")]) > 2 * np.median(borrowed[ordinary & (slides == "s1")])
    assert len(set(np.argsort(-borrowed)[:30]) & set(np.flatnonzero(planted))) < 15
    # known answer: a control's score is its distance to the k-th nearest *other* control of its slide
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = np.flatnonzero(is_control & (slides == "s1"))
    dist = np.linalg.norm(unit[c][:, None] - unit[c][None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(own[c], np.sort(dist, axis=1)[:, 4], rtol=1e-5)
    with pytest.raises(DataError, match="at least 6 control cells"):
        control_novelty(x, np.zeros(2 * n, bool), slides, k=5)


def test_controls_reference_puts_the_planted_gene_first_on_a_simulated_screen(tiny_ensemble, tmp_path):
    """The simulator's screen (its optics differ from the training slides'): scored, then queued against its own
    non-targeting controls, the gene with the novel phenotype is the top gene of the top cluster."""
    from serving.model import ServedModel
    from training.config import SynthConfig
    from training.sim.synth import synthesize

    cfg = SynthConfig(image_size=32, cells_per_class=2, slides_per_condition=1, timecourse_hours=[0.0],
                      cells_per_timepoint=1, screen_slides=2, cells_per_screen_slide=2500, n_genes=30, n_controls=20,
                      seed=1)
    raw = tmp_path / "raw"
    synthesize(cfg, raw, progress=False)
    genotypes_from_truth(raw / "truth.parquet", raw, tmp_path / "genotypes.csv")
    geno = pd.read_csv(tmp_path / "genotypes.csv")
    write_table(geno[["source_file", "cell_id"]], tmp_path / "scores.parquet")  # the reference needs only the cells
    model = ServedModel.open(tiny_ensemble)
    m = discover(tmp_path / "scores.parquet", model.spec.info, "LC3B", tmp_path / "q", DiscoverConfig(),
                 tmp_path / "genotypes.csv", raw / "library.csv", truth_genes=raw / "truth_genes.csv", model=model)
    assert m["reference"] == "controls" and m["n_controls"] > 300
    assert m["planted_novel_gene_is_top"] is True, m
    assert m["top_cluster_top_gene_fdr"] < 1e-6
    # about 1 - quantile of the controls are over the threshold (leave-one-out: they are measured like new cells)
    cells, _ = read_table(tmp_path / "q" / "cells.parquet")
    ctrl = cells.merge(geno, on=["source_file", "cell_id"])["grna"].str.startswith("NTC").to_numpy()
    assert (cells["cluster"].to_numpy()[ctrl] != NOT_NOVEL).mean() == pytest.approx(0.05, abs=0.01)


def test_no_novel_cell_writes_an_empty_queue(tiny_manifest, tmp_path):
    """A threshold no cell passes is an answer, not an error: with genotypes too, the queue holds no cluster."""
    rng = np.random.default_rng(3)
    df, planted = _planted_scores(tiny_manifest.parent / "screen_s0.h5sc", rng)
    write_table(df, tmp_path / "scores.parquet")
    geno, lib = _genotypes(df, planted, rng, tmp_path)
    m = discover(tmp_path / "scores.parquet", {}, "LC3B", tmp_path / "q", MODEL_REF, geno, lib, threshold=1e9)
    assert m["n_novel"] == 0 and m["n_clusters"] == 0 and m["top_cluster_top_gene"] is None
    cells, _ = read_table(tmp_path / "q" / "cells.parquet")
    assert len(cells) == len(df) and (cells["cluster"] == NOT_NOVEL).all()
    assert pd.read_csv(tmp_path / "q" / "clusters.csv").empty
    assert pd.read_csv(tmp_path / "q" / "cluster_genes.csv").empty
    assert not list((tmp_path / "q").glob("cluster_*_cells.csv"))


def test_a_ragged_embedding_is_refused_naming_the_file(tiny_manifest, tmp_path):
    df, _ = _planted_scores(tiny_manifest.parent / "screen_s0.h5sc", np.random.default_rng(3))
    top = int(df["novelty"].idxmax())
    for bad in (df["embedding"][top][:3], None):
        ragged = df.copy()
        ragged.at[top, "embedding"] = bad
        write_table(ragged, tmp_path / "ragged.parquet")
        with pytest.raises(DataError, match=r"ragged\.parquet.*embedding"):
            discover(tmp_path / "ragged.parquet", {}, "LC3B", tmp_path / "q", MODEL_REF, threshold=2.0)
    assert not (tmp_path / "q").exists()
