"""Labeling jobs: creation, the verdict work queue, progress, cancel and retry.

Services flush; the request or the task wrapper commits. The verdict rows are the queue: a
unit of work (one trajectory, or a chunk of its steps in `step` mode) is claimed by flipping
its rows from `pending` (or `running` past the stale timeout) to `running` with a fresh claim
token in one UPDATE, and results are written only under that token. Two workers can therefore
never both apply a verdict, and a dead worker's claim is taken over by the sweeper's next task.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, load_only

from app.config import Settings
from app.critic.judge import StepOutcome
from app.critic.labels import DEFAULT_LABELS, LabelSet
from app.critic.prompt import prompt_hash
from app.errors import Conflict, NotFound, SrftError
from app.jobs import schemas
from app.models import Export, Job, Trajectory, Verdict, utcnow
from app.pagination import decode_cursor, encode_cursor

TERMINAL = frozenset({"completed", "failed", "cancelled"})
OPEN_ITEMS = ("pending", "running")
ID_CHUNK = 1000
RowT = TypeVar("RowT")


class InvalidJob(SrftError):
    status_code = 422
    code = "invalid_job"


class InvalidSelection(SrftError):
    """Explicit trajectory ids a job or an export cannot select."""

    status_code = 422
    code = "invalid_selection"


@dataclass(frozen=True)
class Unit:
    """One task's worth of work: some steps of one trajectory in one job."""

    job_id: uuid.UUID
    trajectory_id: uuid.UUID
    step_indices: tuple[int, ...]


