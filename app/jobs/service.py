"""Labeling jobs: creation, selections, progress, cancel and retry. The work queue their
verdict rows form is `app.jobs.workqueue`; the loop that labels them is `app.jobs.labeling`.

Services flush; the request or the task that calls them commits.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
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
from app.jobs import prompts, schemas, tallies
from app.jobs.workqueue import (
    Finished,
    Unit,
    count_finished,
    fill_from_cache,
    finish_if_done,
    units_of,
)
from app.models import Export, Job, JobBatch, JobTrajectory, Trajectory, Verdict, utcnow
from app.pagination import decode_cursor, encode_cursor
from app.recipe.tokenizer_names import INVALID_TOKENIZER, request_allows
from app.status import (
    EXPORT_OPEN,
    JOB_FINISHED,
    JOB_OPEN,
    BatchStatus,
    Delivery,
    JobStatus,
    VerdictStatus,
)

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
    *,
    model: str,
    prompt: str,
    mode: str,
    votes: int,
    temperature: float,
    content: str,
    step: int,
    options: dict[str, Any] | None = None,
) -> str:
    """Identity of a piece of critic work: same key, same question asked of the same critic.

    `options` are the job's stored critic options; those that change answers (ANSWER_OPTIONS)
    are part of the key, and a job that sets none keeps the key it had before they existed."""
    parts = [model, prompt, mode, str(votes), repr(float(temperature)), content, str(step)]
    answering = {k: v for k, v in (options or {}).items() if k in ANSWER_OPTIONS}
    if answering:
        parts.append(json.dumps(answering, sort_keys=True, ensure_ascii=False))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# Stored critic options that can change the critic's answers (the rest change how or when it
# is asked, not what it answers).
ANSWER_OPTIONS = frozenset({"seed", "extra_body", "structured_output"})


def critic_options(job: Job) -> schemas.CriticOptions:
    """The job's critic options, its columns and its stored options together."""
    return schemas.CriticOptions.model_validate(
        {
            **job.critic_options,
            "mode": job.mode,
            "model": job.critic_model,
            "votes": job.votes,
            "temperature": job.temperature,
            "labels": dict(job_labels(job).to_dict()),
        }
    )


def job_labels(job: Job) -> LabelSet:
    return LabelSet(tuple((name, definition) for name, definition in job.labels))


# ---------------------------------------------------------------------- creation


def create_job(
    session: Session, project_id: uuid.UUID, body: schemas.JobCreate, settings: Settings
) -> Job:
    """Validate the request and write the job, with its totals; its verdict rows are written
    after, in batches, by `prepare_batch` on a worker, so that creating a job of a million
    steps costs about as much as one of ten."""
    critic = body.critic
    labels = DEFAULT_LABELS if critic.labels is None else LabelSet.from_request(critic.labels)
    if critic.votes > 1 and critic.temperature == 0:
        raise InvalidJobError(
            "votes > 1 needs temperature > 0: identical calls at temperature 0 would only "
            "repeat the same answer",
            location="critic.temperature",
        )
    if critic.tokenizer is not None and not request_allows(
        critic.tokenizer, settings.tokenizer_roots, settings.tokenizer_dirs
    ):
        raise InvalidJobError(
            INVALID_TOKENIZER, location="critic.tokenizer", code="invalid_tokenizer"
        )
    check_selection(session, project_id, body.selection)
    critic = prompts.prepared(session, project_id, critic, labels)
    trajectories, steps = _totals(session, project_id, body.selection, body.scope)
    if not trajectories:
        raise InvalidJobError(
            "the selection matches no trajectory"
            + (
                " that is unresolved (scope=unresolved; use scope=all to include resolved runs)"
                if body.scope == "unresolved"
                else ""
            ),
            location="selection",
            code="empty_selection",
        )
    job = Job(
        project_id=project_id,
        status=JobStatus.QUEUED,
        mode=critic.mode,
        critic_model=critic.model or settings.critic_model,
        votes=critic.votes,
        temperature=critic.temperature,
        labels=[list(pair) for pair in labels.labels],
        prompt_hash=prompt_hash(critic.mode, labels, prompts.templates(critic)),
        critic_options=critic.model_dump(
            mode="json", include=set(schemas.OPTION_FIELDS), exclude_defaults=True
        ),
        scope=body.scope,
        use_cache=body.cache,
        selection=body.selection.model_dump(mode="json", exclude_none=True),
        total_trajectories=trajectories,
        total_steps=steps,
        prepared_trajectories=0,
        prepared_steps=0,
    )
    session.add(job)
    session.flush()
    return job


