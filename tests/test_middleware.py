"""Hostile input through the real HTTP stack: `srft serve` (uvicorn, the embedded default) in a
subprocess, spoken to over TCP. Every body is bounded per endpoint before it is read, every
parse failure is a 400 `invalid_json` with a location, every cursor is checked in one place,
types are strict, NUL never reaches the database, and nothing bad is half-stored."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.builders import make_trajectory
from tests.test_embedded import Served

KEY = "srft_" + "k" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTROL_LIMIT = 64 * 1024
UPLOAD_LIMIT = 2 * 1024 * 1024
HUGE_INT = "9" * 5000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(
        tmp_path_factory.mktemp("hardening"),
        SRFT_BOOTSTRAP_API_KEY=KEY,
        SRFT_MAX_BODY_BYTES=str(CONTROL_LIMIT),
        SRFT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def seeded(http: httpx.Client) -> dict[str, str]:
    """One stored run and a finished labeling job over it: real ids for every route."""
    created = http.post(
        "/v1/trajectories", content=json.dumps(make_trajectory(3, salt="seed", resolved=False))
    )
    assert created.status_code == 201, created.text
    trajectory_id = created.json()["trajectories"][0]["id"]
    job = http.post("/v1/jobs", json={"selection": {"trajectory_ids": [trajectory_id]}})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 60
    while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return {"trajectory": trajectory_id, "job": job_id}


def _count(http: httpx.Client) -> int:
    items: list[Any] = http.get("/v1/trajectories", params={"limit": 100}).json()["items"]
    return len(items)


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------- 1. numbers JSON refuses


@pytest.mark.parametrize(
    ("literal", "what"),
    [
        (HUGE_INT, "5000 digits"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1e400", "out of range"),
    ],
)
def test_uploads_refuse_numbers_json_does_not_allow_with_a_location(
    http: httpx.Client, seeded: dict[str, str], literal: str, what: str
) -> None:
    before = _count(http)
    good = json.dumps(make_trajectory(2, salt=f"n-{what}"))
    bad = (
        json.dumps(make_trajectory(2, salt=f"b-{what}"))[:-1]
        + f', "metadata": {{"x": {literal}}}}}'
    )
    assert bad.endswith(f"{literal}}}}}")
    bodies = {
        "document": ("application/json", f"[{literal}]", "line 1, column 2"),
        "array item": ("application/json", f"[{good},\n{bad}]", "line 2, column"),
        "ndjson line": ("application/x-ndjson", f"{good}\n{bad}\n", "line 2"),
    }
    for name, (media, body, where) in bodies.items():
        response = http.post(
            "/v1/trajectories", content=body.encode(), headers={"Content-Type": media}
        )
        code = "invalid_jsonl" if media == "application/x-ndjson" else "invalid_json"
        error = _error(response, 400, code)
        assert where in error["location"], (name, error)
        assert what in error["message"], (name, error)
    assert _count(http) == before


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("POST", "/v1/jobs", '{"selection": {"trajectory_ids": []}, "critic": {"votes": %s}}'),
        ("PATCH", "/v1/trajectories/{trajectory}", '{"resolved": %s}'),
        ("PUT", "/v1/trajectories/{trajectory}/steps/0/human_label", '{"label": %s}'),
        ("POST", "/v1/exports", '{"job_ids": ["{job}"], "seed": %s}'),
    ],
)
def test_control_bodies_refuse_bad_json_as_invalid_json_with_a_location(
    http: httpx.Client, seeded: dict[str, str], method: str, path: str, template: str
) -> None:
    url = path.format(**seeded)
    for literal in (HUGE_INT, "NaN", "-Infinity", "1e999"):
        body = template.replace("{job}", seeded["job"]) % literal
        response = http.request(
            method, url, content=body, headers={"Content-Type": "application/json"}
        )
        error = _error(response, 400, "invalid_json")
        assert error["location"].startswith("line 1, column "), error
    deep = "[" * 3000 + "]" * 3000
    for body in (deep, template.replace("{job}", seeded["job"]) % ("[" * 40 + "]" * 40)):
        response = http.request(
            method, url, content=body, headers={"Content-Type": "application/json"}
        )
        error = _error(response, 400, "invalid_json")
        assert "deep" in error["message"], error
    assert http.get(f"/v1/trajectories/{seeded['trajectory']}").json()["resolved"] is False


# ---------------------------------------------------------------------- 2. cursors


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


BAD_CURSORS = [
    _b64(str(10**30)),
    _b64("[1000000000000000000000000000000]"),
    _b64("true"),
    _b64("[true]"),
    _b64("[-1]"),
    _b64("[" * 3000),
    _b64('["not-a-uuid", 1]'),
    _b64('[1, "x"]'),
    _b64("[NaN]"),
    "!!!not base64!!!",
    "A" * 5000,
    "",
]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/trajectories",
        "/v1/jobs/{job}/verdicts",
        "/v1/jobs/{job}/evaluation",
        "/v1/exports",
    ],
)
def test_every_paged_endpoint_refuses_a_malformed_cursor(
    http: httpx.Client, seeded: dict[str, str], path: str
) -> None:
    url = path.format(**seeded)
    for cursor in BAD_CURSORS:
        response = http.get(url, params={"cursor": cursor})
        error = _error(response, 422, "invalid_cursor")
        assert error["location"] == "query.cursor"


# ---------------------------------------------------------------------- 4. bounded bodies


def _raw_exchange(served: Served, head: bytes, body: bytes, timeout: float = 10) -> bytes:
    """Send `head` and `body` on a fresh connection and read what the server answers."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head_end = received.find(b"\r\n\r\n") + 4
        length = 0
        for line in received[:head_end].split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(received) < head_end + length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


