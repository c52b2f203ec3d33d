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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch
from pydantic import Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serving.model import MIN_SIDE, ServedModel, pack, records, to_json
from serving.service.openapi import patch_spec
from serving.service.schemas import ScoreResponse
from serving.service.uploads import open_upload, upload_limits
from serving.service.validation import (
    RequestError,
    ScoreRequest,
    check_count,
    check_dims,
    check_size,
    error_body,
    select_channels,
)
from training.config import ServeConfig, load_params
from training.errors import SpatialError
from training.io.pixels import PIXEL_RANGE
from training.uncertainty.decompose import FIELD_DESCRIPTIONS

log = logging.getLogger(__name__)
ENV_SERVE_CONFIG = "SPATIAL_SERVE_CONFIG"
RUNNER_ATTEMPTS = 4
RETRY_LOG_EVERY_S = 60.0
ENV_PARAMS = "SPATIAL_PARAMS"
MB = 2**20
LIMIT_KEYS = ("max_cells_per_request", "max_request_mb", "max_upload_mb", "max_upload_cells", "max_image_side",
              "max_channels", "max_decoded_mb", "max_chunk_mb", "file_chunk_cells")


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


class RetryLog:
    """Dropped runner calls are expected under load (bentoml#5540): the first is logged, then at most one line per
    ``every_s`` seconds with the count since (instead of one warning per retry)."""

    def __init__(self, every_s: float = RETRY_LOG_EVERY_S) -> None:
        self.every_s, self.count, self.last = every_s, 0, -float("inf")
        self.lock = threading.Lock()

    def dropped(self, exc: BaseException) -> None:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            count, self.count, self.last = self.count, 0, now
        log.warning("%d runner call(s) dropped by a closing connection and retried (last: %s: %s)", count,
                    type(exc).__name__, exc)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json")


def refuse(route: str, exc: RequestError) -> Response:
    """The error response to a refused request, logged as one line (a client's bad input is no server error: no
    traceback)."""
    log_refusal("POST", route, exc.status, str(exc))
    return json_response(exc.body(), exc.status)


def log_refusal(method: str, path: str, status: int, error: str) -> None:
    log.log(logging.ERROR if status >= 500 else logging.WARNING, "%s %s refused with %d: %s", method, path, status,
            error)


class CheckedInput(bentoml.IODescriptor):
    """A route's input whose pydantic ``ValidationError`` becomes the service's 400 (``RequestError.from_validation``)
    instead of BentoML's (an ``error`` naming an internal class, and a logged traceback per bad request). The error
    takes the place of every field's value in the call, so the route answers it with ``refuse``."""

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> CheckedInput:
        try:
            return await super().from_http_request(request, serde)
        except ValidationError as exc:
            return cls.model_construct(**dict.fromkeys(cls.model_fields, RequestError.from_validation(exc)))


class ScoreInput(CheckedInput, ScoreRequest):
    """POST /score body."""


