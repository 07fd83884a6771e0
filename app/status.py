"""Every status and categorical kind the service stores, serves or counts, in one place.

Pure: the standard library only. Each enum is a `StrEnum`, so a member is the very string it
stands for: stored in a `String` column, rendered in JSON, a metric label or a manifest, it is
byte-identical to the literal it replaces, and it compares equal to the plain string read
back from the database. A row's status is therefore written and compared with these members,
never with a string literal (tests/test_status_literals.py checks that).
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A labeling job (`jobs.status`)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VerdictStatus(StrEnum):
    """A verdict row, which is also a work item of its job's queue (`verdicts.status`)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ExportStatus(StrEnum):
    """An export, which is also its own work item (`exports.status`)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class ExportPartStatus(StrEnum):
    """A part of an export (a range of its trajectories), a work item of its own
    (`export_parts.status`)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class IngestStatus(StrEnum):
    """What an upload did with one trajectory: stored it, or found it already stored."""

    CREATED = "created"
    DUPLICATE = "duplicate"


# Jobs that still have work to hand out or wait for.
JOB_OPEN = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
# Jobs that will not change again (except by a retry of their failed items).
JOB_FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
# Verdicts a worker has yet to answer.
VERDICT_OPEN = frozenset({VerdictStatus.PENDING, VerdictStatus.RUNNING})
# Verdicts the critic answered or gave up on.
VERDICT_FINISHED = frozenset({VerdictStatus.DONE, VerdictStatus.FAILED})
# Exports not built yet.
EXPORT_OPEN = frozenset({ExportStatus.QUEUED, ExportStatus.RUNNING})
# Exports that will not change again.
EXPORT_FINISHED = frozenset({ExportStatus.COMPLETED, ExportStatus.FAILED})
# Parts of an export not built yet.
EXPORT_PART_OPEN = frozenset({ExportPartStatus.PENDING, ExportPartStatus.RUNNING})


class JobMode(StrEnum):
    """How a job asks the critic: a whole trajectory per call, or one step per call."""

    TRAJECTORY = "trajectory"
    STEP = "step"


class Delivery(StrEnum):
    """How a job's requests reach the critic: one call at a time as workers label (online), or
    as files through the OpenAI Batch API (batch: about half the price, done within 24 h)."""

    ONLINE = "online"
    BATCH = "batch"


class PromptVariant(StrEnum):
    """How the built-in prompt asks for each step's answer: the label and then the reason
    (label_first, the original), or the reason first, so that the label follows from it."""

    LABEL_FIRST = "label_first"
    REASON_FIRST = "reason_first"


class BatchStatus(StrEnum):
    """A batch of a job's requests at the provider (`job_batches.status`): the OpenAI Batch
    API's own statuses, and `submitting` while srft has written the batch's row and claimed its
    steps but not yet seen the provider accept it."""

    SUBMITTING = "submitting"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# Batches the provider has finished with: their output and error files are final.
BATCH_ENDED = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class ErrorKind(StrEnum):
    """Why a critic call failed, as `app.critic.client` and `app.critic.judge` classify it;
    stored on a failed verdict (`verdicts.error_kind`) and counted by /metrics."""

    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx, or an answer that is not JSON
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    REJECTED = "rejected"  # 4xx other than 429
    # A 400 saying the prompt is longer than the model's context; the judge re-plans the
    # trajectory's windows with a smaller budget, so it is stored only once re-plans run out.
    CONTEXT_EXCEEDED = "context_exceeded"
    UNPARSEABLE = "unparseable"  # answers that did not parse, every attempt
    MISSING = "missing"  # answers that parsed but named no verdict for the step


class LabelSource(StrEnum):
    """Where the label a masking policy read for a step came from."""

    CRITIC = "critic"
    HUMAN = "human"
    NONE = "none"  # no label
    POLICY = "policy"  # a decision only: the policy did not consult labels for the step


class TrainingOutcome(StrEnum):
    """What a masking policy does with a step: trains it, masks it (in the row, no loss), or
    cuts it (ends the row before it)."""

    TRAINED = "trained"
    MASKED = "masked"
    CUT = "cut"
