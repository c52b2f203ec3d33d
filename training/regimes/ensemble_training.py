"""Train a deep ensemble with the one engine: the regime decides the objective and the batches, nothing else.

``train_ensemble`` runs K members (different seeds, optionally bootstrap resamples of the training cells),
fits a temperature per member and one pooled temperature for the ensemble on the validation split
(``uncertainty.calibration`` decides which one scoring applies), a novelty model per member on the training cells
(``uncertainty.novelty``; per encoder instead with ``uncertainty.encoders``, which the artifact then carries) and
the novelty quantiles of the validation cells (the reference the discovery queue's threshold is set on), and saves
an :class:`~training.uncertainty.ensemble.Ensemble` directory. MLflow gets one parent run with
a nested run per member (per-epoch metrics). Member checkpoints go to a work folder beside ``out``
(``.<name>.work``, what ``--resume`` continues from); it is removed once the ensemble is saved.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from training.config import Params
from training.data.loader import CellLoader, Preprocess, loader_for
from training.data.trainset import TrainData, keep_label_fraction
from training.engine import fit, predict, seed_everything, select_device
from training.errors import DataError, ModelError
from training.models.factory import build_model
from training.regimes.objectives import make_objective
from training.regimes.semisupervised import training_stream
from training.uncertainty.calibration import fit_pooled_temperature, fit_temperature, pooled_log_probs
from training.uncertainty.ensemble import Ensemble, EnsembleSpec
from training.uncertainty.novelty import NoveltyModel, make_novelty, novelty_inputs, stage_features
from training.uncertainty.pixel_descriptor import pixel_descriptor
from training.uncertainty.shift import atc_threshold, finite_or_none

NOVELTY_QUANTILES = (0.5, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)

log = logging.getLogger(__name__)


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


def train_member(k: int, data: TrainData, params: Params, out_dir: Path, resume: bool = False,
                 log_metrics=None, progress: bool = True, on_epoch_end=None):
    """Train member ``k`` (checkpoints in ``out_dir/member_<k>``); returns the model, its validation temperature,
    its novelty model and the engine's result. ``log_metrics`` / ``on_epoch_end`` go to :func:`training.engine.fit`."""
    seed = member_seed(params, k)
    seed_everything(seed)
    data = keep_label_fraction(data, params.ssl.label_fraction, params.split.seed)
    train_rows = data.split("train")
    if params.ensemble.bootstrap:
        rng = np.random.default_rng(seed)
        train_rows = train_rows.iloc[rng.integers(0, len(train_rows), len(train_rows))].reset_index(drop=True)
    train_loader, val_loader = loaders(data, params, seed, train_rows)
    model = build_model(params.model, len(data.channels), len(data.classes))
    objective = make_objective(params, data, seed)
    train_loader = training_stream(train_loader, data, params, seed, objective, model)
    result = fit(model, train_loader, val_loader, params.train.model_copy(update={"seed": seed}), objective,
                 n_classes=len(data.classes), out_dir=out_dir / f"member_{k}", resume=resume,
                 log_metrics=log_metrics, progress=progress, on_epoch_end=on_epoch_end)
    device = select_device(params.train.device)
    mc = params.ensemble.mc_samples if params.ensemble.posterior == "mc_dropout" else 0
    val = predict(model, val_loader, device=device, with_features=False, mc_dropout=mc)
    val_logits = val["logits"].transpose(1, 0, 2) if mc else val["logits"][:, None]  # (N, S, K)
    temperature = (
        fit_temperature(val_logits.mean(axis=1), val["label"]) if params.uncertainty.calibration != "none" else 1.0
    )
    novelty = None
    if params.uncertainty.novelty != "none" and not params.uncertainty.encoders:
        plain = loader_for(data.split("train"), params.data, data.channels, shuffle=False, seed=seed)
        novelty = fit_novelty(model, plain, params, seed, device)
    return model.cpu(), float(temperature), novelty, result, (val_logits, val["label"])


def fit_novelty(model, loader: CellLoader, params: Params, seed: int, device) -> NoveltyModel:
    """The ``uncertainty.novelty`` model of one member, fitted on the cells of ``loader`` (the training cells)."""
    nov = make_novelty(params.uncertainty.novelty, params.uncertainty.knn_k, params.uncertainty.knn_bank, seed)
    tr = predict(model, loader, device=device, with_features="features" in nov.input,
                 pool_stages=stage_features if "stages" in nov.input else None,
                 describe_pixels=pixel_descriptor if "pixels" in nov.input else None)
    return nov.fit(novelty_inputs(nov, tr), tr["label"])


