"""Labeling throughput: a `step`-mode job through the whole service, next to the endpoint's
limit and next to plain asyncio clients making the same critic calls.

Run from the repository root (needs the PostgreSQL server binaries and redis-server, as the
tests do):

    .venv/bin/python bench/labeling.py                       # 400 trajectories x 50 steps
    .venv/bin/python bench/labeling.py --trajectories 40     # a quick look
    .venv/bin/python bench/labeling.py --json labeling.json  # also write the numbers

What it does:

1. builds N distinct synthetic trajectories from a seed (those of `bench/ingest.py`: a ~2 KB
   system prompt, a ~1 KB task, then per step a thought of 100-800 B, a tool call of 30-300 B
   and an observation of 200 B-4 KB);
2. starts, each as its own process: a throw-away Postgres (or uses --database-url) with a
   fresh migrated database, Redis, the rules critic (`srft critic serve-rules --latency-ms
   L`), the API (`srft serve`, broker Redis), `srft beat` and --workers `srft worker`
   processes with SRFT_CRITIC_MAX_CONCURRENCY=C, and uploads the trajectories over HTTP;
3. starts a `step`-mode job over all of them with `"cache": false` and times it from the job's
   creation to its completion (both as stored by the service); checks that every step has
   exactly one `done` verdict, with exactly the label the rules prescribe;
4. starts a `trajectory`-mode job over the same trajectories, for prompt tokens per step;
   then (unless --no-batch) the step-mode job again with `"delivery": "batch"`: the same
   requests through the Batch API (input files uploaded, batches polled every 0.2 s, output
   files read back), with the rules critic's batch delay at zero, so its calls/s are srft's
   own cost of the Batch path;
5. stops the service, then makes the same critic calls (the same request bodies, built with
   `app.critic.prompt.step_request`) from plain asyncio programs with C concurrent workers and
   no database: one over `httpx.AsyncClient`, one over raw asyncio streams (HTTP/1.1
   keep-alive, the least client work possible);
6. prints calls/s next to the endpoint's limit (C / latency) and to the plain clients, with
   the CPU each process spent per call, and exits non-zero if any check failed.

Every database, process and file it creates is removed on exit, including on Ctrl-C.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.config import Settings
from app.critic.labels import DEFAULT_LABELS
from app.critic.prompt import StepRequests
from app.critic.rules import label_trajectory
from app.models import Job, Trajectory, Verdict
from app.recipe.steps import split_steps
from bench.common import (
    PostgresServer,
    ProcStat,
    child_env,
    describe_machine,
    exit_status,
    http_ok,
    log_tail,
    machine_facts,
    make_trajectories,
    options_for_json,
    percentile,
    proc_stat,
    run_cleaning_up,
    start_logged,
    write_report,
)
from tests.servers import RedisServer, free_port, postgres_server

SRFT = (sys.executable, "-m", "app.cli")
API_KEY = "srft_bench_" + "l" * 32
UPLOAD_BATCH = 50
POLL_S = 0.5
RETRIES = 5  # per call, for a plain client's lost connections


# ------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    trajectories: int
    steps: int
    latency_ms: int
    concurrency: int
    workers: int
    worker_concurrency: int | None
    pool: str | None
    chunk_size: int | None
    trajectory_mode: bool
    batch: bool
    baseline_calls: int | None
    baselines: tuple[str, ...]
    seed: int
    database_url: str | None
    json_path: Path | None
    keep_logs: bool

    @property
    def total_steps(self) -> int:
        return self.trajectories * self.steps

    @property
    def limit(self) -> float:
        """The endpoint's limit in calls/s: the concurrency cap over the latency."""
        return self.concurrency / (self.latency_ms / 1000)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Label synthetic trajectories in step mode through API, Redis, Celery workers, the "
            "rules critic and Postgres; compare with the endpoint's limit and plain clients."
        )
    )
    parser.add_argument("--trajectories", type=int, default=400, help="runs (default 400)")
    parser.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    parser.add_argument(
        "--latency-ms", type=int, default=200, help="the rules critic's latency (default 200)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="critic calls in flight at most: SRFT_CRITIC_MAX_CONCURRENCY, and the plain "
        "clients' workers (default 64)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="`srft worker` processes (default 1)"
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=8,
        help="each worker's tasks at once, `srft worker --concurrency` (default 8)",
    )
    parser.add_argument(
        "--pool",
        default="threads",
        choices=("threads", "prefork", "solo"),
        help="each worker's pool, `srft worker --pool` (default threads)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=50,
        help="SRFT_STEP_CHUNK_SIZE: steps per task (default 50: a trajectory per task)",
    )
    parser.add_argument(
        "--no-trajectory-mode",
        dest="trajectory_mode",
        action="store_false",
        help="skip the trajectory-mode job (prompt tokens per step)",
    )
    parser.add_argument(
        "--no-batch",
        dest="batch",
        action="store_false",
        help="skip the batch-delivery job (the step-mode job through the Batch API)",
    )
    parser.add_argument(
        "--baseline-calls",
        type=int,
        default=None,
        help="calls each plain client makes (default: every step, as the service did)",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        dest="baselines",
        choices=("httpx", "raw", "none"),
        help="plain clients to run (default: httpx and raw); ratios are to httpx",
    )
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed (default 1)")
    parser.add_argument(
        "--database-url",
        help=(
            "SQLAlchemy URL of an existing Postgres (13+) whose user may CREATE DATABASE; the "
            "benchmark creates and drops its own database there. Default: a throw-away server"
        ),
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the numbers here")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (their path is printed)"
    )
    args = parser.parse_args(argv)
    if min(args.trajectories, args.steps, args.concurrency, args.workers, args.latency_ms) < 1:
        parser.error(
            "--trajectories, --steps, --concurrency, --workers and --latency-ms must be >= 1"
        )
    baselines = tuple(dict.fromkeys(args.baselines or ("httpx", "raw")))
    return Options(
        trajectories=args.trajectories,
        steps=args.steps,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        workers=args.workers,
        worker_concurrency=args.worker_concurrency,
        pool=args.pool,
        chunk_size=args.chunk_size,
        trajectory_mode=args.trajectory_mode,
        batch=args.batch,
        baseline_calls=args.baseline_calls,
        baselines=tuple(b for b in baselines if b != "none"),
        seed=args.seed,
        database_url=args.database_url,
        json_path=args.json_path,
        keep_logs=args.keep_logs,
    )


