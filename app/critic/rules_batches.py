"""The rules critic's Files and Batches API: enough of OpenAI's Batch API for srft's batch
delivery to be tested through the official SDK, with faults.

- `POST /v1/files` (multipart/form-data: `file`, `purpose`), `GET /v1/files/{id}`,
  `GET /v1/files/{id}/content`.
- `POST /v1/batches` (`input_file_id`, `endpoint`, `completion_window`, `metadata`),
  `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`, `GET /v1/batches` (newest first,
  `after`, `limit`).

Files and batches are kept in memory. A batch's input is checked when it is created (JSON
lines, unique `custom_id`, `POST` to the batch's endpoint, the limits in `BatchLimits`): a
bad one ends `failed` with `errors`. A good one is `in_progress` until `batch_delay_s` has
passed; the first retrieval after that answers every line with the code that answers
`/v1/chat/completions` (same labels, same usage) and writes the output and error files.

Batch faults (`batch_faults` in the fault plan; the same trigger fields as request faults,
tried once per batch created): `validation_failed`; `partial_failure` (every `line_every`-th
line fails with a 500, in the error file); `expired` (the last 1/`line_every` of the lines are
left unanswered, `batch_expired` in the error file); `stuck` (stays `in_progress` for `polls`
retrievals, or while the plan holds the rule).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.status import BatchStatus

ENDPOINTS = ("/v1/chat/completions",)
# The statuses a Batch object has a time for.
TIMED = tuple(s for s in BatchStatus if s not in (BatchStatus.SUBMITTING, BatchStatus.VALIDATING))
WINDOW_S = 24 * 3600
LIST_LIMIT = 100


@dataclass(frozen=True)
class BatchLimits:
    """The provider's limits on one batch's input file (OpenAI: 50,000 requests, 200 MB)."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024


class BatchFault(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def line_every(self) -> int: ...

    @property
    def polls(self) -> int | None: ...


class BatchHost(Protocol):
    """What the batches need of the rules critic (`app.critic.rules_server.RulesCritic`)."""

    batch_delay_s: float

    def answer_line(self, body: Any) -> tuple[int, dict[str, Any]]: ...

    def pick_batch_fault(self) -> BatchFault | None: ...

    def holds_batch_fault(self, fault: BatchFault) -> bool: ...

    def count_batch(self, name: str, count: int = 1) -> None: ...


def openai_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """An error answered as OpenAI answers it."""
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return JSONResponse(body, status_code=status)


class BatchError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> JSONResponse:
        return openai_error(self.status, str(self), self.code)


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: int
    lines: list[dict[str, Any]]
    fault: BatchFault | None
    status: BatchStatus = BatchStatus.VALIDATING
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    answered: int = 0
    errored: int = 0
    # When it reached each status (`<status>_at` in the Batch object).
    times: dict[BatchStatus, int] = field(default_factory=dict)
    ready_at: float = 0.0
    polls: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + WINDOW_S,
            **{f"{status}_at": self.times.get(status) for status in TIMED},
            # Keyed by the enum members, which are the field names `completed` and `failed`.
            "request_counts": {
                "total": len(self.lines) if self.errors is None else 0,
                BatchStatus.COMPLETED: self.answered,
                BatchStatus.FAILED: self.errored,
            },
            "metadata": self.metadata,
        }


