"""Response schemas of the HTTP service (for ``/docs.json``; responses are serialised directly, not validated)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from training.uncertainty.decompose import FIELD_DESCRIPTIONS


class ModelRef(BaseModel):
    name: str | None = Field(None, description="registered model name (or the ensemble directory's name)")
    version: int | None = Field(None, description="registry version (None for a local directory)")


class CellScore(BaseModel):
    cell_id: int = Field(description="the cell's id (from the request / file; else its position)")
    probabilities: dict[str, float] = Field(description=FIELD_DESCRIPTIONS["probabilities"])
    predicted_class: str = Field(description=FIELD_DESCRIPTIONS["predicted_class"])
    confidence: float = Field(description=FIELD_DESCRIPTIONS["confidence"])
    entropy: float = Field(description=FIELD_DESCRIPTIONS["entropy"])
    aleatoric: float = Field(description=FIELD_DESCRIPTIONS["aleatoric"])
    epistemic: float = Field(description=FIELD_DESCRIPTIONS["epistemic"])
    novelty: float | None = Field(description=FIELD_DESCRIPTIONS["novelty"] + " null when the model has none.")


class ScoreResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    cells: list[CellScore]
    error: dict | None = Field(None, description="/score_file only: set when a later chunk of a streamed file "
                               "failed (the cells before it are valid); absent otherwise")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx body: one line, and the offending fields."""

    error: str = Field(description="one line: the field and what was expected")
    detail: list[ErrorDetail] = Field(default_factory=list, description="one entry per offending field")
