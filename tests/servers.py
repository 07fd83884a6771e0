"""Start real Postgres and Redis servers for the test run, on loopback, in temporary folders.

Postgres refuses to run as root, so when the tests run as root the cluster is created and
started as the `postgres` system user. Set SRFT_TEST_DATABASE_URL / SRFT_TEST_REDIS_URL to use
servers you started yourself instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def postgres_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if not candidates and found:
        return Path(found).parent
    if not candidates:
        raise RuntimeError(
            "PostgreSQL server binaries not found: install the 'postgresql' package "
            "(`.ci/run` does) or set SRFT_TEST_DATABASE_URL"
        )
    return Path(candidates[0])


def _as_postgres_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # raises KeyError with a clear name if the user is missing
    return ["runuser", "-u", "postgres", "--"]


class PostgresServer:
    """A throw-away Postgres cluster that a test can stop and start again on the same port,
    data kept: `url` names its `srft_test` database."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.prefix = _as_postgres_user()
        self.root = Path(tempfile.mkdtemp(prefix="srft-pg-"))
        self.data = self.root / "data"
        if self.prefix:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = free_port()
        self.running = False
        subprocess.run(
            [
                *self.prefix,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "srft",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self._created = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://srft@127.0.0.1:{self.port}/srft_test"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
        )

    def start(self) -> None:
        """Start (again) and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off "
            f"-c unix_socket_directories={self.root} -c max_connections=200"
        )
        started = self._pg_ctl("-l", str(self.root / "log"), "-o", options, "-w", "start")
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.decode(errors='replace')}")
        self.running = True
        wait_for_port(self.port)
        if not self._created:
            subprocess.run(
                [
                    str(self.bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "srft",
                    "srft_test",
                ],
                check=True,
                capture_output=True,
            )
            self._created = True

    def stop(self, mode: str = "fast") -> None:
        """Stop it: `fast` ends every session (their transactions roll back), `immediate`
        kills the server outright."""
        if self.running:
            self._pg_ctl("-m", mode, "-w", "stop")
            self.running = False

    def close(self) -> None:
        self._pg_ctl("-m", "immediate", "stop")  # whatever state a failed start left
        self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away Postgres cluster; yields a SQLAlchemy URL to its `srft_test` database."""
    server = PostgresServer()
    try:
        server.start()
        yield server.url
    finally:
        server.close()


class RedisServer:
    """A Redis server that a test can stop and start again on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found: `apt-get install -y redis-server` (`.ci/run` does) "
                "or set SRFT_TEST_REDIS_URL"
            )
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="srft-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
