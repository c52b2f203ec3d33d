"""Acquisition functions for pool-based active learning: pure NumPy / scikit-learn, no model code.

Inputs are posteriors over the scored pool: ``probs`` (N, K) class probabilities, or ``samples`` (S, N, K)
(ensemble members or MC-dropout passes) for BALD; ``embeddings`` (N, D) for the core-set. Every score is
"higher = more informative". :func:`select` returns pool positions and the score each was picked with.

* ``least_confidence``: 1 - max p; ``margin``: 1 - (p1 - p2) (the smallest gap scores highest); ``entropy``.
* ``bald``: mutual information between the label and the model, H[mean p] - mean H[p] (0 when members agree).
* ``power_margin`` / ``power_bald``: sample without replacement with probability ~ score^(1/T) (stochastic batch
  acquisition: top-k of a batch picks near-duplicates; sampling keeps the batch diverse). Gumbel-top-k on
  log scores, reproducible from the generator.
* ``balanced_bald``: ``power_bald`` within each predicted class, the batch split equally over the classes the model
  predicts (a class with too few pool cells passes its share on). Uncertainty sampling on a model trained on a few
  dozen cells piles its queries into the classes it confuses and starves the others; balanced accuracy, and the
  next round's model, need every class.
* ``coreset``: k-center greedy on embeddings (each pick is the pool point farthest from the labeled set and the
  points picked so far).
* ``typiclust``: TypiClust (Hacohen, Dekel & Weinshall, ICML 2022), the low-budget strategy: k-means on the labeled
  and pool embeddings into ``|labeled| + k`` clusters, then the most typical pool point (highest typicality within
  its cluster) of each of the largest clusters that hold no labeled point. It needs no class probabilities, so it
  does not depend on a model that has not yet converged; its cold start is :func:`typiclust`.
* ``probcover``: ProbCover (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022), the other low-budget strategy: on
  L2-normalised embeddings, balls of radius delta (the largest at which 95 % of the balls hold points of one k-means
  cluster, k = classes); greedily the pool point whose ball covers the most points no labeled or picked point covers
  yet (random once everything is covered).
* ``badge``: BADGE (Ash et al., ICLR 2020): each pool cell's gradient embedding, the gradient of the cross-entropy
  at the model's own prediction with respect to the last layer, ``(p - onehot(argmax p)) x features`` (its norm is
  the uncertainty, its direction the diversity); then k-means++ seeding (D^2 sampling, scikit-learn's
  ``kmeans_plusplus`` with one trial per centre) picks the batch. Uncertainty and diversity in one draw, with no
  temperature to tune; the systematic low-budget benchmarks (Lüth et al., 2023) found it the most robust query
  method (on this simulator it did not beat random on unseen configurations: benchmarks/FINDINGS.md). The features
  are a campaign's first member's (``spatial al``) or the members' mean (``spatial query``).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from training.uncertainty.decompose import decompose
from training.uncertainty.decompose import entropy as _entropy
from training.uncertainty.novelty import l2_normalize

STRATEGIES = (
    "random", "least_confidence", "margin", "entropy", "bald", "power_margin", "power_bald", "balanced_bald", "coreset",
    "typiclust", "probcover", "badge",
)  # append only: a strategy's position seeds its queries (training.active.campaign)
NEEDS_SAMPLES = frozenset({"bald", "power_bald", "balanced_bald"})
NEEDS_LABELED_EMBEDDINGS = frozenset({"coreset", "typiclust", "probcover"})
NEEDS_EMBEDDINGS = NEEDS_LABELED_EMBEDDINGS | {"badge"}
PROBCOVER_PURITY = 0.95  # share of pure balls the radius keeps (the paper's alpha)
_EPS = 1e-12
_CHUNK = 8192


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        from training.errors import ConfigError

        raise ConfigError(f"unknown active learning strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return name


def _probs(p: np.ndarray, ndim: int = 2) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != ndim or a.shape[-1] < 1:
        raise ValueError(f"expected class probabilities with {ndim} dims (..., K), got shape {a.shape}")
    return a


def least_confidence(probs: np.ndarray) -> np.ndarray:
    return 1.0 - _probs(probs).max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (largest - second largest probability): higher = closer call."""
    p = _probs(probs)
    if p.shape[1] < 2:
        return np.zeros(p.shape[0])
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy (nats) of (N, K) probabilities (:func:`training.uncertainty.decompose.entropy`)."""
    return _entropy(_probs(probs), axis=1)


def bald(samples: np.ndarray) -> np.ndarray:
    """Mutual information (nats) from (S, N, K) posterior samples; >= 0, and 0 when all samples agree: the
    epistemic part of :func:`training.uncertainty.decompose.decompose`."""
    return decompose(_probs(samples, ndim=3))["epistemic"]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores (ties: the lower position first)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s, kind="stable")[:k]


def power_sample(scores: np.ndarray, k: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``k`` positions drawn without replacement with probability ~ score^(1/temperature) (Gumbel-top-k).

    Zero scores get a tiny weight: they are drawn only after every positive score."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = np.clip(np.asarray(scores, dtype=np.float64), _EPS, None)
    keys = np.log(s) / temperature + rng.gumbel(size=s.shape)
    return np.argsort(-keys, kind="stable")[:k]


def class_quotas(predicted: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    """``k`` picks split as equally as possible over ``n_classes`` predicted classes, none above a class's pool
    count; what a class cannot fill goes to the classes with cells left (the larger remainders first)."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=n_classes)
    k = min(int(k), int(counts.sum()))
    quota = np.zeros(n_classes, dtype=np.int64)
    while quota.sum() < k:
        room = counts - quota
        open_ = np.nonzero(room > 0)[0]
        share = (k - int(quota.sum())) // len(open_)
        if share == 0:  # fewer picks left than open classes: one more each, the classes with most room first
            for c in open_[np.argsort(-room[open_], kind="stable")][: k - int(quota.sum())]:
                quota[c] += 1
            break
        quota[open_] += np.minimum(share, room[open_])
    return quota


