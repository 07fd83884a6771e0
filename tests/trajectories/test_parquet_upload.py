"""`POST /v1/trajectories` with a Parquet body: the same runs as the rows' JSON form."""

from __future__ import annotations

import io
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.builders import row_counts
from tests.conftest import Caller
from tests.helpers import trajectory_file
from tests.hub_datasets import NEBIUS, SWE_GYM, SWE_SMITH, hub_table, json_rows

PARQUET = {"Content-Type": "application/vnd.apache.parquet"}


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=2)
    return sink.getvalue()


def _post(client: TestClient, caller: Caller, body: bytes, headers: dict[str, str]) -> dict:
    response = client.post("/v1/trajectories", content=body, headers=caller.headers | headers)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize("relative", [NEBIUS, SWE_SMITH, SWE_GYM])
def test_parquet_body_stores_the_runs_of_the_json_form(
    client: TestClient, caller: Caller, relative: str
) -> None:
    from_parquet = _post(client, caller, _parquet(hub_table(relative)), PARQUET)
    rows = len(json_rows(relative))
    assert (from_parquet["created"], from_parquet["duplicates"]) == (rows, 0)

    # The JSON form of the same rows holds exactly these runs: every one is a duplicate of the
    # run the Parquet row made (same messages and tools), with the same steps and resolution.
    from_json = _post(client, caller, trajectory_file(relative).read_bytes(), {})
    assert from_json["created"] == 0
    summary = ("id", "source_format", "num_steps", "resolved")
    assert [{k: t[k] for k in summary} for t in from_json["trajectories"]] == [
        {k: t[k] for k in summary} for t in from_parquet["trajectories"]
    ]


def test_a_bad_row_is_refused_with_its_row_and_field_and_nothing_is_stored(
    client: TestClient, caller: Caller, session: Session
) -> None:
    rows = json_rows(NEBIUS)
    rows[2]["trajectory"][0]["role"] = "robot"
    before = row_counts(session)
    response = client.post(
        "/v1/trajectories",
        content=_parquet(pa.Table.from_pylist(rows, schema=hub_table(NEBIUS).schema)),
        headers=caller.headers | PARQUET,
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["location"]) == ("invalid_trajectory", "row 3: trajectory[0].role")
    assert row_counts(session) == before


def test_unreadable_parquet_is_a_400(client: TestClient, caller: Caller) -> None:
    response = client.post(
        "/v1/trajectories", content=b"PAR1 but not", headers=caller.headers | PARQUET
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parquet"


def test_without_pyarrow_a_parquet_body_is_a_415(
    client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _parquet(hub_table(NEBIUS))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    response = client.post("/v1/trajectories", content=body, headers=caller.headers | PARQUET)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "srft[export]" in error["message"]
