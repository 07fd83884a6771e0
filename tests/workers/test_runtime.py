"""The worker runtime's outcome recorder: critic answers are paid for, so a batch that finds
the database unavailable is written again until it is back, within a bound."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from app.critic.judge import StepOutcome, Usage
from app.jobs import labeling
from app.jobs.labeling import Recorder, _Write
from app.jobs.workqueue import Unit

UNIT = Unit(uuid.uuid4(), uuid.uuid4(), (0,))
OUTCOME = StepOutcome(0, "good", "fine", 1.0, [], Usage())


class FlakyDatabase:
    """Writes that fail with `error` the first `down` times."""

    def __init__(self, down: int, error: Exception) -> None:
        self.down = down
        self.error = error
        self.tries = 0

    def write(self, writes: list[_Write]) -> dict[uuid.UUID, str]:
        self.tries += 1
        if self.tries <= self.down:
            raise self.error
        return {UNIT.job_id: "running"}


def _record(database: FlakyDatabase, patience_s: float) -> bool:
    async def submit() -> bool:
        recorder = Recorder(database.write, patience_s=patience_s)
        return await recorder.submit(UNIT, "token", [OUTCOME])

    return asyncio.run(submit())


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labeling, "outage_delay", lambda attempt: 0.01)


def _outage() -> OperationalError:
    return OperationalError("UPDATE verdicts", {}, Exception("connection refused"))


def test_outcomes_are_stored_once_the_database_is_back() -> None:
    database = FlakyDatabase(down=5, error=_outage())
    assert _record(database, patience_s=30) is True
    assert database.tries == 6


def test_outcomes_fail_when_the_database_stays_away_past_the_bound() -> None:
    database = FlakyDatabase(down=10**6, error=_outage())
    with pytest.raises(OperationalError):
        _record(database, patience_s=0.2)
    assert 2 < database.tries < 40


def test_other_errors_are_not_written_again() -> None:
    database = FlakyDatabase(down=1, error=IntegrityError("UPDATE", {}, Exception("bug")))
    with pytest.raises(IntegrityError):
        _record(database, patience_s=30)
    assert database.tries == 1
