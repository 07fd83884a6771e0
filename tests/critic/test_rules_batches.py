"""The rules critic's Files and Batches API, through srft's own batch client (the official
SDK): multipart upload, answers equal to the chat endpoint's, limits, faults, cancel, list."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.critic.batch import BatchClient, RemoteBatch
from app.critic.client import EndpointOptions, request_body
from app.critic.labels import DEFAULT_LABELS
from app.critic.parse import parse_step_answer, parse_trajectory_answer
from app.critic.rules_batches import BatchLimits
from app.critic.rules_server import create_rules_app
from app.status import BatchStatus
from tests.critic.test_rules_server import expected_labels, one_step, serving, whole_request


def _body(request: Any) -> dict[str, Any]:
    return request_body(
        model="rules",
        messages=request.messages,
        temperature=0.0,
        max_tokens=4096,
        response_format=request.response_format,
        options=EndpointOptions(),
    )


def _input(tmp_path: Path, lines: list[dict[str, Any]], name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _lines(steps: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"step-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _body(one_step(index)),
        }
        for index in steps
    ]


class Critic:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = BatchClient(f"{url}/v1", None, timeout_s=10)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/admin/stats").json()
        return stats

    def plan(self, plan: dict[str, Any]) -> None:
        httpx.post(f"{self.url}/admin/faults", json=plan).raise_for_status()

    def run(self, tmp_path: Path, lines: list[dict[str, Any]], row: str = "row") -> RemoteBatch:
        file_id = self.client.upload(_input(tmp_path, lines), "input.jsonl")
        return self.client.create(file_id, row)

    def read(self, file_id: str | None, tmp_path: Path) -> list[dict[str, Any]]:
        assert file_id is not None
        path = tmp_path / f"{file_id}.jsonl"
        self.client.download(file_id, path)
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def critic() -> Iterator[Critic]:
    app = create_rules_app(batch_limits=BatchLimits(max_requests=6, max_bytes=2_000_000))
    with serving(app) as url:
        yield Critic(url)


def test_a_batch_answers_each_line_as_the_chat_endpoint_does(
    critic: Critic, tmp_path: Path
) -> None:
    expected = expected_labels()
    steps = sorted(expected)[:3]
    lines = [
        *_lines(steps),
        {
            "custom_id": "whole",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _body(whole_request()),
        },
    ]
    created = critic.run(tmp_path, lines, row="row-1")
    assert created.status == BatchStatus.IN_PROGRESS
    assert created.metadata == {"srft_batch": "row-1"}
    done = critic.client.retrieve(created.id)
    assert done.status == BatchStatus.COMPLETED
    assert (done.total, done.completed, done.failed) == (4, 4, 0)
    assert done.error_file_id is None
    output = {line["custom_id"]: line for line in critic.read(done.output_file_id, tmp_path)}
    assert set(output) == {*(f"step-{i}" for i in steps), "whole"}
    for index in steps:
        response = output[f"step-{index}"]["response"]
        assert response["status_code"] == 200
        text = response["body"]["choices"][0]["message"]["content"]
        assert parse_step_answer(text, index, DEFAULT_LABELS).label == expected[index]
        assert response["body"]["usage"]["prompt_tokens"] > 0
    whole = output["whole"]["response"]["body"]["choices"][0]["message"]["content"]
    judged = parse_trajectory_answer(whole, sorted(expected), DEFAULT_LABELS)
    assert {i: j.label for i, j in judged.items()} == expected
    # The same body through the chat endpoint gets the same answer.
    direct = httpx.post(f"{critic.url}/v1/chat/completions", json=lines[0]["body"]).json()
    assert (
        direct["choices"][0]["message"]["content"]
        == (output["step-" + str(steps[0])]["response"]["body"]["choices"][0]["message"]["content"])
    )
    counts = critic.stats()["batches"]
    assert counts == {
        "files_uploaded": 1,
        "batches_created": 1,
        "batches_cancelled": 0,
        "batch_lines_answered": 4,
    }


def test_the_upload_is_multipart_and_a_bad_form_is_refused(critic: Critic) -> None:
    content = b'{"a": 1}\n{"b": 2}\n'
    uploaded = httpx.post(
        f"{critic.url}/v1/files",
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert uploaded.status_code == 200, uploaded.text
    stored = uploaded.json()
    assert (stored["object"], stored["bytes"], stored["filename"]) == (
        "file",
        len(content),
        "in.jsonl",
    )
    back = httpx.get(f"{critic.url}/v1/files/{stored['id']}/content")
    assert back.content == content
    not_form = httpx.post(f"{critic.url}/v1/files", json={"purpose": "batch"})
    assert not_form.status_code == 400
    assert "multipart" in not_form.json()["error"]["message"]
    no_file = httpx.post(f"{critic.url}/v1/files", files={"purpose": (None, b"batch")})
    assert no_file.status_code == 400
    missing = httpx.get(f"{critic.url}/v1/files/file-nope")
    assert missing.status_code == 404


def test_over_the_limits_or_malformed_the_batch_fails_validation(
    critic: Critic, tmp_path: Path
) -> None:
    too_many = critic.run(tmp_path, _lines(list(range(7))))
    assert too_many.status == BatchStatus.FAILED
    assert too_many.errors is not None
    assert "over 6 requests" in too_many.errors
    bad = _lines([0, 1])
    bad[1]["url"] = "/v1/embeddings"
    wrong = critic.run(tmp_path, bad)
    assert wrong.status == BatchStatus.FAILED
    assert wrong.errors is not None
    assert wrong.errors.startswith("line 2:")
    duplicate = _lines([0, 0])
    assert critic.run(tmp_path, duplicate).status == BatchStatus.FAILED
    assert critic.stats()["batches"]["batch_lines_answered"] == 0


def test_batch_faults(critic: Critic, tmp_path: Path) -> None:
    steps = sorted(expected_labels())[:4]
    critic.plan({"batch_faults": [{"kind": "validation_failed", "count": 1}]})
    failed = critic.run(tmp_path, _lines(steps))
    assert failed.status == BatchStatus.FAILED
    assert failed.errors

    critic.plan({"batch_faults": [{"kind": "partial_failure", "line_every": 2}]})
    partial = critic.client.retrieve(critic.run(tmp_path, _lines(steps)).id)
    assert (partial.status, partial.completed, partial.failed) == (BatchStatus.COMPLETED, 2, 2)
    errors = critic.read(partial.error_file_id, tmp_path)
    assert sorted(line["custom_id"] for line in errors) == [f"step-{steps[0]}", f"step-{steps[2]}"]
    assert {line["response"]["status_code"] for line in errors} == {500}

    critic.plan({"batch_faults": [{"kind": "expired", "line_every": 2}]})
    expired = critic.client.retrieve(critic.run(tmp_path, _lines(steps)).id)
    assert (expired.status, expired.completed, expired.failed) == (BatchStatus.EXPIRED, 2, 2)
    unanswered = critic.read(expired.error_file_id, tmp_path)
    assert {line["error"]["code"] for line in unanswered} == {"batch_expired"}
    assert [line["response"] for line in unanswered] == [None, None]

    critic.plan({"batch_faults": [{"kind": "stuck", "polls": 2}]})
    stuck = critic.run(tmp_path, _lines(steps))
    states = [critic.client.retrieve(stuck.id).status for _ in range(3)]
    assert states == [BatchStatus.IN_PROGRESS, BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED]

    critic.plan({"batch_faults": [{"kind": "stuck"}]})
    held = critic.run(tmp_path, _lines(steps))
    assert critic.client.retrieve(held.id).status == BatchStatus.IN_PROGRESS
    assert critic.client.retrieve(held.id).status == BatchStatus.IN_PROGRESS
    critic.plan({})  # the rule is gone: the batch runs
    assert critic.client.retrieve(held.id).status == BatchStatus.COMPLETED
    faults = critic.stats()["faults"]
    assert (faults["validation_failed"], faults["partial_failure"], faults["expired"]) == (1, 1, 1)
    assert faults["stuck"] == 2


def test_cancel_list_and_find(critic: Critic, tmp_path: Path) -> None:
    critic.plan({"batch_delay_s": 60})
    first = critic.run(tmp_path, _lines([0]), row="row-a")
    second = critic.run(tmp_path, _lines([1]), row="row-b")
    assert critic.client.retrieve(first.id).status == BatchStatus.IN_PROGRESS
    cancelled = critic.client.cancel(first.id)
    assert cancelled.status == BatchStatus.CANCELLED
    with pytest.raises(openai.ConflictError):
        critic.client.cancel(first.id)
    assert critic.stats()["batches"]["batches_cancelled"] == 1
    listed = httpx.get(f"{critic.url}/v1/batches", params={"limit": 1}).json()
    assert [b["id"] for b in listed["data"]] == [second.id]
    assert listed["has_more"]
    rest = httpx.get(f"{critic.url}/v1/batches", params={"after": second.id}).json()
    assert [b["id"] for b in rest["data"]] == [first.id]
    assert not rest["has_more"]
    found = critic.client.find("row-a", created_after=_utc(first.created_at))
    assert found is not None
    assert found.id == first.id
    assert critic.client.find("row-z", created_after=_utc(first.created_at)) is None


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
