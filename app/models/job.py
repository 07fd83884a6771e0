"""Labeling jobs and their verdicts: one verdict row per (job, trajectory, step).

The verdict rows are also the job's work queue: a row is `pending` until a worker claims it
(`running`, with a claim token and time), then `done` or `failed`. The unique key makes a
verdict impossible to duplicate; the claim token makes a late answer from a worker whose claim
was taken over (after it died or stalled) impossible to apply twice.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JsonColumn, new_id, utcnow

# SQLite only auto-increments an INTEGER PRIMARY KEY.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class Job(Base):
    __tablename__ = "jobs"
    # Pages of a project's jobs run newest first by (time-ordered) id.
    __table_args__ = (Index(None, "project_id", "created_at"), Index(None, "project_id", "id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    critic_model: Mapped[str] = mapped_column(String(200))
    votes: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    # Ordered [[name, definition], ...]: the label set is part of what the critic is asked.
    labels: Mapped[list[list[str]]] = mapped_column(JsonColumn)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    # The critic options that have no column of their own (`app.jobs.schemas.CriticOptions`:
    # delivery, endpoint options, prompt and examples), as the request gave them.
    critic_options: Mapped[dict[str, Any]] = mapped_column(
        JsonColumn, default=dict, server_default="{}"
    )
    scope: Mapped[str] = mapped_column(String(16))
    use_cache: Mapped[bool] = mapped_column(Boolean)
    selection: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    total_trajectories: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    # Preparation: a worker writes the verdict rows in batches of trajectories, in id order,
    # after the request that created the job (`app.jobs.service.prepare_batch`). The cursor is
    # the last trajectory prepared; `prepared_at` is set once every row exists.
    prepared_trajectories: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prepared_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    prepare_cursor: Mapped[uuid.UUID | None] = mapped_column(default=None)
    prepared_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Verdict(Base):
    __tablename__ = "verdicts"
    __table_args__ = (
        UniqueConstraint("job_id", "trajectory_id", "step_index"),
        Index(None, "job_id", "status"),
        # A job's verdict pages run in id order within the job.
        Index(None, "job_id", "id"),
        Index(None, "project_id", "cache_key"),
        Index(None, "trajectory_id", "step_index"),
        Index(None, "status", "claimed_at"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    trajectory_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE")
    )
    step_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    # Same critic model, prompt, mode, votes, temperature, trajectory content and step.
    cache_key: Mapped[str] = mapped_column(String(64))
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    label: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    agreement: Mapped[float | None] = mapped_column(Float)
    vote_labels: Mapped[list[str] | None] = mapped_column(JsonColumn)
    critic_model: Mapped[str] = mapped_column(String(200))
    prompt_hash: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Tokens a reasoning model spent thinking (part of completion_tokens).
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # What the server reported of its configuration (`system_fingerprint`), if anything.
    system_fingerprint: Mapped[str | None] = mapped_column(String(128), default=None)
    # An `app.status.Delivery`: how the answer came (NULL for cache copies and old rows).
    delivery: Mapped[str | None] = mapped_column(String(8), default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # An `app.status.ErrorKind` with `error`: what /metrics counts failed verdicts by.
    error_kind: Mapped[str | None] = mapped_column(String(32))
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobTrajectory(Base):
    """A trajectory in a job, with its steps' progress: the job's page of trajectories reads
    these instead of grouping verdicts, and the write that finishes its last step learns so
    from the counts this row returns (its lock orders the writers), which makes the job's
    trajectory counts exact."""

    __tablename__ = "job_trajectories"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    trajectory_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    steps: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cached: Mapped[int] = mapped_column(Integer, default=0)


class JobTally(Base):
    """A job's running totals (`app.jobs.tallies`), kept by the writes that change them, so
    that reading a job's progress, histogram and usage costs the same at any size. Each name
    is spread over a few slots that writers pick at random, so that concurrent writers of one
    job seldom wait on the same row; a reader sums the slots."""

    __tablename__ = "job_tallies"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class JobBatch(Base):
    """One batch of a batch-delivery job's requests at the provider (the OpenAI Batch API).

    Its row is written, with status `submitting`, in the transaction that claims its steps
    under `claim_token`: the claim lives as long as the batch (the sweeper never hands those
    steps on while the batch is not collected), and a submission cut short is found again at
    the provider by the row's id in the batch's `metadata` (`app.jobs.batches`), so a restart
    never pays for a batch twice."""

    __tablename__ = "job_batches"
    __table_args__ = (Index(None, "job_id", "created_at"), Index(None, "collected_at", "polled_at"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # 1 for a job's first batches; a follow-up batch of failed or expired requests is one more.
    round: Mapped[int] = mapped_column(Integer, default=1)
    # An `app.status.BatchStatus`.
    status: Mapped[str] = mapped_column(String(16))
    claim_token: Mapped[str] = mapped_column(String(36), unique=True)
    remote_id: Mapped[str | None] = mapped_column(String(128), default=None)
    input_file_id: Mapped[str | None] = mapped_column(String(128), default=None)
    output_file_id: Mapped[str | None] = mapped_column(String(128), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(128), default=None)
    requests_total: Mapped[int] = mapped_column(Integer, default=0)
    requests_completed: Mapped[int] = mapped_column(Integer, default=0)
    requests_failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # Whether its lines ask for a `response_format` (the job's option), false from the round
    # after a batch whose lines the provider refused for it.
    structured: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(default=None)
    polled_at: Mapped[datetime | None] = mapped_column(default=None)
    # Set once its answers are recorded (or the batch is given up): the batch is no longer live.
    collected_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
