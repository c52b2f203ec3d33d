"""One PNG per cluster: the most novel cells' images (the model's first channel), read by cell id from their files."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from training.io.formats import CellFile  # noqa: E402


def read_cells(cells: pd.DataFrame, channel: str) -> np.ndarray:
    """Images ``(N, H, W)`` of ``channel`` for the rows of ``cells`` (``source_file, cell_id``), in table order."""
    out: list[np.ndarray | None] = [None] * len(cells)
    for source, part in cells.reset_index(drop=True).groupby("source_file", sort=True):
        with CellFile(os.fspath(source)) as f:
            rows = f.rows_of(part["cell_id"])
            order = np.argsort(rows)
            imgs = f.read_rows(rows[order], f.resolve_channels([channel]))[:, 0]
            for i, img in zip(part.index.to_numpy()[order], imgs, strict=True):
                out[i] = np.asarray(img, dtype=np.float32)
    return np.stack(out) if out else np.zeros((0, 1, 1), np.float32)


def plot_gallery(images: np.ndarray, path: str | os.PathLike, title: str, cols: int = 8) -> Path:
    """A grid of ``images`` (N, H, W), each scaled to its own range, saved as a PNG."""
    n = max(1, len(images))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2 + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img in zip(axes.ravel(), images, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=max(float(img.max()), 1e-6))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
