"""SWE-agent `.traj` files: 0.x (text commands) and 1.x (function calling).

The messages come from `history`, the chat as the model saw it; `trajectory[]` is only used
to check it. Three things in a file are not part of the run and are left out:

- in-context demonstrations (`is_demo: true` history messages);
- the autosubmit pseudo-step that SWE-agent appends when a limit is hit (`action: "exit_cost"`,
  `"exit_context"`, ..., observation `"Exited"` or `"Exited (autosubmitted)"`): the model never
  wrote it. 0.x also puts it in `history`, as an assistant message "Exit due to cost limit".

Everything else, odd or failed commands included, is the model's own and stays.

1.x does not write the final step (usually `submit`) into `history`; it is rebuilt from the
last `trajectory` entry so that every step the model took is present.

`is_autosubmit_text` is also used by the nebius importer, whose rows are SWE-agent 0.x runs.
"""

from __future__ import annotations

import re
from typing import Any

from app import json_input
from app.json_input import JsonSyntaxError
from app.trajectories.formats.base import Document, Message, Trajectory, fail
from app.trajectories.formats.common import (
    CallPairing,
    Run,
    assistant_message,
    chat_message,
    dig,
    find_function_schemas,
    first_run_value,
    function_schemas,
    iter_runs,
    mapping,
    run_object,
    tool_call,
)

NAME = "swe-agent"

# A pseudo-step's thought is one line such as "Exit due to cost limit".
_AUTOSUBMIT_THOUGHT = re.compile(r"\s*Exit due to [^\n]*\s*")
# The model can call `exit_forfeit` itself; every other exit_* action is SWE-agent's own.
_MODEL_EXIT_ACTIONS = frozenset({"exit_forfeit"})
_FINAL_STEP_CALL_ID = "swe-agent-final-step"


def is_autosubmit_text(text: Any) -> bool:
    """True for the one-line "Exit due to ..." text of a pseudo-step the model did not write."""
    return isinstance(text, str) and _AUTOSUBMIT_THOUGHT.fullmatch(text) is not None


class _Importer:
    name = NAME

    def sniff(self, doc: Document) -> str | None:
        value = first_run_value(doc)
        # Keys, not their types: a mangled file of this shape gets parse's precise error.
        if not isinstance(value, dict) or "trajectory" not in value or "history" not in value:
            return "no top-level 'trajectory' and 'history' keys"
        return None

    def parse(self, doc: Document) -> list[Trajectory]:
        return [_parse_run(run, index) for index, run in enumerate(iter_runs(doc))]


def _parse_run(run: Run, run_index: int) -> Trajectory:
    obj = run_object(run)
    history = _require_list(obj, "history", run)
    steps = _trajectory_steps(obj, run)
    replay = _replay_config(obj)
    messages = _history_messages(history, run)
    if not messages:
        raise fail(
            "history has no messages outside the demonstrations", run.record, run.at("history")
        )

    metadata: dict[str, Any] = {}
    pseudo = steps[-1] if steps and _is_pseudo_step(steps[-1]) else None
    if pseudo is not None:
        steps = steps[:-1]
        messages = _drop_pseudo_step(messages, pseudo)
        metadata["autosubmit_step_dropped"] = str(pseudo.get("action")).strip()

    function_calling = _uses_function_calling(messages, replay)
    assistants = sum(1 for m in messages if m["role"] == "assistant")
    if steps and assistants == len(steps) - 1:
        messages.extend(_final_step_messages(steps[-1], function_calling))
        metadata["final_step_from_trajectory"] = True
    elif assistants != len(steps):
        # History is the source of truth; a different count is reported, not fatal.
        metadata["step_count_mismatch"] = {"history": assistants, "trajectory": len(steps)}

    info = mapping(obj.get("info"))
    return Trajectory(
        messages=messages,
        source_format=NAME,
        tools=function_schemas(obj.get("tools"), strict=True) or find_function_schemas(replay),
        resolved=None,  # SWE-agent never records the evaluation in the .traj file
        task_id=_task_id(obj, info, replay),
        metadata=_metadata(info, replay, function_calling, run_index) | metadata,
    )


def _require_list(obj: dict[str, Any], key: str, run: Run) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise fail(f"'{key}' must be a list", run.record, run.at(key))
    return value


def _trajectory_steps(obj: dict[str, Any], run: Run) -> list[dict[str, Any]]:
    steps = _require_list(obj, "trajectory", run)
    for position, step in enumerate(steps):
        if not isinstance(step, dict):
            raise fail(
                "a trajectory step must be an object", run.record, run.at(f"trajectory[{position}]")
            )
    return steps


