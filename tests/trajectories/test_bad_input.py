"""Every kind of bad upload: the right status and error code, a location, and nothing stored."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.builders import make_trajectory, row_counts
from tests.conftest import Caller
from tests.helpers import trajectory_file


def _post(client: TestClient, caller: Caller, body: bytes, **params: str) -> tuple[int, dict]:
    response = client.post("/v1/trajectories", content=body, headers=caller.headers, params=params)
    return response.status_code, response.json()


def _assert_unchanged(session: Session, before: dict[str, int]) -> None:
    assert row_counts(session) == before


def test_malformed_json_reports_line_and_column(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    body = b'{\n  "messages": [\n    {"role": "user" "content": "x"}\n  ]\n}'
    status, payload = _post(client, caller, body)
    assert status == 400
    assert payload["error"]["code"] == "invalid_json"
    assert payload["error"]["location"] == "line 3, column 21"
    _assert_unchanged(session, before)


def test_jsonl_with_bad_lines_lists_every_bad_line_and_stores_nothing(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    good = [json.dumps(make_trajectory(salt=str(i))) for i in range(4)]
    lines = [good[0], "{not json", good[1], good[2], '{"messages": [', good[3]]
    response = client.post(
        "/v1/trajectories",
        content="\n".join(lines).encode(),
        headers={**caller.headers, "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_jsonl"
    assert [bad["line"] for bad in error["details"]["bad_lines"]] == [2, 5]
    assert "line 2" in error["location"]
    assert "line 5" in error["location"]
    _assert_unchanged(session, before)


def test_undetectable_format_says_what_was_tried(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    status, payload = _post(client, caller, json.dumps({"hello": "world"}).encode())
    assert status == 422
    assert payload["error"]["code"] == "unknown_format"
    tried = payload["error"]["details"]["tried"]
    assert set(tried) == {"swe-agent", "mini-swe-agent", "openhands", "nebius", "openai"}
    assert all(isinstance(reason, str) and reason for reason in tried.values())
    _assert_unchanged(session, before)


def test_unknown_format_name_is_rejected(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    status, payload = _post(
        client, caller, json.dumps(make_trajectory()).encode(), format="langchain"
    )
    assert status == 422
    assert payload["error"]["code"] == "unknown_format"
    assert payload["error"]["location"] == "query.format"
    assert "swe-agent" in payload["error"]["message"]
    _assert_unchanged(session, before)


def test_forcing_the_wrong_format_is_rejected(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    body = trajectory_file(
        "nebius-swe-agent/adp__nebius-swe-agent-trajectories__sample_raw@51905b6.json"
    ).read_bytes()
    status, payload = _post(client, caller, body, format="swe-agent")
    assert status == 422
    assert payload["error"]["code"] == "invalid_trajectory"
    _assert_unchanged(session, before)


def test_run_without_assistant_step_is_rejected_and_nothing_of_the_file_is_stored(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    empty = {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}],
        "task_id": "empty",
    }
    body = json.dumps([make_trajectory(salt="ok"), empty]).encode()
    status, payload = _post(client, caller, body)
    assert status == 422
    assert payload["error"]["code"] == "no_steps"
    assert payload["error"]["location"] == "run 1"
    _assert_unchanged(session, before)


def test_body_over_the_limit_is_413_naming_the_limit(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    limit = client.app.state.settings.max_upload_bytes  # type: ignore[attr-defined]
    body = b" " * (limit + 1)
    status, payload = _post(client, caller, body)
    assert status == 413
    assert payload["error"]["code"] == "payload_too_large"
    assert str(limit) in payload["error"]["message"]
    assert "SRFT_MAX_UPLOAD_BYTES" in payload["error"]["message"]
    _assert_unchanged(session, before)


def test_body_over_the_limit_without_content_length_is_413(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    limit = client.app.state.settings.max_upload_bytes  # type: ignore[attr-defined]

    def chunks():  # a streamed body carries no Content-Length
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = client.post("/v1/trajectories", content=chunks(), headers=caller.headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    _assert_unchanged(session, before)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer srft_not-a-real-key"}, "invalid or revoked"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "malformed Authorization"),
    ],
)
def test_missing_or_wrong_key_is_401(
    client: TestClient, session: Session, headers: dict[str, str], reason: str
) -> None:
    before = row_counts(session)
    response = client.post(
        "/v1/trajectories", content=json.dumps(make_trajectory()).encode(), headers=headers
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert reason in response.json()["error"]["message"]
    assert client.get("/v1/trajectories", headers=headers).status_code == 401
    _assert_unchanged(session, before)


def test_revoked_key_is_401(client: TestClient, caller: Caller, session: Session) -> None:
    from sqlalchemy import update

    from app.models import ApiKey, utcnow

    session.execute(
        update(ApiKey).where(ApiKey.project_id == caller.project_id).values(revoked_at=utcnow())
    )
    assert client.get("/v1/trajectories", headers=caller.headers).status_code == 401


def test_another_projects_ids_answer_404(
    client: TestClient, caller: Caller, other_caller: Caller, session: Session
) -> None:
    created = client.post(
        "/v1/trajectories", content=json.dumps(make_trajectory()).encode(), headers=caller.headers
    ).json()
    trajectory_id = created["trajectories"][0]["id"]
    before = row_counts(session)
    response = client.get(f"/v1/trajectories/{trajectory_id}", headers=other_caller.headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    patch = client.patch(
        f"/v1/trajectories/{trajectory_id}", json={"resolved": True}, headers=other_caller.headers
    )
    assert patch.status_code == 404
    listing = client.get("/v1/trajectories", headers=other_caller.headers).json()
    assert listing["items"] == []
    # The owner still sees it, unchanged.
    mine = client.get(f"/v1/trajectories/{trajectory_id}", headers=caller.headers).json()
    assert mine["resolved"] is None
    _assert_unchanged(session, before)


def test_invalid_utf8_is_reported_with_its_position(
    client: TestClient, caller: Caller, session: Session
) -> None:
    before = row_counts(session)
    status, payload = _post(client, caller, b'{"messages": [\n  "caf\xe9"]}')
    assert status == 400
    assert payload["error"]["code"] == "invalid_encoding"
    assert payload["error"]["location"] == "line 2, column 7"
    _assert_unchanged(session, before)


def test_patch_rejects_a_body_without_resolved(client: TestClient, caller: Caller) -> None:
    created = client.post(
        "/v1/trajectories", content=json.dumps(make_trajectory()).encode(), headers=caller.headers
    ).json()
    trajectory_id = created["trajectories"][0]["id"]
    response = client.patch(
        f"/v1/trajectories/{trajectory_id}", json={"resolvd": True}, headers=caller.headers
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def test_limit_over_100_is_rejected(client: TestClient, caller: Caller) -> None:
    response = client.get("/v1/trajectories", params={"limit": 101}, headers=caller.headers)
    assert response.status_code == 422
    assert response.json()["error"]["location"] == "query.limit"


def test_garbage_cursor_is_rejected(client: TestClient, caller: Caller) -> None:
    response = client.get("/v1/trajectories", params={"cursor": "!!"}, headers=caller.headers)
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_another_projects_upload_answers_404(
    client: TestClient, caller: Caller, other_caller: Caller
) -> None:
    created = client.post(
        "/v1/trajectories", content=json.dumps(make_trajectory()).encode(), headers=caller.headers
    ).json()
    detail = client.get(
        f"/v1/trajectories/{created['trajectories'][0]['id']}", headers=caller.headers
    ).json()
    url = f"/v1/uploads/{detail['upload_id']}/raw"
    assert client.get(url, headers=caller.headers).status_code == 200
    response = client.get(url, headers=other_caller.headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
