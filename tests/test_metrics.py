"""GET /metrics: Prometheus text computed from the database. The database is shared, so every
value is checked as the change from a scrape taken before the test's own rows."""

from __future__ import annotations

import re
from typing import Any, cast

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Export
from app.status import ErrorKind
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record

SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# step: (status, columns)
STEPS: dict[int, tuple[str, dict[str, Any]]] = {
    0: (
        "done",
        {"latency_ms": 50.0, "prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 5},
    ),
    1: ("done", {"latency_ms": 300.0, "prompt_tokens": 200, "completion_tokens": 30}),
    2: (
        "done",
        {"latency_ms": 7000.0, "prompt_tokens": 300, "completion_tokens": 40, "cached_tokens": 10},
    ),
    3: ("pending", {}),
    4: (
        "failed",
        {
            "error": "429 from critic: slow down (after 6 attempts)",
            "error_kind": ErrorKind.RATE_LIMITED,
            "prompt_tokens": 50,
        },
    ),
    5: (
        "failed",
        {
            "error": "502 from critic: Bad Gateway (after 6 attempts)",
            "error_kind": ErrorKind.SERVER_ERROR,
        },
    ),
    6: (
        "failed",
        {
            "error": "the critic did not answer in time (after 6 attempts)",
            "error_kind": ErrorKind.TIMEOUT,
        },
    ),
    7: (
        "failed",
        {
            "error": "unparseable answer after 3 attempts: no step 9",
            "error_kind": ErrorKind.UNPARSEABLE,
        },
    ),
    8: ("pending", {}),
}


def _scrape(client: TestClient) -> tuple[Samples, str]:
    response = client.get("/metrics")  # no API key
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples, response.text


def test_metrics_count_jobs_verdicts_latency_errors_tokens_and_exports(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before, _ = _scrape(client)
    upload = client.post(
        "/v1/trajectories", json=make_trajectory(9, resolved=False), headers=caller.headers
    )
    tid = upload.json()["trajectories"][0]["id"]
    job = client.post("/v1/jobs", json={"selection": {}}, headers=caller.headers).json()
    prepare_job(session, job["id"])
    outcomes = [
        outcome(step, "good" if status == "done" else None, **values)
        for step, (status, values) in STEPS.items()
        if status != "pending"
    ]
    record(session, job["id"], {tid: outcomes})
    session.add(
        Export(
            project_id=caller.project_id,
            status="queued",
            policy="srft",
            format="openai_jsonl",
            config={},
            job_ids=[job["id"]],
        )
    )
    session.flush()
    after, text = _scrape(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert delta("srft_jobs", status="running") == 1  # claimed by the outcomes written
    assert delta("srft_jobs", status="completed") == 0
    assert delta("srft_exports", status="queued") == 1
    assert delta("srft_verdicts_total", status="done") == 3
    assert delta("srft_verdicts_total", status="failed") == 4
    assert delta("srft_queue_depth", kind="verdicts") == 2
    assert delta("srft_queue_depth", kind="exports") == 1
    assert delta("srft_critic_tokens_total", type="prompt") == 650
    assert delta("srft_critic_tokens_total", type="completion") == 90
    assert delta("srft_critic_tokens_total", type="cached") == 15
    errors = {
        kind: delta("srft_critic_errors_total", kind=kind)
        for kind in ("rate_limited", "server_error", "timeout", "unparseable", "rejected", "other")
    }
    assert errors == {
        "rate_limited": 1,
        "server_error": 1,
        "timeout": 1,
        "unparseable": 1,
        "rejected": 0,
        "other": 0,
    }

    # 50 ms, 300 ms and 7 s.
    bounds = ["0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "+Inf"]
    buckets = [delta("srft_critic_latency_seconds_bucket", le=b) for b in bounds]
    assert buckets == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert delta("srft_critic_latency_seconds_count") == 3
    assert abs(delta("srft_critic_latency_seconds_sum") - 7.35) < 1e-6
    cumulative = [
        after[("srft_critic_latency_seconds_bucket", frozenset({("le", b)}))] for b in bounds
    ]
    assert cumulative == sorted(cumulative)
    assert cumulative[-1] == after[("srft_critic_latency_seconds_count", frozenset())]

    assert "# TYPE srft_critic_latency_seconds histogram" in text
    assert "# TYPE srft_verdicts_total counter" in text
    for secret in (tid, job["id"], str(caller.project_id), "look around", "slow down"):
        assert secret not in text


def test_failed_verdicts_are_counted_by_their_stored_kind_not_their_text(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before, _ = _scrape(client)
    upload = client.post(
        "/v1/trajectories", json=make_trajectory(4, resolved=False), headers=caller.headers
    )
    tid = upload.json()["trajectories"][0]["id"]
    job = client.post("/v1/jobs", json={"selection": {}}, headers=caller.headers).json()
    prepare_job(session, job["id"])
    rate_limited_text = "429 from critic: slow down (after 6 attempts)"
    # step: (error, stored kind); the text of each would say rate_limited.
    failures: dict[int, tuple[str, str | None]] = {
        0: (rate_limited_text, ErrorKind.CONNECTION),
        1: (rate_limited_text, ErrorKind.CONNECTION),
        2: (rate_limited_text, None),  # no kind stored
        3: (rate_limited_text, "gremlins"),  # a kind this version does not know
    }
    outcomes = [
        outcome(step, error=error, error_kind=cast(ErrorKind, kind))
        for step, (error, kind) in failures.items()
    ]
    record(session, job["id"], {tid: outcomes})
    after, _ = _scrape(client)

    def errors(kind: str) -> float:
        key = ("srft_critic_errors_total", frozenset({("kind", kind)}))
        return after[key] - before.get(key, 0.0)

    assert errors("connection") == 2
    assert errors("rate_limited") == 0
    assert errors("other") == 2
