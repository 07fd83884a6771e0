"""OpenHands `output.jsonl`: V0 event streams, V1 SDK events and the GitHub-resolver variant.

A run is one JSON object with a `history` of events (one per line in `output.jsonl`; a single
object or a JSON array of runs is accepted too). Three generations of `history`:

- V0 (OpenHands 0.x): events with an integer `id`; actions carry `action` and `args`,
  observations carry `observation`, `content` and `cause` (the id of the action they answer).
  `tool_call_metadata` holds the model's real tool call and the response it came from.
- V1 (Agent SDK): events keyed by `kind`; `ActionEvent` carries `tool_call` and `thought`,
  `ObservationEvent` names its action by `action_id` (and `tool_call_id`). Ids are UUIDs.
- Resolver: serialised actions and observations with no ids, sources or causes.

How the transcript is built, and why:

- A step is one LLM output. When one response produced several tool calls (V0 groups them by
  `model_response.id` when `total_calls_in_response > 1`, V1 by `llm_response_id`) they become
  one assistant message carrying every call, answered by one tool message per call. That is
  what the model wrote and what OpenHands sends back to it; the calls were one decision.
- Observations are paired with actions by `cause`, `action_id`/`tool_call_id`, or, in the
  resolver variant, by order; never by position in V0/V1, where ids have gaps and observations
  can arrive late. Tool messages go right after the assistant message they answer, as the chat
  format requires, wherever the observation sits in the stream.
- An observation that answers no action (a V0 `error` after a tool call that could not be
  parsed) becomes a user message, which is how OpenHands shows it to the model; the rejected
  output itself was never recorded.
- Left out: `recall` round-trips, agent-state changes, condensation and null observations, and
  observations of non-step events. None is something the model did.
- Without the real tool call (older files, the resolver), one is synthesised from the action
  (`run` -> `execute_bash {"command": ...}`) with the id `call_<event id or position>`.
- The first user message is the task. When the history has none before the first step (V1
  often starts with the first action), it is made from the run's `instruction`.
- `resolved` comes only from an evaluation recorded in the run (`resolved`,
  `test_result.report.resolved`); the resolver's `success` is an LLM judgement, kept in metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.trajectories.formats.base import Document, Message, Record, Trajectory, fail, text_of
from app.trajectories.formats.common import (
    Run,
    decode_listish,
    first_choice_message,
    first_run_value,
    function_schemas,
    iter_runs,
    mapping,
    put,
    tool_call,
)

NAME = "openhands"

Key = int | str
TurnKey = tuple[str, Key]

# Actions that are the harness talking to itself, not the model acting.
_NON_STEP_ACTIONS = frozenset(
    {"recall", "change_agent_state", "null", "condensation", "condensation_request"}
)
# Observations that carry nothing the model acted on.
_SKIPPED_OBSERVATIONS = frozenset({"recall", "agent_state_changed", "null", "condensation"})
_V1_OBSERVATIONS = frozenset({"ObservationEvent", "UserRejectObservation", "AgentErrorEvent"})
# Serialised fields of an action that are not arguments the model chose.
_NOT_ARGUMENTS = frozenset(
    {
        "action", "args", "blocking", "confirmation_state", "cwd", "hidden", "id",
        "image_urls", "images_urls", "impl_source", "include_extra", "is_confirmed",
        "is_static", "keep_prompt", "kernel_init_code", "message", "runnable",
        "security_risk", "source", "thought", "timestamp", "tool_call_metadata",
        "wait_for_response",
    }
)  # fmt: skip


# ---------------------------------------------------------------- the reduced event stream


@dataclass(frozen=True)
class _Say:
    """A system or user message, in place. `key` lets observations cite it harmlessly."""

    role: str
    text: str
    key: Key | None = None


@dataclass(frozen=True)
class _Act:
    """One agent action: part of the assistant turn `turn`; `call` is None for a text reply."""

    key: Key
    turn: TurnKey
    text: str | None
    call: Message | None


@dataclass(frozen=True)
class _Obs:
    """An observation of the action `cause` (None: of no action). `path` locates the link."""

    cause: Key | None
    text: str
    path: str


@dataclass(frozen=True)
class _Other:
    """An event that is not part of the transcript but may be cited by an observation."""

    key: Key | None


_Event = _Say | _Act | _Obs | _Other


def _assemble(events: list[_Event], record: Record) -> list[Message]:
    """Chat messages from the reduced stream: each turn where its first action is."""
    turns: dict[TurnKey, list[_Act]] = {}
    for event in events:
        if isinstance(event, _Act):
            turns.setdefault(event.turn, []).append(event)
    answers = _answers(events, record)
    messages: list[Message] = []
    for event in events:
        if isinstance(event, _Say):
            messages.append({"role": event.role, "content": event.text})
        elif isinstance(event, _Act) and event.turn in turns:
            messages.extend(_turn_messages(turns.pop(event.turn), answers))
        elif isinstance(event, _Obs) and event.cause is None:
            messages.append({"role": "user", "content": event.text})
    return messages


def _answers(events: list[_Event], record: Record) -> dict[Key, list[str]]:
    """Observation texts per action that made a tool call."""
    known = {e.key for e in events if not isinstance(e, _Obs) and e.key is not None}
    calls = {e.key for e in events if isinstance(e, _Act) and e.call is not None}
    answers: dict[Key, list[str]] = {}
    for event in events:
        if not isinstance(event, _Obs) or event.cause is None:
            continue
        if event.cause not in known:
            raise fail(
                f"observation answers event {event.cause!r}, which is not in the history",
                record,
                event.path,
            )
        if event.cause in calls:
            # A second observation of one action is joined to the first, so that every call
            # still has exactly one answer.
            answers.setdefault(event.cause, []).append(event.text)
    return answers


def _turn_messages(actions: list[_Act], answers: dict[Key, list[str]]) -> list[Message]:
    text = next((a.text for a in actions if a.text), None)
    assistant: Message = {"role": "assistant", "content": text}
    calls = [a.call for a in actions if a.call is not None]
    if calls:
        assistant["tool_calls"] = calls
    messages = [assistant]
    for action in actions:
        if action.call is not None and action.key in answers:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": action.call["id"],
                    "name": action.call["function"]["name"],
                    "content": "\n".join(answers[action.key]),
                }
            )
    return messages


# ---------------------------------------------------------------- shared by the variants


def _object(value: Any, run: Run, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail("expected a JSON object", run.record, path)
    return value


def _text(value: Any) -> str | None:
    """Text of a string, a content part or a list of parts; None when there is none."""
    text = text_of([value] if isinstance(value, dict) else value)
    return text or None


def _observation_text(content: Any, metadata: Any) -> str:
    # Command outputs keep their prefix/suffix (e.g. "[The command completed with exit code
    # 1.]") in metadata; the model was shown them around the output.
    info = mapping(metadata)
    prefix, suffix = info.get("prefix"), info.get("suffix")
    text = text_of(content) or ""
    return (
        (prefix if isinstance(prefix, str) else "")
        + text
        + (suffix if isinstance(suffix, str) else "")
    )


def _observation_kind(event: dict[str, Any], run: Run, path: str) -> str:
    kind = event["observation"]
    if not isinstance(kind, str):
        raise fail("'observation' must be a string", run.record, f"{path}.observation")
    return kind


def _pick(args: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: args[key] for key in keys if args.get(key) is not None}


def _synthesised(action: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The CodeActAgent tool call that produces `action`, for files that lack the real one."""
    if action == "run":
        return "execute_bash", _pick(args, "command")
    if action == "run_ipython":
        return "execute_ipython_cell", _pick(args, "code")
    if action == "read":
        return "str_replace_editor", {"command": "view", **_pick(args, "path", "view_range")}
    if action == "write":
        content = _pick(args, "content")
        return "str_replace_editor", {"command": "create", **_pick(args, "path")} | (
            {"file_text": content["content"]} if content else {}
        )
    if action == "edit" and args.get("command"):
        keys = ("command", "path", "file_text", "old_str", "new_str", "insert_line")
        return "str_replace_editor", _pick(args, *keys)
    if action == "edit":  # the older LLM-based editor
        return "edit_file", _pick(args, "path", "content", "start", "end")
    if action == "browse":
        return "web_read", _pick(args, "url")
    if action == "browse_interactive":
        actions = _pick(args, "browser_actions")
        return "browser", {"code": actions["browser_actions"]} if actions else {}
    if action == "think":
        return "think", _pick(args, "thought")
    if action == "finish":
        message = args.get("final_thought") or args.get("message")
        return "finish", ({"message": message} if message else {}) | _pick(args, "task_completed")
    return action, {k: v for k, v in args.items() if k not in _NOT_ARGUMENTS}


