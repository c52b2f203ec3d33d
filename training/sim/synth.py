"""The simulated SPARCS screen: an honest stand-in for real single-cell image data.

``synthesize(cfg)`` writes single-cell files (SPARCSpy ``.h5`` and/or scPortrait ``.h5sc``) with the
five thesis channels, a ``manifest.csv`` naming each file's condition and slide, the gRNA
``library.csv``, and the ground truth (``truth.parquet`` per cell, ``truth_genes.csv`` per gene)
kept apart from the images. Only the simulated annotator, sequencer and evaluation read the truth.

Phenotype model (all lengths in units of the half crop size, so any ``image_size`` works):

* cells: ellipses with low-frequency boundary noise, nucleus inside (crop centred on the nucleus),
  WGA membrane rim, Hoechst nucleus with chromatin texture; masks Gaussian-smoothed (sigma 1 px)
  as scPortrait does; every image channel percentile-normalised per cell to [0, 1];
* LC3B = diffuse LC3-I + puncta (LC3-II on autophagosomes). A latent autophagy level ``a`` in
  [0, 1] sets puncta count, size and brightness; a lipidation block ``b`` in [0, 1] (ATG5-like)
  removes puncta and accumulates diffuse LC3-I; the stimulus moves the nuclear LC3 pool to the
  cytoplasm (nuclear/cytosolic ratio 0.8 unstimulated, 0.45 stimulated);
* conditions: stimulated (a ~ 0.8, ~8 % weak responders), unstimulated (a ~ 0.14, basal puncta),
  ATG5 KO (b = 1), EI24 KO (a ~ 0.35, smaller and dimmer puncta), a stimulated timecourse
  (sigmoid in time) and screen slides whose cells carry gRNAs: non-targeting, null genes, planted
  hits of graded effect (the strongest ATG5-like) and one gene with a novel phenotype (one or two
  large perinuclear LC3 aggregates); a targeting gRNA knocks out with ``knockout_efficiency``;
* slide batch effects (gain, camera offset, photon budget, focus blur, cell size), per-cell blur,
  shot and read noise, debris and mis-segmented doublets (two nuclei), ambiguous intermediate cells.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, special

from training.config import SynthConfig
from training.errors import ConfigError, DataError
from training.io.atomic import atomic_path
from training.io.formats import THESIS_CHANNELS, THESIS_KINDS, write_cells

CONTROL_LABELS = ("stimulated", "unstimulated", "atg5_ko", "ei24_ko")
TIMECOURSE = "timecourse"
SCREEN = "screen"
NON_TARGETING = "non-targeting"
STATES = ("on", "partial", "off", "blocked", "novel", "debris", "doublet")
MANIFEST = "manifest.csv"
LIBRARY = "library.csv"
TRUTH = "truth.parquet"
TRUTH_GENES = "truth_genes.csv"
MONTAGE = "montage.png"
MANIFEST_COLUMNS = ["path", "label", "group", "condition", "timepoint", "replicate"]
TRUTH_COLUMNS = [
    "path", "cell_id", "group", "condition", "timepoint", "state", "autophagy", "lc3_block",
    "grna", "gene", "knockout", "is_novel",
]
EXTENSIONS = {"h5sc": ".h5sc", "sparcspy": ".h5"}
SINGLE, DOUBLET, DEBRIS = 0, 1, 2


@dataclass(frozen=True)
class PhenotypeModel:
    """Constants of the phenotype model (see the module docstring)."""

    stim_beta: tuple[float, float] = (9.0, 2.5)  # autophagy level of stimulated cells
    weak_fraction: float = 0.08  # stimulated cells that respond weakly
    weak_beta: tuple[float, float] = (3.0, 5.0)
    unstim_beta: tuple[float, float] = (1.6, 10.0)
    atg5_residual: float = 0.02  # autophagy left in an ATG5 KO cell (relative)
    ei24_factor: tuple[float, float] = (0.35, 0.7)  # autophagy kept by an EI24 KO cell (uniform range)
    ei24_size: float = 0.85  # puncta size / brightness in EI24 KO
    ei24_bright: float = 0.9
    control_escape: float = 0.03  # KO control cells that still look wild-type
    tc_half_h: float = 5.0  # timecourse: sigmoid midpoint and width (hours), 14 h ~ stimulated
    tc_width_h: float = 1.6
    tc_end_h: float = 14.0
    tc_jitter: float = 0.12  # per-cell spread of the response fraction
    debris_fraction: float = 0.02
    doublet_fraction: float = 0.03
    weakest_hit: float = 0.3  # effect size of the weakest planted hit (the strongest is 1.0)
    # LC3B rendering (amplitudes relative to the diffuse LC3-I level of a wild-type cell)
    basal_puncta: float = 2.5
    max_puncta: float = 28.0
    puncta_gamma: float = 1.5
    puncta_sigma: float = 0.03
    puncta_amp: float = 1.6
    diffuse_drop: float = 0.35  # LC3-I consumed when autophagy is on
    nuclear_lc3: tuple[float, float] = (0.8, 0.45)  # nuclear/cytosolic LC3 unstimulated, stimulated (exported)
    nuclear_sd: float = 0.1  # cell-to-cell spread of that ratio
    block_diffuse: float = 2.0  # extra LC3-I when lipidation is blocked
    novel_puncta: float = 0.35  # novel cells keep this share of puncta ...
    novel_sigma: tuple[float, float] = (0.06, 0.09)  # ... and gain 1-2 large perinuclear aggregates
    novel_amp: tuple[float, float] = (5.0, 8.0)
    # geometry
    cell_radius: tuple[float, float] = (0.5, 0.8)
    nucleus_ratio: tuple[float, float] = (0.36, 0.5)
    cell_wobble: float = 0.07
    nucleus_wobble: float = 0.035
    # optics and camera (blur in px at 64 px crops, scaled with image size)
    slide_blur: tuple[float, float] = (0.0, 0.6)
    defocus_fraction: float = 0.08
    defocus_blur: tuple[float, float] = (0.5, 1.3)
    photons: tuple[float, float] = (80.0, 150.0)
    read_noise: tuple[float, float] = (0.02, 0.05)
    offset: tuple[float, float] = (0.02, 0.15)


MODEL = PhenotypeModel()


def phenotype_model(overrides: dict | None = None) -> PhenotypeModel:
    """:data:`MODEL` with ``overrides`` (``synth.phenotype``: field -> number, or a pair for the range / Beta fields).

    Unknown fields, a number where a pair belongs (or the reverse) and non-finite values are a ConfigError."""
    if not overrides:
        return MODEL
    known = {f.name: f for f in fields(PhenotypeModel)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"synth.phenotype: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    changes: dict = {}
    for name, value in overrides.items():
        default = getattr(MODEL, name)
        pair = isinstance(default, tuple)
        if pair != isinstance(value, list | tuple) or (pair and len(value) != len(default)):
            want = f"a list of {len(default)} numbers" if pair else "a number"
            raise ConfigError(f"synth.phenotype.{name}: expected {want} (default {list(default) if pair else default}),"
                              f" got {value!r}")
        numbers = [float(v) for v in value] if pair else [float(value)]
        if not all(math.isfinite(v) for v in numbers):
            raise ConfigError(f"synth.phenotype.{name}: values must be finite, got {value!r}")
        changes[name] = tuple(numbers) if pair else numbers[0]
    return replace(MODEL, **changes)


# -- plan --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the output directory
    fmt: str
    label: str
    group: str
    condition: str
    timepoint: float | None
    replicate: int
    n: int
    slide: int  # index of the slide (batch effects)
    index: int  # index of the file (random stream)


def _validate(cfg: SynthConfig) -> None:
    if cfg.cells_per_class < cfg.slides_per_condition:
        raise ConfigError(
            f"synth.cells_per_class ({cfg.cells_per_class}) must be >= synth.slides_per_condition "
            f"({cfg.slides_per_condition}): every slide needs cells"
        )
    hours = list(cfg.timecourse_hours)
    if any(h < 0 for h in hours) or len(set(hours)) != len(hours):
        raise ConfigError(f"synth.timecourse_hours must be distinct and >= 0, got {hours}")
    novel = 1 if cfg.novel_fraction > 0 else 0
    if cfg.n_hits + novel > cfg.n_genes:
        raise ConfigError(
            f"synth.n_genes ({cfg.n_genes}) must hold synth.n_hits ({cfg.n_hits}) planted hits"
            + (" and the novel-phenotype gene" if novel else "")
        )
    if novel and cfg.n_genes == 1 and cfg.n_controls == 0:
        raise ConfigError("synth: the library needs a gRNA besides the novel gene (raise n_genes or n_controls)")


def plan_files(cfg: SynthConfig) -> list[FileSpec]:
    """Every file to write, in order, with its manifest entries."""
    _validate(cfg)
    slides: list[tuple[str, str, str, float | None, int, int]] = []
    for label in CONTROL_LABELS:
        counts = np.array_split(np.arange(cfg.cells_per_class), cfg.slides_per_condition)
        for k, c in enumerate(counts):
            slides.append((f"controls/{label}_s{k + 1}", label, label, None, k + 1, len(c)))
    for t in cfg.timecourse_hours:
        slides.append((f"timecourse/timecourse_{t:g}h", TIMECOURSE, TIMECOURSE, float(t), 1, cfg.cells_per_timepoint))
    if cfg.cells_per_screen_slide > 0:
        for k in range(cfg.screen_slides):
            slides.append((f"screen/screen_s{k + 1}", "", SCREEN, None, k + 1, cfg.cells_per_screen_slide))
    specs: list[FileSpec] = []
    formats = ["h5sc", "sparcspy"] if cfg.format == "both" else [cfg.format]
    for s, (stem, label, condition, t, rep, n) in enumerate(slides):
        parts = max(1, math.ceil(n / cfg.max_cells_per_file))
        for p, cells in enumerate(np.array_split(np.arange(n), parts)):
            fmt = formats[len(specs) % len(formats)]
            name = stem if parts == 1 else f"{stem}_p{p + 1}"
            specs.append(
                FileSpec(
                    path=name + EXTENSIONS[fmt], fmt=fmt, label=label, group=Path(stem).name,
                    condition=condition, timepoint=t, replicate=rep, n=len(cells), slide=s, index=len(specs),
                )
            )
    return specs


# -- library -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Library:
    table: pd.DataFrame  # grna, gene, is_control
    genes: pd.DataFrame  # gene, role, effect
    weights: np.ndarray  # relative abundance of each gRNA in the screen (novel gene excluded)
    effect: np.ndarray  # per gRNA: hit effect size (0 = none)
    novel: np.ndarray  # per gRNA: targets the novel-phenotype gene


def make_library(cfg: SynthConfig, m: PhenotypeModel = MODEL) -> Library:
    """gRNA library with planted hits of graded effect and one novel-phenotype gene."""
    rng = np.random.default_rng([cfg.seed, 0])
    genes = [f"G{i + 1:03d}" for i in range(cfg.n_genes)]
    order = rng.permutation(cfg.n_genes)
    n_novel = 1 if cfg.novel_fraction > 0 else 0
    effects = np.zeros(cfg.n_genes)
    roles = np.array(["neutral"] * cfg.n_genes, dtype=object)
    hit_idx = order[: cfg.n_hits]
    if cfg.n_hits:
        effects[hit_idx] = np.linspace(1.0, m.weakest_hit, cfg.n_hits) if cfg.n_hits > 1 else 1.0
        roles[hit_idx] = "hit"
    if n_novel:
        roles[order[cfg.n_hits]] = "novel"
    rows = [(f"NTC_{i + 1:03d}", NON_TARGETING, True) for i in range(cfg.n_controls)]
    rows += [(f"{g}_{k + 1}", g, False) for g in genes for k in range(cfg.grnas_per_gene)]
    table = pd.DataFrame(rows, columns=["grna", "gene", "is_control"])
    gene_pos = {g: i for i, g in enumerate(genes)}
    idx = np.array([gene_pos.get(g, -1) for g in table["gene"]])
    effect = np.where(idx >= 0, effects[np.maximum(idx, 0)], 0.0)
    novel = (idx >= 0) & (roles[np.maximum(idx, 0)] == "novel")
    weights = rng.lognormal(0.0, 0.5, len(table))
    weights[novel] = 0.0
    gene_rows = [(NON_TARGETING, "control", 0.0)] if cfg.n_controls else []
    gene_rows += [(g, roles[i], float(effects[i])) for i, g in enumerate(genes)]
    gene_table = pd.DataFrame(gene_rows, columns=["gene", "role", "effect"])
    return Library(table, gene_table, weights / weights.sum(), effect, novel)


# -- latent cell states -------------------------------------------------------------------------------
@dataclass
class Cells:
    """Latent per-cell state of one file (arrays of equal length)."""

    a: np.ndarray  # autophagy level in [0, 1]
    block: np.ndarray  # LC3 lipidation block in [0, 1]
    stim: np.ndarray  # exposure to the stimulus (Torin) in [0, 1]: moves nuclear LC3 to the cytoplasm
    size: np.ndarray  # puncta size factor
    bright: np.ndarray  # puncta brightness factor
    kind: np.ndarray  # SINGLE, DOUBLET, DEBRIS
    novel: np.ndarray  # shows the novel phenotype
    grna: np.ndarray
    gene: np.ndarray
    knockout: np.ndarray

    def take(self, idx: np.ndarray | slice) -> Cells:
        return Cells(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def states(self) -> np.ndarray:
        s = np.where(self.a >= 0.55, "on", np.where(self.a >= 0.3, "partial", "off")).astype(object)
        s[self.block >= 0.5] = "blocked"
        s[(self.kind == DOUBLET)] = "doublet"
        s[self.novel] = "novel"
        s[self.kind == DEBRIS] = "debris"
        return s


def _stimulated(rng: np.random.Generator, n: int, m: PhenotypeModel) -> np.ndarray:
    a = rng.beta(*m.stim_beta, n)
    weak = rng.random(n) < m.weak_fraction
    a[weak] = rng.beta(*m.weak_beta, int(weak.sum()))
    return a


def _timecourse_fraction(t: float, m: PhenotypeModel) -> float:
    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-(x - m.tc_half_h) / m.tc_width_h))

    return (sig(t) - sig(0.0)) / (sig(m.tc_end_h) - sig(0.0))


def draw_cells(spec: FileSpec, cfg: SynthConfig, lib: Library, rng: np.random.Generator,
               m: PhenotypeModel = MODEL) -> Cells:
    """Latent states for the cells of one file."""
    n = spec.n
    a = _stimulated(rng, n, m)
    stim = np.ones(n)
    block = np.zeros(n)
    size = np.ones(n)
    bright = np.ones(n)
    novel = np.zeros(n, bool)
    knockout = np.zeros(n, bool)
    grna = np.full(n, "", dtype=object)
    gene = np.full(n, "", dtype=object)
    cond = spec.condition
    if cond == "unstimulated":
        a = rng.beta(*m.unstim_beta, n)
        stim[:] = 0.0
    elif cond in ("atg5_ko", "ei24_ko"):
        knockout = rng.random(n) >= m.control_escape
        if cond == "atg5_ko":
            a[knockout] *= m.atg5_residual
            block[knockout] = 1.0
        else:
            a[knockout] *= rng.uniform(*m.ei24_factor, int(knockout.sum()))
            size[knockout] = m.ei24_size
            bright[knockout] = m.ei24_bright
    elif cond == TIMECOURSE:
        w = np.clip(_timecourse_fraction(float(spec.timepoint or 0.0), m) + rng.normal(0, m.tc_jitter, n), 0, 1)
        a = (1 - w) * rng.beta(*m.unstim_beta, n) + w * a
        stim = w
    elif cond == SCREEN:
        n_novel = min(n, round(cfg.novel_fraction * n)) if lib.novel.any() else 0
        g = rng.choice(len(lib.weights), size=n, p=lib.weights)
        novel_grnas = np.nonzero(lib.novel)[0]
        if n_novel:
            g[rng.choice(n, n_novel, replace=False)] = rng.choice(novel_grnas, n_novel)
        grna = lib.table["grna"].to_numpy()[g]
        gene = lib.table["gene"].to_numpy()[g]
        targeting = ~lib.table["is_control"].to_numpy()[g]
        knockout = targeting & (rng.random(n) < cfg.knockout_efficiency)
        e = np.where(knockout, lib.effect[g], 0.0)
        a = a * (1 - 0.98 * e)
        block = e
        novel = knockout & lib.novel[g]
    u = rng.random(n)
    kind = np.where(u < m.debris_fraction, DEBRIS, np.where(u < m.debris_fraction + m.doublet_fraction, DOUBLET, SINGLE))
    novel &= kind != DEBRIS
    return Cells(np.clip(a, 0, 1), block, stim, size, bright, kind, novel, grna, gene, knockout)


# -- rendering ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slide:
    """Slide-level batch effects."""

    gain: np.ndarray  # per image channel (nucleus, membrane, LC3B)
    offset: np.ndarray
    photons: float
    read_noise: float
    blur_px: float  # at 64 px
    size: float
    lc3: float

    @classmethod
    def draw(cls, rng: np.random.Generator, m: PhenotypeModel = MODEL) -> Slide:
        return cls(
            gain=rng.lognormal(0, 0.2, 3), offset=rng.uniform(*m.offset, 3), photons=rng.uniform(*m.photons),
            read_noise=rng.uniform(*m.read_noise), blur_px=rng.uniform(*m.slide_blur),
            size=rng.lognormal(0, 0.06), lc3=rng.lognormal(0, 0.2),
        )


@dataclass
class Lobes:
    """Star-shaped blobs (cells or nuclei): centre, radius, ellipticity, angle, boundary harmonics k=2..5."""

    cx: np.ndarray
    cy: np.ndarray
    r: np.ndarray
    e: np.ndarray
    phi: np.ndarray
    hc: np.ndarray  # (n, 4)
    hs: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, e_max: float,
             wobble: np.ndarray | float) -> Lobes:
        n = len(cx)
        amp = np.broadcast_to(np.asarray(wobble, float), (n,))[:, None] / np.sqrt(np.arange(2, 6))[None]
        return cls(cx, cy, r, rng.uniform(0, e_max, n), rng.uniform(0, np.pi, n),
                   rng.normal(0, 1, (n, 4)) * amp, rng.normal(0, 1, (n, 4)) * amp)

    def boundary(self, ct: np.ndarray, st: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Boundary radius (normalised ellipse units) at angles given by cos/sin.

        ``ct``/``st`` are (P,) with ``idx`` (one angle per lobe ``idx[i]``) or (1, T) (T angles for every lobe)."""
        hc, hs = (self.hc, self.hs) if idx is None else (self.hc[idx], self.hs[idx])
        extra = (slice(None),) + (None,) * (ct.ndim - 1)
        ck, sk = ct, st
        rb = 1.0
        for k in range(4):  # harmonics 2..5
            ck, sk = ck * ct - sk * st, sk * ct + ck * st
            rb = rb + hc[:, k][extra] * ck + hs[:, k][extra] * sk
        return rb

    def field(self, gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance (half-size units, > 0 outside) and normalised radius (1 on the boundary)."""
        f32 = np.float32
        n, size = len(self.cx), gx.shape[-1]
        c, s = np.cos(self.phi).astype(f32)[:, None, None], np.sin(self.phi).astype(f32)[:, None, None]
        dx, dy = gx - self.cx.astype(f32)[:, None, None], gy - self.cy.astype(f32)[:, None, None]
        ax = (self.r * (1 + self.e)).astype(f32)[:, None, None]
        ay = (self.r / (1 + self.e)).astype(f32)[:, None, None]
        u, v = (dx * c + dy * s) / ax, (dy * c - dx * s) / ay
        # boundary radius from a table over angles (nearest of 8 * size angles: < 1/4 px off at the rim)
        steps = 8 * size
        angles = (np.arange(steps) + 0.5) * (2 * np.pi / steps)
        table = self.boundary(np.cos(angles)[None], np.sin(angles)[None]).astype(f32)
        pos = np.arctan2(v, u)
        pos += f32(np.pi)
        pos *= f32(steps / (2 * np.pi))
        k = np.minimum(pos.astype(np.int32), steps - 1).reshape(n, -1)
        k += steps // 2  # the table starts at angle 0, arctan2 + pi at angle pi
        k %= steps
        t = np.hypot(u, v)
        t /= np.take_along_axis(table, k, axis=1).reshape(t.shape)
        return (t - 1) * self.r.astype(f32)[:, None, None], t

    def points(self, idx: np.ndarray, theta: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions at angle ``theta`` and normalised radius ``t`` in lobes ``idx``."""
        ct, st = np.cos(theta), np.sin(theta)
        rad = t * self.boundary(ct, st, idx)
        u = rad * ct * self.r[idx] * (1 + self.e[idx])
        v = rad * st * self.r[idx] / (1 + self.e[idx])
        c, s = np.cos(self.phi[idx]), np.sin(self.phi[idx])
        return self.cx[idx] + u * c - v * s, self.cy[idx] + u * s + v * c


class Canvas:
    """Pixel grid of one batch; coordinates in half-size units, (0, 0) at the crop centre."""

    def __init__(self, size: int, batch: int):
        self.size, self.batch, self.h = size, batch, size / 2.0
        axis = ((np.arange(size) + 0.5) / self.h - 1).astype(np.float32)
        self.gx, self.gy = axis[None, None, :], axis[None, :, None]
        self._basis: dict[int, np.ndarray] = {}

    def soft(self, sd: np.ndarray) -> np.ndarray:
        """Binary mask smoothed with a 1 px Gaussian, from a signed distance (as scPortrait's masks).

        Uses the logistic approximation of the Gaussian CDF (error < 0.01)."""
        z = np.minimum(sd * np.float32(1.702 * self.h), np.float32(60.0))
        return np.float32(1.0) / (np.float32(1.0) + np.exp(z))

    def texture(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        """Smooth Gaussian random field with ~k blobs across the crop, unit std."""
        if k not in self._basis:
            centres = (np.arange(k) + 0.5) / k * 2 - 1
            axis = (np.arange(self.size) + 0.5) / self.h - 1
            w = np.exp(-0.5 * ((axis[:, None] - centres[None]) * k / 2.0) ** 2)
            self._basis[k] = (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)
        b = self._basis[k]
        g = rng.standard_normal((n, k, k), dtype=np.float32)
        return np.matmul(np.matmul(b[None], g), b.T[None])

    def splat(self, out: np.ndarray, cell: np.ndarray, x: np.ndarray, y: np.ndarray, sigma: np.ndarray,
              amp: np.ndarray) -> None:
        """Add pixel-integrated Gaussian spots (peak ``amp`` for wide spots) into ``out`` (n, S, S)."""
        if len(cell) == 0:
            return
        s = self.size
        px, py, sp = (x + 1) * self.h, (y + 1) * self.h, np.maximum(sigma * self.h, 0.3)
        reach = np.ceil(3 * sp).astype(int)
        idx, vals = [], []
        for rr in np.unique(reach):  # spots grouped by footprint, so small spots stay cheap
            sel = np.nonzero(reach == rr)[0]
            off = np.arange(-rr, rr + 1)
            ix = np.floor(px[sel]).astype(int)[:, None] + off[None]
            iy = np.floor(py[sel]).astype(int)[:, None] + off[None]
            q = math.sqrt(2) * sp[sel, None]
            wx = special.erf((ix + 1 - px[sel, None]) / q) - special.erf((ix - px[sel, None]) / q)
            wy = special.erf((iy + 1 - py[sel, None]) / q) - special.erf((iy - py[sel, None]) / q)
            v = (amp[sel] * 0.5 * np.pi * sp[sel] ** 2)[:, None, None] * wy[:, :, None] * wx[:, None, :]
            ok = ((iy >= 0) & (iy < s))[:, :, None] & ((ix >= 0) & (ix < s))[:, None, :]
            flat = cell[sel, None, None] * (s * s) + iy[:, :, None] * s + ix[:, None, :]
            idx.append(flat[ok])
            vals.append(v[ok])
        flat_out = out.reshape(-1)
        idx_all, val_all = np.concatenate(idx), np.concatenate(vals)
        lo = int(idx_all.min())
        flat_out[lo:] += np.bincount(idx_all - lo, weights=val_all, minlength=flat_out.size - lo).astype(np.float32)


def _geometry(rng: np.random.Generator, cells: Cells, slide: Slide, m: PhenotypeModel) -> tuple[
        Lobes, Lobes, Lobes | None, Lobes | None, np.ndarray]:
    """Cell and nucleus lobes; doublets get a second cell/nucleus (returned for those cells only)."""
    n = len(cells.a)
    doublet, debris = cells.kind == DOUBLET, cells.kind == DEBRIS
    r = rng.uniform(*m.cell_radius, n) * slide.size
    r[doublet] *= 0.72
    r[debris] = rng.uniform(0.15, 0.35, int(debris.sum()))
    rn = r * rng.uniform(*m.nucleus_ratio, n)
    jitter = rng.normal(0, 0.02, (2, n))
    dir2 = rng.uniform(0, 2 * np.pi, n)
    r2 = r * rng.uniform(0.85, 1.15, n)
    sep = np.where(doublet, 0.45 * (r + r2), 0.0)  # nuclei of a doublet sit on either side of the centre
    nx, ny = jitter[0] + sep * np.cos(dir2), jitter[1] + sep * np.sin(dir2)
    psi, dist = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 0.45, n) * (r - rn)
    wobble = np.where(debris, 0.2, m.cell_wobble)
    cell = Lobes.draw(rng, nx + dist * np.cos(psi), ny + dist * np.sin(psi), r, 0.3, wobble)
    nuc = Lobes.draw(rng, nx, ny, rn, 0.25, m.nucleus_wobble)
    d = np.nonzero(doublet)[0]
    cell2 = nuc2 = None
    if len(d):
        bx, by = jitter[0][d] - sep[d] * np.cos(dir2[d]), jitter[1][d] - sep[d] * np.sin(dir2[d])
        rn2 = r2[d] * rng.uniform(*m.nucleus_ratio, len(d))
        cell2 = Lobes.draw(rng, bx, by, r2[d], 0.3, m.cell_wobble)
        nuc2 = Lobes.draw(rng, bx, by, rn2, 0.25, m.nucleus_wobble)
    return cell, nuc, cell2, nuc2, d


def render(cells: Cells, slide: Slide, size: int, rng: np.random.Generator, m: PhenotypeModel = MODEL) -> np.ndarray:
    """Images ``(n, 5, size, size)`` float32 in [0, 1]: nucleus mask, cytosol mask, nucleus, membrane, LC3B."""
    n = len(cells.a)
    cv = Canvas(size, n)
    f32 = np.float32
    cell, nuc, cell2, nuc2, d = _geometry(rng, cells, slide, m)
    debris = cells.kind == DEBRIS
    sd_c, t_c = cell.field(cv.gx, cv.gy)
    sd_n, _ = nuc.field(cv.gx, cv.gy)
    w = f32(0.045)
    rim = np.exp(-0.5 * ((sd_c + w) / w) ** 2)  # WGA plasma-membrane rim, cut at its middle by the mask
    if len(d):
        sd2, t2 = cell2.field(cv.gx, cv.gy)
        rim[d] = np.maximum(rim[d], np.exp(-0.5 * ((sd2 + w) / w) ** 2))
        sd_c[d], t_c[d] = np.minimum(sd_c[d], sd2), np.minimum(t_c[d], t2)
        sd_n[d] = np.minimum(sd_n[d], nuc2.field(cv.gx, cv.gy)[0])
    cyto = cv.soft(sd_c)
    no_nucleus = debris & (rng.random(n) < 0.5)
    nmask = np.minimum(cv.soft(sd_n), cyto)
    nmask[no_nucleus] = 0
    inside = cv.soft(sd_c + f32(1.5 / cv.h))  # a little inside the boundary: where the cell body is thick

    # Hoechst: DNA content, low-frequency and chromatin texture; debris has condensed bright chromatin
    dna = rng.lognormal(0, 0.15, n) * np.where(debris, 2.5, 1.0)
    hoechst = nmask * (1 + 0.18 * cv.texture(rng, n, 5) + 0.12 * cv.texture(rng, n, max(4, size // 5)))
    hoechst *= dna.astype(f32)[:, None, None]

    # WGA: membrane rim, faint cytoplasm, Golgi near the nucleus
    wga = rim + 0.25 * inside * (1 + 0.3 * cv.texture(rng, n, 6))
    wga *= rng.lognormal(0, 0.2, n).astype(f32)[:, None, None]
    n_golgi = rng.integers(3, 8, n)
    gi = np.repeat(np.arange(n), n_golgi)
    gx, gy = nuc.points(gi, rng.uniform(0, 2 * np.pi, len(gi)), rng.uniform(1.05, 1.4, len(gi)))
    cv.splat(wga, gi, gx, gy, np.full(len(gi), 0.04), rng.uniform(0.2, 0.5, len(gi)))

    # LC3B: diffuse LC3-I (thicker near the nucleus, dimmer over it) + puncta + novel aggregates
    expr = rng.lognormal(0, 0.3, n) * slide.lc3
    diffuse = expr * (1 - m.diffuse_drop * cells.a) * (1 + m.block_diffuse * cells.block)
    diffuse[debris] *= 0.6
    nuclear = m.nuclear_lc3[0] + (m.nuclear_lc3[1] - m.nuclear_lc3[0]) * cells.stim  # nuclear / cytosolic LC3
    nuclear = np.clip(nuclear + rng.normal(0, m.nuclear_sd, n), 0.1, 1.0)
    profile = np.clip(1.25 - 0.5 * t_c**2, 0.5, None) * (1 + 0.15 * cv.texture(rng, n, 6))
    profile *= 1 - (1 - nuclear.astype(f32))[:, None, None] * nmask
    lc3 = inside * profile * diffuse.astype(f32)[:, None, None]
    lam = m.basal_puncta * (1 - cells.block) + m.max_puncta * cells.a**m.puncta_gamma
    lam = lam * np.where(cells.kind == DOUBLET, 2.0, 1.0) * np.where(cells.novel, m.novel_puncta, 1.0)
    lam[debris] = 2.0
    k = rng.poisson(lam)
    pi = np.repeat(np.arange(n), k)
    theta = rng.uniform(0, 2 * np.pi, len(pi))
    t = 0.15 + 0.8 * rng.beta(1.4, 1.6, len(pi))
    x, y = cell.points(pi, theta, t)
    if len(d):  # half the puncta of a doublet belong to its second cell
        pos = np.full(n, -1)
        pos[d] = np.arange(len(d))
        second = (pos[pi] >= 0) & (rng.random(len(pi)) < 0.5)
        x2, y2 = cell2.points(pos[pi[second]], theta[second], t[second])
        x[second], y[second] = x2, y2
    a_p = cells.a[pi]
    sigma = m.puncta_sigma * (0.75 + 0.5 * a_p) * cells.size[pi] * rng.lognormal(0, 0.2, len(pi))
    sigma = np.clip(sigma, 0.4 * m.puncta_sigma, 2.5 * m.puncta_sigma)
    amp = m.puncta_amp * (0.5 + a_p) * cells.bright[pi] * rng.lognormal(0, 0.3, len(pi)) * expr[pi]
    # puncta above or below the nucleus are out of focus: dimmer
    col = np.clip(((x + 1) * cv.h).astype(int), 0, size - 1)
    row = np.clip(((y + 1) * cv.h).astype(int), 0, size - 1)
    amp = amp * (1 - 0.45 * nmask[pi, row, col])
    cv.splat(lc3, pi, x, y, sigma, amp)
    # novel: one or two large perinuclear aggregates; debris: a few irregular bright clumps
    big = np.nonzero(cells.novel | debris)[0]
    nb = np.where(debris[big], rng.integers(1, 4, len(big)), rng.integers(1, 3, len(big)))
    bi = np.repeat(big, nb)
    if len(bi):
        bx, by = nuc.points(bi, rng.uniform(0, 2 * np.pi, len(bi)), rng.uniform(1.0, 1.3, len(bi)))
        rx, ry = cell.points(bi, rng.uniform(0, 2 * np.pi, len(bi)), rng.uniform(0, 0.8, len(bi)))
        deb = debris[bi]
        bx, by = np.where(deb, rx, bx), np.where(deb, ry, by)
        bs = np.where(deb, rng.uniform(0.03, 0.06, len(bi)), rng.uniform(*m.novel_sigma, len(bi)))
        ba = np.where(deb, rng.uniform(2, 5, len(bi)), rng.uniform(*m.novel_amp, len(bi))) * expr[bi]
        cv.splat(lc3, bi, bx, by, bs, ba)

    # optics: slide focus + per-cell defocus, then camera gain, offset, shot and read noise
    img = np.stack([hoechst, wga, lc3], axis=1)
    scale = size / 64.0
    blur = slide.blur_px + np.where(rng.random(n) < m.defocus_fraction, rng.uniform(*m.defocus_blur, n), 0.0)
    blur = np.round(blur * scale, 1)
    for b in np.unique(blur):
        if b > 0:
            sel = np.nonzero(blur == b)[0]
            img[sel] = ndimage.gaussian_filter(img[sel], sigma=(0, 0, b, b), mode="constant", truncate=3.0)
    img = img * slide.gain.astype(f32)[None, :, None, None] + slide.offset.astype(f32)[None, :, None, None]
    # photons and read noise are per 64 px-crop pixel: smaller crops are binned (less noise), larger ones not
    photons, read = f32(slide.photons / scale**2), f32(slide.read_noise * scale)
    noise = rng.standard_normal(img.shape, dtype=f32)
    img += noise * np.sqrt(np.maximum(img, 0) / photons + read**2)
    np.maximum(img, 0, out=img)
    # segmentation masks cut the cell out: nucleus channel by the nucleus mask, the others by the cytosol mask
    img[:, 0] *= nmask
    img[:, 1:] *= cyto[:, None]
    out = np.empty((n, 5, size, size), f32)
    out[:, 0], out[:, 1] = nmask, cyto
    out[:, 2:] = percentile_normalize(img)
    out[out < 2.0**-14] = 0  # below float16's normal range: subnormals are slow to convert and meaningless
    return out


def percentile_normalize(img: np.ndarray, lower: float = 0.001, upper: float = 0.999) -> np.ndarray:
    """Per image and channel: map the lower/upper quantiles to 0/1 and clip (scPortrait's default)."""
    flat = img.reshape(-1, img.shape[-2] * img.shape[-1])
    n = flat.shape[1]
    hi = np.quantile(flat, upper, axis=-1)
    lo = np.zeros_like(hi)
    # the lower quantile is ~0 wherever enough pixels lie outside the mask; compute it only elsewhere
    need = (flat <= 1e-6).sum(axis=1) <= math.floor(lower * (n - 1)) + 1
    if need.any():
        lo[need] = np.quantile(flat[need], lower, axis=-1)
    span = np.maximum(hi - lo, 1e-6).astype(np.float32)
    out = (flat - lo[:, None].astype(np.float32)) / span[:, None]
    return np.clip(out, 0, 1, out=out).reshape(img.shape)


# -- writing ------------------------------------------------------------------------------------------
def _cell_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Increasing ids with random gaps, never equal to row numbers."""
    return int(rng.integers(1, 5000)) + np.cumsum(rng.integers(1, 8, n)).astype(np.int64)


def _montage_slots(cfg: SynthConfig, lib: Library) -> list[tuple[str, str]]:
    names = {"stimulated": "stimulated (Torin)", "unstimulated": "unstimulated", "atg5_ko": "ATG5 KO, stimulated",
             "ei24_ko": "EI24 KO, stimulated"}
    rows = [(c, names[c]) for c in CONTROL_LABELS]
    rows += [(f"tc:{t:g}", f"timecourse {t:g} h") for t in cfg.timecourse_hours]
    if cfg.cells_per_screen_slide and cfg.screen_slides:
        rows.append(("screen:ntc", "screen: non-targeting"))
        hits = lib.genes[lib.genes["role"] == "hit"].sort_values("effect", ascending=False)
        if len(hits):
            rows.append(("screen:strong", f"screen: {hits.iloc[0]['gene']} KO (effect {hits.iloc[0]['effect']:.2f})"))
        if len(hits) > 1:
            rows.append(("screen:weak", f"screen: {hits.iloc[-1]['gene']} KO (effect {hits.iloc[-1]['effect']:.2f})"))
        if lib.novel.any():
            rows.append(("screen:novel", "screen: novel-phenotype KO"))
    rows.append(("artefact", "debris / doublet"))
    return rows


def _slot_of(spec: FileSpec, cells: Cells, lib: Library) -> np.ndarray:
    """Montage row key of every cell of a file ('' for none)."""
    n = spec.n
    key = np.full(n, "", dtype=object)
    typical = cells.kind == SINGLE
    if spec.condition in CONTROL_LABELS:
        key[typical] = spec.condition
    elif spec.condition == TIMECOURSE:
        key[typical] = f"tc:{spec.timepoint:g}"
    else:
        effects = lib.genes.set_index("gene")["effect"]
        e = np.array([effects.get(g, 0.0) for g in cells.gene])
        hit_e = effects[lib.genes.set_index("gene")["role"] == "hit"]
        key[typical & (cells.gene == NON_TARGETING)] = "screen:ntc"
        if len(hit_e):
            key[typical & cells.knockout & (e == hit_e.max())] = "screen:strong"
            key[typical & cells.knockout & (e == hit_e.min()) & (e < hit_e.max())] = "screen:weak"
        key[typical & cells.novel] = "screen:novel"
    key[cells.kind != SINGLE] = "artefact"
    return key


def write_montage(examples: dict[str, list[np.ndarray]], slots: list[tuple[str, str]], path: Path,
                  title: str, per_row: int = 8) -> Path:
    """A grid of example cells with row titles: LC3B in grey, then two merges (LC3B green, WGA red,
    Hoechst blue). Drawn with Pillow (fast; no plotting stack needed)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [(k, name) for k, name in slots if examples.get(k)]
    if not rows:
        raise DataError("no cells to show in the montage")
    s = examples[rows[0][0]][0].shape[-1]
    zoom = max(1, math.ceil(72 / s))
    tile, gap, n_grey = s * zoom, 4, per_row - 2
    left, top, font_px = 250, 58, 14
    width = left + per_row * (tile + gap) + 3 * gap
    canvas = np.full((top + len(rows) * (tile + gap) + gap, width, 3), 255, np.uint8)

    def put(i: int, j: int, rgb: np.ndarray) -> None:
        y0 = top + i * (tile + gap)
        x0 = left + j * (tile + gap) + (3 * gap if j >= n_grey else 0)
        big = np.repeat(np.repeat(np.clip(rgb, 0, 1), zoom, 0), zoom, 1)
        canvas[y0:y0 + tile, x0:x0 + tile] = (255 * big + 0.5).astype(np.uint8)

    for i, (key, _) in enumerate(rows):
        for j, cell in enumerate(examples[key][:n_grey]):
            put(i, j, np.repeat(cell[4][..., None], 3, -1))
        for j, cell in enumerate(examples[key][:2]):
            put(i, n_grey + j, np.stack([0.8 * cell[3], cell[4], cell[2]], axis=-1))
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_px)
    small = ImageFont.load_default(size=font_px - 2)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    draw.text((left, top - 20), "LC3B (per-cell normalised)", fill=(0, 0, 0), font=small)
    draw.text((left + n_grey * (tile + gap) + 3 * gap, top - 20), "merge: LC3B green, WGA red, Hoechst blue",
              fill=(0, 0, 0), font=small)
    for i, (_, name) in enumerate(rows):
        y = top + i * (tile + gap) + tile // 2
        draw.text((left - 10, y), name, fill=(0, 0, 0), font=font, anchor="rm")
    image.save(path)
    return path


def make_file(cfg: SynthConfig, spec: FileSpec, lib: Library, root: Path, keys: list[str],
              per_row: int = 8) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Render and write one file under ``root``; return its truth rows and montage examples."""
    m = phenotype_model(cfg.phenotype)
    rng = np.random.default_rng([cfg.seed, 2, spec.index])
    slide = Slide.draw(np.random.default_rng([cfg.seed, 1, spec.slide]), m)
    cells = draw_cells(spec, cfg, lib, rng, m)
    images = np.empty((spec.n, 5, cfg.image_size, cfg.image_size), np.float16)
    for start in range(0, spec.n, cfg.batch_size):
        stop = min(start + cfg.batch_size, spec.n)
        images[start:stop] = render(cells.take(slice(start, stop)), slide, cfg.image_size, rng, m)
    ids = _cell_ids(rng, spec.n)
    target = root / spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    compression = None if cfg.compression == "none" else cfg.compression
    write_cells(target, images, ids, spec.fmt, channel_names=THESIS_CHANNELS, channel_kinds=THESIS_KINDS,
                compression=compression)
    truth = pd.DataFrame({
        "path": spec.path, "cell_id": ids, "group": spec.group, "condition": spec.condition,
        "timepoint": np.nan if spec.timepoint is None else spec.timepoint, "state": cells.states(),
        "autophagy": cells.a, "lc3_block": cells.block, "grna": cells.grna, "gene": cells.gene,
        "knockout": cells.knockout, "is_novel": cells.novel,
    })
    slot = _slot_of(spec, cells, lib)
    examples = {k: images[np.nonzero(slot == k)[0][:per_row]].astype(np.float32) for k in keys}
    return truth, {k: v for k, v in examples.items() if len(v)}


def synthesize(cfg: SynthConfig, out_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Write the simulated screen into ``out_dir`` (default ``cfg.out``) atomically; return the manifest path.

    Files are generated by ``cfg.workers`` threads; each file has its own random stream, so the
    output is identical for any number of workers.
    """
    from tqdm.auto import tqdm

    final = Path(out_dir if out_dir is not None else cfg.out)
    m = phenotype_model(cfg.phenotype)  # a bad override fails before anything is written
    specs = plan_files(cfg)
    lib = make_library(cfg, m)
    slots = _montage_slots(cfg, lib)
    keys = [k for k, _ in slots]
    per_row = 8
    results: dict[int, tuple[pd.DataFrame, dict[str, np.ndarray]]] = {}
    bar = tqdm(total=sum(s.n for s in specs), desc="synth", unit="cell", disable=not progress)
    with atomic_path(final, suffix="") as tmp:
        tmp.mkdir(parents=True)
        workers = min(cfg.workers, len(specs))
        if workers <= 1:
            for spec in specs:
                results[spec.index] = make_file(cfg, spec, lib, tmp, keys, per_row)
                bar.update(spec.n)
        else:
            with ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(make_file, cfg, spec, lib, tmp, keys, per_row): spec
                           for spec in sorted(specs, key=lambda s: -s.n)}
                for fut in as_completed(futures):
                    results[futures[fut].index] = fut.result()
                    bar.update(futures[fut].n)
        bar.close()
        manifest = [(s.path, s.label, s.group, s.condition, s.timepoint, s.replicate) for s in specs]
        pd.DataFrame(manifest, columns=MANIFEST_COLUMNS).to_csv(tmp / MANIFEST, index=False)
        lib.table.to_csv(tmp / LIBRARY, index=False)
        lib.genes.to_csv(tmp / TRUTH_GENES, index=False)
        table = pd.concat([results[s.index][0] for s in specs], ignore_index=True)[TRUTH_COLUMNS]
        table = table.astype({"grna": str, "gene": str, "state": str, "knockout": bool, "is_novel": bool})
        table.to_parquet(tmp / TRUTH, index=False)
        examples: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for spec in specs:
            for k, imgs in results[spec.index][1].items():
                examples[k].extend(list(imgs[: per_row - len(examples[k])]))
        title = (f"Simulated SPARCS screen (seed {cfg.seed}, {cfg.image_size} px): not real data; "
                 "rows are conditions / screen cell states")
        write_montage(examples, slots, tmp / MONTAGE, title, per_row)
    return final / MANIFEST


# -- readers ------------------------------------------------------------------------------------------
def _beside(manifest_path: str | os.PathLike, name: str) -> Path:
    path = Path(os.path.dirname(os.fspath(manifest_path))) / name
    if not path.is_file():
        raise DataError(f"{path}: not found (written by `spatial synth` beside {manifest_path})")
    return path


def load_truth(manifest_path: str | os.PathLike) -> pd.DataFrame:
    """Per-cell ground truth with ``source_file`` as the cell index names files."""
    path = _beside(manifest_path, TRUTH)
    table = pd.read_parquet(path)
    missing = [c for c in TRUTH_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    base = os.path.dirname(os.fspath(manifest_path))
    table["source_file"] = [os.path.normpath(os.path.join(base, p)) for p in table["path"]]
    return table


def load_library(manifest_path: str | os.PathLike) -> pd.DataFrame:
    """The gRNA library (``grna, gene, is_control``)."""
    path = _beside(manifest_path, LIBRARY)
    table = pd.read_csv(path, keep_default_na=False, dtype={"grna": str, "gene": str})
    if list(table.columns[:3]) != ["grna", "gene", "is_control"]:
        raise DataError(f"{path}: expected columns grna,gene,is_control, got {list(table.columns)}")
    table["is_control"] = table["is_control"].astype(str).str.lower().isin(["true", "1"])
    return table


def load_gene_truth(manifest_path: str | os.PathLike) -> pd.DataFrame:
    """Per-gene ground truth (``gene, role, effect``; role is control, neutral, hit or novel)."""
    return pd.read_csv(_beside(manifest_path, TRUTH_GENES), keep_default_na=False)
