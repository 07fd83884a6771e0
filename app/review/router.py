"""Review routes: a reviewer's label on a step, a trajectory read back with what the critic
and the reviewers said of each step, and the project's human labels as a gold-set file."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.deps import CallerDep, ProjectDep, SessionDep, get_session
from app.review import gold, schemas
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses
from app.trajectories import schemas as trajectory_schemas
from app.trajectories import service as trajectory_service
from app.trajectories.router import read_body

router = APIRouter(
    prefix="/v1/trajectories", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)

human_labels_router = APIRouter(
    prefix="/v1/human-labels", tags=["review"], responses=COMMON_ERRORS | error_responses(413)
)
JSONL_TYPE = "application/x-ndjson"
GOLD_LINE_SCHEMA = {
    "type": "object",
    "properties": {
        "content_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "step_index": {"type": "integer", "minimum": 0},
        "label": {"type": "string", "minLength": 1, "maxLength": 64},
        "note": {"type": ["string", "null"], "maxLength": 10_000},
        "author": {"type": ["string", "null"], "maxLength": 200},
        "task_id": {"type": ["string", "null"], "maxLength": 1000},
    },
    "required": ["content_hash", "step_index", "label"],
    "additionalProperties": False,
}


@router.put("/{trajectory_id}/steps/{step_index}/human_label", response_model=schemas.HumanLabelOut)
def put_human_label(
    trajectory_id: uuid.UUID,
    step_index: int,
    body: schemas.HumanLabelPut,
    session: SessionDep,
    caller: CallerDep,
) -> schemas.HumanLabelOut:
    """Set a human label (and note) on a step; exports prefer it to the critic's verdict."""
    found = review_service.set_label(
        session, caller, trajectory_id, step_index, body.label, body.note
    )
    return schemas.HumanLabelOut.model_validate(found)


@router.delete(
    "/{trajectory_id}/steps/{step_index}/human_label", status_code=status.HTTP_204_NO_CONTENT
)
def delete_human_label(
    trajectory_id: uuid.UUID, step_index: int, session: SessionDep, caller: CallerDep
) -> Response:
    """Remove a step's human label."""
    review_service.remove_label(session, caller.project_id, trajectory_id, step_index)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{trajectory_id}", response_model=trajectory_schemas.TrajectoryOut, tags=["trajectories"]
)
def get_trajectory(
    trajectory_id: uuid.UUID, session: SessionDep, project_id: ProjectDep
) -> trajectory_schemas.TrajectoryOut:
    """One trajectory: canonical messages, tools, metadata and its steps, each with its
    finished verdicts and human label."""
    trajectory = trajectory_service.get_trajectory(session, project_id, trajectory_id)
    out = trajectory_schemas.TrajectoryOut.model_validate(trajectory)
    verdicts = review_service.verdicts_by_step(session, trajectory.id)
    humans = review_service.labels_of(session, [trajectory.id])
    for step in out.steps:
        step.verdicts = [
            trajectory_schemas.StepVerdict.model_validate(v) for v in verdicts.get(step.index, [])
        ]
        human = humans.get((trajectory.id, step.index))
        if human is not None:
            step.human_label = trajectory_schemas.StepHumanLabel.model_validate(human)
    return out


@human_labels_router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {JSONL_TYPE: {}}, "description": "one human label a line"}},
)
def export_human_labels(
    # The default scope keeps the session open until the response has been sent: the
    # export reads its pages while it streams them.
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The project's human labels as a gold-set file (JSON Lines), streamed a page at a time."""
    project_id = auth_service.authenticate(session, authorization)
    return StreamingResponse(
        review_service.gold_lines(session, project_id),
        media_type=JSONL_TYPE,
        headers={"Content-Disposition": 'attachment; filename="gold.jsonl"'},
    )


@human_labels_router.post(
    "/import",
    response_model=schemas.GoldImportOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                JSONL_TYPE: {
                    "schema": {
                        "type": "string",
                        "description": "a gold-set file: one human label per line",
                    }
                },
                # One label on one line is a gold set too.
                "application/json": {"schema": GOLD_LINE_SCHEMA},
            },
        }
    },
)
def import_human_labels(
    session: SessionDep,
    caller: CallerDep,
    body: Annotated[bytes, Depends(read_body)],
) -> schemas.GoldImportOut:
    """Store a gold-set file's labels on the project's steps (matched by content hash),
    all or nothing; lines of trajectories not in this project are counted as unmatched."""
    result = review_service.import_gold(session, caller, gold.parse(body))
    return schemas.GoldImportOut(
        imported=result.imported,
        updated=result.updated,
        unchanged=result.unchanged,
        unmatched=len(result.unmatched),
        unmatched_lines=result.unmatched[: schemas.MAX_UNMATCHED_LINES],
    )
