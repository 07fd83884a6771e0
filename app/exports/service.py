"""Exports: validate a request, own its row's life cycle, and read what the builder needs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, NotFound, SrftError
from app.exports import schemas
from app.exports.tokenize import (
    INVALID_REVISION,
    INVALID_TOKENIZER,
    revision_allowed,
    roots_as_written,
    tokenizer_allowed,
)
from app.jobs.schemas import Selection
from app.models import Export, Job, Step, Trajectory, Verdict, utcnow
from app.recipe.masking import StepLabel
from app.review import service as review_service

TERMINAL = ("completed", "failed")
JOB_FINISHED = ("completed", "failed", "cancelled")


class InvalidExport(SrftError):
    status_code = 422
    code = "invalid_export"


# ---------------------------------------------------------------------- creation


def create_export(
    session: Session, project_id: uuid.UUID, body: schemas.ExportCreate, settings: Settings
) -> Export:
    """Check the request against the jobs it names and write the export, queued."""
    jobs = _jobs(session, project_id, body.job_ids)
    _check_format(body)
    _check_tokenizer(body, settings)
    _check_mask_labels(body, jobs)
    if body.selection is not None and body.selection.trajectory_ids is not None:
        _check_trajectories(session, project_id, body.selection.trajectory_ids)
    config = body.model_dump(mode="json")
    export = Export(
        project_id=project_id,
        status="queued",
        policy=body.policy,
        format=body.format,
        config=config,
        job_ids=[str(j) for j in body.job_ids],
        total_trajectories=0,
        done_trajectories=0,
        enqueued_at=utcnow(),
    )
    session.add(export)
    session.flush()
    return export


def _jobs(session: Session, project_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> list[Job]:
    if len(set(ids)) != len(ids):
        raise InvalidExport("job_ids lists a job twice", location="job_ids", code="duplicate_jobs")
    found = {
        job.id: job
        for job in session.scalars(
            select(Job).where(Job.project_id == project_id, Job.id.in_(list(ids)))
        )
    }
    unknown = [str(i) for i in ids if i not in found]
    if unknown:
        raise InvalidExport(
            f"{len(unknown)} job ids are not in this project: {', '.join(unknown[:20])}",
            location="job_ids",
            code="unknown_jobs",
            details={"unknown": unknown},
        )
    unfinished = [found[i] for i in ids if found[i].status not in JOB_FINISHED]
    if unfinished:
        shown = ", ".join(f"{j.id} ({j.status})" for j in unfinished[:20])
        raise Conflict(
            f"{len(unfinished)} jobs have not finished: {shown}; export when they have (or "
            "cancel them to export what they labeled so far)",
            location="job_ids",
            code="job_not_finished",
            details={"unfinished": [str(j.id) for j in unfinished]},
        )
    return [found[i] for i in ids]


def _check_format(body: schemas.ExportCreate) -> None:
    tokenized = body.format == "tokenized_parquet"
    if tokenized and not body.tokenizer:
        raise InvalidExport(
            "tokenized_parquet needs `tokenizer`: the Hub id of the target model's tokenizer "
            "(or its path inside SRFT_TOKENIZER_DIRS), whose chat template renders the rows",
            location="tokenizer",
        )
    if body.format in schemas.MESSAGE_FORMATS:
        # A tokenizer only measures rows of messages: one without the other does nothing.
        if body.max_seq_len is not None and body.tokenizer is None:
            raise InvalidExport(
                f"`max_seq_len` for {body.format} needs `tokenizer`: rows are measured in the "
                "tokens of the target model's chat template",
                location="max_seq_len",
            )
        if body.tokenizer is not None and body.max_seq_len is None:
            raise InvalidExport(
                f"`tokenizer` measures {body.format} rows against `max_seq_len`; give "
                "max_seq_len too (the trainer tokenizes the rows)",
                location="tokenizer",
            )
    elif not tokenized:
        for name in ("tokenizer", "max_seq_len"):
            if getattr(body, name) is not None:
                raise InvalidExport(
                    f"`{name}` does not apply to {body.format}: its rows are text, tokenized "
                    "by the trainer",
                    location=name,
                )
    if not tokenized and body.options.soft:
        raise InvalidExport(
            f"soft weights need a format that takes floats: {body.format} takes 0/1 "
            "(use tokenized_parquet, whose rows get a `loss_weights` column)",
            location="options.soft",
        )


def _check_tokenizer(body: schemas.ExportCreate, settings: Settings) -> None:
    """A Hub id or a path inside SRFT_TOKENIZER_DIRS, judged on the text alone: the refusal
    is the same whatever exists on the server (the worker checks again, symlinks resolved)."""
    roots = [*settings.tokenizer_roots, *roots_as_written(settings.tokenizer_dirs)]
    if body.tokenizer is not None and not tokenizer_allowed(body.tokenizer, roots):
        raise InvalidExport(INVALID_TOKENIZER, location="tokenizer", code="invalid_tokenizer")
    revision = body.tokenizer_revision
    if revision is not None and not revision_allowed(revision):
        raise InvalidExport(
            INVALID_REVISION, location="tokenizer_revision", code="invalid_tokenizer"
        )


def _check_mask_labels(body: schemas.ExportCreate, jobs: Sequence[Job]) -> None:
    known = {name for job in jobs for name, _ in job.labels}
    unknown = sorted(set(body.options.mask_labels) - known)
    if unknown:
        raise InvalidExport(
            f"mask_labels {unknown} are not labels of these jobs (their labels: {sorted(known)})",
            location="options.mask_labels",
            code="unknown_labels",
        )


def _check_trajectories(session: Session, project_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> None:
    if not ids:
        raise InvalidExport(
            "selection.trajectory_ids is empty", location="selection.trajectory_ids"
        )
    found: set[uuid.UUID] = set()
    wanted = list(set(ids))
    for start in range(0, len(wanted), 1000):
        found.update(
            session.scalars(
                select(Trajectory.id).where(
                    Trajectory.project_id == project_id,
                    Trajectory.id.in_(wanted[start : start + 1000]),
                )
            )
        )
    unknown = sorted(str(i) for i in set(ids) - found)
    if unknown:
        raise InvalidExport(
            f"{len(unknown)} trajectory ids are not in this project: {', '.join(unknown[:20])}",
            location="selection.trajectory_ids",
            code="unknown_trajectories",
            details={"unknown": unknown[:1000]},
        )


# ---------------------------------------------------------------------- life cycle


def claim(
    session: Session, export_id: uuid.UUID, stale_after_s: float, *, token: str | None = None
) -> str | None:
    """Take the export for building under `token` (a fresh one if None) and return the token;
    None if it is finished or another worker is on it.

    An export still running under `token` itself is taken back at once: a build that lost
    the database starts over when its task retries, instead of waiting for its claim to go
    stale. A token belongs to one task and its retries, which never run at the same time.
    """
    now = utcnow()
    token = token or str(uuid.uuid4())
    stale = now - timedelta(seconds=stale_after_s)
    result = session.execute(
        update(Export)
        .where(
            Export.id == export_id,
            or_(
                Export.status == "queued",
                and_(
                    Export.status == "running",
                    or_(Export.claimed_at < stale, Export.claim_token == token),
                ),
            ),
        )
        .values(
            status="running",
            claim_token=token,
            claimed_at=now,
            started_at=now,
            done_trajectories=0,
        )
    )
    return token if getattr(result, "rowcount", 0) else None


def heartbeat(session: Session, export_id: uuid.UUID, token: str, *, done: int, total: int) -> bool:
    """Record progress and keep the claim alive; False if the claim was taken over."""
    result = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.claim_token == token, Export.status == "running")
        .values(claimed_at=utcnow(), done_trajectories=done, total_trajectories=total)
    )
    return bool(getattr(result, "rowcount", 0))


def complete(session: Session, export_id: uuid.UUID, token: str, manifest: dict[str, Any]) -> bool:
    result = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.claim_token == token, Export.status == "running")
        .values(
            status="completed",
            manifest=manifest,
            finished_at=utcnow(),
            done_trajectories=Export.total_trajectories,
            claim_token=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def fail(
    session: Session,
    export_id: uuid.UUID,
    token: str | None,
    *,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> bool:
    query = update(Export).where(Export.id == export_id, Export.status.in_(("queued", "running")))
    if token is not None:
        query = query.where(Export.claim_token == token)
    result = session.execute(
        query.values(
            status="failed",
            error_code=code,
            error=message,
            error_details=details,
            finished_at=utcnow(),
            claim_token=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def sweep(session: Session, stale_after_s: float) -> list[uuid.UUID]:
    """Exports whose worker died (heartbeat stopped) or whose queue message was lost.

    They are put back to `queued`, claim cleared, marked enqueued now, in the statement that
    finds them: the next sweep leaves them alone for another timeout, and a builder that was
    only slow loses its claim at its next heartbeat.
    """
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    lost = or_(
        and_(Export.status == "running", Export.claimed_at < stale),
        and_(
            Export.status == "queued",
            or_(Export.enqueued_at.is_(None), Export.enqueued_at < stale),
        ),
    )
    return list(
        session.scalars(
            update(Export)
            .where(lost)
            .values(status="queued", claim_token=None, enqueued_at=now)
            .returning(Export.id)
            .execution_options(synchronize_session=False)
        )
    )


# ---------------------------------------------------------------------- reading


def get_export(session: Session, project_id: uuid.UUID, export_id: uuid.UUID) -> Export:
    export = session.get(Export, export_id)
    if export is None or export.project_id != project_id:
        raise NotFound(f"export {export_id} not found", location="path.export_id")
    return export


def describe(export: Export) -> schemas.ExportOut:
    error = None
    if export.status == "failed":
        error = schemas.ExportError(
            code=export.error_code, message=export.error or "", details=export.error_details
        )
    return schemas.ExportOut(
        id=export.id,
        status=export.status,
        policy=export.policy,
        format=export.format,
        job_ids=export.job_ids,
        config=export.config,
        progress=schemas.Progress(
            trajectories_total=export.total_trajectories,
            trajectories_done=export.done_trajectories,
        ),
        manifest=export.manifest,
        error=error,
        created_at=export.created_at,
        started_at=export.started_at,
        finished_at=export.finished_at,
    )


def list_exports(
    session: Session, project_id: uuid.UUID, *, limit: int, before: uuid.UUID | None
) -> tuple[list[Export], uuid.UUID | None]:
    query = select(Export).where(Export.project_id == project_id)
    if before is not None:
        query = query.where(Export.id < before)
    items = list(session.scalars(query.order_by(Export.id.desc()).limit(limit + 1)))
    next_before = items[limit - 1].id if len(items) > limit else None
    return items[:limit], next_before


# ---------------------------------------------------------------------- what the builder reads


@dataclass(frozen=True)
class JobInfo:
    id: uuid.UUID
    critic_model: str
    prompt_hash: str
    mode: str
    votes: int
    temperature: float
    labels: list[str]
    created_at: str


def job_infos(session: Session, job_ids: Sequence[str]) -> list[JobInfo]:
    wanted = [uuid.UUID(str(i)) for i in job_ids]
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
    return [
        JobInfo(
            id=job.id,
            critic_model=job.critic_model,
            prompt_hash=job.prompt_hash,
            mode=job.mode,
            votes=job.votes,
            temperature=job.temperature,
            labels=[name for name, _ in job.labels],
            created_at=job.created_at.isoformat(),
        )
        for job in (jobs[uuid.UUID(str(i))] for i in job_ids)
    ]


def trajectory_ids(
    session: Session,
    project_id: uuid.UUID,
    job_ids: Sequence[str],
    selection: dict[str, Any] | None,
) -> list[uuid.UUID]:
    """The trajectories an export covers, in id order.

    An explicit selection is applied as given. Otherwise: what each job selected, of any
    resolution (a job with scope=unresolved still selected the resolved runs that srft trains
    in full), among the trajectories that existed when the job was created; the union.
    """
    if selection is not None:
        filters = [_filters(Selection.model_validate(selection))]
    else:
        filters = []
        wanted = [uuid.UUID(str(i)) for i in job_ids]
        for job in session.scalars(select(Job).where(Job.id.in_(wanted))):
            chosen = _filters(Selection.model_validate(job.selection))
            filters.append(and_(chosen, Trajectory.created_at <= job.created_at))
    query = (
        select(Trajectory.id)
        .where(Trajectory.project_id == project_id, or_(*filters))
        .order_by(Trajectory.id)
    )
    return list(session.scalars(query))


def _filters(selection: Selection) -> Any:
    parts: list[Any] = []
    if selection.trajectory_ids is not None:
        parts.append(Trajectory.id.in_(selection.trajectory_ids))
    if selection.resolved is not None:
        parts.append(Trajectory.resolved.is_(selection.resolved))
    if selection.source_format is not None:
        parts.append(Trajectory.source_format == selection.source_format)
    if selection.task_id is not None:
        parts.append(Trajectory.task_id == selection.task_id)
    return and_(True, *parts)


@dataclass(frozen=True)
class Source:
    """One trajectory as the policy and the writers see it."""

    id: uuid.UUID
    resolved: bool | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    step_messages: tuple[int, ...]  # message index of each step
    labels: tuple[StepLabel, ...]  # one per step


def load_sources(
    session: Session, ids: Sequence[uuid.UUID], job_ids: Sequence[str]
) -> list[Source]:
    """Trajectories with their steps and, per step, its human label if a reviewer set one,
    else the verdict of the last listed job that has one (a later job overrides an earlier)."""
    rank = {uuid.UUID(str(j)): n for n, j in enumerate(job_ids)}
    trajectories = {
        t.id: t for t in session.scalars(select(Trajectory).where(Trajectory.id.in_(list(ids))))
    }
    steps: dict[uuid.UUID, list[int]] = {i: [] for i in ids}
    for row in session.execute(
        select(Step.trajectory_id, Step.index, Step.message_index)
        .where(Step.trajectory_id.in_(list(ids)))
        .order_by(Step.trajectory_id, Step.index)
    ):
        steps[row.trajectory_id].append(row.message_index)
    chosen: dict[tuple[uuid.UUID, int], tuple[int, StepLabel]] = {}
    for verdict in session.execute(
        select(
            Verdict.job_id,
            Verdict.trajectory_id,
            Verdict.step_index,
            Verdict.label,
            Verdict.vote_labels,
        ).where(
            Verdict.trajectory_id.in_(list(ids)),
            Verdict.job_id.in_(list(rank)),
            Verdict.status == "done",
        )
    ):
        key = (verdict.trajectory_id, verdict.step_index)
        order = rank[verdict.job_id]
        if key not in chosen or chosen[key][0] < order:
            votes = tuple(verdict.vote_labels or ())
            chosen[key] = (order, StepLabel(verdict.label, votes if len(votes) > 1 else ()))
    # A reviewer's label wins over any critic verdict for the same step.
    for (trajectory_id, step), human in review_service.labels_of(session, ids).items():
        chosen[(trajectory_id, step)] = (len(rank), StepLabel(human.label, (), "human"))
    sources: list[Source] = []
    for trajectory_id in ids:
        t = trajectories[trajectory_id]
        positions = steps[trajectory_id]
        labels = tuple(
            chosen[(trajectory_id, k)][1]
            if (trajectory_id, k) in chosen
            else StepLabel(None, (), "none")
            for k in range(len(positions))
        )
        sources.append(Source(t.id, t.resolved, t.messages, t.tools, tuple(positions), labels))
    return sources
