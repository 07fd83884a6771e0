"""Export files over real HTTP: ranges, validators, HEAD, path traversal and the tar archive.

The app here is a stand-in for the export router: the same paths, served by a real uvicorn
server, over an export folder the test writes. `tests/exports/test_pull.py` reuses it. The
last tests send the worst headers to a real `srft serve` with a real export.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response, StreamingResponse

from app.errors import NotFoundError, SrftError
from app.exports.files import (
    archive_response,
    file_response,
    media_type_for,
    resolve_export_file,
)
from tests.builders import make_trajectory
from tests.servers import free_port
from tests.test_embedded import KEY, Served

SHARD_BYTES = 3 * 1024 * 1024
ARCHIVE_MTIME = 1_700_000_000
SHARDS = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
FIRST = SHARDS[0]


@dataclass
class ServedExport:
    root: Path
    status: str = "completed"
    error: dict[str, Any] | None = None
    strong_etags: bool = True  # False: files go out with weak ETags, so If-Range never matches


def write_export(
    root: Path, names: list[str], *, size: int = SHARD_BYTES, seed: int = 0
) -> dict[str, Any]:
    """An export folder: random shard bytes and a manifest.json with their sha256 and sizes."""
    rng = random.Random(seed)
    shards = []
    for name in names:
        data = rng.randbytes(size)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        shards.append(
            {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": size, "rows": 10}
        )
    manifest = {"format": "tokenized_parquet", "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export_app(exports: dict[str, ServedExport]) -> FastAPI:
    """The export routes that `srft pull` talks to, over folders instead of the database."""
    app = FastAPI()

    async def srft_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SrftError)
        return JSONResponse(status_code=exc.status_code, content=exc.to_dict())

    app.add_exception_handler(SrftError, srft_error)

    def find(export_id: str) -> ServedExport:
        if export_id not in exports:
            raise NotFoundError(f"no export {export_id}")
        return exports[export_id]

    def manifest_of(export: ServedExport) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads((export.root / "manifest.json").read_text())
        return manifest

    @app.get("/v1/exports/{export_id}")
    def get_export(export_id: str) -> dict[str, Any]:
        export = find(export_id)
        done = export.status == "completed"
        return {
            "id": export_id,
            "status": export.status,
            "manifest": manifest_of(export) if done else None,
            "error": export.error,
        }

    @app.api_route("/v1/exports/{export_id}/files/{path:path}", methods=["GET", "HEAD"])
    def get_file(export_id: str, path: str, request: Request) -> Response:
        export = find(export_id)
        file = resolve_export_file(export.root, path)
        hashes = {shard["path"]: shard["sha256"] for shard in manifest_of(export)["shards"]}
        sha256 = hashes.get(path) if export.strong_etags else None
        return file_response(request, file, sha256=sha256, media_type=media_type_for(file))

    @app.get("/v1/exports/{export_id}/archive")
    def get_archive(export_id: str) -> Response:
        export = find(export_id)
        names = [shard["path"] for shard in manifest_of(export)["shards"]] + ["manifest.json"]
        return archive_response(
            export.root, names, filename=f"export-{export_id}.tar", mtime=ARCHIVE_MTIME
        )

    return app


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn server on loopback, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("served")
    root = base / "export"
    write_export(root, SHARDS)
    (base / "secret.txt").write_text("outside the export\n")
    (root / "data" / "escape.parquet").symlink_to(base / "secret.txt")
    return root


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Names past ustar's 100 characters or not ASCII, sizes not a multiple of 512."""
    root = tmp_path_factory.mktemp("odd") / "export"
    write_export(root, ["data/" + "a" * 150 + ".jsonl", "data/zürich-00000.jsonl"], size=1000)
    return root


