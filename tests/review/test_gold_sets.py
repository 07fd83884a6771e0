"""Gold sets as files: human labels exported as JSON Lines and imported into another project,
matched by content hash; lines of unknown trajectories counted, bad lines refused by line and
field with nothing stored."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.models import Trajectory
from app.review import service as review_service
from tests.builders import make_trajectory
from tests.conftest import Caller

JSONL = {"Content-Type": "application/x-ndjson"}


def _upload(client: TestClient, caller: Caller, steps: int = 3, salt: str = "") -> str:
    response = client.post(
        "/v1/trajectories",
        json=make_trajectory(steps, resolved=False, salt=salt),
        headers=caller.headers,
    )
    assert response.status_code == 201, response.text
    trajectory_id: str = response.json()["trajectories"][0]["id"]
    return trajectory_id


def _content_hash(session: Session, trajectory_id: str) -> str:
    found = session.scalar(
        select(Trajectory.content_hash).where(Trajectory.id == uuid.UUID(trajectory_id))
    )
    assert found is not None
    return found


def _label(client: TestClient, caller: Caller, tid: str, step: int, label: str, note: Any) -> None:
    put = client.put(
        f"/v1/trajectories/{tid}/steps/{step}/human_label",
        json={"label": label, "note": note},
        headers=caller.headers,
    )
    assert put.status_code == 200, put.text


def _humans(client: TestClient, caller: Caller, tid: str) -> list[tuple[str, str, str] | None]:
    steps = client.get(f"/v1/trajectories/{tid}", headers=caller.headers).json()["steps"]
    return [
        (s["human_label"]["label"], s["human_label"]["note"], s["human_label"]["author"])
        if s["human_label"]
        else None
        for s in steps
    ]


def _import(client: TestClient, caller: Caller, lines: list[str]) -> Any:
    return client.post(
        "/v1/human-labels/import",
        content="\n".join(lines) + "\n",
        headers=caller.headers | JSONL,
    )


def test_export_then_import_into_another_project(
    client: TestClient, caller: Caller, other_caller: Caller, session: Session
) -> None:
    tid = _upload(client, caller)
    elsewhere = _upload(client, caller, salt=" only here")
    _label(client, caller, tid, 0, "good", None)
    _label(client, caller, tid, 2, "mistake", "wrong file")
    _label(client, caller, elsewhere, 1, "unnecessary", None)

    exported = client.get("/v1/human-labels/export", headers=caller.headers)
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = exported.text.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 3
    hashes = {t: _content_hash(session, t) for t in (tid, elsewhere)}
    assert rows[1] == {
        "content_hash": hashes[tid],
        "step_index": 2,
        "label": "mistake",
        "note": "wrong file",
        "author": "tests",
        "task_id": "t-1",
    }

    # The other project has the first run (same content, same hash), not the second.
    theirs = _upload(client, other_caller)
    answer = _import(client, other_caller, lines)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "imported": 2,
        "updated": 0,
        "unchanged": 0,
        "unmatched": 1,
        "unmatched_lines": [3],
    }
    assert _humans(client, other_caller, theirs) == [
        ("good", None, "tests"),
        None,
        ("mistake", "wrong file", "tests"),
    ]

    again = _import(client, other_caller, lines).json()
    assert (again["imported"], again["updated"], again["unchanged"]) == (0, 0, 2)
    # A line without an author is the caller's; a changed label replaces the step's.
    changed = json.dumps({"content_hash": hashes[tid], "step_index": 0, "label": "mistake"})
    updated = _import(client, other_caller, [changed]).json()
    assert (updated["imported"], updated["updated"], updated["unchanged"]) == (0, 1, 0)
    assert _humans(client, other_caller, theirs)[0] == ("mistake", None, "other")


@pytest.mark.parametrize(
    ("bad", "location", "code"),
    [
        ({"step_index": 3}, "line 2: step_index", "invalid_gold_set"),
        ({"step_index": -1}, "line 2: step_index", "invalid_gold_set"),
        ({"label": "meh"}, "line 2: label", "unknown_label"),
        ({"label": 5}, "line 2: label", "invalid_gold_set"),
        ({"content_hash": "abc"}, "line 2: content_hash", "invalid_gold_set"),
        ({"labl": "good"}, "line 2: labl", "invalid_gold_set"),
        ({"step_index": 0}, "line 2: step_index", "invalid_gold_set"),  # the step of line 1
    ],
)
def test_a_bad_line_is_refused_by_line_and_field_and_nothing_is_stored(
    client: TestClient,
    caller: Caller,
    session: Session,
    bad: dict[str, Any],
    location: str,
    code: str,
) -> None:
    tid = _upload(client, caller)
    content_hash = _content_hash(session, tid)
    good = {"content_hash": content_hash, "step_index": 0, "label": "good"}
    second = {"content_hash": content_hash, "step_index": 1, "label": "mistake"} | bad
    answer = _import(client, caller, [json.dumps(good), json.dumps(second)])
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert (error["location"], error["code"]) == (location, code)
    assert error["message"].startswith("line 2: ")
    assert _humans(client, caller, tid) == [None, None, None]


def test_a_line_that_is_not_json_and_an_oversized_body_are_refused(
    client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _import(client, caller, ["", '{"content_hash": '])
    assert broken.status_code == 422
    assert broken.json()["error"]["location"].startswith("line 2")
    huge = client.post(
        "/v1/human-labels/import",
        content=b"\n" * (16 * 1024 * 1024 + 1),
        headers=caller.headers | JSONL,
    )
    assert huge.status_code == 413


def test_the_export_reads_a_page_at_a_time(
    client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(review_service, "GOLD_PAGE", 2)
    tid = _upload(client, caller, steps=5)
    for step in range(5):
        _label(client, caller, tid, step, "good", f"n{step}")
    lines = client.get("/v1/human-labels/export", headers=caller.headers).text.splitlines()
    assert [json.loads(line)["note"] for line in lines] == [f"n{s}" for s in range(5)]
    assert client.get("/v1/human-labels/export").status_code == 401


@pytest.mark.usefixtures("cli")
def test_srft_gold_export_and_import(client: TestClient, caller: Caller, tmp_path: Any) -> None:
    tid = _upload(client, caller)
    _label(client, caller, tid, 1, "mistake", None)
    exported = CliRunner().invoke(cli_app, ["gold", "export"], env={"SRFT_API_KEY": "x"})
    assert exported.exit_code == 0, exported.output
    (row,) = [json.loads(line) for line in exported.output.splitlines()]
    assert (row["step_index"], row["label"]) == (1, "mistake")

    path = tmp_path / "gold.jsonl"
    path.write_text(json.dumps(row | {"step_index": 2}) + "\n")
    imported = CliRunner().invoke(cli_app, ["gold", "import", str(path)], env={"SRFT_API_KEY": "x"})
    assert imported.exit_code == 0, imported.output
    assert "1 imported, 0 updated, 0 unchanged, 0 unmatched" in imported.output
    assert _humans(client, caller, tid)[2] == ("mistake", None, "tests")

    path.write_text(json.dumps(row | {"step_index": 9}) + "\n")
    refused = CliRunner().invoke(cli_app, ["gold", "import", str(path)], env={"SRFT_API_KEY": "x"})
    assert refused.exit_code == 1
    assert "line 1: step_index" in refused.output
