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
    EnergyNovelty,
    GaussianDensity,
    KNNNovelty,
    PixelKNN,
    PixelMahalanobis,
    RelativeMahalanobis,
    energy_score,
    make_novelty,
    novelty_from_dict,
    novelty_inputs,
    novelty_to_dict,
    stage_features,
)
from training.uncertainty.pixel_descriptor import feature_names, pixel_descriptor


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
    other = KNNNovelty(max_bank=10, seed=4).fit(x).bank_
    assert not np.array_equal(a.bank_, other)  # the seed picks the bank
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    for bank in (a.bank_, other):  # ten distinct training cells, each kept whole (L2-normalised)
        hits = [np.flatnonzero(np.isclose(normed, row).all(axis=1)) for row in bank]
        assert all(len(h) == 1 for h in hits) and len({int(h[0]) for h in hits}) == 10


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
    nov = make_novelty("energy_multistage", k=3).fit(train)
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
    """Two classes spread widely along x (a direction they share) and apart along y. A cell far out along x is as far
    from the background as from its class: the plain class distance flags it, the relative score leaves it level
    with a typical cell. A cell between the classes is near the background and far from both: novel for both."""
    rng = np.random.default_rng(0)
    n = 2000
    x = np.c_[rng.normal(0, 5, n), np.repeat([-3.0, 3.0], n // 2) + rng.normal(0, 0.5, n), rng.normal(0, 0.5, n)]
    y = np.repeat([0, 1], n // 2)
    rmd, plain = RelativeMahalanobis().fit(x, y), GaussianDensity().fit(x, y)
    typical, along_x, between = np.array([[0, 3, 0]]), np.array([[12.0, 3, 0]]), np.array([[0.0, 0, 0]])
    s = [rmd.score(v)[0] for v in (typical, along_x, between)]
    d2 = [plain.score(v)[0] ** 2 for v in (typical, along_x, between)]
    assert d2[1] - d2[0] > 5  # (12 / 5)^2 = 5.8: the plain distance counts the shared direction
    assert abs(s[1] - s[0]) < 0.5  # the relative score does not
    assert s[2] > 30 and d2[2] > 30  # (3 / 0.5)^2 = 36 from either class, about 0 from the background


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

    def outputs(v: np.ndarray) -> dict[str, np.ndarray]:  # what a member's forward pass hands each kind
        return novelty_inputs(nov, {"features": v, "stages": v, "pixels": v, "logits": v @ w})

    nov.fit(outputs(train), labels)
    assert nov.score(outputs(outlier)).min() > np.median(nov.score(outputs(inlier)))
    again = novelty_from_dict({k: np.asarray(v) for k, v in novelty_to_dict(nov).items()})
    assert again.kind == kind
    np.testing.assert_allclose(again.score(outputs(outlier)), nov.score(outputs(outlier)), rtol=1e-6)


def test_energy_multistage_saved_before_the_sums_were_general_still_loads():
    rng = np.random.default_rng(3)
    train = {"logits": rng.normal(0, 2, (100, 2)), "stages": rng.normal(0, 1, (100, 5))}
    nov = make_novelty("energy_multistage", k=3).fit(train)
    knn = nov.parts[1].to_dict()  # the earlier layout: the kNN's keys unprefixed beside centre and scale
    old = {"kind": np.asarray("energy_multistage"), **{k: np.asarray(v) for k, v in knn.items()},
           "centre": nov.centre_, "scale": nov.scale_}
    np.testing.assert_allclose(novelty_from_dict(old).score(train), nov.score(train), rtol=1e-6)
    with pytest.raises(ModelError, match="'centre' and 'scale' need 2 entries"):
        novelty_from_dict({**old, "centre": np.zeros(3)})


def test_pixel_knn_keeps_the_brightness_that_unit_vectors_drop():
    """A cell whose every statistic is 4x a training cell's points the same way (unit-vector kNN: 0 away) but is
    far brighter: the pixel kNN, on log-compressed standardised statistics, flags it."""
    rng = np.random.default_rng(4)
    train = rng.uniform(1.0, 2.0, (300, 6))
    brighter = 4.0 * train[:20]
    knn, pix = KNNNovelty(k=1).fit(train), PixelKNN(k=1).fit(train)
    np.testing.assert_allclose(knn.score(brighter), 0.0, atol=1e-3)
    assert pix.score(brighter).min() > np.quantile(pix.score(train, leave_self_out=True), 0.99)
    np.testing.assert_allclose(pix.score(train[:5]), 0.0, atol=1e-6)  # each training cell finds itself
    z = pix.transform(train)  # signed log of x / its median magnitude, then standardised on the training cells
    ref = np.log1p(train / np.median(train, axis=0))
    np.testing.assert_allclose(z, (ref - ref.mean(0)) / ref.std(0), rtol=1e-9)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 6\)"):
        pix.score(train[:, :5])
    with pytest.raises(ModelError, match="missing keys"):
        novelty_from_dict({"kind": np.asarray("pixel_knn"), "bank": train})


def test_pixel_mahalanobis_flags_cells_between_two_classes_by_its_formula():
    """Two classes apart along the first statistic, a tenth of the second class's cells weak responders between
    them (as stimulated slides have): a cell between the classes is far from both classes' own spread and close to
    the mean of all cells, so the relative score flags it above almost every test cell of either class. The score is
    the ridge-regularised relative Mahalanobis distance in the signed-log standardised space, computed here by
    solving the normal equations instead of whitening."""
    rng = np.random.default_rng(5)
    n = 1000
    a = np.c_[rng.normal(-5, 1, n), rng.normal(0, 1, (n, 2))]
    b = np.c_[rng.normal(5, 1, n), rng.normal(0, 1, (n, 2))]
    b[: n // 10, 0] = rng.normal(0, 1, n // 10)
    train, y = np.r_[a, b], np.repeat([0, 1], n)
    test = np.r_[np.c_[rng.normal(-5, 1, 200), rng.normal(0, 1, (200, 2))],
                 np.c_[rng.normal(5, 1, 200), rng.normal(0, 1, (200, 2))]]
    between = np.c_[rng.normal(0, 0.5, 50), rng.normal(0, 1, (50, 2))]
    nov = PixelMahalanobis().fit(train, y)
    assert (nov.score(between) > np.quantile(nov.score(test), 0.95)).mean() > 0.9

    z, q = nov.space.transform(train), nov.space.transform(between[:5])

    def mahalanobis_sq(x: np.ndarray, centre: np.ndarray, cov: np.ndarray) -> np.ndarray:
        reg = cov + PixelMahalanobis.RIDGE * np.linalg.eigvalsh(cov).max() * np.eye(len(cov))
        return np.einsum("ij,ij->i", x - centre, np.linalg.solve(reg, (x - centre).T).T)

    means = [z[y == c].mean(0) for c in (0, 1)]
    resid = z - np.stack(means)[y]
    within, background = resid.T @ resid / len(z), np.cov(z, rowvar=False, bias=True)
    expected = (np.minimum(*(mahalanobis_sq(q, m, within) for m in means))
                - mahalanobis_sq(q, z.mean(0), background))
    np.testing.assert_allclose(nov.score(between[:5]), expected, rtol=1e-8)


def test_pixel_mahalanobis_needs_labels_and_survives_a_statistic_without_spread():
    rng = np.random.default_rng(6)
    train = np.c_[rng.normal(2, 0.3, (100, 2)), np.repeat([1.0, 3.0], 50)]  # the last column: one value per class
    y = np.repeat([0, 1], 50)
    with pytest.raises(ValueError, match="needs the training cells' labels"):
        PixelMahalanobis().fit(train)
    nov = PixelMahalanobis().fit(train, y)
    s = nov.score(np.r_[train[:5], [[2.0, 2.0, 2.0]]])  # the last: between the classes on the spreadless statistic
    assert np.all(np.isfinite(s)) and s[-1] > s[:5].max()
    again = novelty_from_dict({k: np.asarray(v) for k, v in novelty_to_dict(nov).items()})
    np.testing.assert_allclose(again.score(train), nov.score(train), rtol=1e-9)
    with pytest.raises(ModelError, match="missing keys \\['within'"):
        novelty_from_dict({k: v for k, v in novelty_to_dict(nov).items() if k != "within"})


def test_pixel_descriptor_statistics_of_known_images():
    flat = np.full((1, 1, 32, 32), 0.25, dtype=np.float32)
    d = dict(zip(feature_names(1), pixel_descriptor(flat)[0], strict=True))
    assert len(d) == 25
    assert d["c0/image/mean"] == pytest.approx(0.25) and d["c0/image/q99"] == pytest.approx(0.25)
    assert d["c0/image/std"] == pytest.approx(0.0, abs=1e-7)
    for name in ("dog_1_2", "dog_2_4", "dog_4_8", "gradient"):  # a flat image has no blobs and no edges
        assert abs(d[f"c0/{name}/mean"]) < 1e-6 and d[f"c0/{name}/q99"] < 1e-6
    # a puncta-sized spot (sigma 1 px) answers the 1-2 px band most; an aggregate (sigma 6 px) the 4-8 px band
    yy, xx = np.mgrid[:64, :64]
    bands = {}
    for sigma in (1.0, 6.0):
        img = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * sigma**2)).astype(np.float32)[None, None]
        got = dict(zip(feature_names(1), pixel_descriptor(img)[0], strict=True))
        bands[sigma] = [got[f"c0/dog_{b}/std"] for b in ("1_2", "2_4", "4_8")]
    assert bands[1.0][0] > bands[1.0][1] > bands[1.0][2] > 0
    assert bands[6.0][2] > bands[6.0][1] > bands[6.0][0] > 0
    spot = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 2.0).astype(np.float32)[None, None]
    flat = np.full((1, 1, 64, 64), 0.25, dtype=np.float32)
    two = pixel_descriptor(np.concatenate([np.repeat(flat, 2, 1), np.repeat(spot, 2, 1)]))
    assert two.shape == (2, 50)  # channels one after the other
    np.testing.assert_allclose(two[1, :25], two[1, 25:])
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        pixel_descriptor(np.zeros((32, 32)))


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


