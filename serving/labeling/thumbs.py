"""Cell thumbnails from the single-cell files, read on demand (one contiguous read per cell) and kept in an LRU
cache. Only cells of the queries table can be drawn: callers name a query position, never a path."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
import pandas as pd
from PIL import Image

from training.io.formats import CellFile

# composite colours of the image channels, in file order (thesis: nucleus blue, membrane green, LC3B magenta)
PALETTE = np.array([(0.2, 0.4, 1.0), (0.1, 1.0, 0.2), (1.0, 0.1, 0.9), (1.0, 0.9, 0.1), (0.1, 0.9, 1.0),
                    (1.0, 0.3, 0.1)], dtype=np.float32)


def locate(queries: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Each queried cell's row in its file (looked up from the stored cell ids) and each file's channel layout;
    a cell that is not in its file is a DataError naming both."""
    rows = np.empty(len(queries), dtype=np.int64)
    layouts: dict[str, dict] = {}
    for name, grp in queries.groupby("source_file", sort=False):
        with CellFile(str(name)) as f:
            layouts[str(name)] = {"names": list(f.info.channel_names), "image": f.info.image_channels
                                  or list(range(f.info.n_channels))}
            rows[grp.index.to_numpy()] = f.rows_of(grp["cell_id"])
    out = queries.copy()
    out["row"] = rows
    return out, layouts


def to_png(pixels: np.ndarray, px: int) -> bytes:
    """``(H, W)`` grey or ``(H, W, 3)`` colour in [0, 1] -> PNG, shrunk to at most ``px`` (never enlarged: the browser
    scales it up, which is cheaper than encoding more pixels)."""
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if max(img.size) > px:
        img = img.resize((px, px), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render(stack: np.ndarray, image_channels: list[int], channel: str, contrast: float, px: int) -> bytes:
    """``stack`` (C, H, W) in [0, 1] -> PNG: ``composite`` (image channels coloured) or one channel (grey)."""
    if channel == "composite":
        x = np.clip(stack[image_channels] * contrast, 0, 1)
        colours = PALETTE[np.arange(len(image_channels)) % len(PALETTE)]
        return to_png(1 - np.prod(1 - x[..., None] * colours[:, None, None, :], axis=0), px)  # screen blend
    return to_png(stack[image_channels[int(channel)]] * contrast, px)


class Thumbnails:
    """PNG thumbnails of the queried cells by query position; thread-safe (h5py handles are shared under a lock)."""

    def __init__(self, cells: pd.DataFrame, layouts: dict[str, dict], px: int = 96, cache: int = 4096):
        self.cells, self.layouts, self.px, self.size = cells, layouts, px, cache
        self._files: dict[str, CellFile] = {}
        self._png: OrderedDict[tuple, bytes] = OrderedDict()
        self._stacks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def channels(self, i: int) -> list[str]:
        lay = self.layouts[str(self.cells["source_file"].iat[i])]
        return [lay["names"][c] for c in lay["image"]]

    def _stack(self, i: int) -> np.ndarray:
        if i in self._stacks:
            self._stacks.move_to_end(i)
            return self._stacks[i]
        name = str(self.cells["source_file"].iat[i])
        if name not in self._files:
            self._files[name] = CellFile(name)
        row = int(self.cells["row"].iat[i])
        stack = self._files[name].read(row, row + 1, check=False)[0]
        self._stacks[i] = np.nan_to_num(stack)
        if len(self._stacks) > max(64, self.size // 4):
            self._stacks.popitem(last=False)
        return self._stacks[i]

    def png(self, i: int, channel: str = "composite", contrast: float = 1.0) -> bytes:
        """Thumbnail of query position ``i``; ``channel`` is ``composite`` or an image-channel position."""
        if not 0 <= i < len(self.cells):
            raise IndexError(i)
        n_img = len(self.layouts[str(self.cells["source_file"].iat[i])]["image"])
        if channel != "composite" and not (channel.isdigit() and len(channel) <= 3 and int(channel) < n_img):
            raise ValueError(f"channel must be 'composite' or 0..{n_img - 1}")
        key = (i, channel, float(contrast))
        with self._lock:
            if key in self._png:
                self._png.move_to_end(key)
                return self._png[key]
            stack = self._stack(i)
            data = render(stack, self.layouts[str(self.cells["source_file"].iat[i])]["image"], channel, contrast,
                          self.px)
            if self.size:
                self._png[key] = data
                if len(self._png) > self.size:
                    self._png.popitem(last=False)
            return data

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
