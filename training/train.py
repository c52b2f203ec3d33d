"""Train a deep ensemble with the one engine: the regime decides the objective and the batches, nothing else.

``train_ensemble`` runs K members (different seeds, optionally bootstrap resamples of the training cells),
fits a temperature per member on the validation split and a feature-density novelty model per member on the
training cells, and saves an :class:`~training.ensemble.Ensemble` directory. MLflow gets one parent run with
a nested run per member (per-epoch metrics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from training.calibration import fit_temperature
from training.config import Params
from training.engine import SupervisedObjective, fit, predict, seed_everything, select_device
from training.ensemble import Ensemble, EnsembleSpec
from training.errors import ConfigError, DataError, TrainingError
from training.formats import CellFile
from training.loader import CellLoader, Preprocess, loader_for
from training.models import build_model
from training.novelty import GaussianDensity
from training.splits import class_table

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Split cell table (with ``y`` = class index) and what the files say about channels and size."""

    cells: pd.DataFrame
    classes: list[str]
    channels: list[str]
    source_channels: list[str]
    image_size: int

    def split(self, name: str) -> pd.DataFrame:
        return self.cells[self.cells["split"] == name].reset_index(drop=True)


def prepare_data(splits: pd.DataFrame, classes: list[str], params: Params) -> TrainData:
    """Resolve channels (names) and input size from the first training file; check the split is usable."""
    cells = splits.copy()
    cells["y"] = class_table(cells, classes).to_numpy()
    train = cells[cells["split"] == "train"]
    if train.empty:
        raise DataError("the split has no training cells")
    with CellFile(str(train["source_file"].iloc[0])) as f:
        chans = f.resolve_channels(params.data.channels)
        names = [f.info.channel_names[c] for c in chans]
        source_channels = list(f.info.channel_names)
        stored = max(f.info.height, f.info.width)
    counts = train["y"].value_counts()
    empty = [c for i, c in enumerate(classes) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(f"class(es) {', '.join(empty)} have no training cells after the split")
    if len(train) < params.data.batch_size:
        raise TrainingError(
            f"{len(train)} training cells are fewer than data.batch_size={params.data.batch_size}; "
            "lower the batch size or add cells"
        )
    return TrainData(cells, classes, names, source_channels, params.data.image_size or stored)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def member_seed(params: Params, k: int) -> int:
    return params.train.seed + 1000 * k


def loaders(data: TrainData, params: Params, seed: int, train_rows: pd.DataFrame | None = None
            ) -> tuple[CellLoader, CellLoader]:
    train = data.split("train") if train_rows is None else train_rows
    val = data.split("val")
    if val.empty:
        raise DataError("the split has no validation cells (split.val_fraction is 0?)")
    return (
        loader_for(train, params.data, data.channels, shuffle=True, seed=seed, drop_last=len(train) > params.data.batch_size),
        loader_for(val, params.data, data.channels, shuffle=False, seed=seed),
    )


def make_objective(params: Params, data: TrainData, seed: int):
    """The regime's objective. Supervised here; semi-supervised objectives plug in the same way."""
    from training.augment import Augmenter

    y = data.split("train")["y"].to_numpy()
    if params.train.regime == "supervised":
        return SupervisedObjective(len(data.classes), Augmenter(params.data.augment), params.train.label_smoothing,
                                   class_weights(y, len(data.classes), params.train.class_weights))
    if params.train.regime == "semisupervised":
        from training.semisupervised import make_ssl_objective

        return make_ssl_objective(params, data, seed)
    raise ConfigError(f"train.regime: unknown regime '{params.train.regime}'")


def train_member(k: int, data: TrainData, params: Params, out_dir: Path, resume: bool = False,
                 log_metrics=None, progress: bool = True):
    """Train member ``k``; returns the model, its validation temperature and its novelty model."""
    from training.semisupervised import keep_label_fraction, training_stream

    seed = member_seed(params, k)
    seed_everything(seed)
    data = keep_label_fraction(data, params.ssl.label_fraction, params.split.seed)
    train_rows = data.split("train")
    if params.ensemble.bootstrap:
        rng = np.random.default_rng(seed)
        train_rows = train_rows.iloc[rng.integers(0, len(train_rows), len(train_rows))].reset_index(drop=True)
    train_loader, val_loader = loaders(data, params, seed, train_rows)
    train_loader = training_stream(train_loader, data, params, seed)
    model = build_model(params.model, len(data.channels), len(data.classes))
    objective = make_objective(params, data, seed)
    result = fit(model, train_loader, val_loader, params.train.model_copy(update={"seed": seed}), objective,
                 n_classes=len(data.classes), out_dir=out_dir / f"member_{k}", resume=resume,
                 log_metrics=log_metrics, progress=progress)
    device = select_device(params.train.device)
    val = predict(model, val_loader, device=device, with_features=False)
    temperature = (
        fit_temperature(val["logits"], val["label"]) if params.uncertainty.temperature_scaling else 1.0
    )
    novelty = None
    if params.uncertainty.novelty == "mahalanobis":
        plain = loader_for(data.split("train"), params.data, data.channels, shuffle=False, seed=seed)
        tr = predict(model, plain, device=device, with_features=True)
        novelty = GaussianDensity().fit(tr["features"], tr["label"])
    return model.cpu(), float(temperature), novelty, result


def train_ensemble(data: TrainData, params: Params, out: str | Path, resume: bool = False,
                   progress: bool = True, tracker=None) -> Ensemble:
    """Train ``ensemble.members`` members and save the ensemble to ``out``."""
    out = Path(out)
    work = out.parent / f".{out.name}.work"
    members, temps, novelty, results = [], [], [], []
    n = params.ensemble.members if params.ensemble.posterior == "ensemble" else 1
    for k in range(n):
        ctx = tracker.member(k) if tracker else None
        log_fn = ctx.log_metrics if ctx else None
        try:
            model, t, nov, res = train_member(k, data, params, work, resume, log_fn, progress)
        finally:
            if ctx:
                ctx.close()
        members.append(model)
        temps.append(t)
        results.append(res)
        if nov is not None:
            novelty.append(nov)
        log.info("member %d: best epoch %d, val loss %.4f, temperature %.3f", k, res.best_epoch, res.best_val_loss, t)
    spec = EnsembleSpec(
        classes=data.classes,
        channels=data.channels,
        source_channels=data.source_channels,
        image_size=data.image_size,
        preprocess={k: v for k, v in vars(Preprocess.from_config(params.data)).items() if k != "channels"}
        | {"image_size": data.image_size},
        model=params.model.model_dump(),
        temperatures=temps,
        posterior=params.ensemble.posterior,
        mc_samples=params.ensemble.mc_samples,
        has_novelty=bool(novelty),
        info={"regime": params.train.regime, "best_epochs": [r.best_epoch for r in results],
              "best_val_loss": [float(r.best_val_loss) for r in results],
              "mlflow_run_id": tracker.run_id if tracker else None},
    )
    ens = Ensemble(spec, members, novelty)
    ens.save(out)
    return ens
