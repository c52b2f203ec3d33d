"""From scores to genes: excision bins, count-table parsers, the hit statistics on hand-made data with known answers,
null calibration on small simulated nulls, and every bad input of ``spatial bins | hits`` (exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy import stats

from serving.cli.main import main
from serving.screen.bins import assign, make_bins
from serving.screen.counts import (
    SampleSheet,
    check_library,
    read_count_table,
    read_genotypes,
    read_library,
    read_sample_sheet,
)
from serving.screen.hits import (
    CellsInput,
    CountsInput,
    _stouffer_by_group,
    bh,
    call_cells,
    call_counts,
    call_rra,
    call_sparcs,
    fit_dispersion,
    gene_level,
    quiet_siblings,
    rra_rho,
    truth_metrics,
)
from serving.screen.sequencing import sequence_replicate
from training.config import BinsConfig, HitsConfig, SequenceConfig
from training.errors import DataError


# -- hand-made inputs ------------------------------------------------------------------------------------------------
def write_counts(tmp, rows: dict[str, list], name: str = "counts.tsv"):
    df = pd.DataFrame(rows)
    path = tmp / name
    df.to_csv(path, sep="\t", index=False)
    return path


def write_samples(tmp, rows: list[tuple], name: str = "samples.csv"):
    path = tmp / name
    pd.DataFrame(rows, columns=["sample", "kind", "bin", "replicate", "cells"]).to_csv(path, index=False)
    return path


def write_library(tmp, grnas: list[tuple[str, str, bool]], name: str = "library.csv"):
    path = tmp / name
    pd.DataFrame(grnas, columns=["grna", "gene", "is_control"]).to_csv(path, index=False)
    return path


@pytest.fixture
def small(tmp_path):
    """Two NT gRNAs and gene A (2 gRNAs) whose cells are 4x enriched in the one bin."""
    counts = write_counts(tmp_path, {"sgRNA": ["NT1", "NT2", "A_1", "A_2"], "Gene": ["NT", "NT", "A", "A"],
                                     "lib": [100, 100, 100, 100], "b1": [10, 10, 40, 40]})
    samples = write_samples(tmp_path, [("lib", "library", "", "r1", 1000), ("b1", "bin", 1, "r1", 40)])
    library = write_library(tmp_path, [("NT1", "NT", True), ("NT2", "NT", True), ("A_1", "A", False),
                                       ("A_2", "A", False)])
    return counts, samples, library


def load(counts, samples, library) -> CountsInput:
    table = read_count_table(counts)
    sheet = read_sample_sheet(samples, list(table.columns[2:]), counts)
    return CountsInput(check_library(table, read_library(library), counts, library), sheet)


# -- statistics with known answers -----------------------------------------------------------------------------------
def test_bh_known_answer():
    adj = bh(np.array([0.01, 0.04, 0.03, 0.2, np.nan]))
    np.testing.assert_allclose(adj[:4], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert np.isnan(adj[4])


def test_fit_dispersion_recovers_a_and_phi():
    e = np.array([10.0, 20.0, 40.0, 80.0])
    obs = e + np.sqrt(e * (2.0 + 0.1 * e))  # (O-E)^2 / E = 2 + 0.1 E exactly
    a, phi = fit_dispersion(obs, e)
    assert a == pytest.approx(2.0) and phi == pytest.approx(0.1)
    # under-dispersed data never goes below the Poisson floor
    a, phi = fit_dispersion(e + 0.1, e)
    assert a == 1.0 and phi == 0.0


def test_cell_equivalents_and_nt_expectation(small):
    inp = load(*small)
    res = call_counts(inp, draws=500, min_nt_cells=0)
    g = res.grnas.set_index("grna")
    # 40 cells cut; reads 10/10/40/40 of 100 -> 4, 4, 16, 16 cells; NT rate: 8 cells per 0.5 library share
    np.testing.assert_allclose(g.loc[["NT1", "NT2", "A_1", "A_2"], "cells_r1"], [4, 4, 16, 16])
    np.testing.assert_allclose(g["expected_r1"], [4, 4, 4, 4])
    np.testing.assert_allclose(g.loc["A_1", "effect"], np.log2(16.5 / 4.5))
    assert (g.loc[["A_1", "A_2"], "z"] > 0).all() and (g.loc[["NT1", "NT2"], "z"] == 0).all()


def test_leave_one_out_nt_null_scores_each_nt_grna_by_the_others_fit():
    """An NT gRNA with 3x the cells of the others: in sample it inflates the dispersion it is judged by; left out,
    it is judged by the rate and dispersion of the other seven, computed here by hand."""
    lib = np.array([100] * 8 + [100, 100])
    b1 = np.array([10, 12, 9, 11, 10, 8, 13, 30, 40, 10])
    names = [f"NT{i}" for i in range(8)] + ["A_1", "A_2"]
    table = pd.DataFrame({"sgRNA": names, "Gene": ["NT"] * 8 + ["A", "A"], "is_control": [True] * 8 + [False] * 2,
                          "lib": lib, "b1": b1})
    sheet = SampleSheet(pd.DataFrame({"sample": ["lib", "b1"], "kind": ["library", "bin"],
                                      "bin": pd.array([pd.NA, 1], dtype="Int64"), "replicate": ["r1", "r1"],
                                      "cells": [1000, int(b1.sum())]}))
    inp = CountsInput(table, sheet)
    g_in = call_counts(inp, draws=200, min_nt_cells=0, nt_null="in_sample").grnas.set_index("grna")
    g_out = call_counts(inp, draws=200, min_nt_cells=0, nt_null="leave_one_out").grnas.set_index("grna")
    # by hand, for NT7: cells = reads here (one cell per read: cells cut = total reads); library share f
    f = (lib + 0.5) / (lib.sum() + 0.5 * len(lib))
    others = np.arange(7)
    rate = b1[others].sum() / f[others].sum()
    rel = 1 / (lib + 0.5) + 1 / (f * 1000)
    a, phi = fit_dispersion(b1[others], f[others] * rate, (f[others] * rate) ** 2 * rel[others])
    e = f[7] * rate
    var = a * e + phi * e**2 + e**2 * (rel[7] + a / b1[others].sum())
    want = 2 * (np.sqrt(30) - np.sqrt(e)) / np.sqrt(var / e)
    assert g_out.loc["NT7", "z"] == pytest.approx(want)
    assert g_out.loc["NT7", "z"] > g_in.loc["NT7", "z"] + 1.0  # out of sample, the outlier is not explained away
    pd.testing.assert_series_equal(g_out.loc[["A_1", "A_2"], "z"], g_in.loc[["A_1", "A_2"], "z"])


def heavy_tailed_grnas(n_genes: int, n_nt: int, seed: int) -> pd.DataFrame:
    """gRNA z-scores of a screen without hits whose NT sample misses the jackpot tail: every gRNA draws from the
    same law with a heavy right tail (Pareto II, shape 3: bounded below, as a gRNA with no cell in the bins is), but
    the NT gRNAs' draws are cut at its 97th percentile, as a small NT sample that caught no jackpotted cell is."""
    rng = np.random.default_rng(seed)
    law = stats.lomax(c=3)
    nt = law.ppf(rng.uniform(0, 0.97, n_nt))
    tg = law.rvs(size=4 * n_genes, random_state=rng)
    return pd.DataFrame({"gene": ["NT"] * n_nt + [f"G{i}" for i in range(n_genes) for _ in range(4)],
                         "is_control": [True] * n_nt + [False] * 4 * n_genes, "z": np.concatenate([nt, tg]),
                         "effect": 0.0, "used": True})


