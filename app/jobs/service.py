"""Labeling jobs: creation, selections, progress, cancel and retry. The work queue their
verdict rows form is `app.jobs.workqueue`; the loop that labels them is `app.jobs.labeling`.

Services flush; the request or the task that calls them commits.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, load_only

from app.config import Settings
from app.critic.labels import DEFAULT_LABELS, LabelSet
from app.critic.prompt import prompt_hash
from app.errors import ConflictError, NotFoundError, SrftError
from app.jobs import schemas
from app.jobs.workqueue import Unit, fill_from_cache, units_of
from app.models import Export, Job, Trajectory, Verdict, utcnow
from app.pagination import decode_cursor, encode_cursor
from app.status import EXPORT_OPEN, JOB_FINISHED, JOB_OPEN, VERDICT_OPEN, JobStatus, VerdictStatus

ID_CHUNK = 1000
RowT = TypeVar("RowT")


class InvalidJobError(SrftError):
    status_code = 422
    code = "invalid_job"


class InvalidSelectionError(SrftError):
    """Explicit trajectory ids a job or an export cannot select."""

    status_code = 422
    code = "invalid_selection"


def cache_key(
    *, model: str, prompt: str, mode: str, votes: int, temperature: float, content: str, step: int
) -> str:
    """Identity of a piece of critic work: same key, same question asked of the same critic."""
    parts = [model, prompt, mode, str(votes), repr(float(temperature)), content, str(step)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def job_labels(job: Job) -> LabelSet:
    return LabelSet(tuple((name, definition) for name, definition in job.labels))


# ---------------------------------------------------------------------- creation


def create_job(
    session: Session, project_id: uuid.UUID, body: schemas.JobCreate, settings: Settings
) -> Job:
    """Validate, select the trajectories, and write the job with one verdict row per step.

    Steps whose identical work is already done (same critic model, prompt, mode, votes,
    temperature, trajectory content and step) are filled from that verdict and count as
    cached, unless the job says `"cache": false`.
    """
    critic = body.critic
    labels = DEFAULT_LABELS if critic.labels is None else LabelSet.from_request(critic.labels)
    if critic.votes > 1 and critic.temperature == 0:
        raise InvalidJobError(
            "votes > 1 needs temperature > 0: identical calls at temperature 0 would only "
            "repeat the same answer",
            location="critic.temperature",
        )
    model = critic.model or settings.critic_model
    prompt = prompt_hash(critic.mode, labels)
    chosen = _select(session, project_id, body.selection, body.scope)

    job = Job(
        project_id=project_id,
        status=JobStatus.QUEUED,
        mode=critic.mode,
        critic_model=model,
        votes=critic.votes,
        temperature=critic.temperature,
        labels=[list(pair) for pair in labels.labels],
        prompt_hash=prompt,
        scope=body.scope,
        use_cache=body.cache,
        selection=body.selection.model_dump(mode="json", exclude_none=True),
        total_trajectories=len(chosen),
        total_steps=sum(t.num_steps for t in chosen),
    )
    session.add(job)
    session.flush()

    rows: list[dict[str, Any]] = []
    for trajectory in chosen:
        for step in range(trajectory.num_steps):
            key = cache_key(
                model=model,
                prompt=prompt,
                mode=critic.mode,
                votes=critic.votes,
                temperature=critic.temperature,
                content=trajectory.content_hash,
                step=step,
            )
            rows.append(_pending_row(job, project_id, trajectory.id, step, key))
    if body.cache:
        fill_from_cache(session, project_id, rows, exclude_job=job.id)
    _insert_verdicts(session, rows)
    if all(row["status"] == VerdictStatus.DONE for row in rows):
        job.status = JobStatus.COMPLETED
        job.started_at = job.finished_at = utcnow()
    session.flush()
    return job


def _insert_verdicts(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert verdict rows with Core executemany, rows with the same keys together (as the
    ORM's bulk insert groups them, without its per-row bookkeeping)."""
    table = Verdict.__table__
    assert isinstance(table, Table)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row)].append(row)
    connection = session.connection()
    for group in groups.values():
        for start in range(0, len(group), 5000):
            connection.execute(insert(table), group[start : start + 5000])