def _step(action: str, args: dict[str, Any], key: Key, meta: dict[str, Any]) -> _Act:
    """A V0 or resolver action that the model took, with its real or synthesised tool call."""
    response = _response_message(meta.get("model_response"))
    call_id = meta.get("tool_call_id")
    call_id = call_id if isinstance(call_id, str) and call_id else f"call_{key}"
    call = _call_in(response, call_id)
    if call is None:
        name, arguments = _synthesised(action, args)
        function_name = meta.get("function_name")
        call = tool_call(
            call_id, function_name if isinstance(function_name, str) else name, arguments
        )
    text = _text(response.get("content"))
    if text is None and action != "think":  # a think action's `thought` is its argument
        text = _text(args.get("thought"))
    return _Act(key, _v0_turn(meta, key), text, call)


def _response_message(model_response: Any) -> dict[str, Any]:
    return mapping(first_choice_message(model_response))


def _call_in(response: dict[str, Any], call_id: str) -> Message | None:
    calls = response.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = mapping(mapping(call).get("function"))
        if mapping(call).get("id") == call_id and isinstance(function.get("name"), str):
            return tool_call(call_id, function["name"], function.get("arguments"))
    return None


def _v0_turn(meta: dict[str, Any], key: Key) -> TurnKey:
    """Actions of one model response share a turn; everything else is a turn of its own."""
    total = meta.get("total_calls_in_response")
    response_id = mapping(meta.get("model_response")).get("id")
    if isinstance(total, int) and total > 1 and isinstance(response_id, str) and response_id:
        return ("response", response_id)
    return ("event", key)


