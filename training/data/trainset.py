"""The training-data table: the split's cells with class indices, the channels and input size the files imply,
the label budget (keep a fraction of the training labels, the rest become unlabeled) and class weights.

Built from the cell index alone: no pixels are read here (only the first file's header, for channel names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from training.config import Params
from training.data.splits import class_table
from training.errors import DataError, TrainingError
from training.io.formats import CellFile

log = logging.getLogger(__name__)
HIDDEN = "ssl_hidden"  # column: a training cell whose label the label fraction hid


@dataclass
class TrainData:
    """Split cell table (with ``y`` = class index) and what the files say about channels and size."""

    cells: pd.DataFrame
    classes: list[str]
    channels: list[str]
    source_channels: list[str]
    image_size: int

    def split(self, name: str) -> pd.DataFrame:
        return self.cells[self.cells["split"] == name].reset_index(drop=True)


def prepare_data(splits: pd.DataFrame, classes: list[str], params: Params) -> TrainData:
    """Resolve channels (names) and input size from the first training file; check the split is usable."""
    cells = splits.copy()
    cells["y"] = class_table(cells, classes).to_numpy()
    train = cells[cells["split"] == "train"]
    if train.empty:
        raise DataError("the split has no training cells")
    with CellFile(str(train["source_file"].iloc[0])) as f:
        chans = f.resolve_channels(params.data.channels, params.data.channel_map)
        names = [f.info.channel_names[c] for c in chans]
        source_channels = list(f.info.channel_names)
        stored = max(f.info.height, f.info.width)
    counts = train["y"].value_counts()
    empty = [c for i, c in enumerate(classes) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(f"class(es) {', '.join(empty)} have no training cells after the split")
    if len(train) < params.data.batch_size:
        raise TrainingError(
            f"{len(train)} training cells are fewer than data.batch_size={params.data.batch_size}; "
            "lower the batch size or add cells"
        )
    return TrainData(cells, classes, names, source_channels, params.data.image_size or stored)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def keep_label_fraction(data: TrainData, fraction: float, seed: int) -> TrainData:
    """A copy of ``data`` (``TrainData``) keeping a class-stratified ``fraction`` of the training labels (at least
    one cell per class); the other training cells become split ``unlabeled`` with no label. No-op at 1."""
    if fraction >= 1.0:
        return data
    cells = data.cells.copy()
    if HIDDEN not in cells:
        cells[HIDDEN] = False
    rng = np.random.default_rng([seed, 4])
    train = np.nonzero((cells["split"] == "train").to_numpy())[0]
    y = cells["y"].to_numpy()[train]
    hide = []
    for c in np.unique(y):
        pos = train[y == c]
        keep = max(1, round(fraction * len(pos)))
        hide.append(np.setdiff1d(pos, rng.choice(pos, keep, replace=False)))
    hidden = cells.index[np.concatenate(hide)] if hide else cells.index[:0]
    cells.loc[hidden, "split"] = "unlabeled"
    cells.loc[hidden, "y"] = -1
    cells.loc[hidden, "label"] = pd.NA
    cells.loc[hidden, HIDDEN] = True
    log.info("label fraction %.3g: %d training labels kept, %d hidden", fraction, len(train) - len(hidden),
             len(hidden))
    return type(data)(cells, data.classes, data.channels, data.source_channels, data.image_size)


def unlabeled_table(data: TrainData) -> pd.DataFrame:
    """The cells semi-supervised training may use without labels (deterministic order; ``y`` = -1)."""
    unl = data.split("unlabeled").copy()
    unl["y"] = -1
    return unl
