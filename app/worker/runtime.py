"""What a worker process needs: the database, one event loop, the critic client and the shared
limits, and the labeling loop (`app.jobs.labeling`) built on them. Built lazily, once per
process (after the fork, in prefork pools).

Critic calls are async so that one process can keep many in flight; Celery tasks are sync, so
each task hands its coroutine to this process's loop, which runs in a background thread and is
shared by every task the process runs at once (thread pools) or in turn (prefork).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.critic.batch import BatchClient
from app.critic.client import CriticClient
from app.critic.limits import Limiter, LocalLimiter, RedisLimiter
from app.critic.prompt import CHARS_PER_TOKEN, TokenCounter
from app.db import Database, is_database_unavailable, outage_reason
from app.exports import builder as export_builder
from app.exports import queue as export_queue
from app.exports import service as export_service
from app.exports.tokenize import load_chat_tokenizer, load_export_tokenizer
from app.jobs import batches, workqueue
from app.jobs import queue as job_queue
from app.jobs import service as job_service
from app.jobs.labeling import Labeler
from app.jobs.workqueue import Unit

log = logging.getLogger("srft.worker")
T = TypeVar("T")


class CriticTokenizers:
    """The critic tokenizers of this process, loaded once each and kept by name, as token
    counters (`app.jobs.labeling.Tokenizers`).

    The operator's SRFT_CRITIC_TOKENIZER loads like a trainer's tokenizer; a job's own goes
    through the rules of an export's tokenizer (a Hub id, or a folder under
    SRFT_TOKENIZER_DIRS). One that cannot be loaded (no `transformers`, not found, not
    allowed, not a fast tokenizer) is logged once and leaves prompts measured by the
    estimate: counting is a refinement, and the server's own refusal still re-plans.
    """

    def __init__(self, settings: Settings) -> None:
        self._roots = settings.tokenizer_roots
        self._counters: dict[tuple[str, bool], TokenCounter | None] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str, trusted: bool) -> TokenCounter | None:
        key = (name, trusted)
        with self._lock:
            if key not in self._counters:
                self._counters[key] = self._load(name, trusted)
            return self._counters[key]

    def _load(self, name: str, trusted: bool) -> TokenCounter | None:
        try:
            if trusted:
                chat = load_chat_tokenizer(name)
            else:
                chat, _ = load_export_tokenizer(name, None, self._roots)
        except Exception as error:  # whatever the failure, the estimate still measures
            reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
            log.warning(
                "critic tokenizer %r cannot be loaded (%s); measuring prompts as characters "
                "/ %s instead",
                name,
                reason,
                CHARS_PER_TOKEN,
            )
            return None
        backend = chat.tokenizer.backend_tokenizer

        def count(text: str) -> int:
            return len(backend.encode(text, add_special_tokens=False).ids)

        log.info("measuring critic prompts with the tokenizer %r", name)
        return count


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
        # One cache of critic tokenizers for the online and the batch path.
        self.tokenizers = CriticTokenizers(settings)
        self.labeler = Labeler(
            self.database,
            settings,
            self.client,
            self.limiter,
            self.run,
            self.tokenizers,
        )
        self.batch_client = BatchClient(
            self.critic_url, api_key, timeout_s=max(settings.critic_timeout_s, 600.0)
        )

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

    def label_unit(self, unit: Unit, token: str | None = None) -> None:
        """Label one unit of work (`Labeler.label_unit`)."""
        self.labeler.label_unit(unit, token)

    def submit_batches(self, job_id: uuid.UUID) -> int:
        """Submit a batch-delivery job's pending steps as batches (`batches.submit`)."""
        return batches.submit(
            self.database, self.settings, self.batch_client, job_id, self.tokenizers
        )

    def poll_batch(self, batch_id: uuid.UUID) -> None:
        """Poll one batch, collecting it when it has ended (`batches.poll`)."""
        batches.poll(self.database, self.settings, self.batch_client, batch_id)

    def cancel_batches(self, job_id: uuid.UUID, remote_ids: list[str]) -> int:
        """Cancel a finished job's live batches at the provider (`batches.cancel`)."""
        return batches.cancel(self.database, self.batch_client, job_id, remote_ids)

    def prepare_job(self, job_id: uuid.UUID) -> None:
        """Write the job's verdict rows batch by batch (`job_service.prepare_batch`), each
        batch's units queued when it commits."""
        wanted: list[uuid.UUID] | None = None
        while True:
            with self.database.transaction() as session:
                prepared = job_service.prepare_batch(
                    session,
                    job_id,
                    self.settings.job_prepare_batch,
                    self.settings.step_chunk_size,
                    wanted,
                )
                if prepared is None:
                    return
                job_queue.enqueue_after_commit(session, self.settings.broker_url, prepared.units)
            if not prepared.more:
                return
            wanted = prepared.wanted

    def sweep(self) -> int:
        """Re-enqueue lost work and close jobs with nothing open; return units enqueued.

        Skipped while another sweep runs, and while the database is unavailable: the tasks
        that lost it retry by themselves, and the next sweep comes soon enough.
        """
        try:
            with self.database.transaction() as session:
                if not workqueue.lock_sweep(session):
                    log.info("another sweep is running; skipped this one")
                    return 0
                units = workqueue.sweep(
                    session, self.settings.stale_after_s, self.settings.step_chunk_size
                )
                preparing = workqueue.stalled_preparations(session, self.settings.stale_after_s)
                workqueue.close_finished_jobs(session)
                exports = export_service.sweep(session, self.settings.stale_after_s)
                parts = export_service.sweep_parts(session, self.settings.stale_after_s)
                lost = batches.sweep(session, self.settings, self.settings.stale_after_s)
                self._requeue_after_commit(session, units, exports, parts, preparing)
                batches.requeue_after_commit(session, self.settings, lost)
        except Exception as error:
            if not is_database_unavailable(error):
                raise
            log.warning("sweep skipped: the database is unavailable (%s)", outage_reason(error))
            return 0
        if units:
            log.warning("sweeper re-enqueued %d units of lost or stalled work", len(units))
        if preparing:
            log.warning("sweeper resumed the preparation of %d jobs", len(preparing))
        if exports:
            log.warning("sweeper re-enqueued %d lost or stalled exports", len(exports))
        if parts:
            log.warning("sweeper re-enqueued %d lost or stalled export parts", len(parts))
        if lost.polls or lost.submits or lost.cancels:
            log.warning(
                "sweeper resumed %d batch polls, %d batch submissions, %d batch cancellations",
                len(lost.polls),
                len(lost.submits),
                len(lost.cancels),
            )
        return len(units) + len(exports) + len(parts) + len(preparing) + len(lost.polls)

    def resume(self) -> int:
        """Enqueue every open item (at start-up, when the broker may have lost messages)."""
        with self.database.transaction() as session:
            units = workqueue.resume_all(session, self.settings.step_chunk_size)
            preparing = workqueue.stalled_preparations(session, stale_after_s=0)
            exports = export_service.sweep(session, stale_after_s=0)
            parts = export_service.sweep_parts(session, stale_after_s=0)
            lost = batches.sweep(session, self.settings, stale_after_s=0)
            self._requeue_after_commit(session, units, exports, parts, preparing)
            batches.requeue_after_commit(session, self.settings, lost)
        return len(units) + len(exports) + len(parts) + len(preparing) + len(lost.polls)

    def _requeue_after_commit(
        self,
        session: Session,
        units: list[Unit],
        exports: list[uuid.UUID],
        parts: list[uuid.UUID],
        preparing: list[uuid.UUID],
    ) -> None:
        """Exports go to `srft.exports.build`, which plans one not planned yet and finishes
        one whose parts are all done (its final task was lost)."""
        job_queue.enqueue_after_commit(session, self.settings.broker_url, units)
        for job_id in preparing:
            job_queue.enqueue_prepare_after_commit(session, self.settings.broker_url, job_id)
        for export_id in exports:
            export_queue.enqueue_build_after_commit(session, self.settings.broker_url, export_id)
        export_queue.enqueue_parts_after_commit(session, self.settings.broker_url, parts)

    def build_export(
        self,
        export_id: uuid.UUID,
        token: str | None = None,
        failure: dict[str, Any] | None = None,
    ) -> str | None:
        return export_builder.build_export(
            self.database, self.settings, export_id, token=token, failure=failure
        )

    def build_export_part(
        self,
        part_id: uuid.UUID,
        token: str | None = None,
        failure: dict[str, Any] | None = None,
    ) -> str | None:
        return export_builder.build_part(
            self.database, self.settings, part_id, token=token, failure=failure
        )

    def finish_export(
        self,
        export_id: uuid.UUID,
        token: str | None = None,
        failure: dict[str, Any] | None = None,
    ) -> str | None:
        return export_builder.finish_export(
            self.database, self.settings, export_id, token=token, failure=failure
        )


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(get_settings())
        return _runtime
