"""`pull_export` against a real HTTP server: clean pulls, cuts mid-shard, bad bytes, re-runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.exports.pull import PullError, PullResult, pull_export, verify_directory
from tests.exports.test_files import SHARD_BYTES, ServedExport, export_app, serve, write_export

SHARDS = [
    "data/train-00000-of-00003.parquet",
    "data/train-00001-of-00003.parquet",
    "data/train-00002-of-00003.parquet",
]
TOTAL = len(SHARDS) * SHARD_BYTES
CUT_AFTER = SHARD_BYTES // 2


class CuttingProxy:
    """A TCP proxy to `upstream_port` that closes each connection after `limit` bytes of
    response: a download cut half-way, as a dropped connection would cut it."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.upstream_port = upstream_port
        self.limit = limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            threading.Thread(target=self._relay, args=(downstream,), daemon=True).start()

    def _relay(self, downstream: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=_pipe, args=(downstream, upstream), daemon=True).start()
        sent = 0
        try:
            while sent < self.limit:
                data = upstream.recv(min(65536, self.limit - sent))
                if not data:
                    break
                downstream.sendall(data)
                sent += len(data)
        finally:
            for sock in (downstream, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass


@pytest.fixture
def exports(tmp_path: Path) -> dict[str, ServedExport]:
    root = tmp_path / "served"
    write_export(root, SHARDS, seed=1)
    return {"e1": ServedExport(root)}


@pytest.fixture
def base_url(exports: dict[str, ServedExport]) -> Iterator[str]:
    with serve(export_app(exports)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def served_bytes(exports: dict[str, ServedExport], name: str) -> bytes:
    return (exports["e1"].root / name).read_bytes()


def test_a_clean_pull_writes_verified_shards_and_the_manifest(
    http: httpx.Client, exports: dict[str, ServedExport], tmp_path: Path
) -> None:
    target = tmp_path / "pulled"
    calls: list[tuple[int, int]] = []
    result = pull_export(
        http, "e1", target, progress=lambda done, total: calls.append((done, total))
    )
    assert result == PullResult(target, 3, TOTAL, TOTAL, resumed=0, skipped=0)
    for name in SHARDS:
        assert (target / name).read_bytes() == served_bytes(exports, name)
    manifest = served_bytes(exports, "manifest.json")
    assert (target / "manifest.json").read_bytes() == manifest
    assert verify_directory(target) == []
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == sorted(
        [Path(name).name for name in SHARDS] + ["manifest.json"]
    )
    assert calls[-1] == (TOTAL, TOTAL)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_a_cut_download_resumes_from_the_part_file(
    http: httpx.Client, base_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "pulled"
    proxy = CuttingProxy(httpx.URL(base_url).port or 0, CUT_AFTER)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=30) as cut,
            pytest.raises(PullError, match="run again to resume") as caught,
        ):
            pull_export(cut, "e1", target)
    finally:
        proxy.close()
    assert SHARDS[0] in str(caught.value)
    part = target / (SHARDS[0] + ".part")
    # The cut came after the export's JSON and the response headers, inside the first shard.
    assert CUT_AFTER - 16384 < part.stat().st_size < CUT_AFTER
    assert not (target / SHARDS[0]).exists()
    assert not (target / "manifest.json").exists()
    assert verify_directory(target) != []

    already = part.stat().st_size
    calls: list[tuple[int, int]] = []
    result = pull_export(http, "e1", target, progress=lambda d, t: calls.append((d, t)))
    assert result.resumed == 1
    assert result.skipped == 0
    assert result.bytes_downloaded == TOTAL - already
    assert calls[0][0] >= already  # the part counts as done from the start
    assert not part.exists()
    assert verify_directory(target) == []


def test_a_part_that_the_server_will_not_resume_is_downloaded_again(
    exports: dict[str, ServedExport], http: httpx.Client, tmp_path: Path
) -> None:
    exports["e1"].strong_etags = False  # weak ETags: If-Range fails, the server sends 200
    target = tmp_path / "pulled"
    part = target / (SHARDS[0] + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from some other file")
    result = pull_export(http, "e1", target)
    assert result.resumed == 0
    assert result.bytes_downloaded == TOTAL
    assert verify_directory(target) == []


def test_bytes_that_do_not_match_the_manifest_are_refused(
    exports: dict[str, ServedExport], http: httpx.Client, tmp_path: Path
) -> None:
    served = exports["e1"].root / SHARDS[1]
    data = bytearray(served.read_bytes())
    data[12345] ^= 0xFF
    served.write_bytes(bytes(data))
    manifest = json.loads((exports["e1"].root / "manifest.json").read_text())
    expected = manifest["shards"][1]["sha256"]

    target = tmp_path / "pulled"
    with pytest.raises(PullError) as caught:
        pull_export(http, "e1", target)
    message = str(caught.value)
    assert SHARDS[1] in message
    assert expected in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert not (target / SHARDS[1]).exists()
    assert not (target / (SHARDS[1] + ".part")).exists()
    assert not (target / "manifest.json").exists()
    assert (target / SHARDS[0]).exists()  # shards before the bad one stay, verified


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        ("running", None, "is running, not completed"),
        ("queued", None, "is queued, not completed"),
        ("failed", {"code": "tokenizer", "message": "no such tokenizer"}, "no such tokenizer"),
    ],
)
def test_an_export_that_is_not_completed_is_refused(
    exports: dict[str, ServedExport],
    http: httpx.Client,
    tmp_path: Path,
    status: str,
    error: dict[str, str] | None,
    expected: str,
) -> None:
    exports["e1"].status = status
    exports["e1"].error = error
    with pytest.raises(PullError, match=expected):
        pull_export(http, "e1", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_an_unknown_export_reports_the_http_status_and_body(
    http: httpx.Client, tmp_path: Path
) -> None:
    with pytest.raises(PullError, match=r"HTTP 404.*no export nope"):
        pull_export(http, "nope", tmp_path / "pulled")


def test_pulling_a_complete_folder_again_downloads_nothing(
    http: httpx.Client, tmp_path: Path
) -> None:
    target = tmp_path / "pulled"
    pull_export(http, "e1", target)
    again = pull_export(http, "e1", target)
    assert again.skipped == len(SHARDS)
    assert again.bytes_downloaded == 0
    assert again.resumed == 0
    assert verify_directory(target) == []


def test_a_changed_file_is_downloaded_again_and_the_rest_skipped(
    http: httpx.Client, tmp_path: Path
) -> None:
    target = tmp_path / "pulled"
    pull_export(http, "e1", target)
    changed = bytearray((target / SHARDS[2]).read_bytes())
    changed[-1] ^= 1  # same size, other bytes
    (target / SHARDS[2]).write_bytes(bytes(changed))
    again = pull_export(http, "e1", target)
    assert (again.skipped, again.resumed) == (2, 0)
    assert again.bytes_downloaded == SHARD_BYTES
    assert verify_directory(target) == []


def test_a_folder_being_changed_loses_its_manifest_until_the_pull_finishes(
    http: httpx.Client, base_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "pulled"
    pull_export(http, "e1", target)
    (target / SHARDS[0]).unlink()
    proxy = CuttingProxy(httpx.URL(base_url).port or 0, CUT_AFTER)
    try:
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=30) as cut,
            pytest.raises(PullError, match="resume"),
        ):
            pull_export(cut, "e1", target)
    finally:
        proxy.close()
    assert not (target / "manifest.json").exists()
    pull_export(http, "e1", target)
    assert verify_directory(target) == []


