"""Simulated pool-based active learning campaigns on the one engine.

A campaign (one strategy, one seed) runs ``al.rounds + 1`` rounds::

    initial set (class-balanced random, or typicality cold start)  -> the oracle labels it
    repeat: train from scratch on the labeled cells (fixed recipe, strong augmentation, no validation peeking)
            -> evaluate on the fixed test split -> score a random subsample of the unlabeled pool (no augmentation)
            -> acquire ``al.query_size`` cells -> the oracle labels them

The pool is the ``al.pool`` splits (default: the training split, whose labels stay hidden until queried) limited
to the cells the oracle can answer; the test split is never in it. Oracle answers of "none of the classes"
(``NO_CLASS``) cost a label and train nothing. Round ``r``'s model and the initial set are the same for every
strategy at a given seed (except ``typiclust``, whose cold start is its own typicality selection), so strategies
are compared on paired runs. Weights are reset every round (a model
trained from scratch on the labeled set), as the robust AL baselines recommend.

``run_campaign`` returns one curve row per round; :func:`full_data_reference` trains the same recipe on the whole
oracle-labeled pool (the 100 % labels reference of the summary).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training.active.acquisition import (
    NEEDS_EMBEDDINGS,
    NEEDS_LABELED_EMBEDDINGS,
    NEEDS_SAMPLES,
    STRATEGIES,
    check_strategy,
    select,
    typiclust,
)
from training.active.oracle import NO_CLASS
from training.config import Params
from training.data.loader import loader_for
from training.data.streams import check_weights, sample_order, training_stream
from training.engine import fit, predict, seed_everything
from training.errors import ConfigError, DataError, TrainingError
from training.evaluation.metrics import calibration_report, classification_report
from training.models.factory import build_model
from training.regimes.objectives import build_objective
from training.regimes.semisupervised import balance_for

log = logging.getLogger(__name__)
CURVE_COLUMNS = ["strategy", "seed", "round", "n_labels", "n_trained", "balanced_accuracy", "macro_f1", "nll",
                 "accuracy", "seconds_train", "seconds_score", "seconds_eval"]
QUERY_COLUMNS = ["strategy", "seed", "round", "source_file", "cell_id", "score", "label"]


# -- data in memory -----------------------------------------------------------------------------------------
class TensorLoader:
    """Engine batches from preprocessed images in memory; with ``steps`` it cycles (reshuffled) to that many
    batches per epoch, shuffling from ``(seed, epoch, pass)``."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | None, batch_size: int, shuffle: bool = False,
                 seed: int = 0, steps: int | None = None):
        self.images = images
        n = len(images)
        self.labels = torch.as_tensor(np.full(n, -1) if labels is None else np.asarray(labels), dtype=torch.int64)
        self.batch_size, self.shuffle, self.seed, self.steps, self.epoch = max(1, batch_size), shuffle, seed, steps, 0
        self.weights: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_weights(self, weights: np.ndarray | None) -> None:
        """Per-image sampling probabilities: each pass then draws ``len(images)`` with replacement from them
        (``training.data.streams.sample_order``) instead of shuffling; None: back to shuffling."""
        self.weights = check_weights(weights, len(self.images))

    def __len__(self) -> int:
        return self.steps if self.steps is not None else math.ceil(len(self.images) / self.batch_size)

    def _order(self, p: int) -> np.ndarray:
        n = len(self.images)
        if self.weights is not None:
            return sample_order(self.weights, self.seed, self.epoch, p)
        return np.random.default_rng([self.seed, self.epoch, p]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict]:
        n, b = len(self.images), self.batch_size
        if n == 0:
            return
        made, p = 0, 0
        while True:
            order = self._order(p)
            stop = n if self.steps is None or n < b else n // b * b  # cycling: full batches only
            for s in range(0, stop, b):
                sel = torch.as_tensor(order[s : s + b])
                yield {"image": self.images[sel], "label": self.labels[sel], "idx": sel}
                made += 1
                if self.steps is not None and made >= self.steps:
                    return
            if self.steps is None:
                return
            p += 1


