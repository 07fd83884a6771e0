"""nebius/SWE-agent-trajectories dataset rows (a JSON array of rows; one row, or JSONL of rows).

Each row is one SWE-agent 0.x run flattened to `trajectory[]` turns `{role, text,
system_prompt, mask, cutoff_date}`: `system` (its prompt is in `system_prompt`, `text` is null),
`user` (the issue, then observations) and `ai` (thought plus a fenced command). `mask` only
marks the `ai` turns and carries nothing the roles do not, so it is not kept.

`target` is the dataset's resolved label. `instance_id` can carry a `_<n>` sample suffix
(several runs of one task); the task id is the id without it.
"""

from __future__ import annotations

import re
from typing import Any

from app.trajectories.formats.base import Document, Message, Trajectory, fail, text_of
from app.trajectories.formats.common import (
    Run,
    entry_role,
    first_run_value,
    iter_runs,
    run_object,
)
from app.trajectories.formats.swe_agent import is_autosubmit_text

NAME = "nebius"
_ROLES = {"system": "system", "user": "user", "ai": "assistant", "assistant": "assistant"}
_SAMPLE_SUFFIX = re.compile(r"_\d+$")
EVAL_LOG_TAIL = 2000
# Columns of the dataset that no other format puts beside a `trajectory`.
_ROW_COLUMNS = frozenset({"target", "generated_patch", "eval_logs"})


class _Importer:
    name = NAME

    def sniff(self, doc: Document) -> str | None:
        row = first_run_value(doc)
        if not isinstance(row, dict) or "trajectory" not in row:
            return "no rows with a 'trajectory' key"
        if "history" in row:
            return "has 'history' (a SWE-agent .traj, not a dataset row)"
        if _ROW_COLUMNS & row.keys() or _starts_with_turn(row["trajectory"]):
            return None
        return "neither nebius columns (target, generated_patch) nor {role, text} turns"

    def parse(self, doc: Document) -> list[Trajectory]:
        return [_parse_row(run, index) for index, run in enumerate(iter_runs(doc))]


def _starts_with_turn(turns: Any) -> bool:
    # Chat messages (`content`, as SWE-rebench's `trajectory` holds) are not nebius turns.
    return (
        isinstance(turns, list)
        and bool(turns)
        and isinstance(turns[0], dict)
        and "role" in turns[0]
        and ("text" in turns[0] or "system_prompt" in turns[0])
    )


def _parse_row(run: Run, run_index: int) -> Trajectory:
    row = run_object(run)
    turns = row.get("trajectory")
    if not isinstance(turns, list):
        raise fail("'trajectory' must be a list", run.record, run.at("trajectory"))
    messages = [_message(turn, run, f"trajectory[{i}]") for i, turn in enumerate(turns)]
    if not messages:
        raise fail("'trajectory' is empty", run.record, run.at("trajectory"))
    if messages[-1]["role"] == "assistant" and is_autosubmit_text(messages[-1]["content"]):
        # SWE-agent's "Exit due to ..." pseudo-step: the model did not write it.
        messages.pop()

    instance_id = row.get("instance_id")
    target = row.get("target")
    return Trajectory(
        messages=messages,
        source_format=NAME,
        tools=None,  # text commands; the tool list is prose inside the system prompt
        resolved=target if isinstance(target, bool) else None,
        task_id=_task_id(instance_id),
        metadata=_metadata(row, run_index),
    )


def _message(turn: Any, run: Run, path: str) -> Message:
    if not isinstance(turn, dict):
        raise fail("a trajectory turn must be an object", run.record, run.at(path))
    role = entry_role(
        turn,
        run,
        path,
        _ROLES,
        entry_name="a trajectory turn",
        expected_roles="system, user or ai",
    )
    text = text_of(turn.get("text"))
    if role == "system" and text is None:
        text = text_of(turn.get("system_prompt"))
    if text is None:
        field = "system_prompt" if role == "system" else "text"
        raise fail(f"a {role} turn has no '{field}'", run.record, run.at(f"{path}.{field}"))
    return {"role": _ROLES[role], "content": text}


def _task_id(instance_id: Any) -> str | None:
    if not isinstance(instance_id, str) or not instance_id:
        return None
    return _SAMPLE_SUFFIX.sub("", instance_id)


def _metadata(row: dict[str, Any], run_index: int) -> dict[str, Any]:
    fields = {
        "instance_id": row.get("instance_id"),
        "model": row.get("model_name"),
        "exit_status": row.get("exit_status"),
        "submission": row.get("generated_patch"),
    }
    metadata: dict[str, Any] = {"run_index": run_index}
    # Every value the row has is kept as written, lists and objects too (not only scalars).
    metadata.update((key, value) for key, value in fields.items() if value is not None)
    eval_logs = row.get("eval_logs")
    if isinstance(eval_logs, str) and eval_logs:
        # The tail holds the test summary; the whole log would bloat every stored run.
        metadata["eval_logs_tail"] = eval_logs[-EVAL_LOG_TAIL:]
    return metadata


IMPORTER = _Importer()
