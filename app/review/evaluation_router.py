"""Critic evaluation: a job's finished verdicts against the human labels on the same steps;
several jobs compared side by side on the same steps; the review queue of the steps worth
labeling next."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.deps import ProjectDep, SessionDep
from app.jobs import service as job_service
from app.pagination import MAX_STEP_PAGE
from app.review import evaluation
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses

router = APIRouter(
    prefix="/v1/jobs", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)
comparisons_router = APIRouter(
    prefix="/v1/evaluations", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)

# Items one review-queue request may ask for.
MAX_QUEUE_ITEMS = 200


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
    masked = review_service.mask_labels_of(session, project_id, [job], mask_labels)
    result = evaluation.evaluate_counts(review_service.pair_counts(session, job), labels, masked)
    items, next_cursor = review_service.disagreements(session, job, limit=limit, cursor=cursor)
    return {
        "job_id": job.id,
        **result.as_dict(),
        "disagreements": {"items": items, "next_cursor": next_cursor},
    }


@comparisons_router.get("")
def compare_jobs(
    session: SessionDep,
    project_id: ProjectDep,
    job_id: Annotated[list[uuid.UUID], Query()],
    mask_labels: Annotated[list[str] | None, Query()] = None,
    resamples: Annotated[
        int, Query(ge=1, le=evaluation.MAX_RESAMPLES)
    ] = evaluation.DEFAULT_RESAMPLES,
    price_prompt_per_mtok: Annotated[float | None, Query(ge=0, le=1_000_000)] = None,
    price_completion_per_mtok: Annotated[float | None, Query(ge=0, le=1_000_000)] = None,
) -> dict[str, Any]:
    """Critics side by side on the same human-labeled steps, with 95% bootstrap intervals,
    Cohen's kappa between them and their cost per labeled step."""
    jobs = review_service.compared_jobs(session, project_id, job_id)
    masked = review_service.mask_labels_of(session, project_id, jobs, mask_labels)
    return review_service.comparison(
        session,
        project_id,
        jobs,
        masked,
        resamples=resamples,
        price_prompt_per_mtok=price_prompt_per_mtok,
        price_completion_per_mtok=price_completion_per_mtok,
    )


def queue_out(items: list[review_service.QueueItem]) -> list[dict[str, Any]]:
    return [
        {
            "trajectory_id": item.trajectory_id,
            "step_index": item.step_index,
            "score": item.score,
            "reasons": item.reasons,
            "verdicts": [
                {"job_id": job, "label": label, "agreement": agreement}
                for job, label, agreement in item.verdicts
            ],
        }
        for item in items
    ]


@comparisons_router.get("/queue")
def review_queue(
    session: SessionDep,
    project_id: ProjectDep,
    job_id: Annotated[list[uuid.UUID], Query()],
    limit: Annotated[int, Query(ge=1, le=MAX_QUEUE_ITEMS)] = 20,
    cursor: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The unlabeled steps a human should label next to sharpen the comparison, best first,
    from a bounded window of the first job's verdicts (`next_cursor`: the next window)."""
    jobs = review_service.compared_jobs(session, project_id, job_id)
    items, scanned, next_cursor = review_service.review_queue(
        session, jobs, limit=limit, cursor=cursor
    )
    return {"items": queue_out(items), "scanned": scanned, "next_cursor": next_cursor}