def _pending_row(
    job: Job, project_id: uuid.UUID, trajectory_id: uuid.UUID, step: int, key: str
) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "job_id": job.id,
        "trajectory_id": trajectory_id,
        "step_index": step,
        "status": VerdictStatus.PENDING,
        "cache_key": key,
        "cached": False,
        "critic_model": job.critic_model,
        "prompt_hash": job.prompt_hash,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "attempts": 0,
    }


def _select(
    session: Session, project_id: uuid.UUID, selection: schemas.Selection, scope: str
) -> list[Trajectory]:
    check_selection(session, project_id, selection)
    # Only what a job needs of each trajectory: not its messages (often 100 KB or more each).
    query = (
        select(Trajectory)
        .options(load_only(Trajectory.id, Trajectory.num_steps, Trajectory.content_hash))
        .where(Trajectory.project_id == project_id)
        .order_by(Trajectory.id)
    )
    if scope == "unresolved":
        # As in the paper: resolved runs are trained in full, so only the rest need a critic.
        # Unknown resolution counts as unresolved.
        query = query.where(or_(Trajectory.resolved.is_(None), Trajectory.resolved.is_(False)))
    chosen = selected(session, query, selection)
    if not chosen:
        raise InvalidJobError(
            "the selection matches no trajectory"
            + (
                " that is unresolved (scope=unresolved; use scope=all to include resolved runs)"
                if scope == "unresolved"
                else ""
            ),
            location="selection",
            code="empty_selection",
        )
    return chosen


# ---------------------------------------------------------------------- selections


def id_chunks(ids: Iterable[uuid.UUID]) -> Iterator[list[uuid.UUID]]:
    """The distinct ids, sorted, in lists short enough for one IN each: psycopg sends at most
    65,535 parameters per statement, and a selection may name 100,000 trajectories."""
    wanted = sorted(set(ids))
    for start in range(0, len(wanted), ID_CHUNK):
        yield wanted[start : start + ID_CHUNK]


def check_selection(session: Session, project_id: uuid.UUID, selection: schemas.Selection) -> None:
    """Refuse explicit trajectory ids that name nothing, or a trajectory not in the project."""
    if selection.trajectory_ids is None:
        return
    if not selection.trajectory_ids:
        raise InvalidSelectionError(
            "selection.trajectory_ids is empty: name at least one trajectory",
            location="selection.trajectory_ids",
            code="empty_selection",
        )
    found: set[uuid.UUID] = set()
    for chunk in id_chunks(selection.trajectory_ids):
        found.update(
            session.scalars(
                select(Trajectory.id).where(
                    Trajectory.project_id == project_id, Trajectory.id.in_(chunk)
                )
            )
        )
    unknown = sorted(str(i) for i in set(selection.trajectory_ids) - found)
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise InvalidSelectionError(
            f"{len(unknown)} trajectory ids are not in this project: {shown}",
            location="selection.trajectory_ids",
            code="unknown_trajectories",
            details={"unknown": unknown[:1000]},
        )


def selected(session: Session, query: Select[RowT], selection: schemas.Selection) -> list[RowT]:
    """What `query` (over trajectories, ordered by id) returns of those `selection` matches.

    Explicit ids are matched a chunk at a time; chunks of sorted ids keep the id order (a
    UUID sorts the same in Python as in the database)."""
    query = query.where(*_criteria(selection))
    if selection.trajectory_ids is None:
        return list(session.scalars(query))
    found: list[RowT] = []
    for chunk in id_chunks(selection.trajectory_ids):
        found.extend(session.scalars(query.where(Trajectory.id.in_(chunk))))
    return found