CONTROL_ROUTES = [
    ("POST", "/v1/jobs/{job}/cancel", True),
    ("PATCH", "/v1/trajectories/{trajectory}", True),
    ("PUT", "/v1/trajectories/{trajectory}/steps/0/human_label", True),
    ("POST", "/ui/login", False),
    ("POST", "/ui/trajectories/{trajectory}/steps/0/label", False),
]


@pytest.mark.parametrize(("method", "path", "keyed"), CONTROL_ROUTES)
def test_a_declared_huge_body_is_refused_before_it_is_read(
    served: Served, seeded: dict[str, str], method: str, path: str, keyed: bool
) -> None:
    # 70 MB announced, 1 KB sent: the answer must come without the server waiting for more.
    url = path.format(**seeded)
    head = (
        f"{method} {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {70 * 1024 * 1024}\r\n"
        + (f"Authorization: Bearer {KEY}\r\n" if keyed else "")
        + "\r\n"
    ).encode()
    started = time.monotonic()
    answer = _raw_exchange(served, head, b"x" * 1024)
    assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "payload_too_large"
    assert body["error"]["location"] == "body"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("PATCH", "/v1/trajectories/{trajectory}"),
        ("POST", "/ui/login"),
    ],
)
def test_a_streamed_body_past_the_limit_is_refused(
    http: httpx.Client, seeded: dict[str, str], method: str, path: str
) -> None:
    # No Content-Length (chunked): refused once the bytes read pass the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(20 * 1024):
            yield b" " * 1024

    limit = 8 * 1024 * 1024 if path == "/v1/jobs" else CONTROL_LIMIT
    assert limit < 20 * 1024 * 1024
    response = http.request(method, path.format(**seeded), content=chunks())
    error = _error(response, 413, "payload_too_large")
    assert str(limit) in error["message"]


