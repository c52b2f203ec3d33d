"""Semi-supervised regimes as objectives for the one engine (``train.regime=semisupervised``).

* :class:`FixMatchObjective` (``ssl.method=fixmatch``, the default): supervised cross-entropy on
  standard-augmented labeled cells, plus cross-entropy of the student on a *strong* view of each unlabeled cell
  against the pseudo-label an EMA teacher gives its *weak* view (flips / 90-degree rotations), kept only where
  the teacher is confident (``ssl.threshold``). The teacher's decay warms up as min(ema_decay, (1+t)/(10+t)) so
  that it follows the student in short schedules. Optional distribution alignment (ReMixMatch) rescales the
  teacher's probabilities by labeled prior / running unlabeled mean. The open-set guard: a screen holds
  phenotypes that are in no class, so unlabeled cells whose teacher features lie far from every labeled class
  (standardised distance to the nearest class mean beyond the ``ssl.guard_quantile`` of the labeled cells'
  distances) are down-weighted smoothly instead of being forced into a class.
* :class:`AutoencoderObjective` (``ssl.method=autoencoder``, the thesis variant): the ConvNeXt body is the
  encoder of a convolutional decoder; reconstruction loss on every cell, classification loss on labeled cells.

Batches come from :class:`MixedLoader`, which zips the labeled loader with an unlabeled one (``u_image``,
``u_idx``; ``ssl.unlabeled_ratio`` unlabeled cells per labeled batch slot). With ``ssl.balance_unlabeled=predicted``
(:class:`PredictedClassBalance`) the unlabeled cells are not shuffled but drawn, at the start of every epoch, with
replacement and weights inverse to the frequency of the EMA teacher's predicted class over the whole pool (one
inference pass per epoch; the first epoch, before there is a teacher, is plain shuffling), so a pool of mostly
stimulated cells no longer starves the other classes of pseudo-labels. The unlabeled cells are the screen
(split ``unlabeled``) plus the training cells whose labels ``ssl.label_fraction`` hid; test, validation and
held-out-class cells never are. Teacher, alignment and guard statistics live in the objective's
``state_dict`` (so ``resume`` continues exactly).

Per epoch the engine logs ``ssl/mask_rate``, ``ssl/weight`` (mean unlabeled weight after the guard),
``ssl/pl_frac/<class>`` (share of the unlabeled batch pseudo-labeled as each class: the pseudo-label histogram)
and, when a simulator truth table is given (``ssl.truth``; it is read for logging only), ``ssl/pl_accuracy``
(masked pseudo-labels of cells whose true state is a class), ``ssl/pl_accuracy_all`` (all of them),
``ssl/mask_rate_noclass`` and ``ssl/guard_class`` / ``ssl/guard_noclass`` (mean guard weight of cells whose
state is / is not one of the classes). Ratios are per-step means. With the balanced pool, ``ssl/pool_pred/<class>`` is the share of the
whole pool the teacher predicted as each class at the start of the epoch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from training.config import Params
from training.data.augment import Augmenter
from training.data.loader import loader_for
from training.data.streams import MixedLoader, RepeatLoader, balanced_weights
from training.data.streams import training_stream as stream
from training.data.trainset import HIDDEN, unlabeled_table
from training.engine import StepContext
from training.errors import ConfigError, TrainingError

__all__ = ["MixedLoader", "PredictedClassBalance", "RepeatLoader", "training_stream"]
log = logging.getLogger(__name__)
NO_UNLABELED = ("semi-supervised training needs unlabeled cells: the split has none (no screen files in the manifest, "
                "split.unlabeled_max=0?) and ssl.label_fraction=1 hides no labels")
UNKNOWN = -2  # truth code: no truth for this cell (NO_CLASS = -1: its state is none of the classes)


def training_stream(train_loader, data, params: Params, seed: int, objective=None, model: nn.Module | None = None):
    """The engine's training data for ``data`` (``TrainData``) and the regime: the labeled loader as given
    (supervised, all labels), repeated to the full-data step budget (``ssl.label_fraction`` < 1), or zipped with a
    loader over the unlabeled cells (semi-supervised) — through :func:`training.data.streams.training_stream`.
    ``ssl.balance_unlabeled=predicted`` needs the FixMatch ``objective`` (its teacher predicts) and the ``model``
    it trains."""
    b = params.data.batch_size
    n_full = int((data.cells["split"] == "train").sum())
    if HIDDEN in data.cells:
        n_full += int(data.cells[HIDDEN].fillna(False).astype(bool).sum())
    steps = max(len(train_loader), math.ceil(n_full / b))
    if params.train.regime != "semisupervised":
        return stream(train_loader, steps)
    unl = unlabeled_table(data)
    if unl.empty:
        raise TrainingError(NO_UNLABELED)
    ub = params.ssl.unlabeled_ratio * b
    u_loader = loader_for(unl, params.data, data.channels, shuffle=True, seed=seed + 1,
                          batch_size=min(ub, len(unl)), drop_last=True)
    rebalance = None
    if params.ssl.balance_unlabeled == "predicted":
        pool = loader_for(unl, params.data, data.channels, shuffle=False, seed=seed, batch_size=params.score.batch_size)
        rebalance = balance_for(params, objective, model, pool, len(unl))
    return stream(train_loader, steps, u_loader, rebalance)


def balance_for(params: Params, objective, model: nn.Module | None, pool, n_cells: int) -> PredictedClassBalance:
    """The ``ssl.balance_unlabeled=predicted`` rebalancer, or a ConfigError naming what is missing."""
    if params.ssl.method != "fixmatch" or not isinstance(objective, FixMatchObjective) or model is None:
        raise ConfigError("ssl.balance_unlabeled=predicted balances FixMatch's unlabeled pool by its teacher's "
                          f"predictions: it needs ssl.method=fixmatch (got {params.ssl.method}) and the objective "
                          "and model when the stream is built")
    return PredictedClassBalance(objective, model, pool, n_cells)


# -- FixMatch -----------------------------------------------------------------------------------------------
def pseudo_labels(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels (argmax) and the mask of cells whose max probability reaches ``threshold``."""
    conf, labels = probs.max(dim=1)
    return labels, conf >= threshold


