"""Ingest, read, list and update trajectories. Services flush; the caller commits."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal, cast

import zstandard
from sqlalchemy import Table, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, load_only

from app import json_input
from app.errors import InvalidTrajectoryError, NoStepsError, NotFoundError
from app.models import Step, Trajectory, Upload, new_id, utcnow
from app.pagination import decode_cursor, encode_cursor
from app.recipe import steps as recipe_steps
from app.status import IngestStatus
from app.trajectories import formats
from app.trajectories.formats.base import Trajectory as Canonical

ResolvedFilter = Literal["true", "false", "unknown"]
# Stored runs are served back as JSON, and the response encoder refuses deep nesting; no real
# run's tools or metadata nest anywhere near this deep.
MAX_NESTING = 64
# Level 3 keeps nearly all of level 6's ratio on trajectories (3.5x vs 3.6x in bench/ingest.py)
# at a fraction of the CPU, which is a tenth of the ingest path.
_ZSTD_LEVEL = 3


@dataclass(frozen=True)
class IngestedRun:
    id: uuid.UUID
    status: IngestStatus
    source_format: str
    num_steps: int
    resolved: bool | None


@dataclass(frozen=True)
class IngestResult:
    runs: list[IngestedRun]

    @property
    def created(self) -> int:
        return sum(1 for run in self.runs if run.status == IngestStatus.CREATED)

    @property
    def duplicates(self) -> int:
        return len(self.runs) - self.created


@dataclass(frozen=True)
class _PlannedRun:
    run: Canonical
    digest: str
    steps: list[recipe_steps.Step]


def content_hash(run: Canonical) -> str:
    """sha256 of the canonical messages and tools: what the agent saw and did."""
    canonical = json.dumps(
        {"messages": run.messages, "tools": run.tools},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def ingest(
    session: Session,
    project_id: uuid.UUID,
    raw: bytes,
    *,
    fmt: str = "auto",
    resolved: bool | None = None,
    lines: bool | None = None,
    parquet: bool = False,
    content_type: str | None = None,
    filename: str | None = None,
) -> IngestResult:
    """Parse one upload and store every run in it that is not already stored.

    Everything is checked before anything is written, and the caller commits the whole upload
    as one transaction: an upload is stored entirely or not at all.
    """
    plan = _plan(formats.parse_upload(raw, fmt, lines=lines, parquet=parquet), resolved)
    upload_id = _store_upload(
        session, project_id, raw, plan[0].run.source_format, content_type, filename
    )
    existing = _existing_ids(session, project_id, {p.digest for p in plan})
    rows: dict[str, dict[str, Any]] = {}
    for item in plan:
        if item.digest not in existing and item.digest not in rows:
            rows[item.digest] = _trajectory_row(project_id, upload_id, item)
    inserted = _insert_trajectories(session, list(rows.values()))
    lost = {digest for digest, row in rows.items() if row["id"] not in inserted}
    if lost:
        # Another upload stored these runs between our look-up and our insert: theirs stand.
        existing.update(_existing_ids(session, project_id, lost))
        rows = {digest: row for digest, row in rows.items() if digest not in lost}
    step_rows = [
        step_row(rows[item.digest]["id"], step)
        for digest, item in {item.digest: item for item in plan}.items()
        if digest in rows
        for step in item.steps
    ]
    if step_rows:
        session.execute(insert(Step), step_rows)
    session.flush()

    results: list[IngestedRun] = []
    reported: set[str] = set()
    for item in plan:
        # A run repeated inside one file is created once and a duplicate after that.
        if item.digest in rows and item.digest not in reported:
            row = rows[item.digest]
            results.append(
                IngestedRun(
                    row["id"],
                    IngestStatus.CREATED,
                    row["source_format"],
                    row["num_steps"],
                    row["resolved"],
                )
            )
        else:
            results.append(_duplicate(session, existing, rows, item.digest))
        reported.add(item.digest)
    return IngestResult(results)


def _plan(runs: list[Canonical], resolved: bool | None) -> list[_PlannedRun]:
    if not runs:
        raise InvalidTrajectoryError("the upload holds no trajectory", location="(document)")
    plan: list[_PlannedRun] = []
    for position, run in enumerate(runs):
        steps = recipe_steps.split_steps(run.messages)
        if not steps:
            where = f"run {position}" if len(runs) > 1 else "(document)"
            raise NoStepsError(
                f"run {position} ({run.task_id or 'no task id'}) has no assistant step, so "
                "there is nothing to label; nothing was stored",
                location=where,
            )
        # Importers build messages flat (strings, tool calls with string arguments); tools
        # (JSON schemas) and metadata are the parts that keep what the file nested.
        deep = json_input.too_deep({"tools": run.tools, "metadata": run.metadata}, MAX_NESTING)
        if deep is not None:
            where = f"run {position}: {deep}" if len(runs) > 1 else deep
            raise InvalidTrajectoryError(
                f"{deep} nests more than {MAX_NESTING} levels deep; nothing was stored",
                location=where,
            )
        if resolved is not None:
            run.resolved = resolved
        plan.append(_PlannedRun(run, content_hash(run), steps))
    return plan


def _duplicate(
    session: Session,
    existing: dict[str, uuid.UUID],
    pending: dict[str, dict[str, Any]],
    digest: str,
) -> IngestedRun:
    if digest in pending:  # stored by this very upload
        row = pending[digest]
        return IngestedRun(
            row["id"],
            IngestStatus.DUPLICATE,
            row["source_format"],
            row["num_steps"],
            row["resolved"],
        )
    stored = session.get(Trajectory, existing[digest])
    if stored is None:  # pragma: no cover - the row was just read under this transaction
        raise NotFoundError("trajectory vanished during upload")
    return IngestedRun(
        stored.id, IngestStatus.DUPLICATE, stored.source_format, stored.num_steps, stored.resolved
    )


def _existing_ids(
    session: Session, project_id: uuid.UUID, digests: set[str]
) -> dict[str, uuid.UUID]:
    if not digests:
        return {}
    rows = session.execute(
        select(Trajectory.content_hash, Trajectory.id).where(
            Trajectory.project_id == project_id, Trajectory.content_hash.in_(digests)
        )
    ).all()
    return {row.content_hash: row.id for row in rows}


def _trajectory_row(
    project_id: uuid.UUID, upload_id: uuid.UUID, item: _PlannedRun
) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": new_id(),
        "project_id": project_id,
        "upload_id": upload_id,
        "content_hash": item.digest,
        "source_format": item.run.source_format,
        "task_id": item.run.task_id,
        "resolved": item.run.resolved,
        "messages": item.run.messages,
        "tools": item.run.tools,
        "metadata": item.run.metadata,
        "num_steps": len(item.steps),
        "created_at": now,
        "updated_at": now,
    }


def step_row(trajectory_id: uuid.UUID, step: recipe_steps.Step) -> dict[str, Any]:
    """The stored row of one step of a trajectory (its `steps` table row)."""
    return {
        "trajectory_id": trajectory_id,
        "index": step.index,
        "message_index": step.message_index,
        "observation_indices": list(step.observation_indices),
        "action": step.action,
        "tool_names": list(step.tool_names),
    }


def _insert_trajectories(session: Session, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
    """Insert rows, skipping any whose content hash a concurrent upload already stored."""
    if not rows:
        return set()
    table = cast(Table, Trajectory.__table__)
    dialect = session.get_bind().dialect.name
    base = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    statement = base.on_conflict_do_nothing(
        index_elements=["project_id", "content_hash"]
    ).returning(table.c.id)
    return {row[0] for row in session.execute(statement, rows)}


def _store_upload(
    session: Session,
    project_id: uuid.UUID,
    raw: bytes,
    source_format: str,
    content_type: str | None,
    filename: str | None,
) -> uuid.UUID:
    """Keep the original bytes (zstd-compressed), once per project and content."""
    digest = hashlib.sha256(raw).hexdigest()
    found = session.scalar(
        select(Upload.id).where(Upload.project_id == project_id, Upload.sha256 == digest)
    )
    if found is not None:
        return found
    upload = Upload(
        project_id=project_id,
        sha256=digest,
        size_bytes=len(raw),
        compression="zstd",
        data=zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw),
        content_type=content_type,
        filename=filename,
        source_format=source_format,
    )
    session.add(upload)
    session.flush()
    return upload.id


def get_upload(session: Session, project_id: uuid.UUID, upload_id: uuid.UUID) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.project_id != project_id:
        raise NotFoundError(f"upload {upload_id} not found", location="path.upload_id")
    return upload


def read_upload(session: Session, project_id: uuid.UUID, upload_id: uuid.UUID) -> bytes:
    """The original bytes of an upload, exactly as received."""
    upload = get_upload(session, project_id, upload_id)
    return bytes(zstandard.ZstdDecompressor().decompress(upload.data))


def get_trajectory(session: Session, project_id: uuid.UUID, trajectory_id: uuid.UUID) -> Trajectory:
    """The trajectory, if it belongs to this project; another project's id is a 404."""
    trajectory = session.get(Trajectory, trajectory_id)
    if trajectory is None or trajectory.project_id != project_id:
        raise NotFoundError(f"trajectory {trajectory_id} not found", location="path.trajectory_id")
    return trajectory


