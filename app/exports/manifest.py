"""The name of an export folder's manifest: the file that lists its shards, each with its size
and sha256 (`writers.shards.file_sha256`).

Pure and light: the builder writes it and the API serves it, and `srft pull` and the trainer,
which check files against it, need its name without importing the builder (and a database).
"""

from __future__ import annotations

import json
from typing import Any

MANIFEST = "manifest.json"


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file's exact bytes: what the builder writes, and what an export's size
    counts without reading the file (the same dict always gives the same bytes)."""
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
