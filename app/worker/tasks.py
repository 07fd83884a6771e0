"""Celery tasks (registered on every app `app.broker.create_celery` makes, which imports this
module in workers). Each takes ids, loads its rows, calls the runtime and commits.

Delivery is at-least-once (`acks_late`); tasks are idempotent because work is claimed in the
database and results are written under the claim token. A task that finds the database
unavailable retries itself within seconds, keeping its claim token (see `_retry_after_outage`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.signals import worker_process_init, worker_ready

from app.broker import (
    BUILD_EXPORT,
    BUILD_EXPORT_PART,
    CANCEL_BATCHES,
    FINISH_EXPORT,
    LABEL_UNIT,
    POLL_BATCH,
    PREPARE_JOB,
    SUBMIT_BATCHES,
    SWEEP,
)
from app.db import is_database_unavailable, outage_delay, outage_reason, outage_tries
from app.exports.builder import BuildInterruptedError
from app.jobs.workqueue import Unit
from app.worker.runtime import get_runtime

log = logging.getLogger("srft.worker")


def _retry_after_outage(task: Any, error: BaseException, **kwargs: Any) -> Exception:
    """Queue the task again soon, with `kwargs` (its claim token), because the database is
    unavailable. Past about the stale timeout of tries, `error` is raised instead and the
    sweeper takes over."""
    tries, most = task.request.retries, outage_tries(get_runtime().settings.stale_after_s)
    delay = outage_delay(tries)
    if tries >= most:
        log.error(
            "%s: the database is still unavailable after %d retries (%s); giving up, the "
            "sweeper will hand the work on",
            task.name,
            tries,
            outage_reason(error),
        )
    else:
        log.warning(
            "%s: the database is unavailable (%s); trying again in %.1f s (retry %d)",
            task.name,
            outage_reason(error),
            delay,
            tries + 1,
        )
    # Raises Retry (the task is queued again and this message acknowledged), or `error`
    # past `most` retries.
    retry: Exception = task.retry(
        kwargs={**(task.request.kwargs or {}), **kwargs},
        countdown=delay,
        max_retries=most,
        exc=error,
    )
    return retry


@shared_task(bind=True, name=LABEL_UNIT, acks_late=True, reject_on_worker_lost=True)
def label_unit(
    self: Any,
    job_id: str,
    trajectory_id: str,
    step_indices: list[int],
    claim_token: str | None = None,
) -> None:
    """Judge some steps of one trajectory for one job. The claim token is chosen here and
    kept by the task's retries, so a retry takes back its own claim even if the database
    went away before it could confirm the claim."""
    unit = Unit(uuid.UUID(job_id), uuid.UUID(trajectory_id), tuple(step_indices))
    token = claim_token or str(uuid.uuid4())
    try:
        get_runtime().label_unit(unit, token)
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        raise _retry_after_outage(self, error, claim_token=token) from error


# A million steps take minutes; a dead preparer is detected by its job not moving instead.
@shared_task(
    bind=True, name=PREPARE_JOB, acks_late=True, reject_on_worker_lost=True, time_limit=7 * 86400
)
def prepare_job(self: Any, job_id: str) -> None:
    """Write a new job's verdict rows, a batch of trajectories per transaction, queueing
    each batch's units as it commits. A task that dies resumes from the job's cursor (the
    sweeper sends it again); one that finds the database unavailable retries itself."""
    try:
        get_runtime().prepare_job(uuid.UUID(job_id))
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        raise _retry_after_outage(self, error) from error


# Batch delivery (`app.jobs.batches`): an upload of a large input file or a download of a large
# output file takes minutes; a dead task is found by its batch's stale row instead.
@shared_task(
    bind=True, name=SUBMIT_BATCHES, acks_late=True, reject_on_worker_lost=True, time_limit=86400
)
def submit_batches(self: Any, job_id: str) -> int:
    """Claim a batch-delivery job's pending steps into batches and submit them (and resume
    submissions cut short)."""
    try:
        return get_runtime().submit_batches(uuid.UUID(job_id))
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        raise _retry_after_outage(self, error) from error


@shared_task(
    bind=True, name=POLL_BATCH, acks_late=True, reject_on_worker_lost=True, time_limit=86400
)
def poll_batch(self: Any, batch_id: str) -> None:
    """Poll one batch at the provider; collect its answers when it has ended, else poll it
    again later."""
    try:
        get_runtime().poll_batch(uuid.UUID(batch_id))
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        raise _retry_after_outage(self, error) from error


@shared_task(bind=True, name=CANCEL_BATCHES, acks_late=True, reject_on_worker_lost=True)
def cancel_batches(self: Any, job_id: str, remote_ids: list[str] | None = None) -> int:
    """Cancel a cancelled (or deleted) job's live batches at the provider."""
    try:
        return get_runtime().cancel_batches(uuid.UUID(job_id), remote_ids or [])
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        raise _retry_after_outage(self, error) from error


@shared_task(name=SWEEP)
def sweep() -> int:
    """Periodic (beat): re-enqueue work lost to dead workers or a restarted broker."""
    return get_runtime().sweep()


# Exports can run for long; a dead worker is detected by its stopped heartbeat instead.
@shared_task(
    bind=True,
    name=BUILD_EXPORT,
    acks_late=True,
    reject_on_worker_lost=True,
    time_limit=7 * 86400,
)
def build_export(
    self: Any,
    export_id: str,
    claim_token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> str | None:
    """Plan one export's parts (building it whole if it is one), or finish a planned one
    whose parts are done (or record `failure`)."""
    return _export_step(self, get_runtime().build_export, export_id, claim_token, failure)


@shared_task(
    bind=True,
    name=BUILD_EXPORT_PART,
    acks_late=True,
    reject_on_worker_lost=True,
    time_limit=7 * 86400,
)
def build_export_part(
    self: Any,
    part_id: str,
    claim_token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> str | None:
    """Build one part of an export (or record `failure`); the last part queues the final
    task."""
    return _export_step(self, get_runtime().build_export_part, part_id, claim_token, failure)


@shared_task(
    bind=True,
    name=FINISH_EXPORT,
    acks_late=True,
    reject_on_worker_lost=True,
    time_limit=7 * 86400,
)
def finish_export(
    self: Any,
    export_id: str,
    claim_token: str | None = None,
    failure: dict[str, Any] | None = None,
) -> str | None:
    """The final task of an export built in parts: shards, manifest, publish."""
    return _export_step(self, get_runtime().finish_export, export_id, claim_token, failure)


def _export_step(
    task: Any,
    step: Callable[[uuid.UUID, str, dict[str, Any] | None], str | None],
    item_id: str,
    claim_token: str | None,
    failure: dict[str, Any] | None,
) -> str | None:
    """Run one step of an export under a claim token kept by the task's retries, which try
    again soon when the database is unavailable (recording a failure it could not)."""
    token = claim_token or str(uuid.uuid4())
    try:
        return step(uuid.UUID(item_id), token, failure)
    except BuildInterruptedError as interrupted:
        cause = interrupted.__cause__ or interrupted
        raise _retry_after_outage(
            task, cause, claim_token=token, failure=interrupted.failure
        ) from interrupted


# ---------------------------------------------------------------------- warm-up


def _warm_up() -> None:
    """Build this process's worker runtime (database engine, event loop, critic clients,
    limits) in the background now, rather than in the first task: the first job then does not
    wait for it. A failure is only logged; the first task builds it again."""

    def build() -> None:
        try:
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
