"""The request's unit of work (`app.deps.get_session`): committed once when the handler returns,
before the response is sent, and only then are tasks queued. Real Postgres, committed for real
(a Postgres of this module's own), so that what another connection sees is what was stored."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.config import Settings
from app.db import Database
from app.jobs import queue as job_queue
from app.jobs import service as job_service
from app.main import create_app
from app.models import Job, Trajectory
from tests.builders import make_trajectory
from tests.servers import PostgresServer


@pytest.fixture(scope="module")
def database_url(own_postgres: PostgresServer) -> str:
    return own_postgres.url


@pytest.fixture
def service(database_url: str, redis_url: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    database = Database(database_url)
    with database.transaction() as session:
        key = auth_service.create_key(session, "uow", project_name=f"uow-{uuid.uuid4().hex[:6]}")
    settings = Settings(database_url=database_url, broker_url=redis_url)
    with TestClient(create_app(settings, database=database), raise_server_exceptions=False) as c:
        yield c, {"Authorization": f"Bearer {key.key}"}
    database.dispose()


def _count(url: str, model: Any, project_id: uuid.UUID | None = None) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).select_from(model)
            if project_id is not None:
                query = query.where(model.project_id == project_id)
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def _upload(client: TestClient, headers: dict[str, str]) -> str:
    body = json.dumps(make_trajectory(3, resolved=False, salt=uuid.uuid4().hex))
    response = client.post("/v1/trajectories", content=body, headers=headers)
    assert response.status_code == 201, response.text
    trajectory_id: str = response.json()["trajectories"][0]["id"]
    return trajectory_id


def _start_job(service: tuple[TestClient, dict[str, str]]) -> Any:
    """Upload a run of 3 steps, then POST a job over it."""
    client, headers = service
    trajectory_id = _upload(client, headers)
    selection = {"trajectory_ids": [trajectory_id]}
    return client.post("/v1/jobs", json={"selection": selection}, headers=headers)


def test_a_route_that_fails_after_writing_stores_nothing_and_queues_nothing(
    service: tuple[TestClient, dict[str, str]],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[uuid.UUID] = []
    monkeypatch.setattr(job_queue, "send_prepare", lambda _url, job_id: sent.append(job_id))
    jobs_before = _count(database_url, Job)

    def broken_describe(session: Session, job: Job) -> Any:
        # By now the job is written (flushed) and its preparation registered to be queued.
        assert session.scalar(select(func.count()).select_from(Job).where(Job.id == job.id)) == 1
        raise RuntimeError("the handler fails after writing")

    monkeypatch.setattr(job_service, "describe", broken_describe)
    response = _start_job(service)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert _count(database_url, Job) == jobs_before
    assert sent == []


def test_tasks_are_queued_only_after_the_rows_they_name_are_committed(
    service: tuple[TestClient, dict[str, str]],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []

    def spy(_url: str, job_id: uuid.UUID) -> None:
        # Another connection already sees the job the task will prepare.
        seen.append(_count(database_url, Job))

    monkeypatch.setattr(job_queue, "send_prepare", spy)
    before = _count(database_url, Job)
    response = _start_job(service)
    assert response.status_code == 202, response.text
    assert seen == [before + 1]


def test_a_commit_that_fails_is_an_error_response_not_a_2xx(
    service: tuple[TestClient, dict[str, str]],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, headers = service
    before = _count(database_url, Trajectory)

    def failing_commit(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(Session, "commit", failing_commit)
    body = json.dumps(make_trajectory(2, salt=uuid.uuid4().hex))
    response = client.post("/v1/trajectories", content=body, headers=headers)
    monkeypatch.undo()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "database_unavailable"
    assert _count(database_url, Trajectory) == before
