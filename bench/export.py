"""Export throughput: a `tokenized_parquet` export next to the raw batch-encode throughput of
the same tokenizer on the same rendered text, and the export's peak memory at two sizes.

Run from the repository root (needs the PostgreSQL server binaries, as the tests do):

    .venv/bin/python bench/export.py                      # 2,000 trajectories x 50 steps
    .venv/bin/python bench/export.py --quick              # 200 trajectories: a quick look
    .venv/bin/python bench/export.py --json export.json   # also write the numbers
    .venv/bin/python bench/export.py --quick --profile 100  # + cProfile of a 1-process build

What it does:

1. builds N distinct synthetic trajectories from a seed (those of `bench/ingest.py`, each with
   the five tools' schemas; a third resolved, a third unresolved, a third unknown) and a
   byte-level BPE chat tokenizer (`tests/chat_tokenizers.py`: trained on the shared real
   trajectories, ChatML with tools, --vocab-size tokens);
2. not timed: starts a throw-away Postgres (or uses --database-url) with a fresh migrated
   database, stores the trajectories with the service's own ingest function (in this process,
   50 per upload), creates a labeling job (scope `unresolved`) and writes its verdicts straight
   into the job's rows (deterministic pseudo-random labels: ~75% good, 15% mistake, 10%
   unnecessary), then closes the job, as tests/exports/conftest.py does;
3. timed: creates an export (policy `srft`, format `tokenized_parquet`) and builds it with
   `app.exports.builder.build_export` in a fresh `python -c` process that imports only what
   a worker needs for it (the clock runs around `build_export` only, not the process's start
   or imports), with --processes tokenizing processes (SRFT_EXPORT_PROCESSES; 0: one per
   core); the process's peak RSS (its own and its largest tokenizing process's, from
   getrusage) and the peak of the whole process tree's RSS (sampled every 50 ms) are
   recorded; then a second export of the first N/4 trajectories the same way, so that peak
   memory can be compared across sizes;
4. checks each export completed and that its manifest's rows, tokens and trained tokens equal
   the sums over its parquet files (and per shard);
5. baseline, side by side: renders the conversation of every exported row once with
   `tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)` (not timed), then
   times `tokenizer(texts, add_special_tokens=False)` over batches of --encode-batch texts
   (the Rust tokenizer runs a batch on all cores); checks every row's token count (and the
   ids of a few rows) equal the export's;
6. prints tokens/s of both, their ratio (target: export >= 0.5 x raw encode), the peak memory
   at both sizes and their ratio (target: flat, < 1.3), and exits 1 if a check failed.

Everything it starts or creates is removed on exit, including on Ctrl-C.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before `app` and `tests` import)

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from sqlalchemy import select, text

from app.auth.service import create_key
from app.config import Settings
from app.db import Database
from app.exports import service as export_service
from app.exports.builder import build_export, export_path
from app.exports.schemas import ExportCreate
from app.jobs import service as job_service
from app.jobs import workqueue
from app.jobs.schemas import JobCreate, Selection
from app.models import Export, Trajectory, Verdict
from app.trajectories.service import ingest
from bench.common import (
    TOOL_NAMES,
    PostgresServer,
    child_env,
    describe_machine,
    exit_status,
    machine_facts,
    make_trajectories,
    options_for_json,
    run_cleaning_up,
    write_report,
)
from tests.helpers import prepare_job
from tests.servers import postgres_server

UPLOAD_BATCH = 50  # trajectories per ingested upload (NDJSON)
RESOLUTIONS: tuple[bool | None, ...] = (True, False, None)
# Verdict labels, by cumulative share: ~75% good, 15% mistake, 10% unnecessary.
LABEL_SHARES: tuple[tuple[str, float], ...] = (
    ("good", 0.75),
    ("mistake", 0.90),
    ("unnecessary", 1.0),
)
TARGET_RATIO = 0.5
FLAT_RATIO = 1.3
SAMPLE_S = 0.05  # RSS sampling period of the child's process tree
EXACT_ROWS = 8  # rows whose token ids are compared with the baseline's, id by id
PROFILE_LINES = 25
MiB = 1024 * 1024


# ------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    trajectories: int
    steps: int
    processes: int
    vocab_size: int
    encode_batch: int
    memory_small: int  # trajectories of the second export (0: none)
    offsets_baseline: bool
    profile: int  # trajectories of a cProfiled 1-process build (0: none)
    seed: int
    database_url: str | None
    json_path: Path | None

    @property
    def export_processes(self) -> int:
        """The tokenizing processes the export runs (0 means one per core)."""
        return self.processes if self.processes > 0 else (os.cpu_count() or 1)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=(
            "Export synthetic labeled trajectories to tokenized_parquet and compare with the "
            "raw batch-encode throughput of the same tokenizer on the same text."
        )
    )
    parser.add_argument(
        "--trajectories", type=int, default=None, help="runs (default 2000; 200 with --quick)"
    )
    parser.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a quick look: 200 trajectories unless --trajectories is given",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="SRFT_EXPORT_PROCESSES of the export: tokenizing processes (default 0: one per core)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="the BPE's vocabulary (default 32000)"
    )
    parser.add_argument(
        "--encode-batch",
        type=int,
        default=64,
        help="texts per tokenizer call in the raw-encode baseline (default 64)",
    )
    parser.add_argument(
        "--memory-small",
        type=int,
        default=None,
        help="trajectories of the second export, for peak memory against size "
        "(default: a quarter of --trajectories; 0 skips it)",
    )
    parser.add_argument(
        "--offsets-baseline",
        action="store_true",
        help="also time the raw encode with return_offsets_mapping=True (what the export asks "
        "the tokenizer for)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also build an export of the first N trajectories in this process with 1 "
        "tokenizing process under cProfile, and print the top functions",
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
    args = parser.parse_args(argv)
    trajectories = args.trajectories
    if trajectories is None:
        trajectories = 200 if args.quick else 2000
    memory_small = trajectories // 4 if args.memory_small is None else args.memory_small
    if trajectories < 1 or args.steps < 1 or args.encode_batch < 1:
        parser.error("--trajectories, --steps and --encode-batch must be at least 1")
    if args.processes < 0 or args.vocab_size < 300 or args.profile < 0:
        parser.error("--processes and --profile must be >= 0, --vocab-size >= 300")
    if not 0 <= memory_small < trajectories:
        parser.error("--memory-small must be >= 0 and below --trajectories")
    return Options(
        trajectories=trajectories,
        steps=args.steps,
        processes=args.processes,
        vocab_size=args.vocab_size,
        encode_batch=args.encode_batch,
        memory_small=memory_small,
        offsets_baseline=args.offsets_baseline,
        profile=min(args.profile, trajectories),
        seed=args.seed,
        database_url=args.database_url,
        json_path=args.json_path,
    )


# ------------------------------------------------------------------------ data


def tool_schemas() -> list[dict[str, Any]]:
    """OpenAI function schemas of the synthetic runs' tools (rendered into the system turn)."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"Run the {name.replace('_', ' ')} tool in the repository.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "command": {"type": "string", "description": "what to run or open"}
                    },
                    "required": ["command"],
                },
            },
        }
        for name in TOOL_NAMES
    ]


