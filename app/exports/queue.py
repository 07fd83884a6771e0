"""Sending export work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.broker import BUILD_EXPORT, celery_for
from app.db import after_commit


def enqueue_build_after_commit(session: Session, broker_url: str, export_id: uuid.UUID) -> None:
    """Queue the build once the session's unit of work has committed the export's row."""
    after_commit(session, lambda: enqueue_build(broker_url, export_id))


def enqueue_build(broker_url: str, export_id: uuid.UUID) -> None:
    """Queue the build now (`enqueue_build_after_commit` is the one to call in a unit of
    work)."""
    celery_for(broker_url).send_task(BUILD_EXPORT, args=[str(export_id)])
