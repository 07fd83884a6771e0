"""Trajectory routes: upload files as agents wrote them, read them back as canonical runs."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, status

from app.deps import ProjectDep, SessionDep
from app.pagination import MAX_TRAJECTORY_PAGE
from app.schemas import COMMON_ERRORS, error_responses
from app.trajectories import schemas
from app.trajectories import service as trajectory_service
from app.trajectories.formats import parquet as parquet_rows

router = APIRouter(
    prefix="/v1/trajectories", tags=["trajectories"], responses=COMMON_ERRORS | error_responses(404)
)
uploads_router = APIRouter(
    prefix="/v1/uploads", tags=["trajectories"], responses=COMMON_ERRORS | error_responses(404)
)

NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
PARQUET_TYPE = parquet_rows.MEDIA_TYPE


async def read_body(request: Request) -> bytes:
    """The raw body. Its size is bounded by the request guard (`app.middleware`), which
    refuses it with 413 as soon as it passes SRFT_MAX_UPLOAD_BYTES."""
    return await request.body()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.IngestOut,
    openapi_extra={"requestBody": schemas.UPLOAD_REQUEST_BODY},
)
def upload_trajectories(
    request: Request,
    session: SessionDep,
    project_id: ProjectDep,
    body: Annotated[bytes, Depends(read_body)],
    fmt: Annotated[
        str,
        Query(
            alias="format",
            max_length=32,
            description="auto, swe-agent, mini-swe-agent, openhands, openai or nebius.",
        ),
    ] = "auto",
    resolved: Annotated[
        bool | None, Query(description="Resolution of every run in the file, if known.")
    ] = None,
) -> schemas.IngestOut:
    """Upload one trajectory file (any format), canonical items, or Parquet dataset rows."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower() or None
    result = trajectory_service.ingest(
        session,
        project_id,
        body,
        fmt=fmt,
        resolved=resolved,
        lines=True if content_type in NDJSON_TYPES else None,
        parquet=content_type == PARQUET_TYPE,
        content_type=content_type,
        filename=request.headers.get("x-filename"),
    )
    return schemas.IngestOut(
        created=result.created,
        duplicates=result.duplicates,
        trajectories=[
            schemas.IngestedTrajectory(
                id=run.id,
                status=run.status,
                source_format=run.source_format,
                num_steps=run.num_steps,
                resolved=run.resolved,
            )
            for run in result.runs
        ],
    )


@router.get("", response_model=schemas.TrajectoryPage)
def list_trajectories(
    session: SessionDep,
    project_id: ProjectDep,
    resolved: Annotated[Literal["true", "false", "unknown"] | None, Query()] = None,
    source_format: Annotated[str | None, Query()] = None,
    task_id: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_TRAJECTORY_PAGE)] = 50,
    cursor: Annotated[str | None, Query()] = None,
) -> schemas.TrajectoryPage:
    """List trajectories, newest first, with cursor pagination."""
    items, next_cursor = trajectory_service.list_trajectories(
        session,
        project_id,
        resolved=resolved,
        source_format=source_format,
        task_id=task_id,
        limit=limit,
        cursor=cursor,
    )
    return schemas.TrajectoryPage(
        items=[schemas.TrajectorySummaryOut.model_validate(t) for t in items],
        next_cursor=next_cursor,
    )


@router.patch("/{trajectory_id}", response_model=schemas.TrajectorySummaryOut)
def patch_trajectory(
    trajectory_id: uuid.UUID,
    patch: schemas.TrajectoryPatch,
    session: SessionDep,
    project_id: ProjectDep,
) -> schemas.TrajectorySummaryOut:
    """Set whether the run resolved its task (true, false, or null for unknown)."""
    trajectory = trajectory_service.set_resolved(session, project_id, trajectory_id, patch.resolved)
    return schemas.TrajectorySummaryOut.model_validate(trajectory)


@uploads_router.get("/{upload_id}/raw", response_class=Response)
def download_upload(upload_id: uuid.UUID, session: SessionDep, project_id: ProjectDep) -> Response:
    """The original bytes of an upload, exactly as received."""
    upload = trajectory_service.get_upload(session, project_id, upload_id)
    return Response(
        content=trajectory_service.read_upload(session, project_id, upload_id),
        media_type=upload.content_type or "application/octet-stream",
        headers={"ETag": f'"{upload.sha256}"'},
    )
