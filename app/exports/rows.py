"""A trajectory (`Source`) and its policy decision as one row of each format (`formats.py`
says which format uses which). Pure: `app.exports.service` loads the sources."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from app.exports.tokenize import Example, weights_from_messages
from app.recipe.masking import StepLabel, TrajectoryDecision


@dataclass(frozen=True)
class Source:
    """One trajectory as the policy and the writers see it."""

    id: uuid.UUID
    resolved: bool | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    step_messages: tuple[int, ...]  # message index of each step
    labels: tuple[StepLabel, ...]  # one per step


def context_messages(source: Source, decision: TrajectoryDecision) -> list[dict[str, Any]]:
    """The messages the row shows: all of them, or (prefix policy) those before the cut."""
    if decision.context_steps >= len(source.step_messages):
        return source.messages
    return source.messages[: source.step_messages[decision.context_steps]]


def message_weights(source: Source, decision: TrajectoryDecision) -> dict[int, float]:
    """Weight of each trained step's assistant message, by message index."""
    return {
        source.step_messages[k]: step.weight
        for k, step in enumerate(decision.steps[: decision.context_steps])
        if step.weight > 0
    }


def example(source: Source, decision: TrajectoryDecision) -> Example:
    messages = context_messages(source, decision)
    steps = source.step_messages[: decision.context_steps]
    return Example(
        str(source.id), messages, source.tools, tuple(steps), message_weights(source, decision)
    )


def openai_row(source: Source, decision: TrajectoryDecision) -> dict[str, Any] | None:
    """`{"messages", "tools"}`: the canonical messages with `"weight": 0|1` on every assistant
    message, as `openai_jsonl_raw` writes them (`openai_jsonl` fits them to the fine-tuning
    format: `finetune.fit_row`). None if nothing is trained."""
    weights = message_weights(source, decision)
    if not weights:
        return None
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(context_messages(source, decision)):
        if message.get("role") == "assistant":
            message = {**message, "weight": 1 if weights.get(index, 0) > 0 else 0}
        messages.append(message)
    row: dict[str, Any] = {"messages": messages}
    if source.tools:
        row["tools"] = source.tools
    return row


def message_example(key: str, row: dict[str, Any]) -> Example:
    """A row of messages as an example to measure (and split): every assistant message is a
    step, trained at its `weight`."""
    messages = row["messages"]
    steps = tuple(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return Example(key, messages, row.get("tools"), steps, weights_from_messages(messages))


def message_row(example: Example) -> dict[str, Any]:
    """The `{"messages", "tools"}` row of an example (or of a piece of one)."""
    row: dict[str, Any] = {"messages": example.messages}
    if example.tools:
        row["tools"] = example.tools
    return row


def prm_row(source: Source, decision: TrajectoryDecision) -> dict[str, Any] | None:
    """Stepwise supervision `{"prompt", "completions", "labels"}` (TRL PRMTrainer): the task,
    then each step (its text, tool calls and observation) labelled True when trained."""
    messages = source.messages
    steps = source.step_messages[: decision.context_steps]
    if not steps:
        return None
    prompt = "\n\n".join(_text(m) for m in messages[: steps[0]])
    cut = decision.context_steps < len(source.step_messages)
    end = source.step_messages[decision.context_steps] if cut else len(messages)
    bounds = [*steps, end]
    completions = ["\n\n".join(_text(m) for m in messages[a:b]) for a, b in pairwise(bounds)]
    labels = [step.weight > 0 for step in decision.steps[: decision.context_steps]]
    if not any(labels):
        return None
    return {
        "prompt": prompt,
        "completions": completions,
        "labels": labels,
        "trajectory_id": str(source.id),
    }


def _text(message: dict[str, Any]) -> str:
    """A message as plain text: what it says, then any tool calls as JSON lines."""
    parts = [str(message["content"])] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        parts.append(
            json.dumps(
                {"name": function.get("name"), "arguments": function.get("arguments")},
                ensure_ascii=False,
            )
        )
    return "\n".join(parts)
