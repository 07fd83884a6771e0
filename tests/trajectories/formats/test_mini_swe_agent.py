"""mini-SWE-agent importer, on the real v1 (text) and v2 (tool-calling) files and broken copies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from app.errors import InvalidTrajectoryError, SrftError
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.formats.base import Trajectory
from tests.helpers import trajectory_file
from tests.trajectories.formats.checks import (
    assert_canonical,
    assert_paired,
    first_user,
    load,
    parse_single,
    parse_value,
)

V1_SHORT = "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json"
V1_LONG = "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-16560.traj.json"
V2_LONG = "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-13265.traj.json"
V2_SHORT = "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-14752.traj.json"

# Steps = assistant messages, as in PROVENANCE.md; our rule gives the same numbers.
EXPECTED_STEPS = {V1_SHORT: 13, V1_LONG: 145, V2_LONG: 156, V2_SHORT: 31}
V2_FILES = (V2_LONG, V2_SHORT)
FORMAT_ERROR = "No tool calls found in the response. Every response MUST include a tool call."


def parse_file(relative: str) -> Trajectory:
    return parse_single(relative, "mini-swe-agent")


def test_every_mini_file_has_an_expectation() -> None:
    on_disk = {f"mini-swe-agent/{p.name}" for p in trajectory_file("mini-swe-agent").iterdir()}
    assert on_disk == set(EXPECTED_STEPS)


@pytest.mark.parametrize("relative", sorted(EXPECTED_STEPS))
def test_real_file_steps_shape_task_and_metadata(relative: str) -> None:
    trajectory = parse_file(relative)
    raw = load(relative)
    info = raw["info"]

    assert trajectory.source_format == "mini-swe-agent"
    assert len(split_steps(trajectory.messages)) == EXPECTED_STEPS[relative]
    assert_canonical(trajectory)
    assert_paired(trajectory)
    assert first_user(trajectory).startswith("<pr_description>")
    assert trajectory.task_id == raw["instance_id"]
    assert trajectory.resolved is None  # resolution is in report.json, not in the file
    assert trajectory.metadata["exit_status"] == "Submitted"
    assert trajectory.metadata["submission"] == info["submission"]
    assert trajectory.metadata["api_calls"] == info["model_stats"]["api_calls"]
    assert trajectory.metadata["instance_cost"] == info["model_stats"]["instance_cost"]
    assert trajectory.metadata["agent_version"] == info["mini_version"]
    assert trajectory.metadata["trajectory_format"] == raw["trajectory_format"]
    assert trajectory.metadata["model"] == info["config"]["model"]["model_name"]
    assert trajectory.metadata["run_index"] == 0


@pytest.mark.parametrize("relative", sorted(EXPECTED_STEPS))
def test_message_texts_are_verbatim(relative: str) -> None:
    trajectory = parse_file(relative)
    kept = [m for m in load(relative)["messages"] if m["role"] != "exit"]
    # An assistant that only calls tools has content None in canonical form, "" in the file.
    expected = [(m["content"] or None) if m.get("tool_calls") else m["content"] for m in kept]
    assert [m["content"] for m in trajectory.messages] == expected
    assert [m["role"] for m in trajectory.messages] == [m["role"] for m in kept]


@pytest.mark.parametrize("relative", V2_FILES)
def test_v2_exit_message_is_dropped_and_calls_are_bare(relative: str) -> None:
    trajectory = parse_file(relative)
    raw_messages = load(relative)["messages"]
    assert raw_messages[-1]["role"] == "exit"
    assert trajectory.messages[-1]["role"] == "assistant"
    file_calls = [c for m in raw_messages for c in m.get("tool_calls") or []]
    calls = [c for m in trajectory.messages for c in m.get("tool_calls") or []]
    assert [c["id"] for c in calls] == [c["id"] for c in file_calls]
    assert [c["function"] for c in calls] == [c["function"] for c in file_calls]
    assert all("index" not in c for c in calls)  # provider bookkeeping is not a message field


def test_v1_observations_are_user_messages() -> None:
    trajectory = parse_file(V1_SHORT)
    messages = trajectory.messages
    for step in split_steps(messages)[:-1]:
        (observation,) = step.observation_indices
        assert messages[observation]["role"] == "user"
        assert messages[observation]["content"].startswith("<returncode>")
    assert "tool" not in {m["role"] for m in messages}


def test_submission_falls_back_to_the_exit_message() -> None:
    raw = load(V2_SHORT)
    exit_text = raw["messages"][-1]["content"]
    del raw["info"]["submission"]
    del raw["info"]["exit_status"]
    (trajectory,) = parse_value(raw)
    assert trajectory.metadata["submission"] == exit_text
    assert trajectory.metadata["exit_status"] == "Submitted"  # from the exit message's extra


def test_format_error_feedback_stays_a_user_message() -> None:
    raw = load(V2_SHORT)
    # As mini v2 writes it: the rejected output is not recorded, only the feedback.
    raw["messages"].insert(4, {"role": "user", "content": FORMAT_ERROR})
    (trajectory,) = parse_value(raw)
    assert trajectory.messages[4] == {"role": "user", "content": FORMAT_ERROR}
    assert len(split_steps(trajectory.messages)) == EXPECTED_STEPS[V2_SHORT]
    assert_paired(trajectory)


def test_missing_instance_id_gives_no_task_id() -> None:
    raw = load(V1_SHORT)
    del raw["instance_id"]
    (trajectory,) = parse_value(raw)
    assert trajectory.task_id is None


def test_jsonl_and_arrays_of_runs() -> None:
    runs = [load(V1_SHORT), load(V2_SHORT)]
    from_lines = parse_upload("\n".join(json.dumps(r) for r in runs).encode())
    from_array = parse_value(runs)
    for trajectories in (from_lines, from_array):
        assert [len(split_steps(t.messages)) for t in trajectories] == [13, 31]
        assert [t.metadata["run_index"] for t in trajectories] == [0, 1]


def damaged(relative: str, damage: Callable[[list[Any]], object]) -> dict[str, Any]:
    raw: dict[str, Any] = load(relative)
    damage(raw["messages"])
    return raw


NO_NAME_CALL = [{"id": "c1", "function": {"arguments": "{}"}}]


@pytest.mark.parametrize(
    ("relative", "damage", "location"),
    [
        (V1_SHORT, lambda m: m[3].pop("role"), "messages[3].role"),
        (V1_SHORT, lambda m: m[3].update(role="robot"), "messages[3].role"),
        (V1_SHORT, lambda m: m[3].pop("content"), "messages[3].content"),
        (V1_SHORT, lambda m: m.__setitem__(5, "not a message"), "messages[5]"),
        (V2_SHORT, lambda m: m[2].update(tool_calls="not a list"), "messages[2].tool_calls"),
        (
            V2_SHORT,
            lambda m: m[2].update(tool_calls=NO_NAME_CALL),
            "messages[2].tool_calls[0].function.name",
        ),
    ],
)
def test_mangled_messages_name_the_field(
    relative: str, damage: Callable[[list[Any]], object], location: str
) -> None:
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(damaged(relative, damage))
    assert caught.value.location == location


def test_messages_not_a_list_is_rejected() -> None:
    raw = load(V1_SHORT)
    raw["messages"] = {"0": raw["messages"][0]}
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(raw)
    assert caught.value.location == "messages"


def test_error_in_second_jsonl_run_names_the_line() -> None:
    bad = damaged(V1_SHORT, lambda m: m[3].pop("role"))
    body = "\n".join([json.dumps(load(V1_SHORT)), json.dumps(bad)])
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(body.encode())
    assert caught.value.location == "line 2: messages[3].role"


def test_forcing_mini_on_a_swe_agent_file_fails() -> None:
    raw = trajectory_file("swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj")
    with pytest.raises(SrftError) as caught:
        parse_upload(raw.read_bytes(), "mini-swe-agent")
    assert "not mini-swe-agent" in caught.value.message


def test_plain_chat_messages_are_not_claimed() -> None:
    from app.trajectories.formats.base import Document, Record
    from app.trajectories.formats.mini_swe_agent import IMPORTER

    plain = {"messages": [{"role": "user", "content": "hi"}]}
    assert IMPORTER.sniff(Document(records=(Record(plain),))) is not None
    odd: tuple[object, ...] = (None, [], "x", {"info": None, "messages": []})
    for value in odd:
        assert isinstance(IMPORTER.sniff(Document(records=(Record(value),))), str)