def load_encoders(params: Params, data: TrainData) -> list[nn.Module]:
    """The ``uncertainty.encoders`` (`spatial pretrain` files) as networks of ``model.*``'s architecture."""
    encoders = []
    for path in params.uncertainty.encoders:
        if not Path(path).is_file():
            raise ModelError(f"uncertainty.encoders: encoder file {path} not found (make one with `spatial pretrain`)")
        cfg = params.model.model_copy(update={"pretrained": path})
        try:
            encoders.append(build_model(cfg, len(data.channels), len(data.classes)).eval())
        except ModelError as exc:  # name the setting the file came from
            raise ModelError(f"uncertainty.encoders: {exc}") from None
    return encoders


def novelty_models(networks: list[nn.Module], data: TrainData, params: Params) -> list[NoveltyModel]:
    """``uncertainty.novelty`` fitted on the training cells for each of ``networks`` (members or encoders)."""
    if params.uncertainty.novelty == "none":
        return []
    device = select_device(params.train.device)
    plain = loader_for(data.split("train"), params.data, data.channels, shuffle=False, seed=0)
    return [fit_novelty(m, plain, params, member_seed(params, k), device) for k, m in enumerate(networks)]


def train_ensemble(data: TrainData, params: Params, out: str | Path, resume: bool = False,
                   progress: bool = True, tracker=None) -> Ensemble:
    """Train ``ensemble.members`` members and save the ensemble to ``out``."""
    out = Path(out)
    work = out.parent / f".{out.name}.work"
    encoders = load_encoders(params, data)  # before training: a bad encoder file fails at once
    members, temps, novelty, results, val_logits = [], [], [], [], []
    n = params.ensemble.members if params.ensemble.posterior == "ensemble" else 1
    for k in range(n):
        ctx = tracker.member(k) if tracker else None
        log_fn = ctx.log_metrics if ctx else None
        try:
            model, t, nov, res, (vl, val_y) = train_member(k, data, params, work, resume, log_fn, progress)
        finally:
            if ctx:
                ctx.close()
        members.append(model)
        temps.append(t)
        results.append(res)
        val_logits.append(vl)
        if nov is not None:
            novelty.append(nov)
        log.info("member %d: best epoch %d, val loss %.4f, temperature %.3f", k, res.best_epoch, res.best_val_loss, t)
    val_logits = np.stack(val_logits, axis=1)  # (N, M, S, K)
    pooled_t = fit_pooled_temperature(val_logits, val_y) if params.uncertainty.calibration != "none" else 1.0
    log.info("pooled temperature %.3f (calibration: %s)", pooled_t, params.uncertainty.calibration)
    if encoders:
        novelty = novelty_models(encoders, data, params)
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
        calibration=params.uncertainty.calibration,
        pooled_temperature=float(pooled_t),
        info={"regime": params.train.regime, "best_epochs": [r.best_epoch for r in results],
              "best_val_loss": [float(r.best_val_loss) for r in results],
              "mlflow_run_id": tracker.run_id if tracker else None,
              # what `spatial recalibrate --unlabeled` predicts a new slide's error rate with (ATC; None when no
              # validation cell is misclassified, which leaves nothing to set the threshold on)
              "atc_threshold": finite_or_none(atc_threshold(pooled_log_probs(val_logits), val_y))},
    )
    ens = Ensemble(spec, members, novelty, encoders=[e.cpu() for e in encoders])
    record_novelty_reference(ens, data, params)
    ens.save(out)
    shutil.rmtree(work, ignore_errors=True)  # member checkpoints: only needed to resume an unfinished run
    return ens


def refit_novelty(ens: Ensemble, data: TrainData, params: Params) -> Ensemble:
    """Fit ``uncertainty.novelty`` anew on every member of a trained ensemble (training cells) and its validation
    reference, without retraining: compare novelty scores on the same members, or switch an artifact's score (to the
    features of ``uncertainty.encoders``, or back to the members' without it)."""
    encoders = load_encoders(params, data)
    novelty = novelty_models(encoders or ens.members, data, params)
    ens.members = [m.cpu() for m in ens.members]
    ens.encoders = [e.cpu() for e in encoders] if novelty else []
    ens.novelty = novelty
    ens.spec.has_novelty = bool(novelty)
    ens.spec.n_encoders = len(ens.encoders)
    record_novelty_reference(ens, data, params)
    return ens


def record_novelty_reference(ens: Ensemble, data: TrainData, params: Params) -> None:
    """Name the ensemble's novelty score in its spec and store its validation cells' novelty quantiles: the
    reference a novelty threshold is set on (discovery queue, ``GET /metadata``). Without a score, neither is left
    to be read as current."""
    if not ens.novelty:
        for key in ("novelty_score", "novelty_val_quantiles"):
            ens.spec.info.pop(key, None)
        return
    val_loader = loader_for(data.split("val"), params.data, data.channels, shuffle=False, seed=0)
    nov_val = ens.predict_batches(val_loader, with_features=False, raw=True)["novelty"]
    ens.spec.info["novelty_score"] = params.uncertainty.novelty
    ens.spec.info["novelty_val_quantiles"] = {str(q): float(np.quantile(nov_val, q)) for q in NOVELTY_QUANTILES}