@pytest.fixture(scope="module")
def base_url(export_root: Path, odd_root: Path) -> Iterator[str]:
    exports = {
        "e1": ServedExport(export_root),
        "weak": ServedExport(export_root, strong_etags=False),
        "odd": ServedExport(odd_root),
    }
    with serve(export_app(exports)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def shard_bytes(root: Path, name: str = FIRST) -> bytes:
    return (root / name).read_bytes()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_get_sends_the_file_with_its_sha256_as_etag(
    http: httpx.Client, export_root: Path
) -> None:
    expected = shard_bytes(export_root)
    response = http.get(f"/v1/exports/e1/files/{FIRST}")
    assert response.status_code == 200
    assert response.content == expected
    assert response.headers["content-length"] == str(SHARD_BYTES)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{sha256_of(expected)}"'
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert response.headers["content-disposition"] == (
        'attachment; filename="train-00000-of-00002.parquet"'
    )
    assert "content-range" not in response.headers


def test_head_sends_the_headers_without_a_body(http: httpx.Client, export_root: Path) -> None:
    response = http.head(f"/v1/exports/e1/files/{FIRST}")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(SHARD_BYTES)
    assert response.headers["etag"] == f'"{sha256_of(shard_bytes(export_root))}"'

    ranged = http.head(f"/v1/exports/e1/files/{FIRST}", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206
    assert ranged.content == b""
    assert ranged.headers["content-length"] == "10"
    assert ranged.headers["content-range"] == f"bytes 10-19/{SHARD_BYTES}"


def test_head_does_not_stream_the_file(export_root: Path) -> None:
    scope = {"type": "http", "method": "HEAD", "path": "/", "headers": [], "query_string": b""}
    response = file_response(
        Request(scope), export_root / FIRST, sha256=None, media_type="application/octet-stream"
    )
    assert not isinstance(response, StreamingResponse)
    assert response.body == b""
    assert response.headers["content-length"] == str(SHARD_BYTES)


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=100-199", 100, 200),
        # across the server's 1 MiB read chunks
        ("bytes=1048000-2097700", 1048000, 2097701),
        ("bytes=3000000-", 3000000, SHARD_BYTES),
        ("bytes=-500", SHARD_BYTES - 500, SHARD_BYTES),
        ("bytes=-99999999", 0, SHARD_BYTES),
        ("bytes=3145000-99999999", 3145000, SHARD_BYTES),
        ("Bytes=5-9", 5, 10),
    ],
)
def test_a_single_range_gets_206_with_exactly_those_bytes(
    http: httpx.Client, export_root: Path, header: str, start: int, stop: int
) -> None:
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == shard_bytes(export_root)[start:stop]
    assert response.headers["content-length"] == str(stop - start)
    assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{SHARD_BYTES}"


@pytest.mark.parametrize(
    "header", [f"bytes={SHARD_BYTES}-", f"bytes={SHARD_BYTES + 5}-9999999", "bytes=-0"]
)
def test_an_unsatisfiable_range_gets_416(http: httpx.Client, header: str) -> None:
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"Range": header})
    assert_range_not_satisfiable(response, SHARD_BYTES)


def assert_range_not_satisfiable(response: httpx.Response, size: int) -> None:
    """416 with the size it missed and the JSON error body every other error has."""
    assert response.status_code == 416, response.text[:300]
    assert response.headers["content-range"] == f"bytes */{size}"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "range_not_satisfiable"
    assert error["location"] == "header.Range"
    assert f"{size}-byte file" in error["message"]
    assert len(error["message"]) < 200  # a 5,000-digit header is not echoed whole


