"""The migrations build exactly the models' schema, on Postgres and SQLite, and reverses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, select, text
from sqlalchemy.orm import Session

from app.db import create_db_engine, downgrade_database, upgrade_database
from app.jobs import service as job_service
from app.jobs import tallies
from app.models import Base, Job, Project, Trajectory, Verdict, utcnow
from tests.jobs.recount import recount

TABLES = {
    "projects",
    "api_keys",
    "uploads",
    "trajectories",
    "steps",
    "jobs",
    "verdicts",
    "job_trajectories",
    "job_tallies",
    "job_batches",
    "exports",
    "export_parts",
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


# A failed verdict's error text as written before kinds were stored -> the kind 0006 gives it.
OLD_ERRORS: dict[str | None, str | None] = {
    "429 from critic: slow down (after 6 attempts)": "rate_limited",
    "502 from critic: Bad Gateway (after 6 attempts)": "server_error",
    "the critic's answer is not JSON: Expecting value (after 6 attempts)": "server_error",
    "the critic did not answer in time (after 6 attempts)": "timeout",
    "cannot reach the critic: Connection refused (after 6 attempts)": "connection",
    "400 from critic: bad request (after 1 attempts)": "rejected",
    "unparseable answer after 6 attempts: no step 3": "unparseable",
    "the critic gave no verdict for this step": "missing",
    "something nobody wrote down": None,
    None: None,
}


def _check_error_kind_backfill(url: str) -> None:
    """Failed verdicts stored before 0006 get the kind /metrics read from their text."""
    upgrade_database(url, "0005")
    project_id, job_id, trajectory_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    engine = create_db_engine(url)
    try:
        # Core inserts of the columns 0005 has (the models' error_kind is not among them).
        with engine.begin() as connection:
            connection.execute(insert(Project).values(id=project_id, name="migrated"))
            connection.execute(
                insert(Trajectory).values(
                    id=trajectory_id,
                    project_id=project_id,
                    content_hash="0" * 64,
                    source_format="openai_messages",
                    messages=[],
                    meta={},
                    num_steps=len(OLD_ERRORS) + 1,
                )
            )
            connection.execute(
                _jobs_0006()
                .insert()
                .values(
                    id=job_id,
                    project_id=project_id,
                    status="completed",
                    mode="step",
                    critic_model="critic",
                    votes=1,
                    temperature=0.0,
                    labels=[["good", "fine"]],
                    prompt_hash="0" * 64,
                    scope="all",
                    use_cache=False,
                    selection={},
                    total_trajectories=1,
                    total_steps=len(OLD_ERRORS) + 1,
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
            rows = [("failed", error) for error in OLD_ERRORS]
            # A done verdict whose stale text would match: only failed rows are classified.
            rows.append(("done", "429 from critic: slow down (after 1 attempts)"))
            connection.execute(
                _verdicts_before_0009().insert(),
                [
                    {
                        "project_id": project_id,
                        "job_id": job_id,
                        "trajectory_id": trajectory_id,
                        "step_index": step,
                        "status": status,
                        "cache_key": f"{step:064d}",
                        "critic_model": "critic",
                        "prompt_hash": "0" * 64,
                        "error": error,
                        "cached": False,
                        "prompt_tokens": 0,
                        "completion_tokens": 0,
                        "cached_tokens": 0,
                        "attempts": 0,
                    }
                    for step, (status, error) in enumerate(rows)
                ],
            )
        upgrade_database(url)
        with engine.connect() as connection:
            found = connection.execute(
                select(Verdict.status, Verdict.error, Verdict.error_kind)
                .where(Verdict.job_id == job_id)
                .order_by(Verdict.step_index)
            ).all()
        expected = [("failed", error, kind) for error, kind in OLD_ERRORS.items()]
        expected.append(("done", rows[-1][1], None))
        assert [tuple(row) for row in found] == expected
    finally:
        engine.dispose()


def test_sqlite_upgrade_classifies_old_failed_verdicts(tmp_path: Path) -> None:
    _check_error_kind_backfill(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_postgres_upgrade_classifies_old_failed_verdicts(scratch_postgres_url: str) -> None:
    _check_error_kind_backfill(scratch_postgres_url)


def _check_totals_backfill(url: str) -> None:
    """Jobs stored before 0008 get running totals and progress rows equal to a recount of
    their verdicts, and are marked prepared."""
    upgrade_database(url, "0006")
    project_id, job_id = uuid.uuid4(), uuid.uuid4()
    trajectories = [uuid.uuid4() for _ in range(3)]
    jobs = _jobs_0006()
    # (trajectory, status, cached, label, error kind, latency ms, prompt tokens)
    rows: list[tuple[int, str, bool, str | None, str | None, float | None, int]] = [
        (0, "done", False, "good", None, 80.0, 100),
        (0, "done", False, "mistake", None, 3000.0, 200),
        (1, "done", True, "good", None, None, 0),
        (1, "done", True, "good", None, None, 0),
        (2, "failed", False, None, "rate_limited", None, 50),
        (2, "failed", False, None, None, None, 0),
        (2, "pending", False, None, None, None, 0),
    ]
    engine = create_db_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(Project).values(id=project_id, name="migrated"))
            for n, trajectory_id in enumerate(trajectories):
                connection.execute(
                    insert(Trajectory).values(
                        id=trajectory_id,
                        project_id=project_id,
                        content_hash=f"{n:064d}",
                        source_format="openai_messages",
                        messages=[],
                        meta={},
                        num_steps=3,
                    )
                )
            connection.execute(
                jobs.insert().values(
                    id=job_id,
                    project_id=project_id,
                    status="running",
                    mode="step",
                    critic_model="critic",
                    votes=1,
                    temperature=0.0,
                    labels=[["good", "fine"]],
                    prompt_hash="0" * 64,
                    scope="all",
                    use_cache=True,
                    selection={},
                    total_trajectories=3,
                    total_steps=len(rows),
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
            steps: dict[int, int] = {}
            values = []
            for trajectory, status, cached, label, kind, latency, prompt in rows:
                step = steps[trajectory] = steps.get(trajectory, -1) + 1
                values.append(
                    {
                        "project_id": project_id,
                        "job_id": job_id,
                        "trajectory_id": trajectories[trajectory],
                        "step_index": step,
                        "status": status,
                        "cache_key": f"{trajectory}{step:063d}",
                        "cached": cached,
                        "label": label,
                        "critic_model": "critic",
                        "prompt_hash": "0" * 64,
                        "error_kind": kind,
                        "latency_ms": latency,
                        "prompt_tokens": prompt,
                        "completion_tokens": 5 if prompt else 0,
                        "cached_tokens": 0,
                        "attempts": 1,
                    }
                )
            connection.execute(_verdicts_before_0009().insert(), values)
        upgrade_database(url)
        with Session(engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            shown = job_service.describe(session, job).model_dump(mode="json")
            totals = tallies.read(session, job_id)
        assert shown["preparation"] == {"complete": True, "trajectories": 3, "steps": len(rows)}
        again = recount(url, str(job_id))
        assert {key: shown[key] for key in again} == again
        assert again["counts"]["trajectories"] == {
            "total": 3,
            "done": 2,
            "failed": 0,
            "pending": 1,
            "cached": 1,
        }
        assert tallies.family(totals, tallies.ERROR) == {"rate_limited": 1, "": 1}
        assert totals[tallies.LATENCY_COUNT] == 2
        assert totals[tallies.LATENCY_SUM_US] == 3_080_000
        assert totals[tallies.latency_bucket(0.1)] == 1
        assert totals[tallies.latency_bucket(5.0)] == 2
    finally:
        engine.dispose()


# The columns of `jobs` at 0006 (the model has more since).
JOB_COLUMNS_0006 = (
    "id",
    "project_id",
    "status",
    "mode",
    "critic_model",
    "votes",
    "temperature",
    "labels",
    "prompt_hash",
    "scope",
    "use_cache",
    "selection",
    "total_trajectories",
    "total_steps",
    "created_at",
    "updated_at",
)


def _verdicts_before_0009() -> sa.TableClause:
    """The verdict columns every revision from 0006 to 0008 has (0009 adds some; the
    error_kind column, absent before 0006, is left NULL by inserts that do not name it)."""
    added = {"reasoning_tokens", "system_fingerprint", "delivery"}
    return sa.table(
        "verdicts",
        *[sa.column(c.name, c.type) for c in Verdict.__table__.c if c.name not in added],
    )


def _jobs_0006() -> sa.TableClause:
    return sa.table("jobs", *[sa.column(c, Job.__table__.c[c].type) for c in JOB_COLUMNS_0006])


def test_sqlite_upgrade_counts_the_totals_of_stored_jobs(tmp_path: Path) -> None:
    _check_totals_backfill(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_postgres_upgrade_counts_the_totals_of_stored_jobs(scratch_postgres_url: str) -> None:
    _check_totals_backfill(scratch_postgres_url)
