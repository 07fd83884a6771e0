"""The job API on the rolled-back test database: validation, selection, cache, cancel, retry.

No worker runs here: these tests are about what the API writes and refuses. Labeling itself is
tested end to end in test_labeling_e2e.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Job, Verdict
from app.status import ErrorKind
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record


def _counts(session: Session) -> tuple[int, int]:
    jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    verdicts = session.scalar(select(func.count()).select_from(Verdict)) or 0
    return jobs, verdicts


def _start(client: TestClient, caller: Caller, session: Session, body: dict[str, Any]) -> Any:
    """Create a job, write its rows as its worker would, and read it back."""
    response = client.post("/v1/jobs", json=body, headers=caller.headers)
    assert response.status_code == 202, response.text
    prepare_job(session, response.json()["id"])
    return client.get(f"/v1/jobs/{response.json()['id']}", headers=caller.headers).json()


def _upload(client: TestClient, caller: Caller, *items: dict[str, Any]) -> list[str]:
    response = client.post(
        "/v1/trajectories", content=json.dumps(list(items)).encode(), headers=caller.headers
    )
    assert response.status_code == 201, response.text
    return [t["id"] for t in response.json()["trajectories"]]


@pytest.fixture
def stored(client: TestClient, caller: Caller) -> list[str]:
    """Three runs: 2 steps unresolved, 3 steps resolved, 4 steps of unknown resolution."""
    return _upload(
        client,
        caller,
        make_trajectory(2, salt="a", resolved=False),
        make_trajectory(3, salt="b", resolved=True),
        make_trajectory(4, salt="c"),
    )


@pytest.mark.parametrize(
    ("body", "code", "location"),
    [
        ({"selection": {"trajectory_ids": []}}, "empty_selection", "selection.trajectory_ids"),
        (
            {"selection": {"trajectory_ids": [str(uuid.uuid4())]}},
            "unknown_trajectories",
            "selection.trajectory_ids",
        ),
        ({"selection": {"task_id": "no-such-task"}}, "empty_selection", "selection"),
        ({"selection": {}, "critic": {"votes": 0}}, "validation_error", "body.critic.votes"),
        ({"selection": {}, "critic": {"mode": "vibes"}}, "validation_error", "body.critic.mode"),
        ({"selection": {}, "critic": {"votes": 3}}, "invalid_job", "critic.temperature"),
        (
            {"selection": {}, "critic": {"labels": {"only": "one label"}}},
            "invalid_labels",
            "critic.labels",
        ),
        (
            {"selection": {}, "critic": {"labels": {"Good": "x", "bad": "y"}}},
            "invalid_labels",
            "critic.labels.Good",
        ),
        (
            {"selection": {}, "critic": {"labels": {"good": "", "bad": "y"}}},
            "invalid_labels",
            "critic.labels.good",
        ),
        (
            {"selection": {}, "critic": {"extra_body": {"messages": []}}},
            "validation_error",
            "body.critic.extra_body",
        ),
        (
            {"selection": {}, "critic": {"extra_body": {"top_k": "x" * 20_000}}},
            "validation_error",
            "body.critic.extra_body",
        ),
        (
            {"selection": {}, "critic": {"delivery": "pigeon"}},
            "validation_error",
            "body.critic.delivery",
        ),
        (
            {"selection": {}, "critic": {"tokenizer": "/etc/secret-tokenizer"}},
            "invalid_tokenizer",
            "critic.tokenizer",
        ),
        (
            {"selection": {}, "critic": {"tokenizer": "not a hub id"}},
            "invalid_tokenizer",
            "critic.tokenizer",
        ),
        ({"selection": {}, "scope": "some"}, "validation_error", "body.scope"),
        ({"selection": {}, "surprise": 1}, "validation_error", "body.surprise"),
    ],
)
def test_bad_job_requests_are_4xx_and_create_nothing(
    client: TestClient,
    caller: Caller,
    session: Session,
    stored: list[str],
    body: dict[str, Any],
    code: str,
    location: str,
) -> None:
    before = _counts(session)
    response = client.post("/v1/jobs", json=body, headers=caller.headers)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["location"] == location
    assert error["message"]
    assert _counts(session) == before


def test_resolved_only_selection_is_empty_under_the_default_scope(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    before = _counts(session)
    response = client.post(
        "/v1/jobs", json={"selection": {"trajectory_ids": [stored[1]]}}, headers=caller.headers
    )
    assert response.status_code == 422
    assert "scope=all" in response.json()["error"]["message"]
    assert _counts(session) == before


def test_another_projects_trajectory_is_unknown(
    client: TestClient,
    caller: Caller,
    other_caller: Caller,
    session: Session,
    stored: list[str],
) -> None:
    response = client.post(
        "/v1/jobs", json={"selection": {"trajectory_ids": stored}}, headers=other_caller.headers
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_trajectories"


def test_job_selects_unresolved_and_unknown_by_default(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    response = client.post("/v1/jobs", json={"selection": {}}, headers=caller.headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["counts"]["trajectories"]["total"] == 2
    assert job["counts"]["steps"] == {"total": 6, "done": 0, "failed": 0, "pending": 6, "cached": 0}
    assert job["critic"]["mode"] == "trajectory"
    assert set(job["critic"]["labels"]) == {"good", "unnecessary", "mistake", "recover"}
    assert job["preparation"] == {"complete": False, "trajectories": 0, "steps": 0}
    assert session.scalar(select(func.count()).where(Verdict.job_id == job["id"])) == 0
    prepare_job(session, job["id"], batch=1)
    prepared = client.get(f"/v1/jobs/{job['id']}", headers=caller.headers).json()
    assert prepared["preparation"] == {"complete": True, "trajectories": 2, "steps": 6}
    assert prepared["counts"] == job["counts"]
    rows = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(Verdict.job_id == job["id"])
    ).all()
    assert sorted((str(t), s) for t, s in rows) == sorted(
        [(stored[0], i) for i in range(2)] + [(stored[2], i) for i in range(4)]
    )
    everything = client.post(
        "/v1/jobs", json={"selection": {}, "scope": "all"}, headers=caller.headers
    ).json()
    assert everything["counts"]["steps"]["total"] == 9


def _finish_all(session: Session, job_id: str, label: str = "good") -> None:
    rows = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(Verdict.job_id == uuid.UUID(job_id))
    ).all()
    by_trajectory: dict[uuid.UUID, list[Any]] = {}
    for trajectory_id, step in rows:
        by_trajectory.setdefault(trajectory_id, []).append(outcome(step, label, prompt_tokens=10))
    record(session, job_id, by_trajectory)


def test_identical_work_is_served_from_the_cache(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    body = {"selection": {"trajectory_ids": [stored[0]]}}
    first = _start(client, caller, session, body)
    _finish_all(session, first["id"], label="mistake")
    second = _start(client, caller, session, body)
    assert second["status"] == "completed"
    assert second["counts"]["steps"] == {
        "total": 2,
        "done": 2,
        "failed": 0,
        "pending": 0,
        "cached": 2,
    }
    assert second["counts"]["trajectories"]["cached"] == 1
    assert second["labels"] == {"mistake": 2}
    assert second["usage"]["prompt_tokens"] == 0  # nothing was asked again

    # Different critic settings are different work; "cache": false asks again.
    other_mode = _start(client, caller, session, body | {"critic": {"mode": "step"}})
    assert other_mode["counts"]["steps"]["cached"] == 0
    uncached = _start(client, caller, session, body | {"cache": False})
    assert uncached["counts"]["steps"]["cached"] == 0
    assert uncached["status"] == "queued"

    # Options that can change answers are other work; how the calls are delivered is not.
    for changed in ({"seed": 7}, {"extra_body": {"top_k": 20}}, {"structured_output": "off"}):
        other = _start(client, caller, session, body | {"critic": changed})
        assert other["counts"]["steps"]["cached"] == 0, changed
    batch = _start(client, caller, session, body | {"critic": {"delivery": "batch"}})
    assert batch["counts"]["steps"]["cached"] == 2


def test_critic_options_are_kept_and_shown(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    critic = {
        "delivery": "batch",
        "online_fallback": True,
        "max_tokens_param": "max_completion_tokens",
        "seed": 3,
        "extra_body": {"chat_template_kwargs": {"enable_thinking": False}, "top_k": 20},
        "context_tokens": 32_768,
    }
    job = _start(client, caller, session, {"selection": {}, "critic": critic})
    assert job["critic"]["delivery"] == "batch"
    assert job["critic"]["options"] == {k: v for k, v in critic.items() if k != "delivery"}
    # Options at their defaults are not listed.
    plain = _start(client, caller, session, {"selection": {}, "cache": False})
    assert plain["critic"]["delivery"] == "online"
    assert plain["critic"]["options"] == {}


def test_cancel_and_retry(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    job = _start(client, caller, session, {"selection": {"trajectory_ids": [stored[2]]}})
    url = f"/v1/jobs/{job['id']}"
    nothing_failed = client.post(f"{url}/retry", headers=caller.headers)
    assert nothing_failed.status_code == 409

    error = "429 from critic (after 6 attempts)"
    failures = [outcome(s, error=error, error_kind=ErrorKind.RATE_LIMITED) for s in range(4)]
    record(session, job["id"], {stored[2]: failures[:2]})
    failed = client.get(url, headers=caller.headers).json()
    assert failed["counts"]["steps"]["failed"] == 2
    assert failed["counts"]["trajectories"]["pending"] == 1
    record(session, job["id"], {stored[2]: failures[2:]})
    all_failed = client.get(url, headers=caller.headers).json()
    assert all_failed["status"] == "failed"
    assert all_failed["counts"]["trajectories"]["failed"] == 1
    retried = client.post(f"{url}/retry", headers=caller.headers).json()
    assert retried["counts"]["steps"]["failed"] == 0
    assert retried["counts"]["steps"]["pending"] == 4
    assert retried["counts"]["trajectories"] | {"total": 1} == {
        "total": 1,
        "done": 0,
        "failed": 0,
        "pending": 1,
        "cached": 0,
    }

    cancelled = client.post(f"{url}/cancel", headers=caller.headers)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"{url}/cancel", headers=caller.headers).status_code == 409
    assert client.post(f"{url}/retry", headers=caller.headers).status_code == 409


def test_verdicts_show_the_kind_of_their_error_until_a_retry_clears_it(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    job = _start(client, caller, session, {"selection": {"trajectory_ids": [stored[0]]}})
    url = f"/v1/jobs/{job['id']}"
    error = "429 from critic: slow down (after 6 attempts)"
    record(session, job["id"], {stored[0]: [outcome(0, error=error, error_kind="rate_limited")]})

    def errors() -> list[tuple[str, str | None, str | None]]:
        items = client.get(f"{url}/verdicts", headers=caller.headers).json()["items"]
        return [(v["status"], v["error"], v["error_kind"]) for v in items]

    assert errors() == [
        ("failed", "429 from critic: slow down (after 6 attempts)", "rate_limited"),
        ("pending", None, None),
    ]
    assert client.post(f"{url}/retry", headers=caller.headers).status_code == 200
    assert errors() == [("pending", None, None), ("pending", None, None)]


def test_jobs_of_another_project_answer_404(
    client: TestClient, caller: Caller, other_caller: Caller, stored: list[str]
) -> None:
    job = client.post("/v1/jobs", json={"selection": {}}, headers=caller.headers).json()
    for method, path in [
        ("get", ""),
        ("get", "/verdicts"),
        ("post", "/cancel"),
        ("post", "/retry"),
    ]:
        response = getattr(client, method)(
            f"/v1/jobs/{job['id']}{path}", headers=other_caller.headers
        )
        assert response.status_code == 404, path


def test_verdicts_are_paged(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    job = _start(client, caller, session, {"selection": {}, "scope": "all"})
    seen: list[tuple[str, int]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = client.get(
            f"/v1/jobs/{job['id']}/verdicts", params=params, headers=caller.headers
        ).json()
        seen += [(v["trajectory_id"], v["step_index"]) for v in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 9


def test_jobs_are_listed_newest_first_a_page_at_a_time(
    client: TestClient, caller: Caller, other_caller: Caller, session: Session, stored: list[str]
) -> None:
    created = [_start(client, caller, session, {"selection": {}})["id"] for _ in range(5)]
    _finish_all(session, created[0], label="mistake")
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params, headers=caller.headers).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [job["id"] for job in seen] == created[::-1]
    assert seen[-1]["labels"] == {"mistake": 6}
    assert seen[-1]["counts"]["steps"]["done"] == 6
    assert client.get("/v1/jobs", headers=other_caller.headers).json()["items"] == []
    bad = client.get("/v1/jobs", params={"cursor": "nonsense"}, headers=caller.headers)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_cursor"


def test_explicit_ids_are_prepared_batch_by_batch_with_the_filters_beside_them(
    client: TestClient, caller: Caller, session: Session, stored: list[str]
) -> None:
    """Ids in any order, repeated, with a filter and scope=all: each batch takes the next ids
    after the cursor (parsed and sorted once), and the filter still applies."""
    body = {"selection": {"trajectory_ids": stored[::-1] + stored[:1], "resolved": False}}
    job = client.post("/v1/jobs", json=body | {"scope": "all"}, headers=caller.headers).json()
    assert job["counts"]["trajectories"]["total"] == 1  # only the run known unresolved
    prepare_job(session, job["id"], batch=1)
    rows = session.execute(
        select(Verdict.trajectory_id, Verdict.step_index).where(Verdict.job_id == job["id"])
    ).all()
    assert sorted((str(t), s) for t, s in rows) == [(stored[0], 0), (stored[0], 1)]
    prepared = client.get(f"/v1/jobs/{job['id']}", headers=caller.headers).json()
    assert prepared["preparation"] == {"complete": True, "trajectories": 1, "steps": 2}