# ------------------------------------------------------------------------ CPU accounting


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its descendants, live or reaped (Linux /proc)."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.parent_pid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid].total_cpu_seconds
        todo.extend(children.get(pid, []))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per component between `start()` and `stop()`."""

    def __init__(self, components: dict[str, Callable[[], float]]) -> None:
        self.components = components
        self._before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        readings = {name: read() for name, read in self.components.items()}
        readings["bench process"] = time.process_time()
        readings["machine (all CPUs)"] = machine_busy_seconds()
        return readings

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.spent = {name: after[name] - self._before[name] for name in after}
        return self.spent


# ------------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        # Its own process group: prefork pool children go with it.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


class Stack:
    """Every process of the run, started in its own session and stopped in reverse order."""

    def __init__(self, workdir: Path, base_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.base_env = base_env
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: Sequence[str], **env: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        cwd = self.workdir / name
        cwd.mkdir(exist_ok=True)
        process = start_logged([*SRFT, *args], cwd, self.base_env | env, log_path)
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, names: Sequence[str] | None = None) -> None:
        for proc in reversed(self.procs):
            if names is None or proc.name in names:
                proc.stop()


def wait_until(
    ready: Callable[[], bool], what: str, procs: Sequence[Proc], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs:
            proc.check_alive()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
            raise TimeoutError(f"{what} not ready after {timeout} s:\n{tails}")
        time.sleep(0.1)


def postmaster_pid(engine: Engine) -> int | None:
    with engine.connect() as connection:
        backend = int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)
    stat = proc_stat(backend)
    return None if stat is None else stat.parent_pid


# ------------------------------------------------------------------------ the critic


class CriticAdmin:
    """The rules critic's /admin API, and a sampler of its in-flight calls."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/admin/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> None:
        httpx.post(f"{self.url}/admin/stats/reset", timeout=10).raise_for_status()

    def set_plan(self, plan: dict[str, Any]) -> None:
        httpx.post(f"{self.url}/admin/faults", json=plan, timeout=10).raise_for_status()

    def start_sampling(self, every_s: float = 1.0) -> None:
        self.samples = []
        self._stop.clear()

        def sample() -> None:
            with httpx.Client(timeout=10) as client:
                while not self._stop.wait(every_s):
                    try:
                        stats = client.get(f"{self.url}/admin/stats").json()
                    except httpx.HTTPError:
                        continue
                    self.samples.append(int(stats["in_flight"]))

        self._thread = threading.Thread(target=sample, name="critic-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> float | None:
        """The mean of the in-flight samples taken while at least one call was in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        busy = [s for s in self.samples if s > 0]
        return statistics.mean(busy) if busy else None


# ------------------------------------------------------------------------ results


@dataclass
class RunResult:
    name: str
    kind: str  # "service" or "baseline"
    calls: int
    seconds: float
    steps: int | None = None
    client_cpu_s: float | None = None
    critic_cpu_s: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    max_in_flight: int | None = None
    mean_in_flight: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    errors: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds


@dataclass
class TokenResult:
    mode: str
    steps: int
    calls: int
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def per_step(self, tokens: int) -> float:
        return tokens / self.steps if self.steps else 0.0


# ------------------------------------------------------------------------ the service run


class Service:
    """Everything a deployment runs, on one machine: Postgres, Redis, critic, API, workers."""

    def __init__(self, options: Options, stack: ExitStack, workdir: Path) -> None:
        self.options = options
        admin_url = (
            options.database_url
            if options.database_url is not None
            else stack.enter_context(postgres_server())
        )
        self.server = PostgresServer(admin_url)
        stack.callback(self.server.close)
        self.facts = self.server.facts()
        self.postmaster = postmaster_pid(self.server.engine)
        self.database_url = stack.enter_context(self.server.fresh_database("labeling"))
        self.engine = create_engine(self.database_url, poolclass=NullPool)
        stack.callback(self.engine.dispose)

        self.redis = RedisServer()
        self.redis.start()
        stack.callback(self.redis.close)

        self.stack = Stack(workdir, child_env())
        stack.callback(self.stack.stop)

        self.critic_url = f"http://127.0.0.1:{free_port()}"
        critic_port = urlsplit(self.critic_url).port
        self.critic = self.stack.spawn(
            "critic",
            [
                "critic",
                "serve-rules",
                "--port",
                str(critic_port),
                "--latency-ms",
                str(options.latency_ms),
            ],
        )
        self.admin = CriticAdmin(self.critic_url)

        common = {"SRFT_DATABASE_URL": self.database_url, "SRFT_BROKER_URL": self.redis.url}
        if options.chunk_size is not None:
            common["SRFT_STEP_CHUNK_SIZE"] = str(options.chunk_size)
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.api = self.stack.spawn(
            "api",
            ["serve", "--no-migrate", "--port", str(urlsplit(self.api_url).port)],
            SRFT_BOOTSTRAP_API_KEY=API_KEY,
            **common,
        )
        worker_env = common | {
            "SRFT_BATCH_POLL_S": "0.2",
            "SRFT_CRITIC_BASE_URL": f"{self.critic_url}/v1",
            "SRFT_CRITIC_MAX_CONCURRENCY": str(options.concurrency),
        }
        worker_args = ["worker", "--loglevel", "INFO"]
        if options.worker_concurrency is not None:
            worker_args += ["--concurrency", str(options.worker_concurrency)]
        if options.pool is not None:
            worker_args += ["--pool", options.pool]
        self.workers = [
            self.stack.spawn(f"worker-{n}", worker_args, **worker_env)
            for n in range(options.workers)
        ]
        self.beat = self.stack.spawn("beat", ["beat", "--loglevel", "WARNING"], **worker_env)

        everything = self.stack.procs
        wait_until(lambda: http_ok(f"{self.critic_url}/v1/models"), "the critic", everything)
        wait_until(lambda: http_ok(f"{self.api_url}/healthz"), "the API", everything)
        wait_until(
            lambda: all(" ready." in w.log_path.read_text(errors="replace") for w in self.workers),
            "the workers",
            everything,
        )
        self.http = httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600
        )
        stack.callback(self.http.close)

    def cpu_meter(self) -> CpuMeter:
        components: dict[str, Callable[[], float]] = {
            "workers": lambda: sum(w.cpu_seconds() for w in self.workers),
            "critic": self.critic.cpu_seconds,
            "API": self.api.cpu_seconds,
            "beat": self.beat.cpu_seconds,
            "Redis": lambda: (
                tree_cpu_seconds(self.redis.process.pid) if self.redis.process else 0.0
            ),
        }
        if self.postmaster is not None:
            postmaster = self.postmaster
            components["Postgres"] = lambda: tree_cpu_seconds(postmaster)
        return CpuMeter(components)

    def upload(self, runs: list[dict[str, Any]]) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(runs), UPLOAD_BATCH):
            body = b"\n".join(
                json.dumps(run, ensure_ascii=False).encode()
                for run in runs[start : start + UPLOAD_BATCH]
            )
            response = self.http.post(
                "/v1/trajectories",
                content=body,
                headers={"Content-Type": "application/x-ndjson"},
            )
            if response.status_code != 201:
                raise RuntimeError(f"upload failed: HTTP {response.status_code}: {response.text}")
            ids += [run["id"] for run in response.json()["trajectories"]]
        return ids

    def run_job(
        self, ids: list[str], mode: str, delivery: str = "online"
    ) -> tuple[dict[str, Any], float, float]:
        """Start a job, wait for its end; (job as the API shows it, seconds, wall seconds).

        Seconds run from the job's `created_at` to its `finished_at`, both stored by the
        service; completion is watched with a cheap query on the database, not the API, so
        watching costs the service nothing.
        """
        body = {
            "selection": {"trajectory_ids": ids},
            "critic": {"mode": mode, "delivery": delivery},
            "scope": "all",
            "cache": False,
        }
        began = time.perf_counter()
        response = self.http.post("/v1/jobs", json=body)
        self.post_seconds = time.perf_counter() - began
        if response.status_code != 202:
            raise RuntimeError(f"job not started: HTTP {response.status_code}: {response.text}")
        job_id = uuid.UUID(response.json()["id"])
        while True:
            with self.engine.connect() as connection:
                status = connection.scalar(select(Job.status).where(Job.id == job_id))
            if status in ("completed", "failed", "cancelled"):
                break
            for proc in self.stack.procs:
                proc.check_alive()
            time.sleep(POLL_S)
        wall = time.perf_counter() - began
        with self.engine.connect() as connection:
            created, finished = connection.execute(
                select(Job.created_at, Job.finished_at).where(Job.id == job_id)
            ).one()
        job: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").json()
        return job, (finished - created).total_seconds(), wall

    def check_verdicts(
        self, job: dict[str, Any], expected: dict[tuple[str, int], str]
    ) -> list[str]:
        """Exactly one done verdict per step, each with the label the rules prescribe."""
        job_id = uuid.UUID(job["id"])
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(
                    Verdict.trajectory_id, Verdict.step_index, Verdict.status, Verdict.label
                ).where(Verdict.job_id == job_id)
            ).all()
        problems: list[str] = []
        mode = job["critic"]["mode"]
        keys = Counter((str(t), s) for t, s, _, _ in rows)
        if len(keys) != len(expected) or set(keys) != set(expected):
            problems.append(f"{mode} job: verdicts for {len(keys)} steps, expected {len(expected)}")
        duplicated = sum(1 for count in keys.values() if count > 1)
        if duplicated:
            problems.append(f"{mode} job: {duplicated} steps have more than one verdict")
        statuses = Counter(status for _, _, status, _ in rows)
        if statuses != {"done": len(expected)}:
            problems.append(f"{mode} job: verdict statuses {dict(statuses)}, all should be done")
        wrong = sum(1 for t, s, _, label in rows if expected.get((str(t), s)) != label)
        if wrong:
            problems.append(f"{mode} job: {wrong} labels differ from what the rules prescribe")
        if job["status"] != "completed":
            problems.append(f"{mode} job ended {job['status']}")
        return problems

    def phases(self, job_id: str) -> dict[str, float]:
        """Where a job's time went, from the timestamps the service stored (seconds)."""
        with self.engine.connect() as connection:
            created, started, finished = connection.execute(
                select(Job.created_at, Job.started_at, Job.finished_at).where(
                    Job.id == uuid.UUID(job_id)
                )
            ).one()
            ends = sorted(
                connection.scalars(
                    select(Verdict.finished_at).where(Verdict.job_id == uuid.UUID(job_id))
                ).all()
            )
        if not ends or started is None or finished is None:
            return {}
        low, high = ends[len(ends) // 10], ends[len(ends) * 9 // 10]
        middle = (high - low).total_seconds()
        return {
            "to_first_claim_s": (started - created).total_seconds(),
            "first_claim_to_last_verdict_s": (ends[-1] - started).total_seconds(),
            "last_verdict_to_finished_s": (finished - ends[-1]).total_seconds(),
            "steady_steps_per_second": (len(ends) * 8 // 10) / middle if middle > 0 else 0.0,
        }

    def latencies_ms(self, job_id: str) -> list[float]:
        with self.engine.connect() as connection:
            values = connection.scalars(
                select(Verdict.latency_ms).where(Verdict.job_id == uuid.UUID(job_id))
            ).all()
        return [float(v) for v in values if v is not None]

    def stored_trajectories(self, ids: list[str]) -> list[tuple[str, list[dict[str, Any]], Any]]:
        """(id, messages, resolved) of the trajectories as stored, in `ids` order."""
        wanted = [uuid.UUID(i) for i in ids]
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Trajectory.id, Trajectory.messages, Trajectory.resolved).where(
                    Trajectory.id.in_(wanted)
                )
            ).all()
        by_id = {str(r.id): (str(r.id), r.messages, r.resolved) for r in rows}
        return [by_id[i] for i in ids]

    def verdict_count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(Verdict)) or 0)


