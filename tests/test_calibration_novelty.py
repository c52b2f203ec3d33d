"""Pool-then-calibrate and the novelty scores, on hand-made logits and features with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from training.errors import ModelError
from training.uncertainty.calibration import (
    fit_pooled_temperature,
    pooled_log_probs,
    temperature_nll,
)
from training.uncertainty.decompose import decompose, decompose_pooled, softmax
from training.uncertainty.novelty import (
    NOVELTY_KINDS,
    EnergyMultistage,
    EnergyNovelty,
    KNNNovelty,
    RelativeMahalanobis,
    energy_score,
    make_novelty,
    novelty_from_dict,
    novelty_to_dict,
    stage_features,
)


def _overconfident_members(seed: int = 0, n: int = 4000, m: int = 3, k: int = 3):
    """Members whose logits are 3x too sharp around a true logit, with member-specific noise."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (n, k))
    p = softmax(true_logits)
    y = np.minimum((rng.random(n)[:, None] > p.cumsum(axis=1)).sum(axis=1), k - 1)
    member_logits = np.stack([3.0 * (true_logits + rng.normal(0, 0.3, (n, k))) for _ in range(m)], axis=1)
    return member_logits, y


# -- pool-then-calibrate -------------------------------------------------------------------------------
def test_pooled_log_probs_is_log_of_mean_probability():
    z = np.array([[[2.0, 0.0], [0.0, 2.0]]])  # one cell, two members that disagree
    np.testing.assert_allclose(np.exp(pooled_log_probs(z)), [[0.5, 0.5]], atol=1e-12)
    z4 = z[:, :, None]  # (N, M, S, K) with S = 1 gives the same
    np.testing.assert_allclose(pooled_log_probs(z4), pooled_log_probs(z))


def test_pooled_temperature_lowers_validation_nll_of_overconfident_ensemble():
    logits, y = _overconfident_members()
    pooled = pooled_log_probs(logits)
    t = fit_pooled_temperature(logits, y)
    assert 2.0 < t < 4.0  # the members are 3x too sharp; averaging softens them a little
    assert temperature_nll(pooled, y, t) < temperature_nll(pooled, y, 1.0) - 0.1
    # it is the NLL optimum: neighbouring temperatures are worse
    assert temperature_nll(pooled, y, t) <= min(temperature_nll(pooled, y, t * 0.9), temperature_nll(pooled, y, t * 1.1))


def test_decompose_pooled_keeps_the_identity_and_equals_decompose_at_t1():
    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(0, 2, (4, 50, 3)))
    plain, same = decompose(probs), decompose_pooled(probs, 1.0)
    for key in plain:
        np.testing.assert_allclose(same[key], plain[key])
    out = decompose_pooled(probs, 2.0)
    np.testing.assert_allclose(out["entropy"], out["aleatoric"] + out["epistemic"], atol=1e-12)
    assert np.all(out["epistemic"] >= 0) and np.all(out["aleatoric"] >= -1e-12)
    expected = softmax(np.log(probs.mean(axis=0)) / 2.0)
    np.testing.assert_allclose(out["mean_probs"], expected)
    assert np.all(out["entropy"] > plain["entropy"])  # T > 1 softens every cell


def test_refit_on_labeled_cells_finds_the_temperature_the_new_slides_want():
    """``spatial recalibrate``'s core: the refit equals the pooled NLL optimum on those cells, lowers their NLL
    against what the model served (a training-time temperature of 1), and refuses too few or error-free cells."""
    from training.errors import DataError
    from training.uncertainty.recalibration import refit

    logits, y = _overconfident_members(seed=4, n=1500)
    served = softmax(pooled_log_probs(logits))
    res = refit(logits, y, served, 1.0, "pooled")
    assert res.temperature == pytest.approx(fit_pooled_temperature(logits, y))
    assert res.n_cells == 1500 and res.n_errors == int((served.argmax(axis=1) != y).sum()) > 0
    assert res.nll_after < res.nll_before - 0.1 and res.ece_after < res.ece_before
    with pytest.raises(DataError, match="99 labeled cell.*at least 100"):
        refit(logits[:99], y[:99], served[:99], 1.0, "pooled")
    right = pooled_log_probs(logits).argmax(axis=1) == y
    with pytest.raises(DataError, match="0 misclassified"):
        refit(logits[right], y[right], served[right], 1.0, "pooled")


