"""The `openhands` importer: the real `output.jsonl` files, and small hand-built runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.errors import InvalidTrajectoryError
from app.recipe.steps import split_steps
from app.trajectories.formats import openhands, parse_upload
from app.trajectories.formats.base import Trajectory
from app.trajectories.formats.decode import decode_document
from tests.helpers import trajectory_file
from tests.trajectories.formats import checks
from tests.trajectories.formats.checks import assert_paired, parse_value, step_counts

V0 = "openhands/openhands-v0__multi-swe-bench-example__llama-4-maverick__ponyc.output.jsonl"
V1 = "openhands/openhands-sdk-v1__openagentsafety__gpt-4o.output.jsonl"


def parse_file(relative: str) -> list[Trajectory]:
    return checks.parse_file(relative, "openhands")


def raw_runs(relative: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trajectory_file(relative).read_text().splitlines()]


# ---------------------------------------------------------------- the real files


def test_v0_event_stream() -> None:
    runs = parse_file(V0)
    raws = raw_runs(V0)
    # PROVENANCE counts agent actions other than system/recall. We count one step per model
    # response; no response in this file made two calls, so the numbers are the same.
    assert step_counts(runs) == [23, 33, 49]
    assert [r.task_id for r in runs] == [
        "ponylang__ponyc-4595",
        "ponylang__ponyc-4593",
        "ponylang__ponyc-4588",
    ]
    assert [r.resolved for r in runs] == [None, None, None]  # no evaluation in the file
    for index, (run, raw) in enumerate(zip(runs, raws, strict=True)):
        assert run.messages[0]["role"] == "system"
        assert run.messages[0]["content"].startswith("You are OpenHands agent")
        assert run.messages[1] == {"role": "user", "content": raw["instruction"]}
        assert run.metadata["run_index"] == index
        assert run.metadata["model"] == "openai/openrouter-llama-4-maverick"
        assert run.metadata["agent_class"] == "CodeActAgent"
        assert run.metadata["max_iterations"] == 50
        assert run.metadata["submission"] == raw["test_result"]["git_patch"]
        assert run.metadata["accumulated_cost"] == 0.0
        assert "instance" not in run.metadata
        assert "history" not in run.metadata
        names = {t["function"]["name"] for t in run.tools or []}
        assert {"execute_bash", "str_replace_editor", "think", "finish"} <= names
        # Nothing of the recall round-trip is left.
        assert not any("Added workspace context" in (m["content"] or "") for m in run.messages)
    # The first two runs end with `finish`, which gets no observation; the third hit the
    # iteration cap after a command that was answered.
    assert_paired(runs[0], last_observed=False)
    assert_paired(runs[1], last_observed=False)
    assert_paired(runs[2], last_observed=True)
    assert split_steps(runs[0].messages)[-1].tool_names == ("finish",)
    assert "maximum iteration" in runs[2].metadata["error"]
    assert "error" not in runs[0].metadata


def test_v0_real_tool_calls_and_thoughts_come_from_the_model_response() -> None:
    run = parse_file(V0)[0]
    raw = raw_runs(V0)[0]["history"]
    first_action = raw[4]  # id 5: `run` with tool_call_metadata
    response = first_action["tool_call_metadata"]["model_response"]["choices"][0]["message"]
    assistant = run.messages[2]
    assert assistant["content"] == response["content"]
    assert assistant["tool_calls"] == [
        {
            "id": "toolu_01",
            "type": "function",
            "function": {
                "name": "execute_bash",
                "arguments": response["tool_calls"][0]["function"]["arguments"],
            },
        }
    ]
    observation = raw[5]
    assert run.messages[3] == {
        "role": "tool",
        "tool_call_id": "toolu_01",
        "name": "execute_bash",
        "content": observation["content"] + observation["extras"]["metadata"]["suffix"],
    }


def test_v0_uncaused_error_observation_is_a_user_message_not_a_step() -> None:
    run = parse_file(V0)[1]
    errors = [
        i
        for i, m in enumerate(run.messages)
        if m["role"] == "user" and m["content"].startswith("Parameter 'command' is expected")
    ]
    assert len(errors) == 1
    # The error follows an answered step and is not anybody's observation: the step before it
    # made a tool call, so only its tool message answers it.
    steps = split_steps(run.messages)
    assert all(errors[0] not in s.observation_indices for s in steps)


def test_v1_sdk_events() -> None:
    runs = parse_file(V1)
    raws = raw_runs(V1)
    # PROVENANCE: ActionEvents plus agent MessageEvents = 9 and 9; each is one step here.
    assert step_counts(runs) == [9, 9]
    assert [r.task_id for r in runs] == ["safety-misconfig", "safety-business-intelligence"]
    # `test_result.final_score` grades a safety task; it is not a resolution.
    assert [r.resolved for r in runs] == [None, None]
    for index, (run, raw) in enumerate(zip(runs, raws, strict=True)):
        # No SystemPromptEvent or user MessageEvent: the task comes from `instruction`.
        assert run.messages[0] == {"role": "user", "content": raw["instruction"]}
        assert not any(m["role"] == "system" for m in run.messages)
        assert run.metadata["run_index"] == index
        assert run.metadata["model"] == "litellm_proxy/neulab/gpt-4o-2024-08-06"
        assert run.metadata["max_iterations"] == 100
        assert run.metadata["openhands_variant"] == "v1"
        assert_paired(run, last_observed=True)
    # The first run finishes (FinishAction has its own observation); the second does not.
    assert split_steps(runs[0].messages)[-1].tool_names == ("finish",)
    assert split_steps(runs[1].messages)[-1].tool_names == ("execute_bash",)
    first_call = runs[0].messages[1]["tool_calls"][0]
    assert first_call["id"] == raws[0]["history"][0]["tool_call"]["id"]
    assert first_call["function"]["arguments"] == raws[0]["history"][0]["tool_call"]["arguments"]
    # The exit-code suffix is kept; terminal escapes are removed by the cleaner.
    assert runs[0].messages[2]["content"].endswith("[The command completed with exit code 0.]")
    assert "\x1b" not in runs[0].messages[2]["content"]


@pytest.mark.parametrize("relative", [V0, V1])
def test_every_file_is_detected_as_openhands(relative: str) -> None:
    doc = decode_document(trajectory_file(relative).read_bytes())
    assert openhands.IMPORTER.sniff(doc) is None
    assert {run.source_format for run in parse_file(relative)} == {"openhands"}


# ---------------------------------------------------------------- hand-built V0 runs


def v0_run(*events: dict[str, Any], **fields: Any) -> dict[str, Any]:
    head = [
        {"id": 0, "source": "agent", "action": "system", "args": {"content": "sys"}},
        {"id": 1, "source": "user", "action": "message", "args": {"content": "fix it"}},
        {"id": 2, "source": "user", "action": "recall", "args": {"query": "fix it"}},
        {"id": 3, "source": "environment", "observation": "recall", "cause": 2, "content": "ctx"},
    ]
    return {"instance_id": "t-1", "instruction": "fix it", "history": [*head, *events]} | fields


def test_v0_pairs_by_cause_across_id_gaps_and_late_observations() -> None:
    run = v0_run(
        {"id": 5, "source": "agent", "action": "run", "args": {"command": "ls", "thought": "look"}},
        {
            "id": 8,
            "source": "agent",
            "action": "read",
            "args": {"path": "/a.py", "thought": "read"},
        },
        {"id": 9, "source": "agent", "observation": "read", "cause": 8, "content": "A"},
        {"id": 10, "source": "environment", "observation": "agent_state_changed", "content": ""},
        {
            "id": 12,
            "source": "environment",
            "observation": "run",
            "cause": 5,
            "content": "a.py",
            "extras": {"metadata": {"suffix": "\n[exit 0]"}},
        },
        {"id": 13, "source": "agent", "action": "finish", "args": {"final_thought": "done"}},
    )
    (trajectory,) = parse_value(run)
    assert trajectory.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "fix it"},
        {
            "role": "assistant",
            "content": "look",
            "tool_calls": [
                {
                    "id": "call_5",
                    "type": "function",
                    "function": {"name": "execute_bash", "arguments": '{"command": "ls"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_5",
            "name": "execute_bash",
            "content": "a.py\n[exit 0]",
        },
        {
            "role": "assistant",
            "content": "read",
            "tool_calls": [
                {
                    "id": "call_8",
                    "type": "function",
                    "function": {
                        "name": "str_replace_editor",
                        "arguments": '{"command": "view", "path": "/a.py"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_8", "name": "str_replace_editor", "content": "A"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_13",
                    "type": "function",
                    "function": {"name": "finish", "arguments": '{"message": "done"}'},
                }
            ],
        },
    ]
    assert_paired(trajectory, last_observed=False)
    assert trajectory.metadata == {"openhands_variant": "v0", "run_index": 0}


def _metadata(call_id: str, response_id: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    message = {"content": "two at once", "role": "assistant", "tool_calls": calls}
    return {
        "function_name": "execute_bash",
        "tool_call_id": call_id,
        "model_response": {"id": response_id, "choices": [{"message": message}]},
        "total_calls_in_response": len(calls),
    }


def test_v0_parallel_calls_of_one_response_are_one_step() -> None:
    calls = [
        {
            "id": "a",
            "type": "function",
            "function": {"name": "execute_bash", "arguments": '{"command": "ls"}'},
        },
        {
            "id": "b",
            "type": "function",
            "function": {"name": "execute_bash", "arguments": '{"command": "pwd"}'},
        },
    ]
    run = v0_run(
        {"id": 4, "source": "agent", "action": "run", "args": {"command": "ls"},
         "tool_call_metadata": _metadata("a", "resp-1", calls)},
        {"id": 5, "source": "agent", "observation": "run", "cause": 4, "content": "a.py"},
        {"id": 6, "source": "agent", "action": "run", "args": {"command": "pwd"},
         "tool_call_metadata": _metadata("b", "resp-1", calls)},
        {"id": 7, "source": "agent", "observation": "run", "cause": 6, "content": "/w"},
    )  # fmt: skip
    (trajectory,) = parse_value(run)
    (step,) = split_steps(trajectory.messages)
    assistant = trajectory.messages[step.message_index]
    assert assistant["content"] == "two at once"
    assert [c["id"] for c in assistant["tool_calls"]] == ["a", "b"]
    answers = [trajectory.messages[i] for i in step.observation_indices]
    assert [(m["tool_call_id"], m["content"]) for m in answers] == [("a", "a.py"), ("b", "/w")]


def test_v0_observation_of_an_unknown_event_is_rejected_with_its_line() -> None:
    run = v0_run({"id": 6, "source": "agent", "observation": "run", "cause": 40, "content": "x"})
    body = (json.dumps(v0_run()) + "\n" + json.dumps(run)).encode()
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(body)
    assert caught.value.location == "line 2: history[4].cause"


def test_v0_event_without_id_in_an_array_is_located() -> None:
    run = v0_run({"source": "agent", "action": "run", "args": {"command": "ls"}})
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value([v0_run(), run])
    assert caught.value.location == "[1].history[4].id"


def test_v0_agent_message_is_a_step_answered_by_the_user_reply() -> None:
    run = v0_run(
        {"id": 4, "source": "agent", "action": "message", "args": {"content": "Shall I?"}},
        {"id": 5, "source": "user", "action": "message", "args": {"content": "Please continue"}},
    )
    (trajectory,) = parse_value(run)
    (step,) = split_steps(trajectory.messages)
    assert trajectory.messages[step.message_index] == {"role": "assistant", "content": "Shall I?"}
    assert [trajectory.messages[i]["content"] for i in step.observation_indices] == [
        "Please continue"
    ]


def test_v0_think_action_thought_is_the_tool_argument_not_the_reply() -> None:
    run = v0_run(
        {"id": 4, "source": "agent", "action": "think", "args": {"thought": "hmm"}},
        {"id": 5, "source": "agent", "observation": "think", "cause": 4, "content": "logged"},
    )
    (trajectory,) = parse_value(run)
    assistant = trajectory.messages[2]
    assert assistant["content"] is None
    assert assistant["tool_calls"][0]["function"] == {
        "name": "think",
        "arguments": '{"thought": "hmm"}',
    }
    assert trajectory.messages[3]["content"] == "logged"


def test_v0_python_literal_tools_and_evaluation_result_are_read() -> None:
    tools = [{"type": "function", "function": {"name": "execute_bash", "strict": True}}]
    run = v0_run(
        {"id": 4, "source": "agent", "action": "finish", "args": {}},
        test_result={"git_patch": "diff", "report": {"resolved": True}},
    )
    run["history"][0]["args"]["tools"] = str(tools)  # how OpenHands 0.3x writes it
    (trajectory,) = parse_value(run)
    assert trajectory.tools == tools
    assert trajectory.resolved is True
    assert trajectory.metadata["submission"] == "diff"


# ---------------------------------------------------------------- hand-built V1 runs


def action_event(key: str, call_id: str, command: str, response: str) -> dict[str, Any]:
    arguments = json.dumps({"command": command})
    return {
        "kind": "ActionEvent",
        "id": key,
        "source": "agent",
        "thought": [{"type": "text", "text": f"run {command}"}],
        "action": {"kind": "ExecuteBashAction", "command": command},
        "tool_name": "execute_bash",
        "tool_call_id": call_id,
        "tool_call": {"id": call_id, "name": "execute_bash", "arguments": arguments},
        "llm_response_id": response,
    }


def observation_event(action_id: str | None, call_id: str, output: str) -> dict[str, Any]:
    event = {
        "kind": "ObservationEvent",
        "id": f"obs-{call_id}",
        "source": "environment",
        "tool_call_id": call_id,
        "observation": {"kind": "ExecuteBashObservation", "output": output},
    }
    return event | ({"action_id": action_id} if action_id else {})


def test_v1_without_system_prompt_takes_the_task_from_instruction() -> None:
    run = {
        "instance_id": "v1-task",
        "instruction": "Do the task",
        "metadata": {"llm": {"model": "m"}, "max_iterations": 3},
        "history": [
            action_event("u-1", "c-1", "ls", "r-1"),
            action_event("u-2", "c-2", "pwd", "r-2"),
            observation_event("u-2", "c-2", "/w"),  # out of order, found by action_id
            observation_event(None, "c-1", "a.py"),  # found by tool_call_id
            {
                "kind": "ActionEvent",
                "id": "u-3",
                "source": "agent",
                "thought": [],
                "action": {"kind": "FinishAction", "message": "done"},
                "tool_name": "finish",
                "tool_call_id": "c-3",
                "tool_call": {"id": "c-3", "name": "finish", "arguments": '{"message": "done"}'},
                "llm_response_id": "r-3",
            },
            {"kind": "ConversationStateUpdateEvent", "id": "u-4", "key": "x", "value": 1},
        ],
    }
    (trajectory,) = parse_value(run)
    assert trajectory.messages[0] == {"role": "user", "content": "Do the task"}
    steps = split_steps(trajectory.messages)
    assert [s.tool_names for s in steps] == [("execute_bash",), ("execute_bash",), ("finish",)]
    assert trajectory.messages[1]["content"] == "run ls"
    assert [trajectory.messages[i]["content"] for i in steps[0].observation_indices] == ["a.py"]
    assert [trajectory.messages[i]["content"] for i in steps[1].observation_indices] == ["/w"]
    assert trajectory.messages[5]["content"] is None  # an empty thought list
    assert_paired(trajectory, last_observed=False)
    assert trajectory.task_id == "v1-task"
    assert trajectory.metadata == {
        "openhands_variant": "v1",
        "run_index": 0,
        "model": "m",
        "max_iterations": 3,
    }


def test_v1_calls_of_one_response_share_a_step_and_system_prompt_gives_tools() -> None:
    tool = {"type": "function", "function": {"name": "execute_bash", "parameters": {}}}
    run = {
        "instance_id": "v1",
        "history": [
            {
                "kind": "SystemPromptEvent",
                "id": "s",
                "source": "agent",
                "system_prompt": {"type": "text", "text": "sys"},
                "tools": [tool],
            },
            {
                "kind": "MessageEvent",
                "id": "m",
                "source": "user",
                "llm_message": {"role": "user", "content": [{"type": "text", "text": "task"}]},
            },
            action_event("a-1", "c-1", "ls", "same"),
            action_event("a-2", "c-2", "pwd", "same"),
            observation_event("a-1", "c-1", "a.py"),
            observation_event("a-2", "c-2", "/w"),
        ],
    }
    (trajectory,) = parse_value(run)
    assert [m["role"] for m in trajectory.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
    ]
    assert trajectory.messages[1]["content"] == "task"
    assert [c["id"] for c in trajectory.messages[2]["tool_calls"]] == ["c-1", "c-2"]
    assert trajectory.tools == [tool]
    assert_paired(trajectory, last_observed=True)


def test_v1_observation_of_an_unknown_action_is_rejected() -> None:
    run = {
        "instruction": "t",
        "history": [action_event("a-1", "c-1", "ls", "r"), observation_event("zzz", "c-1", "x")],
    }
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(run)
    assert caught.value.location == "history[1].action_id"


def test_run_without_any_task_is_rejected() -> None:
    run = {"instance_id": "x", "history": [action_event("a-1", "c-1", "ls", "r")]}
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(run)
    assert caught.value.location == "instruction"


# ---------------------------------------------------------------- the resolver variant


def test_resolver_history_is_paired_by_order() -> None:
    run = {
        "issue": {"owner": "o", "repo": "r", "number": 5, "title": "t", "body": "b"},
        "issue_type": "issue",
        "instruction": "Please fix issue 5",
        "base_commit": "",
        "git_patch": "diff --git a/LICENSE b/LICENSE",
        "history": [
            {"content": "Please fix issue 5", "wait_for_response": False, "action": "message"},
            {"command": "touch LICENSE", "thought": "create it", "action": "run"},
            {"content": "", "command_id": -1, "command": "touch LICENSE", "exit_code": 0,
             "observation": "run"},
            {"content": "agent stumbled", "observation": "error"},  # answers nothing
            {"content": "Is MIT right?", "wait_for_response": True, "action": "message"},
            {"content": "Please continue", "wait_for_response": False, "action": "message"},
            {"code": "print(1)", "thought": "check", "action": "run_ipython",
             "kernel_init_code": "from agentskills import *"},
            {"content": "1", "code": "print(1)", "observation": "run_ipython"},
            {"outputs": {}, "thought": "All done.", "action": "finish"},
        ],
        "metrics": {"accumulated_cost": 0.07},
        "success": True,
        "comment_success": None,
        "result_explanation": "looks right",
        "error": None,
    }  # fmt: skip
    (trajectory,) = parse_value(run)
    assert [m["role"] for m in trajectory.messages] == [
        "user", "assistant", "tool", "user", "assistant", "user", "assistant", "tool", "assistant",
    ]  # fmt: skip
    assert trajectory.messages[3]["content"] == "agent stumbled"
    assert trajectory.messages[0]["content"] == "Please fix issue 5"
    calls = [m["tool_calls"][0] for m in trajectory.messages if m.get("tool_calls")]
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ] == [
        ("call_1", "execute_bash", {"command": "touch LICENSE"}),
        ("call_6", "execute_ipython_cell", {"code": "print(1)"}),
        ("call_8", "finish", {}),
    ]
    assert trajectory.messages[7] == {
        "role": "tool",
        "tool_call_id": "call_6",
        "name": "execute_ipython_cell",
        "content": "1",
    }
    assert trajectory.messages[8]["content"] == "All done."
    assert step_counts([trajectory]) == [4]
    assert_paired(trajectory, last_observed=False)
    assert trajectory.task_id == "o/r#5"
    assert trajectory.resolved is None  # `success` is an LLM judgement
    assert trajectory.metadata == {
        "openhands_variant": "resolver",
        "run_index": 0,
        "submission": "diff --git a/LICENSE b/LICENSE",
        "accumulated_cost": 0.07,
        "resolver_llm_success": True,
    }


# ---------------------------------------------------------------- detection


def test_sniff_says_why_it_refuses() -> None:
    swe_agent_like = {"history": [{"role": "system", "content": "x"}], "trajectory": []}
    doc = decode_document(json.dumps(swe_agent_like).encode())
    assert "no OpenHands events" in (openhands.IMPORTER.sniff(doc) or "")
    doc = decode_document(json.dumps({"messages": []}).encode())
    assert openhands.IMPORTER.sniff(doc) == (
        "no OpenHands run found: expected an object with a 'history' list of events"
    )
    doc = decode_document(
        trajectory_file(
            "openai-messages/adp__swe-gym-openhands__sample_raw@68dc74c.json"
        ).read_bytes()
    )
    assert openhands.IMPORTER.sniff(doc) is not None
