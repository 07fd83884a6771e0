"""The consumers of a `tokenized_parquet` export, run for real on an export of the shared runs:
the export fixtures, the Llama-3-style test tokenizer and a tiny random Llama (no downloads),
and the reference each consumer's targets are checked against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.consumers.trained_tokens import (
    ExportRow,
    Key,
    Reference,
    export_rows,
    kept_steps,
    reference_rows,
)
from tests.e2e import (  # noqa: F401
    api,
    e2e_database_url,
    e2e_redis,
    export_dir,
    rules_critic,
    workers,
)
from tests.exports.conftest import Corpus, corpus  # noqa: F401
from tests.training.conftest import model_dir, short_ids  # noqa: F401

# Long enough that runs are split into several rows, short enough to train on in seconds.
MAX_SEQ_LEN = 4096


@dataclass
class ParquetExport:
    folder: Path
    manifest: dict[str, Any]
    rows: list[ExportRow]
    expected: dict[Key, Reference]  # what rows should train, by the template and the verdicts

    @property
    def data_files(self) -> str:
        return str(self.folder / "data" / "*.parquet")

    @property
    def trained_tokens(self) -> int:
        count: int = self.manifest["counts"]["tokens"]["trained"]
        return count


@pytest.fixture(scope="module")
def parquet_export(
    corpus: Corpus,  # noqa: F811
    tokenizers: dict[str, Path],
    short_ids: list[str],  # noqa: F811
) -> ParquetExport:
    """`srft` over six short runs (three with steps the rules call mistakes), split at
    MAX_SEQ_LEN with the Llama-3-style tokenizer."""
    from transformers import AutoTokenizer

    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["llama3"]),
            "max_seq_len": MAX_SEQ_LEN,
            "overflow": "split",
            "selection": {"trajectory_ids": short_ids},
        }
    )
    assert export["status"] == "completed", export["error"]
    folder = corpus.path(export)
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = export_rows(folder)
    verdicts = corpus.verdicts(corpus.job_id)
    keep = {}
    for trajectory_id, detail in corpus.trajectories.items():
        steps = range(detail["num_steps"])
        labels = [verdicts.get((trajectory_id, k), {}).get("label") for k in steps]
        keep[trajectory_id] = kept_steps(detail["resolved"], labels)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers["llama3"]))
    expected = reference_rows(tokenizer, rows, corpus.trajectories, keep)
    return ParquetExport(folder, manifest, rows, expected)
