"""Limits on calls to the critic: a concurrency cap and request/token rate limits.

With Redis (production) the limits are global, shared by every worker process on every
machine; on the embedded default there is one process and the limits are local. Either way a
caller does `async with limiter.slot(tokens): ...`.

Redis design: in-flight calls are members of a sorted set scored by lease expiry, so a worker
killed mid-call frees its slot when the lease runs out instead of leaking it forever. Rates are
token buckets (capacity = one minute's allowance, like providers' own limits), refilled on
read. Both are single Lua scripts, so they are atomic without locks. If Redis is unreachable
the limiter falls back to local limits and says so once, rather than stopping all labeling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

log = logging.getLogger(__name__)

_ACQUIRE_SLOT = """
local key, now, expiry, cap, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
    tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZCARD', key) < cap then
  redis.call('ZADD', key, expiry, member)
  redis.call('PEXPIRE', key, 3600000)
  return 1
end
return 0
"""

# Returns 0 when `cost` was taken from the bucket, else the seconds to wait before retrying.
_TAKE_TOKENS = """
local key, now, rate, capacity, cost = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]),
    tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - at) * rate)
cost = math.min(cost, capacity)
if tokens >= cost then
  redis.call('HSET', key, 'tokens', tokens - cost, 'at', now)
  redis.call('PEXPIRE', key, 120000)
  return '0'
end
redis.call('HSET', key, 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', key, 120000)
return tostring((cost - tokens) / rate)
"""


class Limiter(Protocol):
    def slot(self, tokens: int) -> Any:
        """An async context manager holding one call's place within every limit."""
        ...


class TokenBucket:
    """A local token bucket: `rate` per second, holding at most `capacity`."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens = self.capacity
        self.at = time.monotonic()

    def wait_for(self, cost: int) -> float:
        """Take `cost` and return 0, or return the seconds until it could be taken."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        cost_f = min(float(cost), self.capacity)
        if self.tokens >= cost_f:
            self.tokens -= cost_f
            return 0.0
        return (cost_f - self.tokens) / self.rate


class LocalLimiter:
    """Limits for one process (the embedded default, or a fallback when Redis is down)."""

    def __init__(self, max_concurrency: int, rpm: int = 0, tpm: int = 0) -> None:
        self._slots = asyncio.Semaphore(max_concurrency)
        self._requests = TokenBucket(rpm) if rpm else None
        self._tokens = TokenBucket(tpm) if tpm else None

    async def _take(self, bucket: TokenBucket | None, cost: int) -> None:
        while bucket is not None and (wait := bucket.wait_for(cost)) > 0:
            await asyncio.sleep(wait)

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        await self._take(self._requests, 1)
        await self._take(self._tokens, tokens)
        async with self._slots:
            yield


@dataclass(frozen=True)
class _Slot:
    """A place in the shared concurrency cap: a member of the Redis in-flight set."""

    member: str
    acquired_at: float  # monotonic
    handoffs: int = 0


class RedisLimiter:
    """Limits shared by every worker through one Redis.

    Within a process, calls queue locally for a place once the process holds as many as the
    cap allows, and a finished call hands its place straight to the next call waiting here
    instead of giving it back to Redis for that call to take again: under load a call then
    costs no Redis round trip for its slot, and waiting calls do not poll Redis. A place is
    handed on at most MAX_HANDOFFS times and while younger than half its lease, so places
    return to Redis regularly (other processes get their turn, and leases never lapse on a
    place still in use).
    """

    MAX_HANDOFFS = 16

    def __init__(
        self,
        redis_url: str,
        max_concurrency: int,
        rpm: int = 0,
        tpm: int = 0,
        *,
        namespace: str = "srft:critic",
        lease_s: float = 900.0,
    ) -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.max_concurrency = max_concurrency
        self.rpm, self.tpm = rpm, tpm
        self.lease_s = lease_s
        self._inflight_key = f"{namespace}:inflight"
        self._rpm_key = f"{namespace}:rpm"
        self._tpm_key = f"{namespace}:tpm"
        self._acquire = self._redis.register_script(_ACQUIRE_SLOT)
        self._take_tokens = self._redis.register_script(_TAKE_TOKENS)
        self._fallback = LocalLimiter(max_concurrency, rpm, tpm)
        self._warned = False
        # Places this process holds or is taking from Redis, and the calls queued for one:
        # each waiter's future gets a handed-on _Slot, or None to take a place itself.
        self._held = 0
        self._waiters: deque[asyncio.Future[_Slot | None]] = deque()

    async def _take(self, key: str, per_minute: int, cost: int) -> None:
        if not per_minute:
            return
        while True:
            wait = float(
                await self._take_tokens(
                    keys=[key], args=[time.time(), per_minute / 60.0, per_minute, cost]
                )
            )
            if wait <= 0:
                return
            await asyncio.sleep(wait + random.uniform(0, 0.05))

    async def _acquire_slot(self, member: str) -> None:
        pause = 0.005
        while True:
            now = time.time()
            taken = await self._acquire(
                keys=[self._inflight_key],
                args=[now, now + self.lease_s, self.max_concurrency, member],
            )
            if int(taken):
                return
            # Jittered, growing pauses keep many waiters from polling Redis in lockstep.
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 1.5, 0.1)

    async def _take_slot(self) -> _Slot:
        if self._held < self.max_concurrency and not self._waiters:
            self._held += 1
        else:
            waiter: asyncio.Future[_Slot | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    await self._pass_on(waiter.result())  # what we were given goes on
                raise
            if handed is not None:
                return handed
            # None: our turn to take a place from Redis (the local count came with it).
        member = uuid.uuid4().hex
        try:
            await self._acquire_slot(member)
        except BaseException:
            await self._pass_on(None)
            raise
        return _Slot(member, time.monotonic())

    async def _pass_on(self, slot: _Slot | None) -> None:
        """Hand a place (or with None, the turn to take one) to the next waiting call, or
        give it back. The bookkeeping is done before the first await, so a cancellation
        can at worst leave a place in Redis until its lease runs out."""
        release = None
        if slot is not None and (
            slot.handoffs >= self.MAX_HANDOFFS
            or time.monotonic() - slot.acquired_at >= self.lease_s / 2
        ):
            release, slot = slot.member, None
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting
                continue
            waiter.set_result(None if slot is None else replace(slot, handoffs=slot.handoffs + 1))
            break
        else:
            self._held -= 1
            if slot is not None:
                release = slot.member
        if release is not None:
            await asyncio.shield(self._release(release))

    async def _release(self, member: str) -> None:
        from redis.exceptions import RedisError

        # If Redis is gone the lease simply expires by itself.
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zrem(self._inflight_key, member)

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        from redis.exceptions import RedisError

        try:
            await self._take(self._rpm_key, self.rpm, 1)
            await self._take(self._tpm_key, self.tpm, tokens)
            taken = await self._take_slot()
        except (RedisError, OSError) as exc:
            if not self._warned:
                log.warning("critic limits fall back to this process: Redis unavailable (%s)", exc)
                self._warned = True
            async with self._fallback.slot(tokens):
                yield
            return
        try:
            yield
        finally:
            await self._pass_on(taken)

    async def in_flight(self) -> int:
        now = time.time()
        await self._redis.zremrangebyscore(self._inflight_key, "-inf", now)
        return int(await self._redis.zcard(self._inflight_key))

    async def close(self) -> None:
        await self._redis.aclose()
