"""The ensemble in the BentoML model store.

One store entry per registered model version: tag ``<registry model name>:v<version>-<run id[:8]>`` (a directory
model without a registry version: ``dir-<spec hash>``), holding the ensemble directory as it is and, as metadata,
what a deployer needs (MLflow model name, version, run id, alias, classes, channels, image size, members and the
evaluation metrics it was promoted on). Saving is idempotent: a tag already in the store is kept as it is, so
``spatial register``, ``spatial tune --promote`` and ``spatial package`` leave the store in the same state.

A Bento built by ``serving.bento.build`` names its model in the Bento argument ``spatial_model``; when that Bento
is served, BentoML points the model store at the Bento's own ``models/`` folder and ``packaged_model`` finds it
there, so no registry and no ``models/`` folder are needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

BENTO_ARG = "spatial_model"
MODULE = "spatial"
DEFAULT_NAME = "spatial-phenotype"


def _spec(ensemble_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(ensemble_dir) / "spec.json").read_text())


def model_tag(ensemble_dir: str | os.PathLike, info: dict[str, Any]) -> str:
    """``NAME:VERSION`` for the store (lower case; BentoML's tag alphabet)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", str(info.get("name") or DEFAULT_NAME).lower()).strip("-._") or DEFAULT_NAME
    if info.get("version") is not None:
        run = re.sub(r"[^a-z0-9]", "", str(info.get("run_id") or "").lower())[:8]
        version = f"v{int(info['version'])}" + (f"-{run}" if run else "")
    else:
        version = "dir-" + hashlib.sha256((Path(ensemble_dir) / "spec.json").read_bytes()).hexdigest()[:12]
    return f"{name}:{version}"


def model_metadata(ensemble_dir: str | os.PathLike, info: dict[str, Any], metrics: dict[str, float] | None
                   ) -> dict[str, Any]:
    spec = _spec(ensemble_dir)
    return {
        "mlflow_model_name": info.get("name"),
        "mlflow_version": info.get("version"),
        "mlflow_run_id": info.get("run_id"),
        "alias": info.get("alias"),
        "source_uri": info.get("uri") if str(info.get("uri") or "").startswith("models:/") else None,
        "classes": list(spec["classes"]),
        "channels": list(spec["channels"]),
        "source_channels": list(spec.get("source_channels") or []),
        "image_size": int(spec["image_size"]),
        "members": len(spec.get("temperatures") or []),
        "metrics": {k: float(v) for k, v in sorted((metrics or {}).items())},
    }


def save_model(ensemble_dir: str | os.PathLike, info: dict[str, Any], metrics: dict[str, float] | None = None
               ) -> tuple[str, bool]:
    """Put the ensemble into the BentoML model store (``$BENTOML_HOME/models``); returns ``(tag, created)``."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = model_tag(ensemble_dir, info)
    try:
        return str(bentoml.models.get(tag).tag), False
    except NotFound:
        pass
    meta = model_metadata(ensemble_dir, info, metrics)
    labels = {"project": "spatial", "alias": str(info.get("alias") or "none")}
    with bentoml.models.create(tag, module=MODULE, labels=labels, metadata=meta) as model:
        shutil.copytree(ensemble_dir, model.path, dirs_exist_ok=True)
    return str(model.tag), True


def packaged_model() -> tuple[Path, dict[str, Any]] | None:
    """``(ensemble dir, info)`` of the model the Bento being served carries, or None outside such a Bento."""
    import bentoml

    tag = getattr(bentoml.use_arguments(), BENTO_ARG, None)
    if not tag:
        return None
    model = bentoml.models.get(tag)
    meta = model.info.metadata
    info = {"name": meta.get("mlflow_model_name") or model.tag.name, "version": meta.get("mlflow_version"),
            "alias": meta.get("alias"), "uri": meta.get("source_uri") or str(model.tag),
            "run_id": meta.get("mlflow_run_id"), "source": "bento", "bento_model": str(model.tag)}
    return Path(model.path), info
