"""Training rows from an export: checked against its manifest, then read.

The format's registration (`app.exports.formats`) says how it is read: token rows
(`tokenized_parquet`) are used as written; rows of messages (`openai_jsonl`,
`openai_jsonl_raw`) are tokenized here with the very code the exporter uses
(`app.exports.tokenize`), so both paths give the same tokens and masks. Every shard's size
and sha256 must match the manifest, or nothing is read.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.exports import formats as export_formats
from app.exports.formats import TrainerReads
from app.exports.manifest import MANIFEST
from app.exports.writers.shards import file_sha256
from app.recipe.render import IGNORE_INDEX


class DataError(Exception):
    """The data cannot be trained on as given; the message names the file."""


@dataclass(frozen=True)
class Row:
    key: str  # trajectory id (and part)
    input_ids: np.ndarray[Any, np.dtype[np.int64]]
    labels: np.ndarray[Any, np.dtype[np.int64]]  # IGNORE_INDEX where no loss; not shifted
    weights: np.ndarray[Any, np.dtype[np.float32]] | None  # soft weights, or None

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def export_root(path: Path) -> Path:
    return path.parent if path.name == MANIFEST else path


def verify_export(path: Path) -> dict[str, Any]:
    """The manifest, once every shard it lists has its size and sha256."""
    root = export_root(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found (is {root} an export folder?)")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise DataError(f"{manifest_path}: not valid JSON ({error})") from error
    for shard in manifest.get("shards", []):
        file = root / shard["path"]
        if not file.is_file():
            raise DataError(f"{file}: listed in the manifest but missing")
        size, digest = file.stat().st_size, file_sha256(file)
        if size != shard["bytes"] or digest != shard["sha256"]:
            raise DataError(
                f"{file}: {size} bytes with sha256 {digest}, but the manifest says "
                f"{shard['bytes']} bytes with sha256 {shard['sha256']}: the file was changed "
                "or damaged; pull the export again"
            )
    return manifest


def load_rows(path: Path, *, tokenizer: str | None, max_seq_len: int) -> list[Row]:
    """Every row of a verified export, each cut to `max_seq_len` tokens."""
    manifest = verify_export(path)
    root = export_root(path)
    files = [root / s["path"] for s in manifest["shards"]]
    fmt = manifest.get("format")
    try:
        reads = export_formats.get_format(fmt).trainer
    except export_formats.UnknownExportFormatError:
        reads = None
    if reads is TrainerReads.TOKEN_ROWS:
        rows = _parquet_rows(files)
    elif reads is TrainerReads.MESSAGES:
        if tokenizer is None:
            raise DataError(f"an {fmt} export needs a tokenizer to train on")
        rows = _jsonl_rows(files, tokenizer, max_seq_len)
    else:
        readable = [f.name for f in export_formats.FORMATS if f.trainer is not None]
        raise DataError(
            f"{root}: format {fmt!r} cannot be trained on here ({export_formats.or_list(readable)})"
        )
    return [_cut(row, max_seq_len) for row in rows]


def _cut(row: Row, limit: int) -> Row:
    if len(row.input_ids) <= limit:
        return row
    weights = None if row.weights is None else row.weights[:limit]
    return Row(row.key, row.input_ids[:limit], row.labels[:limit], weights)


def _parquet_rows(files: list[Path]) -> list[Row]:
    import pyarrow.parquet as pq

    rows: list[Row] = []
    for file in files:
        table = pq.read_table(file)
        names = set(table.column_names)
        if not {"input_ids", "labels"} <= names:
            raise DataError(f"{file}: no input_ids/labels columns")
        ids = table.column("input_ids").to_pylist()
        labels = table.column("labels").to_pylist()
        weights = table.column("loss_weights").to_pylist() if "loss_weights" in names else None
        keys = table.column("trajectory_id").to_pylist() if "trajectory_id" in names else None
        parts = table.column("part").to_pylist() if "part" in names else None
        for i in range(table.num_rows):
            key = f"{keys[i] if keys else i}:{parts[i] if parts else 0}"
            rows.append(
                Row(
                    key,
                    np.asarray(ids[i], dtype=np.int64),
                    np.asarray(labels[i], dtype=np.int64),
                    None if weights is None else np.asarray(weights[i], dtype=np.float32),
                )
            )
    return rows


def _jsonl_rows(files: list[Path], tokenizer: str, max_seq_len: int) -> list[Row]:
    from app.exports.tokenize import (
        Example,
        TokenizeConfig,
        load_chat_tokenizer,
        tokenize_examples,
        weights_from_messages,
    )

    chat = load_chat_tokenizer(tokenizer)
    examples: list[Example] = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            row = json.loads(line)
            messages = row["messages"]
            steps = tuple(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            examples.append(
                Example(
                    f"{file.name}:{number}",
                    messages,
                    row.get("tools"),
                    steps,
                    weights_from_messages(messages),
                )
            )
    rows: list[Row] = []
    config = TokenizeConfig(max_seq_len, "truncate")
    for start in range(0, len(examples), 64):
        for result in tokenize_examples(chat, examples[start : start + 64], config):
            if result.error is not None:
                raise DataError(f"{result.key}: {result.error}")
            for token_row in result.rows:
                ids = np.asarray(token_row.input_ids, dtype=np.int64)
                labels = np.asarray(token_row.labels, dtype=np.int64)
                rows.append(Row(f"{result.key}:{token_row.part}", ids, labels, None))
    return rows


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A deterministic eval split by row key (pieces of one trajectory stay together)."""
    if fraction <= 0:
        return rows, []
    train: list[Row] = []
    held: list[Row] = []
    for row in rows:
        trajectory = row.key.rsplit(":", 1)[0]
        bucket = zlib.crc32(f"{seed}:{trajectory}".encode()) / 2**32
        (held if bucket < fraction else train).append(row)
    return train, held
