"""Uploads (original bytes, compressed), trajectories (canonical messages) and their steps."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, JsonColumn, new_id, utcnow


class Upload(Base):
    """One uploaded body, byte-for-byte, so a better importer can re-read it later."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("project_id", "sha256"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    compression: Mapped[str] = mapped_column(String(16))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    content_type: Mapped[str | None] = mapped_column(String(200))
    filename: Mapped[str | None] = mapped_column(String(500))
    source_format: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Trajectory(Base):
    __tablename__ = "trajectories"
    __table_args__ = (
        UniqueConstraint("project_id", "content_hash"),
        # The trajectory list pages newest first (by id) within a project, each filter too.
        Index(None, "project_id", "id"),
        Index(None, "project_id", "resolved", "id"),
        Index(None, "project_id", "source_format", "id"),
        Index(None, "project_id", "task_id", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    upload_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("uploads.id", ondelete="SET NULL"), index=True
    )
    # sha256 of the canonical messages and tools: the same run uploaded twice is one row.
    content_hash: Mapped[str] = mapped_column(String(64))
    source_format: Mapped[str] = mapped_column(String(40))
    task_id: Mapped[str | None] = mapped_column(String(500))
    resolved: Mapped[bool | None] = mapped_column(default=None)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JsonColumn)
    tools: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonColumn)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JsonColumn)
    num_steps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    steps: Mapped[list[Step]] = relationship(
        order_by="Step.index", cascade="all, delete-orphan", passive_deletes=True
    )


class Step(Base):
    """One assistant message of a trajectory and the messages that answer it."""

    __tablename__ = "steps"

    trajectory_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_index: Mapped[int] = mapped_column(Integer)
    observation_indices: Mapped[list[int]] = mapped_column(JsonColumn)
    action: Mapped[str | None] = mapped_column(Text)
    tool_names: Mapped[list[str]] = mapped_column(JsonColumn)