def test_the_screen_null_mends_an_nt_sample_that_missed_the_tail():
    """With the NT pseudo-genes alone such a screen's null genes get too many small p-values and BH calls some;
    judged also against pseudo-genes of the screen's own gRNAs, they are uniform and nothing is called."""
    grnas = heavy_tailed_grnas(n_genes=2000, n_nt=400, seed=3)
    rng = np.random.default_rng
    nt, _ = gene_level(grnas, 2000, 0.1, rng(0), "nt")
    both, info = gene_level(grnas, 2000, 0.1, rng(0), "nt_and_screen")
    assert info["gene_null"] == "nt_and_screen"
    p_nt, p_both = (t.loc[~t["is_control"], "p_value"].to_numpy() for t in (nt, both))
    assert (p_both >= p_nt).all()  # the larger of the two p-values
    expected = 0.01 * len(p_nt)  # 20 below 0.01 under a uniform null; the 95 % Poisson interval tops at 29
    assert (p_nt < 0.01).sum() > 2 * expected and nt["is_hit"].any()
    assert (p_both < 0.01).sum() <= stats.poisson.ppf(0.975, expected) and not both["is_hit"].any()


def test_quiet_siblings_send_a_hits_grnas_away_and_keep_a_jackpot():
    """A gRNA leaves the screen's null when its gene's *other* gRNAs stand out: all four of a hit's gRNAs leave,
    the jackpotted gRNA of a null gene stays (its siblings are ordinary), and its siblings leave (it is one of
    theirs): whether a null gene's gRNA stays never depends on its own value."""
    z = np.array([3.0, 3.0, 3.0, 3.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    codes = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3])  # hit, null gene with a jackpot, null gene, one gRNA
    z_nt = np.random.default_rng(0).normal(size=400)
    quiet = quiet_siblings(z, codes, np.bincount(codes), z_nt, 2000, np.random.default_rng(1))
    assert quiet.tolist() == [False] * 4 + [True, False, False, False] + [True] * 4 + [True]


