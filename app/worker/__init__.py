"""The worker side of the application: the process runtime, the Celery tasks and the
embedded in-process worker. Entry points (`srft worker`, `celery -A workers.celery_app`) run it."""
