"""How srft scales with the size of its store: reading endpoints, job creation, exports with one
and two workers, and `srft ingest` of large files.

Run from the repository root (needs the PostgreSQL server binaries and redis-server, as the
tests do):

    .venv/bin/python bench/scale.py                        # 10k and 100k trajectories x 10 steps
    .venv/bin/python bench/scale.py --quick                # tiny sizes: the wiring, ~1-2 minutes
    .venv/bin/python bench/scale.py --only latency --plans # reading latency, and query plans
    .venv/bin/python bench/scale.py --json scale.json      # also write the numbers

What it does:

1. builds two stores, each in its own fresh migrated database: `--small` and `--large`
   synthetic trajectories of `--steps` steps (valid rows: one run parsed with the service's own
   importer, its user turn varied per trajectory, hashed and split with the service's code),
   a project with an API key, and a finished step-mode job over all of them with one `done`
   verdict per step (labels, reasons and token usage). Rows are written with psycopg COPY;
   none of this is timed (ingest speed is `bench/ingest.py`'s job);
2. `latency`: serves both stores (`srft serve --no-migrate`, one process each) and times
   `--requests` GETs of each reading endpoint at both sizes, alternating, over real HTTP:
   median and p95, ratio large/small (target <= 1.5);
3. `create`: a step-mode job over every trajectory, timed to the request's answer and to the
   moment its last pending row exists (`preparation.complete` when the job has it, else the
   answer itself), then cancelled;
4. `export`: `openai_jsonl` and `tokenized_parquet` exports of every trajectory of both stores,
   built by 1 and by 2 `srft worker --pool solo` processes with one tokenizing process each
   (SRFT_EXPORT_PROCESSES=1): time ratio 1/2 workers (target >= 1.7), each worker's peak RSS,
   and the shards of both runs compared byte for byte (their sha256);
5. `ingest`: `srft ingest` of a JSON Lines file and of a folder of Parquet shards of
   `--ingest-gb` / 10 and `--ingest-gb` GB, each into a fresh database: runs/s and the CLI's
   peak RSS (getrusage of the child), which should stay flat as the file grows;
6. `--plans`: EXPLAIN (ANALYZE, BUFFERS) of the queries the service runs for the hot reads, on
   the large store.

It prints every ratio next to its target and exits 1 if a correctness check failed (row and
verdict counts, response contents, export shards that differ between runs, ingest counts).
Missing a target does not fail the run. Every database, process and file it creates is removed
on exit, including on Ctrl-C.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app import metrics
from app.auth import service as auth_service
from app.critic.labels import DEFAULT_LABELS
from app.critic.prompt import prompt_hash
from app.jobs import service as job_service
from app.jobs import tallies
from app.models import Job, Step, Trajectory, Verdict, new_id, utcnow
from app.pagination import encode_cursor
from app.recipe.steps import split_steps
from app.status import ExportStatus, JobMode, JobStatus, VerdictStatus
from app.trajectories import service as trajectory_service
from app.trajectories.formats import parse_upload
from app.trajectories.service import content_hash
from bench.common import (
    PostgresServer,
    TextSource,
    child_env,
    describe_machine,
    exit_status,
    http_ok,
    libpq_url,
    log_tail,
    machine_facts,
    make_trajectories,
    percentile,
    run_cleaning_up,
    start_logged,
    write_report,
)
from tests.builders import make_trajectory
from tests.chat_tokenizers import build_tokenizer
from tests.hub_datasets import SWE_SMITH_SCHEMA
from tests.servers import RedisServer, free_port, postgres_server

SRFT = (sys.executable, "-m", "app.cli")
API_KEY = "srft_bench_" + "s" * 32
SECTIONS = ("latency", "create", "export", "ingest")
EXPORT_FORMATS = ("openai_jsonl", "tokenized_parquet")
COPY_CHUNK = 10_000  # trajectories per COPY transaction
LATENCY_TARGET = 1.5
WORKERS_TARGET = 1.7
FLAT_TARGET = 1.3
# Labels drawn for the stored verdicts: mostly good, as a real job's are.
LABEL_WEIGHTS = {"good": 0.75, "mistake": 0.15, "unnecessary": 0.10}
# The critic the `create` section's worker talks to answers after this long, one call at a
# time: labeling work waits instead of competing with the job's preparation for the CPUs.
HELD_CRITIC_LATENCY_MS = 600_000
POLL_S = 0.1
MiB = 1024 * 1024


# ------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    sections: tuple[str, ...]
    small: int
    large: int
    steps: int
    requests: int
    ingest_gb: float
    plans: bool
    export_part_trajectories: int | None
    seed: int
    database_url: str | None
    json_path: Path | None
    keep_logs: bool

    @property
    def sizes(self) -> tuple[int, int]:
        return (self.small, self.large)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="Reading latency, job creation, exports and ingest at two store sizes."
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--small", type=int, help="trajectories of the small store (10000)")
    parser.add_argument("--large", type=int, help="trajectories of the large store (100000)")
    parser.add_argument("--steps", type=int, default=10, help="steps per trajectory (10)")
    parser.add_argument("--requests", type=int, help="timed requests per endpoint and size (30)")
    parser.add_argument(
        "--ingest-gb",
        type=float,
        help="size of the larger ingest inputs in GB; the smaller are a tenth (default 2)",
    )
    parser.add_argument(
        "--plans", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS) of the hot reads"
    )
    parser.add_argument(
        "--export-part-trajectories",
        type=int,
        help="SRFT_EXPORT_PART_TRAJECTORIES for the API and the workers (unset by default)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (200/2,000 trajectories, 10 requests, 20 MB ingest): the wiring only",
    )
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed (default 1)")
    parser.add_argument(
        "--database-url",
        help=(
            "SQLAlchemy URL of an existing Postgres (13+) whose user may CREATE DATABASE; the "
            "benchmark creates and drops its own databases there. Default: a throw-away server"
        ),
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the numbers here")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (their path is printed)"
    )
    args = parser.parse_args(argv)
    sections = tuple(part.strip() for part in args.only.split(",") if part.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--only takes sections among {', '.join(SECTIONS)}; got {args.only!r}")
    defaults = (200, 2_000, 10, 0.02) if args.quick else (10_000, 100_000, 30, 2.0)
    options = Options(
        sections=tuple(s for s in SECTIONS if s in sections),
        small=args.small if args.small is not None else defaults[0],
        large=args.large if args.large is not None else defaults[1],
        steps=args.steps,
        requests=args.requests if args.requests is not None else defaults[2],
        ingest_gb=args.ingest_gb if args.ingest_gb is not None else defaults[3],
        plans=args.plans,
        export_part_trajectories=args.export_part_trajectories,
        seed=args.seed,
        database_url=args.database_url,
        json_path=args.json_path,
        keep_logs=args.keep_logs,
    )
    if min(options.small, options.steps, options.requests) < 1 or options.ingest_gb <= 0:
        parser.error("--small, --steps, --requests and --ingest-gb must be positive")
    if options.large <= options.small:
        parser.error("--large must be larger than --small")
    return options


# ------------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{log_tail(self.log_path)}"
            )

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the process (it must be alive): its resident high-water mark."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


class Processes:
    """Every process of the run, each in its own session, stopped in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.counter = 0

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Proc:
        self.counter += 1
        log_path = self.workdir / f"{self.counter:02d}-{name}.log"
        process = start_logged([*SRFT, *args], self.workdir, child_env() | env, log_path)
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, procs: Sequence[Proc] | None = None, timeout: float = 20.0) -> None:
        for proc in reversed(self.procs if procs is None else list(procs)):
            proc.stop(timeout)
        self.procs = [p for p in self.procs if p.process.poll() is None]


