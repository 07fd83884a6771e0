"""Parquet dataset rows: each row reads as its JSON form does, from the Hub's own schemas."""

from __future__ import annotations

import datetime
import decimal
import io
import sys
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.errors import InvalidParquetError, InvalidTrajectoryError, UnsupportedMediaTypeError
from app.recipe import steps as recipe_steps
from app.trajectories.formats import parquet, parse_upload
from app.trajectories.formats.parquet import decode_parquet
from tests.helpers import trajectory_file
from tests.hub_datasets import (
    NEBIUS,
    SWE_GYM,
    SWE_SMITH,
    hub_table,
    json_rows,
    swe_rebench_table,
)


def _parquet(table: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)  # type: ignore[arg-type]
    return sink.getvalue()


@pytest.mark.parametrize(
    ("relative", "source_format", "resolved"),
    [
        (NEBIUS, "nebius", [False, False, False]),
        (SWE_SMITH, "openai", [True] * 5),
        (SWE_GYM, "openai", [False, False, False]),
    ],
)
def test_hub_parquet_rows_read_as_their_json_form(
    relative: str, source_format: str, resolved: list[bool]
) -> None:
    from_json = parse_upload(trajectory_file(relative).read_bytes())
    from_parquet = parse_upload(_parquet(hub_table(relative), row_group_size=2), parquet=True)

    assert [asdict(run) for run in from_parquet] == [asdict(run) for run in from_json]
    assert {run.source_format for run in from_parquet} == {source_format}
    # The resolution columns (`target`, `resolved`) are read as the JSON rows' are.
    assert [run.resolved for run in from_parquet] == resolved
    assert [len(recipe_steps.split_steps(run.messages)) for run in from_parquet] == [
        len(recipe_steps.split_steps(run.messages)) for run in from_json
    ]


def test_swe_smith_messages_as_a_json_string_are_the_list() -> None:
    table = hub_table(SWE_SMITH)
    assert table.schema.field("messages").type == pa.string()
    (row,) = decode_parquet(_parquet(table.slice(0, 1))).records
    assert isinstance(row.value["messages"], str)
    (run,) = parse_upload(_parquet(table.slice(0, 1)), parquet=True)
    assert run.task_id == json_rows(SWE_SMITH)[0]["instance_id"]
    assert run.messages[0]["role"] == "system"


def test_swe_rebench_rows_read_their_trajectory_and_0_1_resolution() -> None:
    runs = parse_upload(_parquet(swe_rebench_table([1, 0, 1])), parquet=True)
    gym = parse_upload(trajectory_file(SWE_GYM).read_bytes())
    assert [run.source_format for run in runs] == ["openai"] * 3
    assert [run.resolved for run in runs] == [True, False, True]
    # The same OpenHands messages as the SWE-Gym rows they were laid out from.
    assert [run.messages for run in runs] == [run.messages for run in gym]
    assert [run.tools for run in runs] == [run.tools for run in gym]
    assert runs[0].task_id == "getmoto__moto-5321"
    assert runs[0].metadata["variant"] == "swe-rebench"
    assert runs[0].metadata["trajectory_id"] == "chatcmpl-0"


def test_rows_are_numbered_from_one_in_error_locations() -> None:
    rows = json_rows(NEBIUS)
    rows[1]["trajectory"][2]["role"] = "robot"
    table = pa.Table.from_pylist(rows, schema=hub_table(NEBIUS).schema)
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload(_parquet(table), parquet=True)
    assert caught.value.location == "row 2: trajectory[2].role"


def test_values_json_cannot_carry_are_converted() -> None:
    table = pa.table(
        {
            "when": pa.array([datetime.datetime(2025, 1, 2, 3, 4, 5)], pa.timestamp("us")),
            "day": pa.array([datetime.date(2025, 1, 2)]),
            "took": pa.array([datetime.timedelta(seconds=90)], pa.duration("ms")),
            "cost": pa.array([decimal.Decimal("1.25")], pa.decimal128(5, 2)),
            "count": pa.array([decimal.Decimal("3")], pa.decimal128(5, 0)),
            "ratio": pa.array([float("nan")]),
            "half": pa.array([1.5], pa.float16()),
            "text": pa.array([b"caf\xc3\xa9"], pa.binary()),
            "tags": pa.array([[("a", 1), ("b", None)]], pa.map_(pa.string(), pa.int64())),
            "steps": pa.array([[1.0, float("inf"), None]]),
        }
    )
    ((number, row),) = list(parquet.iter_rows(pa.BufferReader(_parquet(table))))
    assert number == 1
    assert row == {
        "when": "2025-01-02T03:04:05",
        "day": "2025-01-02",
        "took": 90.0,
        "cost": 1.25,
        "count": 3,
        "ratio": None,
        "half": 1.5,
        "text": "café",
        "tags": {"a": 1, "b": None},
        "steps": [1.0, None, None],
    }


def test_a_binary_value_that_is_not_text_is_refused_with_its_row_and_field() -> None:
    table = pa.table({"blob": pa.array([b"ok", b"\xff\xfe"], pa.binary())})
    rows = list(parquet.iter_rows(pa.BufferReader(_parquet(table))))
    assert rows[0] == (1, {"blob": "ok"})
    number, error = rows[1]
    assert number == 2
    assert isinstance(error, InvalidParquetError)
    assert error.location == "row 2: blob"
    with pytest.raises(InvalidParquetError) as caught:
        decode_parquet(_parquet(table))
    assert caught.value.location == "row 2: blob"


def test_reading_from_a_row_on_skips_whole_row_groups() -> None:
    table = pa.table({"n": list(range(10))})
    body = _parquet(table, row_group_size=3)
    rows = list(parquet.iter_rows(pa.BufferReader(body), start=4))
    assert rows == [(n + 1, {"n": n}) for n in range(4, 10)]
    assert list(parquet.iter_rows(pa.BufferReader(body), start=10)) == []


def test_unreadable_and_empty_parquet_are_refused() -> None:
    with pytest.raises(InvalidParquetError) as caught:
        decode_parquet(b"PAR1 not really")
    assert (caught.value.status_code, caught.value.location) == (400, "body")
    empty = _parquet(pa.table({"messages": pa.array([], pa.string())}))
    with pytest.raises(InvalidParquetError, match="no rows"):
        decode_parquet(empty)


def test_a_body_that_decodes_too_large_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet, "MAX_DECODED_BYTES", 1000)
    body = _parquet(pa.table({"text": ["x" * 100_000]}), compression="zstd")
    with pytest.raises(InvalidParquetError, match="decodes to more than"):
        decode_parquet(body)


def test_without_pyarrow_parquet_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        decode_parquet(b"PAR1")
    assert caught.value.status_code == 415
    assert "srft[export]" in caught.value.message