def _candidates(project_id: uuid.UUID, scope: str) -> list[ColumnElement[bool]]:
    """The trajectories of a project a job of this scope labels: those with steps, and under
    `unresolved` (as in the paper: resolved runs are trained in full, so only the rest need a
    critic) those not known to be resolved."""
    criteria = [Trajectory.project_id == project_id, Trajectory.num_steps > 0]
    if scope == "unresolved":
        criteria.append(or_(Trajectory.resolved.is_(None), Trajectory.resolved.is_(False)))
    return criteria


def _totals(
    session: Session, project_id: uuid.UUID, selection: schemas.Selection, scope: str
) -> tuple[int, int]:
    """How many trajectories and steps a job would label: one aggregate (a chunk of explicit
    ids at a time), no rows brought over."""
    query = select(func.count(), func.coalesce(func.sum(Trajectory.num_steps), 0)).where(
        *_candidates(project_id, scope), *_criteria(selection)
    )
    chunks: Iterable[list[uuid.UUID] | None] = (
        [None] if selection.trajectory_ids is None else id_chunks(selection.trajectory_ids)
    )
    trajectories = steps = 0
    for chunk in chunks:
        chunk_query = query if chunk is None else query.where(Trajectory.id.in_(chunk))
        count, total = session.execute(chunk_query).one()
        trajectories, steps = trajectories + int(count), steps + int(total)
    return trajectories, steps


@dataclass(frozen=True)
class Prepared:
    """One batch of a job's preparation: the units to enqueue, whether more remain, and the
    selection's explicit ids, sorted (None for a filter), for the next batch to reuse: a job
    may name 100,000 of them, not to be parsed and sorted again for every batch."""

    units: list[Unit]
    more: bool
    wanted: list[uuid.UUID] | None = None


def prepare_batch(
    session: Session,
    job_id: uuid.UUID,
    batch: int,
    chunk_size: int,
    wanted: list[uuid.UUID] | None = None,
) -> Prepared | None:
    """Write the verdict rows of the job's next `batch` trajectories (in id order, after its
    cursor), with their progress rows and what the cache already answers, and move the cursor;
    None when there is nothing to prepare (done, cancelled or deleted).

    The job's row is locked first, so two preparers of one job (a re-queued task and the one
    it replaced) take turns, and the second finds the cursor moved. Steps whose identical work
    is already done (same critic model, prompt, mode, votes, temperature, trajectory content
    and step) are filled from that verdict and count as cached, unless the job says
    `"cache": false`.
    """
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.prepared_at is not None or job.status in JOB_FINISHED:
        return None
    # The filters are parsed for every batch; the explicit ids, once per task.
    filters = {k: v for k, v in job.selection.items() if k != "trajectory_ids"}
    if wanted is None and job.selection.get("trajectory_ids") is not None:
        wanted = sorted({uuid.UUID(str(i)) for i in job.selection["trajectory_ids"]})
    selection = schemas.Selection.model_validate(filters)
    chosen, cursor, more = _next_batch(session, job, batch, selection, wanted)
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for trajectory in chosen:
        for step in range(trajectory.num_steps):
            key = cache_key(
                model=job.critic_model,
                prompt=job.prompt_hash,
                mode=job.mode,
                votes=job.votes,
                temperature=job.temperature,
                content=trajectory.content_hash,
                step=step,
                options=job.critic_options,
            )
            rows.append(_pending_row(job, trajectory.id, step, key, now))
    if job.use_cache:
        fill_from_cache(session, job.project_id, rows, exclude_job=job.id)
    _insert_verdicts(session, rows)
    _insert_progress(session, job, chosen, rows)
    pending = [
        (r["trajectory_id"], r["step_index"]) for r in rows if r["status"] != VerdictStatus.DONE
    ]
    job.prepared_trajectories += len(chosen)
    job.prepared_steps += len(rows)
    job.updated_at = now
    job.prepare_cursor = cursor
    if not more:
        # What the rows are: a trajectory deleted or changed since the request is not in them.
        job.prepared_at = now
        job.total_trajectories = job.prepared_trajectories
        job.total_steps = job.prepared_steps
    session.flush()
    if not more:
        finish_if_done(session, job.id)
    return Prepared(units_of(job, pending, chunk_size), more, wanted)


