"""The BentoML HTTP service: the champion ensemble with per-cell probabilities, uncertainty and novelty.

Two BentoML services (the documented pattern for adaptive batching behind a richer request):

* ``EnsembleRunner`` loads the ensemble once and exposes one batchable method, ``infer`` (model-ready float32
  ``(N, C, S, S)`` -> packed outputs, see ``serving.model.pack``). BentoML's dispatcher merges concurrent
  calls into batches of up to ``serve.max_batch_size`` cells.
* ``SpatialScorer`` (the public one) validates requests, selects the model's channels, resizes, calls the runner and
  shapes the per-cell records. Routes: ``POST /score``, ``POST /score_file``, ``GET /metadata``; BentoML adds
  ``/livez``, ``/readyz``, ``/metrics`` and ``/docs.json``.

The model comes from ``$SPATIAL_MODEL`` (a directory or ``models:/NAME@ALIAS``, default
``models:/spatial-phenotype@champion``, resolved with ``$MLFLOW_TRACKING_URI``) or, when started by
``spatial serve``, from the directory it resolved once (``$SPATIAL_MODEL_DIR``). Service settings come from
``$SPATIAL_SERVE_CONFIG`` (the resolved ``serve`` params as JSON, set by ``spatial serve``), else the ``serve``
section of ``$SPATIAL_PARAMS`` / ``./params.yaml``, else the defaults.

Run it with ``spatial serve`` or ``bentoml serve serving.service.api:SpatialScorer``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving.model import ServedModel, pack, records, to_json
from serving.service.schemas import ScoreResponse
from serving.service.uploads import open_upload
from serving.service.validation import (
    MIN_SIDE,
    RequestError,
    ScoreRequest,
    check_count,
    check_size,
    error_body,
    select_channels,
)
from training.config import ServeConfig, load_params
from training.errors import SpatialError
from training.uncertainty.decompose import FIELD_DESCRIPTIONS

log = logging.getLogger(__name__)
ENV_SERVE_CONFIG = "SPATIAL_SERVE_CONFIG"
RUNNER_ATTEMPTS = 4
ENV_PARAMS = "SPATIAL_PARAMS"
MB = 2**20


def serve_config() -> ServeConfig:
    """The ``serve`` settings for this process (see the module docstring for the lookup order)."""
    raw = os.environ.get(ENV_SERVE_CONFIG)
    if raw:
        return ServeConfig.model_validate_json(raw)
    path = os.environ.get(ENV_PARAMS) or ("params.yaml" if Path("params.yaml").is_file() else None)
    return load_params(path).serve if path else ServeConfig()


SERVE = serve_config()


def _runner_resources(cfg: ServeConfig) -> dict[str, Any]:
    gpus = cfg.gpus if cfg.gpus is not None else int(torch.cuda.is_available())
    res: dict[str, Any] = {}
    if cfg.cpus is not None:
        res["cpu"] = str(cfg.cpus)
    if gpus:
        res["gpu"] = gpus
    return res


def _dropped_connection(exc: BaseException) -> bool:
    import aiohttp

    return isinstance(exc, aiohttp.ClientConnectionError) or (
        isinstance(exc, RuntimeError) and "Session is closed" in str(exc))


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json")


def error_response(exc: RequestError) -> Response:
    return json_response(exc.body(), exc.status)


@bentoml.service(name="spatial_ensemble", resources=_runner_resources(SERVE), traffic={"timeout": SERVE.timeout_s})
class EnsembleRunner:
    """Loads the ensemble once; ``infer`` is the one batchable model call."""

    def __init__(self) -> None:
        from training.engine import select_device
        from training.uncertainty.ensemble import Ensemble

        if SERVE.torch_threads:
            torch.set_num_threads(SERVE.torch_threads)
        self.model = ServedModel.from_env()
        self.ensemble = Ensemble.load(self.model.path, device=select_device(SERVE.device))

    @bentoml.api(batchable=True, batch_dim=(0, 0), max_batch_size=SERVE.max_batch_size,
                 max_latency_ms=SERVE.max_latency_ms)
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Model-ready float32 ``(N, C, S, S)`` -> ``(N, K + 5)``: probabilities, confidence, entropy, aleatoric,
        epistemic, novelty."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return pack(self.ensemble.predict_tensor(x))


async def _metadata_endpoint(request: Request) -> Response:
    return JSONResponse(bentoml.get_current_service().metadata())


_extra_routes = Starlette(routes=[Route("/metadata", _metadata_endpoint, methods=["GET"])])


@bentoml.service(name="spatial", threads=SERVE.threads, traffic={"timeout": SERVE.timeout_s})
@bentoml.asgi_app(_extra_routes, path="/")
class SpatialScorer:
    """Per-cell phenotype probabilities with aleatoric / epistemic uncertainty and novelty."""

    runner = bentoml.depends(EnsembleRunner)

    def __init__(self) -> None:
        self.cfg = SERVE
        self.model = ServedModel.from_env()

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        """Selected-channel pixels (any square size) -> packed outputs, via the batching runner.

        BentoML 1.4.39 replaces its inter-service HTTP session every 100 calls by closing the old one, aborting calls
        still in flight on it ("Server disconnected" / "Session is closed", bentoml#5540). Inference is a pure
        function, so such a call is simply made again.
        """
        x = self.model.preprocess(pixels).numpy()
        for attempt in range(1, RUNNER_ATTEMPTS + 1):
            try:
                return np.asarray(self.runner.infer(x))
            except Exception as exc:
                if attempt == RUNNER_ATTEMPTS or not _dropped_connection(exc):
                    raise
                log.warning("runner call dropped (%s: %s); retrying (%d/%d)", type(exc).__name__, exc, attempt,
                            RUNNER_ATTEMPTS - 1)
        raise AssertionError("unreachable")

    def _head(self) -> dict[str, Any]:
        return {"model": self.model.model_ref(), "classes": self.model.classes}

    def metadata(self) -> dict[str, Any]:
        spec, cfg = self.model.spec, self.cfg
        return {
            "model": {k: self.model.info.get(k) for k in ("name", "version", "alias", "uri")},
            "classes": spec.classes,
            "channels": spec.channels,
            "source_channels": spec.source_channels,
            "image_size": spec.image_size,
            "members": spec.n_members,
            "posterior": spec.posterior,
            "input": {
                "images": f"(N, C, H, W) with C = {len(spec.channels)} ({', '.join(spec.channels)}) or the full stack "
                          f"of {len(spec.source_channels)} ({', '.join(spec.source_channels)})"
                          + ("; (N, H, W) is accepted for this one-channel model" if len(spec.channels) == 1 else ""),
                "pixels": "finite values, normalised to [0, 1] as stored in SPARCS single-cell files",
                "image_size": (f"square crops of any side >= {MIN_SIDE} are resized to {spec.image_size}x"
                               f"{spec.image_size} ({spec.preprocess.get('resize', 'resize')})" if cfg.resize
                               else f"exactly {spec.image_size}x{spec.image_size}"),
                "max_cells_per_request": cfg.max_cells_per_request,
                "max_request_mb": cfg.max_request_mb,
                "max_upload_mb": cfg.max_upload_mb,
                "file_types": [".h5 (SPARCSpy)", ".h5sc (scPortrait)", ".npy"],
            },
            "fields": FIELD_DESCRIPTIONS,
        }

    # -- routes ------------------------------------------------------------------------------------------------------
    @bentoml.api(route="/score", input_spec=ScoreRequest, output_spec=ScoreResponse)
    def score(self, images: np.ndarray, cell_ids: list[int] | None = None) -> Response:
        """Score cell images given in the request body (see ``/metadata`` for the expected input)."""
        try:
            check_count(len(images), self.cfg.max_cells_per_request)
            pixels = select_channels(images, self.model.spec.channels, self.model.spec.source_channels)
            check_size(pixels, self.model.spec.image_size, self.cfg.resize)
        except RequestError as exc:
            return error_response(exc)
        ids = cell_ids if cell_ids is not None else range(len(pixels))
        values = self._infer(pixels)
        return json_response({**self._head(), "cells": records(values, self.model.classes, ids)})

    @bentoml.api(route="/score_file", output_spec=ScoreResponse)
    def score_file(self, file: Path) -> Response:
        """Score every cell of an uploaded ``.h5`` / ``.h5sc`` / ``.npy`` file (multipart field ``file``); the
        response is streamed chunk by chunk (``serve.file_chunk_cells``)."""
        chunk = self.cfg.file_chunk_cells
        try:
            upload = open_upload(file, self.model.spec, self.cfg.resize)
        except RequestError as exc:
            return error_response(exc)
        try:  # the first chunk is scored before anything is sent, so its problems still get a 4xx
            first = self._file_chunk(upload, 0, min(chunk, upload.n))
        except RequestError as exc:
            upload.close()
            return error_response(exc)

        def stream() -> Iterator[bytes]:
            try:
                yield to_json(self._head())[:-1] + b',"cells":[' + first
                for start in range(chunk, upload.n, chunk):
                    yield b"," + self._file_chunk(upload, start, min(start + chunk, upload.n))
                yield b"]}"
            except (RequestError, SpatialError) as exc:
                err = exc.body() if isinstance(exc, RequestError) else error_body(str(exc), [])
                yield b'],"error":' + to_json(err) + b"}"
            finally:
                upload.close()

        return StreamingResponse(stream(), media_type="application/json")

    def _file_chunk(self, upload, start: int, stop: int) -> bytes:
        values = self._infer(upload.read(start, stop))
        return to_json(records(values, self.model.classes, upload.cell_ids[start:stop]))[1:-1]


class BodyLimit:
    """ASGI middleware: a request body over the route's limit gets 413 before the service reads it (by its
    Content-Length), or as soon as a chunked body passes the limit."""

    def __init__(self, app: Any, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope.get("path", ""), self.default)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _send(send, 400, _limit_error("content-length", "not an integer", "a byte count"))
            if size > limit:
                return await _send(send, 413, _too_big(size, limit, scope.get("path", "")))
        state = {"received": 0, "exceeded": False, "sent": False}

        async def counting_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["exceeded"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not state["exceeded"]:
                return await send(message)
            if not state["sent"] and message["type"] == "http.response.start":
                state["sent"] = True
                await _send(send, 413, _too_big(state["received"], limit, scope.get("path", "")))

        await self.app(scope, counting_receive, guarded_send)


def _limit_error(loc: str, what: str, expected: str) -> dict[str, Any]:
    return error_body(f"{loc}: {what}; expected {expected}", [{"loc": [loc], "msg": f"{what}; expected {expected}",
                                                               "type": "body_size"}])


def _too_big(size: int, limit: int, path: str) -> dict[str, Any]:
    key = "serve.max_upload_mb" if path == "/score_file" else "serve.max_request_mb"
    return _limit_error("body", f"{size / MB:.1f} MB", f"at most {limit / MB:g} MB ({key})")


async def _send(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


SpatialScorer.add_asgi_middleware(
    BodyLimit,
    limits={"/score": int(SERVE.max_request_mb * MB), "/score_file": int(SERVE.max_upload_mb * MB)},
    default=int(SERVE.max_request_mb * MB),
)

__all__ = ["EnsembleRunner", "SpatialScorer", "serve_config"]