def delete_trajectory(session: Session, trajectory: Trajectory) -> None:
    """Delete a trajectory: one DELETE, which the database cascades to its steps, verdicts
    and human labels. Its upload (the original file, which may hold other runs) is kept.
    Whether work still needs it is the caller's to check first."""
    session.execute(delete(Trajectory).where(Trajectory.id == trajectory.id))
    session.flush()


def set_resolved(
    session: Session, project_id: uuid.UUID, trajectory_id: uuid.UUID, resolved: bool | None
) -> Trajectory:
    trajectory = get_trajectory(session, project_id, trajectory_id)
    trajectory.resolved = resolved
    session.flush()
    return trajectory


def list_trajectories(
    session: Session,
    project_id: uuid.UUID,
    *,
    resolved: ResolvedFilter | None = None,
    source_format: str | None = None,
    task_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Trajectory], str | None]:
    """A page of trajectories, newest first, and the cursor of the next page (or None)."""
    query = select(Trajectory).where(Trajectory.project_id == project_id)
    if resolved == "unknown":
        query = query.where(Trajectory.resolved.is_(None))
    elif resolved is not None:
        query = query.where(Trajectory.resolved.is_(resolved == "true"))
    if source_format is not None:
        query = query.where(Trajectory.source_format == source_format)
    if task_id is not None:
        query = query.where(Trajectory.task_id == task_id)
    if cursor is not None:
        (before,) = decode_cursor(cursor, uuid.UUID)
        query = query.where(Trajectory.id < before)
    # Only the summary columns: a page must not drag megabytes of messages along.
    query = query.order_by(Trajectory.id.desc()).limit(limit + 1)
    query = query.options(
        load_only(
            Trajectory.id,
            Trajectory.source_format,
            Trajectory.task_id,
            Trajectory.resolved,
            Trajectory.num_steps,
            Trajectory.created_at,
            Trajectory.updated_at,
            Trajectory.upload_id,
        )
    )
    items = list(session.scalars(query))
    next_cursor = encode_cursor(items[limit - 1].id) if len(items) > limit else None
    return items[:limit], next_cursor
