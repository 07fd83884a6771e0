"""The migrations build exactly the models' schema, on Postgres and SQLite, and reverses."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.db import downgrade_database, upgrade_database
from app.models import Base

TABLES = {
    "projects",
    "api_keys",
    "uploads",
    "trajectories",
    "steps",
    "jobs",
    "verdicts",
    "exports",
    "human_labels",
    "ui_sessions",
}


def _schema_diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_sqlite_upgrade_matches_models_and_downgrade_removes_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    upgrade_database(url)
    assert _tables(url) == TABLES
    assert _schema_diff(url) == []
    downgrade_database(url)
    assert _tables(url) == set()
    upgrade_database(url)
    assert _tables(url) == TABLES


@pytest.fixture
def scratch_postgres_url(postgres_url: str) -> str:
    """A second, empty database on the test server."""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS srft_migrations"))
        connection.execute(text("CREATE DATABASE srft_migrations"))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + "/srft_migrations"


def test_postgres_upgrade_matches_models_and_reverses(scratch_postgres_url: str) -> None:
    upgrade_database(scratch_postgres_url)
    assert _tables(scratch_postgres_url) == TABLES
    assert _schema_diff(scratch_postgres_url) == []
    downgrade_database(scratch_postgres_url)
    assert _tables(scratch_postgres_url) == set()
    upgrade_database(scratch_postgres_url)
    assert _tables(scratch_postgres_url) == TABLES
