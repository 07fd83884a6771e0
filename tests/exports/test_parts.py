"""Exports built in parts by many workers (app/exports/parts.py): the plan, the byte-identity
with a one-task build (in-process, and on two real `srft worker` processes), a part whose
worker is killed mid-part, and a part that fails the export for a data reason."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.exports import service as export_service
from app.exports.builder import (
    build_export,
    build_part,
    building_root,
    finish_export,
)
from app.exports.parts import MAX_LISTED_OUTLIERS, PartResult, RowCounts, add_up, plan_parts
from app.exports.schemas import ExportCreate
from app.models import ExportPart, Job
from app.recipe.masking import PolicyCounts
from app.recipe.render import SpanStats
from tests.e2e import RulesCritic, Workers, worker_env
from tests.exports.conftest import Corpus
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
SLOW_WORKER = [sys.executable, "-m", "tests.exports.slow_parts"]
PART = 3  # trajectories per part in the parallel builds


# ---------------------------------------------------------------------- the plan (pure)


def _ids(n: int) -> list[uuid.UUID]:
    return sorted(uuid.uuid4() for _ in range(n))


@pytest.mark.parametrize(("n", "size"), [(1, 3), (3, 3), (7, 3), (9, 1), (10, 4), (5, 100)])
def test_parts_are_consecutive_runs_of_the_part_size_numbered_from_zero(n: int, size: int) -> None:
    ids = _ids(n)
    spans = list(plan_parts(iter(ids), size))
    assert [s.index for s in spans] == list(range(len(spans)))
    assert len(spans) == -(-n // size)
    position = 0
    for span in spans:
        assert span.start == position
        assert span.count == (size if span is not spans[-1] else n - size * (len(spans) - 1))
        assert (span.first_id, span.last_id) == (ids[position], ids[position + span.count - 1])
        position += span.count
    assert position == n


def test_no_ids_make_no_part_and_a_part_holds_at_least_one() -> None:
    assert list(plan_parts(iter([]), 3)) == []
    with pytest.raises(ValueError, match="at least one"):
        list(plan_parts(iter(_ids(2)), 0))


def test_the_parts_counts_add_up_to_what_one_pass_counts() -> None:
    one = RowCounts()
    first, second = RowCounts(), RowCounts()
    for n in range(MAX_LISTED_OUTLIERS + 5):
        reason = "prefix_too_long" if n % 2 else "too_long"
        for counts in (one, first if n < MAX_LISTED_OUTLIERS - 3 else second):
            counts.drop(reason)
            counts.written += 1
            if reason == "prefix_too_long":
                counts.outliers.setdefault(reason, []).append(f"t{n}")
    # What one pass lists is capped; the parts' lists are capped together at the same place.
    one.outliers["prefix_too_long"] = one.outliers["prefix_too_long"][:MAX_LISTED_OUTLIERS]
    first.add(second)
    assert first == one

    def result(index: int, rows: RowCounts, tokenizer: dict[str, Any] | None) -> PartResult:
        policy = PolicyCounts(trajectories_kept=index + 1, trained_by_label={"good": 2})
        return PartResult(
            str(uuid.uuid4()), index, 3, policy, rows, SpanStats(empty_turns=1), None, tokenizer, []
        )

    totals = add_up(
        [
            result(0, RowCounts(written=2), {"name": "t"}),
            result(1, RowCounts(written=5), {"name": "t"}),
        ]
    )
    assert (totals.trajectories, totals.rows.written, totals.stats.empty_turns) == (6, 7, 2)
    assert totals.policy.trajectories_kept == 3
    assert totals.policy.trained_by_label == {"good": 4}
    with pytest.raises(ValueError, match="another tokenizer"):
        add_up([result(0, RowCounts(), {"name": "t"}), result(1, RowCounts(), {"name": "u"})])


def test_a_part_reads_its_range_by_keyset_pages_that_add_up_to_the_whole_selection(
    corpus: Corpus,
) -> None:
    """The planner and the parts read ids a page at a time; the pages, in order, are exactly
    the export's trajectories, with or without an explicit selection."""
    some = sorted(corpus.trajectories)[1::2]
    with corpus.api.database.transaction() as session:
        job = session.get(Job, uuid.UUID(corpus.job_id))
        assert job is not None
        for selection in (None, {"trajectory_ids": some}, {"resolved": False}):
            whole = export_service.trajectory_ids(
                session, job.project_id, [corpus.job_id], selection
            )
            assert len(whole) > 4
            pages: list[uuid.UUID] = []
            after = None
            while page := export_service.trajectory_ids(
                session, job.project_id, [corpus.job_id], selection, after=after, limit=2
            ):
                assert len(page) <= 2
                pages += page
                after = page[-1]
            assert pages == whole
            ranged = export_service.trajectory_ids(
                session, job.project_id, [corpus.job_id], selection, first=whole[1], last=whole[3]
            )
            assert ranged == whole[1:4]


