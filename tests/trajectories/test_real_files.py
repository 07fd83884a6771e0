"""Every real trajectory file imports through the HTTP API with the expected runs and steps.

Expected counts come from data/trajectories/PROVENANCE.md. Our step rule (one step = one
assistant message the model produced) differs from its counting rule in one place: SWE-agent's
autosubmit pseudo-step (`action: exit_cost`, observation "Exited ...") is written by the
harness, not the model, so we drop it; PROVENANCE counts it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.builders import row_counts
from tests.conftest import Caller
from tests.helpers import TRAJECTORY_DIR, all_trajectory_files

# file -> (source format, steps per run, resolved per run as stated in the file itself)
EXPECTED: dict[str, tuple[str, list[int], list[bool | None]]] = {
    "swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-1309.traj": (
        "swe-agent",
        [14],
        [None],
    ),  # PROVENANCE 15: the exit_cost pseudo-step is dropped
    "swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-174.traj": ("swe-agent", [16], [None]),
    "swe-agent/msb-java__deepseek-coder-v2__fasterxml__jackson-databind-4249.traj": (
        "swe-agent",
        [59],
        [None],
    ),  # PROVENANCE 60: the exit_cost pseudo-step is dropped
    "swe-agent/sweagent-tests__6e44b9__sweagenttestrepo-1c2844.traj": ("swe-agent", [5], [None]),
    "swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj": ("swe-agent", [12], [None]),
    "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-14752.traj.json": (
        "mini-swe-agent",
        [31],
        [None],
    ),
    "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-13265.traj.json": (
        "mini-swe-agent",
        [156],
        [None],
    ),
    "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-16560.traj.json": (
        "mini-swe-agent",
        [145],
        [None],
    ),
    "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json": (
        "mini-swe-agent",
        [13],
        [None],
    ),
    "openhands/openhands-v0__multi-swe-bench-example__llama-4-maverick__ponyc.output.jsonl": (
        "openhands",
        [23, 33, 49],
        [None, None, None],
    ),
    "openhands/openhands-sdk-v1__openagentsafety__gpt-4o.output.jsonl": (
        "openhands",
        [9, 9],
        [None, None],
    ),
    "openai-messages/oh-llm-completion__claude-3-5-sonnet__astropy__astropy-12907__1733339462.430701.json": (
        "openai",
        [10],
        [None],
    ),  # 9 assistant turns in messages + the final `response`
    "openai-messages/oh-llm-completion__claude-3-5-sonnet__django__django-11149__1733345113.2722712.json": (
        "openai",
        [50],
        [None],
    ),
    "openai-messages/adp__swe-smith__sample_raw@dc1a8b7.json": (
        "openai",
        [15, 23, 18, 22, 38],
        [True] * 5,
    ),
    "openai-messages/adp__swe-gym-openhands__sample_raw@68dc74c.json": (
        "openai",
        [6, 4, 4],
        [False] * 3,
    ),
    "nebius-swe-agent/adp__nebius-swe-agent-trajectories__sample_raw@51905b6.json": (
        "nebius",
        [46, 25, 29],
        [False] * 3,
    ),
}


def test_every_shared_file_is_covered() -> None:
    files = {str(p.relative_to(TRAJECTORY_DIR)) for p in all_trajectory_files()}
    assert files == set(EXPECTED)
    assert sum(len(steps) for _, steps, _ in EXPECTED.values()) == 27  # runs, as PROVENANCE says


def _check_pairing(trajectory: dict) -> None:
    """Each step's tool calls are answered by its observations, and only steps are paired."""
    messages = trajectory["messages"]
    steps = trajectory["steps"]
    for step in steps:
        message = messages[step["message_index"]]
        assert message["role"] == "assistant"
        observations = [messages[i] for i in step["observation_indices"]]
        assert all(o["role"] in ("tool", "user") for o in observations)
        call_ids = [c["id"] for c in message.get("tool_calls") or []]
        answered = [o["tool_call_id"] for o in observations if o["role"] == "tool"]
        assert set(answered) <= set(call_ids)
        is_last = step["index"] == len(steps) - 1
        if not is_last:
            assert observations, f"step {step['index']} has no observation"
            assert sorted(answered) == sorted(call_ids), f"step {step['index']} unanswered calls"


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_real_file_imports_over_http(
    relative: str, client: TestClient, caller: Caller, session: Session
) -> None:
    fmt, steps, resolved = EXPECTED[relative]
    body = (TRAJECTORY_DIR / relative).read_bytes()
    before = row_counts(session)
    response = client.post("/v1/trajectories", content=body, headers=caller.headers)
    assert response.status_code == 201, response.text
    result = response.json()
    assert result["created"] == len(steps)
    assert [t["source_format"] for t in result["trajectories"]] == [fmt] * len(steps)
    assert [t["num_steps"] for t in result["trajectories"]] == steps
    assert [t["resolved"] for t in result["trajectories"]] == resolved
    after = row_counts(session)
    assert after["trajectories"] == before["trajectories"] + len(steps)
    assert after["steps"] == before["steps"] + sum(steps)
    assert after["uploads"] == before["uploads"] + 1

    for created, count in zip(result["trajectories"], steps, strict=True):
        trajectory = client.get(f"/v1/trajectories/{created['id']}", headers=caller.headers).json()
        assert [s["index"] for s in trajectory["steps"]] == list(range(count))
        roles = {m["role"] for m in trajectory["messages"]}
        assert roles <= {"system", "user", "assistant", "tool"}
        assert any(m["role"] == "user" for m in trajectory["messages"])
        _check_pairing(trajectory)

    again = client.post("/v1/trajectories", content=body, headers=caller.headers).json()
    assert (again["created"], again["duplicates"]) == (0, len(steps))
    assert row_counts(session) == after


def test_forced_format_matches_detection(client: TestClient, caller: Caller) -> None:
    path: Path = TRAJECTORY_DIR / "swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj"
    response = client.post(
        "/v1/trajectories",
        content=path.read_bytes(),
        headers=caller.headers,
        params={"format": "swe-agent"},
    )
    assert response.status_code == 201
    assert response.json()["trajectories"][0]["num_steps"] == 12
