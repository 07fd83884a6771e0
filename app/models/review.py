"""Human labels: a reviewer's label for one step, kept apart from critic verdicts.

One per step (the latest review wins); exports prefer it over any critic verdict, and critic
evaluations compare against it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, utcnow
from app.models.job import AutoId


class HumanLabel(Base):
    __tablename__ = "human_labels"
    __table_args__ = (
        UniqueConstraint("trajectory_id", "step_index"),
        Index(None, "project_id", "updated_at"),
        # Gold-set exports page a project's labels by id.
        Index(None, "project_id", "id"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    trajectory_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE")
    )
    step_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