# Each part longer than int() accepts (4300 digits) and than any file size (19 digits).
HUGE = "9" * 5000
ZEROS = "0" * 5000


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        # RFC 9110 14.1.2: a last-pos past the end, or a suffix longer than the file, means
        # "to the end" / "the whole file", however many digits say so.
        (f"bytes=0-{HUGE}", 0, SHARD_BYTES),
        (f"bytes=3145000-{HUGE}", 3145000, SHARD_BYTES),
        (f"bytes=-{HUGE}", 0, SHARD_BYTES),
        (f"bytes=-{'9' * 20}", 0, SHARD_BYTES),
        # leading zeros do not make a number large
        (f"bytes={ZEROS}5-{ZEROS}9", 5, 10),
        (f"bytes=-{ZEROS}500", SHARD_BYTES - 500, SHARD_BYTES),
        (f"bytes={ZEROS}-0", 0, 1),
    ],
)
def test_ranges_with_thousands_of_digits_are_read_as_the_rfc_says(
    http: httpx.Client, export_root: Path, header: str, start: int, stop: int
) -> None:
    for method in ("GET", "HEAD"):
        response = http.request(method, f"/v1/exports/e1/files/{FIRST}", headers={"Range": header})
        assert response.status_code == 206, response.text[:300]
        assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{SHARD_BYTES}"
        assert response.headers["content-length"] == str(stop - start)
        if method == "GET":
            assert response.content == shard_bytes(export_root)[start:stop]


@pytest.mark.parametrize(
    "header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}", f"bytes=1{'0' * 19}-", f"bytes=-{ZEROS}"]
)
def test_a_first_byte_past_any_end_gets_416_whatever_its_digits(
    http: httpx.Client, header: str
) -> None:
    url = f"/v1/exports/e1/files/{FIRST}"
    assert_range_not_satisfiable(http.get(url, headers={"Range": header}), SHARD_BYTES)
    head = http.head(url, headers={"Range": header})
    assert head.status_code == 416
    assert head.headers["content-range"] == f"bytes */{SHARD_BYTES}"


@pytest.mark.parametrize(
    "header",
    [
        f"bytes=5-{ZEROS}4",  # last < first, spelled long: invalid, ignored
        f"bytes={HUGE}-5",
        f"bytes=0-{HUGE},5-9",
        f"bytes=0x10-{HUGE}",
    ],
)
def test_absurd_ranges_are_ignored(http: httpx.Client, export_root: Path, header: str) -> None:
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"Range": header})
    assert response.status_code == 200
    assert response.content == shard_bytes(export_root)
    assert "content-range" not in response.headers


@pytest.mark.parametrize(
    "header", ["bytes=abc", "bytes=9-5", "bytes=-", "items=0-5", "bytes=0-1,4-5", "0-5"]
)
def test_a_malformed_or_multiple_range_is_ignored(
    http: httpx.Client, export_root: Path, header: str
) -> None:
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"Range": header})
    assert response.status_code == 200
    assert response.content == shard_bytes(export_root)
    assert "content-range" not in response.headers


def test_if_range_with_the_etag_resumes_and_any_other_sends_everything(
    http: httpx.Client, export_root: Path
) -> None:
    data = shard_bytes(export_root)
    url = f"/v1/exports/e1/files/{FIRST}"
    same = http.get(url, headers={"Range": "bytes=100-", "If-Range": f'"{sha256_of(data)}"'})
    assert same.status_code == 206
    assert same.content == data[100:]
    other = http.get(url, headers={"Range": "bytes=100-", "If-Range": f'"{"0" * 64}"'})
    assert other.status_code == 200
    assert other.content == data


@pytest.mark.parametrize("form", ["exact", "weak", "list", "star"])
def test_if_none_match_gets_304(http: httpx.Client, export_root: Path, form: str) -> None:
    etag = f'"{sha256_of(shard_bytes(export_root))}"'
    header = {"exact": etag, "weak": f"W/{etag}", "list": f'"nope", {etag}', "star": "*"}[form]
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"If-None-Match": header})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag


def test_if_none_match_with_another_etag_sends_the_file(http: httpx.Client) -> None:
    response = http.get(f"/v1/exports/e1/files/{FIRST}", headers={"If-None-Match": '"nope"'})
    assert response.status_code == 200
    assert len(response.content) == SHARD_BYTES