# ---------------------------------------------------------------------- byte-identical builds


def _written(corpus: Corpus, body: dict[str, Any]) -> uuid.UUID:
    """An export written but not queued: only this test builds it."""
    with corpus.api.database.transaction() as session:
        job = session.get(Job, uuid.UUID(corpus.job_id))
        assert job is not None
        request = ExportCreate.model_validate(body)
        return export_service.create_export(
            session, job.project_id, request, corpus.api.settings
        ).id


def _files(corpus: Corpus, export_id: uuid.UUID | str) -> dict[str, bytes]:
    root = corpus.path({"id": str(export_id)})
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_task(corpus: Corpus, body: dict[str, Any]) -> dict[str, bytes]:
    """The export built by one task, as before parts: one part covers it all."""
    export_id = _written(corpus, body)
    settings = corpus.api.settings.model_copy(update={"export_part_trajectories": 10**6})
    assert build_export(corpus.api.database, settings, export_id) == "completed"
    with corpus.api.database.transaction() as session:
        assert len(export_service.parts_of(session, export_id)) == 1
    files = _files(corpus, export_id)
    assert sum(1 for name in files if name.startswith("data/")) > 1  # shards cross parts
    return files


def _parts(corpus: Corpus, export_id: uuid.UUID) -> list[ExportPart]:
    with corpus.api.database.transaction() as session:
        parts = export_service.parts_of(session, export_id)
        for part in parts:
            session.expunge(part)
        return parts


def _bodies(corpus: Corpus, tokenizers: dict[str, Path]) -> dict[str, dict[str, Any]]:
    job = [corpus.job_id]
    return {
        "openai_jsonl": {
            "job_ids": job,
            "format": "openai_jsonl",
            "shard_max_rows": 4,
        },
        "openai_jsonl_seeded": {
            "job_ids": job,
            "format": "openai_jsonl",
            "shard_max_bytes": 200_000,
            "seed": 11,
        },
        "tokenized_parquet": {
            "job_ids": job,
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["chatml"]),
            "max_seq_len": 4096,
            "overflow": "split",
            "shard_max_rows": 5,
        },
    }


