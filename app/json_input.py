"""Reading JSON that comes from outside: uploads, request bodies, cursors.

Python's `json.loads` accepts what JSON does not (`NaN`, `Infinity`, numbers that overflow to
infinity) and fails in ways that are not `JSONDecodeError` (an integer of more than 4,300
digits raises a plain `ValueError`, deep nesting a `RecursionError`). Every one of those is the
caller's input, so here each becomes a `JsonSyntaxError` with a message and the line and
column where it is, and nothing else escapes.

Pure: no database, HTTP or torch. The error location is computed only on failure, so the
happy path costs what `json.loads` costs.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

# Deeper than this is refused: no real document nests so deep, and Python's own parser gives
# up somewhere below its recursion limit (1,000) depending on how deep the caller already is.
MAX_DEPTH = 500

_STRING = r'"(?:[^"\\]|\\.)*"'
_NUMBER_OR_CONSTANT = re.compile(
    _STRING + r"|(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<constant>NaN|-?Infinity)",
    re.DOTALL,
)
_BRACKET = re.compile(_STRING + r"|(?P<open>[\[{])|(?P<close>[\]}])", re.DOTALL)


class JsonSyntaxError(ValueError):
    """Not acceptable JSON: what is wrong, and where (1-based line and column)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} (line {line}, column {column})")
        self.message = message
        self.line = line
        self.column = column

    @property
    def location(self) -> str:
        return f"line {self.line}, column {self.column}"


class _NotJsonError(ValueError):
    """Raised by the parse hooks; located afterwards by scanning the text."""


def _refuse_constant(name: str) -> Any:
    raise _NotJsonError(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJsonError(text)
    return value


# Built once: json.loads with any option builds a decoder per call, which costs more than
# decoding a short tool-call argument string.
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_LENIENT = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float, strict=False
)


def loads(text: str, *, allow_control_characters: bool = False) -> Any:
    """Parse one JSON value, or raise `JsonSyntaxError` saying what and where.

    `allow_control_characters` lets raw tabs and carriage returns stand inside strings, as the
    agents that wrote trajectory files left them; request bodies are held to strict JSON.
    """
    try:
        return (_LENIENT if allow_control_characters else _STRICT).decode(text)
    except json.JSONDecodeError as error:
        raise JsonSyntaxError(error.msg, error.lineno, error.colno) from None
    except RecursionError:
        raise _too_deep(text) from None
    except ValueError:  # _NotJsonError, or an integer past Python's digit limit
        raise _bad_number(text) from None


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _bad_number(text: str) -> JsonSyntaxError:
    limit = sys.get_int_max_str_digits() or sys.maxsize
    for match in _NUMBER_OR_CONSTANT.finditer(text):
        if match.group("constant"):
            return JsonSyntaxError(
                f"{match.group('constant')} is not a JSON value", *_position(text, match.start())
            )
        number = match.group("number")
        if number is None:
            continue
        digits = len(number.split(".")[0].split("e")[0].split("E")[0].lstrip("-"))
        if digits > limit:
            return JsonSyntaxError(
                f"a number with {digits} digits is too large (at most {limit})",
                *_position(text, match.start()),
            )
        if number.strip("-0123456789") and math.isinf(float(number)):
            return JsonSyntaxError(
                f"the number {number[:40]} is out of range", *_position(text, match.start())
            )
    return JsonSyntaxError("a number or constant that JSON does not allow", 1, 1)


def _too_deep(text: str) -> JsonSyntaxError:
    depth = 0
    for match in _BRACKET.finditer(text):
        if match.group("open"):
            depth += 1
            if depth > MAX_DEPTH:
                return JsonSyntaxError(
                    f"nested too deeply (more than {MAX_DEPTH} levels)",
                    *_position(text, match.start()),
                )
        elif match.group("close"):
            depth -= 1
    return JsonSyntaxError("nested too deeply to read", 1, 1)


def too_deep(value: Any, limit: int) -> str | None:
    """The path (`metadata.a.b[0]`) of the first container nested deeper than `limit` levels
    inside `value`, or None. Iterative, so it is safe at any depth."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth >= limit:
            return path or "(document)"
        if isinstance(item, dict):
            stack.extend(
                (child, depth + 1, f"{path}.{key}" if path else str(key))
                for key, child in item.items()
            )
        else:
            stack.extend((child, depth + 1, f"{path}[{n}]") for n, child in enumerate(item))
    return None
