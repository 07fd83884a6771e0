"""Review routes: a reviewer's label on a step, and a trajectory read back with what the critic
and the reviewers said of each step."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from app.deps import CallerDep, ProjectDep, SessionDep
from app.review import schemas
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses
from app.trajectories import schemas as trajectory_schemas
from app.trajectories import service as trajectory_service

router = APIRouter(
    prefix="/v1/trajectories", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)


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
