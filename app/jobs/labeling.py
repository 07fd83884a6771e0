"""The labeling loop: claim a unit of work, ask the critic about its steps, store each outcome
as it arrives under the claim, and close the job when nothing is left.

A worker process runs one `Labeler` (built by its runtime, `app.worker.runtime`) on its one
event loop; the critic calls of every unit the process labels at once share that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from app.config import Settings
from app.critic.client import CriticClient, EndpointOptions
from app.critic.judge import Judge, JudgeConfig, StepOutcome
from app.critic.limits import Limiter
from app.critic.prompt import TokenCounter
from app.db import (
    OUTAGE_BACKOFF_MAX_S,
    Database,
    is_database_unavailable,
    outage_delay,
    outage_reason,
)
from app.jobs import prompts, workqueue
from app.jobs import service as job_service
from app.jobs.workqueue import Unit
from app.models import Job
from app.recipe.steps import split_steps
from app.status import JobMode, JobStatus

log = logging.getLogger("srft.worker")
T = TypeVar("T")
# A tokenizer by name (`trusted`: the operator's setting, not a job's option) as a token
# counter, or None where it cannot be had (`app.worker.runtime.CriticTokenizers`).
Tokenizers = Callable[[str, bool], TokenCounter | None]


def judge_config(job: Job, settings: Settings, tokenizers: Tokenizers | None = None) -> JudgeConfig:
    """How the job's critic is asked: its columns, its stored options, and the settings for
    what it leaves out. With `tokenizers`, prompts are measured with the job's tokenizer (its
    option, else SRFT_CRITIC_TOKENIZER) where it can be loaded."""
    options = job_service.critic_options(job)
    name = options.tokenizer or settings.critic_tokenizer
    count_tokens = (
        tokenizers(name, options.tokenizer is None) if tokenizers is not None and name else None
    )
    return JudgeConfig(
        model=job.critic_model,
        labels=job_service.job_labels(job),
        votes=job.votes,
        temperature=job.temperature,
        context_tokens=options.context_tokens or settings.critic_context_tokens,
        max_attempts=settings.critic_max_attempts,
        backoff_base_s=settings.critic_backoff_base_s,
        backoff_max_s=settings.critic_backoff_max_s,
        max_answer_tokens=options.max_answer_tokens or settings.critic_max_answer_tokens,
        endpoint=EndpointOptions(
            max_tokens_param=options.max_tokens_param,
            seed=options.seed,
            extra_body=options.extra_body or {},
            structured_output=options.structured_output != "off",
        ),
        prompt=prompts.templates(options),
        count_tokens=count_tokens,
    )


class Labeler:
    """Labels units of work with one critic client and one set of limits."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        client: CriticClient,
        limiter: Limiter,
        run: Callable[[Coroutine[Any, Any, Any]], Any],
        tokenizers: Tokenizers | None = None,
    ) -> None:
        self._database = database
        self._tokenizers = tokenizers
        self._settings = settings
        self._client = client
        self._limiter = limiter
        self._run = run
        # Outcomes are paid for: a write that finds the database gone is tried again for half
        # the stale timeout, still well within the claim, before the unit gives up on them.
        self._recorder = Recorder(self._record, patience_s=settings.stale_after_s / 2)

    def label_unit(self, unit: Unit, token: str | None = None) -> None:
        """Claim the unit (under `token`, taking back what is still running under it), ask
        the critic about its steps, store each outcome as it arrives.

        An error that says the database is unavailable is raised with the claim kept, for
        the task to retry under the same token; any other gives the claim back first.
        """
        with self._database.transaction() as session:
            claim = workqueue.claim_unit(session, unit, self._settings.stale_after_s, token=token)
            if claim is not None:
                job = claim.job
                config = judge_config(job, self._settings, self._tokenizers)
                messages = claim.trajectory.messages
                resolved = claim.trajectory.resolved
                mode = job.mode
        if claim is not None:
            judge = Judge(self._client, self._limiter, config)
            try:
                self._run(
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
        unit: Unit,
        token: str,
        messages: list[dict[str, Any]],
        resolved: bool | None,
        targets: tuple[int, ...],
    ) -> None:
        steps = split_steps(messages)
        source: AsyncIterator[list[StepOutcome] | StepOutcome]
        if mode == JobMode.TRAJECTORY:
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
        with self._database.transaction() as session:
            workqueue.record_outcomes(session, outcomes)
            return workqueue.job_statuses(session, {job_id for job_id, *_ in outcomes})

    def _release(self, unit: Unit, token: str) -> None:
        """Give back what this task claimed but did not finish, for the next task to take."""
        try:
            with self._database.transaction() as session:
                workqueue.release_claim(session, unit, token)
        except Exception:
            log.exception("could not release claim %s; the sweeper will take it over", token)

    def _finish(self, unit: Unit) -> None:
        with self._database.transaction() as session:
            workqueue.finish_if_done(session, unit.job_id)


_Write = tuple[uuid.UUID, uuid.UUID, str, StepOutcome]


class Recorder:
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

    def submit(self, unit: Unit, token: str, outcomes: list[StepOutcome]) -> asyncio.Future[bool]:
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
        return job_id in self._statuses and self._statuses[job_id] in (JobStatus.CANCELLED, None)

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
