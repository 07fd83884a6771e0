"""mini-SWE-agent `.traj.json` files (`trajectory_format` "mini-swe-agent-1" and "-1.1").

`messages` is already close to an OpenAI chat: v1 writes text turns (a ```bash block is the
action, observations are `user` messages), v2 writes tool calls answered by `tool` messages.
What changes here:

- the extra keys mini adds (`extra`, `function_call`, `provider_specific_fields`, a call's
  `index`) are dropped: the raw provider response is not part of the conversation;
- the final `exit` message (a role OpenAI does not have) is dropped; its content, the
  submission, goes to `metadata["submission"]` when `info` has none.

Format-error feedback ("No tool calls found ...") stays as a `user` message: the model saw it.
"""

from __future__ import annotations

from typing import Any

from app.trajectories.formats.base import Document, Message, Trajectory, fail, text_of
from app.trajectories.formats.common import (
    CallPairing,
    Run,
    chat_message,
    dig,
    find_function_schemas,
    first_run_value,
    iter_runs,
    mapping,
    run_object,
)

NAME = "mini-swe-agent"
_EXIT_ROLE = "exit"
_FORMAT_PREFIX = "mini-swe-agent"


class _Importer:
    name = NAME

    def sniff(self, doc: Document) -> str | None:
        value = first_run_value(doc)
        if not isinstance(value, dict) or "messages" not in value:
            return "no top-level 'messages' key"
        trajectory_format = value.get("trajectory_format")
        if isinstance(trajectory_format, str) and trajectory_format.startswith(_FORMAT_PREFIX):
            return None
        if "mini_version" in mapping(value.get("info")):
            return None
        return "no 'trajectory_format' mini-swe-agent-* and no 'info.mini_version'"

    def parse(self, doc: Document) -> list[Trajectory]:
        return [_parse_run(run, index) for index, run in enumerate(iter_runs(doc))]


def _parse_run(run: Run, run_index: int) -> Trajectory:
    obj = run_object(run)
    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list):
        raise fail("'messages' must be a list", run.record, run.at("messages"))
    messages: list[Message] = []
    exits: list[dict[str, Any]] = []
    pairing = CallPairing()
    for position, entry in enumerate(raw_messages):
        path = f"messages[{position}]"
        if not isinstance(entry, dict):
            raise fail("a message must be an object", run.record, run.at(path))
        if entry.get("role") == _EXIT_ROLE:
            exits.append(entry)
            continue
        messages.extend(
            chat_message(
                entry,
                run,
                path,
                pairing,
                entry_name="a message",
                expected_roles="system, user, assistant, tool or exit",
                id_keys=("tool_call_id",),
            )
        )
    if not messages:
        raise fail("'messages' holds no chat messages", run.record, run.at("messages"))

    info = mapping(obj.get("info"))
    instance_id = obj.get("instance_id")
    return Trajectory(
        messages=messages,
        source_format=NAME,
        tools=find_function_schemas(info.get("config")),
        resolved=None,  # mini writes the evaluation elsewhere (report.json, run summaries)
        task_id=instance_id if isinstance(instance_id, str) and instance_id else None,
        metadata=_metadata(obj, info, exits[-1] if exits else None, run_index),
    )


def _metadata(
    obj: dict[str, Any], info: dict[str, Any], exit_message: dict[str, Any] | None, run_index: int
) -> dict[str, Any]:
    stats = mapping(info.get("model_stats"))
    exit_extra = mapping(exit_message.get("extra")) if exit_message else {}
    fields = {
        "trajectory_format": obj.get("trajectory_format"),
        "agent_version": info.get("mini_version"),
        "model": dig(info, "config", "model", "model_name"),
        "exit_status": info.get("exit_status") or exit_extra.get("exit_status"),
        "submission": _submission(info, exit_message),
        "instance_cost": stats.get("instance_cost"),
        "api_calls": stats.get("api_calls"),
    }
    metadata: dict[str, Any] = {"run_index": run_index}
    # Every value the file has is kept as written, lists and objects too (not only scalars).
    metadata.update((key, value) for key, value in fields.items() if value is not None)
    return metadata


def _submission(info: dict[str, Any], exit_message: dict[str, Any] | None) -> str | None:
    submission = info.get("submission")
    if isinstance(submission, str) and submission:
        return submission
    exit_text = text_of(exit_message.get("content")) if exit_message else None
    if exit_text:
        return exit_text
    return submission if isinstance(submission, str) else None


IMPORTER = _Importer()