def _criteria(selection: schemas.Selection) -> list[ColumnElement[bool]]:
    criteria: list[ColumnElement[bool]] = []
    if selection.resolved is not None:
        criteria.append(Trajectory.resolved.is_(selection.resolved))
    if selection.source_format is not None:
        criteria.append(Trajectory.source_format == selection.source_format)
    if selection.task_id is not None:
        criteria.append(Trajectory.task_id == selection.task_id)
    return criteria


# ---------------------------------------------------------------------- reading


def get_job(session: Session, project_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != project_id:
        raise NotFoundError(f"job {job_id} not found", location="path.job_id")
    return job


def describe(session: Session, job: Job) -> schemas.JobOut:
    """The job with its progress counts, label histogram, token usage and ETA."""
    groups = session.execute(
        select(
            Verdict.trajectory_id,
            Verdict.status,
            Verdict.cached,
            func.count(),
            func.sum(Verdict.prompt_tokens),
            func.sum(Verdict.completion_tokens),
            func.sum(Verdict.cached_tokens),
        )
        .where(Verdict.job_id == job.id)
        .group_by(Verdict.trajectory_id, Verdict.status, Verdict.cached)
    ).all()
    steps = _no_counts()
    per_trajectory: dict[uuid.UUID, dict[str, int]] = defaultdict(_no_counts)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    for trajectory_id, status, cached, count, prompt, completion, cached_tokens in groups:
        # Counts say `pending` for every open item, running or not.
        bucket = VerdictStatus.PENDING if status in VERDICT_OPEN else status
        for target in (steps, per_trajectory[trajectory_id]):
            target["total"] += count
            target[bucket] += count
            if cached:
                target["cached"] += count
        usage["prompt_tokens"] += int(prompt or 0)
        usage["completion_tokens"] += int(completion or 0)
        usage["cached_tokens"] += int(cached_tokens or 0)
    trajectories = _no_counts() | {"total": len(per_trajectory)}
    for counts in per_trajectory.values():
        if counts[VerdictStatus.PENDING]:
            trajectories[VerdictStatus.PENDING] += 1
        elif counts[VerdictStatus.FAILED]:
            trajectories[VerdictStatus.FAILED] += 1
        else:
            trajectories[VerdictStatus.DONE] += 1
            if counts["cached"] == counts["total"]:
                trajectories["cached"] += 1
    histogram = {
        str(row[0]): int(row[1])
        for row in session.execute(
            select(Verdict.label, func.count())
            .where(Verdict.job_id == job.id, Verdict.status == VerdictStatus.DONE)
            .group_by(Verdict.label)
            .order_by(Verdict.label)
        ).all()
    }
    return schemas.JobOut(
        id=job.id,
        status=job.status,
        critic=schemas.CriticOut(
            mode=job.mode,
            model=job.critic_model,
            votes=job.votes,
            temperature=job.temperature,
            labels=job_labels(job).to_dict(),
        ),
        prompt_hash=job.prompt_hash,
        scope=job.scope,
        cache=job.use_cache,
        selection=job.selection,
        counts=schemas.JobCounts(
            trajectories=schemas.Counts(**trajectories), steps=schemas.Counts(**steps)
        ),
        labels=histogram,
        usage=schemas.Usage(**usage),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        eta_s=_eta(job, steps),
    )


def _no_counts() -> dict[str, int]:
    """Zero counts, keyed as `schemas.Counts`: every step, each finished outcome, the open
    ones (`pending`), and those served from the cache."""
    return {
        "total": 0,
        VerdictStatus.DONE: 0,
        VerdictStatus.FAILED: 0,
        VerdictStatus.PENDING: 0,
        "cached": 0,
    }


def _eta(job: Job, steps: dict[str, int]) -> float | None:
    if job.status in JOB_FINISHED:
        return 0.0
    worked = steps[VerdictStatus.DONE] + steps[VerdictStatus.FAILED] - steps["cached"]
    if job.started_at is None or worked <= 0 or not steps[VerdictStatus.PENDING]:
        return None
    started = (
        job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=utcnow().tzinfo)
    )
    elapsed = (utcnow() - started).total_seconds()
    return round(elapsed / worked * steps[VerdictStatus.PENDING], 1)