def flexible_thresholds(learned: Tensor, unused: float, threshold: float) -> Tensor:
    """FlexMatch's curriculum thresholds: class ``c``'s learning effect ``learned[c]`` (share of unlabeled cells
    confidently predicted as ``c``) normalised by the best-learned class, or by the share still unused while that
    is larger (warm-up), then mapped through x / (2 - x): well-learned classes keep ``threshold``, classes the
    model seldom predicts confidently get a lower bar."""
    beta = learned / max(float(learned.max()), unused, 1e-12)
    return threshold * beta / (2.0 - beta)


def _features_logits(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    z = net.forward_head(net.forward_features(x), pre_logits=True)
    return z, net.get_classifier()(z)


class NoveltyGuard:
    """Running class means and per-dimension variance of labeled teacher features; weights unlabeled cells by
    their standardised distance to the nearest class mean (1 inside the labeled ``quantile``, decaying beyond)."""

    def __init__(self, n_classes: int, quantile: float = 0.95, momentum: float = 0.99):
        self.n_classes, self.quantile, self.momentum = n_classes, quantile, momentum
        self.means: Tensor | None = None
        self.seen: Tensor | None = None
        self.var: Tensor | None = None
        self.radius: Tensor | None = None

    def _dist(self, z: Tensor, means: Tensor) -> Tensor:
        return (((z[:, None, :] - means[None]) ** 2) / self.var).mean(-1).sqrt()  # (N, K)

    def _to(self, device: torch.device) -> None:
        for k in ("means", "seen", "var", "radius"):
            v = getattr(self, k)
            if v is not None and v.device != device:
                setattr(self, k, v.to(device))

    @torch.no_grad()
    def update(self, z: Tensor, y: Tensor) -> None:
        z = z.float()
        self._to(z.device)
        d = z.shape[1]
        if self.means is None:
            self.means = torch.zeros(self.n_classes, d, device=z.device)
            self.seen = torch.zeros(self.n_classes, dtype=torch.bool, device=z.device)
        m = self.momentum
        for c in y.unique().tolist():
            batch_mean = z[y == c].mean(0)
            self.means[c] = torch.where(self.seen[c], m * self.means[c] + (1 - m) * batch_mean, batch_mean)
            self.seen[c] = True
        resid_var = ((z - self.means[y]) ** 2).mean(0).clamp_min(1e-6)
        self.var = resid_var if self.var is None else m * self.var + (1 - m) * resid_var
        own = self._dist(z, self.means).gather(1, y[:, None]).squeeze(1)
        q = torch.quantile(own, self.quantile)
        self.radius = q if self.radius is None else m * self.radius + (1 - m) * q

    @torch.no_grad()
    def weights(self, z: Tensor) -> Tensor:
        if self.means is None or self.radius is None:
            return torch.ones(len(z), device=z.device)
        self._to(z.device)
        dist = self._dist(z.float(), self.means[self.seen]).min(1).values
        r2 = self.radius.clamp_min(1e-6) ** 2
        return torch.exp(-F.relu(dist**2 - r2) / r2)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("means", "seen", "var", "radius")}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class FixMatchObjective:
    """FixMatch with an EMA teacher, optional distribution alignment and the open-set guard."""

    def __init__(self, n_classes: int, augmenter: Augmenter, threshold: float = 0.95, unlabeled_weight: float = 1.0,
                 ema_decay: float = 0.99, distribution_alignment: bool = False, novelty_guard: bool = True,
                 guard_quantile: float = 0.95, label_smoothing: float = 0.0, class_weights: Tensor | None = None,
                 prior: np.ndarray | None = None, truth: np.ndarray | None = None,
                 class_names: list[str] | None = None, class_thresholds: bool = False):
        self.n_classes, self.augmenter = n_classes, augmenter
        self.class_thresholds = class_thresholds
        self.learned: Tensor | None = None  # EMA of the share of unlabeled cells confidently predicted per class
        self.unused = 1.0
        self.threshold, self.unlabeled_weight, self.ema_decay = threshold, unlabeled_weight, ema_decay
        self.distribution_alignment, self.label_smoothing, self.class_weights = (
            distribution_alignment, label_smoothing, class_weights)
        self.guard = NoveltyGuard(n_classes, guard_quantile) if novelty_guard else None
        self.prior = torch.as_tensor(prior if prior is not None else np.full(n_classes, 1 / n_classes),
                                     dtype=torch.float32)
        self.truth = None if truth is None else torch.as_tensor(np.asarray(truth), dtype=torch.long)
        self.class_names = class_names or [str(i) for i in range(n_classes)]
        self.ema: ModelEmaV3 | None = None
        self._pending_teacher: dict | None = None
        self.p_model: Tensor | None = None
        self.updates = 0
        self._running: dict[str, list[float]] = {}
        self._epoch = -1
        self.pool_shares: np.ndarray | None = None  # set by PredictedClassBalance: teacher's classes over the pool

    # -- teacher ----------------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        return None if self.ema is None else self.ema.module

    def current_teacher(self, model: nn.Module) -> nn.Module | None:
        """The teacher of ``model`` if there is one yet (trained, or restored from a checkpoint), else None."""
        if self.ema is None and self._pending_teacher is None:
            return None
        return self._teacher(model)

    def _teacher(self, model: nn.Module) -> nn.Module:
        if self.ema is None:
            self.ema = ModelEmaV3(model, decay=self.ema_decay, exclude_buffers=True)
            self.ema.requires_grad_(False)
            if self._pending_teacher is not None:
                self.ema.module.load_state_dict(self._pending_teacher)
                self._pending_teacher = None
        return self.ema.module

    @torch.no_grad()
    def on_step_end(self, model: nn.Module) -> None:
        """timm's model EMA, with the decay warmed up as min(ema_decay, (1+t)/(10+t)): track the student early."""
        if self.ema is None:
            return
        self.updates += 1
        self.ema.decay = min(self.ema_decay, (1 + self.updates) / (10 + self.updates))
        self.ema.update(model)

    # -- loss ----------------------------------------------------------------------------------------
    def _ratio(self, name: str, num: float, den: float) -> float:
        """Per-step ratio; the running epoch value when this batch has nothing to say."""
        acc = self._running.setdefault(name, [0.0, 0.0])
        acc[0] += num
        acc[1] += den
        if den > 0:
            return num / den
        return acc[0] / acc[1] if acc[1] > 0 else 0.0

    def loss(self, model: nn.Module, batch: dict, step: StepContext) -> tuple[Tensor, dict[str, float]]:
        if "u_image" not in batch:
            raise TrainingError("FixMatch needs batches with unlabeled cells ('u_image'); train through "
                                "training.regimes.semisupervised.training_stream")
        if step.epoch != self._epoch:
            self._epoch, self._running = step.epoch, {}
        g = step.generator
        x, y = batch["image"], batch["label"]
        keep = y >= 0
        if not bool(keep.any()):
            raise TrainingError(f"epoch {step.epoch} step {step.step}: a batch has no labeled cells")
        x, y = x[keep], y[keep]
        xu = batch["u_image"]
        nl, nu = len(x), len(xu)
        teacher = self._teacher(model)
        with torch.no_grad():
            z, t_logits = _features_logits(teacher, torch.cat([self.augmenter.weak(x, g), self.augmenter.weak(xu, g)]))
            z, t_logits = z.float(), t_logits.float()
            probs = t_logits[nl:].softmax(1)
            if self.distribution_alignment:
                mean = probs.mean(0)
                self.p_model = mean if self.p_model is None else 0.999 * self.p_model.to(mean) + 0.001 * mean
                probs = probs * self.prior.to(probs) / self.p_model.clamp_min(1e-6)
                probs = probs / probs.sum(1, keepdim=True)
            pl, mask = pseudo_labels(probs, self.threshold)
            if self.class_thresholds:
                share = torch.bincount(pl[mask], minlength=self.n_classes).float().cpu() / max(nu, 1)
                unused = 1.0 - float(mask.float().mean())
                self.learned = share if self.learned is None else 0.99 * self.learned + 0.01 * share
                self.unused = 0.99 * self.unused + 0.01 * unused
                thresholds = flexible_thresholds(self.learned, self.unused, self.threshold).to(probs)
                mask = probs.max(1).values >= thresholds[pl]
            weight = mask.float()
            guard_w = torch.ones(nu, device=xu.device)
            if self.guard is not None:
                self.guard.update(z[:nl], y)
                guard_w = self.guard.weights(z[nl:])
                weight = weight * guard_w
        x_l = self.augmenter.standard(x, g)
        x_s = self.augmenter.strong(xu, g)
        logits = model(torch.cat([x_l, x_s])).float()
        cw = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss_x = F.cross_entropy(logits[:nl], y, weight=cw, label_smoothing=self.label_smoothing)
        loss_u = (F.cross_entropy(logits[nl:], pl, reduction="none") * weight).mean()
        loss = loss_x + self.unlabeled_weight * loss_u
        return loss, self._metrics(logits[:nl], y, pl, mask, weight, guard_w, batch.get("u_idx"))

    def _metrics(self, l_logits: Tensor, y: Tensor, pl: Tensor, mask: Tensor, weight: Tensor, guard_w: Tensor,
                 u_idx: Tensor | None) -> dict[str, float]:
        nu = len(pl)
        out = {
            "train_accuracy": (l_logits.argmax(1) == y).float().mean().item(),
            "ssl/mask_rate": mask.float().mean().item(),
            "ssl/weight": weight.mean().item(),
        }
        counts = torch.bincount(pl[mask], minlength=self.n_classes).cpu()
        for name, c in zip(self.class_names, counts.tolist(), strict=True):
            out[f"ssl/pl_frac/{name}"] = c / nu
        if self.pool_shares is not None:
            for name, share in zip(self.class_names, self.pool_shares.tolist(), strict=True):
                out[f"ssl/pool_pred/{name}"] = share
        if self.truth is not None and u_idx is not None:
            t = self.truth[u_idx.cpu()]
            plc, maskc, gw = pl.cpu(), mask.cpu(), guard_w.cpu()
            cls, none = t >= 0, t == -1
            out["ssl/pl_accuracy"] = self._ratio("acc", float(((plc == t) & maskc & cls).sum()), float((maskc & cls).sum()))
            out["ssl/pl_accuracy_all"] = self._ratio("acc_all", float(((plc == t) & cls).sum()), float(cls.sum()))
            out["ssl/mask_rate_noclass"] = self._ratio("mask_none", float((maskc & none).sum()), float(none.sum()))
            out["ssl/guard_class"] = self._ratio("guard_cls", float(gw[cls].sum()), float(cls.sum()))
            out["ssl/guard_noclass"] = self._ratio("guard_none", float(gw[none].sum()), float(none.sum()))
        return out

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending_teacher
        return {
            "teacher": None if teacher is None else {k: v.detach().cpu().clone() for k, v in teacher.items()},
            "p_model": None if self.p_model is None else self.p_model.cpu(),
            "updates": self.updates,
            "learned": None if self.learned is None else self.learned.clone(),
            "unused": self.unused,
            "guard": None if self.guard is None else {k: (v.cpu() if isinstance(v, Tensor) else v)
                                                      for k, v in self.guard.state_dict().items()},
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("teacher") is not None:
            if self.ema is not None:
                self.ema.module.load_state_dict(d["teacher"])
            else:
                self._pending_teacher = d["teacher"]
        self.p_model = d.get("p_model")
        self.updates = int(d.get("updates", 0))
        self.learned = d.get("learned")
        self.unused = float(d.get("unused", 1.0))
        if self.guard is not None and d.get("guard") is not None:
            self.guard.load_state_dict(d["guard"])


class PredictedClassBalance:
    """``ssl.balance_unlabeled=predicted``: called by :class:`MixedLoader` at the start of every epoch, it predicts
    every cell of ``pool`` (a loader over the ``n_cells`` unlabeled cells, ``idx`` = their position, no
    augmentation) with the objective's EMA teacher
    and returns sampling weights inverse to the frequency of each cell's predicted class
    (:func:`~training.data.streams.balanced_weights`). None (plain shuffling) while there is no teacher yet, i.e.
    in the first epoch of a fresh run; after a resume the restored teacher predicts."""

    def __init__(self, objective: FixMatchObjective, model: nn.Module, pool, n_cells: int):
        self.objective, self.model, self.pool, self.n_cells = objective, model, pool, n_cells
        self.counts: np.ndarray | None = None  # teacher's predicted-class counts over the pool, last epoch

    @torch.no_grad()
    def predicted(self) -> np.ndarray | None:
        """The teacher's class (argmax) for every pool cell, or None without a teacher."""
        teacher = self.objective.current_teacher(self.model)
        if teacher is None:
            return None
        was_training = teacher.training
        teacher.eval()
        device = next(teacher.parameters()).device
        pred = np.full(self.n_cells, -1, np.int64)
        for batch in self.pool:
            pred[batch["idx"].numpy()] = teacher(batch["image"].to(device)).argmax(1).cpu().numpy()
        teacher.train(was_training)
        if (pred < 0).any():
            raise TrainingError(f"the pool loader left {int((pred < 0).sum())} of {self.n_cells} unlabeled cells "
                                "unpredicted")
        return pred

    def __call__(self) -> np.ndarray | None:
        pred = self.predicted()
        if pred is None:
            return None
        k = self.objective.n_classes
        self.counts = np.bincount(pred, minlength=k)
        self.objective.pool_shares = self.counts / max(len(pred), 1)
        log.info("balanced unlabeled pool: teacher predicts %s",
                 ", ".join(f"{n} {c}" for n, c in zip(self.objective.class_names, self.counts.tolist(), strict=True)))
        return balanced_weights(pred, k)


# -- the thesis variant: autoencoder ----------------------------------------------------------------------------
class ConvDecoder(nn.Module):
    """Upsamples an encoder feature map (B, C_f, h, w) back to (B, C, H, W): 2x bilinear steps + 3x3 convs."""

    def __init__(self, in_ch: int, out_ch: int, factor: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 1), nn.GELU()]
        ch = width
        for _ in range(max(0, round(math.log2(max(factor, 1))))):
            nxt = max(16, ch // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(ch, nxt, 3, padding=1), nn.GELU()]
            ch = nxt
        layers.append(nn.Conv2d(ch, out_ch, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.net(f)
        return out if out.shape[-2:] == size else F.interpolate(out, size=size, mode="bilinear", align_corners=False)


class AutoencoderObjective:
    """Classification loss on labeled cells + ``recon_weight`` x MSE reconstruction of every cell (labeled and
    unlabeled) by a decoder on the model's feature map. The decoder is not part of the saved model: it is an extra
    parameter group of the engine's optimizer (:meth:`param_groups`: same warm-up, cosine schedule and gradient
    clipping as the model, no weight decay) and its weights live in this objective's state."""

    def __init__(self, n_classes: int, augmenter: Augmenter, in_channels: int, image_size: int,
                 recon_weight: float = 1.0, label_smoothing: float = 0.0, class_weights: Tensor | None = None):
        self.n_classes, self.augmenter, self.recon_weight = n_classes, augmenter, recon_weight
        self.in_channels, self.image_size = in_channels, image_size
        self.label_smoothing, self.class_weights = label_smoothing, class_weights
        self.decoder: ConvDecoder | None = None

    @torch.no_grad()
    def _build(self, model: nn.Module) -> ConvDecoder:
        if self.decoder is None:
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            fmap = model.forward_features(torch.zeros(1, self.in_channels, self.image_size, self.image_size,
                                                      device=device))
            model.train(was_training)
            factor = self.image_size // max(1, fmap.shape[-1])
            self.decoder = ConvDecoder(fmap.shape[1], self.in_channels, factor).to(device)
        return self.decoder

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The decoder's parameters as one optimizer group (built for ``model``'s feature map)."""
        return [{"params": list(self._build(model).parameters()), "weight_decay": 0.0}]

    def loss(self, model: nn.Module, batch: dict, step: StepContext) -> tuple[Tensor, dict[str, float]]:
        g = step.generator
        x, y = batch["image"], batch["label"]
        keep = y >= 0
        if not bool(keep.any()):
            raise TrainingError(f"epoch {step.epoch} step {step.step}: a batch has no labeled cells")
        x_l = self.augmenter.standard(x[keep], g)
        y = y[keep]
        parts = [x_l]
        if "u_image" in batch:
            parts.append(self.augmenter.weak(batch["u_image"], g))
        x_all = torch.cat(parts)
        fmap = model.forward_features(x_all)
        logits = model.forward_head(fmap[: len(y)]).float()
        decoder = self._build(model)
        recon = decoder(fmap, tuple(x_all.shape[-2:])).float()
        cw = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss_x = F.cross_entropy(logits, y, weight=cw, label_smoothing=self.label_smoothing)
        loss_r = F.mse_loss(recon, x_all.float())
        loss = loss_x + self.recon_weight * loss_r
        return loss, {"train_accuracy": (logits.argmax(1) == y).float().mean().item(), "ssl/recon_mse": loss_r.item()}

    def on_step_end(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        if self.decoder is None:
            return {}
        return {"decoder": {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}}

    def load_state_dict(self, d: dict) -> None:
        """Decoder weights (the engine builds the decoder before it loads a checkpoint; its optimizer state is in
        the engine's)."""
        if d and self.decoder is not None:
            self.decoder.load_state_dict(d["decoder"])


# -- factory ----------------------------------------------------------------------------------------------------
def read_truth(path: str | Path) -> pd.DataFrame:
    """The simulator's ``truth.parquet`` (per-cell true state), with ``source_file`` as the index names files."""
    from training.sim.synth import TRUTH, load_truth

    p = Path(path)
    if p.name != TRUTH:
        raise ConfigError(f"ssl.truth: expected the simulator's {TRUTH}, got {p}")
    return load_truth(p.with_name("manifest.csv"))


def truth_codes(cells: pd.DataFrame, truth: pd.DataFrame, classes: list[str], state_classes: dict[str, str]
                ) -> np.ndarray:
    """Per cell of ``cells``: true class index, -1 (state in no class) or -2 (not in the truth table)."""
    from training.active.oracle import cell_keys, truth_classes

    s = truth_classes(truth, classes, state_classes)
    pos = s.index.get_indexer(cell_keys(cells))
    return np.where(pos >= 0, s.to_numpy()[np.maximum(pos, 0)], UNKNOWN).astype(np.int64)
