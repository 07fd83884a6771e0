"""Exports: validate a request, own its row's life cycle, and read what the builder needs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ConflictError, NotFoundError, SrftError
from app.exports import formats as export_formats
from app.exports import schemas
from app.exports.formats import TokenizerUse
from app.exports.manifest import manifest_bytes
from app.exports.parts import PartSpan
from app.exports.rows import Source
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.schemas import Selection
from app.models import Export, ExportPart, Job, JobTrajectory, Step, Trajectory, utcnow
from app.recipe.tokenizer_names import (
    INVALID_REVISION,
    INVALID_TOKENIZER,
    request_allows,
    revision_allowed,
)
from app.review import service as review_service
from app.status import (
    EXPORT_OPEN,
    EXPORT_PART_OPEN,
    JOB_FINISHED,
    JOB_OPEN,
    ExportPartStatus,
    ExportStatus,
)


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
    if body.tokenizer is not None and not request_allows(
        body.tokenizer, settings.tokenizer_roots, settings.tokenizer_dirs
    ):
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
            workqueue.claimable(Export, ExportStatus.QUEUED, ExportStatus.RUNNING, stale, token),
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
    failed = bool(getattr(result, "rowcount", 0))
    if failed:
        # Parts still building learn it at their next heartbeat, and stop.
        session.execute(
            update(ExportPart)
            .where(ExportPart.export_id == export_id, ExportPart.status.in_(EXPORT_PART_OPEN))
            .values(status=ExportPartStatus.FAILED, claim_token=None, finished_at=utcnow())
        )
    return failed


def _has_parts(*statuses: str) -> Any:
    query = select(ExportPart.id).where(ExportPart.export_id == Export.id)
    if statuses:
        query = query.where(ExportPart.status.in_(statuses))
    return exists(query)


def sweep(session: Session, stale_after_s: float) -> list[uuid.UUID]:
    """Exports whose worker died (heartbeat stopped) or whose queue message was lost, and
    which are not (or no longer) building in parts: those not planned yet, and those whose
    parts are all done but whose final task was lost.

    They are put back to `queued`, claim cleared, marked enqueued now, in the statement that
    finds them: the next sweep leaves them alone for another timeout, and a builder that was
    only slow loses its claim at its next heartbeat. An export with a part still open waits
    for its parts, which are swept by themselves (`sweep_parts`).
    """
    now = utcnow()
    lost = workqueue.lost_work(
        Export, ExportStatus.QUEUED, ExportStatus.RUNNING, now - timedelta(seconds=stale_after_s)
    )
    return list(
        session.scalars(
            update(Export)
            .where(lost, ~_has_parts(*EXPORT_PART_OPEN))
            .values(status=ExportStatus.QUEUED, claim_token=None, enqueued_at=now)
            .returning(Export.id)
            .execution_options(synchronize_session=False)
        )
    )


def sweep_parts(session: Session, stale_after_s: float) -> list[uuid.UUID]:
    """Parts of open exports whose worker died or whose queue message was lost: back to
    `pending`, claim cleared, marked enqueued now (handed on once, as `sweep` does)."""
    now = utcnow()
    lost = workqueue.lost_work(
        ExportPart,
        ExportPartStatus.PENDING,
        ExportPartStatus.RUNNING,
        now - timedelta(seconds=stale_after_s),
    )
    open_exports = select(Export.id).where(Export.status.in_(EXPORT_OPEN))
    return list(
        session.scalars(
            update(ExportPart)
            .where(lost, ExportPart.export_id.in_(open_exports.scalar_subquery()))
            .values(
                status=ExportPartStatus.PENDING,
                claim_token=None,
                claimed_at=None,
                enqueued_at=now,
            )
            .returning(ExportPart.id)
            .execution_options(synchronize_session=False)
        )
    )


# ---------------------------------------------------------------------- parts


def is_planned(session: Session, export_id: uuid.UUID) -> bool:
    """Whether the export has been cut into parts."""
    found = session.scalar(select(ExportPart.id).where(ExportPart.export_id == export_id).limit(1))
    return found is not None


def create_parts(
    session: Session, export_id: uuid.UUID, token: str, spans: Sequence[PartSpan]
) -> list[uuid.UUID] | None:
    """Store the export's parts; None if the export is no longer claimed under `token`.

    One part is claimed at once under `token`, for the planning task to build itself. Several
    are left `pending` (marked enqueued now) and the export's claim is released: from now on
    the parts are the work items, and the final task claims the export again."""
    now = utcnow()
    total = sum(span.count for span in spans)
    single = len(spans) == 1
    values: dict[str, Any] = {"total_trajectories": total, "done_trajectories": 0}
    if not single:
        values |= {"claim_token": None, "claimed_at": now}
    if not _update_claimed(session, export_id, token, **values):
        return None
    parts = [
        ExportPart(
            export_id=export_id,
            index=span.index,
            start=span.start,
            count=span.count,
            first_id=span.first_id,
            last_id=span.last_id,
            status=ExportPartStatus.RUNNING if single else ExportPartStatus.PENDING,
            done_trajectories=0,
            claim_token=token if single else None,
            claimed_at=now if single else None,
            enqueued_at=now,
        )
        for span in spans
    ]
    session.add_all(parts)
    session.flush()
    return [part.id for part in parts]


def parts_of(session: Session, export_id: uuid.UUID) -> list[ExportPart]:
    """The export's parts, in order."""
    return list(
        session.scalars(
            select(ExportPart).where(ExportPart.export_id == export_id).order_by(ExportPart.index)
        )
    )


