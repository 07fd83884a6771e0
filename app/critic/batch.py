"""The critic's Batch API: upload an input file of requests, submit it as a batch, poll it,
download its output and error files, cancel it. One small class around the official `openai`
SDK (synchronous: the batch tasks are plain Celery tasks with nothing to overlap).

Errors the SDK raises for transport failures and 5xx answers are left to the task, which the
sweeper sends again; a batch row is never resubmitted blindly (`app.jobs.batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import openai

from app.status import BATCH_ENDED, BatchStatus

log = logging.getLogger(__name__)

ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
# The key of a batch's `metadata` that names the srft batch row it was made for.
METADATA_KEY = "srft_batch"
# Pages of the provider's batch list read while looking for a batch cut short, at most.
FIND_PAGES = 20


@dataclass(frozen=True)
class RemoteBatch:
    """What srft reads of the provider's Batch object."""

    id: str
    status: BatchStatus
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: int
    metadata: dict[str, str]
    errors: str | None

    @property
    def ended(self) -> bool:
        return self.status in BATCH_ENDED


def _remote(batch: Any) -> RemoteBatch:
    counts = batch.request_counts
    errors = batch.errors
    messages = [
        f"{'line ' + str(e.line) + ': ' if e.line is not None else ''}{e.message or e.code}"
        for e in (errors.data or [] if errors is not None else [])
    ]
    return RemoteBatch(
        id=batch.id,
        status=BatchStatus(batch.status),
        input_file_id=batch.input_file_id,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        total=counts.total if counts else 0,
        completed=counts.completed if counts else 0,
        failed=counts.failed if counts else 0,
        created_at=int(batch.created_at),
        metadata=dict(batch.metadata or {}),
        errors="; ".join(messages)[:2000] or None,
    )


class BatchClient:
    """Calls one endpoint's Files and Batches API. The key is held by the SDK client."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float) -> None:
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", timeout=timeout_s, max_retries=2
        )

    def upload(self, path: Path, name: str) -> str:
        """Upload a JSONL input file (streamed from disk); return its file id."""
        with path.open("rb") as handle:
            uploaded = self._client.files.create(file=(name, handle), purpose="batch")
        return uploaded.id

    def create(self, input_file_id: str, batch_row: str) -> RemoteBatch:
        return _remote(
            self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=ENDPOINT,
                completion_window=COMPLETION_WINDOW,
                metadata={METADATA_KEY: batch_row},
            )
        )

    def retrieve(self, remote_id: str) -> RemoteBatch:
        return _remote(self._client.batches.retrieve(remote_id))

    def cancel(self, remote_id: str) -> RemoteBatch:
        return _remote(self._client.batches.cancel(remote_id))

    def find(self, batch_row: str, created_after: datetime) -> RemoteBatch | None:
        """The batch made for `batch_row`, if a submission cut short did make it: looked for
        among the batches created since `created_after` (the list runs newest first)."""
        since = created_after.astimezone(UTC).timestamp() - 60
        page = self._client.batches.list(limit=100)
        for _ in range(FIND_PAGES):
            for batch in page.data:
                if (batch.metadata or {}).get(METADATA_KEY) == batch_row:
                    return _remote(batch)
                if batch.created_at < since:
                    return None
            if not page.has_next_page():
                return None
            page = page.get_next_page()
        return None

    def download(self, file_id: str, path: Path) -> None:
        """Stream a file's content to `path` (output files may be gigabytes)."""
        content = self._client.files.with_streaming_response.content
        with content(file_id) as response, path.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)

    def close(self) -> None:
        self._client.close()


def read_lines(path: Path) -> Iterator[bytes]:
    """The non-empty lines of a downloaded JSONL file, one at a time."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield line