def read_images(table: pd.DataFrame, params: Params, channels: list[str]) -> torch.Tensor:
    """Preprocessed images of ``table``'s cells, in table order (streamed in contiguous runs)."""
    loader = loader_for(table.reset_index(drop=True), params.data, channels, shuffle=False, seed=0, cache=False,
                        batch_size=params.score.batch_size)
    out: torch.Tensor | None = None
    for batch in loader:
        if out is None:
            out = torch.empty((len(table), *batch["image"].shape[1:]), dtype=torch.float32)
        out[batch["idx"]] = batch["image"]
    if out is None:
        raise DataError("no cells to read")
    return out


class PoolImages:
    """Images of pool cells by pool position: read on demand; all kept when the pool is small (``keep_all``),
    else only those handed to :meth:`keep` (the labeled cells)."""

    def __init__(self, pool: pd.DataFrame, params: Params, channels: list[str], keep_all: bool):
        self.pool, self.params, self.channels, self.keep_all = pool, params, channels, keep_all
        self.cache: dict[int, torch.Tensor] = {}

    def get(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        missing = np.array([p for p in positions if int(p) not in self.cache], dtype=np.int64)
        fresh: dict[int, torch.Tensor] = {}
        if missing.size:
            imgs = read_images(self.pool.iloc[missing], self.params, self.channels)
            fresh = {int(p): imgs[i] for i, p in enumerate(missing)}
            if self.keep_all:
                self.cache.update(fresh)
        return torch.stack([self.cache[int(p)] if int(p) in self.cache else fresh[int(p)] for p in positions])

    def keep(self, positions: np.ndarray, images: torch.Tensor) -> None:
        for i, p in enumerate(np.asarray(positions, dtype=np.int64)):
            self.cache[int(p)] = images[i]


# -- pieces of a round --------------------------------------------------------------------------------------
def pool_table(data, params: Params, oracle) -> pd.DataFrame:
    """The campaign's pool: cells of the ``al.pool`` splits that the oracle can answer (never test cells), drawn
    down to ``al.pool_shares`` when those are set."""
    pool = data.cells[data.cells["split"].isin(params.al.pool)].reset_index(drop=True)
    if pool.empty:
        raise DataError(f"the pool is empty: no cells in split(s) {', '.join(params.al.pool)}")
    can = oracle.available(pool)
    if not can.any():
        raise DataError(f"the oracle ({oracle.kind}) can label none of the {len(pool)} pool cells "
                        f"(al.pool={params.al.pool})")
    pool = pool[can].reset_index(drop=True)
    if params.al.pool_shares:
        pool = pool.iloc[share_positions(pool["y"].to_numpy(), list(data.classes), params.al.pool_shares,
                                         np.random.default_rng([params.al.seed, 5]))].reset_index(drop=True)
    return pool


def share_positions(y: np.ndarray, classes: list[str], shares: dict[str, float],
                    rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of the largest subset of cells (slide classes ``y``, indices into ``classes``) in which
    class ``c`` makes up ``shares[c]`` (rounded down to whole cells)."""
    if set(shares) != set(classes):
        missing, unknown = sorted(set(classes) - set(shares)), sorted(set(shares) - set(classes))
        raise ConfigError(f"al.pool_shares must give a share for each class of the campaign ({', '.join(classes)}); "
                          + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                      (("missing", missing), ("unknown", unknown)) if names))
    if (y < 0).any():
        raise DataError(f"al.pool_shares needs a slide class for every pool cell; {int((y < 0).sum())} have none "
                        f"(al.pool includes unlabeled cells?)")
    available = {c: np.nonzero(y == i)[0] for i, c in enumerate(classes)}
    size = min(len(available[c]) / shares[c] for c in classes)
    take = {c: int(math.floor(shares[c] * size + 1e-9)) for c in classes}
    if not all(take.values()):
        raise DataError(f"al.pool_shares {shares} leave a class without pool cells (available: "
                        + ", ".join(f"{c} {len(available[c])}" for c in classes) + ")")
    return np.sort(np.concatenate([rng.choice(available[c], take[c], replace=False) for c in classes]))


def check_budget(params: Params, n_pool: int) -> int:
    al = params.al
    budget = al.initial + al.rounds * al.query_size
    if budget > n_pool:
        raise ConfigError(f"label budget al.initial + al.rounds x al.query_size = {al.initial} + {al.rounds} x "
                          f"{al.query_size} = {budget} exceeds the pool of {n_pool} cells (al.pool={al.pool})")
    return budget


def round_seed(params: Params, seed: int, rnd: int) -> int:
    """Training seed of round ``rnd``: the same for every strategy (paired comparison)."""
    return params.train.seed + 100_003 * seed + 101 * rnd


def train_models(images: torch.Tensor, labels: np.ndarray, params: Params, seed: int, n_classes: int,
                 unlabeled: torch.Tensor | None = None) -> list[nn.Module]:
    """``al.members`` models trained from scratch on the labeled cells (``labels`` >= 0) with the round recipe:
    ``al.epochs`` epochs of ``al.batch_size``, at least ``al.min_steps`` steps, standard augmentation, no early
    stopping. With ``unlabeled`` images, the semi-supervised regime (``ssl.method``: FixMatch or the autoencoder) on
    them. Objective and stream come from the same builders as ``spatial train``."""
    al = params.al
    use = labels >= 0
    x, y = images[torch.as_tensor(use)], labels[use]
    if len(y) == 0:
        raise TrainingError("no labeled cell of a configured class to train on (the oracle answered 'none of "
                            "these' for every query)")
    semi = unlabeled is not None and len(unlabeled) > 0
    p = params.model_copy(update={"train": params.train.model_copy(
        update={"regime": "semisupervised" if semi else "supervised"})})
    b = min(al.batch_size, len(y))
    steps = max(math.ceil(len(y) / b), math.ceil(al.min_steps / al.epochs))
    size = images.shape[-1]
    models = []
    for m in range(al.members):
        s = seed + 7919 * m
        cfg = p.train.model_copy(update={"seed": s, "epochs": al.epochs, "patience": None,
                                        "max_steps_per_epoch": None})
        seed_everything(s)
        model = build_model(params.model, images.shape[1], n_classes)
        objective = build_objective(p, y, n_classes, images.shape[1], size)
        u_loader, rebalance = None, None
        if semi:
            ub = min(params.ssl.unlabeled_ratio * b, len(unlabeled))
            u_loader = TensorLoader(unlabeled, None, ub, shuffle=True, seed=s + 1, steps=steps)
            if params.ssl.balance_unlabeled == "predicted":
                pool = TensorLoader(unlabeled, None, params.score.batch_size)
                rebalance = balance_for(p, objective, model, pool, len(unlabeled))
        loader = training_stream(TensorLoader(x, y, b, shuffle=True, seed=s, steps=steps), steps, u_loader, rebalance)
        fit(model, loader, None, cfg, objective, n_classes, progress=False, steps_per_epoch=steps)
        models.append(model.eval())
    return models


def posterior(models: list[nn.Module], images: torch.Tensor, params: Params, samples: bool = False,
              features: bool = False) -> dict[str, np.ndarray]:
    """``probs`` (N, K) mean over models; ``samples`` (S, N, K) from the ensemble members (``al.posterior=
    ensemble`` with several members) or MC dropout; ``features`` (N, D) of the first model. No augmentation."""
    loader = TensorLoader(images, None, params.score.batch_size)
    use_mc = samples and not (params.al.posterior == "ensemble" and len(models) > 1)
    member_probs, feats, mc = [], None, None
    for i, model in enumerate(models):
        out = predict(model, loader, with_features=features and i == 0)
        member_probs.append(torch.as_tensor(out["logits"]).softmax(-1).numpy())
        if i == 0 and features:
            feats = out["features"]
        if i == 0 and use_mc:
            mc = torch.as_tensor(predict(model, loader, mc_dropout=params.al.mc_samples, with_features=False)[
                "logits"]).softmax(-1).numpy()
    stack = np.stack(member_probs)
    res = {"probs": stack.mean(0)}
    if samples:
        res["samples"] = mc if use_mc else stack
    if features:
        res["features"] = feats
    return res


def test_metrics(models: list[nn.Module], images: torch.Tensor, y: np.ndarray, classes: list[str],
                 params: Params) -> dict[str, float]:
    probs = posterior(models, images, params)["probs"]
    rep = classification_report(probs, y, classes)
    cal = calibration_report(probs, y)
    return {"balanced_accuracy": rep["balanced_accuracy"], "macro_f1": rep["macro_f1"], "accuracy": rep["accuracy"],
            "nll": cal["nll"]}


def cold_start_embeddings(images: torch.Tensor, params: Params, seed: int) -> np.ndarray:
    """Features of the configured architecture before any label (cold start): randomly initialised, or the encoder
    ``model.pretrained`` names (e.g. `spatial pretrain`'s)."""
    torch.manual_seed(seed)
    model = build_model(params.model, images.shape[1], 2)
    feats = predict(model, TensorLoader(images, None, params.score.batch_size), with_features=True)["features"]
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    return feats


def initial_method(params: Params, strategy: str) -> str:
    """The cold start of a campaign: ``typiclust`` always starts from its own typicality selection (the strategy is
    the whole low-budget recipe), every other strategy from ``al.initial_method``."""
    return "typicality" if strategy == "typiclust" else params.al.initial_method


def initial_set(pool: pd.DataFrame, store: PoolImages, params: Params, rng: np.random.Generator,
                method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the initial labeled set and their scores (typicality, or NaN for random).

    ``method`` defaults to ``al.initial_method``. ``random`` is class-balanced over the slide labels the pool carries (known without an annotator: the
    condition of a control slide); cells without one form one more group."""
    n = params.al.initial
    if (method or params.al.initial_method) == "typicality":
        cand = _subsample(np.arange(len(pool)), params.al.pool_subsample, rng)
        emb = cold_start_embeddings(store.get(cand), params, int(rng.integers(2**31 - 1)))
        pos, typ = typiclust(emb, n, rng, params.al.typicality_neighbors)
        return cand[pos], typ
    groups = pool["y"].to_numpy() if "y" in pool else np.full(len(pool), -1)
    return _balanced(groups, n, rng), np.full(n, np.nan)


def _balanced(groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    members = {g: rng.permutation(np.nonzero(groups == g)[0]) for g in np.unique(groups)}
    take = dict.fromkeys(members, 0)
    left = n
    while left:
        open_ = [g for g in members if take[g] < len(members[g])]
        share = max(1, left // len(open_))
        for g in rng.permutation(open_):
            k = min(share, len(members[g]) - take[g], left)
            take[g] += k
            left -= k
            if not left:
                break
    return np.concatenate([members[g][: take[g]] for g in members]).astype(np.int64)


def _subsample(positions: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    if size is None or len(positions) <= size:
        return positions
    return np.sort(rng.choice(positions, size, replace=False))


# -- the campaign -------------------------------------------------------------------------------------------
def run_campaign(params: Params, data, strategy: str, seed: int, oracle, out_dir: str | Path | None = None,
                 report: Callable[[dict], None] | None = None, progress: bool = True) -> pd.DataFrame:
    """One campaign; returns its curve rows (``CURVE_COLUMNS``). The queried cells are in ``.attrs["queries"]``
    (``QUERY_COLUMNS``); ``report(row)`` is called after every round (MLflow, Ray Tune); with ``out_dir`` the
    campaign's ``curve.csv`` and ``queries.parquet`` are written under ``out_dir/<strategy>_seed<seed>/``."""
    check_strategy(strategy)
    al = params.al
    classes = list(data.classes)
    pool = pool_table(data, params, oracle)
    check_budget(params, len(pool))
    test = data.split("test")
    if test.empty:
        raise DataError("the split has no test cells: the campaign needs a fixed test set")
    test_images, test_y = read_images(test, params, data.channels), test["y"].to_numpy()
    store = PoolImages(pool, params, data.channels, keep_all=al.pool_subsample is None
                       or len(pool) <= al.pool_subsample)
    strategy_id = STRATEGIES.index(strategy)

    labeled, scores = initial_set(pool, store, params, np.random.default_rng([al.seed, seed, 0]),
                                  initial_method(params, strategy))
    answers = oracle.label(pool.iloc[labeled])
    queries = [_query_rows(strategy, seed, 0, pool, labeled, scores, answers, classes)]
    rows: list[dict] = []
    bar = tqdm(range(al.rounds + 1), desc=f"{strategy} seed {seed}", unit="round", disable=not progress)
    for rnd in bar:
        t0 = time.perf_counter()
        lab_images = store.get(labeled)
        store.keep(labeled, lab_images)
        unl = None
        if al.semisupervised:
            rest = np.setdiff1d(np.arange(len(pool)), labeled)
            unl = store.get(_subsample(rest, al.pool_subsample, np.random.default_rng([seed, rnd, 3])))
        models = train_models(lab_images, answers, params, round_seed(params, seed, rnd), len(classes), unl)
        t1 = time.perf_counter()
        metrics = test_metrics(models, test_images, test_y, classes, params)
        t2 = time.perf_counter()
        new, t_score = None, 0.0
        if rnd < al.rounds:
            new, new_scores = acquire(strategy, models, pool, store, labeled, params,
                                      np.random.default_rng([seed, rnd, 2]),
                                      np.random.default_rng([al.seed, seed, strategy_id, rnd, 1]))
            t_score = time.perf_counter() - t2
        row = {"strategy": strategy, "seed": seed, "round": rnd, "n_labels": len(labeled),
               "n_trained": int((answers >= 0).sum()), **metrics, "seconds_train": t1 - t0,
               "seconds_score": t_score, "seconds_eval": t2 - t1}
        rows.append(row)
        if report is not None:
            report(dict(row))
        bar.set_postfix(n=len(labeled), bacc=f"{metrics['balanced_accuracy']:.3f}")
        if new is not None:
            new_answers = oracle.label(pool.iloc[new])
            queries.append(_query_rows(strategy, seed, rnd + 1, pool, new, new_scores, new_answers, classes))
            labeled = np.concatenate([labeled, new])
            answers = np.concatenate([answers, new_answers])
    bar.close()
    curve = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    qtable = pd.concat(queries, ignore_index=True)
    if out_dir is not None:
        d = Path(out_dir) / f"{strategy}_seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        curve.to_csv(d / "curve.csv", index=False)
        qtable.to_parquet(d / "queries.parquet", index=False)
    curve.attrs["queries"] = qtable
    return curve


def acquire(strategy: str, models: list[nn.Module], pool: pd.DataFrame, store: PoolImages, labeled: np.ndarray,
            params: Params, sub_rng: np.random.Generator, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pool positions of the next ``al.query_size`` queries (never already labeled) and their scores."""
    al = params.al
    rest = np.setdiff1d(np.arange(len(pool)), labeled)
    k = min(al.query_size, len(rest))
    if strategy == "random":
        pos, scores = select("random", k, rng, n_pool=len(rest))
        return rest[pos], scores
    cand = _subsample(rest, al.pool_subsample, sub_rng)
    images = store.get(cand)
    post = posterior(models, images, params, samples=strategy in NEEDS_SAMPLES, features=strategy in NEEDS_EMBEDDINGS)
    lab_emb = None
    if strategy in NEEDS_LABELED_EMBEDDINGS:
        lab_emb = posterior(models[:1], store.get(labeled), params, features=True)["features"]
    pos, scores = select(strategy, k, rng, probs=post["probs"], samples=post.get("samples"),
                         embeddings=post.get("features"), labeled_embeddings=lab_emb,
                         temperature=al.power_temperature, neighbors=al.typicality_neighbors)
    store.keep(cand[pos], images[torch.as_tensor(pos)])
    return cand[pos], scores


def _query_rows(strategy: str, seed: int, rnd: int, pool: pd.DataFrame, pos: np.ndarray, scores: np.ndarray,
                answers: np.ndarray, classes: list[str]) -> pd.DataFrame:
    cells = pool.iloc[pos]
    return pd.DataFrame({
        "strategy": strategy, "seed": seed, "round": rnd, "source_file": cells["source_file"].astype(str).to_numpy(),
        "cell_id": cells["cell_id"].to_numpy(np.int64), "score": np.asarray(scores, dtype=np.float64),
        "label": [classes[a] if a != NO_CLASS else None for a in answers],
    }, columns=QUERY_COLUMNS)


def full_data_reference(params: Params, data, seed: int, oracle, progress: bool = True) -> dict:
    """The round recipe trained on every pool cell the oracle labels (100 % of the labels), on the test set."""
    pool = pool_table(data, params, oracle)
    test = data.split("test")
    if test.empty:
        raise DataError("the split has no test cells: the campaign needs a fixed test set")
    answers = oracle.label(pool)
    t0 = time.perf_counter()
    images = read_images(pool, params, data.channels)
    models = train_models(images, answers, params, round_seed(params, seed, 0), len(data.classes))
    metrics = test_metrics(models, read_images(test, params, data.channels), test["y"].to_numpy(), data.classes,
                           params)
    if progress:
        tqdm.write(f"full data seed {seed}: {len(pool)} labels, balanced accuracy {metrics['balanced_accuracy']:.3f}")
    return {"seed": seed, "n_labels": len(pool), "n_trained": int((answers >= 0).sum()), **metrics,
            "seconds": time.perf_counter() - t0}
