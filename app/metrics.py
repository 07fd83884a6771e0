"""Prometheus metrics, computed from the database at scrape time across all projects: jobs and
exports by status, and the verdicts' numbers from the jobs' running totals (`app.jobs.tallies`),
so a scrape costs the same however many verdicts are stored.

Text exposition format 0.0.4, written by hand (a dozen lines do not need a client library).
No API key: operators scrape it, and it exposes counts only, never ids or text. Every
process of a deployment reports the same numbers, since they come from the shared database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from fastapi import APIRouter, Response
from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.deps import SessionDep
from app.jobs import tallies
from app.jobs.tallies import LATENCY_BUCKETS_S
from app.models import Export, Job
from app.status import (
    EXPORT_OPEN,
    JOB_OPEN,
    ErrorKind,
    ExportStatus,
    JobStatus,
    VerdictStatus,
)

router = APIRouter(tags=["health"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The label of failed verdicts with no known error kind (none stored, or one this version
# does not know).
OTHER_ERROR = "other"
# One line of a family: name suffix, labels, value.
Sample = tuple[str, Mapping[str, str], float]


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
        selector = f"{{{rendered}}}" if rendered else ""
        lines.append(f"{name}{suffix}{selector} {_number(value)}")
    return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _by_status(
    session: Session, column: InstrumentedAttribute[str], known: Sequence[str]
) -> list[Sample]:
    found = {
        str(s): int(n) for s, n in session.execute(select(column, func.count()).group_by(column))
    }
    statuses = list(known) + sorted(set(found) - set(known))
    return [("", {"status": s}, found.get(s, 0)) for s in statuses]


def _latency_histogram(totals: Counter[str]) -> list[Sample]:
    """Critic seconds per done, uncached verdict, in LATENCY_BUCKETS_S."""
    count = totals[tallies.LATENCY_COUNT]
    histogram: list[Sample] = [
        ("_bucket", {"le": repr(bound)}, totals[tallies.latency_bucket(bound)])
        for bound in LATENCY_BUCKETS_S
    ]
    histogram += [
        ("_bucket", {"le": "+Inf"}, count),
        ("_sum", {}, totals[tallies.LATENCY_SUM_US] / 1e6),
        ("_count", {}, count),
    ]
    return histogram


def _errors_by_kind(totals: Counter[str]) -> list[Sample]:
    """Failed verdicts by their stored error kind; none stored or unknown: `other`."""
    known_kinds: list[str] = [*ErrorKind, OTHER_ERROR]
    errors: Counter[str] = Counter()
    for stored, n in tallies.family(totals, tallies.ERROR).items():
        # "": failed before kinds were stored, with text no known pattern matched.
        errors[stored if stored in known_kinds else OTHER_ERROR] += n
    return [("", {"kind": k}, errors.get(k, 0)) for k in known_kinds]


def _tokens(totals: Counter[str]) -> list[Sample]:
    """Critic tokens of every verdict: prompt, completion, cached."""
    return [
        ("", {"type": "prompt"}, totals[tallies.PROMPT_TOKENS]),
        ("", {"type": "completion"}, totals[tallies.COMPLETION_TOKENS]),
        ("", {"type": "cached"}, totals[tallies.CACHED_TOKENS]),
    ]


def _open_steps(session: Session) -> int:
    """Steps of open jobs not finished yet (written or still to be)."""
    open_jobs = select(Job.id).where(Job.status.in_(JOB_OPEN))
    total = session.scalar(
        select(func.coalesce(func.sum(Job.total_steps), 0)).where(Job.status.in_(JOB_OPEN))
    )
    finished = tallies.read_all(session, open_jobs)
    return int(total or 0) - finished[tallies.STEPS_DONE] - finished[tallies.STEPS_FAILED]


def render(session: Session) -> str:
    """The whole exposition, from a handful of aggregate queries."""
    lines: list[str] = []
    lines += _family(
        "srft_jobs",
        "gauge",
        "Labeling jobs by status.",
        _by_status(session, Job.status, tuple(JobStatus)),
    )
    lines += _family(
        "srft_exports",
        "gauge",
        "Exports by status.",
        _by_status(session, Export.status, tuple(ExportStatus)),
    )

    totals = tallies.read_all(session)
    lines += _family(
        "srft_verdicts_total",
        "counter",
        "Finished step verdicts by outcome; verdicts per second is rate() of it. "
        "(A retried job's failed verdicts leave this count when queued again.)",
        [
            ("", {"status": VerdictStatus.DONE}, totals[tallies.STEPS_DONE]),
            ("", {"status": VerdictStatus.FAILED}, totals[tallies.STEPS_FAILED]),
        ],
    )

    exports_open = session.scalar(select(func.count()).where(Export.status.in_(EXPORT_OPEN)))
    lines += _family(
        "srft_queue_depth",
        "gauge",
        "Work not finished yet: pending or running verdicts, queued or running exports.",
        [
            ("", {"kind": "verdicts"}, _open_steps(session)),
            ("", {"kind": "exports"}, int(exports_open or 0)),
        ],
    )

    lines += _family(
        "srft_critic_latency_seconds",
        "histogram",
        "Critic time per done verdict (all attempts and votes), steps served from the "
        "cache excluded.",
        _latency_histogram(totals),
    )

    lines += _family(
        "srft_critic_errors_total",
        "counter",
        "Failed step verdicts by the kind of their last error.",
        _errors_by_kind(totals),
    )

    lines += _family(
        "srft_critic_tokens_total",
        "counter",
        "Critic tokens used by all verdicts (cached: prompt tokens the endpoint served from "
        "its prompt cache).",
        _tokens(totals),
    )
    return "\n".join(lines) + "\n"


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep) -> Response:
    """Prometheus metrics (counts only; no API key)."""
    return Response(content=render(session), media_type=CONTENT_TYPE)
