"""SWE-agent `.traj` importer, on the real development files and on broken copies of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
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

MSB_1309 = "swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-1309.traj"
MSB_174 = "swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-174.traj"
MSB_4249 = "swe-agent/msb-java__deepseek-coder-v2__fasterxml__jackson-databind-4249.traj"
SA_1X = "swe-agent/sweagent-tests__6e44b9__sweagenttestrepo-1c2844.traj"
SA_PYDICOM = "swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj"
MINI_FILE = "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json"

# PROVENANCE.md counts `len(trajectory)`, which includes the autosubmit pseudo-step; our steps
# leave it out because the model never wrote it (FORMATS.md, SWE-agent pitfalls).
EXPECTED_STEPS = {
    MSB_1309: 14,  # PROVENANCE 15: the last is the `exit_cost` pseudo-step
    MSB_174: 16,
    MSB_4249: 59,  # PROVENANCE 60: the last is the `exit_cost` pseudo-step ("Exited")
    SA_1X: 5,  # history holds 4; the final `submit` step is rebuilt from trajectory[-1]
    SA_PYDICOM: 12,
}
PSEUDO_STEP_FILES = {MSB_1309, MSB_4249}


def parse_file(relative: str) -> Trajectory:
    return parse_single(relative, "swe-agent")


def test_every_swe_agent_file_has_an_expectation() -> None:
    on_disk = {f"swe-agent/{p.name}" for p in trajectory_file("swe-agent").iterdir()}
    assert on_disk == set(EXPECTED_STEPS)


@pytest.mark.parametrize("relative", sorted(EXPECTED_STEPS))
def test_real_file_steps_shape_and_task(relative: str) -> None:
    trajectory = parse_file(relative)

    assert trajectory.source_format == "swe-agent"
    assert len(split_steps(trajectory.messages)) == EXPECTED_STEPS[relative]
    assert_canonical(trajectory)
    assert_paired(trajectory)
    assert trajectory.messages[0]["role"] == "system"
    assert first_user(trajectory).startswith("We're currently solving the following issue")
    assert trajectory.resolved is None  # resolution lives in results.json, not in the file


@pytest.mark.parametrize("relative", sorted(EXPECTED_STEPS))
def test_assistant_text_is_the_models_response_verbatim(relative: str) -> None:
    trajectory = parse_file(relative)
    steps = load(relative)["trajectory"]
    if relative in PSEUDO_STEP_FILES:
        steps = steps[:-1]
    written = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
    assert written == [s["response"] for s in steps]


@pytest.mark.parametrize("relative", sorted(EXPECTED_STEPS))
def test_demonstrations_are_left_out(relative: str) -> None:
    trajectory = parse_file(relative)
    demos = [h["content"] for h in load(relative)["history"] if h.get("is_demo")]
    contents = [m["content"] for m in trajectory.messages]
    for demo in demos:
        assert demo not in contents
    assert not any("Here is a demonstration" in (c or "") for c in contents)


@pytest.mark.parametrize("relative", sorted(PSEUDO_STEP_FILES))
def test_autosubmit_pseudo_step_is_left_out(relative: str) -> None:
    trajectory = parse_file(relative)
    assert not any("Exit due to" in (m["content"] or "") for m in trajectory.messages)
    assert trajectory.metadata["autosubmit_step_dropped"] == "exit_cost"
    # The last real step keeps its observation.
    assert trajectory.messages[-1]["role"] == "user"


def test_a_final_submit_is_a_real_step() -> None:
    trajectory = parse_file(MSB_174)
    assert "autosubmit_step_dropped" not in trajectory.metadata
    assert trajectory.messages[-1]["role"] == "assistant"
    assert trajectory.messages[-1]["content"].endswith("```\nsubmit\n```")


def test_0x_observations_are_user_messages_holding_the_trajectory_observation() -> None:
    trajectory = parse_file(SA_PYDICOM)
    steps = load(SA_PYDICOM)["trajectory"]
    messages = trajectory.messages
    for step, raw in zip(split_steps(messages)[:-1], steps, strict=False):
        (observation,) = step.observation_indices
        assert messages[observation]["role"] == "user"
        assert raw["observation"] in messages[observation]["content"]


def test_0x_metadata_comes_from_info() -> None:
    trajectory = parse_file(MSB_1309)
    info = load(MSB_1309)["info"]
    assert trajectory.task_id is None  # a 0.x file does not name its instance
    assert trajectory.metadata["exit_status"] == "submitted (exit_cost)"
    assert trajectory.metadata["submission"] == info["submission"]
    assert trajectory.metadata["instance_cost"] == info["model_stats"]["instance_cost"]
    assert trajectory.metadata["api_calls"] == 15
    assert trajectory.metadata["trajectory_format"] == "swe-agent-0.x"
    assert trajectory.metadata["run_index"] == 0
    assert "total_cost" not in trajectory.metadata  # cumulative over a batch, not this run


def test_missing_submission_is_not_invented() -> None:
    trajectory = parse_file(MSB_4249)
    assert trajectory.metadata["exit_status"] == "exit_cost"
    assert "submission" not in trajectory.metadata


def test_1x_tool_calls_and_rebuilt_submit_step() -> None:
    trajectory = parse_file(SA_1X)
    raw = load(SA_1X)
    file_ids = [c["id"] for h in raw["history"] for c in h.get("tool_calls") or []]
    calls = [c for m in trajectory.messages for c in m.get("tool_calls") or []]
    assert [c["id"] for c in calls[:-1]] == file_ids
    assert calls[0]["function"] == {
        "name": "find_file",
        "arguments": '{"file_name":"missing_colon.py"}',
    }
    # The submit step is absent from 1.x history; it comes back from trajectory[-1].
    assert calls[-1]["function"] == {"name": "submit", "arguments": "{}"}
    assert trajectory.messages[-2]["content"] == raw["trajectory"][-1]["response"]
    last = trajectory.messages[-1]
    assert last["role"] == "tool"
    assert last["tool_call_id"] == calls[-1]["id"]
    assert last["content"] == raw["trajectory"][-1]["observation"]
    assert trajectory.metadata["final_step_from_trajectory"] is True


def test_1x_metadata_task_id_and_tools() -> None:
    trajectory = parse_file(SA_1X)
    assert trajectory.task_id == "SWE-agent__test-repo-i1"  # replay_config.problem_statement.id
    assert trajectory.metadata["model"] == "gpt-4o"
    assert trajectory.metadata["trajectory_format"] == "swe-agent-1.x"
    assert trajectory.metadata["api_calls"] == 5
    assert trajectory.tools is None  # the file has no function schemas


def test_function_schemas_in_replay_config_become_tools() -> None:
    raw = load(SA_1X)
    schema = {
        "type": "function",
        "function": {
            "name": "submit",
            "description": "submit the patch",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    raw["replay_config"]["agent"]["tools"]["tools"] = [schema]
    (trajectory,) = parse_value(raw)
    assert trajectory.tools == [schema]


def test_tool_calls_as_python_repr_or_json_strings_parse_the_same() -> None:
    raw = load(SA_1X)
    expected = parse_value(raw)[0].messages
    history = raw["history"]
    history[2]["tool_calls"] = repr(history[2]["tool_calls"])
    history[3]["tool_call_ids"] = repr(history[3]["tool_call_ids"])
    history[4]["tool_calls"] = json.dumps(history[4]["tool_calls"])
    history[5]["tool_call_ids"] = json.dumps(history[5]["tool_call_ids"])
    assert isinstance(history[2]["tool_calls"], str)
    assert parse_value(raw)[0].messages == expected


def test_tool_message_without_ids_answers_the_open_call() -> None:
    raw = load(SA_1X)
    del raw["history"][3]["tool_call_ids"]
    del raw["history"][4]["tool_calls"][0]["id"]
    (trajectory,) = parse_value(raw)
    assert_paired(trajectory)
    assert trajectory.messages[3]["tool_call_id"] == raw["history"][2]["tool_calls"][0]["id"]


@pytest.mark.parametrize("empty", [None, "", "[]", []])
def test_empty_tool_calls_mean_a_text_step(empty: Any) -> None:
    raw = load(SA_PYDICOM)
    raw["history"][3]["tool_calls"] = empty
    (trajectory,) = parse_value(raw)
    assert "tool_calls" not in trajectory.messages[2]
    assert len(split_steps(trajectory.messages)) == 12


def test_rebuilt_final_step_with_arguments_is_a_bash_call() -> None:
    # Only the bare command name survives in `action`; a longer action was run by the shell.
    raw = load(SA_1X)
    raw["trajectory"][-1]["action"] = "python3 check.py --all"
    (trajectory,) = parse_value(raw)
    (call,) = trajectory.messages[-2]["tool_calls"]
    assert call["function"] == {
        "name": "bash",
        "arguments": json.dumps({"command": "python3 check.py --all"}),
    }
    assert_paired(trajectory)


def test_null_exit_status_and_submission_are_tolerated() -> None:
    raw = load(SA_PYDICOM)
    raw["info"]["exit_status"] = None
    raw["info"]["submission"] = None
    (trajectory,) = parse_value(raw)
    assert "exit_status" not in trajectory.metadata
    assert "submission" not in trajectory.metadata
    assert len(split_steps(trajectory.messages)) == 12


def test_jsonl_of_several_runs() -> None:
    lines = [json.dumps(load(SA_PYDICOM)), json.dumps(load(MSB_174))]
    trajectories = parse_upload("\n".join(lines).encode())
    assert [len(split_steps(t.messages)) for t in trajectories] == [12, 16]
    assert [t.metadata["run_index"] for t in trajectories] == [0, 1]


def broken(relative: str, damage: Any) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(load(relative))
    damage(raw)
    return raw


@pytest.mark.parametrize(
    ("damage", "location"),
    [
        (lambda raw: raw["history"][3].pop("role"), "history[3].role"),
        (lambda raw: raw["history"][3].update(role="robot"), "history[3].role"),
        (lambda raw: raw["history"][4].pop("content"), "history[4].content"),
        (lambda raw: raw.update(trajectory={"steps": []}), "trajectory"),
        (lambda raw: raw.update(history="lost"), "history"),
        (lambda raw: raw["history"].__setitem__(5, "text"), "history[5]"),
        (lambda raw: raw["trajectory"].__setitem__(2, None), "trajectory[2]"),
    ],
)
def test_mangled_structure_names_the_field(damage: Any, location: str) -> None:
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(broken(SA_PYDICOM, damage))
    assert caught.value.location == location


def test_bad_tool_call_names_the_field() -> None:
    raw = load(SA_1X)
    raw["history"][4]["tool_calls"][0]["function"].pop("name")
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(raw)
    assert caught.value.location == "history[4].tool_calls[0].function.name"


def test_tool_message_with_no_call_to_answer_is_rejected() -> None:
    raw = load(SA_1X)
    raw["history"].insert(3, dict(raw["history"][3]))  # a second answer to a single call
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(raw)
    assert caught.value.location == "history[4]"


def test_errors_in_later_runs_say_which_line_or_element() -> None:
    bad = broken(SA_PYDICOM, lambda raw: raw["history"][3].pop("role"))
    body = "\n".join([json.dumps(load(MSB_174)), json.dumps(bad)])
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(body.encode())
    assert caught.value.location == "line 2: history[3].role"
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value([load(MSB_174), bad])
    assert caught.value.location == "[1].history[3].role"


def test_forcing_swe_agent_on_a_mini_file_fails() -> None:
    raw = trajectory_file(MINI_FILE).read_bytes()
    with pytest.raises(SrftError) as caught:
        parse_upload(raw, "swe-agent")
    assert "not swe-agent" in caught.value.message


def test_sniff_never_raises_on_odd_documents() -> None:
    from app.trajectories.formats.base import Document, Record
    from app.trajectories.formats.swe_agent import IMPORTER

    odd: tuple[object, ...] = (None, 3, "text", [], [None], {}, {"history": []})
    for value in odd:
        assert isinstance(IMPORTER.sniff(Document(records=(Record(value),))), str)
    assert IMPORTER.sniff(Document(records=())) is not None


def test_dev_files_of_other_formats_are_not_claimed() -> None:
    from app.trajectories.formats.decode import decode_document
    from app.trajectories.formats.swe_agent import IMPORTER

    others = [
        p
        for p in Path(trajectory_file("")).rglob("*")
        if p.is_file() and p.suffix != ".md" and p.parent.name != "swe-agent"
    ]
    assert others
    for path in others:
        assert IMPORTER.sniff(decode_document(path.read_bytes())) is not None, path.name