# ---------------------------------------------------------------- V0


def _v0_events(history: list[Any], run: Run) -> list[_Event]:
    events: list[_Event] = []
    seen: dict[Key, int] = {}
    for position, raw in enumerate(history):
        path = run.at(f"history[{position}]")
        event = _object(raw, run, path)
        key = event.get("id")
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise fail("event needs an integer or string 'id'", run.record, f"{path}.id")
        if key in seen:
            raise fail(f"id {key!r} is also used by history[{seen[key]}]", run.record, f"{path}.id")
        seen[key] = position
        if "action" in event:
            events.append(_v0_action(event, key, run, path))
        elif "observation" in event:
            events.append(_v0_observation(event, run, path))
        else:
            raise fail("event has neither 'action' nor 'observation'", run.record, path)
    return events


def _v0_action(event: dict[str, Any], key: Key, run: Run, path: str) -> _Event:
    action = event["action"]
    if not isinstance(action, str):
        raise fail("'action' must be a string", run.record, f"{path}.action")
    args = event.get("args") if event.get("args") is not None else {}
    args = _object(args, run, f"{path}.args")
    source = event.get("source")
    text = _text(args.get("content")) or _text(event.get("message")) or ""
    if action == "system":
        return _Say("system", text, key)
    if action == "message":
        return (
            _Act(key, ("event", key), text, None) if source == "agent" else _Say("user", text, key)
        )
    if source != "agent" or action in _NON_STEP_ACTIONS:
        return _Other(key)
    return _step(action, args, key, mapping(event.get("tool_call_metadata")))


def _v0_observation(event: dict[str, Any], run: Run, path: str) -> _Event:
    if _observation_kind(event, run, path) in _SKIPPED_OBSERVATIONS:
        return _Other(None)
    cause = event.get("cause")
    if cause is not None and (isinstance(cause, bool) or not isinstance(cause, int | str)):
        raise fail("'cause' must be an event id", run.record, f"{path}.cause")
    text = _observation_text(event.get("content"), mapping(event.get("extras")).get("metadata"))
    return _Obs(cause, text, f"{path}.cause")


# ---------------------------------------------------------------- V1


def _v1_events(history: list[Any], run: Run) -> list[_Event]:
    action_of_call = {
        e["tool_call_id"]: e["id"]
        for e in history
        if isinstance(e, dict)
        and e.get("kind") == "ActionEvent"
        and isinstance(e.get("tool_call_id"), str)
        and isinstance(e.get("id"), str)
    }
    events: list[_Event] = []
    for position, raw in enumerate(history):
        path = run.at(f"history[{position}]")
        event = _object(raw, run, path)
        kind, key = event.get("kind"), event.get("id")
        if not isinstance(kind, str):
            raise fail("event has no 'kind'", run.record, f"{path}.kind")
        if kind in _V1_OBSERVATIONS:
            events.append(_v1_observation(event, action_of_call, path))
            continue
        if not isinstance(key, str) or not key:
            raise fail("event needs a string 'id'", run.record, f"{path}.id")
        if kind == "SystemPromptEvent":
            events.append(_Say("system", _text(event.get("system_prompt")) or "", key))
        elif kind == "MessageEvent":
            events.append(_v1_message(event, key))
        elif kind == "ActionEvent":
            events.append(_v1_action(event, key))
        else:  # conversation state, pauses, condensation: not part of the transcript
            events.append(_Other(key))
    return events


