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

The helpers above `_Importer` (run iteration, tool-call decoding, call/answer pairing) are also
used by the mini-SWE-agent and nebius importers, which read files of the same family.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.trajectories.formats.base import Document, Message, Record, Trajectory, fail, text_of

NAME = "swe-agent"
ROLES = frozenset({"system", "user", "assistant", "tool"})

# A pseudo-step's thought is one line such as "Exit due to cost limit".
_AUTOSUBMIT_THOUGHT = re.compile(r"\s*Exit due to [^\n]*\s*")
# The model can call `exit_forfeit` itself; every other exit_* action is SWE-agent's own.
_MODEL_EXIT_ACTIONS = frozenset({"exit_forfeit"})
_SCHEMA_SEARCH_DEPTH = 8
_FINAL_STEP_CALL_ID = "swe-agent-final-step"


# ---------------------------------------------------------------- helpers shared by the family


@dataclass(frozen=True)
class Run:
    """One run inside a document: its record, its JSON value and its path prefix (`[2]`)."""

    record: Record
    value: Any
    prefix: str

    def at(self, path: str) -> str:
        """`path` inside this run, as an error location path: `[2].history[3].role`."""
        return join_path(self.prefix, path)


def join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def iter_runs(doc: Document) -> Iterator[Run]:
    """Every run of a document: a record is one run object, or a JSON array of them."""
    for record in doc.records:
        if isinstance(record.value, list):
            for position, value in enumerate(record.value):
                yield Run(record, value, f"[{position}]")
        else:
            yield Run(record, record.value, "")


def first_run_value(doc: Document) -> Any:
    """The first run's value, for a cheap sniff; None for an empty document."""
    if not doc.records:
        return None
    value = doc.records[0].value
    if isinstance(value, list):
        return value[0] if value else None
    return value


def run_object(run: Run) -> dict[str, Any]:
    if not isinstance(run.value, dict):
        raise fail("a run must be a JSON object", run.record, run.at(""))
    return run.value


def decode_listish(value: Any) -> Any:
    """A list stored as a list, a JSON string or a Python-repr string (SWE-agent wrote all three).

    Returns the decoded value, or the string itself when it is neither JSON nor a literal.
    `ast.literal_eval` only builds literals, so an untrusted file cannot run code through it.
    """
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def parse_tool_calls(raw: Any, run: Run, path: str, id_prefix: str) -> list[dict[str, Any]]:
    """Canonical `tool_calls` from whatever the file holds; missing ids are made up."""
    value = decode_listish(raw)
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise fail("tool_calls must be a list of tool calls", run.record, run.at(path))
    calls: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, item in enumerate(value):
        call = _tool_call(item, run, f"{path}[{position}]", f"{id_prefix}_{position}")
        if call["id"] in seen:  # two calls with one id could not both be answered
            call["id"] = f"{call['id']}_{position}"
        seen.add(call["id"])
        calls.append(call)
    return calls


def _tool_call(item: Any, run: Run, path: str, fallback_id: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise fail("a tool call must be an object", run.record, run.at(path))
    function = item.get("function")
    if not isinstance(function, dict):
        function = item  # some writers flatten {name, arguments} onto the call
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise fail("a tool call has no function name", run.record, run.at(f"{path}.function.name"))
    arguments = function.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    call_id = item.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else fallback_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def tool_call_ids(raw: Any) -> list[str]:
    """The ids a tool message answers: `tool_call_ids` (list or its repr) or one `tool_call_id`."""
    value = decode_listish(raw)
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, list):
        return []
    return [str(v) for v in value if isinstance(v, (str, int)) and str(v)]


class CallPairing:
    """Matches tool messages to the open calls of the assistant message before them.

    A tool message whose id is missing or unknown answers the oldest open call, so that the
    canonical ids always agree and every call is answered at most once.
    """

    def __init__(self) -> None:
        self._open: list[str] = []

    def expect(self, calls: list[dict[str, Any]]) -> None:
        self._open = [call["id"] for call in calls]

    def answer(self, ids: list[str]) -> list[str]:
        answered: list[str] = []
        for call_id in ids:
            if call_id in self._open:
                self._open.remove(call_id)
                answered.append(call_id)
        if not answered and self._open:
            answered.append(self._open.pop(0))
        return answered


def is_autosubmit_text(text: Any) -> bool:
    """True for the one-line "Exit due to ..." text of a pseudo-step the model did not write."""
    return isinstance(text, str) and _AUTOSUBMIT_THOUGHT.fullmatch(text) is not None


