"""Freeing space: DELETE of an export (its row and files), a job (its verdicts) and a trajectory
(its steps, verdicts and human labels); each refused with 409 while work still needs it, 404
for another project's ids; an export's size from its manifest.

On a committed database of the module's own (the builder reads it from its own connections)
with no worker: jobs and exports stay queued until a test labels or builds them here.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.critic.judge import StepOutcome
from app.errors import ConflictError, NotFoundError
from app.exports import service as export_service
from app.exports.builder import build_export, building_root, export_path
from app.exports.pull import pull_export, verify_directory
from app.exports.schemas import ExportCreate
from app.jobs import service as job_service
from app.models import Export, HumanLabel, Job, Step, Verdict
from app.status import ExportStatus
from tests.builders import make_trajectory
from tests.e2e import Api
from tests.helpers import outcome, prepare_job, record


def _delete(api: Api, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return api.client.delete(path, headers=headers or api.headers)


def _runs(api: Api, salt: str, *resolved: bool | None) -> list[str]:
    """One stored run per `resolved` value, in that order."""
    items = [
        make_trajectory(2 + n, salt=f"{salt}-{n}-{uuid.uuid4().hex}", resolved=r)
        for n, r in enumerate(resolved)
    ]
    runs = api.upload(json.dumps(items).encode())
    return [run["id"] for run in runs]


def _labeled_job(api: Api, ids: list[str], scope: str = "all") -> str:
    """A job over `ids`, every step of it labelled here as a worker would, then finished."""
    job = api.start_job({"selection": {"trajectory_ids": ids}, "scope": scope, "cache": False})
    with api.database.transaction() as session:
        prepare_job(session, job["id"])
        rows = session.execute(
            select(Verdict.trajectory_id, Verdict.step_index).where(
                Verdict.job_id == uuid.UUID(job["id"])
            )
        ).all()
        outcomes: dict[uuid.UUID, list[StepOutcome]] = {}
        for trajectory_id, step in rows:
            outcomes.setdefault(trajectory_id, []).append(outcome(step, "good", reason="test"))
        record(session, job["id"], outcomes)
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"
    return str(job["id"])


def _queued_export(api: Api, job_ids: list[str], **body: Any) -> str:
    response = api.post("/v1/exports", json={"job_ids": job_ids, **body})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    assert response.json()["size_bytes"] is None
    return str(response.json()["id"])


def _build(api: Api, export_id: str) -> dict[str, Any]:
    assert build_export(api.database, api.settings, uuid.UUID(export_id)) == "completed"
    export: dict[str, Any] = api.get(f"/v1/exports/{export_id}").json()
    return export


def _folder(api: Api, export_id: str) -> Path:
    with api.database.transaction() as session:
        row = session.get(Export, uuid.UUID(export_id))
        assert row is not None
        return export_path(api.settings, row.project_id, row.id)


def _count(api: Api, model: Any, *where: Any) -> int:
    with api.database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def _refused(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 409, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    return error


# ---------------------------------------------------------------------- exports


def test_an_export_is_sized_from_its_manifest_and_deleted_with_its_files(api: Api) -> None:
    job = _labeled_job(api, _runs(api, "size", False, False, None))
    export = _build(api, _queued_export(api, [job], shard_max_rows=1))
    kept = _build(api, _queued_export(api, [job]))
    root = _folder(api, export["id"])
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == len(export["manifest"]["shards"]) + 1 == 4
    assert export["size_bytes"] == sum(p.stat().st_size for p in files)
    listed = {e["id"]: e for e in api.get("/v1/exports").json()["items"]}
    assert listed[export["id"]]["size_bytes"] == export["size_bytes"]
    # What a dead attempt at building it left behind goes too.
    leftover = building_root(api.settings) / f"{export['id']}-{uuid.uuid4()}"
    (leftover / "data").mkdir(parents=True)
    (leftover / "data" / "train-00000-of-00001.jsonl").write_bytes(b"{}\n")

    response = _delete(api, f"/v1/exports/{export['id']}")
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert not root.exists()
    assert not leftover.exists()
    assert api.get(f"/v1/exports/{export['id']}").status_code == 404
    assert api.get(f"/v1/exports/{export['id']}/files/manifest.json").status_code == 404
    assert export["id"] not in {e["id"] for e in api.get("/v1/exports").json()["items"]}
    assert _delete(api, f"/v1/exports/{export['id']}").status_code == 404
    # Nothing else went with it: the job, and another export of it with its files.
    assert api.get(f"/v1/jobs/{job}").status_code == 200
    assert _folder(api, kept["id"]).is_dir()
    assert api.get(f"/v1/exports/{kept['id']}/files/manifest.json").status_code == 200


def test_an_export_whose_files_are_already_gone_is_deleted(api: Api) -> None:
    job = _labeled_job(api, _runs(api, "gone", False))
    export = _build(api, _queued_export(api, [job]))
    shutil.rmtree(_folder(api, export["id"]))
    assert _delete(api, f"/v1/exports/{export['id']}").status_code == 204
    assert api.get(f"/v1/exports/{export['id']}").status_code == 404


@pytest.mark.parametrize("status", [ExportStatus.QUEUED, ExportStatus.RUNNING])
def test_an_export_being_built_cannot_be_deleted(api: Api, status: ExportStatus) -> None:
    job = _labeled_job(api, _runs(api, f"open-{status}", False))
    export_id = _queued_export(api, [job])
    with api.database.transaction() as session:
        session.execute(
            update(Export).where(Export.id == uuid.UUID(export_id)).values(status=status)
        )
    error = _refused(_delete(api, f"/v1/exports/{export_id}"), "export_not_finished")
    assert f"export {export_id} is {status}" in error["message"]
    assert "wait until it has finished" in error["message"]
    assert error["location"] == "path.export_id"
    assert api.get(f"/v1/exports/{export_id}").json()["status"] == status
    with api.database.transaction() as session:
        session.execute(
            update(Export)
            .where(Export.id == uuid.UUID(export_id))
            .values(status=ExportStatus.QUEUED)
        )
    _build(api, export_id)
    assert _delete(api, f"/v1/exports/{export_id}").status_code == 204


# ---------------------------------------------------------------------- jobs


def test_a_job_still_labeling_cannot_be_deleted_until_cancelled(api: Api) -> None:
    ids = _runs(api, "labeling", False, None)
    job = api.start_job({"selection": {"trajectory_ids": ids}, "cache": False})["id"]
    with api.database.transaction() as session:
        prepare_job(session, job)
    verdicts = _count(api, Verdict, Verdict.job_id == uuid.UUID(job))
    assert verdicts == 2 + 3
    error = _refused(_delete(api, f"/v1/jobs/{job}"), "job_not_finished")
    assert f"job {job} is queued: cancel it first" in error["message"]
    assert _count(api, Verdict, Verdict.job_id == uuid.UUID(job)) == verdicts
    assert api.post(f"/v1/jobs/{job}/cancel").status_code == 200

    assert _delete(api, f"/v1/jobs/{job}").status_code == 204
    assert api.get(f"/v1/jobs/{job}").status_code == 404
    assert api.get(f"/v1/jobs/{job}/verdicts").status_code == 404
    assert _count(api, Verdict, Verdict.job_id == uuid.UUID(job)) == 0
    for trajectory_id in ids:  # the runs stay
        assert api.get(f"/v1/trajectories/{trajectory_id}").status_code == 200


def test_a_job_an_unbuilt_export_uses_waits_and_its_finished_export_outlives_it(
    api: Api, tmp_path: Path
) -> None:
    job = _labeled_job(api, _runs(api, "used", False, True, None))
    other = _labeled_job(api, _runs(api, "unused", False))
    export_id = _queued_export(api, [job], shard_max_rows=1)
    error = _refused(_delete(api, f"/v1/jobs/{job}"), "job_in_use")
    assert f"export {export_id} (queued) uses this job" in error["message"]
    assert error["details"] == {"exports": [export_id]}
    assert api.get(f"/v1/jobs/{job}").status_code == 200
    # An export of another job blocks nothing.
    assert _delete(api, f"/v1/jobs/{other}").status_code == 204

    export = _build(api, export_id)
    assert _delete(api, f"/v1/jobs/{job}").status_code == 204
    assert api.get(f"/v1/jobs/{job}").status_code == 404
    assert _count(api, Verdict, Verdict.job_id == uuid.UUID(job)) == 0

    # The export is self-contained: it reads, downloads and pulls as before.
    after = api.get(f"/v1/exports/{export_id}")
    assert after.status_code == 200
    assert after.json() == export
    assert export["manifest"]["source_job_ids"] == [job]
    for shard in export["manifest"]["shards"]:
        response = api.get(f"/v1/exports/{export_id}/files/{shard['path']}")
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == shard["sha256"]
    archive = api.get(f"/v1/exports/{export_id}/archive")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert len(tar.getmembers()) == len(export["manifest"]["shards"]) + 1
    api.client.headers.update(api.headers)
    try:
        result = pull_export(api.client, export_id, tmp_path / "pulled")
    finally:
        del api.client.headers["Authorization"]
    assert result.files == len(export["manifest"]["shards"])
    assert verify_directory(tmp_path / "pulled") == []


def test_a_job_deleted_while_an_export_of_it_is_created_waits_and_is_refused(api: Api) -> None:
    """The export's transaction holds its jobs FOR SHARE; the deletion locks the job first,
    so it sees the export once committed instead of leaving it naming no job."""
    job_id = uuid.UUID(_labeled_job(api, _runs(api, "race", False)))
    refused: list[ConflictError] = []

    def delete() -> None:
        with api.database.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            try:
                job_service.delete_job(session, job)
            except ConflictError as error:
                refused.append(error)

    with api.database.sessions() as creating:
        job = creating.get(Job, job_id)
        assert job is not None
        body = ExportCreate.model_validate({"job_ids": [str(job_id)]})
        export = export_service.create_export(creating, job.project_id, body, api.settings)
        deleting = threading.Thread(target=delete)
        deleting.start()
        deleting.join(1.0)
        assert deleting.is_alive()  # waiting for the export's transaction
        creating.commit()
    deleting.join(30)
    assert [error.code for error in refused] == ["job_in_use"]
    assert str(export.id) in refused[0].message
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200


def test_a_cancel_or_retry_after_a_delete_of_the_same_job_is_a_404_not_a_500(api: Api) -> None:
    """Both read the job, then the delete commits first: the cancel and the retry lock the
    row afresh and find it gone."""
    actions: dict[str, Callable[[Session, Job], object]] = {
        "cancel": job_service.cancel_job,
        "retry": lambda session, job: job_service.retry_failed(session, job, chunk_size=8),
    }
    for name, action in actions.items():
        job_id = uuid.UUID(_labeled_job(api, _runs(api, f"gone-{name}", False)))
        with api.database.sessions() as late:
            job = job_service.get_job(late, _project(api, job_id), job_id)  # read before
            with api.database.transaction() as deleting:
                current = job_service.get_job(deleting, job.project_id, job_id)
                job_service.delete_job(deleting, current)
            with pytest.raises(NotFoundError):
                action(late, job)


def _project(api: Api, job_id: uuid.UUID) -> uuid.UUID:
    with api.database.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.project_id


# ---------------------------------------------------------------------- trajectories


def test_deleting_a_trajectory_takes_its_steps_verdicts_and_human_labels(api: Api) -> None:
    gone, kept = _runs(api, "delete", False, False)
    job = _labeled_job(api, [gone, kept])
    for trajectory_id in (gone, kept):
        labelled = api.client.put(
            f"/v1/trajectories/{trajectory_id}/steps/0/human_label",
            json={"label": "good"},
            headers=api.headers,
        )
        assert labelled.status_code == 200, labelled.text

    assert _delete(api, f"/v1/trajectories/{gone}").status_code == 204
    assert api.get(f"/v1/trajectories/{gone}").status_code == 404
    assert _delete(api, f"/v1/trajectories/{gone}").status_code == 404
    gone_id, kept_id = uuid.UUID(gone), uuid.UUID(kept)
    for model in (Step, Verdict, HumanLabel):
        assert _count(api, model, model.trajectory_id == gone_id) == 0, model
    assert _count(api, Step, Step.trajectory_id == kept_id) == 3
    assert _count(api, Verdict, Verdict.trajectory_id == kept_id) == 3
    assert _count(api, HumanLabel, HumanLabel.trajectory_id == kept_id) == 1
    assert {v["trajectory_id"] for v in api.verdicts(job)} == {kept}
    listed = api.get("/v1/trajectories", params={"limit": "100"}).json()["items"]
    assert gone not in {t["id"] for t in listed}


def test_a_trajectory_an_open_job_labels_cannot_be_deleted(api: Api) -> None:
    labeled, free = _runs(api, "job-open", False, False)
    job = api.start_job({"selection": {"trajectory_ids": [labeled]}, "cache": False})["id"]
    # While the job's rows are being written, any run of the project may still join it.
    preparing = _refused(_delete(api, f"/v1/trajectories/{free}"), "trajectory_in_use")
    assert preparing["details"] == {"jobs": [job], "exports": []}
    with api.database.transaction() as session:
        prepare_job(session, job)
    error = _refused(_delete(api, f"/v1/trajectories/{labeled}"), "trajectory_in_use")
    assert f"job {job} (queued) uses this trajectory" in error["message"]
    assert error["details"] == {"jobs": [job], "exports": []}
    assert api.get(f"/v1/trajectories/{labeled}").status_code == 200
    assert _delete(api, f"/v1/trajectories/{free}").status_code == 204
    assert api.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert _delete(api, f"/v1/trajectories/{labeled}").status_code == 204


def test_a_trajectory_an_unbuilt_export_would_read_cannot_be_deleted(api: Api) -> None:
    unresolved, resolved, unselected = _runs(api, "export-open", False, True, False)
    # scope=unresolved: the job labels only the unresolved run, but its exports read the
    # resolved one too (srft trains it in full).
    job = _labeled_job(api, [unresolved, resolved], scope="unresolved")
    assert _count(api, Verdict, Verdict.trajectory_id == uuid.UUID(resolved)) == 0
    export_id = _queued_export(api, [job])
    narrow_id = _queued_export(api, [job], selection={"trajectory_ids": [unresolved]})
    for trajectory_id, readers in ((unresolved, [export_id, narrow_id]), (resolved, [export_id])):
        error = _refused(_delete(api, f"/v1/trajectories/{trajectory_id}"), "trajectory_in_use")
        assert error["details"] == {"jobs": [], "exports": readers}
        assert f"export {export_id} (queued)" in error["message"]
    assert _delete(api, f"/v1/trajectories/{unselected}").status_code == 204

    _build(api, export_id)
    assert _delete(api, f"/v1/trajectories/{resolved}").status_code == 204
    _refused(_delete(api, f"/v1/trajectories/{unresolved}"), "trajectory_in_use")
    _build(api, narrow_id)
    assert _delete(api, f"/v1/trajectories/{unresolved}").status_code == 204


# ---------------------------------------------------------------------- projects


def test_another_projects_ids_answer_404_and_delete_nothing(api: Api) -> None:
    ids = _runs(api, "isolation", False)
    job = _labeled_job(api, ids)
    export = _build(api, _queued_export(api, [job]))
    with api.database.transaction() as session:
        key = auth_service.create_key(session, "other", project_name=f"o-{uuid.uuid4().hex[:6]}")
    other = {"Authorization": f"Bearer {key.key}"}
    paths = (f"/v1/exports/{export['id']}", f"/v1/jobs/{job}", f"/v1/trajectories/{ids[0]}")
    for path in paths:
        response = _delete(api, path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
        assert api.get(path).status_code == 200, path
        assert api.client.delete(path).status_code == 401
    assert _folder(api, export["id"]).is_dir()
    unknown = uuid.uuid4()
    for path in (f"/v1/exports/{unknown}", f"/v1/jobs/{unknown}", f"/v1/trajectories/{unknown}"):
        assert _delete(api, path).status_code == 404, path