@dataclass(frozen=True)
class Claim:
    job: Job
    trajectory: Trajectory
    token: str
    step_indices: tuple[int, ...]


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
        raise InvalidJob(
            "votes > 1 needs temperature > 0: identical calls at temperature 0 would only "
            "repeat the same answer",
            location="critic.temperature",
        )
    model = critic.model or settings.critic_model
    prompt = prompt_hash(critic.mode, labels)
    chosen = _select(session, project_id, body.selection, body.scope)

    job = Job(
        project_id=project_id,
        status="queued",
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
        _fill_from_cache(session, project_id, rows, exclude_job=job.id)
    _insert_verdicts(session, rows)
    if all(row["status"] == "done" for row in rows):
        job.status = "completed"
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
        "status": "pending",
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
        raise InvalidJob(
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
        raise InvalidSelection(
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
        raise InvalidSelection(
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


def _fill_from_cache(
    session: Session,
    project_id: uuid.UUID,
    rows: list[dict[str, Any]],
    *,
    exclude_job: uuid.UUID | None,
) -> int:
    """Copy earlier done verdicts onto rows with the same cache key; return how many."""
    keys = list({row["cache_key"] for row in rows})
    found: dict[str, Verdict] = {}
    for start in range(0, len(keys), 1000):
        query = select(Verdict).where(
            Verdict.project_id == project_id,
            Verdict.cache_key.in_(keys[start : start + 1000]),
            Verdict.status == "done",
        )
        if exclude_job is not None:
            query = query.where(Verdict.job_id != exclude_job)
        for verdict in session.scalars(query.order_by(Verdict.id)):
            found.setdefault(verdict.cache_key, verdict)
    filled = 0
    now = utcnow()
    for row in rows:
        earlier = found.get(row["cache_key"])
        if earlier is None:
            continue
        row.update(
            status="done",
            cached=True,
            label=earlier.label,
            reason=earlier.reason,
            agreement=earlier.agreement,
            vote_labels=earlier.vote_labels,
            finished_at=now,
        )
        filled += 1
    return filled


# ---------------------------------------------------------------------- the work queue


def units_of(job: Job, rows: list[tuple[uuid.UUID, int]], chunk_size: int) -> list[Unit]:
    """Group (trajectory, step) pairs into units: a trajectory per unit in `trajectory` mode,
    chunks of `chunk_size` steps in `step` mode."""
    by_trajectory: dict[uuid.UUID, list[int]] = defaultdict(list)
    for trajectory_id, step in rows:
        by_trajectory[trajectory_id].append(step)
    units: list[Unit] = []
    for trajectory_id, steps in by_trajectory.items():
        steps.sort()
        size = chunk_size if job.mode == "step" else len(steps)
        for start in range(0, len(steps), max(1, size)):
            units.append(Unit(job.id, trajectory_id, tuple(steps[start : start + size])))
    return units


def pending_units(session: Session, job: Job, chunk_size: int) -> list[Unit]:
    """Every pending item of a job as units, marked enqueued now."""
    # Core: a large job has a row per step, and ORM rows cost more than tuples.
    connection = session.connection()
    rows = connection.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(
            Verdict.job_id == job.id, Verdict.status == "pending"
        )
    ).all()
    connection.execute(
        update(Verdict)
        .where(Verdict.job_id == job.id, Verdict.status == "pending")
        .values(enqueued_at=utcnow())
    )
    return units_of(job, [(r.trajectory_id, r.step_index) for r in rows], chunk_size)


def claim_unit(
    session: Session, unit: Unit, stale_after_s: float, *, token: str | None = None
) -> Claim | None:
    """Claim the unit's open items under `token` (a fresh one if None); None when there is
    nothing left to do.

    Items still running under `token` itself are taken back at once: a task that lost the
    database resumes its own claim when it retries, instead of waiting for the claim to go
    stale. A token belongs to one task and its retries, which never run at the same time.
    """
    job = session.get(Job, unit.job_id)
    if job is None or job.status in TERMINAL:
        return None
    now = utcnow()
    token = token or str(uuid.uuid4())
    stale = now - timedelta(seconds=stale_after_s)
    claimed = list(
        session.execute(
            update(Verdict)
            .where(
                Verdict.job_id == unit.job_id,
                Verdict.trajectory_id == unit.trajectory_id,
                Verdict.step_index.in_(unit.step_indices),
                or_(
                    Verdict.status == "pending",
                    and_(
                        Verdict.status == "running",
                        or_(Verdict.claimed_at < stale, Verdict.claim_token == token),
                    ),
                ),
            )
            .values(status="running", claim_token=token, claimed_at=now)
            .returning(Verdict.step_index)
        )
        .scalars()
        .all()
    )
    if not claimed:
        return None
    if job.status == "queued":
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == "queued")
            .values(status="running", started_at=now)
        )
    if job.use_cache:
        claimed = _claim_from_cache(session, job, unit.trajectory_id, token, claimed)
    session.flush()
    trajectory = session.get(Trajectory, unit.trajectory_id)
    if trajectory is None or not claimed:
        return None
    return Claim(job, trajectory, token, tuple(sorted(claimed)))


def _claim_from_cache(
    session: Session, job: Job, trajectory_id: uuid.UUID, token: str, claimed: list[int]
) -> list[int]:
    """Serve claimed items from verdicts finished since the job was created; return the rest."""
    rows = session.execute(
        select(Verdict.step_index, Verdict.cache_key).where(
            Verdict.job_id == job.id,
            Verdict.trajectory_id == trajectory_id,
            Verdict.step_index.in_(claimed),
        )
    ).all()
    wanted = [{"cache_key": r.cache_key, "step_index": r.step_index} for r in rows]
    _fill_from_cache(session, job.project_id, wanted, exclude_job=job.id)
    remaining: list[int] = []
    for row in wanted:
        if row.get("status") != "done":
            remaining.append(row["step_index"])
            continue
        session.execute(
            update(Verdict)
            .where(
                Verdict.job_id == job.id,
                Verdict.trajectory_id == trajectory_id,
                Verdict.step_index == row["step_index"],
                Verdict.claim_token == token,
            )
            .values(
                status="done",
                cached=True,
                label=row["label"],
                reason=row["reason"],
                agreement=row["agreement"],
                vote_labels=row["vote_labels"],
                finished_at=row["finished_at"],
            )
        )
    return remaining


def record_outcomes(
    session: Session, outcomes: Sequence[tuple[uuid.UUID, uuid.UUID, str, StepOutcome]]
) -> None:
    """Store many (job, trajectory, claim token, outcome) at once. Each is written only under
    its claim token and while its item is still running, so a lost claim writes nothing.
    One statement executed for all (pipelined)."""
    if not outcomes:
        return
    table = Verdict.__table__
    assert isinstance(table, Table)
    c = table.c
    statement = (
        update(table)
        .where(
            c.job_id == bindparam("b_job_id"),
            c.trajectory_id == bindparam("b_trajectory_id"),
            c.step_index == bindparam("b_step_index"),
            c.claim_token == bindparam("b_token"),
            c.status == "running",
        )
        .values(
            status=bindparam("b_status"),
            label=bindparam("b_label"),
            reason=bindparam("b_reason"),
            agreement=bindparam("b_agreement"),
            vote_labels=bindparam("b_vote_labels", type_=c.vote_labels.type),
            prompt_tokens=bindparam("b_prompt_tokens"),
            completion_tokens=bindparam("b_completion_tokens"),
            cached_tokens=bindparam("b_cached_tokens"),
            latency_ms=bindparam("b_latency_ms"),
            attempts=c.attempts + bindparam("b_attempts", type_=c.attempts.type),
            error=bindparam("b_error"),
            finished_at=bindparam("b_finished_at", type_=c.finished_at.type),
        )
    )
    now = utcnow()
    rows = []
    for job_id, trajectory_id, token, outcome in outcomes:
        usage = outcome.usage
        rows.append(
            {
                "b_job_id": job_id,
                "b_trajectory_id": trajectory_id,
                "b_step_index": outcome.index,
                "b_token": token,
                "b_status": "done" if outcome.label is not None else "failed",
                "b_label": outcome.label,
                "b_reason": outcome.reason,
                "b_agreement": outcome.agreement,
                "b_vote_labels": outcome.vote_labels or None,
                "b_prompt_tokens": usage.prompt_tokens,
                "b_completion_tokens": usage.completion_tokens,
                "b_cached_tokens": usage.cached_tokens,
                "b_latency_ms": round(usage.latency_s * 1000, 3),
                "b_attempts": usage.attempts,
                "b_error": outcome.error,
                "b_finished_at": now,
            }
        )
    # Core, not the ORM: a list of parameters to an ORM update() means "by primary key".
    session.connection().execute(statement, rows)


def finish_if_done(session: Session, job_id: uuid.UUID) -> str | None:
    """Close the job when no item is open; return its new status, or None if still open."""
    # Whether any item is open, not how many: counting a large job's open items per task
    # would read its whole index range every time.
    remaining = session.scalar(
        select(Verdict.id).where(Verdict.job_id == job_id, Verdict.status.in_(OPEN_ITEMS)).limit(1)
    )
    if remaining is not None:
        return None
    done = session.scalar(
        select(func.count())
        .select_from(Verdict)
        .where(Verdict.job_id == job_id, Verdict.status == "done")
    )
    status = "completed" if done else "failed"
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("queued", "running")))
        .values(
            status=status,
            finished_at=utcnow(),
            error=None if done else "every step failed; see the verdicts' errors",
        )
    )
    return status if getattr(result, "rowcount", 0) else None