def test_a_looser_sibling_p_thins_the_screen_null_more():
    """``sibling_p`` (``hits.quiet_sibling_p``) is the bar a gene's other gRNAs must stay under for its gRNA to stay in
    the screen's null: a higher bar on the same p-values keeps a subset, and the gene level passes it on."""
    grnas = heavy_tailed_grnas(n_genes=500, n_nt=100, seed=5)
    tg = grnas[~grnas["is_control"]]
    codes = pd.factorize(tg["gene"])[0]
    z, z_nt = tg["z"].to_numpy(), grnas.loc[grnas["is_control"], "z"].to_numpy()
    stay = {a: quiet_siblings(z, codes, np.bincount(codes), z_nt, 2000, np.random.default_rng(0), a)
            for a in (0.05, 0.25)}
    assert (stay[0.25] <= stay[0.05]).all() and stay[0.25].sum() < stay[0.05].sum()
    left = {a: gene_level(grnas, 2000, 0.1, np.random.default_rng(0), "nt_and_quiet_screen", a)[1]
            for a in (0.05, 0.25)}
    assert left[0.25]["screen_null_left_out"] > left[0.05]["screen_null_left_out"]


def test_the_quiet_screen_null_keeps_the_power_that_hits_in_the_screen_cost():
    """A tenth of the genes are hits (every gRNA lifted): pseudo-genes drawn from every gRNA of the screen hold them
    and call none; drawn from the gRNAs whose siblings are quiet they call every hit, and the null genes' p-values
    stay uniform in the tail that the NT sample missed."""
    planted = [f"G{i}" for i in range(200)]
    grnas = heavy_tailed_grnas(n_genes=2000, n_nt=400, seed=2)
    grnas.loc[grnas["gene"].isin(planted), "z"] += 2.0
    calls, info = {}, {}
    for mode in ("nt", "nt_and_screen", "nt_and_quiet_screen"):
        table, info[mode] = gene_level(grnas, 2000, 0.1, np.random.default_rng(0), mode)
        calls[mode] = table[~table["is_control"]].set_index("gene")
    assert not calls["nt_and_screen"].loc[planted, "is_hit"].any()
    quiet = calls["nt_and_quiet_screen"]
    assert quiet.loc[planted, "is_hit"].all()
    assert info["nt_and_quiet_screen"]["screen_null_left_out"] >= 4 * len(planted)  # at least the hits' gRNAs
    assert (quiet["p_value"] >= calls["nt"]["p_value"]).all()
    null_p = quiet.drop(index=planted)["p_value"].to_numpy()
    expected = 0.01 * len(null_p)
    assert (calls["nt"].drop(index=planted)["p_value"] < 0.01).sum() > 2 * expected
    assert (null_p < 0.01).sum() <= stats.poisson.ppf(0.975, expected)


def test_the_quiet_screen_null_alone_is_not_conservative_where_a_small_nt_sample_is():
    """A screen without hits whose 60 NT gRNAs are drawn from the same law as every gRNA: their sample decides the
    NT pseudo-genes' critical value, and where it happens to lie light, the larger-of (the default) follows it and is
    conservative beyond noise; the quiet screen null alone (``quiet_screen``) rests on every quiet gRNA and stays
    uniform. Its p-value is never above the default's (the same screen null, no larger-of), and where the NT sample
    lies heavy the two put the same genes below 0.05 (FINDINGS, "The screen null alone")."""
    p = {}
    for seed in (1, 2):  # the NT sample lies heavy / light
        rng = np.random.default_rng(seed)
        z = np.concatenate([rng.normal(size=60), rng.normal(size=4000)])
        grnas = pd.DataFrame({"gene": ["NT"] * 60 + [f"G{i}" for i in range(1000) for _ in range(4)],
                              "is_control": [True] * 60 + [False] * 4000, "z": z, "effect": 0.0, "used": True})
        for mode in ("nt_and_quiet_screen", "quiet_screen", "nt"):
            table, info = gene_level(grnas, 2000, 0.1, np.random.default_rng(0), mode)
            p[seed, mode] = table.loc[~table["is_control"], "p_value"].to_numpy()
            if mode == "quiet_screen":  # its null: the NT gRNAs and every targeting gRNA not left out
                assert info["gene_null"] == mode and info["screen_null_grnas"] + info["screen_null_left_out"] == 4060
        assert (p[seed, "quiet_screen"] <= p[seed, "nt_and_quiet_screen"]).all()
    low, high = stats.poisson.ppf([0.025, 0.975], 0.05 * 1000)  # 50 of 1,000 below 0.05 under a uniform null
    heavy, light = ((p[s, "nt"] < 0.05).sum() for s in (1, 2))
    assert heavy > high and light < low  # the NT sample alone: too many, then too few
    assert np.array_equal(p[1, "quiet_screen"] < 0.05, p[1, "nt_and_quiet_screen"] < 0.05)
    assert (p[2, "nt_and_quiet_screen"] < 0.05).sum() < low
    for seed in (1, 2):
        assert low <= (p[seed, "quiet_screen"] < 0.05).sum() <= high


