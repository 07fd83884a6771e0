"""The Celery application, made by a factory (`create_celery`) for a broker URL: `memory://`
(the embedded default) or Redis. Also the names of the tasks and queues, by which the API sends
work without importing task code (the tasks are `app.worker.tasks`)."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu.connection import Connection

from app.config import get_settings

LABEL_UNIT = "srft.jobs.label_unit"
PREPARE_JOB = "srft.jobs.prepare"
SWEEP = "srft.jobs.sweep"
SUBMIT_BATCHES = "srft.jobs.submit_batches"
POLL_BATCH = "srft.jobs.poll_batch"
CANCEL_BATCHES = "srft.jobs.cancel_batches"
BUILD_EXPORT = "srft.exports.build"
BUILD_EXPORT_PART = "srft.exports.build_part"
FINISH_EXPORT = "srft.exports.finish"
# Labeling and export tasks go to Celery's default queue; sweeps to their own, so that a
# sweep never waits behind a backlog of labeling work. `srft worker` consumes both.
WORK_QUEUE = "celery"
SWEEP_QUEUE = "srft.sweeps"


def create_celery(broker_url: str) -> Celery:
    """A Celery app on `broker_url`, configured for srft's tasks (`app.worker.tasks`)."""
    settings = get_settings()
    celery = Celery("srft", broker=broker_url, include=["app.worker.tasks"])
    celery.conf.update(
        # The database is the source of truth; results are read from it, not from Celery.
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged only when it finished, so a killed worker's task is
        # redelivered; tasks are idempotent by construction.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A unit is bounded by the stale timeout: past it, the sweeper hands its claim on.
        task_time_limit=int(settings.stale_after_s),
        # Sweeps have a queue of their own, so they never wait behind a backlog of labeling
        # work; one that still waited a whole interval is dropped (the next one is queued).
        task_default_queue=WORK_QUEUE,
        task_routes={SWEEP: {"queue": SWEEP_QUEUE}},
        beat_schedule={
            "sweep-lost-work": {
                "task": SWEEP,
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s},
            }
        },
        broker_connection_retry_on_startup=True,
        broker_transport_options=(
            # The in-memory transport polls; its 1 s default caps it at a few tasks a second.
            {"polling_interval": 0.005}
            if broker_url.startswith("memory://")
            else {"visibility_timeout": 3600}
        ),
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
    )
    return celery


@lru_cache
def celery_for(broker_url: str) -> Celery:
    """One Celery app per broker URL in this process (the API may serve tests on several)."""
    return create_celery(broker_url)


def ping_broker(url: str, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds."""
    if url.startswith("memory://"):
        return
    with Connection(url, connect_timeout=timeout) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)
