"""Uncertainty decomposition, temperature scaling and the feature-density novelty score."""

from __future__ import annotations

import numpy as np
import pytest

from training.errors import ModelError
from training.uncertainty.calibration import apply_temperature, fit_temperature, temperature_nll
from training.uncertainty.decompose import FIELD_DESCRIPTIONS, decompose, decompose_logits, entropy, softmax
from training.uncertainty.novelty import GaussianDensity


def _sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((u > probs.cumsum(axis=1)).sum(axis=1), probs.shape[1] - 1)


# -- decomposition -------------------------------------------------------------------------------------
def test_members_agree_mutual_information_zero():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    out = decompose(np.stack([p, p, p]))
    np.testing.assert_allclose(out["epistemic"], 0.0, atol=1e-12)
    np.testing.assert_allclose(out["aleatoric"], out["entropy"])
    np.testing.assert_allclose(out["mean_probs"], p)
    assert out["predicted"].tolist() == [0, 0]
    np.testing.assert_allclose(out["confidence"], [0.7, 0.4])


def test_total_is_aleatoric_plus_epistemic():
    rng = np.random.default_rng(0)
    p = softmax(rng.normal(0, 3, size=(5, 50, 4)))
    out = decompose(p)
    np.testing.assert_allclose(out["entropy"], out["aleatoric"] + out["epistemic"], atol=1e-12)
    assert np.all(out["epistemic"] >= 0) and np.all(out["entropy"] <= np.log(4) + 1e-12)
    assert out["predicted"].dtype == np.int64


def test_uniform_has_entropy_log_k():
    k = 6
    out = decompose(np.full((3, 2, k), 1.0 / k))
    np.testing.assert_allclose(out["entropy"], np.log(k))
    np.testing.assert_allclose(out["aleatoric"], np.log(k))
    np.testing.assert_allclose(out["epistemic"], 0.0, atol=1e-12)


def test_confident_disagreeing_members_are_epistemic():
    eps = 1e-4
    members = np.array([[[1 - 2 * eps, eps, eps]], [[eps, 1 - 2 * eps, eps]], [[eps, eps, 1 - 2 * eps]]])
    out = decompose(members)
    assert out["aleatoric"][0] < 0.01
    assert out["epistemic"][0] > 0.95 * np.log(3)
    # members that all say "uniform" carry the same total but as aleatoric
    same = decompose(np.full((3, 1, 3), 1 / 3))
    assert same["epistemic"][0] < 1e-9 and abs(same["entropy"][0] - out["entropy"][0]) < 0.01


def test_single_member_has_no_epistemic():
    p = softmax(np.random.default_rng(1).normal(size=(20, 5)))
    for arr in (p[None], p):  # (1, N, K) and (N, K)
        out = decompose(arr)
        np.testing.assert_array_equal(out["epistemic"], 0.0)
        np.testing.assert_allclose(out["entropy"], entropy(p))


def test_softmax_stable_and_logits_path():
    z = np.array([[1000.0, 1000.0, -1000.0]])
    np.testing.assert_allclose(softmax(z), [[0.5, 0.5, 0.0]], atol=1e-12)
    out = decompose_logits(np.stack([z, z]), temperature=2.0)
    np.testing.assert_allclose(out["entropy"], np.log(2))


def test_decompose_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        decompose(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        decompose(np.full((1, 2, 2), np.nan))


def test_field_descriptions_cover_outputs():
    for key in (
        "probabilities",
        "predicted_class",
        "confidence",
        "entropy",
        "aleatoric",
        "epistemic",
        "novelty",
    ):
        assert FIELD_DESCRIPTIONS[key].strip().endswith(".")


def test_the_novelty_description_names_the_default_score():
    """The field text is served in the OpenAPI document and GET /metadata; it once named a default two changes old."""
    from training.config import Params

    assert f"default {Params().uncertainty.novelty}:" in FIELD_DESCRIPTIONS["novelty"]


# -- temperature scaling -----------------------------------------------------------------------------
def _calibrated(seed: int, n: int = 3000, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, size=(n, k))
    return z, _sample_labels(rng, softmax(z))


def test_temperature_near_one_on_calibrated_logits():
    z, y = _calibrated(0)
    t = fit_temperature(z, y)
    assert 0.9 < t < 1.1


def test_temperature_fixes_overconfident_logits():
    z, y = _calibrated(1)
    over = 3.0 * z
    t = fit_temperature(over, y)
    assert 2.6 < t < 3.4
    assert temperature_nll(over, y, t) < temperature_nll(over, y, 1.0) - 0.2
    np.testing.assert_allclose(apply_temperature(over, t), softmax(over / t))


def test_temperature_tiny_and_empty_sets():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    t = fit_temperature(np.array([[2.0, 0.0]]), np.array([0]), bounds=(0.1, 10.0))
    assert 0.1 <= t < 0.2  # a single correct cell pushes T to the lower bound, not to 0
    assert fit_temperature(np.zeros((5, 3)), np.zeros(5, dtype=int)) == 1.0  # flat objective
    with pytest.raises(ValueError, match="labels must lie"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))


