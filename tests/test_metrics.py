"""Evaluation metrics and plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import training.evaluation.plots as plots
from training.evaluation.metrics import (
    calibration_report,
    classification_report,
    ece_if_calibrated,
    ece_null_draws,
    ood_report,
    reference_agreement,
    reliability_bins,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _onehot_probs(pred: list[int], k: int, conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def _sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((u > probs.cumsum(axis=1)).sum(axis=1), probs.shape[1] - 1)


# -- classification ------------------------------------------------------------------------------------
def test_classification_report_matches_hand_computation():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = [0, 1, 1, 1, 2, 0, 2]
    r = classification_report(_onehot_probs(pred, 3), y, ["stim", "unstim", "atg5"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert r["precision/stim"] == pytest.approx(1 / 2) and r["recall/stim"] == pytest.approx(1 / 2)
    assert r["precision/unstim"] == pytest.approx(2 / 3) and r["recall/unstim"] == pytest.approx(1.0)
    assert r["precision/atg5"] == pytest.approx(1.0) and r["recall/atg5"] == pytest.approx(2 / 3)
    assert r["f1/unstim"] == pytest.approx(0.8)
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert r["support/atg5"] == 3 and r["n"] == 7


def test_classification_report_validates_and_handles_empty():
    with pytest.raises(ValueError, match="class_names"):
        classification_report(np.ones((2, 3)) / 3, np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        classification_report(np.ones((2, 2)) / 2, np.array([0, 2]), ["a", "b"])
    r = classification_report(np.zeros((0, 2)), np.zeros(0, dtype=int), ["a", "b"])
    assert np.isnan(r["accuracy"]) and r["confusion_matrix"] == [[0, 0], [0, 0]]


# -- calibration ---------------------------------------------------------------------------------------
def test_brier_nll_ece_known_values():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    y = np.array([0, 2])
    r = calibration_report(p, y)
    assert r["nll"] == pytest.approx((-np.log(0.7) - np.log(0.1)) / 2)
    assert r["brier"] == pytest.approx((0.14 + 1.46) / 2)
    # one correct at confidence 0.7, one wrong at 0.8, in different bins
    assert r["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.8)
    assert r["mce"] == pytest.approx(0.8)


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(20000, 4))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = _sample_labels(rng, p)
    assert calibration_report(p, y)["ece"] < 0.02
    sharp = np.exp(4 * z) / np.exp(4 * z).sum(axis=1, keepdims=True)
    bad = calibration_report(sharp, y)
    assert bad["ece"] > 0.1 and bad["nll"] > calibration_report(p, y)["nll"]


def test_reliability_bins_table():
    p = np.array([[0.95, 0.05], [0.55, 0.45], [0.52, 0.48]])
    b = reliability_bins(p, np.array([0, 1, 0]), n_bins=10)
    assert list(b.columns) == ["bin", "lower", "upper", "confidence", "accuracy", "count"]
    assert len(b) == 10 and b["count"].sum() == 3
    row = b[b["bin"] == 5].iloc[0]  # (0.5, 0.6]
    assert row["count"] == 2 and row["accuracy"] == pytest.approx(0.5)
    assert row["confidence"] == pytest.approx(0.535)
    assert b.loc[b["count"] == 0, "accuracy"].isna().all()


# -- OOD -----------------------------------------------------------------------------------------------
def test_ood_auroc_separated_and_identical():
    r = ood_report(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.9]))
    assert r["auroc"] == 1.0 and r["aupr"] == 1.0 and r["fpr95"] == 0.0
    rng = np.random.default_rng(0)
    r = ood_report(rng.normal(size=3000), rng.normal(size=3000))
    assert abs(r["auroc"] - 0.5) < 0.03
    assert 0.9 < r["fpr95"] < 0.99


def test_fpr95_hand_example():
    out = np.arange(1, 21, dtype=float)  # flagging >= 95 % of these needs threshold 2
    ind = np.array([0, 1, 1.5, 2.5, 5, 30, 0.2, 0.3, 0.4, 0.6])  # 3 of 10 are >= 2
    assert ood_report(ind, out)["fpr95"] == pytest.approx(0.3)


def test_ood_degenerate_inputs():
    r = ood_report(np.array([]), np.array([1.0]))
    assert np.isnan(r["auroc"]) and np.isnan(r["fpr95"]) and r["n_out"] == 1
    with pytest.raises(ValueError, match="score_out"):
        ood_report(np.array([1.0]), np.array([np.nan]))


# -- reference agreement -------------------------------------------------------------------------------
def test_reference_agreement():
    ref = np.array([0.1, 0.4, 0.6, 0.9, 0.95, np.nan])
    same = reference_agreement(ref, ref)
    assert same["pearson"] == pytest.approx(1.0) and same["cohen_kappa"] == pytest.approx(1.0)
    assert same["agreement"] == 1.0 and same["n"] == 5 and same["n_dropped"] == 1
    flipped = reference_agreement(1 - ref, ref)
    assert flipped["spearman"] == pytest.approx(-1.0)
    assert flipped["agreement"] == pytest.approx(0.0) and flipped["cohen_kappa"] < 0
    const = reference_agreement(np.ones(4), np.array([0.1, 0.2, 0.3, 0.9]))
    assert np.isnan(const["pearson"]) and const["agreement"] == pytest.approx(0.25)


# -- plots ---------------------------------------------------------------------------------------------
def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    names = ["stim", "unstim", "atg5"]
    plots.plot_confusion(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]]), names, tmp_path / "cm.png")
    z = rng.normal(0, 2, size=(500, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = _sample_labels(rng, p)
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)
    plots.plot_reliability(reliability_bins(sharp, y), reliability_bins(p, y), tmp_path / "rel.png")
    plots.plot_reliability(reliability_bins(sharp, y), None, tmp_path / "rel1.png")
    feats = rng.normal(size=(6000, 16))
    plots.plot_embedding(feats, np.array(names)[rng.integers(0, 3, 6000)], tmp_path / "sub" / "emb.png")
    plots.plot_uncertainty_hist(
        {"seen": rng.gamma(1, 0.05, 300), "unseen": rng.gamma(3, 0.1, 100), "empty": np.array([])},
        tmp_path / "hist.png",
        xlabel="epistemic (nats)",
    )
    for f in ("cm", "rel", "rel1", "sub/emb", "hist"):
        assert _is_png(tmp_path / f"{f}.png"), f
    assert not [p for p in tmp_path.rglob(".*")]  # no temp files left behind


def test_plot_errors_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="cm must be"):
        plots.plot_confusion(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


def test_embedding_small_inputs(tmp_path):
    plots.plot_embedding(np.ones((1, 1)), ["a"], tmp_path / "one.png")
    plots.plot_embedding(np.random.default_rng(0).normal(size=(10, 1)), ["a"] * 5 + ["b"] * 5, tmp_path / "d1.png")
    emb = plots.embed_2d(np.random.default_rng(0).normal(size=(10, 1)))
    assert emb.shape == (10, 2) and np.all(emb[:, 1] == 0)
    assert _is_png(tmp_path / "one.png") and _is_png(tmp_path / "d1.png")


def test_paired_bootstrap_difference_and_interval():
    from training.evaluation.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    noisy = rng.dirichlet([1, 1, 1], 600)
    sharp = 0.2 * noisy
    sharp[np.arange(600), y] += 0.8  # right, and confident, on every cell
    res = paired_bootstrap(sharp, [noisy, noisy], y, n_bins=15, n_boot=300, seed=1)
    for metric in ("nll", "ece"):  # the point estimate is the plain difference of the two reports
        expected = calibration_report(sharp, y, 15)[metric] - calibration_report(noisy, y, 15)[metric]
        assert res[f"{metric}_diff"] == pytest.approx(expected)
        assert res[f"{metric}_diff_ci_low"] <= res[f"{metric}_diff"] <= res[f"{metric}_diff_ci_high"] < 0
    same = paired_bootstrap(noisy, [noisy], y, n_boot=100)
    assert all(v == pytest.approx(0.0) for v in same.values())
    assert paired_bootstrap(sharp, [noisy], y, n_boot=50, seed=3) == paired_bootstrap(sharp, [noisy], y, n_boot=50,
                                                                                       seed=3)
    with pytest.raises(ValueError):
        paired_bootstrap(sharp, [], y)


def test_ece_if_calibrated_matches_the_binomial_noise():
    # 400 cells all at confidence 0.5 (one bin): ECE = |accuracy - 0.5|, accuracy ~ Binomial(400, 0.5) / 400, so
    # its median is 0.6745 * 0.025 (half-normal) and the 95th percentile 1.96 * 0.025.
    probs = np.full((400, 2), 0.5)
    out = ece_if_calibrated(probs, n_bins=15, draws=20000, seed=1)
    assert out["ece_if_calibrated_median"] == pytest.approx(0.6745 * 0.025, rel=0.15)
    assert out["ece_if_calibrated_q95"] == pytest.approx(1.96 * 0.025, rel=0.1)
    # four times the cells halve the noise; certain predictions have none
    more = ece_if_calibrated(np.full((1600, 2), 0.5), draws=20000, seed=1)
    assert more["ece_if_calibrated_median"] == pytest.approx(out["ece_if_calibrated_median"] / 2, rel=0.15)
    assert ece_if_calibrated(np.eye(2)[np.arange(50) % 2])["ece_if_calibrated_q95"] == 0.0
    assert ece_if_calibrated(probs, draws=500, seed=3) == ece_if_calibrated(probs, draws=500, seed=3)
    with pytest.raises(ValueError, match="finite"):
        ece_if_calibrated(np.array([[np.nan, 1.0]]))


def test_ece_if_calibrated_tells_noise_from_miscalibration():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.3, 0.3, 0.3], size=800)
    q95 = ece_if_calibrated(probs, seed=0)["ece_if_calibrated_q95"]
    # labels drawn from the probabilities: calibrated, so the observed ECE stays under the 95th percentile ~95 % of
    # the time; the same labels scored by an over-confident model (probabilities sharpened) exceed it
    below, over = [], []
    for _ in range(200):
        y = _sample_labels(rng, probs)
        below.append(calibration_report(probs, y)["ece"] <= q95)
        sharp = probs**3 / (probs**3).sum(axis=1, keepdims=True)
        over.append(calibration_report(sharp, y)["ece"] > ece_if_calibrated(sharp, draws=200)["ece_if_calibrated_q95"])
    assert 0.9 <= np.mean(below) <= 0.99
    assert np.mean(over) == 1.0


def test_ece_calibration_p_is_the_share_of_perfect_draws_at_or_above_the_observed_ece():
    # one bin at confidence 0.5: the null ECEs are |Binomial(400, 0.5) / 400 - 0.5|, so the p-value of an observed
    # ECE e is P(|acc - 0.5| >= e), about 2 * (1 - Phi(e / 0.025)) (1.96 sd: 0.05; 0 sd: 1)
    probs = np.full((400, 2), 0.5)
    draws = ece_null_draws(probs, draws=20000, seed=1)
    at = lambda e: ece_if_calibrated(probs, draws=20000, seed=1, observed=e)["ece_calibration_p"]  # noqa: E731
    assert at(1.96 * 0.025) == pytest.approx(0.05, abs=0.01)
    assert at(0.0) == 1.0
    assert at(0.3) == 1 / 20001  # never 0: the observed ECE counts as one draw
    assert at(0.02) == (1 + np.count_nonzero(draws >= 0.02)) / 20001
    assert np.isnan(at(float("nan"))) and "ece_calibration_p" not in ece_if_calibrated(probs, draws=10)
    # calibrated labels give p-values spread over (0, 1]; an over-confident model's are all below 0.05
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([0.3, 0.3, 0.3], size=800)
    sharp = probs**3 / (probs**3).sum(axis=1, keepdims=True)
    calibrated, over = [], []
    for _ in range(100):
        y = _sample_labels(rng, probs)
        calibrated.append(ece_if_calibrated(probs, draws=200, observed=calibration_report(probs, y)["ece"])
                          ["ece_calibration_p"])
        over.append(ece_if_calibrated(sharp, draws=200, observed=calibration_report(sharp, y)["ece"])
                    ["ece_calibration_p"])
    assert 0.85 <= np.mean(np.array(calibrated) > 0.05) <= 0.99 and 0.35 <= np.median(calibrated) <= 0.65
    assert max(over) < 0.05


def test_heldout_metrics_per_class_and_per_timepoint():
    """A timecourse's late cells look like the test cells (AUROC 0.5 exactly: the same values), its early cells do not
    (1.0); the per-timepoint keys come in time order, AUROC only, and only for a class with several timepoints."""
    from training.evaluation.evaluate import heldout_metrics

    test = np.array([0.1, 0.2, 0.3, 0.4])
    novelty = np.concatenate([test, [5.0, 6.0], test, [0.7, 0.8]])
    split = ["test"] * 4 + ["heldout"] * 8
    label = ["a"] * 4 + ["tc"] * 6 + ["x"] * 2
    timepoint = [np.nan] * 4 + [2.0, 2.0, 14.0, 14.0, 14.0, 14.0] + [np.nan, np.nan]
    cells = pd.DataFrame({"split": split, "label": label, "timepoint": timepoint})
    out = {"novelty": novelty, "confidence": np.full(12, 0.9), "entropy": novelty, "epistemic": novelty}
    res = heldout_metrics(cells, out, cells["split"].eq("test").to_numpy())
    assert res["heldout_tc_2h/density/auroc"] == 1.0
    assert res["heldout_tc_14h/density/auroc"] == 0.5
    assert res["heldout_x/density/auroc"] == 1.0
    assert res["heldout/density/auroc"] == pytest.approx((2 * 4 + 4 * 2 + 2 * 4) / (8 * 4))
    per_time = [k.split("/")[0] for k in res if k.startswith("heldout_tc_") and k.endswith("/density/auroc")]
    assert per_time == ["heldout_tc_2h", "heldout_tc_14h"]
    assert not [k for k in res if k.startswith("heldout_tc_") and not k.endswith("/auroc")]
    assert not [k for k in res if k.startswith("heldout_x_")]
    assert heldout_metrics(cells[:4], {k: v[:4] for k, v in out.items()}, np.ones(4, bool)) == {}
