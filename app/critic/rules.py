"""The rules critic's logic: heuristic step labels, and reading back prompts we wrote.

Pure. The rules, applied to the steps in order:

- **failing observation** -> `mistake`: the output shows a non-zero exit code
  (`<returncode>1</returncode>`, `[The command completed with exit code 2.]`, `exit code 1`,
  `exit status 1`), a Python traceback, a syntax error, a rejected edit (SWE-agent's "Your
  proposed edit has introduced new syntax error(s)", "Your changes have NOT been applied",
  "edit was not applied", str_replace_editor's "No replacement was performed") or
  "command not found";
- **exact repeat** -> `unnecessary`: the action is character-for-character (ignoring
  surrounding whitespace) the action of an earlier step that is shown;
- **recovery** -> `recover`: the step follows a `mistake` step directly and does not fail;
- otherwise **default** -> `good`.

Precedence when several apply: mistake > unnecessary > recover > good. A failing step is a
mistake whatever else it is; a repeat right after a mistake repeats, it does not fix anything.

Custom label sets: each outcome is answered with the label of the same name when the set has
one, otherwise with the set's first label.

The rules see what the prompt shows: in a window, repeats of steps outside the window are not
seen, and a shortened observation may have lost the signal a full one had.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.critic.labels import LabelSet
from app.critic.prompt import StepText, parse_indices, step_texts
from app.recipe.steps import Step
from app.status import JobMode


class Outcome(StrEnum):
    GOOD = "good"
    UNNECESSARY = "unnecessary"
    MISTAKE = "mistake"
    RECOVER = "recover"


@dataclass(frozen=True)
class RuleVerdict:
    index: int
    outcome: Outcome
    label: str
    reason: str


@dataclass(frozen=True)
class ParsedPrompt:
    """What a critic request built by `app.critic.prompt` asks."""

    mode: JobMode
    steps: tuple[StepText, ...]  # the shown steps, texts as shown (fenced, maybe shortened)
    asked_index: int | None  # step mode: the step asked about
    target_indices: tuple[int, ...]
    label_names: tuple[str, ...]


class PromptFormatError(ValueError):
    """The messages are not a prompt built by `app.critic.prompt`."""


# ---------------------------------------------------------------------------- failure signals

_REJECTED_EDIT = re.compile(
    r"Your proposed edit has introduced new syntax error"
    r"|Your changes have NOT been applied"
    r"|edit was not applied"
    r"|No replacement was performed",
    re.IGNORECASE,
)
_COMMAND_NOT_FOUND = re.compile(r"command not found", re.IGNORECASE)
_SYNTAX_ERROR = re.compile(
    r"\b(?:SyntaxError|IndentationError|TabError): |syntax error", re.IGNORECASE
)
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
_EXIT_CODE = re.compile(
    r"<returncode>\s*(-?\d+)\s*</returncode>|\bexit (?:code|status)\b[\s:=]*(-?\d+)",
    re.IGNORECASE,
)
_SIGNALS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_REJECTED_EDIT, "a rejected edit"),
    (_COMMAND_NOT_FOUND, "'command not found'"),
    (_SYNTAX_ERROR, "a syntax error"),
    (_TRACEBACK, "a Python traceback"),
)


def failure_signal(observation: str | None) -> str | None:
    """What in the observation shows that the step failed, or None when nothing does."""
    if not observation:
        return None
    for pattern, what in _SIGNALS:
        if pattern.search(observation):
            return what
    for match in _EXIT_CODE.finditer(observation):
        digits = match.group(1) or match.group(2)
        # Any non-zero code fails; a code of thousands of digits is non-zero too, and too long
        # for int() to read.
        if digits.lstrip("-").strip("0"):
            return f"exit code {digits[:20]}"
    return None


# ---------------------------------------------------------------------------- judging


def label_for(outcome: Outcome, label_names: Sequence[str]) -> str:
    return outcome.value if outcome.value in label_names else label_names[0]


def judge_steps(steps: Sequence[StepText], label_names: Sequence[str]) -> list[RuleVerdict]:
    """One verdict per step, in order; `steps` are consecutive steps of one trajectory."""
    verdicts: list[RuleVerdict] = []
    first_seen: dict[str, int] = {}
    for position, step in enumerate(steps):
        outcome, reason = _judge_one(step, first_seen, verdicts[-1] if position else None)
        verdicts.append(RuleVerdict(step.index, outcome, label_for(outcome, label_names), reason))
        action = (step.action or "").strip()
        if action:
            first_seen.setdefault(action, step.index)
    return verdicts


def _judge_one(
    step: StepText, first_seen: dict[str, int], previous: RuleVerdict | None
) -> tuple[Outcome, str]:
    signal = failure_signal(step.observation)
    if signal is not None:
        return Outcome.MISTAKE, f"Failing-observation rule: the output shows {signal}."
    action = (step.action or "").strip()
    if action and action in first_seen:
        return (
            Outcome.UNNECESSARY,
            f"Exact-repeat rule: the action repeats step {first_seen[action]} exactly.",
        )
    if previous is not None and previous.outcome is Outcome.MISTAKE:
        return (
            Outcome.RECOVER,
            f"Recovery rule: the step succeeds right after the mistake in step {previous.index}.",
        )
    return Outcome.GOOD, "Default rule: no failure, exact repeat or recovery was found."


def label_trajectory(
    messages: Sequence[dict[str, Any]], steps: Sequence[Step], labels: LabelSet
) -> list[RuleVerdict]:
    """The rules applied to a whole trajectory, unshortened: what the rules prescribe."""
    return judge_steps(step_texts(messages, steps), labels.names)


def answer_prompt(
    parsed: ParsedPrompt, verdicts: Sequence[RuleVerdict] | None = None
) -> list[RuleVerdict]:
    """Verdicts for the steps the prompt asks about, judged over every step it shows.

    `verdicts`: `judge_steps` over the shown steps, when the caller already has them.
    """
    if verdicts is None:
        verdicts = judge_steps(parsed.steps, parsed.label_names)
    by_index = {v.index: v for v in verdicts}
    missing = [i for i in parsed.target_indices if i not in by_index]
    if missing:
        raise PromptFormatError(f"the prompt asks about steps it does not show: {missing}")
    return [by_index[i] for i in parsed.target_indices]


# ---------------------------------------------------------------------------- reading prompts

_LABEL_LINE = re.compile(r"- ([a-z][a-z0-9_]{0,31}): ")
_TRAJECTORY_OPEN = re.compile(r'<trajectory steps="(\d+)">')
_STEP_OPEN = re.compile(r'<step index="(\d+)">')
_INSTRUCTIONS_OPEN = re.compile(r'<instructions targets="([0-9][0-9,-]*)">')
_QUESTION_OPEN = re.compile(r'<question step="(\d+)">')
_PARTS = ("thought", "action", "observation")


@dataclass(frozen=True)
class PromptPrefix:
    """The system message and the trajectory message, read back (shared by step requests)."""

    steps: tuple[StepText, ...]
    label_names: tuple[str, ...]
    instructed_targets: tuple[int, ...] | None  # trajectory mode: the steps to label


def parse_prompt(messages: Sequence[dict[str, Any]]) -> ParsedPrompt:
    """Read back a request built by `app.critic.prompt`, re-asks included.

    Only fixed positions are read (system, trajectory, and in step mode the question), so text
    in a re-ask, which quotes the model's answer, cannot change what is parsed.
    """
    return parse_question(messages, read_prefix(messages))


def read_prefix(messages: Sequence[dict[str, Any]]) -> PromptPrefix:
    """The first two messages read back; the part of a request worth caching."""
    label_names = _label_names(_content(messages, 0, "system"))
    lines = _content(messages, 1, "user").split("\n")
    steps, cursor = _read_trajectory(lines, _skip_task(lines))
    if cursor == len(lines):
        return PromptPrefix(steps, label_names, None)
    opening = _INSTRUCTIONS_OPEN.fullmatch(lines[cursor])
    if opening is None:
        raise PromptFormatError(f"unexpected line after </trajectory>: {lines[cursor][:80]!r}")
    return PromptPrefix(steps, label_names, parse_indices(opening.group(1)))


def parse_question(messages: Sequence[dict[str, Any]], prefix: PromptPrefix) -> ParsedPrompt:
    """What the request asks, given its prefix read back by `read_prefix`."""
    if prefix.instructed_targets is not None:
        targets = prefix.instructed_targets
        return ParsedPrompt(JobMode.TRAJECTORY, prefix.steps, None, targets, prefix.label_names)
    question = _content(messages, 2, "user") if len(messages) > 2 else ""
    asked = _QUESTION_OPEN.match(question)
    if asked is None:
        raise PromptFormatError(
            "neither <instructions> after the trajectory nor a <question> message follows it"
        )
    index = int(asked.group(1))
    return ParsedPrompt(JobMode.STEP, prefix.steps, index, (index,), prefix.label_names)


def _content(messages: Sequence[dict[str, Any]], position: int, role: str) -> str:
    if len(messages) <= position:
        raise PromptFormatError(f"expected a {role} message at position {position}")
    message = messages[position]
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("role") != role or not isinstance(content, str):
        raise PromptFormatError(f"messages[{position}] should be a {role} message with text")
    return content


def _label_names(system: str) -> tuple[str, ...]:
    lines = system.split("\n")
    try:
        start = lines.index("Labels:") + 1
    except ValueError:
        # A job's own system template need not say "Labels:": its first label line starts
        # the list.
        start = next((n for n, line in enumerate(lines) if _LABEL_LINE.match(line)), len(lines))
    names: list[str] = []
    for line in lines[start:]:
        match = _LABEL_LINE.match(line)
        if match is None:
            break
        names.append(match.group(1))
    if not names:
        raise PromptFormatError("the system message lists no labels")
    return tuple(names)


def _closing(lines: list[str], tag: str, start: int) -> int:
    try:
        return lines.index(f"</{tag}>", start)
    except ValueError:
        raise PromptFormatError(f"<{tag}> opened on line {start} is never closed") from None


def _skip_task(lines: list[str]) -> int:
    """The line after `<trajectory ...>`; the task and trusted notes before it are skipped."""
    if not lines or lines[0] != "<task>":
        raise PromptFormatError("the user message does not start with <task>")
    cursor = _closing(lines, "task", 1) + 1
    while cursor < len(lines) and not _TRAJECTORY_OPEN.fullmatch(lines[cursor]):
        cursor += 1
    if cursor == len(lines):
        raise PromptFormatError("no <trajectory> after the task")
    return cursor + 1


def _read_trajectory(lines: list[str], cursor: int) -> tuple[tuple[StepText, ...], int]:
    """Steps up to `</trajectory>`, and the line after it."""
    steps: list[StepText] = []
    while cursor < len(lines) and lines[cursor] != "</trajectory>":
        opening = _STEP_OPEN.fullmatch(lines[cursor])
        if opening is None:
            raise PromptFormatError(f"expected <step index=...>, got {lines[cursor][:80]!r}")
        step, cursor = _read_step(lines, cursor + 1, int(opening.group(1)))
        steps.append(step)
    if cursor == len(lines):
        raise PromptFormatError("the trajectory is never closed")
    return tuple(steps), cursor + 1


def _read_step(lines: list[str], cursor: int, index: int) -> tuple[StepText, int]:
    parts: dict[str, str] = {}
    while cursor < len(lines) and lines[cursor] != "</step>":
        tag = lines[cursor][1:-1] if lines[cursor].startswith("<") else ""
        if tag not in _PARTS or tag in parts:
            raise PromptFormatError(f"unexpected line in step {index}: {lines[cursor][:80]!r}")
        end = _closing(lines, tag, cursor + 1)
        parts[tag] = "\n".join(lines[cursor + 1 : end])
        cursor = end + 1
    if cursor == len(lines):
        raise PromptFormatError(f"step {index} is never closed")
    step = StepText(index, parts.get("thought", ""), parts.get("action"), parts.get("observation"))
    return step, cursor + 1