def _next_batch(
    session: Session,
    job: Job,
    batch: int,
    filters: schemas.Selection,
    wanted: list[uuid.UUID] | None,
) -> tuple[list[Trajectory], uuid.UUID | None, bool]:
    """The job's next `batch` trajectories after its cursor, the cursor after them, and
    whether more may follow: among `wanted` (the selection's explicit ids, sorted) if given,
    matching `filters`."""
    # Only what a job needs of each trajectory: not its messages (often 100 KB or more each).
    query = (
        select(Trajectory)
        .options(load_only(Trajectory.id, Trajectory.num_steps, Trajectory.content_hash))
        .where(*_candidates(job.project_id, job.scope), *_criteria(filters))
        .order_by(Trajectory.id)
    )
    if wanted is None:
        if job.prepare_cursor is not None:
            query = query.where(Trajectory.id > job.prepare_cursor)
        chosen = list(session.scalars(query.limit(batch)))
        return chosen, chosen[-1].id if chosen else job.prepare_cursor, len(chosen) == batch
    # Explicit ids: the next `batch` of them after the cursor; the cursor passes the whole
    # chunk, matched or not.
    start = 0 if job.prepare_cursor is None else bisect_right(wanted, job.prepare_cursor)
    ids = wanted[start : start + batch]
    if not ids:
        return [], job.prepare_cursor, False
    chosen = list(session.scalars(query.where(Trajectory.id.in_(ids))))
    return chosen, ids[-1], start + batch < len(wanted)


def _insert_progress(
    session: Session, job: Job, chosen: Sequence[Trajectory], rows: list[dict[str, Any]]
) -> None:
    """The batch's progress rows, and the totals of the steps the cache answered."""
    cached: Counter[uuid.UUID] = Counter(
        row["trajectory_id"] for row in rows if row["status"] == VerdictStatus.DONE
    )
    table = JobTrajectory.__table__
    assert isinstance(table, Table)
    progress = [
        {
            "job_id": job.id,
            "trajectory_id": t.id,
            "steps": t.num_steps,
            VerdictStatus.DONE: cached[t.id],
            VerdictStatus.FAILED: 0,
            "cached": cached[t.id],
        }
        for t in chosen
    ]
    for start in range(0, len(progress), 5000):
        session.connection().execute(insert(table), progress[start : start + 5000])
    deltas: Counter[str] = Counter()
    for row in rows:
        if row["status"] == VerdictStatus.DONE:
            deltas[tallies.STEPS_DONE] += 1
            deltas[tallies.STEPS_CACHED] += 1
            deltas[tallies.label(row["label"])] += 1
    for t in chosen:
        if cached[t.id] == t.num_steps:
            deltas[tallies.TRAJECTORIES_DONE] += 1
            deltas[tallies.TRAJECTORIES_CACHED] += 1
    tallies.add(session, {job.id: deltas})


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
    job: Job, trajectory_id: uuid.UUID, step: int, key: str, now: datetime
) -> dict[str, Any]:
    return {
        "project_id": job.project_id,
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
        # Enqueued by the batch's commit: the sweeper leaves them alone for a timeout.
        "enqueued_at": now,
    }


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


def list_jobs(
    session: Session, project_id: uuid.UUID, *, limit: int, before: uuid.UUID | None
) -> tuple[list[Job], uuid.UUID | None]:
    """A page of the project's jobs, newest first (ids are time-ordered), and the id the next
    page starts before (or None)."""
    query = select(Job).where(Job.project_id == project_id)
    if before is not None:
        query = query.where(Job.id < before)
    items = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    next_before = items[limit - 1].id if len(items) > limit else None
    return items[:limit], next_before


def describe(session: Session, job: Job) -> schemas.JobOut:
    """The job with its progress counts, label histogram, token usage and ETA: read from its
    running totals (`app.jobs.tallies`), a few rows whatever the job's size."""
    totals = tallies.read(session, job.id)
    steps = _counts(
        job.total_steps,
        totals[tallies.STEPS_DONE],
        totals[tallies.STEPS_FAILED],
        totals[tallies.STEPS_CACHED],
    )
    trajectories = _counts(
        job.total_trajectories,
        totals[tallies.TRAJECTORIES_DONE],
        totals[tallies.TRAJECTORIES_FAILED],
        totals[tallies.TRAJECTORIES_CACHED],
    )
    return schemas.JobOut(
        id=job.id,
        status=job.status,
        critic=schemas.CriticOut(
            mode=job.mode,
            model=job.critic_model,
            votes=job.votes,
            temperature=job.temperature,
            labels=job_labels(job).to_dict(),
            delivery=job.critic_options.get("delivery", Delivery.ONLINE),
            options=prompts.shown_options(
                {k: v for k, v in job.critic_options.items() if k != "delivery"}
            ),
        ),
        prompt_hash=job.prompt_hash,
        scope=job.scope,
        cache=job.use_cache,
        selection=job.selection,
        preparation=schemas.Preparation(
            complete=job.prepared_at is not None,
            trajectories=job.prepared_trajectories,
            steps=job.prepared_steps,
        ),
        counts=schemas.JobCounts(trajectories=trajectories, steps=steps),
        labels=dict(sorted(tallies.family(totals, tallies.LABEL).items())),
        usage=schemas.Usage(
            prompt_tokens=totals[tallies.PROMPT_TOKENS],
            completion_tokens=totals[tallies.COMPLETION_TOKENS],
            cached_tokens=totals[tallies.CACHED_TOKENS],
            reasoning_tokens=totals[tallies.REASONING_TOKENS],
        ),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        eta_s=_eta(job, steps),
        **_batches(session, job),
    )


