"""`tokenized_parquet` shards: rows of `input_ids`, `attention_mask`, `labels` (-100 where no
loss, not shifted), `assistant_masks` (1 exactly where `labels` is not -100, so trainers that
read assistant masks, such as TRL with `assistant_only_loss=True`, train the same tokens),
plus `trajectory_id`, `part`, `num_tokens`, `num_trained_tokens` and, with soft weights,
`loss_weights`. Loadable with `datasets.load_dataset("parquet", ...)`.

Row groups are cut by row and byte counts only (never by time), so the bytes are a function of
the rows: the same rows give the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.exports.parts import PartFile
from app.exports.writers.shards import (
    PARQUET,
    OpenShard,
    ShardInfo,
    ShardLimits,
    file_sha256,
    publish_shards,
)
from app.recipe.render import IGNORE_INDEX, TokenRow

RUN = "rows.arrow"
ROW_GROUP_ROWS = 256
# Row groups of ~2M tokens: small enough to keep the writer's buffer (Python lists) modest,
# large enough for fast column reads.
ROW_GROUP_TOKENS = 2 * 1024 * 1024


def schema(soft: bool) -> pa.Schema:
    fields = [
        pa.field("trajectory_id", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("attention_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("assistant_masks", pa.list_(pa.int8()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_trained_tokens", pa.int32(), nullable=False),
    ]
    if soft:
        fields.append(pa.field("loss_weights", pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)


def _lists(values: np.ndarray[Any, Any], offsets: np.ndarray[Any, Any]) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


class ParquetShards:
    suffix = PARQUET.suffix

    def __init__(self, root: Path, limits: ShardLimits, *, soft: bool) -> None:
        self.root = root
        self.limits = limits
        self.soft = soft
        self.schema = schema(soft)
        self._work = root / ".shards"
        self._work.mkdir(parents=True, exist_ok=True)
        self._done: list[tuple[Path, OpenShard, str | None]] = []
        self._shard: OpenShard | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[tuple[str, TokenRow]] = []
        self._pending_tokens = 0

    def write(self, key: str, row: TokenRow) -> None:
        self._pending.append((key, row))
        self._pending_tokens += len(row.input_ids)
        shard_rows = self._shard.rows if self._shard is not None else 0
        if (
            len(self._pending) >= ROW_GROUP_ROWS
            or self._pending_tokens >= ROW_GROUP_TOKENS
            or shard_rows + len(self._pending) >= self.limits.max_rows
            # Small byte limits need small row groups to be honoured at all.
            or self._pending_tokens * 2 >= self.limits.max_bytes
        ):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        shard = self._shard
        if shard is None:
            shard = self._open()
        rows = [row for _, row in self._pending]
        lengths = np.fromiter((len(r.input_ids) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([np.asarray(r.input_ids, dtype=np.int32) for r in rows])
        weights = np.concatenate([np.asarray(r.weights, dtype=np.float32) for r in rows])
        trained = weights > 0
        labels = np.where(trained, ids, np.int32(IGNORE_INDEX)).astype(np.int32)
        per_row_trained = (
            np.add.reduceat(trained.astype(np.int64), offsets[:-1])
            if len(ids)
            else np.zeros(len(rows), dtype=np.int64)
        )
        # reduceat misreads empty rows; rows always have tokens, but be exact anyway.
        per_row_trained = np.where(lengths > 0, per_row_trained, 0)
        columns: dict[str, pa.Array] = {
            "trajectory_id": pa.array([key for key, _ in self._pending], pa.string()),
            "part": pa.array([r.part for r in rows], pa.int32()),
            "input_ids": _lists(ids, offsets),
            "attention_mask": _lists(np.ones(len(ids), dtype=np.int8), offsets),
            "labels": _lists(labels, offsets),
            "assistant_masks": _lists(trained.astype(np.int8), offsets),
            "num_tokens": pa.array(lengths.astype(np.int32), pa.int32()),
            "num_trained_tokens": pa.array(per_row_trained.astype(np.int32), pa.int32()),
        }
        if self.soft:
            columns["loss_weights"] = _lists(weights, offsets)
        table = pa.Table.from_pydict(columns, schema=self.schema)
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=len(rows))
        shard.rows += len(rows)
        shard.tokens += int(lengths.sum())
        shard.trained_tokens += int(trained.sum())
        self._pending = []
        self._pending_tokens = 0
        if shard.rows >= self.limits.max_rows or shard.temp.stat().st_size >= self.limits.max_bytes:
            self._finish()

    def _open(self) -> OpenShard:
        temp = self._work / f"{len(self._done):05d}{self.suffix}"
        self._writer = pq.ParquetWriter(
            temp,
            self.schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=["trajectory_id"],
            write_statistics=False,
        )
        self._shard = OpenShard(temp)
        return self._shard

    def _finish(self) -> None:
        if self._shard is None or self._writer is None:
            return
        self._writer.close()
        self._done.append((self._shard.temp, self._shard, None))
        self._shard, self._writer = None, None

    def close(self) -> list[ShardInfo]:
        self._flush()
        self._finish()
        infos = publish_shards(self.root, self._done, self.suffix, tokenized=True)
        self._work.rmdir()
        return infos

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()


# A part's rows as the shard writer takes them, weights in full precision (the writer makes
# them float32 itself), so that replaying them writes the same bytes.
RUN_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("weights", pa.list_(pa.float64()), nullable=False),
    ]
)


class TokenRun:
    """A part's tokenized rows, in an Arrow file of record batches (app/exports/parts.py)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RUN
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        self._writer: pa.ipc.RecordBatchFileWriter | None = pa.ipc.new_file(
            str(self.path), RUN_SCHEMA, options=options
        )
        self._pending: list[tuple[str, TokenRow]] = []
        self._pending_tokens = 0
        self._rows = 0

    def write(self, key: str, row: TokenRow) -> None:
        self._pending.append((key, row))
        self._pending_tokens += len(row.input_ids)
        if len(self._pending) >= ROW_GROUP_ROWS or self._pending_tokens >= ROW_GROUP_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending or self._writer is None:
            return
        batch = pa.record_batch(
            [
                pa.array([key for key, _ in self._pending], pa.string()),
                pa.array([row.part for _, row in self._pending], pa.int32()),
                pa.array([row.input_ids for _, row in self._pending], pa.list_(pa.int32())),
                pa.array([row.weights for _, row in self._pending], pa.list_(pa.float64())),
            ],
            schema=RUN_SCHEMA,
        )
        self._writer.write_batch(batch)
        self._rows += len(self._pending)
        self._pending = []
        self._pending_tokens = 0

    def close(self) -> PartFile:
        self._flush()
        self.abort()
        return PartFile(
            self.path.name, self.path.stat().st_size, file_sha256(self.path), self._rows
        )

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_run(path: Path) -> Iterator[tuple[str, TokenRow]]:
    """A part's tokenized rows, in order, a record batch at a time."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for number in range(reader.num_record_batches):
            batch = reader.get_batch(number)
            keys = batch.column(0).to_pylist()
            parts = batch.column(1).to_numpy()
            ids, weights = batch.column(2), batch.column(3)
            id_values = ids.values.to_numpy()
            id_offsets = ids.offsets.to_numpy()
            weight_values = weights.values.to_numpy()
            weight_offsets = weights.offsets.to_numpy()
            for row in range(batch.num_rows):
                yield (
                    keys[row],
                    TokenRow(
                        input_ids=id_values[id_offsets[row] : id_offsets[row + 1]].tolist(),
                        weights=weight_values[
                            weight_offsets[row] : weight_offsets[row + 1]
                        ].tolist(),
                        part=int(parts[row]),
                    ),
                )
