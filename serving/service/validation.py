"""Request validation for the HTTP service: pydantic request models (shape-free checks) and the checks against
the served model (channels, image size, limits).

Pixel values are checked by ``training.io.pixels`` (finite, in [0, 1]), the same check batch scoring and training
apply to stored files, so every cell that reaches the model (and so every adaptive batch) is one the model accepts.

Every rejected request gets a 4xx JSON body of one shape (``RequestError.body``; pydantic's errors included, via
``RequestError.from_validation``)::

    {"error": "<field>: <one line>", "detail": [{"loc": ["images"], "msg": "...", "type": "..."}]}

Image size policy: ``serving.model.crop_size_problem``, which ``spatial score`` applies too (square crops of any
side >= ``MIN_SIDE`` are resized by the model's own ``Preprocess``; non-square or smaller crops are refused, and any
size other than the model's when the service runs with ``serve.resize=false``).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from serving.model import crop_size_problem
from training.io.pixels import PIXEL_RANGE, bad_cells, describe_cell

IMAGES_EXPECTED = (
    "a nested list of numbers of shape (N, C, H, W), or (N, H, W) for a one-channel model, or a tensor object "
    '{"b64": base64 of little-endian values, "dtype": "float16" | "float32", "shape": [N, C, H, W]}'
)


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` with the offending field ``loc`` and what was expected
    (``detail``: this error, or all of a ``ValidationError``'s, first one first)."""

    def __init__(self, loc: str | list[str | int], msg: str, status: int = 422, kind: str = "value_error",
                 detail: list[dict[str, Any]] | None = None):
        self.loc = [loc] if isinstance(loc, str) else list(loc)
        self.msg, self.status, self.kind = " ".join(msg.split()), status, kind
        self.detail = detail or [{"loc": self.loc, "msg": self.msg, "type": kind}]
        super().__init__(f"{'.'.join(map(str, self.loc)) or 'body'}: {self.msg}")

    @classmethod
    def from_validation(cls, exc: ValidationError) -> RequestError:
        """pydantic's errors as a 400: each one's own message (no "Value error, " prefix), ``loc`` and ``type``."""
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        detail = [{"loc": list(e["loc"]), "msg": " ".join(e["msg"].removeprefix("Value error, ").split()),
                   "type": e["type"]} for e in errors]
        first = detail[0]
        return cls(first["loc"], first["msg"], status=400, kind=first["type"], detail=detail)

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.detail)


def error_body(error: str, detail: list[dict[str, Any]]) -> dict[str, Any]:
    return {"error": error, "detail": detail}


# -- images: nested lists or a base64 tensor -----------------------------------------------------------------------
class B64Tensor(BaseModel):
    """A compact, exact encoding of an image array (about 5x smaller and 10x faster to parse than nested lists)."""

    model_config = ConfigDict(extra="forbid")
    b64: str
    dtype: Literal["float16", "float32"]
    # at most rank 4 and 2**31 per axis: a long list of huge numbers made math.prod below run for minutes,
    # blocking the service's event loop
    shape: Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(max_length=4)]

    def to_array(self) -> np.ndarray:
        try:
            raw = base64.b64decode(self.b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("b64 is not valid base64") from None
        dtype = np.dtype(self.dtype).newbyteorder("<")
        expected = math.prod(self.shape) * dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"{len(raw)} bytes decoded from b64; expected {expected} for shape {self.shape} and dtype "
                             f"{self.dtype}")
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(np.float32)  # a writable copy


