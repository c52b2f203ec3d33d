"""Batched, per-sample random augmentations for single-cell microscopy crops (no colour transforms).

All random parameters come from a CPU ``torch.Generator`` (so a run is reproducible on any device) and are
moved to the batch's device; noise is drawn on the device from a seed taken from that generator.
Inputs are assumed to be (B, C, H, W) intensities with an exact-0 background outside the cell mask
(SPARCS crops): gain and gamma keep 0 at 0, contrast and noise only touch non-zero pixels, and the
result is clamped at 0 when the input was non-negative. The input tensor is never modified in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from training.config import AugmentConfig


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


class Augmenter:
    """Three views of a batch: ``standard`` (supervised training), ``weak`` and ``strong`` (FixMatch); ``crop``
    (random resized crop) comes before a view in contrastive pretraining.

    ``strong`` is ``weak`` plus the photometric transforms at ``strong_scale`` times the configured magnitude
    (blur probability likewise, capped at 1) and a cutout square of up to ``cutout`` x the image side.
    """

    def __init__(self, cfg: AugmentConfig, strong_scale: float = 3.0, cutout: float = 0.5) -> None:
        self.cfg = cfg
        self.strong_scale = strong_scale
        self.cutout_frac = cutout

    def standard(self, x: Tensor, g: torch.Generator) -> Tensor:
        c = self.cfg
        x = self._geometric(x, g)
        return self._photometric(x, g, c.intensity, c.contrast, c.gamma, c.noise, c.blur, max_sigma=1.0)

    def weak(self, x: Tensor, g: torch.Generator) -> Tensor:
        return self._geometric(x, g)

    def crop(self, x: Tensor, g: torch.Generator, min_scale: float) -> Tensor:
        """Per-sample random resized crop: a square of U(``min_scale``, 1) x the image area, anywhere inside the
        image, resampled (bilinear) back to the full size. No-op at ``min_scale`` >= 1."""
        if min_scale >= 1:
            return x
        b = len(x)
        side = _uniform(g, (b,), min_scale, 1.0).sqrt()  # side as a fraction of the image side
        shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (1 - side)[:, None]  # centre, in [-1, 1] coordinates
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = side
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)

    def strong(self, x: Tensor, g: torch.Generator) -> Tensor:
        c, s = self.cfg, self.strong_scale
        x = self._geometric(x, g)
        x = self._photometric(
            x, g, c.intensity * s, c.contrast * s, c.gamma * s, c.noise * s, min(1.0, c.blur * s), max_sigma=1.5
        )
        return self._cutout(x, g, self.cutout_frac)

    # -- pieces ---------------------------------------------------------------------------------------------

    def _geometric(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Per-sample horizontal/vertical flips and 90-degree rotations (180 only when H != W)."""
        b, _, h, w = x.shape
        flip_h = torch.randint(2, (b,), generator=g) if self.cfg.flips else torch.zeros(b, dtype=torch.long)
        flip_v = torch.randint(2, (b,), generator=g) if self.cfg.flips else torch.zeros(b, dtype=torch.long)
        if self.cfg.rot90:
            k = torch.randint(4, (b,), generator=g) if h == w else 2 * torch.randint(2, (b,), generator=g)
        else:
            k = torch.zeros(b, dtype=torch.long)
        code = flip_h * 8 + flip_v * 4 + k
        if not code.any():
            return x
        out = x.clone()
        for value in code.unique().tolist():
            if value == 0:
                continue
            sel = (code == value).nonzero().squeeze(1).to(x.device)
            part = x.index_select(0, sel)
            if value & 8:
                part = part.flip(-1)
            if value & 4:
                part = part.flip(-2)
            if value & 3:
                part = torch.rot90(part, value & 3, dims=(-2, -1))
            out.index_copy_(0, sel, part)
        return out

    def _photometric(
        self, x: Tensor, g: torch.Generator, intensity: float, contrast: float, gamma: float, noise: float,
        blur: float, max_sigma: float,
    ) -> Tensor:
        b, c = x.shape[:2]
        dev = x.device
        nonneg = bool((x >= 0).all())
        fg = x != 0
        if gamma:
            gam = torch.exp(_uniform(g, (b, c, 1, 1), -gamma, gamma)).to(dev, x.dtype)
            x = x.pow(gam) if nonneg else x.sign() * x.abs().pow(gam)
        if contrast:
            fac = _uniform(g, (b, c, 1, 1), 1 - contrast, 1 + contrast).clamp_min(0).to(dev, x.dtype)
            count = fg.sum((2, 3), keepdim=True).clamp_min(1)
            mean = (x * fg).sum((2, 3), keepdim=True) / count
            x = torch.where(fg, mean + fac * (x - mean), x)
        if intensity:
            gain = _uniform(g, (b, c, 1, 1), 1 - intensity, 1 + intensity).clamp_min(0).to(dev, x.dtype)
            x = x * gain
        if noise:
            seed = int(torch.randint(2**62, (1,), generator=g))
            dg = torch.Generator(device=dev)
            dg.manual_seed(seed)
            x = x + noise * torch.randn(x.shape, generator=dg, device=dev, dtype=x.dtype) * fg
        if nonneg and (contrast or noise):
            x = x.clamp_min(0)
        if blur:
            chosen = torch.rand(b, generator=g) < blur
            sigma = _uniform(g, (b,), 0.5, max_sigma)
            if chosen.any():
                x = self._blur(x, chosen, sigma[chosen], max_sigma)
        return x

    @staticmethod
    def _blur(x: Tensor, chosen: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
        """Separable Gaussian blur of the ``chosen`` samples, one sigma per sample."""
        n, (_, c, h, w) = len(sigma), x.shape
        radius = min(math.ceil(2 * max_sigma), h - 1, w - 1)
        if radius < 1:
            return x
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)  # (n*C, K)
        sel = chosen.nonzero().squeeze(1).to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            part = x.index_select(0, sel).reshape(1, n * c, h, w)
            part = F.conv2d(F.pad(part, (radius, radius, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * c)
            part = F.conv2d(F.pad(part, (0, 0, radius, radius), mode="reflect"), kern[:, None, :, None], groups=n * c)
        return x.index_copy(0, sel, part.reshape(n, c, h, w))

    @staticmethod
    def _cutout(x: Tensor, g: torch.Generator, frac: float) -> Tensor:
        """Zero one square per sample, side U(0.25, 1) * ``frac`` * min(H, W), centre anywhere in the image."""
        if frac <= 0:
            return x
        b, _, h, w = x.shape
        side = (_uniform(g, (b,), 0.25, 1.0) * frac * min(h, w)).round().clamp_min(1)
        cy, cx = torch.rand(b, generator=g) * h, torch.rand(b, generator=g) * w
        y0, x0 = (cy - side / 2).round(), (cx - side / 2).round()
        ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
        in_y = (ys >= y0[:, None]) & (ys < (y0 + side)[:, None])  # (B, H)
        in_x = (xs >= x0[:, None]) & (xs < (x0 + side)[:, None])  # (B, W)
        keep = ~(in_y[:, :, None] & in_x[:, None, :])
        return x * keep[:, None].to(x.device, x.dtype)
