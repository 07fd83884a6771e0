"""Schemathesis hooks for tests/test_fuzz.py: make generated requests hostile.

Schemathesis generates values that fit the schema (or break it in plain ways); the defects
that reach a 500 are usually the values between: numbers that JSON allows but Python or a
database cannot hold, `NaN`, NUL characters, cursors that decode to the wrong thing, absurd
`Range` headers. Half of the cases get one of those spliced into their query, headers, path
or JSON body. Loaded with `SCHEMATHESIS_HOOKS=tests.fuzz_hooks`.
"""

from __future__ import annotations

import base64
import copy
import sys
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import strategies as st

# The client must be able to send the integers the server has to refuse.
sys.set_int_max_str_digits(0)


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# NaN and infinities cannot be sent through the client's JSON encoder; tests/test_middleware.py
# sends them raw.
NUMBERS: list[Any] = [10**30, -(10**30), 10**5000, 2**63, -(2**63) - 1, 1e308]
# Query strings stay under the 8 KB that servers and proxies accept in a request line.
STRINGS = [
    "\x00",
    "a\x00b",
    "x" * 6000,
    "<|im_start|>system",
    "../../etc/passwd",
    "/proc/self/environ",
    "\ud7ff\ue000\U0010ffff",
]
CURSORS = [
    _b64(str(10**30)),
    _b64("true"),
    _b64("[" * 3000),
    _b64('["00000000-0000-0000-0000-000000000000", 99999999999999999999999]'),
    _b64("[NaN]"),
    _b64("{}"),
    "=" * 10,
    "A" * 10_000,
]
RANGES = [
    "bytes=0-" + "9" * 5000,
    "bytes=" + "9" * 5000 + "-",
    "bytes=-" + "9" * 5000,
    "bytes=99999999999999999999-",
    "bytes=5-1",
    "bytes=0-0,1-1",
    "items=0-1",
]

Mutation = Callable[[Any], None]


def _leaf_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        found = [(*path, key) for key in value]
        for key, child in value.items():
            found += _leaf_paths(child, (*path, key))
        return found
    if isinstance(value, list):
        found = [(*path, n) for n in range(len(value))]
        for n, child in enumerate(value):
            found += _leaf_paths(child, (*path, n))
        return found
    return []


def _set(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


@st.composite
def _hostile(draw: st.DrawFn, case: Any) -> Any:
    if not draw(st.booleans()):
        return case
    mutated = case  # a fresh case per draw: changed in place, its body copied first
    choice = draw(st.sampled_from(["body", "query", "range", "path"]))
    if choice == "body" and isinstance(mutated.body, dict | list):
        paths = _leaf_paths(mutated.body)
        if paths:
            body = copy.deepcopy(mutated.body)
            value = draw(st.sampled_from([*NUMBERS, *STRINGS, "y" * 300_000]))
            _set(body, draw(st.sampled_from(paths)), value)
            mutated.body = body
            return mutated
    if choice in ("query", "body"):
        query = dict(mutated.query or {})
        name = draw(st.sampled_from(["cursor", "limit", "task_id", "source_format", "format"]))
        pool = CURSORS if name == "cursor" else STRINGS + [str(n) for n in NUMBERS[:4]]
        query[name] = draw(st.sampled_from(pool))
        mutated.query = query
        return mutated
    if choice == "range":
        mutated.headers = {
            **(mutated.headers or {}),
            "Range": draw(st.sampled_from(RANGES)),
            "If-Range": draw(st.sampled_from(['"x"', 'W/"1"', "9" * 100])),
        }
        return mutated
    if mutated.path_parameters:
        name = draw(st.sampled_from(sorted(mutated.path_parameters)))
        mutated.path_parameters = {
            **mutated.path_parameters,
            name: draw(st.sampled_from(["9" * 40, "-1", "%00", "..", "a" * 4000])),
        }
    return mutated


@schemathesis.hook
def flatmap_case(context: schemathesis.HookContext, case: Any) -> Any:
    return _hostile(case)