def _v1_message(event: dict[str, Any], key: str) -> _Event:
    message = mapping(event.get("llm_message"))
    text = _text(message.get("content")) or ""
    if event.get("source") == "agent" or message.get("role") == "assistant":
        return _Act(key, ("event", key), text, None)
    return _Say("user", text, key)


def _v1_action(event: dict[str, Any], key: str) -> _Act:
    call = mapping(event.get("tool_call"))
    call_id = event.get("tool_call_id") or call.get("id")
    call_id = call_id if isinstance(call_id, str) and call_id else f"call_{key}"
    if isinstance(call.get("name"), str):
        canonical = tool_call(call_id, call["name"], call.get("arguments"))
    else:  # no raw call recorded: rebuild it from the typed action
        action = mapping(event.get("action"))
        name = event.get("tool_name") or action.get("kind") or "unknown"
        arguments = {k: v for k, v in action.items() if k != "kind"}
        canonical = tool_call(call_id, str(name), arguments)
    response = event.get("llm_response_id")
    turn: TurnKey = (
        ("response", response) if isinstance(response, str) and response else ("event", key)
    )
    return _Act(key, turn, _text(event.get("thought")), canonical)


def _v1_observation(event: dict[str, Any], action_of_call: dict[str, str], path: str) -> _Obs:
    cause = event.get("action_id")
    call_id = event.get("tool_call_id")
    if cause is None and isinstance(call_id, str):  # AgentErrorEvent names only the call
        cause = action_of_call.get(call_id)
    return _Obs(
        cause if isinstance(cause, str) else None, _v1_observation_text(event), f"{path}.action_id"
    )


def _v1_observation_text(event: dict[str, Any]) -> str:
    if event.get("kind") == "AgentErrorEvent":
        return str(event.get("error") or "")
    if event.get("kind") == "UserRejectObservation":
        return str(event.get("rejection_reason") or "")
    observation = mapping(event.get("observation"))
    for field in ("output", "content", "message", "text"):
        if observation.get(field) is not None:
            return _observation_text(observation[field], observation.get("metadata"))
    return ""


# ---------------------------------------------------------------- resolver


def _resolver_events(history: list[Any], run: Run) -> list[_Event]:
    events: list[_Event] = []
    waiting: int | None = None  # the last action, while it still awaits its observation
    has_task = False
    for position, raw in enumerate(history):
        path = run.at(f"history[{position}]")
        event = _object(raw, run, path)
        if "action" in event:
            reduced = _resolver_action(event, position, not has_task, run, path)
            has_task = has_task or (isinstance(reduced, _Say) and reduced.role == "user")
            waiting = position if isinstance(reduced, _Act) and reduced.call else None
            events.append(reduced)
        elif "observation" in event:
            if _observation_kind(event, run, path) in _SKIPPED_OBSERVATIONS:
                events.append(_Other(None))
                continue
            events.append(_Obs(waiting, _observation_text(event.get("content"), None), path))
            waiting = None
        else:
            raise fail("event has neither 'action' nor 'observation'", run.record, path)
    return events


def _resolver_action(
    event: dict[str, Any], position: int, first_message: bool, run: Run, path: str
) -> _Event:
    action = event["action"]
    if not isinstance(action, str):
        raise fail("'action' must be a string", run.record, f"{path}.action")
    args = {k: v for k, v in event.items() if k != "action"}  # fields are not under `args`
    text = _text(event.get("content")) or ""
    if action == "system":
        return _Say("system", text, position)
    if action == "message":
        return (
            _Act(position, ("event", position), text, None)
            if _resolver_agent_message(event, first_message)
            else _Say("user", text, position)
        )
    if action in _NON_STEP_ACTIONS:
        return _Other(position)
    return _step(action, args, position, mapping(event.get("tool_call_metadata")))


def _resolver_agent_message(event: dict[str, Any], first_message: bool) -> bool:
    source = event.get("source")
    if isinstance(source, str):
        return source == "agent"
    # Without `source`: the first message is the task; later, the agent's own messages wait
    # for a reply (CodeActAgent sets wait_for_response) while the user's replies do not.
    return not first_message and event.get("wait_for_response") is True


# ---------------------------------------------------------------- runs


