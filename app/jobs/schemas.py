"""Request and response bodies of the labeling-job API."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.critic.prompt import MAX_EXAMPLES, MAX_TEMPLATE_CHARS
from app.schemas import Id, Name, RequestModel
from app.status import (
    BatchStatus,
    Delivery,
    ErrorKind,
    JobMode,
    JobStatus,
    PromptVariant,
    VerdictStatus,
)


class Selection(RequestModel):
    """Either explicit ids, or a filter over the project's trajectories."""

    trajectory_ids: list[Id] | None = Field(default=None, max_length=100_000)
    resolved: bool | None = None
    source_format: Name | None = None
    task_id: str | None = Field(default=None, max_length=1000)


Template = Annotated[str, Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)]


class PromptTemplate(RequestModel):
    """A job's own prompt: each part a format string with the placeholders the built-in one
    uses (checked at POST /v1/jobs); a part left out is the built-in one of the variant."""

    system: Template | None = Field(
        default=None, description="The system message; needs {labels} (the definitions)."
    )
    instructions: Template | None = Field(
        default=None,
        description="Trajectory mode: what to label and how to answer, inside the "
        "<instructions> fence srft writes; needs {what} or {targets}, and {context}; may use "
        "{names}.",
    )
    step_question: Template | None = Field(
        default=None,
        description="Step mode: the question, inside the <question> fence srft writes; needs "
        "{index}; may use {names}.",
    )
    variant: Annotated[PromptVariant, Field(strict=False)] = Field(
        default=PromptVariant.LABEL_FIRST,
        description="`reason_first`: the built-in instructions and the answer's JSON schema "
        "ask for the reason before the label.",
    )


class FewShotExample(RequestModel):
    """A human-labeled step as the job keeps it for its prompts (set by srft)."""

    human_label_id: int = Field(ge=1)
    trajectory_id: str = Field(max_length=36)
    step_index: int = Field(ge=0)
    label: Name
    action: str = Field(max_length=4 * MAX_TEMPLATE_CHARS)
    observation: str | None = Field(default=None, max_length=4 * MAX_TEMPLATE_CHARS)
    reason: str | None = Field(default=None, max_length=4 * MAX_TEMPLATE_CHARS)
    source: str = Field(max_length=64)


class FewShot(RequestModel):
    from_human_labels: int = Field(
        ge=1,
        le=MAX_EXAMPLES,
        description="Show up to this many human-labeled steps of the project as worked "
        "examples, balanced over the job's labels, never from the trajectory judged.",
    )
    chosen: list[FewShotExample] | None = Field(
        default=None,
        max_length=2 * MAX_EXAMPLES,
        description="Set by srft when the job is created (refused in a request).",
    )


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
    # Options without a column of their own, kept in `jobs.critic_options` (OPTION_FIELDS).
    delivery: Annotated[Delivery, Field(strict=False)] = Field(
        default=Delivery.ONLINE,
        description="`online`: calls as workers label. `batch`: the OpenAI Batch API (files "
        "of requests, about half the price, answered within 24 h).",
    )
    online_fallback: bool = Field(
        default=False,
        description="Batch delivery: ask again online, instead of in a follow-up batch, for "
        "the requests a batch failed or left unanswered (expired).",
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="Which field bounds the answer: `max_completion_tokens` for OpenAI "
        "reasoning models, `max_tokens` for most servers.",
    )
    max_answer_tokens: int | None = Field(
        default=None, ge=16, le=1_000_000, description="Defaults to SRFT_CRITIC_MAX_ANSWER_TOKENS."
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    extra_body: dict[str, Any] | None = Field(
        default=None,
        description="Fields added to every request body, for server-specific knobs "
        "(`chat_template_kwargs`, `top_k`, ...); at most EXTRA_BODY_BYTES of JSON, and none "
        "of the fields srft sets itself.",
    )
    structured_output: Literal["auto", "off"] = Field(
        default="auto",
        description="`auto`: ask for a JSON schema (`response_format`) and fall back to the "
        "prompt alone where the endpoint refuses it. `off`: never send `response_format`.",
    )
    tokenizer: Name | None = Field(
        default=None,
        description="The critic model's tokenizer (a Hugging Face hub id or a local path) "
        "to measure prompts with; defaults to SRFT_CRITIC_TOKENIZER, else an estimate.",
    )
    context_tokens: int | None = Field(
        default=None,
        ge=1024,
        le=10_000_000,
        description="The critic's context window; defaults to SRFT_CRITIC_CONTEXT_TOKENS.",
    )

    prompt: PromptTemplate | None = Field(
        default=None, description="The job's own prompt templates or prompt variant."
    )
    examples: FewShot | None = Field(default=None, description="Few-shot critic prompts.")

    @field_validator("extra_body")
    @classmethod
    def _bounded_extra_body(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        taken = sorted(set(value) & RESERVED_BODY_FIELDS)
        if taken:
            raise ValueError(
                f"extra_body may not set {', '.join(taken)}: srft sets "
                f"{', '.join(sorted(RESERVED_BODY_FIELDS))} itself"
            )
        size = len(json.dumps(value, ensure_ascii=False).encode())
        if size > EXTRA_BODY_BYTES:
            raise ValueError(f"extra_body is {size} bytes of JSON; at most {EXTRA_BODY_BYTES}")
        return value


# The request-body fields srft sets itself, which `extra_body` may not override.
RESERVED_BODY_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "response_format",
        "seed",
        "stream",
        "n",
    }
)
EXTRA_BODY_BYTES = 16_384
# The CriticOptions kept in `jobs.critic_options` rather than in columns of their own.
OPTION_FIELDS = frozenset(CriticOptions.model_fields) - {
    "mode",
    "model",
    "votes",
    "temperature",
    "labels",
}


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
    reasoning_tokens: int = Field(
        description="Tokens a reasoning model spent thinking (part of completion_tokens)."
    )


class CriticOut(BaseModel):
    mode: JobMode
    model: str
    votes: int
    temperature: float
    labels: dict[str, str]
    delivery: Delivery
    options: dict[str, Any] = Field(
        description="The other critic options the job was created with (those not at their "
        "defaults)."
    )


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    """One batch of a batch-delivery job's requests at the provider."""

    id: uuid.UUID
    remote_id: str | None = Field(description="The provider's batch id (None while submitting).")
    status: BatchStatus
    round: int = Field(description="1, or the follow-up round of failed or expired requests.")
    request_counts: RequestCounts
    error: str | None
    created_at: datetime
    collected_at: datetime | None


class BatchProgress(BaseModel):
    batches: int
    live: int = Field(description="Batches not collected yet.")
    requests: RequestCounts


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
    batches: list[Batch] = Field(
        default_factory=list,
        description="Batch delivery: the job's batches, newest first (at most BATCHES_SHOWN).",
    )
    batch_progress: BatchProgress | None = Field(
        default=None, description="Batch delivery: the job's progress through its batches."
    )


# A job's batches shown by `GET /v1/jobs/{id}` (a job has at most a few hundred).
BATCHES_SHOWN = 100


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
    reasoning_tokens: int
    system_fingerprint: str | None = Field(
        description="What the critic's server reported of its configuration, if anything."
    )
    delivery: Delivery | None = Field(
        description="How the answer came: `online` or `batch` (null for a copy from the cache)."
    )
    latency_ms: float | None
    attempts: int
    error: str | None
    error_kind: ErrorKind | None = Field(description="Why the critic call failed, with `error`.")


class VerdictPage(BaseModel):
    items: list[VerdictOut]
    next_cursor: str | None
