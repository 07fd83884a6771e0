"""The architecture contracts in pyproject.toml (`lint-imports`, also run by `make lint`): they
hold on this tree, and they catch the import cycles and layer breaks they exist for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and the contracts, to break."""
    for name in ("app", "workers"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_contracts_hold_on_this_tree() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


def test_the_application_importing_the_worker_entry_point_breaks_the_layers(tree: Path) -> None:
    # The cycle the layout removed: the API's queue module imported the Celery entry point.
    _append(tree / "app/jobs/queue.py", "from workers.celery_app import celery_app  # noqa")
    result = _lint(tree)
    assert result.returncode == 1
    assert "app.jobs.queue -> workers.celery_app" in result.stdout


def test_a_cycle_between_features_is_refused(tree: Path) -> None:
    # Ingest reading verdicts from jobs, as the trajectory route once did.
    _append(tree / "app/trajectories/service.py", "from app.jobs import service as _jobs  # noqa")
    result = _lint(tree)
    assert result.returncode == 1
    assert "No cycles are allowed in app" in result.stdout
    assert "app.trajectories.service -> app.jobs.service" in result.stdout


def test_pure_logic_importing_the_database_is_refused(tree: Path) -> None:
    _append(tree / "app/recipe/masking.py", "import sqlalchemy  # noqa")
    result = _lint(tree)
    assert result.returncode == 1
    assert "Pure logic imports no database, queue, HTTP client, web framework or torch BROKEN" in (
        result.stdout
    )
    assert "app.recipe.masking -> sqlalchemy" in result.stdout


def test_torch_outside_the_trainer_is_refused(tree: Path) -> None:
    _append(tree / "app/exports/builder.py", "import torch  # noqa")
    result = _lint(tree)
    assert result.returncode == 1
    assert "Only the trainer imports torch BROKEN" in result.stdout
    assert "app.exports.builder -> torch" in result.stdout
