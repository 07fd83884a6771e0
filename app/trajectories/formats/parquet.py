"""Dataset rows stored as Parquet, as the Hugging Face Hub serves them
(`data/train-00000-of-00012.parquet`).

Each row becomes the JSON object the importers already read from a JSON array or JSON Lines of
the same dataset's rows: columns are keys, Arrow lists are lists, structs and maps are objects.
What JSON cannot carry directly is converted here, in one place, for the API's Parquet bodies
and `srft ingest` alike:

- nulls stay nulls, where they are: a struct has the same fields in every row, so a field
  that only some rows have is null in all the others, and that is how the Hub's own JSON
  exports of these datasets read too (the SWE-Gym rows' tool schemas list every property of
  every tool, null where a tool has no such property); importers read a null field as a
  missing one, and a row reads the same from Parquet as from its JSON form, so the two
  deduplicate against each other;
- NaN and ±Infinity become null; decimals become numbers; dates and times ISO 8601 strings,
  durations seconds; numpy scalars and arrays (half floats, pandas-written files) their values;
- binary values become text when they are UTF-8, and are refused otherwise, with the row and
  the field (`row 12: trajectory[3].text`).

Rows are numbered from 1, as lines are. Pure: pyarrow (the `export` extra) is imported only
when Parquet is read, and its absence is a 415 for the API, not an import error.
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from collections.abc import Iterator
from typing import Any

from app.errors import InvalidParquetError, UnsupportedMediaTypeError
from app.trajectories.formats.base import Document, Record

MEDIA_TYPE = "application/vnd.apache.parquet"
# Rows converted at a time: small, since one agent run can hold megabytes of text.
BATCH_ROWS = 64
# What a Parquet body may decode to: the Arrow size of the default upload limit's worth of
# JSON, so a compressed body costs the server no more memory than the largest JSON body does
# (text compresses four to six times in these datasets, and a small body must not expand to
# gigabytes). Larger files go through `srft ingest`, which sends them in batches.
MAX_DECODED_BYTES = 64 * 1024 * 1024

RowOrError = dict[str, Any] | InvalidParquetError


def _pyarrow() -> tuple[Any, Any]:
    """`pyarrow` and `pyarrow.parquet`, or a 415 saying how to get them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UnsupportedMediaTypeError(
            "reading Parquet needs pyarrow, which is not installed here: install "
            "srft[export] (pip install 'srft[export]'), or send the rows as JSON Lines "
            "(Content-Type: application/x-ndjson)",
            location="header.content-type",
        ) from None
    return pyarrow, pyarrow.parquet


def count_rows(path: str) -> int:
    """The number of rows of a Parquet file, from its footer (nothing else is read)."""
    _, parquet = _pyarrow()
    return int(parquet.ParquetFile(path).metadata.num_rows)


def iter_rows(
    source: Any, *, start: int = 0, max_decoded_bytes: int | None = None
) -> Iterator[tuple[int, RowOrError]]:
    """`(row number, JSON object)` for every row of a Parquet file from row `start` (0-based)
    on, a batch of rows in memory at a time. A row holding a value JSON cannot carry comes as
    its `InvalidParquetError` instead, so a caller can go on with the next row; a file that
    cannot be read raises one."""
    pyarrow, parquet = _pyarrow()
    try:
        file = parquet.ParquetFile(source)
        groups, skip = _row_groups_from(file.metadata, start)
        if not groups:
            return
        number = start
        decoded = 0
        for batch in file.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip:
                batch, skip = batch.slice(skip), 0
            decoded += batch.nbytes
            if max_decoded_bytes is not None and decoded > max_decoded_bytes:
                raise InvalidParquetError(
                    f"the Parquet body decodes to more than {max_decoded_bytes} bytes; send "
                    "fewer rows per request",
                    location=f"row {number + 1}",
                )
            for row in batch.to_pylist(maps_as_pydicts="lossy"):
                number += 1
                yield number, _json_row(row, number)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise InvalidParquetError(f"not a readable Parquet file: {exc}", location="body") from None


def _row_groups_from(metadata: Any, start: int) -> tuple[list[int], int]:
    """The row groups holding rows from `start` on, and how many rows of the first to skip:
    resuming a large file reads only what is left of it."""
    before = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if before + rows > start:
            return list(range(group, metadata.num_row_groups)), start - before
        before += rows
    return [], 0


def decode_parquet(raw: bytes) -> Document:
    """A Parquet body as the document its rows make as JSON Lines, one record per row."""
    pyarrow, _ = _pyarrow()
    records: list[Record] = []
    for number, row in iter_rows(pyarrow.BufferReader(raw), max_decoded_bytes=MAX_DECODED_BYTES):
        if isinstance(row, InvalidParquetError):
            raise row
        records.append(Record(row, line=number, unit="row"))
    if not records:
        raise InvalidParquetError("the Parquet file has no rows", location="body")
    return Document(records=tuple(records), is_lines=True)


def _json_row(row: dict[str, Any], number: int) -> RowOrError:
    try:
        value = _json_value(row, "")
    except _UnconvertibleError as error:
        return InvalidParquetError(
            f"{error.what} cannot be carried in JSON", location=f"row {number}: {error.path}"
        )
    result: dict[str, Any] = value
    return result


class _UnconvertibleError(ValueError):
    def __init__(self, what: str, path: str) -> None:
        super().__init__(what)
        self.what = what
        self.path = path


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_value(value: Any, path: str) -> Any:
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_value(item, _join(path, str(key))) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{path}[{n}]") for n, item in enumerate(value)]
    return _scalar(value, path)


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _UnconvertibleError("a binary value that is not UTF-8 text", path) from None
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy, without importing it
        return _json_value(value.tolist(), path)
    raise _UnconvertibleError(f"a value of type {type(value).__name__}", path)
