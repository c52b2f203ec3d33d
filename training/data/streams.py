"""Training streams: what the engine iterates for a regime, from any loader of engine batches.

:func:`training_stream` is the one builder: the labeled loader as is, cycled to a step budget
(:class:`RepeatLoader`), or zipped with an unlabeled loader (:class:`MixedLoader`: ``u_image``, ``u_idx``) for the
semi-supervised objectives. Supervised and semi-supervised training, active-learning rounds and tuning trials all
build their streams here (files through ``CellLoader``, in-memory pools through ``TensorLoader``).
"""

from __future__ import annotations

from collections.abc import Iterator

from training.errors import TrainingError


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
    positions in :func:`unlabeled_table`); both cycled, ``steps`` per epoch."""

    def __init__(self, labeled, unlabeled, steps: int):
        self.labeled, self.unlabeled, self.steps, self.epoch = labeled, unlabeled, steps, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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


def training_stream(labeled, steps: int, unlabeled=None):
    """``steps`` batches per epoch: ``labeled`` itself when it already has that many, else cycled; with an
    ``unlabeled`` loader, each labeled batch carries an unlabeled one (``u_image``, ``u_idx``)."""
    if unlabeled is not None:
        return MixedLoader(labeled, unlabeled, steps)
    return labeled if steps == len(labeled) else RepeatLoader(labeled, steps)
