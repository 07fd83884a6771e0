"""The helpers every importer shares (`formats/common.py`), on small hand-built values."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import InvalidTrajectoryError
from app.trajectories.formats.base import Document, Record
from app.trajectories.formats.common import (
    CallPairing,
    Run,
    decode_listish,
    find_function_schemas,
    first_run_value,
    function_schemas,
    iter_runs,
    parse_tool_calls,
    put,
    tool_call,
)


def test_an_array_is_several_runs_unless_one_run_says_otherwise() -> None:
    doc = Document(records=(Record([{"a": 1}, {"a": 2}]), Record({"a": 3}, line=2)))
    runs = list(iter_runs(doc))
    assert [(r.value, r.prefix, r.record.line) for r in runs] == [
        ({"a": 1}, "[0]", None),
        ({"a": 2}, "[1]", None),
        ({"a": 3}, "", 2),
    ]
    assert runs[1].at("history[3].role") == "[1].history[3].role"
    assert runs[1].at("") == "[1]"
    (single,) = iter_runs(Document(records=(Record([1, 2]),)), one_run=lambda value: True)
    assert (single.value, single.prefix) == ([1, 2], "")
    assert first_run_value(Document(records=(Record([]),))) is None
    assert first_run_value(Document(records=())) is None


def test_put_keeps_only_present_scalars() -> None:
    metadata: dict[str, Any] = {}
    for key, value in [("s", ""), ("i", 0), ("f", 1.5), ("b", False), ("n", None), ("l", [1])]:
        put(metadata, key, value)
    assert metadata == {"s": "", "i": 0, "f": 1.5, "b": False}


def test_decode_listish_reads_json_and_python_literals() -> None:
    assert decode_listish('["a", 1]') == ["a", 1]
    assert decode_listish("['a', 1]") == ["a", 1]
    assert decode_listish("not a list") == "not a list"
    assert decode_listish([1]) == [1]


def test_tool_call_encodes_arguments_as_a_json_string() -> None:
    assert tool_call("c", "f", None)["function"] == {"name": "f", "arguments": "{}"}
    assert tool_call("c", "f", '{"x": 1}')["function"]["arguments"] == '{"x": 1}'
    assert tool_call("c", "f", {"p": "é"})["function"]["arguments"] == '{"p": "é"}'
    ascii_only = tool_call("c", "f", {"p": "é"}, ensure_ascii=True)
    assert ascii_only == {
        "id": "c",
        "type": "function",
        "function": {"name": "f", "arguments": '{"p": "\\u00e9"}'},
    }


def test_parse_tool_calls_accepts_loose_shapes_and_makes_ids_unique() -> None:
    run = Run(Record({}), {}, "[4]")
    raw = repr([{"id": "a", "function": {"name": "f"}}, {"id": "a", "name": "g", "arguments": {}}])
    calls = parse_tool_calls(raw, run, "history[1].tool_calls", "call_x")
    assert [(c["id"], c["function"]["name"]) for c in calls] == [("a", "f"), ("a_1", "g")]
    (bare,) = parse_tool_calls({"name": "h", "arguments": {"q": "é"}}, run, "p", "call_x")
    assert bare["id"] == "call_x_0"
    assert bare["function"]["arguments"] == '{"q": "\\u00e9"}'
    assert parse_tool_calls("[]", run, "p", "call_x") == []
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_tool_calls([{"id": "a", "function": {}}], run, "p", "call_x")
    assert caught.value.location == "[4].p[0].function.name"


def test_call_pairing_answers_named_calls_or_the_oldest_open_one() -> None:
    pairing = CallPairing()
    pairing.expect([{"id": "a"}, {"id": "b"}])
    assert pairing.answer(["b"]) == ["b"]
    assert pairing.answer(["unknown"]) == ["a"]
    assert pairing.answer([]) == []


WRAPPED = {"type": "function", "function": {"name": "f", "parameters": {}}}
BARE = {"name": "g", "description": "d", "extra": 1}


def test_strict_schemas_are_all_or_nothing_and_kept_whole() -> None:
    assert function_schemas([WRAPPED, BARE], strict=True) == [
        WRAPPED,
        {"type": "function", "function": BARE},
    ]
    assert function_schemas([WRAPPED, {"name": "no schema"}], strict=True) is None
    assert function_schemas([WRAPPED, "x"], strict=True) is None
    assert function_schemas([], strict=True) is None
    config = {"agent": {"tools": {"bundles": ["a"], "tools": [WRAPPED]}}}
    assert find_function_schemas(config) == [WRAPPED]


def test_loose_schemas_skip_what_describes_no_function() -> None:
    custom = {"type": "custom", "function": {"name": "c"}}
    assert function_schemas([WRAPPED, BARE, "x", {"no": "name"}, custom], strict=False) == [
        WRAPPED,
        {"type": "function", "function": {"name": "g", "description": "d"}},
        custom,
    ]
    assert function_schemas(["x"], strict=False) is None
    assert function_schemas("not a list", strict=False) is None
