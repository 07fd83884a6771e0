"""The canonical trajectory every importer produces, and the importer contract.

Pure: no database, HTTP or torch. A canonical trajectory is a list of OpenAI chat messages
(`system`, `user`, `assistant` with optional `tool_calls`, `tool` with `tool_call_id`) plus an
optional `tools` list, `resolved`, `task_id` and free `metadata` (docs/recipe.md,
"Trajectories and steps").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from app.errors import InvalidTrajectoryError

Message = dict[str, Any]
JsonValue = Any


@dataclass
class Trajectory:
    """One agent run, normalised."""

    messages: list[Message]
    source_format: str
    tools: list[dict[str, Any]] | None = None
    resolved: bool | None = None
    task_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One top-level JSON value of an upload and where it sits in the file.

    A `.json` file is one record with `line=None`; a `.jsonl` file is one record per non-empty
    line, numbered from 1; a Parquet file one record per row, numbered from 1 (`unit="row"`).
    """

    value: JsonValue
    line: int | None = None
    unit: str = "line"

    def where(self, path: str = "") -> str:
        """A location string for an error: `line 3: history[2].cause`, or just the path."""
        if self.line is None:
            return path or "(document)"
        here = f"{self.unit} {self.line}"
        return f"{here}: {path}" if path else here


@dataclass(frozen=True)
class Document:
    """A decoded upload: one record for JSON, one per line for JSONL."""

    records: tuple[Record, ...]
    is_lines: bool = False


class Importer(Protocol):
    """One source format.

    `sniff` answers quickly, without parsing everything: `None` when the document looks like
    this format, or a short reason why it does not (shown to the user when no format matches).
    `parse` does the real work and raises `InvalidTrajectoryError` with a precise location.
    """

    name: str

    def sniff(self, doc: Document) -> str | None: ...

    def parse(self, doc: Document) -> list[Trajectory]: ...


def fail(message: str, record: Record, path: str = "") -> InvalidTrajectoryError:
    """Build (not raise) an InvalidTrajectoryError located at `path` inside `record`."""
    return InvalidTrajectoryError(message, location=record.where(path))


def text_of(content: Any) -> str | None:
    """Flatten an OpenAI `content` (string, list of parts, or null) to plain text.

    Text parts are joined with no separator, as providers concatenate them; non-text parts
    (images) are replaced by a short marker so nothing silently disappears.
    """
    if content is None:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif part.get("type"):
                    pieces.append(f"[{part['type']}]")
        return "".join(pieces)
    return str(content)