def test_verify_directory_names_each_problem(http: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "pulled"
    assert verify_directory(target) == ["manifest.json is missing: the pull did not finish"]
    pull_export(http, "e1", target)
    (target / SHARDS[0]).unlink()
    (target / SHARDS[1]).write_bytes(b"short")
    changed = bytearray((target / SHARDS[2]).read_bytes())
    changed[0] ^= 1
    (target / SHARDS[2]).write_bytes(bytes(changed))
    problems = verify_directory(target)
    assert len(problems) == 3
    assert problems[0] == f"{SHARDS[0]}: missing"
    assert problems[1] == f"{SHARDS[1]}: 5 bytes, the manifest says {SHARD_BYTES}"
    assert problems[2].startswith(f"{SHARDS[2]}: sha256 ")


@pytest.mark.parametrize("path", ["../escape.parquet", "/tmp/escape.parquet", "data\\x.parquet"])
def test_shard_paths_leading_out_of_the_folder_are_refused(
    exports: dict[str, ServedExport], http: httpx.Client, tmp_path: Path, path: str
) -> None:
    manifest_path = exports["e1"].root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["path"] = path
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PullError, match="refusing shard path"):
        pull_export(http, "e1", tmp_path / "pulled")
    assert not (tmp_path / "escape.parquet").exists()
