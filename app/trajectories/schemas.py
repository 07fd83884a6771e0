"""Request and response bodies of the trajectory API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import RequestModel
from app.status import ErrorKind, IngestStatus, VerdictStatus


class IngestedTrajectory(BaseModel):
    id: uuid.UUID
    status: IngestStatus
    source_format: str
    num_steps: int
    resolved: bool | None


class IngestOut(BaseModel):
    created: int
    duplicates: int
    trajectories: list[IngestedTrajectory]


class StepVerdict(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    job_id: uuid.UUID
    status: VerdictStatus
    label: str | None
    reason: str | None
    agreement: float | None
    cached: bool
    critic_model: str
    prompt_hash: str
    error: str | None
    error_kind: ErrorKind | None = Field(description="Why the critic call failed, with `error`.")


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    message_index: int
    observation_indices: list[int] = Field(
        description="Messages that answer this step (its tool results or observations)."
    )
    action: str | None = Field(description="A readable form of the step's tool call(s).")
    tool_names: list[str]
    verdicts: list[StepVerdict] = Field(default_factory=list)
    human_label: StepHumanLabel | None = Field(
        default=None, description="A reviewer's label, which exports prefer to verdicts."
    )


class StepHumanLabel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    label: str
    note: str | None
    author: str
    updated_at: datetime


class TrajectorySummaryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    source_format: str
    task_id: str | None
    resolved: bool | None
    num_steps: int
    upload_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class TrajectoryOut(TrajectorySummaryOut):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    metadata: dict[str, Any] = Field(validation_alias="meta")
    steps: list[StepOut]


class TrajectoryPage(BaseModel):
    items: list[TrajectorySummaryOut]
    next_cursor: str | None


_MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
        "name": {"type": "string"},
    },
}
_CANONICAL_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "messages": {"type": "array", "items": _MESSAGE_SCHEMA},
        "tools": {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
        "resolved": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "task_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "instance_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "metadata": {"anyOf": [{"type": "object"}, {"type": "null"}]},
    },
}
# The upload body as OpenAPI describes it. Only canonical items are spelled out: the other
# formats are files as agents wrote them (any JSON value, or JSON Lines), detected on upload.
UPLOAD_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    _CANONICAL_ITEM_SCHEMA,
                    {"type": "array", "items": _CANONICAL_ITEM_SCHEMA},
                    {"description": "a trajectory file in any supported format"},
                ]
            }
        },
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one run (any format) per line"}
        },
        "application/vnd.apache.parquet": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "dataset rows (Hugging Face Hub shards), one run per row",
            }
        },
    },
}


class TrajectoryPatch(RequestModel):
    resolved: bool | None = Field(
        description="true or false from an evaluation report, or null when unknown."
    )
