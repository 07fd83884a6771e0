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
import math
import os
import platform
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg
import zstandard
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import Table, create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.db import upgrade_database
from app.models import Project, Step, Trajectory, Upload, new_id, utcnow
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.service import content_hash
from tests.servers import free_port, postgres_server

SERVE_COMMAND = (sys.executable, "-m", "app.cli", "serve", "--no-migrate")
API_KEY = "srft_bench_" + "k" * 32
PROJECT_NAME = "default"
# The level the service compresses stored uploads with (app.trajectories.service).
UPLOAD_ZSTD_LEVEL = 6
TOOL_NAMES = ("bash", "str_replace_editor", "view_file", "search_code", "run_tests")
MODELS = ("agent-model-large", "agent-model-small", "agent-model-mini")


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


# ------------------------------------------------------------------------ synthetic data


class TextSource:
    """Deterministic filler text: slices of one pool of made-up words and code-like lines."""

    def __init__(self, rng: random.Random, pool_chars: int = 1 << 20) -> None:
        syllables = ["ra", "to", "ne", "ki", "su", "mo", "la", "pe", "di", "ca", "vo", "zu"]
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(600)]
        words += ["def", "return", "self", "None", "import", "class", "if", "for", "in", "=="]
        pieces: list[str] = []
        size = 0
        while size < pool_chars:
            line = " ".join(rng.choices(words, k=rng.randint(4, 14)))
            if rng.random() < 0.3:
                line = "    " * rng.randint(0, 3) + line.replace(" ", "_", 2) + "()"
            pieces.append(line)
            size += len(line) + 1
        self.pool = "\n".join(pieces)
        self.rng = rng

    def text(self, length: int) -> str:
        start = self.rng.randrange(0, len(self.pool) - length)
        return self.pool[start : start + length]

    def sized_between(self, low: int, high: int) -> str:
        """Text of a length drawn log-uniformly from [low, high]: many short, a few long."""
        length = round(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        return self.text(length)


def make_trajectories(count: int, steps: int, seed: int) -> list[dict[str, Any]]:
    """`count` distinct canonical runs of `steps` tool-calling steps each."""
    rng = random.Random(seed)
    source = TextSource(rng)
    system_prompt = "You are an autonomous software engineering agent.\n" + source.text(2000)
    runs: list[dict[str, Any]] = []
    for number in range(count):
        task_id = f"bench-{seed}-{number:06d}"
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": system_prompt},
            {
                "role": "user",
                "content": f"Task {task_id}: fix the issue below.\n{source.text(1000)}",
            },
        ]
        for step in range(steps):
            call_id = f"call_{number}_{step}"
            command = source.sized_between(30, 300)
            messages.append(
                {
                    "role": "assistant",
                    "content": source.sized_between(100, 800),
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {
                                "name": rng.choice(TOOL_NAMES),
                                "arguments": json.dumps({"command": command}),
                            },
                        }
                    ],
                }
            )
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": source.sized_between(200, 4000),
                }
            )
        runs.append(
            {
                "messages": messages,
                "task_id": task_id,
                "resolved": rng.random() < 0.4,
                "metadata": {"model": rng.choice(MODELS), "seed": seed, "number": number},
            }
        )
    return runs


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


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a plain postgresql:// conninfo for psycopg.connect."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresServer:
    """Creates fresh migrated databases on one server, and drops them again."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.prefix = f"srft_bench_{os.getpid()}"

    def facts(self) -> dict[str, str]:
        with self.engine.connect() as connection:
            version = connection.scalar(text("SHOW server_version"))
            fsync = connection.scalar(text("SHOW fsync"))
            synchronous_commit = connection.scalar(text("SHOW synchronous_commit"))
        return {
            "server_version": str(version),
            "fsync": str(fsync),
            "synchronous_commit": str(synchronous_commit),
        }

    @contextmanager
    def fresh_database(self, label: str) -> Iterator[str]:
        """A new database with the migrations applied; dropped when the block ends."""
        name = f"{self.prefix}_{label}"
        quoted = f'"{name}"'
        with self.engine.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
            connection.execute(text(f"CREATE DATABASE {quoted}"))
        try:
            url = database_url(self.admin_url, name)
            upgrade_database(url)
            yield url
        finally:
            with self.engine.connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))

    def close(self) -> None:
        self.engine.dispose()


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


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), or None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Service:
    """`srft serve --no-migrate` in a subprocess against one database."""

    def __init__(self, url: str, broker_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
        env |= {
            "SRFT_DATABASE_URL": url,
            "SRFT_BROKER_URL": broker_url,
            "SRFT_BOOTSTRAP_API_KEY": API_KEY,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        }
        with log_path.open("ab") as log:
            # Its own session: a Ctrl-C reaches only this script, which stops the service
            # before it drops the database under it.
            self.process = subprocess.Popen(
                [*SERVE_COMMAND, "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
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
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

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


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def machine_facts() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": _cpu_model(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


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
    print(
        f"machine: {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs "
        f"({machine['cpu_model'] or 'unknown CPU'}), {machine['platform']}, "
        f"Python {machine['python']}; PostgreSQL {facts['server_version']} "
        f"(fsync={facts['fsync']}, synchronous_commit={facts['synchronous_commit']}), "
        f"broker {options.broker_url}"
    )
    if options.keep_logs:
        print(f"service logs: {log_dir}")

    if options.json_path is not None:
        report = {
            "options": {
                key: (str(value) if isinstance(value, Path) else value)
                for key, value in asdict(options).items()
                if key != "database_url"
            },
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
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        options.json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"numbers written to {options.json_path}")

    if problems:
        print("\nFAILED:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that every clean-up runs as for Ctrl-C."""


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    # SIGTERM unwinds like Ctrl-C, so the service, the databases and the server go away.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return benchmark(options)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print("\nterminated; cleaned up", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
