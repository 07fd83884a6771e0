"""An export whose builder loses the database: nothing is left on disk or recorded as a
failure, the export stays claimed by its task, and the task's retry (same claim token) builds
it at once; a failure that could not be recorded is recorded by the retry. The outage is
stood in for by a service call that raises what a lost connection raises; the whole restart
of a real Postgres is in tests/workers/test_database_outage.py. And the sweeper hands a
stale export on once, not at every sweep until a worker gets to it."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.exports import service as export_service
from app.exports.builder import BuildInterruptedError, build_export, building_root, export_path
from app.exports.schemas import ExportCreate
from app.jobs.schemas import Selection
from app.models import Export, Job, utcnow
from tests.exports.conftest import Corpus


def _written(corpus: Corpus, **body: Any) -> uuid.UUID:
    """An export written but not queued: no worker may pick it up behind the test's back."""
    with corpus.api.database.transaction() as session:
        job = session.get(Job, uuid.UUID(corpus.job_id))
        assert job is not None
        request = ExportCreate(job_ids=[job.id], **body)
        export = export_service.create_export(session, job.project_id, request, corpus.api.settings)
        return export.id


def _row(corpus: Corpus, export_id: uuid.UUID) -> Export:
    with corpus.api.database.transaction() as session:
        export = session.get(Export, export_id)
        assert export is not None
        session.expunge(export)
        return export


def _lose_the_database(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("SELECT", {}, Exception("terminating connection"))


def test_a_build_that_loses_the_database_leaves_nothing_and_resumes_under_its_token(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, settings = corpus.api.database, corpus.api.settings
    export_id = _written(corpus)
    monkeypatch.setattr(export_service, "load_sources", _lose_the_database)
    with pytest.raises(BuildInterruptedError) as interrupted:
        build_export(database, settings, export_id, token="task-1")
    assert interrupted.value.failure is None
    row = _row(corpus, export_id)
    assert (row.status, row.claim_token, row.error) == ("running", "task-1", None)
    assert not list(building_root(settings).glob(f"{export_id}-*"))
    assert not export_path(settings, row.project_id, export_id).exists()

    monkeypatch.undo()
    # Another task cannot take it (the claim is fresh); the retry takes it back at once.
    assert build_export(database, settings, export_id) is None
    assert build_export(database, settings, export_id, token="task-1") == "completed"
    assert _row(corpus, export_id).status == "completed"


def test_a_failure_that_could_not_be_recorded_is_recorded_by_the_retry(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    database, settings = corpus.api.database, corpus.api.settings
    resolved = [t for t, detail in corpus.trajectories.items() if detail["resolved"] is True]
    # srft_unresolved drops resolved runs: nothing to write, a refusal with a reason.
    export_id = _written(
        corpus,
        policy="srft_unresolved",
        selection=Selection(trajectory_ids=[uuid.UUID(resolved[0])]),
    )
    monkeypatch.setattr(export_service, "fail", _lose_the_database)
    with pytest.raises(BuildInterruptedError) as interrupted:
        build_export(database, settings, export_id, token="task-1")
    failure = interrupted.value.failure
    assert failure is not None
    assert failure["code"] == "no_rows"
    assert _row(corpus, export_id).status == "running"  # not failed yet, but not forgotten
    assert not list(building_root(settings).glob(f"{export_id}-*"))

    monkeypatch.undo()
    assert build_export(database, settings, export_id, token="task-1", failure=failure) == (
        "failed"
    )
    row = _row(corpus, export_id)
    assert (row.status, row.error_code, row.error) == ("failed", "no_rows", failure["message"])


def test_a_stale_export_is_handed_on_by_one_sweep_not_by_every_sweep(corpus: Corpus) -> None:
    database, stale_s = corpus.api.database, corpus.api.settings.stale_after_s
    export_id = _written(corpus)
    with database.transaction() as session:
        assert export_service.claim(session, export_id, stale_s, token="dead-worker")
        session.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(claimed_at=utcnow() - timedelta(seconds=stale_s + 1))
        )
    with database.transaction() as session:
        assert export_id in export_service.sweep(session, stale_s)
    row = _row(corpus, export_id)
    assert (row.status, row.claim_token) == ("queued", None)
    with database.transaction() as session:
        assert export_id not in export_service.sweep(session, stale_s)
        # The builder that stalled learns at its next heartbeat that it lost the export.
        assert not export_service.heartbeat(session, export_id, "dead-worker", done=1, total=2)
    assert build_export(database, corpus.api.settings, export_id) == "completed"
