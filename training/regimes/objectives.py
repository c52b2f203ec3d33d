"""The one objective builder: ``train.regime`` (and ``ssl.method``) -> the objective the engine optimises.

:func:`build_objective` is called by supervised and semi-supervised training (through :func:`make_objective`, the
adapter for a ``TrainData`` table), active-learning rounds (``training.active.campaign.train_models``) and tuning
trials (which train through ``train_member``).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from training.config import Params
from training.data.augment import Augmenter
from training.data.trainset import TrainData, class_weights, unlabeled_table
from training.engine import SupervisedObjective
from training.errors import ConfigError
from training.regimes.semisupervised import (
    UNKNOWN,
    AutoencoderObjective,
    FixMatchObjective,
    read_truth,
    truth_codes,
)

log = logging.getLogger(__name__)


def build_objective(params: Params, y_train: np.ndarray, n_classes: int, in_channels: int, image_size: int,
                    class_names: list[str] | None = None, truth: np.ndarray | None = None):
    """The objective of ``train.regime`` (``ssl.method`` for semi-supervised) for training labels ``y_train``
    (class indices; -1 = unlabeled). ``truth``: per-unlabeled-cell truth codes, logged by FixMatch only."""
    y = np.asarray(y_train)
    weights = class_weights(y[y >= 0], n_classes, params.train.class_weights)
    augmenter = Augmenter(params.data.augment)
    smoothing = params.train.label_smoothing
    if params.train.regime == "supervised":
        return SupervisedObjective(n_classes, augmenter, smoothing, weights)
    if params.train.regime != "semisupervised":
        raise ConfigError(f"train.regime: unknown regime '{params.train.regime}'")
    s = params.ssl
    if s.method == "autoencoder":
        return AutoencoderObjective(n_classes, augmenter, in_channels, image_size, s.recon_weight, smoothing, weights)
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(np.float64)
    return FixMatchObjective(
        n_classes, augmenter, s.threshold, s.unlabeled_weight, s.ema_decay, s.distribution_alignment,
        s.novelty_guard, s.guard_quantile, smoothing, weights, prior=counts / max(counts.sum(), 1.0), truth=truth,
        class_names=class_names or [str(i) for i in range(n_classes)], class_thresholds=s.class_thresholds,
    )


def make_objective(params: Params, data: TrainData, seed: int, truth: pd.DataFrame | None = None):
    """:func:`build_objective` for ``data``'s training labels, channels and input size. ``truth`` (or
    ``ssl.truth``) is a simulator truth table used only to log FixMatch's pseudo-label accuracy."""
    del seed  # the engine's generator drives every random draw
    codes = None
    if params.train.regime == "semisupervised" and params.ssl.method == "fixmatch":
        if truth is None and params.ssl.truth:
            truth = read_truth(params.ssl.truth)
        if truth is not None:
            codes = truth_codes(unlabeled_table(data), truth, data.classes, params.al.state_classes)
            if (codes == UNKNOWN).all():
                log.warning("the truth table names none of the unlabeled cells: no pseudo-label accuracy")
                codes = None
    return build_objective(params, data.split("train")["y"].to_numpy(), len(data.classes), len(data.channels),
                           data.image_size, list(data.classes), codes)
