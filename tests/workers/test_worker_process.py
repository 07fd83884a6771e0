"""`srft worker` is a real Celery worker process that consumes from a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from app.broker import create_celery


@pytest.fixture
def worker_process(redis_url: str, postgres_url: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    env |= {"SRFT_BROKER_URL": redis_url, "SRFT_DATABASE_URL": postgres_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--concurrency", "1", "--loglevel", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield process
    process.terminate()
    process.wait(timeout=30)


def test_worker_process_answers_over_redis(
    worker_process: subprocess.Popen[bytes], redis_url: str
) -> None:
    celery = create_celery(redis_url)
    replies: list[dict[str, object]] = []
    deadline = time.monotonic() + 60
    while not replies and time.monotonic() < deadline:
        assert worker_process.poll() is None, "the worker exited"
        replies = celery.control.ping(timeout=1.0) or []
    assert replies, "no worker answered a broadcast ping over Redis"
    assert all(next(iter(reply.values())) == {"ok": "pong"} for reply in replies)


def test_worker_refuses_the_in_memory_broker() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "SRFT_BROKER_URL" in result.stderr