def make_lines(options: Options) -> list[bytes]:
    """The synthetic runs as NDJSON lines, with tools and a mix of resolutions."""
    tools = tool_schemas()
    lines: list[bytes] = []
    for number, run in enumerate(
        make_trajectories(options.trajectories, options.steps, options.seed)
    ):
        run["tools"] = tools
        run["resolved"] = RESOLUTIONS[number % len(RESOLUTIONS)]
        lines.append(json.dumps(run, ensure_ascii=False).encode())
    return lines


def build_chat_tokenizer(directory: Path, vocab_size: int) -> Path:
    from tests.chat_tokenizers import build_tokenizer

    return build_tokenizer(directory, "chatml", vocab_size)


@dataclass
class Setup:
    project_id: uuid.UUID
    job_id: uuid.UUID
    ids: list[uuid.UUID]  # every stored trajectory, in id order
    labels: dict[str, int]
    ingest_s: float
    job_s: float


def set_up(database: Database, lines: list[bytes], options: Options) -> Setup:
    """Store the runs, create the labeling job and fill its verdicts; nothing here is timed
    for the results."""
    with database.transaction() as session:
        project_id = create_key(session, "bench").project_id
    began = time.perf_counter()
    created = 0
    for start in range(0, len(lines), UPLOAD_BATCH):
        chunk = lines[start : start + UPLOAD_BATCH]
        with database.transaction() as session:
            result = ingest(
                session,
                project_id,
                b"\n".join(chunk) + b"\n",
                lines=True,
                content_type="application/x-ndjson",
                filename=f"runs-{start:06d}.jsonl",
            )
            created += result.created
    ingest_s = time.perf_counter() - began
    if created != len(lines):
        raise RuntimeError(f"ingest created {created} trajectories of {len(lines)}")

    began = time.perf_counter()
    settings = Settings(database_url=database.url)
    body = JobCreate(selection=Selection(), scope="unresolved", cache=False)
    with database.transaction() as session:
        job_id = job_service.create_job(session, project_id, body, settings).id
        prepare_job(session, job_id)
    labels = label_job(database, job_id, options.seed)
    with database.transaction() as session:
        status = workqueue.finish_if_done(session, job_id)
    if status != "completed":
        raise RuntimeError(f"the labeling job ended {status!r}, expected 'completed'")
    with database.sessions() as session:
        ids = list(
            session.scalars(
                select(Trajectory.id)
                .where(Trajectory.project_id == project_id)
                .order_by(Trajectory.id)
            )
        )
    return Setup(project_id, job_id, ids, labels, ingest_s, time.perf_counter() - began)