def test_the_default_null_is_the_quiet_screen_at_every_library_size():
    """A focused library (250 genes, 100 NT gRNAs) whose NT sample missed the tail: the default judges genes against
    the quiet screen null too, as at genome scale, and its null genes stay uniform where the NT null's do not. The
    1,000-gene switch of ``auto`` is gone (FINDINGS, "Between 60 and 20,000 genes"); naming it is refused."""
    grnas = heavy_tailed_grnas(n_genes=250, n_nt=100, seed=4)
    default, info = gene_level(grnas, 2000, 0.1, np.random.default_rng(0))
    nt, _ = gene_level(grnas, 2000, 0.1, np.random.default_rng(0), "nt")
    assert info["gene_null"] == HitsConfig().gene_null == "nt_and_quiet_screen"
    p_default, p_nt = (t.loc[~t["is_control"], "p_value"].to_numpy() for t in (default, nt))
    expected = 0.05 * len(p_nt)  # 12.5 of 250 below 0.05 under a uniform null
    assert (p_nt < 0.05).sum() > stats.poisson.ppf(0.975, expected)
    assert (p_default < 0.05).sum() <= stats.poisson.ppf(0.975, expected) and not default["is_hit"].any()
    with pytest.raises(ValueError, match="gene_null must be one of"):
        call_counts(simulated_screen(0), gene_null="auto")
    with pytest.raises(ValidationError, match="nt_and_quiet_screen"):
        HitsConfig(gene_null="auto")


def test_calls_do_not_depend_on_the_count_tables_row_order():
    """The NT null's draws pick gRNAs by position: a table sorted by sgRNA (as `mageck count` writes it) and the same
    table in another order once gave p-values 0.016 apart. Every method now sees the rows in sgRNA order."""
    rng = np.random.default_rng(0)
    names = [f"G{g:02d}_{k}" for g in range(30) for k in range(4)] + [f"NT_{k:02d}" for k in range(20)]
    genes = [n.split("_")[0] if not n.startswith("NT") else "NT" for n in names]
    share = rng.gamma(4.0, 1.0, len(names)) * np.where(np.isin(genes, ["G00", "G01"]), 5.0, 1.0)
    table = pd.DataFrame({"sgRNA": names, "Gene": genes, "is_control": [g == "NT" for g in genes],
                          "lib": rng.poisson(rng.gamma(4.0, 1.0, len(names)) * 200),
                          "b1": rng.poisson(share / share.sum() * 8000)})
    sheet = SampleSheet(pd.DataFrame({"sample": ["lib", "b1"], "kind": ["library", "bin"], "bin": pd.array([pd.NA, 1], dtype="Int64"),
                                      "replicate": ["r1", "r1"], "cells": [100_000, 2000]}))
    shuffled = table.sample(frac=1.0, random_state=1)
    for call in (lambda i: call_counts(i, draws=500), lambda i: call_rra(i, draws=500), call_sparcs):
        a, b = call(CountsInput(table, sheet)).genes, call(CountsInput(shuffled, sheet)).genes
        pd.testing.assert_frame_equal(a, b)


def test_stouffer_by_group_known():
    z, n = _stouffer_by_group(np.array([0, 0, 1]), np.array([3.0, 3.0, -1.0]), 2)
    np.testing.assert_allclose(z, [6 / np.sqrt(2), -1.0])
    np.testing.assert_allclose(n, [2, 1])


def test_sparcs_statistic_is_the_paired_t_test(small, tmp_path):
    counts = write_counts(tmp_path, {"sgRNA": ["NT1", "A_1", "A_2", "A_3", "B_1", "B_2"],
                                     "Gene": ["NT", "A", "A", "A", "B", "B"],
                                     "lib": [100, 100, 200, 50, 100, 100], "b1": [10, 30, 40, 25, 0, 5]}, "c2.tsv")
    samples = write_samples(tmp_path, [("lib", "library", "", "r1", 1000), ("b1", "bin", 1, "r1", 40)], "s2.csv")
    library = write_library(tmp_path, [("NT1", "NT", True), ("A_1", "A", False), ("A_2", "A", False),
                                       ("A_3", "A", False), ("B_1", "B", False), ("B_2", "B", False)], "l2.csv")
    res = call_sparcs(load(counts, samples, library))
    b = np.array([30, 40, 25]) / 110 * 1e6
    lib = np.array([100, 200, 50]) / 650 * 1e6
    expected = stats.ttest_rel(np.log2(b), np.log2(lib), alternative="greater")
    genes = res.genes.set_index("gene")
    assert genes.loc["A", "p_value"] == pytest.approx(expected.pvalue)
    assert genes.loc["A", "effect"] == pytest.approx(np.mean(np.log2(b) - np.log2(lib)))
    assert np.isnan(genes.loc["B", "p_value"])  # only one gRNA seen in the bins: no test (published rule)


