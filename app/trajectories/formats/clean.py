"""Clean canonical trajectories before storage.

- NUL characters: Postgres text and JSONB cannot hold U+0000, and real tool output has them.
  Every one (in messages, tools, metadata, task id) becomes U+FFFD and is counted in
  `metadata["nul_replacements"]`; the original bytes stay in the stored upload.
- Terminal escape sequences (colours, bracketed-paste toggles such as ESC[?2004l) in
  observations are noise for a critic and for training; they are removed from tool and user
  messages and counted in `metadata["ansi_escapes_removed"]`. Assistant text is the model's own
  output and is never touched.
"""

from __future__ import annotations

import re
from typing import Any

from app.trajectories.formats.base import Trajectory

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: ESC [ params intermediates final
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL or ST
    r"|\x1b[@-Z\\-_]"  # two-character escapes
)
REPLACEMENT = "\ufffd"


def _replace_nul(value: Any, counter: list[int]) -> Any:
    if isinstance(value, str):
        if "\x00" in value:
            counter[0] += value.count("\x00")
            return value.replace("\x00", REPLACEMENT)
        return value
    if isinstance(value, list):
        return [_replace_nul(v, counter) for v in value]
    if isinstance(value, dict):
        return {_replace_nul(k, counter): _replace_nul(v, counter) for k, v in value.items()}
    return value


def strip_ansi(text: str) -> tuple[str, int]:
    """`text` without terminal escape sequences, and how many were removed."""
    if "\x1b" not in text:
        return text, 0
    stripped, count = _ANSI.subn("", text)
    return stripped, count


def _strip_observation_escapes(messages: list[dict[str, Any]]) -> int:
    removed = 0
    for message in messages:
        if message.get("role") in ("tool", "user") and isinstance(message.get("content"), str):
            message["content"], count = strip_ansi(message["content"])
            removed += count
    return removed


def clean_trajectory(trajectory: Trajectory) -> Trajectory:
    counter = [0]
    messages = _replace_nul(trajectory.messages, counter)
    tools = _replace_nul(trajectory.tools, counter)
    metadata = _replace_nul(trajectory.metadata, counter)
    task_id = _replace_nul(trajectory.task_id, counter)
    escapes = _strip_observation_escapes(messages)
    if counter[0]:
        metadata["nul_replacements"] = counter[0]
    if escapes:
        metadata["ansi_escapes_removed"] = escapes
    return Trajectory(
        messages=messages,
        source_format=trajectory.source_format,
        tools=tools,
        resolved=trajectory.resolved,
        task_id=task_id,
        metadata=metadata,
    )