# -- novelty -------------------------------------------------------------------------------------------
def _clusters(rng: np.random.Generator, n: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    centres = np.zeros((3, d))
    centres[0, 0], centres[1, 1], centres[2, 2] = 6.0, 6.0, 6.0
    y = rng.integers(0, 3, n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_novelty_far_points_score_higher():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 600)
    g = GaussianDensity().fit(x, y)
    x_in, y_in = _clusters(rng, 200)
    x_out = rng.normal(size=(200, 8)) + np.r_[0, 0, 0, 0, 0, 0, 0, 12.0]
    s_in, s_out = g.score(x_in), g.score(x_out)
    assert s_out.min() > np.quantile(s_in, 0.99)
    assert np.median(s_in) < 4.0  # ~ sqrt(D) for in-distribution cells
    np.testing.assert_array_equal(g.nearest_class(x_in), y_in)  # well-separated clusters: each cell's own


def test_novelty_uses_covariance_not_euclidean():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 2)) * np.array([10.0, 0.5])
    g = GaussianDensity(standardize=False).fit(x, np.zeros(2000, dtype=int))
    along_wide, along_narrow = g.score(np.array([[5.0, 0.0], [0.0, 5.0]]))
    assert along_narrow > 10 * along_wide


def test_novelty_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 300)
    g = GaussianDensity().fit(x, np.array(["stim", "unstim", "atg5"])[y])
    np.savez(tmp_path / "nov.npz", **g.to_dict())
    with np.load(tmp_path / "nov.npz") as f:
        g2 = GaussianDensity.from_dict(dict(f))
    probe = rng.normal(size=(50, 8)) * 3
    np.testing.assert_array_equal(g2.score(probe), g.score(probe))
    assert g2.classes_.tolist() == sorted(["stim", "unstim", "atg5"])
    with pytest.raises(ModelError, match="missing keys"):
        GaussianDensity.from_dict({"classes": np.arange(2)})


def test_novelty_singleton_class_and_errors():
    rng = np.random.default_rng(4)
    x = np.vstack([rng.normal(size=(40, 5)), [[20.0, 20, 20, 20, 20]]])
    y = np.r_[np.zeros(40, dtype=int), [1]]
    g = GaussianDensity().fit(x, y)
    s = g.score(x)
    assert np.all(np.isfinite(s)) and s[-1] == pytest.approx(0.0, abs=1e-9)
    one = GaussianDensity().fit(np.ones((1, 3)), np.array([0]))  # a single cell overall
    assert one.score(np.ones((1, 3)))[0] == pytest.approx(0.0)
    with pytest.raises(ModelError, match="not fitted"):
        GaussianDensity().score(x)
    with pytest.raises(ValueError, match="shape"):
        g.score(np.ones((2, 4)))


# -- ensemble vs single member -------------------------------------------------------------------------
def _ensemble(n_members: int):
    from training.config import ModelConfig
    from training.models.factory import build_model
    from training.uncertainty.ensemble import Ensemble, EnsembleSpec

    cfg = ModelConfig(name="convnext_custom", dims=[8, 8, 8, 8], depths=[1, 1, 1, 1])
    spec = EnsembleSpec(classes=["a", "b", "c"], channels=["x"], source_channels=["x"], image_size=16,
                        preprocess={"image_size": 16}, model=cfg.model_dump(), temperatures=[1.0] * n_members,
                        has_novelty=False)
    return Ensemble(spec, [build_model(cfg, 1, 3) for _ in range(n_members)])


def test_single_member_baseline_is_the_mean_and_best_member():
    from training.evaluation.evaluate import single_member_metrics
    from training.evaluation.metrics import calibration_report

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1.5, (400, 3, 1, 3))
    logits[np.arange(400), :, 0, y] += 1.5  # members right on average, each noisy on its own
    ens = _ensemble(3)
    res = single_member_metrics(ens, logits, y, n_bins=15)
    per_member = [calibration_report(ens.combine(logits, members=[k])["mean_probs"], y, 15)["nll"] for k in range(3)]
    assert res["single_member/nll"] == pytest.approx(np.mean(per_member))
    assert res["single_member_best/nll"] == pytest.approx(min(per_member))
    ensemble_nll = calibration_report(ens.combine(logits)["mean_probs"], y, 15)["nll"]
    assert ensemble_nll < res["single_member/nll"]  # averaging probabilities never loses to the average member
    # identical members: the ensemble is exactly a single member
    same = np.repeat(logits[:, :1], 3, axis=1)
    res_same = single_member_metrics(ens, same, y, n_bins=15)
    assert res_same["single_member/nll"] == pytest.approx(calibration_report(
        ens.combine(same)["mean_probs"], y, 15)["nll"])