def test_without_a_sha256_the_etag_is_weak_and_never_satisfies_if_range(
    http: httpx.Client, export_root: Path
) -> None:
    url = f"/v1/exports/weak/files/{FIRST}"
    etag = http.head(url).headers["etag"]
    assert etag.startswith('W/"')
    response = http.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
    assert response.status_code == 200
    assert response.content == shard_bytes(export_root)
    assert http.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_manifest_json_is_served_as_json(http: httpx.Client, export_root: Path) -> None:
    response = http.get("/v1/exports/e1/files/manifest.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == (export_root / "manifest.json").read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/secret.txt",
        "data/%2e%2e/%2e%2e/secret.txt",
        "%2Fetc%2Fpasswd",
        "data%5C..%5C..%5Csecret.txt",
        "data/escape.parquet",  # a symlink to a file outside the export
        "data/missing.parquet",
        "data",  # a directory
        "",
    ],
)
def test_paths_outside_the_export_or_missing_get_404(http: httpx.Client, path: str) -> None:
    response = http.get(f"/v1/exports/e1/files/{path}")
    assert response.status_code == 404
    # The route ran and refused (a route miss would not have this body).
    assert response.json()["error"]["code"] == "not_found"
    assert "outside the export" not in response.text


def test_literal_dot_dot_in_the_request_line_gets_404(base_url: str) -> None:
    # httpx normalises `..` away, so send the request line as an attacker would.
    url = httpx.URL(base_url)
    assert url.port is not None
    connection = HTTPConnection(url.host, url.port, timeout=10)
    try:
        connection.request("GET", "/v1/exports/e1/files/data/../../secret.txt")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 404
    assert body["error"]["code"] == "not_found"
    assert "data/../../secret.txt" in body["error"]["message"]


@pytest.mark.parametrize(
    "relative",
    [
        "../secret.txt",
        "data/../../secret.txt",
        "data/../manifest.json",
        "./manifest.json",
        "/etc/passwd",
        "data\\train-00000-of-00002.parquet",
        "data//train-00000-of-00002.parquet",
        "manifest.json\x00",
        "data/escape.parquet",
        "data/",
        "data",
        "nothing.json",
    ],
)
def test_resolve_export_file_refuses_anything_but_a_file_inside(
    export_root: Path, relative: str
) -> None:
    with pytest.raises(NotFoundError) as caught:
        resolve_export_file(export_root, relative)
    assert repr(relative) in caught.value.message


def test_resolve_export_file_finds_shards(export_root: Path) -> None:
    assert resolve_export_file(export_root, FIRST) == (export_root / FIRST).resolve()
    assert resolve_export_file(export_root, "manifest.json").read_bytes().startswith(b"{")


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("a.parquet", "application/vnd.apache.parquet"),
        ("a.jsonl", "application/x-ndjson"),
        ("manifest.json", "application/json"),
        ("a.bin", "application/octet-stream"),
    ],
)
def test_media_type_for(name: str, media_type: str) -> None:
    assert media_type_for(Path("data") / name) == media_type


@pytest.mark.parametrize(("export_id", "fixture"), [("e1", "export_root"), ("odd", "odd_root")])
def test_the_archive_holds_exactly_the_files_in_one_folder(
    http: httpx.Client, request: pytest.FixtureRequest, export_id: str, fixture: str
) -> None:
    root: Path = request.getfixturevalue(fixture)
    manifest = json.loads((root / "manifest.json").read_text())
    names = [shard["path"] for shard in manifest["shards"]] + ["manifest.json"]

    response = http.get(f"/v1/exports/{export_id}/archive")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-tar"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="export-{export_id}.tar"'
    )
    assert response.headers["content-length"] == str(len(response.content))
    assert response.content.endswith(bytes(2 * tarfile.BLOCKSIZE))  # the end-of-archive marker

    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [f"export-{export_id}/{name}" for name in names]
        for member, name in zip(members, names, strict=True):
            assert member.isfile()
            assert (member.mtime, member.mode, member.uid, member.gid) == (
                ARCHIVE_MTIME,
                0o644,
                0,
                0,
            )
            assert (member.uname, member.gname) == ("", "")
            extracted = archive.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (root / name).read_bytes()


