"""`srft ingest`: trajectory files, folders of Hugging Face Hub shards, JSON Lines of any size.

A `.json` or `.traj` file is one document and goes in one request, as the agent wrote it.
Files of rows are streamed, in constant memory: JSON Lines (`.jsonl`, `.ndjson`) line by line,
Parquet (`.parquet`) a few rows at a time, each row as the JSON object the importers read
(`app.trajectories.formats.parquet`). Rows travel as NDJSON batches that close at `--batch-rows`
rows or before `--batch-bytes` bytes, several requests in flight (`--concurrency`).

A batch is stored whole or not at all (the server's rule for one request), so a batch the
server refuses is split: the rows its error names are sent alone and the rest in halves, until
every row is either stored or refused on its own with its file and row number. A refused row
never stops the others; a key the server refuses stops everything.

Resuming: for each input, a small state file under `--state` records how many rows (and, for
JSON Lines, bytes) from the start of the file the server has answered, once every batch before
them is answered too, and which of them it refused. It is keyed by the service URL, the API key
and the file's path, size and modification time: a re-run skips what was answered without
reading it again, and a changed file starts over. Whatever was in flight when a run stopped is
sent again, and the server's deduplication counts it as duplicates.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.cli import app
from app.cli.client import DEFAULT_URL, ApiKeyOption, UrlOption, _client, _describe_error
from app.errors import InvalidParquetError, UnsupportedMediaTypeError
from app.retry import retry_after_s
from app.trajectories.formats import parquet as parquet_rows

DOCUMENT_SUFFIXES = (".json", ".traj")
LINES_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
UPLOAD_SUFFIXES = DOCUMENT_SUFFIXES + LINES_SUFFIXES + PARQUET_SUFFIXES
MiB = 1024 * 1024
# Safely under the server's default SRFT_MAX_UPLOAD_BYTES (64 MiB).
DEFAULT_BATCH_BYTES = 16 * MiB
DEFAULT_BATCH_ROWS = 1000
DEFAULT_STATE_DIR = Path(".srft-ingest")
# Transport errors, 429 and 5xx are tried this many times, backing off (about a minute in all),
# before a batch is given up for this run (it is not recorded as answered, so the next run
# sends it again).
MAX_ATTEMPTS = 8
MAX_RETRY_WAIT_S = 30.0
# Failures listed in the summary (all are counted) and kept per file in its state.
LISTED_FAILURES = 10
KEPT_FAILURES = 100
_LINE = re.compile(r"\bline (\d+)\b")
_SEND_ALONE = frozenset({400, 413, 422})
_RETRY = frozenset({429, 500, 502, 503, 504})


# ---------------------------------------------------------------- reading rows


@dataclass(frozen=True)
class Row:
    """One row of an input: its 1-based line or row number (0 for a whole document), the JSON
    text to send (None when it could not be read, with `error`), and how far into the file the
    input is read once this row is answered: rows (`end`) and bytes (`offset`, JSON Lines)."""

    number: int
    data: bytes | None
    end: int
    offset: int = 0
    error: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) + 1 if self.data is not None else 0


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(LINES_SUFFIXES):
        return "lines"
    return "document"


def read_rows(path: Path, *, position: int = 0, offset: int = 0) -> Iterator[Row]:
    """The rows of `path` from row `position` (JSON Lines: from byte `offset`), lazily."""
    kind = _kind(path)
    if kind == "parquet":
        return _parquet_rows(path, position)
    if kind == "lines":
        return _jsonl_rows(path, position, offset)
    return iter([] if position else [Row(0, path.read_bytes(), end=1)])


def _jsonl_rows(path: Path, position: int, offset: int) -> Iterator[Row]:
    with path.open("rb") as file:
        file.seek(offset)
        number = position
        for line in file:  # one line in memory at a time, however long the file is
            number += 1
            offset += len(line)
            data = line.strip()
            if number == 1 and data.startswith(codecs.BOM_UTF8):
                data = data[len(codecs.BOM_UTF8) :].strip()
            if data:
                yield Row(number, data, end=number, offset=offset)


def _parquet_rows(path: Path, position: int) -> Iterator[Row]:
    for number, row in parquet_rows.iter_rows(str(path), start=position):
        if isinstance(row, InvalidParquetError):
            yield Row(
                number, None, end=number, error=f"{row.code} at {row.location}: {row.message}"
            )
        else:
            data = json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()
            yield Row(number, data, end=number)


def count_rows(path: Path) -> int:
    """Rows in `path`, for the progress bar: Parquet from its footer, JSON Lines by counting
    newlines a megabyte at a time (blank lines included, so an estimate)."""
    kind = _kind(path)
    if kind == "parquet":
        return parquet_rows.count_rows(str(path))
    if kind == "document":
        return 1
    lines, last = 0, b"\n"
    with path.open("rb") as file:
        while chunk := file.read(MiB):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def batch_rows(rows: Iterable[Row], *, max_rows: int, max_bytes: int) -> Iterator[list[Row]]:
    """Consecutive rows in batches of at most `max_rows` rows and `max_bytes` bytes of NDJSON;
    a row larger than `max_bytes` alone is a batch of its own. Lazy: a batch is read only
    when it is asked for, so a file of any size is never held whole."""
    batch: list[Row] = []
    size = 0
    for row in rows:
        if batch and (len(batch) >= max_rows or size + row.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(row)
        size += row.size
    if batch:
        yield batch


# ---------------------------------------------------------------- resume state


@dataclass
class FileState:
    """How much of one input the server has answered, kept in a small JSON file."""

    file: Path
    path: Path
    size: int
    mtime_ns: int
    position: int = 0
    offset: int = 0
    refused: int = 0  # rows the server refused, of the `position` first
    refusals: list[tuple[int, str]] = field(default_factory=list)  # the first of them

    @classmethod
    def load(cls, directory: Path, target: str, path: Path, *, restart: bool) -> FileState:
        resolved = path.resolve()
        stat = resolved.stat()
        key = hashlib.sha256(f"{target}\n{resolved}".encode()).hexdigest()[:24]
        state = cls(
            directory / f"{path.name[:60]}.{key}.json", resolved, stat.st_size, stat.st_mtime_ns
        )
        if restart or not state.file.exists():
            return state
        try:
            saved = json.loads(state.file.read_text())
        except (OSError, ValueError):
            return state  # an unreadable state file costs a re-send, never a wrong skip
        if (saved.get("path"), saved.get("size"), saved.get("mtime_ns")) != (
            str(resolved),
            stat.st_size,
            stat.st_mtime_ns,
        ):
            return state
        state.position = int(saved.get("position", 0))
        state.offset = int(saved.get("offset", 0))
        state.refused = int(saved.get("refused", 0))
        state.refusals = [(int(row), str(why)) for row, why in saved.get("refusals", [])]
        return state

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "path": str(self.path),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "position": self.position,
            "offset": self.offset,
            "refused": self.refused,
            "refusals": self.refusals[:KEPT_FAILURES],
        }
        partial = self.file.with_name(self.file.name + ".part")
        partial.write_text(json.dumps(body, indent=1))
        os.replace(partial, self.file)


def _target(url: str, api_key: str) -> str:
    """Which service and project the state belongs to; the key itself is never written."""
    return hashlib.sha256(f"{url.rstrip('/')}\n{api_key}".encode()).hexdigest()


# ---------------------------------------------------------------- sending


@dataclass
class BatchResult:
    created: int = 0
    duplicates: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)
    unanswered: int = 0  # rows given up for this run (transport errors, 5xx)
    fatal: str | None = None  # the server refuses us (key, URL): stop everything


class _FatalError(Exception):
    """The server refuses every request (a bad key, a wrong URL): there is no point going on."""


class Sender:
    """Sends batches of rows (NDJSON) and whole documents (JSON), splitting refused batches
    until every row is stored or refused on its own."""

    def __init__(self, client: httpx.Client, params: dict[str, str], filename: str) -> None:
        self.client = client
        self.params = params
        self.filename = filename

    def send(self, rows: list[Row]) -> BatchResult:
        result = BatchResult()
        try:
            self._send(rows, result)
        except _FatalError as error:
            result.fatal = str(error)
        return result

    def _send(self, rows: list[Row], result: BatchResult) -> None:
        sendable: list[Row] = []
        for row in rows:
            if row.data is None:
                result.failures.append((row.number, row.error or "could not be read"))
            else:
                sendable.append(row)
        if not sendable:
            return
        response = self._post(sendable)
        if response is None:
            result.unanswered += len(sendable)
            return
        if response.status_code == 201:
            body = response.json()
            result.created += body["created"]
            result.duplicates += body["duplicates"]
            return
        if response.status_code not in _SEND_ALONE or _error_location(response).startswith(
            ("query", "header")
        ):
            # Not about the rows (a key refused, a wrong URL or --format): no row would pass.
            raise _FatalError(_describe_error(response))
        if len(sendable) == 1:
            result.failures.append((sendable[0].number, _describe_error(response, one_row=True)))
            return
        self._split(sendable, response, result)

    def _split(self, rows: list[Row], response: httpx.Response, result: BatchResult) -> None:
        """Rows the error names go alone (a row refused inside a batch may be fine alone: the
        batch's format was detected on its first row); the rows before the first of them were
        read without fault and go together; the rest in halves."""
        named = sorted({int(n) - 1 for n in _LINE.findall(_error_location(response))})
        named = [i for i in named if 0 <= i < len(rows)]
        if not named:
            half = len(rows) // 2
            self._send(rows[:half], result)
            self._send(rows[half:], result)
            return
        self._send(rows[: named[0]], result)
        for index in named:
            self._send([rows[index]], result)
        rest = [row for i, row in enumerate(rows) if i > named[0] and i not in named]
        if rest:
            half = len(rest) // 2 or 1
            self._send(rest[:half], result)
            self._send(rest[half:], result)

    def _post(self, rows: list[Row]) -> httpx.Response | None:
        """POST the rows, trying transport errors, 429 and 5xx again; None when they persist."""
        if rows[0].number == 0:  # a whole document
            body, content_type = rows[0].data or b"", "application/json"
        else:
            body = b"".join((row.data or b"") + b"\n" for row in rows)
            content_type = "application/x-ndjson"
        headers = {"Content-Type": content_type, "X-Filename": self.filename}
        for attempt in range(MAX_ATTEMPTS):
            try:
                response = self.client.post(
                    "/v1/trajectories", params=self.params, content=body, headers=headers
                )
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code not in _RETRY:
                return response
            if attempt + 1 < MAX_ATTEMPTS:
                time.sleep(_retry_wait(response, attempt))
        return None


def _error_location(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["location"] or "")
    except (ValueError, KeyError, TypeError):
        return ""


def _retry_wait(response: httpx.Response | None, attempt: int) -> float:
    """Exponential backoff up to MAX_RETRY_WAIT_S, and never less than the server's
    `Retry-After` (`app.retry`)."""
    wait_s: float = min(0.5 * 2**attempt, MAX_RETRY_WAIT_S)
    asked = retry_after_s(response.headers) if response is not None else None
    return max(wait_s, asked) if asked is not None else wait_s


# ---------------------------------------------------------------- one run over the inputs


@dataclass
class _Batch:
    input: _Input
    rows: int
    end: int
    offset: int
    result: BatchResult | None = None


@dataclass
class _Input:
    """One input file during a run: its state, and its batches in the order they were sent,
    so that the state only ever records a prefix of the file whose every row was answered."""

    path: Path
    state: FileState
    batches: deque[_Batch] = field(default_factory=deque)
    broken: bool = False  # a batch went unanswered: later ones are not recorded

    def settle(self) -> None:
        while self.batches and self.batches[0].result is not None:
            batch = self.batches.popleft()
            result = batch.result
            assert result is not None
            if self.broken or result.unanswered or result.fatal:
                self.broken = True
                continue
            self.state.position, self.state.offset = batch.end, batch.offset
            self.state.refused += len(result.failures)
            room = max(0, KEPT_FAILURES - len(self.state.refusals))
            self.state.refusals.extend(result.failures[:room])
            self.state.save()


@dataclass
class Summary:
    files: int = 0
    created: int = 0
    duplicates: int = 0
    skipped: int = 0
    failed: int = 0
    unanswered: int = 0
    failures: list[str] = field(default_factory=list)
    fatal: str | None = None
    interrupted: bool = False

    def fail(self, path: Path, row: int, why: str) -> None:
        self.failed += 1
        if len(self.failures) < LISTED_FAILURES:
            self.failures.append(f"{path}:{row}: {why}" if row else f"{path}: {why}")


class Ingest:
    """Reads the inputs in order and keeps up to `concurrency` batches in flight."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        params: dict[str, str],
        state_dir: Path,
        target: str,
        max_rows: int,
        max_bytes: int,
        concurrency: int,
        restart: bool,
        stop_after_batches: int | None = None,
    ) -> None:
        self.client = client
        self.params = params
        self.state_dir = state_dir
        self.target = target
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        self.restart = restart
        self.stop_after_batches = stop_after_batches
        self.summary = Summary()
        self.sent_batches = 0

    def run(self, files: list[Path], progress: Progress) -> Summary:
        states = [
            FileState.load(self.state_dir, self.target, file, restart=self.restart)
            for file in files
        ]
        task = progress.add_task("ingesting", total=sum(map(_count, files, states)))
        in_flight: dict[Future[BatchResult], _Batch] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            try:
                for file, state in zip(files, states, strict=True):
                    if self._stopping():
                        break
                    self.summary.files += 1
                    self._ingest_file(_Input(file, state), pool, in_flight, progress, task)
            except KeyboardInterrupt:
                self.summary.interrupted = True
                for future in in_flight:
                    future.cancel()
            while in_flight:
                self._collect(in_flight, progress, task, block=True)
        return self.summary

    def _stopping(self) -> bool:
        return self.summary.fatal is not None or self.summary.interrupted

    def _ingest_file(
        self,
        current: _Input,
        pool: ThreadPoolExecutor,
        in_flight: dict[Future[BatchResult], _Batch],
        progress: Progress,
        task: Any,
    ) -> None:
        path, state = current.path, current.state
        if state.position:
            self.summary.skipped += state.position
            for row, why in state.refusals:
                self.summary.fail(path, row, f"{why} (refused in an earlier run)")
            self.summary.failed += state.refused - len(state.refusals)
            progress.advance(task, state.position)
        sender = Sender(self.client, self.params, path.name)
        try:
            rows = read_rows(path, position=state.position, offset=state.offset)
            for rows_batch in batch_rows(rows, max_rows=self.max_rows, max_bytes=self.max_bytes):
                if self._stopping():
                    return
                if (
                    self.stop_after_batches is not None
                    and self.sent_batches >= self.stop_after_batches
                ):
                    self.summary.interrupted = True
                    return
                while len(in_flight) >= self.concurrency:
                    self._collect(in_flight, progress, task, block=True)
                last = rows_batch[-1]
                batch = _Batch(current, len(rows_batch), last.end, last.offset)
                current.batches.append(batch)
                in_flight[pool.submit(sender.send, rows_batch)] = batch
                self.sent_batches += 1
                self._collect(in_flight, progress, task, block=False)
        except (InvalidParquetError, OSError) as error:
            # The file cannot be read at all (not Parquet, unreadable): the others still go.
            self.summary.fail(path, 0, str(error))
            current.broken = True

    def _collect(
        self,
        in_flight: dict[Future[BatchResult], _Batch],
        progress: Progress,
        task: Any,
        *,
        block: bool,
    ) -> None:
        done, _ = wait(in_flight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            batch = in_flight.pop(future)
            if future.cancelled():
                batch.result = BatchResult(unanswered=batch.rows)
            else:
                batch.result = future.result()
            self._record(batch)
            batch.input.settle()
            progress.advance(task, batch.rows)

    def _record(self, batch: _Batch) -> None:
        result = batch.result
        assert result is not None
        summary = self.summary
        summary.created += result.created
        summary.duplicates += result.duplicates
        for row, why in result.failures:
            summary.fail(batch.input.path, row, why)
        if result.unanswered:
            summary.unanswered += result.unanswered
        if result.fatal and summary.fatal is None:
            summary.fatal = result.fatal


def _count(path: Path, state: FileState) -> int:
    if _kind(path) == "lines" and state.offset >= state.size:
        return state.position  # answered to the end: not read again, not even to count
    try:
        return count_rows(path)
    except (InvalidParquetError, OSError):
        return 1  # reported when it is read


def collect_files(paths: list[Path]) -> list[Path]:
    """The files to ingest: files as given, and under folders (recursively, in name order)
    every file with a known suffix, leaving out hidden folders (`.cache`, `.srft-ingest`)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.name.lower().endswith(UPLOAD_SUFFIXES)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise typer.BadParameter(f"{path} does not exist", param_hint="PATH")
    return files


@app.command()
def ingest(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Files, or folders of them (Hub dataset shards too): .json, .traj, "
            ".jsonl, .ndjson, .parquet."
        ),
    ],
    fmt: Annotated[str, typer.Option("--format", help="Source format, or auto.")] = "auto",
    resolved: Annotated[
        bool | None, typer.Option("--resolved/--unresolved", help="Resolution of every run.")
    ] = None,
    batch_bytes: Annotated[
        int, typer.Option(min=1, help="NDJSON bytes per request at most (a larger row goes alone).")
    ] = DEFAULT_BATCH_BYTES,
    batch_rows_: Annotated[
        int, typer.Option("--batch-rows", min=1, help="Rows per request at most.")
    ] = DEFAULT_BATCH_ROWS,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    state: Annotated[
        Path, typer.Option(help="Folder of the resume state (one small file per input).")
    ] = DEFAULT_STATE_DIR,
    restart: Annotated[
        bool, typer.Option(help="Ignore the resume state: send every row again.")
    ] = False,
    stop_after_batches: Annotated[
        int | None, typer.Option(hidden=True, help="Stop after sending this many batches.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = "",
) -> None:
    """Upload trajectory files, Hub dataset shards and large JSON Lines files; resumable."""
    files = collect_files(paths)
    if not files:
        typer.echo("no trajectory files found", err=True)
        raise typer.Exit(2)
    params: dict[str, str] = {"format": fmt}
    if resolved is not None:
        params["resolved"] = "true" if resolved else "false"
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with _client(url, api_key, timeout=300) as client:
        runner = Ingest(
            client,
            params=params,
            state_dir=state,
            target=_target(url, api_key),
            max_rows=batch_rows_,
            max_bytes=batch_bytes,
            concurrency=concurrency,
            restart=restart,
            stop_after_batches=stop_after_batches,
        )
        try:
            with Progress(*columns) as progress:
                summary = runner.run(files, progress)
        except UnsupportedMediaTypeError as error:
            typer.echo(error.message, err=True)
            raise typer.Exit(2) from error
    _print_summary(summary)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.fatal or summary.failed or summary.unanswered:
        raise typer.Exit(1)


def _print_summary(summary: Summary) -> None:
    typer.echo(
        f"{summary.files} files: {summary.created} trajectories created, "
        f"{summary.duplicates} duplicates, {summary.failed} rows failed, "
        f"{summary.skipped} rows skipped (answered by an earlier run)"
    )
    for line in summary.failures:
        typer.echo(f"  {line}")
    if summary.failed > len(summary.failures):
        typer.echo(f"  ... and {summary.failed - len(summary.failures)} more")
    if summary.unanswered:
        typer.echo(
            f"{summary.unanswered} rows got no answer (connection lost, or the server kept "
            "failing); run the same command again to send them",
            err=True,
        )
    if summary.fatal:
        typer.echo(f"stopped: {summary.fatal}", err=True)
    elif summary.interrupted:
        typer.echo("interrupted: run the same command again to send the rest", err=True)
