"""``spatial package``: the model a URI names -> the BentoML model store -> a Bento that carries it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from serving.bento.build import build_bento, check_store_outside
from serving.bento.store import save_model
from serving.model import ServedModel
from training.config import MlflowConfig, RegistryConfig
from training.tracking import resolve_model


def package(uri: str, mlflow: MlflowConfig | None = None, repo: str | os.PathLike = ".", build: bool = True) -> dict[str, Any]:
    """Resolve ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or an ensemble directory), save it into the
    model store (idempotent) and, with ``build``, build the Bento referencing it."""
    if build:
        check_store_outside(repo)
    with tempfile.TemporaryDirectory(prefix="spatial-package-") as cache:
        served = ServedModel.resolve(uri, mlflow, cache_dir=cache)
        info = dict(served.info)
        if not str(uri).startswith("models:/"):
            info["run_id"] = served.spec.info.get("mlflow_run_id")
        metrics = promotion_metrics(info.get("run_id")) if str(uri).startswith("models:/") else {}
        tag, created = save_model(served.path, info, metrics)
    result: dict[str, Any] = {"model": tag, "model_created": created, "mlflow_model_name": info.get("name"),
                              "mlflow_version": info.get("version"), "mlflow_run_id": info.get("run_id")}
    if build:
        result |= build_bento(tag, Path(repo))
    return result


def promotion_metrics(run_id: str | None) -> dict[str, float]:
    """The metrics of the run a model was promoted on (the active tracking URI)."""
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics) if run_id else {}


def package_version(cfg: RegistryConfig, version: int, run_id: str) -> str:
    """Save registry version ``version`` into the BentoML model store (``serving.bento.store``); returns its tag."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="spatial-package-") as tmp:
        path, info = resolve_model(f"models:/{cfg.model_name}/{version}", MlflowConfig(
            tracking_uri=mlflow.get_tracking_uri()), cache_dir=tmp)
        return save_model(path, {**info, "alias": cfg.alias, "run_id": run_id}, promotion_metrics(run_id))[0]