@pytest.mark.parametrize("kind", ["openai_jsonl", "openai_jsonl_seeded", "tokenized_parquet"])
def test_parts_built_in_any_order_give_the_bytes_of_a_one_task_build(
    corpus: Corpus, tokenizers: dict[str, Path], kind: str
) -> None:
    body = _bodies(corpus, tokenizers)[kind]
    expected = _one_task(corpus, body)
    database = corpus.api.database
    settings = corpus.api.settings.model_copy(update={"export_part_trajectories": PART})
    export_id = _written(corpus, body)
    assert build_export(database, settings, export_id) == "running"
    parts = _parts(corpus, export_id)
    assert len(parts) == -(-len(corpus.trajectories) // PART)
    assert finish_export(database, settings, export_id) is None  # parts still open
    for part in reversed(parts):
        assert build_part(database, settings, part.id) == "completed"
    state = corpus.api.get(f"/v1/exports/{export_id}").json()
    assert state["status"] == "running"
    assert state["progress"]["trajectories_done"] == state["progress"]["trajectories_total"]
    assert finish_export(database, settings, export_id) == "completed"
    assert _files(corpus, export_id) == expected
    assert not (building_root(settings) / str(export_id)).exists()


def test_a_part_whose_files_are_lost_is_built_again_before_the_export_is_published(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    body = _bodies(corpus, tokenizers)["openai_jsonl"]
    database = corpus.api.database
    settings = corpus.api.settings.model_copy(update={"export_part_trajectories": PART})
    export_id = _written(corpus, body)
    build_export(database, settings, export_id)
    for part in _parts(corpus, export_id):
        build_part(database, settings, part.id)
    damaged = _parts(corpus, export_id)[1]
    folder = building_root(settings) / str(export_id) / "parts" / str(damaged.output)
    (folder / "rows.jsonl").write_bytes(b"{}\n")
    assert finish_export(database, settings, export_id) is None
    again = _parts(corpus, export_id)[1]
    assert (again.status, again.output) == ("pending", None)
    assert build_part(database, settings, damaged.id) == "completed"
    assert finish_export(database, settings, export_id) == "completed"
    assert _files(corpus, export_id) == _one_task(corpus, body)


def test_a_part_that_fails_for_a_data_reason_fails_the_export_with_that_reason(
    corpus: Corpus, tokenizers: dict[str, Path]
) -> None:
    body = {
        "job_ids": [corpus.job_id],
        "format": "tokenized_parquet",
        "policy": "sft",
        "tokenizer": str(tokenizers["chatml"]),
        "max_seq_len": 16,
        "strict": True,
    }
    database = corpus.api.database
    settings = corpus.api.settings.model_copy(update={"export_part_trajectories": PART})
    export_id = _written(corpus, body)
    build_export(database, settings, export_id)
    first, second = _parts(corpus, export_id)[:2]
    assert build_part(database, settings, second.id) == "failed"
    state = corpus.api.get(f"/v1/exports/{export_id}").json()
    assert state["status"] == "failed"
    assert state["error"]["code"] == "prefix_too_long"
    assert "max_seq_len 16" in state["error"]["message"]
    # The other parts are closed: none builds, and nothing is left on disk.
    assert {p.status for p in _parts(corpus, export_id) if p.id != second.id} == {"failed"}
    assert build_part(database, settings, first.id) is None
    assert finish_export(database, settings, export_id) is None
    assert not list(building_root(settings).glob(f"{export_id}*"))
    assert not corpus.path(state).exists()


# ---------------------------------------------------------------------- real workers


@pytest.fixture
def part_workers(
    e2e_database_url: str,
    e2e_redis: RedisServer,
    rules_critic: RulesCritic,
    export_dir: Path,
    tokenizer_root: Path,
    tmp_path: Path,
) -> Iterator[Workers]:
    """Worker processes (started by the test) that build exports in parts of PART."""
    env = worker_env(e2e_database_url, e2e_redis.url, rules_critic, export_dir, str(tokenizer_root))
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env |= {
        "SRFT_EXPORT_PART_TRAJECTORIES": str(PART),
        "SRFT_EXPORT_PROCESSES": "1",
        "PYTHONPATH": path,  # the slow worker runs a module of the tests
    }
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


def _wait(corpus: Corpus, export_id: str, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] = corpus.api.get(f"/v1/exports/{export_id}").json()
        if state["status"] in ("completed", "failed"):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(state)
        time.sleep(0.2)


def _post(corpus: Corpus, body: dict[str, Any]) -> str:
    response = corpus.api.post("/v1/exports", json=body)
    assert response.status_code == 202, response.text
    export_id: str = response.json()["id"]
    return export_id


def test_two_workers_build_the_parts_and_publish_the_bytes_of_a_one_task_build(
    corpus: Corpus, tokenizers: dict[str, Path], part_workers: Workers
) -> None:
    bodies = _bodies(corpus, tokenizers)
    expected = {
        kind: _one_task(corpus, bodies[kind]) for kind in ("openai_jsonl", "tokenized_parquet")
    }
    part_workers.start_worker()
    part_workers.start_worker()
    for kind, files in expected.items():
        export_id = _post(corpus, bodies[kind])
        state = _wait(corpus, export_id)
        assert state["status"] == "completed", state
        assert _files(corpus, export_id) == files, kind
        progress = state["progress"]
        assert progress["trajectories_done"] == progress["trajectories_total"]
        assert progress["trajectories_total"] == len(corpus.trajectories)
        parts = _parts(corpus, uuid.UUID(export_id))
        assert len(parts) == -(-len(corpus.trajectories) // PART)
        assert {p.status for p in parts} == {"done"}
    # Parts are tasks of their own: both worker processes built some.
    for log in sorted(part_workers.workdir.glob("worker-*.log")):
        assert " built (" in log.read_text(errors="replace"), log.name


def test_a_part_whose_worker_is_killed_is_built_again_and_the_export_is_the_same(
    corpus: Corpus, tokenizers: dict[str, Path], part_workers: Workers
) -> None:
    body = _bodies(corpus, tokenizers)["openai_jsonl"]
    expected = _one_task(corpus, body)
    part_workers.start_beat()
    slow = part_workers.start_worker(SLOW_WORKER)
    export_id = _post(corpus, body)

    def running() -> dict[uuid.UUID, str]:
        with corpus.api.database.transaction() as session:
            rows = session.execute(
                select(ExportPart.id, ExportPart.claim_token).where(
                    ExportPart.export_id == uuid.UUID(export_id),
                    ExportPart.status == "running",
                )
            ).all()
            return {row.id: str(row.claim_token) for row in rows}

    deadline = time.monotonic() + 60
    while not running():
        assert time.monotonic() < deadline, "the slow worker never started a part"
        time.sleep(0.1)
    part_workers.start_worker()
    before = running()
    part_workers.kill(slow)
    victims = {i: t for i, t in running().items() if before.get(i) == t}
    assert victims, "the slow worker was killed in the middle of a part"

    state = _wait(corpus, export_id)
    assert state["status"] == "completed", state
    assert _files(corpus, export_id) == expected
    parts = {p.id: p for p in _parts(corpus, uuid.UUID(export_id))}
    for part_id, dead_token in victims.items():
        assert parts[part_id].status == "done"
        assert dead_token not in str(parts[part_id].output)  # built by another claim
    assert "lost or stalled export parts" in part_workers.logs()
    # The dead worker's half-written part went with the building folder, which the final
    # task removes just after it records the export as completed.
    folder = building_root(corpus.api.settings) / export_id
    deadline = time.monotonic() + 30
    while folder.exists():
        assert time.monotonic() < deadline, "the building folder was left behind"
        time.sleep(0.1)
