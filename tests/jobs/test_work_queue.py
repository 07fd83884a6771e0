"""The verdict rows as a work queue, at the service level on the rolled-back test database:
a task that lost the database takes its own claim back at once, and a sweep hands lost work
on once, one sweep at a time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.critic.judge import StepOutcome, Usage
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.schemas import CriticOptions, JobCreate, Selection
from app.models import Job, Verdict, utcnow
from app.status import ErrorKind
from app.trajectories.service import ingest
from tests.builders import make_trajectory
from tests.conftest import Caller

STALE_S = 900.0


@pytest.fixture
def job(session: Session, caller: Caller, settings: Settings) -> Job:
    """A step-mode job over one 4-step run: one unit."""
    raw = json.dumps([make_trajectory(4, salt=uuid.uuid4().hex)]).encode()
    ingest(session, caller.project_id, raw)
    body = JobCreate(selection=Selection(), critic=CriticOptions(mode="step"), cache=False)
    job = job_service.create_job(session, caller.project_id, body, settings)
    session.info["units"] = job_service.prepare_batch(session, job.id, batch=10, chunk_size=8)
    return job


def _unit(session: Session, job: Job) -> workqueue.Unit:
    prepared = session.info["units"]
    assert prepared is not None
    assert not prepared.more
    (unit,) = prepared.units
    return unit


def _rows(session: Session, job: Job) -> list[Verdict]:
    session.expire_all()
    return list(session.scalars(select(Verdict).where(Verdict.job_id == job.id)))


def _age_claims(session: Session, job: Job, seconds: float) -> None:
    session.execute(
        update(Verdict)
        .where(Verdict.job_id == job.id, Verdict.status == "running")
        .values(claimed_at=utcnow() - timedelta(seconds=seconds))
    )


def test_a_claim_takes_back_what_still_runs_under_its_own_token_at_once(
    session: Session, job: Job
) -> None:
    unit = _unit(session, job)
    first = workqueue.claim_unit(session, unit, STALE_S, token="task-1")
    assert first is not None
    assert first.token == "task-1"
    # The task lost the database and retries: its claim is seconds old, far from stale.
    again = workqueue.claim_unit(session, unit, STALE_S, token="task-1")
    assert again is not None
    assert again.step_indices == unit.step_indices
    rows = _rows(session, job)
    assert {(r.status, r.claim_token) for r in rows} == {("running", "task-1")}


@pytest.mark.parametrize("token", ["task-2", None])
def test_a_claim_never_takes_another_tasks_fresh_claim(
    session: Session, job: Job, token: str | None
) -> None:
    unit = _unit(session, job)
    assert workqueue.claim_unit(session, unit, STALE_S, token="task-1") is not None
    assert workqueue.claim_unit(session, unit, STALE_S, token=token) is None
    assert {r.claim_token for r in _rows(session, job)} == {"task-1"}


def test_a_stale_claim_is_handed_on_by_one_sweep_not_by_every_sweep(
    session: Session, job: Job
) -> None:
    unit = _unit(session, job)
    assert workqueue.claim_unit(session, unit, STALE_S, token="dead-worker") is not None
    _age_claims(session, job, STALE_S + 1)
    before = utcnow()

    assert workqueue.sweep(session, STALE_S, chunk_size=8) == [unit]
    rows = _rows(session, job)
    # Back in the queue, marked enqueued now: the next sweep leaves it alone.
    assert {(r.status, r.claim_token, r.claimed_at) for r in rows} == {("pending", None, None)}
    assert all(r.enqueued_at is not None and r.enqueued_at >= before for r in rows)
    assert workqueue.sweep(session, STALE_S, chunk_size=8) == []

    # The dead worker's late write finds no row of its own to write to.
    outcome = StepOutcome(0, "good", "late", 1.0, [], Usage(), None)
    workqueue.record_outcomes(session, [(job.id, unit.trajectory_id, "dead-worker", outcome)])
    assert {r.status for r in _rows(session, job)} == {"pending"}
    # The task the sweeper queued claims it at once.
    assert workqueue.claim_unit(session, unit, STALE_S, token="next") is not None


def test_outcomes_store_the_kind_of_a_failure_and_none_for_a_verdict(
    session: Session, job: Job
) -> None:
    unit = _unit(session, job)
    assert workqueue.claim_unit(session, unit, STALE_S, token="task-1") is not None
    failed = StepOutcome(
        0,
        None,
        None,
        None,
        [],
        Usage(),
        error="the critic did not answer in time (after 6 attempts)",
        error_kind=ErrorKind.TIMEOUT,
    )
    done = StepOutcome(1, "good", "fine", 1.0, [], Usage())
    workqueue.record_outcomes(
        session,
        [(job.id, unit.trajectory_id, "task-1", o) for o in (failed, done)],
    )
    rows = {r.step_index: r for r in _rows(session, job)}
    assert (rows[0].status, rows[0].error_kind) == ("failed", "timeout")
    assert (rows[1].status, rows[1].error, rows[1].error_kind) == ("done", None, None)


@pytest.fixture
def two_sessions(engine: Engine) -> Iterator[tuple[Session, Session]]:
    """Two sessions on connections of their own, as two sweeping workers have."""
    with Session(engine) as first, Session(engine) as second:
        yield first, second
        first.rollback()
        second.rollback()


def test_one_sweep_at_a_time(two_sessions: tuple[Session, Session]) -> None:
    first, second = two_sessions
    assert workqueue.lock_sweep(first)
    assert not workqueue.lock_sweep(second)  # skips its sweep
    first.commit()  # the lock ends with the first sweep's transaction
    second.rollback()
    assert workqueue.lock_sweep(second)
