"""Labeling-job routes: start a job, poll it, page its verdicts, cancel or retry it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.deps import ProjectDep, SessionDep, SettingsDep
from app.jobs import batches, queue, schemas
from app.jobs import service as job_service
from app.pagination import MAX_JOB_PAGE, MAX_STEP_PAGE, decode_cursor, encode_cursor
from app.schemas import COMMON_ERRORS, error_responses

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=COMMON_ERRORS | error_responses(404, 409)
)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.JobOut)
def create_job(
    body: schemas.JobCreate, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> schemas.JobOut:
    """Start labeling the selected trajectories with the critic.

    Answers at once, whatever the size: a worker writes the job's rows in batches after, and
    `preparation` says how far it got (its first batches are labeled meanwhile)."""
    job = job_service.create_job(session, project_id, body, settings)
    queue.enqueue_prepare_after_commit(session, settings.broker_url, job.id)
    return job_service.describe(session, job)


@router.get("", response_model=schemas.JobPage)
def list_jobs(
    session: SessionDep,
    project_id: ProjectDep,
    limit: Annotated[int, Query(ge=1, le=MAX_JOB_PAGE)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the last page")] = None,
) -> schemas.JobPage:
    """The project's jobs, newest first, each with its progress (read from its running
    totals: a page costs the same whatever the jobs' sizes)."""
    before = decode_cursor(cursor, uuid.UUID)[0] if cursor is not None else None
    items, next_before = job_service.list_jobs(session, project_id, limit=limit, before=before)
    return schemas.JobPage(
        items=[job_service.describe(session, job) for job in items],
        next_cursor=encode_cursor(next_before) if next_before else None,
    )


@router.get("/{job_id}", response_model=schemas.JobOut)
def get_job(job_id: uuid.UUID, session: SessionDep, project_id: ProjectDep) -> schemas.JobOut:
    """A job's status, progress counts, label histogram, token usage and ETA."""
    return job_service.describe(session, job_service.get_job(session, project_id, job_id))


@router.get("/{job_id}/verdicts", response_model=schemas.VerdictPage)
def list_verdicts(
    job_id: uuid.UUID,
    session: SessionDep,
    project_id: ProjectDep,
    limit: Annotated[int, Query(ge=1, le=MAX_STEP_PAGE)] = 200,
    cursor: Annotated[str | None, Query()] = None,
) -> schemas.VerdictPage:
    """A page of the job's verdicts, in creation order."""
    job = job_service.get_job(session, project_id, job_id)
    items, next_cursor = job_service.list_verdicts(session, job, limit=limit, cursor=cursor)
    return schemas.VerdictPage(
        items=[schemas.VerdictOut.model_validate(v) for v in items], next_cursor=next_cursor
    )


@router.post("/{job_id}/cancel", response_model=schemas.JobOut)
def cancel_job(
    job_id: uuid.UUID, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> schemas.JobOut:
    """Stop a job: no new critic calls are made for it, and its batches are cancelled."""
    job = job_service.cancel_job(session, job_service.get_job(session, project_id, job_id))
    if batches.is_batch(job):
        queue.enqueue_cancel_after_commit(session, settings.broker_url, job.id)
    return job_service.describe(session, job)


@router.post("/{job_id}/retry", response_model=schemas.JobOut)
def retry_job(
    job_id: uuid.UUID, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> schemas.JobOut:
    """Queue the job's failed items again."""
    job = job_service.get_job(session, project_id, job_id)
    units = job_service.retry_failed(session, job, settings.step_chunk_size)
    queue.enqueue_after_commit(session, settings.broker_url, units)
    return job_service.describe(session, job)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_job(
    job_id: uuid.UUID, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> Response:
    """Delete a finished job and its verdicts (exports already built keep their files)."""
    job = job_service.get_job(session, project_id, job_id)
    # Batches still live at the provider (a cancel not yet carried out) are cancelled after.
    remote_ids = batches.live_remote_ids(session, job.id)
    job_service.delete_job(session, job)
    if remote_ids:
        queue.enqueue_cancel_after_commit(session, settings.broker_url, job_id, remote_ids)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
