"""The OpenAPI document served at ``/docs.json``: BentoML's, corrected to match what the service really does.

BentoML 1.4.39 documents errors as ``{"error": str, "detail": str}`` (the service sends ``detail`` as a list),
omits the 413 / 415 / 422 / 503 answers, flattens the ``images`` union (nested lists *or* a base64 tensor) into a
plain array, and knows nothing of ``GET /metadata`` (a Starlette route). ``patch_spec`` fixes all four, so a client
generated from ``/docs.json`` (or a schemathesis run against it) sees the real contract.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field

from serving.service.schemas import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
STATUS_TEXT = {
    400: "Malformed request (JSON, multipart, field types, pixel values, cell ids)",
    413: "Over a limit: body size, cells per request, image side, channels, upload cells / decoded bytes "
         "(see /metadata)",
    415: "Not a recognised upload (no HDF5 or NPY signature)",
    422: "Well-formed but unusable for this model (channels, image size, unreadable file, duplicated ids)",
    500: "Internal error (never caused by a request that passed validation)",
    503: "Overloaded: the request could not be scheduled within serve.max_latency_ms",
}
SERVICE_ROUTES = ("/score", "/score_file")


class MetadataModel(BaseModel):
    name: str | None = None
    version: int | None = None
    alias: str | None = None
    uri: str | None = Field(None, description="registry URI or the model directory's name (never a server path)")
    run_id: str | None = Field(None, description="the MLflow run the model was logged in, when known")
    source: str | None = Field(None, description="where the service got the model: bento | registry | directory")


class MetadataNovelty(BaseModel):
    score: str | None = Field(None, description="the model's `uncertainty.novelty` score (null for an ensemble saved "
                                                "before its score was recorded)")
    validation_quantiles: dict[str, float] = Field(
        description="the novelty of the model's validation cells at these quantiles: a cell above the 0.95 entry is "
                    "more novel than 95 % of them, the reference to set a threshold on")


class Metadata(BaseModel):
    """GET /metadata: the served model and the accepted input."""

    model: MetadataModel
    classes: list[str]
    channels: list[str]
    source_channels: list[str]
    image_size: int
    members: int
    posterior: str | None = None
    input: dict[str, Any]
    novelty: MetadataNovelty | None = Field(None, description="the novelty score served, and its reference; null "
                                                               "when the model has none")
    limits: dict[str, float | int]
    fields: dict[str, str]


def _error_content() -> dict[str, Any]:
    return {"application/json": {"schema": ERROR_REF}}


def patch_spec(spec: dict[str, Any], images_schema: dict[str, Any]) -> dict[str, Any]:
    """A corrected copy of BentoML's OpenAPI ``spec`` (see the module docstring)."""
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorResponse"] = error
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas[name] = {"$ref": "#/components/schemas/ErrorResponse"}
    paths = spec.setdefault("paths", {})
    for route in SERVICE_ROUTES:
        op = paths.get(route, {}).get("post")
        if op is None:
            continue
        responses = op.setdefault("responses", {})
        responses.pop("404", None)
        for status in (400, 413, 415, 422, 500, 503):
            text = "The body is not application/json" if (route, status) == ("/score", 415) else STATUS_TEXT[status]
            responses[str(status)] = {"description": text, "content": _error_content()}
    score = paths.get("/score", {}).get("post")
    if score is not None:
        body = score["requestBody"]["content"]["application/json"]["schema"]
        target = schemas.get(body["$ref"].rsplit("/", 1)[1]) if "$ref" in body else body
        target["properties"]["images"] = images_schema
    meta = Metadata.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(meta.pop("$defs", {}))
    schemas["Metadata"] = meta
    paths["/metadata"] = {"get": {
        "tags": ["Service APIs"], "operationId": "spatial__metadata",
        "description": "The served model (name, registry version, MLflow run), its classes and channels, the novelty "
                       "score it serves and its validation cells' quantiles, the accepted input and the limits.",
        "responses": {"200": {"description": "Successful Response",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Metadata"}}}}},
    }}
    return spec
