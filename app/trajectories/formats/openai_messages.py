"""Chat-completions transcripts: our canonical upload shape and producers that write it.

Accepted, one run each:

- a canonical object `{"messages": [...], "tools"?, "resolved"?, "task_id"?, "metadata"?}`, a
  JSON array of them, JSON Lines of them, or a bare list of message objects;
- an OpenHands `llm_completions` file: `messages` is the prompt of the last LLM call and
  `response` the ChatCompletion it got, whose `choices[0].message` is the final assistant turn;
  tools are in `kwargs.tools`;
- SWE-Gym `OpenHands-Sampled-Trajectories` rows: `instance_id` carries a `_N` sample suffix,
  which is cut from the task id (the original stays in metadata); unused keys are null;
- nebius/SWE-rebench-openhands-trajectories rows: the chat messages are in `trajectory`,
  `trajectory_id` names the run and `resolved` is 0 or 1;
- SWE-smith trajectory rows: the assistant writes its calls inline (`<function=bash>...`) and
  the observations are user messages. That text is kept verbatim (the steps code reads the
  inline markup); turning it into `tool_calls` would change what the model wrote. The Hub's
  Parquet rows hold `messages` as a JSON string of the list, which is read as that list.

Messages come out as plain OpenAI chat messages and nothing else: `role`, `content` (a string
or null; lists of content parts are flattened), assistant `tool_calls`, tool `tool_call_id` and
`name`. Every tool message must answer a call an earlier assistant message made and that is
not answered yet, so each call has at most one answer.
"""

from __future__ import annotations

import re
from typing import Any

from app import json_input
from app.json_input import JsonSyntaxError
from app.trajectories.formats.base import Document, Message, Record, Trajectory, fail, text_of
from app.trajectories.formats.common import (
    ROLES,
    Run,
    first_choice_message,
    function_schemas,
    iter_runs,
    mapping,
    put,
    tool_call,
)

NAME = "openai"
# `developer` is OpenAI's name for the system role on newer models: same meaning, same place.
_ROLE_ALIASES = {"developer": "system"}
# Small scalar row fields worth keeping; larger columns (patches, test output) are not copied.
_ROW_METADATA_KEYS = ("model", "run_id", "traj_id", "timestamp", "cost")
_SAMPLE_SUFFIX = re.compile(r"(.+)_\d+")
# The fields of a canonical item. Rows of the known producers carry their own columns; a
# canonical item with any other field is refused, so that a misspelt `resolved` or `task_id`
# is not silently dropped.
CANONICAL_FIELDS = ("messages", "tools", "resolved", "task_id", "instance_id", "metadata")


# ---------------------------------------------------------------- runs


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value and "messages" not in value


def _is_message_list(value: list[Any]) -> bool:
    """A bare list of chat messages is one run, not a list of runs."""
    return bool(value) and _is_message(value[0])


def _parse_run(run: Run, run_index: int) -> Trajectory:
    raw: Any
    if isinstance(run.value, list):
        row: dict[str, Any] = {}
        raw, base = run.value, run.prefix
    elif isinstance(run.value, dict):
        row = run.value
        _check_canonical_fields(row, run)
        raw, base = _row_messages(row, run)
    else:
        raise fail(
            "a run must be an object with 'messages' or a list of messages", run.record, run.prefix
        )
    if not isinstance(raw, list):
        raise fail("'messages' must be a list of chat messages", run.record, base)
    entries = [(item, f"{base}[{position}]") for position, item in enumerate(raw)]
    response = _response_message(row, run)
    if response is not None:
        entries.append((response, run.at("response.choices[0].message")))
    messages = _messages(entries, run.record)
    _require_task(messages, entries, run)
    return Trajectory(
        messages=messages,
        source_format=NAME,
        tools=_tools(row, run),
        resolved=_resolved(row, run),
        task_id=_task_id(row, run),
        metadata=_metadata(row, run, run_index),
    )


def _row_messages(row: dict[str, Any], run: Run) -> tuple[Any, str]:
    """The row's chat messages and where they are: `messages`, which SWE-smith's Hub rows
    (Parquet) hold as a JSON string of the list, or SWE-rebench's `trajectory`."""
    key = "trajectory" if _variant(row) == "swe-rebench" else "messages"
    value = row.get(key)
    if not isinstance(value, str):
        return value, run.at(key)
    try:
        return json_input.loads(value, allow_control_characters=True), run.at(key)
    except JsonSyntaxError as exc:
        raise fail(
            f"'{key}' is a string that is not JSON: {exc.message} (at {exc.location} of it)",
            run.record,
            run.at(key),
        ) from None


