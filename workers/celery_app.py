"""The Celery application. Broker from SRFT_BROKER_URL: `memory://` (embedded) or Redis."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready
from kombu.connection import Connection

from app.config import get_settings
from app.jobs.queue import SWEEP, SWEEP_QUEUE, WORK_QUEUE

log = logging.getLogger("srft.worker")


def create_celery(broker_url: str) -> Celery:
    settings = get_settings()
    celery = Celery("srft", broker=broker_url, include=["workers.tasks"])
    celery.conf.update(
        # The database is the source of truth; results are read from it, not from Celery.
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged only when it finished, so a killed worker's task is
        # redelivered; tasks are idempotent by construction.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A unit is bounded by the stale timeout: past it, the sweeper hands its claim on.
        task_time_limit=int(settings.stale_after_s),
        # Sweeps have a queue of their own, so they never wait behind a backlog of labeling
        # work; one that still waited a whole interval is dropped (the next one is queued).
        task_default_queue=WORK_QUEUE,
        task_routes={SWEEP: {"queue": SWEEP_QUEUE}},
        beat_schedule={
            "sweep-lost-work": {
                "task": SWEEP,
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s},
            }
        },
        broker_connection_retry_on_startup=True,
        broker_transport_options=(
            # The in-memory transport polls; its 1 s default caps it at a few tasks a second.
            {"polling_interval": 0.005}
            if broker_url.startswith("memory://")
            else {"visibility_timeout": 3600}
        ),
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
    )
    return celery


def _warm_up() -> None:
    """Build this process's worker runtime (database engine, event loop, critic clients,
    limits) in the background now, rather than in the first task: the first job then does not
    wait for it. A failure is only logged; the first task builds it again."""

    def build() -> None:
        try:
            from workers.runtime import get_runtime

            get_runtime()
        except Exception:
            log.exception("could not prepare the worker runtime; the first task will retry")

    threading.Thread(target=build, name="srft-warm-up", daemon=True).start()


@worker_process_init.connect
def _warm_up_pool_process(**_: Any) -> None:
    """A prefork pool process, just forked: its runtime must be built here, after the fork."""
    _warm_up()


@worker_ready.connect
def _warm_up_worker(sender: Any = None, **_: Any) -> None:
    """Pools that run tasks in the worker's own process (threads, solo); never the prefork
    parent, whose runtime would be copied, loop thread gone, into every process it forks."""
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" not in type(pool).__module__:
        _warm_up()


@lru_cache
def celery_for(broker_url: str) -> Celery:
    """One Celery app per broker URL in this process (the API may serve tests on several)."""
    return create_celery(broker_url)


celery_app = celery_for(get_settings().broker_url)


def ping_broker(url: str, timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached within `timeout` seconds."""
    if url.startswith("memory://"):
        return
    with Connection(url, connect_timeout=timeout) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)