# Any constant shared by every sweeper: the key of their Postgres advisory lock.
SWEEP_LOCK = 0x53524654  # "SRFT"


def lock_sweep(session: Session) -> bool:
    """Take the sweepers' lock until this transaction ends; False if another sweep holds it.

    Two sweeps at once would each hand the same lost work on. SQLite needs no lock: its
    embedded worker is the only one, and it sweeps from one thread.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(SWEEP_LOCK))))


def lost_work(
    queue: type[Verdict] | type[Export], waiting: str, stale: datetime
) -> ColumnElement[bool]:
    """Rows of a work queue (verdicts, exports) whose work was lost: `running` under a claim
    not renewed since `stale` (a dead or stuck worker), or `waiting` and not enqueued since
    `stale` (a lost broker message)."""
    return or_(
        and_(queue.status == "running", queue.claimed_at < stale),
        and_(
            queue.status == waiting,
            or_(queue.enqueued_at.is_(None), queue.enqueued_at < stale),
        ),
    )


def sweep(session: Session, stale_after_s: float, chunk_size: int) -> list[Unit]:
    """Units whose work was lost: claims older than the timeout (a dead or stuck worker) and
    pending items not picked up within it (a lost broker message).

    Both are put back to `pending`, claim cleared, marked enqueued now, in the statement that
    finds them: the next sweep leaves them alone for another timeout instead of handing them
    on again, and a late write under the old claim finds no row to write to.
    """
    now = utcnow()
    lost = lost_work(Verdict, "pending", now - timedelta(seconds=stale_after_s))
    open_jobs = select(Job.id).where(Job.status.in_(("queued", "running")))
    rows = session.execute(
        update(Verdict)
        .where(lost, Verdict.job_id.in_(open_jobs.scalar_subquery()))
        .values(status="pending", claim_token=None, claimed_at=None, enqueued_at=now)
        .returning(Verdict.job_id, Verdict.trajectory_id, Verdict.step_index)
        .execution_options(synchronize_session=False)
    ).all()
    if not rows:
        return []
    by_job: dict[uuid.UUID, list[tuple[uuid.UUID, int]]] = defaultdict(list)
    for row in rows:
        by_job[row.job_id].append((row.trajectory_id, row.step_index))
    units: list[Unit] = []
    for job_id, items in by_job.items():
        job = session.get(Job, job_id)
        if job is not None:
            units.extend(units_of(job, items, chunk_size))
    return units


def resume_all(session: Session, chunk_size: int) -> list[Unit]:
    """Every open item of every open job: after a restart with an in-memory broker."""
    return sweep(session, stale_after_s=0, chunk_size=chunk_size)


# ---------------------------------------------------------------------- reading


def get_job(session: Session, project_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != project_id:
        raise NotFound(f"job {job_id} not found", location="path.job_id")
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
    steps = {"total": 0, "done": 0, "failed": 0, "pending": 0, "cached": 0}
    per_trajectory: dict[uuid.UUID, dict[str, int]] = defaultdict(
        lambda: {"total": 0, "done": 0, "failed": 0, "pending": 0, "cached": 0}
    )
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    for trajectory_id, status, cached, count, prompt, completion, cached_tokens in groups:
        bucket = "pending" if status in OPEN_ITEMS else status
        for target in (steps, per_trajectory[trajectory_id]):
            target["total"] += count
            target[bucket] += count
            if cached:
                target["cached"] += count
        usage["prompt_tokens"] += int(prompt or 0)
        usage["completion_tokens"] += int(completion or 0)
        usage["cached_tokens"] += int(cached_tokens or 0)
    trajectories = {"total": len(per_trajectory), "done": 0, "failed": 0, "pending": 0, "cached": 0}
    for counts in per_trajectory.values():
        if counts["pending"]:
            trajectories["pending"] += 1
        elif counts["failed"]:
            trajectories["failed"] += 1
        else:
            trajectories["done"] += 1
            if counts["cached"] == counts["total"]:
                trajectories["cached"] += 1
    histogram = {
        str(row[0]): int(row[1])
        for row in session.execute(
            select(Verdict.label, func.count())
            .where(Verdict.job_id == job.id, Verdict.status == "done")
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


def _eta(job: Job, steps: dict[str, int]) -> float | None:
    if job.status in TERMINAL:
        return 0.0
    worked = steps["done"] + steps["failed"] - steps["cached"]
    if job.started_at is None or worked <= 0 or not steps["pending"]:
        return None
    started = (
        job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=utcnow().tzinfo)
    )
    elapsed = (utcnow() - started).total_seconds()
    return round(elapsed / worked * steps["pending"], 1)


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
    if job.status in TERMINAL:
        raise Conflict(f"job {job.id} is already {job.status}", location="path.job_id")
    job.status = "cancelled"
    job.finished_at = utcnow()
    session.flush()
    return job


def retry_failed(session: Session, job: Job, chunk_size: int) -> list[Unit]:
    """Put the job's failed items back in the queue; return the units to enqueue."""
    if job.status == "cancelled":
        raise Conflict("a cancelled job cannot be retried", location="path.job_id")
    failed = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(
            Verdict.job_id == job.id, Verdict.status == "failed"
        )
    ).all()
    if not failed:
        raise Conflict(f"job {job.id} has no failed items to retry", location="path.job_id")
    now = utcnow()
    session.execute(
        update(Verdict)
        .where(Verdict.job_id == job.id, Verdict.status == "failed")
        .values(status="pending", error=None, claim_token=None, claimed_at=None, enqueued_at=now)
    )
    job.status = "running" if job.started_at else "queued"
    job.finished_at = None
    job.error = None
    session.flush()
    return units_of(job, [(r.trajectory_id, r.step_index) for r in failed], chunk_size)


def job_status(session: Session, job_id: uuid.UUID) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def job_statuses(session: Session, job_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status of each job that exists among `job_ids`."""
    wanted = list(set(job_ids))
    if not wanted:
        return {}
    rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(wanted))).all()
    return {row.id: row.status for row in rows}


def release_claim(session: Session, unit: Unit, token: str) -> None:
    """Return a claim's unfinished items to the queue."""
    session.execute(
        update(Verdict)
        .where(
            Verdict.job_id == unit.job_id,
            Verdict.trajectory_id == unit.trajectory_id,
            Verdict.claim_token == token,
            Verdict.status == "running",
        )
        .values(status="pending", claim_token=None, claimed_at=None, enqueued_at=None)
    )


def close_finished_jobs(session: Session) -> int:
    """Close open jobs that have no open item left (their last task died after its writes)."""
    open_jobs = session.scalars(select(Job.id).where(Job.status.in_(("queued", "running"))))
    return sum(1 for job_id in list(open_jobs) if finish_if_done(session, job_id))
