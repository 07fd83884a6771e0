"""Celery tasks. Each takes ids, loads its rows, calls the runtime and commits.

Delivery is at-least-once (`acks_late`); tasks are idempotent because work is claimed in the
database and results are written under the claim token.
"""

from __future__ import annotations

import uuid

from app.jobs.service import Unit
from workers.celery_app import celery_app
from workers.runtime import get_runtime


@celery_app.task(name="srft.health.ping")
def ping() -> str:
    """A no-op round trip, used to check that a worker consumes the queue."""
    return "pong"


@celery_app.task(name="srft.jobs.label_unit", acks_late=True, reject_on_worker_lost=True)
def label_unit(job_id: str, trajectory_id: str, step_indices: list[int]) -> None:
    """Judge some steps of one trajectory for one job."""
    unit = Unit(uuid.UUID(job_id), uuid.UUID(trajectory_id), tuple(step_indices))
    get_runtime().label_unit(unit)


@celery_app.task(name="srft.jobs.sweep")
def sweep() -> int:
    """Periodic (beat): re-enqueue work lost to dead workers or a restarted broker."""
    return get_runtime().sweep()


# Exports can run for long; a dead worker is detected by its stopped heartbeat instead.
@celery_app.task(
    name="srft.exports.build", acks_late=True, reject_on_worker_lost=True, time_limit=7 * 86400
)
def build_export(export_id: str) -> str | None:
    """Build one export's shards and manifest, and publish them."""
    return get_runtime().build_export(uuid.UUID(export_id))
