"""Fixtures: real Postgres and Redis for the whole run, one rolled-back transaction per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.config import Settings
from app.db import Database, unit_of_work, upgrade_database
from app.deps import get_session
from app.main import create_app
from tests.chat_tokenizers import TEMPLATES, build_tokenizer
from tests.servers import PostgresServer, RedisServer, postgres_server


@pytest.fixture(scope="session")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the test service allows tokenizers in (SRFT_TOKENIZER_DIRS)."""
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def tokenizers(tokenizer_root: Path) -> dict[str, Path]:
    """Tokenizers built locally (no downloads), one per chat template of tests/chat_tokenizers."""
    return {name: build_tokenizer(tokenizer_root / name, name) for name in TEMPLATES}


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A Postgres database with the real migrations applied once for the whole run."""
    external = os.environ.get("SRFT_TEST_DATABASE_URL")
    if external:
        upgrade_database(external)
        yield external
        return
    with postgres_server() as url:
        upgrade_database(url)
        yield url


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A Postgres cluster of the module's own, migrated: its tests may stop and restart it
    without disturbing the session's server."""
    server = PostgresServer()
    server.start()
    upgrade_database(server.url)
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis for the run. Tests that stop and restart it use their own instance."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    external = os.environ.get("SRFT_TEST_REDIS_URL")
    if external:
        return external
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(scope="session")
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back when the test ends."""
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    """A session whose commits only release savepoints of the test's outer transaction."""
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    yield session
    session.close()


@dataclass(frozen=True)
class Caller:
    project_id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def caller(session: Session) -> Caller:
    new = auth_service.create_key(session, "tests", project_name=f"p-{uuid.uuid4().hex[:8]}")
    return Caller(new.project_id, new.key)


@pytest.fixture
def other_caller(session: Session) -> Caller:
    new = auth_service.create_key(session, "other", project_name=f"q-{uuid.uuid4().hex[:8]}")
    return Caller(new.project_id, new.key)


@pytest.fixture
def settings(postgres_url: str, redis_url: str, tokenizer_root: Path) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        max_upload_bytes=8 * 1024 * 1024,
        tokenizer_dirs=str(tokenizer_root),
    )


@pytest.fixture
def client(settings: Settings, session: Session, postgres_url: str) -> Iterator[TestClient]:
    """The real app over HTTP (in-process ASGI), every request on the test's session."""
    database = Database(postgres_url)
    app = create_app(settings, database=database)

    def _session() -> Iterator[Session]:
        # The request's unit of work on the test's session: a commit releases a savepoint of
        # the test's outer transaction (rolled back when the test ends), a failure rolls the
        # savepoint back, and after-commit steps run as in production.
        with unit_of_work(session):
            yield session

    app.dependency_overrides[get_session] = _session
    with TestClient(app) as test_client:
        yield test_client
    database.dispose()