# ------------------------------------------------------------------------ plain clients


def build_calls(
    stored: list[tuple[str, list[dict[str, Any]], Any]], settings: Settings, limit: int | None
) -> list[dict[str, Any]]:
    """The chat-completion bodies the workers send in step mode, in the order they are queued.

    Each is built as `app.critic.judge` builds it (`StepRequests` gives exactly what
    `step_request` gives for each step); a trajectory's requests share their prefix strings,
    so memory stays at one prefix per trajectory.
    """
    calls: list[dict[str, Any]] = []
    for _, messages, resolved in stored:
        steps = split_steps(messages)
        requests = StepRequests(
            messages,
            steps,
            resolved,
            DEFAULT_LABELS,
            settings.critic_context_tokens,
            reserve_tokens=settings.critic_max_answer_tokens,
        )
        for step in steps:
            request = requests.request(step.index)
            calls.append(
                {
                    "model": settings.critic_model,
                    "messages": request.messages,
                    "temperature": 0.0,
                    "max_tokens": min(
                        request.max_completion_tokens, settings.critic_max_answer_tokens
                    ),
                    "response_format": request.response_format,
                }
            )
            if limit is not None and len(calls) >= limit:
                return calls
    return calls


def _answer_label(payload: dict[str, Any]) -> str:
    """What a client must do with an answer at least: read the label out of the JSON."""
    content = payload["choices"][0]["message"]["content"]
    label: str = json.loads(content)["label"]
    return label


