"""Shards: files of at most `max_rows` rows / about `max_bytes` bytes, named the Hugging Face
way (`data/train-00000-of-00003.parquet`) once their number is known, each with its sha256."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPLIT = "train"


@dataclass(frozen=True)
class ShardFiles:
    """What a writer's shard files are: their suffix, and the media type they are served as."""

    suffix: str
    media_type: str


JSONL = ShardFiles(".jsonl", "application/x-ndjson")
PARQUET = ShardFiles(".parquet", "application/vnd.apache.parquet")


@dataclass(frozen=True)
class ShardLimits:
    max_rows: int
    max_bytes: int


@dataclass
class ShardInfo:
    path: str  # relative to the export's root, e.g. data/train-00000-of-00001.jsonl
    sha256: str
    bytes: int
    rows: int
    tokens: int | None
    trained_tokens: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OpenShard:
    """Counters of the shard being written."""

    temp: Path
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def publish_shards(
    root: Path, written: list[tuple[Path, OpenShard, str | None]], suffix: str, tokenized: bool
) -> list[ShardInfo]:
    """Rename finished temporary shard files to their final names (now that the count is
    known) and describe them. `written` holds (temp path, counters, sha256 if known)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    total = len(written)
    infos: list[ShardInfo] = []
    for number, (temp, shard, sha) in enumerate(written):
        final = data / f"{SPLIT}-{number:05d}-of-{total:05d}{suffix}"
        os.replace(temp, final)
        infos.append(
            ShardInfo(
                path=final.relative_to(root).as_posix(),
                sha256=sha or file_sha256(final),
                bytes=final.stat().st_size,
                rows=shard.rows,
                tokens=shard.tokens if tokenized else None,
                trained_tokens=shard.trained_tokens if tokenized else None,
            )
        )
    return infos
