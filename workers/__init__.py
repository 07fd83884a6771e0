"""The worker entry points: `celery -A workers.celery_app` (the worker code is `app.worker`)."""