async def _httpx_client(url: str, calls: list[dict[str, Any]], concurrency: int) -> int:
    errors = 0
    queue = iter(calls)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker() -> None:
            nonlocal errors
            for body in queue:
                for _ in range(RETRIES):
                    try:
                        response = await client.post(
                            "/v1/chat/completions",
                            json=body,
                            headers={"Authorization": "Bearer not-needed"},
                        )
                        break
                    except httpx.TransportError:
                        # A kept-alive connection the server closed meanwhile: ask again.
                        errors += 1
                else:
                    continue
                if response.status_code != 200:
                    errors += 1
                    continue
                _answer_label(response.json())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def _raw_client(url: str, calls: list[dict[str, Any]], concurrency: int) -> int:
    """HTTP/1.1 over asyncio streams, one keep-alive connection per worker."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    errors = 0
    queue = iter(calls)

    async def call(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
    ) -> tuple[int, bytes]:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {host}:{port}\r\n".encode()
            + b"Content-Type: application/json\r\nAuthorization: Bearer not-needed\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for body in queue:
                payload = json.dumps(body, ensure_ascii=False).encode()
                for _ in range(RETRIES):
                    try:
                        status, answer = await call(reader, writer, payload)
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        # The server closed the kept-alive connection: reconnect, ask again.
                        errors += 1
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, port)
                else:
                    continue
                if status != 200:
                    errors += 1
                    continue
                _answer_label(json.loads(answer))
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


BASELINES: dict[str, tuple[str, Any]] = {
    "httpx": ("plain asyncio + httpx.AsyncClient", _httpx_client),
    "raw": ("plain asyncio streams, raw HTTP/1.1", _raw_client),
}


def run_baseline(
    service: Service, method: str, calls: list[dict[str, Any]], concurrency: int
) -> RunResult:
    name, client = BASELINES[method]
    meter = CpuMeter({"critic": service.critic.cpu_seconds})
    service.admin.reset()
    service.admin.start_sampling()
    meter.start()
    started = time.perf_counter()
    errors = asyncio.run(client(f"{service.critic_url}", calls, concurrency))
    seconds = time.perf_counter() - started
    spent = meter.stop()
    mean_in_flight = service.admin.stop_sampling()
    stats = service.admin.stats()
    return RunResult(
        name=f"{name} ({concurrency} workers)",
        kind="baseline",
        calls=len(calls),
        seconds=seconds,
        client_cpu_s=spent["bench process"],
        critic_cpu_s=spent["critic"],
        cpu=spent,
        max_in_flight=int(stats["max_in_flight"]),
        mean_in_flight=mean_in_flight,
        errors=errors,
    )


# ------------------------------------------------------------------------ report


def _ratio(value: float, reference: float | None) -> str:
    return "-" if not reference else f"{value / reference:.3f}"


def _per_call_ms(seconds: float | None, calls: int) -> str:
    return "-" if seconds is None or not calls else f"{seconds / calls * 1000:.2f}"


def render_runs(results: list[RunResult], options: Options, reference: RunResult | None) -> str:
    header = (
        f"{'run':<52} {'calls':>7} {'seconds':>8} {'calls/s':>8} {'of limit':>8} "
        f"{'vs httpx':>8} {'client CPU':>10} {'critic CPU':>10} {'in flight':>11}"
    )
    units = (
        f"{'':<52} {'':>7} {'':>8} {'':>8} {'':>8} {'':>8} "
        f"{'ms/call':>10} {'ms/call':>10} {'mean/max':>11}"
    )
    lines = [header, units, "-" * len(header)]
    lines.append(
        f"{f'endpoint limit ({options.concurrency} / {options.latency_ms / 1000:g} s)':<52} "
        f"{'':>7} {'':>8} {options.limit:>8.1f} {1:>8.3f} "
        f"{_ratio(options.limit, reference.calls_per_second if reference else None):>8}"
    )
    for r in results:
        flight = (
            f"{r.mean_in_flight or 0:.0f}/{r.max_in_flight}" if r.max_in_flight is not None else "-"
        )
        lines.append(
            f"{r.name:<52} {r.calls:>7,} {r.seconds:>8.2f} {r.calls_per_second:>8.1f} "
            f"{r.calls_per_second / options.limit:>8.3f} "
            f"{_ratio(r.calls_per_second, reference.calls_per_second if reference else None):>8} "
            f"{_per_call_ms(r.client_cpu_s, r.calls):>10} "
            f"{_per_call_ms(r.critic_cpu_s, r.calls):>10} {flight:>11}"
        )
    return "\n".join(lines)


def render_tokens(tokens: list[TokenResult]) -> str:
    header = (
        f"{'mode':<11} {'steps':>7} {'calls':>7} {'seconds':>8} {'prompt/step':>12} "
        f"{'cached/step':>12} {'uncached/step':>14} {'completion/step':>16}"
    )
    lines = [header, "-" * len(header)]
    for t in tokens:
        lines.append(
            f"{t.mode:<11} {t.steps:>7,} {t.calls:>7,} {t.seconds:>8.2f} "
            f"{t.per_step(t.prompt_tokens):>12,.0f} {t.per_step(t.cached_tokens):>12,.0f} "
            f"{t.per_step(t.prompt_tokens - t.cached_tokens):>14,.0f} "
            f"{t.per_step(t.completion_tokens):>16,.1f}"
        )
    return "\n".join(lines)


def render_cpu(result: RunResult) -> str:
    calls = result.calls
    parts = []
    for name, seconds in result.cpu.items():
        if name == "machine (all CPUs)":
            continue
        parts.append(f"{name} {seconds:.1f} s ({seconds / calls * 1000:.2f} ms/step)")
    machine = result.cpu.get("machine (all CPUs)", 0.0)
    cpus = len(os.sched_getaffinity(0))
    return (
        "; ".join(parts)
        + f"; machine busy {machine:.1f} s of {cpus * result.seconds:.1f} s available "
        f"({machine / (cpus * result.seconds):.0%}), {machine / calls * 1000:.2f} ms/step"
    )


# ------------------------------------------------------------------------ main


def benchmark(options: Options) -> int:
    print(
        f"srft labeling benchmark: {options.trajectories:,} trajectories x {options.steps} "
        f"steps = {options.total_steps:,} steps in step mode; rules critic at "
        f"{options.latency_ms} ms, concurrency cap {options.concurrency} "
        f"(limit {options.limit:.0f} calls/s); seed {options.seed}",
        flush=True,
    )
    began = time.perf_counter()
    runs = make_trajectories(options.trajectories, options.steps, options.seed)
    payload = sum(len(json.dumps(run)) for run in runs)
    print(
        f"  generated {payload / 1e6:,.1f} MB of trajectories "
        f"({payload / len(runs) / 1e3:,.1f} KB each) in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    settings = Settings()  # the defaults the workers run with, apart from what we set
    results: list[RunResult] = []
    tokens: list[TokenResult] = []
    problems: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="srft-bench-labeling-"))
    with ExitStack() as stack:
        if not options.keep_logs:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        began = time.perf_counter()
        service = Service(options, stack, workdir)
        print(
            f"  started Postgres, Redis, the rules critic, the API, beat and "
            f"{options.workers} worker(s) in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        began = time.perf_counter()
        ids = service.upload(runs)
        del runs
        print(
            f"  uploaded {len(ids):,} trajectories in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        stored = service.stored_trajectories(ids)
        expected: dict[tuple[str, int], str] = {}
        for trajectory_id, messages, _ in stored:
            for verdict in label_trajectory(messages, split_steps(messages), DEFAULT_LABELS):
                expected[(trajectory_id, verdict.index)] = verdict.label

        # -- step mode through the service
        meter = service.cpu_meter()
        service.admin.reset()
        service.admin.start_sampling()
        meter.start()
        job, seconds, wall = service.run_job(ids, "step")
        spent = meter.stop()
        mean_in_flight = service.admin.stop_sampling()
        stats = service.admin.stats()
        steps = job["counts"]["steps"]["total"]
        latencies = service.latencies_ms(job["id"])
        phases = service.phases(job["id"])
        problems += service.check_verdicts(job, expected)
        worker_desc = (
            f"{options.workers} worker"
            + ("s" if options.workers > 1 else "")
            + (f" x {options.worker_concurrency}" if options.worker_concurrency else "")
            + (f" {options.pool}" if options.pool else "")
            + (f", {options.chunk_size} steps/task" if options.chunk_size else "")
        )
        service_result = RunResult(
            name=f"srft step mode ({worker_desc})",
            kind="service",
            calls=int(stats["completions"]),
            steps=steps,
            seconds=seconds,
            client_cpu_s=spent["workers"],
            critic_cpu_s=spent["critic"],
            cpu=spent,
            max_in_flight=int(stats["max_in_flight"]),
            mean_in_flight=mean_in_flight,
            latency_p50_ms=statistics.median(latencies) if latencies else None,
            latency_p95_ms=percentile(latencies, 0.95) if latencies else None,
            errors=job["counts"]["steps"]["failed"],
            phases=phases,
        )
        results.append(service_result)
        if service_result.calls != steps:
            problems.append(f"step job: {service_result.calls} critic calls for {steps} steps")
        if service_result.max_in_flight and service_result.max_in_flight > options.concurrency:
            problems.append(
                f"step job: {service_result.max_in_flight} calls in flight at the critic, "
                f"above the cap of {options.concurrency}"
            )
        usage = job["usage"]
        tokens.append(
            TokenResult(
                "step",
                steps,
                service_result.calls,
                seconds,
                usage["prompt_tokens"],
                usage["cached_tokens"],
                usage["completion_tokens"],
            )
        )
        print(
            f"  step job: {steps:,} steps in {seconds:.2f} s "
            f"({steps / seconds:.1f} steps/s; {wall:.2f} s seen by this script)",
            flush=True,
        )

        # -- trajectory mode, for prompt tokens per step
        if options.trajectory_mode:
            service.admin.reset()
            job, seconds, _ = service.run_job(ids, "trajectory")
            stats = service.admin.stats()
            problems += service.check_verdicts(job, expected)
            usage = job["usage"]
            tokens.append(
                TokenResult(
                    "trajectory",
                    job["counts"]["steps"]["total"],
                    int(stats["completions"]),
                    seconds,
                    usage["prompt_tokens"],
                    usage["cached_tokens"],
                    usage["completion_tokens"],
                )
            )
            print(f"  trajectory job: {len(ids):,} trajectories in {seconds:.2f} s", flush=True)

        # -- step mode again through the Batch API, the critic answering batches at once
        if options.batch:
            service.admin.reset()
            service.admin.set_plan({"batch_delay_s": 0})
            meter = service.cpu_meter()
            meter.start()
            job, seconds, _ = service.run_job(ids, "step", delivery="batch")
            spent = meter.stop()
            stats = service.admin.stats()
            problems += service.check_verdicts(job, expected)
            lines = int(stats["batches"]["batch_lines_answered"])
            steps = job["counts"]["steps"]["total"]
            batches = len(job["batches"])
            results.append(
                RunResult(
                    name=f"srft step mode, batch delivery ({batches} batch"
                    + ("es)" if batches != 1 else ")"),
                    kind="service",
                    calls=lines,
                    steps=steps,
                    seconds=seconds,
                    client_cpu_s=spent["workers"],
                    critic_cpu_s=spent["critic"],
                    cpu=spent,
                    errors=job["counts"]["steps"]["failed"],
                )
            )
            if lines != steps:
                problems.append(f"batch job: {lines} batch lines answered for {steps} steps")
            usage = job["usage"]
            tokens.append(
                TokenResult(
                    "step/batch",
                    steps,
                    lines,
                    seconds,
                    usage["prompt_tokens"],
                    usage["cached_tokens"],
                    usage["completion_tokens"],
                )
            )
            print(
                f"  batch job: {steps:,} steps in {batches} batches in {seconds:.2f} s "
                f"({steps / seconds:.1f} steps/s)",
                flush=True,
            )

        # -- the plain clients, on a machine where only the critic (and an idle Postgres
        # and Redis) runs
        service.stack.stop([w.name for w in service.workers] + ["beat", "api"])
        if options.baselines:
            began = time.perf_counter()
            calls = build_calls(stored, settings, options.baseline_calls or None)
            print(
                f"  built {len(calls):,} request bodies for the plain clients in "
                f"{time.perf_counter() - began:.1f} s",
                flush=True,
            )
            for method in options.baselines:
                result = run_baseline(service, method, calls, options.concurrency)
                results.append(result)
                print(
                    f"  {result.name}: {result.calls_per_second:.1f} calls/s",
                    flush=True,
                )
                if result.errors:
                    print(f"    ({result.errors} calls failed or were retried)", flush=True)
            del calls
        machine = machine_facts()
        facts = service.facts

    reference = next((r for r in results if r.kind == "baseline" and "httpx" in r.name), None)
    print()
    print(render_runs(results, options, reference))
    print()
    print(render_tokens(tokens))
    print()
    s = service_result
    print(
        f"srft: {s.steps or 0:,} steps in {s.seconds:.2f} s = {s.calls_per_second:.1f} steps/s, "
        f"{s.calls_per_second / options.limit:.1%} of the endpoint's limit"
        + (
            f", {s.calls_per_second / reference.calls_per_second:.2f}x the plain httpx client"
            if reference
            else ""
        )
        + f"; call latency seen by the workers p50 {s.latency_p50_ms or 0:.0f} ms, "
        f"p95 {s.latency_p95_ms or 0:.0f} ms"
    )
    if s.phases:
        p = s.phases
        print(
            f"srft's time: {p['to_first_claim_s']:.2f} s from creating the job to its first "
            f"claim (POST /v1/jobs, which writes a pending row per step and queues the tasks, "
            f"answered after {service.post_seconds:.2f} s), "
            f"{p['first_claim_to_last_verdict_s']:.2f} s of labeling, "
            f"{p['last_verdict_to_finished_s']:.2f} s from the last verdict to the job's "
            f"end; {p['steady_steps_per_second']:.1f} steps/s between the 10th and 90th "
            f"percentile of verdict times "
            f"({p['steady_steps_per_second'] / options.limit:.1%} of the limit)"
        )
    print(f"CPU during the step job: {render_cpu(s)}")
    print(
        "what the numbers include: srft's time runs from the job's creation (POST /v1/jobs: "
        "selecting the trajectories, writing one pending verdict row per step, queueing the "
        "tasks) to its completion as stored by the service (claims, critic calls through the "
        "Redis limiter, verdict writes, closing the job). The plain clients time only their "
        "calls to the same critic, with request bodies built beforehand (JSON encoding "
        "included), and no database, queue or limiter. 'client CPU' is the workers' CPU "
        "(every process of every `srft worker`) or the plain client's process; 'critic CPU' "
        "is the rules critic's own process, which shares the machine. 'in flight' is sampled "
        "at the critic once a second (mean while busy) and its exact maximum. Tokens are the "
        "critic's reported usage (the rules critic estimates chars / 3.5, and counts a "
        "prefix of messages it saw before as cached)."
    )
    print(
        f"{describe_machine(machine, facts)}; all processes (critic, Postgres, Redis, API, "
        f"beat, workers, this script) share it"
    )
    if options.keep_logs:
        print(f"logs: {workdir}")

    if options.json_path is not None:
        report = {
            "options": options_for_json(options),
            "limit_calls_per_second": options.limit,
            "machine": machine,
            "postgres": facts,
            "runs": [
                asdict(r)
                | {
                    "calls_per_second": r.calls_per_second,
                    "share_of_limit": r.calls_per_second / options.limit,
                    "ratio_to_httpx": (
                        r.calls_per_second / reference.calls_per_second if reference else None
                    ),
                }
                for r in results
            ],
            "tokens": [
                asdict(t)
                | {
                    "prompt_tokens_per_step": t.per_step(t.prompt_tokens),
                    "cached_tokens_per_step": t.per_step(t.cached_tokens),
                }
                for t in tokens
            ],
            "problems": problems,
        }
        write_report(options.json_path, report)
    return exit_status(problems)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the processes, the database and the servers go away.
    return run_cleaning_up(benchmark, parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
