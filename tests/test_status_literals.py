"""Statuses are spelled once, in app/status.py: anywhere else in app/ and workers/ a string
literal equal to a status (`x == "failed"`, `.values(status="done")`) is refused, so a status
is always written and compared with its enum member."""

from __future__ import annotations

import ast
from pathlib import Path

from app.status import ExportStatus, JobStatus, VerdictStatus

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("app", "workers")
# Not checked: the enums themselves.
NOT_CHECKED = ("app/status.py",)
# The statuses of stored rows. IngestStatus is left out: "created" is also a count and an
# OpenAI response field, not a status, wherever else it is written.
STATUS_ENUMS = (JobStatus, VerdictStatus, ExportStatus)
STATUS_VALUES = frozenset(member.value for enum in STATUS_ENUMS for member in enum)


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def status_literals(source: str, filename: str) -> list[str]:
    """`file:line: 'value'` for each string constant in `source` that is a status."""
    tree = ast.parse(source, filename)
    docstrings = _docstrings(tree)
    hits = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in STATUS_VALUES
        and id(node) not in docstrings
    ]
    return [
        f"{filename}:{node.lineno}: {node.value!r}"
        for node in sorted(hits, key=lambda n: (n.lineno, n.col_offset))
    ]


def _checked_files() -> list[Path]:
    files = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not any(
                relative == skipped or relative.startswith(skipped) for skipped in NOT_CHECKED
            ):
                files.append(path)
    return files


def test_no_status_literal_outside_the_status_module() -> None:
    files = _checked_files()
    assert any(path.name == "workqueue.py" for path in files)  # the walk reaches the code
    found = [
        hit
        for path in files
        for hit in status_literals(path.read_text(), path.relative_to(ROOT).as_posix())
    ]
    assert not found, "use the app.status enum members instead of:\n" + "\n".join(found)


def test_the_check_finds_a_planted_literal_and_skips_docstrings() -> None:
    source = (
        'def close(job):\n    """done"""\n    return job.status == "failed" or job.mode == "step"\n'
    )
    assert status_literals(source, "planted.py") == ["planted.py:3: 'failed'"]
