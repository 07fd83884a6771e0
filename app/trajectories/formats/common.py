"""Generic helpers shared by the importers; nothing here knows one source format.

- Runs: where each run of a document sits (`Run`, `iter_runs`, `first_run_value`, `run_object`)
  and how error locations inside it are written (`join_path`).
- Reading loose JSON: `mapping`, `dig`, `decode_listish`, and `put` for small metadata fields.
- Chat pieces in canonical form: `tool_call`, `parse_tool_calls`, `tool_call_ids`,
  `CallPairing`, `assistant_message`, `entry_role`, `chat_message`, `first_choice_message`, and
  tool lists (`function_schemas`, `find_function_schemas`).

Pure: no database, HTTP or torch.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from app import json_input
from app.json_input import JsonSyntaxError
from app.trajectories.formats.base import Document, Message, Record, fail, text_of

# The roles of a canonical message (`base.py`).
ROLES = frozenset({"system", "user", "assistant", "tool"})
_SCHEMA_SEARCH_DEPTH = 8
# What a bare `{name, ...}` tool entry keeps when it is not checked strictly.
_BARE_SCHEMA_KEYS = ("name", "description", "parameters")


# ---------------------------------------------------------------- runs


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
    """`path` inside the run at `prefix`: `[2]` + `messages[5].role` -> `[2].messages[5].role`."""
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def iter_runs(
    doc: Document, *, one_run: Callable[[list[Any]], bool] | None = None
) -> Iterator[Run]:
    """Every run of a document: a record is one run, or a JSON array of runs.

    `one_run`, when given, picks the arrays that are themselves a single run (the `openai`
    format accepts a bare list of messages); every other array is a list of runs.
    """
    for record in doc.records:
        value = record.value
        if isinstance(value, list) and not (one_run is not None and one_run(value)):
            for position, item in enumerate(value):
                yield Run(record, item, f"[{position}]")
        else:
            yield Run(record, value, "")


def first_run_value(doc: Document) -> Any:
    """The first run's value, for a cheap sniff; None for an empty document or array."""
    if not doc.records:
        return None
    value = doc.records[0].value
    if isinstance(value, list):
        return value[0] if value else None
    return value


def run_object(run: Run) -> dict[str, Any]:
    """The run's value, which must be a JSON object."""
    if not isinstance(run.value, dict):
        raise fail("a run must be a JSON object", run.record, run.at(""))
    return run.value


# ---------------------------------------------------------------- loose JSON


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


def put(target: dict[str, Any], key: str, value: Any) -> None:
    """Set a metadata field only to a present scalar, so metadata stays small and flat."""
    if isinstance(value, str | int | float | bool):
        target[key] = value