def test_cells_threshold_and_soft_rates():
    cells = pd.DataFrame({"grna": ["NT1", "NT1", "NT2", "NT2"] + ["A_1"] * 4, "gene": ["NT"] * 4 + ["A"] * 4,
                          "is_control": [True] * 4 + [False] * 4,
                          "p": [0.1, 0.2, 0.6, 0.1, 0.9, 0.55, 0.99, 0.4],
                          "epistemic": [0, 0, 0, 0, 0, 0.5, 0, 0]})
    thr = call_cells(CellsInput(cells), "threshold", draws=200).grnas.set_index("grna")
    assert thr.loc["A_1", "rate"] == pytest.approx(0.75) and thr.loc["NT2", "rate"] == pytest.approx(0.5)
    soft = call_cells(CellsInput(cells), "soft", draws=200).grnas.set_index("grna")
    assert soft.loc["NT1", "rate"] == pytest.approx(0.15)
    floor = np.mean([0.09, 0.16, 0.24, 0.09])
    w = floor / (floor + 2 * 0.55 * 0.45 * 0.5)  # the uncertain P = 0.55 cell counts less
    p = np.array([0.9, 0.55, 0.99, 0.4])
    ww = np.array([1, w, 1, 1])
    assert soft.loc["A_1", "rate"] == pytest.approx(np.sum(ww * p) / ww.sum())


def test_truth_metrics_known():
    genes = pd.DataFrame({"gene": ["H1", "H2", "N1", "X"], "is_hit": [True, False, True, True],
                          "is_control": [False] * 4})
    truth = pd.DataFrame({"gene": ["H1", "H2", "N1", "X"], "role": ["hit", "hit", "neutral", "novel"],
                          "effect": [1.0, 0.3, 0.0, 0.0]})
    m = truth_metrics(genes, truth)
    assert m["recall_effect_ge_0.5"] == 1.0 and m["recall_effect_lt_0.5"] == 0.0
    assert m["fdp"] == pytest.approx(1 / 3) and m["novel_called"] == 1


# -- null calibration on small simulated nulls ----------------------------------------------------------------------
def simulated_screen(seed: int, hits: tuple[int, ...] = (), boost: float = 3.0, n_genes: int = 150,
                     n_nt: int = 200, cells: int = 100_000) -> CountsInput:
    """Cells fall in the tail (3 bins) with probability 3 %, ``boost`` x that for the gRNAs of ``hits`` genes;
    then the simulated cutting / PCR / sequencing of ``sequence_replicate``, two independent replicates."""
    rng = np.random.default_rng(seed)
    grna = np.array([f"NT{i}" for i in range(n_nt)] + [f"G{g}_{k}" for g in range(n_genes) for k in range(4)])
    gene = ["NT"] * n_nt + [f"G{g}" for g in range(n_genes) for _ in range(4)]
    w = rng.lognormal(0, 0.5, len(grna))
    prob = np.full(len(grna), 0.03)
    for h in hits:
        prob[n_nt + 4 * h:n_nt + 4 * h + 4] *= boost
    table = pd.DataFrame({"sgRNA": grna, "Gene": gene, "is_control": [g == "NT" for g in gene]})
    rows = []
    for r in (1, 2):
        g = rng.choice(len(grna), cells, p=w / w.sum())
        bins = np.where(rng.random(cells) < prob[g], rng.integers(1, 4, cells), 0)
        counts, sr = sequence_replicate(pd.DataFrame({"grna": grna[g], "bin": bins}), grna, SequenceConfig(), r,
                                        np.random.default_rng([seed, r]))
        for k, v in counts.items():
            table[k] = v
        rows += sr
    sheet = pd.DataFrame(rows).assign(bin=lambda d: pd.to_numeric(d["bin"]).astype("Int64"))
    return CountsInput(table, SampleSheet(sheet))


def null_screens(call) -> tuple[list[int], np.ndarray]:
    """``call`` on 5 simulated screens without hits: targeting genes called per screen, and their p-values."""
    called, p_values = [], []
    for seed in range(5):
        res = call(simulated_screen(seed), draws=1000, seed=seed)
        tg = res.genes[~res.genes["is_control"]]
        called.append(int(tg["is_hit"].sum()))
        p_values.append(tg["p_value"].to_numpy())
    return called, np.concatenate(p_values)


def test_counts_null_is_calibrated_and_finds_a_planted_gene():
    called, p = null_screens(call_counts)
    # BH at 0.1 on a screen without hits calls a gene at most 10 % of the time: the target is >= 9 of 10 screens
    assert sum(c > 0 for c in called) <= 1 and sum(called) <= 2, called
    # p-values of one screen share its NT sample; over screens they are uniform
    assert stats.kstest(p, "uniform").pvalue > 0.05
    res = call_counts(simulated_screen(7, hits=(5,), boost=5.0), draws=1000)
    assert res.genes.iloc[0]["gene"] == "G5" and res.genes.iloc[0]["is_hit"]
    assert res.genes["is_hit"].sum() == 1


