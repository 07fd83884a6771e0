"""Gold sets as files: human labels as JSON Lines, one label a line, that travel between
projects and services.

A line names its step by the trajectory's `content_hash` (the same run uploaded anywhere has
the same hash) and `step_index`, and carries `label`, `note`, `author` and, for people reading
the file, `task_id` (ignored on import). Pure: parsing checks each line's shape and says which
line and field is wrong; whether the step and the label exist is the service's question.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app import json_input
from app.errors import SrftError

FIELDS = ("content_hash", "step_index", "label", "note", "author", "task_id")
MAX_LABEL_CHARS = 64
MAX_NOTE_CHARS = 10_000
MAX_AUTHOR_CHARS = 200
MAX_TASK_ID_CHARS = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class InvalidGoldSetError(SrftError):
    status_code = 422
    code = "invalid_gold_set"


@dataclass(frozen=True)
class GoldLine:
    """One human label of a gold-set file; `line` is its 1-based line number."""

    line: int
    content_hash: str
    step_index: int
    label: str
    note: str | None
    author: str | None


def format_line(
    content_hash: str,
    step_index: int,
    label: str,
    note: str | None,
    author: str,
    task_id: str | None,
) -> bytes:
    """One line of a gold-set file, newline included."""
    row: dict[str, Any] = {
        "content_hash": content_hash,
        "step_index": step_index,
        "label": label,
        "note": note,
        "author": author,
    }
    if task_id is not None:
        row["task_id"] = task_id
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _bad(line: int, name: str, message: str) -> InvalidGoldSetError:
    return InvalidGoldSetError(f"line {line}: {message}", location=f"line {line}: {name}")


def _text(
    row: Mapping[str, Any], name: str, line: int, *, limit: int, required: bool
) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise _bad(line, name, f"{name} is missing")
        return None
    if not isinstance(value, str):
        raise _bad(line, name, f"{name} must be a string")
    if required and not value:
        raise _bad(line, name, f"{name} is empty")
    if len(value) > limit:
        raise _bad(line, name, f"{name} is longer than {limit} characters")
    if "\x00" in value:
        raise _bad(line, name, "NUL characters are not allowed in text")
    return value


def parse_line(text: str, line: int) -> GoldLine:
    """One non-blank line, or InvalidGoldSetError naming the line and the field."""
    try:
        row = json_input.loads(text)
    except json_input.JsonSyntaxError as error:
        raise InvalidGoldSetError(
            f"line {line}: not valid JSON: {error.message}",
            location=f"line {line}, column {error.column}",
        ) from None
    if not isinstance(row, dict):
        raise InvalidGoldSetError(f"line {line}: not a JSON object", location=f"line {line}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise _bad(line, unknown[0], f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    content_hash = _text(row, "content_hash", line, limit=64, required=True)
    if content_hash is None or not _SHA256.fullmatch(content_hash):
        raise _bad(line, "content_hash", "content_hash must be 64 lowercase hex digits (a sha256)")
    step_index = row.get("step_index")
    # bool is an int in Python; a step index never is one.
    if type(step_index) is not int or step_index < 0:
        raise _bad(line, "step_index", "step_index must be an integer of at least 0")
    label = _text(row, "label", line, limit=MAX_LABEL_CHARS, required=True)
    assert label is not None
    _text(row, "task_id", line, limit=MAX_TASK_ID_CHARS, required=False)
    return GoldLine(
        line=line,
        content_hash=content_hash,
        step_index=step_index,
        label=label,
        note=_text(row, "note", line, limit=MAX_NOTE_CHARS, required=False),
        author=_text(row, "author", line, limit=MAX_AUTHOR_CHARS, required=False) or None,
    )


def parse(body: bytes) -> list[GoldLine]:
    """Every label of a gold-set file (blank lines skipped); the first bad line, or a step
    named twice, is an InvalidGoldSetError and nothing is returned."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        line = body.count(b"\n", 0, error.start) + 1
        raise InvalidGoldSetError(
            f"line {line}: not valid UTF-8", location=f"line {line}"
        ) from None
    found: list[GoldLine] = []
    seen: dict[tuple[str, int], int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        parsed = parse_line(raw, number)
        step = (parsed.content_hash, parsed.step_index)
        if step in seen:
            raise _bad(number, "step_index", f"the same step as line {seen[step]}")
        seen[step] = number
        found.append(parsed)
    return found
