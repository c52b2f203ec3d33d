"""A fixed, untrained description of a cell's pixels at full resolution, for the ``pixel_knn`` novelty scores.

A two-class classifier learns one axis (here: LC3B puncta, none to many) and its features place an intermediate
phenotype between the training classes, not away from them; the CPU ConvNeXt's stem also starts at a quarter of the
crop's resolution, where single puncta are gone. This descriptor keeps what the pixels say: per channel, the image
and a filter bank of differences of Gaussians (blobs of about 1-2, 2-4 and 4-8 px: puncta, clusters, aggregates)
and the gradient magnitude (edges of structures), each summarised over the crop by its mean, standard deviation
and 50th / 90th / 99th percentiles. It is the classic hand-made texture description of bioimage analysis
(intensity, blob and edge statistics), computed on the model's own input in one batched pass.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SCALES = (1.0, 2.0, 4.0, 8.0)
QUANTILES = (0.5, 0.9, 0.99)
STATISTICS = ("mean", "std", *(f"q{int(q * 100)}" for q in QUANTILES))
RESPONSES = ("image", *(f"dog_{a:g}_{b:g}" for a, b in zip(SCALES, SCALES[1:], strict=False)), "gradient")


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """``(n, n)`` matrix of a 1-D Gaussian blur (radius 3 sigma, at most n - 1) with reflected borders (the edge
    pixel not repeated), so a separable 2-D blur is two small matrix products: much faster than a thin convolution."""
    radius = min(int(3 * sigma + 0.5), n - 1)
    t = np.arange(-radius, radius + 1)
    weights = np.exp(-(t**2) / (2 * sigma**2))
    weights /= weights.sum()
    cols = np.arange(n)[:, None] + t[None, :]
    cols = np.abs(cols)  # reflect below 0: -j -> j
    cols = np.where(cols > n - 1, 2 * (n - 1) - cols, cols)  # and above n - 1
    m = np.zeros((n, n))
    np.add.at(m, (np.repeat(np.arange(n), t.size), cols.ravel()), np.tile(weights, n))
    return torch.from_numpy(m).float()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)``, borders reflected."""
    rows = _blur_matrix(x.shape[-2], sigma).to(x.device, x.dtype)
    cols = _blur_matrix(x.shape[-1], sigma).to(x.device, x.dtype)
    return rows @ x @ cols.T


def sorted_quantiles(flat: torch.Tensor, quantiles: tuple[float, ...] = QUANTILES) -> torch.Tensor:
    """Quantiles of ``(..., n)`` along the last axis, ``(Q, ...)``, by a sort on the tensor's device and the linear
    interpolation of ``np.quantile`` / ``torch.quantile`` (which refuses inputs over 2^24 elements)."""
    n = flat.shape[-1]
    ordered = flat.sort(dim=-1).values
    pos = torch.tensor(quantiles, dtype=torch.float64) * (n - 1)
    lo, frac = pos.floor().long(), (pos - pos.floor()).to(flat.dtype).to(flat.device)
    hi = torch.clamp(lo + 1, max=n - 1)
    low, high = ordered[..., lo.to(flat.device)], ordered[..., hi.to(flat.device)]  # (..., Q)
    return (low + frac * (high - low)).movedim(-1, 0)


def feature_names(channels: int) -> list[str]:
    """Column names of :func:`pixel_descriptor` for ``channels`` input channels, in its order."""
    return [f"c{c}/{r}/{s}" for c in range(channels) for r in RESPONSES for s in STATISTICS]


@torch.no_grad()
def pixel_descriptor(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model-ready images ``(N, C, H, W)`` -> ``(N, C * 25)`` float64 statistics (names: :func:`feature_names`)."""
    x = torch.as_tensor(images).float()
    if x.ndim != 4 or min(x.shape[-2:]) < 2:
        raise ValueError(f"images must have shape (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        return np.zeros((0, len(feature_names(x.shape[1]))))
    blurred = [_gaussian_blur(x, s) for s in SCALES]
    gy, gx = torch.gradient(blurred[0], dim=(2, 3))
    responses = [x, *(a - b for a, b in zip(blurred, blurred[1:], strict=False)), torch.sqrt(gx**2 + gy**2)]
    stats = []
    for r in responses:
        flat = r.flatten(2)  # (N, C, H * W)
        sd, mean = torch.std_mean(flat, dim=2, correction=0)
        # on CPU numpy's selection (about 2x faster than a sort); on an accelerator a sort where the maps are
        q = (np.quantile(flat.numpy(), QUANTILES, axis=2) if flat.device.type == "cpu"
             else sorted_quantiles(flat).cpu().numpy())  # (Q, N, C)
        stats.append(np.concatenate([mean.cpu().numpy()[None], sd.cpu().numpy()[None], q]))  # (S, N, C)
    out = np.stack(stats)  # (R, S, N, C) -> (N, C, R, S): the order of feature_names
    return out.transpose(2, 3, 0, 1).reshape(x.shape[0], -1).astype(np.float64)
