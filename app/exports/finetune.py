"""The chat fine-tuning format of `openai_jsonl` rows: the profile that makes a row of canonical
messages fit it, and the validator every row passes before it is written. Pure.

The format is the per-line example of OpenAI's supervised fine-tuning (`FineTuneChatRequestInput`):
`{"messages", "tools"}`, each message with the keys of its role's chat-completions message and
nothing else (a tool message is `role`, `content`, `tool_call_id`: no `name`), assistant
messages with `"weight": 0|1`, tools as function schemas whose `parameters` are a JSON Schema
object. The same rows pass mistral-common's fine-tuning validation: the last message is the
assistant's, every tool call but those of the last message is answered, right after it, by one
tool message carrying its id, and no tool message answers anything else.

The last message may hold tool calls with no answer: that is how a row teaches a call (OpenAI's
own fine-tuning example ends so, and mistral-common's fine-tuning mode allows it). Dropping such
a call instead would cascade through an agent's run, where every step is a call answered by the
next message, until nothing was left.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "tool_calls", "weight"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
ROW_KEYS = frozenset({"messages", "tools"})
TOOL_KEYS = frozenset({"type", "function"})
FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
CALL_KEYS = frozenset({"id", "type", "function"})
CALL_FUNCTION_KEYS = frozenset({"name", "arguments"})
# OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PROBLEMS = 10


@dataclass
class ProfileCounts:
    """What the profile changed, summed over rows (before any split)."""

    rows_ending_after_last_assistant: int = 0  # rows that ended on tool/user messages
    messages_after_last_assistant: int = 0  # those messages, dropped
    keys_removed: dict[str, int] = field(default_factory=dict)  # "tool.name" -> messages
    rows_with_tools_derived: int = 0  # rows that call functions the run declared none of
    tools_added: int = 0  # function entries made from calls (derived, or missing from tools)
    tool_parameters_made_object: int = 0  # tool entries whose parameters were not an object

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_ending_after_last_assistant": self.rows_ending_after_last_assistant,
            "messages_after_last_assistant": self.messages_after_last_assistant,
            "keys_removed": dict(sorted(self.keys_removed.items())),
            "rows_with_tools_derived": self.rows_with_tools_derived,
            "tools_added": self.tools_added,
            "tool_parameters_made_object": self.tool_parameters_made_object,
        }


def fit_row(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    counts: ProfileCounts,
) -> dict[str, Any] | None:
    """The row of `messages` (assistant ones carrying their weight) in the fine-tuning format,
    changes counted; None if no assistant message is left to train."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or not any(m.get("weight") for m in messages[: last + 1]):
        return None
    if last < len(messages) - 1:
        counts.rows_ending_after_last_assistant += 1
        counts.messages_after_last_assistant += len(messages) - 1 - last
    kept = [_schema_keys(m, counts) for m in messages[: last + 1]]
    row: dict[str, Any] = {"messages": kept}
    fitted = _tools(kept, tools, counts)
    if fitted:
        row["tools"] = fitted
    return row


def _schema_keys(message: Mapping[str, Any], counts: ProfileCounts) -> dict[str, Any]:
    role = message.get("role")
    allowed = ROLE_KEYS.get(role) if isinstance(role, str) else None
    if allowed is None:
        return dict(message)  # the validator says what is wrong with it
    for key in message.keys() - allowed:
        name = f"{role}.{key}"
        counts.keys_removed[name] = counts.keys_removed.get(name, 0) + 1
    return {k: v for k, v in message.items() if k in allowed}


def _tools(
    messages: Sequence[Mapping[str, Any]],
    declared: Sequence[Mapping[str, Any]] | None,
    counts: ProfileCounts,
) -> list[dict[str, Any]]:
    """The declared tools, each with an object schema for parameters, plus an entry (no
    description, empty parameters) for every called function that is not declared."""
    out = [_object_parameters(tool, counts) for tool in declared or []]
    known = {_function_name(tool) for tool in out}
    called: dict[str, None] = {}  # names in the order first called
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                called[function["name"]] = None
    missing = [n for n in called if n not in known]
    if missing and not out:
        counts.rows_with_tools_derived += 1
    counts.tools_added += len(missing)
    out += [
        {"type": "function", "function": {"name": n, "parameters": _empty_parameters()}}
        for n in missing
    ]
    return out


def _function_name(tool: Mapping[str, Any]) -> Any:
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else None


def _empty_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


def _object_parameters(tool: Mapping[str, Any], counts: ProfileCounts) -> dict[str, Any]:
    """A copy of `tool` whose `parameters` is an object schema: none (null or missing) become
    an object with no properties, a schema without a type gets `"type": "object"`."""
    function = tool.get("function")
    if not isinstance(function, Mapping):
        return dict(tool)
    parameters = function.get("parameters")
    if parameters is None:
        fixed: Any = _empty_parameters()
    elif isinstance(parameters, Mapping) and "type" not in parameters:
        fixed = {"type": "object", **parameters}
    else:
        return dict(tool)
    counts.tool_parameters_made_object += 1
    return {**tool, "function": {**function, "parameters": fixed}}


# ---------------------------------------------------------------------- validation


