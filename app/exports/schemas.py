"""Request and response bodies of the export API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from app.exports import formats as export_formats
from app.jobs.schemas import Selection
from app.recipe.masking import DEFAULT_MASK_LABELS, Policy, Unlabeled
from app.schemas import MAX_INT64, MIN_INT64, Id, Name, RequestModel
from app.status import ExportStatus

PolicyName = Policy
if TYPE_CHECKING:
    FormatName = str
else:
    # The registered formats, in their order: the API accepts (and its schema lists) exactly
    # the names the builder can build.
    FormatName = Literal[export_formats.NAMES]
GiB = 1024**3


class ExportOptions(RequestModel):
    mask_labels: list[Name] = Field(
        default_factory=lambda: list(DEFAULT_MASK_LABELS),
        max_length=64,
        description="Labels whose steps get no loss.",
    )
    critique_resolved: bool = Field(
        default=False, description="Apply verdicts to resolved trajectories too."
    )
    unlabeled: Unlabeled = Field(
        default="mask", description="Steps with no verdict: mask them, train them, or drop the run."
    )
    soft: bool = Field(
        default=False,
        description="Weight = share of votes that did not pick a masked label "
        "(tokenized_parquet only: a `loss_weights` column).",
    )
    min_trained_steps: int = Field(default=1, ge=0, le=1_000_000)


class ExportCreate(RequestModel):
    job_ids: list[Id] = Field(min_length=1, max_length=100)
    policy: PolicyName = "srft"
    options: ExportOptions = Field(default_factory=ExportOptions)
    format: FormatName = "openai_jsonl"
    tokenizer: str | None = Field(
        default=None,
        max_length=1000,
        description="Hub id of the target model's tokenizer, or its path under a directory of "
        "SRFT_TOKENIZER_DIRS: renders tokenized_parquet rows; measures openai_jsonl(_raw) rows "
        "for max_seq_len.",
    )
    tokenizer_revision: Name | None = None
    max_seq_len: int | None = Field(
        default=None,
        ge=16,
        le=4_194_304,
        description="Longest row in tokens (tokenized_parquet; openai_jsonl(_raw) with tokenizer).",
    )
    overflow: Literal["truncate", "drop", "split"] = Field(
        default="truncate",
        description="Rows over max_seq_len: cut (rows of messages: at the last step boundary "
        "that fits), drop, or split at step boundaries repeating the task.",
    )
    strict: bool = Field(
        default=False,
        description="Fail the export on a row whose task prefix alone is longer than "
        "max_seq_len. Off: such rows are dropped, counted in the manifest's "
        "counts.rows.dropped.prefix_too_long and listed in counts.rows.dropped_trajectories.",
    )
    seed: int | None = Field(
        default=0,
        ge=MIN_INT64,
        le=MAX_INT64,
        description="Row order: shuffled with this seed; null keeps id order.",
    )
    selection: Selection | None = Field(
        default=None,
        description="Which trajectories; defaults to those the jobs selected (any resolution).",
    )
    shard_max_rows: int = Field(default=50_000, ge=1, le=1_000_000_000)
    shard_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024, le=64 * GiB)


class Progress(BaseModel):
    trajectories_total: int
    trajectories_done: int


class ExportError(BaseModel):
    code: str | None
    message: str
    details: dict[str, Any] | None = None


class ExportOut(BaseModel):
    id: uuid.UUID
    status: ExportStatus
    policy: str
    format: str
    job_ids: list[str]
    config: dict[str, Any]
    progress: Progress
    manifest: dict[str, Any] | None
    size_bytes: int | None = Field(
        description="Bytes of its files (shards and manifest.json) once completed; null before, "
        "and for a failed export, which has no files."
    )
    error: ExportError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExportPage(BaseModel):
    items: list[ExportOut]
    next_cursor: str | None