def test_rra_rho_known_answers():
    # one gRNA: P(U <= u) = u, when it is inside the top alpha; 1 otherwise
    assert rra_rho(np.array([[0.1]]), 0.25)[0] == pytest.approx(0.1)
    assert rra_rho(np.array([[0.3]]), 0.25)[0] == 1.0
    # two gRNAs at 0.1 and 0.5: only the first is in the top 25 %: P(min of 2 uniforms <= 0.1) = 1 - 0.9^2
    assert rra_rho(np.array([[0.5, 0.1]]), 0.25)[0] == pytest.approx(0.19)
    # with alpha = 1 the second counts too: P(max of 2 <= 0.35) = 0.1225 beats P(min <= 0.3) = 0.51
    assert rra_rho(np.array([[0.3, 0.35]]), 1.0)[0] == pytest.approx(0.1225)


def test_rra_null_is_calibrated_and_finds_a_planted_gene():
    called, p = null_screens(call_rra)
    assert sum(c > 0 for c in called) <= 1 and sum(called) <= 2, called
    # calibrated where calls are made; a gene with no gRNA in the top alpha = 25 % has rho = 1, so p = 1 carries
    # P(none of 4 in the top quarter) = 0.75^4 of the genes (RRA's p-values are uniform only below that mass)
    for t in (0.01, 0.05, 0.1, 0.25, 0.5):
        assert abs((p <= t).mean() - t) <= 3 * np.sqrt(t * (1 - t) / len(p)), t
    assert (p == 1).mean() == pytest.approx(0.75**4, abs=3 * np.sqrt(0.32 * 0.68 / len(p)))
    res = call_rra(simulated_screen(7, hits=(5,), boost=5.0), draws=1000)
    assert res.genes.iloc[0]["gene"] == "G5" and res.genes.iloc[0]["is_hit"]
    assert res.genes["is_hit"].sum() == 1
    assert res.genes["is_control"].sum() == 50  # 200 NT gRNAs -> 50 pseudo-genes of 4, scored and reported


def test_cells_null_is_calibrated_and_soft_finds_a_planted_gene():
    rng = np.random.default_rng(0)
    n_nt, n_genes, per = 40, 60, 100
    grna = [f"NT{i}" for i in range(n_nt)] + [f"G{g}_{k}" for g in range(n_genes) for k in range(4)]
    gene = ["NT"] * n_nt + [f"G{g}" for g in range(n_genes) for _ in range(4)]
    rows = []
    for r, g in zip(grna, gene, strict=True):
        phen = rng.random(per) < (0.5 if g == "G3" else 0.05)  # G3: half of its cells show the phenotype
        p = np.where(phen, rng.beta(8, 2, per), rng.beta(2, 8, per))
        rows.append(pd.DataFrame({"grna": r, "gene": g, "is_control": g == "NT", "p": p,
                                  "epistemic": rng.uniform(0, 0.1, per)}))
    cells = CellsInput(pd.concat(rows, ignore_index=True))
    for mode in ("soft", "threshold"):
        res = call_cells(cells, mode, draws=1000)
        tg = res.genes[~res.genes["is_control"]]
        assert tg["is_hit"].sum() == 1 and tg.iloc[0]["gene"] == "G3", mode
        assert stats.kstest(tg["p_value"].iloc[1:], "uniform").pvalue > 0.01, mode


def test_cells_mode_follows_gene_null():
    """Cells mode judges genes as counts mode does: by default also against the quiet screen null (drawn from the NT
    and most targeting gRNAs), so no p-value is smaller than the NT pseudo-genes' alone (the same bootstrap: the same
    seed)."""
    rng = np.random.default_rng(1)
    n_nt, n_genes, per = 100, 1000, 5
    grna = np.repeat([f"NT{i}" for i in range(n_nt)] + [f"G{g}_{k}" for g in range(n_genes) for k in range(4)], per)
    gene = np.repeat(["NT"] * n_nt + [f"G{g}" for g in range(n_genes) for _ in range(4)], per)
    cells = CellsInput(pd.DataFrame({"grna": grna, "gene": gene, "is_control": gene == "NT",
                                     "p": rng.beta(1, 20, len(grna)), "epistemic": 0.01}))
    auto, nt = call_cells(cells, "soft", draws=200), call_cells(cells, "soft", draws=200, gene_null="nt")
    assert (auto.summary["gene_null"], nt.summary["gene_null"]) == ("nt_and_quiet_screen", "nt")
    assert auto.summary["screen_null_grnas"] > n_nt + 3 * n_genes and "screen_null_grnas" not in nt.summary
    p_auto, p_nt = (r.genes.set_index("gene").loc[[f"G{g}" for g in range(n_genes)], "p_value"] for r in (auto, nt))
    assert (p_auto >= p_nt).all()
    with pytest.raises(ValueError, match="gene_null must be one of"):
        call_cells(cells, "soft", draws=200, gene_null="screen")


# -- parsers ---------------------------------------------------------------------------------------------------------
def test_parsers_read_mageck_tables(small, tmp_path):
    counts, samples, library = small
    table = read_count_table(counts)
    assert list(table.columns) == ["sgRNA", "Gene", "lib", "b1"] and table["b1"].dtype == np.int64
    # the sheet is put in count-table column order, whatever its own order
    shuffled = write_samples(tmp_path, [("b1", "bin", 1, "r1", 40), ("lib", "library", "", "r1", 1000)], "s.csv")
    sheet = read_sample_sheet(shuffled, ["lib", "b1"], counts)
    assert sheet.table["sample"].tolist() == ["lib", "b1"] and sheet.table["bin"].isna().tolist() == [True, False]
    lib = read_library(library)
    assert lib["is_control"].tolist() == [True, True, False, False]