def _check_canonical_fields(row: dict[str, Any], run: Run) -> None:
    if _variant(row) is not None:
        return
    unknown = [key for key in row if key not in CANONICAL_FIELDS]
    if unknown:
        raise fail(
            f"unknown field {unknown[0]!r}; a canonical item has only "
            f"{', '.join(CANONICAL_FIELDS)}",
            run.record,
            run.at(unknown[0]),
        )


def _response_message(row: dict[str, Any], run: Run) -> dict[str, Any] | None:
    """The final assistant turn of an `llm_completions` file: it is not in `messages`."""
    if "response" not in row:
        return None
    message = first_choice_message(row["response"])
    if not isinstance(message, dict):
        raise fail("'response' has no choices[0].message", run.record, run.at("response.choices"))
    return {"role": "assistant", **message}


def _require_task(messages: list[Message], entries: list[tuple[Any, str]], run: Run) -> None:
    if not messages:
        raise fail("'messages' is empty", run.record, run.at("messages"))
    position = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if position is None:
        raise fail("there is no user message with the task", run.record, run.at("messages"))
    if messages[position]["role"] != "user":
        raise fail(
            "the first message after the system prompt must be the user's task",
            run.record,
            f"{entries[position][1]}.role",
        )


# ---------------------------------------------------------------- messages


def _messages(entries: list[tuple[Any, str]], record: Record) -> list[Message]:
    messages: list[Message] = []
    pending: set[str] = set()  # calls made and not answered yet
    answered: dict[str, str] = {}  # call id -> where its answer is
    for raw, path in entries:
        message = _message(raw, record, path)
        for call in message.get("tool_calls", []):
            pending.add(call["id"])
        if message["role"] == "tool":
            call_id = message["tool_call_id"]
            if call_id not in pending:
                where = f"; it was answered at {answered[call_id]}" if call_id in answered else ""
                raise fail(
                    f"tool message answers call {call_id!r}, which no earlier assistant "
                    f"message left open{where}",
                    record,
                    f"{path}.tool_call_id",
                )
            pending.discard(call_id)
            answered[call_id] = path
        messages.append(message)
    return messages


def _message(raw: Any, record: Record, path: str) -> Message:
    if not isinstance(raw, dict):
        raise fail("a message must be an object", record, path)
    role = _role(raw, record, path)
    content = _content(raw.get("content"), record, f"{path}.content")
    if role == "assistant":
        return _assistant(raw, content, record, path)
    if role == "tool":
        return _tool(raw, content, record, path)
    return {"role": role, "content": content}


def _role(raw: dict[str, Any], record: Record, path: str) -> str:
    role = raw.get("role")
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if not isinstance(role, str) or role not in ROLES:
        raise fail(
            f"unsupported role {role!r}: expected system, user, assistant or tool",
            record,
            f"{path}.role",
        )
    return role


def _content(value: Any, record: Record, path: str) -> str | None:
    # Lists of parts (with `cache_control` and the like) are flattened to their text.
    if value is None or isinstance(value, str | list):
        return text_of(value)
    raise fail("content must be a string, a list of content parts or null", record, path)


def _assistant(raw: dict[str, Any], content: str | None, record: Record, path: str) -> Message:
    if raw.get("function_call") is not None:
        raise fail(
            "legacy 'function_call' is not supported: use 'tool_calls'",
            record,
            f"{path}.function_call",
        )
    message: Message = {"role": "assistant", "content": content}
    calls = raw.get("tool_calls")
    if calls is None or calls == []:
        return message
    if not isinstance(calls, list):
        raise fail("'tool_calls' must be a list", record, f"{path}.tool_calls")
    message["tool_calls"] = [
        _tool_call(call, record, f"{path}.tool_calls[{position}]")
        for position, call in enumerate(calls)
    ]
    ids = [call["id"] for call in message["tool_calls"]]
    if len(set(ids)) != len(ids):
        raise fail("two tool calls of one message share an id", record, f"{path}.tool_calls")
    return message