def _batches(session: Session, job: Job) -> dict[str, Any]:
    """A batch-delivery job's newest batches and its progress through all of them (a few
    hundred rows at most, summed by the database); nothing for an online job."""
    if job.critic_options.get("delivery") != Delivery.BATCH:
        return {}
    shown = [
        schemas.Batch(
            id=b.id,
            remote_id=b.remote_id,
            status=BatchStatus(b.status),
            round=b.round,
            request_counts=schemas.RequestCounts(
                total=b.requests_total, completed=b.requests_completed, failed=b.requests_failed
            ),
            error=b.error,
            created_at=b.created_at,
            collected_at=b.collected_at,
        )
        for b in session.scalars(
            select(JobBatch)
            .where(JobBatch.job_id == job.id)
            .order_by(JobBatch.created_at.desc(), JobBatch.id.desc())
            .limit(schemas.BATCHES_SHOWN)
        )
    ]
    total = session.execute(
        select(
            func.count(JobBatch.id),
            func.count(JobBatch.id).filter(JobBatch.collected_at.is_(None)),
            func.coalesce(func.sum(JobBatch.requests_total), 0),
            func.coalesce(func.sum(JobBatch.requests_completed), 0),
            func.coalesce(func.sum(JobBatch.requests_failed), 0),
        ).where(JobBatch.job_id == job.id)
    ).one()
    progress = schemas.BatchProgress(
        batches=total[0],
        live=total[1],
        requests=schemas.RequestCounts(total=total[2], completed=total[3], failed=total[4]),
    )
    return {"batches": shown, "batch_progress": progress}


def _counts(total: int, done: int, failed: int, cached: int) -> schemas.Counts:
    """Counts, keyed as `schemas.Counts`: every item, each finished outcome, the open ones
    (`pending`, running or not, and not yet written), and those served from the cache."""
    return schemas.Counts(
        total=total, done=done, failed=failed, pending=total - done - failed, cached=cached
    )


def _eta(job: Job, steps: schemas.Counts) -> float | None:
    if job.status in JOB_FINISHED:
        return 0.0
    worked = steps.done + steps.failed - steps.cached
    if job.started_at is None or worked <= 0 or not steps.pending:
        return None
    started = (
        job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=utcnow().tzinfo)
    )
    elapsed = (utcnow() - started).total_seconds()
    return round(elapsed / worked * steps.pending, 1)


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


def _locked(session: Session, job: Job) -> Job:
    """The job's row, locked until the request ends and read afresh: a cancel, a retry and a
    delete of one job take turns, and one that comes after a delete answers 404, not 500."""
    found = session.get(Job, job.id, with_for_update=True, populate_existing=True)
    if found is None:
        raise NotFoundError(f"job {job.id} not found", location="path.job_id")
    return found


def cancel_job(session: Session, job: Job) -> Job:
    job = _locked(session, job)
    if job.status in JOB_FINISHED:
        raise ConflictError(f"job {job.id} is already {job.status}", location="path.job_id")
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    session.flush()
    return job


def retry_failed(session: Session, job: Job, chunk_size: int) -> list[Unit]:
    """Put the job's failed items back in the queue; return the units to enqueue."""
    job = _locked(session, job)
    if job.status == JobStatus.CANCELLED:
        raise ConflictError("a cancelled job cannot be retried", location="path.job_id")
    failed = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index, Verdict.error_kind)
        .where(Verdict.job_id == job.id, Verdict.status == VerdictStatus.FAILED)
        .with_for_update()
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
    # Their totals leave the job's (and reopen their trajectories), as their rows reopen.
    count_finished(
        session,
        (
            Finished(job.id, r.trajectory_id, VerdictStatus.FAILED, error_kind=r.error_kind)
            for r in failed
        ),
        sign=-1,
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
    job = _locked(session, job)
    status = job.status
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