def problems(row: Any) -> list[str]:
    """What makes `row` not a valid fine-tuning example (at most MAX_PROBLEMS, each with its
    location); empty when it is valid."""
    found: list[str] = []
    if not isinstance(row, Mapping):
        return ["(row): not an object"]
    for key in sorted(row.keys() - ROW_KEYS):
        found.append(f"{key}: not a key of a fine-tuning example")
    declared = _check_tools(row.get("tools"), found)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        found.append("messages: must be a non-empty list")
        return found[:MAX_PROBLEMS]
    well_formed = len(found)
    for index, message in enumerate(messages):
        _check_message(f"messages[{index}]", message, declared, found)
    if len(found) == well_formed:  # the order is read off messages of the right shapes
        _check_sequence(messages, found)
    return found[:MAX_PROBLEMS]


def _check_tools(tools: Any, found: list[str]) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list) or not tools:
        found.append("tools: must be a non-empty list when present")
        return set()
    names: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping) or set(tool) != TOOL_KEYS:
            found.append(f"{where}: must be exactly {{type, function}}")
            continue
        function = tool["function"]
        if tool["type"] != "function":
            found.append(f"{where}.type: must be 'function'")
        if not isinstance(function, Mapping):
            found.append(f"{where}.function: must be an object")
            continue
        for key in sorted(function.keys() - FUNCTION_KEYS):
            found.append(f"{where}.function.{key}: not a key of a function")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            found.append(f"{where}.function.name: {name!r} is not 1-64 of [A-Za-z0-9_-]")
        elif name in names:
            found.append(f"{where}.function.name: {name!r} is declared twice")
        else:
            names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            found.append(f"{where}.function.description: must be a string")
        parameters = function.get("parameters")
        if not isinstance(parameters, Mapping) or parameters.get("type") != "object":
            found.append(f"{where}.function.parameters: must be a JSON Schema of type object")
    return names


def _check_message(where: str, message: Any, declared: set[str], found: list[str]) -> None:
    if not isinstance(message, Mapping):
        found.append(f"{where}: not an object")
        return
    role = message.get("role")
    allowed = ROLE_KEYS.get(role) if isinstance(role, str) else None
    if allowed is None:
        found.append(f"{where}.role: {role!r} is not system, user, assistant or tool")
        return
    for key in sorted(message.keys() - allowed):
        found.append(f"{where}.{key}: not a key of a {role} message")
    if "name" in message and not isinstance(message["name"], str):
        found.append(f"{where}.name: must be a string")
    content = message.get("content")
    if role != "assistant":
        if not isinstance(content, str):
            found.append(f"{where}.content: must be a string")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            found.append(f"{where}.tool_call_id: must be a string")
        return
    weight = message.get("weight")
    if type(weight) is not int or weight not in (0, 1):
        found.append(f"{where}.weight: must be 0 or 1, not {weight!r}")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            found.append(f"{where}.tool_calls: must be a non-empty list when present")
            calls = None
        else:
            for number, call in enumerate(calls):
                _check_call(f"{where}.tool_calls[{number}]", call, declared, found)
    if not isinstance(content, str) and not (content is None and calls):
        found.append(f"{where}.content: must be a string (or null with tool_calls)")


def _check_call(where: str, call: Any, declared: set[str], found: list[str]) -> None:
    if not isinstance(call, Mapping) or set(call) != CALL_KEYS:
        found.append(f"{where}: must be exactly {{id, type, function}}")
        return
    if not isinstance(call["id"], str) or not call["id"]:
        found.append(f"{where}.id: must be a non-empty string")
    if call["type"] != "function":
        found.append(f"{where}.type: must be 'function'")
    function = call["function"]
    if not isinstance(function, Mapping) or set(function) != CALL_FUNCTION_KEYS:
        found.append(f"{where}.function: must be exactly {{name, arguments}}")
        return
    if not isinstance(function["arguments"], str):
        found.append(f"{where}.function.arguments: must be a string (JSON text)")
    name = function["name"]
    if name not in declared:
        found.append(f"{where}.function.name: {name!r} is not declared in tools")


def _check_sequence(messages: Sequence[Mapping[str, Any]], found: list[str]) -> None:
    """Roles in order, and every call answered once, right after it, by its id."""
    if messages[0]["role"] not in ("system", "user"):
        found.append("messages[0].role: a conversation starts with a system or user message")
    if messages[-1]["role"] != "assistant":
        found.append(
            f"messages[{len(messages) - 1}].role: the last message must be the assistant's"
        )
    if not any(m["role"] == "assistant" and m["weight"] == 1 for m in messages):
        found.append("messages: no assistant message has weight 1")
    seen: set[str] = set()
    pending: dict[str, int] = {}  # call id -> index of the assistant message that made it
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"]
            if call_id in pending:
                del pending[call_id]
            else:
                again = "answers a call already answered" if call_id in seen else "answers no call"
                found.append(f"messages[{index}].tool_call_id: {call_id!r} {again}")
            continue
        if pending:
            caller = next(iter(pending.values()))
            found.append(
                f"messages[{caller}].tool_calls: {sorted(pending)} not answered before "
                f"messages[{index}]"
            )
            pending.clear()
        for call in message.get("tool_calls") or []:
            if call["id"] in seen:
                found.append(f"messages[{index}].tool_calls: id {call['id']!r} is used twice")
            seen.add(call["id"])
            pending[call["id"]] = index
