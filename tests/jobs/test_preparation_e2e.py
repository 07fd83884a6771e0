"""Jobs of a few thousand steps, end to end on Postgres, Redis and two `srft worker`
processes: the request answers before any row exists, workers write the rows in small
batches, and the job's running totals equal a recount of its rows, also when every worker is
killed in the middle of the preparation and one again in the middle of the labeling; and a
job whose work is all done already is served from the cache batch by batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.builders import make_trajectory
from tests.e2e import Api, RulesCritic, Workers, worker_env
from tests.jobs.recount import assert_totals_match_rows
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

RUNS, STEPS, BATCH = 600, 5, 4


@pytest.fixture(scope="module")
def workers(
    e2e_database_url: str,
    e2e_redis: RedisServer,
    rules_critic: RulesCritic,
    export_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Workers]:
    """Two workers and beat, preparing jobs `BATCH` trajectories at a time."""
    env = worker_env(e2e_database_url, e2e_redis.url, rules_critic, export_dir)
    pool = Workers(env | {"SRFT_JOB_PREPARE_BATCH": str(BATCH)}, tmp_path_factory.mktemp("w"))
    pool.start_worker()
    pool.start_worker()
    pool.start_beat()
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def runs(api: Api, workers: Workers) -> list[str]:
    body = [make_trajectory(STEPS, salt=f"prep-{n}", resolved=False) for n in range(RUNS)]
    ids: list[str] = [t["id"] for t in api.upload(json.dumps(body).encode())]
    assert len(ids) == RUNS
    return ids


def _state(api: Api, job_id: str) -> dict[str, Any]:
    state: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
    return state


def _until(api: Api, job_id: str, ready: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = _state(api, job_id)
        if ready(state):
            return state
        assert time.monotonic() < deadline, f"{what}: {json.dumps(state, indent=1)}"
        time.sleep(0.05)


def _replace_all(workers: Workers) -> None:
    for victim in list(workers.processes):
        workers.kill(victim)  # SIGKILL: no clean-up, messages in flight unacknowledged
        workers.processes.remove(victim)
    workers.start_worker()
    workers.start_worker()


def test_a_job_is_prepared_in_batches_and_its_totals_survive_worker_kills(
    api: Api, runs: list[str], rules_critic: RulesCritic, workers: Workers, e2e_database_url: str
) -> None:
    rules_critic.set_faults({"latency_ms": 30, "faults": []})
    try:
        created = api.start_job({"selection": {"trajectory_ids": runs}, "cache": False})
        # The request wrote the job and its totals, not its rows.
        assert created["preparation"] == {"complete": False, "trajectories": 0, "steps": 0}
        assert created["counts"]["steps"]["total"] == RUNS * STEPS
        assert created["counts"]["trajectories"]["total"] == RUNS

        midway = _until(
            api,
            created["id"],
            lambda s: s["preparation"]["trajectories"] >= 10 * BATCH,
            60,
            "preparation never started",
        )
        assert not midway["preparation"]["complete"], "prepared before the kill: no test"
        assert midway["preparation"]["trajectories"] % BATCH == 0  # whole batches only
        _replace_all(workers)

        prepared = _until(
            api,
            created["id"],
            lambda s: s["preparation"]["complete"] and s["counts"]["steps"]["done"] >= 600,
            240,
            "the preparation did not resume",
        )
        assert prepared["preparation"] == {
            "complete": True,
            "trajectories": RUNS,
            "steps": RUNS * STEPS,
        }
        # While labeling goes on the totals move, but each read is a consistent recount.
        workers.kill(workers.processes[0])
        workers.processes.pop(0)
        workers.start_worker()
        finished = api.wait(created["id"], timeout=300)
    finally:
        rules_critic.set_faults({"latency_ms": 20, "faults": []})
    assert finished["status"] == "completed", finished
    assert finished["counts"]["steps"] == {
        "total": RUNS * STEPS,
        "done": RUNS * STEPS,
        "failed": 0,
        "pending": 0,
        "cached": 0,
    }
    assert finished["counts"]["trajectories"]["done"] == RUNS
    assert sum(finished["labels"].values()) == RUNS * STEPS
    assert finished["usage"]["prompt_tokens"] > 0
    assert_totals_match_rows(e2e_database_url, finished)

    # The same work again is served from the cache as each batch is written: the job
    # completes with no critic call and exact totals.
    again = api.wait(api.start_job({"selection": {"trajectory_ids": runs[:100]}})["id"])
    assert again["status"] == "completed", again
    assert again["counts"]["steps"]["cached"] == 100 * STEPS
    assert again["counts"]["trajectories"]["cached"] == 100
    assert again["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert_totals_match_rows(e2e_database_url, again)