def label_job(database: Database, job_id: uuid.UUID, seed: int) -> dict[str, int]:
    """Write a `done` verdict with a pseudo-random label into each of the job's rows (one
    UPDATE), as if the critic had answered; the labels' counts."""
    rng = random.Random(seed)
    with database.transaction() as session:
        rows = session.execute(
            select(Verdict.id)
            .where(Verdict.job_id == job_id)
            .order_by(Verdict.trajectory_id, Verdict.step_index)
        ).all()
        ids = [row.id for row in rows]
        labels: list[str] = []
        for _ in ids:
            draw = rng.random()
            labels.append(next(name for name, upto in LABEL_SHARES if draw < upto))
        session.execute(
            text(
                "UPDATE verdicts AS v SET status = 'done', label = u.label, "
                "reason = 'bench label ' || u.label, finished_at = now() "
                "FROM unnest(CAST(:ids AS bigint[]), CAST(:labels AS text[])) AS u(id, label) "
                "WHERE v.id = u.id"
            ),
            {"ids": ids, "labels": labels},
        )
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts


def create_export(
    database: Database,
    setup: Setup,
    tokenizer: Path,
    selection: list[uuid.UUID] | None,
) -> uuid.UUID:
    """A queued `srft` / `tokenized_parquet` export row, committed."""
    body = ExportCreate(
        job_ids=[setup.job_id],
        policy="srft",
        format="tokenized_parquet",
        tokenizer=str(tokenizer),
        selection=None if selection is None else Selection(trajectory_ids=selection),
    )
    settings = Settings(database_url=database.url, tokenizer_dirs=str(tokenizer))
    with database.transaction() as session:
        return export_service.create_export(session, setup.project_id, body, settings).id


# ------------------------------------------------------------------------ process trees


