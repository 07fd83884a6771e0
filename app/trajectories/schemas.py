"""Request and response bodies of the trajectory API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class IngestedTrajectory(BaseModel):
    id: uuid.UUID
    status: Literal["created", "duplicate"]
    source_format: str
    num_steps: int
    resolved: bool | None


class IngestResponse(BaseModel):
    created: int
    duplicates: int
    trajectories: list[IngestedTrajectory]


class StepVerdict(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    job_id: uuid.UUID
    status: str
    label: str | None
    reason: str | None
    agreement: float | None
    cached: bool
    critic_model: str
    prompt_hash: str
    error: str | None


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
    human_label: HumanLabelView | None = Field(
        default=None, description="A reviewer's label, which exports prefer to verdicts."
    )


class HumanLabelView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    label: str
    note: str | None
    author: str
    updated_at: datetime


class TrajectorySummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    source_format: str
    task_id: str | None
    resolved: bool | None
    num_steps: int
    upload_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class TrajectoryOut(TrajectorySummary):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    metadata: dict[str, Any] = Field(validation_alias="meta")
    steps: list[StepOut]


class TrajectoryPage(BaseModel):
    items: list[TrajectorySummary]
    next_cursor: str | None


class TrajectoryPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolved: bool | None = Field(
        description="true or false from an evaluation report, or null when unknown."
    )
