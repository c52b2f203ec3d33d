"""``spatial package``: the model a URI names -> the BentoML model store -> a Bento that carries it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from serving.bento.build import build_bento
from serving.bento.store import save_model
from serving.model import ServedModel
from training.config import MlflowConfig


def package(uri: str, mlflow: MlflowConfig | None = None, repo: str | os.PathLike = ".", build: bool = True) -> dict[str, Any]:
    """Resolve ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or an ensemble directory), save it into the
    model store (idempotent) and, with ``build``, build the Bento referencing it."""
    from training.tracking import promotion_metrics

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
