"""The classifier workflow: train -> evaluate -> register, one function per step and the whole as one.

``spatial train`` / ``spatial evaluate`` / ``spatial register`` (three DVC stages) call the steps; ``spatial tune
--promote`` calls :func:`train_evaluate_register` with the best trial's configuration. Every step logs to the
MLflow run of the :class:`~training.tracking.Tracker` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Params, RegistryConfig
from training.data.trainset import TrainData, prepare_data
from training.evaluation.evaluate import evaluate as evaluate_ensemble
from training.regimes.ensemble_training import train_ensemble
from training.tracking import Tracker, log_ensemble_model
from training.tracking import register as register_alias
from training.uncertainty.ensemble import Ensemble

Packager = Callable[[RegistryConfig, int, str], str]  # saves a registered version into a model store



def train(data: TrainData, params: Params, out: str | Path, tracker: Tracker | None = None, resume: bool = False,
          progress: bool = True) -> tuple[Ensemble, dict[str, Any]]:
    """Train the configured regime as a deep ensemble into ``out``; returns it and its training summary."""
    ens = train_ensemble(data, params, out, resume=resume, progress=progress, tracker=tracker)
    best = ens.spec.info["best_val_loss"]
    if tracker is not None:
        tracker.log_metrics({"val_loss_best_mean": float(np.mean(best))})
    return ens, {"members": ens.spec.n_members, "classes": ens.spec.classes,
                 "mlflow_run_id": tracker.run_id if tracker else None, "temperatures": ens.spec.temperatures,
                 "best_val_loss": best}


def evaluate(ens: Ensemble, table: pd.DataFrame, params: Params, out: str | Path, tracker: Tracker | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Test-split metrics and the report in ``out``; logged as ``test_*`` metrics and ``evaluate/`` artifacts."""
    result = evaluate_ensemble(ens, table, params, out, progress=progress)
    if tracker is not None:
        tracker.log_metrics({f"test_{k}".replace("/", "_"): v for k, v in result.items()})
        tracker.log_artifacts(out, "evaluate")
    return result


def register(model_dir: str | Path, params: Params, tracker: Tracker, package: Packager | None = None
             ) -> dict[str, Any]:
    """Log the ensemble directory as one MLflow model in ``tracker``'s run, register it and move the alias when
    its ``registry.metric`` beats the holder's."""
    spec = Ensemble.load(model_dir).spec
    s = spec.image_size
    example = np.random.default_rng(0).random((2, len(spec.channels), s, s), dtype=np.float32)
    uri = log_ensemble_model(model_dir, example)
    return register_alias(uri, tracker.run_id, params.registry, package) | {"model_uri": uri, "run_id": tracker.run_id}


def train_evaluate_register(table: pd.DataFrame, classes: list[str], params: Params, out: str | Path,
                            eval_dir: str | Path, run_name: str, tags: dict[str, str] | None = None,
                            progress: bool = False, package: Packager | None = None) -> dict[str, Any]:
    """The three steps in one MLflow run: returns the registry outcome plus the model URI, run id, ensemble
    directory, evaluation directory and test metrics (``metrics``)."""
    data = prepare_data(table, classes, params)
    with Tracker(params, run_name=run_name, tags=tags) as tr:
        ens, _ = train(data, params, out, tr, progress=progress)
        metrics = evaluate(ens, table, params, eval_dir, tr, progress=progress)
        result = register(out, params, tr, package)
    return result | {"ensemble": str(out), "evaluate": str(eval_dir), "metrics": metrics,
                     "test_balanced_accuracy": metrics.get("balanced_accuracy")}
