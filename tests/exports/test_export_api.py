"""The export API: requests refused with a reason and nothing created, downloads of a completed
export (Range, ETag = sha256, the archive, a verified pull), other projects kept out, tokenizers
only from the Hub or SRFT_TOKENIZER_DIRS, and an export built by a real `srft worker` process
through Redis."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.auth import service as auth_service
from app.exports.pull import pull_export, verify_directory
from app.models import Export
from app.recipe.tokenizer_names import INVALID_REVISION, INVALID_TOKENIZER
from tests.e2e import Api, Workers
from tests.exports.conftest import Corpus


def _export_count(api: Api) -> int:
    with api.database.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(Export)) or 0)


@pytest.mark.parametrize(
    ("change", "status", "code", "location"),
    [
        ({"job_ids": [str(uuid.uuid4())]}, 422, "unknown_jobs", "job_ids"),
        ({"job_ids": []}, 422, "validation_error", "body.job_ids"),
        ({"policy": "rfts"}, 422, "validation_error", "body.policy"),
        ({"format": "csv"}, 422, "validation_error", "body.format"),
        ({"format": "tokenized_parquet"}, 422, "invalid_export", "tokenizer"),
        ({"max_seq_len": 4096}, 422, "invalid_export", "max_seq_len"),
        ({"tokenizer": "gpt2"}, 422, "invalid_export", "tokenizer"),
        (
            {"format": "openai_jsonl_raw", "max_seq_len": 4096, "overflow": "split"},
            422,
            "invalid_export",
            "max_seq_len",
        ),
        (
            {"format": "prm_jsonl", "tokenizer": "gpt2", "max_seq_len": 4096},
            422,
            "invalid_export",
            "tokenizer",
        ),
        (
            {"format": "openai_jsonl_raw", "options": {"soft": True}},
            422,
            "invalid_export",
            "options.soft",
        ),
        ({"format": "openai_jsonl", "max_seq_len": 8}, 422, "validation_error", "body.max_seq_len"),
        ({"options": {"soft": True}}, 422, "invalid_export", "options.soft"),
        ({"options": {"mask_labels": ["misteak"]}}, 422, "unknown_labels", "options.mask_labels"),
        ({"options": {"unlabeled": "skip"}}, 422, "validation_error", "body.options.unlabeled"),
        ({"overflow": "wrap"}, 422, "validation_error", "body.overflow"),
        ({"colour": "red"}, 422, "validation_error", "body.colour"),
        (
            {"selection": {"trajectory_ids": [str(uuid.uuid4())]}},
            422,
            "unknown_trajectories",
            "selection.trajectory_ids",
        ),
    ],
)
def test_bad_requests_say_what_and_where_and_create_nothing(
    corpus: Corpus, change: dict[str, Any], status: int, code: str, location: str
) -> None:
    before = _export_count(corpus.api)
    response = corpus.api.post("/v1/exports", json={"job_ids": [corpus.job_id]} | change)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert location in (error["location"] or "")
    assert _export_count(corpus.api) == before


def test_a_job_still_running_is_a_conflict(corpus: Corpus) -> None:
    job = corpus.api.start_job(
        {"selection": {"trajectory_ids": corpus.override_ids[:1]}, "scope": "all", "cache": False}
    )
    before = _export_count(corpus.api)
    response = corpus.api.post("/v1/exports", json={"job_ids": [corpus.job_id, job["id"]]})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "job_not_finished"
    assert error["details"]["unfinished"] == [job["id"]]
    assert _export_count(corpus.api) == before
    corpus.api.post(f"/v1/jobs/{job['id']}/cancel")


@pytest.fixture(scope="module")
def completed(corpus: Corpus, tokenizers: dict[str, Path]) -> dict[str, Any]:
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["chatml"]),
            "shard_max_rows": 8,
        }
    )
    assert export["status"] == "completed", export
    assert len(export["manifest"]["shards"]) >= 3
    return export


def test_files_download_with_etag_length_and_ranges(
    corpus: Corpus, completed: dict[str, Any]
) -> None:
    shard = completed["manifest"]["shards"][1]
    url = f"/v1/exports/{completed['id']}/files/{shard['path']}"
    on_disk = (corpus.path(completed) / shard["path"]).read_bytes()
    full = corpus.api.get(url)
    assert full.status_code == 200
    assert full.content == on_disk
    assert full.headers["etag"] == f'"{shard["sha256"]}"'
    assert int(full.headers["content-length"]) == shard["bytes"] == len(on_disk)
    assert full.headers["content-type"] == "application/vnd.apache.parquet"
    part = corpus.api.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == on_disk[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(on_disk)}"
    cached = corpus.api.get(url, headers={"If-None-Match": full.headers["etag"]})
    assert cached.status_code == 304
    manifest = corpus.api.get(f"/v1/exports/{completed['id']}/files/manifest.json")
    assert json.loads(manifest.content) == completed["manifest"]
    for name in ("data/nothing.parquet", "%2e%2e/%2e%2e/%2e%2e/etc/passwd"):
        missing = corpus.api.get(f"/v1/exports/{completed['id']}/files/{name}")
        assert missing.status_code == 404, name


def test_the_archive_holds_exactly_the_files(corpus: Corpus, completed: dict[str, Any]) -> None:
    response = corpus.api.get(f"/v1/exports/{completed['id']}/archive")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    root = corpus.path(completed)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        members = {m.name.split("/", 1)[1]: archive.extractfile(m) for m in archive.getmembers()}
        names = ["manifest.json", *(s["path"] for s in completed["manifest"]["shards"])]
        assert sorted(members) == sorted(names)
        for name, handle in members.items():
            assert handle is not None
            assert handle.read() == (root / name).read_bytes()


@contextmanager
def authorized(api: Api) -> Iterator[httpx.Client]:
    """The in-process client with the key on every request, as `srft pull` sends it."""
    api.client.headers.update(api.headers)
    try:
        yield api.client
    finally:
        del api.client.headers["Authorization"]


def test_pull_verifies_every_file(
    corpus: Corpus, completed: dict[str, Any], tmp_path: Path
) -> None:
    with authorized(corpus.api) as client:
        result = pull_export(client, completed["id"], tmp_path / "out")
    assert result.files == len(completed["manifest"]["shards"])
    assert verify_directory(tmp_path / "out") == []
    # A shard damaged on disk is found, and the next pull repairs it.
    shard = tmp_path / "out" / completed["manifest"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert verify_directory(tmp_path / "out")
    with authorized(corpus.api) as client:
        again = pull_export(client, completed["id"], tmp_path / "out")
    assert again.skipped == result.files - 1
    assert verify_directory(tmp_path / "out") == []


def test_other_projects_see_nothing(corpus: Corpus, completed: dict[str, Any]) -> None:
    with corpus.api.database.transaction() as session:
        key = auth_service.create_key(session, "other", project_name=f"o-{uuid.uuid4().hex[:6]}")
    other = {"Authorization": f"Bearer {key.key}"}
    client = corpus.api.client
    for path in (
        f"/v1/exports/{completed['id']}",
        f"/v1/exports/{completed['id']}/files/manifest.json",
        f"/v1/exports/{completed['id']}/archive",
    ):
        assert client.get(path, headers=other).status_code == 404
    assert client.get("/v1/exports", headers=other).json()["items"] == []
    refused = client.post("/v1/exports", json={"job_ids": [corpus.job_id]}, headers=other)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unknown_jobs"
    assert client.get(f"/v1/exports/{completed['id']}").status_code == 401


def test_listing_pages_newest_first(corpus: Corpus, completed: dict[str, Any]) -> None:
    newer = corpus.export({"job_ids": [corpus.job_id], "policy": "sft"})
    first = corpus.api.get("/v1/exports", params={"limit": 1}).json()
    assert first["items"][0]["id"] == newer["id"]
    assert len(first["items"]) == 1
    second = corpus.api.get(
        "/v1/exports", params={"limit": 1, "cursor": first["next_cursor"]}
    ).json()
    assert second["items"][0]["id"] < first["items"][0]["id"]


@pytest.mark.parametrize(
    ("exists", "missing"),
    [
        ("/etc", "/etc-srft-missing"),
        ("/etc/passwd", "/etc/srft-missing"),
        ("/proc/self/environ", "/proc/self/srft-missing"),
        ("..", "../srft-missing"),
        ("./app", "./srft-missing"),
        ("app/exports/service.py", "app/exports/srft-missing.py"),
        ("{export}", "{exports}/{project}/{uuid}"),  # an export's folder (any project's)
        ("{root}/../{root_name}/chatml", "{root}/../{root_name}/srft-missing"),
        ("{root}/chatml/../chatml", "{root}/chatml/../srft-missing"),
        ("{root}/../..", "{root}/../srft-missing"),
    ],
)
def test_a_tokenizer_outside_the_allowed_directories_is_refused_alike(
    corpus: Corpus, completed: dict[str, Any], tokenizer_root: Path, exists: str, missing: str
) -> None:
    export = corpus.path(completed)
    values = {
        "export": export,
        "exports": corpus.api.settings.export_dir,
        "project": uuid.uuid4(),
        "uuid": uuid.uuid4(),
        "root": tokenizer_root,
        "root_name": tokenizer_root.name,
    }
    before = _export_count(corpus.api)
    errors = []
    for template, present in ((exists, True), (missing, False)):
        name = template.format(**values)
        assert Path(name).exists() is present, name
        response = corpus.api.post(
            "/v1/exports",
            json={"job_ids": [corpus.job_id], "format": "tokenized_parquet", "tokenizer": name},
        )
        assert response.status_code == 422, response.text
        errors.append(response.json()["error"])
    assert errors[0] == errors[1], "the answer must not tell whether the path exists"
    assert errors[0] == {
        "code": "invalid_tokenizer",
        "message": INVALID_TOKENIZER,
        "location": "tokenizer",
    }
    assert _export_count(corpus.api) == before


@pytest.mark.parametrize("revision", ["../../../etc", "refs/../../x", "/main", "main\n", "a" * 200])
def test_a_tokenizer_revision_that_could_name_a_path_is_refused(
    corpus: Corpus, revision: str
) -> None:
    response = corpus.api.post(
        "/v1/exports",
        json={
            "job_ids": [corpus.job_id],
            "format": "tokenized_parquet",
            "tokenizer": "Qwen/Qwen2.5-Coder-7B-Instruct",
            "tokenizer_revision": revision,
        },
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == {
        "code": "invalid_tokenizer",
        "message": INVALID_REVISION,
        "location": "tokenizer_revision",
    }


def _unavailable(name: str) -> dict[str, Any]:
    message = f"the tokenizer {name!r} could not be loaded from the Hub or an allowed directory"
    return {"code": "tokenizer_unavailable", "message": message, "details": None}


def test_a_symlink_out_of_the_allowed_directory_fails_the_export_alike(
    corpus: Corpus, tokenizers: dict[str, Path], tokenizer_root: Path, tmp_path: Path
) -> None:
    """Inside the allowed directory as written, outside once resolved: the worker refuses it,
    with the same message whether the link leads to a tokenizer or to nothing."""
    outside = shutil.copytree(tokenizers["chatml"], tmp_path / "outside")
    link = tokenizer_root / f"escape-{uuid.uuid4().hex[:8]}"
    body = {"job_ids": [corpus.job_id], "format": "tokenized_parquet", "tokenizer": str(link)}
    link.symlink_to(outside, target_is_directory=True)
    try:
        to_a_tokenizer = corpus.export(body)
        link.unlink()
        link.symlink_to(tmp_path / "missing", target_is_directory=True)
        to_nothing = corpus.export(body)
    finally:
        link.unlink()
    missing = str(tokenizer_root / "srft-missing")
    never_there = corpus.export(body | {"tokenizer": missing})
    for export in (to_a_tokenizer, to_nothing):
        assert export["status"] == "failed"
        assert export["error"] == _unavailable(str(link))
    assert never_there["error"] == _unavailable(missing)


def test_a_hub_id_is_never_loaded_from_a_folder_of_that_name(
    corpus: Corpus, tokenizers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers would load `srft-test/chatml` from the working directory if such a folder
    is there; the worker refuses instead (and never reaches the Hub for it)."""
    shutil.copytree(tokenizers["chatml"], tmp_path / "srft-test" / "chatml")
    monkeypatch.chdir(tmp_path)
    export = corpus.export(
        {"job_ids": [corpus.job_id], "format": "tokenized_parquet", "tokenizer": "srft-test/chatml"}
    )
    assert export["status"] == "failed"
    assert export["error"] == _unavailable("srft-test/chatml")


def test_a_worker_process_builds_the_export(
    corpus: Corpus, workers: Workers, tmp_path: Path
) -> None:
    response = corpus.api.post(
        "/v1/exports", json={"job_ids": [corpus.job_id], "format": "prm_jsonl"}
    )
    assert response.status_code == 202
    export = response.json()
    assert export["status"] == "queued"
    deadline = time.monotonic() + 60
    while export["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, workers.logs()[-3000:]
        time.sleep(0.2)
        export = corpus.api.get(f"/v1/exports/{export['id']}").json()
    assert export["status"] == "completed", export
    assert export["progress"]["trajectories_done"] == export["progress"]["trajectories_total"]
    # Built by the worker, served by the API: the same folder, verified end to end.
    with authorized(corpus.api) as client:
        result = pull_export(client, export["id"], tmp_path)
    assert result.files == len(export["manifest"]["shards"])
    assert verify_directory(tmp_path) == []
