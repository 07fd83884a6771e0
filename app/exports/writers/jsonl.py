"""JSON Lines shards (rows of messages, or of text): one compact, key-ordered object per line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from app.exports.parts import PartFile
from app.exports.writers.shards import JSONL, OpenShard, ShardInfo, ShardLimits, publish_shards

RUN = "rows.jsonl"


def dump_line(row: dict[str, Any]) -> bytes:
    """Byte-stable serialisation: same row, same bytes."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class JsonlShards:
    suffix = JSONL.suffix

    def __init__(self, root: Path, limits: ShardLimits) -> None:
        self.root = root
        self.limits = limits
        self._work = root / ".shards"
        self._work.mkdir(parents=True, exist_ok=True)
        self._done: list[tuple[Path, OpenShard, str | None]] = []
        self._shard: OpenShard | None = None
        self._file: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._bytes = 0

    def write(self, row: dict[str, Any]) -> None:
        self.write_line(dump_line(row))

    def write_line(self, line: bytes) -> None:
        """A row already serialised by `dump_line` (a part's row, replayed)."""
        shard = self._shard
        if shard is not None and (
            shard.rows >= self.limits.max_rows or self._bytes + len(line) > self.limits.max_bytes
        ):
            self._finish()
            shard = None
        if shard is None:
            shard = self._open()
        assert self._file is not None
        self._file.write(line)
        self._digest.update(line)
        self._bytes += len(line)
        shard.rows += 1

    def _open(self) -> OpenShard:
        temp = self._work / f"{len(self._done):05d}{self.suffix}"
        self._file = temp.open("wb")
        self._shard = OpenShard(temp)
        self._digest = hashlib.sha256()
        self._bytes = 0
        return self._shard

    def _finish(self) -> None:
        if self._shard is None or self._file is None:
            return
        self._file.close()
        self._done.append((self._shard.temp, self._shard, self._digest.hexdigest()))
        self._shard, self._file = None, None

    def close(self) -> list[ShardInfo]:
        self._finish()
        infos = publish_shards(self.root, self._done, self.suffix, tokenized=False)
        self._work.rmdir()
        return infos

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


class JsonlRun:
    """A part's rows, as the very lines its shards will hold (app/exports/parts.py)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RUN
        self._file: IO[bytes] | None = self.path.open("wb")
        self._digest = hashlib.sha256()
        self._rows = 0

    def write(self, row: dict[str, Any]) -> None:
        line = dump_line(row)
        assert self._file is not None
        self._file.write(line)
        self._digest.update(line)
        self._rows += 1

    def close(self) -> PartFile:
        self.abort()
        return PartFile(
            self.path.name, self.path.stat().st_size, self._digest.hexdigest(), self._rows
        )

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_run(path: Path) -> Iterator[bytes]:
    """The lines of a part's rows, in order."""
    with path.open("rb") as handle:
        yield from handle
