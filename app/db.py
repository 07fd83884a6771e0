"""Engine, sessions and migrations. The engine is built at start-up, never at import."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_AFTER_COMMIT = "srft.after_commit"

log = logging.getLogger("srft")


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the session's transaction has committed, never if it rolls back.

    For work that other processes act on (queueing a task that names a row): a message may
    then never name a row that was not stored. A failing callback is logged, not raised: what
    it was for is committed, and the sweeper finds work whose message was lost.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def commit(session: Session) -> None:
    """Commit the unit of work, then run its after-commit callbacks."""
    session.commit()
    callbacks: list[Callable[[], object]] = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("an after-commit step failed; the sweeper will make up for it")


def discard(session: Session) -> None:
    """Roll the unit of work back and forget its after-commit callbacks."""
    session.info.pop(_AFTER_COMMIT, None)
    session.rollback()


@contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """The block is one unit of work on `session`: committed (then its after-commit steps
    run) when it ends without an error, rolled back, its after-commit steps forgotten, on any
    error. Requests (`app.deps.get_session`) and tasks (`Database.transaction`) both use it."""
    try:
        yield session
    except BaseException:
        discard(session)
        raise
    commit(session)


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if "poolclass" not in kwargs:
        kwargs.update(pool_size=10, max_overflow=20)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _ensure_sqlite_dir(url: str) -> None:
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the in-process worker writes; foreign keys are off by
    # default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def is_database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be reached (down, restarting, connection lost,
    pool exhausted, SQLite locked): a condition that passes, so the work is worth retrying.

    Constraint violations, bad SQL and the like are bugs or caller errors, never retried.
    """
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(
        error,
        exc.OperationalError | exc.InterfaceError | exc.DisconnectionError | exc.TimeoutError,
    )


# While the database is unavailable, work is tried again after 0.5 s, doubling to at most 5 s:
# a blip costs seconds, not a stale timeout, and a long outage costs one query per try.
OUTAGE_BACKOFF_BASE_S = 0.5
OUTAGE_BACKOFF_MAX_S = 5.0


def outage_delay(attempt: int) -> float:
    """Seconds to wait before trying again after `attempt` tries (0, 1, ...) found the
    database unavailable; half of it random, so that workers do not all return at once."""
    ceiling = min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * (1 << min(attempt, 16)))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def outage_reason(error: BaseException) -> str:
    """What the driver said, first line only: not the statement and its parameters."""
    return str(getattr(error, "orig", None) or error).partition("\n")[0]


def outage_tries(budget_s: float) -> int:
    """How many times to try again, at `outage_delay`, to keep trying for about `budget_s`."""
    tries, waited = 0, 0.0
    while waited < budget_s:
        waited += 0.75 * min(OUTAGE_BACKOFF_MAX_S, OUTAGE_BACKOFF_BASE_S * (1 << min(tries, 16)))
        tries += 1
    return tries


class Database:
    """An engine and its session factory, owned by the app or the worker."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A unit of work: committed (then its after-commit callbacks run) when the block
        ends without an error, rolled back on any error."""
        with self.sessions() as session, unit_of_work(session):
            yield session

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to `revision`."""
    from alembic import command

    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
