"""What a worker process needs to label: the database, one event loop, the critic client and
the shared limits. Built lazily, once per process (after the fork, in prefork pools).

Critic calls are async so that one process can keep many in flight; Celery tasks are sync, so
each task hands its coroutine to this process's loop, which runs in a background thread and is
shared by every task the process runs at once (thread pools) or in turn (prefork).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.critic.client import CriticClient
from app.critic.judge import Judge, JudgeConfig, StepOutcome
from app.critic.limits import Limiter, LocalLimiter, RedisLimiter
from app.db import Database, is_database_unavailable
from app.exports import builder as export_builder
from app.exports import queue as export_queue
from app.exports import service as export_service
from app.jobs import queue
from app.jobs import service as job_service
from app.recipe.steps import split_steps

log = logging.getLogger("srft.worker")
T = TypeVar("T")

# While the database is unavailable, work is tried again after 0.5 s, doubling to at most 5 s:
# a blip costs seconds, not a stale timeout, and a long outage costs one query per try.
OUTAGE_BACKOFF_BASE_S = 0.5
OUTAGE_BACKOFF_MAX_S = 5.0


def outage_delay(attempt: int) -> float:
    """Seconds to wait before trying again after `attempt` tries (0, 1, ...) found the
    database unavailable; half of it random, so that workers do not all return at once."""
    ceiling = min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * (1 << min(attempt, 16)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def outage_reason(error: BaseException) -> str:
    """What the driver said, first line only: not the statement and its parameters."""
    return str(getattr(error, "orig", None) or error).partition("\n")[0]


def outage_tries(budget_s: float) -> int:
    """How many times to try again, at `outage_delay`, to keep trying for about `budget_s`."""
    tries, waited = 0, 0.0
    while waited < budget_s:
        waited += 0.75 * min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * (1 << min(tries, 16)))
        tries += 1
    return tries


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = Database(settings.database_url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="srft-critic-loop", daemon=True
        )
        self._thread.start()
        self.critic_url = settings.critic_base_url or self._start_rules_critic()
        api_key = settings.critic_api_key.get_secret_value() if settings.critic_api_key else None
        self.client = self.run(self._make_client(api_key))
        self.limiter: Limiter = self.run(self._make_limiter())
        # Outcomes are paid for: a write that finds the database gone is tried again for half
        # the stale timeout, still well within the claim, before the unit gives up on them.
        self._recorder = _Recorder(self._record, patience_s=settings.stale_after_s / 2)

    async def _make_client(self, api_key: str | None) -> CriticClient:
        return CriticClient(
            self.critic_url,
            api_key,
            timeout_s=self.settings.critic_timeout_s,
            max_connections=self.settings.critic_max_concurrency,
        )

    async def _make_limiter(self) -> Limiter:
        s = self.settings
        if s.broker_url.startswith(("redis://", "rediss://")):
            return RedisLimiter(
                s.broker_url,
                s.critic_max_concurrency,
                s.critic_rpm,
                s.critic_tpm,
                lease_s=s.stale_after_s,
            )
        return LocalLimiter(s.critic_max_concurrency, s.critic_rpm, s.critic_tpm)

    def _start_rules_critic(self) -> str:
        from app.critic.rules_server import start_rules_server_thread

        port = start_rules_server_thread(latency_ms=self.settings.rules_critic_latency_ms)
        log.warning(
            "SRFT_CRITIC_BASE_URL is not set: labels come from the built-in rules critic "
            "(heuristics, not an LLM), started on 127.0.0.1:%d",
            port,
        )
        return f"http://127.0.0.1:{port}/v1"

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on this process's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # ------------------------------------------------------------------ labeling

    def label_unit(self, unit: job_service.Unit, token: str | None = None) -> None:
        """Claim the unit (under `token`, taking back what is still running under it), ask
        the critic about its steps, store each outcome as it arrives.

        An error that says the database is unavailable is raised with the claim kept, for
        the task to retry under the same token; any other gives the claim back first.
        """
        with self.database.transaction() as session:
            claim = job_service.claim_unit(session, unit, self.settings.stale_after_s, token=token)
            if claim is not None:
                job = claim.job
                config = JudgeConfig(
                    model=job.critic_model,
                    labels=job_service.job_labels(job),
                    votes=job.votes,
                    temperature=job.temperature,
                    context_tokens=self.settings.critic_context_tokens,
                    max_attempts=self.settings.critic_max_attempts,
                    backoff_base_s=self.settings.critic_backoff_base_s,
                    backoff_max_s=self.settings.critic_backoff_max_s,
                    max_answer_tokens=self.settings.critic_max_answer_tokens,
                )
                messages = claim.trajectory.messages
                resolved = claim.trajectory.resolved
                mode = job.mode
        if claim is not None:
            judge = Judge(self.client, self.limiter, config)
            try:
                self.run(
                    self._judge(
                        judge, mode, unit, claim.token, messages, resolved, claim.step_indices
                    )
                )
            except BaseException as error:
                if not (isinstance(error, Exception) and is_database_unavailable(error)):
                    self._release(unit, claim.token)
                raise
        self._finish(unit)

    async def _judge(
        self,
        judge: Judge,
        mode: str,
        unit: job_service.Unit,
        token: str,
        messages: list[dict[str, Any]],
        resolved: bool | None,
        targets: tuple[int, ...],
    ) -> None:
        steps = split_steps(messages)
        source: AsyncIterator[list[StepOutcome] | StepOutcome]
        if mode == "trajectory":
            source = judge.judge_trajectory(messages, steps, resolved, set(targets))
        else:
            source = judge.judge_steps(messages, steps, resolved, targets)
        # Outcomes are handed to the recorder as they come and written in batches; the unit
        # is done when all of its writes are. Closing the judge early (a cancelled job)
        # cancels its calls still in flight.
        writes: list[asyncio.Future[bool]] = []
        try:
            async for item in source:
                outcomes = item if isinstance(item, list) else [item]
                writes.append(self._recorder.submit(unit, token, outcomes))
                if self._recorder.stopped(unit.job_id):
                    break
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
            for result in await asyncio.gather(*writes, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result

    def _record(
        self, outcomes: list[tuple[uuid.UUID, uuid.UUID, str, StepOutcome]]
    ) -> dict[uuid.UUID, str]:
        """Store outcomes in one transaction; return the status of each job they belong to
        (a job missing from the result was deleted)."""
        with self.database.transaction() as session:
            job_service.record_outcomes(session, outcomes)
            return job_service.job_statuses(session, {job_id for job_id, *_ in outcomes})

    def _release(self, unit: job_service.Unit, token: str) -> None:
        """Give back what this task claimed but did not finish, for the next task to take."""
        try:
            with self.database.transaction() as session:
                job_service.release_claim(session, unit, token)
        except Exception:
            log.exception("could not release claim %s; the sweeper will take it over", token)

    def _finish(self, unit: job_service.Unit) -> None:
        with self.database.transaction() as session:
            job_service.finish_if_done(session, unit.job_id)

    def sweep(self) -> int:
        """Re-enqueue lost work and close jobs with nothing open; return units enqueued.

        Skipped while another sweep runs, and while the database is unavailable: the tasks
        that lost it retry by themselves, and the next sweep comes soon enough.
        """
        try:
            with self.database.transaction() as session:
                if not job_service.lock_sweep(session):
                    log.info("another sweep is running; skipped this one")
                    return 0
                units = job_service.sweep(
                    session, self.settings.stale_after_s, self.settings.step_chunk_size
                )
                job_service.close_finished_jobs(session)
                exports = export_service.sweep(session, self.settings.stale_after_s)
                self._requeue_after_commit(session, units, exports)
        except Exception as error:
            if not is_database_unavailable(error):
                raise
            log.warning("sweep skipped: the database is unavailable (%s)", outage_reason(error))
            return 0
        if units:
            log.warning("sweeper re-enqueued %d units of lost or stalled work", len(units))
        if exports:
            log.warning("sweeper re-enqueued %d lost or stalled exports", len(exports))
        return len(units) + len(exports)

    def resume(self) -> int:
        """Enqueue every open item (at start-up, when the broker may have lost messages)."""
        with self.database.transaction() as session:
            units = job_service.resume_all(session, self.settings.step_chunk_size)
            exports = export_service.sweep(session, stale_after_s=0)
            self._requeue_after_commit(session, units, exports)
        return len(units) + len(exports)

    def _requeue_after_commit(
        self, session: Session, units: list[job_service.Unit], exports: list[uuid.UUID]
    ) -> None:
        queue.enqueue_after_commit(session, self.settings.broker_url, units)
        for export_id in exports:
            export_queue.enqueue_build_after_commit(session, self.settings.broker_url, export_id)

    def build_export(
        self,
        export_id: uuid.UUID,
        token: str | None = None,
        failure: dict[str, Any] | None = None,
    ) -> str | None:
        return export_builder.build_export(
            self.database, self.settings, export_id, token=token, failure=failure
        )


_Write = tuple[uuid.UUID, uuid.UUID, str, StepOutcome]


class _Recorder:
    """Writes the outcomes of every unit this process judges, in batches.

    One transaction per batch instead of one per step: outcomes that arrive within
    FLUSH_DELAY_S of the first one waiting (or FLUSH_MAX of them) are written together,
    each still under its own claim token, by one statement executed for all of them. One
    batch is written at a time, off the event loop; what arrives meanwhile waits for the next.
    Each submitter learns, when its outcomes are stored, whether its job is still open.

    A batch that finds the database unavailable is written again, with backoff, until it has
    been unavailable for `patience_s` (the critic keeps answering meanwhile, into the next
    batch); only then do the submitters get the error.
    """

    FLUSH_DELAY_S = 0.05
    FLUSH_MAX = 64

    def __init__(
        self, write: Callable[[list[_Write]], dict[uuid.UUID, str]], patience_s: float
    ) -> None:
        self._write = write
        self._patience_s = patience_s
        # Loop times of this outage's first and latest failed writes.
        self._unavailable_since = self._unavailable_last = -math.inf
        self._pending: list[tuple[list[_Write], asyncio.Future[bool]]] = []
        self._count = 0
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._statuses: dict[uuid.UUID, str | None] = {}

    def submit(
        self, unit: job_service.Unit, token: str, outcomes: list[StepOutcome]
    ) -> asyncio.Future[bool]:
        """Queue outcomes for writing; the future says whether the job is still open."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        writes = [(unit.job_id, unit.trajectory_id, token, outcome) for outcome in outcomes]
        self._pending.append((writes, future))
        self._count += len(writes)
        if self._count >= self.FLUSH_MAX:
            self._full.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_all())
        return future

    def stopped(self, job_id: uuid.UUID) -> bool:
        """Whether the last write for this job found it cancelled or deleted."""
        return job_id in self._statuses and self._statuses[job_id] in ("cancelled", None)

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                if self._count < self.FLUSH_MAX:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.FLUSH_DELAY_S)
                batch, self._pending, self._count = self._pending, [], 0
                writes = [write for group, _ in batch for write in group]
                try:
                    statuses = await self._write_patiently(writes)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if len(self._statuses) > 1000:
                    self._statuses.clear()  # only an early signal; the futures carry it too
                for job_id in {job_id for job_id, *_ in writes}:
                    self._statuses[job_id] = statuses.get(job_id)
                for group, future in batch:
                    if not future.done():
                        future.set_result(not self.stopped(group[0][0]))
        finally:
            self._flusher = None

    async def _write_patiently(self, writes: list[_Write]) -> dict[uuid.UUID, str]:
        """Write one batch, again and again while the database is unavailable (the writes
        are idempotent: each needs its item still running under its token). The patience is
        counted from the first failure of this outage, not per batch."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                statuses = await asyncio.to_thread(self._write, writes)
            except Exception as error:
                if not is_database_unavailable(error):
                    raise
                now = loop.time()
                if now - self._unavailable_last > 2 * OUTAGE_BACKOFF_MAX_S:
                    self._unavailable_since = now  # not the outage the last failure saw
                self._unavailable_last = now
                delay = outage_delay(attempt)
                if now + delay > self._unavailable_since + self._patience_s:
                    raise
                log.warning(
                    "could not store %d outcomes, the database is unavailable (%s); "
                    "trying again in %.1f s",
                    len(writes),
                    outage_reason(error),
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
            else:
                self._unavailable_last = -math.inf
                return statuses


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(get_settings())
        return _runtime