# -- bins ------------------------------------------------------------------------------------------------------------
def test_threshold_and_quantile_bins():
    score = np.array([0.999995, 0.9995, 0.998, 0.996, 0.992, 0.985, 0.5, 0.99999])
    b, ranges = assign(score, np.ones(8, bool), BinsConfig(mode="thresholds"))
    assert b.tolist() == [1, 2, 3, 4, 5, 6, 0, 1] and ranges[0] == (0.99999, 1.0)
    eligible = np.array([True] * 7 + [False])
    b, _ = assign(score, eligible, BinsConfig(mode="quantiles", quantiles=[0.15, 0.5]))
    assert b.tolist() == [1, 2, 2, 2, 0, 0, 0, 0]  # top round(1.05) = 1 of 7 eligible, then up to round(3.5) = 4


def test_make_bins_outputs(tmp_path):
    scores = pd.DataFrame({"source_file": ["/s/a.h5sc"] * 3 + ["/s/b.h5sc"] * 2, "cell_id": [5, 9, 11, 2, 3],
                           "prob_on": [0.0, 0.5, 0.01, 0.0, 0.0], "prob_off": [1.0, 0.5, 0.99, 1.0, 1.0],
                           "novelty": [1.0, 1.0, 1.0, 50.0, 1.0], "epistemic": [0.0] * 5})
    scores.to_parquet(tmp_path / "scores.parquet")
    res = make_bins(tmp_path / "scores.parquet", BinsConfig(class_name="off", mode="thresholds", max_novelty=10, manifest=None))
    assert res["bins"]["bin"].tolist() == [1, 0, 5, 0, 1] and res["bins"]["excluded"].tolist() == [0, 0, 0, 1, 0]
    counts = res["counts"].set_index("bin")
    assert counts.loc[1, "cells"] == 2 and counts.loc[1, "expected_phenotype_cells"] == pytest.approx(2.0)
    assert counts.loc[0, "excluded_cells"] == 1
    sets = {s["name"]: s for s in res["cell_sets"]}
    assert sets["bin1_a"]["classes"] == [5] and sets["bin1_b"]["classes"] == [3] and sets["bin5_a"]["classes"] == [11]


# -- the CLI: wiring and bad input -----------------------------------------------------------------------------------
def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["spatial", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("method", "rule"), [("sparcs", "(sparcs, p < 0.05, not corrected, as published)"),
                                              ("spatial", "(spatial, FDR 0.2)")])
def test_hits_cli_names_the_calling_rule_it_used(method, rule, small, tmp_path, monkeypatch, capsys):
    """SPARCS' published rule is an uncorrected p-value cut: the summary line must not call it an FDR."""
    counts, samples, library = small
    monkeypatch.setattr(sys, "argv", ["spatial", "hits", "--counts", str(counts), "--samples", str(samples),
                                      "--library", str(library), "--out", str(tmp_path / "h"), "--method", method,
                                      "--fdr", "0.2", "--set", "hits.null_draws=200"])
    main()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {tmp_path / 'h'}: ") and line.endswith(f"genes called {rule}"), line
    # this small screen gives SPARCS' t-test no p-value at all; the rank plot says so instead of failing the command
    genes = pd.read_csv(tmp_path / "h" / "genes.csv")
    assert genes["p_value"].isna().all() == (method == "sparcs") and (tmp_path / "h" / "rank.png").is_file()


def test_hits_cli_writes_every_output(small, tmp_path, monkeypatch, capsys):
    counts, samples, library = small
    out = tmp_path / "hits"
    code, err = run_cli(monkeypatch, capsys, "hits", "--counts", counts, "--samples", samples, "--library", library,
                        "--out", out, "--metrics", tmp_path / "m.json", "--set", "hits.null_draws=200")
    assert code == 0, err
    for name in ("genes.csv", "grnas.csv", "volcano.png", "rank.png", "qq.png", "summary.json", "compare.csv",
                 "genes_sparcs.csv"):
        assert (out / name).is_file(), name
    genes = pd.read_csv(out / "genes.csv")
    assert {"gene", "n_grnas", "effect", "p_value", "fdr", "rank", "is_hit"} <= set(genes.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"spatial", "sparcs", "rra"} and (out / "genes_rra.csv").is_file()
    # 8 NT cells in the bins (< hits.min_nt_cells = 20): the null cannot be estimated, so nothing is called
    assert "cannot be estimated" in summary["methods"]["spatial"]["warning"] and not genes["is_hit"].any()
    assert "spatial/n_called" in json.loads((tmp_path / "m.json").read_text())


