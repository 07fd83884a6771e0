"""A job's numbers counted again from its verdict rows, the slow way (as the API did before it
kept running totals): what the totals in GET /v1/jobs/{id} must equal."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import create_engine, select

from app.models import JobTrajectory, Verdict


def recount(database_url: str, job_id: str) -> dict[str, Any]:
    """`counts`, `labels` and `usage` of a job, as GET /v1/jobs/{id} shows them, from its rows;
    and each trajectory's progress row against its verdicts."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    Verdict.trajectory_id,
                    Verdict.status,
                    Verdict.cached,
                    Verdict.label,
                    Verdict.prompt_tokens,
                    Verdict.completion_tokens,
                    Verdict.cached_tokens,
                    Verdict.reasoning_tokens,
                ).where(Verdict.job_id == uuid.UUID(job_id))
            ).all()
            progress = {
                str(p.trajectory_id): (p.steps, p.done, p.failed, p.cached)
                for p in connection.execute(
                    select(JobTrajectory).where(JobTrajectory.job_id == uuid.UUID(job_id))
                )
            }
    finally:
        engine.dispose()
    steps: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    usage: Counter[str] = Counter()
    per_trajectory: dict[str, Counter[str]] = defaultdict(Counter)
    for trajectory_id, status, cached, label, prompt, completion, cached_tokens, thinking in rows:
        bucket = status if status in ("done", "failed") else "pending"
        for target in (steps, per_trajectory[str(trajectory_id)]):
            target["total"] += 1
            target[bucket] += 1
            if cached:
                target["cached"] += 1
        if status == "done" and label is not None:
            labels[label] += 1
        usage["prompt_tokens"] += prompt
        usage["completion_tokens"] += completion
        usage["cached_tokens"] += cached_tokens
        usage["reasoning_tokens"] += thinking
    trajectories: Counter[str] = Counter(total=len(per_trajectory))
    for trajectory_id, counts in per_trajectory.items():
        assert progress[trajectory_id] == (
            counts["total"],
            counts["done"],
            counts["failed"],
            counts["cached"],
        ), trajectory_id
        if counts["pending"]:
            trajectories["pending"] += 1
        elif counts["failed"]:
            trajectories["failed"] += 1
        else:
            trajectories["done"] += 1
            if counts["cached"] == counts["total"]:
                trajectories["cached"] += 1
    assert set(progress) == set(per_trajectory)
    keys = ("total", "done", "failed", "pending", "cached")
    return {
        "counts": {
            "trajectories": {k: trajectories[k] for k in keys},
            "steps": {k: steps[k] for k in keys},
        },
        "labels": dict(sorted(labels.items())),
        "usage": {
            k: usage[k]
            for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
        },
    }


def assert_totals_match_rows(database_url: str, job: dict[str, Any]) -> None:
    """The job's running totals equal a recount of its rows (once every row is written)."""
    assert job["preparation"]["complete"], job["preparation"]
    again = recount(database_url, job["id"])
    shown = {key: job[key] for key in ("counts", "labels", "usage")}
    assert shown == again
