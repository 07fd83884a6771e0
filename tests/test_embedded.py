"""The embedded default as a user runs it: `srft serve` on a SQLite file, then the CLI."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.exports.pull import verify_directory
from tests.helpers import TRAJECTORY_DIR, trajectory_file
from tests.servers import free_port

SRFT = [sys.executable, "-m", "app.cli"]
KEY = re.compile(r"srft_[A-Za-z0-9_-]{20,}")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    return env | extra


class Served:
    """`srft serve` in a subprocess: the embedded default, or what `env` (SRFT_*) says."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*SRFT, "serve", "--port", str(self.port)],
                cwd=self.workdir,
                env=_env(**self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # Exports in parts of 2 trajectories: the embedded worker's threads build them on SQLite.
    server = Served(tmp_path, SRFT_EXPORT_PART_TRAJECTORIES="2")
    server.start()
    yield server
    server.stop()


def test_embedded_service_end_to_end(served: Served) -> None:
    keys = KEY.findall(served.log.read_text())
    assert len(keys) == 1, "the first start prints the default project's key once"
    headers = {"Authorization": f"Bearer {keys[0]}"}
    assert (served.workdir / "var" / "srft.sqlite3").exists()

    ready = httpx.get(f"{served.url}/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}

    body = trajectory_file(
        "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json"
    ).read_bytes()
    created = httpx.post(
        f"{served.url}/v1/trajectories", content=body, headers=headers, params={"resolved": "true"}
    ).json()
    assert created["created"] == 1
    trajectory_id = created["trajectories"][0]["id"]
    again = httpx.post(f"{served.url}/v1/trajectories", content=body, headers=headers).json()
    assert again["duplicates"] == 1
    fetched = httpx.get(f"{served.url}/v1/trajectories/{trajectory_id}", headers=headers).json()
    assert fetched["source_format"] == "mini-swe-agent"
    assert fetched["resolved"] is True
    assert len(fetched["steps"]) == created["trajectories"][0]["num_steps"]

    # A second key from the CLI works against the running service; the key is the last line.
    made = subprocess.run(
        [*SRFT, "keys", "create", "ci-bot"],
        cwd=served.workdir,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    new_key = made.stdout.strip().splitlines()[-1]
    assert KEY.fullmatch(new_key)
    listing = httpx.get(
        f"{served.url}/v1/trajectories", headers={"Authorization": f"Bearer {new_key}"}
    ).json()
    assert [item["id"] for item in listing["items"]] == [trajectory_id]

    # `srft ingest` uploads a folder over HTTP; a second run skips what the first sent, and
    # with --restart sends it again and finds only duplicates.
    cli_env = _env(SRFT_URL=served.url, SRFT_API_KEY=new_key)
    folder = TRAJECTORY_DIR / "openhands"
    state = ("--state", str(served.workdir / "ingest-state"))
    first = subprocess.run(
        [*SRFT, "ingest", str(folder), "--unresolved", *state],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 files: 5 trajectories created, 0 duplicates, 0 rows failed" in first.stdout
    second = subprocess.run(
        [*SRFT, "ingest", str(folder), *state], env=cli_env, capture_output=True, text=True
    )
    assert "0 trajectories created, 0 duplicates, 0 rows failed, 5 rows skipped" in second.stdout
    third = subprocess.run(
        [*SRFT, "ingest", str(folder), "--restart", *state],
        env=cli_env,
        capture_output=True,
        text=True,
    )
    assert "0 trajectories created, 5 duplicates" in third.stdout
    unresolved = httpx.get(
        f"{served.url}/v1/trajectories", params={"resolved": "false"}, headers=headers
    ).json()
    assert len(unresolved["items"]) == 5

    # `srft label --wait` labels them on the embedded worker with the built-in rules critic.
    labeled = subprocess.run(
        [*SRFT, "label", "--mode", "step", "--wait"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert labeled.returncode == 0, labeled.stdout + labeled.stderr
    assert "status completed" in labeled.stdout
    total_steps = sum(item["num_steps"] for item in unresolved["items"])
    assert f"steps done {total_steps} (cached 0), failed 0, pending 0" in labeled.stdout
    assert "built-in rules critic" in served.log.read_text()  # the warning users must see
    detail = httpx.get(
        f"{served.url}/v1/trajectories/{unresolved['items'][0]['id']}", headers=headers
    ).json()
    assert all(len(step["verdicts"]) == 1 for step in detail["steps"])
    assert {v["label"] for s in detail["steps"] for v in s["verdicts"]} <= {
        "good",
        "unnecessary",
        "mistake",
        "recover",
    }

    # `srft export --output` builds shards on the embedded worker and downloads them,
    # verified; `srft pull` of the same export then has nothing left to fetch.
    job_id = re.search(r"job ([0-9a-f-]{36})", labeled.stdout)
    assert job_id is not None
    dataset = served.workdir / "dataset"
    exported = subprocess.run(
        [*SRFT, "export", "--job", job_id.group(1), "--output", str(dataset)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    # The job labeled the 5 unresolved runs; srft also trains the resolved one in full.
    assert "completed: 6 rows in 1 shards" in exported.stdout
    assert verify_directory(dataset) == []
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["source_job_ids"] == [job_id.group(1)]
    rows = (dataset / manifest["shards"][0]["path"]).read_text().splitlines()
    assert len(rows) == 6
    export_id = re.search(r"export ([0-9a-f-]{36})", exported.stdout)
    assert export_id is not None
    with sqlite3.connect(served.workdir / "var" / "srft.sqlite3") as database:
        parts = database.execute("SELECT status FROM export_parts").fetchall()
    assert parts == [("done",)] * 3  # 6 trajectories in parts of 2, one shard as before
    pulled = subprocess.run(
        [*SRFT, "pull", export_id.group(1), str(dataset)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "0 bytes downloaded, 0 resumed, 1 already there" in pulled.stdout

    # `srft exports` shows the export's size on disk; `srft delete` frees it, the job first
    # (the finished export keeps its files), then the export with its folder.
    size = sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
    listed = subprocess.run(
        [*SRFT, "exports"], env=cli_env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"{export_id.group(1)}  completed  openai_jsonl" in listed.stdout
    assert f"1 export, {size / 1024:.1f} KiB of files" in listed.stdout
    folder = served.workdir / "var" / "exports"
    assert len(list(folder.rglob("manifest.json"))) == 1
    for what, item_id in (("job", job_id.group(1)), ("export", export_id.group(1))):
        deleted = subprocess.run(
            [*SRFT, "delete", what, item_id], env=cli_env, capture_output=True, text=True
        )
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        assert f"deleted {what} {item_id}" in deleted.stdout
    assert list(folder.rglob("manifest.json")) == []
    again = subprocess.run(
        [*SRFT, "delete", "export", export_id.group(1)], env=cli_env, capture_output=True, text=True
    )
    assert again.returncode == 1
    assert "HTTP 404 not_found" in again.stderr

    # A bad file makes the command fail and names the file and the error.
    bad = served.workdir / "bad.json"
    bad.write_text('{"messages": [')
    failed = subprocess.run(
        [*SRFT, "ingest", str(bad), *state], env=cli_env, capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert "bad.json" in failed.stdout
    assert "invalid_json" in failed.stdout


def test_restart_keeps_data_and_prints_no_new_key(served: Served) -> None:
    key = KEY.findall(served.log.read_text())[0]
    served.stop()
    served.start()
    assert KEY.findall(served.log.read_text()) == [key]
    response = httpx.get(
        f"{served.url}/v1/trajectories", headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200
