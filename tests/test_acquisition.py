"""Acquisition functions on hand-made posteriors and embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from training.active.acquisition import (
    STRATEGIES,
    badge,
    bald,
    class_quotas,
    entropy,
    gradient_embedding,
    k_center_greedy,
    least_confidence,
    margin,
    power_sample,
    probcover,
    probcover_radius,
    select,
    top_k,
    typiclust,
    typiclust_query,
)
from training.errors import ConfigError

PROBS = np.array([
    [0.90, 0.05, 0.05],  # confident
    [0.50, 0.45, 0.05],  # smallest gap (0.05)
    [0.40, 0.30, 0.30],  # least confident, highest entropy-ish, gap 0.10
    [0.70, 0.20, 0.10],
])


def test_margin_picks_the_smallest_gap():
    assert np.allclose(margin(PROBS), 1 - np.array([0.85, 0.05, 0.10, 0.50]))
    pos, scores = select("margin", 1, np.random.default_rng(0), probs=PROBS)
    assert pos.tolist() == [1]
    assert scores[0] == pytest.approx(0.95)
    pos, _ = select("margin", 2, np.random.default_rng(0), probs=PROBS)
    assert pos.tolist() == [1, 2]


def test_least_confidence_and_entropy_rank_the_flattest_first():
    assert select("least_confidence", 1, np.random.default_rng(0), probs=PROBS)[0].tolist() == [2]
    assert select("entropy", 1, np.random.default_rng(0), probs=PROBS)[0].tolist() == [2]
    assert least_confidence(PROBS)[0] == pytest.approx(0.10)
    assert entropy(np.array([[0.5, 0.5]]))[0] == pytest.approx(np.log(2))
    assert entropy(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0)


def test_bald_is_zero_when_members_agree_and_positive_when_they_disagree():
    agree = np.repeat(PROBS[None], 5, axis=0)  # (S, N, K), every member the same
    assert np.allclose(bald(agree), 0.0, atol=1e-12)
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident members, opposite classes
    assert bald(disagree)[0] == pytest.approx(np.log(2))  # H(mean) = log 2, mean H = 0
    # an uncertain-but-agreeing cell scores below a disagreeing one: BALD is epistemic only
    mixed = np.array([[[0.5, 0.5], [0.9, 0.1]], [[0.5, 0.5], [0.1, 0.9]]])
    pos, _ = select("bald", 1, np.random.default_rng(0), samples=mixed)
    assert pos.tolist() == [1]


def test_coreset_picks_the_farthest_point_then_covers_the_rest():
    pool = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    labeled = np.array([[0.0, 0.0]])
    pos, dist = k_center_greedy(pool, labeled, 2)
    assert pos[0] == 2 and dist[0] == pytest.approx(10.0)
    assert pos[1] == 3 and dist[1] == pytest.approx(5.0)  # farthest from {labeled, point 2}
    pos, _ = select("coreset", 4, np.random.default_rng(0), embeddings=pool, labeled_embeddings=labeled)
    assert sorted(pos.tolist()) == [0, 1, 2, 3]  # distinct; the labeled duplicate (point 0) comes last
    assert pos[-1] == 0


def test_power_sampling_is_reproducible_distinct_and_prefers_high_scores():
    scores = np.linspace(0.01, 1.0, 200)
    a = power_sample(scores, 20, 1.0, np.random.default_rng(7))
    b = power_sample(scores, 20, 1.0, np.random.default_rng(7))
    c = power_sample(scores, 20, 1.0, np.random.default_rng(8))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 20
    assert scores[a].mean() > scores.mean()
    # a low temperature approaches top-k; zero scores come only after every positive one
    cold = power_sample(scores, 5, 1e-3, np.random.default_rng(0))
    assert sorted(cold.tolist()) == list(range(195, 200))
    z = np.array([0.0, 0.0, 0.3, 0.0])
    assert power_sample(z, 1, 1.0, np.random.default_rng(1)).tolist() == [2]
    samples = np.stack([PROBS, PROBS[::-1]])
    p1 = select("power_bald", 3, np.random.default_rng(3), samples=samples)[0]
    p2 = select("power_bald", 3, np.random.default_rng(3), samples=samples)[0]
    assert p1.tolist() == p2.tolist()
    assert select("power_margin", 2, np.random.default_rng(3), probs=PROBS)[0].tolist() == \
        select("power_margin", 2, np.random.default_rng(3), probs=PROBS)[0].tolist()


def test_class_quotas_split_equally_and_pass_shortfalls_on():
    predicted = np.array([0] * 10 + [1] * 2 + [2] * 30)  # class 3: no pool cell predicted
    assert class_quotas(predicted, 4, 20).tolist() == [9, 2, 9, 0]
    assert class_quotas(predicted, 4, 5).tolist() == [2, 1, 2, 0]
    assert class_quotas(predicted, 4, 100).tolist() == [10, 2, 30, 0]  # never more than the pool


def test_balanced_bald_queries_every_predicted_class_where_power_bald_piles_into_one():
    rng = np.random.default_rng(0)
    # 300 cells predicted class 0 with members that disagree, 100 each of classes 1-2 on which they agree
    confused = np.stack([np.tile([0.9, 0.05, 0.05], (300, 1)), np.tile([0.4, 0.3, 0.3], (300, 1))])
    sure = np.stack([np.eye(3)[np.repeat([1, 2], 100)] * 0.9 + 0.05] * 2)
    samples = np.concatenate([confused, sure], axis=1) + rng.uniform(0, 1e-3, (2, 500, 3))
    samples /= samples.sum(axis=2, keepdims=True)
    classes = samples.mean(axis=0).argmax(axis=1)
    plain = select("power_bald", 30, np.random.default_rng(1), samples=samples)[0]
    balanced, scores = select("balanced_bald", 30, np.random.default_rng(1), samples=samples)
    assert np.bincount(classes[plain], minlength=3).tolist() == [30, 0, 0]
    assert np.bincount(classes[balanced], minlength=3).tolist() == [10, 10, 10]
    assert len(set(balanced.tolist())) == 30 and np.allclose(scores, bald(samples)[balanced])


def test_random_selection_is_distinct_and_in_range():
    pos, scores = select("random", 10, np.random.default_rng(0), n_pool=12)
    assert len(set(pos.tolist())) == 10 and pos.min() >= 0 and pos.max() < 12
    assert np.isnan(scores).all()


def test_typiclust_takes_one_dense_point_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    x = np.concatenate([c + rng.normal(0, 1, (50, 2)) for c in centres])
    pos, typ = typiclust(x, 3, np.random.default_rng(1), neighbors=10)
    assert sorted((pos // 50).tolist()) == [0, 1, 2]
    for p, t in zip(pos, typ, strict=True):  # the pick is its blob's most typical point, not an outlier
        blob = x[p // 50 * 50 : p // 50 * 50 + 50]
        nearest = np.sort(np.linalg.norm(blob[:, None] - blob[None], axis=2), axis=1)[:, 1:11]
        assert t == pytest.approx(1 / nearest.mean(axis=1).min(), rel=1e-6)  # 1 / mean distance to 10 neighbours
        assert p % 50 == np.argmin(nearest.mean(axis=1))


def _blob(centre, n, radius):
    """``n`` points: the centre and a ring around it (with every mate as a neighbour the centre is the most typical)."""
    angles = np.linspace(0, 2 * np.pi, n - 1, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius
    return np.concatenate([np.asarray(centre, float)[None], np.asarray(centre, float) + ring])


def test_typiclust_query_takes_the_centres_of_the_largest_uncovered_clusters():
    # three blobs of 30, 20 and 12 points; a labeled point sits in the largest one
    pool = np.concatenate([_blob([0, 0], 30, 1.0), _blob([50, 0], 20, 1.0), _blob([0, 50], 12, 1.0)])
    labeled = np.array([[0.2, 0.1]])
    pos, typ = select("typiclust", 2, np.random.default_rng(0), embeddings=pool, labeled_embeddings=labeled,
                      neighbors=100)
    assert pos.tolist() == [30, 50]  # the centre of the 20-blob (the largest uncovered), then of the 12-blob
    assert typ == pytest.approx([1.0, 1.0], rel=1e-6)  # each centre is 1.0 from every mate in its cluster
    # with a label in the 20-blob instead, the largest uncovered cluster is the 30-blob: its centre comes first
    pos, _ = typiclust_query(pool, np.array([[50.1, 0.2]]), 2, np.random.default_rng(0), neighbors=100)
    assert pos.tolist() == [0, 50]
    # more queries than blobs: the blobs split into more clusters, every blob gets a query, no position twice
    pos, _ = typiclust_query(pool, labeled, 5, np.random.default_rng(0), neighbors=100)
    blob = np.searchsorted([30, 50], pos, side="right")
    assert len(set(pos.tolist())) == 5 and set(blob.tolist()) == {0, 1, 2}


def _on_circle(angles_deg: list[float], scale: float = 3.0) -> np.ndarray:
    """Points on the unit circle (ProbCover normalises; the scale must not matter)."""
    a = np.radians(angles_deg)
    return scale * np.c_[np.cos(a), np.sin(a)]


def test_probcover_radius_keeps_95_percent_of_the_balls_pure():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    pool = _on_circle(list(rng.normal(0, 8, 60)) + list(rng.normal(120, 8, 60)))  # two arcs, 120 degrees apart
    delta = probcover_radius(pool, 2, np.random.default_rng(1))
    unit = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    arc = np.r_[np.zeros(60, int), np.ones(60, int)]  # k-means finds the two arcs
    d = cdist(unit, unit)
    to_other = np.where(arc[:, None] != arc[None, :], d, np.inf).min(axis=1)
    assert delta == pytest.approx(np.quantile(to_other, 0.05))
    pure = [(d[i, arc != arc[i]] >= delta).all() for i in range(120)]
    assert np.mean(pure) >= 0.95 and np.mean(pure) < 1.0  # the largest such radius: one step more loses purity


def test_probcover_covers_the_densest_uncovered_ball_first_then_fills_at_random():
    dense, sparse = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18], [100, 104, 108]
    pool = _on_circle(dense + sparse)
    delta = 2 * np.sin(np.radians(10))  # the chord of 20 degrees: a ball at 8 degrees covers the whole dense arc
    pos, gain = probcover(pool, None, 3, delta, np.random.default_rng(0))
    assert pos[0] in range(10) and pos[1] in (10, 11, 12)  # the dense arc's ball first, then the sparse arc's
    assert gain.tolist() == [10.0, 3.0, 0.0]  # then everything is covered: a random pick, scored 0
    assert pos[2] not in pos[:2]
    # a labeled point in the dense arc covers it: the first query goes to the sparse arc
    pos, _ = select("probcover", 1, np.random.default_rng(0), embeddings=pool,
                    labeled_embeddings=_on_circle([9.0]), probs=np.full((13, 2), 0.5))
    assert pos[0] in (10, 11, 12)
    with pytest.raises(ValueError, match="probcover needs pool embeddings"):
        select("probcover", 2, np.random.default_rng(0), probs=PROBS)


def test_gradient_embedding_is_the_last_layer_gradient_at_the_predicted_label():
    g = gradient_embedding(np.array([[0.7, 0.2, 0.1]]), np.array([[1.0, 2.0]]))
    np.testing.assert_allclose(g, [[-0.3, -0.6, 0.2, 0.4, 0.1, 0.2]])  # (p - onehot) outer h, class-major
    with pytest.raises(ValueError, match="embeddings must have shape"):
        gradient_embedding(np.full((3, 2), 0.5), np.ones((2, 4)))


def test_badge_spreads_its_batch_where_top_k_uncertainty_piles_into_one_cluster():
    rng = np.random.default_rng(0)
    # cluster A: 20 cells at p = (0.5, 0.5); cluster B: 20 cells slightly more confident, features orthogonal to A's
    feats = np.concatenate([[1.0, 0.0] + 0.01 * rng.normal(size=(20, 2)), [0.0, 1.0] + 0.01 * rng.normal(size=(20, 2))])
    probs = np.concatenate([np.tile([0.5, 0.5], (20, 1)), np.tile([0.6, 0.4], (20, 1))])
    assert set(top_k(margin(probs), 2) // 20) == {0}  # pure uncertainty: both from A
    for seed in range(20):
        pos, norms = select("badge", 2, np.random.default_rng(seed), probs=probs, embeddings=feats)
        assert sorted(pos // 20) == [0, 1]  # one from each cluster
        np.testing.assert_allclose(norms, np.linalg.norm(gradient_embedding(probs, feats)[pos], axis=1))
    a, _ = select("badge", 5, np.random.default_rng(3), probs=probs, embeddings=feats)
    b, _ = select("badge", 5, np.random.default_rng(3), probs=probs, embeddings=feats)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 5


def test_badge_draws_zero_gradient_cells_last_and_at_random():
    probs = np.concatenate([np.tile([1.0, 0.0], (8, 1)), np.tile([0.5, 0.5], (2, 1))])  # 8 certain, 2 uncertain
    feats = np.random.default_rng(0).normal(size=(10, 3))
    pos, norms = badge(probs, feats, 5, np.random.default_rng(0))
    assert set(pos[:2].tolist()) == {8, 9} and (norms[:2] > 0).all()
    assert len(set(pos.tolist())) == 5 and set(pos[2:].tolist()) <= set(range(8)) and (norms[2:] == 0).all()
    # identical gradients: k-means++ has nothing left to spread over, the rest of the batch is random and distinct
    pos, _ = badge(np.full((6, 2), 0.5), np.ones((6, 3)), 4, np.random.default_rng(1))
    assert len(set(pos.tolist())) == 4
    with pytest.raises(ValueError, match="badge needs pool embeddings"):
        select("badge", 2, np.random.default_rng(0), probs=PROBS)


def test_typiclust_query_needs_embeddings():
    with pytest.raises(ValueError, match="typiclust needs pool embeddings"):
        select("typiclust", 2, np.random.default_rng(0), probs=PROBS)


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown active learning strategy 'bogus'"):
        select("bogus", 1, np.random.default_rng(0), probs=PROBS)
    assert set(STRATEGIES) >= {"random", "margin", "bald", "power_bald", "coreset"}