def find_function_schemas(value: Any, depth: int = 0) -> list[dict[str, Any]] | None:
    """The first `tools` list of function schemas anywhere in `value`, as OpenAI tools."""
    if depth > _SCHEMA_SEARCH_DEPTH:
        return None
    if isinstance(value, dict):
        tools = _as_function_schemas(value.get("tools"))
        if tools:
            return tools
        children: list[Any] = list(value.values())
    elif isinstance(value, list):
        children = value
    else:
        return None
    for child in children:
        if isinstance(child, (dict, list)):
            found = find_function_schemas(child, depth + 1)
            if found:
                return found
    return None


def _as_function_schemas(value: Any) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or not value:
        return None
    tools: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict):
            return None
        function = item.get("function") if item.get("type") == "function" else item
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None
        if "parameters" not in function and "description" not in function:
            return None
        tools.append({"type": "function", "function": function})
    return tools


def put(metadata: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` only when the file has a value for it, so metadata stays small."""
    if value is not None:
        metadata[key] = value


def mapping(value: Any) -> dict[str, Any]:
    """`value` when it is an object, else an empty one (optional sections may be null)."""
    return value if isinstance(value, dict) else {}


def dig(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...`, or None as soon as a level is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# ---------------------------------------------------------------- SWE-agent itself


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
        tools=_as_function_schemas(obj.get("tools")) or find_function_schemas(replay),
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
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
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
        messages.extend(_history_message(entry, run, path, pairing))
    return messages


def _history_message(
    entry: dict[str, Any], run: Run, path: str, pairing: CallPairing
) -> list[Message]:
    role = entry.get("role")
    if role is None:
        raise fail("a history entry has no 'role'", run.record, run.at(f"{path}.role"))
    if not isinstance(role, str) or role not in ROLES:
        raise fail(
            f"unknown role {role!r}; expected system, user, assistant or tool",
            run.record,
            run.at(f"{path}.role"),
        )
    content = text_of(entry.get("content"))
    if role == "assistant":
        calls = parse_tool_calls(entry.get("tool_calls"), run, f"{path}.tool_calls", f"call_{path}")
        pairing.expect(calls)
        return [assistant_message(content, calls)]
    if content is None:
        raise fail(f"a {role} message has no 'content'", run.record, run.at(f"{path}.content"))
    if role != "tool":
        return [{"role": role, "content": content}]
    ids = tool_call_ids(entry.get("tool_call_ids", entry.get("tool_call_id")))
    answered = pairing.answer(ids)
    if not answered:
        raise fail("a tool message answers no tool call", run.record, run.at(path))
    # SWE-agent allows one call per step; should a file hold several ids, each gets its answer.
    return [{"role": "tool", "tool_call_id": call_id, "content": content} for call_id in answered]


def assistant_message(content: str | None, calls: list[dict[str, Any]]) -> Message:
    """An assistant message in canonical form: None content only beside tool calls."""
    if not calls:
        return {"role": "assistant", "content": content or ""}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


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
    call = {"id": _FINAL_STEP_CALL_ID, "type": "function", "function": _action_as_function(action)}
    messages = [assistant_message(content, [call])]
    observation = step.get("observation")
    if isinstance(observation, str):
        messages.append(
            {"role": "tool", "tool_call_id": _FINAL_STEP_CALL_ID, "content": observation}
        )
    return messages


def _action_as_function(action: str) -> dict[str, str]:
    """The tool call behind an action string, as far as the string tells.

    A bare command (`submit`) is a call without arguments. Anything longer was run as a shell
    command, which is what SWE-agent's `bash` tool receives.
    """
    command = action.strip()
    if re.fullmatch(r"[A-Za-z_][\w-]*", command):
        return {"name": command, "arguments": "{}"}
    return {"name": "bash", "arguments": json.dumps({"command": command})}


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
    put(metadata, "exit_status", info.get("exit_status"))
    put(metadata, "submission", info.get("submission"))
    put(metadata, "model", dig(replay, "agent", "model", "name"))
    # `total_cost` is cumulative over a whole batch run; only `instance_cost` is this run's.
    put(metadata, "instance_cost", stats.get("instance_cost"))
    put(metadata, "api_calls", stats.get("api_calls"))
    put(metadata, "agent_version", info.get("swe_agent_version"))
    return metadata


IMPORTER = _Importer()
