"""Streaming single-cell loader.

Cells are read in contiguous row runs (h5py fancy indexing is ~40x slower), each worker process opens the files
itself, and batches come out as dicts ``{"image": float32 (B,C,H,W), "label": int64 (B,), "idx": int64 (B,)}``
where ``idx`` is the row position in the table the loader was given (``-1`` labels = unlabeled).

Two paths, one interface (``set_epoch`` + iteration + ``len``):

* ``cache=True`` and a table that fits the byte budget: read once (streamed), keep preprocessed tensors in memory,
  shuffle per epoch from ``seed + epoch``. This is the fast path for training sets of a few thousand cells.
* otherwise a ``torch.utils.data.IterableDataset`` of blocks (runs of nearby rows in one file), shuffled at block
  level and inside a buffer, split over ``num_workers`` processes.

With sampling weights (``set_weights``, the class-balanced unlabeled pool) both paths draw ``len(table)`` cells
with replacement per epoch (:func:`training.data.streams.sample_order`) instead of a permutation; ``idx`` still
names rows of the table given.

Augmentation is not done here: the engine augments batches on the device (weak/strong views for FixMatch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from training.config import DataConfig
from training.data.streams import check_weights, sample_order
from training.errors import DataError
from training.io.formats import CellFile


@dataclass(frozen=True)
class Preprocess:
    """Channel selection, size and normalisation: the same in training, batch scoring and the HTTP service."""

    channels: tuple[str | int, ...] = ()
    image_size: int | None = None
    resize: str = "resize"
    normalize: str = "none"
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def from_config(cls, cfg: DataConfig, channel_names: Sequence[str] | None = None) -> Preprocess:
        chans = tuple(channel_names) if channel_names is not None else tuple(cfg.channels)
        return cls(chans, cfg.image_size, cfg.resize, cfg.normalize, cfg.mean, cfg.std)

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` selected-channel pixels -> model input (float32)."""
        t = torch.as_tensor(x, dtype=torch.float32)
        size = self.image_size
        if size is not None and t.shape[-2:] != (size, size):
            if self.resize == "crop" and min(t.shape[-2:]) >= size:
                top, left = (t.shape[-2] - size) // 2, (t.shape[-1] - size) // 2
                t = t[..., top : top + size, left : left + size]
            else:
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize == "per_cell":
            mean = t.mean(dim=(-2, -1), keepdim=True)
            std = t.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            t = (t - mean) / std
        elif self.normalize == "fixed":
            t = (t - self.mean) / self.std
        return t.contiguous()


@dataclass
class _Block:
    source_file: str
    rows: np.ndarray  # file rows, sorted
    positions: np.ndarray  # table positions, aligned with rows
    labels: np.ndarray


def make_blocks(table: pd.DataFrame, block_size: int, positions: np.ndarray | None = None) -> list[_Block]:
    """Cut the table into blocks of at most ``block_size`` nearby rows of one file; ``positions`` (default: row
    order) is what each row is called in the batches' ``idx``."""
    blocks = []
    labels = table["y"].to_numpy(np.int64) if "y" in table else np.full(len(table), -1, np.int64)
    positions = np.arange(len(table)) if positions is None else np.asarray(positions, dtype=np.int64)
    for source, pos in table.groupby("source_file", observed=True, sort=False).indices.items():
        rows = table["row"].to_numpy(np.int64)[pos]
        order = np.argsort(rows, kind="stable")
        pos, rows = positions[pos][order], rows[order]
        for s in range(0, len(rows), block_size):
            sl = slice(s, s + block_size)
            blocks.append(_Block(str(source), rows[sl], pos[sl], labels[pos[sl]]))
    return blocks


class _FileCache:
    """One open handle per file per process, and the resolved channel indices per file."""

    def __init__(self, channels: Sequence[str | int], channel_map: dict[str, str] | None = None):
        self.channels, self.channel_map = channels, channel_map
        self.files: dict[str, tuple[CellFile, list[int]]] = {}

    def get(self, path: str) -> tuple[CellFile, list[int]]:
        if path not in self.files:
            f = CellFile(path)
            self.files[path] = (f, f.resolve_channels(self.channels, self.channel_map))
        return self.files[path]

    def read(self, block: _Block) -> np.ndarray:
        f, chans = self.get(block.source_file)
        if block.rows.size and block.rows[-1] >= f.n_cells:
            raise DataError(f"{f.path}: row {int(block.rows[-1])} requested but the file has {f.n_cells} cells")
        return f.read_rows(block.rows, chans)

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()
        self.files.clear()


