"""Selections, the one way jobs and exports choose trajectories: explicit ids are checked and
matched a chunk at a time, so even the largest selection the API takes never passes the
database driver's limit of 65,535 parameters per statement."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import service as job_service
from app.jobs.schemas import Selection
from app.models import Trajectory
from tests.builders import make_trajectory
from tests.conftest import Caller


def _upload(client: TestClient, caller: Caller, *items: dict[str, Any]) -> list[str]:
    response = client.post(
        "/v1/trajectories", content=json.dumps(list(items)).encode(), headers=caller.headers
    )
    assert response.status_code == 201, response.text
    return [t["id"] for t in response.json()["trajectories"]]


def test_the_largest_selection_is_checked_without_a_server_error(
    client: TestClient, caller: Caller
) -> None:
    stored = _upload(client, caller, make_trajectory(2, salt="big", resolved=False))
    absent = [str(uuid.uuid4()) for _ in range(100_000 - len(stored))]
    body = {"selection": {"trajectory_ids": stored + absent}}
    response = client.post("/v1/jobs", json=body, headers=caller.headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_trajectories"
    assert error["location"] == "selection.trajectory_ids"
    assert error["message"].startswith(f"{len(absent)} trajectory ids are not in this project")
    assert error["details"]["unknown"] == sorted(absent)[:1000]


def test_explicit_ids_are_matched_a_chunk_at_a_time_in_id_order(
    client: TestClient,
    caller: Caller,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = _upload(
        client,
        caller,
        *(make_trajectory(2, salt=f"chunk{n}", resolved=n % 2 == 0) for n in range(7)),
    )
    monkeypatch.setattr(job_service, "ID_CHUNK", 2)
    query = select(Trajectory.id).where(Trajectory.project_id == caller.project_id)
    query = query.order_by(Trajectory.id)
    wanted = [uuid.UUID(i) for i in ids[:6]]
    chosen = job_service.selected(session, query, Selection(trajectory_ids=wanted * 2))
    assert chosen == sorted(wanted)
    resolved = {t.id for t in session.scalars(select(Trajectory).where(Trajectory.resolved))}
    only_resolved = job_service.selected(
        session, query, Selection(trajectory_ids=wanted, resolved=True)
    )
    assert only_resolved == sorted(set(wanted) & resolved)
    assert 0 < len(only_resolved) < len(wanted)


def test_jobs_and_exports_refuse_the_same_selections_alike(
    client: TestClient, caller: Caller
) -> None:
    stored = _upload(client, caller, make_trajectory(2, salt="alike", resolved=False))
    job = client.post(
        "/v1/jobs", json={"selection": {"trajectory_ids": stored}}, headers=caller.headers
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    # A cancelled job can be exported (what it labeled so far).
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=caller.headers)
    assert cancelled.status_code == 200, cancelled.text
    for ids, code in (([], "empty_selection"), ([str(uuid.uuid4())], "unknown_trajectories")):
        errors = []
        for path, extra in (("/v1/jobs", {}), ("/v1/exports", {"job_ids": [job_id]})):
            body = {"selection": {"trajectory_ids": ids}} | extra
            response = client.post(path, json=body, headers=caller.headers)
            assert response.status_code == 422, response.text
            errors.append(response.json()["error"])
        assert errors[0] == errors[1]
        assert errors[0]["code"] == code
