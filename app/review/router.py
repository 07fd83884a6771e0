"""Review routes: a reviewer's label on a step."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from app.deps import CallerDep, SessionDep
from app.review import schemas
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses

router = APIRouter(
    prefix="/v1/trajectories", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)


@router.put("/{trajectory_id}/steps/{step_index}/human_label", response_model=schemas.HumanLabelOut)
def put_human_label(
    trajectory_id: uuid.UUID,
    step_index: int,
    body: schemas.HumanLabelIn,
    session: SessionDep,
    caller: CallerDep,
) -> schemas.HumanLabelOut:
    """Set a human label (and note) on a step; exports prefer it to the critic's verdict."""
    found = review_service.set_label(
        session,
        caller.project_id,
        trajectory_id,
        step_index,
        label=body.label,
        note=body.note,
        author=caller.name,
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