class ScoreFileInput(CheckedInput):
    """POST /score_file form."""

    file: Path = Field(description="the upload: .h5 (SPARCSpy), .h5sc (scPortrait) or .npy")


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
        epistemic, novelty.

        The batch merges several clients' requests. Should the model fail on it, each cell is scored alone and a
        cell that still fails gets a row of NaN probabilities, so only the request holding it fails
        (``SpatialScorer._infer``); validated input never gets here, this is the second line of defence.
        """
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        try:
            return pack(self.ensemble.predict_tensor(x))
        except Exception:
            log.exception("a batch of %d cells failed; scoring its cells one by one", len(x))
        rows = []
        for i in range(len(x)):
            try:
                rows.append(pack(self.ensemble.predict_tensor(x[i:i + 1])))
            except Exception:
                rows.append(np.full((1, len(self.ensemble.spec.classes) + 5), np.nan))
        return np.concatenate(rows)


async def _metadata_endpoint(request: Request) -> Response:
    return Response(to_json(bentoml.get_current_service().metadata()), media_type="application/json")


_extra_routes = Starlette(routes=[Route("/metadata", _metadata_endpoint, methods=["GET"])])


@bentoml.service(name="spatial", threads=SERVE.threads, traffic={"timeout": SERVE.timeout_s})
@bentoml.asgi_app(_extra_routes, path="/")
class SpatialScorer:
    """Per-cell phenotype probabilities with aleatoric / epistemic uncertainty and novelty."""

    runner = bentoml.depends(EnsembleRunner)

    def __init__(self) -> None:
        self.cfg = SERVE
        self.model = ServedModel.from_env()
        self.limits = upload_limits(SERVE.max_upload_cells, SERVE.max_image_side, SERVE.max_channels,
                                    SERVE.max_decoded_mb, SERVE.max_chunk_mb)
        self.retry_log = RetryLog()

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
                values = np.asarray(self.runner.infer(x))
                break
            except Exception as exc:
                if attempt == RUNNER_ATTEMPTS or not _dropped_connection(exc):
                    raise
                self.retry_log.dropped(exc)
        failed = np.flatnonzero(np.isnan(values[:, :len(self.model.classes)]).any(axis=1))
        if len(failed):
            raise RequestError("images", f"the model failed on the cell(s) at position {failed[:5].tolist()}",
                               status=500, kind="model_error")
        return values

    def _head(self) -> dict[str, Any]:
        return {"model": self.model.model_ref(), "classes": self.model.classes}

    def metadata(self) -> dict[str, Any]:
        spec, cfg = self.model.spec, self.cfg
        return {
            "model": self.model.public_info(),
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
                "pixels": f"{PIXEL_RANGE} (normalised as stored in SPARCS single-cell files); a cell with any other "
                          "value is refused",
                "image_size": (f"square crops of any side >= {MIN_SIDE} are resized to {spec.image_size}x"
                               f"{spec.image_size} ({spec.preprocess.get('resize', 'resize')})" if cfg.resize
                               else f"exactly {spec.image_size}x{spec.image_size}"),
                "max_cells_per_request": cfg.max_cells_per_request,
                "max_request_mb": cfg.max_request_mb,
                "max_upload_mb": cfg.max_upload_mb,
                "file_types": [".h5 (SPARCSpy)", ".h5sc (scPortrait)", ".npy (float)"],
                "hdf5": "self-contained files only: external raw storage, external links and virtual datasets are "
                        "refused",
            },
            "novelty": {"score": spec.info.get("novelty_score"),
                        "validation_quantiles": spec.info.get("novelty_val_quantiles", {})} if spec.has_novelty else None,
            "limits": {k: getattr(cfg, k) for k in LIMIT_KEYS},
            "fields": FIELD_DESCRIPTIONS,
        }

    # -- routes ------------------------------------------------------------------------------------------------------
    @bentoml.api(route="/score", input_spec=ScoreInput, output_spec=ScoreResponse)
    def score(self, images: np.ndarray | RequestError, cell_ids: list[int] | None = None) -> Response:
        """Score cell images given in the request body (see ``/metadata`` for the expected input)."""
        if isinstance(images, RequestError):
            return refuse("/score", images)
        try:
            check_count(len(images), self.cfg.max_cells_per_request)
            check_dims(images.shape, self.cfg.max_image_side, self.cfg.max_channels)
            pixels = select_channels(images, self.model.spec.channels, self.model.spec.source_channels)
            check_size(pixels, self.model.spec.image_size, self.cfg.resize)
        except RequestError as exc:
            return refuse("/score", exc)
        ids = cell_ids if cell_ids is not None else range(len(pixels))
        try:
            values = self._infer(pixels)
        except RequestError as exc:
            return refuse("/score", exc)
        return json_response({**self._head(), "cells": records(values, self.model.classes, ids)})

    @bentoml.api(route="/score_file", input_spec=ScoreFileInput, output_spec=ScoreResponse)
    def score_file(self, file: Path | RequestError) -> Response:
        """Score every cell of an uploaded ``.h5`` / ``.h5sc`` / ``.npy`` file (multipart field ``file``); the
        response is streamed chunk by chunk (``serve.file_chunk_cells``)."""
        if isinstance(file, RequestError):
            return refuse("/score_file", file)
        chunk = self.cfg.file_chunk_cells
        try:
            upload = open_upload(file, self.model.spec, self.cfg.resize, self.limits)
        except RequestError as exc:
            return refuse("/score_file", exc)
        try:  # the first chunk is scored before anything is sent, so its problems still get a 4xx
            first = self._file_chunk(upload, 0, min(chunk, upload.n))
        except RequestError as exc:
            upload.close()
            return refuse("/score_file", exc)

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
    """ASGI middleware in front of the routes that take a body:

    * a body over the route's limit gets 413 before the service reads it (by its Content-Length), or as soon as a
      chunked body passes the limit;
    * a ``multipart/*`` body is run through a second multipart parser chunk by chunk as it streams to the service;
      a malformed one (or a Content-Type without a usable boundary) gets 400 (BentoML would answer the parser's
      error with 500);
    * an upload route (``file_routes``) takes ``multipart/form-data`` only (else 415), and a ``file`` part without a
      filename (a text field, ``curl -F file=abc``) gets 400 before the service sees its value: BentoML would take
      such a string, or a non-multipart body that is a URL, as a URL to download (a request to any URL a client
      names);
    * a JSON route (``json_routes``) takes ``application/json`` only (else 415): BentoML parsed any body as JSON, so
      a page of any web site could make the visitor's browser send cells to score as ``text/plain``, which needs no
      CORS preflight.
    """

    def __init__(self, app: Any, limits: dict[str, int], default: int,
                 file_routes: tuple[str, ...] = ("/score_file",), json_routes: tuple[str, ...] = ("/score",)) -> None:
        self.app, self.limits, self.default = app, limits, default
        self.file_routes, self.json_routes = file_routes, json_routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.limits.get(path, self.default)
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        problem = multipart_problem(ctype)
        if problem:
            return await _send(send, scope, 400, _field_error(
                "content-type", problem, "multipart/form-data; boundary=<1-70 characters>", "multipart"))
        upload = path in self.file_routes
        if upload and ctype.split(";")[0].strip() != "multipart/form-data":  # BentoML's own test for its form parser
            return await _send(send, scope, 415, _field_error(
                "content-type", repr(ctype) if ctype else "no Content-Type",
                "multipart/form-data with the upload in a part named 'file'", "content_type"))
        if path in self.json_routes and ctype.split(";")[0].strip().lower() != "application/json":
            return await _send(send, scope, 415, _field_error(
                "content-type", repr(ctype) if ctype else "no Content-Type", "application/json", "content_type"))
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _send(send, scope, 400, _field_error("content-length", "not an integer", "a byte count"))
            if size > limit:
                return await _send(send, scope, 413, _too_big(size, limit, path))
        text_files: list[str] = []  # names of text parts called 'file' (on an upload route), from the parser
        parser = _multipart_checker(ctype, text_files if upload else None)
        state: dict[str, Any] = {"received": 0, "error": None, "sent": False}

        async def checked_receive() -> dict:
            message = await receive()
            if message["type"] != "http.request" or state["error"] is not None:
                return message
            body = message.get("body", b"")
            state["received"] += len(body)
            if state["received"] > limit:
                state["error"] = (413, _too_big(state["received"], limit, path))
            elif parser is not None:
                try:
                    parser.write(body)
                    if not message.get("more_body", False):
                        parser.finalize()
                except Exception as exc:  # python-multipart's parse errors
                    state["error"] = (400, _field_error("body", f"malformed multipart body ({exc})",
                                                        "a multipart/form-data body with a 'file' part", "multipart"))
                if text_files and state["error"] is None:
                    state["error"] = (400, _field_error("file", "a text field, not a file upload",
                                                        "a file upload (a multipart part with a filename, "
                                                        "curl -F file=@cells.h5sc)", "multipart"))
            return {"type": "http.disconnect"} if state["error"] is not None else message

        async def guarded_send(message: dict) -> None:
            if state["error"] is None:
                return await send(message)
            if not state["sent"] and message["type"] == "http.response.start":
                state["sent"] = True
                await _send(send, scope, *state["error"])

        await self.app(scope, checked_receive, guarded_send)


def _multipart_checker(content_type: str, text_files: list[str] | None = None) -> Any:
    """A python-multipart parser for a multipart Content-Type, else None. With ``text_files``, the parser appends
    to it the name of every part named ``file`` that has no filename, as soon as the part's headers are parsed."""
    if not content_type.lower().lstrip().startswith("multipart/"):
        return None
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    if text_files is None:
        return MultipartParser(params[b"boundary"], callbacks={})
    charset = _charset(params.get(b"charset", b"utf-8"))
    part = {"name": b"", "value": b"", "disposition": b""}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:  # as Starlette's form parser, which BentoML uses: the last Content-Disposition
        if part["name"].lower() == b"content-disposition":
            part["disposition"] = part["value"]
        part["name"] = part["value"] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(part["disposition"])
        part["disposition"] = b""
        if b"name" in options and b"filename" not in options and _decode(options[b"name"], charset) == "file":
            text_files.append("file")

    return MultipartParser(params[b"boundary"], callbacks={
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished})


def _charset(value: bytes | str) -> str:
    """The charset Starlette's form parser decodes field names with."""
    import codecs

    name = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "latin-1"


def _decode(value: bytes, charset: str) -> str:
    try:
        return value.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return value.decode("latin-1")


def multipart_problem(content_type: str) -> str | None:
    """What is wrong with a ``multipart/*`` Content-Type (no / an empty / an over-long boundary), else None; the
    multipart parser would otherwise fail with a 500."""
    if not content_type.lower().lstrip().startswith("multipart/"):
        return None
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = {k.strip().lower(): v.strip().strip('"') for k, v in params.items()}.get("boundary", "")
    if not boundary:
        return "a multipart Content-Type without a boundary"
    if len(boundary) > 70:
        return f"a multipart boundary of {len(boundary)} characters"
    return None


def _field_error(loc: str, what: str, expected: str, kind: str = "body_size") -> dict[str, Any]:
    return error_body(f"{loc}: {what}; expected {expected}", [{"loc": [loc], "msg": f"{what}; expected {expected}",
                                                               "type": kind}])


def _too_big(size: int, limit: int, path: str) -> dict[str, Any]:
    key = "serve.max_upload_mb" if path == "/score_file" else "serve.max_request_mb"
    return _field_error("body", f"{size / MB:.1f} MB", f"at most {limit / MB:g} MB ({key})")


async def _send(send: Any, scope: dict, status: int, body: dict[str, Any]) -> None:
    log_refusal(scope.get("method", ""), scope.get("path", ""), status, body["error"])
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def openapi_document() -> dict[str, Any]:
    """BentoML's OpenAPI document of this service, corrected (``serving.service.openapi``)."""
    return patch_spec(SpatialScorer.openapi_spec.asdict(), ScoreRequest.model_json_schema()["properties"]["images"])


class OpenAPIDocs:
    """ASGI middleware: ``GET /docs.json`` answers the corrected document (built once per worker), and ``GET /``
    redirects there (BentoML's own page at ``/`` loads Google Tag Manager into the service's origin)."""

    def __init__(self, app: Any) -> None:
        self.app, self.body = app, None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in ("/", "/docs.json") or \
                scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/":
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", b"/docs.json"), (b"content-length", b"0")]})
            return await send({"type": "http.response.body", "body": b""})
        if self.body is None:
            self.body = json.dumps(openapi_document()).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body if scope["method"] == "GET" else b""})


SpatialScorer.add_asgi_middleware(
    BodyLimit,
    limits={"/score": int(SERVE.max_request_mb * MB), "/score_file": int(SERVE.max_upload_mb * MB)},
    default=int(SERVE.max_request_mb * MB),
)
SpatialScorer.add_asgi_middleware(OpenAPIDocs)

__all__ = ["EnsembleRunner", "SpatialScorer", "openapi_document", "serve_config"]