def test_an_ensemble_scores_the_pixel_knn_of_its_own_input(tiny_ensemble, tiny_manifest, tmp_path):
    """Refit to ``energy_multistage_pixel`` and back from disk: the served novelty is the members' mean of the sum
    whose pixel part reads the descriptor of the model-ready image (the same for every member)."""
    import torch
    from conftest import tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import refit_novelty
    from training.uncertainty.ensemble import Ensemble

    params = tiny_params(tmp_path, uncertainty={"novelty": "energy_multistage_pixel"})
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    data = prepare_data(table, summary["classes"], params)
    refit_novelty(Ensemble.load(tiny_ensemble), data, params).save(tmp_path / "e")
    ens = Ensemble.load(tmp_path / "e")
    assert [n.kind for n in ens.novelty] == ["energy_multistage_pixel"] * ens.spec.n_members
    x = np.random.default_rng(1).uniform(0, 1, (5, 1, 32, 32)).astype(np.float32)
    ready = ens.preprocess(ens.select_channels(x))
    with torch.no_grad():
        pixel_part = [nov.parts[2].score(pixel_descriptor(ready)) for nov in ens.novelty]
        expected = []
        for model, nov in zip(ens.members, ens.novelty, strict=True):
            feats, maps = model.forward_intermediates(ready)  # the stage maps the ensemble pools
            logits = model.forward_head(feats).numpy()
            raw = np.c_[energy_score(logits), nov.parts[1].score(stage_features(maps)), nov.parts[2].score(
                pixel_descriptor(ready))]
            expected.append(((raw - nov.centre_) / nov.scale_).sum(axis=1))
    np.testing.assert_allclose(ens.predict_images(x)["novelty"], np.mean(expected, axis=0), rtol=1e-5)
    assert np.ptp(pixel_part[0]) > 0  # the pixel part tells these cells apart