def test_two_archives_of_the_same_files_are_byte_identical(http: httpx.Client) -> None:
    first = http.get("/v1/exports/e1/archive").content
    second = http.get("/v1/exports/e1/archive").content
    assert sha256_of(first) == sha256_of(second)


# ------------------------------------------------------------- the real service, end to end


@dataclass
class ServedFile:
    url: str  # the file's URL on a running `srft serve`
    headers: dict[str, str]
    size: int


@pytest.fixture(scope="module")
def served_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedFile]:
    """A real `srft serve` (the embedded default) with one completed openai_jsonl export: an
    uploaded run, labeled by the built-in rules critic."""
    server = Served(tmp_path_factory.mktemp("served"))
    server.start()
    try:
        headers = {"Authorization": f"Bearer {KEY.findall(server.log.read_text())[0]}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            created = client.post("/v1/trajectories", json=make_trajectory(3, resolved=False))
            assert created.status_code == 201, created.text
            trajectory_id = created.json()["trajectories"][0]["id"]
            job = client.post("/v1/jobs", json={"selection": {"trajectory_ids": [trajectory_id]}})
            assert job.status_code == 202, job.text
            assert _finished(client, f"/v1/jobs/{job.json()['id']}")["status"] == "completed"
            export = client.post(
                "/v1/exports", json={"job_ids": [job.json()["id"]], "format": "openai_jsonl"}
            )
            assert export.status_code == 202, export.text
            done = _finished(client, f"/v1/exports/{export.json()['id']}")
            assert done["status"] == "completed", done
        shard = done["manifest"]["shards"][0]
        yield ServedFile(
            f"{server.url}/v1/exports/{done['id']}/files/{shard['path']}", headers, shard["bytes"]
        )
    finally:
        server.stop()


def _finished(client: httpx.Client, path: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        state: dict[str, Any] = client.get(path).json()
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.1)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_service_never_answers_500_to_a_huge_range(
    served_file: ServedFile, method: str
) -> None:
    size = served_file.size
    with httpx.Client(headers=served_file.headers, timeout=30) as client:
        whole = client.get(served_file.url).content
        assert len(whole) == size
        for header in (f"bytes=0-{HUGE}", f"bytes=-{HUGE}"):
            response = client.request(method, served_file.url, headers={"Range": header})
            assert response.status_code == 206, response.text[:300]
            assert response.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
            assert response.content == (whole if method == "GET" else b"")
        for header in (f"bytes=5-{ZEROS}4", f"bytes={HUGE}-5"):
            response = client.request(method, served_file.url, headers={"Range": header})
            assert response.status_code == 200, response.text[:300]
            assert response.content == (whole if method == "GET" else b"")
        for header in (f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}", f"bytes={size}-"):
            response = client.request(method, served_file.url, headers={"Range": header})
            assert response.status_code == 416
            assert response.headers["content-range"] == f"bytes */{size}"
            if method == "GET":
                assert_range_not_satisfiable(response, size)


def test_the_service_never_answers_500_to_a_huge_content_length(served_file: ServedFile) -> None:
    url = httpx.URL(served_file.url)
    assert url.port is not None
    connection = HTTPConnection(url.host, url.port, timeout=10)
    try:
        connection.putrequest("POST", "/v1/trajectories")
        connection.putheader("Authorization", served_file.headers["Authorization"])
        connection.putheader("Content-Length", HUGE)
        connection.endheaders(b"{}")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    # The HTTP server refuses it before the app sees it; the app refuses it too (413), as
    # tests/trajectories checks without a server in front.
    assert response.status in (400, 413)
