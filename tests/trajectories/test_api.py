"""The trajectory API on real Postgres: upload, dedupe, read, list, update, raw bytes kept."""

from __future__ import annotations

import json
import uuid

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.trajectories import service as trajectory_service
from tests.builders import make_trajectory, row_counts
from tests.conftest import Caller


def _upload(
    client: TestClient,
    caller: Caller,
    body: bytes,
    *,
    params: dict[str, str] | None = None,
    content_type: str | None = None,
) -> dict:
    headers = caller.headers | ({"Content-Type": content_type} if content_type else {})
    response = client.post("/v1/trajectories", content=body, headers=headers, params=params)
    assert response.status_code == 201, response.text
    return response.json()


def test_canonical_object_array_and_ndjson_are_accepted(client: TestClient, caller: Caller) -> None:
    one = _upload(client, caller, json.dumps(make_trajectory(3, salt="a")).encode())
    assert one["created"] == 1
    assert one["trajectories"][0]["num_steps"] == 3
    assert one["trajectories"][0]["source_format"] == "openai"

    array = _upload(
        client,
        caller,
        json.dumps([make_trajectory(1, salt="b"), make_trajectory(2, salt="c")]).encode(),
    )
    assert [t["num_steps"] for t in array["trajectories"]] == [1, 2]

    ndjson = "\n".join(json.dumps(make_trajectory(4, salt=s)) for s in "def").encode()
    lines = _upload(client, caller, ndjson, content_type="application/x-ndjson")
    assert lines["created"] == 3
    assert all(t["num_steps"] == 4 for t in lines["trajectories"])


def test_same_upload_twice_creates_nothing_new(
    client: TestClient, caller: Caller, session: Session
) -> None:
    body = json.dumps([make_trajectory(2, salt="x"), make_trajectory(2, salt="y")]).encode()
    first = _upload(client, caller, body)
    after_first = row_counts(session)
    second = _upload(client, caller, body)
    assert (first["created"], first["duplicates"]) == (2, 0)
    assert (second["created"], second["duplicates"]) == (0, 2)
    assert [t["status"] for t in second["trajectories"]] == ["duplicate", "duplicate"]
    assert [t["id"] for t in second["trajectories"]] == [t["id"] for t in first["trajectories"]]
    assert row_counts(session) == after_first


