"""The verdict work queue. The verdict rows are the queue: a unit of work (one trajectory, or a
chunk of its steps in `step` mode) is claimed by flipping its rows from `pending` (or `running`
past the stale timeout) to `running` with a fresh claim token in one UPDATE, and results are
written only under that token. Two workers can therefore never both apply a verdict, and a dead
worker's claim is taken over by the sweeper's next task.

Services flush; the task that calls them commits (`app.jobs.labeling`, `app.worker.runtime`).
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from app.critic.judge import StepOutcome
from app.jobs import tallies
from app.models import (
    Export,
    ExportPart,
    Job,
    JobBatch,
    JobTrajectory,
    Trajectory,
    Verdict,
    utcnow,
)
from app.status import (
    JOB_FINISHED,
    JOB_OPEN,
    VERDICT_OPEN,
    JobMode,
    JobStatus,
    VerdictStatus,
)


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


@dataclass(frozen=True)
class Finished:
    """A verdict that a write has just finished (or, `reopened`, put back in the queue)."""

    job_id: uuid.UUID
    trajectory_id: uuid.UUID
    status: str
    cached: bool = False
    label: str | None = None
    error_kind: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float | None = None
    reasoning_tokens: int = 0


DONE, FAILED = VerdictStatus.DONE, VerdictStatus.FAILED


def count_finished(session: Session, finished: Iterable[Finished], *, sign: int = 1) -> None:
    """Add verdicts this transaction finished to their jobs' totals (`app.jobs.tallies`) and
    to their trajectories' progress; `sign=-1` takes failed ones that are reopened back out.

    Each trajectory's progress row is updated and read back in one statement: its lock orders
    the writers of one trajectory, so exactly one of them sees it finish (or reopen) and
    counts the trajectory. Rows are visited in (job, trajectory) order, the same in every
    writer, so writers wait for each other instead of deadlocking.
    """
    deltas: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
    per_trajectory: dict[tuple[uuid.UUID, uuid.UUID], Counter[str]] = defaultdict(Counter)
    for item in finished:
        step = deltas[item.job_id]
        moved = per_trajectory[(item.job_id, item.trajectory_id)]
        if item.status == VerdictStatus.DONE:
            moved[DONE] += sign
            step[tallies.STEPS_DONE] += sign
            if item.label is not None:
                step[tallies.label(item.label)] += sign
            if item.cached:
                moved["cached"] += sign
                step[tallies.STEPS_CACHED] += sign
            else:
                tallies.latency(step, item.latency_ms)
        else:
            moved[FAILED] += sign
            step[tallies.STEPS_FAILED] += sign
            step[tallies.error(item.error_kind)] += sign
        step[tallies.PROMPT_TOKENS] += item.prompt_tokens
        step[tallies.COMPLETION_TOKENS] += item.completion_tokens
        step[tallies.CACHED_TOKENS] += item.cached_tokens
        step[tallies.REASONING_TOKENS] += item.reasoning_tokens
    table = JobTrajectory.__table__
    assert isinstance(table, Table)
    for (job_id, trajectory_id), moved in sorted(per_trajectory.items()):
        after = session.execute(
            update(table)
            .where(table.c.job_id == job_id, table.c.trajectory_id == trajectory_id)
            .values(
                done=table.c.done + moved[DONE],
                failed=table.c.failed + moved[FAILED],
                cached=table.c.cached + moved["cached"],
            )
            .returning(table.c.steps, table.c.done, table.c.failed, table.c.cached)
        ).one_or_none()
        if after is None:
            continue
        finished_now = after.done + after.failed == after.steps
        finished_before = (after.done - moved[DONE]) + (after.failed - moved[FAILED]) == (
            after.steps
        )
        if finished_now == finished_before:
            continue
        # Finished by this write (+1), or reopened by it (-1): counted as it ends, or ended.
        ended = after if finished_now else _before(after, moved)
        change = 1 if finished_now else -1
        job = deltas[job_id]
        if ended.failed:
            job[tallies.TRAJECTORIES_FAILED] += change
        else:
            job[tallies.TRAJECTORIES_DONE] += change
            if ended.cached == ended.steps:
                job[tallies.TRAJECTORIES_CACHED] += change
    tallies.add(session, deltas)


@dataclass(frozen=True)
class _Progress:
    steps: int
    done: int
    failed: int
    cached: int


def _before(after: Any, moved: Counter[str]) -> _Progress:
    return _Progress(
        after.steps,
        after.done - moved[DONE],
        after.failed - moved[FAILED],
        after.cached - moved["cached"],
    )


def fill_from_cache(
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
            Verdict.status == VerdictStatus.DONE,
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
            status=VerdictStatus.DONE,
            cached=True,
            label=earlier.label,
            reason=earlier.reason,
            agreement=earlier.agreement,
            vote_labels=earlier.vote_labels,
            finished_at=now,
        )
        filled += 1
    return filled


def units_of(job: Job, rows: list[tuple[uuid.UUID, int]], chunk_size: int) -> list[Unit]:
    """Group (trajectory, step) pairs into units: a trajectory per unit in `trajectory` mode,
    chunks of `chunk_size` steps in `step` mode."""
    by_trajectory: dict[uuid.UUID, list[int]] = defaultdict(list)
    for trajectory_id, step in rows:
        by_trajectory[trajectory_id].append(step)
    units: list[Unit] = []
    for trajectory_id, steps in by_trajectory.items():
        steps.sort()
        size = chunk_size if job.mode == JobMode.STEP else len(steps)
        for start in range(0, len(steps), max(1, size)):
            units.append(Unit(job.id, trajectory_id, tuple(steps[start : start + size])))
    return units


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
    if job is None or job.status in JOB_FINISHED:
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
                claimable(Verdict, VerdictStatus.PENDING, VerdictStatus.RUNNING, stale, token),
                ~held_by_live_batch(),
            )
            .values(status=VerdictStatus.RUNNING, claim_token=token, claimed_at=now)
            .returning(Verdict.step_index)
        )
        .scalars()
        .all()
    )
    if not claimed:
        return None
    if job.status == JobStatus.QUEUED:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.RUNNING, started_at=now)
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
    fill_from_cache(session, job.project_id, wanted, exclude_job=job.id)
    remaining: list[int] = []
    served: list[Finished] = []
    for row in wanted:
        if row.get("status") != VerdictStatus.DONE:
            remaining.append(row["step_index"])
            continue
        written = session.execute(
            update(Verdict)
            .where(
                Verdict.job_id == job.id,
                Verdict.trajectory_id == trajectory_id,
                Verdict.step_index == row["step_index"],
                Verdict.claim_token == token,
            )
            .values(
                status=VerdictStatus.DONE,
                cached=True,
                label=row["label"],
                reason=row["reason"],
                agreement=row["agreement"],
                vote_labels=row["vote_labels"],
                finished_at=row["finished_at"],
            )
        )
        if getattr(written, "rowcount", 0):
            served.append(
                Finished(job.id, trajectory_id, VerdictStatus.DONE, cached=True, label=row["label"])
            )
    count_finished(session, served)
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
            c.status == VerdictStatus.RUNNING,
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
            reasoning_tokens=bindparam("b_reasoning_tokens"),
            system_fingerprint=bindparam("b_system_fingerprint"),
            delivery=bindparam("b_delivery"),
            latency_ms=bindparam("b_latency_ms"),
            attempts=c.attempts + bindparam("b_attempts", type_=c.attempts.type),
            error=bindparam("b_error"),
            error_kind=bindparam("b_error_kind"),
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
                "b_status": (
                    VerdictStatus.DONE if outcome.label is not None else VerdictStatus.FAILED
                ),
                "b_label": outcome.label,
                "b_reason": outcome.reason,
                "b_agreement": outcome.agreement,
                "b_vote_labels": outcome.vote_labels or None,
                "b_prompt_tokens": usage.prompt_tokens,
                "b_completion_tokens": usage.completion_tokens,
                "b_cached_tokens": usage.cached_tokens,
                "b_reasoning_tokens": usage.reasoning_tokens,
                "b_system_fingerprint": usage.system_fingerprint,
                "b_delivery": outcome.delivery,
                "b_latency_ms": round(usage.latency_s * 1000, 3),
                "b_attempts": usage.attempts,
                "b_error": outcome.error,
                "b_error_kind": outcome.error_kind,
                "b_finished_at": now,
            }
        )
    # Core, not the ORM: a list of parameters to an ORM update() means "by primary key".
    session.connection().execute(statement, rows)
    # What was written: the rows this statement finished carry its claim tokens and its
    # `now` (a lost claim wrote nothing, and a write never finishes a row twice).
    written = {
        tuple(row)
        for row in session.execute(
            select(c.job_id, c.trajectory_id, c.step_index).where(
                c.job_id.in_({job_id for job_id, *_ in outcomes}),
                c.trajectory_id.in_({trajectory_id for _, trajectory_id, *_ in outcomes}),
                c.step_index.in_({outcome.index for *_, outcome in outcomes}),
                c.claim_token.in_({token for _, _, token, _ in outcomes}),
                c.finished_at == now,
            )
        )
    }
    count_finished(
        session,
        (
            Finished(
                job_id,
                trajectory_id,
                VerdictStatus.DONE if outcome.label is not None else VerdictStatus.FAILED,
                label=outcome.label,
                error_kind=outcome.error_kind,
                prompt_tokens=outcome.usage.prompt_tokens,
                completion_tokens=outcome.usage.completion_tokens,
                cached_tokens=outcome.usage.cached_tokens,
                latency_ms=round(outcome.usage.latency_s * 1000, 3),
                reasoning_tokens=outcome.usage.reasoning_tokens,
            )
            for job_id, trajectory_id, _, outcome in outcomes
            if (job_id, trajectory_id, outcome.index) in written
        ),
    )


def finish_if_done(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    """Close the job when every row exists and none is open; return its new status, or None
    if still open."""
    job = session.get(Job, job_id)
    if job is None or job.status not in JOB_OPEN or job.prepared_at is None:
        return None
    # Whether any item is open, not how many: counting a large job's open items per task
    # would read its whole index range every time.
    remaining = session.scalar(
        select(Verdict.id)
        .where(Verdict.job_id == job_id, Verdict.status.in_(VERDICT_OPEN))
        .limit(1)
    )
    if remaining is not None:
        return None
    done = session.scalar(
        select(Verdict.id)
        .where(Verdict.job_id == job_id, Verdict.status == VerdictStatus.DONE)
        .limit(1)
    )
    status = JobStatus.COMPLETED if done is not None else JobStatus.FAILED
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JOB_OPEN))
        .values(
            status=status,
            finished_at=utcnow(),
            error=None if done is not None else "every step failed; see the verdicts' errors",
        )
        .execution_options(synchronize_session=False)
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


def claimable(
    queue: type[Verdict] | type[Export] | type[ExportPart],
    waiting: str,
    running: str,
    stale: datetime,
    token: str,
) -> ColumnElement[bool]:
    """Rows of a work queue (verdicts, exports, export parts) that a claim under `token` may
    take: `waiting`, or `running` under a claim not renewed since `stale` (its worker died), or
    still `running` under `token` itself (a retry of the same task takes its claim back)."""
    return or_(
        queue.status == waiting,
        and_(queue.status == running, or_(queue.claimed_at < stale, queue.claim_token == token)),
    )


def held_by_live_batch() -> ColumnElement[bool]:
    """Verdicts claimed by a batch not collected yet (`app.jobs.batches`): a batch may take
    24 hours, and its claim lives as long as it does, so neither the sweeper nor an online
    worker takes such a claim over however old it is."""
    return exists().where(
        JobBatch.claim_token == Verdict.claim_token, JobBatch.collected_at.is_(None)
    )


def lost_work(
    queue: type[Verdict] | type[Export] | type[ExportPart],
    waiting: str,
    running: str,
    stale: datetime,
) -> ColumnElement[bool]:
    """Rows of a work queue (verdicts, exports, export parts) whose work was lost: `running`
    under a claim not renewed since `stale` (a dead or stuck worker), or `waiting` and not
    enqueued since `stale` (a lost broker message)."""
    return or_(
        and_(queue.status == running, queue.claimed_at < stale),
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
    lost = lost_work(
        Verdict,
        VerdictStatus.PENDING,
        VerdictStatus.RUNNING,
        now - timedelta(seconds=stale_after_s),
    )
    open_jobs = select(Job.id).where(Job.status.in_(JOB_OPEN))
    rows = session.execute(
        update(Verdict)
        .where(lost, Verdict.job_id.in_(open_jobs.scalar_subquery()), ~held_by_live_batch())
        .values(status=VerdictStatus.PENDING, claim_token=None, claimed_at=None, enqueued_at=now)
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


def stalled_preparations(session: Session, stale_after_s: float) -> list[uuid.UUID]:
    """Open jobs whose rows are not all written and whose preparation has not moved within
    the timeout (its task died, or its message was lost): marked as moved now, so the next
    sweep leaves them for another timeout, and returned to be sent again."""
    now = utcnow()
    stalled = (
        Job.status.in_(JOB_OPEN),
        Job.prepared_at.is_(None),
        Job.updated_at < now - timedelta(seconds=stale_after_s),
    )
    return list(
        session.execute(
            update(Job)
            .where(*stalled)
            .values(updated_at=now)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )


def resume_all(session: Session, chunk_size: int) -> list[Unit]:
    """Every open item of every open job: after a restart with an in-memory broker."""
    return sweep(session, stale_after_s=0, chunk_size=chunk_size)


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
            Verdict.status == VerdictStatus.RUNNING,
        )
        .values(status=VerdictStatus.PENDING, claim_token=None, claimed_at=None, enqueued_at=None)
    )


def close_finished_jobs(session: Session) -> int:
    """Close open jobs that have no open item left (their last task died after its writes)."""
    open_jobs = session.scalars(select(Job.id).where(Job.status.in_(JOB_OPEN)))
    return sum(1 for job_id in list(open_jobs) if finish_if_done(session, job_id))
