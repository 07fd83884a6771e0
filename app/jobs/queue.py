"""Sending labeling work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy.orm import Session

from app.broker import LABEL_UNIT, PREPARE_JOB, celery_for
from app.db import after_commit
from app.jobs.workqueue import Unit


def enqueue_after_commit(session: Session, broker_url: str, units: Sequence[Unit]) -> None:
    """Queue one task per unit once the session's unit of work has committed (the units'
    rows are then visible to every worker); nothing is queued if it rolls back."""
    if units:
        after_commit(session, lambda: enqueue(broker_url, units))


def enqueue(broker_url: str, units: Iterable[Unit]) -> int:
    """Queue one task per unit now (`enqueue_after_commit` is the one to call in a unit of
    work)."""
    celery = celery_for(broker_url)
    count = 0
    with celery.producer_pool.acquire(block=True) as producer:
        for unit in units:
            celery.send_task(
                LABEL_UNIT,
                args=[str(unit.job_id), str(unit.trajectory_id), list(unit.step_indices)],
                producer=producer,
            )
            count += 1
    return count


def enqueue_prepare_after_commit(session: Session, broker_url: str, job_id: uuid.UUID) -> None:
    """Queue the task that writes the job's verdict rows, once the job's row has committed."""
    after_commit(session, lambda: send_prepare(broker_url, job_id))


def send_prepare(broker_url: str, job_id: uuid.UUID) -> None:
    """Queue the job's preparation now (`enqueue_prepare_after_commit` is the one to call in a
    unit of work)."""
    celery_for(broker_url).send_task(PREPARE_JOB, args=[str(job_id)])
