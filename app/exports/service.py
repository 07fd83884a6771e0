"""Exports: validate a request, own its row's life cycle, and read what the builder needs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ConflictError, NotFoundError, SrftError
from app.exports import formats as export_formats
from app.exports import schemas
from app.exports.formats import TokenizerUse
from app.exports.manifest import manifest_bytes
from app.exports.rows import Source
from app.exports.tokenize import (
    INVALID_REVISION,
    INVALID_TOKENIZER,
    revision_allowed,
    roots_as_written,
    tokenizer_allowed,
)
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.schemas import Selection
from app.models import Export, Job, JobTrajectory, Step, Trajectory, utcnow
from app.review import service as review_service
from app.status import EXPORT_OPEN, JOB_FINISHED, JOB_OPEN, ExportStatus


class InvalidExportError(SrftError):
    status_code = 422
    code = "invalid_export"


# ---------------------------------------------------------------------- creation


def create_export(
    session: Session, project_id: uuid.UUID, body: schemas.ExportCreate, settings: Settings
) -> Export:
    """Check the request against the jobs it names and write the export, queued."""
    jobs = _jobs(session, project_id, body.job_ids)
    _check_format(body)
    _check_tokenizer(body, settings)
    _check_mask_labels(body, jobs)
    if body.selection is not None:
        job_service.check_selection(session, project_id, body.selection)
    config = body.model_dump(mode="json")
    export = Export(
        project_id=project_id,
        status=ExportStatus.QUEUED,
        policy=body.policy,
        format=body.format,
        config=config,
        job_ids=[str(j) for j in body.job_ids],
        total_trajectories=0,
        done_trajectories=0,
        enqueued_at=utcnow(),
    )
    session.add(export)
    session.flush()
    return export


def _jobs(session: Session, project_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> list[Job]:
    if len(set(ids)) != len(ids):
        raise InvalidExportError(
            "job_ids lists a job twice", location="job_ids", code="duplicate_jobs"
        )
    # FOR SHARE: a job being deleted (`jobs.service.delete_job` locks its row first) is
    # either gone here or sees this export once it is committed, never neither.
    found = {
        job.id: job
        for job in session.scalars(
            select(Job)
            .where(Job.project_id == project_id, Job.id.in_(list(ids)))
            .with_for_update(read=True)
        )
    }
    unknown = [str(i) for i in ids if i not in found]
    if unknown:
        raise InvalidExportError(
            f"{len(unknown)} job ids are not in this project: {', '.join(unknown[:20])}",
            location="job_ids",
            code="unknown_jobs",
            details={"unknown": unknown},
        )
    unfinished = [found[i] for i in ids if found[i].status not in JOB_FINISHED]
    if unfinished:
        shown = ", ".join(f"{j.id} ({j.status})" for j in unfinished[:20])
        raise ConflictError(
            f"{len(unfinished)} jobs have not finished: {shown}; export when they have (or "
            "cancel them to export what they labeled so far)",
            location="job_ids",
            code="job_not_finished",
            details={"unfinished": [str(j.id) for j in unfinished]},
        )
    return [found[i] for i in ids]


def _check_format(body: schemas.ExportCreate) -> None:
    """What the request gives the format must be what it takes (its registered capabilities)."""
    try:
        fmt = export_formats.get_format(body.format)
    except export_formats.UnknownExportFormatError as error:
        raise InvalidExportError(str(error), location="format", code="unknown_format") from error
    uses = fmt.tokenizer
    if uses is TokenizerUse.RENDERS and not body.tokenizer:
        raise InvalidExportError(
            f"{fmt.name} needs `tokenizer`: the Hub id of the target model's tokenizer "
            "(or its path inside SRFT_TOKENIZER_DIRS), whose chat template renders the rows",
            location="tokenizer",
        )
    if uses is TokenizerUse.MEASURES:
        # A tokenizer only measures rows of messages: one without the other does nothing.
        if body.max_seq_len is not None and body.tokenizer is None:
            raise InvalidExportError(
                f"`max_seq_len` for {fmt.name} needs `tokenizer`: rows are measured in the "
                "tokens of the target model's chat template",
                location="max_seq_len",
            )
        if body.tokenizer is not None and body.max_seq_len is None:
            raise InvalidExportError(
                f"`tokenizer` measures {fmt.name} rows against `max_seq_len`; give "
                "max_seq_len too (the trainer tokenizes the rows)",
                location="tokenizer",
            )
    if uses is TokenizerUse.NONE:
        for name in ("tokenizer", "max_seq_len"):
            if getattr(body, name) is not None:
                raise InvalidExportError(
                    f"`{name}` does not apply to {fmt.name}: its rows are text, tokenized "
                    "by the trainer",
                    location=name,
                )
    if body.options.soft and not fmt.soft_weights:
        weighted = [f.name for f in export_formats.FORMATS if f.soft_weights]
        raise InvalidExportError(
            f"soft weights need a format that takes floats: {fmt.name} takes 0/1 "
            f"(use {export_formats.or_list(weighted)}, whose rows get a `loss_weights` column)",
            location="options.soft",
        )


def _check_tokenizer(body: schemas.ExportCreate, settings: Settings) -> None:
    """A Hub id or a path inside SRFT_TOKENIZER_DIRS, judged on the text alone: the refusal
    is the same whatever exists on the server (the worker checks again, symlinks resolved)."""
    roots = [*settings.tokenizer_roots, *roots_as_written(settings.tokenizer_dirs)]
    if body.tokenizer is not None and not tokenizer_allowed(body.tokenizer, roots):
        raise InvalidExportError(INVALID_TOKENIZER, location="tokenizer", code="invalid_tokenizer")
    revision = body.tokenizer_revision
    if revision is not None and not revision_allowed(revision):
        raise InvalidExportError(
            INVALID_REVISION, location="tokenizer_revision", code="invalid_tokenizer"
        )


def _check_mask_labels(body: schemas.ExportCreate, jobs: Sequence[Job]) -> None:
    known = {name for job in jobs for name, _ in job.labels}
    unknown = sorted(set(body.options.mask_labels) - known)
    if unknown:
        raise InvalidExportError(
            f"mask_labels {unknown} are not labels of these jobs (their labels: {sorted(known)})",
            location="options.mask_labels",
            code="unknown_labels",
        )


# ---------------------------------------------------------------------- life cycle


def claim(
    session: Session, export_id: uuid.UUID, stale_after_s: float, *, token: str | None = None
) -> str | None:
    """Take the export for building under `token` (a fresh one if None) and return the token;
    None if it is finished or another worker is on it.

    An export still running under `token` itself is taken back at once: a build that lost
    the database starts over when its task retries, instead of waiting for its claim to go
    stale. A token belongs to one task and its retries, which never run at the same time.
    """
    now = utcnow()
    token = token or str(uuid.uuid4())
    stale = now - timedelta(seconds=stale_after_s)
    result = session.execute(
        update(Export)
        .where(
            Export.id == export_id,
            or_(
                Export.status == ExportStatus.QUEUED,
                and_(
                    Export.status == ExportStatus.RUNNING,
                    or_(Export.claimed_at < stale, Export.claim_token == token),
                ),
            ),
        )
        .values(
            status=ExportStatus.RUNNING,
            claim_token=token,
            claimed_at=now,
            started_at=now,
            done_trajectories=0,
        )
    )
    return token if getattr(result, "rowcount", 0) else None


def _update_claimed(session: Session, export_id: uuid.UUID, token: str, **values: Any) -> bool:
    """Set `values` on the export if it still runs under `token`; False if the claim was
    taken over (the sweeper handed it on) or the export is gone."""
    result = session.execute(
        update(Export)
        .where(
            Export.id == export_id,
            Export.claim_token == token,
            Export.status == ExportStatus.RUNNING,
        )
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def heartbeat(session: Session, export_id: uuid.UUID, token: str, *, done: int, total: int) -> bool:
    """Record progress and keep the claim alive; False if the claim was taken over."""
    return _update_claimed(
        session,
        export_id,
        token,
        claimed_at=utcnow(),
        done_trajectories=done,
        total_trajectories=total,
    )


def complete(session: Session, export_id: uuid.UUID, token: str, manifest: dict[str, Any]) -> bool:
    return _update_claimed(
        session,
        export_id,
        token,
        status=ExportStatus.COMPLETED,
        manifest=manifest,
        finished_at=utcnow(),
        done_trajectories=Export.total_trajectories,
        claim_token=None,
    )


def fail(
    session: Session,
    export_id: uuid.UUID,
    token: str | None,
    *,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> bool:
    query = update(Export).where(Export.id == export_id, Export.status.in_(EXPORT_OPEN))
    if token is not None:
        query = query.where(Export.claim_token == token)
    result = session.execute(
        query.values(
            status=ExportStatus.FAILED,
            error_code=code,
            error=message,
            error_details=details,
            finished_at=utcnow(),
            claim_token=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def sweep(session: Session, stale_after_s: float) -> list[uuid.UUID]:
    """Exports whose worker died (heartbeat stopped) or whose queue message was lost.

    They are put back to `queued`, claim cleared, marked enqueued now, in the statement that
    finds them: the next sweep leaves them alone for another timeout, and a builder that was
    only slow loses its claim at its next heartbeat.
    """
    now = utcnow()
    lost = workqueue.lost_work(
        Export, ExportStatus.QUEUED, ExportStatus.RUNNING, now - timedelta(seconds=stale_after_s)
    )
    return list(
        session.scalars(
            update(Export)
            .where(lost)
            .values(status=ExportStatus.QUEUED, claim_token=None, enqueued_at=now)
            .returning(Export.id)
            .execution_options(synchronize_session=False)
        )
    )


# ---------------------------------------------------------------------- deletion


def delete_export(session: Session, export: Export) -> None:
    """Delete a finished export's row (rows that reference it cascade); its files are the
    caller's to remove once this is committed. One still being built is refused: nothing
    cancels a build, and a worker may be writing its files."""
    if export.status in EXPORT_OPEN:
        raise ConflictError(
            f"export {export.id} is {export.status}: wait until it has finished (GET "
            f"/v1/exports/{export.id}), then delete it",
            location="path.export_id",
            code="export_not_finished",
        )
    session.execute(delete(Export).where(Export.id == export.id))
    session.flush()


def check_trajectory_unused(session: Session, trajectory: Trajectory) -> None:
    """Refuse (409 `trajectory_in_use`) to let a trajectory go while a job still labels it
    (or may: one whose rows are still being written) or an export not yet built would read
    it."""
    in_job = select(JobTrajectory.job_id).where(JobTrajectory.trajectory_id == trajectory.id)
    jobs = session.execute(
        select(Job.id, Job.status)
        .where(
            Job.status.in_(JOB_OPEN),
            or_(
                Job.id.in_(in_job),
                and_(Job.project_id == trajectory.project_id, Job.prepared_at.is_(None)),
            ),
        )
        .order_by(Job.id)
    ).all()
    open_exports = session.scalars(
        select(Export)
        .where(Export.project_id == trajectory.project_id, Export.status.in_(EXPORT_OPEN))
        .order_by(Export.id)
    )
    exports = [
        export
        for export in open_exports
        if trajectory_ids(
            session,
            export.project_id,
            export.job_ids,
            export.config.get("selection"),
            among=[trajectory.id],
        )
    ]
    if not jobs and not exports:
        return
    users = [f"job {j.id} ({j.status})" for j in jobs]
    users += [f"export {e.id} ({e.status})" for e in exports]
    raise ConflictError(
        f"{', '.join(users[:20])} {'uses' if len(users) == 1 else 'use'} this trajectory: "
        "cancel the jobs or wait until they and the exports have finished, then delete it",
        location="path.trajectory_id",
        code="trajectory_in_use",
        details={"jobs": [str(j.id) for j in jobs], "exports": [str(e.id) for e in exports]},
    )


# ---------------------------------------------------------------------- reading


def get_export(session: Session, project_id: uuid.UUID, export_id: uuid.UUID) -> Export:
    export = session.get(Export, export_id)
    if export is None or export.project_id != project_id:
        raise NotFoundError(f"export {export_id} not found", location="path.export_id")
    return export


def describe(export: Export) -> schemas.ExportOut:
    error = None
    if export.status == ExportStatus.FAILED:
        error = schemas.ExportError(
            code=export.error_code, message=export.error or "", details=export.error_details
        )
    return schemas.ExportOut(
        id=export.id,
        status=export.status,
        policy=export.policy,
        format=export.format,
        job_ids=export.job_ids,
        config=export.config,
        progress=schemas.Progress(
            trajectories_total=export.total_trajectories,
            trajectories_done=export.done_trajectories,
        ),
        manifest=export.manifest,
        size_bytes=size_bytes(export.manifest),
        error=error,
        created_at=export.created_at,
        started_at=export.started_at,
        finished_at=export.finished_at,
    )


def size_bytes(manifest: dict[str, Any] | None) -> int | None:
    """Bytes on disk of a completed export (its shards and manifest.json), from the stored
    manifest alone; None without one (not built yet, or failed: no files)."""
    if manifest is None:
        return None
    return sum(int(shard["bytes"]) for shard in manifest["shards"]) + len(manifest_bytes(manifest))


def list_exports(
    session: Session, project_id: uuid.UUID, *, limit: int, before: uuid.UUID | None
) -> tuple[list[Export], uuid.UUID | None]:
    query = select(Export).where(Export.project_id == project_id)
    if before is not None:
        query = query.where(Export.id < before)
    items = list(session.scalars(query.order_by(Export.id.desc()).limit(limit + 1)))
    next_before = items[limit - 1].id if len(items) > limit else None
    return items[:limit], next_before


# ---------------------------------------------------------------------- what the builder reads


@dataclass(frozen=True)
class JobInfo:
    id: uuid.UUID
    critic_model: str
    prompt_hash: str
    mode: str
    votes: int
    temperature: float
    labels: list[str]
    created_at: str


def job_infos(session: Session, job_ids: Sequence[str]) -> list[JobInfo]:
    wanted = [uuid.UUID(str(i)) for i in job_ids]
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(wanted)))}
    return [
        JobInfo(
            id=job.id,
            critic_model=job.critic_model,
            prompt_hash=job.prompt_hash,
            mode=job.mode,
            votes=job.votes,
            temperature=job.temperature,
            labels=[name for name, _ in job.labels],
            created_at=job.created_at.isoformat(),
        )
        for job in (jobs[uuid.UUID(str(i))] for i in job_ids)
    ]


def trajectory_ids(
    session: Session,
    project_id: uuid.UUID,
    job_ids: Sequence[str],
    selection: dict[str, Any] | None,
    *,
    among: Sequence[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """The trajectories an export covers, in id order (`among`: only those of these ids).

    An explicit selection is applied as given. Otherwise: what each job selected, of any
    resolution (a job with scope=unresolved still selected the resolved runs that srft trains
    in full), among the trajectories that existed when the job was created; the union.
    """
    query = select(Trajectory.id).where(Trajectory.project_id == project_id).order_by(Trajectory.id)
    if among is not None:
        query = query.where(Trajectory.id.in_(list(among)))
    if selection is not None:
        return job_service.selected(session, query, Selection.model_validate(selection))
    found: set[uuid.UUID] = set()
    wanted = [uuid.UUID(str(i)) for i in job_ids]
    for job in session.scalars(select(Job).where(Job.id.in_(wanted))):
        existing = query.where(Trajectory.created_at <= job.created_at)
        found.update(
            job_service.selected(session, existing, Selection.model_validate(job.selection))
        )
    return sorted(found)


def load_sources(
    session: Session, ids: Sequence[uuid.UUID], job_ids: Sequence[str]
) -> list[Source]:
    """Trajectories with their steps and, per step, its human label if a reviewer set one,
    else the verdict of the last listed job that has one (a later job overrides an earlier)."""
    trajectories = {
        t.id: t for t in session.scalars(select(Trajectory).where(Trajectory.id.in_(list(ids))))
    }
    steps: dict[uuid.UUID, list[int]] = {i: [] for i in ids}
    for row in session.execute(
        select(Step.trajectory_id, Step.index, Step.message_index)
        .where(Step.trajectory_id.in_(list(ids)))
        .order_by(Step.trajectory_id, Step.index)
    ):
        steps[row.trajectory_id].append(row.message_index)
    labels = review_service.step_labels(
        session,
        {i: len(positions) for i, positions in steps.items()},
        [uuid.UUID(str(j)) for j in job_ids],
    )
    return [
        Source(t.id, t.resolved, t.messages, t.tools, tuple(steps[t.id]), labels[t.id])
        for t in (trajectories[i] for i in ids)
    ]
