"""Acquisition on the real, unlabeled pool with the current model: which cells should a person label next?

``spatial al`` simulates campaigns with an oracle; here the answer comes from a person (``spatial label``). The pool
is every cell of the cell index (screen slides included) minus the cells already in the labels file and, by
default, minus the fixed test split. A random subsample of ``al.pool_subsample`` pool cells is scored by streaming
them through the trained ensemble (member logits kept, so BALD has its samples), and the same acquisition functions
as the simulated campaigns (:mod:`training.active.acquisition`) pick ``n`` of them.

``label_check`` (query only, not an acquisition function) asks about the cells whose slide label the ensemble disputes:
the pool is restricted to cells whose slide (manifest) label is one of the model's classes, and the score is the
ensemble's probability that the cell is *not* its slide's class, highest first. Knockout control slides hold cells
the knockout missed, which look wild-type; a person's label wins over the slide label outside the test split
(``spatial split``), so confirming them cleans the training and validation labels.

Output (one row per queried cell, in query order): the columns of ``spatial al``'s ``queries.parquet``
(``strategy, seed, round, source_file, cell_id, score, label`` with ``label`` empty: a person answers), plus
``query_rank, row``, the model's ``prob_<class>``, ``predicted_class``, ``confidence, entropy, aleatoric, epistemic,
novelty``; ``label_check`` adds ``slide_label``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.active.acquisition import NEEDS_EMBEDDINGS, NEEDS_LABELED_EMBEDDINGS, check_strategy, select
from training.data.labels import abs_keys
from training.errors import DataError

log = logging.getLogger(__name__)
LABEL_CHECK = "label_check"
QUERY_COLUMNS = ["strategy", "seed", "round", "source_file", "cell_id", "score", "label", "query_rank", "row"]


@dataclass
class QueryResult:
    queries: pd.DataFrame
    pool: int          # cells that could be asked about
    scored: int        # cells scored (the subsample)
    seconds_score: float


def query_pool(index: pd.DataFrame, labeled: pd.DataFrame | None = None, exclude: pd.DataFrame | None = None
               ) -> pd.DataFrame:
    """Index rows that may be queried: not labeled yet (any label, ``unsure`` included), not in ``exclude``."""
    keys = abs_keys(index["source_file"], index["cell_id"])
    drop = np.zeros(len(index), dtype=bool)
    for other in (labeled, exclude):
        if other is not None and not other.empty:
            drop |= keys.isin(abs_keys(other["source_file"], other["cell_id"]))
    pool = index.loc[~drop, ["source_file", "row", "cell_id", *(["label"] if "label" in index else [])]]
    pool = pool.reset_index(drop=True)
    pool["source_file"] = pool["source_file"].astype(str)
    return pool


def subsample(pool: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """A random ``n`` of the pool, in file/row order (contiguous reads)."""
    if n is not None and len(pool) > n:
        pool = pool.iloc[np.sort(rng.choice(len(pool), n, replace=False))]
    return pool.sort_values(["source_file", "row"], kind="stable").reset_index(drop=True)


def run_query(ensemble, index: pd.DataFrame, strategy: str, n: int, *, labeled: pd.DataFrame | None = None,
              exclude: pd.DataFrame | None = None, pool_subsample: int | None = 2000, seed: int = 0,
              round_: int = 0, temperature: float = 1.0, batch_size: int = 256, num_workers: int = 0,
              progress: bool = False) -> QueryResult:
    """Score a subsample of the pool with ``ensemble`` (``training.uncertainty.ensemble.Ensemble``) and pick ``n``
    cells with ``strategy``. Same seed, same model, same labels: same queries."""
    import time

    from training.data.loader import CellLoader

    label_check = strategy == LABEL_CHECK
    if not label_check:
        check_strategy(strategy)
    rng = np.random.default_rng([seed, round_])
    pool = query_pool(index, labeled, exclude)
    if pool.empty:
        raise DataError("nothing left to query: every cell of the pool is labeled or in the test split")
    classes = list(ensemble.spec.classes)
    if label_check:
        pool = pool[pool["label"].isin(classes)].reset_index(drop=True) if "label" in pool else pool.iloc[:0]
        if pool.empty:
            raise DataError(f"label_check: no unlabeled cell outside the test split has a slide label among the "
                            f"model's classes ({', '.join(classes)})")
    cells = subsample(pool, pool_subsample, rng)
    t0 = time.perf_counter()
    loader = CellLoader(cells, ensemble.preprocess, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        cache=False)
    raw = ensemble.predict_batches(loader, total=len(loader), progress=progress, raw=True,
                                   with_features=strategy in NEEDS_EMBEDDINGS)
    seconds = time.perf_counter() - t0
    out = ensemble.combine(raw["logits"])
    out["novelty"] = raw["novelty"]
    lab_emb = None
    if strategy in NEEDS_LABELED_EMBEDDINGS and labeled is not None and not labeled.empty:
        # coreset / typiclust / probcover cover what is labeled already: embed the labeled cells of the index too
        keys = abs_keys(index["source_file"], index["cell_id"])
        lab = index.loc[np.asarray(keys.isin(abs_keys(labeled["source_file"], labeled["cell_id"]))),
                        ["source_file", "row", "cell_id"]].assign(source_file=lambda t: t["source_file"].astype(str))
        lab = subsample(lab, pool_subsample, np.random.default_rng([seed, round_, 1]))
        if len(lab):
            lab_emb = ensemble.predict_batches(CellLoader(lab, ensemble.preprocess, batch_size=batch_size,
                                                          shuffle=False, num_workers=num_workers, cache=False),
                                               raw=True, with_features=True)["features"]
    if label_check:
        pos, scores = disputed(out["mean_probs"], cells["label"].astype(str).map(classes.index).to_numpy(), n)
    else:
        pos, scores = select(strategy, min(n, len(cells)), rng, n_pool=len(cells), probs=out["mean_probs"],
                             samples=member_probs(ensemble, raw["logits"]), embeddings=raw.get("features"),
                             labeled_embeddings=lab_emb, temperature=temperature)
    picked = cells.iloc[pos].reset_index(drop=True)
    frame = ensemble.to_frame({k: v[pos] for k, v in out.items()}, picked)
    q = pd.DataFrame({"strategy": strategy, "seed": seed, "round": round_,
                      "source_file": picked["source_file"].to_numpy(), "cell_id": picked["cell_id"].to_numpy(np.int64),
                      "score": np.asarray(scores, dtype=np.float64), "label": pd.Series([pd.NA] * len(picked),
                                                                                         dtype="string"),
                      "query_rank": np.arange(len(picked), dtype=np.int64),
                      "row": picked["row"].to_numpy(np.int64)})
    q = pd.concat([q, frame.drop(columns=["source_file", "cell_id"])], axis=1)
    if label_check:  # the label the person is asked to confirm or correct
        q["slide_label"] = picked["label"].astype(str).to_numpy()
    log.info("query: %d of %d pool cells scored (%.0f cells/s), %d picked with %s", len(cells), len(pool),
             len(cells) / max(seconds, 1e-9), len(q), strategy)
    return QueryResult(q, len(pool), len(cells), seconds)


def disputed(probs: np.ndarray, slide_class: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` cells the ensemble least believes belong to their slide's class: positions and ``1 - p(slide class)``,
    highest first (ties in pool order)."""
    score = 1.0 - probs[np.arange(len(probs)), slide_class]
    pos = np.argsort(-score, kind="stable")[:n]
    return pos.astype(np.int64), score[pos]


def member_probs(ensemble, logits: np.ndarray) -> np.ndarray:
    """Temperature-scaled member (and MC-dropout sample) probabilities ``(M * S, N, K)`` from ``(N, M, S, K)``."""
    from training.uncertainty.decompose import softmax

    temps = np.asarray(ensemble.spec.temperatures, dtype=np.float64)
    probs = softmax(logits.astype(np.float64) / temps[None, :, None, None], axis=-1)
    n, m, s, k = probs.shape
    return probs.transpose(1, 2, 0, 3).reshape(m * s, n, k)
