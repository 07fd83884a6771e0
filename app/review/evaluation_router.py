"""Critic evaluation: a job's finished verdicts against the human labels on the same steps."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.deps import ProjectDep, SessionDep
from app.errors import SrftError
from app.jobs import service as job_service
from app.pagination import MAX_STEP_PAGE
from app.recipe.masking import DEFAULT_MASK_LABELS
from app.review import evaluation
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses

router = APIRouter(
    prefix="/v1/jobs", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)


class InvalidEvaluationError(SrftError):
    status_code = 422
    code = "invalid_evaluation"


@router.get("/{job_id}/evaluation")
def get_evaluation(
    job_id: uuid.UUID,
    session: SessionDep,
    project_id: ProjectDep,
    mask_labels: Annotated[list[str] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_STEP_PAGE)] = 100,
    cursor: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The job's critic scored against human labels: per label, masked vs trained, confusion."""
    job = job_service.get_job(session, project_id, job_id)
    labels = [name for name, _ in job.labels]
    known = labels + [
        name for name in review_service.known_labels(session, project_id) if name not in labels
    ]
    masked = list(dict.fromkeys(mask_labels or DEFAULT_MASK_LABELS))
    unknown = [name for name in masked if name not in known]
    if unknown:
        raise InvalidEvaluationError(
            f"unknown mask label {unknown[0]!r} (labels: {', '.join(known)})",
            location="query.mask_labels",
            code="unknown_label",
        )
    result = evaluation.evaluate_counts(review_service.pair_counts(session, job), labels, masked)
    items, next_cursor = review_service.disagreements(session, job, limit=limit, cursor=cursor)
    return {
        "job_id": job.id,
        **result.as_dict(),
        "disagreements": {"items": items, "next_cursor": next_cursor},
    }
