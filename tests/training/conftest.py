"""Training on real exports: the export fixtures, plus a tiny random causal LM saved locally
with the Llama-3-style tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (  # noqa: F401
    api,
    e2e_database_url,
    e2e_redis,
    export_dir,
    rules_critic,
    workers,
)
from tests.exports.conftest import Corpus, corpus  # noqa: F401
from tests.training.models import tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizers: dict[str, Path]) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizers["llama3"])


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizers: dict[str, Path]) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny-llama-tied"), tokenizers["llama3"], tied=True)


@pytest.fixture(scope="module")
def short_ids(corpus: Corpus) -> list[str]:  # noqa: F811
    """The six shortest runs with a masked step: quick to train on, and masks to test."""
    masked = {
        tid for (tid, _), v in corpus.verdicts(corpus.job_id).items() if v["label"] == "mistake"
    }
    by_size = sorted((len(str(d["messages"])), tid) for tid, d in corpus.trajectories.items())
    chosen = [tid for _, tid in by_size if tid in masked][:3]
    chosen += [tid for _, tid in by_size if tid not in chosen][:3]
    return chosen


@pytest.fixture(scope="module")
def export_folder(
    corpus: Corpus,  # noqa: F811
    tokenizers: dict[str, Path],
    short_ids: list[str],
) -> dict[str, Any]:
    export = corpus.export(
        {
            "job_ids": [corpus.job_id],
            "policy": "srft",
            "format": "tokenized_parquet",
            "tokenizer": str(tokenizers["llama3"]),
            "max_seq_len": 4096,
            "overflow": "split",
            "selection": {"trajectory_ids": short_ids},
        }
    )
    assert export["status"] == "completed", export["error"]
    return export