def _replay_config(obj: dict[str, Any]) -> dict[str, Any]:
    # 1.x writes it as an object; some versions store the same thing as a JSON string.
    value = obj.get("replay_config")
    if isinstance(value, str):
        try:
            value = json_input.loads(value)
        except JsonSyntaxError:
            return {}
    return mapping(value)


def _history_messages(history: list[Any], run: Run) -> list[Message]:
    messages: list[Message] = []
    pairing = CallPairing()
    for position, entry in enumerate(history):
        path = f"history[{position}]"
        if not isinstance(entry, dict):
            raise fail("a history entry must be an object", run.record, run.at(path))
        if entry.get("is_demo"):
            continue
        messages.extend(
            chat_message(
                entry,
                run,
                path,
                pairing,
                entry_name="a history entry",
                expected_roles="system, user, assistant or tool",
                # SWE-agent allows one call per step; several ids each get their answer.
                id_keys=("tool_call_ids", "tool_call_id"),
            )
        )
    return messages


def _is_pseudo_step(step: dict[str, Any]) -> bool:
    action = step.get("action")
    observation = step.get("observation")
    return (
        isinstance(action, str)
        and action.strip().startswith("exit_")
        and action.strip() not in _MODEL_EXIT_ACTIONS
        and isinstance(observation, str)
        and observation.strip().startswith("Exited")
    )


def _drop_pseudo_step(messages: list[Message], pseudo: dict[str, Any]) -> list[Message]:
    """Cut the pseudo-step's assistant message (and anything after it) when history has it."""
    positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not positions:
        return messages
    last = positions[-1]
    content = messages[last].get("content")
    if content in (pseudo.get("response"), pseudo.get("thought")) or is_autosubmit_text(content):
        return messages[:last]
    return messages


def _uses_function_calling(messages: list[Message], replay: dict[str, Any]) -> bool:
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return True
    parser: object = dig(replay, "agent", "tools", "parse_function", "type")
    return parser == "function_calling"


def _final_step_messages(step: dict[str, Any], function_calling: bool) -> list[Message]:
    """The last step, which 1.x leaves out of `history`, rebuilt from its trajectory entry."""
    text = step.get("response") if isinstance(step.get("response"), str) else step.get("thought")
    content = text if isinstance(text, str) else None
    action = step.get("action")
    if not function_calling or not isinstance(action, str) or not action.strip():
        return [assistant_message(content, [])]
    name, arguments = _action_as_function(action)
    call = tool_call(_FINAL_STEP_CALL_ID, name, arguments, ensure_ascii=True)
    messages = [assistant_message(content, [call])]
    observation = step.get("observation")
    if isinstance(observation, str):
        messages.append(
            {"role": "tool", "tool_call_id": _FINAL_STEP_CALL_ID, "content": observation}
        )
    return messages


def _action_as_function(action: str) -> tuple[str, dict[str, str]]:
    """The function name and arguments behind an action string, as far as the string tells.

    A bare command (`submit`) is a call without arguments. Anything longer was run as a shell
    command, which is what SWE-agent's `bash` tool receives.
    """
    command = action.strip()
    if re.fullmatch(r"[A-Za-z_][\w-]*", command):
        return command, {}
    return "bash", {"command": command}


def _task_id(obj: dict[str, Any], info: dict[str, Any], replay: dict[str, Any]) -> str | None:
    for candidate in (
        obj.get("instance_id"),
        info.get("instance_id"),
        dig(replay, "problem_statement", "id"),
        replay.get("instance_id"),
    ):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


def _metadata(
    info: dict[str, Any], replay: dict[str, Any], function_calling: bool, run_index: int
) -> dict[str, Any]:
    stats = mapping(info.get("model_stats"))
    metadata: dict[str, Any] = {
        "trajectory_format": "swe-agent-1.x" if replay or function_calling else "swe-agent-0.x",
        "run_index": run_index,
    }
    fields = {
        "exit_status": info.get("exit_status"),
        "submission": info.get("submission"),
        "model": dig(replay, "agent", "model", "name"),
        # `total_cost` is cumulative over a whole batch run; only `instance_cost` is this run's.
        "instance_cost": stats.get("instance_cost"),
        "api_calls": stats.get("api_calls"),
        "agent_version": info.get("swe_agent_version"),
    }
    # Every value the file has is kept as written, lists and objects too (not only scalars).
    metadata.update((key, value) for key, value in fields.items() if value is not None)
    return metadata


IMPORTER = _Importer()
