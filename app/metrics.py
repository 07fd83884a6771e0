"""Prometheus metrics, computed from the database at scrape time across all projects.

Text exposition format 0.0.4, written by hand (a dozen lines do not need a client library).
No API key: operators scrape it, and it exposes counts only, never ids or text. Every
process of a deployment reports the same numbers, since they come from the shared database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from fastapi import APIRouter, Response
from sqlalchemy import case, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.deps import SessionDep
from app.models import Export, Job, Verdict
from app.status import (
    EXPORT_OPEN,
    VERDICT_FINISHED,
    VERDICT_OPEN,
    ErrorKind,
    ExportStatus,
    JobStatus,
    VerdictStatus,
)

router = APIRouter(tags=["health"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
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


def _latency_histogram(session: Session) -> list[Sample]:
    """Critic seconds per done, uncached verdict, in LATENCY_BUCKETS_S."""
    timed = (
        Verdict.status == VerdictStatus.DONE,
        Verdict.cached.is_(False),
        Verdict.latency_ms.is_not(None),
    )
    bucket_columns = [
        func.coalesce(func.sum(case((Verdict.latency_ms <= bound * 1000, 1), else_=0)), 0)
        for bound in LATENCY_BUCKETS_S
    ]
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(Verdict.latency_ms), 0), *bucket_columns).where(
            *timed
        )
    ).one()
    count, total_ms, buckets = int(row[0]), float(row[1]), [int(v) for v in row[2:]]
    histogram: list[Sample] = [
        ("_bucket", {"le": repr(bound)}, n)
        for bound, n in zip(LATENCY_BUCKETS_S, buckets, strict=True)
    ]
    histogram += [
        ("_bucket", {"le": "+Inf"}, count),
        ("_sum", {}, total_ms / 1000),
        ("_count", {}, count),
    ]
    return histogram


def _errors_by_kind(session: Session) -> list[Sample]:
    """Failed verdicts by their stored error kind; none stored or unknown: `other`."""
    known_kinds: list[str] = [*ErrorKind, OTHER_ERROR]
    errors: Counter[str] = Counter()
    failed = session.execute(
        select(Verdict.error_kind, func.count())
        .where(Verdict.status == VerdictStatus.FAILED)
        .group_by(Verdict.error_kind)
    )
    for stored, n in failed:
        # None: failed before kinds were stored, with text no known pattern matched.
        errors[stored if stored is not None and stored in known_kinds else OTHER_ERROR] += n
    return [("", {"kind": k}, errors.get(k, 0)) for k in known_kinds]


def _tokens(session: Session) -> list[Sample]:
    """Critic tokens of every verdict: prompt, completion, cached."""
    tokens = session.execute(
        select(
            func.coalesce(func.sum(Verdict.prompt_tokens), 0),
            func.coalesce(func.sum(Verdict.completion_tokens), 0),
            func.coalesce(func.sum(Verdict.cached_tokens), 0),
        )
    ).one()
    return [
        ("", {"type": t}, int(v))
        for t, v in zip(("prompt", "completion", "cached"), tokens, strict=True)
    ]


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

    verdicts = {
        str(s): int(n)
        for s, n in session.execute(select(Verdict.status, func.count()).group_by(Verdict.status))
    }
    lines += _family(
        "srft_verdicts_total",
        "counter",
        "Finished step verdicts by outcome; verdicts per second is rate() of it. "
        "(A retried job's failed verdicts leave this count when queued again.)",
        [("", {"status": s}, verdicts.get(s, 0)) for s in VerdictStatus if s in VERDICT_FINISHED],
    )

    exports_open = session.scalar(select(func.count()).where(Export.status.in_(EXPORT_OPEN)))
    lines += _family(
        "srft_queue_depth",
        "gauge",
        "Work not finished yet: pending or running verdicts, queued or running exports.",
        [
            ("", {"kind": "verdicts"}, sum(verdicts.get(s, 0) for s in VERDICT_OPEN)),
            ("", {"kind": "exports"}, int(exports_open or 0)),
        ],
    )

    lines += _family(
        "srft_critic_latency_seconds",
        "histogram",
        "Critic time per done verdict (all attempts and votes), steps served from the "
        "cache excluded.",
        _latency_histogram(session),
    )

    lines += _family(
        "srft_critic_errors_total",
        "counter",
        "Failed step verdicts by the kind of their last error.",
        _errors_by_kind(session),
    )

    lines += _family(
        "srft_critic_tokens_total",
        "counter",
        "Critic tokens used by all verdicts (cached: prompt tokens the endpoint served from "
        "its prompt cache).",
        _tokens(session),
    )
    return "\n".join(lines) + "\n"


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep) -> Response:
    """Prometheus metrics (counts only; no API key)."""
    return Response(content=render(session), media_type=CONTENT_TYPE)