def to_image_array(value: Any) -> np.ndarray:
    """Convert a JSON ``images`` value to float32 ``(N, C, H, W)`` or ``(N, H, W)``; model-free checks only."""
    if isinstance(value, dict):
        arr = B64Tensor.model_validate(value).to_array()
    elif isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:
            raise ValueError(f"ragged nested lists; expected {IMAGES_EXPECTED}") from None
        if arr.size == 0 and arr.ndim >= 1 and arr.shape[0] == 0:
            raise ValueError("an empty batch; expected at least one cell")
        if arr.dtype.kind not in "iuf":
            what = ("non-numeric (null) or ragged values" if arr.dtype.kind == "O"
                    else f"values of numpy kind {arr.dtype.kind!r} (not numbers)")
            raise ValueError(f"{what}; expected {IMAGES_EXPECTED}")
    else:
        raise ValueError(f"got {type(value).__name__}; expected {IMAGES_EXPECTED}")
    if arr.ndim not in (3, 4):
        raise ValueError(f"rank {arr.ndim} (shape {list(arr.shape)}); expected rank 4 (N, C, H, W) or 3 (N, H, W)")
    if arr.shape[0] == 0:
        raise ValueError("an empty batch; expected at least one cell")
    arr = arr.astype(np.float32, copy=False)
    bad = bad_cells(arr)
    if len(bad):
        raise ValueError(f"{describe_cell(arr[bad[0]])} in cell(s) at position {bad[:5].tolist()}; expected "
                         f"{PIXEL_RANGE}")
    return arr


ImageArray = Annotated[
    Any,
    BeforeValidator(to_image_array),
    WithJsonSchema({
        "description": "Cell images: " + IMAGES_EXPECTED,
        "anyOf": [
            {"type": "array", "items": {"type": "array"}},
            B64Tensor.model_json_schema(),
        ],
    }),
]


class ScoreRequest(BaseModel):
    """POST /score body."""

    model_config = ConfigDict(extra="forbid")
    images: ImageArray
    cell_ids: list[int] | None = Field(
        None, description="one id per cell (default: the cells' positions in the request, 0..N-1)"
    )

    @field_validator("cell_ids")
    @classmethod
    def _ids_match(cls, ids: list[int] | None, info: ValidationInfo) -> list[int] | None:
        images = info.data.get("images")
        if ids is not None and images is not None:
            if len(ids) != len(images):
                raise ValueError(f"{len(ids)} cell ids for {len(images)} images; expected one id per image")
            if len(set(ids)) != len(ids):
                raise ValueError("cell ids are not unique; expected one distinct id per cell")
        return ids


# -- checks against the served model ---------------------------------------------------------------------------------
def check_count(n: int, max_cells: int, loc: str = "images") -> None:
    if n > max_cells:
        raise RequestError(loc, f"{n} cells in one request; expected at most {max_cells} (serve.max_cells_per_request)"
                           "; split the batch or upload a file to /score_file", status=413, kind="too_many_cells")


def check_dims(shape: tuple[int, ...], max_side: int, max_channels: int, loc: str = "images") -> None:
    """Image side and channel count within the service's limits (``serve.max_image_side`` / ``max_channels``)."""
    h, w = shape[-2:]
    c = shape[1] if len(shape) == 4 else 1
    if max(h, w) > max_side:
        raise RequestError(loc, f"images of {h}x{w} pixels; expected at most {max_side} a side (serve.max_image_side)",
                           status=413, kind="image_size")
    if c > max_channels:
        raise RequestError(loc, f"{c} channels; expected at most {max_channels} (serve.max_channels)", status=413,
                           kind="channels")


def select_channels(images: np.ndarray, channels: list[str], source_channels: list[str],
                    loc: str = "images") -> np.ndarray:
    """The model's channels from ``images`` given as exactly those channels or as the full stored stack."""
    if images.ndim == 3:
        if len(channels) != 1:
            raise RequestError(loc, f"rank 3 (N, H, W) is only accepted for a one-channel model; this model expects "
                               f"(N, C, H, W) with C = {len(channels)} ({', '.join(channels)})")
        images = images[:, None]
    c = images.shape[1]
    if c == len(channels):
        return images
    if c == len(source_channels):
        return images[:, [source_channels.index(name) for name in channels]]
    raise RequestError(loc, f"{c} channels; expected {len(channels)} ({', '.join(channels)}) or the full stack of "
                       f"{len(source_channels)} ({', '.join(source_channels)})", kind="channels")


def check_size(images: np.ndarray, image_size: int, resize: bool, loc: str = "images") -> None:
    problem = crop_size_problem(*images.shape[-2:], image_size, resize)
    if problem is not None:
        raise RequestError(loc, f"images are {problem}", kind="image_size")
