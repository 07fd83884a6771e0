"""The name of an export folder's manifest: the file that lists its shards, each with its size
and sha256 (`writers.shards.file_sha256`).

Pure and light: the builder writes it and the API serves it, and `srft pull` and the trainer,
which check files against it, need its name without importing the builder (and a database).
"""

from __future__ import annotations

MANIFEST = "manifest.json"
