"""From sweep to service: retrain the best trial's configuration as a K-member ensemble, evaluate it on the
test split, log it as one MLflow model and register it; the registry alias (``champion``) moves to it when its
``registry.metric`` beats the current holder's, and the scoring service loads ``models:/NAME@champion``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from training.config import Params
from training.errors import ConfigError
from training.workflow import Packager
from tuning.trainable import TAG_SWEEP, trial_params


def campaign_queries(best: dict[str, Any], params: Params) -> pd.DataFrame:
    """The cells the winning campaign queried (the ``queries.parquet`` its trial logged to MLflow)."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from training.tracking import configure
    from tuning.trainable import QUERIES

    run_id = best.get("mlflow_run_id")
    if not run_id:
        raise ConfigError("the best trial has no MLflow run: cannot find the cells its campaign labeled")
    configure(params.mlflow)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=QUERIES, dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise ConfigError(f"run {run_id} has no {QUERIES} artifact ({exc})") from None
        return pd.read_parquet(path)


def active_table(table: pd.DataFrame, queries: pd.DataFrame, pool_splits: list[str]) -> pd.DataFrame:
    """The split table an active-learning winner trains on: the cells its campaign labeled (with the oracle's
    answers) form the training split; the rest of the pool becomes unlabeled; val / test stay as they are."""
    from training.active.oracle import cell_keys

    answered = queries[queries["label"].notna()]
    answers = pd.Series(answered["label"].astype(str).to_numpy(), index=cell_keys(answered))
    keys = cell_keys(table)
    labeled = keys.isin(answers.index)
    if not labeled.any():
        raise ConfigError("none of the campaign's labeled cells is in the split table")
    out = table.copy()
    out["split"] = out["split"].astype(str)
    out["label"] = out["label"].astype(object)
    rest = out["split"].isin(pool_splits).to_numpy() & ~labeled
    out.loc[rest, "split"] = "unlabeled"
    out.loc[rest, "label"] = None
    out.loc[labeled, "split"] = "train"
    out.loc[labeled, "label"] = answers.reindex(keys[labeled]).to_numpy()
    return out


def promote(best: dict[str, Any], params: Params, table: pd.DataFrame, classes: list[str], out: str | Path,
            eval_dir: str | Path | None = None, progress: bool = False, package: Packager | None = None) -> dict[str, Any]:
    """Train, evaluate, log and register the configuration in ``best`` (a sweep's ``best.json``).

    An active-learning winner is trained on the cells its campaign labeled (:func:`active_table`).
    The promote run is nested under the sweep's parent run; returns the registry outcome plus the model URI,
    run id, ensemble directory and test metrics."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from training.workflow import train_evaluate_register

    if "overrides" not in best:
        raise ConfigError("best config has no 'overrides' (expected a best.json written by spatial tune)")
    p, regime = trial_params(params.model_dump(mode="json"), best["overrides"])
    if regime == "active":
        table = active_table(table, campaign_queries(best, p), p.al.pool)
    out = Path(out)
    eval_dir = Path(eval_dir) if eval_dir is not None else out.parent / f"{out.name}.evaluate"
    tags = {"stage": "tune-promote", "regime": regime, TAG_SWEEP: str(best.get("sweep", "")),
            "spatial.source_trial": str(best.get("trial_id", "")),
            "spatial.source_run": str(best.get("mlflow_run_id", ""))}
    if best.get("parent_run_id"):
        tags[MLFLOW_PARENT_RUN_ID] = best["parent_run_id"]
    result = train_evaluate_register(table, classes, p, out, eval_dir, run_name=f"promote-{best.get('sweep', 'sweep')}",
                                     tags=tags, progress=progress, package=package)
    result.pop("metrics")
    return result | {"overrides": best["overrides"]}
