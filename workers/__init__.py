"""Celery workers: the app, its tasks, and the in-process worker of the embedded default."""
