"""Celery tasks. Each takes ids, loads its rows, calls one service function and commits."""

from __future__ import annotations

from workers.celery_app import celery_app


@celery_app.task(name="srft.health.ping")
def ping() -> str:
    """A no-op round trip, used to check that a worker consumes the queue."""
    return "pong"