def _variant(run: dict[str, Any], history: list[Any]) -> str:
    first = next((e for e in history if isinstance(e, dict)), {})
    if "kind" in first:
        return "v1"
    if "id" in first:
        return "v0"
    if first or "issue" in run:  # events without ids, or the resolver's own fields
        return "resolver"
    return "v0"


_ADAPTERS = {"v0": _v0_events, "v1": _v1_events, "resolver": _resolver_events}


def _parse_run(run: Run, run_index: int) -> Trajectory:
    obj = _object(run.value, run, run.prefix or "(document)")
    history = obj.get("history")
    if not isinstance(history, list):
        raise fail("'history' must be a list of events", run.record, run.at("history"))
    variant = _variant(obj, history)
    messages = _with_task(_assemble(_ADAPTERS[variant](history, run), run.record), obj, run)
    return Trajectory(
        messages=messages,
        source_format=NAME,
        tools=_tools(history),
        resolved=_resolved(obj),
        task_id=_task_id(obj),
        metadata=_metadata(obj, variant, run_index),
    )


def _with_task(messages: list[Message], obj: dict[str, Any], run: Run) -> list[Message]:
    """`messages` with the task as the first user message, from `instruction` if need be."""
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is not None and first["role"] == "user":
        return messages
    task = obj.get("instruction") or mapping(obj.get("instance")).get("problem_statement")
    if not isinstance(task, str) or not task:
        raise fail(
            "no task: the history has no user message before the first step and the "
            "run has no 'instruction'",
            run.record,
            run.at("instruction"),
        )
    at = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return [*messages[:at], {"role": "user", "content": task}, *messages[at:]]


def _tools(history: list[Any]) -> list[dict[str, Any]] | None:
    for event in history:
        event = mapping(event)
        if event.get("kind") == "SystemPromptEvent":
            return function_schemas(event.get("tools"), strict=False)
        if event.get("action") == "system":
            # OpenHands 0.3x writes the system event's tools with `str()`, a Python literal.
            tools = decode_listish(mapping(event.get("args")).get("tools"))
            return function_schemas(tools, strict=False)
    return None


def _resolved(obj: dict[str, Any]) -> bool | None:
    """Only an evaluation recorded in the run counts; none of the dev files has one."""
    candidates = (
        obj.get("resolved"),
        mapping(mapping(obj.get("test_result")).get("report")).get("resolved"),
        mapping(obj.get("report")).get("resolved"),
    )
    return next((c for c in candidates if isinstance(c, bool)), None)


def _task_id(obj: dict[str, Any]) -> str | None:
    for value in (obj.get("instance_id"), mapping(obj.get("instance")).get("instance_id")):
        if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
            return str(value)
    issue = mapping(obj.get("issue"))
    if all(issue.get(k) is not None for k in ("owner", "repo", "number")):
        return f"{issue['owner']}/{issue['repo']}#{issue['number']}"
    return None


def _metadata(obj: dict[str, Any], variant: str, run_index: int) -> dict[str, Any]:
    settings = mapping(obj.get("metadata"))
    llm = mapping(settings.get("llm_config")) or mapping(settings.get("llm"))  # V0 / V1
    metadata: dict[str, Any] = {"openhands_variant": variant, "run_index": run_index}
    put(metadata, "model", llm.get("model"))
    put(metadata, "agent_class", settings.get("agent_class"))
    put(metadata, "max_iterations", settings.get("max_iterations"))
    put(
        metadata,
        "submission",
        mapping(obj.get("test_result")).get("git_patch") or obj.get("git_patch"),
    )
    put(metadata, "error", obj.get("error"))
    put(metadata, "accumulated_cost", mapping(obj.get("metrics")).get("accumulated_cost"))
    put(metadata, "resolver_llm_success", obj.get("success"))  # a judgement, not a test result
    return metadata


# ---------------------------------------------------------------- importer


def _looks_like_event(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in ("action", "observation", "kind"))


class _Importer:
    name = NAME

    def sniff(self, doc: Document) -> str | None:
        value = first_run_value(doc)
        if not isinstance(value, dict) or not isinstance(value.get("history"), list):
            return "no OpenHands run found: expected an object with a 'history' list of events"
        history = value["history"]
        if history and not _looks_like_event(history[0]):
            return "'history' holds no OpenHands events ('action', 'observation' or 'kind')"
        if not history and not any(k in value for k in ("instruction", "instance_id")):
            return "empty 'history' and no 'instruction' or 'instance_id'"
        return None

    def parse(self, doc: Document) -> list[Trajectory]:
        return [_parse_run(run, index) for index, run in enumerate(iter_runs(doc))]


IMPORTER = _Importer()