def wait_until(ready: Any, what: str, procs: Sequence[Proc], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs:
            proc.check_alive()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{log_tail(p.log_path)}" for p in procs)
            raise TimeoutError(f"{what} not ready after {timeout} s:\n{tails}")
        time.sleep(0.1)


# ------------------------------------------------------------------------ the stores


@dataclass
class Store:
    label: str
    size: int
    steps: int
    url: str
    project_id: uuid.UUID
    job_id: uuid.UUID
    deep_trajectory_cursor: str  # the cursor of the page 90% down the newest-first chain
    deep_verdict_cursor: str  # the cursor of the page 90% down the job's verdicts
    build_s: float
    engine: Engine
    api: Proc | None = None
    api_url: str = ""

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600
        )


def trajectory_rows(
    count: int, steps: int, seed: int, project_id: uuid.UUID, stored_at: datetime
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(trajectory row, step rows) of `count` distinct valid runs of `steps` steps.

    One run is parsed and split by the service's own importer and step splitter; every
    trajectory is that run with its own user turn (task number and a slice of filler text), so
    its messages, content hash and steps are what the service would store for it.
    """
    rng = random.Random(seed)
    source = TextSource(rng, pool_chars=1 << 18)
    (template,) = parse_upload(
        json.dumps(make_trajectory(steps, task="fix the failing test", task_id="t")).encode(),
        "auto",
    )
    split = split_steps(template.messages)
    for number in range(count):
        messages = list(template.messages)
        messages[1] = dict(messages[1]) | {
            "content": f"Task {seed}-{number}: fix the failing test.\n{source.text(300)}"
        }
        run = replace(
            template,
            messages=messages,
            task_id=f"task-{number % 5000}",
            resolved=rng.random() < 0.4,
            metadata={"model": "agent-model", "number": number},
        )
        trajectory_id = new_id()
        now = stored_at + timedelta(microseconds=number)
        yield (
            {
                "id": trajectory_id,
                "project_id": project_id,
                "upload_id": None,
                "content_hash": content_hash(run),
                "source_format": run.source_format,
                "task_id": run.task_id,
                "resolved": run.resolved,
                "messages": run.messages,
                "tools": run.tools,
                "metadata": run.metadata,
                "num_steps": len(split),
                "created_at": now,
                "updated_at": now,
            },
            [trajectory_service.step_row(trajectory_id, step) for step in split],
        )


JSON_COLUMNS = frozenset({"messages", "tools", "metadata", "observation_indices", "tool_names"})
JSON_COLUMNS_VERDICTS = frozenset({"vote_labels"})


def copy_rows(cursor: psycopg.Cursor[Any], table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    json_columns = JSON_COLUMNS | JSON_COLUMNS_VERDICTS
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(
                [
                    Jsonb(value) if name in json_columns and value is not None else value
                    for name, value in row.items()
                ]
            )


def build_store(label: str, url: str, size: int, steps: int, seed: int) -> Store:
    """A project with an API key, `size` trajectories and a finished job over all of them."""
    started = time.perf_counter()
    engine = create_engine(url, poolclass=NullPool)
    with Session(engine) as session:
        key = auth_service.create_key(session, "bench", project_name="bench", key=API_KEY)
        session.commit()
    project_id = key.project_id
    prompt = prompt_hash(JobMode.STEP, DEFAULT_LABELS)
    job_id = new_id()
    created = utcnow()
    with engine.begin() as connection:
        connection.execute(
            insert(Job).values(
                id=job_id,
                project_id=project_id,
                status=JobStatus.COMPLETED,
                mode=JobMode.STEP,
                critic_model="rules",
                votes=1,
                temperature=0.0,
                labels=[list(pair) for pair in DEFAULT_LABELS.labels],
                prompt_hash=prompt,
                scope="all",
                use_cache=False,
                selection={},
                total_trajectories=size,
                total_steps=size * steps,
                prepared_trajectories=size,
                prepared_steps=size * steps,
                prepared_at=created,
                created_at=created,
                started_at=created,
                finished_at=created + timedelta(hours=1),
                updated_at=created + timedelta(hours=1),
            )
        )
    rng = random.Random(seed + 1)
    names, weights = list(LABEL_WEIGHTS), list(LABEL_WEIGHTS.values())
    ids: list[uuid.UUID] = []
    # The job's running totals, counted as its verdict writes would have kept them.
    totals: Counter[str] = Counter({tallies.TRAJECTORIES_DONE: size})
    # Stored a day before the job: an export covers what existed when its job was created.
    generated = trajectory_rows(size, steps, seed, project_id, created - timedelta(days=1))
    with psycopg.connect(libpq_url(url)) as connection:
        for start in range(0, size, COPY_CHUNK):
            chunk = [next(generated) for _ in range(min(COPY_CHUNK, size - start))]
            verdicts: list[dict[str, Any]] = []
            progress: list[dict[str, Any]] = []
            for trajectory, step_rows in chunk:
                ids.append(trajectory["id"])
                progress.append(
                    {
                        "job_id": job_id,
                        "trajectory_id": trajectory["id"],
                        "steps": len(step_rows),
                        "done": len(step_rows),
                        "failed": 0,
                        "cached": 0,
                    }
                )
                for step in step_rows:
                    label = rng.choices(names, weights)[0]
                    finished = created + timedelta(seconds=rng.uniform(1, 3600))
                    verdicts.append(
                        {
                            "project_id": project_id,
                            "job_id": job_id,
                            "trajectory_id": trajectory["id"],
                            "step_index": step["index"],
                            "status": VerdictStatus.DONE.value,
                            "cache_key": job_service.cache_key(
                                model="rules",
                                prompt=prompt,
                                mode=JobMode.STEP,
                                votes=1,
                                temperature=0.0,
                                content=trajectory["content_hash"],
                                step=step["index"],
                            ),
                            "cached": False,
                            "label": label,
                            "reason": f"the step is {label}",
                            "agreement": 1.0,
                            "vote_labels": [label],
                            "critic_model": "rules",
                            "prompt_hash": prompt,
                            "prompt_tokens": rng.randint(800, 4000),
                            "completion_tokens": rng.randint(20, 120),
                            "cached_tokens": rng.randint(0, 800),
                            "latency_ms": rng.uniform(150, 900),
                            "attempts": 1,
                            "claimed_at": finished - timedelta(seconds=1),
                            "enqueued_at": created,
                            "finished_at": finished,
                        }
                    )
                    row = verdicts[-1]
                    totals[tallies.STEPS_DONE] += 1
                    totals[tallies.label(label)] += 1
                    totals[tallies.PROMPT_TOKENS] += row["prompt_tokens"]
                    totals[tallies.COMPLETION_TOKENS] += row["completion_tokens"]
                    totals[tallies.CACHED_TOKENS] += row["cached_tokens"]
                    tallies.latency(totals, row["latency_ms"])
            with connection.cursor() as cursor:
                copy_rows(cursor, "trajectories", [t for t, _ in chunk])
                copy_rows(cursor, "steps", [s for _, rows in chunk for s in rows])
                copy_rows(cursor, "verdicts", verdicts)
                copy_rows(cursor, "job_trajectories", progress)
            connection.commit()
    with Session(engine) as session:
        tallies.add(session, {job_id: totals})
        session.commit()
    with psycopg.connect(libpq_url(url)) as connection:
        connection.autocommit = True
        connection.execute("VACUUM ANALYZE")
        verdict_ids = connection.execute(
            "SELECT min(id), max(id) FROM verdicts WHERE job_id = %s", (job_id,)
        ).fetchone()
    assert verdict_ids is not None
    ids.sort()
    low, high = verdict_ids
    return Store(
        label=label_of(size),
        size=size,
        steps=steps,
        url=url,
        project_id=project_id,
        job_id=job_id,
        deep_trajectory_cursor=encode_cursor(ids[size // 10]),
        deep_verdict_cursor=encode_cursor(int(low + (high - low) * 9 // 10)),
        build_s=time.perf_counter() - started,
        engine=engine,
    )


def check_store(store: Store) -> list[str]:
    """The rows a store must hold, counted."""
    problems: list[str] = []
    with store.engine.connect() as connection:
        counts = {
            "trajectories": connection.scalar(select(func.count()).select_from(Trajectory)),
            "steps": connection.scalar(select(func.count()).select_from(Step)),
            "verdicts": connection.scalar(
                select(func.count()).where(
                    Verdict.job_id == store.job_id, Verdict.status == VerdictStatus.DONE
                )
            ),
            "distinct content hashes": connection.scalar(
                select(func.count(func.distinct(Trajectory.content_hash)))
            ),
        }
    expected = {
        "trajectories": store.size,
        "steps": store.size * store.steps,
        "verdicts": store.size * store.steps,
        "distinct content hashes": store.size,
    }
    for what, wanted in expected.items():
        if counts[what] != wanted:
            problems.append(f"store {store.label}: {counts[what]} {what}, expected {wanted}")
    return problems


def label_of(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


# ------------------------------------------------------------------------ the service


@dataclass
class Stack:
    """Postgres, Redis, the processes and the folders every section shares."""

    admin: PostgresServer
    redis: RedisServer
    procs: Processes
    workdir: Path
    tokenizer_root: Path
    export_dir: Path
    options: Options

    def service_env(self, url: str) -> dict[str, str]:
        env = {
            "SRFT_DATABASE_URL": url,
            "SRFT_BROKER_URL": self.redis.url,
            "SRFT_BOOTSTRAP_API_KEY": API_KEY,
            "SRFT_EXPORT_DIR": str(self.export_dir),
            "SRFT_TOKENIZER_DIRS": str(self.tokenizer_root),
            "SRFT_LOG_LEVEL": "WARNING",
        }
        if self.options.export_part_trajectories is not None:
            env["SRFT_EXPORT_PART_TRAJECTORIES"] = str(self.options.export_part_trajectories)
        return env

    def serve(self, name: str, url: str) -> tuple[Proc, str]:
        port = free_port()
        api = self.procs.spawn(
            name, ["serve", "--no-migrate", "--port", str(port)], self.service_env(url)
        )
        api_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{api_url}/healthz"), name, [api])
        return api, api_url

    def workers(self, url: str, count: int, **extra: str) -> list[Proc]:
        """`count` fresh `srft worker --pool solo` processes: each one process, so its VmHWM
        is the worker's whole peak."""
        env = self.service_env(url) | extra
        started = [
            self.procs.spawn(f"worker-{n}", ["worker", "--pool", "solo", "--loglevel", "INFO"], env)
            for n in range(count)
        ]
        wait_until(
            lambda: all(" ready." in p.log_path.read_text(errors="replace") for p in started),
            "the workers",
            started,
        )
        return started


# ------------------------------------------------------------------------ latency


def endpoint_list(store: Store) -> list[tuple[str, str]]:
    job = store.job_id
    return [
        ("GET /v1/jobs/{id}", f"/v1/jobs/{job}"),
        ("GET /v1/trajectories?limit=100", "/v1/trajectories?limit=100"),
        (
            "  page 90% down the cursor chain",
            f"/v1/trajectories?limit=100&cursor={store.deep_trajectory_cursor}",
        ),
        ("  with resolved=true", "/v1/trajectories?limit=100&resolved=true"),
        ("GET /v1/jobs/{id}/verdicts", f"/v1/jobs/{job}/verdicts"),
        (
            "  verdicts 90% down the cursor chain",
            f"/v1/jobs/{job}/verdicts?cursor={store.deep_verdict_cursor}",
        ),
        ("GET /ui/jobs/{id}", f"/ui/jobs/{job}"),
        ("GET /metrics", "/metrics"),
    ]


def check_response(store: Store, name: str, response: httpx.Response) -> str | None:
    """What is wrong with a response (None: nothing)."""
    if response.status_code != 200:
        return f"{store.label} {name.strip()}: HTTP {response.status_code}: {response.text[:200]}"
    if name == "GET /v1/jobs/{id}":
        steps = response.json()["counts"]["steps"]
        total = store.size * store.steps
        if steps["total"] != total or steps["done"] != total:
            return f"{store.label} job counts {steps}, expected {total} done"
    elif "/v1/" in name or "cursor chain" in name or "resolved" in name:
        # First pages are full; a page deep in the chain or a filtered one is not empty.
        found = len(response.json()["items"])
        wanted = 200 if "verdicts" in name else 100
        first = name.startswith("GET ")
        available = store.size * store.steps if "verdicts" in name else store.size
        if (first and found != min(wanted, available)) or not 0 < found <= wanted:
            return f"{store.label} {name.strip()}: {found} items (page of {wanted})"
    return None


@dataclass
class Timing:
    name: str
    small_ms: list[float] = field(default_factory=list)
    large_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        small, large = statistics.median(self.small_ms), statistics.median(self.large_ms)
        return {
            "small_median_ms": small,
            "small_p95_ms": percentile(self.small_ms, 0.95),
            "large_median_ms": large,
            "large_p95_ms": percentile(self.large_ms, 0.95),
            "ratio_median": large / small,
            "ratio_p95": percentile(self.large_ms, 0.95) / percentile(self.small_ms, 0.95),
        }


def measure_latency(small: Store, large: Store, requests: int) -> tuple[list[Timing], list[str]]:
    """`requests` timed GETs per endpoint and store, alternating stores (after 3 untimed)."""
    problems: list[str] = []
    timings: list[Timing] = []
    with small.client() as small_client, large.client() as large_client:
        pairs = ((small, small_client), (large, large_client))
        for (name, small_path), (_, large_path) in zip(
            endpoint_list(small), endpoint_list(large), strict=True
        ):
            timing = Timing(name)
            paths = {small.label: small_path, large.label: large_path}
            for store, client in pairs:
                for _ in range(3):
                    response = client.get(paths[store.label])
                    if (problem := check_response(store, name, response)) is not None:
                        problems.append(problem)
            for round_ in range(requests):
                order = pairs if round_ % 2 == 0 else pairs[::-1]
                for store, client in order:
                    began = time.perf_counter()
                    response = client.get(paths[store.label])
                    elapsed = (time.perf_counter() - began) * 1000
                    if response.status_code != 200:
                        problems.append(check_response(store, name, response) or "")
                    (timing.small_ms if store is small else timing.large_ms).append(elapsed)
            timings.append(timing)
    return timings, problems


def print_latency(timings: list[Timing], small: Store, large: Store, requests: int) -> None:
    print(
        f"\nreading latency, {requests} requests per endpoint and size, alternating "
        f"({small.label} vs {large.label} trajectories; ms)"
    )
    header = (
        f"  {'endpoint':<36} {small.label + ' p50':>10} {small.label + ' p95':>10} "
        f"{large.label + ' p50':>10} {large.label + ' p95':>10} {'ratio p50':>10} "
        f"{'ratio p95':>10}  target"
    )
    print(header)
    for timing in timings:
        s = timing.summary()
        verdict = "ok" if s["ratio_median"] <= LATENCY_TARGET else "MISSED"
        print(
            f"  {timing.name:<36} {s['small_median_ms']:>10.1f} {s['small_p95_ms']:>10.1f} "
            f"{s['large_median_ms']:>10.1f} {s['large_p95_ms']:>10.1f} "
            f"{s['ratio_median']:>10.2f} {s['ratio_p95']:>10.2f}  <= {LATENCY_TARGET} {verdict}"
        )


# ------------------------------------------------------------------------ plans


def explain_hot_queries(store: Store) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement the service runs for the hot reads."""
    captured: list[tuple[str, str, Any]] = []
    current = ["job lookup (every /v1/jobs/{id} route)"]

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((current[0], statement, parameters))

    engine = create_engine(store.url, poolclass=NullPool)
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            job = job_service.get_job(session, store.project_id, store.job_id)
            reads: list[tuple[str, Callable[[], object]]] = [
                ("job describe (GET /v1/jobs/{id})", lambda: job_service.describe(session, job)),
                (
                    "trajectories, first page",
                    lambda: trajectory_service.list_trajectories(
                        session, store.project_id, limit=100
                    ),
                ),
                (
                    "trajectories, resolved=true",
                    lambda: trajectory_service.list_trajectories(
                        session, store.project_id, resolved="true", limit=100
                    ),
                ),
                (
                    "trajectories, task_id filter",
                    lambda: trajectory_service.list_trajectories(
                        session, store.project_id, task_id="task-17", limit=100
                    ),
                ),
                (
                    "trajectories, page 90% down",
                    lambda: trajectory_service.list_trajectories(
                        session, store.project_id, limit=100, cursor=store.deep_trajectory_cursor
                    ),
                ),
                (
                    "verdicts, first page",
                    lambda: job_service.list_verdicts(session, job, limit=200, cursor=None),
                ),
                (
                    "verdicts, page 90% down",
                    lambda: job_service.list_verdicts(
                        session, job, limit=200, cursor=store.deep_verdict_cursor
                    ),
                ),
                ("/metrics", lambda: metrics.render(session)),
            ]
            for name, read in reads:
                current[0] = name
                read()
            session.rollback()
        event.remove(engine, "before_cursor_execute", capture)
        lines: list[str] = []
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            assert raw is not None
            for name, statement, parameters in captured:
                if not statement.lstrip().upper().startswith("SELECT"):
                    continue
                cursor = raw.cursor()
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
                plan = "\n".join(f"    {row[0]}" for row in cursor.fetchall())
                lines.append(f"-- {name}\n  {' '.join(statement.split())}\n{plan}")
            raw.rollback()
        return "\n".join(lines)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------ job creation


@dataclass
class CreateResult:
    label: str
    request_s: float
    rows_s: float
    rows: int
    expected_rows: int
    preparation_field: bool


def create_job(stack: Stack, store: Store) -> CreateResult:
    """A step-mode job over every trajectory of `store`: the request's latency, and the time
    until its last pending row exists; then it is cancelled."""
    critic_port = free_port()
    critic = stack.procs.spawn(
        "held-critic",
        [
            "critic",
            "serve-rules",
            "--port",
            str(critic_port),
            "--latency-ms",
            str(HELD_CRITIC_LATENCY_MS),
        ],
        {},
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{critic_port}/v1/models"), "the critic", [critic])
    env = stack.service_env(store.url) | {
        "SRFT_CRITIC_BASE_URL": f"http://127.0.0.1:{critic_port}/v1",
        "SRFT_CRITIC_MAX_CONCURRENCY": "1",
    }
    worker = stack.procs.spawn(
        "create-worker", ["worker", "--pool", "threads", "--loglevel", "INFO"], env
    )
    wait_until(lambda: " ready." in worker.log_path.read_text(errors="replace"), "worker", [worker])
    body = {"selection": {}, "critic": {"mode": "step"}, "scope": "all", "cache": False}
    try:
        with store.client() as client:
            began = time.perf_counter()
            response = client.post("/v1/jobs", json=body)
            request_s = time.perf_counter() - began
            if response.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs: HTTP {response.status_code}: {response.text}")
            job = response.json()
            has_preparation = "preparation" in job
            while has_preparation and not job["preparation"].get("complete"):
                worker.check_alive()
                time.sleep(POLL_S)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            rows_s = time.perf_counter() - began
            cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
            if cancelled.status_code != 200:
                raise RuntimeError(f"cancel: HTTP {cancelled.status_code}: {cancelled.text}")
        with store.engine.connect() as connection:
            rows = connection.scalar(
                select(func.count()).where(Verdict.job_id == uuid.UUID(job["id"]))
            )
    finally:
        stack.procs.stop([worker, critic], timeout=5)
    return CreateResult(
        store.label, request_s, rows_s, int(rows or 0), store.size * store.steps, has_preparation
    )


# ------------------------------------------------------------------------ exports


@dataclass
class ExportRun:
    label: str
    fmt: str
    workers: int
    seconds: float
    server_seconds: float | None
    peak_rss_mib: list[float | None]
    shards: list[tuple[str, str]]
    status: str
    error: Any = None


def run_export(stack: Stack, store: Store, fmt: str, workers: int, tokenizer: Path) -> ExportRun:
    """One export of every trajectory, built by `workers` fresh solo workers."""
    procs = stack.workers(store.url, workers, SRFT_EXPORT_PROCESSES="1")
    body: dict[str, Any] = {"job_ids": [str(store.job_id)], "format": fmt}
    if fmt == "tokenized_parquet":
        body["tokenizer"] = str(tokenizer)
    try:
        with store.client() as client:
            began = time.perf_counter()
            response = client.post("/v1/exports", json=body)
            if response.status_code != 202:
                raise RuntimeError(
                    f"POST /v1/exports: HTTP {response.status_code}: {response.text}"
                )
            export = response.json()
            while export["status"] not in (ExportStatus.COMPLETED, ExportStatus.FAILED):
                for proc in procs:
                    proc.check_alive()
                time.sleep(POLL_S)
                export = client.get(f"/v1/exports/{export['id']}").json()
            seconds = time.perf_counter() - began
        peaks = [proc.peak_rss_mib() for proc in procs]
    finally:
        stack.procs.stop(procs)
    server_seconds = None
    if export.get("finished_at") and export.get("created_at"):
        server_seconds = (
            datetime.fromisoformat(export["finished_at"])
            - datetime.fromisoformat(export["created_at"])
        ).total_seconds()
    manifest = export.get("manifest") or {}
    shards = [(s.get("path", ""), s.get("sha256", "")) for s in manifest.get("shards", [])]
    return ExportRun(
        store.label,
        fmt,
        workers,
        seconds,
        server_seconds,
        peaks,
        shards,
        export["status"],
        export.get("error"),
    )


def print_exports(runs: list[ExportRun]) -> list[str]:
    problems: list[str] = []
    print("\nexports of every trajectory (solo workers, SRFT_EXPORT_PROCESSES=1)")
    print(
        f"  {'store':<6} {'format':<18} {'1 worker s':>11} {'2 workers s':>12} {'speed-up':>9}"
        f"  target          {'peak RSS per worker (MiB)':<40}"
    )
    by_key = {(r.label, r.fmt, r.workers): r for r in runs}
    for run in runs:
        if run.status != ExportStatus.COMPLETED:
            problems.append(f"{run.label} {run.fmt} with {run.workers} workers: {run.error}")
    for label, fmt in dict.fromkeys((r.label, r.fmt) for r in runs):
        one, two = by_key.get((label, fmt, 1)), by_key.get((label, fmt, 2))
        if one is None or two is None:
            continue
        speedup = one.seconds / two.seconds
        verdict = "ok" if speedup >= WORKERS_TARGET else "MISSED"
        rss = "1: " + _mib(one.peak_rss_mib) + "; 2: " + _mib(two.peak_rss_mib)
        print(
            f"  {label:<6} {fmt:<18} {one.seconds:>11.1f} {two.seconds:>12.1f} "
            f"{speedup:>9.2f}  >= {WORKERS_TARGET} {verdict:<7} {rss}"
        )
        if one.status == two.status == ExportStatus.COMPLETED:
            if not one.shards:
                problems.append(f"{label} {fmt}: the manifest lists no shards")
            elif one.shards != two.shards:
                problems.append(
                    f"{label} {fmt}: shards differ between 1 and 2 workers "
                    f"({len(one.shards)} vs {len(two.shards)} files, sha256 compared)"
                )
    # Peak RSS against store size, per format: the largest worker of the 1-worker runs.
    labels = list(dict.fromkeys(r.label for r in runs))
    if len(labels) == 2:
        for fmt in dict.fromkeys(r.fmt for r in runs):
            small, large = by_key.get((labels[0], fmt, 1)), by_key.get((labels[1], fmt, 1))
            if small is None or large is None:
                continue
            a, b = _peak(small.peak_rss_mib), _peak(large.peak_rss_mib)
            if a and b:
                ratio = b / a
                verdict = "ok" if ratio <= FLAT_TARGET else "MISSED"
                print(
                    f"  {fmt}: worker peak RSS {a:,.0f} MiB at {labels[0]}, {b:,.0f} MiB at "
                    f"{labels[1]}: ratio {ratio:.2f} (target flat, <= {FLAT_TARGET}) {verdict}"
                )
    return problems


def _peak(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _mib(values: list[float | None]) -> str:
    return ", ".join("?" if v is None else f"{v:,.0f}" for v in values)


# ------------------------------------------------------------------------ ingest


def write_inputs(workdir: Path, sizes: tuple[int, int], steps: int, seed: int) -> dict[str, Any]:
    """A JSON Lines file and a folder of Parquet shards (SWE-smith's Hub schema) of about
    each size in bytes of JSON, written as they are generated (never held in memory)."""
    inputs: dict[str, Any] = {}
    for size in sizes:
        jsonl = workdir / f"runs-{size}.jsonl"
        folder = workdir / f"shards-{size}"
        (folder / "data").mkdir(parents=True)
        rows = written = 0
        shard_rows: list[dict[str, Any]] = []
        shard_bytes = 0
        shard_paths: list[Path] = []
        shard_limit = max(size // 16, 4 * MiB)
        chunk = 0
        with jsonl.open("w", encoding="utf-8") as out:
            while written < size:
                for run in make_trajectories(100, steps, seed * 100_000 + chunk):
                    line = json.dumps(run, ensure_ascii=False)
                    out.write(line + "\n")
                    written += len(line.encode()) + 1
                    rows += 1
                    messages = json.dumps(run["messages"], ensure_ascii=False)
                    shard_rows.append(
                        {
                            "messages": messages,
                            "instance_id": run["task_id"],
                            "resolved": run["resolved"],
                            "model": run["metadata"]["model"],
                            "traj_id": f"{run['task_id']}.traj",
                            "patch": "",
                        }
                    )
                    shard_bytes += len(messages)
                    if shard_bytes >= shard_limit:
                        shard_paths.append(_write_shard(folder, len(shard_paths), shard_rows))
                        shard_rows, shard_bytes = [], 0
                    if written >= size:
                        break
                chunk += 1
        if shard_rows:
            shard_paths.append(_write_shard(folder, len(shard_paths), shard_rows))
        for n, path in enumerate(shard_paths):  # the Hub's names, once the count is known
            path.rename(folder / "data" / f"train-{n:05d}-of-{len(shard_paths):05d}.parquet")
        inputs[str(size)] = {
            "jsonl": jsonl,
            "jsonl_bytes": jsonl.stat().st_size,
            "parquet": folder,
            "parquet_bytes": sum(p.stat().st_size for p in (folder / "data").iterdir()),
            "rows": rows,
        }
    return inputs


def _write_shard(folder: Path, number: int, rows: list[dict[str, Any]]) -> Path:
    path = folder / "data" / f"part-{number:05d}.parquet"
    table = pa.Table.from_pylist(rows, schema=SWE_SMITH_SCHEMA)
    pq.write_table(table, path, row_group_size=100)
    return path


@dataclass
class IngestRun:
    kind: str
    input_bytes: int
    rows: int
    seconds: float
    peak_rss_mib: float
    created: int | None
    stored: int
    returncode: int

    @property
    def runs_per_second(self) -> float:
        return self.rows / self.seconds


def run_ingest(stack: Stack, label: str, kind: str, path: Path, rows: int, size: int) -> IngestRun:
    """`srft ingest PATH` into a fresh database: wall time, peak RSS (getrusage), counts."""
    with stack.admin.fresh_database(f"ingest_{label}_{kind}") as url:
        api, api_url = stack.serve(f"api-ingest-{label}-{kind}", url)
        try:
            log_path = stack.workdir / f"ingest-{label}-{kind}.log"
            with log_path.open("wb") as log:
                began = time.perf_counter()
                process = subprocess.Popen(
                    [
                        *SRFT,
                        "ingest",
                        str(path),
                        "--url",
                        api_url,
                        "--api-key",
                        API_KEY,
                        "--state",
                        str(stack.workdir / f"ingest-state-{label}-{kind}"),
                        "--restart",
                    ],
                    cwd=stack.workdir,
                    env=child_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                _, status, usage = os.wait4(process.pid, 0)
                seconds = time.perf_counter() - began
            process.returncode = os.waitstatus_to_exitcode(status)
            output = log_path.read_text(errors="replace")
            created = None
            for line in output.splitlines():
                if "trajectories created" in line:
                    created = int(line.split(": ", 1)[1].split()[0])
            engine = create_engine(url, poolclass=NullPool)
            with engine.connect() as connection:
                stored = int(connection.scalar(select(func.count()).select_from(Trajectory)) or 0)
            engine.dispose()
        finally:
            stack.procs.stop([api])
    return IngestRun(
        kind, size, rows, seconds, usage.ru_maxrss / 1024, created, stored, process.returncode
    )


def print_ingest(runs: list[IngestRun]) -> list[str]:
    problems: list[str] = []
    print("\nsrft ingest (one fresh database and API per run; CLI defaults)")
    print(
        f"  {'input':<10} {'size MB':>9} {'runs':>8} {'seconds':>9} {'runs/s':>9} "
        f"{'CLI peak RSS':>13}"
    )
    for run in runs:
        print(
            f"  {run.kind:<10} {run.input_bytes / 1e6:>9.1f} {run.rows:>8,} {run.seconds:>9.1f} "
            f"{run.runs_per_second:>9.1f} {run.peak_rss_mib:>9.0f} MiB"
        )
        if run.returncode != 0 or run.created != run.rows or run.stored != run.rows:
            problems.append(
                f"ingest {run.kind} of {run.input_bytes / 1e6:.0f} MB: exit {run.returncode}, "
                f"{run.created} created, {run.stored} stored, expected {run.rows}"
            )
    for kind in dict.fromkeys(r.kind for r in runs):
        pair = [r for r in runs if r.kind == kind]
        if len(pair) == 2:
            ratio = pair[1].peak_rss_mib / pair[0].peak_rss_mib
            size_ratio = pair[1].input_bytes / pair[0].input_bytes
            verdict = "ok" if ratio <= FLAT_TARGET else "MISSED"
            print(
                f"  {kind}: input x{size_ratio:.1f}, CLI peak RSS x{ratio:.2f} "
                f"(target flat, <= {FLAT_TARGET}) {verdict}"
            )
    return problems


# ------------------------------------------------------------------------ the run


def benchmark(options: Options) -> int:
    machine = machine_facts()
    problems: list[str] = []
    report: dict[str, Any] = {"options": {k: str(v) for k, v in vars(options).items()}}
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="srft-bench-scale-"))
        if options.keep_logs:
            stack.callback(print, f"logs kept in {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, True)
        admin_url = (
            options.database_url
            if options.database_url is not None
            else stack.enter_context(postgres_server())
        )
        admin = PostgresServer(admin_url)
        stack.callback(admin.close)
        facts = admin.facts()
        print(describe_machine(machine, facts))
        redis = RedisServer()
        redis.start()
        stack.callback(redis.close)
        procs = Processes(workdir)
        stack.callback(procs.stop)
        tokenizer_root = workdir / "tokenizers"
        shared = Stack(admin, redis, procs, workdir, tokenizer_root, workdir / "exports", options)

        stores: list[Store] = []
        if {"latency", "create", "export"} & set(options.sections):
            for size in options.sizes:
                url = stack.enter_context(admin.fresh_database(f"store_{size}"))
                store = build_store(label_of(size), url, size, options.steps, options.seed)
                stack.callback(store.engine.dispose)
                problems += check_store(store)
                print(
                    f"store {store.label}: {size:,} trajectories, {size * options.steps:,} steps "
                    f"and done verdicts, built in {store.build_s:.1f} s (COPY, not timed below)"
                )
                store.api, store.api_url = shared.serve(f"api-{store.label}", url)
                stores.append(store)
            report["stores"] = {s.label: {"size": s.size, "build_s": s.build_s} for s in stores}
        small, large = (stores[0], stores[1]) if len(stores) == 2 else (None, None)

        if "latency" in options.sections and small and large:
            timings, found = measure_latency(small, large, options.requests)
            problems += found
            print_latency(timings, small, large, options.requests)
            report["latency"] = {t.name.strip(): t.summary() for t in timings}

        if options.plans and large is not None:
            print(f"\nquery plans at {large.label} (EXPLAIN (ANALYZE, BUFFERS))")
            print(explain_hot_queries(large))

        if "create" in options.sections and small and large:
            results = [create_job(shared, store) for store in (small, large)]
            print("\njob creation: step mode, every trajectory, cache off (then cancelled)")
            for r in results:
                how = (
                    "preparation.complete"
                    if r.preparation_field
                    else "the answer (no preparation field)"
                )
                print(
                    f"  {r.label:<6} {r.expected_rows:>10,} steps: request {r.request_s:7.2f} s, "
                    f"last pending row after {r.rows_s:7.2f} s (until {how})"
                )
                if r.rows != r.expected_rows:
                    problems.append(
                        f"create {r.label}: {r.rows} verdict rows, expected {r.expected_rows}"
                    )
            print(
                f"  ratio {large.label}/{small.label}: "
                f"rows {results[1].rows_s / results[0].rows_s:.2f} "
                f"(steps x{large.size / small.size:.0f})"
            )
            report["create"] = [vars(r) for r in results]

        if "export" in options.sections and small and large:
            tokenizer = build_tokenizer(tokenizer_root / "chatml", "chatml")
            runs: list[ExportRun] = []
            for store in (small, large):
                # Untimed: the first export of a store reads its rows from disk; the timed
                # runs should all find them where the later ones do (the database's cache).
                warm = run_export(shared, store, "openai_jsonl", 1, tokenizer)
                if warm.status != ExportStatus.COMPLETED:
                    problems.append(f"{store.label} warm-up export: {warm.error}")
                for fmt in EXPORT_FORMATS:
                    for workers in (1, 2):
                        runs.append(run_export(shared, store, fmt, workers, tokenizer))
            problems += print_exports(runs)
            report["export"] = [vars(r) for r in runs]

        if "ingest" in options.sections:
            large_bytes = int(options.ingest_gb * 1e9)
            sizes = (large_bytes // 10, large_bytes)
            began = time.perf_counter()
            inputs = write_inputs(workdir / "inputs", sizes, options.steps, options.seed)
            print(f"\ningest inputs written in {time.perf_counter() - began:.1f} s (not timed)")
            ingest_runs: list[IngestRun] = []
            for kind in ("jsonl", "parquet"):
                for size in sizes:
                    made = inputs[str(size)]
                    ingest_runs.append(
                        run_ingest(
                            shared, str(size), kind, made[kind], made["rows"], made[f"{kind}_bytes"]
                        )
                    )
            problems += print_ingest(ingest_runs)
            report["ingest"] = [
                vars(r) | {"runs_per_second": r.runs_per_second} for r in ingest_runs
            ]

    print(describe_machine(machine, facts))
    if options.json_path is not None:
        report["machine"] = machine
        report["postgres"] = facts
        report["problems"] = problems
        write_report(options.json_path, json.loads(json.dumps(report, default=str)))
    return exit_status(problems)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cleaning_up(benchmark, parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
