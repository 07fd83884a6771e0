"""Ingest throughput: the srft service over HTTP next to one bulk statement per table.

Run from the repository root (needs the PostgreSQL server binaries, as the tests do):

    .venv/bin/python bench/ingest.py                        # 2,000 trajectories x 50 steps
    .venv/bin/python bench/ingest.py --trajectories 200     # a quick look
    .venv/bin/python bench/ingest.py --json bench.json      # also write the numbers

What it does:

1. builds N distinct synthetic trajectories from a seed (canonical OpenAI chat messages: a
   ~2 KB system prompt, a ~1 KB task, then per step an assistant thought with one tool call
   answered by a tool message of 200 B to 4 KB);
2. starts a throw-away Postgres (or uses the server of --database-url), and for every --batch
   size a fresh migrated database and a fresh `srft serve --no-migrate` subprocess; C client
   threads POST the trajectories to /v1/trajectories (batch 1: one JSON object per request,
   as `srft ingest` sends a file; batch > 1: NDJSON);
3. inserts the same rows the service stored (uploads, trajectories, steps, computed with the
   service's own parser, hash and step splitter) into fresh databases with one bulk statement
   per table: a psycopg COPY, and a SQLAlchemy insert() executed once with the whole list
   (psycopg executemany, pipelined);
4. checks every database holds exactly the expected rows, prints throughput and the ratio
   to the COPY baseline, and exits non-zero if anything is missing or failed.

Every database and process it creates is removed on exit, including on Ctrl-C.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import zstandard
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import Table, create_engine, func, insert, select
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.models import Project, Step, Trajectory, Upload, new_id, utcnow
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.service import content_hash
from bench.common import (
    PostgresServer,
    child_env,
    describe_machine,
    exit_status,
    http_ok,
    libpq_url,
    log_tail,
    machine_facts,
    make_trajectories,
    options_for_json,
    percentile,
    process_cpu_seconds,
    run_cleaning_up,
    start_logged,
    write_report,
)
from tests.servers import free_port, postgres_server

SERVE_COMMAND = (sys.executable, "-m", "app.cli", "serve", "--no-migrate")
API_KEY = "srft_bench_" + "k" * 32
PROJECT_NAME = "default"
# The level the service compresses stored uploads with (app.trajectories.service).
UPLOAD_ZSTD_LEVEL = 6


# ------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    trajectories: int
    steps: int
    batches: tuple[int, ...]
    concurrency: int
    seed: int
    database_url: str | None
    broker_url: str
    baselines: tuple[str, ...]
    json_path: Path | None
    keep_logs: bool


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Ingest synthetic trajectories over HTTP into Postgres and compare with one bulk "
            "statement per table."
        )
    )
    parser.add_argument("--trajectories", type=int, default=2000, help="runs (default 2000)")
    parser.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    parser.add_argument(
        "--batch",
        type=int,
        action="append",
        dest="batches",
        metavar="N",
        help=(
            "trajectories per request; repeat for several HTTP runs (default: 1 and 50). "
            "1 sends a JSON object, more send NDJSON"
        ),
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="concurrent HTTP clients (default 4)"
    )
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed (default 1)")
    parser.add_argument(
        "--database-url",
        help=(
            "SQLAlchemy URL of an existing Postgres (13+) whose user may CREATE DATABASE; the "
            "benchmark creates and drops its own databases there. Default: a throw-away server"
        ),
    )
    parser.add_argument(
        "--broker-url",
        default="memory://",
        help="SRFT_BROKER_URL of the service (default memory://: the embedded worker runs)",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        dest="baselines",
        choices=("copy", "insert"),
        help="bulk baselines to run (default: copy and insert); ratios are to the first",
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the numbers here")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the service logs (their path is printed)"
    )
    args = parser.parse_args(argv)
    batches = tuple(args.batches or (1, 50))
    if args.trajectories < 1 or args.steps < 1 or args.concurrency < 1:
        parser.error("--trajectories, --steps and --concurrency must be at least 1")
    if any(b < 1 for b in batches):
        parser.error("--batch must be at least 1")
    return Options(
        trajectories=args.trajectories,
        steps=args.steps,
        batches=batches,
        concurrency=args.concurrency,
        seed=args.seed,
        database_url=args.database_url,
        broker_url=args.broker_url,
        baselines=tuple(dict.fromkeys(args.baselines or ("copy", "insert"))),
        json_path=args.json_path,
        keep_logs=args.keep_logs,
    )


# ------------------------------------------------------------------------ request bodies


@dataclass(frozen=True)
class RequestBody:
    content: bytes
    content_type: str
    filename: str
    trajectories: int


def request_bodies(encoded: list[bytes], batch: int) -> list[RequestBody]:
    """One JSON object per request for batch 1 (like `srft ingest` of .json files), else NDJSON."""
    if batch == 1:
        return [
            RequestBody(body, "application/json", f"run-{number:06d}.json", 1)
            for number, body in enumerate(encoded)
        ]
    return [
        RequestBody(
            b"\n".join(encoded[start : start + batch]) + b"\n",
            "application/x-ndjson",
            f"runs-{start:06d}.jsonl",
            len(encoded[start : start + batch]),
        )
        for start in range(0, len(encoded), batch)
    ]


# ------------------------------------------------------------------------ rows as stored


@dataclass
class StoredRows:
    """The rows the service stores for the runs uploaded one file each, and their hashes."""

    uploads: list[dict[str, Any]]
    trajectories: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    hashes: set[str]

    @property
    def upload_bytes(self) -> int:
        return sum(len(row["data"]) for row in self.uploads)


def stored_rows(bodies: list[RequestBody], project_id: uuid.UUID) -> StoredRows:
    """Parse, clean, hash and split each body with the service's own code, as it stores them."""
    compressor = zstandard.ZstdCompressor(level=UPLOAD_ZSTD_LEVEL)
    rows = StoredRows([], [], [], set())
    for body in bodies:
        (run,) = parse_upload(body.content, "auto", lines=None)
        upload_id = new_id()
        now = utcnow()
        rows.uploads.append(
            {
                "id": upload_id,
                "project_id": project_id,
                "sha256": hashlib.sha256(body.content).hexdigest(),
                "size_bytes": len(body.content),
                "compression": "zstd",
                "data": compressor.compress(body.content),
                "content_type": body.content_type,
                "filename": body.filename,
                "source_format": run.source_format,
                "created_at": now,
            }
        )
        trajectory_id = new_id()
        digest = content_hash(run)
        steps = split_steps(run.messages)
        rows.hashes.add(digest)
        rows.trajectories.append(
            {
                "id": trajectory_id,
                "project_id": project_id,
                "upload_id": upload_id,
                "content_hash": digest,
                "source_format": run.source_format,
                "task_id": run.task_id,
                "resolved": run.resolved,
                "messages": run.messages,
                "tools": run.tools,
                "metadata": run.metadata,
                "num_steps": len(steps),
                "created_at": now,
                "updated_at": now,
            }
        )
        rows.steps.extend(
            {
                "trajectory_id": trajectory_id,
                "index": step.index,
                "message_index": step.message_index,
                "observation_indices": list(step.observation_indices),
                "action": step.action,
                "tool_names": list(step.tool_names),
            }
            for step in steps
        )
    return rows


