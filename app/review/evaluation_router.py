"""Critic evaluation: a job's finished verdicts against the human labels on the same steps."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from app.deps import ProjectDep, SessionDep
from app.errors import SrftError
from app.jobs import service as job_service
from app.models import HumanLabel, Job, Verdict
from app.pagination import MAX_STEP_PAGE, decode_cursor, encode_cursor
from app.recipe.masking import DEFAULT_MASK_LABELS
from app.review import evaluation
from app.review import service as review_service
from app.schemas import COMMON_ERRORS, error_responses

router = APIRouter(
    prefix="/v1/jobs", tags=["review"], responses=COMMON_ERRORS | error_responses(404)
)


class InvalidEvaluation(SrftError):
    status_code = 422
    code = "invalid_evaluation"


def _same_step(job: Job) -> ColumnElement[bool]:
    return and_(
        HumanLabel.trajectory_id == Verdict.trajectory_id,
        HumanLabel.step_index == Verdict.step_index,
        HumanLabel.project_id == job.project_id,
    )


def _done(job: Job) -> ColumnElement[bool]:
    return and_(Verdict.job_id == job.id, Verdict.status == "done", Verdict.label.is_not(None))


def _pair_counts(session: Session, job: Job) -> dict[tuple[str, str], int]:
    """(critic label, human label) -> steps, over the job's done verdicts a human labelled."""
    query = (
        select(Verdict.label, HumanLabel.label, func.count())
        .join(HumanLabel, _same_step(job))
        .where(_done(job))
        .group_by(Verdict.label, HumanLabel.label)
    )
    return {
        (str(critic), str(human)): int(count) for critic, human, count in session.execute(query)
    }


def _disagreements(
    session: Session, job: Job, *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    query = (
        select(Verdict, HumanLabel)
        .join(HumanLabel, _same_step(job))
        .where(_done(job), Verdict.label != HumanLabel.label)
    )
    if cursor is not None:
        after_trajectory, after_step = decode_cursor(cursor, uuid.UUID, int)
        query = query.where(
            or_(
                Verdict.trajectory_id > after_trajectory,
                and_(Verdict.trajectory_id == after_trajectory, Verdict.step_index > after_step),
            )
        )
    rows = session.execute(
        query.order_by(Verdict.trajectory_id, Verdict.step_index).limit(limit + 1)
    ).all()
    items = [
        {
            "trajectory_id": verdict.trajectory_id,
            "step_index": verdict.step_index,
            "critic_label": verdict.label,
            "human_label": human.label,
            "critic_reason": verdict.reason,
            "human_note": human.note,
            "author": human.author,
        }
        for verdict, human in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        next_cursor = encode_cursor(last.trajectory_id, last.step_index)
    return items, next_cursor


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
        raise InvalidEvaluation(
            f"unknown mask label {unknown[0]!r} (labels: {', '.join(known)})",
            location="query.mask_labels",
            code="unknown_label",
        )
    result = evaluation.evaluate_counts(_pair_counts(session, job), labels, masked)
    items, next_cursor = _disagreements(session, job, limit=limit, cursor=cursor)
    return {
        "job_id": job.id,
        **result.as_dict(),
        "disagreements": {"items": items, "next_cursor": next_cursor},
    }
