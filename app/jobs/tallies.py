"""A job's running totals, kept in `job_tallies` by the writes that change them.

Every write that finishes verdicts (an outcome stored under its claim, a step served from the
cache, a retry that reopens failed ones) adds its deltas here in its own transaction, after it
knows which rows it really changed, so the totals cannot drift from the rows. Reading a job's
progress, label histogram, usage and latency is then a sum over a few rows, whatever the size
of the job; /metrics sums them over every job.

Services flush; the request or task that calls them commits.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.models import JobTally

# Writers of one job spread over this many rows per name (see `JobTally`).
SLOTS = 4

# Names of the totals. Steps and trajectories count those finished (pending is the job's
# total less these); `label:`, `error:` and `latency_le:` names are families.
STEPS_DONE = "steps_done"
STEPS_FAILED = "steps_failed"
STEPS_CACHED = "steps_cached"
TRAJECTORIES_DONE = "trajectories_done"
TRAJECTORIES_FAILED = "trajectories_failed"
TRAJECTORIES_CACHED = "trajectories_cached"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
CACHED_TOKENS = "cached_tokens"
REASONING_TOKENS = "reasoning_tokens"  # a reasoning model's thoughts, within COMPLETION_TOKENS
# Critic time of done, uncached verdicts: how many, their sum in microseconds, and how many
# took at most each bound of LATENCY_BUCKETS_S (cumulative, as Prometheus buckets are).
LATENCY_COUNT = "latency_count"
LATENCY_SUM_US = "latency_sum_us"
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LABEL = "label:"
ERROR = "error:"
LATENCY_LE = "latency_le:"


def label(name: str) -> str:
    return LABEL + name


def error(kind: str | None) -> str:
    """The tally of failed steps by error kind; `None` (no kind stored) is `error:`."""
    return ERROR + (kind or "")


def latency(deltas: Counter[str], latency_ms: float | None) -> None:
    """Count one done, uncached verdict's critic time into `deltas`."""
    if latency_ms is None:
        return
    deltas[LATENCY_COUNT] += 1
    deltas[LATENCY_SUM_US] += round(latency_ms * 1000)
    for bound in LATENCY_BUCKETS_S:
        if latency_ms <= bound * 1000:
            deltas[latency_bucket(bound)] += 1


def latency_bucket(bound: float) -> str:
    return f"{LATENCY_LE}{bound!r}"


def add(session: Session, deltas: Mapping[uuid.UUID, Mapping[str, int]]) -> None:
    """Add each job's deltas to its totals, in one slot picked at random.

    Rows are written in (job, name) order, the same in every writer, so two writers that
    touch the same rows wait for each other instead of deadlocking.
    """
    slot = random.randrange(SLOTS)
    rows = [
        {"job_id": job_id, "name": name, "slot": slot, "value": value}
        for job_id in sorted(deltas)
        for name, value in sorted(deltas[job_id].items())
        if value
    ]
    if not rows:
        return
    table = JobTally.__table__
    assert isinstance(table, Table)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    statement = insert.on_conflict_do_update(
        index_elements=[table.c.job_id, table.c.name, table.c.slot],
        set_={"value": table.c.value + insert.excluded.value},
    )
    session.connection().execute(statement, rows)


def read(session: Session, job_id: uuid.UUID) -> Counter[str]:
    """A job's totals (names never written read as 0)."""
    rows = session.execute(
        select(JobTally.name, func.sum(JobTally.value))
        .where(JobTally.job_id == job_id)
        .group_by(JobTally.name)
    )
    return Counter({name: int(value) for name, value in rows})


def read_all(session: Session, jobs: Select[Any] | None = None) -> Counter[str]:
    """The totals summed over every job (or over the jobs whose ids `jobs` selects)."""
    query = select(JobTally.name, func.sum(JobTally.value)).group_by(JobTally.name)
    if jobs is not None:
        query = query.where(JobTally.job_id.in_(jobs.scalar_subquery()))
    return Counter({name: int(value) for name, value in session.execute(query)})


def family(totals: Mapping[str, int], prefix: str) -> dict[str, int]:
    """The members of a family (`LABEL`, `ERROR`, …) by their name without the prefix."""
    return {
        name[len(prefix) :]: value
        for name, value in totals.items()
        if name.startswith(prefix) and value
    }
