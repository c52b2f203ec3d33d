"""What the HTTP service and batch scoring share: resolving the served model, the per-cell output layout and the
per-cell JSON records.

Outputs travel between processes as one float64 array per batch, ``(N, K + 5)``: the K class probabilities, then
``confidence, entropy, aleatoric, epistemic, novelty`` (``PACKED_FIELDS``); the predicted class is the arg-max of
the probabilities, exactly as ``training.uncertainty.decompose.decompose`` defines it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydantic_core

from training.config import MlflowConfig
from training.data.loader import Preprocess
from training.uncertainty.ensemble import EnsembleSpec

PACKED_FIELDS = ("confidence", "entropy", "aleatoric", "epistemic", "novelty")
ENV_MODEL = "SPATIAL_MODEL"
ENV_PARAMS = "SPATIAL_PARAMS"  # params file the service reads under `bentoml serve` (default ./params.yaml)
ENV_MODEL_DIR = "SPATIAL_MODEL_DIR"  # set by `spatial serve`: the model resolved once for every worker process
ENV_MODEL_INFO = "SPATIAL_MODEL_INFO"
MIN_SIDE = 8  # smallest crop side either path resizes to the model's input size


def crop_size_problem(height: int, width: int, image_size: int, resize: bool = True) -> str | None:
    """Why crops of ``height x width`` cannot go to a model of ``image_size`` inputs (``"HxW; expected ..."``), or
    ``None`` if they can.

    The one size policy of the HTTP service and ``spatial score``: square crops of any side >= ``MIN_SIDE`` are
    resized by the model's ``Preprocess``; non-square crops are refused (resizing them would distort the cell), and
    so is any other size when ``resize`` is off (``serve.resize=false``)."""
    size = f"{height}x{width}"
    if height != width:
        return f"{size}; expected square crops (H == W), e.g. {image_size}x{image_size}"
    if not resize and height != image_size:
        return f"{size}; expected {image_size}x{image_size} (serve.resize is off)"
    if height < MIN_SIDE:
        return (f"{size}; expected at least {MIN_SIDE}x{MIN_SIDE} "
                f"(they are resized to the model's {image_size}x{image_size})")
    return None


@dataclass
class ServedModel:
    """A resolved ensemble directory, what the registry says about it and its spec (no weights loaded)."""

    path: Path
    info: dict[str, Any]
    spec: EnsembleSpec
    preprocess: Preprocess = field(init=False)

    def __post_init__(self) -> None:
        self.preprocess = Preprocess(**{**self.spec.preprocess, "channels": tuple(self.spec.channels)})

    @classmethod
    def open(cls, path: str | os.PathLike, info: dict[str, Any] | None = None) -> ServedModel:
        p = Path(path)
        spec = EnsembleSpec.read(p)
        return cls(p, info or {"name": p.name, "version": None, "alias": None, "uri": str(p)}, spec)

    @classmethod
    def resolve(cls, uri: str | None = None, mlflow: MlflowConfig | None = None,
                cache_dir: str | os.PathLike | None = None) -> ServedModel:
        """``uri`` (a directory or ``models:/NAME@ALIAS``) through ``training.tracking.resolve_model``; a registry
        model is downloaded into ``cache_dir`` (default: a new temporary directory)."""
        from training.tracking import default_model_uri, resolve_model

        path, info = resolve_model(uri or default_model_uri(), mlflow, cache_dir=cache_dir)
        return cls.open(path, info)

    @classmethod
    def from_env(cls) -> ServedModel:
        """The model to serve, first found of: ``$SPATIAL_MODEL_DIR`` (resolved once by ``spatial serve``),
        ``$SPATIAL_MODEL`` (a directory or registry URI: the explicit option), the model packaged in the Bento being
        served (``serving.bento``), else the registry alias of the params (``$SPATIAL_PARAMS`` or ``./params.yaml``:
        ``registry.*`` and the ``mlflow.*`` tracking URI)."""
        if os.environ.get(ENV_MODEL_DIR):
            info = json.loads(os.environ.get(ENV_MODEL_INFO) or "null")
            return cls.open(os.environ[ENV_MODEL_DIR], info)
        from serving.bento.store import packaged_model
        from training.tracking import default_model_uri

        params = service_params()
        if os.environ.get(ENV_MODEL):
            return cls.resolve(os.environ[ENV_MODEL], params.mlflow)
        packaged = packaged_model()
        if packaged is not None:
            return cls.open(*packaged)
        return cls.resolve(default_model_uri(params.registry), params.mlflow)

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    def model_ref(self) -> dict[str, Any]:
        return {"name": self.info.get("name"), "version": self.info.get("version")}

    def public_info(self) -> dict[str, Any]:
        """What a client may know about the model: name, version, alias, run id, source, and its URI when it is a
        registry URI (a local path is reduced to its last component: server paths are not a client's business)."""
        uri = self.info.get("uri")
        if uri is not None and not str(uri).startswith("models:/"):
            uri = Path(str(uri)).name
        source = self.info.get("source") or ("registry" if self.info.get("version") is not None else "directory")
        return {"name": self.info.get("name"), "version": self.info.get("version"), "alias": self.info.get("alias"),
                "uri": uri, "run_id": self.info.get("run_id"), "source": source}


def service_params():
    """The params a service started without ``spatial serve`` reads: ``$SPATIAL_PARAMS``, else ``./params.yaml``
    if present, else the defaults."""
    from training.config import load_params

    path = os.environ.get(ENV_PARAMS) or ("params.yaml" if Path("params.yaml").is_file() else None)
    return load_params(path)


def pack(out: dict[str, np.ndarray]) -> np.ndarray:
    """``Ensemble.predict_tensor`` output -> ``(N, K + 5)`` float64."""
    return np.column_stack([out["mean_probs"], *(out[k] for k in PACKED_FIELDS)]).astype(np.float64)


def records(values: np.ndarray, classes: Sequence[str], cell_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Per-cell JSON records: ``cell_id, probabilities {class: p}, predicted_class`` and the uncertainty fields."""
    k = len(classes)
    rows = values.tolist()
    out = []
    for cid, row in zip(cell_ids, rows, strict=True):
        probs = row[:k]
        best = max(range(k), key=probs.__getitem__)
        rec = {"cell_id": int(cid), "probabilities": dict(zip(classes, probs, strict=True)),
               "predicted_class": classes[best]}
        rec.update(zip(PACKED_FIELDS, row[k:], strict=True))
        out.append(rec)
    return out


def to_json(obj: Any) -> bytes:
    """Fast JSON (NaN / Inf -> null, e.g. novelty of a model without a novelty model)."""
    return pydantic_core.to_json(obj, inf_nan_mode="null")
