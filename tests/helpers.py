"""Plain helpers shared by tests: paths to the real trajectories and small builders."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy.orm import Session

from app.critic.judge import StepOutcome, Usage
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.workqueue import Unit
from app.status import ErrorKind

# A copy of the shared development trajectories, untouched bytes
# (see data/trajectories/PROVENANCE.md).
TRAJECTORY_DIR = Path(__file__).parent / "data" / "trajectories"


def trajectory_file(relative: str) -> Path:
    return TRAJECTORY_DIR / relative


def all_trajectory_files() -> list[Path]:
    return sorted(p for p in TRAJECTORY_DIR.rglob("*") if p.is_file() and p.suffix != ".md")


def prepare_job(session: Session, job_id: str | uuid.UUID, batch: int = 500) -> list[Unit]:
    """Write a job's verdict rows here, as its worker would (for tests of the API alone, with
    no worker running); return the units the worker would queue."""
    units: list[Unit] = []
    wanted: list[uuid.UUID] | None = None
    while True:
        prepared = job_service.prepare_batch(session, uuid.UUID(str(job_id)), batch, 50, wanted)
        if prepared is None:
            return units
        units += prepared.units
        if not prepared.more:
            return units
        wanted = prepared.wanted


def outcome(
    step: int,
    label: str | None = None,
    *,
    reason: str | None = None,
    votes: list[str] | None = None,
    agreement: float | None = None,
    error: str | None = None,
    error_kind: ErrorKind | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cached_tokens: int = 0,
    latency_ms: float = 0.0,
) -> StepOutcome:
    """A critic's outcome for one step: a label, or (label None) a failure with `error`."""
    if agreement is None and label is not None and votes:
        agreement = votes.count(label) / len(votes)
    return StepOutcome(
        index=step,
        label=label,
        reason=reason if label is None or reason else f"critic says {label}",
        agreement=agreement,
        vote_labels=votes or [],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            latency_s=latency_ms / 1000,
            attempts=1,
        ),
        error=error if label is None else None,
        error_kind=error_kind if label is None else None,
    )


def record(
    session: Session,
    job_id: str | uuid.UUID,
    outcomes: Mapping[str | uuid.UUID, Iterable[StepOutcome]],
    *,
    close: bool = True,
) -> None:
    """Store outcomes as a worker does (claim the steps, write under the claim, so the job's
    totals follow), by trajectory; then close the job if nothing is left open."""
    job = uuid.UUID(str(job_id))
    for trajectory_id, results in outcomes.items():
        steps = list(results)
        unit = Unit(job, uuid.UUID(str(trajectory_id)), tuple(s.index for s in steps))
        claim = workqueue.claim_unit(session, unit, stale_after_s=900.0)
        assert claim is not None, f"nothing to claim in {unit}"
        wanted = [s for s in steps if s.index in claim.step_indices]
        workqueue.record_outcomes(
            session, [(job, unit.trajectory_id, claim.token, s) for s in wanted]
        )
    if close:
        workqueue.finish_if_done(session, job)
    session.flush()
