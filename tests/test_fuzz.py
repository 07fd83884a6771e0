"""Property-based fuzzing of the whole API with schemathesis, against `srft serve` over HTTP.

The service runs twice, on SQLite (the embedded default) and on Postgres, each seeded with the
shared real trajectories, a finished labeling job with human labels and a finished export. The
test's copy of the OpenAPI schema pins every id in a path to those real ids (`enum`), so the
generated requests reach real rows and not only 404s; negative generation still sends every
kind of invalid id, and half of all cases carry a hostile value (tests/fuzz_hooks.py: numbers
past 64 bits or Python's digit limit, NaN, NUL, absurd cursors and Range headers). Any 5xx
fails the test, and the number of cases per endpoint is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import e2e_database_url  # noqa: F401 (a database of this module's own)
from tests.helpers import all_trajectory_files
from tests.test_embedded import Served

pytestmark = pytest.mark.slow

KEY = "srft_" + "f" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}
# Per operation and phase; two databases x ~21 operations keep the run to a few minutes here.
MAX_EXAMPLES = 50
ROOT = Path(__file__).resolve().parent.parent
SEED = 20261130


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    env = {"SRFT_BOOTSTRAP_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    if request.param == "postgres":
        env["SRFT_DATABASE_URL"] = request.getfixturevalue("e2e_database_url")
    server = Served(tmp_path_factory.mktemp(f"fuzz-{request.param}"), **env)
    server.start()
    yield server
    server.stop()


def _wait(client: httpx.Client, path: str, done: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while True:
        state: dict[str, Any] = client.get(path).json()
        if state["status"] in done:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.3)


def _seed(served: Served) -> dict[str, Any]:
    """Real rows for every id a path can name."""
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as client:
        trajectories: list[str] = []
        for path in all_trajectory_files():
            response = client.post(
                "/v1/trajectories", content=path.read_bytes(), params={"resolved": "false"}
            )
            assert response.status_code == 201, response.text
            trajectories += [run["id"] for run in response.json()["trajectories"]]
        uploads = sorted(
            {client.get(f"/v1/trajectories/{t}").json()["upload_id"] for t in trajectories[:5]}
        )
        job = client.post("/v1/jobs", json={"selection": {"trajectory_ids": trajectories[:4]}})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert _wait(client, f"/v1/jobs/{job_id}", ("completed",))["status"] == "completed"
        for step in (0, 1):
            labelled = client.put(
                f"/v1/trajectories/{trajectories[0]}/steps/{step}/human_label",
                json={"label": "mistake", "note": "seed"},
            )
            assert labelled.status_code == 200, labelled.text
        exports = []
        for _ in range(2):
            export = client.post("/v1/exports", json={"job_ids": [job_id]})
            assert export.status_code == 202, export.text
            finished = _wait(client, f"/v1/exports/{export.json()['id']}", ("completed", "failed"))
            assert finished["status"] == "completed", finished
            exports.append(finished)
        shards = exports[0]["manifest"]["shards"]
        files = ["manifest.json", *(shard["path"] for shard in shards)]
        spare = client.post("/v1/jobs", json={"selection": {"trajectory_ids": trajectories[4:5]}})
        assert spare.status_code == 202, spare.text
        assert _wait(client, f"/v1/jobs/{spare.json()['id']}", ("completed",))
    return {
        "trajectory_id": trajectories[:3],
        "upload_id": uploads,
        "job_id": [job_id],
        "export_id": [exports[0]["id"]],
        "step_index": [0, 1, 2],
        "path": files,
        # What the DELETE routes may remove, so that the rows above stay for the others.
        "delete": {
            "/v1/trajectories/{trajectory_id}": trajectories[-1:],
            "/v1/jobs/{job_id}": [spare.json()["id"]],
            "/v1/exports/{export_id}": [exports[1]["id"]],
        },
    }


def _pinned_schema(served: Served, ids: dict[str, Any], target: Path) -> None:
    schema = httpx.get(f"{served.url}/openapi.json").json()
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            pinned = ids
            if method == "delete" and path in ids["delete"]:
                name = path.rsplit("{", 1)[1].rstrip("}")
                pinned = ids | {name: ids["delete"][path]}
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in pinned:
                    values = pinned[parameter["name"]]
                    parameter["schema"] = {**parameter["schema"], "enum": values}
                    parameter["schema"].pop("format", None)
                elif parameter["in"] == "query" and parameter["name"] == "job_id":
                    # The job comparisons take their jobs as a query list.
                    parameter["schema"] = {
                        **parameter["schema"],
                        "items": {"type": "string", "enum": pinned["job_id"]},
                    }
    target.write_text(json.dumps(schema))


def test_no_input_reaches_a_server_error(served: Served, tmp_path: Path) -> None:
    schema = tmp_path / "openapi.json"
    _pinned_schema(served, _seed(served), schema)
    events = tmp_path / "events.ndjson"
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        str(schema),
        "--url",
        served.url,
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(events),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRFT_")}
    # Half the cases carry a hostile value (tests/fuzz_hooks.py).
    env |= {"SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )

    cases: Counter[str] = Counter()
    server_errors: list[str] = []
    for line in events.read_text().splitlines():
        event = json.loads(line, parse_int=str)  # the hostile cases hold huge integers
        scenario = event.get("ScenarioFinished")
        if not scenario:
            continue
        recorder = scenario["recorder"]
        cases[recorder["label"]] += len(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            status = int((interaction.get("response") or {}).get("status_code", 0))
            if status >= 500:
                request = interaction["request"]
                server_errors.append(f"{status} {request['method']} {request['uri']}")
    report = "\n".join(f"{count:6d}  {label}" for label, count in sorted(cases.items()))
    print(f"\nschemathesis cases per endpoint ({served.env.get('SRFT_DATABASE_URL', 'sqlite')}):")
    print(report)
    assert finished.returncode == 0, finished.stdout[-6000:] + finished.stderr[-2000:]
    assert not server_errors, server_errors[:20]
    assert len(cases) >= 20, report  # every operation of the schema was exercised
    served_log = served.log.read_text()
    assert "Exception in ASGI application" not in served_log
    assert "unhandled error" not in served_log