def list_verdicts(
    session: Session, job: Job, *, limit: int, cursor: str | None
) -> tuple[list[Verdict], str | None]:
    query = select(Verdict).where(Verdict.job_id == job.id)
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Verdict.id > after)
    items = list(session.scalars(query.order_by(Verdict.id).limit(limit + 1)))
    next_cursor = encode_cursor(items[limit - 1].id) if len(items) > limit else None
    return items[:limit], next_cursor


# ---------------------------------------------------------------------- control


def cancel_job(session: Session, job: Job) -> Job:
    if job.status in JOB_FINISHED:
        raise ConflictError(f"job {job.id} is already {job.status}", location="path.job_id")
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    session.flush()
    return job


def retry_failed(session: Session, job: Job, chunk_size: int) -> list[Unit]:
    """Put the job's failed items back in the queue; return the units to enqueue."""
    if job.status == JobStatus.CANCELLED:
        raise ConflictError("a cancelled job cannot be retried", location="path.job_id")
    failed = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(
            Verdict.job_id == job.id, Verdict.status == VerdictStatus.FAILED
        )
    ).all()
    if not failed:
        raise ConflictError(f"job {job.id} has no failed items to retry", location="path.job_id")
    now = utcnow()
    session.execute(
        update(Verdict)
        .where(Verdict.job_id == job.id, Verdict.status == VerdictStatus.FAILED)
        .values(
            status=VerdictStatus.PENDING,
            error=None,
            error_kind=None,
            claim_token=None,
            claimed_at=None,
            enqueued_at=now,
        )
    )
    job.status = JobStatus.RUNNING if job.started_at else JobStatus.QUEUED
    job.finished_at = None
    job.error = None
    session.flush()
    return units_of(job, [(r.trajectory_id, r.step_index) for r in failed], chunk_size)


# ---------------------------------------------------------------------- deletion


def delete_job(session: Session, job: Job) -> None:
    """Delete a finished job and its verdicts: one DELETE of the job's row, which the
    database cascades to the verdicts (a million of them take seconds, not a million
    statements). Refused while the job runs, or while an export not built yet uses it;
    finished exports keep their files and manifest, which do not need the job."""
    # Locked first: an export created at the same moment (it reads its jobs FOR SHARE) either
    # waits for this deletion and finds no job, or is committed and seen below.
    status = session.scalar(select(Job.status).where(Job.id == job.id).with_for_update())
    if status is None:  # another request deleted it meanwhile
        raise NotFoundError(f"job {job.id} not found", location="path.job_id")
    if status in JOB_OPEN:
        raise ConflictError(
            f"job {job.id} is {status}: cancel it first (POST /v1/jobs/{job.id}/cancel)",
            location="path.job_id",
            code="job_not_finished",
        )
    exports = session.execute(
        select(Export.id, Export.status, Export.job_ids)
        .where(Export.project_id == job.project_id, Export.status.in_(EXPORT_OPEN))
        .order_by(Export.id)
    ).all()
    using = [e for e in exports if str(job.id) in e.job_ids]
    if using:
        shown = ", ".join(f"export {e.id} ({e.status})" for e in using[:20])
        raise ConflictError(
            f"{shown} {'uses' if len(using) == 1 else 'use'} this job: delete the job once "
            f"{'it has' if len(using) == 1 else 'they have'} finished",
            location="path.job_id",
            code="job_in_use",
            details={"exports": [str(e.id) for e in using]},
        )
    session.delete(job)
    session.flush()