# ------------------------------------------------------------------------ databases


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


JSON_COLUMNS = frozenset({"messages", "tools", "metadata", "observation_indices", "tool_names"})
BULK_TABLES: tuple[tuple[Table, str], ...] = (
    (_table(Upload), "uploads"),
    (_table(Trajectory), "trajectories"),
    (_table(Step), "steps"),
)


@dataclass(frozen=True)
class RowCounts:
    trajectories: int
    steps: int
    uploads: int
    num_steps_total: int
    hashes: frozenset[str]


def count_rows(url: str) -> RowCounts:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            trajectories = connection.scalar(select(func.count()).select_from(Trajectory))
            steps = connection.scalar(select(func.count()).select_from(Step))
            uploads = connection.scalar(select(func.count()).select_from(Upload))
            total = connection.scalar(select(func.coalesce(func.sum(Trajectory.num_steps), 0)))
            hashes = frozenset(connection.scalars(select(Trajectory.content_hash)))
    finally:
        engine.dispose()
    return RowCounts(trajectories or 0, steps or 0, uploads or 0, int(total or 0), hashes)


def verify(label: str, counts: RowCounts, expected: StoredRows, uploads: int) -> list[str]:
    """Everything that differs from the expected rows, as readable lines (empty: all good)."""
    problems: list[str] = []
    checks = (
        ("trajectories", counts.trajectories, len(expected.trajectories)),
        ("steps", counts.steps, len(expected.steps)),
        ("sum of num_steps", counts.num_steps_total, len(expected.steps)),
        ("uploads", counts.uploads, uploads),
    )
    for what, found, wanted in checks:
        if found != wanted:
            problems.append(f"{label}: {found} {what} in the database, expected {wanted}")
    if counts.hashes != expected.hashes:
        missing = len(expected.hashes - counts.hashes)
        extra = len(counts.hashes - expected.hashes)
        problems.append(
            f"{label}: content hashes differ from the expected runs "
            f"({missing} missing, {extra} unexpected)"
        )
    return problems


