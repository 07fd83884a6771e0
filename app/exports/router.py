"""Export routes: start an export, poll it, download its files or all of it as a tar, delete
it. Deleting a trajectory is here too: only the exports know which trajectories they read."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status

from app.db import after_commit
from app.deps import ProjectDep, SessionDep, SettingsDep
from app.errors import ConflictError
from app.exports import queue, schemas
from app.exports import service as export_service
from app.exports.builder import export_path, remove_export_files
from app.exports.files import archive_response, file_response, media_type_for, resolve_export_file
from app.exports.manifest import MANIFEST
from app.models import Export
from app.pagination import MAX_EXPORT_PAGE, decode_cursor, encode_cursor
from app.schemas import COMMON_ERRORS, error_responses
from app.status import ExportStatus
from app.trajectories import service as trajectory_service

router = APIRouter(
    prefix="/v1/exports", tags=["exports"], responses=COMMON_ERRORS | error_responses(404, 409)
)
trajectories_router = APIRouter(
    prefix="/v1/trajectories",
    tags=["trajectories"],
    responses=COMMON_ERRORS | error_responses(404, 409),
)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=schemas.ExportOut)
def create_export(
    body: schemas.ExportCreate, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> schemas.ExportOut:
    """Build training shards from the verdicts of finished labeling jobs (by a worker)."""
    export = export_service.create_export(session, project_id, body, settings)
    queue.enqueue_build_after_commit(session, settings.broker_url, export.id)
    return export_service.describe(export)


@router.get("", response_model=schemas.ExportPage)
def list_exports(
    session: SessionDep,
    project_id: ProjectDep,
    limit: Annotated[int, Query(ge=1, le=MAX_EXPORT_PAGE)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the last page")] = None,
) -> schemas.ExportPage:
    """The project's exports, newest first."""
    before = decode_cursor(cursor, uuid.UUID)[0] if cursor is not None else None
    items, next_before = export_service.list_exports(
        session, project_id, limit=limit, before=before
    )
    return schemas.ExportPage(
        items=[export_service.describe(e) for e in items],
        next_cursor=encode_cursor(next_before) if next_before else None,
    )


@router.get("/{export_id}", response_model=schemas.ExportOut)
def get_export(
    export_id: uuid.UUID, session: SessionDep, project_id: ProjectDep
) -> schemas.ExportOut:
    """An export's status, progress and, once completed, its manifest."""
    return export_service.describe(export_service.get_export(session, project_id, export_id))


@router.delete("/{export_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_export(
    export_id: uuid.UUID, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> Response:
    """Delete a finished export and its files (refused while it is being built)."""
    export = export_service.get_export(session, project_id, export_id)
    remove_files = partial(remove_export_files, settings, export.project_id, export.id)
    export_service.delete_export(session, export)
    # Files go only once the row's deletion is committed: a rolled-back request keeps them.
    after_commit(session, remove_files)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@trajectories_router.delete("/{trajectory_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_trajectory(
    trajectory_id: uuid.UUID, session: SessionDep, project_id: ProjectDep
) -> Response:
    """Delete a trajectory with its steps, verdicts and human labels (refused while a job
    labels it or an export not yet built would read it)."""
    trajectory = trajectory_service.get_trajectory(session, project_id, trajectory_id)
    export_service.check_trajectory_unused(session, trajectory)
    trajectory_service.delete_trajectory(session, trajectory)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _completed(session: SessionDep, project_id: uuid.UUID, export_id: uuid.UUID) -> Export:
    export = export_service.get_export(session, project_id, export_id)
    if export.status != ExportStatus.COMPLETED or export.manifest is None:
        raise ConflictError(
            f"export {export_id} is {export.status}: files exist only once it has completed",
            location="path.export_id",
            code="export_not_completed",
        )
    return export


@router.get(
    "/{export_id}/files/{path:path}",
    operation_id="download_export_file",
    responses=error_responses(416),
)
@router.head(
    "/{export_id}/files/{path:path}",
    operation_id="head_export_file",
    responses=error_responses(416),
)
def download_file(
    export_id: uuid.UUID,
    path: str,
    request: Request,
    session: SessionDep,
    project_id: ProjectDep,
    settings: SettingsDep,
) -> Response:
    """One file of a completed export (a shard's `path` from the manifest, or manifest.json),
    with ETag = its sha256 and HTTP Range support."""
    export = _completed(session, project_id, export_id)
    assert export.manifest is not None
    root = export_path(settings, export.project_id, export.id)
    target = resolve_export_file(root, path)
    sha = next((s["sha256"] for s in export.manifest["shards"] if s["path"] == path), None)
    return file_response(request, target, sha256=sha, media_type=media_type_for(target))


@router.get("/{export_id}/archive")
def download_archive(
    export_id: uuid.UUID, session: SessionDep, project_id: ProjectDep, settings: SettingsDep
) -> Response:
    """Everything (manifest.json and every shard) as one uncompressed tar."""
    export = _completed(session, project_id, export_id)
    assert export.manifest is not None
    assert export.finished_at is not None
    root = export_path(settings, export.project_id, export.id)
    names = [MANIFEST, *(s["path"] for s in export.manifest["shards"])]
    return archive_response(
        root,
        names,
        filename=f"srft-export-{export.id}.tar",
        mtime=int(export.finished_at.timestamp()),
    )
