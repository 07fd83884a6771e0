"""Plain helpers shared by tests: paths to the real trajectories and small builders."""

from __future__ import annotations

from pathlib import Path

# A copy of the shared development trajectories, untouched bytes
# (see data/trajectories/PROVENANCE.md).
TRAJECTORY_DIR = Path(__file__).parent / "data" / "trajectories"


def trajectory_file(relative: str) -> Path:
    return TRAJECTORY_DIR / relative


def all_trajectory_files() -> list[Path]:
    return sorted(p for p in TRAJECTORY_DIR.rglob("*") if p.is_file() and p.suffix != ".md")