def create_project(url: str, project_id: uuid.UUID) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(_table(Project)).values(
                    id=project_id, name=PROJECT_NAME, created_at=utcnow()
                )
            )
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ baselines


def copy_baseline(url: str, rows: StoredRows) -> float:
    """One COPY ... FROM STDIN per table, one commit. Seconds from the first COPY to the commit."""
    data = {"uploads": rows.uploads, "trajectories": rows.trajectories, "steps": rows.steps}
    with psycopg.connect(libpq_url(url)) as connection:
        started = time.perf_counter()
        with connection.cursor() as cursor:
            for table, name in BULK_TABLES:
                columns = [column.name for column in table.columns]
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
                )
                json_positions = [i for i, column in enumerate(columns) if column in JSON_COLUMNS]
                with cursor.copy(statement) as copy:
                    for row in data[name]:
                        values = [row[column] for column in columns]
                        for position in json_positions:
                            if values[position] is not None:
                                values[position] = Jsonb(values[position])
                        copy.write_row(values)
        connection.commit()
        return time.perf_counter() - started


def insert_baseline(url: str, rows: StoredRows) -> float:
    """One SQLAlchemy insert(table) executed with the whole list of rows per table, one commit.

    SQLAlchemy hands the list to psycopg's executemany, which sends the prepared INSERT once per
    row in pipeline mode (the path the service's step insert takes too).
    """
    data = {"uploads": rows.uploads, "trajectories": rows.trajectories, "steps": rows.steps}
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            started = time.perf_counter()
            with connection.begin():
                for table, name in BULK_TABLES:
                    connection.execute(insert(table), data[name])
            return time.perf_counter() - started
    finally:
        engine.dispose()


BASELINES: dict[str, tuple[str, Callable[[str, StoredRows], float]]] = {
    "copy": ("baseline COPY, 1 per table", copy_baseline),
    "insert": ("baseline insert() executemany", insert_baseline),
}


# ------------------------------------------------------------------------ the service


