"""Sending export work to the workers, by task name (the API never imports task code)."""

from __future__ import annotations

import uuid

BUILD = "srft.exports.build"


def enqueue_build(broker_url: str, export_id: uuid.UUID) -> None:
    """Queue the build. Call after the commit that made the export's row visible."""
    from workers.celery_app import celery_for

    celery_for(broker_url).send_task(BUILD, args=[str(export_id)])