def balanced_power_sample(scores: np.ndarray, probs: np.ndarray, k: int, temperature: float,
                          rng: np.random.Generator) -> np.ndarray:
    """``power_sample`` within each predicted class of ``probs`` (N, K), ``class_quotas`` picks from each."""
    predicted = _probs(probs).argmax(axis=1)
    quotas = class_quotas(predicted, probs.shape[1], k)
    picks = []
    for c, q in enumerate(quotas):
        if q:
            members = np.nonzero(predicted == c)[0]
            picks.append(members[power_sample(scores[members], int(q), temperature, rng)])
    return np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)


def k_center_greedy(embeddings: np.ndarray, labeled: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center: ``k`` pool positions and, for each, its distance to the nearest centre when picked.

    Centres start as the ``labeled`` embeddings; with none, the first pick is the pool point nearest the pool mean.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {x.shape}")
    n = x.shape[0]
    k = min(k, n)
    if labeled is not None and len(labeled):
        lab = np.asarray(labeled, dtype=np.float64)
        nearest = np.full(n, np.inf)
        for i in range(0, lab.shape[0], _CHUNK):
            nearest = np.minimum(nearest, cdist(x, lab[i : i + _CHUNK]).min(axis=1))
    else:
        nearest = np.full(n, np.inf)
    chosen = np.empty(k, dtype=np.int64)
    dist = np.empty(k)
    for j in range(k):
        if np.isinf(nearest).all():
            pick = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
        else:
            pick = int(np.argmax(nearest))
        chosen[j], dist[j] = pick, nearest[pick]
        nearest = np.minimum(nearest, np.sqrt(((x - x[pick]) ** 2).sum(axis=1)))
        nearest[pick] = -1.0  # never again
    return chosen, dist


def typicality(embeddings: np.ndarray, neighbors: int = 20) -> np.ndarray:
    """TypiClust typicality: 1 / mean distance to the ``neighbors`` nearest other points (higher = denser)."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(embeddings, dtype=np.float64)
    k = min(neighbors, x.shape[0] - 1)
    if k < 1:
        return np.ones(x.shape[0])
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + _EPS)


def typiclust(embeddings: np.ndarray, n: int, rng: np.random.Generator, neighbors: int = 20
              ) -> tuple[np.ndarray, np.ndarray]:
    """Cold start: k-means into ``n`` clusters, the most typical point of each (Hacohen et al., 2022).

    Returns positions and their typicality. Clusters are visited largest first."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(embeddings, dtype=np.float64)
    n = min(n, x.shape[0])
    seed = int(rng.integers(2**31 - 1))
    km = (KMeans(n, n_init=1, random_state=seed) if n <= 50 or x.shape[0] <= 5000
          else MiniBatchKMeans(n, n_init=3, random_state=seed, batch_size=4096))
    clusters = km.fit_predict(x)
    typ = typicality(x, neighbors)
    sizes = np.bincount(clusters, minlength=n)
    chosen: list[int] = []
    for c in np.argsort(-sizes, kind="stable"):
        members = np.nonzero(clusters == c)[0]
        if members.size:
            chosen.append(int(members[np.argmax(typ[members])]))
    if len(chosen) < n:  # empty clusters: fill with the most typical points left
        rest = np.setdiff1d(np.argsort(-typ, kind="stable"), chosen, assume_unique=False)
        chosen += [int(i) for i in rest[: n - len(chosen)]]
    pos = np.asarray(chosen[:n], dtype=np.int64)
    return pos, typ[pos]


def typiclust_query(embeddings: np.ndarray, labeled: np.ndarray | None, k: int, rng: np.random.Generator,
                    neighbors: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """TypiClust in a later round: ``k`` pool positions and their typicality.

    The pool ``embeddings`` (N, D) and the ``labeled`` ones (M, D) are clustered together into ``M + k`` clusters
    (k-means); clusters are visited by fewest labeled members, then largest (so first the largest clusters no label
    covers yet), and each gives its pool point of highest typicality within the cluster (1 / mean distance to its
    ``neighbors`` nearest cluster mates). Too few clusters with pool points: the most typical pool points left."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {x.shape}")
    lab = (np.empty((0, x.shape[1])) if labeled is None or not len(labeled)
           else np.asarray(labeled, dtype=np.float64).reshape(-1, x.shape[1]))
    n, m = x.shape[0], lab.shape[0]
    k = min(k, n)
    both = np.concatenate([lab, x])
    n_clusters = min(m + k, both.shape[0])
    seed = int(rng.integers(2**31 - 1))
    km = (KMeans(n_clusters, n_init=1, random_state=seed) if n_clusters <= 50 or both.shape[0] <= 5000
          else MiniBatchKMeans(n_clusters, n_init=3, random_state=seed, batch_size=4096))
    clusters = km.fit_predict(both)
    lab_c, pool_c = clusters[:m], clusters[m:]
    covered = np.bincount(lab_c, minlength=n_clusters)
    sizes = np.bincount(clusters, minlength=n_clusters)
    typ = np.zeros(n)
    chosen: list[int] = []
    for c in np.lexsort((-sizes, covered)):  # fewest labels first, then largest
        if len(chosen) >= k:
            break
        members = np.nonzero(pool_c == c)[0]
        if not members.size:
            continue
        mates = both[clusters == c]
        nn = min(neighbors, mates.shape[0] - 1)
        if nn >= 1:
            d = cdist(x[members], mates)
            d.sort(axis=1)
            typ[members] = 1.0 / (d[:, 1 : nn + 1].mean(axis=1) + _EPS)  # column 0: the point itself
        else:
            typ[members] = 1.0
        chosen.append(int(members[np.argmax(typ[members])]))
    if len(chosen) < k:
        glob_typ = typicality(x, neighbors)
        rest = [int(i) for i in np.argsort(-glob_typ, kind="stable") if int(i) not in set(chosen)]
        for i in rest[: k - len(chosen)]:
            typ[i] = glob_typ[i]
            chosen.append(i)
    pos = np.asarray(chosen, dtype=np.int64)
    return pos, typ[pos]


def probcover_radius(embeddings: np.ndarray, n_classes: int, rng: np.random.Generator,
                     purity: float = PROBCOVER_PURITY) -> float:
    """ProbCover's ball radius: the largest delta at which a share ``purity`` of the points' delta-balls (L2-normalised
    embeddings) hold no point of another k-means cluster (``n_classes`` clusters stand in for the unknown classes).
    A ball is pure while delta is at most the distance to the nearest point of another cluster, so delta is that
    distance's (1 - purity) quantile."""
    from sklearn.cluster import KMeans
    from sklearn.neighbors import NearestNeighbors

    x = l2_normalize(embeddings)
    if n_classes < 2 or x.shape[0] <= n_classes:
        raise ValueError(f"probcover needs more than {n_classes} points and at least 2 classes")
    clusters = KMeans(n_classes, n_init=3, random_state=int(rng.integers(2**31 - 1))).fit_predict(x)
    other = np.full(x.shape[0], np.inf)
    for c in np.unique(clusters):
        inside = clusters == c
        if inside.all():
            continue
        dist, _ = NearestNeighbors(n_neighbors=1).fit(x[~inside]).kneighbors(x[inside])
        other[inside] = dist[:, 0]
    return float(np.quantile(other[np.isfinite(other)], 1.0 - purity))


def probcover(embeddings: np.ndarray, labeled: np.ndarray | None, k: int, delta: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """ProbCover's greedy max coverage: ``k`` pool positions and how many uncovered points each covered when picked.

    A point is covered when it lies within ``delta`` of a labeled or picked point (L2-normalised embeddings); each
    pick is the pool point whose ball holds the most uncovered points. Once everything is covered, random pool
    points fill the batch (score 0)."""
    from sklearn.neighbors import NearestNeighbors

    x = l2_normalize(embeddings)
    n = x.shape[0]
    k = min(k, n)
    nn = NearestNeighbors(radius=delta).fit(x)
    graph = nn.radius_neighbors_graph(x, mode="connectivity").tocsr()  # row i: the points i's ball covers
    covered = np.zeros(n, dtype=bool)
    if labeled is not None and len(labeled):
        for idx in nn.radius_neighbors(l2_normalize(np.asarray(labeled).reshape(-1, x.shape[1])), return_distance=False):
            covered[idx] = True
    chosen: list[int] = []
    gains: list[float] = []
    taken = np.zeros(n, dtype=bool)
    while len(chosen) < k:
        gain = np.asarray(graph @ (~covered).astype(np.float64)).ravel()
        gain[taken] = -1.0
        i = int(np.argmax(gain))
        if gain[i] <= 0:
            rest = np.nonzero(~taken)[0]
            fill = rng.choice(rest, size=k - len(chosen), replace=False)
            chosen += [int(j) for j in fill]
            gains += [0.0] * len(fill)
            break
        chosen.append(i)
        gains.append(float(gain[i]))
        taken[i] = True
        covered[graph.indices[graph.indptr[i]:graph.indptr[i + 1]]] = True
    return np.asarray(chosen, dtype=np.int64), np.asarray(gains)


def gradient_embedding(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """BADGE's (N, K x D) gradient embedding: ``(p - onehot(argmax p))`` outer ``features``, per cell."""
    p = _probs(probs)
    h = np.asarray(embeddings, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != p.shape[0]:
        raise ValueError(f"embeddings must have shape (N, D) with N = {p.shape[0]} probability rows, got {h.shape}")
    residual = p.copy()
    residual[np.arange(p.shape[0]), p.argmax(axis=1)] -= 1.0
    return (residual[:, :, None] * h[:, None, :]).reshape(p.shape[0], -1)


def badge(probs: np.ndarray, embeddings: np.ndarray, k: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """BADGE: ``k`` distinct pool positions by k-means++ seeding on the gradient embeddings, and each pick's
    gradient norm. Cells whose gradient is zero (a prediction of probability 1) are drawn last, at random."""
    from sklearn.cluster import kmeans_plusplus

    g = gradient_embedding(probs, embeddings)
    n = g.shape[0]
    k = min(k, n)
    norms = np.linalg.norm(g, axis=1)
    live = np.nonzero(norms > _EPS)[0]
    chosen = np.empty(0, dtype=np.int64)
    if live.size:
        _, picked = kmeans_plusplus(g[live], n_clusters=min(k, live.size), random_state=int(rng.integers(2**31 - 1)),
                                    n_local_trials=1)
        chosen = live[np.unique(picked)]  # D^2 sampling never repeats a point unless every distance left is 0
        chosen = chosen[np.argsort(-norms[chosen], kind="stable")]
    if chosen.size < k:
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=k - chosen.size, replace=False)])
    return chosen.astype(np.int64), norms[chosen]


def scores_for(strategy: str, probs: np.ndarray | None = None, samples: np.ndarray | None = None) -> np.ndarray:
    """The per-cell score a (non-random, non-coreset) strategy ranks by."""
    if strategy in NEEDS_SAMPLES:
        if samples is None:
            raise ValueError(f"{strategy} needs posterior samples (S, N, K)")
        return bald(samples)
    if probs is None:
        raise ValueError(f"{strategy} needs class probabilities (N, K)")
    if strategy == "least_confidence":
        return least_confidence(probs)
    if strategy in ("margin", "power_margin"):
        return margin(probs)
    if strategy == "entropy":
        return entropy(probs)
    raise ValueError(f"no score for strategy '{strategy}'")


def select(strategy: str, k: int, rng: np.random.Generator, n_pool: int | None = None,
           probs: np.ndarray | None = None, samples: np.ndarray | None = None,
           embeddings: np.ndarray | None = None, labeled_embeddings: np.ndarray | None = None,
           temperature: float = 1.0, neighbors: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``k`` distinct pool positions with ``strategy``; returns (positions, their scores).

    ``random`` needs only ``n_pool`` (its scores are NaN)."""
    check_strategy(strategy)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if strategy == "random":
        size = n_pool if n_pool is not None else next(len(a) for a in (probs, embeddings) if a is not None)
        pos = rng.choice(size, size=min(k, size), replace=False)
        return pos.astype(np.int64), np.full(len(pos), np.nan)
    if strategy == "coreset":
        if embeddings is None:
            raise ValueError("coreset needs pool embeddings (N, D)")
        return k_center_greedy(embeddings, labeled_embeddings, k)
    if strategy == "typiclust":
        if embeddings is None:
            raise ValueError("typiclust needs pool embeddings (N, D)")
        return typiclust_query(embeddings, labeled_embeddings, k, rng, neighbors)
    if strategy == "probcover":
        if embeddings is None or probs is None:
            raise ValueError("probcover needs pool embeddings (N, D) and class probabilities (N, K)")
        both = embeddings if labeled_embeddings is None else np.concatenate([labeled_embeddings, embeddings])
        delta = probcover_radius(both, np.asarray(probs).shape[1], rng)
        return probcover(embeddings, labeled_embeddings, k, delta, rng)
    if strategy == "badge":
        if embeddings is None or probs is None:
            raise ValueError("badge needs pool embeddings (N, D) and class probabilities (N, K)")
        return badge(probs, embeddings, k, rng)
    scores = scores_for(strategy, probs, samples)
    if strategy == "balanced_bald":
        classes = probs if probs is not None else np.asarray(samples).mean(axis=0)
        pos = balanced_power_sample(scores, classes, k, temperature, rng)
    elif strategy.startswith("power_"):
        pos = power_sample(scores, k, temperature, rng)
    else:
        pos = top_k(scores, k)
    return pos.astype(np.int64), scores[pos]
