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

import numpy as np
import torch
import torch.nn.functional as F

SCALES = (1.0, 2.0, 4.0, 8.0)
QUANTILES = (0.5, 0.9, 0.99)
STATISTICS = ("mean", "std", *(f"q{int(q * 100)}" for q in QUANTILES))
RESPONSES = ("image", *(f"dog_{a:g}_{b:g}" for a, b in zip(SCALES, SCALES[1:], strict=False)), "gradient")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with reflected borders (radius 3 sigma, at most the crop)."""
    radius = min(int(3 * sigma + 0.5), x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


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
    q = torch.tensor(QUANTILES, dtype=x.dtype, device=x.device)
    per_channel = []
    for c in range(x.shape[1]):
        for r in responses:
            flat = r[:, c].flatten(1)
            sd, mean = torch.std_mean(flat, dim=1, correction=0)
            per_channel += [mean[:, None], sd[:, None], torch.quantile(flat, q, dim=1).T]
    return torch.cat(per_channel, dim=1).double().cpu().numpy()
