"""Task functions called directly (`apply()`, which runs a retry at once, in this process):
a task that finds the database unavailable retries itself, keeping its claim token; other
errors are not retried. The runtime is stood in for, so no database is needed."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import outage_tries
from app.exports.builder import BuildInterruptedError
from app.worker import tasks

STALE_S = 10.0


def _outage() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


class FlakyRuntime:
    """The worker runtime, with the database unavailable for its first `down` calls."""

    def __init__(self, down: int, error: Exception | None = None) -> None:
        self.settings = Settings(stale_after_s=STALE_S)
        self.down = down
        self.error = error
        self.calls: list[tuple[Any, ...]] = []

    def _call(self, *args: Any) -> None:
        self.calls.append(args)
        if self.error is not None:
            raise self.error
        if len(self.calls) <= self.down:
            raise _outage()

    def label_unit(self, unit: Any, token: str) -> None:
        self._call(unit, token)

    def _export_call(self, *args: Any) -> str:
        # The builder reports an outage as BuildInterruptedError, its cause the outage.
        try:
            self._call(*args)
        except OperationalError as error:
            raise BuildInterruptedError() from error
        return "completed"

    def build_export(self, export_id: uuid.UUID, token: str, failure: Any) -> str:
        return self._export_call(export_id, token, failure)

    def build_export_part(self, part_id: uuid.UUID, token: str, failure: Any) -> str:
        return self._export_call(part_id, token, failure)

    def finish_export(self, export_id: uuid.UUID, token: str, failure: Any) -> str:
        return self._export_call(export_id, token, failure)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> FlakyRuntime:
    flaky = FlakyRuntime(**request.param)
    monkeypatch.setattr(tasks, "get_runtime", lambda: flaky)
    return flaky


ARGS = [str(uuid.uuid4()), str(uuid.uuid4()), [0, 1, 2]]


@pytest.mark.parametrize("runtime", [{"down": 3}], indirect=True)
def test_a_task_that_lost_the_database_retries_with_its_own_claim_token(
    runtime: FlakyRuntime,
) -> None:
    result = tasks.label_unit.apply(args=ARGS)
    assert result.successful(), result.result
    tokens = [token for _, token in runtime.calls]
    assert len(tokens) == 4
    assert len(set(tokens)) == 1  # every retry takes back the same claim
    assert tokens[0] is not None


@pytest.mark.parametrize("runtime", [{"down": 10**6}], indirect=True)
def test_a_task_gives_up_after_about_the_stale_timeout(runtime: FlakyRuntime) -> None:
    result = tasks.label_unit.apply(args=ARGS)
    assert result.failed()
    assert isinstance(result.result, OperationalError)
    assert len(runtime.calls) == outage_tries(STALE_S) + 1


@pytest.mark.parametrize("runtime", [{"down": 0, "error": ValueError("a bug")}], indirect=True)
def test_other_errors_are_not_retried(runtime: FlakyRuntime) -> None:
    result = tasks.label_unit.apply(args=ARGS)
    assert result.failed()
    assert isinstance(result.result, ValueError)
    assert len(runtime.calls) == 1


@pytest.mark.parametrize("runtime", [{"down": 0}], indirect=True)
def test_an_export_that_could_not_record_its_failure_records_it_on_retry(
    runtime: FlakyRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = {"code": "no_rows", "message": "nothing to train on", "details": None}
    first = True

    def build_export(export_id: uuid.UUID, token: str, given: Any) -> str:
        nonlocal first
        runtime.calls.append((export_id, token, given))
        if first:
            first = False
            raise BuildInterruptedError(failure) from _outage()
        return "failed"

    monkeypatch.setattr(runtime, "build_export", build_export)
    result = tasks.build_export.apply(args=[str(uuid.uuid4())])
    assert result.successful(), result.result
    assert result.result == "failed"
    (_, token, none), (_, again, recorded) = runtime.calls
    assert (none, recorded) == (None, failure)
    assert token == again


@pytest.mark.parametrize("runtime", [{"down": 2}], indirect=True)
@pytest.mark.parametrize("task", ["build_export", "build_export_part", "finish_export"])
def test_every_export_task_retries_an_outage_under_its_own_claim_token(
    runtime: FlakyRuntime, task: str
) -> None:
    item = str(uuid.uuid4())
    result = getattr(tasks, task).apply(args=[item])
    assert result.successful(), result.result
    assert result.result == "completed"
    assert [str(i) for i, _, _ in runtime.calls] == [item] * 3
    assert len({token for _, token, _ in runtime.calls}) == 1
