"""Request and response bodies of the review API."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import RequestModel


class HumanLabelPut(RequestModel):
    label: str = Field(min_length=1, max_length=64)
    note: str | None = Field(default=None, max_length=10_000)


class HumanLabelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    trajectory_id: uuid.UUID
    step_index: int
    label: str
    note: str | None
    author: str
    created_at: datetime
    updated_at: datetime


# An import answer names at most this many unmatched lines (it counts them all).
MAX_UNMATCHED_LINES = 100


class GoldImportOut(BaseModel):
    imported: int
    updated: int
    unchanged: int
    unmatched: int
    unmatched_lines: list[int]