class CellStream(IterableDataset):
    """Yields preprocessed batches from blocks; shuffling (block order + a buffer) is seeded by ``seed + epoch``."""

    def __init__(self, table: pd.DataFrame, preprocess: Preprocess, batch_size: int, shuffle: bool = False,
                 seed: int = 0, block_size: int = 256, buffer_blocks: int = 8, drop_last: bool = False,
                 channel_map: dict[str, str] | None = None, positions: np.ndarray | None = None):
        self.blocks = make_blocks(table, block_size, positions)
        self.channel_map = channel_map
        self.preprocess, self.batch_size, self.shuffle = preprocess, batch_size, shuffle
        self.seed, self.buffer_blocks, self.drop_last = seed, buffer_blocks, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_blocks(self, rng: np.random.Generator) -> list[_Block]:
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        return [self.blocks[i] for i in order]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        files = _FileCache(self.preprocess.channels, self.channel_map)
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        try:
            blocks = self._my_blocks(rng)
            for i, block in enumerate(blocks):
                pending.append((files.read(block), block.labels, block.positions))
                last = i == len(blocks) - 1
                if len(pending) < (self.buffer_blocks if self.shuffle else 1) and not last:
                    continue
                x = np.concatenate([p[0] for p in pending])
                y = np.concatenate([p[1] for p in pending])
                idx = np.concatenate([p[2] for p in pending])
                if self.shuffle:
                    perm = rng.permutation(len(x))
                    x, y, idx = x[perm], y[perm], idx[perm]
                n_full = len(x) // self.batch_size * self.batch_size
                cut = len(x) if last else n_full
                for s in range(0, cut, self.batch_size):
                    e = min(s + self.batch_size, cut)
                    if e - s < self.batch_size and self.drop_last:
                        break
                    yield _batch(self.preprocess(x[s:e]), y[s:e], idx[s:e])
                pending = [] if last else [(x[cut:], y[cut:], idx[cut:])]
        finally:
            files.close()


def _batch(x: torch.Tensor, y: np.ndarray, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {"image": x, "label": torch.as_tensor(y, dtype=torch.int64), "idx": torch.as_tensor(idx, dtype=torch.int64)}


@dataclass
class CellLoader:
    """Batches over a cell table (columns ``source_file, row`` and optionally ``y`` = class index)."""

    table: pd.DataFrame
    preprocess: Preprocess
    batch_size: int = 128
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 0
    cache: bool = False
    cache_max_bytes: int = 4 * 2**30
    drop_last: bool = False
    progress: bool = False
    channel_map: dict[str, str] | None = None  # model channel name -> file channel name (see formats.match_channel)
    epoch: int = field(default=0, init=False)
    weights: np.ndarray | None = field(default=None, init=False, repr=False)
    _images: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.table = self.table.reset_index(drop=True)
        self._stream = CellStream(self.table, self.preprocess, self.batch_size, self.shuffle, self.seed,
                                  drop_last=self.drop_last, channel_map=self.channel_map)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._stream.set_epoch(epoch)

    def set_weights(self, weights: np.ndarray | None) -> None:
        """Per-cell sampling probabilities (table order): each epoch then draws ``len(table)`` cells with
        replacement from them instead of shuffling. None: back to the plain order."""
        self.weights = check_weights(weights, len(self.table))

    def _weighted_stream(self) -> CellStream:
        draw = sample_order(self.weights, self.seed, self.epoch)
        s = CellStream(self.table.iloc[draw], self.preprocess, self.batch_size, self.shuffle, self.seed,
                       drop_last=self.drop_last, channel_map=self.channel_map, positions=draw)
        s.set_epoch(self.epoch)
        return s

    def __len__(self) -> int:
        n = len(self.table)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _fill_cache(self) -> torch.Tensor:
        ordered = CellLoader(self.table, self.preprocess, batch_size=1024, num_workers=self.num_workers)
        images: torch.Tensor | None = None
        for batch in tqdm(ordered, total=len(ordered), desc="cache", unit="batch", disable=not self.progress):
            if images is None:
                images = torch.empty((len(self.table), *batch["image"].shape[1:]), dtype=torch.float32)
            images[batch["idx"]] = batch["image"]
        assert images is not None
        return images

    def _cached_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._images is None:
            self._images = self._fill_cache()
        n = len(self.table)
        if self.weights is not None:
            order = sample_order(self.weights, self.seed, self.epoch)
        else:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        y = self.table["y"].to_numpy(np.int64) if "y" in self.table else np.full(n, -1, np.int64)
        stop = n // self.batch_size * self.batch_size if self.drop_last else n
        for s in range(0, stop, self.batch_size):
            sel = order[s : s + self.batch_size]
            yield _batch(self._images[torch.as_tensor(sel)], y[sel], sel)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if len(self.table) == 0:
            return iter(())
        if self.cache and self._estimated_bytes() <= self.cache_max_bytes:
            return self._cached_batches()
        stream = self._stream if self.weights is None else self._weighted_stream()
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                               multiprocessing_context="spawn" if torch.cuda.is_initialized() else None))

    def _estimated_bytes(self) -> int:
        if self.preprocess.image_size is not None:
            side = self.preprocess.image_size
        else:
            with CellFile(str(self.table["source_file"].iloc[0])) as f:
                side = max(f.info.height, f.info.width)
        n_chan = max(1, len(self.preprocess.channels) or 3)
        return len(self.table) * n_chan * side * side * 4


def loader_for(table: pd.DataFrame, cfg: DataConfig, channel_names: Sequence[str], shuffle: bool, seed: int,
               cache: bool | None = None, batch_size: int | None = None, drop_last: bool = False,
               progress: bool = False) -> CellLoader:
    """A loader configured from ``data`` params (the one way training code builds loaders)."""
    return CellLoader(
        table,
        Preprocess.from_config(cfg, channel_names),
        batch_size=batch_size or cfg.batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=cfg.num_workers,
        cache=cfg.cache if cache is None else cache,
        drop_last=drop_last,
        progress=progress,
        channel_map=cfg.channel_map or None,
    )
