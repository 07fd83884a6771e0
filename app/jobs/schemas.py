"""Request and response bodies of the labeling-job API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import Id, Name, RequestModel
from app.status import ErrorKind, JobMode, JobStatus, VerdictStatus


class Selection(RequestModel):
    """Either explicit ids, or a filter over the project's trajectories."""

    trajectory_ids: list[Id] | None = Field(default=None, max_length=100_000)
    resolved: bool | None = None
    source_format: Name | None = None
    task_id: str | None = Field(default=None, max_length=1000)


class CriticOptions(RequestModel):
    # JSON has no enums: the mode arrives as a string, which strict mode would refuse.
    mode: Annotated[JobMode, Field(strict=False)] = JobMode.TRAJECTORY
    model: Name | None = Field(default=None, description="Defaults to SRFT_CRITIC_MODEL.")
    votes: int = Field(default=1, ge=1, le=15)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    labels: dict[Name, str] | None = Field(
        default=None,
        max_length=64,
        description="Label name -> definition; defaults to the four SRFT labels.",
    )


class JobCreate(RequestModel):
    selection: Selection
    critic: CriticOptions = Field(default_factory=CriticOptions)
    scope: Literal["unresolved", "all"] = "unresolved"
    cache: bool = True


class Counts(BaseModel):
    total: int
    done: int
    failed: int
    pending: int
    cached: int


class Preparation(BaseModel):
    """How far a worker has got writing the job's verdict rows (done in batches after the
    request; steps not written yet count as pending)."""

    complete: bool
    trajectories: int
    steps: int


class JobCounts(BaseModel):
    trajectories: Counts
    steps: Counts


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class CriticOut(BaseModel):
    mode: JobMode
    model: str
    votes: int
    temperature: float
    labels: dict[str, str]


class JobOut(BaseModel):
    id: uuid.UUID
    status: JobStatus
    critic: CriticOut
    prompt_hash: str
    scope: str
    cache: bool
    selection: dict[str, object]
    preparation: Preparation
    counts: JobCounts
    labels: dict[str, int] = Field(description="How many steps got each label so far.")
    usage: Usage
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    eta_s: float | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class VerdictOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    job_id: uuid.UUID
    trajectory_id: uuid.UUID
    step_index: int
    status: VerdictStatus
    label: str | None
    reason: str | None
    agreement: float | None
    vote_labels: list[str] | None
    cached: bool
    critic_model: str
    prompt_hash: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_ms: float | None
    attempts: int
    error: str | None
    error_kind: ErrorKind | None = Field(description="Why the critic call failed, with `error`.")


class VerdictPage(BaseModel):
    items: list[VerdictOut]
    next_cursor: str | None
