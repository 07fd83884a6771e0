"""Sending export work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.broker import BUILD_EXPORT, BUILD_EXPORT_PART, FINISH_EXPORT, celery_for
from app.db import after_commit


def enqueue_build_after_commit(session: Session, broker_url: str, export_id: uuid.UUID) -> None:
    """Queue the build once the session's unit of work has committed the export's row."""
    after_commit(session, lambda: enqueue_build(broker_url, export_id))


def enqueue_build(broker_url: str, export_id: uuid.UUID) -> None:
    """Queue the build now (`enqueue_build_after_commit` is the one to call in a unit of
    work)."""
    celery_for(broker_url).send_task(BUILD_EXPORT, args=[str(export_id)])


def enqueue_parts_after_commit(
    session: Session, broker_url: str, part_ids: Sequence[uuid.UUID]
) -> None:
    """Queue the building of these export parts once their rows are committed."""
    ids = [str(i) for i in part_ids]

    def send() -> None:
        celery = celery_for(broker_url)
        for part_id in ids:
            celery.send_task(BUILD_EXPORT_PART, args=[part_id])

    if ids:
        after_commit(session, send)


def enqueue_finish_after_commit(session: Session, broker_url: str, export_id: uuid.UUID) -> None:
    """Queue an export's final task (manifest, publish) once its last part is committed."""
    after_commit(
        session,
        lambda: celery_for(broker_url).send_task(FINISH_EXPORT, args=[str(export_id)]),
    )