def _child_pids(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants (Linux /proc)."""
    pids, pending = [], [root]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending += _child_pids(pid)
    return pids


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class TreeSampler:
    """The peak, over samples, of the summed RSS of a process and all its descendants."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.root)
            total = sum(rss_bytes(pid) for pid in pids)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self._stop.wait(SAMPLE_S)


# ------------------------------------------------------------------------ the export


# The build process: what a worker runs for one export, and nothing of this script (whose
# imports would otherwise be repeated in every spawned tokenizing process). Its last line of
# output is its report.
BUILD_PROGRAM = """
import json, resource, signal, sys, time, uuid
from pathlib import Path

from app.config import Settings
from app.db import Database
from app.exports.builder import build_export


def stop(signum, frame):
    raise KeyboardInterrupt  # unwind: the tokenizing pool is closed


signal.signal(signal.SIGTERM, stop)
args = json.loads(sys.argv[1])
database = Database(args["url"])
settings = Settings(
    database_url=args["url"],
    export_dir=Path(args["export_dir"]),
    export_processes=args["processes"],
    tokenizer_dirs=args["tokenizer_dirs"],
)
try:
    started = time.perf_counter()
    status = build_export(database, settings, uuid.UUID(args["export_id"]))
    seconds = time.perf_counter() - started
finally:
    database.dispose()
own = resource.getrusage(resource.RUSAGE_SELF)
pool = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped tokenizing processes
print(json.dumps({
    "status": status,
    "seconds": seconds,
    "own_cpu_s": own.ru_utime + own.ru_stime,
    "pool_cpu_s": pool.ru_utime + pool.ru_stime,
    "own_peak_rss": own.ru_maxrss * 1024,  # Linux: kilobytes
    "pool_peak_rss": pool.ru_maxrss * 1024,  # the largest of them
}))
"""


@dataclass
class BuildRun:
    """One export build in a fresh process: what it reported and how big it got."""

    status: str | None
    seconds: float
    own_cpu_s: float  # the build process, its start (imports) included
    pool_cpu_s: float  # its tokenizing processes, their starts included
    own_peak_rss: int
    pool_peak_rss: int
    tree_peak_rss: int
    tree_processes: int

    @property
    def peak_rss(self) -> int:
        """getrusage: the build process's high-water mark plus its largest pool process's."""
        return self.own_peak_rss + self.pool_peak_rss


def build_in_child(url: str, settings: Settings, export_id: uuid.UUID) -> BuildRun:
    """Build one export in a fresh `python -c BUILD_PROGRAM` process, sampling its tree's RSS."""
    args = {
        "url": url,
        "export_dir": str(settings.export_dir),
        "processes": settings.export_processes,
        "tokenizer_dirs": settings.tokenizer_dirs,
        "export_id": str(export_id),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", BUILD_PROGRAM, json.dumps(args)],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with TreeSampler(child.pid) as sampler:
            output, _ = child.communicate()
    finally:
        _stop_tree(child)
    if child.returncode != 0 or not output.strip():
        raise RuntimeError(f"the export process exited with {child.returncode}")
    report = json.loads(output.strip().splitlines()[-1])
    return BuildRun(
        status=report["status"],
        seconds=report["seconds"],
        own_cpu_s=report["own_cpu_s"],
        pool_cpu_s=report["pool_cpu_s"],
        own_peak_rss=report["own_peak_rss"],
        pool_peak_rss=report["pool_peak_rss"],
        tree_peak_rss=sampler.peak,
        tree_processes=sampler.peak_processes,
    )


def _stop_tree(child: subprocess.Popen[str]) -> None:
    """Stop the build process (it unwinds, closing its pool); after 30 s, kill it and what is
    left of the tokenizing processes it started."""
    if child.poll() is not None:
        return
    pids = tree_pids(child.pid)
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    for pid in pids:
        # Only processes still running multiprocessing's spawn entry point: ours, not a
        # process that has since taken a freed id.
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in command:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class ExportCheck:
    """An export as read back: its manifest's numbers, the files' sums, per-row tokens."""

    status: str
    rows: int = 0
    tokens: int = 0
    trained: int = 0
    manifest_rows: int | None = None
    manifest_tokens: int | None = None
    manifest_trained: int | None = None
    trajectories_kept: int | None = None
    shards: int = 0
    bytes: int = 0
    row_tokens: dict[str, int] = field(default_factory=dict)  # trajectory id -> tokens
    sample_ids: dict[str, list[int]] = field(default_factory=dict)  # a few rows' input_ids
    steps: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check_export(
    database: Database, settings: Settings, export_id: uuid.UUID, label: str
) -> ExportCheck:
    """Read the export back and compare the manifest's totals with its parquet files."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with database.sessions() as session:
        export = session.get(Export, export_id)
        assert export is not None
        status, manifest, error = export.status, export.manifest, export.error
        root = export_path(settings, export.project_id, export.id)
    check = ExportCheck(status)
    if status != "completed" or manifest is None:
        check.problems.append(f"{label}: export {status}, expected completed ({error})")
        return check
    counts = manifest["counts"]
    check.manifest_rows = counts["rows"]["written"]
    check.manifest_tokens = counts["tokens"]["total"]
    check.manifest_trained = counts["tokens"]["trained"]
    check.trajectories_kept = counts["trajectories"]["kept"]
    check.steps = counts["steps"]
    columns = ["trajectory_id", "part", "input_ids", "labels", "num_tokens", "num_trained_tokens"]
    for shard in manifest["shards"]:
        path = root / shard["path"]
        check.shards += 1
        check.bytes += path.stat().st_size
        rows = tokens = trained = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
            lengths = pc.list_value_length(batch.column("input_ids"))
            lengths_sum = pc.sum(lengths).as_py() or 0
            trained_sum = pc.sum(pc.not_equal(pc.list_flatten(batch.column("labels")), -100))
            rows += batch.num_rows
            tokens += lengths_sum
            trained += trained_sum.as_py() or 0
            if not pc.all(pc.equal(lengths, batch.column("num_tokens"))).as_py():
                check.problems.append(f"{label}: {path.name}: num_tokens != len(input_ids)")
            for key, part, count in zip(
                batch.column("trajectory_id").to_pylist(),
                batch.column("part").to_pylist(),
                lengths.to_pylist(),
                strict=True,
            ):
                if part != 0 or key in check.row_tokens:
                    check.problems.append(f"{label}: trajectory {key} has more than one row")
                check.row_tokens[key] = count
            for index in range(batch.num_rows):
                if len(check.sample_ids) >= EXACT_ROWS:
                    break
                key = batch.column("trajectory_id")[index].as_py()
                check.sample_ids[key] = batch.column("input_ids")[index].as_py()
        if (rows, tokens, trained) != (shard["rows"], shard["tokens"], shard["trained_tokens"]):
            check.problems.append(
                f"{label}: {shard['path']} holds {rows} rows, {tokens} tokens, {trained} "
                f"trained; its manifest entry says {shard['rows']}, {shard['tokens']}, "
                f"{shard['trained_tokens']}"
            )
        check.rows += rows
        check.tokens += tokens
        check.trained += trained
    found = (check.rows, check.tokens, check.trained)
    stated = (check.manifest_rows, check.manifest_tokens, check.manifest_trained)
    if found != stated:
        check.problems.append(
            f"{label}: the files hold {found[0]} rows, {found[1]} tokens, {found[2]} trained "
            f"tokens; the manifest says {stated[0]}, {stated[1]}, {stated[2]}"
        )
    if check.trajectories_kept != check.rows:
        check.problems.append(
            f"{label}: {check.rows} rows for {check.trajectories_kept} kept trajectories"
        )
    return check


# ------------------------------------------------------------------------ the baseline


@dataclass
class Rendered:
    keys: list[str]
    texts: list[str]
    seconds: float

    @property
    def characters(self) -> int:
        return sum(len(t) for t in self.texts)


def render_rows(database: Database, tokenizer: Any, keys: Sequence[str]) -> Rendered:
    """The full render of each exported row's conversation, as the export rendered it."""
    began = time.perf_counter()
    texts: list[str] = []
    ordered = sorted(keys)
    for start in range(0, len(ordered), 100):
        chunk = [uuid.UUID(k) for k in ordered[start : start + 100]]
        with database.sessions() as session:
            found = {
                str(row.id): row
                for row in session.execute(
                    select(Trajectory.id, Trajectory.messages, Trajectory.tools).where(
                        Trajectory.id.in_(chunk)
                    )
                )
            }
        for key in ordered[start : start + 100]:
            row = found[key]
            texts.append(
                tokenizer.apply_chat_template(row.messages, tools=row.tools, tokenize=False)
            )
    return Rendered(ordered, texts, time.perf_counter() - began)


@dataclass
class EncodeRun:
    seconds: float
    tokens: int
    counts: list[int]


def raw_encode(tokenizer: Any, texts: list[str], batch: int, offsets: bool) -> EncodeRun:
    """Batch-encode every text with the tokenizer's own `__call__` (all cores)."""
    counts: list[int] = []
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[start : start + batch],
            add_special_tokens=False,
            return_offsets_mapping=offsets,
        )
        counts += [len(ids) for ids in encoded["input_ids"]]
    seconds = time.perf_counter() - started
    return EncodeRun(seconds, sum(counts), counts)


def compare_tokens(
    tokenizer: Any, rendered: Rendered, baseline: EncodeRun, check: ExportCheck
) -> list[str]:
    """The baseline's tokens are the export's tokens, row by row (and id by id for a few)."""
    problems: list[str] = []
    differing = [
        key
        for key, count in zip(rendered.keys, baseline.counts, strict=True)
        if check.row_tokens.get(key) != count
    ]
    if differing or len(check.row_tokens) != len(rendered.keys):
        problems.append(
            f"raw encode: {len(differing)} of {len(rendered.keys)} rows have a token count "
            f"other than the export's (first: {differing[:3]})"
        )
    index = {key: n for n, key in enumerate(rendered.keys)}
    for key, ids in check.sample_ids.items():
        expected = tokenizer(rendered.texts[index[key]], add_special_tokens=False)["input_ids"]
        if list(expected) != ids:
            problems.append(f"raw encode: the export's input_ids of trajectory {key} differ")
    return problems


# ------------------------------------------------------------------------ the profile


def profile_build(
    database: Database, setup: Setup, tokenizer: Path, settings: Settings, count: int
) -> tuple[str, float, int]:
    """Build an export of the first `count` trajectories here, with one tokenizing process,
    under cProfile; the top functions by cumulative and by own time, seconds, tokens."""
    export_id = create_export(database, setup, tokenizer, setup.ids[:count])
    single = settings.model_copy(update={"export_processes": 1})
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    status = build_export(database, single, export_id)
    profiler.disable()
    seconds = time.perf_counter() - started
    check = check_export(database, single, export_id, "profiled export")
    if status != "completed":
        raise RuntimeError(f"the profiled export ended {status!r}: {check.problems}")
    out = io.StringIO()
    for order in ("cumulative", "tottime"):
        out.write(f"--- top {PROFILE_LINES} by {order} ---\n")
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(PROFILE_LINES)
    return out.getvalue(), seconds, check.tokens


# ------------------------------------------------------------------------ report


@dataclass
class Row:
    name: str
    kind: str  # "export" or "baseline"
    trajectories: int
    tokens: int
    seconds: float
    peak_rss: int | None = None
    tree_peak_rss: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def render_table(rows: list[Row], reference: Row | None) -> str:
    header = (
        f"{'run':<46} {'trajectories':>12} {'tokens':>12} {'seconds':>8} {'tokens/s':>11} "
        f"{'ratio':>6} {'peak RSS':>9} {'tree peak':>9}"
    )
    units = f"{'':<46} {'':>12} {'':>12} {'':>8} {'':>11} {'':>6} {'MiB':>9} {'MiB':>9}"
    lines = [header, units, "-" * len(header)]
    for row in rows:
        ratio = (
            f"{row.tokens_per_second / reference.tokens_per_second:.3f}"
            if reference is not None and reference.tokens_per_second
            else "-"
        )
        lines.append(
            f"{row.name:<46} {row.trajectories:>12,} {row.tokens:>12,} {row.seconds:>8.2f} "
            f"{row.tokens_per_second:>11,.0f} {ratio:>6} {_mib(row.peak_rss):>9} "
            f"{_mib(row.tree_peak_rss):>9}"
        )
    return "\n".join(lines)


def _row_group_tokens() -> int | None:
    """The tokens the parquet writer buffers before it writes a row group, if it says."""
    from app.exports.writers import parquet

    value = getattr(parquet, "ROW_GROUP_TOKENS", None)
    return value if isinstance(value, int) else None


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ------------------------------------------------------------------------ main


@contextmanager
def _database(options: Options) -> Iterator[tuple[str, dict[str, str]]]:
    with ExitStack() as stack:
        if options.database_url is None:
            admin_url = stack.enter_context(postgres_server())
        else:
            admin_url = options.database_url
        server = PostgresServer(admin_url)
        stack.callback(server.close)
        facts = server.facts()
        url = stack.enter_context(server.fresh_database("export"))
        yield url, facts


def benchmark(options: Options) -> int:
    processes = options.export_processes
    print(
        f"srft export benchmark: {options.trajectories:,} trajectories x {options.steps} steps "
        f"to tokenized_parquet (policy srft), {processes} tokenizing process"
        f"{'es' if processes > 1 else ''}; BPE of {options.vocab_size:,} tokens; "
        f"seed {options.seed}",
        flush=True,
    )
    began = time.perf_counter()
    lines = make_lines(options)
    payload = sum(len(line) for line in lines)
    print(
        f"  generated {payload / 1e6:,.1f} MB of trajectories "
        f"({payload / len(lines) / 1e3:,.1f} KB each) in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    problems: list[str] = []
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="srft-bench-export-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        began = time.perf_counter()
        tokenizer_dir = build_chat_tokenizer(workdir / "tokenizer", options.vocab_size)
        print(f"  trained the tokenizer in {time.perf_counter() - began:.1f} s", flush=True)
        url, facts = stack.enter_context(_database(options))
        database = Database(url)
        stack.callback(database.dispose)
        setup = set_up(database, lines, options)
        del lines
        print(
            f"  stored {len(setup.ids):,} trajectories in {setup.ingest_s:.1f} s (service "
            f"ingest, in process); labeling job of {sum(setup.labels.values()):,} verdicts "
            f"{setup.labels} in {setup.job_s:.1f} s",
            flush=True,
        )
        settings = Settings(
            database_url=url,
            export_dir=workdir / "exports",
            export_processes=options.processes,
            tokenizer_dirs=str(tokenizer_dir),  # the one directory exports may load from
        )

        # -- the product: every trajectory, then the smaller export for memory
        sizes: list[tuple[int, list[uuid.UUID] | None]] = [(options.trajectories, None)]
        if options.memory_small:
            sizes.append((options.memory_small, setup.ids[: options.memory_small]))
        builds: list[tuple[int, BuildRun, ExportCheck]] = []
        for count, selection in sizes:
            export_id = create_export(database, setup, tokenizer_dir, selection)
            build = build_in_child(url, settings, export_id)
            check = check_export(database, settings, export_id, f"export of {count}")
            problems += check.problems
            builds.append((count, build, check))
            rows.append(
                Row(
                    name=f"srft export, {processes} proc, {count:,} trajectories",
                    kind="export",
                    trajectories=check.rows,
                    tokens=check.manifest_tokens or 0,
                    seconds=build.seconds,
                    peak_rss=build.peak_rss,
                    tree_peak_rss=build.tree_peak_rss,
                )
            )
            print(
                f"  {rows[-1].name}: {build.status}, {check.rows:,} rows, "
                f"{check.tokens:,} tokens in {build.seconds:.2f} s; peak RSS "
                f"{_mib(build.peak_rss)} MiB (build {_mib(build.own_peak_rss)} + largest pool "
                f"process {_mib(build.pool_peak_rss)}), whole tree {_mib(build.tree_peak_rss)} "
                f"MiB over {build.tree_processes} processes; CPU: build process "
                f"{build.own_cpu_s:.1f} s, tokenizing processes {build.pool_cpu_s:.1f} s",
                flush=True,
            )
        main_check = builds[0][2]
        for count, _, small_check in builds[1:]:
            # The same trajectories give the same rows whatever else is exported.
            differ = [
                key
                for key, tokens in small_check.row_tokens.items()
                if main_check.row_tokens.get(key) != tokens
            ]
            if differ:
                problems.append(
                    f"export of {count}: {len(differ)} rows differ in tokens from the same "
                    f"trajectories' rows in the export of {options.trajectories}"
                )

        # -- the baseline: the same tokenizer on the same rendered text
        from app.exports.tokenize import load_chat_tokenizer

        tokenizer = load_chat_tokenizer(str(tokenizer_dir)).tokenizer
        rendered = render_rows(database, tokenizer, list(main_check.row_tokens))
        print(
            f"  rendered {len(rendered.texts):,} conversations "
            f"({rendered.characters / 1e6:,.1f} M characters) with apply_chat_template in "
            f"{rendered.seconds:.1f} s (not timed)",
            flush=True,
        )
        encode = raw_encode(tokenizer, rendered.texts, options.encode_batch, offsets=False)
        problems += compare_tokens(tokenizer, rendered, encode, main_check)
        reference = Row(
            name=f"raw batch encode ({options.encode_batch} texts/call, all cores)",
            kind="baseline",
            trajectories=len(rendered.texts),
            tokens=encode.tokens,
            seconds=encode.seconds,
        )
        rows.append(reference)
        print(f"  {reference.name}: {encode.tokens:,} tokens in {encode.seconds:.2f} s", flush=True)
        if options.offsets_baseline:
            with_offsets = raw_encode(tokenizer, rendered.texts, options.encode_batch, offsets=True)
            rows.append(
                Row(
                    name="raw batch encode + offsets (all cores)",
                    kind="baseline",
                    trajectories=len(rendered.texts),
                    tokens=with_offsets.tokens,
                    seconds=with_offsets.seconds,
                )
            )
            print(f"  {rows[-1].name}: {with_offsets.seconds:.2f} s", flush=True)
        characters = rendered.characters
        del rendered

        profile_text: str | None = None
        profile_numbers: tuple[float, int] | None = None
        if options.profile:
            print(
                f"  profiling a 1-process build of {options.profile:,} trajectories ...",
                flush=True,
            )
            profile_text, seconds, tokens = profile_build(
                database, setup, tokenizer_dir, settings, options.profile
            )
            profile_numbers = (seconds, tokens)
        machine = machine_facts()

    export_row = rows[0]
    ratio = export_row.tokens_per_second / reference.tokens_per_second
    print()
    print(render_table(rows, reference))
    print()
    print(
        f"export: {export_row.tokens_per_second:,.0f} tokens/s = {ratio:.3f} x the raw batch "
        f"encode of the same text ({reference.tokens_per_second:,.0f} tokens/s); target >= "
        f"{TARGET_RATIO}: {_met(ratio >= TARGET_RATIO)}"
    )
    memory: dict[str, Any] | None = None
    if len(builds) > 1:
        (small_n, small, _), (large_n, large, _) = builds[1], builds[0]
        rusage_ratio = large.peak_rss / small.peak_rss
        tree_ratio = large.tree_peak_rss / small.tree_peak_rss if small.tree_peak_rss else 0.0
        memory = {
            "small_trajectories": small_n,
            "large_trajectories": large_n,
            "peak_rss_ratio": rusage_ratio,
            "tree_peak_rss_ratio": tree_ratio,
            "flat": rusage_ratio < FLAT_RATIO,
        }
        plateau = _row_group_tokens()
        if plateau is not None and builds[1][2].tokens < plateau:
            print(
                f"note: the smaller export ({builds[1][2].tokens:,} tokens) is below one "
                f"parquet row group ({plateau:,} tokens), which the writer buffers; its peak is "
                "not yet the plateau, so the ratio overstates growth: use more trajectories"
            )
        print(
            f"peak memory: {_mib(small.peak_rss)} MiB for {small_n:,} trajectories, "
            f"{_mib(large.peak_rss)} MiB for {large_n:,}: ratio {rusage_ratio:.2f} (whole "
            f"tree sampled: {_mib(small.tree_peak_rss)} and {_mib(large.tree_peak_rss)} MiB, "
            f"ratio {tree_ratio:.2f}); target flat (< {FLAT_RATIO}): "
            f"{_met(rusage_ratio < FLAT_RATIO)}"
        )
    steps = main_check.steps
    print(
        f"data: {characters / 1e6:,.1f} M characters rendered, {export_row.tokens:,} tokens "
        f"({characters / max(export_row.tokens, 1):.2f} characters/token), "
        f"{main_check.trained:,} trained; steps trained {steps.get('steps_trained')}, masked "
        f"{steps.get('steps_masked')}; {main_check.shards} shard(s), "
        f"{main_check.bytes / 1e6:,.1f} MB of parquet"
    )
    print(
        "what the numbers include: the export's seconds run from build_export's call to its "
        "return in a fresh process (claiming the row, reading trajectories and verdicts in "
        f"batches, the policy, rendering and encoding in {processes} spawned tokenizing "
        "process(es) including their start, writing and publishing the parquet shards and "
        "the manifest); tokens are the manifest's total. The raw encode times only "
        "`tokenizer(texts, add_special_tokens=False)` over the full renders of the same rows, "
        "rendered beforehand. 'peak RSS' is getrusage's high-water mark of the build process "
        "plus that of its largest tokenizing process; 'tree peak' the largest sum of the RSS "
        f"of all its processes, sampled every {SAMPLE_S * 1000:.0f} ms."
    )
    print(f"{describe_machine(machine, facts)}; everything shares it")
    if profile_text is not None and profile_numbers is not None:
        seconds, tokens = profile_numbers
        print()
        print(
            f"cProfile of a 1-process build of {options.profile:,} trajectories, in this "
            f"process: {tokens:,} tokens in {seconds:.2f} s under the profiler. The encode "
            "runs on all cores here (no pool: the tokenizer's own threads), and cProfile "
            "slows Python-level code (Jinja rendering) far more than the Rust encode: the "
            "shares of rendering are overstated."
        )
        print(profile_text)

    if options.json_path is not None:
        report = {
            "options": options_for_json(options),
            "machine": machine,
            "postgres": facts,
            "setup": {
                "trajectories": len(setup.ids),
                "ingest_s": setup.ingest_s,
                "job_s": setup.job_s,
                "labels": setup.labels,
            },
            "runs": [
                asdict(r)
                | {
                    "tokens_per_second": r.tokens_per_second,
                    "ratio_to_raw_encode": r.tokens_per_second / reference.tokens_per_second,
                }
                for r in rows
            ],
            "builds": [
                asdict(build) | {"trajectories": count, "peak_rss": build.peak_rss}
                for count, build, _ in builds
            ],
            "ratio_to_raw_encode": ratio,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "memory": memory,
            "export": {
                "rows": main_check.rows,
                "tokens": main_check.tokens,
                "trained_tokens": main_check.trained,
                "characters": characters,
                "shards": main_check.shards,
                "bytes": main_check.bytes,
                "steps": main_check.steps,
            },
            "profile": (
                None
                if profile_numbers is None
                else {
                    "trajectories": options.profile,
                    "seconds": profile_numbers[0],
                    "tokens": profile_numbers[1],
                }
            ),
            "problems": problems,
        }
        write_report(options.json_path, report)
    return exit_status(problems)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C, so the child processes, the database and the server go away.
    return run_cleaning_up(benchmark, parse_options(argv))


if __name__ == "__main__":
    sys.exit(main())