def test_a_run_repeated_inside_one_file_is_stored_once(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    run = make_trajectory(2, salt="twice")
    result = _upload(client, caller, json.dumps([run, run]).encode())
    assert [t["status"] for t in result["trajectories"]] == ["created", "duplicate"]
    assert result["trajectories"][0]["id"] == result["trajectories"][1]["id"]
    after = row_counts(session)
    assert after["trajectories"] == before["trajectories"] + 1
    assert after["steps"] == before["steps"] + 2


def test_dedupe_is_per_project(client: TestClient, caller: Caller, other_caller: Caller) -> None:
    body = json.dumps(make_trajectory(2, salt="shared")).encode()
    mine = _upload(client, caller, body)
    theirs = _upload(client, other_caller, body)
    assert theirs["created"] == 1
    assert theirs["trajectories"][0]["id"] != mine["trajectories"][0]["id"]


def test_get_returns_canonical_run_and_steps(client: TestClient, caller: Caller) -> None:
    item = make_trajectory(2, salt="get", task_id="django__django-1")
    item["metadata"] = {"model": "m-1"}
    created = _upload(client, caller, json.dumps(item).encode(), params={"resolved": "false"})
    trajectory_id = created["trajectories"][0]["id"]
    body = client.get(f"/v1/trajectories/{trajectory_id}", headers=caller.headers).json()
    assert body["task_id"] == "django__django-1"
    assert body["resolved"] is False
    assert body["source_format"] == "openai"
    assert body["metadata"]["model"] == "m-1"
    assert body["messages"][1]["content"] == "fix the bugget"
    assert [s["index"] for s in body["steps"]] == [0, 1]
    assert [s["message_index"] for s in body["steps"]] == [2, 4]
    assert [s["observation_indices"] for s in body["steps"]] == [[3], [5]]
    assert body["steps"][1]["action"] == "bash(ls 1)"
    assert body["steps"][1]["tool_names"] == ["bash"]


def test_resolved_query_overrides_the_file(client: TestClient, caller: Caller) -> None:
    body = json.dumps(make_trajectory(1, salt="r", resolved=False)).encode()
    created = _upload(client, caller, body, params={"resolved": "true"})
    assert created["trajectories"][0]["resolved"] is True
    from_file = _upload(
        client, caller, json.dumps(make_trajectory(1, salt="s", resolved=False)).encode()
    )
    assert from_file["trajectories"][0]["resolved"] is False


def test_patch_sets_and_clears_resolved(client: TestClient, caller: Caller) -> None:
    created = _upload(client, caller, json.dumps(make_trajectory(1, salt="p")).encode())
    trajectory_id = created["trajectories"][0]["id"]
    url = f"/v1/trajectories/{trajectory_id}"
    assert (
        client.patch(url, json={"resolved": True}, headers=caller.headers).json()["resolved"]
        is True
    )
    assert client.get(url, headers=caller.headers).json()["resolved"] is True
    assert (
        client.patch(url, json={"resolved": None}, headers=caller.headers).json()["resolved"]
        is None
    )
    assert client.get(url, headers=caller.headers).json()["resolved"] is None


def test_list_filters_and_cursor_pagination(client: TestClient, caller: Caller) -> None:
    ids = []
    for i in range(7):
        resolved = [True, False, None][i % 3]
        item = make_trajectory(1, salt=f"l{i}", task_id=f"task-{i % 2}", resolved=resolved)
        ids.append(_upload(client, caller, json.dumps(item).encode())["trajectories"][0]["id"])

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/trajectories", params=params, headers=caller.headers).json()
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once

    def listed(**params: str) -> list[str]:
        return [
            i["id"]
            for i in client.get("/v1/trajectories", params=params, headers=caller.headers).json()[
                "items"
            ]
        ]

    assert set(listed(resolved="true")) == {ids[0], ids[3], ids[6]}
    assert set(listed(resolved="false")) == {ids[1], ids[4]}
    assert set(listed(resolved="unknown")) == {ids[2], ids[5]}
    assert set(listed(task_id="task-1")) == {ids[1], ids[3], ids[5]}
    assert set(listed(source_format="openai")) == set(ids)
    assert listed(source_format="swe-agent") == []
    summary = client.get("/v1/trajectories", headers=caller.headers).json()["items"][0]
    assert "messages" not in summary
    assert summary["num_steps"] == 1


def test_nul_bytes_are_replaced_counted_and_the_original_kept(
    client: TestClient, caller: Caller, session: Session
) -> None:
    item = make_trajectory(2, salt="nul")
    item["messages"][3]["content"] = "binary\u0000out\u0000put"
    item["messages"][5]["content"] = "\u0000"
    raw = json.dumps(item).encode()
    assert b"\\u0000" in raw
    created = _upload(client, caller, raw)
    trajectory_id = created["trajectories"][0]["id"]
    body = client.get(f"/v1/trajectories/{trajectory_id}", headers=caller.headers).json()
    assert body["messages"][3]["content"] == "binary\ufffdout\ufffdput"
    assert body["metadata"]["nul_replacements"] == 3
    # The upload is kept byte for byte.
    original = trajectory_service.read_upload(
        session, caller.project_id, uuid.UUID(body["upload_id"])
    )
    assert original == raw
    download = client.get(f"/v1/uploads/{body['upload_id']}/raw", headers=caller.headers)
    assert download.status_code == 200
    assert download.content == raw


def test_terminal_escapes_are_removed_from_observations_only(
    client: TestClient, caller: Caller
) -> None:
    item = make_trajectory(1, salt="ansi")
    item["messages"][2]["content"] = "run \x1b[1mthis\x1b[0m"
    item["messages"][3]["content"] = "\x1b[?2004lok\x1b[32m done\x1b[0m"
    created = _upload(client, caller, json.dumps(item).encode())
    body = client.get(
        f"/v1/trajectories/{created['trajectories'][0]['id']}", headers=caller.headers
    ).json()
    assert body["messages"][3]["content"] == "ok done"
    assert body["messages"][2]["content"] == "run \x1b[1mthis\x1b[0m"  # the model's own text
    assert body["metadata"]["ansi_escapes_removed"] == 3


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_down(postgres_url: str) -> None:
    from app.config import Settings
    from app.db import Database
    from app.main import create_app
    from tests.servers import free_port

    settings = Settings(database_url=postgres_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    database = Database(postgres_url)
    try:
        with TestClient(create_app(settings, database=database)) as client:
            response = client.get("/readyz")
    finally:
        database.dispose()
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["broker"].startswith("error")
