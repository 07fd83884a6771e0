"""Page cursors: the one codec every paged endpoint uses.

A cursor is opaque to clients (base64url of a short JSON array of the last row's sort key) and
is checked here, once, before any of it reaches a query: its length, its encoding, and each
value's type and range. Anything else is a 422 `invalid_cursor` at `query.cursor`, never an
error from the database.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from app import json_input
from app.errors import InvalidCursorError

# Every cursor this service issues is far shorter; longer ones are refused before decoding.
MAX_CURSOR_CHARS = 256
# Integer keys are 64-bit database ids or step indices.
MAX_INT = 2**63 - 1

# The most items a page may hold, by what an item is, so that endpoints listing the same kind
# of item agree. A row per step (a verdict, a disagreement) is small; a trajectory summary or an
# export (with its manifest) is larger.
MAX_STEP_PAGE = 1000
MAX_TRAJECTORY_PAGE = 100
MAX_EXPORT_PAGE = 200
# A job with its counts, histogram and usage (a few reads of its running totals).
MAX_JOB_PAGE = 100

CursorValue = int | uuid.UUID


def encode_cursor(*values: CursorValue) -> str:
    """The cursor for a page that continues after a row with these key values."""
    plain = [str(value) if isinstance(value, uuid.UUID) else value for value in values]
    raw = json.dumps(plain, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *kinds: type[int] | type[uuid.UUID]) -> tuple[Any, ...]:
    """The key values of `cursor`, one per kind (`int` or `uuid.UUID`), or InvalidCursorError."""
    invalid = InvalidCursorError(
        "invalid cursor: pass back the next_cursor of a previous page unchanged",
        location="query.cursor",
    )
    if len(cursor) > MAX_CURSOR_CHARS:
        raise invalid
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        value = json_input.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    if not isinstance(value, list) or len(value) != len(kinds):
        raise invalid
    decoded: list[Any] = []
    for item, kind in zip(value, kinds, strict=True):
        if kind is int:
            # bool is an int in Python; a cursor never holds one.
            if type(item) is not int or not 0 <= item <= MAX_INT:
                raise invalid
            decoded.append(item)
        else:
            if not isinstance(item, str):
                raise invalid
            try:
                decoded.append(uuid.UUID(item))
            except ValueError:
                raise invalid from None
    return tuple(decoded)
