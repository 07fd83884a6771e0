"""The review queue: unlabeled steps ranked so that a step the critics disagree on comes
before one they agree on, each with its reasons, from a bounded window of candidates."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.review import service as review_service
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record


def _start_job(client: TestClient, caller: Caller) -> str:
    job = client.post(
        "/v1/jobs",
        json={"selection": {}, "scope": "unresolved", "cache": False},
        headers=caller.headers,
    )
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    return job_id


def _queue_setup(client: TestClient, caller: Caller, session: Session) -> tuple[str, str, str]:
    upload = client.post(
        "/v1/trajectories", json=make_trajectory(5, resolved=False), headers=caller.headers
    )
    tid = upload.json()["trajectories"][0]["id"]
    job_a, job_b = _start_job(client, caller), _start_job(client, caller)
    prepare_job(session, job_a)
    prepare_job(session, job_b)
    # Step 1: the critics disagree. Step 2: they agree, but B's votes split 2 to 1.
    # Steps 0, 3: plain agreement. Step 4: a human labeled it already.
    record(
        session,
        job_a,
        {
            tid: [
                outcome(0, "good"),
                outcome(1, "mistake"),
                outcome(2, "good"),
                outcome(3, "good"),
                outcome(4, "mistake"),
            ]
        },
    )
    record(
        session,
        job_b,
        {
            tid: [
                outcome(0, "good"),
                outcome(1, "good"),
                outcome(2, "good", votes=["good", "good", "mistake"]),
                outcome(3, "good"),
                outcome(4, "good"),
            ]
        },
    )
    put = client.put(
        f"/v1/trajectories/{tid}/steps/4/human_label",
        json={"label": "mistake"},
        headers=caller.headers,
    )
    assert put.status_code == 200, put.text
    return job_a, job_b, tid


def test_a_disagreement_outranks_an_agreement(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_a, job_b, tid = _queue_setup(client, caller, session)
    response = client.get(
        "/v1/evaluations/queue", params={"job_id": [job_a, job_b]}, headers=caller.headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    items = body["items"]
    # Step 4 has a human label: never proposed.
    assert [item["step_index"] for item in items] == [1, 2, 0, 3]
    assert {item["trajectory_id"] for item in items} == {tid}
    first, second = items[0], items[1]
    # A says mistake on 2 of its 5 steps (share 0.4), B good on all: 4 x 1 + 0 + (1 - 0.4).
    assert first["score"] == 4.6
    assert first["reasons"][0] == "critics disagree: good, mistake"
    assert [(v["job_id"], v["label"]) for v in first["verdicts"]] == [
        (job_a, "mistake"),
        (job_b, "good"),
    ]
    # Votes split 2 to 1: 2 x 1/3, and A's good (share 0.6): 0.4.
    assert second["score"] == round(2 / 3 + 0.4, 6)
    assert "votes split: agreement 67%" in second["reasons"]
    assert not any(r.startswith("critics disagree") for r in second["reasons"])
    assert body["scanned"] == 4
    assert body["next_cursor"] is None

    # One job alone: nothing to disagree on, rare labels and split votes still count.
    alone = client.get(
        "/v1/evaluations/queue", params={"job_id": [job_a], "limit": 1}, headers=caller.headers
    ).json()
    assert [item["step_index"] for item in alone["items"]] == [1]


def test_the_queue_scans_a_bounded_window_and_pages_on(
    client: TestClient, caller: Caller, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_a, job_b, _ = _queue_setup(client, caller, session)
    monkeypatch.setattr(review_service, "QUEUE_WINDOW_PER_ITEM", 2)
    params: dict[str, object] = {"job_id": [job_a, job_b], "limit": 1}
    first = client.get("/v1/evaluations/queue", params=params, headers=caller.headers).json()
    # A window of 2 candidates (steps 0 and 1 of job A, in id order): the best is step 1.
    assert first["scanned"] == 2
    assert [item["step_index"] for item in first["items"]] == [1]
    assert first["next_cursor"]
    second = client.get(
        "/v1/evaluations/queue",
        params=params | {"cursor": first["next_cursor"]},
        headers=caller.headers,
    ).json()
    assert second["scanned"] == 2
    assert [item["step_index"] for item in second["items"]] == [2]
    bad = client.get(
        "/v1/evaluations/queue", params=params | {"cursor": "nope"}, headers=caller.headers
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["location"] == "query.cursor"