class BatchStore:
    """Files and batches in memory, in creation order."""

    def __init__(self, host: BatchHost, limits: BatchLimits) -> None:
        self.host = host
        self.limits = limits
        self.files: dict[str, _File] = {}
        self.batches: OrderedDict[str, _Batch] = OrderedDict()

    def add_file(self, filename: str, purpose: str, content: bytes) -> _File:
        stored = _File(f"file-{uuid.uuid4().hex}", filename, purpose, content, int(time.time()))
        self.files[stored.id] = stored
        return stored

    def file(self, file_id: str) -> _File:
        found = self.files.get(file_id)
        if found is None:
            raise BatchError(404, f"No such File object: {file_id}", "file_not_found")
        return found

    def batch(self, batch_id: str) -> _Batch:
        found = self.batches.get(batch_id)
        if found is None:
            raise BatchError(404, f"No such Batch object: {batch_id}", "batch_not_found")
        return found

    def create(self, body: Any) -> _Batch:
        if not isinstance(body, dict):
            raise BatchError(400, "the request body must be a JSON object")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BatchError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if body.get("completion_window") != "24h":
            raise BatchError(400, "completion_window must be '24h'")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise BatchError(400, "metadata must be an object")
        source = self.file(str(body.get("input_file_id")))
        if source.purpose != "batch":
            raise BatchError(400, "the input file's purpose must be 'batch'")
        now = int(time.time())
        lines, errors = self._read_input(source.content, str(endpoint))
        fault = self.host.pick_batch_fault()
        if fault is not None and fault.kind == "validation_failed":
            errors = [{"code": "invalid_request", "message": "injected fault", "param": None}]
        batch = _Batch(
            f"batch_{uuid.uuid4().hex}", source.id, str(endpoint), metadata, now, lines, fault
        )
        if errors:
            batch.status, batch.errors = BatchStatus.FAILED, errors
            batch.times[BatchStatus.FAILED] = now
        else:
            batch.status = BatchStatus.IN_PROGRESS
            batch.times[BatchStatus.IN_PROGRESS] = now
            batch.ready_at = time.monotonic() + self.host.batch_delay_s
        self.batches[batch.id] = batch
        self.host.count_batch("batches_created")
        return batch

    def _read_input(
        self, content: bytes, endpoint: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        errors: list[dict[str, Any]] = []

        def error(code: str, message: str, line: int | None = None) -> None:
            if len(errors) < 100:
                errors.append({"code": code, "message": message, "param": None, "line": line})

        if len(content) > self.limits.max_bytes:
            error("file_too_large", f"the input file is over {self.limits.max_bytes} bytes")
            return [], errors
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(content.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                error("invalid_json_line", "this line is not JSON", number)
                continue
            if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
                error("invalid_request", "a line needs an object `body`", number)
                continue
            custom = line.get("custom_id")
            if not isinstance(custom, str) or custom in seen:
                error("duplicate_custom_id", "custom_id must be a unique string", number)
                continue
            if line.get("method") != "POST" or line.get("url") != endpoint:
                error("invalid_url", f"each line must POST to {endpoint}", number)
                continue
            seen.add(custom)
            lines.append(line)
        if len(lines) > self.limits.max_requests:
            error(
                "too_many_requests", f"the input file has over {self.limits.max_requests} requests"
            )
        if not lines and not errors:
            error("empty_file", "the input file has no request")
        return lines, errors

    def advance(self, batch: _Batch) -> _Batch:
        """Run a batch whose time has come (unless a `stuck` fault holds it)."""
        if batch.status != BatchStatus.IN_PROGRESS:
            return batch
        fault = batch.fault
        if fault is not None and fault.kind == "stuck":
            batch.polls += 1
            held = fault.polls is None and self.host.holds_batch_fault(fault)
            if held or (fault.polls is not None and batch.polls <= fault.polls):
                return batch
        if time.monotonic() < batch.ready_at:
            return batch
        self._run(batch)
        return batch

    def _run(self, batch: _Batch) -> None:
        fault = batch.fault
        every = fault.line_every if fault is not None else 1
        answered = len(batch.lines)
        if fault is not None and fault.kind == "expired":
            answered = len(batch.lines) - len(batch.lines) // every
        output: list[bytes] = []
        failed: list[bytes] = []
        for number, line in enumerate(batch.lines):
            entry: dict[str, Any] = {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": line["custom_id"],
                "response": None,
                "error": None,
            }
            if number >= answered:
                entry["error"] = {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion "
                    "window expired.",
                }
                failed.append(_jsonl(entry))
                continue
            if fault is not None and fault.kind == "partial_failure" and number % every == 0:
                status, body = (
                    500,
                    {
                        "error": {
                            "message": "The server had an error processing your request "
                            "(injected fault).",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )
            else:
                status, body = self.host.answer_line(line["body"])
            entry["response"] = {
                "status_code": status,
                "request_id": f"req_{uuid.uuid4().hex}",
                "body": body,
            }
            if status == 200:
                output.append(_jsonl(entry))
                self.host.count_batch("batch_lines_answered")
            else:
                failed.append(_jsonl(entry))
        now = int(time.time())
        batch.answered, batch.errored = len(output), len(failed)
        if output:
            batch.output_file_id = self.add_file(
                f"{batch.id}_output.jsonl", "batch_output", b"".join(output)
            ).id
        if failed:
            batch.error_file_id = self.add_file(
                f"{batch.id}_error.jsonl", "batch_output", b"".join(failed)
            ).id
        batch.times[BatchStatus.FINALIZING] = now
        if fault is not None and fault.kind == "expired":
            batch.status = BatchStatus.EXPIRED
            batch.times[BatchStatus.EXPIRED] = now
        else:
            batch.status = BatchStatus.COMPLETED
            batch.times[BatchStatus.COMPLETED] = now

    def cancel(self, batch: _Batch) -> _Batch:
        if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            raise BatchError(
                409, f"Cannot cancel a batch with status {batch.status}.", "batch_not_cancellable"
            )
        now = int(time.time())
        batch.status = BatchStatus.CANCELLED
        batch.times[BatchStatus.CANCELLING] = batch.times[BatchStatus.CANCELLED] = now
        self.host.count_batch("batches_cancelled")
        return batch

    def page(self, after: str | None, limit: int) -> dict[str, Any]:
        ordered = list(reversed(self.batches.values()))
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        shown = [self.advance(b).as_dict() for b in ordered[:limit]]
        return {
            "object": "list",
            "data": shown,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None,
            "has_more": len(ordered) > limit,
        }


def _jsonl(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def read_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes). Parsed with the
    standard library's email parser (the service adds no multipart dependency)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BatchError(400, "the body must be multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise BatchError(400, "the multipart body has no parts (is the boundary right?)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def mount_batches(app: FastAPI, host: BatchHost, limits: BatchLimits) -> BatchStore:
    """Add the Files and Batches routes to the rules critic's app."""
    store = BatchStore(host, limits)
    app.state.batches = store

    @app.post("/v1/files")
    async def upload_file(request: Request) -> Response:
        """Upload a file (multipart/form-data: `file`, `purpose`)."""
        try:
            fields = read_multipart(request.headers.get("content-type", ""), await request.body())
            if "file" not in fields:
                raise BatchError(400, "the form has no `file` field")
            purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
            if purpose not in ("batch", "batch_output"):
                raise BatchError(400, "purpose must be 'batch'")
        except BatchError as exc:
            return exc.response()
        filename, content = fields["file"]
        stored = store.add_file(filename or "upload.jsonl", purpose, content)
        host.count_batch("files_uploaded")
        return JSONResponse(stored.as_dict())

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> Response:
        """A file's object."""
        try:
            return JSONResponse(store.file(file_id).as_dict())
        except BatchError as exc:
            return exc.response()

    @app.get("/v1/files/{file_id}/content")
    async def get_file_content(file_id: str) -> Response:
        """A file's bytes."""
        try:
            stored = store.file(file_id)
        except BatchError as exc:
            return exc.response()
        return Response(stored.content, media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        """Create a batch from an uploaded input file."""
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as exc:
                raise BatchError(400, f"the request body is not valid JSON: {exc}") from exc
            return JSONResponse(store.create(body).as_dict())
        except BatchError as exc:
            return exc.response()

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> Response:
        """A batch, run first if its time has come."""
        try:
            return JSONResponse(store.advance(store.batch(batch_id)).as_dict())
        except BatchError as exc:
            return exc.response()

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        """Cancel a batch not yet ended."""
        try:
            return JSONResponse(store.cancel(store.batch(batch_id)).as_dict())
        except BatchError as exc:
            return exc.response()

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20) -> Response:
        """Batches, newest first."""
        return JSONResponse(store.page(after, max(1, min(limit, LIST_LIMIT))))

    return store
