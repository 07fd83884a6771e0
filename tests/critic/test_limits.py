"""Rate limits: a minute's allowance may be spent at once, then calls wait for the refill.
The Redis limiter shares that budget between every limiter on the same keys."""

from __future__ import annotations

import asyncio
import time
import uuid

from app.critic.limits import LocalLimiter, RedisLimiter, TokenBucket


async def _take(limiter: LocalLimiter | RedisLimiter, calls: int, tokens: int = 1) -> float:
    started = time.monotonic()
    for _ in range(calls):
        async with limiter.slot(tokens):
            pass
    return time.monotonic() - started


def test_token_bucket_allows_a_minute_then_refills() -> None:
    bucket = TokenBucket(per_minute=120)  # 2 per second
    assert all(bucket.wait_for(1) == 0 for _ in range(120))
    wait = bucket.wait_for(1)
    assert 0.4 < wait <= 0.5


def test_local_rpm_limit_waits_for_the_refill() -> None:
    limiter = LocalLimiter(max_concurrency=4, rpm=120)
    assert asyncio.run(_take(limiter, 120)) < 0.3
    limiter2 = LocalLimiter(max_concurrency=4, rpm=120)

    async def burst() -> float:
        await _take(limiter2, 120)
        return await _take(limiter2, 1)

    assert 0.35 < asyncio.run(burst()) < 1.0


def test_redis_rpm_budget_is_shared_between_limiters(redis_url: str) -> None:
    namespace = f"srft:test-rate-{uuid.uuid4().hex[:6]}"

    async def go() -> float:
        first = RedisLimiter(redis_url, 64, rpm=120, namespace=namespace)
        second = RedisLimiter(redis_url, 64, rpm=120, namespace=namespace)
        await _take(first, 60)
        await _take(second, 60)  # together they spent the minute's 120
        waited = await _take(first, 1)
        await first.close()
        await second.close()
        return waited

    assert 0.35 < asyncio.run(go()) < 1.0


def test_redis_tpm_limit_counts_tokens(redis_url: str) -> None:
    namespace = f"srft:test-tpm-{uuid.uuid4().hex[:6]}"

    async def go() -> float:
        limiter = RedisLimiter(redis_url, 64, tpm=6000, namespace=namespace)  # 100 tokens/s
        await _take(limiter, 3, tokens=2000)
        waited = await _take(limiter, 1, tokens=50)
        await limiter.close()
        return waited

    assert 0.35 < asyncio.run(go()) < 1.0
