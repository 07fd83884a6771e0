"""The judge against a real HTTP critic (the rules server in a thread) and a real Redis:
votes, Retry-After, re-asking unparseable answers, running out of attempts, and a concurrency
cap shared by two independent limiters (two workers)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.critic.client import CriticClient
from app.critic.judge import Judge, JudgeConfig, StepOutcome
from app.critic.labels import DEFAULT_LABELS
from app.critic.limits import LocalLimiter, RedisLimiter
from app.critic.rules import label_trajectory
from app.critic.rules_server import start_rules_server_thread
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from tests.helpers import trajectory_file

RUN = "swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj"


@pytest.fixture(scope="module")
def critic_url() -> str:
    return f"http://127.0.0.1:{start_rules_server_thread(latency_ms=0)}"


@pytest.fixture
def critic(critic_url: str) -> Iterator[str]:
    """The critic with a clean fault plan, latency and counters for each test."""
    httpx.post(
        f"{critic_url}/admin/faults", json={"latency_ms": 0, "faults": []}
    ).raise_for_status()
    httpx.post(f"{critic_url}/admin/stats/reset").raise_for_status()
    yield critic_url
    httpx.post(f"{critic_url}/admin/faults", json={"latency_ms": 0, "faults": []})


def _faults(url: str, plan: dict[str, Any]) -> None:
    httpx.post(f"{url}/admin/faults", json=plan).raise_for_status()


def _stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/admin/stats").json()
    return stats


@pytest.fixture(scope="module")
def run() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = parse_upload(trajectory_file(RUN).read_bytes())[0].messages
    return messages


def _expected(messages: list[dict[str, Any]]) -> dict[int, str]:
    return {
        v.index: v.label for v in label_trajectory(messages, split_steps(messages), DEFAULT_LABELS)
    }


async def _steps(
    judge: Judge, messages: list[dict[str, Any]], targets: list[int]
) -> list[StepOutcome]:
    steps = split_steps(messages)
    outcomes = [o async for o in judge.judge_steps(messages, steps, False, targets)]
    await judge.client.close()
    return sorted(outcomes, key=lambda o: o.index)


def _judge(url: str, sleeps: list[float] | None = None, **config: Any) -> Judge:
    async def record(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    settings = {
        "model": "rules",
        "labels": DEFAULT_LABELS,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
    } | config
    return Judge(
        CriticClient(f"{url}/v1", None, timeout_s=5),
        LocalLimiter(8),
        JudgeConfig(**settings),
        sleep=record,
    )


def test_votes_keep_the_majority_and_report_agreement(
    critic: str, run: list[dict[str, Any]]
) -> None:
    judge = _judge(critic, votes=5, temperature=2.0)
    outcomes = asyncio.run(_steps(judge, run, list(range(12))))
    assert [o.index for o in outcomes] == list(range(12))
    for outcome in outcomes:
        counts = Counter(outcome.vote_labels)
        assert len(outcome.vote_labels) == 5
        assert counts[outcome.label] == max(counts.values())
        assert outcome.agreement == counts[outcome.label] / 5
    assert any(o.agreement is not None and o.agreement < 1 for o in outcomes)
    assert _stats(critic)["completions"] == 12 * 5


def test_retry_after_is_honoured(critic: str, run: list[dict[str, Any]]) -> None:
    _faults(critic, {"faults": [{"kind": "429", "count": 2, "retry_after": 1.5}]})
    sleeps: list[float] = []
    outcomes = asyncio.run(_steps(_judge(critic, sleeps), run, [3]))
    assert outcomes[0].label == _expected(run)[3]
    assert outcomes[0].usage.attempts == 3
    assert len(sleeps) == 2
    assert all(1.5 <= s <= 1.5 * 1.1 + 0.05 for s in sleeps)  # Retry-After plus a little jitter


def test_unparseable_answers_are_re_asked(critic: str, run: list[dict[str, Any]]) -> None:
    _faults(
        critic, {"faults": [{"kind": "malformed", "count": 1}, {"kind": "truncated", "count": 1}]}
    )
    sleeps: list[float] = []
    outcomes = asyncio.run(_steps(_judge(critic, sleeps), run, [5]))
    assert outcomes[0].label == _expected(run)[5]
    assert outcomes[0].usage.attempts == 3
    assert sleeps == []  # a re-ask needs no backoff


def test_retries_run_out_into_an_error(critic: str, run: list[dict[str, Any]]) -> None:
    _faults(critic, {"faults": [{"kind": "500"}]})
    sleeps: list[float] = []
    outcomes = asyncio.run(_steps(_judge(critic, sleeps, max_attempts=4), run, [0, 1]))
    for outcome in outcomes:
        assert outcome.label is None
        assert outcome.error is not None
        assert "500" in outcome.error
        assert outcome.error_kind == "server_error"
        assert outcome.usage.attempts == 4
    assert len(sleeps) == 2 * 3


def test_trajectory_mode_wrong_step_count_is_re_asked(
    critic: str, run: list[dict[str, Any]]
) -> None:
    _faults(critic, {"faults": [{"kind": "wrong_count", "count": 1}]})
    judge = _judge(critic)

    async def go() -> list[StepOutcome]:
        steps = split_steps(run)
        found = [
            o
            async for batch in judge.judge_trajectory(run, steps, None, set(range(len(steps))))
            for o in batch
        ]
        await judge.client.close()
        return found

    outcomes = asyncio.run(go())
    assert {o.index: o.label for o in outcomes} == _expected(run)
    assert {o.usage.attempts for o in outcomes} == {2}


def test_two_workers_share_one_concurrency_cap_through_redis(
    critic: str, run: list[dict[str, Any]], redis_url: str
) -> None:
    _faults(critic, {"latency_ms": 100, "faults": []})

    async def worker(namespace: str) -> list[StepOutcome]:
        judge = _judge(critic)
        judge.limiter = RedisLimiter(redis_url, max_concurrency=3, namespace=namespace)
        outcomes = await _steps(judge, run, list(range(12)))
        await judge.limiter.close()  # type: ignore[attr-defined]
        return outcomes

    async def both() -> list[list[StepOutcome]]:
        return await asyncio.gather(worker("srft:test-cap"), worker("srft:test-cap"))

    first, second = asyncio.run(both())
    assert len(first) == len(second) == 12
    stats = _stats(critic)
    assert stats["completions"] == 24
    assert stats["max_in_flight"] == 3  # reached, never exceeded, across both "workers"


def test_a_run_too_long_for_the_context_gets_one_verdict_per_step(critic: str) -> None:
    path = "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-13265.traj.json"
    messages = parse_upload(trajectory_file(path).read_bytes())[0].messages
    steps = split_steps(messages)
    judge = _judge(critic, context_tokens=16_000, max_answer_tokens=4096)

    async def go() -> list[StepOutcome]:
        found = [
            o
            async for batch in judge.judge_trajectory(
                messages, steps, False, set(range(len(steps)))
            )
            for o in batch
        ]
        await judge.client.close()
        return found

    outcomes = asyncio.run(go())
    assert sorted(o.index for o in outcomes) == list(range(156))
    assert all(o.label in DEFAULT_LABELS.names for o in outcomes)
    assert _stats(critic)["completions"] > 1  # it really was split into windows