class Service:
    """`srft serve --no-migrate` in a subprocess against one database."""

    def __init__(self, url: str, broker_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = child_env() | {
            "SRFT_DATABASE_URL": url,
            "SRFT_BROKER_URL": broker_url,
            "SRFT_BOOTSTRAP_API_KEY": API_KEY,
        }
        # Stopped before the database under it is dropped.
        self.process = start_logged(
            [*SERVE_COMMAND, "--port", str(self.port)], REPO_ROOT, env, log_path
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited early:\n{self.log_tail()}")
            if http_ok(f"{self.base_url}/healthz"):
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"no /healthz after {timeout} s:\n{self.log_tail()}")
        # Warm up authentication and the connection pool without storing anything.
        response = httpx.get(
            f"{self.base_url}/v1/trajectories",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        response.raise_for_status()

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ClientTally:
    created: int = 0
    duplicates: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def post_all(
    base_url: str, bodies: list[RequestBody], concurrency: int
) -> tuple[ClientTally, float, float]:
    """POST every body with `concurrency` threads; (tally, wall seconds, client CPU seconds)."""
    pending: queue.SimpleQueue[RequestBody] = queue.SimpleQueue()
    for body in bodies:
        pending.put(body)
    tally = ClientTally()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=600) as http:
            while not stop.is_set():
                try:
                    body = pending.get_nowait()
                except queue.Empty:
                    return
                began = time.perf_counter()
                try:
                    response = http.post(
                        "/v1/trajectories",
                        content=body.content,
                        headers={"Content-Type": body.content_type, "X-Filename": body.filename},
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        tally.failures.append(f"{body.filename}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - began
                with lock:
                    tally.latencies.append(elapsed)
                    if response.status_code == 201:
                        answer = response.json()
                        tally.created += answer["created"]
                        tally.duplicates += answer["duplicates"]
                    else:
                        tally.failures.append(
                            f"{body.filename}: HTTP {response.status_code}: {response.text[:300]}"
                        )

    threads = [
        threading.Thread(target=client, name=f"bench-client-{n}", daemon=True)
        for n in range(concurrency)
    ]
    cpu_started = time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    finally:
        stop.set()
    return tally, time.perf_counter() - started, time.process_time() - cpu_started


# ------------------------------------------------------------------------ results


@dataclass
class RunResult:
    name: str
    kind: str  # "service" or "baseline"
    trajectories: int
    steps: int
    seconds: float
    requests: int | None = None
    batch: int | None = None
    service_cpu_seconds: float | None = None
    client_cpu_seconds: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None

    @property
    def trajectories_per_second(self) -> float:
        return self.trajectories / self.seconds

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


def render_table(results: list[RunResult], reference: RunResult | None) -> str:
    header = (
        f"{'run':<34} {'trajectories':>12} {'steps':>9} {'seconds':>8} "
        f"{'traj/s':>8} {'steps/s':>9} {'ratio':>6}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        ratio = (
            f"{result.trajectories_per_second / reference.trajectories_per_second:.3f}"
            if reference is not None
            else "-"
        )
        lines.append(
            f"{result.name:<34} {result.trajectories:>12,} {result.steps:>9,} "
            f"{result.seconds:>8.2f} {result.trajectories_per_second:>8.1f} "
            f"{result.steps_per_second:>9,.0f} {ratio:>6}"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


# ------------------------------------------------------------------------ main


def run_service(
    server: PostgresServer,
    options: Options,
    encoded: list[bytes],
    batch: int,
    expected: StoredRows,
    log_dir: Path,
) -> tuple[RunResult, list[str]]:
    bodies = request_bodies(encoded, batch)
    label = f"service_b{batch}"
    log_path = log_dir / f"{label}.log"
    with ExitStack() as stack:
        url = stack.enter_context(server.fresh_database(label))
        service = Service(url, options.broker_url, log_path)
        stack.callback(service.stop)
        service.wait_ready()
        cpu_before = service.cpu_seconds()
        tally, seconds, client_cpu = post_all(service.base_url, bodies, options.concurrency)
        cpu_after = service.cpu_seconds()
        service.stop()
        counts = count_rows(url)
    problems = [f"service batch {batch}: {failure}" for failure in tally.failures[:5]]
    if len(tally.failures) > 5:
        problems.append(f"service batch {batch}: ... {len(tally.failures) - 5} more failures")
    if tally.created != len(encoded) or tally.duplicates:
        problems.append(
            f"service batch {batch}: the service reported {tally.created} created and "
            f"{tally.duplicates} duplicates, expected {len(encoded)} and 0"
        )
    problems += verify(f"service batch {batch}", counts, expected, uploads=len(bodies))
    kind = "JSON" if batch == 1 else "NDJSON"
    result = RunResult(
        name=f"service HTTP, batch {batch} ({kind})",
        kind="service",
        trajectories=counts.trajectories,
        steps=counts.steps,
        seconds=seconds,
        requests=len(bodies),
        batch=batch,
        service_cpu_seconds=(
            cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
        ),
        client_cpu_seconds=client_cpu,
        latency_p50_ms=statistics.median(tally.latencies) * 1000 if tally.latencies else None,
        latency_p95_ms=percentile(tally.latencies, 0.95) * 1000 if tally.latencies else None,
    )
    return result, problems


def run_baseline(
    server: PostgresServer, method: str, rows: StoredRows, project_id: uuid.UUID
) -> tuple[RunResult, list[str]]:
    name, insert_rows = BASELINES[method]
    with server.fresh_database(f"baseline_{method}") as url:
        create_project(url, project_id)
        seconds = insert_rows(url, rows)
        counts = count_rows(url)
    problems = verify(f"baseline {method}", counts, rows, uploads=len(rows.uploads))
    result = RunResult(name, "baseline", counts.trajectories, counts.steps, seconds)
    return result, problems


def benchmark(options: Options) -> int:
    total_steps = options.trajectories * options.steps
    print(
        f"srft ingest benchmark: {options.trajectories:,} trajectories x {options.steps} steps "
        f"= {total_steps:,} steps, seed {options.seed}",
        flush=True,
    )
    began = time.perf_counter()
    runs = make_trajectories(options.trajectories, options.steps, options.seed)
    encoded = [json.dumps(run, ensure_ascii=False).encode() for run in runs]
    del runs
    payload = sum(len(body) for body in encoded)
    print(
        f"  generated {payload / 1e6:,.1f} MB of JSON "
        f"({payload / len(encoded) / 1e3:,.1f} KB per trajectory) "
        f"in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    began = time.perf_counter()
    project_id = new_id()
    expected = stored_rows(request_bodies(encoded, 1), project_id)
    print(
        f"  parsed, hashed, split and compressed the rows for the baselines in "
        f"{time.perf_counter() - began:.1f} s",
        flush=True,
    )

    results: list[RunResult] = []
    problems: list[str] = []
    log_dir = Path(tempfile.mkdtemp(prefix="srft-bench-logs-"))
    with ExitStack() as stack:
        if not options.keep_logs:
            stack.callback(shutil.rmtree, log_dir, ignore_errors=True)
        if options.database_url is None:
            admin_url = stack.enter_context(postgres_server())
        else:
            admin_url = options.database_url
        server = PostgresServer(admin_url)
        stack.callback(server.close)
        facts = server.facts()
        for batch in options.batches:
            result, found = run_service(server, options, encoded, batch, expected, log_dir)
            print(f"  {result.name}: {result.seconds:.2f} s", flush=True)
            results.append(result)
            problems += found
        for method in options.baselines:
            result, found = run_baseline(server, method, expected, project_id)
            print(f"  {result.name}: {result.seconds:.2f} s", flush=True)
            results.append(result)
            problems += found

    baselines = [r for r in results if r.kind == "baseline"]
    reference = baselines[0] if baselines else None
    machine = machine_facts()
    print()
    print(render_table(results, reference))
    print()
    if reference is not None:
        print(f"ratio: trajectories/s (= steps/s) divided by that of '{reference.name}'")
    for result in results:
        if result.kind == "service":
            print(
                f"{result.name}: {result.requests:,} requests, {options.concurrency} clients, "
                f"latency p50 {result.latency_p50_ms or 0:.0f} ms p95 "
                f"{result.latency_p95_ms or 0:.0f} ms; service CPU "
                f"{_seconds(result.service_cpu_seconds)}, client CPU "
                f"{_seconds(result.client_cpu_seconds)}"
            )
    print(
        "baselines time the database work only, from the first statement to the commit "
        "(JSON encoding for the wire included); they exclude generating, parsing, cleaning, "
        "hashing, step splitting and upload compression (done beforehand) and HTTP. They "
        "store the same rows as batch 1: one upload (zstd of the original bytes), one "
        "trajectory and its steps per run."
    )
    print(f"{describe_machine(machine, facts)}, broker {options.broker_url}")
    if options.keep_logs:
        print(f"service logs: {log_dir}")

    if options.json_path is not None:
        report = {
            "options": options_for_json(options),
            "payload_bytes": payload,
            "upload_bytes_compressed": expected.upload_bytes,
            "machine": machine,
            "postgres": facts,
            "reference": reference.name if reference else None,
            "runs": [
                asdict(r)
                | {
                    "trajectories_per_second": r.trajectories_per_second,
                    "steps_per_second": r.steps_per_second,
                    "ratio": (
                        r.trajectories_per_second / reference.trajectories_per_second
                        if reference
                        else None
                    ),
                }
                for r in results
            ],
            "problems": problems,
        }
        write_report(options.json_path, report)
    return exit_status(problems)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the service, the databases and the server go away.
    return run_cleaning_up(benchmark, parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
