"""Batch delivery end to end: API -> Redis -> `srft worker` processes -> the rules critic's
Files and Batches API through the official SDK -> Postgres. A batch job ends with exactly one
verdict per step and the online job's labels, through every batch fault, a worker killed while
its batch is in progress (never submitted twice, counted at the critic), and cancel."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update

from app.models import JobBatch, Verdict
from app.status import BatchStatus
from tests.e2e import Api, RulesCritic, Workers

# `corpus`: every shared real run, uploaded once for this module (the labeling e2e fixture).
from tests.jobs.test_labeling_e2e import _assert_one_verdict_per_step, _expected
from tests.jobs.test_labeling_e2e import corpus as corpus

pytestmark = pytest.mark.slow


def _batch_job(api: Api, ids: list[str], **critic: Any) -> dict[str, Any]:
    body = {
        "selection": {"trajectory_ids": ids},
        "critic": {"mode": "trajectory", "delivery": "batch", **critic},
        "cache": False,
    }
    return api.start_job(body)


def _deliveries(database_url: str, job_id: str) -> Counter[str | None]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                select(Verdict.delivery).where(Verdict.job_id == uuid.UUID(job_id))
            ).scalars()
            return Counter(found)
    finally:
        engine.dispose()


def _wait_until(check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def _live_batch(api: Api, job_id: str) -> list[dict[str, Any]]:
    job = api.get(f"/v1/jobs/{job_id}").json()
    return [b for b in job["batches"] if b["remote_id"] and b["status"] == "in_progress"]


@pytest.mark.parametrize(
    ("mode", "votes", "temperature"), [("trajectory", 3, 0.01), ("step", 1, 0.0)]
)
def test_a_batch_job_gets_the_online_jobs_labels(
    api: Api,
    corpus: list[str],
    rules_critic: RulesCritic,
    e2e_database_url: str,
    mode: str,
    votes: int,
    temperature: float,
) -> None:
    ids = corpus if mode == "trajectory" else corpus[:4]
    # Votes need a temperature; 0.01 flips a vote's label once in hundreds of steps at the
    # rules critic, and a majority of three almost never.
    critic = {"mode": mode, "votes": votes, "temperature": temperature}
    online = api.start_job({"selection": {"trajectory_ids": ids}, "critic": critic, "cache": False})
    online_done = api.wait(online["id"], timeout=240)
    before = rules_critic.stats()["batches"]
    batch = _batch_job(api, ids, **critic)
    finished = api.wait(batch["id"], timeout=240)
    assert finished["status"] == "completed", finished
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    labels = {(t, s): label for t, s, _, label in rows}
    online_labels = {
        (t, s): label
        for t, s, _, label in _assert_one_verdict_per_step(e2e_database_url, online_done)
    }
    assert labels == online_labels == _expected(api, ids)
    assert _deliveries(e2e_database_url, batch["id"]) == {"batch": len(rows)}
    # Votes were asked: each step's verdict shows all of them.
    verdicts = api.verdicts(batch["id"])
    assert {len(v["vote_labels"]) for v in verdicts} == {votes}
    assert {v["delivery"] for v in verdicts} == {"batch"}
    assert {v["delivery"] for v in api.verdicts(online["id"])} == {"online"}
    assert finished["usage"]["prompt_tokens"] > 0
    # The same requests, so the same tokens, as the online job's.
    assert finished["usage"]["prompt_tokens"] == online_done["usage"]["prompt_tokens"]
    after = rules_critic.stats()["batches"]
    shown = finished["batches"]
    assert after["batches_created"] - before["batches_created"] == len(shown) >= 1
    assert all(b["status"] == "completed" and b["round"] == 1 for b in shown)
    expected_lines = sum(b["request_counts"]["total"] for b in shown)
    assert after["batch_lines_answered"] - before["batch_lines_answered"] == expected_lines
    progress = finished["batch_progress"]
    assert progress["live"] == 0
    assert progress["requests"]["completed"] == progress["requests"]["total"] == expected_lines


BATCH_FAULTS = [
    {"kind": "validation_failed", "count": 1},
    {"kind": "partial_failure", "count": 1, "line_every": 2},
    {"kind": "expired", "count": 1, "line_every": 2},
    {"kind": "stuck", "count": 1, "polls": 5},
]


@pytest.mark.parametrize("fault", BATCH_FAULTS, ids=[f["kind"] for f in BATCH_FAULTS])
def test_batch_faults_still_give_exactly_one_verdict_per_step(
    api: Api,
    corpus: list[str],
    rules_critic: RulesCritic,
    e2e_database_url: str,
    fault: dict[str, Any],
) -> None:
    ids = corpus[:6]
    rules_critic.set_faults({"batch_faults": [fault]})
    try:
        job = _batch_job(api, ids, votes=3, temperature=0.01)
        finished = api.wait(job["id"], timeout=180)
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
    assert finished["status"] == "completed", finished
    assert rules_critic.stats()["faults"][fault["kind"]] > 0
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    assert {(t, s): label for t, s, _, label in rows} == _expected(api, ids)
    rounds = Counter(b["round"] for b in finished["batches"])
    if fault["kind"] == "stuck":
        assert rounds == {1: 1}
    else:
        # The failed or unanswered requests went to one follow-up batch.
        assert rounds == {1: 1, 2: 1}, finished["batches"]
    assert _deliveries(e2e_database_url, job["id"]) == {"batch": len(rows)}


def test_a_provider_that_refuses_the_schema_gets_the_follow_up_without_it(
    api: Api, corpus: list[str], rules_critic: RulesCritic, e2e_database_url: str
) -> None:
    ids = corpus[:4]
    before = rules_critic.stats()["refused"].get("response_format", 0)
    job = _batch_job(api, ids, extra_body={"rules_variant": ["no_response_format"]})
    finished = api.wait(job["id"], timeout=180)
    assert finished["status"] == "completed", finished
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    assert {(t, s): label for t, s, _, label in rows} == _expected(api, ids)
    first, follow_up = sorted(finished["batches"], key=lambda b: b["round"])
    assert (first["round"], follow_up["round"]) == (1, 2)
    # Every first-round line was refused for its schema; the follow-up asked without one.
    assert first["request_counts"]["failed"] == first["request_counts"]["total"] > 0
    assert follow_up["request_counts"]["failed"] == 0
    refused = rules_critic.stats()["refused"]["response_format"] - before
    assert refused == first["request_counts"]["total"]


def test_online_fallback_asks_failed_requests_online(
    api: Api, corpus: list[str], rules_critic: RulesCritic, e2e_database_url: str
) -> None:
    ids = corpus[:6]
    rules_critic.set_faults({"batch_faults": [{"kind": "expired", "count": 1, "line_every": 2}]})
    try:
        job = _batch_job(api, ids, online_fallback=True)
        finished = api.wait(job["id"], timeout=180)
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
    assert finished["status"] == "completed", finished
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    assert {(t, s): label for t, s, _, label in rows} == _expected(api, ids)
    deliveries = _deliveries(e2e_database_url, job["id"])
    assert deliveries["batch"] > 0
    assert deliveries["online"] > 0
    assert deliveries["batch"] + deliveries["online"] == len(rows)
    assert [b["round"] for b in finished["batches"]] == [1]


def test_cancel_cancels_the_batches_at_the_critic(
    api: Api, corpus: list[str], rules_critic: RulesCritic
) -> None:
    rules_critic.set_faults({"batch_faults": [{"kind": "stuck"}]})
    try:
        job = _batch_job(api, corpus[:3])
        live = _wait_until(lambda: _live_batch(api, job["id"]))
        before = rules_critic.stats()["batches"]["batches_cancelled"]
        cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        _wait_until(
            lambda: rules_critic.stats()["batches"]["batches_cancelled"] == before + len(live)
        )
        shown = _wait_until(
            lambda: [
                b
                for b in api.get(f"/v1/jobs/{job['id']}").json()["batches"]
                if b["status"] == "cancelled"
            ]
        )
        assert [b["id"] for b in shown] == [b["id"] for b in live]
        assert api.get(f"/v1/jobs/{job['id']}").json()["batch_progress"]["live"] == 0
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})


def test_a_worker_killed_while_its_batch_runs_does_not_submit_it_again(
    api: Api, corpus: list[str], rules_critic: RulesCritic, workers: Workers, e2e_database_url: str
) -> None:
    ids = corpus[:6]
    rules_critic.set_faults({"batch_faults": [{"kind": "stuck"}]})
    try:
        before = rules_critic.stats()
        job = _batch_job(api, ids)
        live = _wait_until(lambda: _live_batch(api, job["id"]))
        # Past the stale time (6 s) with the sweeper running: the batch's claim is old, yet
        # its steps stay with the batch and no online worker asks for them.
        time.sleep(8)
        assert rules_critic.stats()["requests"] == before["requests"]
        for process in list(workers.processes):
            workers.kill(process)  # SIGKILL: nothing gets to clean up
            workers.processes.remove(process)
        rules_critic.set_faults({"latency_ms": 20, "faults": []})  # the batch may now finish
        workers.start_worker()
        finished = api.wait(job["id"], timeout=120)
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
        while len(workers.processes) < 2:
            workers.start_worker()
    assert finished["status"] == "completed", finished
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    assert {(t, s): label for t, s, _, label in rows} == _expected(api, ids)
    # Polling resumed; nothing was submitted twice.
    after = rules_critic.stats()
    assert after["batches"]["batches_created"] - before["batches"]["batches_created"] == 1
    assert len(live) == 1
    assert after["requests"] == before["requests"]  # no chat call: every answer came by batch
    assert [b["id"] for b in finished["batches"]] == [live[0]["id"]]


def test_deleting_a_cancelled_job_leaves_no_batch_running(
    api: Api, corpus: list[str], rules_critic: RulesCritic
) -> None:
    rules_critic.set_faults({"batch_faults": [{"kind": "stuck"}]})
    try:
        job = _batch_job(api, corpus[:2])
        _wait_until(lambda: _live_batch(api, job["id"]))
        before = rules_critic.stats()["batches"]["batches_cancelled"]
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        deleted = api.client.delete(f"/v1/jobs/{job['id']}", headers=api.headers)
        assert deleted.status_code == 204
        assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
        # Cancelled at the critic once, by the cancel's task or by the delete's.
        _wait_until(lambda: rules_critic.stats()["batches"]["batches_cancelled"] == before + 1)
        time.sleep(1)
        assert rules_critic.stats()["batches"]["batches_cancelled"] == before + 1
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})


def test_a_submission_cut_short_after_the_batch_was_created_is_found_not_repeated(
    api: Api, corpus: list[str], rules_critic: RulesCritic, e2e_database_url: str
) -> None:
    """The provider created the batch but the row never learnt it (the worker died before its
    commit): the sweeper resumes the submission, which finds the batch by the row id in its
    metadata instead of uploading and creating it again."""
    ids = corpus[:3]
    rules_critic.set_faults({"batch_faults": [{"kind": "stuck"}]})
    try:
        before = rules_critic.stats()["batches"]
        job = _batch_job(api, ids)
        (live,) = _wait_until(lambda: _live_batch(api, job["id"]))
        engine = create_engine(e2e_database_url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    update(JobBatch)
                    .where(JobBatch.id == uuid.UUID(live["id"]))
                    .values(
                        status=BatchStatus.SUBMITTING,
                        remote_id=None,
                        input_file_id=None,
                        polled_at=None,
                        updated_at=datetime.now(UTC) - timedelta(hours=1),
                    )
                )
        finally:
            engine.dispose()
        # The sweeper hands the row on; its submission finds the batch and polls it again.
        _wait_until(lambda: _live_batch(api, job["id"]), timeout=30)
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
        finished = api.wait(job["id"], timeout=60)
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
    assert finished["status"] == "completed", finished
    rows = _assert_one_verdict_per_step(e2e_database_url, finished)
    assert {(t, s): label for t, s, _, label in rows} == _expected(api, ids)
    after = rules_critic.stats()["batches"]
    assert after["batches_created"] - before["batches_created"] == 1
    assert after["files_uploaded"] - before["files_uploaded"] == 1
    assert [(b["id"], b["remote_id"]) for b in finished["batches"]] == [
        (live["id"], live["remote_id"])
    ]