def decode_listish(value: Any) -> Any:
    """A value stored as itself, as a JSON string or as a Python-repr string.

    Returns the decoded value, or the string itself when it is neither JSON nor a literal.
    `ast.literal_eval` only builds literals, so an untrusted file cannot run code through it.
    """
    if not isinstance(value, str):
        return value
    try:
        return json_input.loads(value)
    except JsonSyntaxError:
        pass
    try:
        decoded = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    # A Python literal may hold what JSON cannot store (inf, nan, sets, bytes, huge nesting).
    try:
        json_input.loads(json.dumps(decoded, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return value
    return decoded


# ---------------------------------------------------------------- tool calls


def tool_call(
    call_id: str, name: str, arguments: Any, *, ensure_ascii: bool = False
) -> dict[str, Any]:
    """A canonical tool call; `arguments` becomes the JSON string OpenAI uses (`{}` for none).

    `ensure_ascii` is `json.dumps`'s, for arguments that are not a string already.
    """
    if not isinstance(arguments, str):
        arguments = json.dumps(
            arguments if arguments is not None else {}, ensure_ascii=ensure_ascii
        )
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(raw: Any, run: Run, path: str, id_prefix: str) -> list[dict[str, Any]]:
    """Canonical `tool_calls` from a list, one call, or either as a string; missing ids are made up.

    Arguments given as objects are re-encoded ASCII-escaped, as these importers always did.
    """
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
    call_id = item.get("id")
    return tool_call(
        call_id if isinstance(call_id, str) and call_id else fallback_id,
        name,
        function.get("arguments"),
        ensure_ascii=True,
    )


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


def assistant_message(content: str | None, calls: list[dict[str, Any]]) -> Message:
    """An assistant message in canonical form: None content only beside tool calls."""
    if not calls:
        return {"role": "assistant", "content": content or ""}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def entry_role(
    entry: dict[str, Any],
    run: Run,
    path: str,
    roles: Collection[str],
    *,
    entry_name: str,
    expected_roles: str,
) -> str:
    """The entry's `role`, one of `roles`; else the error that says it is missing or unknown.
    `entry_name` ("a message") and `expected_roles` only word the errors."""
    role = entry.get("role")
    if role is None:
        raise fail(f"{entry_name} has no 'role'", run.record, run.at(f"{path}.role"))
    if not isinstance(role, str) or role not in roles:
        raise fail(
            f"unknown role {role!r}; expected {expected_roles}",
            run.record,
            run.at(f"{path}.role"),
        )
    return role


def chat_message(
    entry: dict[str, Any],
    run: Run,
    path: str,
    pairing: CallPairing,
    *,
    entry_name: str,
    expected_roles: str,
    id_keys: tuple[str, ...],
) -> list[Message]:
    """Canonical messages from one chat-shaped entry whose tool calls may be loosely written.

    Assistant calls go through `parse_tool_calls`; a tool entry answers the ids under the first
    of `id_keys` it has (see `CallPairing`), one canonical tool message per answered call.
    `entry_name` ("a message") and `expected_roles` only word the errors.
    """
    role = entry_role(entry, run, path, ROLES, entry_name=entry_name, expected_roles=expected_roles)
    content = text_of(entry.get("content"))
    if role == "assistant":
        calls = parse_tool_calls(entry.get("tool_calls"), run, f"{path}.tool_calls", f"call_{path}")
        pairing.expect(calls)
        return [assistant_message(content, calls)]
    if content is None:
        raise fail(f"a {role} message has no 'content'", run.record, run.at(f"{path}.content"))
    if role != "tool":
        return [{"role": role, "content": content}]
    ids = tool_call_ids(next((entry[key] for key in id_keys if key in entry), None))
    answered = pairing.answer(ids)
    if not answered:
        raise fail("a tool message answers no tool call", run.record, run.at(path))
    # Should one entry hold several ids, each answered call gets its own tool message.
    return [{"role": "tool", "tool_call_id": call_id, "content": content} for call_id in answered]


def first_choice_message(response: Any) -> Any:
    """`choices[0].message` of an OpenAI ChatCompletion, or None when there is none."""
    choices = mapping(response).get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return mapping(first).get("message")


# ---------------------------------------------------------------- tool lists


def function_schemas(value: Any, *, strict: bool) -> list[dict[str, Any]] | None:
    """OpenAI `tools` from a list of function schemas (wrapped, or bare `{name, ...}`).

    `strict=True` is for a value that may not be a tool list at all (found by searching a
    config): every entry must be a whole schema, a `name` with `parameters` or `description`,
    or the value is no tool list; entries are kept as written. `strict=False` is for a field
    that is the tool list: entries that describe no function are left out, a wrapped entry
    keeps its `type`, a bare one keeps only its name, description and parameters.
    """
    if not isinstance(value, list):
        return None
    tools: list[dict[str, Any]] = []
    for item in value:
        tool = _strict_schema(item) if strict else _loose_schema(item)
        if tool is None:
            if strict:
                return None
            continue
        tools.append(tool)
    return tools or None


def _strict_schema(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    function = item.get("function") if item.get("type") == "function" else item
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    if "parameters" not in function and "description" not in function:
        return None
    return {"type": "function", "function": function}


def _loose_schema(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        return {"type": item.get("type") or "function", "function": item["function"]}
    if isinstance(item.get("name"), str):
        function = {k: item[k] for k in _BARE_SCHEMA_KEYS if k in item}
        return {"type": "function", "function": function}
    return None


def find_function_schemas(value: Any, depth: int = 0) -> list[dict[str, Any]] | None:
    """The first `tools` list of whole function schemas anywhere in `value` (strict reading)."""
    if depth > _SCHEMA_SEARCH_DEPTH:
        return None
    if isinstance(value, dict):
        tools = function_schemas(value.get("tools"), strict=True)
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
