"""End-to-end fixtures: a committed database, real Redis, real `srft worker` and `srft beat`
processes, the rules critic served over HTTP by `srft critic serve-rules`, and the API.

These tests cannot use the rolled-back test transaction (other processes must see the rows),
so each test module that uses them gets a database of its own on the test Postgres server,
dropped at the end. Conftests import the fixtures they need from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.auth import service as auth_service
from app.config import Settings
from app.db import Database, upgrade_database
from app.main import create_app
from tests.servers import RedisServer, free_port, wait_for_port

CRITIC_KEY = "sk-test-" + uuid.uuid4().hex  # must never show up in a response, log or table
SRFT = [sys.executable, "-m", "app.cli"]
TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def e2e_database_url(postgres_url: str) -> Iterator[str]:
    name = f"srft_e2e_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade_database(url)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture(scope="module")
def e2e_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: one test restarts it."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@dataclass
class RulesCritic:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(
            method,
            f"{self.url}/admin/{path}",
            timeout=5,
            headers={"Authorization": f"Bearer {CRITIC_KEY}"},
            **kwargs,
        )
        response.raise_for_status()
        return response

    def set_faults(self, plan: dict[str, Any]) -> None:
        self._admin("POST", "faults", json=plan)

    def recent_requests(self) -> list[list[dict[str, Any]]]:
        """The messages of the last requests the critic answered."""
        return [r["messages"] for r in self._admin("GET", "requests").json()["requests"]]

    def recent_fields(self) -> list[dict[str, Any]]:
        """The other body fields (model, max_tokens, seed, ...) of the last requests."""
        return [r["fields"] for r in self._admin("GET", "requests").json()["requests"]]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._admin("GET", "stats").json()
        return stats


@pytest.fixture(scope="module")
def rules_critic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RulesCritic]:
    workdir = tmp_path_factory.mktemp("critic")
    port = free_port()
    log = workdir / "critic.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *SRFT,
                "critic",
                "serve-rules",
                "--port",
                str(port),
                "--latency-ms",
                "20",
                "--api-key",
                CRITIC_KEY,
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )
    wait_for_port(port)
    yield RulesCritic(f"http://127.0.0.1:{port}", process, log)
    process.terminate()
    process.wait(timeout=10)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    return env | extra


@dataclass
class Workers:
    """`srft worker` processes and one `srft beat`, all on the module's database and Redis."""

    env: dict[str, str]
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    beat: subprocess.Popen[bytes] | None = None

    def _spawn(
        self, args: list[str], name: str, program: list[str] = SRFT
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [*program, *args],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_worker(self, program: list[str] = SRFT) -> subprocess.Popen[bytes]:
        """`srft worker` (or `program`, a command line that takes the same arguments)."""
        process = self._spawn(
            ["worker", "--concurrency", "2", "--loglevel", "INFO"],
            f"worker-{len(self.processes)}",
            program,
        )
        self.processes.append(process)
        return process

    def start_beat(self) -> None:
        self.beat = self._spawn(["beat", "--loglevel", "INFO"], "beat")

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children: nothing gets to clean up."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.workdir.glob("*.log"))

    def stop_all(self) -> None:
        for process in [*self.processes, *([self.beat] if self.beat else [])]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.processes, *([self.beat] if self.beat else [])]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def worker_env(
    database_url: str,
    redis_url: str,
    critic: RulesCritic,
    export_dir: Path,
    tokenizer_dirs: str = "",
) -> dict[str, str]:
    return _clean_env(
        SRFT_DATABASE_URL=database_url,
        SRFT_EXPORT_DIR=str(export_dir),
        SRFT_TOKENIZER_DIRS=tokenizer_dirs,
        SRFT_BROKER_URL=redis_url,
        SRFT_CRITIC_BASE_URL=critic.base_url,
        SRFT_CRITIC_API_KEY=CRITIC_KEY,
        SRFT_CRITIC_MAX_CONCURRENCY="32",
        SRFT_CRITIC_TIMEOUT_S="3",
        SRFT_CRITIC_MAX_ATTEMPTS="8",
        SRFT_CRITIC_BACKOFF_BASE_S="0.05",
        SRFT_CRITIC_BACKOFF_MAX_S="0.5",
        SRFT_STALE_AFTER_S="6",
        SRFT_SWEEP_INTERVAL_S="1",
        SRFT_BATCH_POLL_S="0.2",
        SRFT_STEP_CHUNK_SIZE="8",
        # Large enough that no real trajectory is windowed or shortened, so the rules critic
        # sees every observation whole and its labels can be predicted exactly.
        SRFT_CRITIC_CONTEXT_TOKENS="2000000",
    )


@pytest.fixture(scope="module")
def workers(
    e2e_database_url: str,
    e2e_redis: RedisServer,
    rules_critic: RulesCritic,
    export_dir: Path,
    tokenizer_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Workers]:
    pool = Workers(
        worker_env(e2e_database_url, e2e_redis.url, rules_critic, export_dir, str(tokenizer_root)),
        tmp_path_factory.mktemp("workers"),
    )
    pool.start_worker()
    pool.start_worker()
    pool.start_beat()
    yield pool
    pool.stop_all()


@dataclass
class Api:
    client: TestClient
    key: str
    settings: Settings
    database: Database

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers | kwargs.pop("headers", {})
        return self.client.post(path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers | kwargs.pop("headers", {})
        return self.client.get(path, headers=headers, **kwargs)

    def upload(self, body: bytes, **params: str) -> list[dict[str, Any]]:
        response = self.post("/v1/trajectories", content=body, params=params)
        assert response.status_code == 201, response.text
        runs: list[dict[str, Any]] = response.json()["trajectories"]
        return runs

    def start_job(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(json.dumps(job, indent=1))
            time.sleep(0.2)

    def verdicts(self, job_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {"limit": "1000"} | ({"cursor": cursor} if cursor else {})
            page = self.get(f"/v1/jobs/{job_id}/verdicts", params=params).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def api(
    e2e_database_url: str, e2e_redis: RedisServer, export_dir: Path, tokenizer_root: Path
) -> Iterator[Api]:
    settings = Settings(
        database_url=e2e_database_url,
        broker_url=e2e_redis.url,
        step_chunk_size=8,
        export_dir=export_dir,
        export_processes=1,
        tokenizer_dirs=str(tokenizer_root),
    )
    database = Database(e2e_database_url)
    with database.transaction() as session:
        key = auth_service.create_key(
            session, "e2e", project_name=f"e2e-{uuid.uuid4().hex[:6]}"
        ).key
    with TestClient(create_app(settings, database=database)) as client:
        yield Api(client, key, settings, database)
    database.dispose()
