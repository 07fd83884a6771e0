"""Plain builders for canonical trajectories and row counts used by several tests."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Step, Trajectory, Upload


def make_trajectory(
    steps: int = 2,
    *,
    task: str = "fix the bug",
    task_id: str | None = "t-1",
    resolved: bool | None = None,
    salt: str = "",
) -> dict[str, Any]:
    """A canonical run with `steps` tool-calling assistant turns, each answered."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": f"{task}{salt}"},
    ]
    for i in range(steps):
        call_id = f"call_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": f"step {i}: look around",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": "bash",
                            "arguments": json.dumps({"command": f"ls {i}"}),
                        },
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": f"file_{i}.py"})
    item: dict[str, Any] = {"messages": messages, "task_id": task_id}
    if resolved is not None:
        item["resolved"] = resolved
    return item


def row_counts(session: Session) -> dict[str, int]:
    """How many trajectories, steps and uploads the database holds (all projects)."""
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Trajectory, Step, Upload)
    }
