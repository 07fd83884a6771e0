"""The `openai` importer: the real chat-transcript files, and small hand-built inputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.errors import InvalidTrajectoryError
from app.recipe.steps import split_steps
from app.trajectories.formats import openai_messages, parse_upload
from app.trajectories.formats.base import Trajectory
from app.trajectories.formats.decode import decode_document
from tests.helpers import trajectory_file
from tests.trajectories.formats import checks
from tests.trajectories.formats.checks import assert_paired, load, parse_value, step_counts

SWE_GYM = "openai-messages/adp__swe-gym-openhands__sample_raw@68dc74c.json"
SWE_SMITH = "openai-messages/adp__swe-smith__sample_raw@dc1a8b7.json"
ASTROPY = (
    "openai-messages/"
    "oh-llm-completion__claude-3-5-sonnet__astropy__astropy-12907__1733339462.430701.json"
)
DJANGO = (
    "openai-messages/"
    "oh-llm-completion__claude-3-5-sonnet__django__django-11149__1733345113.2722712.json"
)


def parse_file(relative: str) -> list[Trajectory]:
    return checks.parse_file(relative, "openai")


# ---------------------------------------------------------------- the real files


def test_swe_gym_rows() -> None:
    runs = parse_file(SWE_GYM)
    assert step_counts(runs) == [6, 4, 4]  # PROVENANCE: moto-5321 = 6, 5699 = 4, 7495 = 4
    assert [r.task_id for r in runs] == [
        "getmoto__moto-5321",
        "getmoto__moto-5699",
        "getmoto__moto-7495",
    ]
    assert [r.resolved for r in runs] == [False, False, False]
    for index, run in enumerate(runs):
        # Each row stops after an unanswered call (the agent hit its limit with an empty patch).
        assert_paired(run, last_observed=False)
        assert "<pr_description>" in run.messages[1]["content"]
        tools = [m for m in run.messages if m["role"] == "tool"]
        assert all(m["content"].startswith("OBSERVATION:\n") for m in tools)
        assert {t["function"]["name"] for t in run.tools or []} == {
            "execute_bash",
            "finish",
            "str_replace_editor",
        }
        assert run.metadata["variant"] == "swe-gym"
        assert run.metadata["submission"] == ""  # empty_generation: true
        assert run.metadata["run_index"] == index
        assert run.metadata["run_id"].startswith("gpt-4o-2024-08-06")


def test_swe_smith_rows_keep_inline_calls_and_ignore_the_patch_column() -> None:
    runs = parse_file(SWE_SMITH)
    rows = load(SWE_SMITH)
    assert step_counts(runs) == [15, 23, 18, 22, 38]  # PROVENANCE, assistant messages
    assert all(run.resolved is True for run in runs)
    assert [r.task_id for r in runs] == [row["instance_id"] for row in rows]
    for run, row in zip(runs, rows, strict=True):
        assert [m["role"] for m in run.messages] == [m["role"] for m in row["messages"]]
        assistant = [m["content"] for m in run.messages if m["role"] == "assistant"]
        assert assistant == [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert not any("tool_calls" in m for m in run.messages)
        assert run.metadata["model"] == row["model"]
        assert run.metadata["traj_id"] == row["traj_id"]
        assert "submission" not in run.metadata
        assert row["patch"] not in run.metadata.values()
        # The run ends with `<function=submit>`, which gets no observation.
        assert_paired(run, last_observed=False)
        steps = split_steps(run.messages)
        assert steps[-1].tool_names == ("submit",)
        # Every turn writes one inline call, which the steps code reads from the text.
        assert all(len(step.tool_names) == 1 for step in steps)


def test_llm_completions_file_appends_the_response() -> None:
    (run,) = parse_file(ASTROPY)
    raw = load(ASTROPY)
    # PROVENANCE: 10 = 9 assistant turns in `messages` + `response`.
    assert step_counts([run]) == [10]
    final = raw["response"]["choices"][0]["message"]
    assert run.messages[-1]["content"] == final["content"]
    assert run.messages[-1]["tool_calls"][0]["function"]["name"] == "finish"
    assert len(run.messages) == len(raw["messages"]) + 1
    assert_paired(run, last_observed=False)  # `finish` is the last call and gets no answer
    # The one turn without a tool call is answered by OpenHands' injected user message.
    text_steps = [s for s in split_steps(run.messages) if not s.tool_names]
    assert len(text_steps) == 1
    (answer,) = text_steps[0].observation_indices
    assert run.messages[answer]["content"].startswith("Please continue working on the task")
    assert run.messages[0]["content"].startswith("You are OpenHands agent")
    assert run.metadata["model"] == "litellm_proxy/claude-3-5-sonnet-20241022"
    assert run.metadata["cost"] == raw["cost"]
    assert {t["function"]["name"] for t in run.tools or []} == {
        "execute_bash",
        "finish",
        "str_replace_editor",
    }
    assert run.resolved is None  # the evaluation is in a separate file
    assert run.task_id is None


def test_llm_completions_file_with_missing_and_null_contents() -> None:
    (run,) = parse_file(DJANGO)
    assert step_counts([run]) == [50]  # PROVENANCE: the 50-iteration cap
    assert_paired(run, last_observed=False)
    raw = load(DJANGO)
    missing = [i for i, m in enumerate(raw["messages"]) if "content" not in m]
    assert missing
    assert all(run.messages[i]["content"] is None for i in missing)


@pytest.mark.parametrize("relative", [SWE_GYM, SWE_SMITH, ASTROPY, DJANGO])
def test_every_file_is_detected_as_openai(relative: str) -> None:
    doc = decode_document(trajectory_file(relative).read_bytes())
    assert openai_messages.IMPORTER.sniff(doc) is None
    assert {run.source_format for run in parse_file(relative)} == {"openai"}


# ---------------------------------------------------------------- hand-built inputs


def _call(call_id: str, command: str = "ls") -> dict[str, Any]:
    arguments = json.dumps({"command": command})
    return {"id": call_id, "type": "function", "function": {"name": "bash", "arguments": arguments}}


def _run(*extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "be careful"},
            {"role": "user", "content": "fix it"},
            {"role": "assistant", "content": "look", "tool_calls": [_call("c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.py"},
            *extra,
        ]
    }


def _error(value: Any, raw: bytes | None = None) -> InvalidTrajectoryError:
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(raw if raw is not None else json.dumps(value).encode())
    return caught.value


def test_canonical_object_keeps_its_fields() -> None:
    item = _run() | {"task_id": "t-9", "resolved": True, "metadata": {"model": "m"}}
    item["tools"] = [{"type": "function", "function": {"name": "bash", "parameters": {}}}]
    (run,) = parse_value(item)
    assert run.messages == item["messages"]
    assert (run.task_id, run.resolved) == ("t-9", True)
    assert run.metadata == {"model": "m", "run_index": 0}
    assert run.tools == item["tools"]


def test_bare_message_list_is_one_run() -> None:
    runs = parse_value(_run()["messages"])
    assert len(runs) == 1
    assert step_counts(runs) == [1]


def test_jsonl_runs_are_numbered_from_zero() -> None:
    body = "\n".join(json.dumps(_run() | {"task_id": f"t{i}"}) for i in range(3)).encode()
    runs = parse_upload(body)
    assert [(r.task_id, r.metadata["run_index"]) for r in runs] == [("t0", 0), ("t1", 1), ("t2", 2)]


def test_invalid_role_is_rejected_with_its_location() -> None:
    item = _run({"role": "exit", "content": "diff"})
    error = _error(item)
    assert error.location == "messages[4].role"
    assert "'exit'" in error.message


def test_developer_role_is_the_system_role() -> None:
    item = _run()
    item["messages"][0]["role"] = "developer"
    (run,) = parse_value(item)
    assert run.messages[0] == {"role": "system", "content": "be careful"}


def test_tool_message_for_an_unknown_call_is_rejected() -> None:
    runs = [_run(), _run(), _run({"role": "tool", "tool_call_id": "nope", "content": "?"})]
    error = _error(runs)
    assert error.location == "[2].messages[4].tool_call_id"
    assert "'nope'" in error.message


def test_tool_message_answering_twice_is_rejected_in_jsonl() -> None:
    again = _run({"role": "tool", "tool_call_id": "c1", "content": "again"})
    body = (json.dumps(_run()) + "\n" + json.dumps(again)).encode()
    error = _error(None, body)
    assert error.location == "line 2: messages[4].tool_call_id"
    assert "answered at messages[3]" in error.message


def test_a_call_id_reused_by_a_later_turn_may_be_answered_again() -> None:
    later = {"role": "assistant", "content": None, "tool_calls": [_call("c1", "pwd")]}
    (run,) = parse_value(_run(later, {"role": "tool", "tool_call_id": "c1", "content": "/"}))
    assert_paired(run, last_observed=True)


def test_run_must_start_with_the_task() -> None:
    item = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]}
    assert _error(item).location == "messages[1].role"


def test_resolved_must_be_a_boolean() -> None:
    assert _error(_run() | {"resolved": "yes"}).location == "resolved"


def test_llm_completions_shape_is_normalised() -> None:
    cached = {"type": "text", "text": "fix it", "cache_control": {"type": "ephemeral"}}
    item = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": [cached]},
            {"role": "assistant", "tool_calls": [_call("c1") | {"index": 0}]},
            {"role": "tool", "tool_call_id": "c1", "name": "bash", "content": [cached]},
        ],
        "response": {
            "model": "m-7",
            "choices": [{"message": {"content": "done", "role": "assistant"}}],
        },
        "kwargs": {"tools": [{"type": "function", "function": {"name": "bash"}}]},
        "timestamp": 1.5,
        "cost": 0.25,
    }
    (run,) = parse_value(item)
    assert run.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": None, "tool_calls": [_call("c1")]},
        {"role": "tool", "tool_call_id": "c1", "name": "bash", "content": "fix it"},
        {"role": "assistant", "content": "done"},
    ]
    assert step_counts([run]) == [2]
    assert run.tools == [{"type": "function", "function": {"name": "bash"}}]
    assert run.metadata == {
        "variant": "openhands-llm-completions",
        "timestamp": 1.5,
        "cost": 0.25,
        "model": "m-7",
        "run_index": 0,
    }


def test_llm_completions_without_a_response_message_is_rejected() -> None:
    assert _error(_run() | {"response": {"choices": []}}).location == "response.choices"


def test_swe_gym_row_drops_null_keys_and_the_sample_suffix() -> None:
    nulls = {"function_call": None, "name": None, "tool_call_id": None, "tool_calls": None}
    row = {
        "instance_id": "getmoto__moto-5321_3",
        "run_id": "r1",
        "resolved": True,
        "messages": [
            {"role": "system", "content": "s"} | nulls,
            {"role": "user", "content": "task"} | nulls,
            nulls
            | {"role": "assistant", "content": "", "tool_calls": [_call("c1") | {"index": None}]},
            nulls
            | {"role": "tool", "content": "OBSERVATION:\nok", "tool_call_id": "c1", "name": "bash"},
        ],
        "tools": [],
        "test_result": {"git_patch": "diff", "report": {"resolved": True}},
    }
    (run,) = parse_value([row])
    assert run.task_id == "getmoto__moto-5321"
    assert run.metadata["instance_id"] == "getmoto__moto-5321_3"
    assert run.metadata["submission"] == "diff"
    assert run.messages[0] == {"role": "system", "content": "s"}
    assert run.messages[2] == {"role": "assistant", "content": "", "tool_calls": [_call("c1")]}
    assert run.messages[3] == {
        "role": "tool",
        "tool_call_id": "c1",
        "name": "bash",
        "content": "OBSERVATION:\nok",
    }


def test_legacy_function_call_is_rejected() -> None:
    item = _run({"role": "assistant", "content": None, "function_call": {"name": "f"}})
    assert _error(item).location == "messages[4].function_call"


def test_sniff_says_why_it_refuses() -> None:
    doc = decode_document(json.dumps({"trajectory": []}).encode())
    assert openai_messages.IMPORTER.sniff(doc) == "no 'messages' list of chat messages found"
    doc = decode_document(json.dumps({"messages": ["hi"]}).encode())
    assert "chat messages" in (openai_messages.IMPORTER.sniff(doc) or "")
