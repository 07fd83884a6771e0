"""Exports: an immutable, checksummed set of training shards built from verdicts.

The row is also the export's work item: `queued` until a worker claims it (`running`, with a
claim token and a heartbeat in `claimed_at`), then `completed` (files published, manifest
stored) or `failed` (a reason, no files). A claim whose heartbeat stops is taken over.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JsonColumn, new_id, utcnow


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (
        Index(None, "project_id", "created_at"),
        # Pages of a project's exports run newest first by (time-ordered) id.
        Index(None, "project_id", "id"),
        Index(None, "status", "claimed_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    # The whole request, normalised: what the export is a pure function of (with the data).
    config: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    job_ids: Mapped[list[str]] = mapped_column(JsonColumn)
    total_trajectories: Mapped[int] = mapped_column(Integer, default=0)
    done_trajectories: Mapped[int] = mapped_column(Integer, default=0)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    error_details: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ExportPart(Base):
    """A range of an export's trajectories, built by any worker into files of its own under
    the export's building folder (`app.exports.parts`). A work item like the export: `pending`
    until claimed (`running`, claim token, heartbeat in `claimed_at`), then `done` (its files
    named by `output`) or `failed` (the export failed)."""

    __tablename__ = "export_parts"
    __table_args__ = (
        UniqueConstraint("export_id", "index"),
        Index(None, "status", "claimed_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    export_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # Its trajectories: `count` of them from position `start` of the export's order, the
    # first and last of which are `first_id` and `last_id`.
    start: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    first_id: Mapped[uuid.UUID]
    last_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(16))
    done_trajectories: Mapped[int] = mapped_column(Integer, default=0)
    # The folder (under the export's building folder) its finished files are in.
    output: Mapped[str | None] = mapped_column(String(64), default=None)
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