def test_the_accelerator_quantiles_are_numpys():
    """``pixel_descriptor`` takes numpy's quantiles on CPU and ``sorted_quantiles`` (a sort on the device) elsewhere:
    the same linear interpolation, checked here on CPU."""
    import torch

    from training.uncertainty.pixel_descriptor import QUANTILES, sorted_quantiles

    x = torch.rand(6, 2, 1000, generator=torch.Generator().manual_seed(0)) ** 3
    np.testing.assert_allclose(sorted_quantiles(x).numpy(), np.quantile(x.numpy(), QUANTILES, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(sorted_quantiles(torch.arange(11.0), (0.0, 0.25, 0.99, 1.0)).numpy(),
                               [0.0, 2.5, 9.9, 10.0], rtol=1e-6)


def test_an_ensemble_serves_a_sum_of_pixel_scores_alone(tiny_ensemble, tiny_manifest, tmp_path):
    """``pixel_knn_mahalanobis`` reads one input, the pixel descriptor, for both parts: refit, saved and loaded,
    the served novelty is the members' mean of the two scaled parts on the model-ready image."""
    from conftest import tiny_params

    from training.data.cellindex import build_index
    from training.data.splits import make_splits
    from training.data.trainset import prepare_data
    from training.regimes.ensemble_training import refit_novelty
    from training.uncertainty.ensemble import Ensemble

    params = tiny_params(tmp_path, uncertainty={"novelty": "pixel_knn_mahalanobis"})
    table, summary = make_splits(build_index(tiny_manifest, progress=False), params.split)
    refit_novelty(Ensemble.load(tiny_ensemble), prepare_data(table, summary["classes"], params), params).save(
        tmp_path / "e")
    ens = Ensemble.load(tmp_path / "e")
    assert [n.kind for n in ens.novelty] == ["pixel_knn_mahalanobis"] * ens.spec.n_members
    x = np.random.default_rng(2).uniform(0, 1, (6, 1, 32, 32)).astype(np.float32)
    pixels = pixel_descriptor(ens.preprocess(ens.select_channels(x)))
    expected = [((np.c_[nov.parts[0].score(pixels), nov.parts[1].score(pixels)] - nov.centre_) / nov.scale_).sum(1)
                for nov in ens.novelty]
    np.testing.assert_allclose(ens.predict_images(x)["novelty"], np.mean(expected, axis=0), rtol=1e-5)
    assert np.ptp(expected[0]) > 0
