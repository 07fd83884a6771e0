"""Sending labeling work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

from collections.abc import Iterable

from app.jobs.service import Unit

LABEL_UNIT = "srft.jobs.label_unit"
SWEEP = "srft.jobs.sweep"
# Labeling and export tasks go to Celery's default queue; sweeps to their own, so that a
# sweep never waits behind a backlog of labeling work. `srft worker` consumes both.
WORK_QUEUE = "celery"
SWEEP_QUEUE = "srft.sweeps"


def enqueue(broker_url: str, units: Iterable[Unit]) -> int:
    """Queue one task per unit. Call after the commit that made the units' rows visible."""
    from workers.celery_app import celery_for

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
