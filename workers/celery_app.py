"""The Celery entry point: `celery -A workers.celery_app:celery_app worker|beat|inspect`.

`srft worker` and `srft beat` run the same app; the tasks it runs are `app.worker.tasks`."""

from __future__ import annotations

from app.broker import celery_for
from app.config import get_settings

celery_app = celery_for(get_settings().broker_url)