def _tool_call(raw: Any, record: Record, path: str) -> Message:
    if not isinstance(raw, dict):
        raise fail("a tool call must be an object", record, path)
    if raw.get("type", "function") not in ("function", None):
        raise fail(f"unsupported tool call type {raw['type']!r}", record, f"{path}.type")
    call_id = raw.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise fail("tool call has no 'id'", record, f"{path}.id")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise fail("tool call has no 'function' object", record, f"{path}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise fail("tool call has no function name", record, f"{path}.function.name")
    return tool_call(call_id, name, function.get("arguments"))


def _tool(raw: dict[str, Any], content: str | None, record: Record, path: str) -> Message:
    call_id = raw.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise fail("tool message has no 'tool_call_id'", record, f"{path}.tool_call_id")
    message: Message = {"role": "tool", "tool_call_id": call_id, "content": content}
    if isinstance(raw.get("name"), str) and raw["name"]:
        message["name"] = raw["name"]
    return message


# ---------------------------------------------------------------- run fields


def _variant(row: dict[str, Any]) -> str | None:
    """Which known producer wrote the row, for metadata and its few special rules."""
    if "response" in row:
        return "openhands-llm-completions"
    if "trajectory_id" in row and "trajectory" in row:
        return "swe-rebench"
    if "traj_id" in row:
        return "swe-smith"
    if "run_id" in row and "test_result" in row:
        return "swe-gym"
    return None


def _tools(row: dict[str, Any], run: Run) -> list[dict[str, Any]] | None:
    key, value = "tools", row.get("tools")
    if value is None:  # llm_completions keep the request's tools in kwargs
        key, value = "kwargs.tools", mapping(row.get("kwargs")).get("tools")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise fail("'tools' must be a list of tool objects", run.record, run.at(key))
    return function_schemas(value, strict=False)


def _resolved(row: dict[str, Any], run: Run) -> bool | None:
    value = row.get("resolved")
    if value is None:  # SWE-Gym also keeps the evaluation report
        report = mapping(mapping(row.get("test_result")).get("report")).get("resolved")
        return report if isinstance(report, bool) else None
    if _variant(row) == "swe-rebench" and value in (0, 1):
        return bool(value)  # an int64 column of 0 and 1 there
    if not isinstance(value, bool):
        raise fail("'resolved' must be true, false or null", run.record, run.at("resolved"))
    return value


def _raw_task_id(row: dict[str, Any], run: Run) -> str | None:
    for key in ("task_id", "instance_id"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise fail(f"'{key}' must be a string", run.record, run.at(key))
        return str(value)
    return None


def _task_id(row: dict[str, Any], run: Run) -> str | None:
    task_id = _raw_task_id(row, run)
    if task_id is not None and _variant(row) == "swe-gym":
        # SWE-Gym samples one task several times: `getmoto__moto-5321_2` is task 5321.
        match = _SAMPLE_SUFFIX.fullmatch(task_id)
        return match.group(1) if match else task_id
    return task_id


def _metadata(row: dict[str, Any], run: Run, run_index: int) -> dict[str, Any]:
    given = row.get("metadata")
    if given is not None and not isinstance(given, dict):
        raise fail("'metadata' must be an object", run.record, run.at("metadata"))
    metadata: dict[str, Any] = dict(given or {})
    variant = _variant(row)
    put(metadata, "variant", variant)
    for key in _ROW_METADATA_KEYS:
        put(metadata, key, row.get(key))
    if variant == "openhands-llm-completions":
        put(metadata, "model", mapping(row.get("response")).get("model"))
    if variant == "swe-gym":
        original = _raw_task_id(row, run)
        if original != _task_id(row, run):
            put(metadata, "instance_id", original)
        put(metadata, "submission", mapping(row.get("test_result")).get("git_patch"))
    if variant == "swe-rebench":
        for key in ("trajectory_id", "repo", "exit_status"):
            put(metadata, key, row.get(key))
        put(metadata, "submission", row.get("model_patch"))
    # SWE-smith's `patch` column belongs to other rows of the dataset, so it is never read.
    metadata["run_index"] = run_index
    return metadata


# ---------------------------------------------------------------- importer


def _is_json_list_text(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("[")


class _Importer:
    name = NAME

    def sniff(self, doc: Document) -> str | None:
        value = doc.records[0].value if doc.records else None
        if isinstance(value, list):
            if not value:
                return "the document is an empty array"
            value = value[0]
            if _is_message(value):
                return None
        if isinstance(value, dict) and _is_json_list_text(value.get("messages")):
            return None  # SWE-smith's Hub rows: checked when parsed
        if isinstance(value, dict) and _variant(value) == "swe-rebench":
            turns = value["trajectory"]
            if isinstance(turns, list) and turns and _is_message(turns[0]):
                return None
            return "'trajectory' does not hold chat messages (objects with a 'role')"
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            messages = value["messages"]
            if not messages or _is_message(messages[0]):
                return None
            return "'messages' does not hold chat messages (objects with a 'role')"
        return "no 'messages' list of chat messages found"

    def parse(self, doc: Document) -> list[Trajectory]:
        runs = iter_runs(doc, one_run=_is_message_list)
        return [_parse_run(run, index) for index, run in enumerate(runs)]


IMPORTER = _Importer()
