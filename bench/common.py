"""What both benchmarks share: the synthetic trajectories, databases on a Postgres server,
/proc CPU readings, the machine's facts, child processes and their logs, the report's end,
and SIGTERM handling.

The scripts put the repository root on sys.path before they import this as `bench.common`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.db import upgrade_database

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL_NAMES = ("bash", "str_replace_editor", "view_file", "search_code", "run_tests")
MODELS = ("agent-model-large", "agent-model-small", "agent-model-mini")

OptionsT = TypeVar("OptionsT")


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
        """A slice of the pool of exactly `length` characters."""
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


# ------------------------------------------------------------------------ databases


def database_url(server_url: str, name: str) -> str:
    """The SQLAlchemy URL of database `name` on the server of `server_url`."""
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
        """The server's version and durability settings."""
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
        """Release the admin connection pool."""
        self.engine.dispose()


# ------------------------------------------------------------------------ CPU and machine


@dataclass(frozen=True)
class ProcStat:
    """A process's parent and CPU time in clock ticks, from /proc/PID/stat (Linux)."""

    parent_pid: int
    own_ticks: int  # utime + stime
    children_ticks: int  # cutime + cstime: its reaped children

    @property
    def own_cpu_seconds(self) -> float:
        """User + system CPU seconds of the process itself."""
        return self.own_ticks / os.sysconf("SC_CLK_TCK")

    @property
    def total_cpu_seconds(self) -> float:
        """CPU seconds of the process and its reaped children."""
        return (self.own_ticks + self.children_ticks) / os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> ProcStat | None:
    """The /proc/PID/stat reading of a live process, or None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, the parent 4, utime stime cutime cstime 14-17.
    return ProcStat(
        parent_pid=int(fields[1]),
        own_ticks=int(fields[11]) + int(fields[12]),
        children_ticks=int(fields[13]) + int(fields[14]),
    )


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), or None if unknown."""
    stat = proc_stat(pid)
    return None if stat is None else stat.own_cpu_seconds


def machine_facts() -> dict[str, Any]:
    """CPUs (all and usable by this process), CPU model, platform and Python version."""
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


def describe_machine(machine: dict[str, Any], postgres: dict[str, str]) -> str:
    """The report's `machine:` line up to the Postgres settings, for the script to finish."""
    return (
        f"machine: {machine['usable_cpus']} usable of {machine['cpu_count']} CPUs "
        f"({machine['cpu_model'] or 'unknown CPU'}), {machine['platform']}, "
        f"Python {machine['python']}; PostgreSQL {postgres['server_version']} "
        f"(fsync={postgres['fsync']}, synchronous_commit={postgres['synchronous_commit']})"
    )


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of non-empty `values` (`fraction` 0.95 for p95)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# ------------------------------------------------------------------------ child processes


def child_env() -> dict[str, str]:
    """This environment without SRFT_* settings, with the repository root on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_logged(
    args: Sequence[str], cwd: Path, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start `args` in its own session, its output appended to `log_path`.

    Its own session: a Ctrl-C reaches only this script, which then stops everything in order
    (the service and workers before the database they write to).
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log, or "(no log)"."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    """Whether a GET of `url` answers 200 within 2 s."""
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ------------------------------------------------------------------------ report and exit


def options_for_json(options: DataclassInstance) -> dict[str, Any]:
    """The options as JSON values (paths as strings), without the database URL."""
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(options).items()
        if key != "database_url"
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write `report` with its finishing time as JSON to `path`, and say so."""
    report["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"numbers written to {path}")


def exit_status(problems: list[str]) -> int:
    """0 if there are no problems; else 1, after listing them on stderr."""
    if problems:
        print("\nFAILED:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


class TerminatedError(Exception):
    """SIGTERM, raised in the main thread so that every clean-up runs as for Ctrl-C."""


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    raise TerminatedError


def run_cleaning_up(benchmark: Callable[[OptionsT], int], options: OptionsT) -> int:
    """Run `benchmark(options)` with SIGTERM unwinding like Ctrl-C; its exit status, or
    128 + the signal.

    Unwinding runs every clean-up, so the processes, databases and servers it started go away.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return benchmark(options)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 128 + signal.SIGINT
    except TerminatedError:
        print("\nterminated; cleaned up", file=sys.stderr)
        return 128 + signal.SIGTERM
