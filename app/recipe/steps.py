"""Steps: the unit of judgment and of masking.

A step is one assistant message, numbered from 0 in order. Its observation is what answers it:
the `tool` messages that carry one of its tool-call ids, or, for agents that write actions as
text, the `user` messages that follow it before the next assistant message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app import json_input
from app.json_input import JsonSyntaxError

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_INLINE_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_INLINE_PARAMETER = re.compile(
    r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL
)


@dataclass(frozen=True)
class Step:
    index: int
    message_index: int
    observation_indices: tuple[int, ...]
    action: str | None
    tool_names: tuple[str, ...]


def split_steps(messages: list[dict[str, Any]]) -> list[Step]:
    """Every assistant message as a step, paired with the messages that answer it."""
    assistant_positions = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    steps: list[Step] = []
    for index, position in enumerate(assistant_positions):
        end = (
            assistant_positions[index + 1]
            if index + 1 < len(assistant_positions)
            else len(messages)
        )
        message = messages[position]
        calls = message.get("tool_calls") or []
        call_ids = {c.get("id") for c in calls if isinstance(c, dict)}
        observations: list[int] = []
        for j in range(position + 1, end):
            other = messages[j]
            role = other.get("role")
            answers_call = role == "tool" and (
                not call_ids or other.get("tool_call_id") in call_ids
            )
            answers_text = role == "user" and not calls
            if answers_call or answers_text:
                observations.append(j)
        action, names = describe_action(message)
        steps.append(Step(index, position, tuple(observations), action, names))
    return steps


def describe_action(message: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """A readable form of what the step did, and the tool names it used.

    Structured tool calls win; otherwise inline `<function=NAME>` markup (SWE-smith style);
    otherwise the last fenced code block (SWE-agent 0.x, mini-swe-agent bash blocks).
    """
    calls = [c for c in (message.get("tool_calls") or []) if isinstance(c, dict)]
    if calls:
        rendered: list[str] = []
        names: list[str] = []
        for call in calls:
            function = call.get("function") or {}
            name = str(function.get("name") or "?")
            names.append(name)
            rendered.append(f"{name}({_render_arguments(function.get('arguments'))})")
        return "\n".join(rendered), tuple(names)
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return None, ()
    inline = _INLINE_FUNCTION.findall(content)
    if inline:
        name, body = inline[-1]
        params = _INLINE_PARAMETER.findall(body)
        if len(params) == 1:
            return str(params[0][1]).strip("\n"), (name,)
        args = ", ".join(f"{key}={value.strip()!r}" for key, value in params)
        return f"{name}({args})", (name,)
    fences: list[str] = _FENCE.findall(content)
    if fences:
        return fences[-1].strip("\n"), ()
    return None, ()


def _render_arguments(raw: Any) -> str:
    arguments = raw
    if isinstance(raw, str):
        try:
            arguments = json_input.loads(raw)
        except JsonSyntaxError:
            return raw
    if isinstance(arguments, dict):
        if len(arguments) == 1:
            (value,) = arguments.values()
            return value if isinstance(value, str) else json.dumps(value)
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in arguments.items())
    return json.dumps(arguments)