BAD_CASES = {
    "sheet does not match": ({"samples": [("lib", "library", "", "r1", 1000), ("b9", "bin", 1, "r1", 40)]},
                             "does not match the count table"),
    "non-integer count": ({"counts": {"b1": [10, 1.5, 40, 40]}}, "non-integer count"),
    "negative count": ({"counts": {"b1": [10, -3, 40, 40]}}, "negative count"),
    "no NT control": ({"library": [("NT1", "NT", False), ("NT2", "NT", False), ("A_1", "A", False),
                                   ("A_2", "A", False)]}, "no non-targeting control"),
    "gRNA missing from library": ({"library": [("NT1", "NT", True), ("NT2", "NT", True), ("A_1", "A", False)]},
                                  "missing from"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_hits_bad_input_exits_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    change, message = BAD_CASES[case]
    rows = {"sgRNA": ["NT1", "NT2", "A_1", "A_2"], "Gene": ["NT", "NT", "A", "A"], "lib": [100, 100, 100, 100],
            "b1": [10, 10, 40, 40], **change.get("counts", {})}
    counts = write_counts(tmp_path, rows)
    samples = write_samples(tmp_path, change.get("samples", [("lib", "library", "", "r1", 1000),
                                                             ("b1", "bin", 1, "r1", 40)]))
    library = write_library(tmp_path, change.get("library", [("NT1", "NT", True), ("NT2", "NT", True),
                                                             ("A_1", "A", False), ("A_2", "A", False)]))
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "hits", "--counts", counts, "--samples", samples, "--library", library,
                        "--out", out, "--metrics", tmp_path / "m.json")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert not list(tmp_path.glob(".out*"))


def test_unknown_class_exits_2(tmp_path, monkeypatch, capsys):
    pd.DataFrame({"source_file": ["a"], "cell_id": [1], "prob_on": [0.3], "prob_off": [0.7]}).to_parquet(
        tmp_path / "s.parquet")
    pd.DataFrame({"source_file": ["a"], "cell_id": [1], "grna": ["NT1"]}).to_csv(tmp_path / "g.csv", index=False)
    library = write_library(tmp_path, [("NT1", "NT", True)])
    for args in (["bins", tmp_path / "s.parquet", "--class", "mitotic", "--out", tmp_path / "out"],
                 ["hits", "--cells", tmp_path / "s.parquet", "--genotypes", tmp_path / "g.csv", "--library", library,
                  "--class", "mitotic", "--out", tmp_path / "out"]):
        code, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and "no class 'mitotic'" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


GENOTYPE_CASES = {
    "unknown gRNA": ([("a", 1, "Z_9")], "1 cell(s) carry gRNA(s) missing from"),
    "cell id not an integer": ([("a", "c1", "NT1")], "cell_id must be an integer, got 'c1'"),
    "fractional cell id": ([("a", 1.5, "NT1")], "cell_id must be an integer, got '1.5'"),
    "a cell twice": ([("a", 1, "NT1"), ("./a", 1, "NT1")], "is listed twice"),
    "no cell in the scores": ([("b", 1, "NT1")], "no genotyped cell is in"),
}


@pytest.mark.parametrize("case", list(GENOTYPE_CASES))
def test_cells_genotypes_bad_input_exit_2(case, tmp_path, monkeypatch, capsys):
    rows, message = GENOTYPE_CASES[case]
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"source_file": ["a"], "cell_id": [1], "prob_off": [0.7]}).to_parquet(tmp_path / "s.parquet")
    pd.DataFrame(rows, columns=["source_file", "cell_id", "grna"]).to_csv(tmp_path / "g.csv", index=False)
    library = write_library(tmp_path, [("NT1", "NT", True)])
    code, err = run_cli(monkeypatch, capsys, "hits", "--cells", tmp_path / "s.parquet", "--genotypes",
                        tmp_path / "g.csv", "--library", library, "--class", "off", "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_read_genotypes_leaves_out_cells_without_a_barcode_and_joins_the_library(tmp_path):
    library = read_library(write_library(tmp_path, [("NT1", "NT", True), ("A_1", "A", False)]))
    (tmp_path / "g.csv").write_text("source_file,cell_id,grna\nx.h5,3,A_1\nx.h5,4,\ny.h5,3,NT1\n")
    g = read_genotypes(tmp_path / "g.csv", library, "library.csv")
    assert g["cell_id"].tolist() == [3, 3] and g["gene"].tolist() == ["A", "NT"]
    assert g["is_control"].tolist() == [False, True] and g["source_file"].tolist() == [
        os.path.abspath("x.h5"), os.path.abspath("y.h5")]


def test_read_library_refuses_an_unknown_control_word(tmp_path):
    with pytest.raises(DataError, match="is_control must be true/false, got 'maybe'"):
        read_library(write_library(tmp_path, [("X", "X", "maybe")], "bad.csv"))
    with pytest.raises(DataError, match=r"blank\.csv: row 3 has an empty grna or gene"):
        read_library(write_library(tmp_path, [("NT1", "NT", True), ("A_1", " ", False)], "blank.csv"))
