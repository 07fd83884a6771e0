"""`srft ingest` against a running service (`srft serve`): Hub shards, JSON Lines in batches,
resuming, and rows the server refuses, each reported with its file and row."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from app.cli import ingest as ingest_command
from app.cli.ingest import Row, Sender, batch_rows, read_rows
from tests.builders import make_trajectory
from tests.helpers import trajectory_file
from tests.hub_datasets import NEBIUS, SWE_GYM, SWE_SMITH, hub_table, json_rows, write_shards
from tests.test_embedded import SRFT, Served, _env

BOOTSTRAP_KEY = "srft_" + "k" * 40
UPLOAD_LIMIT = 2 * 1024 * 1024
SUMMARY = re.compile(
    r"(?P<files>\d+) files: (?P<created>\d+) trajectories created, (?P<duplicates>\d+) "
    r"duplicates, (?P<failed>\d+) rows failed, (?P<skipped>\d+) rows skipped"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(
        tmp_path_factory.mktemp("ingest"),
        SRFT_BOOTSTRAP_API_KEY=BOOTSTRAP_KEY,
        SRFT_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
    )
    server.start()
    yield server
    server.stop()


def _new_key(served: Served) -> str:
    """A key of a new project, so that each test counts only its own runs."""
    made = subprocess.run(
        [*SRFT, "keys", "create", "cli", "--project", f"p-{uuid.uuid4().hex[:8]}"],
        cwd=served.workdir,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


def _ingest(
    served: Served, key: str, state: Path, *args: object
) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    done = subprocess.run(
        [*SRFT, "ingest", *map(str, args), "--state", str(state)],
        env=_env(SRFT_URL=served.url, SRFT_API_KEY=key),
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = SUMMARY.search(done.stdout)
    assert found, done.stdout + done.stderr
    return done, {name: int(value) for name, value in found.groupdict().items()}


def _post(served: Served, key: str, body: bytes, content_type: str) -> dict[str, Any]:
    response = httpx.post(
        f"{served.url}/v1/trajectories",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": content_type},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def _stored(served: Served, key: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, str] = {"limit": "100"}
    while True:
        page = httpx.get(
            f"{served.url}/v1/trajectories",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ).json()
        items.extend(page["items"])
        if not page["next_cursor"]:
            return items
        params["cursor"] = page["next_cursor"]


def _runs(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What must agree between two ways of ingesting the same rows."""
    return sorted(
        (t["source_format"], t["task_id"] or "", str(t["resolved"]), t["num_steps"]) for t in items
    )


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_folder_of_hub_shards_stores_the_runs_of_the_json_forms(
    served: Served, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    datasets = {"nebius": NEBIUS, "swe-smith": SWE_SMITH, "swe-gym": SWE_GYM}
    for name, relative in datasets.items():
        write_shards(hub_table(relative), hub / name, shards=2)
    # What `huggingface-cli download --local-dir` leaves beside the shards is not ingested.
    cache = hub / "nebius" / ".cache" / "huggingface"
    cache.mkdir(parents=True)
    (cache / "train-00000-of-00002.parquet.json").write_text("{not json")
    (hub / "nebius" / "README.md").write_text("# card")
    parquet_key, json_key = _new_key(served), _new_key(served)

    done, counts = _ingest(served, parquet_key, tmp_path / "state", hub, "--concurrency", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts == {"files": 6, "created": 11, "duplicates": 0, "failed": 0, "skipped": 0}

    for relative in datasets.values():
        body = trajectory_file(relative).read_bytes()
        # Every run of the JSON form is one the shards stored: same messages and tools.
        again = _post(served, parquet_key, body, "application/json")
        assert (again["created"], again["duplicates"]) == (0, len(json_rows(relative)))
        _post(served, json_key, body, "application/json")
    # And the same steps, resolutions and task ids as the JSON forms give.
    assert _runs(_stored(served, parquet_key)) == _runs(_stored(served, json_key))


def test_jsonl_in_many_batches_stores_what_one_request_does(served: Served, tmp_path: Path) -> None:
    rows = json_rows(SWE_SMITH) + json_rows(SWE_GYM)
    rows += [make_trajectory(3, salt=str(i), resolved=i % 2 == 0) for i in range(10)]
    runs = _jsonl(tmp_path / "runs.jsonl", rows)
    batched_key, whole_key = _new_key(served), _new_key(served)

    done, counts = _ingest(served, batched_key, tmp_path / "state", runs, "--batch-bytes", 150_000)
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts["created"] == len(rows)
    whole = _post(served, whole_key, runs.read_bytes(), "application/x-ndjson")
    assert whole["created"] == len(rows)

    batched, single = _stored(served, batched_key), _stored(served, whole_key)
    assert _runs(batched) == _runs(single)
    # One upload per request: the small byte budget made several.
    assert len({t["upload_id"] for t in batched}) > 2
    assert len({t["upload_id"] for t in single}) == 1


def test_an_interrupted_ingest_sends_only_the_rest_when_run_again(
    served: Served, tmp_path: Path
) -> None:
    key = _new_key(served)
    state = tmp_path / "state"
    runs = _jsonl(tmp_path / "runs.jsonl", [make_trajectory(2, salt=f"r{i}") for i in range(12)])
    shards = write_shards(hub_table(NEBIUS), tmp_path / "nebius", shards=1, row_group_size=1)
    small = ("--batch-rows", 2, "--concurrency", 1)

    first, counts = _ingest(served, key, state, runs, *small, "--stop-after-batches", 2)
    assert first.returncode == 130
    assert "interrupted" in first.stderr
    assert (counts["created"], counts["skipped"]) == (4, 0)

    # Run again: the four stored rows are skipped without being sent (nothing comes back as a
    # duplicate), the eight others are sent.
    second, counts = _ingest(served, key, state, runs, *small)
    assert second.returncode == 0, second.stdout + second.stderr
    assert counts == {"files": 1, "created": 8, "duplicates": 0, "failed": 0, "skipped": 4}
    _, counts = _ingest(served, key, state, runs)
    assert (counts["created"], counts["duplicates"], counts["skipped"]) == (0, 0, 12)
    assert len(_stored(served, key)) == 12

    # Parquet resumes by row too (whole row groups are skipped unread).
    first, counts = _ingest(
        served,
        key,
        state,
        shards[0],
        "--batch-rows",
        1,
        "--concurrency",
        1,
        "--stop-after-batches",
        1,
    )
    assert (first.returncode, counts["created"]) == (130, 1)
    second, counts = _ingest(served, key, state, shards[0])
    assert (counts["created"], counts["duplicates"], counts["skipped"]) == (2, 0, 1)

    # --restart sends everything again; the server counts duplicates.
    _, counts = _ingest(served, key, state, runs, "--restart")
    assert (counts["created"], counts["duplicates"], counts["skipped"]) == (0, 12, 0)


def test_an_oversize_row_is_reported_with_its_row_and_the_rest_lands(
    served: Served, tmp_path: Path
) -> None:
    key = _new_key(served)
    rows = [make_trajectory(2, salt=f"s{i}") for i in range(5)]
    rows[2]["messages"][1]["content"] = "x" * (UPLOAD_LIMIT + 1)
    runs = _jsonl(tmp_path / "big.jsonl", rows)

    done, counts = _ingest(served, key, tmp_path / "state", runs, "--batch-bytes", 1_000_000)
    assert done.returncode == 1
    assert (counts["created"], counts["failed"]) == (4, 1)
    assert f"{runs}:3: HTTP 413 payload_too_large" in done.stdout
    assert len(_stored(served, key)) == 4


def test_bad_rows_are_reported_with_file_row_and_field_and_the_others_are_stored(
    served: Served, tmp_path: Path
) -> None:
    key = _new_key(served)
    good = [json.dumps(make_trajectory(2, salt=f"b{i}")) for i in range(6)]
    wrong_role = make_trajectory(2, salt="bad")
    wrong_role["messages"][2]["role"] = "robot"
    lines = [good[0], '{"messages": [', good[1], json.dumps(wrong_role), *good[2:]]
    runs = tmp_path / "mixed.jsonl"
    runs.write_text("\n".join(lines) + "\n")
    rows = json_rows(NEBIUS)
    rows[1]["trajectory"][3]["role"] = "robot"
    write_shards(
        pa.Table.from_pylist(rows, schema=hub_table(NEBIUS).schema), tmp_path / "neb", shards=1
    )
    shard = tmp_path / "neb" / "data" / "train-00000-of-00001.parquet"

    done, counts = _ingest(served, key, tmp_path / "state", runs, shard)
    assert done.returncode == 1
    assert (counts["created"], counts["failed"]) == (6 + 2, 3)
    assert f"{runs}:2: HTTP 400 invalid_jsonl" in done.stdout
    assert f"{runs}:4: HTTP 422 invalid_trajectory at messages[2].role" in done.stdout
    assert f"{shard}:2: HTTP 422 invalid_trajectory at trajectory[3].role" in done.stdout

    # Refused rows are remembered: a re-run sends nothing and still reports them.
    again, counts = _ingest(served, key, tmp_path / "state", runs, shard)
    assert again.returncode == 1
    assert (counts["created"], counts["duplicates"], counts["failed"]) == (0, 0, 3)
    assert f"{runs}:4:" in again.stdout


def test_batches_are_read_lazily_from_an_endless_stream() -> None:
    produced = 0

    def endless() -> Iterator[Row]:
        nonlocal produced
        for number in itertools.count(1):
            produced += 1
            yield Row(number, b"x" * 10, end=number)

    batches = batch_rows(endless(), max_rows=1000, max_bytes=55)
    assert [len(next(batches)) for _ in range(3)] == [5, 5, 5]
    assert produced == 16  # the rows of three batches and the one that closed the third


def test_a_row_larger_than_the_budget_is_a_batch_of_its_own() -> None:
    rows = [Row(1, b"a", end=1), Row(2, b"b" * 100, end=2), Row(3, b"c", end=3)]
    assert [[r.number for r in b] for b in batch_rows(rows, max_rows=10, max_bytes=50)] == [
        [1],
        [2],
        [3],
    ]


def test_json_lines_are_read_one_at_a_time_and_resume_at_a_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\r\n{"a": 3}')
    rows = read_rows(path)
    assert inspect.isgenerator(rows)
    read = list(rows)
    assert [(r.number, r.data) for r in read] == [
        (1, b'{"a": 1}'),
        (3, b'{"a": 2}'),
        (4, b'{"a": 3}'),
    ]
    resumed = read_rows(path, position=read[1].end, offset=read[1].offset)
    assert [(r.number, r.data) for r in resumed] == [(4, b'{"a": 3}')]


def _sender(statuses: list[int], seen: list[bytes]) -> Sender:
    answers = iter(statuses)

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        status = next(answers)
        if status == 201:
            return httpx.Response(201, json={"created": 2, "duplicates": 0, "trajectories": []})
        error = {"code": "x", "message": "no", "location": None}
        return httpx.Response(status, json={"error": error}, headers={"Retry-After": "1"})

    client = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://srft")
    return Sender(client, {"format": "auto"}, "runs.jsonl")


def test_transient_errors_are_retried_then_left_unanswered(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(ingest_command.time, "sleep", waits.append)
    rows = [Row(1, b"{}", end=1), Row(2, b"{}", end=2)]
    seen: list[bytes] = []
    result = _sender([503, 429, 201], seen).send(rows)
    assert (result.created, result.unanswered, result.failures) == (2, 0, [])
    assert seen == [b"{}\n{}\n"] * 3
    assert waits == [1.0, 1.0]  # Retry-After, when longer than the backoff

    seen.clear()
    result = _sender([502] * ingest_command.MAX_ATTEMPTS, seen).send(rows)
    assert (result.created, result.unanswered) == (0, 2)
    assert len(seen) == ingest_command.MAX_ATTEMPTS


def test_a_refused_key_stops_everything() -> None:
    seen: list[bytes] = []
    result = _sender([401], seen).send([Row(1, b"{}", end=1), Row(2, b"{}", end=2)])
    assert result.fatal is not None
    assert "HTTP 401" in result.fatal
    assert len(seen) == 1  # not split row by row
