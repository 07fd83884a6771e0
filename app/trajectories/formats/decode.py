"""Turn the raw bytes of one upload into a `Document`, with errors that say where.

A body is JSON (one value) or JSON Lines (one value per non-empty line). JSONL is chosen when
the caller says so (`application/x-ndjson`), or when the body is not one JSON value but its
first non-empty line is. A JSONL body with bad lines is rejected whole, listing every bad line.
"""

from __future__ import annotations

from typing import Any

from app import json_input
from app.errors import InvalidEncodingError, InvalidJsonError
from app.json_input import JsonSyntaxError
from app.trajectories.formats.base import Document, Record

_MAX_LISTED_BAD_LINES = 50


def decode_text(raw: bytes) -> str:
    """UTF-8 (a leading BOM is dropped); an invalid byte is reported by line and column."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidEncodingError(
            f"the body is not valid UTF-8: byte 0x{raw[exc.start]:02x} cannot be decoded",
            location=f"line {line}, column {column}",
        ) from None


def _loads(text: str) -> Any:
    # Raw control characters (tabs, CRs from terminals) may stand inside strings, as the
    # agents that wrote these files left them.
    return json_input.loads(text, allow_control_characters=True)


def decode_document(raw: bytes, *, lines: bool | None = None) -> Document:
    """Decode one upload. `lines=True` forces JSONL, `False` forces JSON, `None` guesses."""
    text = decode_text(raw)
    if not text.strip():
        raise InvalidJsonError("the body is empty", location="line 1, column 1")
    if lines is not True:
        try:
            return Document(records=(Record(_loads(text)),))
        except JsonSyntaxError as exc:
            if lines is False or not _looks_like_lines(text):
                raise InvalidJsonError(
                    f"malformed JSON: {exc.message}", location=exc.location
                ) from None
    return _decode_lines(text)


def _looks_like_lines(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            try:
                _loads(line)
            except JsonSyntaxError:
                return False
            return True
    return False


def _decode_lines(text: str) -> Document:
    records: list[Record] = []
    bad: list[dict[str, Any]] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # are legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(_loads(line), line=number))
        except JsonSyntaxError as exc:
            bad.append({"line": number, "column": exc.column, "message": exc.message})
    if bad:
        listed = ", ".join(
            f"line {b['line']} column {b['column']}: {b['message']}"
            for b in bad[:_MAX_LISTED_BAD_LINES]
        )
        more = (
            f" (and {len(bad) - _MAX_LISTED_BAD_LINES} more)"
            if len(bad) > _MAX_LISTED_BAD_LINES
            else ""
        )
        raise InvalidJsonError(
            f"{len(bad)} of {len(bad) + len(records)} JSON Lines records are malformed; "
            f"nothing was stored: {listed}{more}",
            location=", ".join(f"line {b['line']}" for b in bad[:_MAX_LISTED_BAD_LINES]),
            code="invalid_jsonl",
            details={"bad_lines": bad},
        )
    return Document(records=tuple(records), is_lines=True)
