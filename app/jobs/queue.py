"""Sending labeling work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.broker import (
    CANCEL_BATCHES,
    LABEL_UNIT,
    POLL_BATCH,
    PREPARE_JOB,
    SUBMIT_BATCHES,
    celery_for,
)
from app.db import after_commit
from app.jobs.workqueue import Unit
from app.models import Job
from app.status import Delivery


def enqueue_after_commit(session: Session, broker_url: str, units: Sequence[Unit]) -> None:
    """Queue one task per unit once the session's unit of work has committed (the units'
    rows are then visible to every worker); nothing is queued if it rolls back.

    The units of a batch-delivery job go to its batch submission instead (one task per job),
    which claims them into batches (`app.jobs.batches`)."""
    if not units:
        return
    jobs = {unit.job_id for unit in units}
    batch_jobs = {
        job_id
        for job_id, options in session.execute(
            select(Job.id, Job.critic_options).where(Job.id.in_(jobs))
        )
        if (options or {}).get("delivery") == Delivery.BATCH
    }
    online = [unit for unit in units if unit.job_id not in batch_jobs]
    if online:
        after_commit(session, lambda: enqueue(broker_url, online))
    for job_id in sorted(batch_jobs):
        enqueue_submit_after_commit(session, broker_url, job_id)


def enqueue_online_after_commit(session: Session, broker_url: str, units: Sequence[Unit]) -> None:
    """Queue label tasks for the units whatever their job's delivery (a batch job's requests
    that a batch failed, asked again online)."""
    if units:
        after_commit(session, lambda: enqueue(broker_url, units))


def enqueue_submit_after_commit(session: Session, broker_url: str, job_id: uuid.UUID) -> None:
    """Queue the batch submission of a batch-delivery job's pending steps."""
    after_commit(
        session, lambda: celery_for(broker_url).send_task(SUBMIT_BATCHES, args=[str(job_id)])
    )


def enqueue_poll_after_commit(
    session: Session, broker_url: str, batch_id: uuid.UUID, countdown_s: float
) -> None:
    """Queue a poll of one batch, `countdown_s` from now."""
    after_commit(
        session,
        lambda: celery_for(broker_url).send_task(
            POLL_BATCH, args=[str(batch_id)], countdown=countdown_s
        ),
    )


def enqueue_cancel_after_commit(
    session: Session, broker_url: str, job_id: uuid.UUID, remote_ids: Sequence[str] = ()
) -> None:
    """Queue the cancellation of a job's live batches at the provider (and of `remote_ids`,
    the batches of a job deleted meanwhile)."""
    after_commit(
        session,
        lambda: celery_for(broker_url).send_task(
            CANCEL_BATCHES, args=[str(job_id), list(remote_ids)]
        ),
    )


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