def parts_claimed_by(session: Session, export_id: uuid.UUID, token: str) -> list[uuid.UUID]:
    """Parts of the export still running under `token` (an earlier try of the same task)."""
    return list(
        session.scalars(
            select(ExportPart.id)
            .where(
                ExportPart.export_id == export_id,
                ExportPart.claim_token == token,
                ExportPart.status == ExportPartStatus.RUNNING,
            )
            .order_by(ExportPart.index)
        )
    )


def claim_part(
    session: Session, part_id: uuid.UUID, stale_after_s: float, *, token: str
) -> tuple[ExportPart, Export] | None:
    """Take a part of an open export for building under `token`, as `claim` takes an export
    (a part still running under `token` itself is taken back at once); None if it is done,
    its export is finished, or another worker is on it."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    open_exports = select(Export.id).where(Export.status.in_(EXPORT_OPEN))
    result = session.execute(
        update(ExportPart)
        .where(
            ExportPart.id == part_id,
            ExportPart.export_id.in_(open_exports.scalar_subquery()),
            workqueue.claimable(
                ExportPart, ExportPartStatus.PENDING, ExportPartStatus.RUNNING, stale, token
            ),
        )
        .values(
            status=ExportPartStatus.RUNNING,
            claim_token=token,
            claimed_at=now,
            done_trajectories=0,
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return None
    part = session.get(ExportPart, part_id, populate_existing=True)
    export = session.get(Export, part.export_id) if part is not None else None
    if part is None or export is None:
        return None
    return part, export


def _sum_progress(session: Session, export_id: uuid.UUID) -> None:
    """The export's progress: its parts' done trajectories, added up (one row per part)."""
    done = (
        select(func.coalesce(func.sum(ExportPart.done_trajectories), 0))
        .where(ExportPart.export_id == export_id)
        .scalar_subquery()
    )
    session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status.in_(EXPORT_OPEN))
        .values(done_trajectories=done)
        .execution_options(synchronize_session=False)
    )


def part_heartbeat(
    session: Session, part_id: uuid.UUID, export_id: uuid.UUID, token: str, *, done: int
) -> bool:
    """Record a part's progress (and its export's) and keep its claim alive; False if the
    claim was taken over or the export failed."""
    result = session.execute(
        update(ExportPart)
        .where(
            ExportPart.id == part_id,
            ExportPart.claim_token == token,
            ExportPart.status == ExportPartStatus.RUNNING,
        )
        .values(claimed_at=utcnow(), done_trajectories=done)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return False
    _sum_progress(session, export_id)
    return True


def complete_part(
    session: Session, part_id: uuid.UUID, export_id: uuid.UUID, token: str, output: str
) -> tuple[bool, bool]:
    """Mark a part built (its files in `output`). Returns (recorded, last): `last` when no
    part of the export is left open, so the final task is due; the export's claim is then
    released and its heartbeat set, so that the sweeper hands the final task on only if it
    is lost. Part completions of one export are serialised on its row, so exactly one of them
    sees that it was the last."""
    session.execute(select(Export.id).where(Export.id == export_id).with_for_update())
    now = utcnow()
    result = session.execute(
        update(ExportPart)
        .where(
            ExportPart.id == part_id,
            ExportPart.claim_token == token,
            ExportPart.status == ExportPartStatus.RUNNING,
        )
        .values(
            status=ExportPartStatus.DONE,
            output=output,
            done_trajectories=ExportPart.count,
            claim_token=None,
            finished_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return False, False
    _sum_progress(session, export_id)
    still_open = session.scalar(
        select(ExportPart.id)
        .where(ExportPart.export_id == export_id, ExportPart.status.in_(EXPORT_PART_OPEN))
        .limit(1)
    )
    if still_open is not None:
        return True, False
    session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status.in_(EXPORT_OPEN))
        .values(claim_token=None, claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    return True, True


def fail_part(
    session: Session,
    part_id: uuid.UUID,
    token: str,
    *,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> bool:
    """Fail the part's export for a reason the part found, if the part is still ours (a part
    that lost its claim, or whose export already failed, records nothing)."""
    part = session.scalar(
        select(ExportPart).where(
            ExportPart.id == part_id,
            ExportPart.claim_token == token,
            ExportPart.status == ExportPartStatus.RUNNING,
        )
    )
    if part is None:
        return False
    return fail(session, part.export_id, None, code=code, message=message, details=details)


def claim_final(
    session: Session, export_id: uuid.UUID, stale_after_s: float, *, token: str
) -> bool:
    """Take a planned export for its final task under `token`: one whose claim the last part
    released, one the sweeper queued again, a stale one, or one still ours."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    result = session.execute(
        update(Export)
        .where(
            Export.id == export_id,
            or_(
                Export.status == ExportStatus.QUEUED,
                and_(
                    Export.status == ExportStatus.RUNNING,
                    or_(
                        Export.claim_token.is_(None),
                        Export.claimed_at < stale,
                        Export.claim_token == token,
                    ),
                ),
            ),
        )
        .values(status=ExportStatus.RUNNING, claim_token=token, claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def release(session: Session, export_id: uuid.UUID, token: str) -> None:
    """Give up the final task's claim: its parts are not all built (they will queue it)."""
    _update_claimed(session, export_id, token, claim_token=None)


def reopen_parts(session: Session, part_ids: Sequence[uuid.UUID]) -> None:
    """Parts whose files the final task found missing or wrong: to be built again."""
    session.execute(
        update(ExportPart)
        .where(ExportPart.id.in_(list(part_ids)))
        .values(
            status=ExportPartStatus.PENDING,
            output=None,
            claim_token=None,
            claimed_at=None,
            done_trajectories=0,
            enqueued_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
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
    first: uuid.UUID | None = None,
    last: uuid.UUID | None = None,
    after: uuid.UUID | None = None,
    limit: int | None = None,
    among: Sequence[uuid.UUID] | None = None,
) -> list[uuid.UUID]:
    """The trajectories an export covers, in id order; with `first`/`last` (inclusive),
    `after` (exclusive) and `limit`, one page of them (keyset), so that a part reads its
    range a batch at a time; `among`: only those of these ids.

    An explicit selection is applied as given. Otherwise: what each job selected, of any
    resolution (a job with scope=unresolved still selected the resolved runs that srft trains
    in full), among the trajectories that existed when the job was created; the union.
    """
    query = select(Trajectory.id).where(Trajectory.project_id == project_id).order_by(Trajectory.id)
    if first is not None:
        query = query.where(Trajectory.id >= first)
    if last is not None:
        query = query.where(Trajectory.id <= last)
    if after is not None:
        query = query.where(Trajectory.id > after)
    if limit is not None:
        query = query.limit(limit)

    def within(chosen: Selection) -> Selection:
        # Explicit ids outside the page are not asked for at all.
        if chosen.trajectory_ids is None:
            return chosen
        kept = [
            i
            for i in chosen.trajectory_ids
            if (first is None or i >= first)
            and (last is None or i <= last)
            and (after is None or i > after)
        ]
        return chosen.model_copy(update={"trajectory_ids": kept})

    if among is not None:
        query = query.where(Trajectory.id.in_(list(among)))
    if selection is not None:
        found = job_service.selected(session, query, within(Selection.model_validate(selection)))
        return sorted(found)[:limit]
    union: set[uuid.UUID] = set()
    wanted = [uuid.UUID(str(i)) for i in job_ids]
    for job in session.scalars(select(Job).where(Job.id.in_(wanted))):
        existing = query.where(Trajectory.created_at <= job.created_at)
        union.update(
            job_service.selected(session, existing, within(Selection.model_validate(job.selection)))
        )
    return sorted(union)[:limit]


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
