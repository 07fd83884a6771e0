"""Checks and loaders shared by the importer tests (not a test module: nothing here is collected).

`assert_canonical` states what every importer must produce; `assert_paired` how tool calls and
observations line up in steps.
"""

from __future__ import annotations

import json
from typing import Any

from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.formats.base import Trajectory
from tests.helpers import trajectory_file

CANONICAL_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls"},
    "tool": {"role", "tool_call_id", "content", "name"},  # OpenAI tool messages may carry `name`
}


def assert_canonical(trajectory: Trajectory) -> None:
    """Plain OpenAI chat messages with well-formed tool calls, in a usable order.

    Content is text, or None only beside tool calls; every tool message answers a call made
    earlier; the first message after the system prompt is the user's task; metadata is JSON.
    """
    made: set[str] = set()
    for message in trajectory.messages:
        role = message["role"]
        assert role in CANONICAL_KEYS, message
        assert set(message) <= CANONICAL_KEYS[role], message
        if message.get("tool_calls"):
            assert message["content"] is None or isinstance(message["content"], str), message
            for call in message["tool_calls"]:
                assert set(call) == {"id", "type", "function"}, call
                assert isinstance(call["id"], str), call
                assert call["id"], call
                assert call["type"] == "function", call
                assert set(call["function"]) == {"name", "arguments"}, call
                assert isinstance(call["function"]["name"], str), call
                assert isinstance(json.loads(call["function"]["arguments"]), dict), call
                made.add(call["id"])
        else:
            assert "tool_calls" not in message, message
            assert isinstance(message["content"], str), message
        if role == "tool":
            assert message["tool_call_id"] in made, message
            assert isinstance(message.get("name", ""), str), message
    first = next(m for m in trajectory.messages if m["role"] != "system")
    assert first["role"] == "user", first
    assert first["content"], first
    json.dumps(trajectory.metadata)  # metadata must be storable as JSON


def assert_paired(trajectory: Trajectory, *, last_observed: bool | None = None) -> None:
    """Each call is answered by at most one tool message of its own step, and every step but
    the last has an observation that answers all its calls.

    The last step must be observed and answered too when `last_observed` is True, and must
    have no observation when it is False; None leaves it free.
    """
    messages = trajectory.messages
    steps = split_steps(messages)
    observed: set[int] = set()
    for step in steps:
        observed.update(step.observation_indices)
        calls = [c["id"] for c in messages[step.message_index].get("tool_calls") or []]
        answers = [
            messages[i]["tool_call_id"]
            for i in step.observation_indices
            if messages[i]["role"] == "tool"
        ]
        assert len(answers) == len(set(answers)), f"step {step.index}: a call is answered twice"
        if step.index < len(steps) - 1 or last_observed:
            assert step.observation_indices, f"step {step.index} has no observation"
            assert sorted(answers) == sorted(calls), f"step {step.index}"
        elif last_observed is False:
            assert not step.observation_indices, "the file ends with this step unanswered"
    orphans = [i for i, m in enumerate(messages) if m["role"] == "tool" and i not in observed]
    assert not orphans, "tool messages outside any step"


def first_user(trajectory: Trajectory) -> str:
    content: str = next(m["content"] for m in trajectory.messages if m["role"] == "user")
    return content


def step_counts(runs: list[Trajectory]) -> list[int]:
    return [len(split_steps(run.messages)) for run in runs]


def load(relative: str) -> Any:
    """The JSON of a development file, as the tests damage it."""
    return json.loads(trajectory_file(relative).read_text(encoding="utf-8"))


def parse_value(value: Any, fmt: str = "auto") -> list[Trajectory]:
    return parse_upload(json.dumps(value).encode(), fmt)


def parse_file(relative: str, source_format: str) -> list[Trajectory]:
    """Every run of a development file, each checked to be canonical and of `source_format`."""
    runs = parse_upload(trajectory_file(relative).read_bytes())
    assert {run.source_format for run in runs} == {source_format}
    for run in runs:
        assert_canonical(run)
    return runs


def parse_single(relative: str, source_format: str) -> Trajectory:
    """The one run of a development file that holds a single run."""
    (run,) = parse_file(relative, source_format)
    return run
