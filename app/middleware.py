"""The guard around every HTTP request: bounded bodies, strict JSON, and errors that never
drop the connection.

Before the application sees a request:
- its body is bounded by the limit of its route (`body_limit_for`): a `Content-Length` past
  it is refused with 413 before a byte of the body is read, and a body sent without one is
  refused as soon as it passes the limit, key or no key;
- a control body (anything but a trajectory upload) is read whole (it is small), and when it
  is JSON it must be strict JSON: no `NaN`/`Infinity`, no number out of range, no absurd
  nesting, and no NUL character in any string, each refused with where it is;
- a NUL character in the path or the query is refused (Postgres text cannot hold one).

After: an exception that no handler took becomes a JSON error response here, so that the
server never logs "Exception in ASGI application" and closes a kept-alive connection. A lost
database answers 503 `database_unavailable` with `Retry-After`; anything else 500
`internal_error`, logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import json_input
from app.config import Settings
from app.db import is_database_unavailable
from app.errors import (
    DatabaseUnavailableError,
    InternalError,
    InvalidJsonError,
    InvalidRequestError,
    PayloadTooLargeError,
    SrftError,
)
from app.json_input import JsonSyntaxError

log = logging.getLogger("srft")

MiB = 1024 * 1024
# A job or export may name its trajectories one by one: up to 100,000 ids of ~40 bytes.
SELECTION_BODY_BYTES = 8 * MiB
# The routes whose bodies may be larger than a control body (`Settings.max_body_bytes`).
UPLOAD_ROUTES = frozenset({("POST", "/v1/trajectories")})
SELECTION_ROUTES = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/exports")})
# A gold-set file: tens of thousands of human labels of ~200 bytes.
GOLD_SET_BODY_BYTES = 16 * MiB
GOLD_SET_ROUTES = frozenset({("POST", "/v1/human-labels/import")})
# Seconds a client should wait before trying again when the database is away.
RETRY_AFTER_S = 2
# Control bodies nest a few levels; anything deeper is not a request this service takes.
MAX_CONTROL_DEPTH = 32


def error_response(error: SrftError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one JSON shape of every error: `{"error": {"code", "message", "location"}}`."""
    extra = dict(headers or {})
    if isinstance(error, DatabaseUnavailableError):
        extra.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(status_code=error.status_code, content=error.to_dict(), headers=extra)


def body_limit_for(settings: Settings, method: str, path: str) -> int:
    """The largest body the route at `method path` accepts, in bytes."""
    if (method, path) in UPLOAD_ROUTES:
        return settings.max_upload_bytes
    if (method, path) in SELECTION_ROUTES:
        return max(SELECTION_BODY_BYTES, settings.max_body_bytes)
    if (method, path) in GOLD_SET_ROUTES:
        return max(GOLD_SET_BODY_BYTES, settings.max_body_bytes)
    return settings.max_body_bytes


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the body is larger than this endpoint accepts ({limit} bytes); trajectory uploads "
        "take up to SRFT_MAX_UPLOAD_BYTES, other bodies are small JSON documents",
        location="body",
    )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            digits = value.strip()
            # A length of more digits than any real body is simply too large.
            if digits.isdigit():
                return int(digits) if len(digits) <= 18 else 10**18
            return None
    return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media: str = bytes(value).decode("latin-1").split(";")[0].strip().lower()
            kind, _, subtype = media.partition("/")
            return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
    return False


def _nul_in_target(scope: Scope) -> SrftError | None:
    if "\x00" in scope.get("path", ""):
        return InvalidRequestError("the path holds a NUL character", location="path")
    query = scope.get("query_string", b"").decode("latin-1")
    if "%00" in query or "\x00" in query:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return InvalidRequestError(
                    "NUL characters are not allowed in query parameters",
                    location=f"query.{name.replace(chr(0), '')}",
                )
    return None


def _nul_path(value: Any, path: str = "body") -> str | None:
    """Where a NUL character sits in a parsed JSON value (key or string), or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return where
                stack.append((child, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{n}]") for n, child in enumerate(item))
    return None


def check_control_body(body: bytes, *, is_json: bool) -> None:
    """Refuse a control body that is not strict JSON (when it says it is JSON)."""
    if not is_json or not body:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidJsonError(
            "the body is not valid UTF-8", location=f"body, byte {error.start}"
        ) from None
    try:
        value = json_input.loads(text)
    except JsonSyntaxError as error:
        raise InvalidJsonError(
            f"malformed JSON: {error.message}", location=error.location
        ) from None
    deep = json_input.too_deep(value, MAX_CONTROL_DEPTH)
    if deep is not None:
        raise InvalidJsonError(
            f"the body nests more than {MAX_CONTROL_DEPTH} levels deep",
            location=f"body.{deep}",
        )
    where = _nul_path(value)
    if where is not None:
        raise InvalidRequestError(
            "NUL characters (\\u0000) are not allowed in text", location=where
        )


class RequestGuard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            receive = await self._guarded_receive(scope, receive, settings)
            await self.app(scope, receive, tracked_send)
        except SrftError as error:
            # Raised here, before the application ran, or from a body read past its limit.
            if started:
                raise
            await error_response(error)(scope, receive, send)
        except Exception as error:
            if started:
                raise  # the response is under way: only aborting it can tell the client
            if is_database_unavailable(error):
                log.warning(
                    "database unavailable on %s %s: %s", scope["method"], scope["path"], error
                )
                unavailable = DatabaseUnavailableError(
                    "the database is unavailable right now; nothing was changed. Try again "
                    f"in {RETRY_AFTER_S} s",
                )
                await error_response(unavailable)(scope, receive, send)
                return
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            internal = InternalError("internal server error; the request was not applied")
            await error_response(internal)(scope, receive, send)

    async def _guarded_receive(self, scope: Scope, receive: Receive, settings: Settings) -> Receive:
        problem = _nul_in_target(scope)
        if problem is not None:
            raise problem
        method, path = scope["method"], scope["path"]
        limit = body_limit_for(settings, method, path)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            raise _too_large(limit)
        if (method, path) in UPLOAD_ROUTES:
            return _counting(receive, limit)
        if method in ("GET", "HEAD", "OPTIONS") and not declared:
            return receive
        body = await _read_all(receive, limit)
        check_control_body(body, is_json=_is_json(scope))
        return _replay(body, receive)


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive`, raising 413 once the body passes `limit` (for bodies read as a stream)."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(limit)
        return message

    return counted


async def _read_all(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A receive that gives the buffered body once, then whatever the client sends next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
