"""Self-supervised contrastive pretraining of the encoder (SimCLR's NT-Xent) on cells without labels.

:class:`ContrastiveObjective` plugs into the one engine: two augmented views of every cell in a batch, the model's
penultimate features through a projection head (an extra optimizer parameter group, discarded after), and the
normalised-temperature cross-entropy that asks each view to pick its partner out of the other ``2B - 2`` views.
:func:`pretrain_encoder` trains it on the split's training and unlabeled cells (validation and test cells are never
seen) and saves ``encoder.pt``, which ``model.pretrained`` loads to fine-tune from. A linear probe (logistic
regression on frozen features of the labeled training cells, scored on the validation cells) of the random
initialisation and of the pretrained encoder says whether pretraining learned features that separate the classes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from training.config import Params
from training.data.augment import Augmenter
from training.data.loader import loader_for
from training.data.trainset import TrainData, keep_label_fraction
from training.engine import StepContext, fit, predict, seed_everything, select_device
from training.errors import TrainingError
from training.evaluation.metrics import balanced_accuracy
from training.io.atomic import atomic_path, save_torch
from training.models.factory import build_model, feature_dim

log = logging.getLogger(__name__)
ENCODER = "encoder.pt"
SUMMARY = "pretrain.json"


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """NT-Xent of two views (B, D) each, row i of ``z_a`` paired with row i of ``z_b``: the mean cross-entropy of
    picking the partner among the other ``2B - 1`` views by cosine similarity / ``temperature``; also whether each
    view's most similar other view is its partner (2B,)."""
    if z_a.shape != z_b.shape or z_a.ndim != 2 or len(z_a) < 2:
        raise TrainingError(f"nt_xent needs two (B, D) views with B >= 2, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    b = len(z_a)
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, partner), sim.argmax(1) == partner


class ProjectionHead(nn.Module):
    """SimCLR's projection: Linear - BatchNorm - ReLU - Linear, from the model's penultimate features."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(True),
                                 nn.Linear(in_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ContrastiveObjective:
    """NT-Xent between two views (a random resized crop of at least ``crop_scale`` of the area, then the ``standard``
    or ``strong`` augmentation: ``views``) of every cell in the batch; labels are ignored. The projection head is an
    extra optimizer parameter group; its weights live in this objective's state (the engine's checkpoint, when it is
    given an ``out_dir``), not in the saved encoder."""

    def __init__(self, augmenter: Augmenter, proj_dim: int = 64, temperature: float = 0.2,
                 views: str = "standard", crop_scale: float = 1.0) -> None:
        self.augmenter, self.proj_dim, self.temperature = augmenter, proj_dim, temperature
        self.crop_scale = crop_scale
        self.view = augmenter.strong if views == "strong" else augmenter.standard
        self.head: ProjectionHead | None = None

    def _build(self, model: nn.Module) -> ProjectionHead:
        if self.head is None:
            device = next(model.parameters()).device
            self.head = ProjectionHead(feature_dim(model), self.proj_dim).to(device)
        return self.head

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The projection head's parameters as one optimizer group (no weight decay)."""
        return [{"params": list(self._build(model).parameters()), "weight_decay": 0.0}]

    def loss(self, model: nn.Module, batch: dict, step: StepContext) -> tuple[Tensor, dict[str, float]]:
        x, g = batch["image"], step.generator
        a, b = (self.view(self.augmenter.crop(x, g, self.crop_scale), g) for _ in range(2))
        views = torch.cat([a, b])
        feats = model.forward_head(model.forward_features(views), pre_logits=True)
        z = self._build(model)(feats)
        loss, hit = nt_xent(z[: len(x)], z[len(x):], self.temperature)
        return loss, {"pretrain/pair_accuracy": hit.float().mean().item()}

    def on_step_end(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}}

    def load_state_dict(self, d: dict) -> None:
        if d and self.head is not None:
            self.head.load_state_dict(d["head"])


