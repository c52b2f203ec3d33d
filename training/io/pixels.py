"""The accepted pixel values, checked the same way for stored files (training, ``spatial score``) and for HTTP
requests: every value finite and in ``[PIXEL_MIN, PIXEL_MAX]`` = [0, 1], the range SPARCSpy and scPortrait store
normalised image channels (and masks) in. Anything else is not a crop these models were trained on, and a value like
1e30 overflows the features (the novelty model then fails), so it is refused per cell, before any model call."""

from __future__ import annotations

import numpy as np

PIXEL_MIN, PIXEL_MAX = 0.0, 1.0
PIXEL_RANGE = f"finite values in [{PIXEL_MIN:g}, {PIXEL_MAX:g}]"


def bad_cells(x: np.ndarray) -> np.ndarray:
    """Positions (axis 0) of cells holding NaN / Inf or a value outside [PIXEL_MIN, PIXEL_MAX]."""
    if len(x) == 0:
        return np.empty(0, np.int64)
    flat = np.asarray(x).reshape(len(x), -1)
    if flat.shape[1] == 0:
        return np.empty(0, np.int64)
    lo, hi = flat.min(axis=1), flat.max(axis=1)  # NaN propagates into min / max and fails both comparisons
    return np.flatnonzero(~((lo >= PIXEL_MIN) & (hi <= PIXEL_MAX)))


def describe_cell(x: np.ndarray) -> str:
    """What is wrong with one cell's pixels, e.g. ``'NaN or Inf'`` or ``'a value of 1e+30'``."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(flat).all():
        return "NaN or Inf pixels"
    worst = flat[np.argmax(np.maximum(PIXEL_MIN - flat, flat - PIXEL_MAX))]
    return f"a pixel value of {worst:.6g}"