def test_atc_predicts_the_error_share_and_sets_the_temperature_that_matches_it():
    """Label-free temperature (ATC): the validation threshold leaves exactly as many cells below it as are wrong,
    the new cells' predicted error is the share below it, and the temperature makes their mean confidence equal
    the predicted accuracy; none of it depends on a temperature applied to both sets."""
    from training.uncertainty.shift import atc_threshold, label_free_temperature, predicted_error

    margins = np.linspace(0.1, 6.0, 100)  # two classes, logits [m, 0]: confidence rises with m
    val = np.c_[margins, np.zeros(100)]
    y = np.zeros(100, dtype=np.int64)
    y[:10] = 1  # the 10 least confident cells are the misclassified ones
    t = atc_threshold(val, y)
    conf = -np.log1p(np.exp(-margins))  # the largest log-probability of [m, 0]
    assert conf[9] < t < conf[10]
    new = np.c_[np.r_[np.full(8, 0.3), np.full(32, 4.0)], np.zeros(40)]  # 8 of 40 below the threshold
    fit = label_free_temperature(new, t)
    assert fit.predicted_error == pytest.approx(0.2) and fit.n_cells == 40
    assert softmax(new / fit.temperature).max(axis=1).mean() == pytest.approx(0.8, abs=1e-6)
    for scale in (0.5, 3.0):  # a temperature keeps the cells' order: the same threshold position, the same share
        assert predicted_error(new * scale, atc_threshold(val * scale, y)) == pytest.approx(0.2)
    assert atc_threshold(val, np.zeros(100, dtype=np.int64)) == -np.inf  # no errors: nothing predicted wrong
    assert predicted_error(new, -np.inf) == 0.0


def test_temperature_for_accuracy_has_the_closed_form_and_stops_at_the_bounds():
    from training.uncertainty.shift import temperature_for_accuracy

    d = 3.0  # every cell has logits [d, 0]: confidence sigmoid(d / T) = a  <=>  T = d / logit(a)
    logits = np.tile([d, 0.0], (5, 1))
    for a in (0.7, 0.9, 0.99):
        assert temperature_for_accuracy(logits, a) == pytest.approx(d / np.log(a / (1 - a)), rel=1e-6)
    assert temperature_for_accuracy(logits, 1.0) == 0.05  # unreachable: the sharpest bound
    assert temperature_for_accuracy(logits, 0.5) == 20.0  # two classes never fall below 1/2: the softest bound
    with pytest.raises(ValueError, match="accuracy must be in"):
        temperature_for_accuracy(logits, 1.2)


def test_evaluate_reports_what_the_label_free_refit_would_serve_on_the_test_cells():
    """``label_free/*`` in ``spatial evaluate``: ATC's temperature on the test cells' own member logits with the
    stored threshold, and the NLL / ECE it gives there; nothing when the model stored no threshold."""
    from types import SimpleNamespace

    from training.evaluation.evaluate import label_free_metrics
    from training.evaluation.metrics import calibration_report
    from training.uncertainty.shift import confidence, temperature_for_accuracy

    logits, y = _overconfident_members(seed=5, n=600, k=2)
    logp = pooled_log_probs(logits)
    threshold = float(np.quantile(confidence(logp), 0.25))
    out = label_free_metrics(SimpleNamespace(spec=SimpleNamespace(info={"atc_threshold": threshold})), logits, y, 15)
    assert out["label_free/predicted_error"] == pytest.approx(np.mean(confidence(logp) < threshold))
    t = temperature_for_accuracy(logp, 1 - out["label_free/predicted_error"])
    assert out["label_free/temperature"] == pytest.approx(t) and t > 1  # 3x too sharp members: ATC softens them
    assert out["label_free/ece"] == pytest.approx(calibration_report(softmax(logp / t), y, 15)["ece"])
    assert label_free_metrics(SimpleNamespace(spec=SimpleNamespace(info={})), logits, y, 15) == {}


