"""Reading critic answers: tolerant of form, strict about content.

Pure. Tolerated, because models do it and the meaning is unambiguous: JSON inside ``` fences
or surrounded by prose; labels in another case or with whitespace; `step` or `step_index`
instead of `index`; an index written as a numeric string; a bare list instead of
`{"steps": [...]}`; a missing or null reason (taken as ""); reasons over MAX_REASON_CHARS
(cut). Rejected, with a message that says exactly what was wrong (it is quoted back to the
model when re-asking): no JSON, truncated or invalid JSON, unknown labels, and steps that are
missing, repeated or not asked for.

Reasoning models: a server's reasoning parser puts the thoughts in `reasoning_content` (never
read here); without one they arrive in the content as `<think>...</think>` before the answer,
or, when the chat template opened the block in the prompt, as thoughts ending in a lone
`</think>`. Only what follows the first `</think>` is the answer, so JSON inside the thoughts
is never taken for it; a `<think>` that never closes (the answer was cut) is no answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.critic.labels import LabelSet

MAX_REASON_CHARS = 500
_INDEX_KEYS = ("index", "step", "step_index")
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
# Where JSON may start: an object opening a key (quotes of either kind, so a Python-literal
# answer is reported as invalid JSON rather than missed) or a list opening a value.
_JSON_START = re.compile(r"""\{(?=\s*["'}])|\[(?=\s*[\[{"'\]\d-])""")
# Prose may hold many JSON-looking values before the answer; stop looking at some point.
_MAX_JSON_STARTS = 64
_NOTHING = object()
_THINK_OPEN = re.compile(r"\s*<think\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)


class CriticAnswerError(Exception):
    """An answer that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Judgment:
    index: int
    label: str
    reason: str


def parse_trajectory_answer(
    text: str | None, target_indices: Sequence[int], labels: LabelSet
) -> dict[int, Judgment]:
    """One judgment per target step, from a `{"steps": [...]}` answer."""
    entries = _entries(_answer_value(text))
    judgments: dict[int, Judgment] = {}
    repeated: list[int] = []
    for position, entry in enumerate(entries):
        judgment = _judgment(entry, f"steps[{position}]", labels)
        if judgment.index in judgments:
            repeated.append(judgment.index)
        judgments[judgment.index] = judgment
    wanted = set(target_indices)
    missing = [i for i in target_indices if i not in judgments]
    extra = sorted(i for i in judgments if i not in wanted)
    problems: list[str] = []
    if repeated:
        problems.append(f"{_steps(repeated)} {_verb(repeated, 'appears', 'appear')} twice")
    if missing:
        problems.append(f"{_steps(missing)} {_verb(missing, 'is', 'are')} missing")
    if extra:
        problems.append(f"{_steps(extra)} {_verb(extra, 'was', 'were')} not asked for")
    if problems:
        raise CriticAnswerError("; ".join(problems))
    return {i: judgments[i] for i in target_indices}


def parse_step_answer(text: str | None, step_index: int, labels: LabelSet) -> Judgment:
    """The judgment of one step, from a `{"index", "label", "reason"}` answer."""
    value = _answer_value(text)
    if isinstance(value, list) or (isinstance(value, dict) and "steps" in value):
        entries = _entries(value)
        if len(entries) != 1:
            raise CriticAnswerError(
                f"expected one judgment, for step {step_index}; got {len(entries)}"
            )
        value = entries[0]
    if not isinstance(value, dict):
        raise CriticAnswerError(f"expected a JSON object, got {_kind(value)}")
    if not any(key in value for key in _INDEX_KEYS):
        # The question names the step; an answer that leaves the number out is still clear.
        value = {**value, "index": step_index}
    judgment = _judgment(value, "the answer", labels)
    if judgment.index != step_index:
        raise CriticAnswerError(
            f"the answer is about step {judgment.index}, but step {step_index} was asked for"
        )
    return judgment


# ---------------------------------------------------------------------------- finding JSON


def answer_part(text: str) -> str | None:
    """The answer without a reasoning model's thoughts (see the module docstring); None when
    the text is all thoughts, in a `<think>` block that never closes."""
    closing = _THINK_CLOSE.search(text)
    if closing is not None:
        return text[closing.end() :]
    if _THINK_OPEN.match(text) is not None:
        return None
    return text


def _answer_value(text: str | None) -> Any:
    """The JSON value that answers: from fenced blocks first, then from the whole text."""
    if text is None or not text.strip():
        raise CriticAnswerError("the answer is empty")
    answer = answer_part(text)
    if answer is None:
        raise CriticAnswerError(
            "the answer is truncated: the <think> block never closed, so there is no answer "
            "after the thoughts"
        )
    if not answer.strip():
        raise CriticAnswerError("the answer is empty after the thoughts")
    text = answer
    first_error: json.JSONDecodeError | None = None
    fallback: list[Any] = []  # valid JSON of the wrong shape, for validation to explain
    for source in [*_FENCE.findall(text), text]:
        try:
            value, found = _scan(source)
        except json.JSONDecodeError as exc:
            first_error = first_error or exc
            continue
        if found:
            return value
        if value is not _NOTHING and not fallback:
            fallback.append(value)
    if first_error is not None:
        raise CriticAnswerError(f"the answer is truncated or not valid JSON: {first_error}")
    if fallback:
        return fallback[0]
    raise CriticAnswerError("no JSON object found in the answer")


def _scan(source: str) -> tuple[Any, bool]:
    """(value, True) for the first answer-shaped JSON value in `source`; else (the first JSON
    value or _NOTHING, False).

    Starts are only places that look like JSON (`{"`, `[{`, ...), so prose such as "[see
    above]" is passed over. A start that looks like JSON but does not parse raises: the
    answer itself is broken, and digging inside it would find a fragment (one complete entry
    of a truncated list) and misreport what went wrong.
    """
    decoder = json.JSONDecoder()
    first: Any = _NOTHING
    position = 0
    for _ in range(_MAX_JSON_STARTS):
        start = _JSON_START.search(source, position)
        if start is None:
            break
        value, position = decoder.raw_decode(source, start.start())
        if _looks_like_answer(value):
            return value, True
        if first is _NOTHING:
            first = value
    return first, False


def _looks_like_answer(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, dict) for v in value)
    return isinstance(value, dict) and (
        "steps" in value or "label" in value or any(k in value for k in _INDEX_KEYS)
    )


# ---------------------------------------------------------------------------- validating


def _entries(value: Any) -> list[Any]:
    if isinstance(value, dict) and "steps" in value:
        value = value["steps"]
        if not isinstance(value, list):
            raise CriticAnswerError(f'"steps" must be a list, got {_kind(value)}')
    elif isinstance(value, dict) and "label" in value:
        value = [value]  # one step answered without the wrapper
    elif isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))) or "none"
        raise CriticAnswerError(f'expected {{"steps": [...]}}, got an object with keys: {keys}')
    if not isinstance(value, list):
        raise CriticAnswerError(f'expected {{"steps": [...]}}, got {_kind(value)}')
    return value


def _judgment(entry: Any, where: str, labels: LabelSet) -> Judgment:
    if not isinstance(entry, dict):
        raise CriticAnswerError(f"{where} is {_kind(entry)}, not an object")
    index = _index(entry, where)
    raw_label = entry.get("label")
    if not isinstance(raw_label, str):
        raise CriticAnswerError(f"step {index}: the label is missing or not a string")
    label = labels.lookup(raw_label)
    if label is None:
        raise CriticAnswerError(
            f"step {index}: label {raw_label.strip()!r} is not one of {', '.join(labels.names)}"
        )
    reason = entry.get("reason")
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        raise CriticAnswerError(f"step {index}: the reason must be a string, got {_kind(reason)}")
    return Judgment(index, label, reason.strip()[:MAX_REASON_CHARS])


def _index(entry: dict[str, Any], where: str) -> int:
    key = next((k for k in _INDEX_KEYS if k in entry), None)
    if key is None:
        raise CriticAnswerError(f"{where} has no index")
    raw = entry[key]
    if isinstance(raw, bool):
        raise CriticAnswerError(f"{where}: the index must be a step number, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses; no step
    # number has more than 18 digits, and int() refuses thousands.
    text = raw.strip() if isinstance(raw, str) else ""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    raise CriticAnswerError(f"{where}: the index must be a step number, got {raw!r}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number")


def _steps(indices: Sequence[int]) -> str:
    numbers = ", ".join(str(i) for i in indices)
    return f"step {numbers}" if len(indices) == 1 else f"steps {numbers}"


def _verb(indices: Sequence[int], one: str, many: str) -> str:
    return one if len(indices) == 1 else many
