"""Training streams: what the engine iterates for a regime, from any loader of engine batches.

:func:`training_stream` is the one builder: the labeled loader as is, cycled to a step budget
(:class:`RepeatLoader`), or zipped with an unlabeled loader (:class:`MixedLoader`: ``u_image``, ``u_idx``) for the
semi-supervised objectives. Supervised and semi-supervised training, active-learning rounds and tuning trials all
build their streams here (files through ``CellLoader``, in-memory pools through ``TensorLoader``).

A class-balanced unlabeled pool (``ssl.balance_unlabeled=predicted``): :class:`MixedLoader` asks a ``rebalance``
callable for per-cell sampling weights at the start of every epoch and hands them to the unlabeled loader
(``set_weights``), which then draws its cells with replacement from those weights (:func:`sample_order`, seeded
by the loader's seed and epoch) instead of shuffling. :func:`balanced_weights` makes the weights from predicted
classes: each predicted class gets the same share of the draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from training.errors import TrainingError

WEIGHTED = 17  # extra seed word of weighted draws (a permutation of the same (seed, epoch) stays as it was)


def balanced_weights(pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Sampling probabilities inverse to the frequency of each cell's predicted class ``pred`` (class indices):
    every predicted class present gets total probability 1 / (number of classes present), split evenly over its
    cells. A pool predicted 90 % class A is drawn half A, half B in expectation."""
    pred = np.asarray(pred, dtype=np.int64)
    if pred.size == 0:
        raise TrainingError("no predicted classes to balance")
    counts = np.bincount(pred, minlength=n_classes).astype(np.float64)
    w = 1.0 / counts[pred]
    return w / w.sum()


def sample_order(weights: np.ndarray, *key: int) -> np.ndarray:
    """``len(weights)`` cell positions drawn with replacement with probabilities ``weights``, seeded by ``key``
    (the loader's seed, epoch, ...): the weighted counterpart of a shuffled permutation."""
    w = np.asarray(weights, dtype=np.float64)
    return np.random.default_rng([*key, WEIGHTED]).choice(len(w), size=len(w), replace=True, p=w / w.sum())


def check_weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    """``weights`` as float64 after checking they fit a loader of ``n`` cells (None: back to shuffling)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise TrainingError(f"sampling weights must be {n} finite non-negative numbers with a positive sum, got "
                            f"shape {w.shape}")
    return w


def _cycle(loader, base: int) -> Iterator[dict]:
    """Endless batches: pass ``p`` over ``loader`` is shuffled as epoch ``base + p``."""
    p = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(base + p)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise TrainingError("a training loader yielded no batches")
        p += 1


class RepeatLoader:
    """``steps`` batches per epoch from ``loader``, cycled (a small labeled set gets the full step budget)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.epoch = loader, steps, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        it = _cycle(self.loader, self.epoch * 10_007)
        for _ in range(self.steps):
            yield next(it)


class MixedLoader:
    """Labeled batches (``image``, ``label``, ``idx``) zipped with unlabeled ones (``u_image``, ``u_idx``; row
    positions in :func:`unlabeled_table`); both cycled, ``steps`` per epoch. With ``rebalance`` (a callable
    returning per-unlabeled-cell sampling weights, or None for plain shuffling) the unlabeled loader's weights are
    renewed at the start of every epoch."""

    def __init__(self, labeled, unlabeled, steps: int,
                 rebalance: Callable[[], np.ndarray | None] | None = None):
        self.labeled, self.unlabeled, self.steps, self.epoch = labeled, unlabeled, steps, 0
        self.rebalance = rebalance

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.rebalance is not None:
            self.unlabeled.set_weights(self.rebalance())

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        lab = _cycle(self.labeled, self.epoch * 10_007)
        unl = _cycle(self.unlabeled, self.epoch * 10_007)
        for _ in range(self.steps):
            batch = dict(next(lab))
            u = next(unl)
            batch["u_image"], batch["u_idx"] = u["image"], u["idx"]
            yield batch


def training_stream(labeled, steps: int, unlabeled=None, rebalance: Callable[[], np.ndarray | None] | None = None):
    """``steps`` batches per epoch: ``labeled`` itself when it already has that many, else cycled; with an
    ``unlabeled`` loader, each labeled batch carries an unlabeled one (``u_image``, ``u_idx``), drawn by the
    weights ``rebalance`` gives each epoch when it is set (see :class:`MixedLoader`)."""
    if unlabeled is not None:
        return MixedLoader(labeled, unlabeled, steps, rebalance)
    if rebalance is not None:
        raise TrainingError("rebalance needs an unlabeled loader")
    return labeled if steps == len(labeled) else RepeatLoader(labeled, steps)