def test_uploads_have_their_own_larger_limit(http: httpx.Client, seeded: dict[str, str]) -> None:
    before = _count(http)
    big = make_trajectory(2, salt="big")
    big["messages"][1]["content"] = "x" * (UPLOAD_LIMIT // 2)
    assert len(json.dumps(big)) > CONTROL_LIMIT
    assert http.post("/v1/trajectories", content=json.dumps(big)).status_code == 201
    big["messages"][1]["content"] = "y" * (UPLOAD_LIMIT + 10)
    _error(http.post("/v1/trajectories", content=json.dumps(big)), 413, "payload_too_large")
    assert _count(http) == before + 1


def test_no_key_is_needed_to_be_refused(served: Served, seeded: dict[str, str]) -> None:
    response = httpx.post(
        f"{served.url}/v1/jobs/{seeded['job']}/cancel", content=b"x" * (CONTROL_LIMIT + 1)
    )
    _error(response, 413, "payload_too_large")


# ---------------------------------------------------------------------- 8. strict types


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"', "0"])
def test_booleans_are_strict(http: httpx.Client, seeded: dict[str, str], value: str) -> None:
    response = http.patch(
        f"/v1/trajectories/{seeded['trajectory']}",
        content=f'{{"resolved": {value}}}',
        headers={"Content-Type": "application/json"},
    )
    error = _error(response, 422, "validation_error")
    assert error["location"] == "body.resolved"
    assert http.get(f"/v1/trajectories/{seeded['trajectory']}").json()["resolved"] is False


def test_strings_are_bounded(http: httpx.Client, seeded: dict[str, str]) -> None:
    response = http.post(
        "/v1/jobs",
        json={
            "selection": {"trajectory_ids": [seeded["trajectory"]]},
            "critic": {"model": "m" * 50_000},
        },
    )
    error = _error(response, 422, "validation_error")
    assert error["location"] == "body.critic.model"


def test_unknown_fields_are_refused_with_their_location(
    http: httpx.Client, seeded: dict[str, str]
) -> None:
    before = _count(http)
    item = make_trajectory(2, salt="typo")
    item["resovled"] = True
    response = http.post("/v1/trajectories", content=json.dumps([item]))
    error = _error(response, 422, "invalid_trajectory")
    assert error["location"] == "[0].resovled"
    response = http.post(
        "/v1/jobs",
        json={"selection": {"trajectory_ids": [seeded["trajectory"]]}, "critic": {"vote": 3}},
    )
    assert _error(response, 422, "validation_error")["location"] == "body.critic.vote"
    assert _count(http) == before


def test_nul_never_reaches_the_database(http: httpx.Client, seeded: dict[str, str]) -> None:
    step = f"/v1/trajectories/{seeded['trajectory']}/steps/0/human_label"
    response = http.put(step, json={"label": "good", "note": "a\u0000b"})
    assert _error(response, 422, "validation_error")["location"] == "body.note"
    response = http.post(
        "/v1/jobs",
        json={"selection": {"task_id": "x\u0000y"}, "critic": {"model": "m"}},
    )
    assert _error(response, 422, "validation_error")["location"] == "body.selection.task_id"
    response = http.get("/v1/trajectories", params={"task_id": "a\u0000b"})
    assert _error(response, 422, "validation_error")["location"] == "query.task_id"
    assert http.get(f"/v1/trajectories/{seeded['trajectory']}").status_code == 200


def test_nesting_beyond_what_can_be_served_back_is_refused(http: httpx.Client) -> None:
    before = _count(http)
    item = make_trajectory(2, salt="deep")
    nested: Any = 1
    for _ in range(200):
        nested = {"a": nested}
    item["metadata"] = {"x": nested}
    error = _error(
        http.post("/v1/trajectories", content=json.dumps(item)), 422, "invalid_trajectory"
    )
    assert error["location"].startswith("metadata.x.a.a")
    assert _count(http) == before
    # Just inside the bound, the run is stored and reads back.
    nested = 1
    for _ in range(60):
        nested = {"a": nested}
    item["metadata"] = {"x": nested}
    created = http.post("/v1/trajectories", content=json.dumps(item))
    assert created.status_code == 201, created.text
    run_id = created.json()["trajectories"][0]["id"]
    assert http.get(f"/v1/trajectories/{run_id}").status_code == 200


def test_ids_in_paths_and_bodies_are_validated(http: httpx.Client, seeded: dict[str, str]) -> None:
    huge = "9" * 40
    response = http.put(
        f"/v1/trajectories/{seeded['trajectory']}/steps/{huge}/human_label", json={"label": "good"}
    )
    assert response.status_code in (404, 422), response.text
    response = http.get(f"/v1/jobs/{uuid.uuid4()}/verdicts", params={"limit": huge})
    assert _error(response, 422, "validation_error")["location"] == "query.limit"


def test_errors_keep_the_connection(served: Served, seeded: dict[str, str]) -> None:
    # Three bad requests, then a good one, on one kept-alive connection.
    with httpx.Client(base_url=served.url, headers=AUTH) as client:
        for _ in range(3):
            response = client.get("/v1/trajectories", params={"cursor": "bad"})
            assert response.status_code == 422
        assert client.get(f"/v1/trajectories/{seeded['trajectory']}").status_code == 200