# -- novelty scores ------------------------------------------------------------------------------------
def test_knn_is_distance_to_kth_neighbour_on_the_unit_sphere():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    knn = KNNNovelty(k=1).fit(bank * 5.0)  # scale does not matter: features are L2-normalised
    np.testing.assert_allclose(knn.score(np.array([[2.0, 0.0]])), [0.0], atol=1e-7)
    np.testing.assert_allclose(knn.score(np.array([[0.0, -3.0]])), [np.sqrt(2.0)], atol=1e-6)
    knn2 = KNNNovelty(k=2).fit(bank)
    np.testing.assert_allclose(knn2.score(np.array([[1.0, 0.0]])), [np.sqrt(2.0)], atol=1e-6)


def test_knn_bank_is_capped_and_seeded():
    x = np.random.default_rng(0).normal(size=(100, 4))
    a, b = KNNNovelty(max_bank=10, seed=3).fit(x), KNNNovelty(max_bank=10, seed=3).fit(x)
    assert a.bank_.shape == (10, 4)
    np.testing.assert_array_equal(a.bank_, b.bank_)


def test_energy_is_negative_logsumexp():
    logits = np.array([[10.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(energy_score(logits), [-np.log(np.exp(10) + 1), -np.log(2)])
    assert EnergyNovelty().score(logits)[1] > EnergyNovelty().score(logits)[0]  # flat logits: more novel


def test_knn_leave_self_out_measures_training_cells_like_new_ones():
    x = np.array([[1.0, 0], [0.8, 0.6], [0, 1.0], [-0.6, 0.8]])  # unit vectors
    knn = KNNNovelty(k=1).fit(x)
    np.testing.assert_allclose(knn.score(x), 0.0, atol=1e-6)  # each cell finds itself
    nearest_other = [np.linalg.norm(x[0] - x[1]), np.linalg.norm(x[1] - x[0]), np.linalg.norm(x[2] - x[3]),
                     np.linalg.norm(x[3] - x[2])]
    np.testing.assert_allclose(knn.score(x, leave_self_out=True), nearest_other, rtol=1e-5)


def test_energy_multistage_is_the_sum_of_both_scores_scaled_by_their_training_iqr():
    rng = np.random.default_rng(2)
    train = {"logits": rng.normal(0, 2, (300, 2)), "stages": rng.normal(0, 1, (300, 5))}
    nov = EnergyMultistage(k=3).fit(train)
    e = energy_score(train["logits"])
    kd = KNNNovelty(k=3).fit(train["stages"]).score(train["stages"], leave_self_out=True)
    for got, raw in zip(nov.centre_, (e, kd), strict=True):
        assert got == pytest.approx(np.median(raw))
    q = {"logits": np.array([[0.0, 0.0], [6.0, -6.0]]), "stages": train["stages"][:2] + 0.1}
    raw_q = np.c_[energy_score(q["logits"]), KNNNovelty(k=3).fit(train["stages"]).score(q["stages"])]
    iqr = np.subtract(*np.quantile(np.c_[e, kd], [0.75, 0.25], axis=0))
    np.testing.assert_allclose(nov.score(q), ((raw_q - np.c_[np.median(e), np.median(kd)]) / iqr).sum(axis=1))
    assert nov.score(q)[0] > nov.score(q)[1]  # flat logits (in between the classes) are the more novel


def test_relative_mahalanobis_ignores_the_direction_all_classes_share():
    """Two classes spread widely along x (shared) and separated along y: a cell far out along x is as typical
    for the background as for its class, so its relative score stays low; a cell off along z is novel."""
    rng = np.random.default_rng(0)
    n = 2000
    x = np.c_[rng.normal(0, 5, n), np.repeat([-3.0, 3.0], n // 2) + rng.normal(0, 0.5, n), rng.normal(0, 0.5, n)]
    y = np.repeat([0, 1], n // 2)
    rmd = RelativeMahalanobis().fit(x, y)
    typical, along_x, off_z = np.array([[0, 3, 0]]), np.array([[12.0, 3, 0]]), np.array([[0, 3, 3.0]])
    s = [rmd.score(v)[0] for v in (typical, along_x, off_z)]
    assert s[2] > s[1] and s[2] > s[0]


@pytest.mark.parametrize("kind", NOVELTY_KINDS)
def test_every_kind_flags_a_far_cluster_and_round_trips(kind):
    rng = np.random.default_rng(1)
    centres = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0]])
    train = np.concatenate([c + rng.normal(0, 0.5, (200, 4)) for c in centres])
    labels = np.repeat([0, 1], 200)
    inlier = np.concatenate([c + rng.normal(0, 0.5, (50, 4)) for c in centres])
    outlier = np.array([0, 0, 4.0, 0]) + rng.normal(0, 0.5, (50, 4))
    nov = make_novelty(kind, k=5)
    w = centres.T  # energy: logits of a linear head on the same features
    if nov.input == "logits":
        train, inlier, outlier = train @ w, inlier @ w, outlier @ w
    elif nov.input == "logits+stages":
        train, inlier, outlier = ({"logits": v @ w, "stages": v} for v in (train, inlier, outlier))
    nov.fit(train, labels)
    assert nov.score(outlier).min() > np.median(nov.score(inlier))
    again = novelty_from_dict({k: np.asarray(v) for k, v in novelty_to_dict(nov).items()})
    assert again.kind == kind
    np.testing.assert_allclose(again.score(outlier), nov.score(outlier), rtol=1e-6)


def test_old_files_without_kind_are_mahalanobis_and_unknown_kind_is_refused():
    g = make_novelty("mahalanobis").fit(np.random.default_rng(0).normal(size=(20, 3)), np.repeat([0, 1], 10))
    assert novelty_from_dict(g.to_dict()).kind == "mahalanobis"
    with pytest.raises(ModelError, match="unknown novelty score 'lof'"):
        novelty_from_dict({"kind": np.asarray("lof")})
    with pytest.raises(ModelError, match="unknown novelty score"):
        make_novelty("lof")


def test_stage_features_pool_mean_and_spread_and_normalise_each():
    a = np.ones((2, 3, 4, 4))  # flat maps: unit mean direction, no spread
    b = np.zeros((2, 2, 2, 2))
    b[:, 0] = 5.0
    b[1, 1, 0, 0] = 4.0  # cell 1: one bright spot in channel 1 of stage b
    f = stage_features([a, b])
    assert f.shape == (2, 2 * (3 + 2))  # per stage: mean (C), then standard deviation (C)
    np.testing.assert_allclose(f[0], np.r_[np.full(3, 1 / np.sqrt(3)), np.zeros(3), 1.0, 0.0, 0.0, 0.0])
    mean_b = np.array([5.0, 1.0]) / np.hypot(5.0, 1.0)
    np.testing.assert_allclose(f[1], np.r_[np.full(3, 1 / np.sqrt(3)), np.zeros(3), mean_b, 0.0, 1.0])


def test_refit_novelty_switches_the_score_without_retraining(tiny_ensemble, tiny_manifest, tmp_path):
    from conftest import tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import refit_novelty
    from training.uncertainty.ensemble import Ensemble

    params = tiny_params(tmp_path, uncertainty={"novelty": "energy"})
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    ens = Ensemble.load(tiny_ensemble)
    before = [p.detach().clone() for p in ens.members[0].parameters()]
    refit_novelty(ens, data, params).save(tmp_path / "e")
    again = Ensemble.load(tmp_path / "e")
    assert [n.kind for n in again.novelty] == ["energy", "energy"]
    assert again.spec.info["novelty_score"] == "energy"
    assert all(bool((a == b).all()) for a, b in zip(before, again.members[0].parameters(), strict=True))
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    out = again.predict_images(x)
    import torch

    with torch.no_grad():
        logits = [m(again.preprocess(again.select_channels(x))).numpy() for m in again.members]
    np.testing.assert_allclose(out["novelty"], np.mean([energy_score(z) for z in logits], axis=0), rtol=1e-5)