def pretraining_cells(data: TrainData, max_cells: int | None, seed: int) -> pd.DataFrame:
    """The cells pretraining may see: the split's training and unlabeled cells, labels dropped (``y`` = -1), at most
    ``max_cells`` of them (a seeded draw). Validation and test cells are never among them."""
    cells = data.cells[data.cells["split"].isin(["train", "unlabeled"])].copy()
    cells["y"] = -1
    if max_cells is not None and len(cells) > max_cells:
        keep = np.sort(np.random.default_rng([seed, 23]).choice(len(cells), max_cells, replace=False))
        cells = cells.iloc[keep]
    return cells.reset_index(drop=True)


def probe_loaders(data: TrainData, params: Params) -> tuple:
    """Loaders over the labeled training cells (``ssl.label_fraction`` of them, as the fine-tuning run would have)
    and the validation cells; built once, so with ``data.cache`` both probes read the pixels once."""
    labeled = keep_label_fraction(data, params.ssl.label_fraction, params.split.seed)
    return tuple(loader_for(labeled.split(s), params.data, data.channels, shuffle=False, seed=0,
                            batch_size=params.score.batch_size) for s in ("train", "val"))


def linear_probe(model: nn.Module, loaders: tuple, device: torch.device) -> float:
    """Validation balanced accuracy of a logistic regression on ``model``'s frozen penultimate features of the
    labeled training cells (``loaders``: :func:`probe_loaders`)."""
    (x_tr, y_tr), (x_val, y_val) = ((out["features"], out["label"])
                                    for out in (predict(model, loader, device=device) for loader in loaders))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(x_tr, y_tr)
    return balanced_accuracy(y_val, probe.predict(x_val))


def pretrain_encoder(data: TrainData, params: Params, out: str | Path, progress: bool = True,
                     log_metrics=None) -> dict[str, Any]:
    """Pretrain ``model.*`` contrastively (``pretrain.*``) on :func:`pretraining_cells`; writes ``out/encoder.pt``
    (the model's state dict, the classifier included so ``model.pretrained`` loads it whole) and ``out/pretrain.json``
    (settings, per-epoch loss, the linear probes). Returns that summary."""
    cfg, seed = params.pretrain, params.train.seed
    out = Path(out)
    cells = pretraining_cells(data, cfg.max_cells, seed)
    if len(cells) < cfg.batch_size:
        raise TrainingError(f"{len(cells)} pretraining cells are fewer than pretrain.batch_size={cfg.batch_size}")
    seed_everything(seed)
    model = build_model(params.model, len(data.channels), len(data.classes))
    device = select_device(params.train.device)
    probes = probe_loaders(data, params)
    probe_before = linear_probe(model, probes, device)
    loader = loader_for(cells, params.data, data.channels, shuffle=True, seed=seed, batch_size=cfg.batch_size,
                        drop_last=True)
    objective = ContrastiveObjective(Augmenter(params.data.augment), cfg.proj_dim, cfg.temperature, cfg.views,
                                     cfg.crop_scale)
    engine_cfg = params.train.model_copy(update={"epochs": cfg.epochs, "lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs,
                                                 "patience": None, "max_steps_per_epoch": None})
    result = fit(model, loader, None, engine_cfg, objective, n_classes=len(data.classes), progress=progress,
                 log_metrics=log_metrics)
    probe_after = linear_probe(model, probes, device)
    summary = {
        "cells": len(cells), "epochs": result.epochs_run, "settings": cfg.model_dump(mode="json"),
        "model": params.model.name, "seed": seed, "classes": list(data.classes),
        "final_loss": result.history[-1]["train_loss"],
        "final_pair_accuracy": result.history[-1]["pretrain/pair_accuracy"],
        "probe_val_balanced_accuracy_random_init": probe_before,
        "probe_val_balanced_accuracy": probe_after,
        "history": [{k: float(v) for k, v in h.items()} for h in result.history],
    }
    out.mkdir(parents=True, exist_ok=True)
    save_torch({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, out / ENCODER)
    with atomic_path(out / SUMMARY) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    log.info("pretrained %d epochs on %d cells: loss %.3f, linear probe %.3f (random init %.3f)", result.epochs_run,
             len(cells), summary["final_loss"], probe_after, probe_before)
    return summary
